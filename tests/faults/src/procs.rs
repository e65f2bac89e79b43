//! Finding the processes that belong to one `$KILN_HOME`, from `/proc`.
//!
//! A QEMU belongs to a home when its command line names a path inside it (its run
//! directory, or a snapshot's `mem` for a capture or restore); a `kilnd` when its environment
//! says `KILN_HOME=<home>` (the CLI starts it that way). Matching is on a whole path prefix
//! (`<home>/`), so homes that share a name prefix never match each other. Nothing here signals
//! a process it did not find this way: other homes' daemons and VMs run on the same machine.
//! Zombies are skipped: they hold no resources and the kernel has already released them.
//! Mounts below a home (an image build's `proc`, `sys`, `dev/pts` in its root filesystem)
//! are found in `/proc/self/mountinfo` the same way.

use std::path::Path;

/// A process found under `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// Its pid.
    pub pid: i32,
    /// Its command line.
    pub argv: Vec<String>,
}

impl Proc {
    /// The sandbox a QEMU runs for, from its `-name kiln-<id>` argument.
    pub fn sandbox_id(&self) -> Option<String> {
        self.argv
            .windows(2)
            .find(|w| w[0] == "-name")
            .and_then(|w| w[1].strip_prefix("kiln-"))
            .map(str::to_owned)
    }
}

fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn argv(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(split_nul(&raw))
}

fn split_nul(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Whether `argv` is a QEMU naming a path under `home`.
pub fn is_qemu_of(argv: &[String], home: &Path) -> bool {
    let Some(exe) = argv.first() else {
        return false;
    };
    let is_qemu = Path::new(exe)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("qemu-system"));
    let prefix = format!("{}/", home.display());
    is_qemu && argv.iter().any(|a| a.contains(&prefix))
}

/// Whether the environment block `environ` (NUL-separated) sets `KILN_HOME` to `home`.
pub fn environ_names_home(environ: &[u8], home: &Path) -> bool {
    let want = format!("KILN_HOME={}", home.display());
    split_nul(environ)
        .iter()
        .any(|v| v == &want || v.strip_suffix('/') == Some(want.as_str()))
}

/// The live (non-zombie) QEMU processes of `home`.
pub fn qemus_of(home: &Path) -> Vec<Proc> {
    pids()
        .into_iter()
        .filter_map(|pid| {
            let argv = argv(pid)?;
            (is_qemu_of(&argv, home) && kiln_e2e::process_alive(pid)).then_some(Proc { pid, argv })
        })
        .collect()
}

/// Every live process other than QEMU whose command line names a path under `home`: helpers
/// of the engine (an image build's `mmdebstrap`, `mkfs`, `qemu-img`) that must not outlive
/// the daemon that started them. The caller's own process is never listed.
pub fn helpers_of(home: &Path) -> Vec<Proc> {
    let prefix = format!("{}/", home.display());
    let me = std::process::id() as i32;
    pids()
        .into_iter()
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let argv = argv(pid)?;
            let names = argv.iter().skip(1).any(|a| a.contains(&prefix));
            (names && !is_qemu_of(&argv, home) && kiln_e2e::process_alive(pid))
                .then_some(Proc { pid, argv })
        })
        .collect()
}

/// The live (non-zombie) `kilnd` processes serving `home`.
pub fn daemons_of(home: &Path) -> Vec<Proc> {
    pids()
        .into_iter()
        .filter_map(|pid| {
            let argv = argv(pid)?;
            let is_kilnd = argv
                .first()
                .and_then(|a| Path::new(a).file_name())
                .is_some_and(|n| n == "kilnd");
            if !is_kilnd || !kiln_e2e::process_alive(pid) {
                return None;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            environ_names_home(&env, home).then_some(Proc { pid, argv })
        })
        .collect()
}

/// Mount points at or below `home`, from `/proc/self/mountinfo` (field 5). The homes the
/// suite makes have no characters that mountinfo escapes, so paths compare as written.
pub fn mounts_under(home: &Path) -> Vec<String> {
    mounts_in(
        &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        home,
    )
}

fn mounts_in(mountinfo: &str, home: &Path) -> Vec<String> {
    let prefix = format!("{}/", home.display());
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Detaches (`umount2(MNT_DETACH)`) every mount at or below `home`, deepest first, so that
/// a leaked mount cannot keep the home from being removed; the mount points detached.
pub fn detach_mounts_under(home: &Path) -> Vec<String> {
    let mut mounts = mounts_under(home);
    mounts.sort_by(|a, b| b.cmp(a));
    mounts
        .into_iter()
        .filter(|m| {
            let Ok(c) = std::ffi::CString::new(m.as_bytes()) else {
                return false;
            };
            // SAFETY: umount2 reads the NUL-terminated path, which lives across the call.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            rc == 0
        })
        .collect()
}

/// SIGKILLs `pid` if it still runs; whether a signal was delivered.
pub fn kill9(pid: i32) -> bool {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn qemu_match_needs_the_whole_home_path() {
        let home = Path::new("/tmp/kiln-faults-a");
        let q = v(&[
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "kiln-sb-1",
            "-chardev",
            "socket,path=/tmp/kiln-faults-a/run/sb-1/qmp.sock",
        ]);
        assert!(is_qemu_of(&q, home));
        assert!(!is_qemu_of(&q, Path::new("/tmp/kiln-faults")));
        let not_qemu = v(&["/bin/sleep", "/tmp/kiln-faults-a/x"]);
        assert!(!is_qemu_of(&not_qemu, home));
        assert_eq!(
            Proc { pid: 1, argv: q }.sandbox_id().as_deref(),
            Some("sb-1")
        );
    }

    #[test]
    fn mounts_in_lists_mount_points_below_the_home_only() {
        let info = "\
42 27 0:39 / /tmp/h/images/.tmp-base-7/rootfs.d/dev/pts rw - devpts none rw
44 27 0:22 / /tmp/h/images/.tmp-base-7/rootfs.d/sys ro - sysfs sys rw
45 27 0:40 / /tmp/h2/x ro - proc proc ro
46 27 0:41 / /tmp/h rw - tmpfs tmpfs rw
";
        assert_eq!(
            mounts_in(info, Path::new("/tmp/h")),
            [
                "/tmp/h/images/.tmp-base-7/rootfs.d/dev/pts",
                "/tmp/h/images/.tmp-base-7/rootfs.d/sys"
            ]
        );
    }

    #[test]
    fn environ_match_is_exact() {
        let home = Path::new("/tmp/h");
        assert!(environ_names_home(b"A=1\0KILN_HOME=/tmp/h\0", home));
        assert!(environ_names_home(b"KILN_HOME=/tmp/h/\0", home));
        assert!(!environ_names_home(b"KILN_HOME=/tmp/h2\0", home));
        assert!(!environ_names_home(b"X_KILN_HOME=/tmp/h\0", home));
    }
}
