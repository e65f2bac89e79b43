//! Fuzz entry point for the decoder (used by a proptest here and by a future `fuzz/` target).
//!
//! Owns: [`fuzz_decode`]. It must never panic on any input unless a decoder invariant is
//! broken; the assertions inside are those invariants.

use bytes::BytesMut;

use crate::decoder::{Decoder, HuntTarget};
use crate::frame::{Frame, FrameKind};
use crate::message::{GuestMessage, HostMessage};
use crate::{HEADER_LEN, MAX_CONTROL_PAYLOAD};

/// Feeds `data` to decoders in several ways and checks their invariants:
/// - chunked feeding (chunk size taken from the first byte) in framed mode, re-hunting after
///   every error, alternating SYNC and SYNC_ACK targets;
/// - the buffer stays bounded by one frame plus one chunk;
/// - every decoded frame re-encodes and decodes to itself;
/// - every CONTROL payload can be offered to both message parsers without panicking.
///
/// Panics only if an invariant is broken.
pub fn fuzz_decode(data: &[u8]) {
    let (chunk, mut hunt_sync) = match data.first() {
        Some(b) => (usize::from(b & 0x3f) + 1, b & 0x40 != 0),
        None => (1, true),
    };
    let mut decoder = Decoder::new();
    for piece in data.chunks(chunk) {
        decoder.feed(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => check_frame(&frame),
                Ok(None) => break,
                Err(_) => {
                    decoder.hunt(if hunt_sync {
                        HuntTarget::Sync
                    } else {
                        HuntTarget::SyncAck
                    });
                    hunt_sync = !hunt_sync;
                }
            }
        }
        assert!(
            decoder.buffered() <= HEADER_LEN + MAX_CONTROL_PAYLOAD + chunk,
            "decoder buffer grew past one frame plus one chunk"
        );
    }
}

fn check_frame(frame: &Frame) {
    if let Frame::Control(payload) = frame {
        if let Ok(msg) = HostMessage::from_payload(payload) {
            assert!(msg.to_frame().is_ok(), "parsed host message must re-encode");
        }
        if let Ok(msg) = GuestMessage::from_payload(payload) {
            assert!(
                msg.to_frame().is_ok(),
                "parsed guest message must re-encode"
            );
        }
    }
    let mut encoded = BytesMut::new();
    match frame.encode(&mut encoded) {
        Ok(()) => {
            let mut again = Decoder::new();
            again.feed(&encoded);
            match again.next_frame() {
                Ok(Some(decoded)) => assert_eq!(&decoded, frame, "frame must round-trip"),
                other => panic!("re-encoded frame failed to decode: {other:?}"),
            }
        }
        // Re-serialised agent info may be longer than the original (defaults filled in).
        Err(_) if frame.kind() == FrameKind::SyncAck => {}
        Err(e) => panic!("decoded frame failed to re-encode: {e}"),
    }
}
