//! Damaging snapshot files on purpose, and undoing it.
//!
//! A [`Damage`] is one byte flipped or one truncation at an offset drawn from the suite's
//! generator; [`Damage::repair`] puts the file back exactly as it was from a pristine copy,
//! so one snapshot serves many corruptions. Published snapshot files may be sealed (read-only
//! modes and, as root, the immutable inode flag): [`unseal`] clears the immutable and
//! append-only flags first (`FS_IOC_SETFLAGS`), which is a no-op where they are not set or
//! the filesystem has no such flags, so the code works whether or not the engine seals its
//! files. [`remove_tree`] does the same for a whole home before removing it.

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::rng::Rng;

/// `FS_IMMUTABLE_FL` from `linux/fs.h`.
const FS_IMMUTABLE_FL: libc::c_int = 0x10;
/// `FS_APPEND_FL` from `linux/fs.h`.
const FS_APPEND_FL: libc::c_int = 0x20;

/// Clears the immutable and append-only inode flags of `path` if set. Errors only when the
/// flags are set and cannot be cleared; a filesystem without inode flags is fine.
pub fn unseal(path: &Path) -> std::io::Result<()> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int to the pointer, which points to a live c_int.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    if rc != 0 {
        // ENOTTY/EOPNOTSUPP: no inode flags here, so none can be set.
        return Ok(());
    }
    if flags & (FS_IMMUTABLE_FL | FS_APPEND_FL) == 0 {
        return Ok(());
    }
    let cleared: libc::c_int = flags & !(FS_IMMUTABLE_FL | FS_APPEND_FL);
    // SAFETY: FS_IOC_SETFLAGS reads one int from the pointer, which points to a live c_int.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &cleared) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Clears the flags of `dir` and everything under it (symlinks not followed), then removes
/// it. A missing `dir` is fine.
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    fn unseal_all(p: &Path) {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        if meta.file_type().is_symlink() {
            return;
        }
        let _ = unseal(p);
        if meta.is_dir() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                unseal_all(&e.path());
            }
        }
    }
    unseal_all(dir);
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// One deliberate corruption of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// One bit pattern XORed into the byte at `offset` (the size is unchanged).
    Flip {
        /// Where.
        offset: u64,
        /// The non-zero XOR mask.
        mask: u8,
    },
    /// The file cut to `len` bytes (shorter than it was).
    Truncate {
        /// The new length.
        len: u64,
    },
}

impl Damage {
    /// A damage for a file of `size` bytes (> 0): a flip or a truncation, each at a uniform
    /// offset. Half of the time the offset is drawn from the first 4 KiB instead, where
    /// headers live (a manifest, a qcow2 or migration stream header).
    pub fn draw(rng: &mut Rng, size: u64) -> Damage {
        assert!(size > 0, "cannot damage an empty file");
        let span = if rng.coin() { size.min(4096) } else { size };
        let offset = rng.below(span);
        if rng.coin() {
            Damage::Flip {
                offset,
                mask: 1 << rng.below(8),
            }
        } else {
            Damage::Truncate { len: offset }
        }
    }

    /// Applies the damage to `path` (clearing its seal first).
    pub fn apply(&self, path: &Path) -> std::io::Result<()> {
        unseal(path)?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        match *self {
            Damage::Flip { offset, mask } => {
                let mut b = [0u8; 1];
                f.read_exact_at(&mut b, offset)?;
                f.write_all_at(&[b[0] ^ mask], offset)?;
            }
            Damage::Truncate { len } => f.set_len(len)?,
        }
        f.sync_all()
    }

    /// Makes `path` equal to `pristine` again, rewriting only what the damage changed.
    pub fn repair(&self, path: &Path, pristine: &Path) -> std::io::Result<()> {
        unseal(path)?;
        let src = std::fs::File::open(pristine)?;
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let (from, to) = match *self {
            Damage::Flip { offset, .. } => (offset, offset + 1),
            Damage::Truncate { len } => (len, src.metadata()?.len()),
        };
        // The cut-off tail comes back as a hole (zeros); then every non-zero chunk of the
        // pristine copy in the damaged range is written over it. A flipped byte is always
        // written back, zero or not.
        dst.set_len(src.metadata()?.len())?;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = from;
        while at < to {
            let n = ((to - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            if matches!(self, Damage::Flip { .. }) || buf[..n].iter().any(|b| *b != 0) {
                dst.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
        }
        dst.sync_all()
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Flip { offset, mask } => write!(f, "flip 0x{mask:02x} at {offset}"),
            Damage::Truncate { len } => write!(f, "truncate to {len}"),
        }
    }
}

/// Copies every regular file of `src` into a new directory `dst` (sparse-aware: runs of
/// zeros are left as holes), for [`Damage::repair`].
pub fn copy_dir(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        if !e.file_type()?.is_file() {
            continue;
        }
        let from = std::fs::File::open(e.path())?;
        let to = std::fs::File::create(dst.join(e.file_name()))?;
        let len = from.metadata()?.len();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < len {
            let n = ((len - at) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|b| *b != 0) {
                to.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
        }
        to.set_len(len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kiln-faults-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn damage_changes_the_file_and_repair_restores_it() {
        let d = tmpdir();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(d.join("f"), &data).expect("write");
        copy_dir(&d, &d.join("pristine")).expect("copy");
        let mut rng = Rng::new(11);
        let mut kinds = (false, false);
        for _ in 0..40 {
            let damage = Damage::draw(&mut rng, data.len() as u64);
            damage.apply(&d.join("f")).expect("apply");
            let now = std::fs::read(d.join("f")).expect("read");
            assert_ne!(now, data, "{damage} changed nothing");
            match damage {
                Damage::Flip { .. } => kinds.0 = true,
                Damage::Truncate { .. } => kinds.1 = true,
            }
            damage
                .repair(&d.join("f"), &d.join("pristine/f"))
                .expect("repair");
            assert_eq!(std::fs::read(d.join("f")).expect("read"), data, "{damage}");
        }
        assert_eq!(kinds, (true, true), "both kinds drawn");
        // A flip of a zero byte (a hole in a sparse file) is undone too.
        let zero = data.iter().position(|b| *b == 0).expect("a zero byte") as u64;
        for damage in [
            Damage::Flip {
                offset: zero,
                mask: 0x40,
            },
            Damage::Truncate { len: zero },
        ] {
            damage.apply(&d.join("f")).expect("apply");
            damage
                .repair(&d.join("f"), &d.join("pristine/f"))
                .expect("repair");
            assert_eq!(std::fs::read(d.join("f")).expect("read"), data, "{damage}");
        }
        remove_tree(&d).expect("remove");
        assert!(!d.exists());
    }

    /// Sets the immutable flag the way `chattr +i` does; false where it cannot (not root, or
    /// a filesystem without inode flags).
    fn seal(path: &Path) -> bool {
        let Ok(f) = std::fs::File::open(path) else {
            return false;
        };
        let mut flags: libc::c_int = 0;
        // SAFETY: FS_IOC_GETFLAGS writes one int to the pointer, which points to a live c_int.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
        if rc != 0 {
            return false;
        }
        let sealed = flags | FS_IMMUTABLE_FL;
        // SAFETY: FS_IOC_SETFLAGS reads one int from the pointer, which points to a live c_int.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &sealed) };
        rc == 0
    }

    #[test]
    fn sealed_files_are_damaged_repaired_and_removed() {
        let d = tmpdir();
        std::fs::write(d.join("f"), b"0123456789").expect("write");
        copy_dir(&d, &d.join("pristine")).expect("copy");
        if !seal(&d.join("f")) {
            eprintln!("immutable flag unavailable here (not root, or no inode flags): skipped");
            remove_tree(&d).expect("remove");
            return;
        }
        assert!(
            std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("f"))
                .is_err(),
            "the flag did not seal the file"
        );
        let damage = Damage::Truncate { len: 3 };
        damage.apply(&d.join("f")).expect("apply to a sealed file");
        assert_eq!(std::fs::read(d.join("f")).expect("read"), b"012");
        assert!(seal(&d.join("f")), "seal again");
        damage
            .repair(&d.join("f"), &d.join("pristine/f"))
            .expect("repair a sealed file");
        assert_eq!(std::fs::read(d.join("f")).expect("read"), b"0123456789");
        assert!(seal(&d.join("f")), "seal again");
        remove_tree(&d).expect("remove a tree holding a sealed file");
        assert!(!d.exists());
    }

    #[test]
    fn unseal_is_a_noop_on_an_unsealed_file_and_a_missing_one() {
        let d = tmpdir();
        std::fs::write(d.join("f"), b"x").expect("write");
        unseal(&d.join("f")).expect("unseal");
        unseal(&d.join("missing")).expect("missing is fine");
        remove_tree(&d).expect("remove");
        remove_tree(&d).expect("removing a missing tree is fine");
    }
}
