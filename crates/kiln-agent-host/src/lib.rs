//! Host side of the guest agent channel (crate `kiln-agent-host`).
//!
//! Owns: [`AgentClient`] (resync handshake, request/response correlation, one reader task and
//! one writer task per connection, the post-restore identity handshake
//! [`AgentClient::apply_identity`] / [`AgentClient::connect_restored`], the guest's network
//! configuration [`AgentClient::configure_network`], feature `net-v1`), [`ExecSession`] (one
//! running command: its output events, stdin and signals), [`TcpTunnel`] (one TCP
//! connection to a guest loopback port, from [`AgentClient::open_tcp`]), [`FileWriter`] /
//! [`FileReader`] (a guest file, or a directory as tar, streamed in or out, from
//! [`AgentClient::file_write`] / [`AgentClient::file_read`]) and the one-shot file operations
//! ([`AgentClient::file_stat`], [`AgentClient::file_list`], [`AgentClient::file_mkdir`],
//! [`AgentClient::file_remove`], [`AgentClient::file_rename`]; feature `files-v1`), and the
//! rate limiter every log line a guest can trigger goes through ([`ratelimit`],
//! [`rate_limited!`]; one per connection). The wire format lives in `kiln-agent-proto` and is described
//! in `docs/protocol.md`. Must not: know about sandboxes, QEMU or sockets (starting QEMU and
//! naming its chardev socket is `kiln-vmm`'s job); any `AsyncRead + AsyncWrite` stream works
//! (production: the UnixStream of QEMU's chardev).
//!
//! ```text
//!  connect(stream) ── SYNC(n1) ── SYNC(n2) ... (every ~250 ms until the deadline)
//!        │  discard every byte until SYNC_ACK(n_latest)
//!        ▼
//!  reader task ──▶ dispatch: responses → pending oneshots
//!        │                   STDOUT/STDERR → per-exec inbox (bounded by the exec's window)
//!        │                   STDOUT on a tunnel → tunnel inbox (bounded by its window)
//!        │                   STDOUT on a file read → its inbox (bounded by its window)
//!        │                   WINDOW → stdin / tunnel / file write credit, EXIT → inbox
//!        │                   tcp_eof / tcp_closed → tunnel, file_done → transfer
//!        │ EOF / error ──▶ close: fail pending requests, wake every exec and tunnel,
//!        │                 `closed()` resolves
//!  writer task ◀── bounded frame queue (requests, stdin, tunnel and file bytes,
//!                  tcp_shutdown, file_end) + coalesced WINDOW grants + close list
//!                  (tcp_close, file_abort; after the frames before it)
//! ```
//!
//! Invariants:
//! - The reader never waits on anything but the stream: the guest can always make progress
//!   writing, so a guest blocked on its own writes can never deadlock the host.
//! - Host memory per exec is bounded by its output window: the guest may not send more than
//!   granted (an overrun closes the channel), and credit is granted back only as the consumer
//!   takes events from [`ExecSession::next_event`]. The same holds per tunnel with its window
//!   and [`TcpTunnel`]'s `poll_read`, and per file read with [`FileReader`]'s `poll_read`,
//!   whatever the file size.
//! - Every queue is bounded: the frame queue by count, inboxes by the window, pending requests
//!   by the callers awaiting them, WINDOW grants and `tcp_close`s by one entry per stream.
//! - A channel closed because the guest broke the protocol says so: its [`ClosedReason`] is a
//!   violation naming what the guest sent (a bad header with its length, garbage, a malformed
//!   message, a stream the host never opened), and every waiter's error carries it.
//! - Once the channel dies, every waiter (requests, `next_event`, stdin writes, tunnel reads
//!   and writes, `closed()`) resolves promptly.
//! - Stream ids are never reused within a connection (execs and tunnels share the space).
//! - Id allocation, credit bookkeeping, receive inboxes, close messages and wake-all on
//!   channel death are written once, in the stream registry (`registry.rs`); each kind of
//!   stream only says what its frames and messages mean.

mod client;
mod error;
mod exec;
mod files;
pub mod ratelimit;
mod registry;
mod tunnel;

#[cfg(test)]
mod tests;

pub use client::{AgentClient, ClientConfig};
pub use error::{AgentError, ClosedReason};
pub use exec::{ExecEvent, ExecOutput, ExecSession, StdinSender};
pub use files::{FileReadRequest, FileReader, FileWriteRequest, FileWriter};
pub use kiln_agent_proto::{
    AgentInfo, DEFAULT_TERM, Entropy, EntryName, ErrorCode, ExecRequest, ExecUser, ExitStatus,
    FEATURE_FILES_V1, FEATURE_IDENTITY_V1, FEATURE_NET_V1, FEATURE_PTY_V1, FEATURE_TCP_V1,
    FEATURE_USER_V1, FileEntry, FileKind, FileList, FileStat, GuestIdentity, GuestPath, Hostname,
    IdentityAck, IdentityError, InterfaceName, LinkTarget, MAX_LIST_ENTRIES, MAX_NAME_BYTES,
    MAX_PATH_BYTES, MAX_TTY_DIM, MacAddr, MachineId, NetworkAck, NetworkConfig, NetworkError,
    PathError, RestoreId, StreamId, TermName, TtyError, TtyRequest, TtySize, UnixNanos, UserError,
};
pub use ratelimit::LogLimiter;
pub use tunnel::TcpTunnel;
