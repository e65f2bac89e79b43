//! The owner task: one per live sandbox, the only code that acts on it.
//!
//! Every operation on a sandbox (exec, ping, snapshot, secrets, pause/resume, TTL change,
//! removal) is an [`Op`] sent to its owner's queue; the owner handles them one at a time and
//! answers on a oneshot. It also watches for the VM's death and for the end of the sandbox's
//! lifetime (TTL, idle timeout). So no two operations on one sandbox can race, and no
//! operation needs a lock of its own.
//!
//! ```text
//!   handlers ──Op──▶ [bounded queue] ──▶ owner loop ──▶ Sandbox (VM + agent channel)
//!                                          │  ▲
//!        QEMU exit / agent channel lost ───┘  └── TTL deadline, idle deadline
//!
//!   Running ──Pause──▶ Paused ──Resume──▶ Running
//!   any ──Remove / expiry──▶ (VM stopped, dir and row removed, `removed` event) ── task ends
//!   any ──VM died──▶ Failed (recorded, `failed` event, dir removed) ── task ends
//! ```
//!
//! Invariants: every transition is recorded in the store before its event is published; an
//! op that needs a running guest is refused with the current state (never queued behind a
//! pause); the task ends only after the sandbox is removed or recorded failed, and then its
//! queue's senders see the channel closed.

use std::sync::{Arc, Weak};
use std::time::Duration;

use kiln_api_types::{
    EventKind, ExecRequest, SandboxId, SandboxState, Secrets, SnapshotInfo, SnapshotName,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::error::CoreError;
use crate::sandbox::{Exec, Sandbox};
use crate::{Engine, guest, unix_now};

/// How many operations may wait in one sandbox's queue.
const QUEUE_DEPTH: usize = 64;

/// The answer to an [`Op`].
pub(crate) type Reply<T> = oneshot::Sender<Result<T, CoreError>>;

/// An operation on one sandbox.
pub(crate) enum Op {
    /// Start a command.
    Exec(Box<ExecRequest>, Reply<Exec>),
    /// One agent round trip.
    Ping(Reply<Duration>),
    /// Save it as a user snapshot; it keeps running.
    Snapshot(SnapshotName, Reply<SnapshotInfo>),
    /// Deliver (new values of) secrets and rerun the on-restore hook.
    Secrets(Secrets, Reply<()>),
    /// Stop its vCPUs in place.
    Pause(Reply<()>),
    /// Let its vCPUs run again.
    Resume(Reply<()>),
    /// Its lifetime now ends this many seconds from now; answers the new deadline.
    Ttl(u64, Reply<u64>),
    /// Stop and remove it.
    Remove(String, Reply<()>),
    /// A file operation (transfers are only opened here).
    File(
        crate::files::FileOp,
        Reply<(crate::files::FileAnswer, crate::sandbox::BusyGuard)>,
    ),
    /// Let go of it, leaving its VM running for the next daemon (daemon shutdown).
    Detach(Reply<()>),
    /// Save it (memory and disk) and stop its VM.
    Stop(Reply<()>),
}

/// The sending side of an owner's queue.
#[derive(Clone)]
pub(crate) struct Handle {
    tx: mpsc::Sender<Op>,
}

impl Handle {
    /// Sends an op and waits for its answer; `None` when the owner has ended (the sandbox was
    /// removed or failed meanwhile).
    pub(crate) async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Op,
    ) -> Option<Result<T, CoreError>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }
}

/// What the owner loop does after an op.
enum Flow {
    Continue,
    Exit,
}

struct Owner {
    engine: Weak<Engine>,
    sb: Arc<Sandbox>,
    state: SandboxState,
    /// End of the lifetime, seconds since the Unix epoch.
    expires_unix: Option<u64>,
    idle_timeout: Option<Duration>,
}

/// Starts the owner of sandbox `sb`, which is running or (re-attached) paused.
pub(crate) fn spawn(
    engine: &Arc<Engine>,
    sb: Arc<Sandbox>,
    state: SandboxState,
    expires_unix: Option<u64>,
    idle_timeout_secs: Option<u64>,
) -> Handle {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let owner = Owner {
        engine: Arc::downgrade(engine),
        sb,
        state,
        expires_unix,
        idle_timeout: idle_timeout_secs.map(Duration::from_secs),
    };
    tokio::spawn(owner.run(rx));
    Handle { tx }
}

impl Owner {
    fn id(&self) -> &SandboxId {
        self.sb.id()
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        loop {
            let (wait, why) = self.next_deadline();
            tokio::select! {
                op = rx.recv() => {
                    let Some(op) = op else {
                        // The engine is gone (daemon shutdown handles its sandboxes itself).
                        return;
                    };
                    if let Flow::Exit = self.handle(op).await {
                        return;
                    }
                }
                reason = self.sb.watch_failure() => {
                    self.fail(reason).await;
                    return;
                }
                _ = tokio::time::sleep(wait), if why.is_some() => {
                    let why = why.unwrap_or("expired");
                    // The idle deadline is re-checked: a session may have started meanwhile.
                    if why == "ttl expired" || self.idle_expired() {
                        info!(sandbox_id = %self.id(), reason = why, "sandbox expired");
                        self.remove(why).await;
                        return;
                    }
                }
            }
        }
    }

    /// How long until the lifetime or the idle timeout ends, and which.
    fn next_deadline(&self) -> (Duration, Option<&'static str>) {
        let mut best: (Duration, Option<&'static str>) = (Duration::MAX, None);
        if let Some(exp) = self.expires_unix {
            let left = Duration::from_secs(exp.saturating_sub(unix_now()));
            best = (left, Some("ttl expired"));
        }
        if let Some(limit) = self.idle_timeout {
            let left = limit.saturating_sub(self.sb.activity.idle_for());
            // A busy sandbox is checked again after a full timeout.
            if left < best.0 {
                best = (left.max(Duration::from_millis(10)), Some("idle timeout"));
            }
        }
        best
    }

    fn idle_expired(&self) -> bool {
        self.idle_timeout
            .is_some_and(|limit| self.sb.activity.idle_for() >= limit)
    }

    fn need(&self, wanted: SandboxState) -> Result<(), CoreError> {
        if self.state == wanted {
            Ok(())
        } else {
            Err(CoreError::WrongState {
                id: self.id().clone(),
                state: self.state,
                wanted,
            })
        }
    }

    async fn handle(&mut self, op: Op) -> Flow {
        match op {
            Op::Exec(req, reply) => {
                let r = match self.need(SandboxState::Running) {
                    Ok(()) => self.sb.exec(&req).await,
                    Err(e) => Err(e),
                };
                let r = match (r, self.engine.upgrade()) {
                    (Ok(mut exec), Some(engine)) => {
                        exec.report_to(engine.events.clone());
                        engine.publish(
                            self.id(),
                            EventKind::ExecStarted {
                                argv: req.argv.clone(),
                            },
                        );
                        Ok(exec)
                    }
                    (r, _) => r,
                };
                let _ = reply.send(r);
            }
            Op::Ping(reply) => {
                let r = match self.need(SandboxState::Running) {
                    Ok(()) => self.sb.ping().await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Op::Snapshot(name, reply) => {
                let r = match (self.need(SandboxState::Running), self.engine.upgrade()) {
                    (Err(e), _) => Err(e),
                    (Ok(()), None) => Err(CoreError::HostSetup("the daemon is stopping".into())),
                    (Ok(()), Some(engine)) => engine.snapshot_of(&self.sb, &name).await,
                };
                let _ = reply.send(r);
            }
            Op::Secrets(secrets, reply) => {
                let r = match self.need(SandboxState::Running) {
                    Ok(()) => self.rotate_secrets(&secrets).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Op::Pause(reply) => {
                let r = match self.need(SandboxState::Running) {
                    Ok(()) => self.pause().await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Op::Resume(reply) => {
                let r = match self.need(SandboxState::Paused) {
                    Ok(()) => self.resume().await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Op::Ttl(secs, reply) => {
                let expires = unix_now().saturating_add(secs);
                let r = match self.engine.upgrade() {
                    Some(engine) => engine
                        .store
                        .sandbox_set_expiry(self.id(), Some(expires))
                        .map(|_| expires)
                        .map_err(CoreError::from),
                    None => Err(CoreError::HostSetup("the daemon is stopping".into())),
                };
                if r.is_ok() {
                    self.expires_unix = Some(expires);
                }
                let _ = reply.send(r);
            }
            Op::File(op, reply) => {
                let r = match self.need(SandboxState::Running) {
                    Ok(()) => {
                        let busy = self.sb.activity.busy();
                        crate::files::run(self.sb.agent(), op)
                            .await
                            .map(|answer| (answer, busy))
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Op::Stop(reply) => {
                let r = match self.state {
                    SandboxState::Running | SandboxState::Paused => self.stop().await,
                    state => Err(CoreError::WrongState {
                        id: self.id().clone(),
                        state,
                        wanted: SandboxState::Running,
                    }),
                };
                let stopped = r.is_ok();
                let _ = reply.send(r);
                if stopped {
                    return Flow::Exit;
                }
            }
            Op::Detach(reply) => {
                self.sb.detach();
                let _ = reply.send(Ok(()));
                return Flow::Exit;
            }
            Op::Remove(reason, reply) => {
                self.remove(&reason).await;
                let _ = reply.send(Ok(()));
                return Flow::Exit;
            }
        }
        Flow::Continue
    }

    async fn rotate_secrets(&self, secrets: &Secrets) -> Result<(), CoreError> {
        let mut merged = self.sb.extras().secrets.clone();
        merged
            .0
            .extend(secrets.0.iter().map(|(k, v)| (k.clone(), v.clone())));
        merged.validate().map_err(CoreError::BadRequest)?;
        guest::deliver_secrets(self.sb.agent(), secrets).await?;
        let hook = {
            let mut extras = self.sb.extras();
            extras.secrets = merged;
            extras.hook.clone()
        };
        if let Some(hook) = hook {
            guest::run_hook(self.sb.agent(), &hook).await?;
        }
        info!(sandbox_id = %self.id(), count = secrets.0.len(), "secrets rotated");
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), CoreError> {
        self.sb.vm().pause().await?;
        self.transition(SandboxState::Paused, None);
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), CoreError> {
        self.sb.vm().resume().await?;
        // Time spent paused does not count as idle.
        self.sb.activity.touch();
        self.transition(SandboxState::Running, None);
        Ok(())
    }

    /// Saves the sandbox and stops its VM. If the save fails, the sandbox goes on as it was.
    async fn stop(&mut self) -> Result<(), CoreError> {
        let Some(engine) = self.engine.upgrade() else {
            return Err(CoreError::HostSetup("the daemon is stopping".into()));
        };
        let before = self.state;
        self.transition(SandboxState::Stopping, None);
        if let Err(e) = engine.save_for_stop(&self.sb).await {
            // The save resumed the guest on every path.
            self.transition(SandboxState::Running, None);
            if before == SandboxState::Paused && self.sb.vm().pause().await.is_ok() {
                self.transition(SandboxState::Paused, None);
            }
            return Err(e);
        }
        engine.forget(self.id(), &self.sb);
        self.sb.shutdown().await;
        engine.archive_console(self.id());
        crate::remove_dir(&engine.home.sandbox_dir(self.id()));
        engine.prune_saves(self.id());
        self.transition(SandboxState::Stopped, None);
        info!(sandbox_id = %self.id(), "sandbox stopped and saved");
        Ok(())
    }

    fn transition(&mut self, to: SandboxState, reason: Option<String>) {
        debug_assert!(self.state.can_become(to), "{} -> {to}", self.state);
        self.state = to;
        if let Some(engine) = self.engine.upgrade() {
            engine.record_state(self.id(), to, reason);
        }
    }

    /// Stops the VM and removes everything of the sandbox.
    async fn remove(&mut self, reason: &str) {
        let Some(engine) = self.engine.upgrade() else {
            self.sb.shutdown().await;
            return;
        };
        engine.forget(self.id(), &self.sb);
        self.sb.shutdown().await;
        engine.remove_records(self.id(), reason);
    }

    /// Records the VM's death and releases what is left of it.
    async fn fail(&mut self, reason: String) {
        warn!(sandbox_id = %self.id(), %reason, "sandbox failed");
        if let Some(engine) = self.engine.upgrade() {
            engine.forget(self.id(), &self.sb);
            self.transition(SandboxState::Failed, Some(reason.clone()));
            self.sb.shutdown().await;
            engine.archive_console(self.id());
            crate::remove_dir(&engine.home.sandbox_dir(self.id()));
        } else {
            self.sb.shutdown().await;
        }
        // Only now are waiting execs woken: a client that sees the error and lists
        // sandboxes sees `failed`.
        self.sb.mark_failed(reason);
    }
}
