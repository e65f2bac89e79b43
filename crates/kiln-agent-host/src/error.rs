//! Errors of the host side of the agent channel.
//!
//! Owns: [`AgentError`] (what callers see) and [`ClosedReason`] (why a channel died; `Clone`
//! so the reader task can hand the same cause to every waiter).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use kiln_agent_proto::{ErrorCode, ProtoError, RestoreId};

/// Why the agent channel is dead. A guest that broke the protocol is named as such
/// ([`ClosedReason::is_violation`]), with what it did, so a sandbox's failure reason says
/// more than "channel closed".
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClosedReason {
    /// The guest side (QEMU's chardev) closed the stream.
    #[error("end of stream")]
    Eof,
    /// Reading from the stream failed.
    #[error("read failed")]
    Read(#[source] Arc<io::Error>),
    /// Writing to the stream failed.
    #[error("write failed")]
    Write(#[source] Arc<io::Error>),
    /// The guest sent bytes that are not a valid frame or message (garbage, an oversized or
    /// malformed header, a control message that does not parse).
    #[error("guest protocol violation")]
    Decode(#[source] ProtoError),
    /// The guest sent a valid frame that breaks the protocol (credit overrun, a stream it does
    /// not own, a frame kind it may not send).
    #[error("guest protocol violation: {what}")]
    Violation {
        /// What it did.
        what: String,
    },
}

impl ClosedReason {
    /// Whether the guest broke the protocol (rather than the stream ending or failing).
    pub fn is_violation(&self) -> bool {
        matches!(
            self,
            ClosedReason::Decode(_) | ClosedReason::Violation { .. }
        )
    }
}

/// Everything that can go wrong talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Writing the SYNC handshake failed.
    #[error("failed to send the sync handshake")]
    HandshakeWrite(#[source] io::Error),
    /// No SYNC_ACK for our latest nonce arrived in time.
    #[error("no sync acknowledgement from the guest agent within {waited:?}")]
    HandshakeTimeout {
        /// The deadline.
        waited: Duration,
    },
    /// The guest chose a protocol version the host did not offer (0: none in common).
    #[error("guest agent chose protocol version {chosen}, the host offered {offered:?}")]
    VersionMismatch {
        /// The version in SYNC_ACK.
        chosen: u16,
        /// What the host offered.
        offered: Vec<u16>,
    },
    /// The channel is dead (see the source for why).
    #[error("agent channel closed")]
    ChannelClosed(#[source] ClosedReason),
    /// A message could not be encoded.
    #[error("failed to encode a message for the guest agent")]
    Encode(#[source] ProtoError),
    /// The agent answered a request with an error.
    #[error("guest agent rejected {op} ({code}): {message}")]
    Remote {
        /// The request's operation.
        op: &'static str,
        /// Stable error code.
        code: ErrorCode,
        /// The agent's explanation.
        message: String,
    },
    /// The agent answered a request with a response of the wrong kind.
    #[error("guest agent sent an unexpected answer to {op}")]
    UnexpectedResponse {
        /// The request's operation.
        op: &'static str,
    },
    /// The agent acknowledged a different restore id than the one sent.
    #[error("guest agent acknowledged restore {echoed}, but restore {sent} was sent")]
    RestoreIdMismatch {
        /// The id in the request.
        sent: RestoreId,
        /// The id in the acknowledgement.
        echoed: RestoreId,
    },
    /// The agent acknowledged an identity without confirming a required step.
    #[error(
        "guest agent acknowledged restore {restore_id} without confirming that it could {step}"
    )]
    IdentityIncomplete {
        /// The restore id.
        restore_id: RestoreId,
        /// The unconfirmed step.
        step: &'static str,
    },
    /// The agent acknowledged a network configuration that differs from the one sent.
    #[error("guest agent acknowledged a network configuration with a different {field}")]
    NetworkAckMismatch {
        /// The first field that differs.
        field: &'static str,
    },
    /// The exec has already exited; it takes no more stdin.
    #[error("the command has already exited")]
    ExecFinished,
    /// The exec was started without `stdin: true`.
    #[error("stdin was not requested for this command")]
    NoStdin,
    /// The guest agent predates a feature the request needs.
    #[error(
        "the guest agent does not support {what} (no {feature} feature); rebuild the image with a newer agent"
    )]
    MissingFeature {
        /// What was asked for.
        what: &'static str,
        /// The feature string the agent does not advertise.
        feature: &'static str,
    },
    /// A terminal size out of range.
    #[error("invalid terminal size")]
    BadTtySize(#[source] kiln_agent_proto::TtyError),
    /// All 2^32 - 1 stream ids of this session are used up.
    #[error("stream ids of this agent session are exhausted")]
    StreamsExhausted,
}
