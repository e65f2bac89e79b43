//! Wire format between kiln's host and its guest agent.
//!
//! Owns: the frame layout, the incremental [`Decoder`], the resync handshake
//! ([`SyncFrame`]/[`SyncAckFrame`]), the typed control messages ([`HostMessage`],
//! [`GuestMessage`]), the validated identity a restored guest is given ([`identity`]), the
//! validated values of the file operations ([`files`]), of terminal execs ([`tty`]) and of the
//! user an exec runs as ([`user`]), and the
//! pure flow-control bookkeeping ([`RecvWindow`], [`SendCredit`]).
//! Must not do: any I/O, any async, any allocation sized by a peer-supplied number before that
//! number has been checked against a cap.
//!
//! Both directions share ONE virtio-serial byte stream. Everything on it is a frame:
//!
//! ```text
//!  byte  0      1      2      3      4      5      6      7      8      9     10     11
//!      +------+------+------+------+------+------+------+------+------+------+------+------+
//!      | 0x9F | 0x6B | kind | flags|     stream id (u32 LE)    |  payload length (u32 LE)  |
//!      +------+------+------+------+------+------+------+------+------+------+------+------+
//!      | payload: `length` bytes, meaning given by `kind`                                 ...
//!      +------+------+------+----
//!
//!  magic   2 bytes 9F 6B, checked on every frame (detects misalignment)
//!  kind    0x01 SYNC      host→guest  stream 0  payload = sync body (below)
//!          0x02 SYNC_ACK  guest→host  stream 0  payload = sync-ack body (below)
//!          0x03 CONTROL   both        stream 0  payload = one JSON message (≤ 1 MiB)
//!          0x04 WINDOW    both        stream≠0  payload = credit increment u32 LE (≠ 0)
//!          0x10 STDIN     host→guest  stream≠0  payload = raw bytes (1..=64 KiB)
//!          0x11 STDOUT    guest→host  stream≠0  payload = raw bytes (1..=64 KiB)
//!          0x12 STDERR    guest→host  stream≠0  payload = raw bytes (1..=64 KiB)
//!                         (a TCP tunnel's stream uses STDIN toward and STDOUT from the guest
//!                         socket, a file write STDIN, a file read STDOUT; never STDERR)
//!  flags   reserved, must be 0 in version 1
//!
//!  SYNC body:      "KILN-SYN" | nonce u64 LE | n u8 (1..=16) | n × version u16 LE
//!  SYNC_ACK body:  "KILN-ACK" | nonce u64 LE | chosen version u16 LE (0 = none) | AgentInfo JSON
//! ```
//!
//! Invariants:
//! - A frame's length is checked against its kind's cap ([`FrameKind::max_payload`]) as soon as
//!   the 12 header bytes are present, before any payload is buffered or allocated.
//! - A [`Decoder`] holds at most one partial frame plus the bytes of the last `feed` call when
//!   its caller drains [`Decoder::next_frame`] after each feed.
//! - Data frames never exceed the receiver's granted credit (see [`flow`]); a receiver treats an
//!   overrun as a protocol violation.
//!
//! The full description (handshake, flow control, message list, versioning) is in
//! `docs/protocol.md`.

pub mod decoder;
pub mod error;
pub mod files;
pub mod flow;
pub mod frame;
pub mod fuzz;
pub mod handshake;
pub mod identity;
pub mod message;
pub mod network;
pub mod tty;
pub mod user;

pub use decoder::{Decoder, HuntTarget};
pub use error::ProtoError;
pub use files::{
    EntryName, FEATURE_FILES_V1, FileEntry, FileKind, FileList, FileStat, GuestPath, LinkTarget,
    MAX_LIST_ENTRIES, MAX_NAME_BYTES, MAX_PATH_BYTES, PathError, TooManyEntries, check_entry_name,
};
pub use flow::{FlowError, RecvWindow, SendCredit};
pub use frame::{DataChannel, DataFrameBuf, Frame, FrameKind, StreamId};
pub use fuzz::fuzz_decode;
pub use handshake::{AgentInfo, SyncAckFrame, SyncFrame, choose_version};
pub use identity::{
    Entropy, FEATURE_IDENTITY_V1, GuestIdentity, Hostname, IdentityAck, IdentityError, MachineId,
    RestoreId, UnixNanos,
};
pub use message::{
    ErrorBody, ErrorCode, ExecRequest, ExitStatus, FEATURE_TCP_V1, GuestMessage, HostMessage,
    Request, RequestId, Response, loose_request_id,
};
pub use network::{
    FEATURE_NET_V1, InterfaceName, MAX_MTU, MAX_NAMESERVERS, MAX_PREFIX_LEN, MIN_MTU,
    MIN_PREFIX_LEN, MacAddr, NetworkAck, NetworkConfig, NetworkError,
};
pub use tty::{
    DEFAULT_TERM, FEATURE_PTY_V1, MAX_TERM_BYTES, MAX_TTY_DIM, TermName, TtyError, TtyRequest,
    TtySize,
};
pub use user::{ExecUser, FEATURE_USER_V1, MAX_USER_BYTES, UserError, UserRef};

/// The two magic bytes that open every frame.
pub const FRAME_MAGIC: [u8; 2] = [0x9F, 0x6B];

/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 12;

/// Largest CONTROL payload (one JSON message), in bytes.
pub const MAX_CONTROL_PAYLOAD: usize = 1 << 20;

/// Largest STDIN/STDOUT/STDERR payload, in bytes.
pub const MAX_DATA_PAYLOAD: usize = 64 << 10;

/// Largest SYNC_ACK payload (fixed part plus the agent-info JSON), in bytes.
pub const MAX_SYNC_ACK_PAYLOAD: usize = 8 << 10;

/// The protocol version this build speaks best.
pub const PROTOCOL_VERSION: u16 = 1;

/// Every protocol version this build can speak, oldest first.
pub const SUPPORTED_VERSIONS: &[u16] = &[PROTOCOL_VERSION];

/// Most versions a SYNC may offer.
pub const MAX_OFFERED_VERSIONS: usize = 16;

/// Largest credit a receiver may have outstanding on one stream and direction (16 MiB).
/// A grant that would push the sender's credit above this is a protocol violation.
pub const MAX_WINDOW: u64 = 16 << 20;
