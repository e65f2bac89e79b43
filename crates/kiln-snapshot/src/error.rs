//! Errors of the snapshot format.

use std::io;
use std::path::PathBuf;

/// One fingerprint field that differs between a snapshot and the host that wants to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDiff {
    /// Field name, as in the manifest (`accel`, `memory_mib`, ...).
    pub field: &'static str,
    /// The snapshot's value.
    pub snapshot: String,
    /// The host's (expected) value.
    pub host: String,
}

impl FieldDiff {
    /// What the field means, for people reading a log: `accel` → `accelerator`.
    pub fn label(&self) -> &'static str {
        match self.field {
            "qemu_version" => "QEMU version",
            "machine" => "machine type",
            "device_fingerprint" => "device configuration",
            "cpu_model" => "CPU model",
            "accel" => "accelerator",
            "cpus" => "vCPU count",
            "memory_mib" => "guest memory (MiB)",
            "kernel_digest" => "kernel",
            "initramfs_digest" => "initramfs",
            "image_digest" => "image",
            "disk_digest" => "root disk",
            "format_version" => "snapshot format version",
            other => other,
        }
    }
}

/// `accelerator (accel): snapshot kvm, host tcg`: the meaning, then the manifest's name.
impl std::fmt::Display for FieldDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): snapshot {}, host {}",
            self.label(),
            self.field,
            self.snapshot,
            self.host
        )
    }
}

fn join(diffs: &[FieldDiff]) -> String {
    diffs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Everything reading, verifying or publishing a snapshot can fail at. Each corruption case
/// has its own variant so that callers (and tests) can tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot directory does not exist.
    #[error("snapshot directory {path} does not exist")]
    MissingDir {
        /// The directory.
        path: PathBuf,
    },
    /// A file of the snapshot is missing.
    #[error("snapshot file {path} is missing")]
    MissingFile {
        /// The file.
        path: PathBuf,
    },
    /// `manifest.sha256` is not `<64 hex digits>  manifest.json`.
    #[error("manifest checksum file {path} is malformed")]
    ChecksumFileMalformed {
        /// The file.
        path: PathBuf,
    },
    /// The manifest's bytes do not hash to the recorded checksum.
    #[error("manifest checksum mismatch in {dir}: recorded {recorded}, computed {computed}")]
    ManifestChecksum {
        /// The snapshot directory.
        dir: PathBuf,
        /// From `manifest.sha256`.
        recorded: String,
        /// Of `manifest.json`.
        computed: String,
    },
    /// `manifest.json` is not valid JSON or lacks fields.
    #[error("malformed manifest {path}")]
    ManifestParse {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The manifest's `magic` is not [`crate::MAGIC`].
    #[error("{path} is not a kiln snapshot manifest (magic {found:?})")]
    WrongMagic {
        /// The file.
        path: PathBuf,
        /// What it says.
        found: String,
    },
    /// The manifest's `format_version` is one this build does not read.
    #[error("snapshot format version {found} is not supported (this build reads {supported})")]
    UnsupportedFormat {
        /// The manifest's version.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The manifest is well-formed JSON but inconsistent (unknown or missing file entries).
    #[error("invalid manifest {path}: {reason}")]
    ManifestInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The snapshot was captured on an incompatible host/VM configuration.
    #[error("snapshot is incompatible: {}", join(diffs))]
    FingerprintMismatch {
        /// Every field that differs.
        diffs: Vec<FieldDiff>,
    },
    /// A data file has the wrong size (truncated or grown).
    #[error(
        "snapshot file {path}: size mismatch (manifest says {expected} bytes, file has {actual})"
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// From the manifest.
        expected: u64,
        /// On disk.
        actual: u64,
    },
    /// A data file's content does not match its recorded sha256.
    #[error("snapshot file {path}: sha256 mismatch (manifest says {expected}, file has {actual})")]
    DigestMismatch {
        /// The file.
        path: PathBuf,
        /// From the manifest.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// The name is not usable as a directory name.
    #[error("invalid snapshot name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A snapshot with this name is already published.
    #[error("snapshot {path} already exists")]
    AlreadyExists {
        /// The published directory.
        path: PathBuf,
    },
    /// A file system operation failed.
    #[error("failed to {what} {path}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

impl SnapshotError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        SnapshotError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
