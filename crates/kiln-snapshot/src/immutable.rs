//! Published files are read-only and, where the file system allows it, immutable.
//!
//! Running clones map a snapshot's `mem` privately (`share=off`): pages a clone has not
//! written still come from the file, so a later write to the file would change what every
//! running clone reads. Disk layers and image root file systems are backing files of live
//! overlays in the same way. So once published, such a file is never written again:
//!
//! - [`seal_file`] clears its write bits (the rest of the mode is kept: files that are
//!   owner-only stay owner-only) and sets the inode's immutable flag (`FS_IMMUTABLE_FL`
//!   through `FS_IOC_SETFLAGS`; needs `CAP_LINUX_IMMUTABLE`, which kiln has as root). An
//!   immutable file cannot be opened for writing, truncated, renamed over, linked or
//!   unlinked, even by root. File systems (or processes) without the flag fall back to the
//!   modes silently, with one debug line per process.
//! - [`remove_tree`] is the only way kiln deletes a directory that may hold sealed files: it
//!   clears the flag of everything below it first, so nothing becomes undeletable (also after
//!   a crash between a publish and a removal: every removal path clears, whatever state it
//!   finds). A directory of immutable files can still be renamed, which is how removals take
//!   a snapshot out of sight first.
//! - [`WritableWindow`] lifts the flag of a `mem` file while a QEMU that opens its memory
//!   backend read-write starts (QEMU before 8.2 opens `mem-path` with `O_RDWR` even for a
//!   private mapping, and fails with EPERM on an immutable file). The window is counted per
//!   file (concurrent clones share it) and closes as soon as the last QEMU holds its mapping;
//!   the verification seal of the file is carried over when only the flag changed (same
//!   inode, size and mtime: see `seal.rs`).
//!
//! Uses rustix's safe `ioctl_getflags`/`ioctl_setflags` wrappers: no `unsafe` here.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{IFlags, Mode, OFlags};
use rustix::io::Errno;
use tracing::{debug, warn};

use crate::error::SnapshotError;
use crate::seal::{self, FileStamp};

/// How a file was protected by [`seal_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Write bits cleared and the immutable flag set.
    Immutable,
    /// Write bits cleared only (the file system or the process cannot set the flag).
    ModeOnly,
}

/// Whether the "no immutable flag here" debug line was already logged.
static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// Errors of `FS_IOC_[GS]ETFLAGS` that mean "not available here" rather than failure: the
/// file system has no such flags (ENOTTY, EOPNOTSUPP, EINVAL), or the process lacks
/// `CAP_LINUX_IMMUTABLE` (EPERM, EACCES).
fn flag_unsupported(e: Errno) -> bool {
    matches!(
        e,
        Errno::NOTTY | Errno::OPNOTSUPP | Errno::INVAL | Errno::PERM | Errno::ACCESS | Errno::NOSYS
    )
}

/// Opens `path` for the flag ioctls: read-only, never following a symlink, never blocking
/// (a FIFO), never a controlling terminal.
fn open_for_flags(path: &Path) -> Result<rustix::fd::OwnedFd, Errno> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Clears the write bits of `path` and sets its immutable flag where possible. Idempotent.
pub fn seal_file(path: &Path) -> Result<Protection, SnapshotError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| SnapshotError::io("seal", path, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o222 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o222))
            .map_err(|e| SnapshotError::io("make read-only", path, e))?;
    }
    let fd = open_for_flags(path).map_err(|e| SnapshotError::io("seal", path, e.into()))?;
    let res = rustix::fs::ioctl_getflags(&fd).and_then(|flags| {
        if flags.contains(IFlags::IMMUTABLE) {
            Ok(())
        } else {
            rustix::fs::ioctl_setflags(&fd, flags | IFlags::IMMUTABLE)
        }
    });
    match res {
        Ok(()) => Ok(Protection::Immutable),
        Err(e) if flag_unsupported(e) => {
            if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
                debug!(path = %path.display(), error = %e,
                    "immutable flag unavailable; published files are protected by their modes only");
            }
            Ok(Protection::ModeOnly)
        }
        Err(e) => Err(SnapshotError::io("seal", path, e.into())),
    }
}

/// Clears the immutable (and append-only) flag of `path` if set. Modes are left as they are.
/// A file system without flags, or a missing file, is not an error.
pub fn unseal_file(path: &Path) -> Result<(), SnapshotError> {
    let fd = match open_for_flags(path) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(SnapshotError::io("unseal", path, e.into())),
    };
    let res = rustix::fs::ioctl_getflags(&fd).and_then(|flags| {
        let blocking = IFlags::IMMUTABLE | IFlags::APPEND;
        if flags.intersects(blocking) {
            rustix::fs::ioctl_setflags(&fd, flags - blocking)
        } else {
            Ok(())
        }
    });
    match res {
        Ok(()) => Ok(()),
        // No flags here: nothing can be set either. (EPERM is *not* in this set: a sealed file
        // that this process may not unseal must be reported.)
        Err(Errno::NOTTY | Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) => Ok(()),
        Err(e) => Err(SnapshotError::io("unseal", path, e.into())),
    }
}

/// Whether `path` carries the immutable flag (false where flags are unsupported).
pub fn is_immutable(path: &Path) -> bool {
    open_for_flags(path)
        .and_then(|fd| rustix::fs::ioctl_getflags(&fd))
        .is_ok_and(|f| f.contains(IFlags::IMMUTABLE))
}

/// Seals every regular file directly in `dir` (a build directory about to be published).
pub fn seal_dir_files(dir: &Path) -> Result<Protection, SnapshotError> {
    let mut protection = Protection::Immutable;
    for entry in std::fs::read_dir(dir).map_err(|e| SnapshotError::io("read", dir, e))? {
        let entry = entry.map_err(|e| SnapshotError::io("read", dir, e))?;
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && seal_file(&entry.path())? == Protection::ModeOnly {
            protection = Protection::ModeOnly;
        }
    }
    Ok(protection)
}

/// Clears the flags of every regular file and directory at or below `path` (symlinks are
/// not followed). Best effort past the first failure, which is returned.
pub fn unseal_tree(path: &Path) -> Result<(), SnapshotError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(SnapshotError::io("read", path, e)),
    };
    let mut first_err = None;
    let ft = meta.file_type();
    if (ft.is_file() || ft.is_dir())
        && let Err(e) = unseal_file(path)
    {
        first_err.get_or_insert(e);
    }
    if ft.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| SnapshotError::io("read", path, e))?;
        for entry in entries.flatten() {
            if let Err(e) = unseal_tree(&entry.path()) {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Removes `path` (a directory tree or a file) after clearing the immutable flags below it.
/// A missing path is not an error.
pub fn remove_tree(path: &Path) -> Result<(), SnapshotError> {
    let unsealed = unseal_tree(path);
    let removed = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // Say why it could not be removed: the unseal error is the cause when there is one.
        Err(e) => Err(unsealed
            .err()
            .unwrap_or(SnapshotError::io("remove", path, e))),
    }
}

/// Seals again every regular file directly in a published snapshot directory that lost its
/// seal, except files with an open [`WritableWindow`] (a restore is starting on them). A
/// daemon killed inside a window leaves that file unsealed; the next verified use of the
/// snapshot calls this. A no-op (no ctime change) for files that are still sealed.
pub fn reseal_dir(dir: &Path) -> Result<Protection, SnapshotError> {
    let map = windows();
    let mut protection = Protection::Immutable;
    for entry in std::fs::read_dir(dir).map_err(|e| SnapshotError::io("read", dir, e))? {
        let entry = entry.map_err(|e| SnapshotError::io("read", dir, e))?;
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_file()) || map.contains_key(&path) {
            continue;
        }
        if seal_file(&path)? == Protection::ModeOnly {
            protection = Protection::ModeOnly;
        }
    }
    Ok(protection)
}

/// Open windows: per file, how many holders and whether the flag must be set again.
struct Window {
    holders: usize,
    reseal: bool,
}

static WINDOWS: Mutex<BTreeMap<PathBuf, Window>> = Mutex::new(BTreeMap::new());

fn windows() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, Window>> {
    // Plain counters updated under the lock: a panic elsewhere cannot leave them torn.
    WINDOWS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The immutable flag of one published file lifted while a process opens it read-write
/// (see the module docs); set again when the last window of that file is dropped.
#[derive(Debug)]
pub struct WritableWindow {
    path: PathBuf,
}

impl WritableWindow {
    /// Opens a window on `path`: the flag is cleared by the first holder.
    pub fn open(path: &Path) -> Result<WritableWindow, SnapshotError> {
        let mut map = windows();
        if let Some(w) = map.get_mut(path) {
            w.holders += 1;
        } else {
            let reseal = is_immutable(path);
            let before = FileStamp::of(path).ok();
            if reseal {
                unseal_file(path)?;
                // Only the flag changed (ctime moved): the verification cache keeps its seal,
                // so verifies during the window (concurrent clones) do not hash `mem` again.
                if let (Some(before), Ok(after)) = (before, FileStamp::of(path)) {
                    seal::carry_over(path, &before, &after);
                }
            }
            map.insert(path.to_owned(), Window { holders: 1, reseal });
        }
        Ok(WritableWindow {
            path: path.to_owned(),
        })
    }
}

impl Drop for WritableWindow {
    fn drop(&mut self) {
        let mut map = windows();
        let Some(w) = map.get_mut(&self.path) else {
            return;
        };
        w.holders -= 1;
        if w.holders > 0 {
            return;
        }
        let Some(w) = map.remove(&self.path) else {
            return;
        };
        if !w.reseal {
            return;
        }
        // The stamp just before sealing again: a write inside the window moved its mtime
        // away from the stamp the cache holds, and then the seal is forgotten.
        let open = FileStamp::of(&self.path).ok();
        match seal_file(&self.path) {
            Ok(_) => {
                if let (Some(open), Ok(after)) = (open, FileStamp::of(&self.path)) {
                    seal::carry_over(&self.path, &open, &after);
                }
            }
            Err(e) => warn!(path = %self.path.display(), error = %error_chain(&e),
                "could not seal the snapshot file again"),
        }
    }
}

/// `e` and its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Whether this process can set the flag on files under `dir` (root on ext4, xfs, ...).
    fn flag_works(dir: &Path) -> bool {
        let probe = dir.join("probe");
        std::fs::write(&probe, b"x").expect("write probe");
        let ok = seal_file(&probe).expect("seal probe") == Protection::Immutable;
        remove_tree(&probe).expect("remove probe");
        ok
    }

    #[test]
    fn seal_file_clears_write_bits_keeps_the_rest_and_blocks_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mem");
        std::fs::write(&path, b"template").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let protection = seal_file(&path).expect("seal");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o400, "owner-only stays owner-only, without write");
        if protection == Protection::Immutable {
            assert!(is_immutable(&path));
            let err = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect_err("an immutable file cannot be opened for writing");
            assert_eq!(err.raw_os_error(), Some(libc_eperm()), "{err}");
            assert!(std::fs::remove_file(&path).is_err(), "nor unlinked");
        }
        assert_eq!(std::fs::read(&path).expect("read"), b"template");
        remove_tree(dir.path()).expect("remove");
        assert!(!dir.path().exists());
    }

    fn libc_eperm() -> i32 {
        Errno::PERM.raw_os_error()
    }

    #[test]
    fn remove_tree_clears_flags_of_nested_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nested = dir.path().join("a/b");
        std::fs::create_dir_all(&nested).expect("mkdir");
        for p in [dir.path().join("f"), nested.join("g")] {
            std::fs::write(&p, b"x").expect("write");
            seal_file(&p).expect("seal");
        }
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).expect("symlink");
        remove_tree(dir.path()).expect("remove");
        assert!(!dir.path().exists());
        assert!(
            Path::new("/etc/hostname").exists(),
            "symlink target untouched"
        );
        remove_tree(dir.path()).expect("a missing path is not an error");
    }

    #[test]
    fn writable_window_lifts_the_flag_until_the_last_holder_leaves() {
        let dir = tempfile::tempdir().expect("tempdir");
        if !flag_works(dir.path()) {
            return; // Not root, or a file system without the flag: nothing to lift.
        }
        let path = dir.path().join("mem");
        std::fs::write(&path, b"ram").expect("write");
        seal_file(&path).expect("seal");
        let first = WritableWindow::open(&path).expect("open");
        let second = WritableWindow::open(&path).expect("open");
        assert!(!is_immutable(&path));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("read-write open succeeds inside the window");
        drop(first);
        assert!(!is_immutable(&path), "still held by the second window");
        drop(second);
        assert!(is_immutable(&path), "sealed again");
        // A descriptor opened in the window cannot write once the flag is back.
        assert!(f.write_all(b"x").is_err());
        assert_eq!(std::fs::read(&path).expect("read"), b"ram");
        remove_tree(dir.path()).expect("remove");
    }

    #[test]
    fn reseal_dir_seals_what_lost_its_seal_but_not_an_open_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        if !flag_works(dir.path()) {
            return;
        }
        let (mem, state) = (dir.path().join("mem"), dir.path().join("state"));
        for p in [&mem, &state] {
            std::fs::write(p, b"x").expect("write");
            seal_file(p).expect("seal");
        }
        let window = WritableWindow::open(&mem).expect("open");
        unseal_file(&state).expect("as a crash inside a window would leave it");
        reseal_dir(dir.path()).expect("reseal");
        assert!(is_immutable(&state), "resealed");
        assert!(!is_immutable(&mem), "a starting restore keeps its window");
        drop(window);
        assert!(is_immutable(&mem));
        remove_tree(dir.path()).expect("remove");
    }

    #[test]
    fn writable_window_on_an_unsealed_file_leaves_it_unsealed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mem");
        std::fs::write(&path, b"ram").expect("write");
        drop(WritableWindow::open(&path).expect("open"));
        assert!(!is_immutable(&path));
    }
}
