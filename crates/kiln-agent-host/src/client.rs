//! The connection: handshake, reader and writer tasks, request correlation.
//!
//! Owns: [`AgentClient`] and the shared connection state the reader, the writer, the exec
//! sessions and the TCP tunnels use. Streams of every kind live in one
//! [`crate::registry::StreamRegistry`] (ids, dispatch, grants, closes, channel death); this
//! module only routes the stream-specific control messages (`exit`, `tcp_eof`, ...) to their
//! endpoint. Lock discipline: one std `Mutex` for connection state and
//! one per exec inbox or tunnel; never held across `.await`; when both are needed the state
//! lock is released first.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use kiln_agent_proto::{
    AgentInfo, DataChannel, Decoder, EntryName, ErrorBody, ExecRequest, FEATURE_NET_V1,
    FEATURE_PTY_V1, FEATURE_USER_V1, FileList, FileStat, Frame, GuestIdentity, GuestMessage,
    GuestPath, HostMessage, HuntTarget, IdentityAck, NetworkAck, NetworkConfig, Request, RequestId,
    Response, SUPPORTED_VERSIONS, StreamId, SyncFrame,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::error::{AgentError, ClosedReason};
use crate::exec::{ExecSession, ExecShared};
use crate::files::{FileReadRequest, FileReader, FileWriteRequest, FileWriter, TransferShared};
use crate::rate_limited;
use crate::ratelimit::LogLimiter;
use crate::registry::{StreamEndpoint, StreamRegistry};
use crate::tunnel::{TcpTunnel, TunnelShared};

/// After an acknowledgement of an older nonce, the guest is known to be alive: stop sending
/// new SYNCs for this long (each would reset its session again) and wait for the latest ack.
const ALIVE_GRACE: Duration = Duration::from_secs(1);
/// Bytes read from the stream per read call.
const READ_CHUNK: usize = 64 << 10;
/// Most queued frames the writer writes before checking for grants again.
const WRITE_BATCH: usize = 16;

/// Tunables of a connection.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long `connect` waits for the guest's SYNC_ACK.
    pub handshake_deadline: Duration,
    /// Interval between SYNC resends while no acknowledgement has been seen.
    pub sync_interval: Duration,
    /// Output credit per exec (stdout + stderr bytes the guest may send ahead of the
    /// consumer). Bounds host memory per exec.
    pub output_window: u32,
    /// Capacity of the outgoing frame queue, in frames.
    pub write_queue_frames: usize,
    /// Credit per TCP tunnel for the bytes its guest socket receives (ahead of the reader).
    /// Bounds host memory per tunnel.
    pub tunnel_window: u32,
    /// Credit per file read (bytes the guest may send ahead of the reader). Bounds host
    /// memory per read.
    pub file_window: u32,
    /// How long a request may go unanswered before the client sends the agent a ping, and
    /// again after each further interval (a nudge; its answer is dropped). A restored guest
    /// with two vCPUs under TCG sometimes leaves a request unanswered although its agent
    /// runs, and answers it together with the next message: measured on a busy two-vCPU
    /// desktop's user snapshot, 4 of 70 restores did not acknowledge their identity while
    /// pings sent meanwhile were answered in 120–190 ms, the identity right with them — a
    /// virtqueue notification lost across the restore.
    pub nudge_after: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            handshake_deadline: Duration::from_secs(30),
            sync_interval: Duration::from_millis(250),
            output_window: 256 << 10,
            write_queue_frames: 64,
            tunnel_window: 256 << 10,
            file_window: 256 << 10,
            nudge_after: Duration::from_secs(1),
        }
    }
}

/// A connected guest agent. Cheap to clone; the connection closes when the last clone, the
/// last [`ExecSession`] and the last [`TcpTunnel`] are dropped.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<ClientInner>,
}

/// What clients and exec sessions share.
pub(crate) struct ClientInner {
    pub(crate) shared: Arc<Shared>,
    tx: mpsc::Sender<Bytes>,
    output_window: u32,
    tunnel_window: u32,
    file_window: u32,
    nudge_after: Duration,
    /// What the agent said it supports in its SYNC_ACK.
    features: Vec<String>,
    tasks: [AbortHandle; 2],
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

type Reply = Result<Response, ErrorBody>;

/// Connection state shared by the reader, the writer, clients and sessions.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Wakes the writer when WINDOW grants are pending.
    writer_wake: Notify,
    /// `true` once the channel is dead.
    closed_tx: watch::Sender<bool>,
    /// Every log line the guest can trigger goes through it.
    log_limiter: LogLimiter,
}

struct State {
    closed: Option<ClosedReason>,
    next_request: u64,
    pending: HashMap<RequestId, oneshot::Sender<Reply>>,
    /// Every exec and tunnel, their pending grants and close messages.
    streams: StreamRegistry<Endpoint>,
}

/// What a stream id names.
#[derive(Clone)]
pub(crate) enum Endpoint {
    Exec(Arc<ExecShared>),
    Tunnel(Arc<TunnelShared>),
    File(Arc<TransferShared>),
}

impl Endpoint {
    fn as_dyn(&self) -> &dyn StreamEndpoint {
        match self {
            Endpoint::Exec(e) => e.as_ref(),
            Endpoint::Tunnel(t) => t.as_ref(),
            Endpoint::File(f) => f.as_ref(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn new() -> Shared {
        Shared {
            state: Mutex::new(State {
                closed: None,
                next_request: 1,
                pending: HashMap::new(),
                streams: StreamRegistry::new(),
            }),
            writer_wake: Notify::new(),
            closed_tx: watch::Sender::new(false),
            log_limiter: LogLimiter::default(),
        }
    }

    /// The error callers get once the channel is dead.
    pub(crate) fn closed_error(&self) -> AgentError {
        let reason = lock(&self.state)
            .closed
            .clone()
            .unwrap_or(ClosedReason::Eof);
        AgentError::ChannelClosed(reason)
    }

    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.state).closed.is_some()
    }

    /// Marks the channel dead (first reason wins) and wakes every waiter.
    fn close(&self, reason: ClosedReason) {
        let (pending, streams) = {
            let mut st = lock(&self.state);
            if st.closed.is_some() {
                return;
            }
            tracing::debug!(reason = %reason, "agent channel closed");
            st.closed = Some(reason.clone());
            (std::mem::take(&mut st.pending), st.streams.close_all())
        };
        // Dropping the senders fails the waiting requests with the stored reason.
        drop(pending);
        for endpoint in &streams {
            endpoint.as_dyn().on_channel_closed(&reason);
        }
        self.closed_tx.send_replace(true);
        self.writer_wake.notify_one();
    }

    /// Queues a WINDOW grant for the writer (coalesced per stream; never blocks).
    pub(crate) fn queue_grant(&self, stream: StreamId, increment: u32) {
        {
            let mut st = lock(&self.state);
            if st.closed.is_some() {
                return;
            }
            st.streams.queue_grant(stream, increment);
        }
        self.writer_wake.notify_one();
    }

    /// Forgets a stream whose handle is gone; later frames for it are ignored.
    pub(crate) fn forget_stream(&self, stream: StreamId) {
        lock(&self.state).streams.forget(stream);
    }

    /// Queues the message that ends `stream` from the host's side (`tcp_close`, ...) for the
    /// writer (at most one per stream; never blocks). The writer sends it only after every
    /// frame queued before it, so it cannot overtake the request that opened the stream.
    pub(crate) fn queue_stream_close(&self, stream: StreamId, message: HostMessage) {
        {
            let mut st = lock(&self.state);
            if st.closed.is_some() {
                return;
            }
            st.streams.queue_close(stream, message);
        }
        self.writer_wake.notify_one();
    }

    fn take_closes(&self) -> BTreeMap<StreamId, HostMessage> {
        lock(&self.state).streams.take_closes()
    }

    fn take_grants(&self) -> Vec<Frame> {
        lock(&self.state).streams.take_grants()
    }

    /// Handles one frame from the guest. An error is a protocol violation: the channel dies.
    fn dispatch(&self, frame: Frame) -> Result<(), ClosedReason> {
        match frame {
            Frame::Control(payload) => {
                let msg = GuestMessage::from_payload(&payload).map_err(ClosedReason::Decode)?;
                self.on_message(msg);
                Ok(())
            }
            Frame::Data {
                stream,
                channel: channel @ (DataChannel::Stdout | DataChannel::Stderr),
                data,
            } => {
                match self.target(stream) {
                    Some(endpoint) => {
                        if let Some(grant) = endpoint.as_dyn().on_data(channel, &data)? {
                            self.queue_grant(stream, grant);
                        }
                    }
                    None => {
                        self.check_issued(stream, "output")?;
                        rate_limited!(
                            self.log_limiter,
                            "output_unknown_stream",
                            debug!(%stream, "dropping output for an unknown stream")
                        );
                    }
                }
                Ok(())
            }
            Frame::Window { stream, increment } => {
                match self.target(stream) {
                    Some(endpoint) => endpoint.as_dyn().on_grant(increment)?,
                    None => self.check_issued(stream, "a window grant")?,
                }
                Ok(())
            }
            Frame::SyncAck(_) => {
                // A late answer to one of our older SYNCs; the session is already up.
                rate_limited!(
                    self.log_limiter,
                    "late_sync_ack",
                    debug!("ignoring a late sync acknowledgement")
                );
                Ok(())
            }
            other => Err(ClosedReason::Violation {
                what: format!("sent a {} frame", other.kind()),
            }),
        }
    }

    fn on_message(&self, msg: GuestMessage) {
        match msg {
            GuestMessage::Response { id, response } => self.complete(id, Ok(response)),
            GuestMessage::Error {
                id: Some(id),
                error,
            } => self.complete(id, Err(error)),
            GuestMessage::Error { id: None, error } => {
                rate_limited!(
                    self.log_limiter,
                    "unparseable_request",
                    warn!(code = %error.code, message = %error.message, "guest agent reported an error for an unparseable request")
                );
            }
            GuestMessage::Exit { stream, status } => {
                let exec = lock(&self.state)
                    .streams
                    .remove_if(stream, |e| matches!(e, Endpoint::Exec(_)));
                match exec {
                    Some(Endpoint::Exec(exec)) => exec.on_exit(status),
                    _ => rate_limited!(
                        self.log_limiter,
                        "exit_unknown_stream",
                        debug!(%stream, "exit for an unknown stream")
                    ),
                }
            }
            GuestMessage::TcpEof { stream } => {
                let tunnel = lock(&self.state).streams.get(stream);
                match tunnel {
                    Some(Endpoint::Tunnel(tunnel)) => tunnel.on_eof(),
                    _ => rate_limited!(
                        self.log_limiter,
                        "tcp_eof_unknown_stream",
                        debug!(%stream, "tcp_eof for an unknown stream")
                    ),
                }
            }
            GuestMessage::TcpClosed { stream, error } => {
                let tunnel = lock(&self.state)
                    .streams
                    .remove_if(stream, |e| matches!(e, Endpoint::Tunnel(_)));
                match tunnel {
                    Some(Endpoint::Tunnel(tunnel)) => tunnel.on_closed(error),
                    _ => rate_limited!(
                        self.log_limiter,
                        "tcp_closed_unknown_stream",
                        debug!(%stream, "tcp_closed for an unknown stream")
                    ),
                }
            }
            GuestMessage::FileDone {
                stream,
                bytes,
                error,
            } => {
                // The transfer stays registered until its handle drops, so bytes after
                // file_done are caught as a violation.
                let transfer = lock(&self.state).streams.get(stream);
                match transfer {
                    Some(Endpoint::File(transfer)) => transfer.on_done(bytes, error),
                    _ => rate_limited!(
                        self.log_limiter,
                        "file_done_unknown_stream",
                        debug!(%stream, "file_done for an unknown stream")
                    ),
                }
            }
            GuestMessage::Unknown => rate_limited!(
                self.log_limiter,
                "unknown_message",
                debug!("ignoring an unknown guest message")
            ),
        }
    }

    /// A frame for a stream without an endpoint is fine when the host opened that stream
    /// and let go of it since (frames in flight); for a stream the host never opened it is a
    /// protocol violation.
    fn check_issued(&self, stream: StreamId, what: &str) -> Result<(), ClosedReason> {
        if lock(&self.state).streams.was_issued(stream) {
            Ok(())
        } else {
            Err(ClosedReason::Violation {
                what: format!("sent {what} on stream {stream}, which the host never opened"),
            })
        }
    }

    /// The stream a data or WINDOW frame is for.
    fn target(&self, stream: StreamId) -> Option<Endpoint> {
        lock(&self.state).streams.get(stream)
    }

    fn complete(&self, id: RequestId, reply: Reply) {
        let waiter = lock(&self.state).pending.remove(&id);
        match waiter {
            // The requester may have given up; that is fine.
            Some(tx) => drop(tx.send(reply)),
            None => rate_limited!(
                self.log_limiter,
                "answer_unknown_request",
                debug!(%id, "answer for an unknown request")
            ),
        }
    }
}

/// Removes a pending request when its caller stops waiting (completion or cancellation).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: RequestId,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.state).pending.remove(&self.id);
    }
}

impl ClientInner {
    /// Queues an encoded frame for the writer.
    pub(crate) async fn send_frame(&self, frame: &Frame) -> Result<(), AgentError> {
        let bytes = frame.to_bytes().map_err(AgentError::Encode)?;
        if self.shared.is_closed() {
            return Err(self.shared.closed_error());
        }
        self.tx
            .send(bytes)
            .await
            .map_err(|_| self.shared.closed_error())
    }

    /// Queues a frame without waiting (used from `Drop`); dropped if the queue is full.
    pub(crate) fn try_send_request(&self, request: Request) {
        let id = {
            let mut st = lock(&self.shared.state);
            let id = RequestId(st.next_request);
            st.next_request += 1;
            id
        };
        let msg = HostMessage::Request { id, request };
        if let Ok(bytes) = msg.to_frame().and_then(|f| f.to_bytes()) {
            let _ = self.tx.try_send(bytes);
        }
    }

    /// Sends a request and waits for its answer.
    pub(crate) async fn request(&self, request: Request) -> Result<Response, AgentError> {
        let op = request.op();
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut st = lock(&self.shared.state);
            if st.closed.is_some() {
                drop(st);
                return Err(self.shared.closed_error());
            }
            let id = RequestId(st.next_request);
            st.next_request += 1;
            st.pending.insert(id, tx);
            id
        };
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
        };
        let frame = HostMessage::Request { id, request }
            .to_frame()
            .map_err(AgentError::Encode)?;
        self.send_frame(&frame).await?;
        let mut rx = rx;
        let mut nudges = 0u32;
        let answer = loop {
            tokio::select! {
                answer = &mut rx => break answer,
                () = tokio::time::sleep(self.nudge_after) => {
                    nudges += 1;
                    self.try_send_request(Request::Ping);
                }
            }
        };
        if nudges > 0 {
            tracing::info!(op, nudges, "the guest agent answered after a nudge");
        }
        match answer {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(AgentError::Remote {
                op,
                code: error.code,
                message: error.message,
            }),
            Err(_) => Err(self.shared.closed_error()),
        }
    }

    pub(crate) fn output_window(&self) -> u32 {
        self.output_window
    }

    /// A handle on the frame queue, for writers that must wait for a slot inside `poll_*`.
    pub(crate) fn frame_sender(&self) -> mpsc::Sender<Bytes> {
        self.tx.clone()
    }
}

fn fresh_nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS once per thread and varies per instance.
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish()
}

impl AgentClient {
    /// Runs the resync handshake on `stream` (resending SYNC every ~250 ms until `deadline`)
    /// and starts the connection's reader and writer tasks.
    pub async fn connect<S>(
        stream: S,
        deadline: Duration,
    ) -> Result<(AgentClient, AgentInfo), AgentError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let config = ClientConfig {
            handshake_deadline: deadline,
            ..ClientConfig::default()
        };
        AgentClient::connect_with(stream, config).await
    }

    /// [`AgentClient::connect`] with explicit tunables.
    pub async fn connect_with<S>(
        stream: S,
        config: ClientConfig,
    ) -> Result<(AgentClient, AgentInfo), AgentError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (decoder, info) = handshake(&mut rd, &mut wr, &config).await?;
        let shared = Arc::new(Shared::new());
        let (tx, rx) = mpsc::channel(config.write_queue_frames.max(1));
        let reader = tokio::spawn(reader_task(rd, decoder, Arc::clone(&shared)));
        let writer = tokio::spawn(writer_task(wr, rx, Arc::clone(&shared)));
        let inner = ClientInner {
            shared,
            tx,
            output_window: config.output_window.max(1),
            tunnel_window: config.tunnel_window.max(1),
            file_window: config.file_window.max(1),
            nudge_after: config.nudge_after.max(Duration::from_millis(1)),
            features: info.features.clone(),
            tasks: [reader.abort_handle(), writer.abort_handle()],
        };
        Ok((
            AgentClient {
                inner: Arc::new(inner),
            },
            info,
        ))
    }

    /// Whether the agent advertised `feature` in its SYNC_ACK.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.inner.features.iter().any(|f| f == feature)
    }

    /// One request/response round trip; returns how long it took.
    pub async fn ping(&self) -> Result<Duration, AgentError> {
        let start = Instant::now();
        match self.inner.request(Request::Ping).await? {
            Response::Pong => Ok(start.elapsed()),
            _ => Err(AgentError::UnexpectedResponse { op: "ping" }),
        }
    }

    /// Starts a command. Its output, stdin and exit go through the returned session; dropping
    /// the session before the exit kills the command's process group. A request with a `tty`
    /// fails with [`AgentError::MissingFeature`] before anything is sent if the agent does not
    /// advertise [`FEATURE_PTY_V1`] (it would ignore the field and run without a terminal);
    /// likewise a request with a `user` without [`FEATURE_USER_V1`] (it would run as root).
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecSession, AgentError> {
        if req.tty.is_some() && !self.has_feature(FEATURE_PTY_V1) {
            return Err(AgentError::MissingFeature {
                what: "a terminal (tty)",
                feature: FEATURE_PTY_V1,
            });
        }
        if req.user.is_some() && !self.has_feature(FEATURE_USER_V1) {
            return Err(AgentError::MissingFeature {
                what: "running a command as another user",
                feature: FEATURE_USER_V1,
            });
        }
        let window = self.inner.output_window();
        let exec = {
            let mut st = lock(&self.inner.shared.state);
            if st.closed.is_some() {
                drop(st);
                return Err(self.inner.shared.closed_error());
            }
            st.streams.register(|stream| {
                let exec = Arc::new(ExecShared::new(stream, window, req.stdin));
                (Arc::clone(&exec), Endpoint::Exec(exec))
            })?
        };
        // Registered before the request is sent, so early output is never dropped; if this
        // future is cancelled, the session's Drop cleans up.
        let mut session = ExecSession::new(Arc::clone(&self.inner), exec);
        let request = Request::Exec {
            stream: session.stream(),
            output_window: window,
            exec: req,
        };
        match self.inner.request(request).await? {
            Response::ExecStarted { pid } => {
                session.set_started(pid);
                Ok(session)
            }
            _ => Err(AgentError::UnexpectedResponse { op: "exec" }),
        }
    }

    /// Opens a TCP connection, inside the guest, to `127.0.0.1:port` and returns it as a byte
    /// stream (see [`TcpTunnel`]). Fails with [`AgentError::Remote`] and
    /// [`kiln_agent_proto::ErrorCode::ConnectFailed`] if the guest cannot connect (the
    /// message says why, e.g. `connection to 127.0.0.1:5432 refused`), with
    /// [`kiln_agent_proto::ErrorCode::TooManyStreams`] when the guest's tunnel cap is reached,
    /// and with [`kiln_agent_proto::ErrorCode::Unsupported`] if the agent predates the
    /// `tcp-v1` feature.
    pub async fn open_tcp(&self, port: u16) -> Result<TcpTunnel, AgentError> {
        const OP: &str = "tcp_connect";
        let window = self.inner.tunnel_window;
        let tunnel = {
            let mut st = lock(&self.inner.shared.state);
            if st.closed.is_some() {
                drop(st);
                return Err(self.inner.shared.closed_error());
            }
            st.streams.register(|stream| {
                let tunnel = Arc::new(TunnelShared::new(stream, port, window));
                (Arc::clone(&tunnel), Endpoint::Tunnel(tunnel))
            })?
        };
        // Registered before the request is sent (the guest grants credit before it answers).
        // If this future is cancelled, or the answer is not a success, dropping the tunnel
        // forgets it and closes whatever the guest may have opened.
        let tcp = TcpTunnel::new(Arc::clone(&self.inner), Arc::clone(&tunnel));
        let request = Request::TcpConnect {
            stream: tcp.stream(),
            port,
            window,
        };
        match self.inner.request(request).await {
            Ok(Response::TcpConnected) => Ok(tcp),
            Ok(_) => Err(AgentError::UnexpectedResponse { op: OP }),
            Err(e) => {
                if matches!(e, AgentError::Remote { .. }) {
                    // The guest opened nothing: no tcp_close needed.
                    tunnel.mark_never_opened();
                }
                Err(e)
            }
        }
    }

    /// Starts writing a guest file (or, with `tar`, unpacking an archive into a guest
    /// directory); see [`FileWriter`]. Fails with [`AgentError::Remote`] and a typed code
    /// (`not_found` for a missing parent directory, `is_a_directory`, `already_exists` for a
    /// non-empty tar target, `permission_denied`, ...) before any byte is sent, and with
    /// `unsupported` if the agent predates `files-v1`.
    pub async fn file_write(&self, req: FileWriteRequest) -> Result<FileWriter, AgentError> {
        const OP: &str = "file_write";
        let path = req.path.clone();
        let shared = self.register_transfer(&path, false, 1)?;
        // Registered before the request is sent (the guest grants credit before it answers);
        // a cancelled call or a failed answer drops the writer, which aborts the write.
        let writer = FileWriter::new(Arc::clone(&self.inner), Arc::clone(&shared));
        let request = Request::FileWrite {
            stream: writer.stream(),
            path: req.path,
            mode: req.mode,
            tar: req.tar,
        };
        match self.inner.request(request).await {
            Ok(Response::FileWriteReady) => Ok(writer),
            Ok(_) => Err(AgentError::UnexpectedResponse { op: OP }),
            Err(e) => {
                if matches!(e, AgentError::Remote { .. }) {
                    // The guest created nothing: no file_abort needed.
                    shared.mark_never_opened();
                }
                Err(e)
            }
        }
    }

    /// Starts reading a guest file (or, with `tar`, a directory packed as a tar archive);
    /// see [`FileReader`]. Fails with [`AgentError::Remote`] and a typed code (`not_found`,
    /// `is_a_directory` without `tar`, `not_a_directory` with it, `permission_denied`, ...)
    /// before any byte is sent.
    pub async fn file_read(&self, req: FileReadRequest) -> Result<FileReader, AgentError> {
        const OP: &str = "file_read";
        let window = self.inner.file_window;
        let shared = self.register_transfer(&req.path, true, window)?;
        // Registered before the request is sent; a cancelled call drops the reader, which
        // aborts whatever the guest may have started.
        let mut reader = FileReader::new(Arc::clone(&self.inner), Arc::clone(&shared));
        let request = Request::FileRead {
            stream: reader.stream(),
            path: req.path,
            tar: req.tar,
            window,
        };
        match self.inner.request(request).await {
            Ok(Response::FileReadStarted { size }) => {
                reader.set_size(size);
                Ok(reader)
            }
            Ok(_) => Err(AgentError::UnexpectedResponse { op: OP }),
            Err(e) => {
                if matches!(e, AgentError::Remote { .. }) {
                    shared.mark_never_opened();
                }
                Err(e)
            }
        }
    }

    fn register_transfer(
        &self,
        path: &GuestPath,
        reading: bool,
        window: u32,
    ) -> Result<Arc<TransferShared>, AgentError> {
        let mut st = lock(&self.inner.shared.state);
        if st.closed.is_some() {
            drop(st);
            return Err(self.inner.shared.closed_error());
        }
        st.streams.register(|stream| {
            let shared = Arc::new(TransferShared::new(stream, path.clone(), reading, window));
            (Arc::clone(&shared), Endpoint::File(shared))
        })
    }

    /// Metadata of a guest path (a final symlink is described, not followed; its target is
    /// in `symlink_target`). Fails with [`AgentError::Remote`] `not_found` and the like.
    pub async fn file_stat(&self, path: &GuestPath) -> Result<FileStat, AgentError> {
        let request = Request::FileStat { path: path.clone() };
        match self.inner.request(request).await? {
            Response::FileStat(stat) => Ok(stat),
            _ => Err(AgentError::UnexpectedResponse { op: "file_stat" }),
        }
    }

    /// One page (at most [`kiln_agent_proto::MAX_LIST_ENTRIES`] entries, names in byte
    /// order) of the guest directory `path`, starting after `after`; pass the page's
    /// [`FileList::next_after`] to get the next one. Entry names are validated (1..=255
    /// bytes, no NUL or `/`) when the answer is parsed.
    pub async fn file_list(
        &self,
        path: &GuestPath,
        after: Option<&EntryName>,
    ) -> Result<FileList, AgentError> {
        let request = Request::FileList {
            path: path.clone(),
            after: after.cloned(),
        };
        match self.inner.request(request).await? {
            Response::FileList(list) => Ok(list),
            _ => Err(AgentError::UnexpectedResponse { op: "file_list" }),
        }
    }

    /// Creates a guest directory (`parents`: with missing parents, and no error if it
    /// exists). Mode defaults to 0o755.
    pub async fn file_mkdir(
        &self,
        path: &GuestPath,
        parents: bool,
        mode: Option<u32>,
    ) -> Result<(), AgentError> {
        let request = Request::FileMkdir {
            path: path.clone(),
            parents,
            mode,
        };
        self.file_ok(request, "file_mkdir").await
    }

    /// Removes a guest file, symlink or empty directory; with `recursive`, a whole tree.
    /// A non-empty directory without `recursive` fails with `not_empty`.
    pub async fn file_remove(&self, path: &GuestPath, recursive: bool) -> Result<(), AgentError> {
        let request = Request::FileRemove {
            path: path.clone(),
            recursive,
        };
        self.file_ok(request, "file_remove").await
    }

    /// Renames a guest path (`rename(2)`: an existing file at `to` is replaced).
    pub async fn file_rename(&self, from: &GuestPath, to: &GuestPath) -> Result<(), AgentError> {
        let request = Request::FileRename {
            from: from.clone(),
            to: to.clone(),
        };
        self.file_ok(request, "file_rename").await
    }

    async fn file_ok(&self, request: Request, op: &'static str) -> Result<(), AgentError> {
        match self.inner.request(request).await? {
            Response::FileOk => Ok(()),
            _ => Err(AgentError::UnexpectedResponse { op }),
        }
    }

    /// Gives a restored guest its new identity and checks the acknowledgement: the echoed
    /// restore id must match and the clock, hostname and machine id must be confirmed.
    /// Call it first on a connection to a restored VM, before any exec (or use
    /// [`AgentClient::connect_restored`], which makes that ordering impossible to get wrong).
    ///
    /// How the RNG was reseeded is in the ack (`entropy_credited`, `rng_reseeded`) and
    /// logged when weaker than credited-and-reseeded; it is the caller's policy whether that
    /// is acceptable. An agent without the `identity-v1` feature answers
    /// [`AgentError::Remote`] with [`kiln_agent_proto::ErrorCode::Unsupported`]; a failed
    /// step answers [`kiln_agent_proto::ErrorCode::IdentityFailed`], naming the step.
    pub async fn apply_identity(
        &self,
        identity: &GuestIdentity,
    ) -> Result<IdentityAck, AgentError> {
        const OP: &str = "apply_identity";
        let request = Request::ApplyIdentity {
            identity: identity.clone(),
        };
        let ack = match self.inner.request(request).await? {
            Response::IdentityApplied(ack) => ack,
            _ => return Err(AgentError::UnexpectedResponse { op: OP }),
        };
        if ack.restore_id != identity.restore_id {
            return Err(AgentError::RestoreIdMismatch {
                sent: identity.restore_id.clone(),
                echoed: ack.restore_id,
            });
        }
        let unconfirmed = [
            (ack.clock_set, "set the wall clock"),
            (ack.hostname_set, "set the hostname"),
            (ack.machine_id_written, "write the machine id"),
        ]
        .into_iter()
        .find_map(|(ok, step)| (!ok).then_some(step));
        if let Some(step) = unconfirmed {
            return Err(AgentError::IdentityIncomplete {
                restore_id: ack.restore_id,
                step,
            });
        }
        if !(ack.entropy_credited && ack.rng_reseeded) {
            tracing::warn!(
                restore_id = %ack.restore_id,
                entropy_credited = ack.entropy_credited,
                rng_reseeded = ack.rng_reseeded,
                "guest rng reseed was weaker than requested"
            );
        }
        tracing::debug!(
            restore_id = %ack.restore_id,
            clock_step_ns = ack.clock_step_ns,
            "guest identity applied"
        );
        Ok(ack)
    }

    /// Gives the guest its network configuration (feature `net-v1`): after a cold boot and
    /// after every restore or clone (after [`AgentClient::apply_identity`]), before anything
    /// that needs the network. A second call replaces the first configuration entirely.
    ///
    /// Fails with [`AgentError::MissingFeature`] before anything is sent if the agent does
    /// not advertise `net-v1`; with [`AgentError::Remote`] and
    /// [`kiln_agent_proto::ErrorCode::NetworkFailed`] (the message names the failed step and
    /// the steps already done) when a step fails in the guest, including when the guest has
    /// no network device or more than one; with [`AgentError::NetworkAckMismatch`] when the
    /// acknowledgement does not report exactly what was sent.
    pub async fn configure_network(
        &self,
        network: &NetworkConfig,
    ) -> Result<NetworkAck, AgentError> {
        const OP: &str = "configure_network";
        if !self.has_feature(FEATURE_NET_V1) {
            return Err(AgentError::MissingFeature {
                what: "network configuration",
                feature: FEATURE_NET_V1,
            });
        }
        let request = Request::ConfigureNetwork {
            network: network.clone(),
        };
        let ack = match self.inner.request(request).await? {
            Response::NetworkConfigured(ack) => ack,
            _ => return Err(AgentError::UnexpectedResponse { op: OP }),
        };
        let mismatch = [
            (ack.mac == network.mac(), "mac"),
            (ack.address == network.address(), "address"),
            (ack.prefix_len == network.prefix_len(), "prefix_len"),
            (ack.gateway == network.gateway(), "gateway"),
            (ack.mtu == network.mtu(), "mtu"),
            (
                usize::from(ack.nameservers) == network.nameservers().len(),
                "nameservers",
            ),
        ]
        .into_iter()
        .find_map(|(ok, field)| (!ok).then_some(field));
        if let Some(field) = mismatch {
            return Err(AgentError::NetworkAckMismatch { field });
        }
        tracing::debug!(
            interface = %ack.interface,
            mac = %ack.mac,
            address = %ack.address,
            prefix_len = ack.prefix_len,
            gateway = %ack.gateway,
            mtu = ack.mtu,
            ipv6_disabled = ack.ipv6_disabled,
            "guest network configured"
        );
        Ok(ack)
    }

    /// [`AgentClient::connect_with`] for a VM restored from a snapshot: after the handshake
    /// and before the client is handed out (so before any command can be sent), applies
    /// `identity` with [`AgentClient::apply_identity`]. Fails if either step fails.
    pub async fn connect_restored<S>(
        stream: S,
        config: ClientConfig,
        identity: &GuestIdentity,
    ) -> Result<(AgentClient, AgentInfo, IdentityAck), AgentError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (client, info) = AgentClient::connect_with(stream, config).await?;
        let ack = client.apply_identity(identity).await?;
        Ok((client, info, ack))
    }

    /// Asks the guest to sync and power off. Succeeds when the agent acknowledges, or when
    /// the channel closes while waiting (the guest powering off closes it).
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        match self.inner.request(Request::Shutdown).await {
            Ok(Response::ShuttingDown) => Ok(()),
            Ok(_) => Err(AgentError::UnexpectedResponse { op: "shutdown" }),
            Err(AgentError::ChannelClosed(ClosedReason::Eof)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Resolves once the channel has died (EOF, I/O error or protocol violation).
    pub async fn closed(&self) {
        let mut rx = self.inner.shared.closed_tx.subscribe();
        // Cannot fail: `shared` owns the sender and outlives this call.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// The limiter of the log lines this guest can trigger (one per connection, so per
    /// sandbox): the engine's own guest-triggered lines use it too.
    pub fn log_limiter(&self) -> &LogLimiter {
        &self.inner.shared.log_limiter
    }

    /// Why the channel died, if it has.
    pub fn close_reason(&self) -> Option<ClosedReason> {
        lock(&self.inner.shared.state).closed.clone()
    }
}

/// Sends SYNCs and discards everything until the SYNC_ACK for the latest nonce.
async fn handshake<R, W>(
    rd: &mut R,
    wr: &mut W,
    config: &ClientConfig,
) -> Result<(Decoder, AgentInfo), AgentError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let deadline = Instant::now() + config.handshake_deadline;
    let timeout = || AgentError::HandshakeTimeout {
        waited: config.handshake_deadline,
    };
    let mut decoder = Decoder::hunting(HuntTarget::SyncAck);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut nonce: Option<u64> = None;
    let mut alive_at: Option<Instant> = None;
    let mut next_sync = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_sync {
            let recently_alive = alive_at.is_some_and(|t| now.duration_since(t) < ALIVE_GRACE);
            if nonce.is_none() || !recently_alive {
                let fresh = fresh_nonce();
                let sync = Frame::Sync(SyncFrame {
                    nonce: fresh,
                    versions: SUPPORTED_VERSIONS.to_vec(),
                })
                .to_bytes()
                .map_err(AgentError::Encode)?;
                let write = async {
                    wr.write_all(&sync).await?;
                    wr.flush().await
                };
                tokio::time::timeout_at(deadline, write)
                    .await
                    .map_err(|_| timeout())?
                    .map_err(AgentError::HandshakeWrite)?;
                nonce = Some(fresh);
            }
            next_sync = now + config.sync_interval;
        }
        let n = tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) => return Err(AgentError::ChannelClosed(ClosedReason::Eof)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(AgentError::ChannelClosed(ClosedReason::Read(Arc::new(e)))),
            },
            () = tokio::time::sleep_until(next_sync.min(deadline)) => {
                if Instant::now() >= deadline {
                    return Err(timeout());
                }
                continue;
            }
        };
        decoder.feed(&buf[..n]);
        // While hunting the decoder only ever yields SYNC_ACK frames.
        while let Ok(Some(frame)) = decoder.next_frame() {
            let Frame::SyncAck(ack) = frame else {
                decoder.hunt(HuntTarget::SyncAck);
                continue;
            };
            if Some(ack.nonce) != nonce {
                tracing::debug!(
                    nonce = ack.nonce,
                    "ignoring an acknowledgement of an older sync"
                );
                alive_at = Some(Instant::now());
                decoder.hunt(HuntTarget::SyncAck);
                continue;
            }
            if !SUPPORTED_VERSIONS.contains(&ack.version) {
                return Err(AgentError::VersionMismatch {
                    chosen: ack.version,
                    offered: SUPPORTED_VERSIONS.to_vec(),
                });
            }
            return Ok((decoder, ack.info));
        }
    }
}

async fn reader_task<R: AsyncRead + Unpin>(mut rd: R, mut decoder: Decoder, shared: Arc<Shared>) {
    let mut buf = vec![0u8; READ_CHUNK];
    let reason = 'conn: loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Err(reason) = shared.dispatch(frame) {
                        rate_limited!(
                            shared.log_limiter,
                            "protocol_violation",
                            warn!(reason = %reason, "closing the agent channel")
                        );
                        break 'conn reason;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    rate_limited!(
                        shared.log_limiter,
                        "malformed_frame",
                        warn!(error = %e, "malformed frame from the guest agent")
                    );
                    break 'conn ClosedReason::Decode(e);
                }
            }
        }
        match rd.read(&mut buf).await {
            Ok(0) => break ClosedReason::Eof,
            Ok(n) => decoder.feed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break ClosedReason::Read(Arc::new(e)),
        }
    };
    shared.close(reason);
}

async fn writer_task<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
) {
    let mut closed = shared.closed_tx.subscribe();
    // tcp_close messages taken from `shared` but not written yet, and how many queued frames
    // were written since the last were taken.
    let mut closes: BTreeMap<StreamId, HostMessage> = BTreeMap::new();
    let mut written_since_closes = 0usize;
    let result: io::Result<()> = async {
        loop {
            // Grants first: they are what lets the guest keep producing.
            let grants = shared.take_grants();
            for frame in &grants {
                match frame.to_bytes() {
                    Ok(bytes) => wr.write_all(&bytes).await?,
                    Err(e) => tracing::error!(error = %e, "unencodable window frame"),
                }
            }
            let taken = shared.take_closes();
            if !taken.is_empty() {
                closes.extend(taken);
                written_since_closes = 0;
            }
            // A close must follow every frame queued before it (the request that opened its
            // stream may still be queued): once the queue was empty, or a whole queue's worth of frames
            // has been written since, that holds.
            let mut wrote_closes = false;
            if !closes.is_empty() && (rx.is_empty() || written_since_closes >= rx.max_capacity()) {
                for close in std::mem::take(&mut closes).into_values() {
                    match close.to_frame().and_then(|f| f.to_bytes()) {
                        Ok(bytes) => wr.write_all(&bytes).await?,
                        Err(e) => tracing::error!(error = %e, "unencodable close message"),
                    }
                }
                wrote_closes = true;
            }
            if !grants.is_empty() || wrote_closes {
                wr.flush().await?;
            }
            tokio::select! {
                biased;
                () = async { drop(closed.wait_for(|c| *c).await) } => return Ok(()),
                () = shared.writer_wake.notified() => {}
                item = rx.recv() => match item {
                    Some(bytes) => {
                        wr.write_all(&bytes).await?;
                        written_since_closes += 1;
                        // Batch a little, but go back to the grants regularly.
                        for _ in 1..WRITE_BATCH {
                            let Ok(more) = rx.try_recv() else { break };
                            wr.write_all(&more).await?;
                            written_since_closes += 1;
                        }
                        wr.flush().await?;
                    }
                    // Every client and session is gone.
                    None => return wr.shutdown().await,
                },
            }
        }
    }
    .await;
    if let Err(e) = result {
        shared.close(ClosedReason::Write(Arc::new(e)));
    }
}
