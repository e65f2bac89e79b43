//! The viewer relay's filter of the RFB client → server stream (RFC 6143 with QEMU's
//! extensions): it lets a view-only viewer watch without ever reaching the guest's keyboard,
//! mouse or clipboard, whatever its browser sends.
//!
//! The filter is a pure, bounded state machine over byte chunks: chunks may split a message
//! anywhere or hold several; [`RfbFilter::feed`] appends to `out` the bytes to forward to
//! QEMU and keeps at most one message header ([`MAX_HEADER`] bytes) between calls. Message
//! bodies (the encodings list, cut text, screens) stream through without being buffered.
//!
//! ```text
//!  Version (12 bytes "RFB 003.00x\n")
//!     │ 3.7 / 3.8                     │ 3.3 (the server picks the security type)
//!     ▼                               │
//!  Security (1 byte, must be 1: None) │
//!     │◀──────────────────────────────┘
//!     ▼
//!  ClientInit (1 byte: the shared flag, always forwarded as 1)
//!     ▼
//!  Header ──(type known, length known)──▶ Body (n bytes, forwarded or dropped) ──▶ Header
//! ```
//!
//! Client messages (type byte first; lengths include it):
//!
//! | type | message | length | view-only |
//! |---|---|---|---|
//! | 0 | SetPixelFormat | 20 | forwarded |
//! | 2 | SetEncodings | 4 + 4·n (u16 n at offset 2) | forwarded |
//! | 3 | FramebufferUpdateRequest | 10 | forwarded |
//! | 4 | KeyEvent | 8 | dropped |
//! | 5 | PointerEvent | 6 | dropped |
//! | 6 | ClientCutText | 8 + \|len\| (s32 len at offset 4; negative: extended clipboard), \|len\| ≤ [`MAX_CUT_TEXT`] | dropped |
//! | 150 | EnableContinuousUpdates | 10 | forwarded |
//! | 251 | SetDesktopSize | 8 + 16·n (u8 n at offset 6) | dropped (it resizes the guest's screen) |
//! | 255/0 | QEMU extended KeyEvent | 12 | dropped |
//! | 255/1 | QEMU audio: u16 op at offset 2; 0 enable, 1 disable: 4; 2 set format: 10 | forwarded |
//!
//! Invariants: with control granted every byte is forwarded unchanged except the ClientInit
//! shared flag; without it exactly the input messages above are dropped, whole. Any other
//! type, QEMU subtype or audio op, a security type other than None, a malformed version or an
//! over-long cut text is an [`RfbError`]: the stream cannot be resynchronized, so the relay
//! closes the connection.

/// Longest fixed part of a client message the filter holds (SetPixelFormat's 20 bytes).
pub const MAX_HEADER: usize = 20;
/// Longest clipboard text a viewer may send (QEMU's own limit is 1 MiB too).
pub const MAX_CUT_TEXT: u32 = 1 << 20;

/// Why the client's stream cannot be relayed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RfbError {
    /// The first 12 bytes are not an RFB 3.3, 3.7 or 3.8 ProtocolVersion.
    #[error("malformed RFB protocol version {0:?}")]
    BadVersion(String),
    /// The client chose a security type the relay cannot follow (only None, 1, is relayed).
    #[error("unsupported RFB security type {0}")]
    Security(u8),
    /// A client message type the relay does not know.
    #[error("unknown RFB client message type {0}")]
    UnknownMessage(u8),
    /// A QEMU client message subtype (type 255) the relay does not know.
    #[error("unknown QEMU client message subtype {0}")]
    UnknownQemuMessage(u8),
    /// A QEMU audio operation the relay does not know.
    #[error("unknown QEMU audio operation {0}")]
    UnknownAudioOp(u16),
    /// A ClientCutText longer than [`MAX_CUT_TEXT`].
    #[error("clipboard text of {0} bytes is over the limit of {MAX_CUT_TEXT}")]
    CutTextTooLong(u32),
}

/// Where the filter is in the client's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Collecting the 12-byte ProtocolVersion.
    Version,
    /// Waiting for the security type byte.
    Security,
    /// Waiting for the ClientInit byte.
    ClientInit,
    /// Collecting a message's fixed part.
    Header,
    /// Inside a message's variable part: this many bytes left, forwarded or not.
    Body { left: u64, forward: bool },
}

/// What a message's bytes so far say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Its fixed part is this long (more than is held).
    Need(usize),
    /// The fixed part is complete: `body` bytes follow; `input` messages need control.
    Done { body: u64, input: bool },
}

/// The client → server filter of one viewer connection.
#[derive(Debug, Clone)]
pub struct RfbFilter {
    control: bool,
    phase: Phase,
    header: [u8; MAX_HEADER],
    held: usize,
    dropped: u64,
    /// The error returned once; every later call returns it again.
    failed: Option<RfbError>,
}

impl RfbFilter {
    /// A filter at the start of a connection; `control` lets input messages through.
    pub fn new(control: bool) -> RfbFilter {
        RfbFilter {
            control,
            phase: Phase::Version,
            header: [0; MAX_HEADER],
            held: 0,
            dropped: 0,
            failed: None,
        }
    }

    /// Input messages dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Consumes `input` (any slice of the client's stream) and appends to `out` the bytes to
    /// send to the server. After an error the filter refuses everything.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RfbError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        while !input.is_empty() {
            match self.phase {
                Phase::Version => {
                    let take = (12 - self.held).min(input.len());
                    self.hold(&input[..take]);
                    input = &input[take..];
                    if self.held == 12 {
                        let minor = self.fail_on(version_minor(&self.header[..12]))?;
                        out.extend_from_slice(&self.header[..12]);
                        self.held = 0;
                        self.phase = if minor >= 7 {
                            Phase::Security
                        } else {
                            Phase::ClientInit
                        };
                    }
                }
                Phase::Security => {
                    let t = input[0];
                    input = &input[1..];
                    if t != 1 {
                        return self.fail_on(Err(RfbError::Security(t)));
                    }
                    out.push(t);
                    self.phase = Phase::ClientInit;
                }
                Phase::ClientInit => {
                    input = &input[1..];
                    // Shared, always: an exclusive viewer would disconnect every other one.
                    out.push(1);
                    self.phase = Phase::Header;
                }
                Phase::Header => {
                    if self.held == 0 {
                        self.hold(&input[..1]);
                        input = &input[1..];
                    }
                    let shape = loop {
                        match self.fail_on(shape(&self.header[..self.held]))? {
                            // `shape` answers `Need(n)` only for `n` over what is held.
                            Shape::Need(n) => {
                                if input.is_empty() {
                                    break None;
                                }
                                let take = (n - self.held).min(input.len());
                                self.hold(&input[..take]);
                                input = &input[take..];
                            }
                            Shape::Done { body, input } => break Some((body, input)),
                        }
                    };
                    let Some((body, is_input)) = shape else {
                        break;
                    };
                    let forward = self.control || !is_input;
                    if forward {
                        out.extend_from_slice(&self.header[..self.held]);
                    } else {
                        self.dropped += 1;
                    }
                    self.held = 0;
                    self.phase = if body == 0 {
                        Phase::Header
                    } else {
                        Phase::Body {
                            left: body,
                            forward,
                        }
                    };
                }
                Phase::Body { left, forward } => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    if forward {
                        out.extend_from_slice(&input[..take]);
                    }
                    input = &input[take..];
                    let left = left - take as u64;
                    self.phase = if left == 0 {
                        Phase::Header
                    } else {
                        Phase::Body { left, forward }
                    };
                }
            }
        }
        Ok(())
    }

    fn hold(&mut self, bytes: &[u8]) {
        self.header[self.held..self.held + bytes.len()].copy_from_slice(bytes);
        self.held += bytes.len();
    }

    /// Passes `r` through, remembering an error for every later call.
    fn fail_on<T>(&mut self, r: Result<T, RfbError>) -> Result<T, RfbError> {
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }
}

/// The minor version of a 12-byte ProtocolVersion the relay follows (3, 7 or 8; 4 and 5 are
/// 3.3 as RFC 6143 says).
fn version_minor(v: &[u8]) -> Result<u32, RfbError> {
    let bad = || RfbError::BadVersion(String::from_utf8_lossy(v).into_owned());
    let text = std::str::from_utf8(v).map_err(|_| bad())?;
    let rest = text.strip_prefix("RFB 003.").ok_or_else(bad)?;
    let digits = rest.strip_suffix('\n').ok_or_else(bad)?;
    if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match digits.parse::<u32>().map_err(|_| bad())? {
        3..=5 => Ok(3),
        m @ (7 | 8) => Ok(m),
        _ => Err(bad()),
    }
}

fn be16(h: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([h[at], h[at + 1]])
}

/// What the fixed part `h` (at least its type byte) says about its message.
fn shape(h: &[u8]) -> Result<Shape, RfbError> {
    let fixed = |len: usize, input: bool| {
        if h.len() < len {
            Shape::Need(len)
        } else {
            Shape::Done { body: 0, input }
        }
    };
    Ok(match h[0] {
        0 => fixed(20, false),
        2 if h.len() < 4 => Shape::Need(4),
        2 => Shape::Done {
            body: 4 * u64::from(be16(h, 2)),
            input: false,
        },
        3 => fixed(10, false),
        4 => fixed(8, true),
        5 => fixed(6, true),
        6 if h.len() < 8 => Shape::Need(8),
        6 => {
            // Negative: the extended clipboard's format, |len| bytes all the same.
            let len = i32::from_be_bytes([h[4], h[5], h[6], h[7]]).unsigned_abs();
            if len > MAX_CUT_TEXT {
                return Err(RfbError::CutTextTooLong(len));
            }
            Shape::Done {
                body: u64::from(len),
                input: true,
            }
        }
        150 => fixed(10, false),
        251 if h.len() < 8 => Shape::Need(8),
        251 => Shape::Done {
            body: 16 * u64::from(h[6]),
            input: true,
        },
        255 if h.len() < 2 => Shape::Need(2),
        255 => match h[1] {
            0 => fixed(12, true),
            1 if h.len() < 4 => Shape::Need(4),
            1 => match be16(h, 2) {
                0 | 1 => Shape::Done {
                    body: 0,
                    input: false,
                },
                2 => fixed(10, false),
                op => return Err(RfbError::UnknownAudioOp(op)),
            },
            sub => return Err(RfbError::UnknownQemuMessage(sub)),
        },
        t => return Err(RfbError::UnknownMessage(t)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HANDSHAKE: &[u8] = b"RFB 003.008\n\x01\x00";
    const FORWARDED_HANDSHAKE: &[u8] = b"RFB 003.008\n\x01\x01";

    fn set_pixel_format() -> Vec<u8> {
        let mut m = vec![
            0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ];
        assert_eq!(m.len(), 20);
        m[3] = 0;
        m
    }
    fn set_encodings(n: u16) -> Vec<u8> {
        let mut m = vec![2, 0];
        m.extend_from_slice(&n.to_be_bytes());
        for i in 0..n {
            m.extend_from_slice(&(i32::from(i) - 3).to_be_bytes());
        }
        m
    }
    fn update_request() -> Vec<u8> {
        vec![3, 1, 0, 0, 0, 0, 2, 128, 1, 224]
    }
    fn key_event() -> Vec<u8> {
        vec![4, 1, 0, 0, 0, 0, 0xff, 0x0d]
    }
    fn pointer_event() -> Vec<u8> {
        vec![5, 1, 0, 10, 0, 20]
    }
    fn cut_text(text: &[u8]) -> Vec<u8> {
        let mut m = vec![6, 0, 0, 0];
        m.extend_from_slice(&(text.len() as u32).to_be_bytes());
        m.extend_from_slice(text);
        m
    }
    fn extended_cut_text(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![6, 0, 0, 0];
        m.extend_from_slice(&(-(payload.len() as i32)).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }
    fn continuous_updates() -> Vec<u8> {
        vec![150, 1, 0, 0, 0, 0, 2, 128, 1, 224]
    }
    fn set_desktop_size(screens: u8) -> Vec<u8> {
        let mut m = vec![251, 0, 4, 0, 3, 0, screens, 0];
        for s in 0..screens {
            m.extend_from_slice(&[0, 0, 0, s, 0, 0, 0, 0, 4, 0, 3, 0, 0, 0, 0, 0]);
        }
        m
    }
    fn qemu_key_event() -> Vec<u8> {
        vec![255, 0, 0, 1, 0, 0, 0, 0x61, 0, 0, 0, 0x1e]
    }
    fn qemu_audio(op: u16) -> Vec<u8> {
        let mut m = vec![255, 1];
        m.extend_from_slice(&op.to_be_bytes());
        if op == 2 {
            m.extend_from_slice(&[3, 2, 0, 0, 0xac, 0x44]);
        }
        m
    }

    /// Every kind of message, with whether it is input, in one session.
    fn session() -> Vec<(Vec<u8>, bool)> {
        vec![
            (set_pixel_format(), false),
            (set_encodings(0), false),
            (set_encodings(7), false),
            (update_request(), false),
            (key_event(), true),
            (pointer_event(), true),
            (cut_text(b""), true),
            (cut_text(b"hello, clipboard"), true),
            (extended_cut_text(&[0x10, 0, 0, 1, 0, 0, 0, 0]), true),
            (continuous_updates(), false),
            (set_desktop_size(0), true),
            (set_desktop_size(2), true),
            (qemu_key_event(), true),
            (qemu_audio(0), false),
            (qemu_audio(2), false),
            (qemu_audio(1), false),
            (update_request(), false),
            (pointer_event(), true),
        ]
    }

    fn stream(msgs: &[(Vec<u8>, bool)]) -> Vec<u8> {
        let mut s = HANDSHAKE.to_vec();
        for (m, _) in msgs {
            s.extend_from_slice(m);
        }
        s
    }

    fn expected(msgs: &[(Vec<u8>, bool)], control: bool) -> Vec<u8> {
        let mut s = FORWARDED_HANDSHAKE.to_vec();
        for (m, input) in msgs {
            if control || !input {
                s.extend_from_slice(m);
            }
        }
        s
    }

    fn run(control: bool, chunks: &[&[u8]]) -> Result<(Vec<u8>, u64), RfbError> {
        let mut f = RfbFilter::new(control);
        let mut out = Vec::new();
        for c in chunks {
            f.feed(c, &mut out)?;
        }
        Ok((out, f.dropped()))
    }

    #[test]
    fn filter_control_forwards_every_byte_but_the_shared_flag() {
        let msgs = session();
        let (out, dropped) = run(true, &[&stream(&msgs)]).unwrap();
        assert_eq!(out, expected(&msgs, true));
        assert_eq!(dropped, 0);
    }

    #[test]
    fn filter_view_only_drops_exactly_the_input_messages() {
        let msgs = session();
        let (out, dropped) = run(false, &[&stream(&msgs)]).unwrap();
        assert_eq!(out, expected(&msgs, false));
        let inputs = msgs.iter().filter(|(_, i)| *i).count() as u64;
        assert_eq!(dropped, inputs);
        // No key, pointer, clipboard or QEMU key message survives.
        let (mut f, mut rest) = (RfbFilter::new(true), Vec::new());
        f.feed(&out, &mut rest).unwrap();
        assert_eq!(f.dropped(), 0);
    }

    #[test]
    fn filter_split_at_every_offset_gives_the_same_output() {
        let msgs = session();
        let s = stream(&msgs);
        for control in [false, true] {
            let want = expected(&msgs, control);
            for cut in 0..=s.len() {
                let (out, _) = run(control, &[&s[..cut], &s[cut..]]).unwrap();
                assert_eq!(out, want, "control {control}, split at {cut}");
            }
            for cut in 0..s.len() {
                for cut2 in (cut..s.len()).step_by(7) {
                    let (out, _) = run(control, &[&s[..cut], &s[cut..cut2], &s[cut2..]]).unwrap();
                    assert_eq!(out, want, "control {control}, split at {cut} and {cut2}");
                }
            }
        }
    }

    #[test]
    fn filter_byte_by_byte_gives_the_same_output() {
        let msgs = session();
        let s = stream(&msgs);
        for control in [false, true] {
            let chunks: Vec<&[u8]> = s.chunks(1).collect();
            let (out, _) = run(control, &chunks).unwrap();
            assert_eq!(out, expected(&msgs, control));
        }
    }

    #[test]
    fn filter_holds_at_most_one_header_between_chunks() {
        let msgs = session();
        let s = stream(&msgs);
        let mut f = RfbFilter::new(false);
        let mut out = Vec::new();
        for b in s.chunks(3) {
            f.feed(b, &mut out).unwrap();
            assert!(f.held <= MAX_HEADER);
        }
        // A 1 MiB clipboard streams through with nothing held.
        let big = cut_text(&vec![b'x'; MAX_CUT_TEXT as usize]);
        let mut f = RfbFilter::new(true);
        let mut out = Vec::new();
        f.feed(HANDSHAKE, &mut out).unwrap();
        for c in big.chunks(4096) {
            out.clear();
            f.feed(c, &mut out).unwrap();
            assert!(out.len() <= 4096);
        }
        assert_eq!(f.phase, Phase::Header);
    }

    #[test]
    fn filter_unknown_message_type_is_an_error_and_stays_one() {
        for t in [1u8, 7, 8, 100, 149, 248, 250, 252, 254] {
            let mut s = HANDSHAKE.to_vec();
            s.extend_from_slice(&update_request());
            s.push(t);
            s.extend_from_slice(&[0; 32]);
            assert_eq!(
                run(true, &[&s]).unwrap_err(),
                RfbError::UnknownMessage(t),
                "{t}"
            );
        }
        let mut f = RfbFilter::new(true);
        let mut out = Vec::new();
        let mut s = HANDSHAKE.to_vec();
        s.push(9);
        assert!(f.feed(&s, &mut out).is_err());
        assert!(f.feed(&update_request(), &mut out).is_err());
    }

    #[test]
    fn filter_unknown_qemu_subtype_or_audio_op_is_an_error() {
        let mut s = HANDSHAKE.to_vec();
        s.extend_from_slice(&[255, 2, 0, 0]);
        assert_eq!(
            run(true, &[&s]).unwrap_err(),
            RfbError::UnknownQemuMessage(2)
        );
        let mut s = HANDSHAKE.to_vec();
        s.extend_from_slice(&qemu_audio(3));
        assert_eq!(run(false, &[&s]).unwrap_err(), RfbError::UnknownAudioOp(3));
    }

    #[test]
    fn filter_over_long_cut_text_is_an_error_before_its_body() {
        for len in [MAX_CUT_TEXT + 1, u32::MAX / 2] {
            let mut s = HANDSHAKE.to_vec();
            s.extend_from_slice(&[6, 0, 0, 0]);
            s.extend_from_slice(&len.to_be_bytes());
            assert_eq!(run(true, &[&s]).unwrap_err(), RfbError::CutTextTooLong(len));
            // Negative lengths (the extended clipboard) are bounded the same way.
            let mut s = HANDSHAKE.to_vec();
            s.extend_from_slice(&[6, 0, 0, 0]);
            s.extend_from_slice(&(-(len as i32)).to_be_bytes());
            assert_eq!(
                run(false, &[&s]).unwrap_err(),
                RfbError::CutTextTooLong(len)
            );
        }
        let mut s = HANDSHAKE.to_vec();
        s.extend_from_slice(&[6, 0, 0, 0]);
        s.extend_from_slice(&i32::MIN.to_be_bytes());
        assert!(matches!(
            run(true, &[&s]).unwrap_err(),
            RfbError::CutTextTooLong(_)
        ));
        // Exactly the limit is fine.
        let (out, _) = run(
            true,
            &[HANDSHAKE, &cut_text(&vec![0; MAX_CUT_TEXT as usize])],
        )
        .unwrap();
        assert_eq!(
            out.len(),
            FORWARDED_HANDSHAKE.len() + 8 + MAX_CUT_TEXT as usize
        );
    }

    #[test]
    fn filter_forces_the_shared_flag_in_every_version() {
        for (v, sec) in [
            (&b"RFB 003.008\n"[..], Some(1u8)),
            (b"RFB 003.007\n", Some(1)),
            (b"RFB 003.003\n", None),
            (b"RFB 003.005\n", None),
        ] {
            for shared in [0u8, 1, 7] {
                let mut s = v.to_vec();
                s.extend(sec);
                s.push(shared);
                s.extend_from_slice(&pointer_event());
                let (out, dropped) = run(false, &[&s]).unwrap();
                let mut want = v.to_vec();
                want.extend(sec);
                want.push(1);
                assert_eq!(out, want);
                assert_eq!(dropped, 1);
            }
        }
    }

    #[test]
    fn filter_bad_version_or_security_type_is_an_error() {
        for v in [
            &b"RFB 003.006\n"[..],
            b"RFB 004.000\n",
            b"RFB 003.8\n\n\n",
            b"GET / HTTP/1",
            b"RFB 003.008 ",
            b"RFB 003.+08\n",
        ] {
            assert!(
                matches!(run(true, &[v]).unwrap_err(), RfbError::BadVersion(_)),
                "{v:?}"
            );
        }
        for t in [0u8, 2, 16, 19] {
            let mut s = b"RFB 003.008\n".to_vec();
            s.push(t);
            assert_eq!(run(true, &[&s]).unwrap_err(), RfbError::Security(t));
        }
    }

    #[test]
    fn filter_seeded_random_streams_match_the_reference() {
        // A small xorshift so the test needs no dependency and replays exactly.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let kinds = session();
        for _ in 0..200 {
            let n = (next() % 40) as usize;
            let msgs: Vec<_> = (0..n)
                .map(|_| kinds[(next() % kinds.len() as u64) as usize].clone())
                .collect();
            let s = stream(&msgs);
            let mut chunks = Vec::new();
            let mut at = 0;
            while at < s.len() {
                let len = ((next() % 17) as usize).min(s.len() - at);
                chunks.push(&s[at..at + len]);
                at += len;
            }
            for control in [false, true] {
                let (out, _) = run(control, &chunks).unwrap();
                assert_eq!(out, expected(&msgs, control));
            }
        }
    }
}
