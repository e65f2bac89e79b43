//! One sandbox: its VM, its agent channel, and the task that watches them.
//!
//! ```text
//!   boot(): overlay disk ─▶ spawn QEMU ─▶ agent handshake ─▶ Running
//!                  │              │               │
//!                  └──────────────┴── any error ──┴─▶ teardown, error returned (nothing left)
//!
//!   supervisor task (one per sandbox):
//!     QEMU exits or agent channel dies ─▶ Failed (reason + console tail recorded)
//!     teardown requested               ─▶ QEMU shut down, runtime dir removed
//! ```
//!
//! Invariants: a [`Sandbox`] exists only once its VM answered the handshake; teardown is
//! idempotent; the failure reason is recorded once (first cause wins) and every exec waiting on
//! the sandbox sees it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln_agent_host::{AgentClient, AgentError, ClientConfig, ExecEvent, ExecSession};
use kiln_api_types::{ExecRequest, ExitStatus, SandboxId};
use kiln_vmm::{Accel, Vm};
use tokio::sync::watch;

use crate::error::CoreError;
use crate::machine::MachinePlan;

/// How long a cold boot may take until the agent answers, under TCG.
const BOOT_DEADLINE_TCG: Duration = Duration::from_secs(120);
/// How long a cold boot may take until the agent answers, under KVM.
const BOOT_DEADLINE_KVM: Duration = Duration::from_secs(30);
/// Output bytes a command may have in flight to the host before the consumer catches up:
/// bounds the daemon's memory per exec (1 MiB) while keeping the virtio-serial link busy.
pub(crate) const OUTPUT_WINDOW: u32 = 1 << 20;
/// How much of the serial console's end is searched for an error message.
const CONSOLE_SCAN_BYTES: usize = 64 * 1024;
/// How many console lines an error message quotes.
const CONSOLE_TAIL_LINES: usize = 12;
/// After the agent channel dies, how long to wait for QEMU's exit to explain it.
const DEATH_EXPLAIN_WAIT: Duration = Duration::from_millis(500);
/// How long after a command's own timeout the host waits for the guest to report its end:
/// the agent enforces the timeout, the host makes sure a guest that cannot still answers.
const EXEC_TIMEOUT_GRACE: Duration = Duration::from_secs(5);

/// Connects to `vm`'s agent socket and runs the resync handshake (waiting up to `deadline`
/// for the agent), with the sandbox channel's windows.
pub(crate) async fn connect_agent(
    vm: &Vm,
    deadline: Duration,
) -> Result<(AgentClient, kiln_agent_host::AgentInfo), CoreError> {
    let stream = tokio::net::UnixStream::connect(vm.agent_socket())
        .await
        .map_err(|source| CoreError::Io {
            what: "connect to the agent socket",
            path: vm.agent_socket().to_owned(),
            source,
        })?;
    let config = ClientConfig {
        handshake_deadline: deadline,
        output_window: OUTPUT_WINDOW,
        file_window: OUTPUT_WINDOW,
        ..Default::default()
    };
    AgentClient::connect_with(stream, config)
        .await
        .map_err(CoreError::Agent)
}

/// How long a cold boot may take until the agent answers.
pub(crate) fn boot_deadline(accel: Accel) -> Duration {
    match accel {
        Accel::Kvm => BOOT_DEADLINE_KVM,
        Accel::Tcg => BOOT_DEADLINE_TCG,
    }
}

/// What a sandbox keeps besides its VM: held in the daemon's memory only.
#[derive(Default)]
pub struct SandboxExtras {
    /// Its secrets, for re-delivery after a user snapshot and as exec environment.
    pub secrets: kiln_api_types::Secrets,
    /// Pass the secrets to every exec as environment variables.
    pub secret_env: bool,
    /// The image's on-restore hook, rerun when secrets are rotated.
    pub hook: Option<kiln_image::GuestCommand>,
    /// The image's environment, working directory and user for commands that name none.
    pub defaults: ExecDefaults,
    /// A desktop's review recording.
    pub(crate) recording: Option<std::sync::Arc<crate::desktop::record::Recording>>,
    /// Where kiln last put a desktop's pointer (screen pixels).
    pub(crate) pointer: Option<(u32, u32)>,
}

/// What an image's recipe sets for every command run in its sandboxes (`env`, `workdir`,
/// `user`); a request's own values win.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecDefaults {
    /// Environment variables added where the request does not set them.
    pub env: std::collections::BTreeMap<String, String>,
    /// Working directory of commands that name none.
    pub workdir: Option<String>,
    /// User of commands that name none.
    pub user: Option<String>,
    /// A desktop image's session (its user and X display): where the desktop actions' guest
    /// commands run. Not applied to other commands.
    pub desktop: Option<kiln_image::DesktopSpec>,
}

impl ExecDefaults {
    /// The defaults `recipe` sets.
    pub fn of(recipe: &kiln_image::Recipe) -> ExecDefaults {
        ExecDefaults {
            env: recipe.env.clone(),
            workdir: recipe.workdir.clone(),
            user: recipe.user.clone(),
            desktop: recipe.desktop.clone(),
        }
    }

    /// The environment and working directory the image's guest commands run with.
    pub(crate) fn image_env(&self) -> crate::guest::ImageEnv {
        crate::guest::ImageEnv {
            env: self.env.clone(),
            workdir: self.workdir.clone(),
        }
    }

    /// Fills in what `req` leaves open.
    pub fn apply(&self, req: &mut kiln_agent_host::ExecRequest) -> Result<(), CoreError> {
        for (k, v) in &self.env {
            req.env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        if req.cwd.is_none() {
            req.cwd = self.workdir.clone();
        }
        if req.user.is_none()
            && let Some(user) = &self.user
        {
            req.user =
                Some(kiln_agent_host::ExecUser::new(user.clone()).map_err(|e| {
                    CoreError::ExecRejected(format!("the image's user {user:?}: {e}"))
                })?);
        }
        Ok(())
    }
}

/// A running sandbox.
pub struct Sandbox {
    id: SandboxId,
    vm: Vm,
    agent: AgentClient,
    /// `Some(reason)` once the sandbox has failed.
    failed: watch::Receiver<Option<String>>,
    fail_tx: watch::Sender<Option<String>>,
    /// QEMU start → agent ready.
    pub boot: Duration,
    /// Secrets, hook and options.
    extras: std::sync::Mutex<SandboxExtras>,
    /// When it was last used, and how many sessions use it now (idle timeout).
    pub(crate) activity: Activity,
    /// Accept loops of published ports; aborted at shutdown.
    forwards: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Its network while it runs (`None` for network `none`); dropped at shutdown, which
    /// ends its relay and passt.
    net: std::sync::Mutex<Option<crate::network::Live>>,
}

impl Sandbox {
    /// Boots a sandbox and waits for its agent. On error everything started is torn down.
    pub async fn boot(
        plan: &MachinePlan<'_>,
        id: &SandboxId,
        run_dir: &Path,
    ) -> Result<Arc<Sandbox>, CoreError> {
        let disk = run_dir.join("disk.qcow2");
        kiln_vmm::create_overlay(&plan.image.rootfs_path(plan.home), &disk).await?;
        // Private RAM: guest memory (and any secret in it) never reaches the file.
        let config = plan.vm_config(run_dir, disk, run_dir.join("mem"), false);
        let started = Instant::now();
        let vm = Vm::spawn(&config).await?;
        let deadline = boot_deadline(plan.accel);
        let result = tokio::select! {
            r = connect_agent(&vm, deadline) => r,
            status = vm.wait_exit() => Err(CoreError::SandboxFailed {
                id: id.clone(),
                reason: format!("QEMU exited during boot ({status}){}", console_suffix(&vm)),
            }),
        };
        let agent = match result {
            Ok((agent, _info)) => agent,
            Err(e) => {
                let e = match e {
                    CoreError::Agent(inner) => CoreError::SandboxFailed {
                        id: id.clone(),
                        reason: format!(
                            "the guest agent did not answer: {}{}",
                            crate::error::error_chain(&inner),
                            console_suffix(&vm)
                        ),
                    },
                    other => other,
                };
                vm.kill().await;
                return Err(e);
            }
        };
        Ok(Sandbox::assemble(id.clone(), vm, agent, started.elapsed()))
    }

    /// A sandbox around a VM whose agent has answered (cold boot or restore).
    pub(crate) fn assemble(
        id: SandboxId,
        vm: Vm,
        agent: AgentClient,
        boot: Duration,
    ) -> Arc<Sandbox> {
        let (fail_tx, failed) = watch::channel(None);
        Arc::new(Sandbox {
            id,
            vm,
            agent,
            failed,
            fail_tx,
            boot,
            extras: std::sync::Mutex::new(SandboxExtras::default()),
            activity: Activity::new(),
            forwards: std::sync::Mutex::new(Vec::new()),
            net: std::sync::Mutex::new(None),
        })
    }

    /// Keeps its network's running parts.
    pub(crate) fn set_network(&self, live: crate::network::Live) {
        *self.net.lock().unwrap_or_else(|e| e.into_inner()) = Some(live);
    }

    /// Runs `f` on its network, if it has one.
    pub(crate) fn with_network<T>(&self, f: impl FnOnce(&crate::network::Live) -> T) -> Option<T> {
        self.net
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(f)
    }

    /// Ends its network's relay and passt (if any).
    fn drop_network(&self) {
        self.net.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Secrets, hook and options (a short-held lock; never across an `.await`).
    pub(crate) fn extras(&self) -> std::sync::MutexGuard<'_, SandboxExtras> {
        self.extras.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent channel.
    pub(crate) fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The VM.
    pub(crate) fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Keeps a published port's accept loop, to abort it at shutdown.
    pub(crate) fn add_forward(&self, task: tokio::task::JoinHandle<()>) {
        self.forwards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }

    /// The sandbox id.
    pub fn id(&self) -> &SandboxId {
        &self.id
    }

    /// Resolves with the failure reason once QEMU exits or the agent channel dies.
    /// The engine's supervisor records it and then calls [`Sandbox::mark_failed`].
    pub async fn watch_failure(&self) -> String {
        let reason = tokio::select! {
            status = self.vm.wait_exit() => format!("QEMU exited ({status})"),
            _ = self.agent.closed() => match self.agent.close_reason() {
                // The guest broke the protocol: say what it did.
                Some(why) if why.is_violation() => {
                    format!("the guest agent channel closed: {}", crate::error::error_chain(&why))
                }
                // The channel usually dies because QEMU did: give its exit a moment to explain.
                _ => match tokio::time::timeout(DEATH_EXPLAIN_WAIT, self.vm.wait_exit()).await {
                    Ok(status) => format!("QEMU exited ({status})"),
                    Err(_) => "the guest agent channel closed".to_owned(),
                },
            }
        };
        format!("{reason}{}", console_suffix(&self.vm))
    }

    /// Tells every exec waiting on this sandbox that it failed. Called after the failure is
    /// recorded, so a client that sees the error and then lists sandboxes sees `failed`.
    pub fn mark_failed(&self, reason: String) {
        self.fail_tx.send_replace(Some(reason));
    }

    /// The failure reason, if the sandbox has failed.
    pub fn failure(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    /// One agent round trip.
    pub async fn ping(&self) -> Result<Duration, CoreError> {
        self.agent.ping().await.map_err(CoreError::Agent)
    }

    /// Starts a command.
    pub async fn exec(self: &Arc<Self>, req: &ExecRequest) -> Result<Exec, CoreError> {
        if let Some(reason) = self.failure() {
            return Err(CoreError::SandboxFailed {
                id: self.id.clone(),
                reason,
            });
        }
        let mut agent_req = to_agent_exec(req)?;
        {
            let extras = self.extras();
            extras.defaults.apply(&mut agent_req)?;
            if extras.secret_env {
                for (k, v) in &extras.secrets.0 {
                    agent_req.env.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
        let session = self.agent.exec(agent_req).await.map_err(|e| match e {
            // The guest refused this command (bad working directory, ...): the caller's fault.
            AgentError::Remote { message, .. } => CoreError::ExecRejected(message),
            // An image whose agent predates a feature the request needs (a tty).
            e @ AgentError::MissingFeature { .. } => CoreError::ExecRejected(e.to_string()),
            other => CoreError::Agent(other),
        })?;
        Ok(Exec {
            sandbox: Arc::clone(self),
            session,
            failed: self.failed.clone(),
            _busy: self.activity.busy(),
            events: None,
            deadline: req.timeout_ms.map(|ms| {
                tokio::time::Instant::now() + Duration::from_millis(ms) + EXEC_TIMEOUT_GRACE
            }),
        })
    }

    /// Stops QEMU (graceful `quit`, then SIGKILL). Idempotent.
    pub async fn shutdown(&self) {
        for task in self
            .forwards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        self.drop_network();
        self.vm.shutdown(Duration::from_millis(500)).await;
    }

    /// Lets go of the sandbox without stopping it (daemon shutdown that keeps sandboxes):
    /// published ports close with this daemon, QEMU keeps running for the next one.
    pub fn detach(&self) {
        for task in self
            .forwards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        // The relay ends with this daemon; the guest keeps its interface, and the next
        // daemon starts a relay again (frames meanwhile go nowhere: fail closed).
        self.drop_network();
        self.vm.release();
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }
}

/// When a sandbox was last used and how many sessions (execs, tunnels, file transfers) use
/// it now: a sandbox is idle when none does and the last use is older than its timeout.
#[derive(Clone)]
pub(crate) struct Activity(Arc<ActivityInner>);

struct ActivityInner {
    epoch: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl ActivityInner {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

impl Activity {
    fn new() -> Activity {
        Activity(Arc::new(ActivityInner {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }))
    }

    /// Records a use now.
    pub(crate) fn touch(&self) {
        self.0.touch();
    }

    /// A session in progress: the sandbox is busy until the guard drops (a use is recorded
    /// at both ends).
    pub(crate) fn busy(&self) -> BusyGuard {
        self.0.touch();
        self.0.busy.fetch_add(1, Ordering::Relaxed);
        BusyGuard(Arc::clone(&self.0))
    }

    /// How long it has been idle: zero while a session is in progress.
    pub(crate) fn idle_for(&self) -> Duration {
        if self.0.busy.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.0.last_ms.load(Ordering::Relaxed));
        self.0.epoch.elapsed().saturating_sub(last)
    }
}

/// See [`Activity::busy`].
pub(crate) struct BusyGuard(Arc<ActivityInner>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

fn console_suffix(vm: &Vm) -> String {
    summarize_console(&vm.console_tail(CONSOLE_SCAN_BYTES))
}

/// The part of a console log worth putting in an error: the kernel's panic line (if any,
/// because a panic's backtrace pushes it far up) and the last few lines.
fn summarize_console(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    if let Some(panic) = lines.iter().find(|l| l.contains("Kernel panic")) {
        out.push_str(&format!("; guest kernel panic: {}", panic.trim()));
    }
    out.push_str("; last console output:");
    for l in &lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..] {
        out.push('\n');
        out.push_str(l);
    }
    out
}

/// The agent's exit status as the API reports it.
pub(crate) fn api_status(s: &kiln_agent_host::ExitStatus) -> ExitStatus {
    ExitStatus {
        code: s.code,
        signal: s.signal,
        timed_out: s.timed_out,
        output_truncated: s.output_truncated,
    }
}

fn to_agent_exec(req: &ExecRequest) -> Result<kiln_agent_host::ExecRequest, CoreError> {
    let tty = req
        .tty
        .as_ref()
        .map(|t| {
            let size = kiln_agent_host::TtySize::new(t.rows.into(), t.cols.into())
                .map_err(|e| CoreError::BadRequest(e.to_string()))?;
            let term = t
                .term
                .clone()
                .map(kiln_agent_host::TermName::new)
                .transpose()
                .map_err(|e| CoreError::BadRequest(e.to_string()))?;
            Ok::<_, CoreError>(kiln_agent_host::TtyRequest { size, term })
        })
        .transpose()?;
    let user = req
        .user
        .clone()
        .map(kiln_agent_host::ExecUser::new)
        .transpose()
        .map_err(|e| CoreError::BadRequest(e.to_string()))?;
    Ok(kiln_agent_host::ExecRequest {
        argv: req.argv.clone(),
        env: req.env.clone(),
        cwd: req.cwd.clone(),
        stdin: req.stdin,
        timeout_ms: req.timeout_ms,
        max_output_bytes: req.max_output_bytes,
        tty,
        user,
    })
}

/// Writes a command's stdin; see [`Exec::stdin`].
pub type StdinHandle = kiln_agent_host::StdinSender;

/// An event of a running command, as the engine reports it.
#[derive(Debug)]
pub enum ExecOutput {
    /// Bytes the command wrote to stdout.
    Stdout(bytes::Bytes),
    /// Bytes the command wrote to stderr.
    Stderr(bytes::Bytes),
    /// The command ended.
    Exit(ExitStatus),
}

/// A running command in a sandbox.
pub struct Exec {
    sandbox: Arc<Sandbox>,
    session: ExecSession,
    failed: watch::Receiver<Option<String>>,
    /// A running command keeps its sandbox from going idle.
    _busy: BusyGuard,
    /// Where its end is reported as an `exec_ended` event.
    events: Option<tokio::sync::broadcast::Sender<kiln_api_types::Event>>,
    /// For a command with a timeout: when the host gives up waiting for its end.
    deadline: Option<tokio::time::Instant>,
}

impl Exec {
    /// Reports the command's end to `events`.
    pub(crate) fn report_to(
        &mut self,
        events: tokio::sync::broadcast::Sender<kiln_api_types::Event>,
    ) {
        self.events = Some(events);
    }

    /// The next output or the exit. An error means the sandbox died under the command; its
    /// message carries the reason and the console tail.
    pub async fn next(&mut self) -> Result<ExecOutput, CoreError> {
        let overdue = async {
            match self.deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            ev = self.session.next_event() => ev,
            _ = self.failed.wait_for(|f| f.is_some()) => None,
            _ = overdue => {
                return Err(CoreError::Unresponsive {
                    id: self.sandbox.id.clone(),
                    reason: format!(
                        "the command's timeout passed {} s ago and the guest has not reported its end",
                        EXEC_TIMEOUT_GRACE.as_secs()
                    ),
                });
            }
        };
        match event {
            Some(ExecEvent::Stdout(b)) => Ok(ExecOutput::Stdout(b)),
            Some(ExecEvent::Stderr(b)) => Ok(ExecOutput::Stderr(b)),
            Some(ExecEvent::Exit(s)) => {
                let status = api_status(&s);
                if let Some(events) = self.events.take() {
                    let _ = events.send(crate::event(
                        &self.sandbox.id,
                        kiln_api_types::EventKind::ExecEnded { status },
                    ));
                }
                Ok(ExecOutput::Exit(status))
            }
            None => {
                let reason = match self.sandbox.failure() {
                    Some(r) => r,
                    None => match tokio::time::timeout(
                        DEATH_EXPLAIN_WAIT * 2,
                        self.failed.wait_for(|f| f.is_some()),
                    )
                    .await
                    {
                        Ok(Ok(r)) => r.clone().unwrap_or_default(),
                        _ => "the guest agent ended the command without an exit status".to_owned(),
                    },
                };
                Err(CoreError::SandboxFailed {
                    id: self.sandbox.id.clone(),
                    reason,
                })
            }
        }
    }

    /// A handle that writes the command's stdin (waiting for the guest's flow-control credit)
    /// independently of [`Exec::next`], so stdin never stalls output.
    pub fn stdin(&self) -> StdinHandle {
        self.session.stdin()
    }

    /// Delivers a signal to the command's process group.
    pub async fn signal(&self, signo: i32) -> Result<(), CoreError> {
        self.session.signal(signo).await.map_err(CoreError::Agent)
    }

    /// Changes the size of the command's terminal (an exec started with `tty`). Refused
    /// with [`CoreError::BadRequest`] for a size out of range or a command without a tty.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), CoreError> {
        kiln_api_types::validate_tty_size(rows, cols).map_err(CoreError::BadRequest)?;
        self.session.resize(rows, cols).await.map_err(|e| match e {
            AgentError::Remote { message, .. } => CoreError::BadRequest(message),
            other => CoreError::Agent(other),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarize_console_puts_panic_line_first() {
        let mut log = String::from(
            "[ 1.0] sysrq: Trigger a crash\n[ 1.1] Kernel panic - not syncing: sysrq triggered crash\n",
        );
        for i in 0..40 {
            log.push_str(&format!("[ 2.{i}] frame {i}\n"));
        }
        let s = summarize_console(&log);
        assert!(
            s.starts_with(
                "; guest kernel panic: [ 1.1] Kernel panic - not syncing: sysrq triggered crash"
            ),
            "{s}"
        );
        assert!(s.ends_with("frame 39"), "{s}");
        assert!(!s.contains("frame 27\n"), "{s}");
        assert_eq!(s.lines().count(), 1 + CONSOLE_TAIL_LINES);
    }

    #[test]
    fn to_agent_exec_carries_user_and_refuses_a_malformed_one() {
        let mut req = ExecRequest::new(vec!["id".into()]);
        assert_eq!(to_agent_exec(&req).expect("valid").user, None);
        req.user = Some("nobody:65534".into());
        let agent = to_agent_exec(&req).expect("valid");
        assert_eq!(
            agent.user.as_ref().map(|u| u.as_str()),
            Some("nobody:65534")
        );
        req.user = Some("a:b:c".into());
        assert!(matches!(
            to_agent_exec(&req),
            Err(CoreError::BadRequest(m)) if m.contains("invalid user")
        ));
    }

    #[test]
    fn summarize_console_empty_log_adds_nothing() {
        assert_eq!(summarize_console("\n\n"), "");
    }
}
