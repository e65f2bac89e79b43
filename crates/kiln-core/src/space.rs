//! Free space on the host file system that holds kiln's state.
//!
//! Every operation whose need is known checks it before it starts (a boot's disk overlay, a
//! capture's memory file, a save's memory and disk), so a full disk is reported as one clear
//! `no_space` error naming the directory and the bytes, instead of QEMU dying of SIGBUS on a
//! file-backed page or a snapshot stream failing half written. The checks are advisory (space
//! can go between the check and the write); what fails anyway is recognised afterwards by
//! [`explain`], which turns a failure into the same error when the file system is (nearly)
//! full.
//!
//! Invariant: a check never fails an operation on a file system whose free space cannot be
//! read (statvfs errors count as "enough"): the check exists to explain, not to forbid.

use std::path::Path;

use crate::error::CoreError;

/// Free space kept beyond an operation's own need: the store, logs and QEMU's own writes.
pub(crate) const MARGIN: u64 = 32 << 20;

/// What a running guest's disk overlay may grow into before QEMU would stop it: below this,
/// a sandbox paused for lack of space stays paused.
pub(crate) const RESUME_FREE: u64 = 64 << 20;

/// Bytes free for an unprivileged writer on the file system holding `path` (the nearest
/// existing ancestor is asked).
pub(crate) fn available(path: &Path) -> Option<u64> {
    let mut p = path;
    loop {
        if let Ok(st) = free_bytes(p) {
            return Some(st);
        }
        p = p.parent()?;
    }
}

/// Free bytes available to unprivileged users on the file system holding `p`.
pub(crate) fn free_bytes(p: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated string and `st` points to writable memory of the
    // right size; statvfs writes the struct fully on success and we read it only then.
    #[allow(unsafe_code)]
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        st.assume_init()
    };
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Fails with [`CoreError::NoSpace`] unless `needed` bytes (plus [`MARGIN`]) are free on the
/// file system holding `path`.
pub(crate) fn ensure(what: &str, path: &Path, needed: u64) -> Result<(), CoreError> {
    match available(path) {
        Some(free) if free < needed.saturating_add(MARGIN) => Err(CoreError::NoSpace {
            what: what.to_owned(),
            path: path.to_owned(),
            available: free,
            needed: Some(needed.saturating_add(MARGIN)),
        }),
        _ => Ok(()),
    }
}

/// `err`, or a [`CoreError::NoSpace`] for `what` when the file system holding `path` has less
/// than [`MARGIN`] free: a write that failed on a full disk surfaces in many shapes (QEMU
/// killed by SIGBUS, a snapshot stream cut, an agent channel reset by a dying QEMU).
pub(crate) fn explain(err: CoreError, what: &str, path: &Path) -> CoreError {
    if matches!(err, CoreError::NoSpace { .. }) {
        return err;
    }
    match available(path) {
        Some(free) if free < MARGIN => CoreError::NoSpace {
            what: format!("{what} ({})", err.chain()),
            path: path.to_owned(),
            available: free,
            needed: None,
        },
        _ => err,
    }
}

/// The human part of a [`CoreError::NoSpace`] message.
pub(crate) fn describe(path: &Path, available: u64, needed: Option<u64>) -> String {
    match needed {
        Some(n) => format!(
            "the file system holding {} has {} free, {} needed",
            path.display(),
            human(available),
            human(n)
        ),
        None => format!(
            "the file system holding {} is full ({} free)",
            path.display(),
            human(available)
        ),
    }
}

/// Bytes for people: `512 B`, `3.0 MiB`, `1.25 GiB`.
fn human(bytes: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    const GIB: f64 = (1u64 << 30) as f64;
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB ({bytes} bytes)", b / GIB)
    } else if b >= MIB {
        format!("{:.1} MiB ({bytes} bytes)", b / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_reads_an_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let direct = available(dir.path()).expect("statvfs of a temp dir");
        assert!(direct > 0);
        let missing = dir.path().join("not/yet/created");
        assert!(available(&missing).is_some());
    }

    #[test]
    fn ensure_names_the_path_and_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure("to start", dir.path(), 1 << 20).is_ok());
        let e = ensure("to capture a warm snapshot", dir.path(), u64::MAX / 2).unwrap_err();
        assert_eq!(e.code(), "no_space");
        let msg = e.to_string();
        assert!(
            msg.starts_with("no space to capture a warm snapshot: "),
            "{msg}"
        );
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains("needed"), "{msg}");
    }

    #[test]
    fn explain_keeps_errors_on_a_file_system_with_room() {
        let dir = tempfile::tempdir().unwrap();
        let e = explain(CoreError::HostSetup("boom".into()), "to start", dir.path());
        assert_eq!(e.code(), "host_setup");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(3 << 20), "3.0 MiB (3145728 bytes)");
        assert_eq!(human(5 << 29), "2.50 GiB (2684354560 bytes)");
    }
}
