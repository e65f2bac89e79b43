//! One TCP tunnel: a non-blocking connect to `127.0.0.1:port` inside the guest, then bytes
//! both ways between that socket and the tunnel's stream, within credit.
//!
//! Owns: [`start`], which validates a `tcp_connect` request and returns a [`TunnelHandle`]
//! (kept by the session) plus the tunnel's task (run by the session's `JoinSet`).
//!
//! ```text
//!  start ─▶ task: connect (non-blocking; ≤ connect timeout; a tcp_close cancels it)
//!                 │ failed ─▶ error connect_failed (the request's only answer; no stream)
//!                 ▼ connected
//!            WINDOW (initial credit for the host's bytes) ─▶ response tcp_connected
//!                 ├─ to host:   readable ─▶ read ≤ min(credit, 64 KiB) ─▶ STDOUT frame
//!                 │             ... EOF ─▶ tcp_eof
//!                 └─ to socket: STDIN bytes ─▶ write ─▶ WINDOW back as written
//!                               tcp_shutdown ─▶ shutdown(SHUT_WR) after the bytes before it
//!            both directions done │ socket error │ tcp_close ─▶ close socket ─▶ tcp_closed
//! ```
//!
//! Invariants:
//! - The session loop never waits on a tunnel: STDIN bytes are handed over through a queue that
//!   is unbounded by count but bounded in bytes by the tunnel's receive window (a host that
//!   overruns it has the bytes dropped); everything that can wait (connect, socket I/O, credit,
//!   the outbound queue) happens in the tunnel's own task, so a slow tunnel stalls only itself.
//! - Guest-side buffering per tunnel: at most the receive window of host bytes plus one read
//!   chunk of socket bytes, taken only once the socket is readable and never larger than the
//!   host's credit (an idle tunnel holds no buffer).
//! - The request is answered by the task, exactly once, before any other frame of the stream.
//!   An opened tunnel's last message is `tcp_closed` (unless its session is dropped first:
//!   then the task is dropped, which closes the socket, and its frames are discarded by epoch).
//! - The socket is closed when the task ends or is dropped; nothing else holds it.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kiln_agent_proto::{
    DataChannel, ErrorBody, ErrorCode, Frame, GuestMessage, MAX_DATA_PAYLOAD, MAX_WINDOW,
    RequestId, Response, StreamId,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::oneshot;

use crate::exec::os_message;
use crate::outbound::Outbound;
use crate::session::AgentConfig;
use crate::streams::{FeedError, InboundRx, InboundTx, OutputCredit, inbound};

type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What the session hands to a tunnel's socket writer, in stream order.
enum ToSocket {
    /// Bytes from STDIN frames.
    Data(Bytes),
    /// `tcp_shutdown`: `shutdown(SHUT_WR)` once the bytes before it are written.
    Shutdown,
}

/// The session's view of an open (or connecting) tunnel.
pub(crate) struct TunnelHandle {
    /// Credit for the bytes the tunnel sends to the host, fed by the host's WINDOW frames.
    pub(crate) credit: Arc<OutputCredit>,
    /// The `tcp_connect` request the task answers.
    pub(crate) request: RequestId,
    /// Set by the task just before it answers the request.
    pub(crate) answered: Arc<AtomicBool>,
    /// `None` once the host shut the tunnel down for writing.
    feed: Option<InboundTx<ToSocket>>,
    /// Fired (or dropped) to close the tunnel at once.
    close: Option<oneshot::Sender<()>>,
}

impl TunnelHandle {
    /// Hands STDIN bytes to the tunnel's socket writer.
    pub(crate) fn feed(&mut self, data: Bytes) -> Result<(), FeedError> {
        let Some(feed) = &self.feed else {
            return Err(FeedError::AfterEnd);
        };
        // The task may be finishing (socket closed); the bytes are then moot.
        Ok(feed.send_data(data.len(), ToSocket::Data(data))?)
    }

    /// `tcp_shutdown`: after the bytes already received, shut the socket down for writing.
    /// Idempotent.
    pub(crate) fn shutdown_write(&mut self) {
        if let Some(feed) = self.feed.take() {
            feed.send_marker(ToSocket::Shutdown);
        }
    }

    /// `tcp_close`: close the socket now (cancels a connect in progress). Idempotent.
    pub(crate) fn close(&mut self) {
        if let Some(close) = self.close.take() {
            let _ = close.send(());
        }
    }
}

/// A started tunnel.
pub(crate) struct Started {
    pub(crate) handle: TunnelHandle,
    pub(crate) task: Task,
}

fn bad_request(message: String) -> ErrorBody {
    ErrorBody {
        code: ErrorCode::BadRequest,
        message,
    }
}

/// Validates a `tcp_connect` request and prepares its tunnel. On `Ok` the request is answered
/// by the returned task (after the connect); on `Err` the caller answers with the error.
pub(crate) fn start(
    config: &AgentConfig,
    request: RequestId,
    stream: StreamId,
    port: u16,
    window: u32,
    out: Outbound,
) -> Result<Started, ErrorBody> {
    if port == 0 {
        return Err(bad_request("port 0 is not a port to connect to".to_owned()));
    }
    if window == 0 || u64::from(window) > MAX_WINDOW {
        return Err(bad_request(format!(
            "window {window} is not in 1..={MAX_WINDOW}"
        )));
    }
    let credit = Arc::new(OutputCredit::new(window));
    let recv_window = config.tunnel_window.clamp(1, MAX_WINDOW as u32);
    let answered = Arc::new(AtomicBool::new(false));
    let (feed_tx, feed_rx) = inbound(recv_window);
    let (close_tx, close_rx) = oneshot::channel();
    let tunnel = Tunnel {
        stream,
        port,
        request,
        answered: Arc::clone(&answered),
        out,
        credit: Arc::clone(&credit),
        recv_window,
        feed: feed_rx,
        close: close_rx,
        connect_timeout: config.tunnel_connect_timeout,
    };
    Ok(Started {
        handle: TunnelHandle {
            credit,
            request,
            answered,
            feed: Some(feed_tx),
            close: Some(close_tx),
        },
        task: Box::pin(tunnel.run()),
    })
}

/// Everything a tunnel's task owns.
struct Tunnel {
    stream: StreamId,
    port: u16,
    request: RequestId,
    answered: Arc<AtomicBool>,
    out: Outbound,
    credit: Arc<OutputCredit>,
    recv_window: u32,
    feed: InboundRx<ToSocket>,
    close: oneshot::Receiver<()>,
    connect_timeout: Duration,
}

/// Why a pump stopped early.
enum PumpError {
    /// The connection to the host ended (the outbound writer is gone): nothing more to say.
    Gone,
    /// The socket failed.
    Io(io::Error),
}

/// How an open tunnel ended.
enum End {
    /// The host connection is gone; say nothing.
    Gone,
    /// Report `tcp_closed` with this error (`None`: clean).
    Closed(Option<String>),
}

impl Tunnel {
    async fn run(mut self) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        // tokio's connect is non-blocking: socket(SOCK_NONBLOCK), connect() (EINPROGRESS is
        // expected), wait for writability, then SO_ERROR decides. Only this task waits.
        let connect = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr));
        let connected = tokio::select! {
            r = connect => r,
            _ = &mut self.close => {
                let msg = format!("connection to {addr} cancelled by the host");
                self.answer(Err(connect_failed(msg))).await;
                return;
            }
        };
        let mut socket = match connected {
            Ok(Ok(socket)) => socket,
            Ok(Err(e)) => {
                let msg = match e.raw_os_error() {
                    Some(libc::ECONNREFUSED) => format!("connection to {addr} refused"),
                    _ => format!("connection to {addr} failed: {}", os_message(&e)),
                };
                self.answer(Err(connect_failed(msg))).await;
                return;
            }
            Err(_) => {
                let msg = format!(
                    "connection to {addr} timed out after {} ms",
                    self.connect_timeout.as_millis()
                );
                self.answer(Err(connect_failed(msg))).await;
                return;
            }
        };
        // Tunnelled protocols are often request/response: forward small writes at once.
        let _ = socket.set_nodelay(true);
        let stream = self.stream;
        let grant = Frame::Window {
            stream,
            increment: self.recv_window,
        };
        if !self.out.send(&grant).await {
            return;
        }
        self.answer(Ok(Response::TcpConnected)).await;
        let end = self.pump(&mut socket).await;
        // Close the socket before telling the host it is closed.
        drop(socket);
        if let End::Closed(error) = end {
            let msg = GuestMessage::TcpClosed { stream, error };
            self.out.message(&msg).await;
        }
    }

    async fn answer(&self, result: Result<Response, ErrorBody>) {
        self.answered.store(true, Ordering::SeqCst);
        let id = self.request;
        let msg = match result {
            Ok(response) => GuestMessage::Response { id, response },
            Err(error) => GuestMessage::Error {
                id: Some(id),
                error,
            },
        };
        self.out.message(&msg).await;
    }

    /// Moves bytes both ways until both directions are done, the socket fails or the host
    /// closes the tunnel.
    async fn pump(&mut self, socket: &mut TcpStream) -> End {
        let (mut rd, mut wr) = socket.split();
        let to_host = pump_to_host(&mut rd, self.stream, &self.out, &self.credit);
        let to_socket = pump_to_socket(&mut wr, &mut self.feed, self.stream, &self.out);
        tokio::pin!(to_host, to_socket);
        let mut read_done = false;
        let mut write_done = false;
        let failed = |e: PumpError| match e {
            PumpError::Gone => End::Gone,
            PumpError::Io(e) => End::Closed(Some(os_message(&e))),
        };
        while !(read_done && write_done) {
            tokio::select! {
                r = &mut to_host, if !read_done => match r {
                    Ok(()) => read_done = true,
                    Err(e) => return failed(e),
                },
                r = &mut to_socket, if !write_done => match r {
                    Ok(()) => write_done = true,
                    Err(e) => return failed(e),
                },
                // Fired, or the handle dropped: either way the host is done with it.
                _ = &mut self.close => return End::Closed(None),
            }
        }
        End::Closed(None)
    }
}

fn connect_failed(message: String) -> ErrorBody {
    ErrorBody {
        code: ErrorCode::ConnectFailed,
        message,
    }
}

/// Socket → STDOUT frames, within the host's credit; `tcp_eof` after the last one. Credit
/// and a buffer are taken only once the socket is readable, so an idle tunnel holds neither.
async fn pump_to_host(
    rd: &mut ReadHalf<'_>,
    stream: StreamId,
    out: &Outbound,
    credit: &OutputCredit,
) -> Result<(), PumpError> {
    loop {
        rd.readable().await.map_err(PumpError::Io)?;
        let want = credit.acquire(MAX_DATA_PAYLOAD).await;
        let mut chunk = BytesMut::with_capacity(want);
        let n = match rd.try_read_buf(&mut (&mut chunk).limit(want)) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                credit.give_back(want);
                continue;
            }
            Err(e) => {
                credit.give_back(want);
                return Err(PumpError::Io(e));
            }
        };
        credit.give_back(want - n);
        if n == 0 {
            return if out.message(&GuestMessage::TcpEof { stream }).await {
                Ok(())
            } else {
                Err(PumpError::Gone)
            };
        }
        let frame = Frame::Data {
            stream,
            channel: DataChannel::Stdout,
            data: chunk.freeze(),
        };
        if !out.send(&frame).await {
            return Err(PumpError::Gone);
        }
    }
}

/// STDIN bytes → socket, granting credit back as they are written; `shutdown(SHUT_WR)` on
/// `tcp_shutdown`.
async fn pump_to_socket(
    wr: &mut WriteHalf<'_>,
    feed: &mut InboundRx<ToSocket>,
    stream: StreamId,
    out: &Outbound,
) -> Result<(), PumpError> {
    while let Some(item) = feed.recv().await {
        match item {
            ToSocket::Data(data) => {
                wr.write_all(&data).await.map_err(PumpError::Io)?;
                let grant = feed.consumed(data.len());
                if let Some(increment) = grant
                    && !out.send(&Frame::Window { stream, increment }).await
                {
                    return Err(PumpError::Gone);
                }
            }
            ToSocket::Shutdown => {
                wr.shutdown().await.map_err(PumpError::Io)?;
                return Ok(());
            }
        }
    }
    // The handle is gone, which happens only when the session drops the tunnel.
    Err(PumpError::Gone)
}

#[cfg(test)]
mod tests;
