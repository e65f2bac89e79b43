//! A desktop VM's screen and input, through QMP: `screendump` (binary PPM into a host file)
//! and `input-send-event`. QEMU itself renders the frame and feeds the virtio tablet and
//! keyboard ([`crate::Display`]), so nothing in the guest reports the screen or fakes input.
//!
//! Must not: interpret frames or key names (kiln-core's `desktop` does), or be called on a
//! VM without a display (QEMU answers with an error; the engine refuses first).

use std::path::Path;

use kiln_qmp::commands::{InputSendEvent, Screendump};

use crate::Vm;
use crate::error::VmmError;

impl Vm {
    /// Writes the display's current frame to `path` as binary PPM (P6). QEMU has written the
    /// whole file when this returns.
    pub async fn screendump(&self, path: &Path) -> Result<(), VmmError> {
        let cmd = Screendump {
            filename: path.to_string_lossy().into_owned(),
        };
        self.qmp()
            .execute(&cmd)
            .await
            .map(drop)
            .map_err(|source| VmmError::ScreenQmp {
                command: "screendump",
                source,
            })
    }

    /// Sends `events` (QEMU `InputEvent`s) to the guest's input devices as one batch.
    pub async fn send_input(&self, events: Vec<serde_json::Value>) -> Result<(), VmmError> {
        self.qmp()
            .execute(&InputSendEvent { events })
            .await
            .map(drop)
            .map_err(|source| VmmError::ScreenQmp {
                command: "input-send-event",
                source,
            })
    }
}
