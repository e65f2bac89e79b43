//! One TCP tunnel on the host side: a byte stream to `127.0.0.1:PORT` inside the guest.
//!
//! Owns: [`TcpTunnel`] (`AsyncRead + AsyncWrite`, so `tokio::io::copy_bidirectional` can
//! splice it to a host socket) and the per-tunnel state the reader task fills
//! ([`TunnelShared`]).
//!
//! ```text
//!  open_tcp ── tcp_connect{stream, port, window} ──▶ guest connects ── WINDOW, tcp_connected
//!  poll_write ── STDIN frames (≤ guest credit) ───▶ guest socket      ◀── WINDOW as written
//!  poll_read  ◀── inbox ◀── STDOUT frames (≤ window) ◀── guest socket ── tcp_eof: read → 0
//!  poll_shutdown ── tcp_shutdown (after queued bytes) ──▶ shutdown(SHUT_WR) in the guest
//!  drop ── tcp_close (never lost, never blocks) ──▶ guest closes the socket
//!  guest: tcp_closed{error} ── last message; an error fails reads (after buffered bytes)
//!                              and writes with `ConnectionReset`
//! ```
//!
//! Invariants:
//! - The inbox holds at most the tunnel's window of guest bytes: the reader rejects a guest
//!   that overruns its credit (the channel closes), and credit is granted back only as
//!   `poll_read` hands bytes to the caller. Bytes are copied out of the decoder's buffers.
//! - A write takes guest credit only once it holds a slot in the frame queue, and waits for
//!   credit before it queues for a slot, so a tunnel stalled on credit never holds a slot
//!   other traffic needs; host memory for outgoing bytes is the (bounded) frame queue.
//! - `tcp_shutdown` goes through the frame queue after the tunnel's earlier bytes; `tcp_close`
//!   goes through the writer's side list (like WINDOW grants), so `Drop` never blocks and the
//!   close is never dropped for a full queue.
//! - After a guest error or the channel's death every pending read and write resolves.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use kiln_agent_proto::{DataChannel, HostMessage, MAX_DATA_PAYLOAD, SendCredit, StreamId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::client::ClientInner;
use crate::error::{AgentError, ClosedReason};
use crate::registry::{FrameSlot, Inbox, StreamEndpoint, closed_io_error, send_data};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the guest ended a tunnel.
#[derive(Debug, Clone)]
enum GuestEnd {
    /// `tcp_closed` without an error.
    Clean,
    /// `tcp_closed` with the guest socket's error.
    Failed(String),
}

struct State {
    /// Guest bytes not yet read by the caller, bounded by the tunnel's window.
    inbox: Inbox,
    /// The guest socket reached EOF (`tcp_eof`): reads return 0 once the inbox is empty.
    eof: bool,
    /// Credit for bytes toward the guest.
    credit: SendCredit,
    /// The guest closed the tunnel (`tcp_closed`).
    ended: Option<GuestEnd>,
    /// The whole channel died.
    channel_closed: Option<ClosedReason>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl State {
    fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

/// Per-tunnel state shared by the reader task and the [`TcpTunnel`].
pub(crate) struct TunnelShared {
    stream: StreamId,
    port: u16,
    state: Mutex<State>,
}

impl TunnelShared {
    pub(crate) fn new(stream: StreamId, port: u16, window: u32) -> TunnelShared {
        TunnelShared {
            stream,
            port,
            state: Mutex::new(State {
                inbox: Inbox::new(window),
                eof: false,
                // The guest grants the initial credit with a WINDOW frame before it answers.
                credit: SendCredit::new(0),
                ended: None,
                channel_closed: None,
                read_waker: None,
                write_waker: None,
            }),
        }
    }

    fn violation(&self, what: impl fmt::Display) -> ClosedReason {
        ClosedReason::Violation {
            what: format!("tunnel stream {}: {what}", self.stream),
        }
    }

    /// `tcp_eof`: the guest socket will send no more bytes.
    pub(crate) fn on_eof(&self) {
        let mut st = lock(&self.state);
        st.eof = true;
        if let Some(w) = st.read_waker.take() {
            w.wake();
        }
    }

    /// `tcp_closed`: the tunnel is gone in the guest.
    pub(crate) fn on_closed(&self, error: Option<String>) {
        let mut st = lock(&self.state);
        st.ended = Some(match error {
            Some(message) => GuestEnd::Failed(message),
            None => GuestEnd::Clean,
        });
        st.wake_all();
    }

    /// Whether the guest side is already gone (no `tcp_close` needed).
    fn is_finished(&self) -> bool {
        let st = lock(&self.state);
        st.ended.is_some() || st.channel_closed.is_some()
    }

    /// Marks a tunnel the guest never opened (its `tcp_connect` failed) as ended.
    pub(crate) fn mark_never_opened(&self) {
        lock(&self.state).ended = Some(GuestEnd::Clean);
    }
}

impl StreamEndpoint for TunnelShared {
    /// Queues bytes from the guest socket; fails if the guest overran its credit, sent bytes
    /// after `tcp_eof`, or used STDERR (a tunnel has no such channel).
    fn on_data(&self, channel: DataChannel, data: &[u8]) -> Result<Option<u32>, ClosedReason> {
        if channel == DataChannel::Stderr {
            return Err(ClosedReason::Violation {
                what: format!("sent a STDERR frame on tunnel stream {}", self.stream),
            });
        }
        let mut st = lock(&self.state);
        if st.eof {
            return Err(self.violation("bytes after tcp_eof"));
        }
        st.inbox
            .push(channel, data)
            .map_err(|e| self.violation(e))?;
        if let Some(w) = st.read_waker.take() {
            w.wake();
        }
        Ok(None)
    }

    /// Adds credit granted by the guest for bytes toward its socket.
    fn on_grant(&self, increment: u32) -> Result<(), ClosedReason> {
        let mut st = lock(&self.state);
        st.credit.grant(increment).map_err(|e| self.violation(e))?;
        if let Some(w) = st.write_waker.take() {
            w.wake();
        }
        Ok(())
    }

    fn on_channel_closed(&self, reason: &ClosedReason) {
        let mut st = lock(&self.state);
        st.channel_closed = Some(reason.clone());
        st.wake_all();
    }
}

/// A TCP connection to `127.0.0.1:port` inside the guest, from [`crate::AgentClient::open_tcp`].
///
/// - Reading returns the bytes the guest socket received, then `Ok(0)` once the guest's peer
///   shut down writing, or `ConnectionReset` if the guest socket failed, or
///   `ConnectionAborted` if the agent channel died (bytes received before either are read
///   first).
/// - Writing sends bytes within the guest's credit (it waits while the guest socket is full).
/// - [`AsyncWrite::poll_shutdown`] half-closes toward the guest (`shutdown(SHUT_WR)` there,
///   after the bytes already written); reading goes on.
/// - Dropping it closes the guest socket; bytes not yet delivered either way are discarded.
///
/// Host memory is bounded by the tunnel's window (`ClientConfig::tunnel_window`) for
/// incoming bytes and by the connection's frame queue for outgoing ones.
pub struct TcpTunnel {
    client: Arc<ClientInner>,
    tunnel: Arc<TunnelShared>,
    /// A slot in the frame queue being waited for (by a write or the shutdown).
    reservation: FrameSlot,
    shutdown_sent: bool,
}

// What callers rely on (`copy_bidirectional` in a spawned task), checked at compile time.
const _: () = {
    const fn assert_stream<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>() {}
    assert_stream::<TcpTunnel>();
};

impl fmt::Debug for TcpTunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpTunnel")
            .field("stream", &self.tunnel.stream)
            .field("port", &self.tunnel.port)
            .field("shutdown_sent", &self.shutdown_sent)
            .finish_non_exhaustive()
    }
}

impl TcpTunnel {
    pub(crate) fn new(client: Arc<ClientInner>, tunnel: Arc<TunnelShared>) -> TcpTunnel {
        TcpTunnel {
            client,
            tunnel,
            reservation: FrameSlot::default(),
            shutdown_sent: false,
        }
    }

    /// The stream carrying this tunnel's bytes.
    pub fn stream(&self) -> StreamId {
        self.tunnel.stream
    }

    /// The guest port this tunnel is connected to.
    pub fn port(&self) -> u16 {
        self.tunnel.port
    }

    fn reset_error(&self, message: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!(
                "tunnel to guest port {} failed in the guest: {message}",
                self.tunnel.port
            ),
        )
    }

    /// Why writing is impossible, if it is.
    fn write_error(&self, st: &State) -> Option<io::Error> {
        if let Some(reason) = &st.channel_closed {
            return Some(closed_io_error(reason));
        }
        match &st.ended {
            Some(GuestEnd::Failed(message)) => Some(self.reset_error(message)),
            Some(GuestEnd::Clean) => Some(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("tunnel to guest port {} is closed", self.tunnel.port),
            )),
            None if self.shutdown_sent => Some(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tunnel was shut down for writing",
            )),
            None => None,
        }
    }
}

impl AsyncRead for TcpTunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let grant = {
            let mut st = lock(&this.tunnel.state);
            if st.inbox.is_empty() {
                if st.eof {
                    return Poll::Ready(Ok(()));
                }
                if let Some(reason) = &st.channel_closed {
                    return Poll::Ready(Err(closed_io_error(reason)));
                }
                match &st.ended {
                    Some(GuestEnd::Failed(message)) => {
                        return Poll::Ready(Err(this.reset_error(message)));
                    }
                    // A clean close without tcp_eof (the host closed it): nothing more comes.
                    Some(GuestEnd::Clean) => return Poll::Ready(Ok(())),
                    None => {}
                }
                st.read_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let (_, grant) = st.inbox.read(buf);
            grant
        };
        if let Some(increment) = grant {
            this.client
                .shared
                .queue_grant(this.tunnel.stream, increment);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TcpTunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        {
            let mut st = lock(&this.tunnel.state);
            if let Some(e) = this.write_error(&st) {
                return Poll::Ready(Err(e));
            }
            if st.credit.available() == 0 {
                st.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        // Credit only grows while we wait: only this writer takes it.
        let permit = ready!(this.reservation.poll_reserve(&this.client, cx))?;
        let chunk = {
            let mut st = lock(&this.tunnel.state);
            if let Some(e) = this.write_error(&st) {
                return Poll::Ready(Err(e));
            }
            let n = st.credit.take(data.len().min(MAX_DATA_PAYLOAD));
            Bytes::copy_from_slice(&data[..n])
        };
        Poll::Ready(send_data(permit, this.tunnel.stream, chunk))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued frames are written and flushed by the connection's writer task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shutdown_sent {
            return Poll::Ready(Ok(()));
        }
        {
            let st = lock(&this.tunnel.state);
            if let Some(reason) = &st.channel_closed {
                return Poll::Ready(Err(closed_io_error(reason)));
            }
            if st.ended.is_some() {
                // The guest socket is already closed: nothing left to shut down.
                return Poll::Ready(Ok(()));
            }
        }
        let permit = ready!(this.reservation.poll_reserve(&this.client, cx))?;
        let frame = HostMessage::TcpShutdown {
            stream: this.tunnel.stream,
        }
        .to_frame()
        .and_then(|f| f.to_bytes())
        .map_err(|e| io::Error::other(AgentError::Encode(e)))?;
        permit.send(frame);
        this.shutdown_sent = true;
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpTunnel {
    fn drop(&mut self) {
        let stream = self.tunnel.stream;
        self.client.shared.forget_stream(stream);
        if !self.tunnel.is_finished() {
            self.client
                .shared
                .queue_stream_close(stream, HostMessage::TcpClose { stream });
        }
    }
}
