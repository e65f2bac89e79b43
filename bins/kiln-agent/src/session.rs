//! The agent's protocol loop: one connection, any number of sessions, many execs, TCP
//! tunnels and file transfers.
//!
//! Owns: [`Agent`] (configuration, reaper, what it reports about itself, the identity sink,
//! the network it may configure and the current restore id) and [`Agent::serve`], which runs the
//! protocol over any byte stream until the host goes away or asks for shutdown. Usable as a
//! library: tests drive it over `tokio::io::duplex`, the binary over the virtio-serial port.
//!
//! ```text
//!   serve(io) ──▶ Hunting ── SYNC(n) ──▶ Session(epoch e) ── SYNC(n') ──▶ Session(e+1) ...
//!                   ▲                        │ framing error               (old session
//!                   └──── hunt for SYNC ◀────┘                              dropped: its
//!   EOF / broken pipe ─▶ ServeEnd::HostGone (session dropped)               execs killed)
//!   Shutdown request  ─▶ answer flushed ─▶ ServeEnd::Shutdown
//! ```
//!
//! Invariants:
//! - Nothing but a SYNC is acted on before the first SYNC (the decoder hunts).
//! - A SYNC drops the previous session before it is answered: running execs of that session
//!   are aborted and their process groups SIGKILLed, its TCP tunnels' sockets are closed,
//!   their queued frames are discarded by epoch, and the SYNC_ACK is the first frame of the
//!   new session.
//! - A stream id names at most one running exec, open tunnel or file transfer of a session at
//!   a time (the stream table, `streams.rs`).
//! - File operations never block the loop: transfers run in their own task with a blocking
//!   thread, one-shot operations (stat, list, ...) on a blocking thread whose task answers.
//! - A framing error never ends the connection: the decoder hunts for the next SYNC.
//! - Every request is answered exactly once (`response` or `error` with its id); a
//!   `tcp_connect` is answered by its tunnel's task once the connect has finished.
//! - `apply_identity` runs synchronously inside the request handler: no other frame of any
//!   session is processed while an identity is half applied. The restore id execs see is
//!   cleared when an identity is attempted and set only once every step succeeded; it
//!   outlives sessions (a restored guest keeps it across host reconnects).
//! - `configure_network` runs synchronously inside the request handler too, on the agent's
//!   thread: no exec observes a half-configured network, and the network namespace acted on
//!   is the agent thread's (which the in-process tests rely on).

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use kiln_agent_proto::{
    AgentInfo, DataChannel, Decoder, ErrorBody, ErrorCode, ExecRequest, FEATURE_FILES_V1,
    FEATURE_IDENTITY_V1, FEATURE_NET_V1, FEATURE_PTY_V1, FEATURE_TCP_V1, FEATURE_USER_V1, Frame,
    GuestIdentity, GuestMessage, HostMessage, HuntTarget, NetworkConfig, Request, RequestId,
    Response, RestoreId, SUPPORTED_VERSIONS, StreamId, SyncAckFrame, choose_version,
    loose_request_id,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::console::{error_chain, warn};
use crate::exec::{self, ExecHandle};
use crate::files::{self, FileHandle};
use crate::identity::{self, IdentitySink};
use crate::network::{self, SystemNetwork};
use crate::outbound::{OutItem, Outbound, write_loop};
use crate::reaper::Reaper;
use crate::streams::{FeedError, OutputCredit, StreamHandle, StreamKind, StreamTable};
use crate::sys;
use crate::tunnel::{self, TunnelHandle};

/// Bytes read from the channel per read call.
const READ_CHUNK: usize = 64 << 10;

/// Tunables of the agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Stdin credit the agent grants per exec, in bytes.
    pub stdin_window: u32,
    /// Most concurrent execs per session.
    pub max_execs: usize,
    /// After an exec's leader exits, how long a silent output pipe is waited on before it is
    /// abandoned (a background process may hold it open forever).
    pub drain_linger: Duration,
    /// Capacity of the outgoing frame queue, in frames (each ≤ 64 KiB + header).
    pub out_queue_frames: usize,
    /// Working directory of execs that name none.
    pub default_cwd: PathBuf,
    /// Where an exec's `user` is looked up (`passwd` and `group` in it): `/etc` in a guest.
    pub etc_dir: PathBuf,
    /// Most concurrent TCP tunnels per session (counted apart from execs).
    pub max_tunnels: usize,
    /// Credit the agent grants per TCP tunnel for the host's bytes (bounds the guest memory a
    /// tunnel can hold), in bytes.
    pub tunnel_window: u32,
    /// How long a tunnel's connect may take before it fails with `connect_failed`.
    pub tunnel_connect_timeout: Duration,
    /// Most concurrent file transfers (reads and writes) per session.
    pub max_file_transfers: usize,
    /// Credit the agent grants per file write for the host's bytes, in bytes (1 MiB, like
    /// the host's per-exec output window: with less, uploads measured 0.77x the stdout
    /// stream rate; `kiln bench files`).
    pub file_window: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            stdin_window: 256 << 10,
            max_execs: 256,
            drain_linger: Duration::from_millis(250),
            out_queue_frames: 64,
            default_cwd: PathBuf::from("/root"),
            etc_dir: PathBuf::from("/etc"),
            max_tunnels: 256,
            tunnel_window: 256 << 10,
            tunnel_connect_timeout: Duration::from_secs(10),
            max_file_transfers: 64,
            file_window: 1 << 20,
        }
    }
}

/// Why [`Agent::serve`] returned normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEnd {
    /// The host side closed the channel (EOF or broken pipe). A new host will send SYNC.
    HostGone,
    /// The host asked for shutdown; the answer has been flushed. The caller powers off.
    Shutdown,
}

/// Failure of the channel itself (not of an exec).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reading from the host channel failed.
    #[error("failed to read from the host channel")]
    Read(#[source] io::Error),
    /// Writing to the host channel failed.
    #[error("failed to write to the host channel")]
    Write(#[source] io::Error),
}

/// The guest agent: configuration, the child reaper, what it reports about itself and, when
/// it may change the system's identity, the sink that does it.
pub struct Agent {
    config: AgentConfig,
    reaper: Reaper,
    info: AgentInfo,
    identity: Option<Arc<dyn IdentitySink>>,
    /// Where `configure_network` takes effect, if the agent may configure a network.
    network: Option<Arc<SystemNetwork>>,
    /// The restore id of the last identity applied in full; exported to execs.
    restore_id: Mutex<Option<RestoreId>>,
}

/// One session: everything a SYNC creates and the next SYNC (or EOF) destroys.
struct Session {
    out: Outbound,
    /// Every live exec, tunnel and file transfer, and the tasks serving them.
    streams: StreamTable<Handle>,
    /// One-shot file operations running on blocking threads; each answers its request.
    ops: JoinSet<()>,
}

/// What a live stream of a session is.
enum Handle {
    Exec(ExecHandle),
    Tunnel(TunnelHandle),
    File(FileHandle),
}

impl StreamHandle for Handle {
    fn kind(&self) -> StreamKind {
        match self {
            Handle::Exec(_) => StreamKind::Exec,
            Handle::Tunnel(_) => StreamKind::Tunnel,
            Handle::File(_) => StreamKind::File,
        }
    }

    fn credit(&self) -> Option<&OutputCredit> {
        match self {
            Handle::Exec(h) => Some(&h.credit),
            Handle::Tunnel(t) => Some(&t.credit),
            Handle::File(f) => f.credit(),
        }
    }

    fn feed(&mut self, data: Bytes) -> Result<(), FeedError> {
        match self {
            Handle::Exec(h) => Ok(h.feed_stdin(data)?),
            Handle::Tunnel(t) => t.feed(data),
            Handle::File(f) => f.feed(data),
        }
    }
}

enum Event {
    Read(io::Result<usize>),
    Finished(StreamId, bool),
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

impl Agent {
    /// An agent that spawns through `reaper`.
    pub fn new(config: AgentConfig, reaper: Reaper) -> Agent {
        let info = AgentInfo {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            kernel_release: sys::kernel_release(),
            features: vec![
                "exec".to_owned(),
                FEATURE_TCP_V1.to_owned(),
                FEATURE_FILES_V1.to_owned(),
                FEATURE_PTY_V1.to_owned(),
                FEATURE_USER_V1.to_owned(),
            ],
        };
        Agent {
            config,
            reaper,
            info,
            identity: None,
            network: None,
            restore_id: Mutex::new(None),
        }
    }

    /// Lets the agent answer `apply_identity` through `sink` and advertises
    /// [`FEATURE_IDENTITY_V1`]. Without a sink the request is answered `unsupported`. The
    /// binary installs [`identity::SystemIdentity`] only as the guest's PID 1.
    pub fn with_identity_sink(mut self, sink: Arc<dyn IdentitySink>) -> Agent {
        self.identity = Some(sink);
        if !self.info.features.iter().any(|f| f == FEATURE_IDENTITY_V1) {
            self.info.features.push(FEATURE_IDENTITY_V1.to_owned());
        }
        self
    }

    /// Lets the agent answer `configure_network` in `network` and advertises
    /// [`FEATURE_NET_V1`]. Without it the request is answered `unsupported`. The binary
    /// installs [`SystemNetwork::for_pid1`] only as the guest's PID 1; it announces the
    /// feature whether or not the guest has a network device (a request then fails naming
    /// the missing interface), and never configures the device on its own.
    pub fn with_network(mut self, network: Arc<SystemNetwork>) -> Agent {
        self.network = Some(network);
        if !self.info.features.iter().any(|f| f == FEATURE_NET_V1) {
            self.info.features.push(FEATURE_NET_V1.to_owned());
        }
        self
    }

    fn configure_network(&self, config: &NetworkConfig) -> Result<Response, ErrorBody> {
        let Some(net) = &self.network else {
            return Err(ErrorBody {
                code: ErrorCode::Unsupported,
                message: "this agent does not configure networks (it is not the guest's init)"
                    .to_owned(),
            });
        };
        network::apply(net, config).map(Response::NetworkConfigured)
    }

    /// The restore id of the last identity applied in full, if any.
    pub fn restore_id(&self) -> Option<RestoreId> {
        self.restore_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn apply_identity(&self, identity: &GuestIdentity) -> Result<Response, ErrorBody> {
        let Some(sink) = &self.identity else {
            return Err(ErrorBody {
                code: ErrorCode::Unsupported,
                message: "this agent does not apply identities (it is not the guest's init)"
                    .to_owned(),
            });
        };
        let mut current = self
            .restore_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A failed attempt must not leave execs believing in the previous identity.
        *current = None;
        let ack = identity::apply(sink.as_ref(), identity)?;
        *current = Some(ack.restore_id.clone());
        Ok(Response::IdentityApplied(ack))
    }

    /// What the agent reports in SYNC_ACK.
    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// Runs the protocol over `io` until the host goes away or asks for shutdown. Session
    /// state never outlives the call; the caller may call again (same or new stream) and the
    /// next host starts with SYNC.
    pub async fn serve<S>(&self, io: S) -> Result<ServeEnd, ServeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (rd, wr) = tokio::io::split(io);
        let epoch = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel(self.config.out_queue_frames.max(1));
        let writer = write_loop(wr, rx, Arc::clone(&epoch));
        let reader = self.read_loop(rd, tx, epoch);
        tokio::pin!(writer, reader);
        tokio::select! {
            r = &mut reader => r,
            r = &mut writer => match r {
                Err(e) if !is_disconnect(&e) => Err(ServeError::Write(e)),
                _ => Ok(ServeEnd::HostGone),
            },
        }
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        mut rd: R,
        tx: mpsc::Sender<OutItem>,
        epoch: Arc<AtomicU64>,
    ) -> Result<ServeEnd, ServeError> {
        let mut decoder = Decoder::hunting(HuntTarget::Sync);
        let mut session: Option<Session> = None;
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let event = tokio::select! {
                r = rd.read(&mut buf) => Event::Read(r),
                (stream, clean) = next_finished(&mut session) => Event::Finished(stream, clean),
            };
            match event {
                Event::Read(Ok(0)) => return Ok(ServeEnd::HostGone),
                Event::Read(Ok(n)) => {
                    decoder.feed(&buf[..n]);
                    // The read buffer lives as long as the session: clear what it held, so
                    // no received byte (a secret delivery) stays in it after use.
                    buf[..n].fill(0);
                    loop {
                        match decoder.next_frame() {
                            Ok(Some(frame)) => {
                                if let Some(end) =
                                    self.on_frame(frame, &mut session, &tx, &epoch).await
                                {
                                    return Ok(end);
                                }
                            }
                            Ok(None) => {
                                decoder.release_if_empty();
                                break;
                            }
                            Err(e) => {
                                warn(format_args!(
                                    "framing error, waiting for a new sync: {}",
                                    error_chain(&e)
                                ));
                                decoder.hunt(HuntTarget::Sync);
                            }
                        }
                    }
                }
                Event::Read(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Event::Read(Err(e)) if is_disconnect(&e) => return Ok(ServeEnd::HostGone),
                Event::Read(Err(e)) => return Err(ServeError::Read(e)),
                Event::Finished(stream, clean) => {
                    if let Some(s) = session.as_mut() {
                        s.on_task_finished(stream, clean).await;
                    }
                }
            }
        }
    }

    async fn on_frame(
        &self,
        frame: Frame,
        session: &mut Option<Session>,
        tx: &mpsc::Sender<OutItem>,
        epoch: &AtomicU64,
    ) -> Option<ServeEnd> {
        let frame = match frame {
            Frame::Sync(sync) => {
                // Drop the old session first: aborts its exec tasks (killing their groups).
                *session = None;
                let e = epoch.fetch_add(1, Ordering::SeqCst) + 1;
                let out = Outbound::new(tx.clone(), e);
                let version = choose_version(&sync.versions, SUPPORTED_VERSIONS).unwrap_or(0);
                let ack = Frame::SyncAck(SyncAckFrame {
                    nonce: sync.nonce,
                    version,
                    info: self.info.clone(),
                });
                out.send(&ack).await;
                if version == 0 {
                    warn(format_args!(
                        "host offered versions {:?}, none supported",
                        sync.versions
                    ));
                } else {
                    *session = Some(Session {
                        out,
                        streams: StreamTable::new(),
                        ops: JoinSet::new(),
                    });
                }
                return None;
            }
            other => other,
        };
        let s = session.as_mut()?;
        match frame {
            Frame::Control(payload) => return self.on_control(s, &payload).await,
            Frame::Window { stream, increment } => {
                if let Err(e) = s.streams.grant(stream, increment) {
                    warn(format_args!("stream {stream}: {e}"));
                }
            }
            Frame::Data {
                stream,
                channel: DataChannel::Stdin,
                data,
            } => {
                if let Err(e) = s.streams.feed(stream, data) {
                    warn(format_args!("stream {stream}: host bytes dropped: {e}"));
                }
            }
            other => warn(format_args!(
                "ignoring {} frame from the host",
                other.kind()
            )),
        }
        None
    }

    async fn on_control(&self, s: &mut Session, payload: &Bytes) -> Option<ServeEnd> {
        let msg = match HostMessage::from_payload(payload) {
            Ok(msg) => msg,
            Err(e) => {
                let reply = GuestMessage::Error {
                    id: loose_request_id(payload),
                    error: ErrorBody {
                        code: ErrorCode::BadRequest,
                        message: error_chain(&e),
                    },
                };
                s.out.message(&reply).await;
                return None;
            }
        };
        match msg {
            HostMessage::Request { id, request } => {
                let result = match request {
                    Request::TcpConnect {
                        stream,
                        port,
                        window,
                    } => match self.start_tunnel(s, id, stream, port, window) {
                        // The tunnel's task answers once the connect has finished.
                        Ok(()) => return None,
                        Err(e) => Err(e),
                    },
                    Request::FileWrite {
                        stream,
                        path,
                        mode,
                        tar,
                    } => {
                        let started = s
                            .streams
                            .check_new(
                                stream,
                                StreamKind::File,
                                self.config.max_file_transfers,
                                "file transfers may run",
                            )
                            .and_then(|()| {
                                files::start_write(
                                    id,
                                    stream,
                                    &path,
                                    mode,
                                    tar,
                                    self.config.file_window,
                                    s.out.clone(),
                                )
                            });
                        match started {
                            // The transfer's task answers.
                            Ok(started) => {
                                s.streams.insert(
                                    stream,
                                    Handle::File(started.handle),
                                    started.task,
                                );
                                return None;
                            }
                            Err(e) => Err(e),
                        }
                    }
                    Request::FileRead {
                        stream,
                        path,
                        tar,
                        window,
                    } => {
                        let started = s
                            .streams
                            .check_new(
                                stream,
                                StreamKind::File,
                                self.config.max_file_transfers,
                                "file transfers may run",
                            )
                            .and_then(|()| {
                                files::start_read(id, stream, &path, tar, window, s.out.clone())
                            });
                        match started {
                            Ok(started) => {
                                s.streams.insert(
                                    stream,
                                    Handle::File(started.handle),
                                    started.task,
                                );
                                return None;
                            }
                            Err(e) => Err(e),
                        }
                    }
                    Request::FileStat { path } => {
                        s.spawn_op(id, move || files::stat(&path));
                        return None;
                    }
                    Request::FileList { path, after } => {
                        s.spawn_op(id, move || files::list(&path, after.as_ref()));
                        return None;
                    }
                    Request::FileMkdir {
                        path,
                        parents,
                        mode,
                    } => {
                        s.spawn_op(id, move || files::mkdir(&path, parents, mode));
                        return None;
                    }
                    Request::FileRemove { path, recursive } => {
                        s.spawn_op(id, move || files::remove(&path, recursive));
                        return None;
                    }
                    Request::FileRename { from, to } => {
                        s.spawn_op(id, move || files::rename(&from, &to));
                        return None;
                    }
                    Request::Ping => Ok(Response::Pong),
                    Request::Exec {
                        stream,
                        output_window,
                        exec,
                    } => self.start_exec(s, stream, output_window, exec).await,
                    Request::Signal { stream, signo } => signal_exec(s, stream, signo),
                    Request::ExecResize { stream, size } => match s.streams.get(stream) {
                        Some(Handle::Exec(h)) => h.resize(stream, size).map(|()| Response::Resized),
                        _ => Err(ErrorBody {
                            code: ErrorCode::NoSuchStream,
                            message: format!("no running exec on stream {stream}"),
                        }),
                    },
                    Request::ApplyIdentity { identity } => self.apply_identity(&identity),
                    Request::ConfigureNetwork { network } => self.configure_network(&network),
                    Request::Shutdown => {
                        reply(s, id, Ok(Response::ShuttingDown)).await;
                        s.out.flush().await;
                        return Some(ServeEnd::Shutdown);
                    }
                    Request::Unknown => Err(ErrorBody {
                        code: ErrorCode::Unsupported,
                        message: "unsupported request".to_owned(),
                    }),
                };
                reply(s, id, result).await;
            }
            HostMessage::StdinClose { stream } => {
                if let Some(Handle::Exec(h)) = s.streams.get_mut(stream) {
                    h.close_stdin();
                }
            }
            HostMessage::TcpShutdown { stream } => {
                if let Some(Handle::Tunnel(t)) = s.streams.get_mut(stream) {
                    t.shutdown_write();
                }
            }
            HostMessage::TcpClose { stream } => {
                if let Some(Handle::Tunnel(t)) = s.streams.get_mut(stream) {
                    t.close();
                }
            }
            HostMessage::FileEnd { stream } => {
                if let Some(Handle::File(f)) = s.streams.get_mut(stream) {
                    f.end();
                }
            }
            HostMessage::FileAbort { stream } => {
                if let Some(Handle::File(f)) = s.streams.get_mut(stream) {
                    f.abort();
                }
            }
            HostMessage::Unknown => {}
        }
        None
    }

    async fn start_exec(
        &self,
        s: &mut Session,
        stream: StreamId,
        output_window: u32,
        req: ExecRequest,
    ) -> Result<Response, ErrorBody> {
        s.streams.check_new(
            stream,
            StreamKind::Exec,
            self.config.max_execs,
            "execs may run",
        )?;
        let restore_id = self.restore_id();
        let started = exec::start(
            &self.reaper,
            &self.config,
            stream,
            output_window,
            req,
            restore_id.as_ref(),
            s.out.clone(),
        )?;
        if let Some(increment) = started.stdin_window {
            s.out.send(&Frame::Window { stream, increment }).await;
        }
        s.streams
            .insert(stream, Handle::Exec(started.handle), started.task);
        Ok(Response::ExecStarted { pid: started.pid })
    }
}

impl Agent {
    /// Validates a `tcp_connect` and starts its tunnel task, which answers the request.
    fn start_tunnel(
        &self,
        s: &mut Session,
        id: RequestId,
        stream: StreamId,
        port: u16,
        window: u32,
    ) -> Result<(), ErrorBody> {
        s.streams.check_new(
            stream,
            StreamKind::Tunnel,
            self.config.max_tunnels,
            "tcp tunnels may be open",
        )?;
        let started = tunnel::start(&self.config, id, stream, port, window, s.out.clone())?;
        s.streams
            .insert(stream, Handle::Tunnel(started.handle), started.task);
        Ok(())
    }
}

impl Session {
    /// Runs a one-shot file operation on a blocking thread; its task answers request `id`.
    fn spawn_op<F>(&mut self, id: RequestId, op: F)
    where
        F: FnOnce() -> Result<Response, ErrorBody> + Send + 'static,
    {
        // Forget the operations that already answered (their results are unit).
        while self.ops.try_join_next().is_some() {}
        let out = self.out.clone();
        self.ops.spawn(async move {
            let result = match tokio::task::spawn_blocking(op).await {
                Ok(result) => result,
                Err(_) => Err(ErrorBody {
                    code: ErrorCode::Internal,
                    message: "the file operation failed inside the agent".to_owned(),
                }),
            };
            let msg = match result {
                Ok(response) => GuestMessage::Response { id, response },
                Err(error) => GuestMessage::Error {
                    id: Some(id),
                    error,
                },
            };
            out.message(&msg).await;
        });
    }

    /// Retires the exec or tunnel whose task finished. A task that panicked (`!clean`) did
    /// not report its end: report it here so the host never waits forever.
    async fn on_task_finished(&mut self, stream: StreamId, clean: bool) {
        let handle = self.streams.remove(stream);
        if clean {
            return;
        }
        if let Some(Handle::Exec(_)) = handle {
            let msg = GuestMessage::Exit {
                stream,
                status: Default::default(),
            };
            self.out.message(&msg).await;
        } else if let Some(Handle::File(f)) = handle {
            let msg = if f.answered.load(std::sync::atomic::Ordering::SeqCst) {
                GuestMessage::FileDone {
                    stream,
                    bytes: 0,
                    error: Some(ErrorBody {
                        code: ErrorCode::Internal,
                        message: "the file transfer failed inside the agent".to_owned(),
                    }),
                }
            } else {
                GuestMessage::Error {
                    id: Some(f.request),
                    error: ErrorBody {
                        code: ErrorCode::Internal,
                        message: "the file transfer failed inside the agent".to_owned(),
                    },
                }
            };
            self.out.message(&msg).await;
        } else if let Some(Handle::Tunnel(t)) = handle {
            let msg = if t.answered.load(std::sync::atomic::Ordering::SeqCst) {
                GuestMessage::TcpClosed {
                    stream,
                    error: Some("internal error in the agent".to_owned()),
                }
            } else {
                GuestMessage::Error {
                    id: Some(t.request),
                    error: ErrorBody {
                        code: ErrorCode::Internal,
                        message: "the tunnel failed inside the agent".to_owned(),
                    },
                }
            };
            self.out.message(&msg).await;
        }
    }
}

async fn reply(s: &Session, id: RequestId, result: Result<Response, ErrorBody>) {
    let msg = match result {
        Ok(response) => GuestMessage::Response { id, response },
        Err(error) => GuestMessage::Error {
            id: Some(id),
            error,
        },
    };
    s.out.message(&msg).await;
}

fn signal_exec(s: &Session, stream: StreamId, signo: i32) -> Result<Response, ErrorBody> {
    if !(1..=64).contains(&signo) {
        return Err(ErrorBody {
            code: ErrorCode::BadRequest,
            message: format!("signal {signo} is not in 1..=64"),
        });
    }
    let Some(Handle::Exec(handle)) = s.streams.get(stream) else {
        return Err(ErrorBody {
            code: ErrorCode::NoSuchStream,
            message: format!("no running exec on stream {stream}"),
        });
    };
    let Some(pgid) = handle.pgid else {
        return Ok(Response::Signaled);
    };
    match sys::kill_group(pgid, signo) {
        Ok(()) => Ok(Response::Signaled),
        // The group is already gone; the exit is on its way.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(Response::Signaled),
        Err(e) => Err(ErrorBody {
            code: ErrorCode::Internal,
            message: format!("failed to signal process group {pgid}: {e}"),
        }),
    }
}

/// The next stream task to finish: its stream and whether it ended cleanly (not panicked).
/// Pending forever while there is no session or no task.
async fn next_finished(session: &mut Option<Session>) -> (StreamId, bool) {
    match session.as_mut() {
        Some(s) => s.streams.next_finished().await,
        None => std::future::pending().await,
    }
}
