//! Errors of the QMP client.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected.
    #[error("failed to connect to the qmp socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading the greeting failed at the I/O level.
    #[error("failed to read the qmp greeting")]
    GreetingIo(#[source] io::Error),
    /// The first line was not a QMP greeting.
    #[error("malformed qmp greeting: {detail}")]
    Greeting {
        /// What was wrong.
        detail: String,
    },
    /// The peer sent a line longer than [`crate::MAX_LINE_BYTES`].
    #[error("qmp line longer than {max_bytes} bytes")]
    LineTooLong {
        /// The limit.
        max_bytes: usize,
    },
    /// The command's arguments could not be serialized.
    #[error("failed to encode the arguments of qmp command {command}")]
    Encode {
        /// Command name.
        command: String,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The reply did not have the shape the command's `Returns` type expects.
    #[error("unexpected reply to qmp command {command}")]
    Decode {
        /// Command name.
        command: String,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// QEMU answered with an error reply.
    #[error("qmp command {command} failed: {desc} ({class})")]
    Command {
        /// Command name.
        command: String,
        /// QMP error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// The connection is closed (or closed while the command was in flight).
    #[error("qmp connection closed: {reason}")]
    Disconnected {
        /// Why it closed (end of stream, I/O error, protocol violation).
        reason: String,
    },
}

impl QmpError {
    /// True when the error is an error reply of the given QMP class.
    pub fn is_command_class(&self, wanted: &str) -> bool {
        matches!(self, QmpError::Command { class, .. } if class == wanted)
    }
}
