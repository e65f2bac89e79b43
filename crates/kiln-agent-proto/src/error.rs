//! The one error type of the protocol crate.
//!
//! Owns: [`ProtoError`], returned by frame encoding, the [`crate::Decoder`] and message
//! (de)serialisation. It is `Clone` (JSON errors are kept behind an `Arc`) so that a reader task
//! can hand the same cause to every waiter when a channel dies.

use std::sync::Arc;

use crate::frame::FrameKind;

/// Everything that can be wrong with bytes on the agent channel.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProtoError {
    /// The two bytes where a frame should start are not [`crate::FRAME_MAGIC`].
    #[error("bad frame magic {found:02x?}")]
    BadMagic {
        /// The bytes found instead.
        found: [u8; 2],
    },
    /// The kind byte names no frame kind of this protocol version.
    #[error("unknown frame kind {kind:#04x}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// The reserved flags byte is not zero.
    #[error("reserved flags {flags:#04x} set on a {kind} frame")]
    ReservedFlags {
        /// Kind of the frame.
        kind: FrameKind,
        /// The flags byte.
        flags: u8,
    },
    /// The header announces a payload larger than the kind allows.
    #[error("{kind} frame announces {len} payload bytes, the limit is {max}")]
    PayloadTooLong {
        /// Kind of the frame.
        kind: FrameKind,
        /// Announced (or, when encoding, actual) payload length.
        len: u64,
        /// The cap for this kind.
        max: usize,
    },
    /// The header announces a payload shorter than the kind needs.
    #[error("{kind} frame announces {len} payload bytes, at least {min} are needed")]
    PayloadTooShort {
        /// Kind of the frame.
        kind: FrameKind,
        /// Announced payload length.
        len: u64,
        /// The minimum for this kind.
        min: usize,
    },
    /// A frame uses a stream id its kind does not allow (0 for data, non-zero for control).
    #[error("{kind} frame on stream {stream} is not allowed")]
    WrongStream {
        /// Kind of the frame.
        kind: FrameKind,
        /// The stream id found.
        stream: u32,
    },
    /// A SYNC or SYNC_ACK body does not start with its 8-byte magic.
    #[error("{kind} body does not start with its magic")]
    BadSyncMagic {
        /// Kind of the frame.
        kind: FrameKind,
    },
    /// A SYNC offers no versions, too many, or its length does not match the count.
    #[error("sync frame offers {count} versions in a {len}-byte body")]
    BadVersionList {
        /// The version count byte.
        count: u8,
        /// Payload length.
        len: usize,
    },
    /// A WINDOW frame grants zero bytes.
    #[error("window frame grants zero bytes")]
    ZeroWindow,
    /// A data frame carries no bytes.
    #[error("empty {kind} frame")]
    EmptyData {
        /// Kind of the frame.
        kind: FrameKind,
    },
    /// A JSON body (control message or agent info) could not be decoded.
    #[error("invalid {what} json")]
    InvalidJson {
        /// Which body.
        what: &'static str,
        /// The parser's complaint.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// A value could not be encoded as JSON.
    #[error("failed to encode {what} as json")]
    EncodeJson {
        /// Which body.
        what: &'static str,
        /// The serialiser's complaint.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// The decoder met an error earlier and has not been told to [`crate::Decoder::hunt`].
    #[error("decoder stopped after an earlier error; hunt for a sync frame to resume")]
    Poisoned,
}
