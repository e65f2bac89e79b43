//! Detached commands (`kiln exec -d`; the `Engine::exec_*` methods live here): commands that run with no client attached, whose
//! output the daemon keeps (bounded) so that any number of clients can attach later, replay
//! what is kept and follow what comes.
//!
//! ```text
//!   Exec (engine) ──pump task──▶ Output { chunks: (seq, stream, bytes)..., exit | lost }
//!        ▲                                   │ notify
//!        └── signals (kill) ◀── DetachedExec │
//!                                            ▼
//!                  Attach cursor: replay from the oldest kept chunk, then follow; ends with
//!                  the exit status (or the reason it was lost)
//! ```
//!
//! Invariants: each stream keeps at most [`KEEP_PER_STREAM`] bytes (oldest chunks go first,
//! and an attaching client is told how many bytes it missed); a detached command keeps its
//! sandbox busy (no idle expiry) while it runs; nothing here blocks on a client: a slow or
//! absent reader never stalls the command, whose output is always drained.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use kiln_api_types::{
    ExecId, ExecInfo, ExecRequest, ExecState, ExitStatus, STREAM_STDERR, STREAM_STDOUT, SandboxId,
};
use tokio::sync::{Notify, mpsc};
use tracing::info;

use crate::error::CoreError;
use crate::sandbox::{Exec, ExecOutput};

/// Output bytes kept per stream of one detached command.
pub const KEEP_PER_STREAM: usize = 1 << 20;
/// Detached commands one sandbox may have (running, or ended and kept for their status).
pub const MAX_PER_SANDBOX: usize = 64;

/// One detached command.
pub struct DetachedExec {
    id: ExecId,
    sandbox: SandboxId,
    argv: Vec<String>,
    started_unix_ms: u64,
    output: Mutex<Output>,
    changed: Notify,
    signals: mpsc::Sender<i32>,
}

/// What the pump task has collected.
#[derive(Default)]
struct Output {
    chunks: VecDeque<Chunk>,
    /// Sequence number the next chunk gets.
    next_seq: u64,
    /// Bytes kept per stream (index 0 stdout, 1 stderr).
    kept: [usize; 2],
    /// Bytes written per stream in all.
    total: [u64; 2],
    /// Bytes no longer kept.
    dropped: u64,
    end: Option<End>,
}

struct Chunk {
    seq: u64,
    stream: u8,
    data: Bytes,
}

#[derive(Clone)]
enum End {
    Exit(ExitStatus),
    Lost(String),
}

/// What an attached client gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachItem {
    /// Output: [`STREAM_STDOUT`] or [`STREAM_STDERR`], and the bytes.
    Output(u8, Bytes),
    /// This many bytes were dropped before the client read them.
    Gap(u64),
    /// The command ended; nothing follows.
    Exit(ExitStatus),
    /// The sandbox died or was removed under the command; nothing follows.
    Lost(String),
}

fn lock(m: &Mutex<Output>) -> MutexGuard<'_, Output> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a detached command's output comes from: an [`Exec`], or a fake in tests.
pub(crate) trait Source: Send + 'static {
    /// The next output or the end.
    fn next(
        &mut self,
    ) -> impl std::future::Future<Output = Result<ExecOutput, crate::CoreError>> + Send;
    /// Delivers a signal.
    fn signal(
        &self,
        signo: i32,
    ) -> impl std::future::Future<Output = Result<(), crate::CoreError>> + Send;
}

impl Source for Exec {
    fn next(
        &mut self,
    ) -> impl std::future::Future<Output = Result<ExecOutput, crate::CoreError>> + Send {
        Exec::next(self)
    }

    fn signal(
        &self,
        signo: i32,
    ) -> impl std::future::Future<Output = Result<(), crate::CoreError>> + Send {
        Exec::signal(self, signo)
    }
}

impl DetachedExec {
    /// Takes over `exec` and drains it in a task of its own.
    pub(crate) fn start(
        sandbox: SandboxId,
        argv: Vec<String>,
        exec: impl Source,
    ) -> Arc<DetachedExec> {
        let (signals, signal_rx) = mpsc::channel(8);
        let this = Arc::new(DetachedExec {
            id: ExecId::random(),
            sandbox,
            argv,
            started_unix_ms: crate::unix_now_ms(),
            output: Mutex::new(Output::default()),
            changed: Notify::new(),
            signals,
        });
        tokio::spawn(pump(Arc::clone(&this), exec, signal_rx));
        this
    }

    /// Its id.
    pub fn id(&self) -> &ExecId {
        &self.id
    }

    /// The sandbox it runs in.
    pub fn sandbox(&self) -> &SandboxId {
        &self.sandbox
    }

    /// Whether it has ended (exited or lost).
    pub fn ended(&self) -> bool {
        lock(&self.output).end.is_some()
    }

    /// What the API says about it.
    pub fn info(&self) -> ExecInfo {
        let out = lock(&self.output);
        let (state, exit, error) = match &out.end {
            None => (ExecState::Running, None, None),
            Some(End::Exit(s)) => (ExecState::Exited, Some(*s), None),
            Some(End::Lost(r)) => (ExecState::Lost, None, Some(r.clone())),
        };
        ExecInfo {
            id: self.id.clone(),
            sandbox: self.sandbox.clone(),
            argv: self.argv.clone(),
            started_unix_ms: self.started_unix_ms,
            state,
            exit,
            error,
            stdout_bytes: out.total[0],
            stderr_bytes: out.total[1],
            dropped_bytes: out.dropped,
        }
    }

    /// Delivers `signo` to the command's process group; false once it has ended.
    pub async fn signal(&self, signo: i32) -> bool {
        !self.ended() && self.signals.send(signo).await.is_ok()
    }

    /// A cursor that replays what is kept and then follows.
    pub fn attach(self: &Arc<Self>) -> Attach {
        Attach {
            exec: Arc::clone(self),
            next_seq: 0,
            seen_dropped: 0,
            done: false,
        }
    }

    fn push(&self, stream: u8, data: Bytes) {
        let idx = usize::from(stream == STREAM_STDERR);
        let mut out = lock(&self.output);
        out.total[idx] += data.len() as u64;
        out.kept[idx] += data.len();
        let seq = out.next_seq;
        out.next_seq += 1;
        out.chunks.push_back(Chunk { seq, stream, data });
        // Oldest chunks of this stream go first until it is within its budget again.
        while out.kept[idx] > KEEP_PER_STREAM {
            let Some(pos) = out.chunks.iter().position(|c| c.stream == stream) else {
                break;
            };
            if let Some(c) = out.chunks.remove(pos) {
                out.kept[idx] -= c.data.len();
                out.dropped += c.data.len() as u64;
            }
        }
        drop(out);
        self.changed.notify_waiters();
    }

    fn finish(&self, end: End) {
        lock(&self.output).end.get_or_insert(end);
        self.changed.notify_waiters();
    }
}

async fn pump(this: Arc<DetachedExec>, mut exec: impl Source, mut signals: mpsc::Receiver<i32>) {
    loop {
        tokio::select! {
            ev = exec.next() => match ev {
                Ok(ExecOutput::Stdout(b)) => this.push(STREAM_STDOUT, b),
                Ok(ExecOutput::Stderr(b)) => this.push(STREAM_STDERR, b),
                Ok(ExecOutput::Exit(s)) => return this.finish(End::Exit(s)),
                Err(e) => return this.finish(End::Lost(e.chain())),
            },
            Some(signo) = signals.recv() => {
                if let Err(e) = exec.signal(signo).await {
                    tracing::debug!(exec_id = %this.id, error = %e.chain(), "signal not delivered");
                }
            }
        }
    }
}

/// A client's position in a detached command's output.
pub struct Attach {
    exec: Arc<DetachedExec>,
    next_seq: u64,
    /// `Output::dropped` when this client last looked.
    seen_dropped: u64,
    done: bool,
}

impl Attach {
    /// The next item, waiting for the command if nothing new is kept; `None` after the end.
    /// Output this client did not get because it was dropped first is reported as a
    /// [`AttachItem::Gap`] (the bytes dropped from the buffer meanwhile) before what follows.
    pub async fn next(&mut self) -> Option<AttachItem> {
        if self.done {
            return None;
        }
        loop {
            // Registered before looking, so a push between the look and the wait wakes us.
            let changed = self.exec.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let out = lock(&self.exec.output);
                if let Some(first) = out.chunks.iter().find(|c| c.seq >= self.next_seq) {
                    let skipped = first.seq > self.next_seq
                        || (self.next_seq == 0 && out.dropped > 0 && self.seen_dropped == 0);
                    let missed = out.dropped - self.seen_dropped;
                    self.seen_dropped = out.dropped;
                    if skipped && missed > 0 {
                        // The chunk is returned on the next call.
                        self.next_seq = first.seq;
                        return Some(AttachItem::Gap(missed));
                    }
                    self.next_seq = first.seq + 1;
                    return Some(AttachItem::Output(first.stream, first.data.clone()));
                }
                if let Some(end) = &out.end {
                    self.done = true;
                    return Some(match end {
                        End::Exit(s) => AttachItem::Exit(*s),
                        End::Lost(r) => AttachItem::Lost(r.clone()),
                    });
                }
            }
            changed.await;
        }
    }
}

impl crate::Engine {
    /// Starts a command that runs with no client attached; its output is kept (bounded)
    /// for `exec_attach`.
    pub async fn exec_detach(
        &self,
        id: &SandboxId,
        req: &ExecRequest,
    ) -> Result<kiln_api_types::ExecInfo, CoreError> {
        if req.stdin {
            return Err(CoreError::BadRequest(
                "a detached command has no stdin (stdin must be false)".to_owned(),
            ));
        }
        if req.tty.is_some() {
            return Err(CoreError::BadRequest(
                "a detached command has no terminal (tty must be absent)".to_owned(),
            ));
        }
        {
            let mut all = self.detached.lock().unwrap_or_else(|e| e.into_inner());
            let mut mine: Vec<_> = all
                .values()
                .filter(|d| d.sandbox() == id)
                .cloned()
                .collect();
            mine.sort_by_key(|d| d.info().started_unix_ms);
            // Ended commands make room first, oldest first.
            let mut excess = (mine.len() + 1).saturating_sub(MAX_PER_SANDBOX);
            for d in mine.iter().filter(|d| d.ended()) {
                if excess == 0 {
                    break;
                }
                all.remove(d.id());
                excess -= 1;
            }
            if excess > 0 {
                return Err(CoreError::BadRequest(format!(
                    "sandbox {id} already runs {} detached commands; kill some first",
                    MAX_PER_SANDBOX
                )));
            }
        }
        let exec = self.sandbox_exec(id, req).await?;
        let d = DetachedExec::start(id.clone(), req.argv.clone(), exec);
        let info = d.info();
        self.detached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(d.id().clone(), d);
        info!(sandbox_id = %id, exec_id = %info.id, "detached command started");
        Ok(info)
    }

    /// The detached commands of sandbox `id`, oldest first.
    pub fn exec_list(&self, id: &SandboxId) -> Result<Vec<kiln_api_types::ExecInfo>, CoreError> {
        self.sandbox_get(id)?;
        let mut out: Vec<_> = self
            .detached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|d| d.sandbox() == id)
            .map(|d| d.info())
            .collect();
        out.sort_by_key(|i| i.started_unix_ms);
        Ok(out)
    }

    /// One detached command.
    pub fn exec_get(&self, exec: &kiln_api_types::ExecId) -> Result<Arc<DetachedExec>, CoreError> {
        self.detached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec)
            .cloned()
            .ok_or_else(|| CoreError::ExecNotFound(exec.to_string()))
    }

    /// Delivers `signo` to a detached command's process group.
    pub async fn exec_kill(
        &self,
        exec: &kiln_api_types::ExecId,
        signo: i32,
    ) -> Result<kiln_api_types::ExecInfo, CoreError> {
        if !(1..=64).contains(&signo) {
            return Err(CoreError::BadRequest(format!(
                "signal must be between 1 and 64, got {signo}"
            )));
        }
        let d = self.exec_get(exec)?;
        if !d.signal(signo).await {
            return Err(CoreError::BadRequest(format!(
                "detached command {exec} has already ended"
            )));
        }
        Ok(d.info())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command whose output and end the test feeds.
    struct FakeSource {
        rx: mpsc::Receiver<Result<ExecOutput, crate::CoreError>>,
        signals: mpsc::Sender<i32>,
    }

    impl Source for FakeSource {
        async fn next(&mut self) -> Result<ExecOutput, crate::CoreError> {
            self.rx
                .recv()
                .await
                .unwrap_or_else(|| Err(crate::CoreError::GuestCommand("gone".into())))
        }

        async fn signal(&self, signo: i32) -> Result<(), crate::CoreError> {
            let _ = self.signals.send(signo).await;
            Ok(())
        }
    }

    fn fake() -> (
        Arc<DetachedExec>,
        mpsc::Sender<Result<ExecOutput, crate::CoreError>>,
        mpsc::Receiver<i32>,
    ) {
        let (tx, rx) = mpsc::channel(64);
        let (sig_tx, sig_rx) = mpsc::channel(8);
        let d = DetachedExec::start(
            SandboxId::random(),
            vec!["cmd".into()],
            FakeSource {
                rx,
                signals: sig_tx,
            },
        );
        (d, tx, sig_rx)
    }

    fn status(code: i32) -> ExitStatus {
        ExitStatus {
            code: Some(code),
            signal: None,
            timed_out: false,
            output_truncated: false,
        }
    }

    #[tokio::test]
    async fn attach_replays_then_follows_to_the_exit() {
        let (d, tx, _sig) = fake();
        tx.send(Ok(ExecOutput::Stdout(Bytes::from_static(b"one"))))
            .await
            .unwrap();
        tx.send(Ok(ExecOutput::Stderr(Bytes::from_static(b"err"))))
            .await
            .unwrap();
        let mut a = d.attach();
        assert_eq!(
            a.next().await,
            Some(AttachItem::Output(
                STREAM_STDOUT,
                Bytes::from_static(b"one")
            ))
        );
        assert_eq!(
            a.next().await,
            Some(AttachItem::Output(
                STREAM_STDERR,
                Bytes::from_static(b"err")
            ))
        );
        // A second client attached later gets the same replay.
        let mut b = d.attach();
        let follow = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(item) = b.next().await {
                got.push(item);
            }
            got
        });
        tx.send(Ok(ExecOutput::Stdout(Bytes::from_static(b"two"))))
            .await
            .unwrap();
        tx.send(Ok(ExecOutput::Exit(status(3)))).await.unwrap();
        assert_eq!(
            a.next().await,
            Some(AttachItem::Output(
                STREAM_STDOUT,
                Bytes::from_static(b"two")
            ))
        );
        assert_eq!(a.next().await, Some(AttachItem::Exit(status(3))));
        assert_eq!(a.next().await, None);
        let got = follow.await.unwrap();
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[3], AttachItem::Exit(status(3)));
        let info = d.info();
        assert_eq!(info.state, ExecState::Exited);
        assert_eq!((info.stdout_bytes, info.stderr_bytes), (6, 3));
        assert!(!d.signal(15).await, "an ended command takes no signal");
    }

    #[tokio::test]
    async fn output_beyond_the_budget_is_dropped_oldest_first_and_reported() {
        let (d, tx, _sig) = fake();
        let chunk = Bytes::from(vec![b'x'; 64 << 10]);
        let n = KEEP_PER_STREAM / chunk.len() + 4;
        for _ in 0..n {
            tx.send(Ok(ExecOutput::Stdout(chunk.clone())))
                .await
                .unwrap();
        }
        tx.send(Ok(ExecOutput::Exit(status(0)))).await.unwrap();
        // Attach only once the pump took everything (a reader keeping pace misses nothing).
        while !d.ended() {
            tokio::task::yield_now().await;
        }
        let mut a = d.attach();
        let mut items = Vec::new();
        while let Some(item) = a.next().await {
            items.push(item);
        }
        let info = d.info();
        assert_eq!(info.stdout_bytes, (n * chunk.len()) as u64);
        assert_eq!(info.dropped_bytes, (4 * chunk.len()) as u64);
        let kept: usize = items
            .iter()
            .map(|i| match i {
                AttachItem::Output(_, b) => b.len(),
                _ => 0,
            })
            .sum();
        assert!(kept <= KEEP_PER_STREAM, "kept {kept}");
        assert!(
            items
                .iter()
                .any(|i| matches!(i, AttachItem::Gap(g) if *g == info.dropped_bytes)),
            "no gap reported: {:?}",
            items.first()
        );
    }

    #[tokio::test]
    async fn signal_reaches_the_command_and_loss_is_reported() {
        let (d, tx, mut sig) = fake();
        assert!(d.signal(2).await);
        assert_eq!(sig.recv().await, Some(2));
        tx.send(Err(crate::CoreError::GuestCommand("sandbox died".into())))
            .await
            .unwrap();
        let mut a = d.attach();
        assert_eq!(
            a.next().await,
            Some(AttachItem::Lost("sandbox died".into()))
        );
        assert_eq!(d.info().state, ExecState::Lost);
    }
}
