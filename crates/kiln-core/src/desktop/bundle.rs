//! Export bundles of review recordings: a self-contained directory that a person opens in a
//! browser, or a tool reads, after the sandbox (and even its recording) is gone.
//!
//! ```text
//! exports/<sandbox-id>-<YYYYMMDDTHHMMSSmmmZ>/   (or the caller's destination)
//!   manifest.json              BundleManifest: format, version, sandbox, counts, sha256 of every file
//!   timeline.jsonl             the recording's timeline (complete lines)
//!   screenshots/<sha256>.png   the screenshots the timeline refers to, and only those
//!   index.html                 the timeline as a static page, screenshots as relative links
//! ```
//!
//! Invariants:
//! - A bundle appears under its final name complete or not at all: it is built in
//!   `.tmp-export-<name>-<n>-<pid>` beside it, its files fsynced, then renamed. A destination
//!   that exists must be an empty directory (the rename replaces it); anything else is refused.
//! - A bundle refers only to files inside itself, and `index.html` loads nothing else: no
//!   network, no fetch (it works from `file://`), a Content-Security-Policy that forbids
//!   connections. The events are embedded as JSON in a `<script type="application/json">`
//!   with `<`, `>`, `&`, U+2028 and U+2029 escaped as `\uXXXX`, so no event text can close
//!   the script or open a comment; the page builds its DOM with `textContent` only.
//! - Bundles live in `exports/`, not in the recording: `kiln rm`, the janitor and prune never
//!   remove them (they are the user's).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::review::{
    Recorder, ReviewError, SCREENSHOTS_DIR, ScreenSize, ScreenshotHash, TIMELINE_FILE, hex,
    read_meta, referenced_screenshots,
};
use super::timestamp::rfc3339_ms;

/// `manifest.json`'s `format`.
pub const BUNDLE_FORMAT: &str = "kiln-review-bundle";
/// `manifest.json`'s `version`.
pub const BUNDLE_VERSION: u32 = 1;
/// The bundle's manifest.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The bundle's page.
pub const INDEX_FILE: &str = "index.html";

/// The page; its one placeholder receives the escaped data.
const TEMPLATE: &str = include_str!("review.html");
const DATA_PLACEHOLDER: &str = "/*KILN_REVIEW_DATA*/";

/// Distinguishes the temporary directories of concurrent exports of this process.
static EXPORTS: AtomicU64 = AtomicU64::new(0);

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The bundle's directory.
    pub path: PathBuf,
    /// Events in its timeline.
    pub events: u64,
    /// Screenshots copied.
    pub screenshots: u64,
    /// Screenshots the timeline refers to that the recording lacks (or holds damaged).
    pub missing_screenshots: Vec<ScreenshotHash>,
    /// Bytes of its files.
    pub bytes: u64,
}

/// One file of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    /// Relative to the bundle, `/`-separated.
    pub path: String,
    /// Its size.
    pub bytes: u64,
    /// SHA-256 of its bytes, hex.
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleManifest {
    /// [`BUNDLE_FORMAT`].
    pub format: String,
    /// [`BUNDLE_VERSION`].
    pub version: u32,
    /// The recorded sandbox.
    pub sandbox_id: String,
    /// Its image, if recorded.
    pub image: Option<String>,
    /// Its screen, if recorded.
    pub screen: Option<ScreenSize>,
    /// When the recording began.
    pub created_at: String,
    /// When this bundle was written.
    pub exported_at: String,
    /// Events in `timeline.jsonl`.
    pub events: u64,
    /// Events the recording dropped because its timeline was full.
    pub dropped_events: u64,
    /// Screenshots in `screenshots/`.
    pub screenshots: u64,
    /// Screenshots the timeline refers to that could not be included.
    pub missing_screenshots: Vec<ScreenshotHash>,
    /// Every other file of the bundle (all but this manifest).
    pub files: Vec<BundleFile>,
}

impl Recorder {
    /// Flushes the recording and exports it: [`export_dir`] of its directory.
    pub fn export(
        &self,
        exports_root: &Path,
        dest: Option<&Path>,
    ) -> Result<ExportInfo, ReviewError> {
        self.flush()?;
        export_dir(self.dir(), exports_root, dest)
    }
}

/// Writes a bundle of the recording in `recording` (also after its sandbox is gone, while the
/// recording is kept): into `dest` if given (which must not exist or be an empty directory;
/// its parents are created), else into a new `exports_root/<sandbox-id>-<UTC time>/`.
pub fn export_dir(
    recording: &Path,
    exports_root: &Path,
    dest: Option<&Path>,
) -> Result<ExportInfo, ReviewError> {
    export_at(recording, exports_root, dest, SystemTime::now())
}

fn export_at(
    recording: &Path,
    exports_root: &Path,
    dest: Option<&Path>,
    now: SystemTime,
) -> Result<ExportInfo, ReviewError> {
    let meta = read_meta(recording)?;
    let tl_path = recording.join(TIMELINE_FILE);
    let mut timeline = match std::fs::read(&tl_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(ReviewError::io_of("read", &tl_path, e)),
    };
    // A line being appended right now is not part of this export.
    let end = timeline
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    timeline.truncate(end);
    let events: Vec<Value> = timeline
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect();

    let exported_at = rfc3339_ms(now);
    let (parent, mut target) = match dest {
        Some(d) => {
            check_destination(d)?;
            let parent = d
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned();
            std::fs::create_dir_all(&parent)
                .map_err(|e| ReviewError::io_of("create", &parent, e))?;
            (parent, d.to_owned())
        }
        None => {
            crate::paths::private_dir(exports_root)
                .map_err(|e| ReviewError::io_of("create", exports_root, e))?;
            let stamp: String = exported_at
                .chars()
                .filter(|c| !matches!(c, '-' | ':' | '.'))
                .collect();
            let base = format!("{}-{stamp}", meta.sandbox_id);
            (exports_root.to_owned(), exports_root.join(base))
        }
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".to_owned());
    let tmp = parent.join(format!(
        ".tmp-export-{name}-{}-{}",
        EXPORTS.fetch_add(1, Ordering::Relaxed),
        std::process::id()
    ));

    let built = build(&tmp, recording, &meta, &timeline, &events, &exported_at);
    let (mut manifest, bytes) = match built {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    // Publish: an automatic name that is taken (two exports in one millisecond) gets a
    // suffix; a destination that filled up since the check is refused.
    let mut n = 1;
    loop {
        match std::fs::rename(&tmp, &target) {
            Ok(()) => break,
            Err(e)
                if dest.is_none()
                    && n < 100
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::ENOTEMPTY | libc::EEXIST | libc::ENOTDIR)
                    ) =>
            {
                n += 1;
                target = parent.join(format!("{name}-{n}"));
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) {
                    return Err(ReviewError::DestinationNotEmpty { path: target });
                }
                return Err(ReviewError::io_of("publish", &target, e));
            }
        }
    }
    if let Ok(dir) = std::fs::File::open(&parent) {
        let _ = dir.sync_all();
    }
    tracing::info!(sandbox_id = %meta.sandbox_id, path = %target.display(), events = manifest.events, "review bundle exported");
    Ok(ExportInfo {
        path: target,
        events: manifest.events,
        screenshots: manifest.screenshots,
        missing_screenshots: std::mem::take(&mut manifest.missing_screenshots),
        bytes,
    })
}

/// Refuses a destination that exists and is anything but an empty directory.
fn check_destination(dest: &Path) -> Result<(), ReviewError> {
    let Ok(meta) = std::fs::symlink_metadata(dest) else {
        return Ok(());
    };
    let empty = meta.is_dir()
        && std::fs::read_dir(dest)
            .map_err(|e| ReviewError::io_of("read", dest, e))?
            .next()
            .is_none();
    if empty {
        Ok(())
    } else {
        Err(ReviewError::DestinationNotEmpty {
            path: dest.to_owned(),
        })
    }
}

/// Writes `body` to `dir/rel`, fsynced, and describes it.
fn put(dir: &Path, rel: &str, body: &[u8]) -> Result<BundleFile, ReviewError> {
    use std::io::Write;
    let path = dir.join(rel);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(body)?;
        f.sync_all()
    };
    write().map_err(|e| ReviewError::io_of("write", &path, e))?;
    Ok(BundleFile {
        path: rel.to_owned(),
        bytes: body.len() as u64,
        sha256: hex(&Sha256::digest(body)),
    })
}

/// Builds the bundle in `tmp`; returns its manifest and the bytes of all its files.
fn build(
    tmp: &Path,
    recording: &Path,
    meta: &super::review::RecordingMeta,
    timeline: &[u8],
    events: &[Value],
    exported_at: &str,
) -> Result<(BundleManifest, u64), ReviewError> {
    if tmp.exists() {
        let _ = std::fs::remove_dir_all(tmp);
    }
    crate::paths::private_dir(tmp).map_err(|e| ReviewError::io_of("create", tmp, e))?;
    let shots = tmp.join(SCREENSHOTS_DIR);
    std::fs::create_dir(&shots).map_err(|e| ReviewError::io_of("create", &shots, e))?;

    let mut files = vec![put(tmp, TIMELINE_FILE, timeline)?];
    let mut missing = Vec::new();
    let mut copied = 0;
    for hash in referenced_screenshots(events) {
        let src = recording.join(SCREENSHOTS_DIR).join(hash.file_name());
        match std::fs::read(&src) {
            Ok(png) if ScreenshotHash::of(&png) == hash => {
                files.push(put(
                    tmp,
                    &format!("{SCREENSHOTS_DIR}/{}", hash.file_name()),
                    &png,
                )?);
                copied += 1;
            }
            Ok(_) => {
                tracing::warn!(path = %src.display(), "screenshot does not match its hash; left out of the bundle");
                missing.push(hash);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(hash),
            Err(e) => return Err(ReviewError::io_of("read", &src, e)),
        }
    }

    let data = json!({
        "bundle": {
            "sandbox_id": meta.sandbox_id,
            "image": meta.image,
            "screen": meta.screen,
            "created_at": meta.created_at,
            "exported_at": exported_at,
            "events": events.len(),
            "dropped_events": meta.dropped_events,
            "screenshots": copied,
            "missing_screenshots": missing,
        },
        "events": events,
    });
    files.push(put(tmp, INDEX_FILE, render_index(&data).as_bytes())?);

    let manifest = BundleManifest {
        format: BUNDLE_FORMAT.to_owned(),
        version: BUNDLE_VERSION,
        sandbox_id: meta.sandbox_id.clone(),
        image: meta.image.clone(),
        screen: meta.screen,
        created_at: meta.created_at.clone(),
        exported_at: exported_at.to_owned(),
        events: events.len() as u64,
        dropped_events: meta.dropped_events,
        screenshots: copied,
        missing_screenshots: missing,
        files,
    };
    let body = serde_json::to_vec_pretty(&manifest).expect("the manifest serializes");
    let m = put(tmp, MANIFEST_FILE, &body)?;
    let bytes = manifest.files.iter().map(|f| f.bytes).sum::<u64>() + m.bytes;
    for dir in [&shots, &tmp.to_path_buf()] {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok((manifest, bytes))
}

/// The page with `data` embedded.
fn render_index(data: &Value) -> String {
    TEMPLATE.replacen(DATA_PLACEHOLDER, &script_json(data), 1)
}

/// `v` as JSON that is safe inside a `<script>` element: `<`, `>` and `&` (which JSON allows
/// only inside strings) and the JavaScript line terminators U+2028/U+2029 become `\uXXXX`
/// escapes, so no string can end the element (`</script>`) or open a comment (`<!--`), and
/// the text parses back to the same value.
pub(crate) fn script_json(v: &Value) -> String {
    let raw = v.to_string();
    let mut out = String::with_capacity(raw.len() + raw.len() / 16);
    for c in raw.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests;
