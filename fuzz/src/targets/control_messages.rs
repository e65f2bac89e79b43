//! Fuzz target `control_messages`: arbitrary bytes as CONTROL payloads, in both directions.
//!
//! Checks, for every input:
//! - [`HostMessage::from_payload`], [`GuestMessage::from_payload`] and
//!   [`loose_request_id`] never panic;
//! - a message that parses re-encodes ([`HostMessage::to_frame`] / [`GuestMessage::to_frame`]),
//!   the re-encoded payload parses back to an equal message, and encoding that message again
//!   gives the same bytes (the encoding is canonical);
//! - the re-encoded CONTROL frame, when within the 1 MiB cap, goes through the frame encoder
//!   and the [`Decoder`] unchanged;
//! - no allocation is sized beyond a multiple of the input ([`crate::Budget`]).
//!
//! Input layout: the whole input is the payload.

use std::fmt::Debug;

use crate::Budget;
use kiln_agent_proto::{
    Decoder, Frame, GuestMessage, HostMessage, MAX_CONTROL_PAYLOAD, ProtoError, loose_request_id,
};

/// Checks one input (see the module docs); panics on a finding.
pub fn run(data: &[u8]) {
    let budget = Budget::for_input(data.len());
    if let Ok(msg) = HostMessage::from_payload(data) {
        round_trip(&msg, HostMessage::to_frame, HostMessage::from_payload);
    }
    if let Ok(msg) = GuestMessage::from_payload(data) {
        round_trip(&msg, GuestMessage::to_frame, GuestMessage::from_payload);
    }
    let _ = loose_request_id(data);
    budget.finish();
}

fn round_trip<M: Debug + PartialEq>(
    msg: &M,
    to_frame: fn(&M) -> Result<Frame, ProtoError>,
    from_payload: fn(&[u8]) -> Result<M, ProtoError>,
) {
    let frame = to_frame(msg).unwrap_or_else(|e| panic!("parsed {msg:?} must re-encode: {e}"));
    let Frame::Control(payload) = &frame else {
        panic!("a message must encode as a CONTROL frame, got {frame:?}");
    };
    let again = from_payload(payload).unwrap_or_else(|e| {
        panic!(
            "re-encoded {msg:?} must parse: {e}; payload {:?}",
            String::from_utf8_lossy(payload)
        )
    });
    assert_eq!(&again, msg, "message must survive re-encoding");
    let frame_again = to_frame(&again).unwrap_or_else(|e| panic!("{again:?} must encode: {e}"));
    assert_eq!(frame_again, frame, "encoding must be canonical");

    if payload.len() <= MAX_CONTROL_PAYLOAD {
        let wire = frame
            .to_bytes()
            .unwrap_or_else(|e| panic!("a CONTROL frame within the cap must encode: {e}"));
        let mut decoder = Decoder::new();
        decoder.feed(&wire);
        match decoder.next_frame() {
            Ok(Some(decoded)) => assert_eq!(decoded, frame, "CONTROL frame must round-trip"),
            other => panic!("encoded CONTROL frame must decode, got {other:?}"),
        }
        assert_eq!(decoder.buffered(), 0, "one frame must be consumed whole");
    }
}
