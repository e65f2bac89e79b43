//! Fuzz target `frame_decoder`: arbitrary bytes through the frame [`Decoder`].
//!
//! Checks, for every input:
//! - [`kiln_agent_proto::fuzz_decode`] holds (the crate's own invariants: no panic, bounded
//!   buffer, decoded frames re-encode and decode to themselves, CONTROL payloads parse safely);
//! - incremental decoding is chunking-independent: the input split in two at a data-derived
//!   point yields exactly the frames, errors, buffered and discarded byte counts of the
//!   one-shot feed, starting framed and starting to hunt for either handshake frame;
//! - after every drain the buffer holds at most one partial frame: under
//!   12 + 1 MiB bytes when framed, under 12 + 8 KiB while hunting;
//! - no allocation is sized by a peer-supplied length ([`crate::Budget`]).
//!
//! Input layout: the whole input is the byte stream (its first byte also picks
//! `fuzz_decode`'s chunk size); the last two bytes, little-endian, modulo `len + 1` pick the
//! split point.

use crate::Budget;
use kiln_agent_proto::{
    Decoder, Frame, HEADER_LEN, HuntTarget, MAX_CONTROL_PAYLOAD, MAX_SYNC_ACK_PAYLOAD, fuzz_decode,
};

/// Checks one input (see the module docs); panics on a finding.
pub fn run(data: &[u8]) {
    let budget = Budget::for_input(data.len());
    fuzz_decode(data);
    let split = split_point(data);
    for start in [
        Start::Framed,
        Start::Hunt(HuntTarget::Sync),
        Start::Hunt(HuntTarget::SyncAck),
    ] {
        let whole = decode(start, &[data]);
        let halves = decode(start, &[&data[..split], &data[split..]]);
        assert_eq!(
            whole,
            halves,
            "{start:?}: feeding {} bytes split at {split} must decode like one feed",
            data.len()
        );
    }
    budget.finish();
}

#[derive(Debug, Clone, Copy)]
enum Start {
    Framed,
    Hunt(HuntTarget),
}

/// What a decoder produced, in order, and where it ended.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<Event>,
    buffered: usize,
    discarded: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Frame(Frame),
    /// The error's message (`ProtoError` is not `PartialEq`: it may hold a JSON error).
    Error(String),
}

fn split_point(data: &[u8]) -> usize {
    match data {
        [.., a, b] => usize::from(u16::from_le_bytes([*a, *b])) % (data.len() + 1),
        _ => 0,
    }
}

/// Feeds `chunks` in order, draining after each; after an error, hunts (alternating targets,
/// SYNC first) as a peer would. Checks the buffer bound after every drain.
fn decode(start: Start, chunks: &[&[u8]]) -> Outcome {
    let mut decoder = match start {
        Start::Framed => Decoder::new(),
        Start::Hunt(target) => Decoder::hunting(target),
    };
    let mut events = Vec::new();
    let mut next_hunt = HuntTarget::Sync;
    for chunk in chunks {
        decoder.feed(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => events.push(Event::Frame(frame)),
                Ok(None) => break,
                Err(e) => {
                    assert!(
                        !decoder.is_hunting(),
                        "a hunting decoder must never return an error, got: {e}"
                    );
                    events.push(Event::Error(e.to_string()));
                    decoder.hunt(next_hunt);
                    next_hunt = match next_hunt {
                        HuntTarget::Sync => HuntTarget::SyncAck,
                        HuntTarget::SyncAck => HuntTarget::Sync,
                    };
                }
            }
        }
        let (bound, mode) = if decoder.is_hunting() {
            (HEADER_LEN + MAX_SYNC_ACK_PAYLOAD, "hunting")
        } else {
            (HEADER_LEN + MAX_CONTROL_PAYLOAD, "framed")
        };
        assert!(
            decoder.buffered() < bound,
            "{mode} decoder holds {} bytes after a drain, more than one partial frame",
            decoder.buffered()
        );
    }
    Outcome {
        events,
        buffered: decoder.buffered(),
        discarded: decoder.discarded(),
    }
}
