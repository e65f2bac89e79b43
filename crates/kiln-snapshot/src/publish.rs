//! Atomic publication: build in `<root>/.tmp-<name>-<pid>/`, fsync, rename into place.
//!
//! ```text
//!  SnapshotBuilder::begin ─▶ caller writes mem, state, disk.qcow2 into dir()
//!        │                         │
//!        │ dropped / error         ▼
//!        ▼                  publish(): hash + fsync files, write manifest.json +
//!  tmp dir removed          manifest.sha256, fsync dir, renameat2(NOREPLACE) → <root>/<name>,
//!                           fsync root
//! ```
//!
//! A crash leaves at most a `.tmp-<name>-<pid>` directory, which [`cleanup_stale_tmp`] removes
//! once that pid is gone. Readers never look at `.tmp-*`. Every file is sealed
//! (`immutable.rs`: read-only, immutable flag) before it is hashed, so what the manifest
//! vouches for is what stays on disk; every removal here clears the flags first.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::error::SnapshotError;
use crate::immutable;
use crate::manifest::{
    CaptureInfo, FileEntry, SnapshotFingerprint, SnapshotManifest, SnapshotName,
};
use crate::seal::{self, FileStamp};
use crate::verify::sha256_file;
use crate::{DATA_FILES, FORMAT_VERSION, MAGIC, MANIFEST_FILE, MANIFEST_SHA256_FILE, TMP_PREFIX};

/// What the caller knows about a snapshot; the rest of the manifest (files, digests, time,
/// magic, version) is computed by [`SnapshotBuilder::publish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestInput {
    /// The image the VM was booted from.
    pub image_id: String,
    /// Compatibility fingerprint of the captured VM.
    pub fingerprint: SnapshotFingerprint,
    /// Capture details.
    pub capture: CaptureInfo,
}

/// A snapshot being built. Dropping it without [`SnapshotBuilder::publish`] removes the
/// build directory.
#[derive(Debug)]
pub struct SnapshotBuilder {
    root: PathBuf,
    name: SnapshotName,
    tmp: PathBuf,
    published: bool,
}

impl SnapshotBuilder {
    /// Creates `<root>/.tmp-<name>-<pid>/` (and `root` if needed). Fails with
    /// [`SnapshotError::AlreadyExists`] if `<root>/<name>` is already published.
    pub fn begin(root: &Path, name: SnapshotName) -> Result<SnapshotBuilder, SnapshotError> {
        std::fs::create_dir_all(root).map_err(|e| SnapshotError::io("create", root, e))?;
        let dest = root.join(name.as_str());
        if dest.exists() {
            return Err(SnapshotError::AlreadyExists { path: dest });
        }
        let tmp = root.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
        // Left over by an earlier builder of this process (a crash cannot leave one: the pid
        // would be different), e.g. a builder leaked with mem::forget.
        immutable::remove_tree(&tmp)?;
        std::fs::create_dir(&tmp).map_err(|e| SnapshotError::io("create", &tmp, e))?;
        Ok(SnapshotBuilder {
            root: root.to_owned(),
            name,
            tmp,
            published: false,
        })
    }

    /// The build directory: write the data files here.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// The path of data file `name` (one of [`crate::DATA_FILES`]) in the build directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Where the snapshot will be published.
    pub fn destination(&self) -> PathBuf {
        self.root.join(self.name.as_str())
    }

    /// Hashes and fsyncs the data files, writes the manifest and its checksum, and renames
    /// the directory into place without ever replacing an existing snapshot. Returns the
    /// published directory and its manifest. On error the build directory is removed.
    ///
    /// The hashed files are sealed, so the first [`crate::VerifyLevel::FullCached`] verify
    /// in this process does not hash them again (unless they changed, or were written too
    /// recently for their ctime to prove it; see `seal.rs`).
    pub fn publish(
        mut self,
        input: ManifestInput,
    ) -> Result<(PathBuf, SnapshotManifest), SnapshotError> {
        let mut files = Vec::with_capacity(DATA_FILES.len());
        let mut stamps = Vec::with_capacity(DATA_FILES.len());
        // Sealed before they are stamped and hashed: sealing moves ctime, and from then on
        // nothing can write them, so the hash is of what stays on disk. All first, so that by
        // the time each stamp is recorded it is older than a clock tick (see `seal.rs`).
        let mut opened = Vec::with_capacity(DATA_FILES.len());
        for name in DATA_FILES {
            let path = self.tmp.join(name);
            let f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(SnapshotError::MissingFile { path });
                }
                Err(e) => return Err(SnapshotError::io("open", &path, e)),
            };
            f.sync_all()
                .map_err(|e| SnapshotError::io("fsync", &path, e))?;
            immutable::seal_file(&path)?;
            opened.push((name, path, f));
        }
        for (name, path, f) in opened {
            stamps.push(FileStamp::of(&path)?);
            let sha256 = sha256_file(&path)?;
            let size = f
                .metadata()
                .map_err(|e| SnapshotError::io("read", &path, e))?
                .len();
            files.push(FileEntry {
                name: name.to_owned(),
                size,
                sha256,
            });
        }
        let manifest = SnapshotManifest {
            magic: MAGIC.to_owned(),
            format_version: FORMAT_VERSION,
            name: self.name.clone(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            image_id: input.image_id,
            files,
            fingerprint: input.fingerprint,
            capture: input.capture,
        };
        let (body, sum) = manifest.encode();
        write_synced(&self.tmp.join(MANIFEST_FILE), &body)?;
        write_synced(&self.tmp.join(MANIFEST_SHA256_FILE), sum.as_bytes())?;
        // Every file of the directory, the caller's extras (origin.json) included.
        let protection = immutable::seal_dir_files(&self.tmp)?;
        sync_dir(&self.tmp)?;
        let dest = self.destination();
        rename_noreplace(&self.tmp, &dest)?;
        self.published = true;
        sync_dir(&self.root)?;
        // Renaming the directory leaves its files' inodes (and stamps) as they were.
        for (entry, stamp) in manifest.files.iter().zip(&stamps) {
            seal::record(&dest.join(&entry.name), &entry.sha256, stamp);
        }
        info!(snapshot = %self.name, dir = %dest.display(), ?protection, "snapshot published");
        Ok((dest, manifest))
    }
}

/// How often a build directory's removal is tried while something still writes into it.
const REMOVE_TRIES: u32 = 20;
/// The pause between two tries.
const REMOVE_PAUSE: std::time::Duration = std::time::Duration::from_millis(25);

impl Drop for SnapshotBuilder {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        // The files may be sealed already (publish failed after sealing them). A capture's
        // writer may outlive its QEMU for a moment: the `exec:` helper that writes the state
        // stream finishes its copy when a killed QEMU's pipe closes and renames its part file
        // into place, and a removal that listed the directory before that rename finds it
        // not empty. Tried again while the directory is still there (an error path: at most
        // half a second).
        for attempt in 1..=REMOVE_TRIES {
            match immutable::remove_tree(&self.tmp) {
                Ok(()) => return,
                Err(_) if attempt < REMOVE_TRIES && self.tmp.exists() => {
                    std::thread::sleep(REMOVE_PAUSE);
                }
                Err(e) => {
                    warn!(dir = %self.tmp.display(), error = %e, "failed to remove snapshot build directory");
                    return;
                }
            }
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| SnapshotError::io("create", path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| SnapshotError::io("write", path, e))
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SnapshotError::io("fsync", dir, e))
}

/// `renameat2(RENAME_NOREPLACE)`; on file systems without it, a check-then-rename (which
/// still never replaces a non-empty snapshot directory: `rename` fails with ENOTEMPTY).
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), SnapshotError> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Err(SnapshotError::AlreadyExists {
            path: to.to_owned(),
        }),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            if to.exists() {
                return Err(SnapshotError::AlreadyExists {
                    path: to.to_owned(),
                });
            }
            std::fs::rename(from, to).map_err(|e| SnapshotError::io("rename", from, e))
        }
        Err(e) => Err(SnapshotError::io("rename", from, e.into())),
    }
}

/// Removes `<root>/.tmp-*-<pid>` build directories whose process is gone (a crashed
/// builder). Directories of live processes, including this one, are kept. Returns what was
/// removed. A missing `root` is not an error.
pub fn cleanup_stale_tmp(root: &Path) -> Result<Vec<PathBuf>, SnapshotError> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SnapshotError::io("read", root, e)),
    };
    let me = std::process::id();
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| SnapshotError::io("read", root, e))?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        let Some(pid) = tmp_dir_pid(name) else {
            continue;
        };
        if pid == me || process_running(pid) {
            continue;
        }
        let path = entry.path();
        // A crash between sealing and the rename leaves sealed files here: remove_tree
        // clears their flags first.
        immutable::remove_tree(&path)?;
        info!(dir = %path.display(), pid, "removed stale snapshot build directory");
        removed.push(path);
    }
    Ok(removed)
}

/// Whether `pid` names a process that still runs: a zombie (a daemon that died and was not
/// reaped yet, as right after a `kill -9` and a quick restart) keeps its `/proc` entry but
/// owns nothing any more.
pub fn process_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state is the first field after the command name, which ends at the last `)`.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_ascii_whitespace().next());
    !matches!(state, Some("Z" | "X" | "x") | None)
}

/// The pid of a `.tmp-<name>-<pid>` directory name.
fn tmp_dir_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(TMP_PREFIX)?;
    let (_, pid) = rest.rsplit_once('-')?;
    pid.parse().ok().filter(|&p| p > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_dir_pid_parses_names_with_dashes() {
        assert_eq!(tmp_dir_pid(".tmp-py-warm-1234"), Some(1234));
        assert_eq!(tmp_dir_pid(".tmp-x-0"), None);
        assert_eq!(tmp_dir_pid(".tmp-x-abc"), None);
        assert_eq!(tmp_dir_pid("name-12"), None);
    }
}
