//! Fuzz target `handshake`: arbitrary SYNC and SYNC_ACK payloads.
//!
//! The body parsers are crate-private, so each input is wrapped in a well-formed 12-byte
//! header (stream 0, zero flags, length = payload length) and decoded, which is exactly what a
//! peer's bytes go through. Checks, for every input:
//! - the framed decoder accepts the frame only if its length is within the kind's bounds, and
//!   then as that kind;
//! - an accepted SYNC re-encodes to the very same bytes, offers 1..=16 versions, and
//!   [`choose_version`] picks a non-zero version both sides list, or none;
//! - an accepted SYNC_ACK keeps the nonce and version of the fixed part, and re-encodes to a
//!   frame that decodes to itself (when the re-serialised agent info still fits in 8 KiB);
//! - a decoder hunting for that kind finds the same frame first, and a hunting decoder never
//!   returns an error;
//! - no allocation is sized beyond a multiple of the input ([`crate::Budget`]).
//!
//! Input layout: byte 0 bit 0 picks the kind (SYNC / SYNC_ACK), bit 1 prepends the kind's
//! 8-byte body magic ("KILN-SYN" / "KILN-ACK") so the fuzzer spends its time past it; the rest
//! is the payload.

use crate::Budget;
use kiln_agent_proto::{
    Decoder, FRAME_MAGIC, Frame, FrameKind, HEADER_LEN, HuntTarget, MAX_OFFERED_VERSIONS,
    ProtoError, SUPPORTED_VERSIONS, choose_version,
};

/// Checks one input (see the module docs); panics on a finding.
pub fn run(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let budget = Budget::for_input(data.len());
    let (kind, target, body_magic) = if selector & 1 == 0 {
        (FrameKind::Sync, HuntTarget::Sync, b"KILN-SYN")
    } else {
        (FrameKind::SyncAck, HuntTarget::SyncAck, b"KILN-ACK")
    };
    let mut payload = Vec::with_capacity(body_magic.len() + rest.len());
    if selector & 2 != 0 {
        payload.extend_from_slice(body_magic);
    }
    payload.extend_from_slice(rest);
    check(kind, target, &payload);
    budget.finish();
}

fn check(kind: FrameKind, target: HuntTarget, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("fuzz inputs are far below 4 GiB");
    let mut wire = Vec::with_capacity(HEADER_LEN + payload.len());
    wire.extend_from_slice(&FRAME_MAGIC);
    wire.extend_from_slice(&[kind.as_u8(), 0]);
    wire.extend_from_slice(&0u32.to_le_bytes());
    wire.extend_from_slice(&len.to_le_bytes());
    wire.extend_from_slice(payload);

    let mut framed = Decoder::new();
    framed.feed(&wire);
    let decoded = framed.next_frame();
    let in_bounds = (kind.min_payload()..=kind.max_payload()).contains(&payload.len());
    if !in_bounds {
        assert!(
            decoded.is_err(),
            "{kind} payload of {} bytes is out of bounds but decoded as {decoded:?}",
            payload.len()
        );
    }

    let mut hunting = Decoder::hunting(target);
    hunting.feed(&wire);
    let hunted = match hunting.next_frame() {
        Ok(found) => found,
        Err(e) => panic!("a hunting decoder must never return an error, got: {e}"),
    };

    let frame = match decoded {
        Ok(Some(frame)) => frame,
        Ok(None) => panic!("a complete {kind} frame must not wait for more bytes"),
        Err(_) => return,
    };
    assert_eq!(frame.kind(), kind, "decoded frame has the header's kind");
    assert_eq!(framed.buffered(), 0, "one frame must be consumed whole");
    assert_eq!(
        hunted.as_ref(),
        Some(&frame),
        "hunting must accept the frame the framed decoder accepts"
    );

    match &frame {
        Frame::Sync(sync) => {
            assert!(
                (1..=MAX_OFFERED_VERSIONS).contains(&sync.versions.len()),
                "SYNC offers {} versions",
                sync.versions.len()
            );
            let again = frame
                .to_bytes()
                .unwrap_or_else(|e| panic!("decoded {frame:?} must re-encode: {e}"));
            assert_eq!(&again[..], &wire[..], "SYNC must re-encode byte for byte");
            if let Some(v) = choose_version(&sync.versions, SUPPORTED_VERSIONS) {
                assert!(
                    v != 0 && sync.versions.contains(&v) && SUPPORTED_VERSIONS.contains(&v),
                    "chose version {v} from {:?}",
                    sync.versions
                );
            }
        }
        Frame::SyncAck(ack) => {
            assert_eq!(
                ack.nonce.to_le_bytes(),
                payload[8..16],
                "SYNC_ACK nonce must come from bytes 8..16"
            );
            assert_eq!(
                ack.version.to_le_bytes(),
                payload[16..18],
                "SYNC_ACK version must come from bytes 16..18"
            );
            match frame.to_bytes() {
                Ok(again) => {
                    let mut redecoder = Decoder::new();
                    redecoder.feed(&again);
                    match redecoder.next_frame() {
                        Ok(Some(redecoded)) => {
                            assert_eq!(redecoded, frame, "SYNC_ACK must round-trip");
                        }
                        other => panic!("re-encoded {frame:?} must decode, got {other:?}"),
                    }
                }
                // Re-serialised agent info may be longer (defaults filled in) and not fit.
                Err(ProtoError::PayloadTooLong { .. }) => {}
                Err(e) => panic!("decoded {frame:?} must re-encode: {e}"),
            }
        }
        other => panic!("a {kind} header decoded as {other:?}"),
    }
}
