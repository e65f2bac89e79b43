//! Child-process plumbing shared by VMs and helper QEMUs: die-with-parent, a supervisor task
//! that owns the child, and bounded log tails.
//!
//! Invariants:
//! - Only the supervisor task touches the `Child`, so a kill request can never signal a pid
//!   that was already reaped and recycled (tokio's `start_kill` knows whether it reaped).
//! - Short-lived helpers (the accelerator probe) get `PR_SET_PDEATHSIG(SIGKILL)` and die with
//!   their parent. Linux delivers it when the *thread* that forked the child exits, not the
//!   process: spawn from a long-lived runtime worker thread (any `async fn` of this crate
//!   called from a task), never from `spawn_blocking`, whose threads exit when idle.
//! - VMs ([`Lifetime::OutlivesParent`]) do not: a daemon that restarts finds them running
//!   and adopts them ([`Supervised::adopt`], watched through a pidfd); one that does not
//!   come back leaves them to the next daemon's janitor, which knows them by their pidfile.
//! - Children run in their own process group, so a terminal's Ctrl-C reaches the daemon (which
//!   shuts VMs down in order), not QEMU directly.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Arc;

use tokio::process::{Child, Command};
use tokio::sync::{Notify, watch};

/// How a QEMU process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// It exited with this code (0 after `quit`, a guest poweroff or reboot).
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// Waiting for it failed; the process is presumed gone.
    Unknown(String),
}

impl VmExit {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        matches!(self, VmExit::Exited(0))
    }

    fn from_status(status: ExitStatus) -> VmExit {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => VmExit::Exited(code),
            (None, Some(sig)) => VmExit::Signaled(sig),
            (None, None) => VmExit::Unknown(format!("{status}")),
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Exited(code) => write!(f, "exit code {code}"),
            VmExit::Signaled(9) => f.write_str("killed by SIGKILL"),
            VmExit::Signaled(15) => f.write_str("killed by SIGTERM"),
            VmExit::Signaled(sig) => write!(f, "killed by signal {sig}"),
            VmExit::Unknown(why) => write!(f, "unknown exit ({why})"),
        }
    }
}

/// Whether a child dies with the process that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// SIGKILL when the spawning thread exits, and when its handle is dropped.
    DiesWithParent,
    /// Keeps running when the parent exits (the handle being dropped with the runtime does
    /// not kill it either); only an explicit kill ends it.
    OutlivesParent,
}

/// Puts the child in its own process group (a terminal's Ctrl-C reaches the daemon, not
/// QEMU) and, for [`Lifetime::DiesWithParent`], makes it die with this thread (SIGKILL) and
/// with its `Child` handle.
#[allow(unsafe_code)]
pub(crate) fn supervise_settings(cmd: &mut Command, lifetime: Lifetime) {
    cmd.process_group(0);
    if lifetime == Lifetime::OutlivesParent {
        cmd.kill_on_drop(false);
        return;
    }
    let parent = rustix::process::getpid();
    cmd.kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec. It calls only prctl and
    // getppid (async-signal-safe syscalls), allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // If the parent died before prctl took effect, no signal will ever come.
            if rustix::process::getppid() != Some(parent) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

/// Gives the child `fd` as its descriptor `target` (without close-on-exec), e.g. the state file
/// QEMU reads with `migrate-incoming fd:<target>`. `target` must be above 2 (stdio is set up
/// before this runs and would be overwritten). The parent's copy closes when `cmd` is dropped.
#[allow(unsafe_code)]
pub(crate) fn pass_fd(cmd: &mut Command, fd: std::os::fd::OwnedFd, target: std::os::fd::RawFd) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    debug_assert!(target > 2, "stdio descriptors are not ours to replace");
    // SAFETY: the closure runs in the forked child before exec. It only calls dup2/fcntl
    // (async-signal-safe), allocates nothing and touches no locks. The `OwnedFd` naming
    // `target` is never dropped (ManuallyDrop), so nothing closes a descriptor the child
    // still needs.
    unsafe {
        cmd.pre_exec(move || {
            if fd.as_raw_fd() == target {
                // dup2 onto itself would keep close-on-exec set.
                rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty())?;
            } else {
                let mut new = std::mem::ManuallyDrop::new(OwnedFd::from_raw_fd(target));
                rustix::io::dup2(&fd, &mut new)?;
            }
            Ok(())
        });
    }
}

/// Handle to a child owned by a supervisor task.
#[derive(Debug, Clone)]
pub(crate) struct Supervised {
    exit: watch::Receiver<Option<VmExit>>,
    kill: Arc<Notify>,
}

impl Supervised {
    /// Moves `child` into a supervisor task that reaps it and publishes its exit.
    pub(crate) fn start(mut child: Child) -> Supervised {
        let (tx, exit) = watch::channel(None);
        let kill = Arc::new(Notify::new());
        let kill_rx = Arc::clone(&kill);
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    () = kill_rx.notified() => {
                        // Fails only if already reaped, which the loop would have noticed.
                        let _ = child.start_kill();
                    }
                }
            };
            let exit = match status {
                Ok(s) => VmExit::from_status(s),
                Err(e) => VmExit::Unknown(format!("wait failed: {e}")),
            };
            tx.send_replace(Some(exit));
        });
        Supervised { exit, kill }
    }

    /// Watches a process this daemon did not start (a VM left running by a previous daemon):
    /// its exit is seen through a pidfd (its status is not ours to read), and a kill goes to
    /// exactly that process. Fails if `identity` no longer names a live process.
    #[allow(unsafe_code)]
    pub(crate) fn adopt(identity: crate::procid::ProcessIdentity) -> std::io::Result<Supervised> {
        use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
        let pid =
            Pid::from_raw(identity.pid as i32).ok_or_else(|| std::io::Error::other("pid 0"))?;
        // The pidfd is opened before the start time is checked: from then on it names that
        // process even if the pid is recycled.
        let fd = pidfd_open(pid, PidfdFlags::empty())?;
        if crate::procid::ProcessIdentity::of_pid(identity.pid)?.start_time != identity.start_time {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("pid {} is another process now", identity.pid),
            ));
        }
        // SAFETY: the pidfd is an `OwnedFd` moved into the `AsyncFd`, which owns it until the
        // watcher task ends; nothing else closes or replaces that descriptor.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)?
        };
        let (tx, exit) = watch::channel(None);
        let kill = Arc::new(Notify::new());
        let kill_rx = Arc::clone(&kill);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    // A pidfd becomes readable when its process exits.
                    r = fd.readable() => {
                        if let Ok(mut guard) = r {
                            guard.retain_ready();
                        }
                        break;
                    }
                    () = kill_rx.notified() => {
                        let _ = pidfd_send_signal(fd.get_ref(), Signal::KILL);
                    }
                }
            }
            tx.send_replace(Some(VmExit::Unknown(
                "it exited; its status went to the daemon that started it".to_owned(),
            )));
        });
        Ok(Supervised { exit, kill })
    }

    /// Asks for SIGKILL (idempotent; a no-op once the child is gone).
    pub(crate) fn request_kill(&self) {
        self.kill.notify_one();
    }

    /// The exit, if it already happened.
    pub(crate) fn try_exit(&self) -> Option<VmExit> {
        self.exit.borrow().clone()
    }

    /// Waits for the exit. Any number of callers may wait at once.
    pub(crate) async fn wait(&self) -> VmExit {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v
                .clone()
                .unwrap_or_else(|| VmExit::Unknown("no status".to_owned())),
            // The supervisor task was dropped: the runtime is shutting down and kill_on_drop
            // has killed the child.
            Err(_) => VmExit::Unknown("supervisor stopped".to_owned()),
        }
    }
}

/// The last `max_bytes` of a file as text, starting at a line boundary when truncated.
/// Missing or unreadable files give an empty string: tails are for error messages only.
pub(crate) fn file_tail(path: &Path, max_bytes: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max_bytes as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::with_capacity(max_bytes.min(len as usize));
    if f.take(max_bytes as u64).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0
        && let Some(nl) = text.find('\n')
    {
        text.drain(..=nl);
    }
    // Serial output carries \r\n and the odd NUL; error messages want neither.
    text.retain(|c| c != '\r' && c != '\0');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_tail_starts_at_line_boundary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("log");
        std::fs::write(&p, "first line\r\nsecond line\r\nthird\r\n").expect("write");
        assert_eq!(file_tail(&p, 1000), "first line\nsecond line\nthird\n");
        assert_eq!(file_tail(&p, 16), "third\n");
        assert_eq!(file_tail(&dir.path().join("missing"), 10), "");
    }

    #[test]
    fn vm_exit_display_is_readable() {
        assert_eq!(VmExit::Exited(1).to_string(), "exit code 1");
        assert_eq!(VmExit::Signaled(9).to_string(), "killed by SIGKILL");
        assert_eq!(VmExit::Signaled(6).to_string(), "killed by signal 6");
        assert!(VmExit::Exited(0).success());
        assert!(!VmExit::Signaled(9).success());
    }

    #[tokio::test]
    async fn adopt_sees_exit_and_kills_only_that_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let ident = crate::procid::ProcessIdentity::of_pid(child.id()).expect("identity");
        // A wrong start time is refused: the pid would name another process.
        let stale = crate::procid::ProcessIdentity {
            start_time: ident.start_time + 1,
            ..ident
        };
        assert!(Supervised::adopt(stale).is_err());
        let adopted = Supervised::adopt(ident).expect("adopt");
        assert_eq!(adopted.try_exit(), None);
        adopted.request_kill();
        let exit = tokio::time::timeout(std::time::Duration::from_secs(10), adopted.wait())
            .await
            .expect("exit seen");
        assert!(matches!(exit, VmExit::Unknown(_)), "{exit:?}");
        let status = child.wait().expect("reap");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
    }
}
