//! The engine's side of a desktop's review recording: opened when a desktop sandbox starts
//! (or is re-attached), fed by the action path (requested, then completed or failed, with
//! the screen before and after), watched between actions (a changed screen is a
//! `visual_change`, and a `checkpoint` is written every [`CHECKPOINT_EVERY`]), closed and
//! kept or removed with the sandbox, exported on request.
//!
//! Recording is best effort: a recording error is logged and never fails the action or the
//! sandbox. A failed action pins the recording for `KILN_REVIEW_PIN_SECS` (default 1 h).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use kiln_api_types::{ReviewExport, SandboxId, SandboxState};
use tracing::{debug, warn};

use super::frame::Frame;
use super::redact::Redactor;
use super::review::{ActionError, Recorder, ScreenSize, ScreenshotHash, TimelineEvent};
use crate::Engine;
use crate::error::CoreError;
use crate::sandbox::Sandbox;

/// How often the screen is looked at between actions.
const WATCH_EVERY: Duration = Duration::from_secs(5);
/// A checkpoint (a screenshot whatever happened) every this many looks: 5 minutes.
const CHECKPOINT_EVERY: u32 = 60;

/// A desktop sandbox's recording and what the engine tracks beside it.
pub(crate) struct Recording {
    pub(crate) recorder: Recorder,
    /// Numbers actions (`a-N`), continuing after the events already recorded.
    next_action: AtomicU64,
    /// The last frame written, so an unchanged screen is not recorded again.
    last_frame: std::sync::Mutex<Option<Frame>>,
    /// Actions in flight: the watcher leaves their screen changes to them.
    busy: AtomicU64,
}

impl Recording {
    /// A fresh action id.
    pub(crate) fn action_id(&self) -> String {
        format!("a-{}", self.next_action.fetch_add(1, Ordering::Relaxed))
    }

    /// Records `event`, logging a failure.
    pub(crate) fn record(&self, event: TimelineEvent) {
        if let Err(e) = self.recorder.record(event) {
            debug!(sandbox_id = %self.recorder.sandbox(), error = %e, "review timeline: event not recorded");
        }
    }

    /// Stores `frame` as a screenshot (once per content), unless the encoding fails.
    pub(crate) fn screenshot(&self, frame: &Frame) -> Option<ScreenshotHash> {
        let png = frame.to_png(None).ok()?;
        *self.last_frame.lock().unwrap_or_else(|e| e.into_inner()) = Some(frame.clone());
        match self.recorder.put_screenshot(&png) {
            Ok(h) => Some(h),
            Err(e) => {
                warn!(sandbox_id = %self.recorder.sandbox(), error = %e, "review: screenshot not stored");
                None
            }
        }
    }

    /// Marks an action in flight until the guard drops.
    pub(crate) fn busy(self: &Arc<Self>) -> BusyAction {
        self.busy.fetch_add(1, Ordering::Relaxed);
        BusyAction(Arc::clone(self))
    }

    /// Records a failed action and pins the recording for post-mortem.
    pub(crate) fn failed(&self, action_id: String, e: &CoreError, screen: Option<&Frame>) {
        let screenshot = screen.and_then(|f| self.screenshot(f));
        self.record(TimelineEvent::ActionFailed {
            action_id,
            error: ActionError {
                code: e.code().to_owned(),
                message: e.chain(),
            },
            screenshot,
        });
        match super::retention::pin_from_env() {
            Ok(d) if d.is_zero() => {}
            Ok(d) => {
                if let Err(e) = self.recorder.pin_for(d) {
                    warn!(sandbox_id = %self.recorder.sandbox(), error = %e, "review: recording not pinned");
                }
            }
            Err(e) => warn!(error = %e.chain(), "review: recording not pinned"),
        }
    }
}

/// An action in flight (see [`Recording::busy`]).
pub(crate) struct BusyAction(Arc<Recording>);

impl Drop for BusyAction {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Engine {
    /// Opens the review recording of `sb` if it is a desktop, records `state`, and starts
    /// watching its screen. Does nothing for other sandboxes.
    pub(crate) fn recording_open(self: &Arc<Self>, sb: &Sandbox, image: &str, state: &str) {
        let Some(display) = sb.vm().config().display else {
            return;
        };
        let id = sb.id().clone();
        let secrets: Vec<(String, Vec<u8>)> = sb
            .extras()
            .secrets
            .0
            .iter()
            .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
            .collect();
        let dir = self.home.recording_dir(&id);
        let recorder = match Recorder::open(&dir, &id, Redactor::new(secrets)) {
            Ok(r) => r,
            Err(e) => {
                warn!(sandbox_id = %id, error = %e, "review: recording not opened");
                return;
            }
        };
        if let Some(r) = recorder.recovery() {
            warn!(sandbox_id = %id, ?r, "review: the timeline's torn end was cut away");
        }
        let screen = ScreenSize {
            width: display.width,
            height: display.height,
        };
        if let Err(e) = recorder.set_machine(image, screen) {
            warn!(sandbox_id = %id, error = %e, "review: machine not recorded");
        }
        let rec = Arc::new(Recording {
            next_action: AtomicU64::new(recorder.events() + 1),
            recorder,
            last_frame: std::sync::Mutex::new(None),
            busy: AtomicU64::new(0),
        });
        rec.record(TimelineEvent::Readiness {
            state: state.to_owned(),
        });
        sb.extras().recording = Some(Arc::clone(&rec));
        tokio::spawn(watch(Arc::downgrade(self), id, Arc::downgrade(&rec)));
    }

    /// The recording of running sandbox `id`, if it is a desktop.
    pub(crate) fn recording(&self, id: &SandboxId) -> Option<Arc<Recording>> {
        self.live_sandbox(id)?.extras().recording.clone()
    }

    /// Writes the review bundle of sandbox `id` (running, or removed while its recording is
    /// pinned) into `dest`, or a new directory of kiln's exports.
    pub async fn review_export(
        &self,
        id: &SandboxId,
        dest: Option<std::path::PathBuf>,
    ) -> Result<ReviewExport, CoreError> {
        let exports = self.home.exports_dir();
        let dir = self.home.recording_dir(id);
        let rec = self.recording(id);
        if rec.is_none() && !dir.join(super::review::TIMELINE_FILE).exists() {
            return Err(self.no_recording(id));
        }
        let info = tokio::task::spawn_blocking(move || match rec {
            Some(r) => r.recorder.export(&exports, dest.as_deref()),
            None => super::bundle::export_dir(&dir, &exports, dest.as_deref()),
        })
        .await
        .map_err(|e| CoreError::HostSetup(format!("export task failed: {e}")))?;
        match info {
            Ok(i) => Ok(ReviewExport {
                path: i.path.display().to_string(),
                events: i.events,
                screenshots: i.screenshots,
                bytes: i.bytes,
            }),
            Err(e) => Err(review_error(e)),
        }
    }

    fn no_recording(&self, id: &SandboxId) -> CoreError {
        match self.store.sandbox_get(id) {
            Ok(Some(_)) => CoreError::NotADesktop(format!(
                "sandbox {id} has no review recording: its image is not a desktop"
            )),
            _ => {
                CoreError::SandboxNotFound(format!("{id} (and no review recording of it is kept)"))
            }
        }
    }
}

/// A review error as the engine reports it.
fn review_error(e: super::review::ReviewError) -> CoreError {
    use super::review::ReviewError as R;
    match e {
        R::DestinationNotEmpty { .. } => CoreError::BadRequest(e.to_string()),
        other => CoreError::HostSetup(format!("review export: {other}")),
    }
}

/// Watches a desktop's screen between actions: a changed screen is recorded as a
/// `visual_change`, and every [`CHECKPOINT_EVERY`] looks a `checkpoint`. Ends with the
/// sandbox (or the daemon).
async fn watch(engine: Weak<Engine>, id: SandboxId, rec: Weak<Recording>) {
    let mut looks = 0u32;
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let (Some(engine), Some(rec)) = (engine.upgrade(), rec.upgrade()) else {
            return;
        };
        looks = looks.wrapping_add(1);
        if rec.busy.load(Ordering::Relaxed) > 0 {
            continue;
        }
        match engine.sandbox_get(&id) {
            Ok(row) if row.status.state == SandboxState::Running => {}
            Ok(_) => continue,
            Err(_) => return,
        }
        let frame = match engine.desktop_frame(&id).await {
            Ok(f) => f,
            Err(CoreError::SandboxNotFound(_)) => return,
            Err(_) => continue,
        };
        let changed_px = rec
            .last_frame
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|last| last.diff(&frame).changed_px);
        let checkpoint = looks.is_multiple_of(CHECKPOINT_EVERY);
        if changed_px == Some(0) && !checkpoint {
            continue;
        }
        let Some(screenshot) = rec.screenshot(&frame) else {
            continue;
        };
        match changed_px {
            Some(n) if n > 0 => rec.record(TimelineEvent::VisualChange {
                screenshot: screenshot.clone(),
                changed_px: n,
            }),
            _ => {}
        }
        if checkpoint || changed_px.is_none() {
            rec.record(TimelineEvent::Checkpoint { screenshot });
        }
    }
}
