//! The verification cache: which data files this process has already hashed, and proof that
//! they have not changed since.
//!
//! Hashing a 256 MiB `mem` costs ~200 ms, more than half a restore, so [`crate::verify`] at
//! [`crate::VerifyLevel::FullCached`] hashes a file only when it is not *sealed*. A seal is
//! recorded after a file's content was hashed and found equal to its manifest digest (by a
//! full verify or by [`crate::SnapshotBuilder::publish`]); it holds the file's
//! [`FileStamp`] (device, inode, size, mtime and ctime in nanoseconds) and that digest. A
//! later verify whose file still has the same stamp, and whose manifest still names the same
//! digest, skips the hash. The rest of the verification (manifest checksum, fingerprint,
//! sizes) runs every time.
//!
//! Why a stamp proves "unchanged": every `write`, `truncate`, `fallocate` or write fault of a
//! shared mapping sets the inode's ctime to the current time, and ctime cannot be set back
//! from user space (`utimensat` restores mtime, not ctime). Replacing the file changes the
//! inode; a recycled inode number comes with a new ctime.
//!
//! Invariants:
//! - A file is sealed only if its stamp was identical before and after hashing, and only if
//!   its ctime is old enough that any later change is guaranteed a *different* ctime: file
//!   systems stamp with a coarse clock (one tick, ≤ 10 ms, or whole seconds on some file
//!   systems), so a write in the same tick as the last one would leave ctime unchanged (git's
//!   "racily clean" problem). Such recent files are simply hashed again next time.
//! - A failed verify forgets every seal of that directory.
//! - The cache is per process and bounded ([`MAX_SEALS`]); losing it only costs a re-hash.
//!
//! Not detected (by design; `VerifyLevel::Full` catches them): corruption below the file
//! system (media errors), and writes that bypass the inode's timestamps (writing the block
//! device directly; shared-mapping writes on file systems that do not update times on them,
//! such as tmpfs).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::SnapshotError;

/// How old a nanosecond-granular ctime must be before a seal may rely on it: more than the
/// file system clock's tick (≤ 10 ms at HZ=100) plus how far that coarse clock lags the
/// precise one (≤ one tick).
pub(crate) const RACY_MARGIN: Duration = Duration::from_millis(50);

/// The same for a ctime that is a whole second (the file system keeps seconds only).
const RACY_MARGIN_COARSE_FS: Duration = Duration::from_millis(1050);

/// Upper bound of remembered seals; when reached, the cache starts over.
const MAX_SEALS: usize = 1024;

/// What `stat` says about a file, as far as it tells whether the file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    /// Device.
    pub(crate) dev: u64,
    /// Inode.
    pub(crate) ino: u64,
    /// Size in bytes.
    pub(crate) size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub(crate) mtime_ns: i128,
    /// Status change time, nanoseconds since the epoch.
    pub(crate) ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of `m`.
    pub(crate) fn from_metadata(m: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }

    /// The stamp of the file at `path` (following symlinks).
    pub(crate) fn of(path: &Path) -> Result<FileStamp, SnapshotError> {
        match std::fs::metadata(path) {
            Ok(m) => Ok(FileStamp::from_metadata(&m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SnapshotError::MissingFile {
                path: path.to_owned(),
            }),
            Err(e) => Err(SnapshotError::io("read", path, e)),
        }
    }

    /// Whether a write at `now` or later could leave this ctime unchanged (the last change
    /// was too recent for the file system's timestamp granularity). A ctime in the future
    /// (the clock was set back) is racy too.
    pub(crate) fn is_racy(&self, now: SystemTime) -> bool {
        let now_ns = match now.duration_since(UNIX_EPOCH) {
            Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
            Err(_) => return true,
        };
        let margin = if self.ctime_ns % 1_000_000_000 == 0 {
            RACY_MARGIN_COARSE_FS
        } else {
            RACY_MARGIN
        };
        now_ns - self.ctime_ns < margin.as_nanos() as i128
    }
}

#[derive(Debug)]
struct Seal {
    stamp: FileStamp,
    sha256: String,
}

/// File path → seal. A `BTreeMap` because its `new` is `const`.
static SEALS: Mutex<BTreeMap<PathBuf, Seal>> = Mutex::new(BTreeMap::new());

fn seals() -> MutexGuard<'static, BTreeMap<PathBuf, Seal>> {
    // The map holds plain data and every update is a single insert or remove: a panic
    // elsewhere cannot leave it inconsistent.
    SEALS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `path` is sealed with content `sha256` and still has stamp `now`.
pub(crate) fn is_sealed(path: &Path, sha256: &str, now: &FileStamp) -> bool {
    seals()
        .get(path)
        .is_some_and(|s| s.stamp == *now && s.sha256 == sha256)
}

/// Records that `path` hashed to `sha256`, given its stamp `before` the hash was computed.
/// Seals only if the file still has that stamp and it is not racy; otherwise forgets it.
pub(crate) fn record(path: &Path, sha256: &str, before: &FileStamp) {
    let after = FileStamp::of(path).ok();
    let mut map = seals();
    if after.as_ref() == Some(before) && !before.is_racy(SystemTime::now()) {
        if map.len() >= MAX_SEALS && !map.contains_key(path) {
            map.clear();
        }
        map.insert(
            path.to_owned(),
            Seal {
                stamp: *before,
                sha256: sha256.to_owned(),
            },
        );
    } else {
        map.remove(path);
    }
}

/// Moves the seal of `path` from stamp `before` to `after` when only the ctime differs: the
/// caller changed nothing but the inode's flags (`immutable.rs`), which moves ctime. Same
/// inode, size and mtime: no `write` happened in between (every write moves mtime); a write
/// whose mtime was put back with `utimensat` inside that window is not seen here, only by a
/// [`crate::VerifyLevel::Full`] verify.
pub(crate) fn carry_over(path: &Path, before: &FileStamp, after: &FileStamp) {
    let mut map = seals();
    let same_content = before.dev == after.dev
        && before.ino == after.ino
        && before.size == after.size
        && before.mtime_ns == after.mtime_ns;
    match map.get_mut(path) {
        Some(seal) if seal.stamp == *before && same_content => seal.stamp = *after,
        Some(_) => {
            map.remove(path);
        }
        None => {}
    }
}

/// Forgets every seal of files in `dir`.
pub(crate) fn forget_dir(dir: &Path) {
    seals().retain(|path, _| path.parent() != Some(dir));
}

/// Number of seals held for files in `dir`.
#[cfg(test)]
pub(crate) fn sealed_count(dir: &Path) -> usize {
    seals().keys().filter(|p| p.parent() == Some(dir)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ctime_ns: i128) -> FileStamp {
        FileStamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: ctime_ns,
            ctime_ns,
        }
    }

    fn at(ns: i128) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }

    #[test]
    fn is_racy_within_margin_and_for_future_ctime() {
        let c = 1_700_000_000_123_456_789;
        let margin = RACY_MARGIN.as_nanos() as i128;
        assert!(stamp(c).is_racy(at(c)));
        assert!(stamp(c).is_racy(at(c + margin - 1)));
        assert!(!stamp(c).is_racy(at(c + margin)));
        assert!(
            stamp(c).is_racy(at(c - 1_000_000_000)),
            "ctime in the future"
        );
    }

    #[test]
    fn is_racy_whole_second_ctime_waits_past_the_next_second() {
        let c = 1_700_000_000_000_000_000;
        assert!(stamp(c).is_racy(at(c + 1_000_000_000)));
        assert!(!stamp(c).is_racy(at(c + RACY_MARGIN_COARSE_FS.as_nanos() as i128)));
    }

    #[test]
    fn record_refuses_a_file_changed_while_hashing_and_forget_dir_clears() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("mem");
        std::fs::write(&p, b"x").expect("write");
        let now = FileStamp::of(&p).expect("stamp");
        // A stale "before" stamp (the file changed while hashing): not sealed.
        let old = FileStamp { ctime_ns: 1, ..now };
        record(&p, "d", &old);
        assert!(!is_sealed(&p, "d", &old));
        assert_eq!(sealed_count(dir.path()), 0);
        // Inserted directly (as if settled), then forgotten with its directory.
        seals().insert(
            p.clone(),
            Seal {
                stamp: now,
                sha256: "d".into(),
            },
        );
        assert!(is_sealed(&p, "d", &now));
        assert!(!is_sealed(&p, "e", &now), "bound to the digest");
        assert!(
            !is_sealed(&p, "d", &FileStamp { ino: 9, ..now }),
            "bound to the inode"
        );
        forget_dir(dir.path());
        assert!(!is_sealed(&p, "d", &now));
    }
}
