//! SIGCHLD-driven child reaping with per-pid dispatch.
//!
//! Owns: the only `waitpid` calls of the agent. tokio's process reaper is not used because, as
//! PID 1, the agent inherits every orphan in the guest and must reap them all.
//!
//! ```text
//!  spawn(cmd) ──lock──▶ fork/exec ──▶ register pid → oneshot ──unlock──▶ (Child, Receiver)
//!  SIGCHLD / 1 s safety tick ──▶ lock ──▶ ReapMode::AllChildren:    waitpid(-1) until none
//!                                         ReapMode::RegisteredOnly: waitpid(pid) per pid
//!                                ──▶ send ChildExit to the pid's oneshot (orphans: dropped)
//! ```
//!
//! Invariants:
//! - Spawning and registering happen under the same lock the reaper holds while it calls
//!   `waitpid`, so a child can never be reaped before its pid is registered (its status would
//!   be lost) and never while `std::process::Command::spawn` is still waiting on it (spawn
//!   reaps a child whose exec failed itself).
//! - A registered pid stays registered until reaped, even if its receiver was dropped, so
//!   abandoned children never linger as zombies.
//! - `RegisteredOnly` never touches children it did not spawn, so tests can run the agent
//!   inside a process that has other children.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

use crate::sys::{self, ChildExit};

/// Safety net in case a SIGCHLD notification is ever missed.
const SAFETY_TICK: Duration = Duration::from_secs(1);

/// Which children the reaper collects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapMode {
    /// Every child (`waitpid(-1)`): the agent is PID 1 and owns all orphans.
    AllChildren,
    /// Only children spawned through this reaper (tests, or the agent run as a normal process).
    RegisteredOnly,
}

/// Handle to the reaper task. Cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    inner: Arc<Inner>,
}

struct Inner {
    mode: ReapMode,
    waiters: Mutex<HashMap<i32, oneshot::Sender<ChildExit>>>,
}

impl Reaper {
    /// Installs the SIGCHLD listener and starts the reaper task on the current tokio runtime.
    /// The task ends when the last handle is dropped.
    pub fn start(mode: ReapMode) -> io::Result<Reaper> {
        let mut sigchld = signal(SignalKind::child())?;
        let inner = Arc::new(Inner {
            mode,
            waiters: Mutex::new(HashMap::new()),
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tokio::time::sleep(SAFETY_TICK) => {}
                }
                match weak.upgrade() {
                    Some(inner) => inner.reap(),
                    None => break,
                }
            }
        });
        Ok(Reaper { inner })
    }

    /// Spawns `cmd` and registers its pid; the receiver yields its exit status once reaped.
    /// Never call `wait` on the returned `Child`: the reaper owns its status.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<ChildExit>)> {
        let mut waiters = self.inner.lock();
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id())
            .map_err(|_| io::Error::other("child pid does not fit in pid_t"))?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(pid, tx);
        Ok((child, rx))
    }

    /// Number of registered children not yet reaped.
    pub fn pending(&self) -> usize {
        self.inner.lock().len()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<ChildExit>>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reap(&self) {
        let mut waiters = self.lock();
        match self.mode {
            ReapMode::AllChildren => loop {
                match sys::waitpid_nohang(-1) {
                    Ok(Some((pid, exit))) => {
                        if let Some(tx) = waiters.remove(&pid) {
                            // The exec may have been abandoned; its status is then unwanted.
                            let _ = tx.send(exit);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // None: children remain but none has exited; ECHILD: no children at all.
                    Ok(None) | Err(_) => break,
                }
            },
            ReapMode::RegisteredOnly => {
                let pids: Vec<i32> = waiters.keys().copied().collect();
                for pid in pids {
                    match sys::waitpid_nohang(pid) {
                        Ok(Some((_, exit))) => {
                            if let Some(tx) = waiters.remove(&pid) {
                                let _ = tx.send(exit);
                            }
                        }
                        Ok(None) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                            // Someone else reaped it; dropping the sender tells the waiter.
                            waiters.remove(&pid);
                        }
                        Err(_) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reaper_delivers_exit_code_and_signal() {
        let reaper = Reaper::start(ReapMode::RegisteredOnly).expect("sigchld listener");
        let (_c1, exit1) = reaper
            .spawn(Command::new("sh").args(["-c", "exit 3"]))
            .expect("spawn sh");
        let (_c2, exit2) = reaper
            .spawn(Command::new("sh").args(["-c", "kill -TERM $$"]))
            .expect("spawn sh");
        assert_eq!(exit1.await.ok(), Some(ChildExit::Exited(3)));
        assert_eq!(exit2.await.ok(), Some(ChildExit::Signaled(libc::SIGTERM)));
        assert_eq!(reaper.pending(), 0);
    }

    #[tokio::test]
    async fn reaper_spawn_failure_registers_nothing() {
        let reaper = Reaper::start(ReapMode::RegisteredOnly).expect("sigchld listener");
        let err = reaper
            .spawn(&mut Command::new("/nonexistent/kiln-test-binary"))
            .expect_err("cannot spawn");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(reaper.pending(), 0);
    }
}
