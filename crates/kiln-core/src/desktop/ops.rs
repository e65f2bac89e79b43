//! The desktop operations of the engine: screenshots, actions with their receipts, and
//! where a desktop's VNC server listens. One code path serves the API and the CLI.
//!
//! ```text
//!   screenshot: owner ─Screen(Dump)─▶ QEMU writes PPM ─▶ Frame ─▶ PNG (scaled on request)
//!   action:     validate ─▶ input events ─owner Screen(Input)─▶ QEMU tablet/keyboard
//!                          └▶ text QEMU cannot type: `xdotool type` as the session's user
//!               ─▶ (screenshot asked) sample frames until the screen settles ─▶ receipt
//! ```
//!
//! Invariants: every QMP round trip goes through the sandbox's owner (one at a time per
//! sandbox, refused unless it runs); an input frame is one `input-send-event` followed by
//! QEMU's sync, and the frames of one action are sent in order, one at a time, so the
//! guest's virtio input queue never sees a burst it could drop; screenshot files are unique
//! per call and removed whatever happens.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_api_types::{
    ActionQuery, ActionReceipt, DesktopAction, ReceiptScreenshot, SandboxId, Screen, Settle,
};
use serde_json::Value;

use super::frame::{Frame, Rect, Scale, SettleConfig, SettleState};
use super::guest_type::MAX_GUEST_TYPED_CHARS;
use super::keys::{self, TypeChunk};
use super::plan::{Plan, key_frames, plan, pointer_after, pointer_box};
use super::review::TimelineEvent;
use crate::error::CoreError;
use crate::owner::{Op, ScreenOp};
use crate::{Engine, unix_now_ms};

/// Longest a settle wait runs when the request names none (ms).
pub const DEFAULT_SETTLE_MS: u64 = 3000;
/// Pause between the input frames of one action: room for the guest to take the events
/// out of its virtio queue (QEMU drops a whole frame when the queue has no free buffer).
const FRAME_GAP: Duration = Duration::from_millis(2);

/// A screenshot: PNG bytes and the picture's size.
#[derive(Debug, Clone)]
pub struct Screenshot {
    /// The PNG.
    pub png: Vec<u8>,
    /// Width (pixels).
    pub width: u32,
    /// Height (pixels).
    pub height: u32,
}

/// Numbers the screendump files of this process.
static DUMPS: AtomicU64 = AtomicU64::new(0);

/// What the engine knows of a running desktop sandbox.
pub(super) struct DesktopOf {
    pub(super) screen: Screen,
    /// The session's user and X display (from the image's recipe).
    pub(super) user: String,
    pub(super) display: String,
}

impl Engine {
    /// The screen and session of `id`, or `not_a_desktop`.
    fn desktop_of(&self, id: &SandboxId) -> Result<DesktopOf, CoreError> {
        let sb = self.live_sandbox(id).ok_or_else(|| self.not_running(id))?;
        let Some(d) = sb.vm().config().display else {
            return Err(CoreError::NotADesktop(format!(
                "sandbox {id} has no screen: its image is not a desktop"
            )));
        };
        // The session the sandbox was started with (its image's recipe, kept in memory).
        let (user, display) = sb
            .extras()
            .defaults
            .desktop
            .as_ref()
            .map(|d| (d.user.clone(), d.display.clone()))
            .unwrap_or_else(|| ("root".to_owned(), ":0".to_owned()));
        Ok(DesktopOf {
            screen: Screen {
                width: d.width,
                height: d.height,
            },
            user,
            display,
        })
    }

    /// Why `id` has no live owner: not found, or its state.
    fn not_running(&self, id: &SandboxId) -> CoreError {
        match self.store.sandbox_get(id) {
            Ok(Some(row)) => CoreError::WrongState {
                id: id.clone(),
                state: row.status.state,
                wanted: kiln_api_types::SandboxState::Running,
            },
            Ok(None) => CoreError::SandboxNotFound(id.to_string()),
            Err(e) => e.into(),
        }
    }

    /// The running sandbox `id` (its owner's table entry), if there is one.
    pub(crate) fn live_sandbox(&self, id: &SandboxId) -> Option<Arc<crate::sandbox::Sandbox>> {
        self.table().get(id).map(|(_, sb)| Arc::clone(sb))
    }

    /// Where kiln last put `id`'s pointer (none known before its first pointer action).
    fn pointer(&self, id: &SandboxId) -> Option<(u32, u32)> {
        self.live_sandbox(id)?.extras().pointer
    }

    fn set_pointer(&self, id: &SandboxId, p: Option<(u32, u32)>) {
        if let Some(sb) = self.live_sandbox(id) {
            sb.extras().pointer = p;
        }
    }

    /// Where the desktop `id`'s VNC server listens (a unix socket of its run directory).
    pub fn desktop_vnc_socket(&self, id: &SandboxId) -> Result<PathBuf, CoreError> {
        self.desktop_of(id)?;
        Ok(kiln_vmm::RunPaths::new(&self.home.sandbox_dir(id)).vnc_socket)
    }

    /// The screen of `id` as QEMU shows it now.
    pub(crate) async fn desktop_frame(&self, id: &SandboxId) -> Result<Frame, CoreError> {
        let n = DUMPS.fetch_add(1, Ordering::Relaxed);
        let path = self
            .home
            .sandbox_dir(id)
            .join(format!("screen-{}-{n}.ppm", std::process::id()));
        let _cleanup = RemoveOnDrop(path.clone());
        self.call(id, |r| Op::Screen(ScreenOp::Dump(path.clone()), r))
            .await?;
        let bytes = std::fs::read(&path).map_err(|source| CoreError::Io {
            what: "read",
            path: path.clone(),
            source,
        })?;
        Frame::from_ppm(&bytes).map_err(|e| {
            CoreError::HostSetup(format!(
                "QEMU's screendump of sandbox {id} is unusable: {e}"
            ))
        })
    }

    /// A PNG of `id`'s screen, scaled to `width` pixels wide if given.
    pub async fn desktop_screenshot(
        &self,
        id: &SandboxId,
        width: Option<u32>,
    ) -> Result<Screenshot, CoreError> {
        let desk = self.desktop_of(id)?;
        let scale = scale_of(width, desk.screen)?;
        let frame = self.desktop_frame(id).await?;
        encode(&frame, scale)
    }

    /// Sends one input frame (events, then QEMU's sync) to `id`.
    async fn send_input(&self, id: &SandboxId, events: Vec<Value>) -> Result<(), CoreError> {
        self.call(id, |r| Op::Screen(ScreenOp::Input(events), r))
            .await
    }

    /// Does `action` on desktop `id` and answers its receipt; with `q.screenshot`, waits for
    /// the screen to settle and puts a screenshot in it.
    pub async fn desktop_act(
        self: &Arc<Self>,
        id: &SandboxId,
        action: &DesktopAction,
        q: &ActionQuery,
    ) -> Result<ActionReceipt, CoreError> {
        let desk = self.desktop_of(id)?;
        action.validate(desk.screen)?;
        let settle_ms = q.settle_ms.unwrap_or(DEFAULT_SETTLE_MS);
        if settle_ms > kiln_api_types::desktop::MAX_SETTLE_MS {
            return Err(CoreError::BadRequest(format!(
                "settle_ms must be at most {}, got {settle_ms}",
                kiln_api_types::desktop::MAX_SETTLE_MS
            )));
        }
        let scale = scale_of(q.width, desk.screen)?;
        let plan = plan(action, desk.screen)?;
        let text = match action {
            DesktopAction::TypeText {
                secret: Some(name), ..
            } => Some(self.secret_value(id, name)?),
            DesktopAction::TypeText { text: Some(t), .. } => Some(t.clone()),
            _ => None,
        };
        let chunks = match &text {
            Some(t) => {
                let chunks =
                    keys::type_plan(t).map_err(|e| CoreError::BadRequest(e.to_string()))?;
                // Text with characters a US keyboard cannot type goes to the guest whole: a
                // key event of QEMU's keyboard arriving between the guest's keymap change and
                // its keys makes the X server switch to that keyboard's map and loses the
                // character (measured: "héllo → 日本" typed in pieces came out "héllo  日").
                if chunks.iter().any(|c| matches!(c, TypeChunk::Other(_))) {
                    let n = t.chars().count();
                    if n > MAX_GUEST_TYPED_CHARS {
                        return Err(CoreError::BadRequest(format!(
                            "text with characters a US keyboard lacks is typed by the guest, at \
                             most {MAX_GUEST_TYPED_CHARS} characters in one action; this one has \
                             {n}: split it"
                        )));
                    }
                    vec![TypeChunk::Other(t.clone())]
                } else {
                    chunks
                }
            }
            None => Vec::new(),
        };

        let rec = self.recording(id);
        let _busy = rec.as_ref().map(|r| r.busy());
        let action_id = rec.as_ref().map_or_else(String::new, |r| r.action_id());
        if let Some(r) = &rec {
            r.record(TimelineEvent::ActionRequested {
                action_id: action_id.clone(),
                action: serde_json::to_value(action).unwrap_or(Value::Null),
            });
        }
        // The screen before: for the recording, and as the settle detector's baseline.
        let before = if rec.is_some() || q.screenshot {
            self.desktop_frame(id).await.ok()
        } else {
            None
        };
        // Where the pointer is drawn before and after: left out of the settle comparison.
        let masks = {
            // Unknown before the first pointer action: the X server puts it in the middle
            // of the screen when it starts, and the warm snapshot was taken with it there.
            let mut pointer = self
                .pointer(id)
                .or(Some((desk.screen.width / 2, desk.screen.height / 2)));
            let mut masks: Vec<Rect> = pointer
                .iter()
                .map(|&p| pointer_box(p, desk.screen))
                .collect();
            if let Some(p) = pointer_after(action) {
                masks.push(pointer_box(p, desk.screen));
                pointer = Some(p);
            }
            self.set_pointer(id, pointer);
            masks
        };
        let settle_with = q.screenshot.then(|| SettleWith {
            timeout_ms: settle_ms,
            before: before.clone(),
            masks,
        });
        let done = self
            .perform(id, &desk, action, plan, chunks, settle_with)
            .await;
        let (mut receipt, after) = match done {
            Ok(r) => r,
            Err(e) => {
                if let Some(r) = &rec {
                    let now = self.desktop_frame(id).await.ok();
                    r.failed(action_id, &e, now.as_ref().or(before.as_ref()));
                }
                return Err(e);
            }
        };
        receipt.action_id = action_id.clone();
        if let Some(frame) = &after {
            receipt.screenshot = Some(receipt_shot(&encode(frame, scale)?));
        }
        if let Some(r) = &rec {
            let after = match after {
                Some(f) => Some(f),
                None => self.desktop_frame(id).await.ok(),
            };
            let mut logged = serde_json::to_value(&receipt).unwrap_or(Value::Null);
            if let Some(shot) = logged.get_mut("screenshot").and_then(Value::as_object_mut) {
                // The picture is in the recording's screenshots; the line keeps its name.
                shot.remove("png_base64");
            }
            r.record(TimelineEvent::ActionCompleted {
                action_id,
                receipt: logged,
                screenshot_before: before.as_ref().and_then(|f| r.screenshot(f)),
                screenshot_after: after.as_ref().and_then(|f| r.screenshot(f)),
            });
        }
        Ok(receipt)
    }

    /// Sends an action's input (and types its text); with `settle_ms`, waits for the screen
    /// to settle and answers the frame it settled on.
    async fn perform(
        &self,
        id: &SandboxId,
        desk: &DesktopOf,
        action: &DesktopAction,
        plan: Plan,
        chunks: Vec<TypeChunk>,
        settle_with: Option<SettleWith>,
    ) -> Result<(ActionReceipt, Option<Frame>), CoreError> {
        let started_unix_ms = unix_now_ms();
        let t0 = Instant::now();
        let mut events = 0u32;
        let mut typed_in_guest = 0u32;
        for frame in plan.frames {
            events += u32::try_from(frame.len()).unwrap_or(u32::MAX);
            self.send_input(id, frame).await?;
            tokio::time::sleep(FRAME_GAP).await;
        }
        if plan.guest_hscroll != 0 {
            let steps = plan.guest_hscroll.unsigned_abs().to_string();
            let button = if plan.guest_hscroll > 0 { "7" } else { "6" };
            let args = ["click", "--repeat", &steps, "--delay", "20", button];
            self.guest_x(id, desk, "xdotool", &args, None, 30_000)
                .await?;
        }
        for chunk in chunks {
            match chunk {
                TypeChunk::Keys(keys) => {
                    for frame in key_frames(&keys) {
                        events += u32::try_from(frame.len()).unwrap_or(u32::MAX);
                        self.send_input(id, frame).await?;
                        tokio::time::sleep(FRAME_GAP).await;
                    }
                }
                TypeChunk::Other(s) => {
                    typed_in_guest += u32::try_from(s.chars().count()).unwrap_or(u32::MAX);
                    self.type_in_guest(id, desk, &s).await?;
                }
            }
        }
        if let DesktopAction::Wait { ms } = action {
            tokio::time::sleep(Duration::from_millis(*ms)).await;
        }
        let input_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let (settle, frame) = match settle_with {
            Some(w) => {
                let (settle, frame) = self.settle(id, w).await?;
                (Some(settle), Some(frame))
            }
            None => (None, None),
        };
        let receipt = ActionReceipt {
            action_id: String::new(),
            kind: action.kind().to_owned(),
            done: plan.done,
            started_unix_ms,
            input_ms,
            events,
            typed_in_guest,
            settle,
            screenshot: None,
        };
        Ok((receipt, frame))
    }

    /// Samples `id`'s screen until it settles or `timeout_ms` pass; answers how, and the
    /// last frame.
    async fn settle(&self, id: &SandboxId, w: SettleWith) -> Result<(Settle, Frame), CoreError> {
        let config = SettleConfig {
            timeout_ms: w.timeout_ms,
            respond_ms: SettleConfig::default().respond_ms.min(w.timeout_ms),
            ..SettleConfig::default()
        };
        let t0 = Instant::now();
        let now_ms = || u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut settle = super::frame::Settle::new(config, 0).with_masks(w.masks);
        if let Some(before) = w.before {
            settle = settle.with_baseline(before);
        }
        let mut frames = 0u32;
        loop {
            let wait = settle.next_sample_ms().saturating_sub(now_ms());
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            let frame = self.desktop_frame(id).await?;
            frames += 1;
            let state = settle.observe(frame, now_ms());
            let (settled, after_ms) = match state {
                SettleState::Waiting => continue,
                SettleState::Settled { after_ms } => (true, after_ms),
                SettleState::TimedOut { after_ms } => (false, after_ms),
            };
            let frame = settle
                .last_frame()
                .cloned()
                .ok_or_else(|| CoreError::HostSetup("settle ended without a frame".into()))?;
            return Ok((
                Settle {
                    settled,
                    changed: settle.answered(),
                    after_ms,
                    frames,
                },
                frame,
            ));
        }
    }

    /// The value of secret `name` of sandbox `id` (for `type_text` with `secret`), from the
    /// daemon's memory.
    pub(crate) fn secret_value(&self, id: &SandboxId, name: &str) -> Result<String, CoreError> {
        let sb = self.live_sandbox(id).ok_or_else(|| self.not_running(id))?;
        let value = sb.extras().secrets.0.get(name).cloned();
        value.ok_or_else(|| {
            CoreError::BadRequest(format!("sandbox {id} has no secret named {name:?}"))
        })
    }
}

/// How an action waits for the screen to settle.
struct SettleWith {
    /// Longest wait (ms).
    timeout_ms: u64,
    /// The screen before the action.
    before: Option<Frame>,
    /// Where the pointer is drawn, before and after.
    masks: Vec<Rect>,
}

/// The scale of a requested picture width (`None`: full size).
fn scale_of(width: Option<u32>, screen: Screen) -> Result<Option<Scale>, CoreError> {
    match width {
        None => Ok(None),
        Some(w) if (1..=screen.width).contains(&w) => Ok(Some(Scale::Width(w))),
        Some(w) => Err(CoreError::BadRequest(format!(
            "width {w}: a screenshot of this {screen} screen can be 1 to {} pixels wide",
            screen.width
        ))),
    }
}

fn encode(frame: &Frame, scale: Option<Scale>) -> Result<Screenshot, CoreError> {
    let (width, height) = match scale {
        Some(s) => frame
            .scaled_size(s)
            .map_err(|e| CoreError::BadRequest(e.to_string()))?,
        None => (frame.width(), frame.height()),
    };
    let png = frame
        .to_png(scale)
        .map_err(|e| CoreError::BadRequest(e.to_string()))?;
    Ok(Screenshot { png, width, height })
}

fn receipt_shot(shot: &Screenshot) -> ReceiptScreenshot {
    use base64::Engine as _;
    use sha2::Digest as _;
    ReceiptScreenshot {
        png_base64: base64::engine::general_purpose::STANDARD.encode(&shot.png),
        width: shot.width,
        height: shot.height,
        sha256: hex::encode(sha2::Sha256::digest(&shot.png)),
    }
}

/// Removes a file when dropped (a screendump, read or not).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api_types::DEFAULT_SCREEN;

    #[test]
    fn screenshot_width_is_bounded_by_the_screen() {
        assert!(scale_of(Some(640), DEFAULT_SCREEN).expect("ok").is_some());
        assert!(scale_of(None, DEFAULT_SCREEN).expect("ok").is_none());
        let e = scale_of(Some(1281), DEFAULT_SCREEN).expect_err("too wide");
        assert!(e.to_string().contains("1 to 1280"), "{e}");
    }
}
