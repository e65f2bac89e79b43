//! The host's stream registry: what every stream of a connection (exec, TCP tunnel, file
//! transfer) shares, written once.
//!
//! Owns: [`StreamRegistry`] (stream id allocation, the id → endpoint map the reader task
//! dispatches through, coalesced WINDOW grants, the per-stream close messages `Drop` impls
//! queue, and wake-all when the channel dies), the [`StreamEndpoint`] trait each kind of
//! stream implements, and [`Inbox`] (a receive buffer bounded by its window, with the credit
//! bookkeeping that goes with it).
//!
//! Must not: wait, do I/O, or know what an exec or a tunnel is; the kinds plug in through
//! [`StreamEndpoint`]. It lives inside the connection's state mutex, so nothing here may call
//! back into an endpoint while that lock is held: methods return what the caller must notify.
//!
//! ```text
//!  register(make) ──▶ id (never reused within the connection) ──▶ streams[id] = endpoint
//!  reader task: STDOUT/STDERR(id) ─▶ endpoint.on_data ─▶ Inbox::push (≤ window, else violation)
//!               WINDOW(id)        ─▶ endpoint.on_grant (≤ MAX_WINDOW, else violation)
//!  consumer takes bytes ─▶ Inbox::pop / read ─▶ grant ─▶ queue_grant ─▶ writer: WINDOW(id)
//!  Drop of a stream handle ─▶ queue_close(id, message) ─▶ writer: message after earlier frames
//!  channel death ─▶ close_all() ─▶ every endpoint.on_channel_closed (grants and closes dropped)
//! ```
//!
//! Invariants:
//! - Stream ids are allocated increasing from [`StreamId::FIRST`] and never reused within a
//!   connection, whatever the kind of stream.
//! - An [`Inbox`] never holds more payload bytes than its window: [`Inbox::push`] fails on a
//!   credit overrun before copying anything.
//! - Grants and closes hold at most one entry per stream (grants are summed, a second close
//!   for the same stream replaces the first), so they are bounded by the streams in use.
//! - After [`StreamRegistry::close_all`] nothing can be registered, granted or closed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use kiln_agent_proto::{DataChannel, FlowError, Frame, HostMessage, RecvWindow, StreamId};
use tokio::io::ReadBuf;
use tokio::sync::mpsc::OwnedPermit;
use tokio::sync::mpsc::error::SendError;

use crate::client::ClientInner;
use crate::error::{AgentError, ClosedReason};

/// What the reader task needs from a stream of any kind.
pub(crate) trait StreamEndpoint {
    /// Data from the guest on this stream (STDOUT or STDERR). Returns a grant to send at once
    /// (a detached consumer credits everything back immediately); an error is a protocol
    /// violation that closes the channel.
    fn on_data(&self, channel: DataChannel, data: &[u8]) -> Result<Option<u32>, ClosedReason>;
    /// A WINDOW grant from the guest (credit for the host's STDIN bytes).
    fn on_grant(&self, increment: u32) -> Result<(), ClosedReason>;
    /// The channel died: resolve every waiter of this stream.
    fn on_channel_closed(&self, reason: &ClosedReason);
}

/// Every stream of one connection.
pub(crate) struct StreamRegistry<E> {
    next: Option<StreamId>,
    streams: HashMap<StreamId, E>,
    grants: BTreeMap<StreamId, u64>,
    closes: BTreeMap<StreamId, HostMessage>,
    closed: bool,
}

impl<E: Clone> StreamRegistry<E> {
    /// An empty registry whose first stream will be [`StreamId::FIRST`].
    pub(crate) fn new() -> StreamRegistry<E> {
        StreamRegistry {
            next: Some(StreamId::FIRST),
            streams: HashMap::new(),
            grants: BTreeMap::new(),
            closes: BTreeMap::new(),
            closed: false,
        }
    }

    /// Allocates a fresh stream id and registers the endpoint `make` builds for it.
    pub(crate) fn register<T>(
        &mut self,
        make: impl FnOnce(StreamId) -> (T, E),
    ) -> Result<T, AgentError> {
        let stream = self.next.ok_or(AgentError::StreamsExhausted)?;
        self.next = stream.next();
        let (handle, endpoint) = make(stream);
        self.streams.insert(stream, endpoint);
        Ok(handle)
    }

    /// Whether `stream` was ever allocated by [`StreamRegistry::register`] (ids are issued
    /// in increasing order and never reused).
    pub(crate) fn was_issued(&self, stream: StreamId) -> bool {
        stream >= StreamId::FIRST && self.next.is_none_or(|next| stream < next)
    }

    /// The endpoint registered for `stream`.
    pub(crate) fn get(&self, stream: StreamId) -> Option<E> {
        self.streams.get(&stream).cloned()
    }

    /// Removes `stream` if `matches` accepts its endpoint; returns the endpoint removed.
    pub(crate) fn remove_if(
        &mut self,
        stream: StreamId,
        matches: impl FnOnce(&E) -> bool,
    ) -> Option<E> {
        if self.streams.get(&stream).is_some_and(matches) {
            self.streams.remove(&stream)
        } else {
            None
        }
    }

    /// Forgets `stream` (its handle is gone; later frames for it are ignored).
    pub(crate) fn forget(&mut self, stream: StreamId) {
        self.streams.remove(&stream);
    }

    /// Adds a WINDOW grant for the writer, summed with any grant not yet sent.
    pub(crate) fn queue_grant(&mut self, stream: StreamId, increment: u32) {
        if !self.closed {
            *self.grants.entry(stream).or_insert(0) += u64::from(increment);
        }
    }

    /// The pending grants as WINDOW frames (each ≤ `u32::MAX`), emptying the list.
    pub(crate) fn take_grants(&mut self) -> Vec<Frame> {
        let grants = std::mem::take(&mut self.grants);
        let mut frames = Vec::with_capacity(grants.len());
        for (stream, mut total) in grants {
            while total > 0 {
                let increment = u32::try_from(total).unwrap_or(u32::MAX);
                total -= u64::from(increment);
                frames.push(Frame::Window { stream, increment });
            }
        }
        frames
    }

    /// Queues `message`, the message that ends `stream` from the host's side, for the writer
    /// (one per stream; never blocks, never lost to a full frame queue).
    pub(crate) fn queue_close(&mut self, stream: StreamId, message: HostMessage) {
        if !self.closed {
            self.closes.insert(stream, message);
        }
    }

    /// The pending close messages, emptying the list.
    pub(crate) fn take_closes(&mut self) -> BTreeMap<StreamId, HostMessage> {
        std::mem::take(&mut self.closes)
    }

    /// The channel died: drops pending grants and closes and returns every endpoint, which
    /// the caller must notify (outside the lock) with [`StreamEndpoint::on_channel_closed`].
    pub(crate) fn close_all(&mut self) -> Vec<E> {
        self.closed = true;
        self.grants.clear();
        self.closes.clear();
        self.streams.drain().map(|(_, e)| e).collect()
    }
}

/// Bytes received on one stream and not yet consumed, bounded by the stream's window.
///
/// Payloads are copied out of the decoder's buffers (so they never pin them); consecutive
/// bytes of the same channel form one segment.
pub(crate) struct Inbox {
    /// Payload bytes of all queued segments, in order.
    data: BytesMut,
    /// (channel, length) of each queued segment.
    segments: VecDeque<(DataChannel, usize)>,
    window: RecvWindow,
}

impl Inbox {
    /// An empty inbox whose window of `window` bytes is all granted to the peer.
    pub(crate) fn new(window: u32) -> Inbox {
        Inbox {
            data: BytesMut::new(),
            segments: VecDeque::new(),
            window: RecvWindow::new(window),
        }
    }

    /// Accounts and queues `data`; fails without queueing anything on a credit overrun.
    pub(crate) fn push(&mut self, channel: DataChannel, data: &[u8]) -> Result<(), FlowError> {
        self.window.on_data(data.len())?;
        self.data.extend_from_slice(data);
        match self.segments.back_mut() {
            Some((last, len)) if *last == channel => *len += data.len(),
            _ => self.segments.push_back((channel, data.len())),
        }
        Ok(())
    }

    /// Accounts `len` bytes that arrive for a consumer that is gone: nothing is queued and
    /// the whole credit is returned at once (so the peer never stalls on them).
    pub(crate) fn accept_discarded(&mut self, len: usize) -> Result<Option<u32>, FlowError> {
        self.window.on_data(len)?;
        self.window.on_consumed(len);
        Ok(self.window.flush())
    }

    /// Takes the oldest segment, with the grant its consumption earns (if one is due).
    pub(crate) fn pop_segment(&mut self) -> Option<(DataChannel, Bytes, Option<u32>)> {
        let (channel, len) = self.segments.pop_front()?;
        let bytes = self.data.split_to(len).freeze();
        let grant = self.window.on_consumed(len);
        Some((channel, bytes, grant))
    }

    /// Copies as many queued bytes (across segments) as fit into `buf`; returns how many and
    /// the grant their consumption earns.
    pub(crate) fn read(&mut self, buf: &mut ReadBuf<'_>) -> (usize, Option<u32>) {
        let n = buf.remaining().min(self.data.len());
        buf.put_slice(&self.data[..n]);
        self.data.advance(n);
        let mut left = n;
        while left > 0 {
            let Some((_, len)) = self.segments.front_mut() else {
                break;
            };
            if *len > left {
                *len -= left;
                left = 0;
            } else {
                left -= *len;
                self.segments.pop_front();
            }
        }
        (n, self.window.on_consumed(n))
    }

    /// Drops everything queued and returns all credit owed for it (and any not yet granted).
    pub(crate) fn discard(&mut self) -> Option<u32> {
        let buffered = self.data.len();
        self.data.clear();
        self.segments.clear();
        self.window.on_consumed(buffered);
        self.window.flush()
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_ids_are_never_reused() {
        let mut r: StreamRegistry<u8> = StreamRegistry::new();
        let a = r.register(|s| (s, 1)).expect("first id");
        r.forget(a);
        let b = r.register(|s| (s, 2)).expect("second id");
        assert_ne!(a, b);
        assert_eq!(a, StreamId::FIRST);
        assert_eq!(r.get(b), Some(2));
        assert_eq!(r.get(a), None);
    }

    #[test]
    fn registry_grants_are_coalesced_per_stream() {
        let mut r: StreamRegistry<u8> = StreamRegistry::new();
        let s = r.register(|s| (s, 0)).expect("id");
        r.queue_grant(s, 10);
        r.queue_grant(s, 5);
        let frames = r.take_grants();
        assert_eq!(
            frames,
            vec![Frame::Window {
                stream: s,
                increment: 15
            }]
        );
        assert!(r.take_grants().is_empty());
    }

    #[test]
    fn registry_close_all_returns_every_endpoint_and_blocks_later_work() {
        let mut r: StreamRegistry<u8> = StreamRegistry::new();
        let s = r.register(|s| (s, 7)).expect("id");
        r.queue_grant(s, 1);
        let mut closed = r.close_all();
        closed.sort_unstable();
        assert_eq!(closed, vec![7]);
        r.queue_grant(s, 1);
        r.queue_close(s, HostMessage::TcpClose { stream: s });
        assert!(r.take_grants().is_empty());
        assert!(r.take_closes().is_empty());
    }

    #[test]
    fn inbox_overrun_is_refused_before_queueing() {
        let mut inbox = Inbox::new(4);
        assert!(inbox.push(DataChannel::Stdout, b"abcde").is_err());
        assert!(inbox.is_empty());
    }

    #[test]
    fn inbox_read_spans_segments_and_grants_back() {
        let mut inbox = Inbox::new(8);
        inbox.push(DataChannel::Stdout, b"abc").expect("in window");
        inbox.push(DataChannel::Stderr, b"de").expect("in window");
        let mut storage = [0u8; 4];
        let mut buf = ReadBuf::new(&mut storage);
        let (n, grant) = inbox.read(&mut buf);
        assert_eq!(n, 4);
        assert_eq!(buf.filled(), b"abcd");
        assert_eq!(grant, Some(4));
        let (channel, rest, _) = inbox.pop_segment().expect("one byte left");
        assert_eq!((channel, &rest[..]), (DataChannel::Stderr, &b"e"[..]));
        assert!(inbox.pop_segment().is_none());
    }
}

type Reservation =
    Pin<Box<dyn Future<Output = Result<OwnedPermit<Bytes>, SendError<()>>> + Send + 'static>>;

/// A slot in the connection's bounded frame queue for a poll-based writer (the `AsyncWrite`
/// of a tunnel or of a file write): reserved across polls, then filled with one frame.
#[derive(Default)]
pub(crate) struct FrameSlot(Option<Reservation>);

impl FrameSlot {
    /// Waits for a slot; an error once the channel is closed.
    pub(crate) fn poll_reserve(
        &mut self,
        client: &ClientInner,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<OwnedPermit<Bytes>>> {
        let reservation = self
            .0
            .get_or_insert_with(|| Box::pin(client.frame_sender().reserve_owned()));
        let result = ready!(reservation.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(result.map_err(|_| {
            let reason = match client.shared.closed_error() {
                AgentError::ChannelClosed(reason) => reason,
                _ => ClosedReason::Eof,
            };
            closed_io_error(&reason)
        }))
    }
}

/// Sends `chunk` toward the guest as a STDIN data frame of `stream`, in a reserved slot;
/// answers its length.
pub(crate) fn send_data(
    permit: OwnedPermit<Bytes>,
    stream: StreamId,
    chunk: Bytes,
) -> io::Result<usize> {
    let n = chunk.len();
    let frame = Frame::Data {
        stream,
        channel: DataChannel::Stdin,
        data: chunk,
    };
    let bytes = frame
        .to_bytes()
        .map_err(|e| io::Error::other(AgentError::Encode(e)))?;
    permit.send(bytes);
    Ok(n)
}

/// The `io::Error` of a writer or reader whose channel closed.
pub(crate) fn closed_io_error(reason: &ClosedReason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        AgentError::ChannelClosed(reason.clone()),
    )
}
