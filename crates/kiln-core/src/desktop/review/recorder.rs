//! The recorder of one recording: appends timeline lines (gap-free `seq` under one lock, each
//! line bounded and redacted before it is built), stores screenshots once by hash, keeps
//! `meta.json`, and cuts a torn last line away when it opens a timeline again. The formats
//! and invariants are the parent module's.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use kiln_api_types::SandboxId;
use serde_json::{Map, Value};

use super::super::redact::Redactor;
use super::super::timestamp::rfc3339_ms;
use super::{
    LINE_OVERHEAD, Limits, META_FILE, META_FORMAT, PNG_MAGIC, RecordingMeta, ReviewError,
    SCREENSHOTS_DIR, ScreenSize, ScreenshotHash, TIMELINE_FILE, TRUNCATED_RESERVE, TimelineEvent,
    read_meta, write_atomic, write_meta,
};

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
