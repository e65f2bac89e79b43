//! Errors of the QEMU driver.

use std::io;
use std::path::PathBuf;

use crate::process::VmExit;
use crate::qemu::QemuVersion;

/// Everything the QEMU driver can fail at. Messages carry the paths and QEMU's own words
/// (log tails) so that the edge can print the chain without more context.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// No QEMU binary in `PATH`.
    #[error("{binary} not found in PATH (install the qemu-system-x86 package or set KILN_QEMU)")]
    QemuNotFound {
        /// The binary name searched for.
        binary: &'static str,
    },
    /// `KILN_QEMU` names something that is not an executable file.
    #[error("KILN_QEMU={path} is not an executable file")]
    QemuOverrideInvalid {
        /// The value of `KILN_QEMU`.
        path: PathBuf,
    },
    /// Running `qemu -version` (or another helper command) failed.
    #[error("failed to run {program}")]
    Run {
        /// The program.
        program: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// `qemu -version` printed something unexpected.
    #[error("cannot parse the version of {path} from {output:?}")]
    QemuVersionUnparsable {
        /// The binary.
        path: PathBuf,
        /// What it printed (first line).
        output: String,
    },
    /// QEMU is older than kiln supports.
    #[error("QEMU {found} at {path} is too old: kiln needs {min} or newer")]
    QemuTooOld {
        /// The binary.
        path: PathBuf,
        /// Its version.
        found: QemuVersion,
        /// The minimum.
        min: QemuVersion,
    },
    /// Asking QEMU for its migration capabilities failed.
    #[error("failed to query the migration capabilities of {path}")]
    CapabilityProbe {
        /// The binary.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: kiln_qmp::QmpError,
    },
    /// A helper QEMU did not answer in time.
    #[error("{what} did not finish within {timeout_ms} ms")]
    Timeout {
        /// What timed out.
        what: &'static str,
        /// The deadline.
        timeout_ms: u64,
    },
    /// `qemu-img` is not installed.
    #[error("qemu-img not found in PATH (install the qemu-utils package)")]
    QemuImgNotFound,
    /// `qemu-img create` failed.
    #[error("qemu-img failed to create the overlay {overlay} ({status}): {stderr}")]
    OverlayCreate {
        /// The overlay path.
        overlay: PathBuf,
        /// Exit status.
        status: String,
        /// What qemu-img printed.
        stderr: String,
    },
    /// A file or directory operation failed.
    #[error("failed to {what} {path}")]
    Io {
        /// The operation, e.g. "create", "read".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// QEMU could not be started.
    #[error("failed to start {qemu}")]
    Spawn {
        /// The binary.
        qemu: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// QEMU exited before its QMP socket answered.
    #[error("QEMU exited during startup ({status}); qemu.log: {log_tail}")]
    EarlyExit {
        /// How it exited.
        status: VmExit,
        /// The end of `qemu.log` (QEMU's stderr).
        log_tail: String,
    },
    /// The QMP socket did not appear in time.
    #[error("QEMU's qmp socket {path} did not answer within {timeout_ms} ms; qemu.log: {log_tail}")]
    QmpTimeout {
        /// The socket path.
        path: PathBuf,
        /// The deadline.
        timeout_ms: u64,
        /// The end of `qemu.log`.
        log_tail: String,
    },
    /// A desktop VM's screendump or input injection failed.
    #[error("QMP {command} failed")]
    ScreenQmp {
        /// The command.
        command: &'static str,
        /// Underlying error.
        #[source]
        source: kiln_qmp::QmpError,
    },
    /// The QMP handshake failed.
    #[error("qmp handshake with QEMU failed")]
    Qmp(#[source] kiln_qmp::QmpError),
    /// The [`crate::VmConfig`] cannot work.
    #[error("invalid vm config: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// `KILN_ACCEL` has a value other than `kvm`, `tcg` or `auto`.
    #[error("KILN_ACCEL={value:?} is not one of kvm, tcg, auto")]
    AccelOverrideInvalid {
        /// The value.
        value: String,
    },
    /// `KILN_ACCEL=kvm` but `/dev/kvm` is unusable.
    #[error("KILN_ACCEL=kvm but {reason}")]
    KvmForcedUnavailable {
        /// Why KVM cannot be used.
        reason: String,
    },
    /// A snapshot state file path cannot be passed to QEMU's `exec:` migration safely.
    #[error("state file path {path} cannot be used: {reason}")]
    StatePath {
        /// The path.
        path: PathBuf,
        /// Why not.
        reason: &'static str,
    },
    /// A QMP command of a snapshot step failed.
    #[error("qmp {step} failed; qemu.log: {log_tail}")]
    SnapshotQmp {
        /// The step, e.g. `stop`, `migrate`.
        step: &'static str,
        /// The end of `qemu.log`.
        log_tail: String,
        /// Underlying error.
        #[source]
        source: kiln_qmp::QmpError,
    },
    /// QEMU reported a failed migration (capture or restore).
    #[error("{step} failed: {desc}; qemu.log: {log_tail}")]
    MigrationFailed {
        /// `capture` or `restore`.
        step: &'static str,
        /// QEMU's `error-desc`, or the run state it ended in.
        desc: String,
        /// The end of `qemu.log`.
        log_tail: String,
    },
    /// QEMU exited in the middle of a snapshot step.
    #[error("QEMU exited during {step} ({status}); qemu.log: {log_tail}")]
    ExitedDuring {
        /// The step.
        step: &'static str,
        /// How it exited.
        status: VmExit,
        /// The end of `qemu.log`.
        log_tail: String,
    },
    /// A snapshot step did not finish in time.
    #[error("{step} did not finish within {timeout_ms} ms; qemu.log: {log_tail}")]
    SnapshotTimeout {
        /// The step.
        step: &'static str,
        /// The deadline.
        timeout_ms: u64,
        /// The end of `qemu.log`.
        log_tail: String,
    },
}
