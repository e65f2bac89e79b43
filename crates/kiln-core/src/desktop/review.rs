//! The review recording of a desktop sandbox: a sparse timeline of what an agent asked for and
//! what happened, with the screenshots around each action (the "inspectors" model).
//!
//! Owns one directory per sandbox, `$KILN_HOME/recordings/<sandbox-id>/`:
//!
//! ```text
//! recordings/<sandbox-id>/
//!   meta.json                  RecordingMeta: created_at, image, screen, pinned_until, dropped_events
//!   timeline.jsonl             one line per event: {"seq":N,"at":"<RFC 3339 UTC, ms>","kind":"…",…}
//!   screenshots/<sha256>.png   every screenshot once, named by the SHA-256 of its bytes
//! ```
//!
//! A failed action pins the recording for a post-mortem ([`Recorder::pin_for`]); what becomes of
//! the directory when its sandbox goes is `retention.rs`, redaction `redact.rs`, export bundles
//! `bundle.rs`. The formats are written down in `docs/review.md`.
//!
//! Invariants:
//! - `seq` starts at 1 and has no gaps, and file order is `seq` order: a line gets its `seq` and
//!   is appended under one lock, in one `write` of the whole line.
//! - The timeline holds only complete lines: a failed append is cut back to the previous
//!   length, and a torn last line left by a crash is cut away at the next [`Recorder::open`]
//!   (and reported in [`Recorder::recovery`]).
//! - No secret the [`Redactor`](super::redact::Redactor) knows (values of at least 4 bytes) is written: every string of
//!   an event, keys included, is redacted before the line is built and before anything is
//!   truncated (a cut must not leave half a secret); a `type_text` action naming a secret is
//!   recorded without its text.
//! - Bounded ([`Limits`]): a line (long strings are cut with a marker, oversized free-form
//!   fields replaced by one), the timeline (events and bytes: then one `truncated` event, and
//!   later events are dropped and counted in `meta.json`), each screenshot, and all screenshots
//!   of a recording.
//! - Durability: no fsync per event. A timeline is a debugging aid: a daemon crash loses
//!   nothing written (the page cache has it), a power failure at most what the kernel had not
//!   yet written back. The timeline is fsynced when a recording is pinned, exported or closed.
//!
//! Must not: block for long. [`Recorder::record`] is one small append under a `std` mutex, fine
//! to call from a task; [`Recorder::put_screenshot`] writes up to 16 MiB, and exports copy
//! whole recordings: call those from `spawn_blocking`.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::timestamp::parse_rfc3339_ms;

/// The timeline, one JSON object per line.
pub const TIMELINE_FILE: &str = "timeline.jsonl";
/// The recording's [`RecordingMeta`].
pub const META_FILE: &str = "meta.json";
/// The screenshots, `<sha256>.png`.
pub const SCREENSHOTS_DIR: &str = "screenshots";
/// Version of `meta.json`'s format.
pub const META_FORMAT: u32 = 1;

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
/// Room kept for `seq` and `at` when a line's body is bounded.
const LINE_OVERHEAD: usize = 64;
/// Room kept at the end of the timeline for the `truncated` event.
const TRUNCATED_RESERVE: u64 = 256;

/// An error of the review recording.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// A file operation failed.
    #[error("failed to {what} {path}")]
    Io {
        /// What was being done (`append to`, `create`, ...).
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file of the recording cannot be understood.
    #[error("{path} is not a usable recording file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The timeline reached its limit: the event was dropped (and counted).
    #[error("the timeline is full: event dropped ({dropped} dropped so far)")]
    TimelineFull {
        /// Events dropped so far, this one included.
        dropped: u64,
    },
    /// A screenshot over [`Limits::max_screenshot_bytes`].
    #[error("screenshot of {bytes} bytes exceeds the limit of {max} bytes")]
    ScreenshotTooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The recording's screenshots reached [`Limits::max_screenshots_total_bytes`].
    #[error("the recording's screenshots reached their limit of {max} bytes")]
    ScreenshotBudget {
        /// The limit.
        max: u64,
    },
    /// Screenshot bytes that do not start with the PNG signature.
    #[error("screenshot is not a PNG image")]
    NotPng,
    /// A string that is not a screenshot hash.
    #[error("invalid screenshot hash {0:?}: expected 64 lowercase hex digits")]
    InvalidHash(String),
    /// An export destination that exists and is not an empty directory.
    #[error("export destination {path} exists and is not an empty directory")]
    DestinationNotEmpty {
        /// The destination.
        path: PathBuf,
    },
}

impl ReviewError {
    pub(crate) fn io_of(what: &'static str, path: &Path, source: std::io::Error) -> ReviewError {
        ReviewError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }

    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ReviewError {
        let path = path.to_owned();
        move |source| ReviewError::Io { what, path, source }
    }
}

/// The bounds of one recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest timeline line, newline excluded.
    pub max_line_bytes: usize,
    /// Most events, the `truncated` event included.
    pub max_events: u64,
    /// Largest timeline file.
    pub max_timeline_bytes: u64,
    /// Largest screenshot.
    pub max_screenshot_bytes: usize,
    /// Largest sum of a recording's screenshots.
    pub max_screenshots_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_line_bytes: 64 << 10,
            max_events: 50_000,
            max_timeline_bytes: 64 << 20,
            max_screenshot_bytes: 16 << 20,
            max_screenshots_total_bytes: 1 << 30,
        }
    }
}

/// The SHA-256 of a screenshot's PNG bytes, 64 lowercase hex digits: its file name in
/// `screenshots/` (so a hash can never name a path outside it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ScreenshotHash(String);

impl ScreenshotHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> ScreenshotHash {
        ScreenshotHash(hex(&Sha256::digest(bytes)))
    }

    /// The hash as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<hash>.png`.
    pub fn file_name(&self) -> String {
        format!("{}.png", self.0)
    }
}

impl TryFrom<String> for ScreenshotHash {
    type Error = ReviewError;

    fn try_from(s: String) -> Result<ScreenshotHash, ReviewError> {
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(ScreenshotHash(s))
        } else {
            Err(ReviewError::InvalidHash(s))
        }
    }
}

impl std::str::FromStr for ScreenshotHash {
    type Err = ReviewError;

    fn from_str(s: &str) -> Result<ScreenshotHash, ReviewError> {
        ScreenshotHash::try_from(s.to_owned())
    }
}

impl From<ScreenshotHash> for String {
    fn from(h: ScreenshotHash) -> String {
        h.0
    }
}

impl std::fmt::Display for ScreenshotHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Why an action failed, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionError {
    /// The error's stable code (`ErrorCode` of the API).
    pub code: String,
    /// The message chain.
    pub message: String,
}

/// One event of the timeline. On disk each is one line with `seq` and `at` first, then `kind`
/// (the variant, snake_case) and the variant's fields:
///
/// ```json
/// {"seq":3,"at":"2026-11-30T14:02:11.250Z","kind":"action_failed","action_id":"a-2","error":{"code":"timeout","message":"…"},"screenshot":null}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TimelineEvent {
    /// An agent asked for an action (the action's JSON as the API received it).
    ActionRequested {
        /// The action's id.
        action_id: String,
        /// The action.
        action: Value,
    },
    /// The action was carried out.
    ActionCompleted {
        /// The action's id.
        action_id: String,
        /// What the API answered.
        receipt: Value,
        /// The screen before the action.
        screenshot_before: Option<ScreenshotHash>,
        /// The screen after it.
        screenshot_after: Option<ScreenshotHash>,
    },
    /// The action failed.
    ActionFailed {
        /// The action's id.
        action_id: String,
        /// Why.
        error: ActionError,
        /// The screen when it failed.
        screenshot: Option<ScreenshotHash>,
    },
    /// The desktop's readiness changed (`ready`, `restored`, `stopped`, ...).
    Readiness {
        /// The new state.
        state: String,
    },
    /// A periodic screenshot.
    Checkpoint {
        /// The screen.
        screenshot: ScreenshotHash,
    },
    /// The screen changed while no action ran.
    VisualChange {
        /// The screen after the change.
        screenshot: ScreenshotHash,
        /// How many pixels changed.
        changed_px: u64,
    },
    /// Free text from the engine.
    Note {
        /// The text.
        text: String,
    },
    /// Written by the recorder, last: the timeline reached its limit and later events were
    /// dropped (counted in `meta.json`'s `dropped_events`).
    Truncated {
        /// Which limit.
        reason: String,
    },
}

impl TimelineEvent {
    /// The screenshots the event refers to.
    pub fn screenshots(&self) -> Vec<&ScreenshotHash> {
        match self {
            TimelineEvent::ActionCompleted {
                screenshot_before,
                screenshot_after,
                ..
            } => screenshot_before.iter().chain(screenshot_after).collect(),
            TimelineEvent::ActionFailed { screenshot, .. } => screenshot.iter().collect(),
            TimelineEvent::Checkpoint { screenshot }
            | TimelineEvent::VisualChange { screenshot, .. } => vec![screenshot],
            _ => Vec::new(),
        }
    }
}

/// The screen of the recorded desktop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScreenSize {
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
}

/// `meta.json`: what the timeline does not say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingMeta {
    /// [`META_FORMAT`].
    pub format: u32,
    /// The recorded sandbox.
    pub sandbox_id: String,
    /// When the recording began (RFC 3339 UTC, ms).
    pub created_at: String,
    /// The sandbox's image, once known.
    #[serde(default)]
    pub image: Option<String>,
    /// The desktop's screen, once known.
    #[serde(default)]
    pub screen: Option<ScreenSize>,
    /// Kept after the sandbox's removal until then (RFC 3339 UTC, ms).
    #[serde(default)]
    pub pinned_until: Option<String>,
    /// Events dropped because the timeline was full.
    #[serde(default)]
    pub dropped_events: u64,
}

impl RecordingMeta {
    /// [`RecordingMeta::pinned_until`] as a time (`None`: not pinned, or unreadable).
    pub fn pinned_until(&self) -> Option<SystemTime> {
        self.pinned_until.as_deref().and_then(parse_rfc3339_ms)
    }
}

/// Reads `dir/meta.json`.
pub fn read_meta(dir: &Path) -> Result<RecordingMeta, ReviewError> {
    let path = dir.join(META_FILE);
    let body = std::fs::read(&path).map_err(ReviewError::io("read", &path))?;
    serde_json::from_slice(&body).map_err(|e| ReviewError::Corrupt {
        path,
        reason: e.to_string(),
    })
}

/// Writes `dir/meta.json` through a temporary file and a rename: never half written (and
/// fsynced with `sync`: a pin must survive a power failure).
fn write_meta(dir: &Path, meta: &RecordingMeta, sync: bool) -> Result<(), ReviewError> {
    let body = serde_json::to_vec_pretty(meta).expect("the meta serializes");
    write_atomic(&dir.join(META_FILE), &body, sync)
}

/// Writes `path` through `.tmp-<name>-<pid>` beside it and a rename (fsynced first with
/// `sync`).
pub(crate) fn write_atomic(path: &Path, body: &[u8], sync: bool) -> Result<(), ReviewError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".tmp-{name}-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(body)?;
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ReviewError::Io {
            what: "write",
            path: path.to_owned(),
            source: e,
        }
    })
}

/// The screenshots the timeline lines in `lines` refer to, in first-seen order.
pub(crate) fn referenced_screenshots(lines: &[Value]) -> Vec<ScreenshotHash> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for line in lines {
        let Ok(event) = serde_json::from_value::<TimelineEvent>(line.clone()) else {
            continue;
        };
        for h in event.screenshots() {
            if seen.insert(h.clone()) {
                out.push(h.clone());
            }
        }
    }
    out
}

mod recorder;
#[cfg(test)]
pub(crate) mod tests;

pub use recorder::{Recorder, Recovery};
