//! Warm snapshots on disk: the directory layout, the manifest (magic, version, checksum,
//! compatibility fingerprint), verification and atomic publication.
//!
//! Owns the format only. Must not: start QEMU, know about sandboxes or the database. Capture
//! and restore themselves are `kiln_vmm::Vm::capture` / `kiln_vmm::Vm::restore`; the engine
//! writes their output into a [`SnapshotBuilder`] directory and publishes it.
//!
//! # Layout
//! ```text
//! <snapshots>/
//!   <name>/                   published, complete, sealed (read-only, immutable flag)
//!     manifest.json           SnapshotManifest (pretty JSON)
//!     manifest.sha256         "<hex sha256 of manifest.json>  manifest.json\n" (sha256sum -c)
//!     mem                     guest RAM (the template clones map copy-on-write)
//!     state                   QEMU device-state stream (migration format)
//!     disk.qcow2              disk layer (clones get a qcow2 overlay backed by it)
//!   .tmp-<name>-<pid>/        being built by process <pid>; never read by anyone else
//! ```
//!
//! # Invariants
//! - A directory named `<name>` is complete: it is built under `.tmp-<name>-<pid>/`, every file
//!   and the directory are fsynced, then it is renamed into place with `RENAME_NOREPLACE`
//!   (never over an existing snapshot).
//! - `manifest.sha256` covers the manifest's exact bytes; the manifest lists every data file
//!   with its size and sha256; [`verify`] checks them in that order, cheapest first, and
//!   names the first thing that is wrong.
//! - [`VerifyLevel::FullCached`] re-hashes a data file only if it changed since this process
//!   last hashed it (its device, inode, size, mtime or ctime differ); the manifest checksum,
//!   fingerprint and sizes are checked every time.
//! - Published files are never written again: read-only modes and, where the file system and
//!   the process allow it, the immutable inode flag, set before they are hashed
//!   (`immutable.rs`). Removals go through [`remove_tree`], which clears the flag first.
//! - The format is versioned ([`FORMAT_VERSION`]); readers refuse versions they do not know.

mod error;
mod immutable;
mod manifest;
mod publish;
mod seal;
mod verify;

pub use error::{FieldDiff, SnapshotError};
pub use immutable::{
    Protection, WritableWindow, is_immutable, remove_tree, reseal_dir, seal_dir_files, seal_file,
    unseal_file, unseal_tree,
};
pub use manifest::{
    CaptureInfo, CaptureKind, FileEntry, SnapshotFingerprint, SnapshotManifest, SnapshotName,
};
pub use publish::{ManifestInput, SnapshotBuilder, cleanup_stale_tmp, process_running};
pub use verify::{VerifyLevel, VerifyReport, sha256_file, verify, verify_with_report};

/// `magic` of every manifest.
pub const MAGIC: &str = "kiln-snapshot";

/// The manifest format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The manifest file.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The manifest checksum file (sha256sum format).
pub const MANIFEST_SHA256_FILE: &str = "manifest.sha256";

/// Guest RAM.
pub const MEM_FILE: &str = "mem";

/// Device state stream.
pub const STATE_FILE: &str = "state";

/// Disk layer.
pub const DISK_FILE: &str = "disk.qcow2";

/// The data files every snapshot has, in manifest order.
pub const DATA_FILES: [&str; 3] = [MEM_FILE, STATE_FILE, DISK_FILE];

/// Prefix of in-progress build directories.
pub const TMP_PREFIX: &str = ".tmp-";

#[cfg(test)]
mod tests;
