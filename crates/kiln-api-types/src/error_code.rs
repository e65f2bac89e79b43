//! The closed set of error codes an [`ApiError`](crate::ApiError) may carry.
//!
//! Owns the vocabulary only: which HTTP status goes with which code is the daemon's business
//! (`bins/kilnd/src/api.rs`, one function). Invariants: a code, once published, keeps its
//! spelling; every code the engine's `CoreError::code()` returns is listed here (a test in
//! `kilnd` reads the engine's source and fails otherwise), so SDKs generated from the OpenAPI
//! document know every code they can see.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Stable machine-readable error code of an [`ApiError`](crate::ApiError).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: malformed JSON, unknown field, value out of range, bad id or name.
    BadRequest,
    /// 401: a TCP request without the right bearer token.
    Unauthorized,
    /// 404: no such API route.
    NotFound,
    /// 404: no such sandbox.
    SandboxNotFound,
    /// 404: no such image.
    ImageNotFound,
    /// 404: no such snapshot.
    SnapshotNotFound,
    /// 404: no such detached command.
    ExecNotFound,
    /// 404: no such job.
    JobNotFound,
    /// 404: no recipe of that name to build an image from.
    RecipeNotFound,
    /// 404: a file operation's path (or a parent) does not exist in the guest.
    FileNotFound,
    /// 409: the path exists, is (not) a directory, or is not empty.
    FileConflict,
    /// 400: a guest path or archive entry is not acceptable.
    InvalidPath,
    /// 403: the guest's permissions or a read-only file system refused it.
    PermissionDenied,
    /// 507: the guest's disk is full.
    GuestDiskFull,
    /// 429: too many file transfers at once in this sandbox.
    TooManyTransfers,
    /// 501: the sandbox's guest agent has no file operations (rebuild the image).
    FilesUnsupported,
    /// 500: another failure of a file operation in the guest.
    FileIoError,
    /// 400: an id prefix that several sandboxes share.
    AmbiguousSandbox,
    /// 409: the sandbox is not running (paused, stopped, failed, ...; the message says).
    SandboxNotRunning,
    /// 409: the sandbox is not paused (`resume`).
    SandboxNotPaused,
    /// 409: the sandbox is not stopped (`start`).
    SandboxNotStopped,
    /// 409: another sandbox has that name.
    NameTaken,
    /// 409: a snapshot of that name exists already.
    SnapshotExists,
    /// 409: the snapshot is in use by running sandboxes.
    SnapshotInUse,
    /// 409: the image is in use by sandboxes or user snapshots (`kiln image rm`).
    ImageInUse,
    /// 400: a recipe file that cannot be used (file, line, column, key and what was expected
    /// are in the message).
    BadRecipe,
    /// 422: a build step, a file copy or the self-test of an image build failed (the step,
    /// its exit code and its output's end are in the message); nothing was published.
    BuildFailed,
    /// 409: the snapshot is corrupt, incompatible or its image is gone.
    SnapshotUnusable,
    /// 409: a host port to publish cannot be bound; nothing was started.
    PortUnavailable,
    /// 409: the sandbox has no screen (its image is not a desktop), or a screen was asked of
    /// an image that is not one.
    NotADesktop,
    /// 422: the guest refused the command (e.g. its working directory is missing).
    ExecRejected,
    /// 422: the image's on-boot command, readiness probe or on-restore hook failed.
    GuestCommandFailed,
    /// 502: the VM died or could not start.
    SandboxFailed,
    /// 502: the guest agent channel failed.
    AgentError,
    /// 502: driving QEMU failed.
    VmmError,
    /// 503: the host lacks something kiln needs (e.g. the agent binary).
    HostSetup,
    /// 503: this host cannot give a sandbox the network mode asked for (no passt, not root).
    NetworkUnavailable,
    /// 429: the host's memory or vCPU budget for sandboxes is used up; retry after the
    /// `Retry-After` seconds (or when a sandbox ends).
    OverCapacity,
    /// 429: the job queue is full; retry after the `Retry-After` seconds.
    QueueFull,
    /// 500: building or reading an image failed.
    ImageError,
    /// 500: capturing, verifying or using a snapshot failed.
    SnapshotError,
    /// 500: the state database failed.
    StoreError,
    /// 500: a file system operation on kiln's state failed.
    IoError,
    /// 405: the route exists, but not with this method.
    MethodNotAllowed,
    /// 408: the request's headers or body did not arrive in time.
    RequestTimeout,
    /// 413: the request body is larger than the route accepts.
    PayloadTooLarge,
    /// 414: the request's path and query are longer than the daemon accepts.
    UriTooLong,
    /// 503: the sandbox's guest agent stopped answering (it may recover, or fail after a grace period).
    SandboxUnresponsive,
    /// 507: the host file system holding kiln's state has too little free space; the message names the path and the bytes needed.
    NoSpace,
    /// 500: the daemon failed in a way no other code describes.
    Internal,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
        ErrorCode::SandboxNotFound,
        ErrorCode::ImageNotFound,
        ErrorCode::SnapshotNotFound,
        ErrorCode::ExecNotFound,
        ErrorCode::JobNotFound,
        ErrorCode::RecipeNotFound,
        ErrorCode::FileNotFound,
        ErrorCode::FileConflict,
        ErrorCode::InvalidPath,
        ErrorCode::PermissionDenied,
        ErrorCode::GuestDiskFull,
        ErrorCode::TooManyTransfers,
        ErrorCode::FilesUnsupported,
        ErrorCode::FileIoError,
        ErrorCode::AmbiguousSandbox,
        ErrorCode::SandboxNotRunning,
        ErrorCode::SandboxNotPaused,
        ErrorCode::SandboxNotStopped,
        ErrorCode::NameTaken,
        ErrorCode::SnapshotExists,
        ErrorCode::SnapshotInUse,
        ErrorCode::ImageInUse,
        ErrorCode::BadRecipe,
        ErrorCode::BuildFailed,
        ErrorCode::SnapshotUnusable,
        ErrorCode::PortUnavailable,
        ErrorCode::NotADesktop,
        ErrorCode::ExecRejected,
        ErrorCode::GuestCommandFailed,
        ErrorCode::SandboxFailed,
        ErrorCode::AgentError,
        ErrorCode::VmmError,
        ErrorCode::HostSetup,
        ErrorCode::NetworkUnavailable,
        ErrorCode::OverCapacity,
        ErrorCode::QueueFull,
        ErrorCode::ImageError,
        ErrorCode::SnapshotError,
        ErrorCode::StoreError,
        ErrorCode::IoError,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RequestTimeout,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UriTooLong,
        ErrorCode::SandboxUnresponsive,
        ErrorCode::NoSpace,
        ErrorCode::Internal,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::SandboxNotFound => "sandbox_not_found",
            ErrorCode::ImageNotFound => "image_not_found",
            ErrorCode::SnapshotNotFound => "snapshot_not_found",
            ErrorCode::AmbiguousSandbox => "ambiguous_sandbox",
            ErrorCode::ExecNotFound => "exec_not_found",
            ErrorCode::RecipeNotFound => "recipe_not_found",
            ErrorCode::FileNotFound => "file_not_found",
            ErrorCode::FileConflict => "file_conflict",
            ErrorCode::InvalidPath => "invalid_path",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::GuestDiskFull => "guest_disk_full",
            ErrorCode::TooManyTransfers => "too_many_transfers",
            ErrorCode::FilesUnsupported => "files_unsupported",
            ErrorCode::FileIoError => "file_io_error",
            ErrorCode::SandboxNotRunning => "sandbox_not_running",
            ErrorCode::SandboxNotPaused => "sandbox_not_paused",
            ErrorCode::SandboxNotStopped => "sandbox_not_stopped",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::SnapshotExists => "snapshot_exists",
            ErrorCode::SnapshotInUse => "snapshot_in_use",
            ErrorCode::ImageInUse => "image_in_use",
            ErrorCode::BadRecipe => "bad_recipe",
            ErrorCode::BuildFailed => "build_failed",
            ErrorCode::SnapshotUnusable => "snapshot_unusable",
            ErrorCode::PortUnavailable => "port_unavailable",
            ErrorCode::NotADesktop => "not_a_desktop",
            ErrorCode::ExecRejected => "exec_rejected",
            ErrorCode::GuestCommandFailed => "guest_command_failed",
            ErrorCode::SandboxFailed => "sandbox_failed",
            ErrorCode::AgentError => "agent_error",
            ErrorCode::VmmError => "vmm_error",
            ErrorCode::HostSetup => "host_setup",
            ErrorCode::NetworkUnavailable => "network_unavailable",
            ErrorCode::OverCapacity => "over_capacity",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::JobNotFound => "job_not_found",
            ErrorCode::ImageError => "image_error",
            ErrorCode::SnapshotError => "snapshot_error",
            ErrorCode::StoreError => "store_error",
            ErrorCode::IoError => "io_error",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UriTooLong => "uri_too_long",
            ErrorCode::SandboxUnresponsive => "sandbox_unresponsive",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A string that is not one of the [`ErrorCode`]s.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown error code {0:?}")]
pub struct UnknownErrorCode(pub String);

impl FromStr for ErrorCode {
    type Err = UnknownErrorCode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownErrorCode(s.to_owned()))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_as_str_matches_serde_and_parses_back() {
        for &code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
        }
        assert!("no_such_code".parse::<ErrorCode>().is_err());
    }

    #[test]
    fn error_code_all_lists_each_code_once() {
        let mut seen = std::collections::HashSet::new();
        for &code in ErrorCode::ALL {
            assert!(seen.insert(code), "{code} listed twice");
        }
        // A new variant must be added to ALL too: the exhaustive match below stops compiling
        // first, and this count catches the rest.
        let count = |c: ErrorCode| match c {
            ErrorCode::BadRequest
            | ErrorCode::Unauthorized
            | ErrorCode::NotFound
            | ErrorCode::SandboxNotFound
            | ErrorCode::ImageNotFound
            | ErrorCode::SnapshotNotFound
            | ErrorCode::AmbiguousSandbox
            | ErrorCode::ExecNotFound
            | ErrorCode::RecipeNotFound
            | ErrorCode::FileNotFound
            | ErrorCode::FileConflict
            | ErrorCode::InvalidPath
            | ErrorCode::PermissionDenied
            | ErrorCode::GuestDiskFull
            | ErrorCode::TooManyTransfers
            | ErrorCode::FilesUnsupported
            | ErrorCode::FileIoError
            | ErrorCode::SandboxNotRunning
            | ErrorCode::SandboxNotPaused
            | ErrorCode::SandboxNotStopped
            | ErrorCode::NameTaken
            | ErrorCode::SnapshotExists
            | ErrorCode::SnapshotInUse
            | ErrorCode::ImageInUse
            | ErrorCode::BadRecipe
            | ErrorCode::BuildFailed
            | ErrorCode::SnapshotUnusable
            | ErrorCode::PortUnavailable
            | ErrorCode::NotADesktop
            | ErrorCode::ExecRejected
            | ErrorCode::GuestCommandFailed
            | ErrorCode::SandboxFailed
            | ErrorCode::AgentError
            | ErrorCode::VmmError
            | ErrorCode::HostSetup
            | ErrorCode::NetworkUnavailable
            | ErrorCode::OverCapacity
            | ErrorCode::QueueFull
            | ErrorCode::JobNotFound
            | ErrorCode::ImageError
            | ErrorCode::SnapshotError
            | ErrorCode::StoreError
            | ErrorCode::IoError
            | ErrorCode::MethodNotAllowed
            | ErrorCode::RequestTimeout
            | ErrorCode::PayloadTooLarge
            | ErrorCode::UriTooLong
            | ErrorCode::SandboxUnresponsive
            | ErrorCode::NoSpace
            | ErrorCode::Internal => 1,
        };
        assert_eq!(ErrorCode::ALL.iter().map(|&c| count(c)).sum::<usize>(), 50);
    }
}
