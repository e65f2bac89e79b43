//! One exec: validation, spawning, output and stdin pumps, timeout, output cap, exit report.
//!
//! Owns: [`start`], which turns an [`ExecRequest`] into an [`ExecHandle`] (kept by the
//! session) plus a task future (run by the session's `JoinSet`).
//!
//! ```text
//!                 ┌─ pump stdout ─┐  read ≤ min(credit, 64 KiB) ─▶ STDOUT frame
//!  spawn ─▶ task ─┼─ pump stderr ─┤  (shared credit and output budget)
//!                 ├─ pump stdin ──┘  STDIN frames ─▶ pipe, WINDOW back as consumed
//!                 └─ supervisor: exit status (reaper) │ timeout │ cap hit ─▶ SIGKILL group
//!  Exit is sent once the status is known AND both output pumps are done.
//!
//!  tty exec (pty-v1): one pty instead of three pipes
//!  spawn ─▶ task ─┬─ pump master ──  read ≤ min(credit, 64 KiB) ─▶ STDOUT frame
//!                 ├─ pump stdin ───  STDIN frames ─▶ master (0x03 becomes SIGINT in the
//!                 │                  line discipline), WINDOW back as consumed
//!                 └─ supervisor (as above); exec_resize ─▶ TIOCSWINSZ on the master
//! ```
//!
//! Invariants:
//! - The child leads its own session/process group (pgid = pid); every kill targets the group.
//! - An output pump never reads more than the host's credit, so no output is buffered here
//!   beyond one read.
//! - Output is read straight into the frame that carries it ([`DataFrameBuf`]): one buffer per
//!   frame and no second copy. Every byte the agent touches costs the guest CPU under TCG, and
//!   every buffer is zeroed again when freed (the zero-on-free allocator, which stays: output
//!   can carry secrets). Dropping the second buffer's copy and zeroing raised stdout / guest
//!   pipe by 0.08–0.11 (`kiln bench boot`, docs/benchmarks.md).
//! - `Exit` is queued after the last output frame of the exec (same queue, same task).
//! - After the leader exits, a pump keeps reading while data keeps coming; it gives up on a
//!   pipe that stays silent for `drain_linger` (a background process still holds it).
//! - If the task is dropped (session reset) before completing, the process group is killed.
//! - An exec with a `user` (feature `user-v1`) is resolved against the guest's account files
//!   before anything is spawned (an unknown name is answered `bad_user`); the child enters
//!   its working directory and session as root, then calls setgroups, setgid and setuid
//!   just before exec. `HOME` (and `USER`/`LOGNAME` for a known name) follow the user
//!   unless the request's `env` sets them; a tty exec's pty slave is given to the user.
//! - A tty exec's child leads a new session whose controlling terminal is the pty slave (its
//!   fds 0, 1 and 2); the agent keeps no slave descriptor once the child is spawned, so the
//!   master reads EOF/EIO when the last process holding the slave is gone. Its stdin close
//!   only stops forwarding (closing the master would hang the terminal up).

use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use kiln_agent_proto::{
    DEFAULT_TERM, DataChannel, DataFrameBuf, ErrorBody, ErrorCode, ExecRequest, ExecUser,
    ExitStatus, FlowError, Frame, GuestMessage, MAX_DATA_PAYLOAD, MAX_WINDOW, RestoreId, StreamId,
    TtySize,
};
use tokio::io::AsyncWriteExt;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use crate::console::warn;
use crate::identity::RESTORE_ID_ENV;
use crate::outbound::Outbound;
use crate::reaper::Reaper;
use crate::session::AgentConfig;
use crate::streams::{InboundRx, InboundTx, OutputCredit, inbound};
use crate::sys::{self, ChildExit};
use crate::user::{self, ResolvedUser};

/// Kernel buffer of a command's stdout and stderr pipes (the default is 64 KiB): measured
/// under TCG, a 1 MiB pipe moves about 25% more bytes per second.
const OUTPUT_PIPE_BYTES: i32 = 1 << 20;

/// The environment every exec starts from, before the request's variables are overlaid.
pub const BASE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
];

type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The session's view of a running exec.
pub(crate) struct ExecHandle {
    /// Process group to signal; `None` if nothing was spawned (exit 126/127 reported).
    pub(crate) pgid: Option<i32>,
    /// Output credit, fed by the host's WINDOW frames.
    pub(crate) credit: Arc<OutputCredit>,
    stdin: Option<InboundTx<Bytes>>,
    /// The pty master of a tty exec (for resizes).
    pty: Option<Arc<AsyncFd<File>>>,
}

impl ExecHandle {
    /// Hands STDIN bytes to the exec's stdin pump. The queue is unbounded by count but bounded
    /// in bytes by the stdin window: a host that overruns it gets an error and the bytes are
    /// dropped.
    pub(crate) fn feed_stdin(&mut self, data: Bytes) -> Result<(), FlowError> {
        let Some(feed) = &self.stdin else {
            return Ok(());
        };
        // The pump may be gone (exec finishing); the bytes are then moot.
        feed.send_data(data.len(), data)
    }

    /// Closes stdin once the bytes already received have been written.
    pub(crate) fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Gives a tty exec's terminal a new size (the kernel sends `SIGWINCH`). A `bad_request`
    /// error for an exec without a terminal.
    pub(crate) fn resize(&self, stream: StreamId, size: TtySize) -> Result<(), ErrorBody> {
        let Some(master) = &self.pty else {
            return Err(bad_request(format!("exec on stream {stream} has no tty")));
        };
        sys::set_winsize(master.get_ref().as_raw_fd(), size.rows(), size.cols()).map_err(|e| {
            ErrorBody {
                code: ErrorCode::Internal,
                message: format!(
                    "failed to resize the tty of stream {stream}: {}",
                    os_message(&e)
                ),
            }
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A started exec.
pub(crate) struct Started {
    pub(crate) handle: ExecHandle,
    pub(crate) pid: Option<u32>,
    /// Initial stdin credit to grant the host, if stdin is a pipe.
    pub(crate) stdin_window: Option<u32>,
    pub(crate) task: Task,
}

fn bad_request(message: impl Into<String>) -> ErrorBody {
    ErrorBody {
        code: ErrorCode::BadRequest,
        message: message.into(),
    }
}

fn validate(req: &ExecRequest, output_window: u32) -> Result<(), ErrorBody> {
    let Some(program) = req.argv.first() else {
        return Err(bad_request("argv is empty"));
    };
    if program.is_empty() {
        return Err(bad_request("argv[0] is empty"));
    }
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(bad_request("argv contains a nul byte"));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(bad_request(format!("invalid environment variable {k:?}")));
        }
    }
    if req.cwd.as_deref().is_some_and(|c| c.contains('\0')) {
        return Err(bad_request("cwd contains a nul byte"));
    }
    if output_window == 0 || u64::from(output_window) > MAX_WINDOW {
        return Err(bad_request(format!(
            "output window {output_window} is not in 1..={MAX_WINDOW}"
        )));
    }
    Ok(())
}

/// The working directory of a request that names none: the configured one (root's home),
/// or `/` where the image has no such directory (imported images need not have a `/root`;
/// `/` is what Docker uses).
fn default_cwd(config: &AgentConfig) -> PathBuf {
    if config.default_cwd.is_dir() {
        config.default_cwd.clone()
    } else {
        PathBuf::from("/")
    }
}

fn check_cwd(cwd: &PathBuf) -> Result<(), ErrorBody> {
    let bad = |message: String| ErrorBody {
        code: ErrorCode::BadCwd,
        message,
    };
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(bad(format!("{} is not a directory", cwd.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(bad(format!(
            "working directory {} does not exist",
            cwd.display()
        ))),
        Err(e) => Err(bad(format!(
            "cannot use working directory {}: {}",
            cwd.display(),
            os_message(&e)
        ))),
    }
}

/// Resolves the exec's user. An agent that is not root can only run commands as itself.
fn resolve_user(spec: &ExecUser, etc: &Path) -> Result<ResolvedUser, ErrorBody> {
    let bad = |message: String| ErrorBody {
        code: ErrorCode::BadUser,
        message,
    };
    let user = user::resolve(spec, etc).map_err(|e| bad(e.to_string()))?;
    let (euid, egid) = sys::effective_ids();
    if euid != 0 && (user.uid != euid || user.gid != egid) {
        return Err(bad(format!(
            "cannot run as {spec} (uid {}, gid {}): the agent runs as uid {euid}, not root",
            user.uid, user.gid
        )));
    }
    Ok(user)
}

/// `strerror`-like text without std's " (os error N)" suffix, lowercased like a shell's.
pub(crate) fn os_message(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    text.to_lowercase()
}

/// Validates and starts an exec. Errors are answered to the host as the request's error.
pub(crate) fn start(
    reaper: &Reaper,
    config: &AgentConfig,
    stream: StreamId,
    output_window: u32,
    req: ExecRequest,
    restore_id: Option<&RestoreId>,
    out: Outbound,
) -> Result<Started, ErrorBody> {
    validate(&req, output_window)?;
    let cwd = req
        .cwd
        .as_ref()
        .map_or_else(|| default_cwd(config), PathBuf::from);
    check_cwd(&cwd)?;
    let user = req
        .user
        .as_ref()
        .map(|spec| resolve_user(spec, &config.etc_dir))
        .transpose()?;

    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..]).env_clear();
    for (k, v) in BASE_ENV {
        cmd.env(k, v);
    }
    if let Some(user) = &user {
        // Like login(1); the request's `env` (applied last) wins.
        cmd.env("HOME", &user.home);
        if let Some(name) = &user.name {
            cmd.env("USER", name).env("LOGNAME", name);
        }
    }
    if let Some(id) = restore_id {
        cmd.env(RESTORE_ID_ENV, id.as_str());
    }
    let pty = match &req.tty {
        Some(tty) => {
            cmd.env(
                "TERM",
                tty.term.as_ref().map_or(DEFAULT_TERM, |t| t.as_str()),
            );
            let spawn_failed = |what: &str, e: io::Error| ErrorBody {
                code: ErrorCode::SpawnFailed,
                message: format!("failed to {what}: {}", os_message(&e)),
            };
            let pty = sys::open_pty(tty.size.rows(), tty.size.cols())
                .map_err(|e| spawn_failed("open a pty", e))?;
            if let Some(user) = &user {
                // The terminal belongs to whoever runs on it, as after login(1).
                sys::fchown(&pty.slave, user.uid, user.gid)
                    .map_err(|e| spawn_failed("give the pty to the user", e))?;
            }
            let slave = |fd: &OwnedFd| {
                fd.try_clone()
                    .map(Stdio::from)
                    .map_err(|e| spawn_failed("duplicate the pty slave", e))
            };
            cmd.stdin(slave(&pty.slave)?)
                .stdout(slave(&pty.slave)?)
                .stderr(Stdio::from(pty.slave));
            sys::set_new_session_with_ctty(&mut cmd);
            let master = sys::async_file(pty.master)
                .map_err(|e| spawn_failed("register the pty master", e))?;
            Some(Arc::new(master))
        }
        None => {
            cmd.stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            sys::set_new_session(&mut cmd);
            None
        }
    };
    cmd.envs(&req.env).current_dir(&cwd);
    // An agent that is not root got here only for its own ids (see `resolve_user`): nothing
    // to switch, and setgroups would fail.
    if let Some(user) = user
        && sys::effective_ids().0 == 0
    {
        // After the session setup registered above: setsid and TIOCSCTTY run as root.
        sys::set_user(&mut cmd, user.uid, user.gid, user.groups);
    }

    let credit = Arc::new(OutputCredit::new(output_window));
    let spawned = reaper.spawn(&mut cmd);
    // The command holds the parent's copies of the pty slave: close them now, so the master
    // sees the end of the terminal when the child side is gone.
    drop(cmd);
    let (mut child, exit_rx) = match spawned {
        Ok(spawned) => spawned,
        Err(e) => return not_executed(&req.argv[0], &e, stream, credit, out),
    };
    let pid = child.id();
    // Cannot fail: the reaper already checked that the pid fits.
    let pgid = i32::try_from(pid).unwrap_or(i32::MAX);
    let guard = GroupGuard { pgid, armed: true };

    let pipes = (|| -> io::Result<_> {
        if let Some(master) = &pty {
            return Ok(ProcIo::Pty(Arc::clone(master)));
        }
        let stdout = child.stdout.take().map(OwnedFd::from);
        let stderr = child.stderr.take().map(OwnedFd::from);
        let stdin = child.stdin.take().map(OwnedFd::from);
        let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
            return Err(io::Error::other("child pipes missing"));
        };
        for fd in [&stdout, &stderr] {
            // Best effort: the default 64 KiB pipe still works, only slower.
            let _ = sys::set_pipe_size(fd.as_raw_fd(), OUTPUT_PIPE_BYTES);
        }
        Ok(ProcIo::Pipes {
            stdout: pipe::Receiver::from_owned_fd(stdout)?,
            stderr: pipe::Receiver::from_owned_fd(stderr)?,
            stdin: stdin.map(pipe::Sender::from_owned_fd).transpose()?,
        })
    })();
    let io = match pipes {
        Ok(p) => p,
        Err(e) => {
            // `guard` kills the process group as it drops; the reaper collects the leader.
            return Err(ErrorBody {
                code: ErrorCode::SpawnFailed,
                message: format!("failed to set up pipes: {}", os_message(&e)),
            });
        }
    };

    let (stdin, stdin_rx, stdin_window) = if req.stdin {
        let (tx, rx) = inbound(config.stdin_window);
        (Some(tx), Some(rx), Some(config.stdin_window.max(1)))
    } else {
        (None, None, None)
    };

    let proc = Process {
        stream,
        out,
        credit: Arc::clone(&credit),
        guard,
        exit_rx,
        io,
        stdin_rx,
        timeout: req.timeout_ms.map(Duration::from_millis),
        budget: req.max_output_bytes,
        linger: config.drain_linger,
    };
    Ok(Started {
        handle: ExecHandle {
            pgid: Some(pgid),
            credit,
            stdin,
            pty,
        },
        pid: Some(pid),
        stdin_window,
        task: Box::pin(proc.run()),
    })
}

/// Maps a spawn failure to a shell-like exit (127 not found, 126 cannot execute) reported on
/// the exec's stderr, or to an error answer when the failure is the agent's own.
fn not_executed(
    program: &str,
    err: &io::Error,
    stream: StreamId,
    credit: Arc<OutputCredit>,
    out: Outbound,
) -> Result<Started, ErrorBody> {
    let (code, what) = match err.raw_os_error() {
        Some(libc::ENOENT) => (127, "command not found".to_owned()),
        Some(libc::EACCES | libc::EPERM) => (126, "permission denied".to_owned()),
        Some(
            libc::ENOEXEC
            | libc::EISDIR
            | libc::ENOTDIR
            | libc::ELOOP
            | libc::ETXTBSY
            | libc::ENAMETOOLONG,
        ) => (126, os_message(err)),
        _ => {
            return Err(ErrorBody {
                code: ErrorCode::SpawnFailed,
                message: format!("failed to start {program}: {}", os_message(err)),
            });
        }
    };
    let message = Bytes::from(format!("kiln-agent: {program}: {what}\n"));
    let task_credit = Arc::clone(&credit);
    let task = async move {
        let mut rest = message;
        while !rest.is_empty() {
            let n = task_credit.acquire(rest.len().min(MAX_DATA_PAYLOAD)).await;
            let data = rest.split_to(n);
            let frame = Frame::Data {
                stream,
                channel: DataChannel::Stderr,
                data,
            };
            if !out.send(&frame).await {
                return;
            }
        }
        let status = ExitStatus {
            code: Some(code),
            ..ExitStatus::default()
        };
        out.message(&GuestMessage::Exit { stream, status }).await;
    };
    Ok(Started {
        handle: ExecHandle {
            pgid: None,
            credit,
            stdin: None,
            pty: None,
        },
        pid: None,
        stdin_window: None,
        task: Box::pin(task),
    })
}

/// Kills the process group when dropped while armed.
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl GroupGuard {
    fn kill(&self) {
        // ESRCH (group already gone) is fine.
        let _ = sys::kill_group(self.pgid, libc::SIGKILL);
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.kill();
        }
    }
}

/// The byte budget of `max_output_bytes`, shared by stdout and stderr.
struct OutputBudget {
    remaining: Mutex<Option<u64>>,
    truncated: AtomicBool,
    cap_hit: Notify,
}

impl OutputBudget {
    fn new(limit: Option<u64>) -> OutputBudget {
        OutputBudget {
            remaining: Mutex::new(limit),
            truncated: AtomicBool::new(false),
            cap_hit: Notify::new(),
        }
    }

    /// How many of `n` bytes may still be forwarded; trips the cap if fewer than `n`.
    fn take(&self, n: usize) -> usize {
        let mut remaining = lock(&self.remaining);
        let Some(left) = remaining.as_mut() else {
            return n;
        };
        let allowed = (*left).min(n as u64);
        *left -= allowed;
        if allowed < n as u64 {
            self.truncated.store(true, Ordering::SeqCst);
            self.cap_hit.notify_one();
        }
        // Cannot truncate: allowed <= n.
        allowed as usize
    }

    fn truncated(&self) -> bool {
        self.truncated.load(Ordering::SeqCst)
    }
}

struct Process {
    stream: StreamId,
    out: Outbound,
    credit: Arc<OutputCredit>,
    guard: GroupGuard,
    exit_rx: oneshot::Receiver<ChildExit>,
    io: ProcIo,
    stdin_rx: Option<InboundRx<Bytes>>,
    timeout: Option<Duration>,
    budget: Option<u64>,
    linger: Duration,
}

/// Where a command's bytes go and come from.
enum ProcIo {
    /// stdout and stderr pipes, and a stdin pipe if stdin was asked for.
    Pipes {
        stdout: pipe::Receiver,
        stderr: pipe::Receiver,
        stdin: Option<pipe::Sender>,
    },
    /// A tty exec's pty master: all output, and stdin if it was asked for.
    Pty(Arc<AsyncFd<File>>),
}

/// Where the stdin pump writes.
enum StdinSink<'a> {
    Pipe(pipe::Sender),
    Pty(&'a AsyncFd<File>),
}

impl StdinSink<'_> {
    async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        match self {
            StdinSink::Pipe(p) => p.write_all(data).await,
            StdinSink::Pty(master) => {
                while !data.is_empty() {
                    let mut guard = master.writable().await?;
                    match guard.try_io(|fd| fd.get_ref().write(data)) {
                        Ok(Ok(n)) => data = &data[n..],
                        Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_would_block) => {}
                    }
                }
                Ok(())
            }
        }
    }
}

/// What one output pump needs.
struct PumpCtx<'a> {
    stream: StreamId,
    out: &'a Outbound,
    credit: &'a OutputCredit,
    budget: &'a OutputBudget,
    linger: Duration,
}

impl Process {
    async fn run(self) {
        let Process {
            stream,
            out,
            credit,
            mut guard,
            mut exit_rx,
            io,
            stdin_rx,
            timeout,
            budget,
            linger,
        } = self;
        let budget = OutputBudget::new(budget);
        let (exited_tx, exited_rx) = watch::channel(false);
        let ctx = PumpCtx {
            stream,
            out: &out,
            credit: &credit,
            budget: &budget,
            linger,
        };
        let (pipes, pipe_stdin, pty) = match io {
            ProcIo::Pipes {
                stdout,
                stderr,
                stdin,
            } => (Some((stdout, stderr)), stdin, None),
            ProcIo::Pty(master) => (None, None, Some(master)),
        };
        let stdin_sink = match (&pty, pipe_stdin) {
            (Some(master), _) => Some(StdinSink::Pty(master)),
            (None, pipe) => pipe.map(StdinSink::Pipe),
        };
        let pumps = async {
            if let Some((stdout, stderr)) = &pipes {
                tokio::join!(
                    pump_output(stdout, DataChannel::Stdout, &ctx, exited_rx.clone()),
                    pump_output(stderr, DataChannel::Stderr, &ctx, exited_rx.clone()),
                );
            } else if let Some(master) = &pty {
                pump_pty(master, &ctx, exited_rx.clone()).await;
            }
        };
        tokio::pin!(pumps);
        let stdin = pump_stdin(stdin_sink, stdin_rx, &out, stream);
        tokio::pin!(stdin);
        // A timeout too large to represent is no timeout (and must not panic PID 1).
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let sleep = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now));
        tokio::pin!(sleep);

        let mut status: Option<Option<ChildExit>> = None;
        let mut pumps_done = false;
        let mut stdin_done = false;
        let mut timed_out = false;
        let mut cap_killed = false;
        while status.is_none() || !pumps_done {
            tokio::select! {
                r = &mut exit_rx, if status.is_none() => {
                    status = Some(r.ok());
                    let _ = exited_tx.send(true);
                }
                () = &mut pumps, if !pumps_done => pumps_done = true,
                () = &mut sleep, if deadline.is_some() && !timed_out => {
                    timed_out = true;
                    guard.kill();
                }
                () = budget.cap_hit.notified(), if !cap_killed => {
                    cap_killed = true;
                    guard.kill();
                }
                () = &mut stdin, if !stdin_done => stdin_done = true,
            }
        }
        // Whatever is left in the group (daemons started in the background) may live on.
        guard.armed = false;
        let (code, signal) = match status.flatten() {
            Some(ChildExit::Exited(c)) => (Some(c), None),
            Some(ChildExit::Signaled(s)) => (None, Some(s)),
            None => (None, None),
        };
        let status = ExitStatus {
            code,
            signal,
            timed_out,
            output_truncated: budget.truncated(),
        };
        out.message(&GuestMessage::Exit { stream, status }).await;
    }
}

/// Waits until `pipe` has data or EOF. Once the leader has exited, gives up (`false`) if the
/// pipe stays silent for `linger`.
async fn readable_or_linger(
    pipe: &pipe::Receiver,
    exited: &mut watch::Receiver<bool>,
    linger: Duration,
) -> bool {
    loop {
        if *exited.borrow() {
            return matches!(
                tokio::time::timeout(linger, pipe.readable()).await,
                Ok(Ok(()))
            );
        }
        tokio::select! {
            r = pipe.readable() => return r.is_ok(),
            changed = exited.changed() => {
                if changed.is_err() {
                    // The supervisor is gone; behave as if the leader had exited.
                    return matches!(tokio::time::timeout(linger, pipe.readable()).await, Ok(Ok(())));
                }
            }
        }
    }
}

/// Forwards one output pipe. Credit is taken only once the pipe is readable, so a silent pipe
/// (usually stderr) never sits on credit its sibling needs.
async fn pump_output(
    pipe: &pipe::Receiver,
    channel: DataChannel,
    ctx: &PumpCtx<'_>,
    mut exited: watch::Receiver<bool>,
) {
    loop {
        if !readable_or_linger(pipe, &mut exited, ctx.linger).await {
            // Abandoned after the leader exited, or the pipe broke.
            return;
        }
        let discarding = ctx.budget.truncated();
        let want = if discarding {
            MAX_DATA_PAYLOAD
        } else {
            ctx.credit.acquire(MAX_DATA_PAYLOAD).await
        };
        let refund = |n: usize| {
            if !discarding {
                ctx.credit.give_back(n);
            }
        };
        // The payload is read in place behind the frame header: one buffer per frame, no
        // copy into a second one (each buffer costs a zeroing when it is freed, see zalloc).
        let mut frame = DataFrameBuf::with_capacity(want);
        let n = match pipe.try_read_buf(&mut frame.payload_mut()) {
            Ok(n) if n > 0 => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                refund(want);
                continue;
            }
            // EOF or a read error.
            _ => {
                refund(want);
                return;
            }
        };
        if discarding {
            continue;
        }
        let allowed = ctx.budget.take(n);
        refund(want - allowed);
        if allowed > 0 && !send_data(ctx, frame, allowed, channel).await {
            return;
        }
    }
}

/// Queues the first `len` payload bytes of `frame` on `channel`; `false` if the writer is
/// gone.
async fn send_data(
    ctx: &PumpCtx<'_>,
    mut frame: DataFrameBuf,
    len: usize,
    channel: DataChannel,
) -> bool {
    frame.truncate_payload(len);
    match frame.finish(ctx.stream, channel) {
        Ok(bytes) => ctx.out.send_encoded(bytes).await,
        // Cannot happen: callers pass 1 ..= the bytes read.
        Err(e) => {
            warn(format_args!("dropping an output frame: {e}"));
            true
        }
    }
}

/// Waits until the pty master has something to read (or its end); like
/// [`readable_or_linger`] once the leader has exited.
async fn pty_readable_or_linger<'a>(
    master: &'a AsyncFd<File>,
    exited: &mut watch::Receiver<bool>,
    linger: Duration,
) -> Option<tokio::io::unix::AsyncFdReadyGuard<'a, File>> {
    loop {
        if *exited.borrow() {
            return tokio::time::timeout(linger, master.readable())
                .await
                .ok()
                .and_then(Result::ok);
        }
        tokio::select! {
            r = master.readable() => return r.ok(),
            changed = exited.changed() => {
                if changed.is_err() {
                    return tokio::time::timeout(linger, master.readable())
                        .await
                        .ok()
                        .and_then(Result::ok);
                }
            }
        }
    }
}

/// Forwards a tty exec's output (everything the pty shows) as STDOUT frames, within the
/// host's credit and the output budget. A read of `EIO` is the pty's end: every process
/// holding the slave is gone.
async fn pump_pty(master: &AsyncFd<File>, ctx: &PumpCtx<'_>, mut exited: watch::Receiver<bool>) {
    loop {
        let Some(mut guard) = pty_readable_or_linger(master, &mut exited, ctx.linger).await else {
            return;
        };
        let discarding = ctx.budget.truncated();
        let want = if discarding {
            MAX_DATA_PAYLOAD
        } else {
            ctx.credit.acquire(MAX_DATA_PAYLOAD).await
        };
        let refund = |n: usize| {
            if !discarding {
                ctx.credit.give_back(n);
            }
        };
        let mut frame = DataFrameBuf::with_capacity(want);
        let room = frame.zeroed_payload(want);
        let n = match guard.try_io(|fd| fd.get_ref().read(room)) {
            Ok(Ok(n)) if n > 0 => n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {
                refund(want);
                continue;
            }
            Err(_would_block) => {
                refund(want);
                continue;
            }
            // EOF, or EIO once the slave side is closed.
            Ok(_) => {
                refund(want);
                return;
            }
        };
        if discarding {
            continue;
        }
        let allowed = ctx.budget.take(n);
        refund(want - allowed);
        if allowed > 0 && !send_data(ctx, frame, allowed, DataChannel::Stdout).await {
            return;
        }
    }
}

async fn pump_stdin(
    mut pipe: Option<StdinSink<'_>>,
    feed: Option<InboundRx<Bytes>>,
    out: &Outbound,
    stream: StreamId,
) {
    let Some(mut rx) = feed else {
        return;
    };
    while let Some(data) = rx.recv().await {
        if let Some(p) = pipe.as_mut()
            && let Err(e) = p.write_all(&data).await
        {
            // EPIPE: the process closed its stdin; EIO: a pty whose last reader is gone.
            if e.kind() != io::ErrorKind::BrokenPipe && e.raw_os_error() != Some(libc::EIO) {
                warn(format_args!("stream {stream}: stdin write failed: {e}"));
            }
            // The process closed its stdin: keep granting credit so the host never stalls.
            pipe = None;
        }
        let grant = rx.consumed(data.len());
        if let Some(increment) = grant
            && !out.send(&Frame::Window { stream, increment }).await
        {
            return;
        }
    }
    // The host closed stdin (or the session ended): dropping `pipe` gives the process EOF.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cwd_missing_home_falls_back_to_root_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = AgentConfig {
            default_cwd: dir.path().to_owned(),
            ..AgentConfig::default()
        };
        assert_eq!(default_cwd(&config), dir.path());
        config.default_cwd = dir.path().join("no-such-home");
        assert_eq!(default_cwd(&config), Path::new("/"));
    }

    #[test]
    fn validate_rejects_bad_requests() {
        assert!(validate(&ExecRequest::new(Vec::<String>::new()), 1).is_err());
        assert!(validate(&ExecRequest::new([""]), 1).is_err());
        assert!(validate(&ExecRequest::new(["a\0b"]), 1).is_err());
        assert!(validate(&ExecRequest::new(["ls"]), 0).is_err());
        let mut env = ExecRequest::new(["ls"]);
        env.env.insert("A=B".into(), "c".into());
        assert!(validate(&env, 1).is_err());
        assert!(validate(&ExecRequest::new(["ls"]), 1).is_ok());
    }

    #[test]
    fn output_budget_trips_exactly_past_the_cap() {
        let b = OutputBudget::new(Some(10));
        assert_eq!(b.take(6), 6);
        assert!(!b.truncated());
        assert_eq!(b.take(4), 4);
        assert!(!b.truncated());
        assert_eq!(b.take(1), 0);
        assert!(b.truncated());
        assert_eq!(OutputBudget::new(None).take(1 << 20), 1 << 20);
    }

    #[test]
    fn os_message_strips_errno_suffix() {
        let e = io::Error::from_raw_os_error(libc::ENOEXEC);
        assert_eq!(os_message(&e), "exec format error");
    }
}
