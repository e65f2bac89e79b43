//! Incremental, hostile-input-safe frame decoder.
//!
//! Owns: [`Decoder`], which turns arbitrary byte chunks into [`Frame`]s in one of two modes:
//!
//! ```text
//!            hunt(target)                       a valid target frame is found
//!   Framed ───────────────▶ Hunting(target) ───────────────────────────────────▶ Framed
//!     │                        ▲   (skips every byte that does not start a
//!     │ any framing error      │    well-formed SYNC / SYNC_ACK frame)
//!     ▼                        │
//!   Poisoned ──── hunt(target) ┘   (next_frame returns ProtoError::Poisoned, feed drops input)
//! ```
//!
//! Invariants:
//! - The header (magic, kind, flags, stream rule, length bounds) is validated as soon as its
//!   12 bytes are buffered; the payload length is checked against the kind's cap before any
//!   payload byte is waited for. Memory is never reserved from a peer-supplied length.
//! - If the caller drains `next_frame` until `Ok(None)` after every `feed`, the buffer never
//!   holds more than one partial frame (≤ 12 + 1 MiB) plus the last fed chunk.
//! - While hunting, at most one candidate frame (≤ 12 + 8 KiB) is retained; everything else is
//!   discarded and counted in [`Decoder::discarded`]. Hunting never returns an error.
//! - No input can make the decoder panic (exercised by [`crate::fuzz_decode`]).

use bytes::{Buf, Bytes, BytesMut};

use crate::error::ProtoError;
use crate::frame::{Frame, FrameKind, parse_header};
use crate::handshake::{SYNC_ACK_MAGIC, SYNC_MAGIC};
use crate::{FRAME_MAGIC, HEADER_LEN};

/// Which handshake frame a hunting decoder looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HuntTarget {
    /// The guest hunts for the host's SYNC.
    Sync,
    /// The host hunts for the guest's SYNC_ACK.
    SyncAck,
}

impl HuntTarget {
    fn kind(self) -> FrameKind {
        match self {
            HuntTarget::Sync => FrameKind::Sync,
            HuntTarget::SyncAck => FrameKind::SyncAck,
        }
    }

    fn body_magic(self) -> &'static [u8; 8] {
        match self {
            HuntTarget::Sync => &SYNC_MAGIC,
            HuntTarget::SyncAck => &SYNC_ACK_MAGIC,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Framed,
    Hunting(HuntTarget),
    Poisoned,
}

/// Turns a byte stream into frames. See the module docs for its modes and bounds.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    mode: Mode,
    discarded: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder that expects a frame boundary at the first byte.
    pub fn new() -> Decoder {
        Decoder {
            buf: BytesMut::new(),
            mode: Mode::Framed,
            discarded: 0,
        }
    }

    /// A decoder that skips bytes until it finds a well-formed `target` frame.
    pub fn hunting(target: HuntTarget) -> Decoder {
        Decoder {
            buf: BytesMut::new(),
            mode: Mode::Hunting(target),
            discarded: 0,
        }
    }

    /// Switches to hunting for `target`, keeping buffered bytes (they may contain it). Also
    /// the only way out of the poisoned state.
    pub fn hunt(&mut self, target: HuntTarget) {
        self.mode = Mode::Hunting(target);
    }

    /// Drops every buffered byte, e.g. when the peer has gone and a new one will start over.
    pub fn clear(&mut self) {
        self.discarded += self.buf.len() as u64;
        self.buf.clear();
    }

    /// Whether the decoder is currently skipping bytes until a handshake frame.
    pub fn is_hunting(&self) -> bool {
        matches!(self.mode, Mode::Hunting(_))
    }

    /// Bytes currently buffered.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes skipped so far while hunting or dropped while poisoned.
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// Appends received bytes. Dropped (and counted as discarded) while poisoned.
    pub fn feed(&mut self, data: &[u8]) {
        if self.mode == Mode::Poisoned {
            self.discarded += data.len() as u64;
            return;
        }
        self.buf.extend_from_slice(data);
    }

    /// With nothing buffered, lets go of the storage instead of keeping it for the next
    /// [`Decoder::feed`]: bytes of consumed frames (e.g. a secret on its way to the guest)
    /// then live only as long as the frames handed out, and an allocator that clears on free
    /// leaves nothing behind. The agent calls this after each drained batch; the host, which
    /// carries no secrets inbound, keeps reusing its buffer.
    pub fn release_if_empty(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the framing error that
    /// poisoned the decoder (after which only [`Decoder::hunt`] resumes decoding).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        match self.mode {
            Mode::Poisoned => Err(ProtoError::Poisoned),
            Mode::Framed => {
                let result = self.next_framed();
                if result.is_err() {
                    self.mode = Mode::Poisoned;
                }
                result
            }
            Mode::Hunting(target) => {
                let frame = self.next_hunted(target);
                if frame.is_some() {
                    self.mode = Mode::Framed;
                }
                Ok(frame)
            }
        }
    }

    fn next_framed(&mut self) -> Result<Option<Frame>, ProtoError> {
        let Some(raw) = self.header_bytes() else {
            return Ok(None);
        };
        let header = parse_header(&raw)?;
        if self.buf.len() < HEADER_LEN + header.len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(header.len).freeze();
        Frame::from_parts(&header, payload).map(Some)
    }

    fn next_hunted(&mut self, target: HuntTarget) -> Option<Frame> {
        loop {
            // Skip to the next possible frame start.
            match find_magic(&self.buf) {
                Some(pos) => self.skip(pos),
                None => {
                    // Keep a trailing first magic byte: its partner may come with the next feed.
                    let keep = usize::from(self.buf.last() == Some(&FRAME_MAGIC[0]));
                    self.skip(self.buf.len() - keep);
                    return None;
                }
            }
            let raw = self.header_bytes()?;
            let header = match parse_header(&raw) {
                Ok(h) if h.kind == target.kind() => h,
                _ => {
                    self.skip(1);
                    continue;
                }
            };
            let have = (self.buf.len() - HEADER_LEN).min(8);
            if self.buf[HEADER_LEN..HEADER_LEN + have] != target.body_magic()[..have] {
                self.skip(1);
                continue;
            }
            if self.buf.len() < HEADER_LEN + header.len {
                return None;
            }
            let payload = Bytes::copy_from_slice(&self.buf[HEADER_LEN..HEADER_LEN + header.len]);
            match Frame::from_parts(&header, payload) {
                Ok(frame) => {
                    self.buf.advance(HEADER_LEN + header.len);
                    return Some(frame);
                }
                Err(_) => {
                    self.skip(1);
                    continue;
                }
            }
        }
    }

    fn header_bytes(&self) -> Option<[u8; HEADER_LEN]> {
        let head = self.buf.get(..HEADER_LEN)?;
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(head);
        Some(raw)
    }

    fn skip(&mut self, n: usize) {
        self.buf.advance(n);
        self.discarded += n as u64;
    }
}

fn find_magic(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == FRAME_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{DataChannel, StreamId};
    use crate::handshake::SyncFrame;

    fn data_frame(n: usize) -> Bytes {
        Frame::Data {
            stream: StreamId::FIRST,
            channel: DataChannel::Stdout,
            data: Bytes::from(vec![7u8; n]),
        }
        .to_bytes()
        .expect("valid frame")
    }

    fn sync_frame(nonce: u64) -> Bytes {
        Frame::Sync(SyncFrame {
            nonce,
            versions: vec![1],
        })
        .to_bytes()
        .expect("valid frame")
    }

    #[test]
    fn decoder_byte_at_a_time_yields_frame_once_complete() {
        let bytes = data_frame(10);
        let mut d = Decoder::new();
        for (i, b) in bytes.iter().enumerate() {
            d.feed(&[*b]);
            let got = d.next_frame().expect("valid bytes");
            assert_eq!(got.is_some(), i == bytes.len() - 1, "byte {i}");
        }
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn decoder_bad_magic_poisons_until_hunt() {
        let mut d = Decoder::new();
        d.feed(b"garbage-garbage!");
        assert!(matches!(d.next_frame(), Err(ProtoError::BadMagic { .. })));
        assert!(matches!(d.next_frame(), Err(ProtoError::Poisoned)));
        d.feed(&sync_frame(5));
        assert!(matches!(d.next_frame(), Err(ProtoError::Poisoned)));
        d.hunt(HuntTarget::Sync);
        d.feed(&sync_frame(6));
        match d.next_frame() {
            Ok(Some(Frame::Sync(s))) => assert_eq!(s.nonce, 6),
            other => panic!("expected sync, got {other:?}"),
        }
    }

    #[test]
    fn decoder_over_cap_length_fails_before_payload_arrives() {
        let mut header = data_frame(1)[..HEADER_LEN].to_vec();
        header[8..12].copy_from_slice(&(64u32 * 1024 + 1).to_le_bytes());
        let mut d = Decoder::new();
        d.feed(&header);
        assert!(matches!(
            d.next_frame(),
            Err(ProtoError::PayloadTooLong { len: 65537, .. })
        ));
    }

    #[test]
    fn decoder_huge_control_length_is_rejected_without_allocating() {
        let mut raw = [0u8; HEADER_LEN];
        raw[..2].copy_from_slice(&FRAME_MAGIC);
        raw[2] = FrameKind::Control.as_u8();
        raw[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut d = Decoder::new();
        d.feed(&raw);
        assert!(matches!(
            d.next_frame(),
            Err(ProtoError::PayloadTooLong { .. })
        ));
        assert!(d.buffered() <= HEADER_LEN);
    }

    #[test]
    fn decoder_truncated_frame_waits_without_error() {
        let bytes = data_frame(100);
        let mut d = Decoder::new();
        d.feed(&bytes[..50]);
        assert!(matches!(d.next_frame(), Ok(None)));
        assert_eq!(d.buffered(), 50);
    }

    #[test]
    fn decoder_unknown_kind_is_rejected() {
        let mut bytes = data_frame(3).to_vec();
        bytes[2] = 0x7E;
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert!(matches!(
            d.next_frame(),
            Err(ProtoError::UnknownKind { kind: 0x7E })
        ));
    }

    #[test]
    fn decoder_reserved_flags_are_rejected() {
        let mut bytes = data_frame(3).to_vec();
        bytes[3] = 1;
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert!(matches!(
            d.next_frame(),
            Err(ProtoError::ReservedFlags { flags: 1, .. })
        ));
    }

    #[test]
    fn decoder_data_on_stream_zero_is_rejected() {
        let mut bytes = data_frame(3).to_vec();
        bytes[4..8].copy_from_slice(&0u32.to_le_bytes());
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert!(matches!(
            d.next_frame(),
            Err(ProtoError::WrongStream { stream: 0, .. })
        ));
    }

    #[test]
    fn decoder_zero_length_data_is_rejected() {
        let mut bytes = data_frame(1)[..HEADER_LEN].to_vec();
        bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert!(matches!(d.next_frame(), Err(ProtoError::EmptyData { .. })));
    }

    #[test]
    fn decoder_zero_window_is_rejected() {
        let mut bytes = Frame::Window {
            stream: StreamId::FIRST,
            increment: 9,
        }
        .to_bytes()
        .expect("valid")
        .to_vec();
        bytes[12..16].copy_from_slice(&0u32.to_le_bytes());
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert!(matches!(d.next_frame(), Err(ProtoError::ZeroWindow)));
    }

    #[test]
    fn decoder_hunting_skips_garbage_and_other_frames() {
        let mut input = b"\x9f\x9fk-junk\x9fk".to_vec();
        input.extend_from_slice(&data_frame(20));
        input.extend_from_slice(&sync_frame(42));
        input.extend_from_slice(&data_frame(5));
        let mut d = Decoder::hunting(HuntTarget::Sync);
        d.feed(&input);
        match d.next_frame() {
            Ok(Some(Frame::Sync(s))) => assert_eq!(s.nonce, 42),
            other => panic!("expected sync, got {other:?}"),
        }
        assert!(!d.is_hunting());
        assert!(matches!(d.next_frame(), Ok(Some(Frame::Data { .. }))));
        assert!(d.discarded() >= 20);
    }

    #[test]
    fn decoder_hunting_keeps_split_magic_across_feeds() {
        let sync = sync_frame(9);
        let mut d = Decoder::hunting(HuntTarget::Sync);
        d.feed(b"xxxx");
        d.feed(&sync[..1]);
        assert!(matches!(d.next_frame(), Ok(None)));
        d.feed(&sync[1..]);
        assert!(matches!(d.next_frame(), Ok(Some(Frame::Sync(_)))));
    }

    #[test]
    fn decoder_hunting_skips_fake_sync_header_with_wrong_body() {
        let real = sync_frame(77);
        let mut fake = real[..HEADER_LEN].to_vec();
        fake.extend_from_slice(b"NOT-SYNC");
        fake.extend_from_slice(&real);
        let mut d = Decoder::hunting(HuntTarget::Sync);
        d.feed(&fake);
        match d.next_frame() {
            Ok(Some(Frame::Sync(s))) => assert_eq!(s.nonce, 77),
            other => panic!("expected sync, got {other:?}"),
        }
    }

    #[test]
    fn decoder_hunting_retains_bounded_bytes() {
        let mut d = Decoder::hunting(HuntTarget::SyncAck);
        for _ in 0..1000 {
            d.feed(&[0x55; 4096]);
            assert!(matches!(d.next_frame(), Ok(None)));
            assert!(d.buffered() <= 1);
        }
        assert_eq!(d.discarded(), 4096 * 1000);
    }
}
