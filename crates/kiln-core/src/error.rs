//! The engine's error type and its stable machine-readable codes.
//!
//! Front ends map [`CoreError::code`] to their own vocabulary (HTTP status, CLI exit code) in
//! one place each; the message chain is printed whole at that edge.

use kiln_api_types::SandboxId;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The request was malformed or out of range.
    #[error("{0}")]
    BadRequest(String),
    /// No sandbox with that id, name or id prefix.
    #[error("no sandbox {0}")]
    SandboxNotFound(String),
    /// A prefix that several sandbox ids start with.
    #[error("{key:?} matches several sandboxes ({matches}); give more of the id")]
    AmbiguousSandbox {
        /// What was given.
        key: String,
        /// The ids it matches, comma separated.
        matches: String,
    },
    /// A file operation in a sandbox failed in the guest; `kind` says how.
    #[error("{path}: {message}")]
    File {
        /// The guest path.
        path: String,
        /// Its class (status and code).
        kind: crate::files::FileErrorKind,
        /// The guest's explanation.
        message: String,
    },
    /// No recipe of that name to build.
    #[error("unknown recipe {name:?}; known recipes: {known}")]
    RecipeNotFound {
        /// What was asked for.
        name: String,
        /// The recipes there are.
        known: String,
    },
    /// No detached command with that id.
    #[error("no detached command {0} (see `kiln exec ls SANDBOX`)")]
    ExecNotFound(String),
    /// No job with that id.
    #[error("no job {0} (see `kiln job ls`)")]
    JobNotFound(String),
    /// The job queue is full.
    #[error(
        "the job queue is full ({queued} jobs wait, at most {max}: KILN_JOB_QUEUE); retry in {retry_after_secs} s"
    )]
    QueueFull {
        /// Jobs waiting.
        queued: usize,
        /// The queue's bound.
        max: usize,
        /// When to try again (seconds), for `Retry-After`.
        retry_after_secs: u64,
    },
    /// Another sandbox has that name.
    #[error("a sandbox named {0:?} exists already")]
    NameTaken(String),
    /// Input that breaks one of the API's rules.
    #[error(transparent)]
    Invalid(#[from] kiln_api_types::InvalidInput),
    /// No image of that name.
    #[error("image {name:?} is not built (build it with `kiln image build {name}`)")]
    ImageNotFound {
        /// Image name.
        name: String,
    },
    /// The sandbox is not in a state that allows the operation.
    #[error("sandbox {id} is {state}, not {wanted}")]
    WrongState {
        /// Sandbox.
        id: SandboxId,
        /// Its state.
        state: kiln_api_types::SandboxState,
        /// The state the operation needs.
        wanted: kiln_api_types::SandboxState,
    },
    /// The sandbox's VM died or could not start.
    #[error("sandbox {id} failed: {reason}")]
    SandboxFailed {
        /// Sandbox.
        id: SandboxId,
        /// What happened, with the tail of the guest's serial console where useful.
        reason: String,
    },
    /// The guest agent refused the command (e.g. its working directory does not exist).
    #[error("{0}")]
    ExecRejected(String),
    /// The host lacks something kiln needs.
    #[error("{0}")]
    HostSetup(String),
    /// Building or reading an image failed.
    #[error("image operation failed")]
    Image(#[source] kiln_image::ImageError),
    /// Driving QEMU failed.
    #[error("virtual machine operation failed")]
    Vmm(#[source] kiln_vmm::VmmError),
    /// Talking to the guest agent failed.
    #[error("guest agent channel failed")]
    Agent(#[source] kiln_agent_host::AgentError),
    /// A snapshot could not be captured, verified or used.
    #[error("snapshot unusable")]
    Snapshot(#[source] kiln_snapshot::SnapshotError),
    /// The state database failed.
    #[error("state database failed")]
    Store(#[source] kiln_store::StoreError),
    /// A command the image declares (on-boot, readiness probe, on-restore hook) or kiln's own
    /// guest housekeeping failed; the message quotes its output.
    #[error("{0}")]
    GuestCommand(String),
    /// No snapshot of that name.
    #[error("no snapshot {0:?} (see `kiln snapshot ls`)")]
    SnapshotNotFound(String),
    /// A snapshot that exists but cannot be restored here.
    #[error("snapshot {name:?} cannot be used: {reason}")]
    SnapshotUnusable {
        /// Snapshot name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A snapshot of that name exists already.
    #[error("a snapshot named {0:?} exists already")]
    SnapshotExists(String),
    /// The snapshot is in use and cannot be removed.
    #[error("snapshot {name:?} is in use by running sandboxes {users}; remove them first")]
    SnapshotInUse {
        /// Snapshot name.
        name: String,
        /// Sandbox ids, comma separated.
        users: String,
    },
    /// The image is used by sandboxes or user snapshots and cannot be removed.
    #[error("image {name:?} is in use by {users}; remove them first")]
    ImageInUse {
        /// Image name.
        name: String,
        /// What uses it: sandbox ids and user snapshot names.
        users: String,
    },
    /// A host port to publish cannot be bound.
    #[error("cannot publish host port {port}: {reason}")]
    PortUnavailable {
        /// Host port.
        port: u16,
        /// Why (e.g. "address already in use").
        reason: String,
    },
    /// A desktop operation on a sandbox without a screen, or a screen asked of an image that
    /// is not a desktop.
    #[error("{0}")]
    NotADesktop(String),
    /// The guest agent stopped answering; the sandbox is `unresponsive` (it may recover).
    #[error("sandbox {id} is unresponsive: {reason}")]
    Unresponsive {
        /// Sandbox.
        id: SandboxId,
        /// What did not answer, and for how long.
        reason: String,
    },
    /// The host file system holding kiln's state has too little free space.
    #[error("no space {what}: {}", crate::space::describe(path, *available, *needed))]
    NoSpace {
        /// What could not be done, e.g. "to capture a warm snapshot".
        what: String,
        /// The directory on the full file system.
        path: std::path::PathBuf,
        /// Bytes free there (for an unprivileged writer).
        available: u64,
        /// Bytes the operation needs, when known.
        needed: Option<u64>,
    },
    /// This host cannot give a sandbox the network mode asked for (no passt, not root, ...).
    #[error("network {mode} is not available on this host: {reason}")]
    NetworkUnavailable {
        /// The mode asked for.
        mode: &'static str,
        /// What is missing, and how to get it.
        reason: String,
    },
    /// The host's budget for sandboxes has no room for this one.
    #[error("no room {what}: {why}; retry in {retry_after_secs} s or when a sandbox ends")]
    OverCapacity {
        /// What could not be done, e.g. "to start a sandbox of 256 MiB and 1 vCPU".
        what: String,
        /// Which budget is used up, with the numbers.
        why: String,
        /// When to try again (seconds), for `Retry-After`.
        retry_after_secs: u64,
    },
    /// A file system operation on kiln's state failed.
    #[error("failed to {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Path involved.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl CoreError {
    /// Stable code for API error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            CoreError::BadRequest(_) => "bad_request",
            CoreError::SandboxNotFound(_) => "sandbox_not_found",
            CoreError::ImageNotFound { .. } => "image_not_found",
            CoreError::WrongState { wanted, .. } => match wanted {
                kiln_api_types::SandboxState::Paused => "sandbox_not_paused",
                kiln_api_types::SandboxState::Stopped => "sandbox_not_stopped",
                _ => "sandbox_not_running",
            },
            CoreError::AmbiguousSandbox { .. } => "ambiguous_sandbox",
            CoreError::ExecNotFound(_) => "exec_not_found",
            CoreError::JobNotFound(_) => "job_not_found",
            CoreError::QueueFull { .. } => "queue_full",
            CoreError::RecipeNotFound { .. } => "recipe_not_found",
            CoreError::File { kind, .. } => kind.code(),
            CoreError::NameTaken(_) => "name_taken",
            CoreError::Invalid(_) => "bad_request",
            CoreError::SandboxFailed { .. } => "sandbox_failed",
            CoreError::ExecRejected(_) => "exec_rejected",
            CoreError::HostSetup(_) => "host_setup",
            CoreError::NetworkUnavailable { .. } => "network_unavailable",
            CoreError::OverCapacity { .. } => "over_capacity",
            CoreError::Image(kiln_image::ImageError::BadRecipe { .. }) => "bad_recipe",
            CoreError::Image(kiln_image::ImageError::GuestStep { .. }) => "build_failed",
            CoreError::Image(kiln_image::ImageError::ImageNotFound { .. }) => "image_not_found",
            CoreError::Image(_) => "image_error",
            CoreError::Vmm(_) => "vmm_error",
            CoreError::Agent(_) => "agent_error",
            CoreError::Snapshot(_) => "snapshot_error",
            CoreError::Store(_) => "store_error",
            CoreError::Io { .. } => "io_error",
            CoreError::GuestCommand(_) => "guest_command_failed",
            CoreError::SnapshotNotFound(_) => "snapshot_not_found",
            CoreError::SnapshotExists(_) => "snapshot_exists",
            CoreError::SnapshotUnusable { .. } => "snapshot_unusable",
            CoreError::SnapshotInUse { .. } => "snapshot_in_use",
            CoreError::ImageInUse { .. } => "image_in_use",
            CoreError::PortUnavailable { .. } => "port_unavailable",
            CoreError::NotADesktop(_) => "not_a_desktop",
            CoreError::Unresponsive { .. } => "sandbox_unresponsive",
            CoreError::NoSpace { .. } => "no_space",
        }
    }

    /// The whole chain, `outer: inner: innermost`.
    pub fn chain(&self) -> String {
        error_chain(self)
    }
}

/// Formats an error and all its sources as one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

impl From<kiln_store::StoreError> for CoreError {
    fn from(e: kiln_store::StoreError) -> Self {
        match e {
            kiln_store::StoreError::NameTaken(name) => CoreError::NameTaken(name),
            e => CoreError::Store(e),
        }
    }
}

impl From<kiln_image::ImageError> for CoreError {
    fn from(e: kiln_image::ImageError) -> Self {
        CoreError::Image(e)
    }
}

impl From<kiln_vmm::VmmError> for CoreError {
    fn from(e: kiln_vmm::VmmError) -> Self {
        CoreError::Vmm(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_joins_sources() {
        let e = CoreError::Io {
            what: "create",
            path: "/x".into(),
            source: std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"),
        };
        assert_eq!(e.chain(), "failed to create /x: no space left on device");
        assert_eq!(e.code(), "io_error");
    }
}
