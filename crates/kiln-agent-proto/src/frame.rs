//! Frame kinds, the 12-byte header and frame encoding.
//!
//! Owns: [`FrameKind`] with each kind's payload bounds and stream rule, [`StreamId`],
//! [`Frame`] and its encoder, and header validation used by the [`crate::Decoder`].
//!
//! Invariants: an encoded frame always satisfies the same rules the decoder checks (magic,
//! zero flags, stream rule, payload bounds), so `decode(encode(f)) == f` for every frame that
//! encodes successfully. See the crate docs for the byte diagram.

use std::fmt;
use std::num::NonZeroU32;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::error::ProtoError;
use crate::handshake::{SyncAckFrame, SyncFrame};
use crate::{
    FRAME_MAGIC, HEADER_LEN, MAX_CONTROL_PAYLOAD, MAX_DATA_PAYLOAD, MAX_OFFERED_VERSIONS,
    MAX_SYNC_ACK_PAYLOAD,
};

/// What a frame carries. The numeric values are the wire values of the `kind` byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Host → guest: start a new session (see [`SyncFrame`]).
    Sync = 0x01,
    /// Guest → host: the session for a nonce has started (see [`SyncAckFrame`]).
    SyncAck = 0x02,
    /// Either way: one JSON control message.
    Control = 0x03,
    /// Either way: a credit grant for the peer's data on one stream.
    Window = 0x04,
    /// Host → guest: bytes for an exec's stdin, or for a TCP tunnel's guest socket.
    Stdin = 0x10,
    /// Guest → host: bytes an exec wrote to stdout, or a TCP tunnel's guest socket received.
    Stdout = 0x11,
    /// Guest → host: bytes an exec wrote to stderr.
    Stderr = 0x12,
}

impl FrameKind {
    /// All kinds of this protocol version.
    pub const ALL: [FrameKind; 7] = [
        FrameKind::Sync,
        FrameKind::SyncAck,
        FrameKind::Control,
        FrameKind::Window,
        FrameKind::Stdin,
        FrameKind::Stdout,
        FrameKind::Stderr,
    ];

    /// The kind for a wire byte, if it names one.
    pub fn from_u8(byte: u8) -> Option<FrameKind> {
        FrameKind::ALL.into_iter().find(|k| k.as_u8() == byte)
    }

    /// The wire byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Largest payload this kind may carry; checked before any payload byte is buffered.
    pub fn max_payload(self) -> usize {
        match self {
            FrameKind::Sync => SYNC_FIXED_LEN + 2 * MAX_OFFERED_VERSIONS,
            FrameKind::SyncAck => MAX_SYNC_ACK_PAYLOAD,
            FrameKind::Control => MAX_CONTROL_PAYLOAD,
            FrameKind::Window => 4,
            FrameKind::Stdin | FrameKind::Stdout | FrameKind::Stderr => MAX_DATA_PAYLOAD,
        }
    }

    /// Smallest payload this kind may carry.
    pub fn min_payload(self) -> usize {
        match self {
            FrameKind::Sync => SYNC_FIXED_LEN + 2,
            FrameKind::SyncAck => SYNC_ACK_FIXED_LEN,
            FrameKind::Control => 1,
            FrameKind::Window => 4,
            FrameKind::Stdin | FrameKind::Stdout | FrameKind::Stderr => 1,
        }
    }

    /// Whether frames of this kind live on stream 0 (the control plane). All other kinds must
    /// name a non-zero stream.
    pub fn on_stream_zero(self) -> bool {
        matches!(
            self,
            FrameKind::Sync | FrameKind::SyncAck | FrameKind::Control
        )
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameKind::Sync => "SYNC",
            FrameKind::SyncAck => "SYNC_ACK",
            FrameKind::Control => "CONTROL",
            FrameKind::Window => "WINDOW",
            FrameKind::Stdin => "STDIN",
            FrameKind::Stdout => "STDOUT",
            FrameKind::Stderr => "STDERR",
        })
    }
}

/// Fixed part of a SYNC body: magic (8) + nonce (8) + version count (1).
pub(crate) const SYNC_FIXED_LEN: usize = 17;
/// Fixed part of a SYNC_ACK body: magic (8) + nonce (8) + chosen version (2).
pub(crate) const SYNC_ACK_FIXED_LEN: usize = 18;

/// Identifies one multiplexed stream (one exec or one TCP tunnel). Never zero: stream 0 is the control plane.
/// The host allocates stream ids; they are not reused within a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct StreamId(NonZeroU32);

impl StreamId {
    /// The first stream id a session hands out.
    pub const FIRST: StreamId = StreamId(NonZeroU32::MIN);

    /// A stream id, or `None` for 0.
    pub fn new(id: u32) -> Option<StreamId> {
        NonZeroU32::new(id).map(StreamId)
    }

    /// The wire value.
    pub fn get(self) -> u32 {
        self.0.get()
    }

    /// The following id, or `None` when the id space is exhausted.
    pub fn next(self) -> Option<StreamId> {
        self.0.checked_add(1).map(StreamId)
    }
}

impl TryFrom<u32> for StreamId {
    type Error = &'static str;
    fn try_from(id: u32) -> Result<Self, Self::Error> {
        StreamId::new(id).ok_or("stream id 0 is reserved for the control plane")
    }
}

impl From<StreamId> for u32 {
    fn from(id: StreamId) -> u32 {
        id.get()
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which byte stream of an exec a data frame belongs to. A TCP tunnel uses `Stdin` for the
/// bytes toward its guest socket and `Stdout` for the bytes from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataChannel {
    /// Host → guest.
    Stdin,
    /// Guest → host.
    Stdout,
    /// Guest → host.
    Stderr,
}

impl DataChannel {
    /// The frame kind that carries this channel.
    pub fn kind(self) -> FrameKind {
        match self {
            DataChannel::Stdin => FrameKind::Stdin,
            DataChannel::Stdout => FrameKind::Stdout,
            DataChannel::Stderr => FrameKind::Stderr,
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Start a new session.
    Sync(SyncFrame),
    /// A session has started.
    SyncAck(SyncAckFrame),
    /// One JSON control message, still encoded (see [`crate::HostMessage`] and
    /// [`crate::GuestMessage`] for the typed forms).
    Control(Bytes),
    /// The sender of this frame lets its peer send `increment` more data bytes on `stream`.
    Window {
        /// Stream the credit is for.
        stream: StreamId,
        /// Additional bytes granted (never 0).
        increment: u32,
    },
    /// Raw bytes of one exec's stdin, stdout or stderr, or of one TCP tunnel.
    Data {
        /// Stream the bytes belong to.
        stream: StreamId,
        /// Which of the exec's byte streams.
        channel: DataChannel,
        /// The bytes (1 ..= [`MAX_DATA_PAYLOAD`]).
        data: Bytes,
    },
}

impl Frame {
    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Sync(_) => FrameKind::Sync,
            Frame::SyncAck(_) => FrameKind::SyncAck,
            Frame::Control(_) => FrameKind::Control,
            Frame::Window { .. } => FrameKind::Window,
            Frame::Data { channel, .. } => channel.kind(),
        }
    }

    /// The stream id written in the header (0 for control-plane frames).
    pub fn stream_id(&self) -> u32 {
        match self {
            Frame::Sync(_) | Frame::SyncAck(_) | Frame::Control(_) => 0,
            Frame::Window { stream, .. } | Frame::Data { stream, .. } => stream.get(),
        }
    }

    /// Appends the encoded frame to `dst`. Fails, writing nothing, if the frame breaks a rule
    /// the decoder would reject (payload bounds, zero window, bad version list).
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let kind = self.kind();
        let mut body = BytesMut::new();
        let payload: &[u8] = match self {
            Frame::Sync(sync) => {
                sync.encode_body(&mut body)?;
                &body
            }
            Frame::SyncAck(ack) => {
                ack.encode_body(&mut body)?;
                &body
            }
            Frame::Control(json) => json,
            Frame::Window { increment, .. } => {
                if *increment == 0 {
                    return Err(ProtoError::ZeroWindow);
                }
                body.put_u32_le(*increment);
                &body
            }
            Frame::Data { data, .. } => data,
        };
        if payload.len() > kind.max_payload() {
            return Err(ProtoError::PayloadTooLong {
                kind,
                len: payload.len() as u64,
                max: kind.max_payload(),
            });
        }
        if payload.len() < kind.min_payload() {
            return Err(match kind {
                FrameKind::Stdin | FrameKind::Stdout | FrameKind::Stderr => {
                    ProtoError::EmptyData { kind }
                }
                _ => ProtoError::PayloadTooShort {
                    kind,
                    len: payload.len() as u64,
                    min: kind.min_payload(),
                },
            });
        }
        let len = u32::try_from(payload.len()).map_err(|_| ProtoError::PayloadTooLong {
            kind,
            len: payload.len() as u64,
            max: kind.max_payload(),
        })?;
        dst.reserve(HEADER_LEN + payload.len());
        dst.put_slice(&FRAME_MAGIC);
        dst.put_u8(kind.as_u8());
        dst.put_u8(0);
        dst.put_u32_le(self.stream_id());
        dst.put_u32_le(len);
        dst.put_slice(payload);
        Ok(())
    }

    /// The encoded frame as one buffer.
    pub fn to_bytes(&self) -> Result<Bytes, ProtoError> {
        let mut dst = BytesMut::new();
        self.encode(&mut dst)?;
        Ok(dst.freeze())
    }

    /// Builds a frame from a validated header and its complete payload.
    pub(crate) fn from_parts(header: &Header, payload: Bytes) -> Result<Frame, ProtoError> {
        let stream = StreamId::new(header.stream);
        let nonzero_stream = || {
            stream.ok_or(ProtoError::WrongStream {
                kind: header.kind,
                stream: header.stream,
            })
        };
        Ok(match header.kind {
            FrameKind::Sync => Frame::Sync(SyncFrame::decode_body(&payload)?),
            FrameKind::SyncAck => Frame::SyncAck(SyncAckFrame::decode_body(&payload)?),
            FrameKind::Control => Frame::Control(payload),
            FrameKind::Window => {
                let raw: [u8; 4] =
                    payload[..]
                        .try_into()
                        .map_err(|_| ProtoError::PayloadTooShort {
                            kind: FrameKind::Window,
                            len: payload.len() as u64,
                            min: 4,
                        })?;
                let increment = u32::from_le_bytes(raw);
                if increment == 0 {
                    return Err(ProtoError::ZeroWindow);
                }
                Frame::Window {
                    stream: nonzero_stream()?,
                    increment,
                }
            }
            kind @ (FrameKind::Stdin | FrameKind::Stdout | FrameKind::Stderr) => {
                let channel = match kind {
                    FrameKind::Stdin => DataChannel::Stdin,
                    FrameKind::Stdout => DataChannel::Stdout,
                    _ => DataChannel::Stderr,
                };
                Frame::Data {
                    stream: nonzero_stream()?,
                    channel,
                    data: payload,
                }
            }
        })
    }
}

/// A data frame built in place: the payload is read straight into the buffer behind room
/// for the header, and the header is written once the length is known. The result is
/// byte-identical to [`Frame::encode`] of the same data frame, without the second copy (and,
/// in the guest agent, without a second buffer to allocate and zero on free).
#[derive(Debug)]
pub struct DataFrameBuf {
    buf: BytesMut,
    max_payload: usize,
}

impl DataFrameBuf {
    /// An empty frame with room for up to `max_payload` payload bytes (at most
    /// [`MAX_DATA_PAYLOAD`]).
    pub fn with_capacity(max_payload: usize) -> DataFrameBuf {
        let max_payload = max_payload.min(MAX_DATA_PAYLOAD);
        let mut buf = BytesMut::with_capacity(HEADER_LEN + max_payload);
        buf.put_bytes(0, HEADER_LEN);
        DataFrameBuf { buf, max_payload }
    }

    /// Where payload bytes go: a [`BufMut`] that takes at most the room left.
    pub fn payload_mut(&mut self) -> bytes::buf::Limit<&mut BytesMut> {
        let room = self.max_payload - self.payload_len();
        (&mut self.buf).limit(room)
    }

    /// Extends the payload by `len` zero bytes (at most the room left) and returns them, for
    /// readers that need an initialized slice.
    pub fn zeroed_payload(&mut self, len: usize) -> &mut [u8] {
        let start = self.buf.len();
        let len = len.min(self.max_payload - self.payload_len());
        self.buf.put_bytes(0, len);
        &mut self.buf[start..]
    }

    /// Payload bytes written so far.
    pub fn payload_len(&self) -> usize {
        self.buf.len() - HEADER_LEN
    }

    /// Keeps only the first `len` payload bytes.
    pub fn truncate_payload(&mut self, len: usize) {
        self.buf.truncate(HEADER_LEN + len);
    }

    /// The encoded frame for `stream` and `channel`. Fails on an empty payload, which the
    /// decoder would reject.
    pub fn finish(mut self, stream: StreamId, channel: DataChannel) -> Result<Bytes, ProtoError> {
        let kind = channel.kind();
        let len = self.payload_len();
        if len == 0 {
            return Err(ProtoError::EmptyData { kind });
        }
        let mut header = &mut self.buf[..HEADER_LEN];
        header.put_slice(&FRAME_MAGIC);
        header.put_u8(kind.as_u8());
        header.put_u8(0);
        header.put_u32_le(stream.get());
        // Cannot truncate: len <= MAX_DATA_PAYLOAD.
        header.put_u32_le(len as u32);
        Ok(self.buf.freeze())
    }
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) kind: FrameKind,
    pub(crate) stream: u32,
    pub(crate) len: usize,
}

/// Parses and validates the 12 header bytes: magic, kind, flags, stream rule and the payload
/// length against the kind's bounds. Nothing is allocated.
pub(crate) fn parse_header(raw: &[u8; HEADER_LEN]) -> Result<Header, ProtoError> {
    let magic = [raw[0], raw[1]];
    if magic != FRAME_MAGIC {
        return Err(ProtoError::BadMagic { found: magic });
    }
    let kind = FrameKind::from_u8(raw[2]).ok_or(ProtoError::UnknownKind { kind: raw[2] })?;
    if raw[3] != 0 {
        return Err(ProtoError::ReservedFlags {
            kind,
            flags: raw[3],
        });
    }
    let stream = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
    if kind.on_stream_zero() != (stream == 0) {
        return Err(ProtoError::WrongStream { kind, stream });
    }
    let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let len_usize = len as usize;
    if len_usize > kind.max_payload() {
        return Err(ProtoError::PayloadTooLong {
            kind,
            len: u64::from(len),
            max: kind.max_payload(),
        });
    }
    if len_usize < kind.min_payload() {
        return Err(match kind {
            FrameKind::Stdin | FrameKind::Stdout | FrameKind::Stderr => {
                ProtoError::EmptyData { kind }
            }
            _ => ProtoError::PayloadTooShort {
                kind,
                len: u64::from(len),
                min: kind.min_payload(),
            },
        });
    }
    Ok(Header {
        kind,
        stream,
        len: len_usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_frame_buf_encodes_like_frame_encode() {
        let stream = StreamId::new(7).expect("nonzero");
        for (channel, len) in [
            (DataChannel::Stdout, 1),
            (DataChannel::Stderr, 1000),
            (DataChannel::Stdin, MAX_DATA_PAYLOAD),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut frame = DataFrameBuf::with_capacity(len + 5);
            frame.payload_mut().put_slice(&data);
            assert_eq!(frame.payload_len(), len);
            let built = frame.finish(stream, channel).expect("finish");
            let expected = Frame::Data {
                stream,
                channel,
                data: Bytes::from(data),
            }
            .to_bytes()
            .expect("encode");
            assert_eq!(built, expected, "{channel:?} {len}");
        }
    }

    #[test]
    fn data_frame_buf_bounds_payload_truncates_and_rejects_empty() {
        let stream = StreamId::new(1).expect("nonzero");
        let mut frame = DataFrameBuf::with_capacity(MAX_DATA_PAYLOAD + 1);
        assert_eq!(frame.payload_mut().remaining_mut(), MAX_DATA_PAYLOAD);
        let mut small = DataFrameBuf::with_capacity(4);
        small.payload_mut().put_slice(b"abcd");
        assert_eq!(small.payload_mut().remaining_mut(), 0);
        small.truncate_payload(2);
        assert_eq!(small.zeroed_payload(5), &[0, 0]);
        small.truncate_payload(2);
        let built = small.finish(stream, DataChannel::Stdout).expect("finish");
        assert_eq!(&built[HEADER_LEN..], b"ab");
        assert_eq!(&built[8..12], &2u32.to_le_bytes());
        frame.truncate_payload(0);
        assert!(matches!(
            frame.finish(stream, DataChannel::Stdout),
            Err(ProtoError::EmptyData { .. })
        ));
    }

    #[test]
    fn frame_kind_from_u8_round_trips_every_kind() {
        for kind in FrameKind::ALL {
            assert_eq!(FrameKind::from_u8(kind.as_u8()), Some(kind));
        }
        assert_eq!(FrameKind::from_u8(0), None);
        assert_eq!(FrameKind::from_u8(0x13), None);
    }

    #[test]
    fn stream_id_zero_is_rejected() {
        assert!(StreamId::new(0).is_none());
        assert_eq!(StreamId::new(7).map(StreamId::get), Some(7));
        assert!(serde_json::from_str::<StreamId>("0").is_err());
        assert_eq!(serde_json::from_str::<StreamId>("3").ok(), StreamId::new(3));
    }

    #[test]
    fn encode_empty_data_is_rejected() {
        let frame = Frame::Data {
            stream: StreamId::FIRST,
            channel: DataChannel::Stdout,
            data: Bytes::new(),
        };
        let mut dst = BytesMut::new();
        assert!(matches!(
            frame.encode(&mut dst),
            Err(ProtoError::EmptyData { .. })
        ));
        assert!(dst.is_empty());
    }

    #[test]
    fn encode_oversized_data_is_rejected() {
        let frame = Frame::Data {
            stream: StreamId::FIRST,
            channel: DataChannel::Stdin,
            data: Bytes::from(vec![0u8; MAX_DATA_PAYLOAD + 1]),
        };
        assert!(matches!(
            frame.to_bytes(),
            Err(ProtoError::PayloadTooLong { .. })
        ));
    }

    #[test]
    fn encode_zero_window_is_rejected() {
        let frame = Frame::Window {
            stream: StreamId::FIRST,
            increment: 0,
        };
        assert!(matches!(frame.to_bytes(), Err(ProtoError::ZeroWindow)));
    }

    #[test]
    fn parse_header_control_on_nonzero_stream_is_rejected() {
        let mut raw = [0u8; HEADER_LEN];
        raw[..2].copy_from_slice(&FRAME_MAGIC);
        raw[2] = FrameKind::Control.as_u8();
        raw[4] = 1;
        raw[8] = 2;
        assert!(matches!(
            parse_header(&raw),
            Err(ProtoError::WrongStream { stream: 1, .. })
        ));
    }
}
