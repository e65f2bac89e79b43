//! Typed control messages carried as JSON in CONTROL frames.
//!
//! Owns: [`HostMessage`] (host → guest), [`GuestMessage`] (guest → host) and their parts.
//!
//! ```text
//!  host → guest                                       guest → host
//!  {"type":"request","id":N,"request":{"op":..}}  ─▶  {"type":"response","id":N,"response":{"op":..}}
//!                                                     {"type":"error","id":N,"error":{"code":..,"message":..}}
//!  {"type":"stdin_close","stream":S}                  {"type":"exit","stream":S,"status":{..}}
//!  {"type":"tcp_shutdown","stream":S}                 {"type":"tcp_eof","stream":S}
//!  {"type":"tcp_close","stream":S}                    {"type":"tcp_closed","stream":S,"error":..}
//!  {"type":"file_end","stream":S}                     {"type":"file_done","stream":S,"bytes":N,"error":..}
//!  {"type":"file_abort","stream":S}
//! ```
//!
//! Every request gets exactly one `response` or `error` with its id. Exec output is not JSON:
//! it travels in STDOUT/STDERR frames on the exec's stream, and the `exit` event follows the
//! last of them. A TCP tunnel (`tcp_connect`, feature [`FEATURE_TCP_V1`]) carries its bytes in
//! STDIN (host → guest) and STDOUT (guest → host) frames on its stream; `tcp_eof` follows the
//! last STDOUT frame and `tcp_closed` is the stream's last message.
//!
//! Extensibility invariants: each enum has an `Unknown` catch-all (`#[serde(other)]`) so a peer
//! speaking a newer minor revision never causes a decode failure: an unknown request is
//! answered with [`ErrorCode::Unsupported`], unknown events are ignored. New fields must be
//! `#[serde(default)]`. Additions slot in as new `Request` variants; a host uses them only if
//! the SYNC_ACK version or [`crate::AgentInfo::features`] says the guest has them. Added so
//! far: `apply_identity` (feature `identity-v1`, see [`crate::identity`]), `tcp_connect`
//! with its events (feature [`FEATURE_TCP_V1`]) and the file operations (feature
//! [`crate::FEATURE_FILES_V1`], values in [`crate::files`]): a `file_write` carries its bytes
//! in STDIN frames and ends with `file_end`, a `file_read` in STDOUT frames; `file_done` is
//! a transfer's last message; an exec's optional `tty` and `exec_resize` (feature
//! [`crate::FEATURE_PTY_V1`], values in [`crate::tty`]); `configure_network` (feature
//! [`crate::FEATURE_NET_V1`], values in [`crate::network`]). Planned: `secret_put`.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::ProtoError;
use crate::files::{EntryName, FileList, FileStat, GuestPath};
use crate::frame::{Frame, StreamId};
use crate::identity::{GuestIdentity, IdentityAck};
use crate::network::{NetworkAck, NetworkConfig};
use crate::tty::{TtyRequest, TtySize};
use crate::user::ExecUser;

/// Feature string in [`crate::AgentInfo::features`] of an agent that serves `tcp_connect`,
/// `tcp_shutdown`, `tcp_close` and sends `tcp_eof` / `tcp_closed`.
pub const FEATURE_TCP_V1: &str = "tcp-v1";

/// Correlates a request with its response or error. Chosen by the host, unique per session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What to run and how. Shared by the host API and the wire.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; a program without `/` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables overlaid on the agent's base environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/root`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whether stdin is a pipe fed by STDIN frames (otherwise `/dev/null`).
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Kill the process group once stdout + stderr together exceed this many bytes; exactly
    /// this many bytes are forwarded.
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
    /// Run on a pseudo-terminal (feature [`crate::FEATURE_PTY_V1`]): stdin, stdout and
    /// stderr are its slave, all output arrives as STDOUT, and the size can change with
    /// [`Request::ExecResize`]. Left out of the JSON when `None`, so a plain exec's bytes
    /// are what they were before the feature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtyRequest>,
    /// Run as this user (feature [`crate::FEATURE_USER_V1`]): `name`, `uid`, `name:group`,
    /// `uid:gid`, ... resolved against the guest's `/etc/passwd` and `/etc/group`. `None`
    /// runs as the agent's own user (root). Left out of the JSON when `None`, so an exec
    /// without it has the bytes it had before the feature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<ExecUser>,
}

impl ExecRequest {
    /// An exec of `argv` with defaults for everything else.
    pub fn new<I, S>(argv: I) -> ExecRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecRequest::default()
        }
    }
}

/// Host → guest control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage {
    /// A request; answered by exactly one [`GuestMessage::Response`] or [`GuestMessage::Error`].
    Request {
        /// Correlation id.
        id: RequestId,
        /// What is asked.
        request: Request,
    },
    /// No more stdin for this exec: the guest closes the pipe after writing what it received.
    StdinClose {
        /// The exec's stream.
        stream: StreamId,
    },
    /// No more bytes toward the guest socket of this tunnel: the guest calls
    /// `shutdown(SHUT_WR)` after writing the bytes it already received (feature `tcp-v1`).
    TcpShutdown {
        /// The tunnel's stream.
        stream: StreamId,
    },
    /// The host is done with this tunnel: the guest closes its socket at once, discarding
    /// whatever is still buffered either way, and answers [`GuestMessage::TcpClosed`]
    /// (feature `tcp-v1`).
    TcpClose {
        /// The tunnel's stream.
        stream: StreamId,
    },
    /// Every byte of a `file_write` has been sent: the guest finishes the file (fsync,
    /// rename over the target) and answers [`GuestMessage::FileDone`] (feature `files-v1`).
    FileEnd {
        /// The transfer's stream.
        stream: StreamId,
    },
    /// The host gives up on a file transfer: a write's temporary file is removed (nothing
    /// appears at the target), a read stops; the guest answers [`GuestMessage::FileDone`]
    /// with [`ErrorCode::Aborted`] (feature `files-v1`).
    FileAbort {
        /// The transfer's stream.
        stream: StreamId,
    },
    /// A message type this build does not know (sent by a newer host); ignored.
    #[serde(other)]
    Unknown,
}

/// A host request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness check; answered with [`Response::Pong`].
    Ping,
    /// Start a process; answered with [`Response::ExecStarted`], then output frames on
    /// `stream` and finally [`GuestMessage::Exit`].
    Exec {
        /// Stream for this exec's data (allocated by the host, unused in this session).
        stream: StreamId,
        /// Initial credit for stdout + stderr bytes on `stream`.
        output_window: u32,
        /// What to run.
        exec: ExecRequest,
    },
    /// Deliver a signal to an exec's process group.
    Signal {
        /// The exec's stream.
        stream: StreamId,
        /// Signal number (1..=64).
        signo: i32,
    },
    /// Sync filesystems and power the guest off; answered with [`Response::ShuttingDown`].
    Shutdown,
    /// Change the terminal size of a tty exec (feature `pty-v1`); answered with
    /// [`Response::Resized`], [`ErrorCode::NoSuchStream`] if no exec runs on `stream`, or
    /// [`ErrorCode::BadRequest`] if that exec has no terminal.
    ExecResize {
        /// The exec's stream.
        stream: StreamId,
        /// The new size.
        #[serde(flatten)]
        size: TtySize,
    },
    /// Give a restored guest a new identity (feature `identity-v1`); answered with
    /// [`Response::IdentityApplied`] or [`ErrorCode::IdentityFailed`]. Sent right after the
    /// handshake of a restored VM, before any other request.
    ApplyIdentity {
        /// The new identity.
        identity: GuestIdentity,
    },
    /// Configure the guest's network interface, routes and resolver (feature `net-v1`);
    /// answered with [`Response::NetworkConfigured`] or [`ErrorCode::NetworkFailed`]. Sent
    /// after a cold boot and after every restore or clone (after `apply_identity`); a
    /// second one replaces the first entirely.
    ConfigureNetwork {
        /// The whole configuration.
        network: NetworkConfig,
    },
    /// Open a TCP connection, inside the guest, to `127.0.0.1:port` (feature `tcp-v1`);
    /// answered with [`Response::TcpConnected`] once connected or [`ErrorCode::ConnectFailed`].
    /// Then bytes flow in STDIN (toward the guest socket) and STDOUT (from it) frames on
    /// `stream` until [`GuestMessage::TcpClosed`].
    TcpConnect {
        /// Stream for this tunnel's data (allocated by the host, unused in this session).
        stream: StreamId,
        /// Guest loopback port to connect to (1..=65535).
        port: u16,
        /// Initial credit for the bytes the guest sends from its socket on `stream`.
        window: u32,
    },
    /// Write a file (or, with `tar`, unpack a directory) at `path` from the bytes of STDIN
    /// frames on `stream` (feature `files-v1`); answered with [`Response::FileWriteReady`]
    /// once the temporary file exists and the initial credit has been granted. The bytes end
    /// with [`HostMessage::FileEnd`]; the result is [`GuestMessage::FileDone`].
    FileWrite {
        /// Stream for the file's bytes (allocated by the host, unused in this session).
        stream: StreamId,
        /// Where the file (or directory) appears, atomically, once complete.
        path: GuestPath,
        /// Permission bits of the file (default 0o644; ignored with `tar`, whose entries
        /// carry their own).
        #[serde(default)]
        mode: Option<u32>,
        /// The bytes are a tar archive to unpack into the directory `path`.
        #[serde(default)]
        tar: bool,
    },
    /// Read a file (or, with `tar`, pack a directory) at `path` as STDOUT frames on `stream`
    /// (feature `files-v1`); answered with [`Response::FileReadStarted`], then the bytes, then
    /// [`GuestMessage::FileDone`].
    FileRead {
        /// Stream for the file's bytes (allocated by the host, unused in this session).
        stream: StreamId,
        /// What to read.
        path: GuestPath,
        /// Pack the directory `path` as a tar archive.
        #[serde(default)]
        tar: bool,
        /// Initial credit for the bytes the guest sends on `stream`.
        window: u32,
    },
    /// Metadata of `path`, not following a final symlink (feature `files-v1`); answered with
    /// [`Response::FileStat`].
    FileStat {
        /// What to describe.
        path: GuestPath,
    },
    /// One page of the directory `path`, names in byte order (feature `files-v1`); answered
    /// with [`Response::FileList`].
    FileList {
        /// The directory.
        path: GuestPath,
        /// Start after this name (the previous page's `next_after`).
        #[serde(default)]
        after: Option<EntryName>,
    },
    /// Create the directory `path` (feature `files-v1`); answered with [`Response::FileOk`].
    FileMkdir {
        /// The directory to create.
        path: GuestPath,
        /// Create missing parents too, and succeed if `path` already is a directory.
        #[serde(default)]
        parents: bool,
        /// Permission bits (default 0o755).
        #[serde(default)]
        mode: Option<u32>,
    },
    /// Remove `path` (feature `files-v1`); answered with [`Response::FileOk`].
    FileRemove {
        /// What to remove (a symlink is removed, not followed).
        path: GuestPath,
        /// Remove a directory with everything in it; without it only an empty directory is.
        #[serde(default)]
        recursive: bool,
    },
    /// Rename `from` to `to` (`rename(2)`: replaces a file at `to`) (feature `files-v1`);
    /// answered with [`Response::FileOk`].
    FileRename {
        /// The current path.
        from: GuestPath,
        /// The new path.
        to: GuestPath,
    },
    /// An operation this build does not know; answered with [`ErrorCode::Unsupported`].
    #[serde(other)]
    Unknown,
}

impl Request {
    /// The operation name as on the wire, for messages and logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Exec { .. } => "exec",
            Request::Signal { .. } => "signal",
            Request::Shutdown => "shutdown",
            Request::ExecResize { .. } => "exec_resize",
            Request::ApplyIdentity { .. } => "apply_identity",
            Request::ConfigureNetwork { .. } => "configure_network",
            Request::TcpConnect { .. } => "tcp_connect",
            Request::FileWrite { .. } => "file_write",
            Request::FileRead { .. } => "file_read",
            Request::FileStat { .. } => "file_stat",
            Request::FileList { .. } => "file_list",
            Request::FileMkdir { .. } => "file_mkdir",
            Request::FileRemove { .. } => "file_remove",
            Request::FileRename { .. } => "file_rename",
            Request::Unknown => "unknown",
        }
    }
}

/// Guest → host control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMessage {
    /// Successful answer to a request.
    Response {
        /// The request's id.
        id: RequestId,
        /// The answer.
        response: Response,
    },
    /// Failed request. `id` is `None` only if the request was too malformed to carry one.
    Error {
        /// The request's id.
        id: Option<RequestId>,
        /// What went wrong.
        error: ErrorBody,
    },
    /// An exec ended; sent after its last output frame.
    Exit {
        /// The exec's stream (retired after this message).
        stream: StreamId,
        /// How it ended.
        status: ExitStatus,
    },
    /// The guest socket of a tunnel reached end of file (its peer shut down writing); sent
    /// after the tunnel's last STDOUT frame. The tunnel stays open toward the guest.
    TcpEof {
        /// The tunnel's stream.
        stream: StreamId,
    },
    /// A tunnel is gone and its guest socket closed; the stream's last message (retired
    /// after it). `error` is `None` after a clean close (both directions finished, or
    /// [`HostMessage::TcpClose`]) and the reason when a socket error ended it.
    TcpClosed {
        /// The tunnel's stream.
        stream: StreamId,
        /// Why the tunnel failed, if it did (lowercase, like `connection reset by peer`).
        #[serde(default)]
        error: Option<String>,
    },
    /// A file transfer ended; the stream's last message (feature `files-v1`). For a read it
    /// follows the last STDOUT frame; `bytes` is how many bytes the stream carried, so a
    /// receiver that counted fewer knows the transfer was cut short.
    FileDone {
        /// The transfer's stream.
        stream: StreamId,
        /// Bytes carried on the stream (written to the file, or sent to the host).
        bytes: u64,
        /// Why the transfer failed, if it did (a write then left nothing at its target).
        #[serde(default)]
        error: Option<ErrorBody>,
    },
    /// A message type this build does not know (sent by a newer guest); ignored.
    #[serde(other)]
    Unknown,
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Pong,
    /// Answer to [`Request::Exec`]. `pid` is `None` when the program could not be executed
    /// (the exec then reports exit 126/127 like a shell).
    ExecStarted {
        /// Pid of the process (also its process group id).
        pid: Option<u32>,
    },
    /// Answer to [`Request::Signal`]: the signal was sent.
    Signaled,
    /// Answer to [`Request::Shutdown`]: the guest is powering off.
    ShuttingDown,
    /// Answer to [`Request::ExecResize`]: the terminal has its new size.
    Resized,
    /// Answer to [`Request::ApplyIdentity`]: every step ran; what exactly happened.
    IdentityApplied(IdentityAck),
    /// Answer to [`Request::ConfigureNetwork`]: every step ran; the interface and what it
    /// now has.
    NetworkConfigured(NetworkAck),
    /// Answer to [`Request::TcpConnect`]: the guest socket is connected and the initial
    /// credit for the host's bytes has been granted with a WINDOW frame.
    TcpConnected,
    /// Answer to [`Request::FileWrite`]: the temporary file exists and the initial credit for
    /// the host's bytes has been granted with a WINDOW frame.
    FileWriteReady,
    /// Answer to [`Request::FileRead`]: the source is open; its bytes follow on the stream.
    FileReadStarted {
        /// Size of a regular file when it was opened (`None` for a tar stream). A claim only:
        /// the stream's length is what `file_done.bytes` says.
        #[serde(default)]
        size: Option<u64>,
    },
    /// Answer to [`Request::FileStat`].
    FileStat(FileStat),
    /// Answer to [`Request::FileList`].
    FileList(FileList),
    /// Answer to [`Request::FileMkdir`], [`Request::FileRemove`] and [`Request::FileRename`]:
    /// done.
    FileOk,
    /// An answer this build does not know.
    #[serde(other)]
    Unknown,
}

/// Error answer body: a stable machine-readable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable detail (lowercase, no trailing period).
    pub message: String,
}

/// Stable error codes (wire values are the snake_case names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or invalid (e.g. empty argv, bad signal number).
    BadRequest,
    /// The operation is not supported by this agent.
    Unsupported,
    /// No running exec has this stream id.
    NoSuchStream,
    /// The stream id is already used in this session.
    StreamInUse,
    /// Too many concurrent execs in this session.
    TooManyStreams,
    /// The working directory does not exist or is not a directory.
    BadCwd,
    /// The exec's `user` (or its group) is not known in the guest, or the guest's
    /// `/etc/passwd` or `/etc/group` cannot be read (`user-v1`).
    BadUser,
    /// The agent could not start the process for a reason of its own (pipes, fork, ...).
    SpawnFailed,
    /// An unexpected failure inside the agent.
    Internal,
    /// A step of `apply_identity` failed; the message names it and the steps already applied.
    IdentityFailed,
    /// A step of `configure_network` failed (or there is no single network interface to
    /// configure); the message names the step and the steps already done (`net-v1`).
    NetworkFailed,
    /// `tcp_connect` could not connect (refused, timed out, ...); the message says why.
    ConnectFailed,
    /// A file operation's path (or a parent of it) does not exist (`files-v1`).
    NotFound,
    /// A file operation was refused by the guest's permissions or a read-only filesystem
    /// (`files-v1`).
    PermissionDenied,
    /// A file operation needed a non-directory but found a directory (`files-v1`).
    IsADirectory,
    /// A file operation needed a directory but found something else (`files-v1`).
    NotADirectory,
    /// The target of a file operation already exists (`files-v1`).
    AlreadyExists,
    /// A path or a tar entry is not acceptable (relative, too long, escaping the target
    /// directory, ...) (`files-v1`).
    InvalidPath,
    /// The guest filesystem is full (`files-v1`).
    NoSpace,
    /// A directory to remove without `recursive` is not empty (`files-v1`).
    NotEmpty,
    /// Any other I/O failure of a file operation; the message says what (`files-v1`).
    Io,
    /// The host aborted the file transfer (`files-v1`).
    Aborted,
    /// A code this build does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::NoSuchStream => "no_such_stream",
            ErrorCode::StreamInUse => "stream_in_use",
            ErrorCode::TooManyStreams => "too_many_streams",
            ErrorCode::BadCwd => "bad_cwd",
            ErrorCode::BadUser => "bad_user",
            ErrorCode::SpawnFailed => "spawn_failed",
            ErrorCode::Internal => "internal",
            ErrorCode::IdentityFailed => "identity_failed",
            ErrorCode::NetworkFailed => "network_failed",
            ErrorCode::ConnectFailed => "connect_failed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::IsADirectory => "is_a_directory",
            ErrorCode::NotADirectory => "not_a_directory",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::InvalidPath => "invalid_path",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::NotEmpty => "not_empty",
            ErrorCode::Io => "io",
            ErrorCode::Aborted => "aborted",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an exec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, if the process exited normally (126/127 when it could not be executed).
    #[serde(default)]
    pub code: Option<i32>,
    /// Signal number, if the process was killed by a signal.
    #[serde(default)]
    pub signal: Option<i32>,
    /// The agent killed the process group because the timeout expired.
    #[serde(default)]
    pub timed_out: bool,
    /// The agent killed the process group because the output cap was reached.
    #[serde(default)]
    pub output_truncated: bool,
}

impl HostMessage {
    /// The message as a CONTROL frame.
    pub fn to_frame(&self) -> Result<Frame, ProtoError> {
        to_control_frame(self, "host message")
    }

    /// Parses a CONTROL payload.
    pub fn from_payload(payload: &[u8]) -> Result<HostMessage, ProtoError> {
        from_payload(payload, "host message")
    }
}

impl GuestMessage {
    /// The message as a CONTROL frame.
    pub fn to_frame(&self) -> Result<Frame, ProtoError> {
        to_control_frame(self, "guest message")
    }

    /// Parses a CONTROL payload.
    pub fn from_payload(payload: &[u8]) -> Result<GuestMessage, ProtoError> {
        from_payload(payload, "guest message")
    }
}

/// Best-effort extraction of a request id from a CONTROL payload that failed to parse as a
/// [`HostMessage`], so the guest can still answer it with an error.
pub fn loose_request_id(payload: &[u8]) -> Option<RequestId> {
    #[derive(Deserialize)]
    struct Loose {
        id: Option<u64>,
    }
    serde_json::from_slice::<Loose>(payload)
        .ok()
        .and_then(|l| l.id)
        .map(RequestId)
}

fn to_control_frame<T: Serialize>(msg: &T, what: &'static str) -> Result<Frame, ProtoError> {
    let json = serde_json::to_vec(msg).map_err(|e| ProtoError::EncodeJson {
        what,
        source: e.into(),
    })?;
    Ok(Frame::Control(Bytes::from(json)))
}

fn from_payload<T: DeserializeOwned>(payload: &[u8], what: &'static str) -> Result<T, ProtoError> {
    serde_json::from_slice(payload).map_err(|e| ProtoError::InvalidJson {
        what,
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ping_json_is_stable() {
        let msg = HostMessage::Request {
            id: RequestId(1),
            request: Request::Ping,
        };
        let json = serde_json::to_string(&msg).expect("serialises");
        assert_eq!(json, r#"{"type":"request","id":1,"request":{"op":"ping"}}"#);
    }

    #[test]
    fn request_exec_json_is_stable() {
        let msg = HostMessage::Request {
            id: RequestId(2),
            request: Request::Exec {
                stream: StreamId::FIRST,
                output_window: 65536,
                exec: ExecRequest {
                    argv: vec!["echo".into(), "hi".into()],
                    env: BTreeMap::from([("A".into(), "b".into())]),
                    cwd: Some("/tmp".into()),
                    stdin: true,
                    timeout_ms: Some(1000),
                    max_output_bytes: None,
                    tty: None,
                    user: None,
                },
            },
        };
        let json = serde_json::to_string(&msg).expect("serialises");
        assert_eq!(
            json,
            r#"{"type":"request","id":2,"request":{"op":"exec","stream":1,"output_window":65536,"exec":{"argv":["echo","hi"],"env":{"A":"b"},"cwd":"/tmp","stdin":true,"timeout_ms":1000,"max_output_bytes":null}}}"#
        );
        assert_eq!(HostMessage::from_payload(json.as_bytes()).ok(), Some(msg));
    }

    #[test]
    fn guest_exit_json_is_stable() {
        let msg = GuestMessage::Exit {
            stream: StreamId::FIRST,
            status: ExitStatus {
                code: None,
                signal: Some(9),
                timed_out: true,
                output_truncated: false,
            },
        };
        let json = serde_json::to_string(&msg).expect("serialises");
        assert_eq!(
            json,
            r#"{"type":"exit","stream":1,"status":{"code":null,"signal":9,"timed_out":true,"output_truncated":false}}"#
        );
    }

    #[test]
    fn unknown_request_op_parses_as_unknown() {
        let msg = HostMessage::from_payload(
            br#"{"type":"request","id":5,"request":{"op":"file_put","path":"/x"}}"#,
        )
        .expect("unknown ops parse");
        assert_eq!(
            msg,
            HostMessage::Request {
                id: RequestId(5),
                request: Request::Unknown
            }
        );
    }

    #[test]
    fn unknown_message_types_parse_as_unknown() {
        let host = HostMessage::from_payload(br#"{"type":"tunnel_data","x":1}"#);
        assert_eq!(host.ok(), Some(HostMessage::Unknown));
        let guest = GuestMessage::from_payload(br#"{"type":"log","line":"x"}"#);
        assert_eq!(guest.ok(), Some(GuestMessage::Unknown));
        let code: ErrorCode = serde_json::from_str(r#""quota_exceeded""#).expect("parses");
        assert_eq!(code, ErrorCode::Unknown);
    }

    #[test]
    fn exec_request_defaults_missing_fields() {
        let req: ExecRequest = serde_json::from_str(r#"{"argv":["ls"]}"#).expect("parses");
        assert_eq!(req, ExecRequest::new(["ls"]));
    }

    #[test]
    fn loose_request_id_finds_id_in_invalid_request() {
        let payload = br#"{"type":"request","id":77,"request":{"op":"exec","stream":0}}"#;
        assert!(HostMessage::from_payload(payload).is_err());
        assert_eq!(loose_request_id(payload), Some(RequestId(77)));
        assert_eq!(loose_request_id(b"not json"), None);
    }

    const IDENTITY_JSON: &str = concat!(
        r#"{"type":"request","id":3,"request":{"op":"apply_identity","identity":{"#,
        r#""restore_id":"0123456789abcdef0123456789abcdef","#,
        r#""entropy":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f","#,
        r#""wall_clock_unix_ns":1767225600123456789,"hostname":"sbx-1","#,
        r#""machine_id":"fedcba9876543210fedcba9876543210"}}}"#
    );

    fn identity() -> GuestIdentity {
        use crate::identity::{Entropy, Hostname, MachineId, RestoreId, UnixNanos};
        GuestIdentity {
            restore_id: RestoreId::new("0123456789abcdef0123456789abcdef").expect("valid"),
            entropy: Entropy::new((0u8..32).collect()).expect("valid"),
            wall_clock_unix_ns: UnixNanos::new(1_767_225_600_123_456_789).expect("valid"),
            hostname: Hostname::new("sbx-1").expect("valid"),
            machine_id: MachineId::new("fedcba9876543210fedcba9876543210").expect("valid"),
        }
    }

    #[test]
    fn request_apply_identity_json_is_stable() {
        let msg = HostMessage::Request {
            id: RequestId(3),
            request: Request::ApplyIdentity {
                identity: identity(),
            },
        };
        let json = serde_json::to_string(&msg).expect("serialises");
        assert_eq!(json, IDENTITY_JSON);
        assert_eq!(HostMessage::from_payload(json.as_bytes()).ok(), Some(msg));
    }

    #[test]
    fn response_identity_applied_json_is_stable() {
        let msg = GuestMessage::Response {
            id: RequestId(3),
            response: Response::IdentityApplied(IdentityAck {
                restore_id: identity().restore_id,
                entropy_credited: true,
                rng_reseeded: true,
                clock_set: true,
                clock_step_ns: -1500,
                hostname_set: true,
                machine_id_written: true,
            }),
        };
        let json = serde_json::to_string(&msg).expect("serialises");
        assert_eq!(
            json,
            r#"{"type":"response","id":3,"response":{"op":"identity_applied","restore_id":"0123456789abcdef0123456789abcdef","entropy_credited":true,"rng_reseeded":true,"clock_set":true,"clock_step_ns":-1500,"hostname_set":true,"machine_id_written":true}}"#
        );
        assert_eq!(GuestMessage::from_payload(json.as_bytes()).ok(), Some(msg));
    }

    #[test]
    fn apply_identity_hostile_values_fail_to_parse_but_keep_id() {
        let good = identity();
        let cases = [
            ("\"sbx-1\"", format!("\"{}\"", "h".repeat(64))),
            ("\"sbx-1\"", "\"-sbx\"".to_owned()),
            ("\"sbx-1\"", "\"sbx.example\"".to_owned()),
            (
                "\"fedcba9876543210fedcba9876543210\"",
                format!("\"{}\"", "0".repeat(32)),
            ),
            (
                "\"fedcba9876543210fedcba9876543210\"",
                format!("\"{}\"", "G".repeat(32)),
            ),
            (
                "\"0123456789abcdef0123456789abcdef\"",
                "\"0123\"".to_owned(),
            ),
            ("\"0123456789abcdef0123456789abcdef\"", "42".to_owned()),
            ("1767225600123456789", "1767225600".to_owned()),
            ("1767225600123456789", "-1".to_owned()),
            ("1767225600123456789", "18446744073709551615".to_owned()),
            ("\"0001020304050607", "\"zz01020304050607".to_owned()),
            // 31 bytes: too short.
            ("1c1d1e1f\"", "1c1d1e\"".to_owned()),
            // 513 bytes: too long.
            ("1c1d1e1f\"", format!("1c1d1e1f{}\"", "ab".repeat(481))),
        ];
        for (from, to) in cases {
            assert!(IDENTITY_JSON.contains(from), "{from}");
            let hostile = IDENTITY_JSON.replacen(from, &to, 1);
            let parsed = HostMessage::from_payload(hostile.as_bytes());
            assert!(parsed.is_err(), "accepted {from} -> {to}: {parsed:?}");
            assert_eq!(loose_request_id(hostile.as_bytes()), Some(RequestId(3)));
        }
        // A missing field is an error too.
        let missing = IDENTITY_JSON.replacen(r#""hostname":"sbx-1","#, "", 1);
        assert!(HostMessage::from_payload(missing.as_bytes()).is_err());
        // The unmodified fixture still parses (the cases above fail for their own reason).
        assert!(matches!(
            HostMessage::from_payload(IDENTITY_JSON.as_bytes()),
            Ok(HostMessage::Request { request: Request::ApplyIdentity { identity }, .. }) if identity == good
        ));
    }

    #[test]
    fn apply_identity_is_unknown_to_a_peer_without_it() {
        // What an agent of issue 2 sees: an op it does not know, answered `unsupported`.
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(tag = "op", rename_all = "snake_case")]
        enum OldRequest {
            Ping,
            #[serde(other)]
            Unknown,
        }
        #[derive(Deserialize)]
        struct OldMessage {
            request: OldRequest,
        }
        let old: OldMessage = serde_json::from_str(IDENTITY_JSON).expect("parses");
        assert_eq!(old.request, OldRequest::Unknown);
    }

    const NETWORK_JSON: &str = concat!(
        r#"{"type":"request","id":8,"request":{"op":"configure_network","network":{"#,
        r#""mac":"52:54:00:00:00:01","address":"10.0.0.2","prefix_len":24,"#,
        r#""gateway":"10.0.0.1","mtu":1500,"nameservers":["10.0.0.1"]}}}"#
    );

    #[test]
    fn configure_network_hostile_values_fail_to_parse_but_keep_id() {
        let cases = [
            (r#""52:54:00:00:00:01""#, r#""53:54:00:00:00:01""#),
            (r#""52:54:00:00:00:01""#, r#""52:54:00:00:00""#),
            (r#""52:54:00:00:00:01""#, r#""00:00:00:00:00:00""#),
            (r#""prefix_len":24"#, r#""prefix_len":0"#),
            (r#""prefix_len":24"#, r#""prefix_len":31"#),
            (r#""prefix_len":24"#, r#""prefix_len":300"#),
            (r#""gateway":"10.0.0.1""#, r#""gateway":"10.0.1.1""#),
            (r#""gateway":"10.0.0.1""#, r#""gateway":"10.0.0.2""#),
            (r#""mtu":1500"#, r#""mtu":575"#),
            (r#""mtu":1500"#, r#""mtu":70000"#),
            (r#""mtu":1500"#, r#""mtu":-1"#),
            (
                r#"["10.0.0.1"]"#,
                r#"["1.1.1.1","1.1.1.1","1.1.1.1","1.1.1.1"]"#,
            ),
            (r#"["10.0.0.1"]"#, r#"["10.0.0"]"#),
            (r#""address":"10.0.0.2""#, r#""address":"10.0.0.255""#),
            (r#""address":"10.0.0.2""#, r#""address":"224.0.0.2""#),
        ];
        for (from, to) in cases {
            assert!(NETWORK_JSON.contains(from), "{from}");
            let hostile = NETWORK_JSON.replacen(from, to, 1);
            let parsed = HostMessage::from_payload(hostile.as_bytes());
            assert!(parsed.is_err(), "accepted {from} -> {to}: {parsed:?}");
            assert_eq!(loose_request_id(hostile.as_bytes()), Some(RequestId(8)));
        }
        let missing = NETWORK_JSON.replacen(r#""mtu":1500,"#, "", 1);
        assert!(HostMessage::from_payload(missing.as_bytes()).is_err());
        assert!(matches!(
            HostMessage::from_payload(NETWORK_JSON.as_bytes()),
            Ok(HostMessage::Request {
                request: Request::ConfigureNetwork { .. },
                ..
            })
        ));
    }

    #[test]
    fn tcp_messages_json_is_stable() {
        let stream = StreamId::new(5).expect("non-zero");
        let cases: [(&str, String); 6] = [
            (
                r#"{"type":"request","id":4,"request":{"op":"tcp_connect","stream":5,"port":5432,"window":262144}}"#,
                serde_json::to_string(&HostMessage::Request {
                    id: RequestId(4),
                    request: Request::TcpConnect {
                        stream,
                        port: 5432,
                        window: 262_144,
                    },
                })
                .expect("serialises"),
            ),
            (
                r#"{"type":"tcp_shutdown","stream":5}"#,
                serde_json::to_string(&HostMessage::TcpShutdown { stream }).expect("serialises"),
            ),
            (
                r#"{"type":"tcp_close","stream":5}"#,
                serde_json::to_string(&HostMessage::TcpClose { stream }).expect("serialises"),
            ),
            (
                r#"{"type":"response","id":4,"response":{"op":"tcp_connected"}}"#,
                serde_json::to_string(&GuestMessage::Response {
                    id: RequestId(4),
                    response: Response::TcpConnected,
                })
                .expect("serialises"),
            ),
            (
                r#"{"type":"tcp_eof","stream":5}"#,
                serde_json::to_string(&GuestMessage::TcpEof { stream }).expect("serialises"),
            ),
            (
                r#"{"type":"tcp_closed","stream":5,"error":"connection reset by peer"}"#,
                serde_json::to_string(&GuestMessage::TcpClosed {
                    stream,
                    error: Some("connection reset by peer".into()),
                })
                .expect("serialises"),
            ),
        ];
        for (expected, json) in cases {
            assert_eq!(json, expected);
        }
        let refused = GuestMessage::Error {
            id: Some(RequestId(4)),
            error: ErrorBody {
                code: ErrorCode::ConnectFailed,
                message: "connection to 127.0.0.1:5432 refused".into(),
            },
        };
        assert_eq!(
            serde_json::to_string(&refused).expect("serialises"),
            r#"{"type":"error","id":4,"error":{"code":"connect_failed","message":"connection to 127.0.0.1:5432 refused"}}"#
        );
    }

    #[test]
    fn tcp_closed_without_error_field_parses_as_clean() {
        let msg = GuestMessage::from_payload(br#"{"type":"tcp_closed","stream":2}"#);
        assert_eq!(
            msg.ok(),
            Some(GuestMessage::TcpClosed {
                stream: StreamId::new(2).expect("non-zero"),
                error: None
            })
        );
    }

    #[test]
    fn tcp_connect_hostile_values_fail_to_parse_but_keep_id() {
        for bad in [
            r#"{"type":"request","id":9,"request":{"op":"tcp_connect","stream":0,"port":80,"window":1}}"#,
            r#"{"type":"request","id":9,"request":{"op":"tcp_connect","stream":1,"port":65536,"window":1}}"#,
            r#"{"type":"request","id":9,"request":{"op":"tcp_connect","stream":1,"port":-1,"window":1}}"#,
            r#"{"type":"request","id":9,"request":{"op":"tcp_connect","stream":1,"port":80,"window":4294967296}}"#,
            r#"{"type":"request","id":9,"request":{"op":"tcp_connect","stream":1,"port":80}}"#,
        ] {
            assert!(HostMessage::from_payload(bad.as_bytes()).is_err(), "{bad}");
            assert_eq!(loose_request_id(bad.as_bytes()), Some(RequestId(9)));
        }
    }

    #[test]
    fn tcp_connect_is_unknown_to_a_peer_without_it() {
        // What an agent without `tcp-v1` sees: an unknown op (answered `unsupported`); and
        // what a host without it sees of the tunnel events: unknown messages (ignored).
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(tag = "op", rename_all = "snake_case")]
        enum OldRequest {
            Ping,
            #[serde(other)]
            Unknown,
        }
        #[derive(Deserialize)]
        struct OldMessage {
            request: OldRequest,
        }
        let json = r#"{"type":"request","id":1,"request":{"op":"tcp_connect","stream":1,"port":80,"window":1}}"#;
        let old: OldMessage = serde_json::from_str(json).expect("parses");
        assert_eq!(old.request, OldRequest::Unknown);
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum OldGuestMessage {
            Exit,
            #[serde(other)]
            Unknown,
        }
        for event in [
            r#"{"type":"tcp_eof","stream":1}"#,
            r#"{"type":"tcp_closed","stream":1,"error":null}"#,
        ] {
            let old: OldGuestMessage = serde_json::from_str(event).expect("parses");
            assert_eq!(old, OldGuestMessage::Unknown);
        }
    }

    #[test]
    fn file_messages_json_is_stable() {
        let stream = StreamId::new(6).expect("non-zero");
        let path = |p: &str| GuestPath::new(p).expect("valid path");
        let stat = FileStat {
            kind: crate::FileKind::Symlink,
            size: 4,
            mode: 0o777,
            mtime_unix_ns: 1_767_225_600_000_000_000,
            uid: 0,
            gid: 0,
            symlink_target: Some(crate::LinkTarget::new("/etc").expect("valid")),
        };
        let entry = crate::FileEntry {
            name: EntryName::new("a.txt").expect("valid"),
            stat: FileStat {
                kind: crate::FileKind::File,
                symlink_target: None,
                ..stat.clone()
            },
        };
        let list = FileList::new(vec![entry], Some(EntryName::new("a.txt").expect("valid")))
            .expect("small list");
        let host: [(&str, HostMessage); 9] = [
            (
                r#"{"type":"request","id":1,"request":{"op":"file_write","stream":6,"path":"/root/a","mode":420,"tar":false}}"#,
                HostMessage::Request {
                    id: RequestId(1),
                    request: Request::FileWrite {
                        stream,
                        path: path("/root/a"),
                        mode: Some(0o644),
                        tar: false,
                    },
                },
            ),
            (
                r#"{"type":"request","id":2,"request":{"op":"file_read","stream":6,"path":"/root","tar":true,"window":262144}}"#,
                HostMessage::Request {
                    id: RequestId(2),
                    request: Request::FileRead {
                        stream,
                        path: path("/root"),
                        tar: true,
                        window: 262_144,
                    },
                },
            ),
            (
                r#"{"type":"request","id":3,"request":{"op":"file_stat","path":"/etc"}}"#,
                HostMessage::Request {
                    id: RequestId(3),
                    request: Request::FileStat { path: path("/etc") },
                },
            ),
            (
                r#"{"type":"request","id":4,"request":{"op":"file_list","path":"/etc","after":"hosts"}}"#,
                HostMessage::Request {
                    id: RequestId(4),
                    request: Request::FileList {
                        path: path("/etc"),
                        after: Some(EntryName::new("hosts").expect("valid")),
                    },
                },
            ),
            (
                r#"{"type":"request","id":5,"request":{"op":"file_mkdir","path":"/a/b","parents":true,"mode":null}}"#,
                HostMessage::Request {
                    id: RequestId(5),
                    request: Request::FileMkdir {
                        path: path("/a/b"),
                        parents: true,
                        mode: None,
                    },
                },
            ),
            (
                r#"{"type":"request","id":6,"request":{"op":"file_remove","path":"/a","recursive":false}}"#,
                HostMessage::Request {
                    id: RequestId(6),
                    request: Request::FileRemove {
                        path: path("/a"),
                        recursive: false,
                    },
                },
            ),
            (
                r#"{"type":"request","id":7,"request":{"op":"file_rename","from":"/a","to":"/b"}}"#,
                HostMessage::Request {
                    id: RequestId(7),
                    request: Request::FileRename {
                        from: path("/a"),
                        to: path("/b"),
                    },
                },
            ),
            (
                r#"{"type":"file_end","stream":6}"#,
                HostMessage::FileEnd { stream },
            ),
            (
                r#"{"type":"file_abort","stream":6}"#,
                HostMessage::FileAbort { stream },
            ),
        ];
        for (json, msg) in host {
            assert_eq!(serde_json::to_string(&msg).expect("serialises"), json);
            assert_eq!(HostMessage::from_payload(json.as_bytes()).ok(), Some(msg));
        }
        let guest: [(&str, GuestMessage); 7] = [
            (
                r#"{"type":"response","id":1,"response":{"op":"file_write_ready"}}"#,
                GuestMessage::Response {
                    id: RequestId(1),
                    response: Response::FileWriteReady,
                },
            ),
            (
                r#"{"type":"response","id":2,"response":{"op":"file_read_started","size":null}}"#,
                GuestMessage::Response {
                    id: RequestId(2),
                    response: Response::FileReadStarted { size: None },
                },
            ),
            (
                r#"{"type":"response","id":3,"response":{"op":"file_stat","kind":"symlink","size":4,"mode":511,"mtime_unix_ns":1767225600000000000,"uid":0,"gid":0,"symlink_target":"/etc"}}"#,
                GuestMessage::Response {
                    id: RequestId(3),
                    response: Response::FileStat(stat),
                },
            ),
            (
                r#"{"type":"response","id":4,"response":{"op":"file_list","entries":[{"name":"a.txt","stat":{"kind":"file","size":4,"mode":511,"mtime_unix_ns":1767225600000000000,"uid":0,"gid":0,"symlink_target":null}}],"next_after":"a.txt"}}"#,
                GuestMessage::Response {
                    id: RequestId(4),
                    response: Response::FileList(list),
                },
            ),
            (
                r#"{"type":"response","id":5,"response":{"op":"file_ok"}}"#,
                GuestMessage::Response {
                    id: RequestId(5),
                    response: Response::FileOk,
                },
            ),
            (
                r#"{"type":"file_done","stream":6,"bytes":67108864,"error":null}"#,
                GuestMessage::FileDone {
                    stream,
                    bytes: 64 << 20,
                    error: None,
                },
            ),
            (
                r#"{"type":"file_done","stream":6,"bytes":0,"error":{"code":"not_found","message":"/x does not exist"}}"#,
                GuestMessage::FileDone {
                    stream,
                    bytes: 0,
                    error: Some(ErrorBody {
                        code: ErrorCode::NotFound,
                        message: "/x does not exist".into(),
                    }),
                },
            ),
        ];
        for (json, msg) in guest {
            assert_eq!(serde_json::to_string(&msg).expect("serialises"), json);
            assert_eq!(GuestMessage::from_payload(json.as_bytes()).ok(), Some(msg));
        }
    }

    #[test]
    fn file_requests_with_hostile_paths_fail_to_parse_but_keep_id() {
        let long = format!("/{}", "a".repeat(crate::MAX_PATH_BYTES));
        for bad in [
            r#"{"type":"request","id":9,"request":{"op":"file_stat","path":"relative"}}"#
                .to_owned(),
            r#"{"type":"request","id":9,"request":{"op":"file_stat","path":"/a\u0000b"}}"#
                .to_owned(),
            format!(
                r#"{{"type":"request","id":9,"request":{{"op":"file_stat","path":"{long}"}}}}"#
            ),
            r#"{"type":"request","id":9,"request":{"op":"file_list","path":"/","after":"../x"}}"#
                .to_owned(),
            r#"{"type":"request","id":9,"request":{"op":"file_rename","from":"/a"}}"#.to_owned(),
        ] {
            assert!(HostMessage::from_payload(bad.as_bytes()).is_err(), "{bad}");
            assert_eq!(loose_request_id(bad.as_bytes()), Some(RequestId(9)));
        }
    }

    #[test]
    fn pty_messages_json_is_stable() {
        use crate::tty::{TermName, TtyRequest, TtySize};
        let stream = StreamId::new(3).expect("non-zero");
        let exec = HostMessage::Request {
            id: RequestId(1),
            request: Request::Exec {
                stream,
                output_window: 65536,
                exec: ExecRequest {
                    stdin: true,
                    tty: Some(TtyRequest {
                        size: TtySize::new(24, 80).expect("valid"),
                        term: Some(TermName::new("xterm").expect("valid")),
                    }),
                    ..ExecRequest::new(["sh"])
                },
            },
        };
        let host: [(&str, HostMessage); 2] = [
            (
                r#"{"type":"request","id":1,"request":{"op":"exec","stream":3,"output_window":65536,"exec":{"argv":["sh"],"env":{},"cwd":null,"stdin":true,"timeout_ms":null,"max_output_bytes":null,"tty":{"rows":24,"cols":80,"term":"xterm"}}}}"#,
                exec,
            ),
            (
                r#"{"type":"request","id":2,"request":{"op":"exec_resize","stream":3,"rows":40,"cols":100}}"#,
                HostMessage::Request {
                    id: RequestId(2),
                    request: Request::ExecResize {
                        stream,
                        size: TtySize::new(40, 100).expect("valid"),
                    },
                },
            ),
        ];
        for (json, msg) in host {
            assert_eq!(serde_json::to_string(&msg).expect("serialises"), json);
            assert_eq!(HostMessage::from_payload(json.as_bytes()).ok(), Some(msg));
        }
        let resized = GuestMessage::Response {
            id: RequestId(2),
            response: Response::Resized,
        };
        let json = r#"{"type":"response","id":2,"response":{"op":"resized"}}"#;
        assert_eq!(serde_json::to_string(&resized).expect("serialises"), json);
        assert_eq!(
            GuestMessage::from_payload(json.as_bytes()).ok(),
            Some(resized)
        );
    }

    #[test]
    fn pty_hostile_values_fail_to_parse_but_keep_id() {
        for bad in [
            r#"{"type":"request","id":9,"request":{"op":"exec_resize","stream":1,"rows":0,"cols":80}}"#,
            r#"{"type":"request","id":9,"request":{"op":"exec_resize","stream":1,"rows":100000,"cols":80}}"#,
            r#"{"type":"request","id":9,"request":{"op":"exec_resize","stream":1,"rows":24}}"#,
            r#"{"type":"request","id":9,"request":{"op":"exec_resize","stream":0,"rows":24,"cols":80}}"#,
            r#"{"type":"request","id":9,"request":{"op":"exec","stream":1,"output_window":1,"exec":{"argv":["sh"],"tty":{"rows":1001,"cols":80}}}}"#,
            r#"{"type":"request","id":9,"request":{"op":"exec","stream":1,"output_window":1,"exec":{"argv":["sh"],"tty":{"rows":24,"cols":80,"term":"x\u001b[2J"}}}}"#,
        ] {
            assert!(HostMessage::from_payload(bad.as_bytes()).is_err(), "{bad}");
            assert_eq!(loose_request_id(bad.as_bytes()), Some(RequestId(9)));
        }
    }

    #[test]
    fn exec_with_user_json_is_stable_and_validated() {
        let msg = HostMessage::Request {
            id: RequestId(3),
            request: Request::Exec {
                stream: StreamId::FIRST,
                output_window: 65536,
                exec: ExecRequest {
                    user: Some(ExecUser::new("nobody:65534").expect("valid")),
                    ..ExecRequest::new(["id"])
                },
            },
        };
        let json = serde_json::to_string(&msg).expect("serialises");
        assert_eq!(
            json,
            r#"{"type":"request","id":3,"request":{"op":"exec","stream":1,"output_window":65536,"exec":{"argv":["id"],"env":{},"cwd":null,"stdin":false,"timeout_ms":null,"max_output_bytes":null,"user":"nobody:65534"}}}"#
        );
        assert_eq!(HostMessage::from_payload(json.as_bytes()).ok(), Some(msg));
        // A message of a host without `user-v1` still parses, with no user.
        let old = r#"{"type":"request","id":4,"request":{"op":"exec","stream":1,"output_window":1,"exec":{"argv":["id"]}}}"#;
        match HostMessage::from_payload(old.as_bytes()) {
            Ok(HostMessage::Request {
                request: Request::Exec { exec, .. },
                ..
            }) => assert_eq!(exec.user, None),
            other => panic!("expected an exec, got {other:?}"),
        }
        // A malformed user fails the whole message, whose id can still be answered.
        for bad in [
            r#"{"type":"request","id":9,"request":{"op":"exec","stream":1,"output_window":1,"exec":{"argv":["id"],"user":"a:b:c"}}}"#,
            r#"{"type":"request","id":9,"request":{"op":"exec","stream":1,"output_window":1,"exec":{"argv":["id"],"user":"root\n"}}}"#,
            r#"{"type":"request","id":9,"request":{"op":"exec","stream":1,"output_window":1,"exec":{"argv":["id"],"user":""}}}"#,
            r#"{"type":"request","id":9,"request":{"op":"exec","stream":1,"output_window":1,"exec":{"argv":["id"],"user":"4294967295"}}}"#,
            r#"{"type":"request","id":9,"request":{"op":"exec","stream":1,"output_window":1,"exec":{"argv":["id"],"user":0}}}"#,
        ] {
            assert!(HostMessage::from_payload(bad.as_bytes()).is_err(), "{bad}");
            assert_eq!(loose_request_id(bad.as_bytes()), Some(RequestId(9)));
        }
    }

    #[test]
    fn exec_without_user_serialises_as_before_user_v1() {
        let json = serde_json::to_string(&ExecRequest::new(["ls"])).expect("serialises");
        assert!(!json.contains("user"), "{json}");
    }

    #[test]
    fn exec_without_tty_serialises_as_before_pty() {
        let json = serde_json::to_string(&ExecRequest::new(["ls"])).expect("serialises");
        assert!(!json.contains("tty"), "{json}");
    }

    #[test]
    fn error_code_display_matches_wire_name() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Unsupported,
            ErrorCode::NoSuchStream,
            ErrorCode::StreamInUse,
            ErrorCode::TooManyStreams,
            ErrorCode::BadCwd,
            ErrorCode::BadUser,
            ErrorCode::SpawnFailed,
            ErrorCode::Internal,
            ErrorCode::IdentityFailed,
            ErrorCode::NetworkFailed,
            ErrorCode::ConnectFailed,
            ErrorCode::NotFound,
            ErrorCode::PermissionDenied,
            ErrorCode::IsADirectory,
            ErrorCode::NotADirectory,
            ErrorCode::AlreadyExists,
            ErrorCode::InvalidPath,
            ErrorCode::NoSpace,
            ErrorCode::NotEmpty,
            ErrorCode::Io,
            ErrorCode::Aborted,
        ] {
            let json = serde_json::to_string(&code).expect("serialises");
            assert_eq!(json, format!("\"{code}\""));
        }
    }
}
