//! Temporary build directories, atomic publication, per-name and cache locks and safe removal.
//!
//! Owns the naming scheme `.tmp-<label>-<pid>` used in `images/`, `cache/kernel/` and
//! `cache/debs/`, and the rules that keep readers from ever seeing a partial result:
//!
//! - work happens in a `.tmp-<label>-<pid>` directory next to its destination (same
//!   filesystem, so the final rename is atomic);
//! - a [`TmpDir`] removes its directory when dropped unless disarmed, so *every* error path
//!   (ENOSPC included) leaves the previous result untouched and no debris behind;
//! - publishing over an existing directory swaps the two with `renameat2(RENAME_EXCHANGE)`, so
//!   the destination path always names a complete image;
//! - `.tmp-*` directories whose pid is dead are debris of a crashed builder and are removed;
//! - a build holds `cache/.lock` shared from before it extracts a kernel until it published
//!   the image that names it; `kiln prune` removes cached kernels and packages only while it
//!   holds that lock exclusive ([`try_lock_caches`]);
//! - published files are sealed (`seal_image`: read-only, immutable flag where possible) and
//!   every removal ([`safe_remove`]) clears the flags first, so a sealed image never becomes
//!   undeletable, whatever was interrupted;
//! - nothing is ever deleted recursively while a filesystem is mounted below it (a killed
//!   mmdebstrap can leave `/dev` bind-mounted inside its target; recursing into that would
//!   delete the host's device nodes).

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext};

/// Prefix of in-progress directories.
pub(crate) const TMP_PREFIX: &str = ".tmp-";

/// The pid encoded in a `.tmp-<label>-<pid>` name: the builder that owns the directory
/// (`kiln_snapshot::process_running` says whether it still runs).
pub fn tmp_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(TMP_PREFIX)?;
    let (_, pid) = rest.rsplit_once('-')?;
    pid.parse().ok()
}

/// Mount points at or below `path` (absolute), from `/proc/self/mountinfo`.
fn mounts_below(path: &Path) -> Vec<PathBuf> {
    let Ok(path) = path.canonicalize() else {
        return Vec::new();
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(&path))
        .collect()
}

/// Decodes the octal escapes (`\040` for space etc.) mountinfo uses in paths.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes `path` recursively, refusing if anything is mounted at or below it, after
/// clearing the immutable flags below it. A missing path is not an error.
pub fn safe_remove(path: &Path) -> Result<(), ImageError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    if let Some(mount_point) = mounts_below(path).into_iter().next() {
        return Err(ImageError::MountedBelow {
            path: path.to_owned(),
            mount_point,
        });
    }
    // Published files are immutable: clear the flags first (also of an image whose removal
    // a crash cut short), or nothing below could be unlinked.
    kiln_snapshot::remove_tree(path).map_err(|source| ImageError::Unseal {
        path: path.to_owned(),
        source,
    })
}

/// Seals a finished image directory before it is published: `rootfs.ext4` (the backing file
/// of every overlay), `initramfs.cpio` and `manifest.json` lose their write bits and get the
/// immutable flag where possible; `vmlinuz` only loses its write bits, as it is a hard link
/// of the kernel cache's file (an immutable inode could not be linked again by the next
/// build, nor the cache cleaned).
pub(crate) fn seal_image(dir: &Path) -> Result<(), ImageError> {
    use crate::manifest::{INITRAMFS_FILE, KERNEL_FILE, MANIFEST_FILE, ROOTFS_FILE};
    use std::os::unix::fs::PermissionsExt;
    let seal_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::Seal { path, source }
    };
    for name in [ROOTFS_FILE, INITRAMFS_FILE, MANIFEST_FILE] {
        let path = dir.join(name);
        kiln_snapshot::seal_file(&path).map_err(seal_err(&path))?;
    }
    let kernel = dir.join(KERNEL_FILE);
    let mode = std::fs::metadata(&kernel)
        .ctx("stat", &kernel)?
        .permissions()
        .mode()
        & 0o7777;
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(mode & !0o222))
        .ctx("make read-only", &kernel)
}

/// Removes `.tmp-*` directories in `dir` whose builder process is gone. Best effort: failures
/// are logged, never fatal (a stale directory only wastes space). Every build runs it, and so
/// does the daemon's startup janitor (a build killed with its daemon leaves one).
pub fn clean_stale_tmp(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = tmp_pid(&name.to_string_lossy()) else {
            continue;
        };
        if kiln_snapshot::process_running(pid) {
            continue;
        }
        let path = entry.path();
        match safe_remove(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed stale build directory"),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %crate::error_chain(&e),
                "cannot remove stale build directory"
            ),
        }
    }
}

/// The lock file below `cache/`: builds hold it shared for their whole run (they read the
/// kernel they extracted before any image names it), `kiln prune` exclusive while it removes
/// cached kernels and packages.
pub const CACHE_LOCK_FILE: &str = ".lock";

/// A lock on the build caches (shared or exclusive), held until dropped.
#[derive(Debug)]
pub struct CacheLock {
    _file: File,
}

fn open_cache_lock(home: &Path) -> Result<File, ImageError> {
    let dir = home.join("cache");
    std::fs::create_dir_all(&dir).ctx("create directory", &dir)?;
    let path = dir.join(CACHE_LOCK_FILE);
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ImageError::Lock { path, source })
}

/// Takes the caches' lock shared (a build), waiting while a prune holds it.
pub(crate) fn lock_caches_shared(home: &Path) -> Result<CacheLock, ImageError> {
    let file = open_cache_lock(home)?;
    file.lock_shared().map_err(|source| ImageError::Lock {
        path: home.join("cache").join(CACHE_LOCK_FILE),
        source,
    })?;
    Ok(CacheLock { _file: file })
}

/// Takes the caches' lock exclusive without waiting: `None` while a build holds it (then
/// nothing in the caches may be removed).
pub fn try_lock_caches(home: &Path) -> Result<Option<CacheLock>, ImageError> {
    let file = open_cache_lock(home)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(CacheLock { _file: file })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(source)) => Err(ImageError::Lock {
            path: home.join("cache").join(CACHE_LOCK_FILE),
            source,
        }),
    }
}

/// A `.tmp-<label>-<pid>` directory that is removed on drop unless disarmed.
#[derive(Debug)]
pub(crate) struct TmpDir {
    path: PathBuf,
    armed: bool,
}

impl TmpDir {
    /// Creates `parent/.tmp-<label>-<our pid>`, replacing a leftover of the same name.
    pub(crate) fn create(parent: &Path, label: &str) -> Result<Self, ImageError> {
        let path = parent.join(format!("{TMP_PREFIX}{label}-{}", std::process::id()));
        safe_remove(&path)?;
        std::fs::create_dir(&path).ctx("create directory", &path)?;
        Ok(Self { path, armed: true })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory (it was renamed away or must outlive us).
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = safe_remove(&self.path)
        {
            tracing::warn!(
                path = %self.path.display(),
                error = %crate::error_chain(&e),
                "cannot remove temporary build directory"
            );
        }
    }
}

/// Makes `tmp` appear at `dest` atomically; a previous `dest` is removed afterwards.
pub(crate) fn publish(tmp: TmpDir, dest: &Path) -> Result<(), ImageError> {
    if std::fs::symlink_metadata(dest).is_err() {
        std::fs::rename(tmp.path(), dest).ctx("rename", tmp.path())?;
        tmp.disarm();
        return Ok(());
    }
    let cwd = rustix::fs::CWD;
    match rustix::fs::renameat_with(
        cwd,
        tmp.path(),
        cwd,
        dest,
        rustix::fs::RenameFlags::EXCHANGE,
    ) {
        // `tmp` now holds the previous image; dropping it removes it.
        Ok(()) => Ok(()),
        // Filesystems without RENAME_EXCHANGE: move the old one aside, then rename. There is
        // a short window in which `dest` does not exist, never one where it is partial.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            let parent = dest.parent().unwrap_or(Path::new("."));
            let old = TmpDir::create(parent, "old")?;
            let aside = old.path().join("image");
            std::fs::rename(dest, &aside).ctx("rename", dest)?;
            std::fs::rename(tmp.path(), dest).ctx("rename", tmp.path())?;
            tmp.disarm();
            Ok(())
        }
        Err(e) => Err(ImageError::io("exchange", dest, e.into())),
    }
}

/// Runs `work` in a fresh temporary directory next to `dest` and publishes the result at
/// `dest`; on error the temporary directory is removed and `dest` is untouched.
pub(crate) fn build_atomically<T>(
    dest: &Path,
    label: &str,
    work: impl FnOnce(&Path) -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    let tmp = TmpDir::create(parent, label)?;
    let value = work(tmp.path())?;
    publish(tmp, dest)?;
    Ok(value)
}

/// An exclusive advisory lock on one image name, held until dropped.
#[derive(Debug)]
pub(crate) struct NameLock {
    _file: File,
}

/// Opens (creating it) the lock file at `path`, not yet locked.
pub(crate) fn open_lock_file(path: &Path) -> Result<File, ImageError> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| ImageError::Lock {
            path: path.to_owned(),
            source,
        })
}

/// Takes the exclusive lock `dir/.lock-<name>`, calling `on_wait` once if another process
/// holds it (and then blocking until it is released).
pub(crate) fn lock_name(
    dir: &Path,
    name: &str,
    on_wait: &mut dyn FnMut(),
) -> Result<NameLock, ImageError> {
    let path = dir.join(format!(".lock-{name}"));
    let file = open_lock_file(&path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            on_wait();
            file.lock().map_err(|source| ImageError::Lock {
                path: path.clone(),
                source,
            })?;
        }
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(ImageError::Lock { path, source });
        }
    }
    Ok(NameLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_pid_parses_label_with_dashes() {
        assert_eq!(tmp_pid(".tmp-my-image-1234"), Some(1234));
        assert_eq!(tmp_pid(".tmp-x"), None);
        assert_eq!(tmp_pid("base"), None);
    }

    #[test]
    fn build_atomically_failure_keeps_old_and_removes_tmp() {
        let home = tempfile::tempdir().expect("tempdir");
        let dest = home.path().join("img");
        std::fs::create_dir(&dest).expect("mkdir");
        std::fs::write(dest.join("f"), "old").expect("write");
        let err = build_atomically(&dest, "img", |tmp| {
            std::fs::write(tmp.join("f"), "new").expect("write");
            std::fs::write(tmp.join("big"), vec![0u8; 4096]).expect("write");
            Err::<(), _>(ImageError::io(
                "write",
                tmp.join("big"),
                std::io::Error::from_raw_os_error(28), // ENOSPC
            ))
        })
        .expect_err("work failed");
        assert!(matches!(err, ImageError::Io { .. }));
        assert_eq!(
            std::fs::read_to_string(dest.join("f")).expect("read"),
            "old"
        );
        let left: Vec<_> = std::fs::read_dir(home.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["img"], "temporary directory left behind");
    }

    #[test]
    fn build_atomically_success_replaces_old() {
        let home = tempfile::tempdir().expect("tempdir");
        let dest = home.path().join("img");
        std::fs::create_dir(&dest).expect("mkdir");
        std::fs::write(dest.join("f"), "old").expect("write");
        std::fs::write(dest.join("only-old"), "x").expect("write");
        build_atomically(&dest, "img", |tmp| {
            std::fs::write(tmp.join("f"), "new").map_err(|e| ImageError::io("write", tmp, e))
        })
        .expect("build");
        assert_eq!(
            std::fs::read_to_string(dest.join("f")).expect("read"),
            "new"
        );
        assert!(!dest.join("only-old").exists());
        assert_eq!(std::fs::read_dir(home.path()).expect("readdir").count(), 1);
    }

    #[test]
    fn build_atomically_first_build_creates_dest() {
        let home = tempfile::tempdir().expect("tempdir");
        let dest = home.path().join("img");
        build_atomically(&dest, "img", |tmp| {
            std::fs::write(tmp.join("f"), "1").map_err(|e| ImageError::io("write", tmp, e))
        })
        .expect("build");
        assert_eq!(std::fs::read_to_string(dest.join("f")).expect("read"), "1");
    }

    #[test]
    fn clean_stale_tmp_removes_dead_keeps_live() {
        let home = tempfile::tempdir().expect("tempdir");
        // pid_max is at most 2^22, so this pid cannot exist.
        let dead = home.path().join(".tmp-base-99999999");
        let live = home
            .path()
            .join(format!(".tmp-base-{}", std::process::id()));
        let other = home.path().join("base");
        for d in [&dead, &live, &other] {
            std::fs::create_dir(d).expect("mkdir");
            std::fs::write(d.join("f"), "x").expect("write");
        }
        clean_stale_tmp(home.path());
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(other.exists());
    }

    #[test]
    fn build_atomically_replaces_and_removes_a_sealed_image() {
        use crate::manifest::{INITRAMFS_FILE, KERNEL_FILE, MANIFEST_FILE, ROOTFS_FILE};
        let home = tempfile::tempdir().expect("tempdir");
        let dest = home.path().join("img");
        let write_image = |dir: &Path, content: &str| {
            for f in [KERNEL_FILE, INITRAMFS_FILE, ROOTFS_FILE, MANIFEST_FILE] {
                std::fs::write(dir.join(f), content)
                    .map_err(|e| ImageError::io("write", dir, e))?;
            }
            seal_image(dir)
        };
        build_atomically(&dest, "img", |tmp| write_image(tmp, "old")).expect("first build");
        let rootfs = dest.join(ROOTFS_FILE);
        let sealed = kiln_snapshot::is_immutable(&rootfs);
        if sealed || !rustix::process::geteuid().is_root() {
            assert!(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&rootfs)
                    .is_err(),
                "a published rootfs cannot be opened for writing"
            );
        }
        // A rebuild (same name) swaps in the new image and removes the sealed old one.
        build_atomically(&dest, "img", |tmp| write_image(tmp, "new")).expect("rebuild");
        assert_eq!(std::fs::read_to_string(&rootfs).expect("read"), "new");
        let left: Vec<_> = std::fs::read_dir(home.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["img"], "the sealed previous image is gone");
        // A crash after the swap left an old image in a stale build directory: cleaned.
        let stale = home.path().join(".tmp-img-99999999");
        std::fs::create_dir(&stale).expect("mkdir");
        write_image(&stale, "stale").expect("sealed stale image");
        clean_stale_tmp(home.path());
        assert!(!stale.exists());
        safe_remove(&dest).expect("remove the sealed image");
        assert!(!dest.exists());
    }

    #[test]
    fn clean_stale_tmp_treats_a_zombie_owner_as_dead() {
        let home = tempfile::tempdir().expect("tempdir");
        // A child that exited and is not reaped yet: its /proc entry stays, as a zombie's.
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let stat = format!("/proc/{}/stat", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&stat)
            .expect("zombie's stat")
            .contains(") Z ")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "child never became a zombie"
            );
            std::thread::yield_now();
        }
        let tmp = home.path().join(format!(".tmp-base-{}", child.id()));
        std::fs::create_dir(&tmp).expect("mkdir");
        clean_stale_tmp(home.path());
        assert!(!tmp.exists(), "a zombie's build directory was kept");
        child.wait().expect("reap");
    }

    #[test]
    fn try_lock_caches_fails_while_a_build_holds_it_shared() {
        let home = tempfile::tempdir().expect("tempdir");
        let build = lock_caches_shared(home.path()).expect("shared");
        let second = lock_caches_shared(home.path()).expect("builds share it");
        assert!(try_lock_caches(home.path()).expect("try").is_none());
        drop((build, second));
        let prune = try_lock_caches(home.path()).expect("try");
        assert!(prune.is_some(), "free once the builds are done");
        assert!(try_lock_caches(home.path()).expect("try").is_none());
    }

    #[test]
    fn safe_remove_refuses_mount_point() {
        // "/" is always a mount point; removing it must be refused before touching anything.
        let err = safe_remove(Path::new("/")).expect_err("must refuse");
        assert!(matches!(err, ImageError::MountedBelow { .. }), "{err:?}");
    }

    #[test]
    fn unescape_mountinfo_decodes_octal() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn lock_name_second_holder_waits_until_release() {
        let home = tempfile::tempdir().expect("tempdir");
        let first = lock_name(home.path(), "base", &mut || panic!("no wait")).expect("lock");
        let path = home.path().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let mut waited = false;
            let _l = lock_name(&path, "base", &mut || {
                waited = true;
                tx.send(()).expect("send");
            })
            .expect("lock");
            waited
        });
        rx.recv().expect("second locker reports waiting");
        drop(first);
        assert!(t.join().expect("join"));
    }
}
