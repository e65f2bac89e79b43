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
//! - No secret the [`Redactor`] knows (values of at least 4 bytes) is written: every string of
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
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use kiln_api_types::SandboxId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::redact::Redactor;
use super::timestamp::{parse_rfc3339_ms, rfc3339_ms};

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

/// Cuts every string of `v` longer than `cap` bytes (at a character boundary) and marks it.
fn cut_strings(v: &mut Value, cap: usize) {
    match v {
        Value::String(s) if s.len() > cap => {
            let mut end = cap;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            let cut = s.len() - end;
            s.truncate(end);
            s.push_str(&format!("…[truncated {cut} bytes]"));
        }
        Value::Array(items) => items.iter_mut().for_each(|i| cut_strings(i, cap)),
        Value::Object(map) => map.values_mut().for_each(|i| cut_strings(i, cap)),
        _ => {}
    }
}

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
}

/// Bounds an event's body to `max` bytes of JSON: long strings are cut, shorter and shorter;
/// if that is not enough (many small values), each field over 1 KiB but `kind` is replaced by
/// a marker saying how large it was.
fn bound_body(body: &mut Map<String, Value>, max: usize) {
    let len = |b: &Map<String, Value>| serde_json::to_vec(b).map_or(usize::MAX, |v| v.len());
    if len(body) <= max {
        return;
    }
    for cap in [16 << 10, 4 << 10, 1 << 10, 256] {
        body.values_mut().for_each(|v| cut_strings(v, cap));
        if len(body) <= max {
            return;
        }
    }
    for (k, v) in body.iter_mut() {
        let n = json_len(v);
        if k != "kind" && n > 1024 {
            *v = Value::String(format!("[truncated: {n} bytes of JSON]"));
        }
    }
}

/// One timeline line: `seq`, `at`, `kind`, then the body's other fields.
fn render_line(seq: u64, at: &str, body: &Map<String, Value>) -> String {
    let mut out = format!("{{\"seq\":{seq},\"at\":\"{at}\"");
    if let Some(kind) = body.get("kind") {
        out.push_str(",\"kind\":");
        out.push_str(&kind.to_string());
    }
    for (k, v) in body {
        if k == "kind" {
            continue;
        }
        out.push(',');
        out.push_str(&Value::String(k.clone()).to_string());
        out.push(':');
        out.push_str(&v.to_string());
    }
    out.push('}');
    out
}

/// What [`Recorder::open`] found wrong with a timeline and repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes cut from the end: a torn last line (a crash mid-write), or lines that were not
    /// timeline events.
    pub torn_bytes: u64,
    /// The last complete event kept.
    pub last_seq: u64,
}

/// The length of the complete, readable prefix of a timeline, its last `seq`, and whether it
/// ends with a `truncated` event.
fn complete_prefix(buf: &[u8]) -> (usize, u64, bool) {
    let mut end = buf.len();
    loop {
        let Some(nl) = buf[..end].iter().rposition(|&b| b == b'\n') else {
            return (0, 0, false);
        };
        let start = buf[..nl]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        if let Ok(v) = serde_json::from_slice::<Value>(&buf[start..nl])
            && let Some(seq) = v.get("seq").and_then(Value::as_u64)
        {
            let truncated = v.get("kind").and_then(Value::as_str) == Some("truncated");
            return (nl + 1, seq, truncated);
        }
        end = start;
    }
}

struct Inner {
    file: File,
    /// Length of the timeline: complete lines only.
    len: u64,
    next_seq: u64,
    /// The `truncated` event is written: everything else is dropped.
    full: bool,
    meta: RecordingMeta,
    /// `meta` differs from `meta.json`.
    meta_dirty: bool,
    /// Screenshots stored or being stored.
    screenshots: HashSet<ScreenshotHash>,
    screenshots_bytes: u64,
}

impl Inner {
    /// Appends `line` and its newline in one write; on failure the file is cut back to the
    /// last complete line.
    fn append(&mut self, line: &str, path: &Path) -> Result<(), ReviewError> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        match self.file.write_all(&buf) {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(source) => {
                let _ = self.file.set_len(self.len);
                Err(ReviewError::Io {
                    what: "append to",
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

/// The recording of one sandbox, shared by its action path and its watchers.
pub struct Recorder {
    dir: PathBuf,
    sandbox: SandboxId,
    limits: Limits,
    recovery: Option<Recovery>,
    redactor: RwLock<Arc<Redactor>>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("dir", &self.dir)
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Opens the recording in `dir` (created, mode 0700, if missing) with the default
    /// [`Limits`]. An existing timeline continues after its last complete line; a torn end is
    /// cut away and reported in [`Recorder::recovery`]. One recorder per directory at a time:
    /// the engine keeps one per sandbox (and the daemon's lock makes it one process).
    pub fn open(
        dir: &Path,
        sandbox: &SandboxId,
        redact: Redactor,
    ) -> Result<Recorder, ReviewError> {
        Recorder::open_with(dir, sandbox, redact, Limits::default())
    }

    /// [`Recorder::open`] with other limits.
    pub fn open_with(
        dir: &Path,
        sandbox: &SandboxId,
        redact: Redactor,
        limits: Limits,
    ) -> Result<Recorder, ReviewError> {
        crate::paths::private_dir(dir).map_err(ReviewError::io("create", dir))?;
        let shots = dir.join(SCREENSHOTS_DIR);
        std::fs::create_dir_all(&shots).map_err(ReviewError::io("create", &shots))?;

        let mut fresh = false;
        let meta = if dir.join(META_FILE).exists() {
            let meta = read_meta(dir)?;
            if meta.sandbox_id != sandbox.as_str() {
                return Err(ReviewError::Corrupt {
                    path: dir.join(META_FILE),
                    reason: format!("it records sandbox {}", meta.sandbox_id),
                });
            }
            meta
        } else {
            fresh = true;
            RecordingMeta {
                format: META_FORMAT,
                sandbox_id: sandbox.as_str().to_owned(),
                created_at: rfc3339_ms(SystemTime::now()),
                image: None,
                screen: None,
                pinned_until: None,
                dropped_events: 0,
            }
        };
        if fresh {
            write_meta(dir, &meta, false)?;
        }

        let path = dir.join(TIMELINE_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(ReviewError::io("open", &path))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .map_err(ReviewError::io("read", &path))?;
        let (keep, last_seq, full) = complete_prefix(&buf);
        let mut recovery = None;
        if keep < buf.len() {
            file.set_len(keep as u64)
                .map_err(ReviewError::io("truncate", &path))?;
            let r = Recovery {
                torn_bytes: (buf.len() - keep) as u64,
                last_seq,
            };
            tracing::warn!(
                sandbox_id = %sandbox,
                torn_bytes = r.torn_bytes,
                last_seq,
                "review timeline had an incomplete end (a crash mid-write); cut back to its last complete event"
            );
            recovery = Some(r);
        }

        let mut screenshots = HashSet::new();
        let mut screenshots_bytes = 0;
        for entry in std::fs::read_dir(&shots)
            .map_err(ReviewError::io("read", &shots))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                // Left by a crash between write and rename.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            if let Some(hash) = name
                .strip_suffix(".png")
                .and_then(|h| h.parse::<ScreenshotHash>().ok())
            {
                screenshots_bytes += entry.metadata().map_or(0, |m| m.len());
                screenshots.insert(hash);
            }
        }

        Ok(Recorder {
            dir: dir.to_owned(),
            sandbox: sandbox.clone(),
            limits,
            recovery,
            redactor: RwLock::new(Arc::new(redact)),
            inner: Mutex::new(Inner {
                file,
                len: keep as u64,
                next_seq: last_seq + 1,
                full,
                meta,
                meta_dirty: false,
                screenshots,
                screenshots_bytes,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under the lock cannot leave a torn line (appends cut back on failure) nor a
        // seq gap (seq advances only after a complete append): the state is usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The recording's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The recorded sandbox.
    pub fn sandbox(&self) -> &SandboxId {
        &self.sandbox
    }

    /// What opening repaired (`None`: the timeline ended with a complete line).
    pub fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    /// Events written so far (the last `seq`).
    pub fn events(&self) -> u64 {
        self.lock().next_seq - 1
    }

    /// The recording's meta as it is now.
    pub fn meta(&self) -> RecordingMeta {
        self.lock().meta.clone()
    }

    /// Replaces the secrets to redact (after a rotation pass the old values too if they must
    /// stay hidden in later events).
    pub fn set_redactor(&self, redact: Redactor) {
        *self.redactor.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(redact);
    }

    /// Records the sandbox's image and screen in `meta.json`.
    pub fn set_machine(&self, image: &str, screen: ScreenSize) -> Result<(), ReviewError> {
        let mut inner = self.lock();
        inner.meta.image = Some(image.to_owned());
        inner.meta.screen = Some(screen);
        write_meta(&self.dir, &inner.meta, false)?;
        inner.meta_dirty = false;
        Ok(())
    }

    /// Appends `event` (redacted, bounded) and returns its `seq`. The seq is assigned and the
    /// line written under one lock: concurrent callers get gap-free seqs in file order. When
    /// the timeline is full the event is dropped, counted, and [`ReviewError::TimelineFull`]
    /// returned (the caller logs it, if at all; it is not the action's failure).
    pub fn record(&self, event: TimelineEvent) -> Result<u64, ReviewError> {
        let redactor = Arc::clone(&self.redactor.read().unwrap_or_else(|e| e.into_inner()));
        let mut body = match serde_json::to_value(&event) {
            Ok(Value::Object(map)) => Value::Object(map),
            _ => unreachable!("a TimelineEvent serializes to an object"),
        };
        redactor.redact_value(&mut body);
        let Value::Object(mut body) = body else {
            unreachable!("redaction keeps an object an object")
        };
        bound_body(
            &mut body,
            self.limits.max_line_bytes.saturating_sub(LINE_OVERHEAD),
        );

        let path = self.dir.join(TIMELINE_FILE);
        let mut inner = self.lock();
        if inner.full {
            inner.meta.dropped_events += 1;
            inner.meta_dirty = true;
            return Err(ReviewError::TimelineFull {
                dropped: inner.meta.dropped_events,
            });
        }
        let seq = inner.next_seq;
        let at = rfc3339_ms(SystemTime::now());
        let line = render_line(seq, &at, &body);
        let over_bytes =
            inner.len + line.len() as u64 + 1 + TRUNCATED_RESERVE > self.limits.max_timeline_bytes;
        if seq >= self.limits.max_events || over_bytes {
            let reason = if over_bytes {
                format!(
                    "the timeline reached {} bytes",
                    self.limits.max_timeline_bytes
                )
            } else {
                format!("the timeline reached {} events", self.limits.max_events)
            };
            let Ok(Value::Object(t)) = serde_json::to_value(TimelineEvent::Truncated { reason })
            else {
                unreachable!("a TimelineEvent serializes to an object")
            };
            inner.append(&render_line(seq, &at, &t), &path)?;
            inner.next_seq += 1;
            inner.full = true;
            inner.meta.dropped_events += 1;
            let dropped = inner.meta.dropped_events;
            write_meta(&self.dir, &inner.meta, false)?;
            inner.meta_dirty = false;
            return Err(ReviewError::TimelineFull { dropped });
        }
        inner.append(&line, &path)?;
        inner.next_seq += 1;
        Ok(seq)
    }

    /// Stores a screenshot once per content: `screenshots/<sha256>.png`, written to a
    /// temporary file and renamed. Storing bytes already stored writes nothing.
    pub fn put_screenshot(&self, png: &[u8]) -> Result<ScreenshotHash, ReviewError> {
        if png.len() > self.limits.max_screenshot_bytes {
            return Err(ReviewError::ScreenshotTooLarge {
                bytes: png.len(),
                max: self.limits.max_screenshot_bytes,
            });
        }
        if !png.starts_with(PNG_MAGIC) {
            return Err(ReviewError::NotPng);
        }
        let hash = ScreenshotHash::of(png);
        {
            let mut inner = self.lock();
            if inner.screenshots.contains(&hash) {
                return Ok(hash);
            }
            let max = self.limits.max_screenshots_total_bytes;
            if inner.screenshots_bytes + png.len() as u64 > max {
                return Err(ReviewError::ScreenshotBudget { max });
            }
            // Claimed before the write (outside the lock): a concurrent put of the same bytes
            // returns at once instead of writing them again.
            inner.screenshots.insert(hash.clone());
            inner.screenshots_bytes += png.len() as u64;
        }
        let path = self.dir.join(SCREENSHOTS_DIR).join(hash.file_name());
        if let Err(e) = write_atomic(&path, png, false) {
            let mut inner = self.lock();
            inner.screenshots.remove(&hash);
            inner.screenshots_bytes -= png.len() as u64;
            return Err(e);
        }
        Ok(hash)
    }

    /// Pins the recording for `d` from now (never shortening an existing pin): it outlives
    /// its sandbox's removal until then. Called when an action fails; fsyncs the timeline, as
    /// it is now evidence.
    pub fn pin_for(&self, d: Duration) -> Result<(), ReviewError> {
        self.pin_until(SystemTime::now() + d)
    }

    /// [`Recorder::pin_for`] to a given time.
    pub fn pin_until(&self, until: SystemTime) -> Result<(), ReviewError> {
        let mut inner = self.lock();
        let current = inner.meta.pinned_until();
        if current.is_none_or(|c| c < until) {
            inner.meta.pinned_until = Some(rfc3339_ms(until));
        }
        self.flush_locked(&mut inner)
    }

    /// Makes everything recorded durable: fsyncs the timeline and writes `meta.json`.
    pub fn flush(&self) -> Result<(), ReviewError> {
        let mut inner = self.lock();
        self.flush_locked(&mut inner)
    }

    fn flush_locked(&self, inner: &mut Inner) -> Result<(), ReviewError> {
        let path = self.dir.join(TIMELINE_FILE);
        inner
            .file
            .sync_data()
            .map_err(ReviewError::io("fsync", &path))?;
        write_meta(&self.dir, &inner.meta, true)?;
        inner.meta_dirty = false;
        Ok(())
    }

    /// Flushes and closes the recording (before
    /// [`remove_or_keep`](super::retention::remove_or_keep) on the sandbox's removal).
    pub fn close(self) -> Result<(), ReviewError> {
        self.flush()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Keep the count of dropped events; no fsync here (drop may run on the runtime).
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        if inner.meta_dirty {
            let _ = write_meta(&self.dir, &inner.meta, false);
        }
    }
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

#[cfg(test)]
pub(crate) mod tests;
