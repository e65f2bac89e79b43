//! What becomes of a review recording when its sandbox goes: removed, or kept for a
//! post-mortem while a failed action's pin lasts; and the janitor's sweep of recordings whose
//! sandbox is gone.
//!
//! Owns the pin setting ([`PIN_SECS_ENV`]) and the removal of `recordings/<id>/`. Must not
//! touch a recording whose sandbox is live (the caller passes the live set), nor exports.
//!
//! Invariants: a recording is removed only when its sandbox is gone and `meta.json`'s
//! `pinned_until` is not ahead of `now` (an unreadable `meta.json` pins nothing); it is renamed
//! out of sight (`.tmp-rm-<id>-<pid>`) before it is removed, so a crash never leaves half a
//! recording under its name, and such leftovers are swept once their process is gone.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use kiln_api_types::SandboxId;

use super::review::{ReviewError, read_meta};
use crate::error::CoreError;

/// Setting: how long a failed action keeps its sandbox's recording after the sandbox is
/// removed, in seconds (`0`: never pinned).
pub const PIN_SECS_ENV: &str = "KILN_REVIEW_PIN_SECS";
/// [`PIN_SECS_ENV`] when unset: one hour.
pub const DEFAULT_PIN: Duration = Duration::from_secs(3600);

/// [`PIN_SECS_ENV`] from the daemon's environment, [`DEFAULT_PIN`] when unset or empty; any
/// other value than a whole number of seconds is refused naming the variable.
pub fn pin_from_env() -> Result<Duration, CoreError> {
    parse_pin_secs(std::env::var(PIN_SECS_ENV).ok().as_deref()).map_err(CoreError::HostSetup)
}

/// The pin duration of a [`PIN_SECS_ENV`] value (`None`: unset).
pub fn parse_pin_secs(value: Option<&str>) -> Result<Duration, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(DEFAULT_PIN),
        Some(v) => v.parse::<u64>().map(Duration::from_secs).map_err(|_| {
            format!("{PIN_SECS_ENV}={v:?}: expected a whole number of seconds (0: never pin)")
        }),
    }
}

/// What became of a recording when its sandbox was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// There was none.
    Absent,
    /// Removed.
    Removed,
    /// Kept for a post-mortem until then; [`reclaim`] removes it afterwards.
    Pinned {
        /// The end of the pin.
        until: SystemTime,
    },
}

/// Decides the fate of the recording in `dir` when its sandbox is removed: removed unless it
/// is pinned past `now` (a recording whose `meta.json` cannot be read is not pinned). The
/// directory is renamed out of sight first (`.tmp-rm-<name>-<pid>`), so a crash never leaves
/// half a recording under its name. The sandbox's [`Recorder`](super::review::Recorder) must be closed first.
pub fn remove_or_keep(dir: &Path, now: SystemTime) -> Result<Kept, ReviewError> {
    if std::fs::symlink_metadata(dir).is_err() {
        return Ok(Kept::Absent);
    }
    if let Some(until) = read_meta(dir).ok().and_then(|m| m.pinned_until())
        && until > now
    {
        return Ok(Kept::Pinned { until });
    }
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let gone = dir.with_file_name(format!(".tmp-rm-{name}-{}", std::process::id()));
    std::fs::rename(dir, &gone).map_err(|e| ReviewError::io_of("remove", dir, e))?;
    std::fs::remove_dir_all(&gone).map_err(|e| ReviewError::io_of("remove", &gone, e))?;
    Ok(Kept::Removed)
}

/// What [`reclaim`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Recordings (sandbox ids) and leftovers of interrupted removals that were removed.
    pub removed: Vec<String>,
    /// Recordings of removed sandboxes kept while pinned: id and end of the pin.
    pub pinned: Vec<(String, SystemTime)>,
    /// Removals that failed: name and error chain.
    pub failed: Vec<(String, String)>,
}

/// Removes the recordings below `root` whose sandbox is not in `live` and whose pin (if any)
/// ended before `now`, and the `.tmp-*` leftovers of removals whose process is gone. Names
/// that are not sandbox ids are left alone. For the janitor (at startup, and periodically so
/// expired pins go).
pub fn reclaim(
    root: &Path,
    live: &HashSet<String>,
    now: SystemTime,
) -> Result<ReclaimReport, ReviewError> {
    let mut report = ReclaimReport::default();
    let entries = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(ReviewError::io_of("read", root, e)),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        let path = root.join(&name);
        if name.starts_with(kiln_snapshot::TMP_PREFIX) {
            let dead = kiln_image::tmp_pid(&name).is_some_and(|pid| {
                pid != std::process::id() && !kiln_snapshot::process_running(pid)
            });
            if dead {
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => report.removed.push(name),
                    Err(e) => report.failed.push((name, e.to_string())),
                }
            }
            continue;
        }
        if name.parse::<SandboxId>().is_err() || live.contains(&name) {
            continue;
        }
        match remove_or_keep(&path, now) {
            Ok(Kept::Removed) => report.removed.push(name),
            Ok(Kept::Pinned { until }) => report.pinned.push((name, until)),
            Ok(Kept::Absent) => {}
            Err(e) => report.failed.push((name, crate::error::error_chain(&e))),
        }
    }
    Ok(report)
}

/// Whether the recording in `dir` is pinned past `now` (for `kiln df`).
pub(crate) fn pinned_past(dir: &Path, now: SystemTime) -> Option<SystemTime> {
    read_meta(dir)
        .ok()
        .and_then(|m| m.pinned_until())
        .filter(|u| *u > now)
}

#[cfg(test)]
mod tests;
