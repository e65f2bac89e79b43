//! The one error type of this crate.
//!
//! Every variant carries the context needed to act on it without a debugger: which command
//! failed (its exit status and the tail of its output), which path, which module. Messages are
//! lowercase, have no trailing period and never repeat their `#[source]`; callers print the
//! whole chain at the edge.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while building, listing or removing images.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The requested recipe is not one of the built-in ones.
    #[error("unknown recipe {name:?} (known recipes: {known})")]
    UnknownRecipe {
        /// What the caller asked for.
        name: String,
        /// Comma-separated list of the recipes that do exist.
        known: String,
    },

    /// A recipe file that cannot be used: where (file, line, column), which field, and what
    /// was expected.
    #[error("{file}:{line}:{column}: {field}: {message}")]
    BadRecipe {
        /// The recipe file (or `builtin:NAME`).
        file: String,
        /// 1-based line (0 when the problem is not tied to one place).
        line: usize,
        /// 1-based column.
        column: usize,
        /// The key at fault (e.g. `files[1].mode`), or `recipe` for the file as a whole.
        field: String,
        /// What is wrong and what was expected.
        message: String,
    },

    /// A step of the build that runs in a guest (a `run` command, a file copy, the self-test)
    /// failed.
    #[error("{step} failed: {detail}")]
    GuestStep {
        /// Which step, e.g. "run step 2/3 `make install`".
        step: String,
        /// Exit status and the tail of its output, or why it could not run.
        detail: String,
    },

    /// An import source that cannot be imported: an unknown scheme, a missing file, a disk
    /// image without an ext2/3/4 root file system, ...
    #[error("cannot import {input}: {reason}")]
    BadImport {
        /// The source as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },

    /// An image or recipe name that cannot be used as a directory name.
    #[error("invalid image name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A filesystem operation failed.
    #[error("failed to {action} {path}")]
    Io {
        /// What was being done, e.g. "create directory".
        action: &'static str,
        /// The path it was being done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A host tool could not be started at all.
    #[error("failed to start `{command}` (is it installed? scripts/setup-host installs it)")]
    Spawn {
        /// The command line.
        command: String,
        /// Why the spawn failed.
        #[source]
        source: io::Error,
    },

    /// A host tool ran and failed.
    #[error("`{command}` failed ({status}); last output:\n{output_tail}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status as printed by the OS, e.g. "exit status: 100".
        status: String,
        /// The last lines it printed on stdout and stderr.
        output_tail: String,
    },

    /// apt-cache could not resolve the kernel package on this host.
    #[error(
        "cannot resolve kernel package {package} with apt-cache: {detail} \
         (run `apt-get update` or scripts/setup-host first)"
    )]
    KernelUnresolvable {
        /// The package that was being resolved.
        package: String,
        /// What apt-cache said (or did not say).
        detail: String,
    },

    /// The extracted kernel package does not have the expected layout.
    #[error("kernel package {package} has an unexpected layout: {detail}")]
    KernelLayout {
        /// The package.
        package: String,
        /// What was missing.
        detail: String,
    },

    /// The file given as the agent is not an ELF executable the guest can run.
    #[error("agent binary {path} is not usable as /init: {reason}")]
    BadAgent {
        /// The agent binary.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },

    /// A module the initramfs needs is neither a loadable module nor built in.
    #[error(
        "kernel module {module} not found for kernel {release} (neither in modules.dep nor built in)"
    )]
    ModuleNotFound {
        /// Module name.
        module: String,
        /// Kernel release (`uname -r` form).
        release: String,
    },

    /// A kernel module file could not be parsed.
    #[error("cannot read kernel module {path}: {reason}")]
    BadModule {
        /// The module file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },

    /// Building a root filesystem needs root: ownership must be recorded as in the guest.
    #[error(
        "building an image needs root (mmdebstrap and mkfs.ext4 -d must record real file \
         ownership); run the build as root"
    )]
    NotRoot,

    /// The per-image build lock could not be taken.
    #[error("failed to lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why locking failed.
        #[source]
        source: io::Error,
    },

    /// A manifest could not be encoded or decoded.
    #[error("invalid image manifest {path}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },

    /// A manifest was written by an incompatible version of kiln.
    #[error("image manifest {path} has schema version {found}, this kiln reads version {expected}")]
    ManifestVersion {
        /// The manifest file.
        path: PathBuf,
        /// The version found in the file.
        found: u32,
        /// The version this build understands.
        expected: u32,
    },

    /// No image of that name exists.
    #[error("no image named {name:?}")]
    ImageNotFound {
        /// The name asked for.
        name: String,
    },

    /// A directory to be deleted still has filesystems mounted below it.
    #[error("refusing to remove {path}: {mount_point} is still mounted below it")]
    MountedBelow {
        /// The directory that was to be removed.
        path: PathBuf,
        /// The first mount point found below it.
        mount_point: PathBuf,
    },
    /// A finished image's files could not be made read-only / immutable.
    #[error("cannot seal image file {path}")]
    Seal {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: kiln_snapshot::SnapshotError,
    },
    /// An image directory could not be removed (its files could not be unsealed, or unlinked).
    #[error("cannot remove {path}")]
    Unseal {
        /// The directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: kiln_snapshot::SnapshotError,
    },
}

impl ImageError {
    /// Shorthand for [`ImageError::Io`].
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ImageError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Extension to attach path context to `io::Result`s.
pub(crate) trait IoContext<T> {
    /// Maps the error into [`ImageError::Io`] with `action` and `path`.
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(action, path, e))
    }
}
