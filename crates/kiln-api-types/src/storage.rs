//! `GET /v1/system/df` and `POST /v1/system/prune`: what kiln's state takes on disk and what
//! can be reclaimed.
//!
//! Only the shapes live here; the engine (`kiln_core::storage`) measures and removes. Sizes
//! are those `du` reports: `apparent_bytes` is the sum of `st_size` (`du --apparent-size`),
//! `disk_bytes` the sum of `st_blocks * 512` (`du`), every inode counted once per report, in
//! the first category (in the order of [`UsageKind`]) and item that reaches it. Paths are
//! relative to the state directory (`$KILN_HOME`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A category of kiln's state, in the order the report lists (and counts) them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum UsageKind {
    /// Built images (`images/<name>/`). Counted first: an image's `vmlinuz` is a hard link
    /// of the kernel cache's file, and its bytes are attributed here.
    Images,
    /// Warm snapshots (`snapshots/warm-<image id>-<c>c<m>m/`).
    WarmSnapshots,
    /// User snapshots (`snapshots/<name>/`).
    UserSnapshots,
    /// Runtime directories of sandboxes (`run/<id>/`: disk layer, RAM file, live console),
    /// and of warm captures and snapshot conversions in progress.
    Sandboxes,
    /// Saves of stopped sandboxes (`saved/<id>/`).
    StoppedSandboxes,
    /// Build caches and build directories: `cache/kernel/<version>/`, `cache/debs/`, and the
    /// `.tmp-*` directories of image, kernel and snapshot builds.
    BuildCaches,
    /// Console archives (`logs/`) and the daemon's log (`kilnd.log`).
    Logs,
    /// Review recordings of desktop sandboxes (`recordings/<id>/`): kept while the sandbox
    /// exists and, after its removal, while a failed action pins it; reclaimable after that.
    Recordings,
    /// Exported review bundles (`exports/<name>/`): the user's, never reclaimed.
    Exports,
    /// Everything else: the database, settings, sockets, locks and the directories' own
    /// entries.
    Other,
}

impl UsageKind {
    /// Every kind, in report order.
    pub const ALL: [UsageKind; 10] = [
        UsageKind::Images,
        UsageKind::WarmSnapshots,
        UsageKind::UserSnapshots,
        UsageKind::Sandboxes,
        UsageKind::StoppedSandboxes,
        UsageKind::BuildCaches,
        UsageKind::Logs,
        UsageKind::Recordings,
        UsageKind::Exports,
        UsageKind::Other,
    ];

    /// The name on the wire (`warm_snapshots`).
    pub fn as_str(self) -> &'static str {
        match self {
            UsageKind::Images => "images",
            UsageKind::WarmSnapshots => "warm_snapshots",
            UsageKind::UserSnapshots => "user_snapshots",
            UsageKind::Sandboxes => "sandboxes",
            UsageKind::StoppedSandboxes => "stopped_sandboxes",
            UsageKind::BuildCaches => "build_caches",
            UsageKind::Logs => "logs",
            UsageKind::Recordings => "recordings",
            UsageKind::Exports => "exports",
            UsageKind::Other => "other",
        }
    }
}

/// `GET /v1/system/df`: the state directory, category by category.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskUsage {
    /// The state directory measured (absolute path on the daemon's host).
    pub home: String,
    /// One entry per [`UsageKind`], in that order (also when empty).
    pub categories: Vec<UsageCategory>,
    /// Sum of `st_size` of everything below the state directory.
    pub apparent_bytes: u64,
    /// Bytes allocated on disk (`st_blocks * 512`) by everything below the state directory.
    pub disk_bytes: u64,
    /// Apparent bytes `POST /v1/system/prune` would remove now.
    pub reclaimable_apparent_bytes: u64,
    /// Bytes on disk `POST /v1/system/prune` would free now.
    pub reclaimable_disk_bytes: u64,
}

/// One category of [`DiskUsage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageCategory {
    /// Which category.
    pub kind: UsageKind,
    /// Sum of the items' apparent bytes.
    pub apparent_bytes: u64,
    /// Sum of the items' bytes on disk.
    pub disk_bytes: u64,
    /// Apparent bytes of the reclaimable items.
    pub reclaimable_apparent_bytes: u64,
    /// Bytes on disk of the reclaimable items.
    pub reclaimable_disk_bytes: u64,
    /// What it holds, by path.
    pub items: Vec<UsageItem>,
}

/// One thing kiln keeps on disk: a directory tree or a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageItem {
    /// What it is (an image or snapshot name, a sandbox id, a kernel version, a file name).
    pub name: String,
    /// Where, relative to the state directory (`.` for the directories' own entries).
    pub path: String,
    /// Sum of `st_size` of the inodes first reached here.
    pub apparent_bytes: u64,
    /// `st_blocks * 512` of the inodes first reached here.
    pub disk_bytes: u64,
    /// Whether `POST /v1/system/prune` would remove it now.
    pub reclaimable: bool,
    /// Why it can go, or why it is kept (in use by sandbox X, a build in progress, ...).
    pub why: String,
    /// Set when part of it could not be read (the sizes then count what could).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<String>,
}

/// `POST /v1/system/prune` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// List what would be removed and remove nothing.
    pub dry_run: bool,
}

/// What `POST /v1/system/prune` removed, kept and failed to remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PruneReport {
    /// Nothing was removed: `reclaimed` is what would have been.
    pub dry_run: bool,
    /// What was removed (with `dry_run`: would be), sizes measured before the removal.
    pub reclaimed: Vec<PruneItem>,
    /// Of a kind prune removes, but kept: in use by a sandbox, a build or a start in
    /// progress; `why` says which.
    pub kept: Vec<PruneItem>,
    /// Removal attempted and failed (permission, I/O error); `why` is the error. Nothing
    /// here counts as reclaimed.
    pub failed: Vec<PruneItem>,
    /// Sum of `reclaimed`'s apparent bytes.
    pub reclaimed_apparent_bytes: u64,
    /// Sum of `reclaimed`'s bytes on disk.
    pub reclaimed_disk_bytes: u64,
}

/// One entry of a [`PruneReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PruneItem {
    /// Its category.
    pub kind: UsageKind,
    /// What it is.
    pub name: String,
    /// Where, relative to the state directory.
    pub path: String,
    /// Apparent bytes, measured before any removal.
    pub apparent_bytes: u64,
    /// Bytes on disk, measured before any removal.
    pub disk_bytes: u64,
    /// Why it was removed, kept, or why its removal failed.
    pub why: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_kind_wire_names_match_as_str() {
        for k in UsageKind::ALL {
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::Value::String(k.as_str().to_owned())
            );
        }
    }

    #[test]
    fn prune_request_needs_dry_run_and_nothing_else() {
        assert!(serde_json::from_str::<PruneRequest>("{}").is_err());
        assert!(serde_json::from_str::<PruneRequest>(r#"{"dry_run":true,"x":1}"#).is_err());
        assert_eq!(
            serde_json::from_str::<PruneRequest>(r#"{"dry_run":false}"#).unwrap(),
            PruneRequest { dry_run: false }
        );
    }
}
