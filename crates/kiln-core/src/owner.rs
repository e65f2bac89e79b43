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
//! Health: while running, the owner pings the agent every [`HEARTBEAT_INTERVAL`]; a ping (or
//! an op's round trip) that gets no answer within its deadline makes the sandbox
//! `unresponsive` — ops that need the guest are refused at once with `sandbox_unresponsive`
//! instead of waiting — and it is `running` again as soon as a ping is answered, or `failed`
//! (QEMU killed) after the grace period ([`unresponsive_grace`]). QEMU stopping the guest
//! because the host file system under its disk is full (a `BLOCK_IO_ERROR` event) makes it
//! `paused` with the reason; the owner resumes it by itself once [`space::RESUME_FREE`] bytes
//! are free again (or on `kiln resume`).
//!
//! ```text
//!   Running ──no answer──▶ Unresponsive ──answer──▶ Running
//!                               └──grace passed──▶ Failed
//!   Running ──BLOCK_IO_ERROR (ENOSPC)──▶ Paused (no space) ──space back / resume──▶ Running
//! ```
//!
//! Invariants: every transition is recorded in the store before its event is published; an
//! op that needs a running guest is refused with the current state (never queued behind a
//! pause); every wait of the owner on the guest or QEMU has a deadline, so the queue keeps
//! moving whatever the guest does; the task ends only after the sandbox is removed or
//! recorded failed, and then its queue's senders see the channel closed.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use kiln_api_types::{
    EventKind, ExecRequest, SandboxId, SandboxState, Secrets, SnapshotInfo, SnapshotName,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::error::CoreError;
use crate::sandbox::{Exec, Sandbox};
use crate::{Engine, guest, space, unix_now};

/// How many operations may wait in one sandbox's queue.
const QUEUE_DEPTH: usize = 64;
/// How often a running sandbox's agent is pinged (an unresponsive one: every second).
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// How long the agent may take to answer a ping, or to start a command, open a file
/// transfer or take new secrets, before the sandbox counts as unresponsive. Generous: a
/// guest under TCG on a loaded host answers in milliseconds, but not always.
pub(crate) const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// How long QEMU may take to pause or resume the vCPUs.
const QMP_DEADLINE: Duration = Duration::from_secs(10);
/// How long a user snapshot or a `kiln stop` save may take.
const SAVE_DEADLINE: Duration = Duration::from_secs(600);
/// Default of [`unresponsive_grace`].
const UNRESPONSIVE_GRACE: Duration = Duration::from_secs(60);
/// How often a sandbox paused for lack of space looks for free space.
const SPACE_POLL: Duration = Duration::from_secs(2);

/// How long a sandbox may stay unresponsive before it is failed: `KILN_UNRESPONSIVE_GRACE_SECS`
/// in the daemon's environment, else 60 s.
fn unresponsive_grace() -> Duration {
    std::env::var("KILN_UNRESPONSIVE_GRACE_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(UNRESPONSIVE_GRACE, Duration::from_secs)
}

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
    /// Change its network policy (`allow` ↔ `nat`).
    Network(kiln_api_types::NetworkSpec, Reply<()>),
    /// Read a desktop's screen or send it input, through QEMU (the guest is not asked).
    Screen(ScreenOp, Reply<()>),
}

/// What [`Op::Screen`] does: one QMP round trip.
#[derive(Debug)]
pub(crate) enum ScreenOp {
    /// Write the current frame to this host file (binary PPM).
    Dump(std::path::PathBuf),
    /// Send these `InputEvent`s, in order.
    Input(Vec<serde_json::Value>),
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
    /// Why kiln (not a user) put it in its state, if it did.
    cause: Option<Cause>,
    /// End of the lifetime, seconds since the Unix epoch.
    expires_unix: Option<u64>,
    idle_timeout: Option<Duration>,
    /// When the agent is pinged next.
    next_beat: Instant,
    grace: Duration,
}

/// Why the owner, not a user, changed the sandbox's state.
#[derive(Debug, Clone)]
enum Cause {
    /// The agent stopped answering at `since`.
    Unresponsive { since: Instant, reason: String },
    /// QEMU stopped the guest: the host file system under its disk is full.
    NoSpace,
    /// QEMU stopped the guest after another I/O error on its disk.
    DiskError(String),
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
        cause: None,
        expires_unix,
        idle_timeout: idle_timeout_secs.map(Duration::from_secs),
        next_beat: Instant::now() + HEARTBEAT_INTERVAL,
        grace: unresponsive_grace(),
    };
    tokio::spawn(owner.run(rx));
    Handle { tx }
}

impl Owner {
    fn id(&self) -> &SandboxId {
        self.sb.id()
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut qmp_events = Some(self.sb.vm().qmp().events());
        if self.state == SandboxState::Paused {
            // A sandbox re-attached paused may have been stopped by QEMU for lack of space.
            self.check_io_status().await;
        }
        loop {
            let (wait, why) = self.next_deadline();
            let beating = matches!(
                self.state,
                SandboxState::Running | SandboxState::Unresponsive
            );
            let awaiting_space =
                self.state == SandboxState::Paused && matches!(self.cause, Some(Cause::NoSpace));
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
                _ = tokio::time::sleep_until(self.next_beat), if beating => {
                    if let Flow::Exit = self.heartbeat().await {
                        return;
                    }
                }
                ev = recv_event(&mut qmp_events) => self.qmp_event(ev, &mut qmp_events).await,
                _ = tokio::time::sleep(SPACE_POLL), if awaiting_space => {
                    self.resume_if_space().await;
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
            Err(self.refusal(wanted))
        }
    }

    /// Why an op that needs state `wanted` is refused now.
    fn refusal(&self, wanted: SandboxState) -> CoreError {
        match &self.cause {
            Some(Cause::Unresponsive { since, reason }) => CoreError::Unresponsive {
                id: self.id().clone(),
                reason: format!("{reason} ({} s ago)", since.elapsed().as_secs()),
            },
            Some(Cause::NoSpace) if wanted == SandboxState::Running => self.no_space_error(),
            _ => CoreError::WrongState {
                id: self.id().clone(),
                state: self.state,
                wanted,
            },
        }
    }

    /// The error of an op on a sandbox QEMU paused for lack of space.
    fn no_space_error(&self) -> CoreError {
        let dir = self.sb.vm().config().run_dir.clone();
        CoreError::NoSpace {
            what: format!(
                "for sandbox {}: QEMU paused it when its disk could not grow (it resumes by itself once space is freed, or with `kiln resume`)",
                self.id()
            ),
            available: space::available(&dir).unwrap_or(0),
            needed: Some(space::RESUME_FREE),
            path: dir,
        }
    }

    /// Runs `fut`, an op's round trip to the agent; past `deadline` the sandbox is marked
    /// unresponsive and the op fails with that.
    async fn answer<T>(
        &mut self,
        what: &str,
        deadline: Duration,
        fut: impl Future<Output = Result<T, CoreError>>,
    ) -> Result<T, CoreError> {
        match tokio::time::timeout(deadline, fut).await {
            Ok(r) => r,
            Err(_) => {
                let reason = format!(
                    "the guest agent did not answer {what} within {} s",
                    deadline.as_secs()
                );
                self.unresponsive(reason.clone());
                Err(CoreError::Unresponsive {
                    id: self.id().clone(),
                    reason,
                })
            }
        }
    }

    /// Marks the sandbox unresponsive (once: the first reason and time are kept).
    fn unresponsive(&mut self, reason: String) {
        if self.state != SandboxState::Running {
            return;
        }
        warn!(sandbox_id = %self.id(), %reason, "sandbox unresponsive");
        self.cause = Some(Cause::Unresponsive {
            since: Instant::now(),
            reason: reason.clone(),
        });
        self.transition(SandboxState::Unresponsive, Some(reason));
        self.next_beat = Instant::now() + Duration::from_secs(1);
    }

    /// One ping: an answer makes an unresponsive sandbox running again; none within
    /// [`ANSWER_DEADLINE`] makes a running one unresponsive, and one unresponsive for longer
    /// than the grace period failed.
    async fn heartbeat(&mut self) -> Flow {
        let answered = match tokio::time::timeout(ANSWER_DEADLINE, self.sb.agent().ping()).await {
            Ok(Ok(_)) => true,
            // The channel failed: that is the VM's death or a protocol violation, which
            // `watch_failure` reports; it is not silence.
            Ok(Err(_)) => {
                self.next_beat = Instant::now() + HEARTBEAT_INTERVAL;
                return Flow::Continue;
            }
            Err(_) => false,
        };
        if answered {
            if let Some(Cause::Unresponsive { since, .. }) = self.cause.take() {
                info!(sandbox_id = %self.id(), after_s = since.elapsed().as_secs(), "sandbox answers again");
                self.transition(
                    SandboxState::Running,
                    Some(format!(
                        "the guest agent answers again after {} s",
                        since.elapsed().as_secs()
                    )),
                );
            }
            self.next_beat = Instant::now() + HEARTBEAT_INTERVAL;
            return Flow::Continue;
        }
        if self.state == SandboxState::Running {
            self.unresponsive(format!(
                "the guest agent did not answer a ping within {} s",
                ANSWER_DEADLINE.as_secs()
            ));
        }
        if let Some(Cause::Unresponsive { since, reason }) = &self.cause
            && since.elapsed() >= self.grace
        {
            let reason = format!(
                "unresponsive for {} s, the grace period ({reason})",
                since.elapsed().as_secs()
            );
            self.fail(reason).await;
            return Flow::Exit;
        }
        self.next_beat = Instant::now() + Duration::from_secs(1);
        Flow::Continue
    }

    /// Handles one QEMU event: a disk write that failed and made QEMU stop the guest.
    async fn qmp_event(
        &mut self,
        ev: Option<kiln_vmm::qmp::QmpEvent>,
        events: &mut Option<broadcast::Receiver<kiln_vmm::qmp::QmpEvent>>,
    ) {
        let Some(ev) = ev else {
            // QMP is gone: the VM's death is reported by `watch_failure`.
            *events = None;
            return;
        };
        if ev.event != "BLOCK_IO_ERROR" {
            return;
        }
        let stopped = ev.data.get("action").and_then(|a| a.as_str()) == Some("stop");
        if !stopped {
            return;
        }
        let nospace = ev
            .data
            .get("nospace")
            .and_then(|n| n.as_bool())
            .unwrap_or(false);
        let detail = ev
            .data
            .get("reason")
            .and_then(|r| r.as_str())
            .unwrap_or("I/O error")
            .to_owned();
        self.paused_by_qemu(if nospace {
            Cause::NoSpace
        } else {
            Cause::DiskError(detail)
        });
    }

    /// Records that QEMU stopped the guest (idempotent: QEMU repeats the event).
    fn paused_by_qemu(&mut self, cause: Cause) {
        if !matches!(
            self.state,
            SandboxState::Running | SandboxState::Unresponsive
        ) {
            return;
        }
        let dir = self.sb.vm().config().run_dir.clone();
        let reason = match &cause {
            Cause::NoSpace => format!(
                "paused by QEMU: no space left for its disk ({}); it resumes once space is freed",
                space::describe(&dir, space::available(&dir).unwrap_or(0), None)
            ),
            Cause::DiskError(e) => format!("paused by QEMU: its disk failed ({e})"),
            Cause::Unresponsive { .. } => return,
        };
        warn!(sandbox_id = %self.id(), %reason, "sandbox paused by QEMU");
        // Also from `unresponsive`: a guest whose disk stopped is explained by the disk.
        self.cause = Some(cause);
        self.transition(SandboxState::Paused, Some(reason));
    }

    /// A re-attached paused sandbox: was it QEMU that paused it, for lack of space?
    async fn check_io_status(&mut self) {
        let status = tokio::time::timeout(QMP_DEADLINE, self.sb.vm().run_state()).await;
        if let Ok(Ok(kiln_vmm::qmp::commands::RunState::IoError)) = status {
            self.cause = Some(Cause::NoSpace);
        }
    }

    /// Resumes a sandbox QEMU paused for lack of space, once there is room again.
    async fn resume_if_space(&mut self) {
        let dir = &self.sb.vm().config().run_dir;
        if space::available(dir).is_some_and(|free| free >= space::RESUME_FREE) {
            info!(sandbox_id = %self.id(), "space is back: resuming the sandbox");
            if let Some(engine) = self.engine.upgrade() {
                engine.store.replenish_reserve();
            }
            if let Err(e) = self.resume().await {
                warn!(sandbox_id = %self.id(), error = %e.chain(), "could not resume after space came back");
            }
        }
    }

    async fn handle(&mut self, op: Op) -> Flow {
        match op {
            Op::Exec(req, reply) => {
                let r = match self.need(SandboxState::Running) {
                    Ok(()) => {
                        let sb = Arc::clone(&self.sb);
                        self.answer("a command's start", ANSWER_DEADLINE, sb.exec(&req))
                            .await
                    }
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
            Op::Network(spec, reply) => {
                let r = self.set_network(&spec).await;
                let _ = reply.send(r);
            }
            Op::Ping(reply) => {
                let r = match self.need(SandboxState::Running) {
                    Ok(()) => {
                        let sb = Arc::clone(&self.sb);
                        self.answer("a ping", ANSWER_DEADLINE, sb.ping()).await
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Op::Snapshot(name, reply) => {
                let r = match (self.need(SandboxState::Running), self.engine.upgrade()) {
                    (Err(e), _) => Err(e),
                    (Ok(()), None) => Err(CoreError::HostSetup("the daemon is stopping".into())),
                    (Ok(()), Some(engine)) => {
                        let sb = Arc::clone(&self.sb);
                        self.answer(
                            "while a snapshot was saved",
                            SAVE_DEADLINE,
                            engine.snapshot_of(&sb, &name),
                        )
                        .await
                    }
                };
                let _ = reply.send(r);
            }
            Op::Secrets(secrets, reply) => {
                let r = match self.need(SandboxState::Running) {
                    Ok(()) => {
                        let sb = Arc::clone(&self.sb);
                        let hook_ms = sb.extras().hook.as_ref().map_or(0, |h| h.timeout_ms);
                        let deadline = ANSWER_DEADLINE
                            + guest::HOUSEKEEPING_TIMEOUT
                            + Duration::from_millis(hook_ms);
                        self.answer("new secrets", deadline, rotate_secrets(&sb, &secrets))
                            .await
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Op::Screen(op, reply) => {
                let r = match self.need(SandboxState::Running) {
                    Ok(()) => self.screen(op).await,
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
                        let sb = Arc::clone(&self.sb);
                        self.answer(
                            "a file operation",
                            ANSWER_DEADLINE,
                            crate::files::run(sb.agent(), op),
                        )
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
                    _ => Err(self.refusal(SandboxState::Running)),
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

    /// Applies a new network policy and records it in the spec. A paused sandbox's policy
    /// changes too (its relay runs; the guest sends nothing while paused).
    async fn set_network(&mut self, spec: &kiln_api_types::NetworkSpec) -> Result<(), CoreError> {
        if !matches!(self.state, SandboxState::Running | SandboxState::Paused) {
            return Err(self.refusal(SandboxState::Running));
        }
        let engine = self
            .engine
            .upgrade()
            .ok_or_else(|| CoreError::HostSetup("the daemon is stopping".into()))?;
        let current = self
            .sb
            .with_network(|live| live.spec())
            .unwrap_or(kiln_api_types::NetworkSpec::None);
        let relay = self
            .sb
            .with_network(|live| live.relay_for(spec))
            .unwrap_or_else(|| {
                Err(CoreError::BadRequest(format!(
                    "sandbox {} has no network (it was created with network none; the network \
                     is chosen at create: --network)",
                    self.id()
                )))
            })?;
        relay
            .set_policy(spec.clone())
            .await
            .map_err(|e| CoreError::BadRequest(format!("network policy: {e}")))?;
        self.sb.with_network(|live| live.set_spec(spec));
        engine.store.sandbox_set_network(self.id(), spec)?;
        info!(sandbox_id = %self.id(), from = %current, to = %spec, "network policy changed");
        Ok(())
    }

    async fn screen(&mut self, op: ScreenOp) -> Result<(), CoreError> {
        if self.sb.vm().config().display.is_none() {
            return Err(CoreError::NotADesktop(format!(
                "sandbox {} has no screen: its image is not a desktop",
                self.id()
            )));
        }
        let sb = Arc::clone(&self.sb);
        match op {
            ScreenOp::Dump(path) => {
                self.answer("QEMU taking a screenshot", QMP_DEADLINE, async {
                    sb.vm().screendump(&path).await.map_err(CoreError::from)
                })
                .await
            }
            ScreenOp::Input(events) => {
                // Input is use: it keeps an idle timeout from firing.
                self.sb.activity.touch();
                self.answer("QEMU sending input", QMP_DEADLINE, async {
                    sb.vm().send_input(events).await.map_err(CoreError::from)
                })
                .await
            }
        }
    }

    async fn pause(&mut self) -> Result<(), CoreError> {
        let sb = Arc::clone(&self.sb);
        self.answer("QEMU pausing", QMP_DEADLINE, async {
            sb.vm().pause().await.map_err(CoreError::from)
        })
        .await?;
        self.transition(SandboxState::Paused, None);
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), CoreError> {
        let sb = Arc::clone(&self.sb);
        self.answer("QEMU resuming", QMP_DEADLINE, async {
            sb.vm().resume().await.map_err(CoreError::from)
        })
        .await?;
        self.cause = None;
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
        let sb = Arc::clone(&self.sb);
        let saved = self
            .answer(
                "while it was saved",
                SAVE_DEADLINE,
                engine.save_for_stop(&sb),
            )
            .await;
        if let Err(e) = saved {
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
        // A stopped sandbox holds no address or tap: `kiln start` plans its network anew.
        crate::network::release(&engine, self.id());
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
        let recording = self.sb.extras().recording.take();
        if let Some(r) = recording {
            r.record(crate::desktop::review::TimelineEvent::Readiness {
                state: format!("removed: {reason}"),
            });
            let _ = r.recorder.flush();
        }
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
            crate::network::release(&engine, self.id());
        } else {
            self.sb.shutdown().await;
        }
        // Only now are waiting execs woken: a client that sees the error and lists
        // sandboxes sees `failed`.
        self.sb.mark_failed(reason);
    }
}

/// Delivers (new values of) secrets and reruns the on-restore hook.
async fn rotate_secrets(sb: &Sandbox, secrets: &Secrets) -> Result<(), CoreError> {
    let mut merged = sb.extras().secrets.clone();
    merged
        .0
        .extend(secrets.0.iter().map(|(k, v)| (k.clone(), v.clone())));
    merged.validate().map_err(CoreError::BadRequest)?;
    guest::deliver_secrets(sb.agent(), secrets).await?;
    let (hook, image) = {
        let mut extras = sb.extras();
        extras.secrets = merged;
        (extras.hook.clone(), extras.defaults.image_env())
    };
    if let Some(hook) = hook {
        guest::run_hook(sb.agent(), &hook, &image).await?;
    }
    info!(sandbox_id = %sb.id(), count = secrets.0.len(), "secrets rotated");
    Ok(())
}

/// The next QEMU event, or `None` once QMP is gone; pending forever without a receiver.
async fn recv_event(
    events: &mut Option<broadcast::Receiver<kiln_vmm::qmp::QmpEvent>>,
) -> Option<kiln_vmm::qmp::QmpEvent> {
    let Some(rx) = events else {
        return std::future::pending().await;
    };
    loop {
        match rx.recv().await {
            Ok(ev) => return Some(ev),
            // Missed events: the ones that matter repeat (QEMU re-reports a stuck disk).
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}
