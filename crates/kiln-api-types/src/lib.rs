//! Request and response types of kiln's HTTP API, shared by the daemon (`kilnd`), the CLI and
//! (later) the generated SDKs.
//!
//! This crate owns the *shape* of the API and nothing else: no I/O, no engine logic. Every type
//! here is serialised as JSON. Streaming endpoints (exec over a WebSocket, image builds as
//! newline-delimited JSON) exchange the [`ExecClientMessage`], [`ExecServerMessage`] and
//! [`ImageBuildEvent`] types; the byte layout of the exec WebSocket is documented in
//! `docs/protocol.md`.
//!
//! Invariants:
//! - identifiers are newtypes ([`SandboxId`]) validated on parse, so a malformed id is rejected
//!   at the edge instead of reaching the engine or the file system;
//! - limits that the API enforces live here as constants, so CLI and daemon agree on them.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

mod doctor;
mod error_code;
mod images;
pub mod routes;
mod schema;
mod storage;

pub use doctor::{DoctorReport, NetworkModeSupport};
pub use error_code::{ErrorCode, UnknownErrorCode};
pub use images::{
    ImageBuildEvent, ImageBuildRecipeRequest, ImageBuildRequest, ImageFileSize, ImageImportRequest,
    ImageInfo, ImageList, ImageOrigin,
};
pub use schema::SANDBOX_ID_PATTERN;
pub use storage::{
    DiskUsage, PruneItem, PruneReport, PruneRequest, UsageCategory, UsageItem, UsageKind,
};

pub mod desktop;
pub mod desktop_view;
pub mod execs;
pub mod files;
pub mod jobs;
pub mod names;
pub mod network;
pub mod pools;
pub mod sandbox;

pub use desktop::{
    ActionQuery, ActionReceipt, DEFAULT_SCREEN, DesktopAction, MouseButton, Point,
    ReceiptScreenshot, ReviewExport, ReviewExportRequest, Screen, ScreenshotQuery, Settle,
};
pub use desktop_view::{DEFAULT_VIEW_TTL_SECS, DesktopViewRequest, DesktopViewResponse};
pub use execs::{ExecId, ExecInfo, ExecKillRequest, ExecList, ExecState, parse_signal};
pub use files::{
    FileInfo, FileKind, FileList, FileListQuery, FileMkdirRequest, FilePathQuery, FileReadQuery,
    FileRemoveQuery, FileRenameRequest, FileWriteQuery, parse_mode,
};

pub use jobs::{
    CloudeJob, CloudeStatus, JobCompile, JobCreated, JobEvent, JobId, JobInfo, JobList, JobRequest,
    JobStatus, JobStream, JobSummary, JobTiming, LanguageEntry, LanguageList,
};
pub use names::{
    ImageName, InvalidInput, Label, LabelKey, Labels, SandboxName, SnapshotName,
    parse_duration_secs,
};
pub use network::{
    NetRule, NetRules, NetStats, NetworkGroup, NetworkSpec, NetworkStatus, NetworkUpdate, Refusal,
    RefusalReason,
};
pub use pools::{PoolInfo, PoolList, PoolOrigin, PoolSetRequest};
pub use sandbox::{
    Event, EventKind, Lifetime, MachineSpec, SandboxFilter, SandboxInfo, SandboxSource,
    SandboxSpec, SandboxState, SandboxStatus, StartSource,
};

/// Version of this API; served by `GET /v1/health`.
pub const API_VERSION: u32 = 1;

/// Fewest vCPUs a sandbox may have.
pub const MIN_CPUS: u32 = 1;
/// Most vCPUs a sandbox may have.
pub const MAX_CPUS: u32 = 16;
/// Least guest memory in MiB (the Debian cloud kernel and the agent need about 96 MiB).
pub const MIN_MEMORY_MIB: u32 = 128;
/// Most guest memory in MiB.
pub const MAX_MEMORY_MIB: u32 = 16384;
/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// Default number of vCPUs.
pub const DEFAULT_CPUS: u32 = 1;
/// Default image of `kiln run`.
pub const DEFAULT_IMAGE: &str = "python";
/// Longest argv (in elements) an exec may carry.
pub const MAX_ARGV: usize = 4096;
/// Most environment variables an exec may carry.
pub const MAX_ENV: usize = 1024;

/// Stream tag of a binary exec WebSocket message carrying stdout bytes.
pub const STREAM_STDOUT: u8 = 1;
/// Stream tag of a binary exec WebSocket message carrying stderr bytes.
pub const STREAM_STDERR: u8 = 2;

/// Identifier of a sandbox: `sb-` followed by 12 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(String);

/// A string that is not a valid identifier.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid sandbox id {0:?}: expected `sb-` and 12 lowercase hex digits")]
pub struct InvalidId(pub String);

impl SandboxId {
    /// A new random id.
    pub fn random() -> Self {
        let n: u64 = rand::random::<u64>() & 0xffff_ffff_ffff;
        SandboxId(format!("sb-{n:012x}"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SandboxId {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sb-")
            .ok_or_else(|| InvalidId(s.to_owned()))?;
        if hex.len() == 12
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(SandboxId(s.to_owned()))
        } else {
            Err(InvalidId(s.to_owned()))
        }
    }
}

impl TryFrom<String> for SandboxId {
    type Error = InvalidId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> String {
        id.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Most published ports one sandbox may have.
pub const MAX_PUBLISHED_PORTS: usize = 32;

/// `HOST_PORT:GUEST_PORT`: the daemon listens on `127.0.0.1:host` and tunnels each connection
/// to the guest's `127.0.0.1:guest` through the agent channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// Host port (1..=65535).
    pub host: u16,
    /// Guest port (1..=65535).
    pub guest: u16,
}

impl FromStr for PortMapping {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("invalid port mapping {s:?}: expected HOST_PORT:GUEST_PORT, e.g. 8080:80");
        let (h, g) = s.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
        Ok(PortMapping {
            host: port(h)?,
            guest: port(g)?,
        })
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.guest)
    }
}

/// `POST /v1/sandboxes/{id}/snapshot`: snapshot a running sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateRequest {
    /// The new snapshot's name (`warm-…` is reserved).
    pub name: SnapshotName,
}

/// What the API says about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    /// Name (`warm-…` for warm snapshots).
    pub name: String,
    /// `warm` (captured per image automatically) or `user` (`kiln snapshot`).
    pub kind: String,
    /// Image name, if the image is still present.
    pub image: Option<String>,
    /// Image content id.
    pub image_id: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Bytes allocated on disk.
    pub size_bytes: u64,
    /// Guest pause while capturing, in milliseconds.
    pub pause_ms: u64,
    /// The sandbox a user snapshot was taken of.
    pub origin: Option<String>,
    /// Capture time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Running sandboxes restored from it.
    pub used_by: Vec<SandboxId>,
    /// Why it cannot be used (its manifest is unreadable); it can still be removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unusable: Option<String>,
}

/// `GET /v1/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    /// All snapshots, by name.
    pub snapshots: Vec<SnapshotInfo>,
}

/// `POST /v1/sandboxes/{id}/secrets`: deliver (new values of) secrets and rerun the image's
/// on-restore hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretsUpdateRequest {
    /// Names and new values.
    pub secrets: Secrets,
}

/// `POST /v1/sandboxes/{id}/start`: bring a stopped sandbox back. Secret values are never
/// saved, so they are given again here (the image's on-restore hook then runs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxStartRequest {
    /// Secrets delivered as `/run/secrets/<name>` after the restore.
    #[serde(default)]
    pub secrets: Secrets,
}

/// `POST /v1/sandboxes/{id}/ttl`: the sandbox's lifetime now ends this long from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TtlRequest {
    /// Seconds from now (1 s to 365 days).
    pub ttl_secs: u64,
}

/// Most secrets one sandbox may carry.
pub const MAX_SECRETS: usize = 64;
/// Largest secret value in bytes.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// Secret values by name. Its `Debug` shows names only, so a logged request leaks nothing.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct Secrets(pub BTreeMap<String, String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.0.keys().map(|k| format!("{k}=<redacted>")))
            .finish()
    }
}

impl Secrets {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The same names with empty values: what may be stored or shown.
    pub fn redacted(&self) -> Secrets {
        Secrets(self.0.keys().map(|k| (k.clone(), String::new())).collect())
    }

    /// Checks names (plain file names) and sizes; the error names the secret, never its value.
    pub fn validate(&self) -> Result<(), String> {
        if self.0.len() > MAX_SECRETS {
            return Err(format!(
                "too many secrets: {} (at most {MAX_SECRETS})",
                self.0.len()
            ));
        }
        for (name, value) in &self.0 {
            validate_secret_name(name)?;
            if value.len() > MAX_SECRET_BYTES {
                return Err(format!(
                    "secret {name} is larger than {MAX_SECRET_BYTES} bytes"
                ));
            }
        }
        Ok(())
    }
}

/// A secret name becomes a file name under `/run/secrets`: letters, digits, `_`, `-`, `.`,
/// not starting with `.` or `-`, at most 64 bytes.
pub fn validate_secret_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid secret name {name:?}: use letters, digits, '_', '-' and '.' (a plain file name, at most 64 bytes)"
        ))
    }
}

/// `GET /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    /// All sandboxes, oldest first.
    pub sandboxes: Vec<SandboxInfo>,
}

/// One command to run in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in the guest's `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/root`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whether the client will send stdin; if false the command reads `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the command after this many milliseconds (exit code 124 in the CLI).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Kill the command once it has written this many bytes to stdout and stderr together.
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
    /// Run the command on a terminal (a pseudo-terminal in the guest): its stdin, stdout
    /// and stderr are the terminal, all output arrives as stdout, Ctrl-C is the byte `0x03`
    /// sent as stdin, and `resize` messages change the size. Left out when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<ExecTty>,
    /// Run the command as this user instead of root, in Docker's and OCI's `User` forms:
    /// `name`, `uid`, `name:group`, `uid:gid`, `name:gid` or `uid:group` (at most
    /// 256 bytes, no control characters). Names are looked up in the guest's `/etc/passwd`
    /// and `/etc/group`; a numeric uid needs no entry (gid 0 then, unless given). A named
    /// user gets its supplementary groups, and `HOME`, `USER` and `LOGNAME` follow the user
    /// unless `env` sets them. An unknown name fails the request (`exec_rejected`). Left out
    /// when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Longest [`ExecRequest::user`], in bytes.
pub const MAX_USER_BYTES: usize = 256;

/// Checks the form of an exec's user (`name`, `uid`, `name:group`, `uid:gid`, ...); the
/// guest looks the names up.
pub fn validate_exec_user(user: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "invalid user {user:?}: {why} (use NAME, UID, NAME:GROUP or UID:GID)"
        ))
    };
    if user.is_empty() {
        return bad("it is empty");
    }
    if user.len() > MAX_USER_BYTES {
        return bad("it is longer than 256 bytes");
    }
    if user.chars().any(char::is_control) {
        return bad("it contains a control character");
    }
    let parts: Vec<&str> = user.split(':').collect();
    if parts.len() > 2 {
        return bad("it has more than one ':'");
    }
    for part in parts {
        if part.is_empty() {
            return bad("a part is empty");
        }
        if part.bytes().all(|b| b.is_ascii_digit())
            && !part.parse::<u32>().is_ok_and(|id| id != u32::MAX)
        {
            return bad("a numeric id must be in 0..=4294967294");
        }
    }
    Ok(())
}

impl ExecRequest {
    /// An exec of `argv` with defaults for everything else.
    pub fn new(argv: Vec<String>) -> Self {
        ExecRequest {
            argv,
            env: BTreeMap::new(),
            cwd: None,
            stdin: false,
            timeout_ms: None,
            max_output_bytes: None,
            tty: None,
            user: None,
        }
    }

    /// Checks the request; the error names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err("empty command: give a program to run".to_owned());
        }
        if self.argv.len() > MAX_ARGV {
            return Err(format!(
                "too many arguments: {} (at most {MAX_ARGV})",
                self.argv.len()
            ));
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err("an argument contains a NUL byte".to_owned());
        }
        if self.env.len() > MAX_ENV {
            return Err(format!(
                "too many environment variables: {} (at most {MAX_ENV})",
                self.env.len()
            ));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!("invalid environment variable name {k:?}"));
            }
            if v.contains('\0') {
                return Err(format!(
                    "the value of environment variable {k} contains a NUL byte"
                ));
            }
        }
        if let Some(cwd) = &self.cwd
            && (!cwd.starts_with('/') || cwd.contains('\0'))
        {
            return Err(format!(
                "working directory must be an absolute path, got {cwd:?}"
            ));
        }
        if let Some(user) = &self.user {
            validate_exec_user(user)?;
        }
        if self.timeout_ms == Some(0) {
            return Err("timeout must be greater than zero".to_owned());
        }
        if let Some(tty) = &self.tty {
            tty.validate()?;
        }
        Ok(())
    }
}

/// Largest number of rows or columns of an exec's terminal.
pub const MAX_TTY_DIM: u16 = 1000;

/// Longest `term` of an exec's terminal, in bytes.
pub const MAX_TERM_BYTES: usize = 64;

/// Checks a terminal size: rows and columns in `1..=MAX_TTY_DIM`.
pub fn validate_tty_size(rows: u16, cols: u16) -> Result<(), String> {
    if (1..=MAX_TTY_DIM).contains(&rows) && (1..=MAX_TTY_DIM).contains(&cols) {
        Ok(())
    } else {
        Err(format!(
            "terminal size {rows}x{cols} is out of range: rows and columns must be 1..={MAX_TTY_DIM}"
        ))
    }
}

/// The terminal of an exec ([`ExecRequest::tty`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecTty {
    /// Initial rows (1..=1000).
    #[schema(minimum = 1, maximum = 1000)]
    pub rows: u16,
    /// Initial columns (1..=1000).
    #[schema(minimum = 1, maximum = 1000)]
    pub cols: u16,
    /// `TERM` for the command (default `xterm-256color`): 1..=64 characters of
    /// `[A-Za-z0-9._+-]`.
    #[serde(default)]
    pub term: Option<String>,
}

impl ExecTty {
    /// Checks the size and the terminal type; the error names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        validate_tty_size(self.rows, self.cols)?;
        if let Some(term) = &self.term {
            let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-');
            if term.is_empty() || term.len() > MAX_TERM_BYTES || !term.bytes().all(plain) {
                return Err(format!(
                    "invalid terminal type {term:?}: use 1..={MAX_TERM_BYTES} characters of [A-Za-z0-9._+-]"
                ));
            }
        }
        Ok(())
    }
}

/// First message of the `/v1/run` WebSocket: a fresh sandbox, one command, then teardown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The sandbox to start.
    #[serde(default)]
    pub sandbox: SandboxSpec,
    /// The command to run in it.
    pub exec: ExecRequest,
}

/// Text messages a client sends on an exec WebSocket after the first one.
/// Binary messages from the client are stdin bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecClientMessage {
    /// No more stdin.
    StdinClose,
    /// Deliver a signal to the command's process group.
    Signal {
        /// Signal number (e.g. 15 for SIGTERM).
        signo: i32,
    },
    /// Change the size of the command's terminal (an exec with `tty`). A resize the
    /// command cannot take (no tty, out of range, it just ended) is ignored: the command
    /// runs on.
    Resize {
        /// Rows (1..=1000).
        rows: u16,
        /// Columns (1..=1000).
        cols: u16,
    },
}

/// Text messages the daemon sends on an exec WebSocket. Binary messages from the daemon are
/// output: first byte [`STREAM_STDOUT`] or [`STREAM_STDERR`], then the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecServerMessage {
    /// The sandbox is ready and the command was started.
    Started {
        /// Sandbox the command runs in.
        sandbox: SandboxId,
        /// QEMU start → agent ready, when this exec started a sandbox.
        boot_ms: Option<u64>,
        /// What the user should know about how the sandbox started (e.g. why it
        /// cold-booted); see `SandboxStatus::warnings`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        warnings: Vec<String>,
    },
    /// The command ended; no more output follows.
    Exit(ExitStatus),
    /// (Attach to a detached command.) This many output bytes were dropped from the
    /// command's buffer before this client could read them.
    Dropped {
        /// Bytes dropped.
        bytes: u64,
    },
    /// The exec could not start or broke off; no more messages follow.
    Error(ApiError),
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal ended it.
    pub signal: Option<i32>,
    /// The timeout killed it.
    pub timed_out: bool,
    /// Its output reached `max_output_bytes` and it was killed.
    pub output_truncated: bool,
}

impl ExitStatus {
    /// The exit code a shell would report: the code, 128+N for signal N, 124 for a timeout.
    pub fn shell_code(&self) -> i32 {
        if self.timed_out {
            124
        } else if let Some(code) = self.code {
            code
        } else if let Some(sig) = self.signal {
            128 + sig
        } else {
            1
        }
    }
}

/// Error body of every failed request: a stable machine-readable code and the message chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// Stable code, e.g. `not_found`, `bad_request`, `sandbox_failed`; one of [`ErrorCode`].
    #[schema(value_type = ErrorCode)]
    pub code: String,
    /// Human-readable message (the whole error chain).
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// [`API_VERSION`].
    pub api_version: u32,
    /// kiln version.
    pub version: String,
    /// Daemon process id.
    pub pid: u32,
    /// What the startup janitor reclaimed.
    pub janitor: JanitorReport,
}

/// What the startup janitor found and reclaimed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JanitorReport {
    /// Orphaned QEMU processes killed.
    pub processes_killed: u32,
    /// Runtime directories removed.
    pub dirs_removed: u32,
    /// Bytes freed by removing them.
    pub bytes_freed: u64,
    /// Sandboxes marked failed: their VM was gone, half-started, or could not be
    /// re-attached.
    pub sandboxes_failed: u32,
    /// Sandboxes a previous daemon left running, taken back by this one.
    #[serde(default)]
    pub sandboxes_reattached: u32,
    /// Wall time of re-attaching them all (concurrently), in milliseconds.
    #[serde(default)]
    pub reattach_ms: u64,
    /// Network address leases of gone sandboxes released.
    #[serde(default)]
    pub leases_released: u32,
    /// Taps of gone bridge sandboxes removed (with their rule elements).
    #[serde(default)]
    pub taps_removed: u32,
}

/// `POST /v1/sandboxes/{id}/ping`: one agent round trip, timed inside the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PingResponse {
    /// Round trip host → agent → host in microseconds.
    pub rtt_us: u64,
}

#[cfg(test)]
mod tests {
    #[test]
    fn exec_request_tty_is_validated_and_omitted_when_absent() {
        let mut req = ExecRequest::new(vec!["bash".into()]);
        assert!(!serde_json::to_string(&req).unwrap().contains("tty"));
        for (rows, cols, term, ok) in [
            (24, 80, None, true),
            (1000, 1, Some("xterm-256color"), true),
            (0, 80, None, false),
            (24, 1001, None, false),
            (24, 80, Some(""), false),
            (24, 80, Some("xterm\u{1b}"), false),
        ] {
            req.tty = Some(ExecTty {
                rows,
                cols,
                term: term.map(str::to_owned),
            });
            assert_eq!(req.validate().is_ok(), ok, "{rows}x{cols} {term:?}");
        }
        let parsed: ExecRequest =
            serde_json::from_str(r#"{"argv":["sh"],"tty":{"rows":24,"cols":80}}"#).unwrap();
        assert_eq!(parsed.tty.map(|t| (t.rows, t.cols)), Some((24, 80)));
        // Bigger than u16: refused when parsed.
        assert!(
            serde_json::from_str::<ExecRequest>(
                r#"{"argv":["sh"],"tty":{"rows":70000,"cols":80}}"#
            )
            .is_err()
        );
    }

    use super::*;

    #[test]
    fn sandbox_id_random_parses_back() {
        let id = SandboxId::random();
        assert_eq!(id.as_str().parse::<SandboxId>(), Ok(id.clone()));
    }

    #[test]
    fn sandbox_id_malformed_is_rejected() {
        for bad in [
            "",
            "sb-",
            "sb-12345678901",
            "sb-1234567890123",
            "sb-ABCDEF123456",
            "xx-123456789012",
            "sb-../../etc0",
        ] {
            assert!(bad.parse::<SandboxId>().is_err(), "{bad} accepted");
        }
        assert!(serde_json::from_str::<SandboxId>("\"sb-zzzzzzzzzzzz\"").is_err());
    }

    #[test]
    fn exec_request_validation_catches_bad_input() {
        assert!(
            ExecRequest::new(vec![])
                .validate()
                .unwrap_err()
                .contains("empty command")
        );
        assert!(ExecRequest::new(vec![String::new()]).validate().is_err());
        let mut r = ExecRequest::new(vec!["true".into()]);
        r.cwd = Some("relative".into());
        assert!(r.validate().unwrap_err().contains("absolute"));
        let mut r = ExecRequest::new(vec!["true".into()]);
        r.env.insert("A=B".into(), "x".into());
        assert!(r.validate().is_err());
        let mut r = ExecRequest::new(vec!["true".into()]);
        r.env.insert("A".into(), "x\0y".into());
        let e = r.validate().unwrap_err();
        assert!(e.contains("value of environment variable A"), "{e}");
        let mut r = ExecRequest::new(vec!["true".into()]);
        r.timeout_ms = Some(0);
        assert!(r.validate().is_err());
        assert!(ExecRequest::new(vec!["true".into()]).validate().is_ok());
    }

    #[test]
    fn exec_request_user_forms_are_checked() {
        for good in [
            "nobody",
            "65534",
            "nobody:nogroup",
            "1234:1234",
            "app:0",
            "0:wheel",
        ] {
            let mut r = ExecRequest::new(vec!["id".into()]);
            r.user = Some(good.into());
            assert!(r.validate().is_ok(), "{good:?} refused");
        }
        let long = "u".repeat(MAX_USER_BYTES + 1);
        for bad in [
            "",
            ":",
            "a:",
            ":0",
            "a:b:c",
            "a\0b",
            "a\nb",
            "4294967295",
            "1:99999999999",
            long.as_str(),
        ] {
            let mut r = ExecRequest::new(vec!["id".into()]);
            r.user = Some(bad.into());
            let e = r.validate().expect_err(bad);
            assert!(e.contains("invalid user"), "{e}");
        }
    }

    #[test]
    fn exec_request_without_user_leaves_it_out_of_the_json() {
        let json = serde_json::to_string(&ExecRequest::new(vec!["id".into()])).expect("json");
        assert!(!json.contains("user"), "{json}");
        let r: ExecRequest =
            serde_json::from_str(r#"{"argv":["id"],"user":"nobody"}"#).expect("parses");
        assert_eq!(r.user.as_deref(), Some("nobody"));
    }

    #[test]
    fn secrets_debug_hides_values_and_names_are_checked() {
        let mut s = Secrets::default();
        s.0.insert("PGPASSWORD".into(), "hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(s.validate().is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "-x", "sp ace"] {
            assert!(validate_secret_name(bad).is_err(), "{bad:?} accepted");
        }
        s.0.insert("x".into(), "v".repeat(MAX_SECRET_BYTES + 1));
        let err = s.validate().unwrap_err();
        assert!(err.contains("secret x") && !err.contains("vvvv"));
    }

    #[test]
    fn exit_status_shell_code_follows_shell_rules() {
        let s = |code, signal, timed_out| ExitStatus {
            code,
            signal,
            timed_out,
            output_truncated: false,
        };
        assert_eq!(s(Some(7), None, false).shell_code(), 7);
        assert_eq!(s(None, Some(9), false).shell_code(), 137);
        assert_eq!(s(None, Some(9), true).shell_code(), 124);
    }

    #[test]
    fn server_messages_have_stable_json() {
        let m = ExecServerMessage::Exit(ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false,
            output_truncated: false,
        });
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"exit","code":0,"signal":null,"timed_out":false,"output_truncated":false}"#
        );
        let m = ExecClientMessage::Resize {
            rows: 40,
            cols: 100,
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"resize","rows":40,"cols":100}"#
        );
        let m = ExecClientMessage::Signal { signo: 15 };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"signal","signo":15}"#
        );
    }
}
