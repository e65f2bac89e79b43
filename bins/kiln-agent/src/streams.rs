//! The agent's stream registry: what every stream of a session (exec, TCP tunnel, file
//! transfer) shares, written once.
//!
//! Owns: [`StreamTable`] (the id → handle map of a session, the "stream in use" check,
//! per-kind caps, the tasks that serve the streams and which stream each belongs to),
//! [`OutputCredit`] (the host's credit for guest → host bytes, fed by WINDOW frames, awaited by
//! a stream's task) and [`inbound`] (host → guest bytes handed from the session loop to a
//! stream's task, bounded in bytes by the receive window the agent granted).
//!
//! Must not: know what an exec or a tunnel does; the kinds plug in through [`StreamHandle`].
//! Never waits in the session loop: feeding is a non-blocking send, waiting happens in the
//! stream's own task.
//!
//! ```text
//!  session loop                                  stream task
//!  WINDOW(id)  ─▶ table.credit(id).grant ──────▶ OutputCredit::acquire ─▶ STDOUT frame
//!  STDIN(id)   ─▶ table.feed(id) ─▶ InboundTx ─▶ InboundRx::recv ─▶ consume ─▶ WINDOW back
//!  task ends   ─▶ table.next_finished ─▶ handle removed (the stream id becomes free)
//!  SYNC / EOF  ─▶ table dropped ─▶ every task aborted (their Drop kills / closes / deletes)
//! ```
//!
//! Invariants:
//! - A stream id names at most one live stream of a session, whatever its kind.
//! - Bytes queued toward a task never exceed the window granted for them: a host that
//!   overruns it gets [`FlowError::Overrun`] and the bytes are dropped.
//! - Credit never exceeds [`kiln_agent_proto::MAX_WINDOW`] ([`SendCredit`] enforces it).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kiln_agent_proto::{ErrorBody, ErrorCode, FlowError, RecvWindow, SendCredit, StreamId};
use tokio::sync::{Notify, mpsc};
use tokio::task::{self, JoinSet};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Output credit granted by the host for one stream (an exec's stdout and stderr share one).
pub(crate) struct OutputCredit {
    credit: Mutex<SendCredit>,
    notify: Notify,
}

impl OutputCredit {
    /// Credit starting at `initial` bytes.
    pub(crate) fn new(initial: u32) -> OutputCredit {
        OutputCredit {
            credit: Mutex::new(SendCredit::new(initial)),
            notify: Notify::new(),
        }
    }

    /// Adds a WINDOW grant from the host.
    pub(crate) fn grant(&self, increment: u32) -> Result<(), FlowError> {
        lock(&self.credit).grant(increment)?;
        self.notify.notify_one();
        Ok(())
    }

    /// Waits for credit and takes 1..=`max` bytes of it.
    pub(crate) async fn acquire(&self, max: usize) -> usize {
        loop {
            {
                let mut credit = lock(&self.credit);
                let n = credit.take(max);
                if n > 0 {
                    if credit.available() > 0 {
                        // Let another waiter (the other pump) see what is left.
                        self.notify.notify_one();
                    }
                    return n;
                }
            }
            self.notify.notified().await;
        }
    }

    /// Returns credit taken with [`OutputCredit::acquire`] but not used.
    pub(crate) fn give_back(&self, n: usize) {
        if n > 0 {
            lock(&self.credit).give_back(n);
            self.notify.notify_one();
        }
    }
}

/// A queue of host → guest items (bytes of STDIN frames, or markers such as a shutdown)
/// bounded in bytes by the receive window the agent granted: the sending half.
pub(crate) struct InboundTx<T> {
    tx: mpsc::UnboundedSender<T>,
    window: Arc<Mutex<RecvWindow>>,
}

/// The receiving half of [`inbound`], owned by the stream's task.
pub(crate) struct InboundRx<T> {
    rx: mpsc::UnboundedReceiver<T>,
    window: Arc<Mutex<RecvWindow>>,
}

/// A queue for host bytes within a receive window of `window` bytes (the initial grant the
/// caller sends the host).
pub(crate) fn inbound<T>(window: u32) -> (InboundTx<T>, InboundRx<T>) {
    let window = Arc::new(Mutex::new(RecvWindow::new(window)));
    let (tx, rx) = mpsc::unbounded_channel();
    (
        InboundTx {
            tx,
            window: Arc::clone(&window),
        },
        InboundRx { rx, window },
    )
}

impl<T> InboundTx<T> {
    /// Accounts `len` data bytes against the window and queues `item`. Fails (dropping the
    /// item) if the host sent more than its credit. A task that is already gone makes the
    /// bytes moot: that is not an error.
    pub(crate) fn send_data(&self, len: usize, item: T) -> Result<(), FlowError> {
        lock(&self.window).on_data(len)?;
        let _ = self.tx.send(item);
        Ok(())
    }

    /// Queues an item that carries no data bytes (a marker in stream order).
    pub(crate) fn send_marker(&self, item: T) {
        let _ = self.tx.send(item);
    }
}

impl<T> InboundRx<T> {
    /// The next item; `None` once the sending half is dropped and the queue is empty.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await
    }

    /// Accounts `len` bytes as consumed; returns a grant to send the host when one is due.
    pub(crate) fn consumed(&self, len: usize) -> Option<u32> {
        lock(&self.window).on_consumed(len)
    }
}

/// Kinds of stream, each with its own cap per session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum StreamKind {
    /// A running command.
    Exec,
    /// A TCP tunnel.
    Tunnel,
    /// A file transfer (read or write).
    File,
}

/// Why host bytes for a stream were not accepted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FeedError {
    /// The host sent more than the credit it was granted.
    #[error(transparent)]
    Overrun(#[from] FlowError),
    /// The host already ended this direction of the stream (`tcp_shutdown`, ...).
    #[error("bytes after the host ended the stream")]
    AfterEnd,
    /// This stream takes no bytes from the host (a file read).
    #[error("the stream takes no data from the host")]
    NoInput,
}

/// What the session keeps per live stream.
pub(crate) trait StreamHandle {
    /// Which cap the stream counts against.
    fn kind(&self) -> StreamKind;
    /// The host's credit for this stream's guest → host bytes, if it sends any.
    fn credit(&self) -> Option<&OutputCredit>;
    /// Hands bytes of a STDIN frame to the stream's task.
    fn feed(&mut self, data: bytes::Bytes) -> Result<(), FeedError>;
}

/// The live streams of one session and the tasks serving them. Dropping it aborts every
/// task.
pub(crate) struct StreamTable<H> {
    handles: HashMap<StreamId, H>,
    /// Stream tasks, each yielding its stream when done.
    tasks: JoinSet<StreamId>,
    task_streams: HashMap<task::Id, StreamId>,
}

impl<H: StreamHandle> StreamTable<H> {
    /// An empty table.
    pub(crate) fn new() -> StreamTable<H> {
        StreamTable {
            handles: HashMap::new(),
            tasks: JoinSet::new(),
            task_streams: HashMap::new(),
        }
    }

    /// Fails with `stream_in_use` if a live stream has `stream`, and with `too_many_streams`
    /// if `kind` already has `cap` live streams (`what` names them in the message).
    pub(crate) fn check_new(
        &self,
        stream: StreamId,
        kind: StreamKind,
        cap: usize,
        what: &str,
    ) -> Result<(), ErrorBody> {
        if self.handles.contains_key(&stream) {
            return Err(ErrorBody {
                code: ErrorCode::StreamInUse,
                message: format!("stream {stream} is already in use"),
            });
        }
        if self.handles.values().filter(|h| h.kind() == kind).count() >= cap {
            return Err(ErrorBody {
                code: ErrorCode::TooManyStreams,
                message: format!("at most {cap} {what} at once"),
            });
        }
        Ok(())
    }

    /// Registers a live stream and spawns the task that serves it; the stream stays live
    /// until the task ends.
    pub(crate) fn insert<F>(&mut self, stream: StreamId, handle: H, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let join = self.tasks.spawn(async move {
            task.await;
            stream
        });
        self.task_streams.insert(join.id(), stream);
        self.handles.insert(stream, handle);
    }

    /// The handle of a live stream.
    pub(crate) fn get(&self, stream: StreamId) -> Option<&H> {
        self.handles.get(&stream)
    }

    /// The handle of a live stream, mutably.
    pub(crate) fn get_mut(&mut self, stream: StreamId) -> Option<&mut H> {
        self.handles.get_mut(&stream)
    }

    /// Retires a stream whose task finished.
    pub(crate) fn remove(&mut self, stream: StreamId) -> Option<H> {
        self.handles.remove(&stream)
    }

    /// Adds a host WINDOW grant to a stream's output credit (ignored for unknown streams or
    /// streams that send nothing).
    pub(crate) fn grant(&self, stream: StreamId, increment: u32) -> Result<(), FlowError> {
        match self.handles.get(&stream).and_then(|h| h.credit()) {
            Some(credit) => credit.grant(increment),
            None => Ok(()),
        }
    }

    /// Hands STDIN bytes to a stream's task (dropped silently for unknown streams: the
    /// stream may have just ended).
    pub(crate) fn feed(&mut self, stream: StreamId, data: bytes::Bytes) -> Result<(), FeedError> {
        match self.handles.get_mut(&stream) {
            Some(h) => h.feed(data),
            None => Ok(()),
        }
    }

    /// The next stream task to finish: its stream and whether it ended cleanly (did not
    /// panic). Pending forever while no task runs.
    pub(crate) async fn next_finished(&mut self) -> (StreamId, bool) {
        loop {
            if self.tasks.is_empty() {
                return std::future::pending().await;
            }
            match self.tasks.join_next_with_id().await {
                Some(Ok((id, stream))) => {
                    self.task_streams.remove(&id);
                    return (stream, true);
                }
                Some(Err(e)) => {
                    if let Some(stream) = self.task_streams.remove(&e.id()) {
                        return (stream, false);
                    }
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeHandle(StreamKind);

    impl StreamHandle for FakeHandle {
        fn kind(&self) -> StreamKind {
            self.0
        }
        fn credit(&self) -> Option<&OutputCredit> {
            None
        }
        fn feed(&mut self, _: bytes::Bytes) -> Result<(), FeedError> {
            Err(FeedError::AfterEnd)
        }
    }

    fn id(n: u32) -> StreamId {
        StreamId::new(n).expect("non-zero")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stream_table_in_use_and_caps_are_per_kind() {
        let mut t = StreamTable::new();
        t.insert(id(1), FakeHandle(StreamKind::Exec), std::future::pending());
        let in_use = t.check_new(id(1), StreamKind::Tunnel, 10, "tunnels");
        assert_eq!(in_use.map_err(|e| e.code), Err(ErrorCode::StreamInUse));
        let capped = t.check_new(id(2), StreamKind::Exec, 1, "execs");
        assert_eq!(capped.map_err(|e| e.code), Err(ErrorCode::TooManyStreams));
        assert!(t.check_new(id(2), StreamKind::Tunnel, 1, "tunnels").is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stream_table_finished_task_yields_its_stream() {
        let mut t = StreamTable::new();
        t.insert(id(3), FakeHandle(StreamKind::Tunnel), async {});
        assert_eq!(t.next_finished().await, (id(3), true));
        assert!(t.remove(id(3)).is_some());
        assert!(t.get(id(3)).is_none());
    }

    #[test]
    fn inbound_overrun_is_refused_and_consumption_grants_back() {
        let (tx, rx) = inbound::<usize>(8);
        assert!(tx.send_data(8, 8).is_ok());
        assert!(matches!(tx.send_data(1, 1), Err(FlowError::Overrun { .. })));
        assert_eq!(rx.consumed(8), Some(8));
        assert!(tx.send_data(8, 8).is_ok());
    }
}
