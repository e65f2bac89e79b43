//! The manifest: what a snapshot holds, what it was captured with, and its checksum.
//!
//! `manifest.json` is pretty-printed JSON of [`SnapshotManifest`]; `manifest.sha256` holds the
//! sha256 of those exact bytes in `sha256sum` format, so `sha256sum -c manifest.sha256` works
//! by hand. Unknown JSON fields are ignored (a newer writer may add some) but the checksum
//! still covers them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{FieldDiff, SnapshotError};
use crate::{FORMAT_VERSION, MAGIC, MANIFEST_FILE};

/// A snapshot's name: its directory under the snapshots root. 1–64 characters of
/// `[A-Za-z0-9._-]`, not starting with `.` (reserved for build directories).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SnapshotName(String);

impl SnapshotName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<SnapshotName, SnapshotError> {
        let name = name.into();
        let bad = |reason| {
            Err(SnapshotError::InvalidName {
                name: name.clone(),
                reason,
            })
        };
        if name.is_empty() || name.len() > 64 {
            return bad("it must have 1 to 64 characters");
        }
        if name.starts_with('.') {
            return bad("it must not start with '.'");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return bad("only letters, digits, '.', '_' and '-' are allowed");
        }
        Ok(SnapshotName(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How guest RAM was captured (mirrors `kiln_vmm::CaptureMode`; restore must use the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaptureKind {
    /// RAM is the `mem` file; `state` holds device state only.
    IgnoreShared,
    /// RAM is inside `state`.
    FullRam,
}

impl CaptureKind {
    /// The manifest spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            CaptureKind::IgnoreShared => "ignore-shared",
            CaptureKind::FullRam => "full-ram",
        }
    }
}

/// One data file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the snapshot directory (one of [`crate::DATA_FILES`]).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Hex sha256 of the content.
    pub sha256: String,
}

/// Everything a restoring host must match for the snapshot to be usable. Compared field by
/// field by [`crate::verify`]; a mismatch names each differing field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFingerprint {
    /// QEMU version (`major.minor.micro`): migration streams are only guaranteed to load on
    /// the same version.
    pub qemu_version: String,
    /// Machine type string (`kiln_vmm::cmdline::MACHINE`).
    pub machine: String,
    /// `kiln_vmm::device_fingerprint` of the captured VM's config.
    pub device_fingerprint: String,
    /// CPU model (`max`, `host`).
    pub cpu_model: String,
    /// Accelerator (`tcg`, `kvm`).
    pub accel: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// sha256 of the kernel.
    pub kernel_digest: String,
    /// sha256 of the initramfs.
    pub initramfs_digest: String,
    /// Digest identifying the rootfs/image the disk layer is backed by.
    pub image_digest: String,
    /// sha256 of the exact root file system the disk layer was captured over (the image
    /// manifest's `rootfs_sha256`): a rebuild under the same image id (`kiln image build
    /// --force`) writes another disk, and a snapshot must not resume over it. Empty when the
    /// image records no digest (built before kiln recorded one) and in manifests written
    /// before the field existed; empty matches only empty.
    #[serde(default)]
    pub disk_digest: String,
    /// The snapshot format version ([`FORMAT_VERSION`]).
    pub format_version: u32,
}

impl SnapshotFingerprint {
    /// Fields where `self` (the snapshot's) differs from `host`, in declaration order.
    pub fn diff(&self, host: &SnapshotFingerprint) -> Vec<FieldDiff> {
        let mut diffs = Vec::new();
        let mut cmp = |field: &'static str, snapshot: String, host: String| {
            if snapshot != host {
                diffs.push(FieldDiff {
                    field,
                    snapshot,
                    host,
                });
            }
        };
        cmp(
            "qemu_version",
            self.qemu_version.clone(),
            host.qemu_version.clone(),
        );
        cmp("machine", self.machine.clone(), host.machine.clone());
        cmp(
            "device_fingerprint",
            self.device_fingerprint.clone(),
            host.device_fingerprint.clone(),
        );
        cmp("cpu_model", self.cpu_model.clone(), host.cpu_model.clone());
        cmp("accel", self.accel.clone(), host.accel.clone());
        cmp("cpus", self.cpus.to_string(), host.cpus.to_string());
        cmp(
            "memory_mib",
            self.memory_mib.to_string(),
            host.memory_mib.to_string(),
        );
        cmp(
            "kernel_digest",
            self.kernel_digest.clone(),
            host.kernel_digest.clone(),
        );
        cmp(
            "initramfs_digest",
            self.initramfs_digest.clone(),
            host.initramfs_digest.clone(),
        );
        cmp(
            "image_digest",
            self.image_digest.clone(),
            host.image_digest.clone(),
        );
        let shown = |d: &str| {
            if d.is_empty() {
                "(none recorded)".to_owned()
            } else {
                d.to_owned()
            }
        };
        cmp(
            "disk_digest",
            shown(&self.disk_digest),
            shown(&host.disk_digest),
        );
        cmp(
            "format_version",
            self.format_version.to_string(),
            host.format_version.to_string(),
        );
        diffs
    }
}

/// How the snapshot was captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureInfo {
    /// Guest pause window during capture, in milliseconds.
    pub pause_ms: u64,
    /// RAM capture mode.
    pub mode: CaptureKind,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// Always [`MAGIC`].
    pub magic: String,
    /// [`FORMAT_VERSION`] when written by this build.
    pub format_version: u32,
    /// The snapshot's name (= its directory name).
    pub name: SnapshotName,
    /// When it was published (seconds since the Unix epoch).
    pub created_unix: u64,
    /// The image the snapshot's VM was booted from.
    pub image_id: String,
    /// The data files, in [`crate::DATA_FILES`] order.
    pub files: Vec<FileEntry>,
    /// Compatibility fingerprint.
    pub fingerprint: SnapshotFingerprint,
    /// Capture details.
    pub capture: CaptureInfo,
}

impl SnapshotManifest {
    /// The entry for file `name`.
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// The bytes of `manifest.json` and of `manifest.sha256` for this manifest.
    pub(crate) fn encode(&self) -> (Vec<u8>, String) {
        let mut body = serde_json::to_vec_pretty(self)
            .expect("a manifest of strings and integers always serializes");
        body.push(b'\n');
        let sum = checksum_line(&body);
        (body, sum)
    }

    /// A header check that runs before the full parse, so that a wrong magic or a future
    /// format version is reported as such rather than as a missing field.
    pub(crate) fn decode(
        path: &std::path::Path,
        body: &[u8],
    ) -> Result<SnapshotManifest, SnapshotError> {
        #[derive(Deserialize)]
        struct Header {
            magic: Option<serde_json::Value>,
            format_version: Option<serde_json::Value>,
        }
        let parse_err = |source| SnapshotError::ManifestParse {
            path: path.to_owned(),
            source,
        };
        let header: Header = serde_json::from_slice(body).map_err(parse_err)?;
        let magic = match &header.magic {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        if magic != MAGIC {
            return Err(SnapshotError::WrongMagic {
                path: path.to_owned(),
                found: magic,
            });
        }
        if let Some(v) = header.format_version.as_ref().and_then(|v| v.as_u64())
            && v != u64::from(FORMAT_VERSION)
        {
            return Err(SnapshotError::UnsupportedFormat {
                found: u32::try_from(v).unwrap_or(u32::MAX),
                supported: FORMAT_VERSION,
            });
        }
        serde_json::from_slice(body).map_err(parse_err)
    }
}

/// Hex sha256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `manifest.sha256`'s content for a manifest body.
pub(crate) fn checksum_line(body: &[u8]) -> String {
    format!("{}  {MANIFEST_FILE}\n", sha256_hex(body))
}

/// The recorded hex digest from `manifest.sha256`'s content.
pub(crate) fn parse_checksum_line(line: &str) -> Option<String> {
    let (hexsum, rest) = line.trim_end_matches('\n').split_once("  ")?;
    (hexsum.len() == 64 && hexsum.bytes().all(|b| b.is_ascii_hexdigit()) && rest == MANIFEST_FILE)
        .then(|| hexsum.to_ascii_lowercase())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fingerprint() -> SnapshotFingerprint {
        SnapshotFingerprint {
            qemu_version: "7.2.22".into(),
            machine: "q35,smm=off".into(),
            device_fingerprint: "d".repeat(64),
            cpu_model: "max".into(),
            accel: "tcg".into(),
            cpus: 1,
            memory_mib: 256,
            kernel_digest: "k".repeat(64),
            initramfs_digest: "i".repeat(64),
            image_digest: "r".repeat(64),
            disk_digest: "s".repeat(64),
            format_version: FORMAT_VERSION,
        }
    }

    #[test]
    fn snapshot_name_rejects_hidden_slashes_and_empty() {
        assert!(SnapshotName::new("py-3.12_warm").is_ok());
        for bad in ["", ".tmp-x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(
                matches!(
                    SnapshotName::new(bad),
                    Err(SnapshotError::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn fingerprint_diff_names_each_field() {
        let a = fingerprint();
        assert!(a.diff(&a).is_empty());
        let b = SnapshotFingerprint {
            accel: "kvm".into(),
            cpus: 2,
            ..fingerprint()
        };
        let diffs = a.diff(&b);
        assert_eq!(diffs.len(), 2);
        assert_eq!(
            diffs[0].to_string(),
            "accelerator (accel): snapshot tcg, host kvm"
        );
        assert_eq!(
            diffs[1].to_string(),
            "vCPU count (cpus): snapshot 1, host 2"
        );
    }

    #[test]
    fn fingerprint_diff_other_disk_is_named_and_missing_digest_shown() {
        let snap = fingerprint();
        let rebuilt = SnapshotFingerprint {
            disk_digest: "t".repeat(64),
            ..fingerprint()
        };
        let diffs = snap.diff(&rebuilt);
        assert_eq!(diffs.len(), 1);
        assert_eq!(diffs[0].field, "disk_digest");
        assert!(
            diffs[0]
                .to_string()
                .starts_with("root disk (disk_digest): snapshot sss"),
            "{}",
            diffs[0]
        );
        // A manifest written before the field existed reads as empty, which matches only a
        // host image that records no digest either.
        let mut v = serde_json::to_value(&snap).expect("json");
        v.as_object_mut().expect("object").remove("disk_digest");
        let legacy: SnapshotFingerprint = serde_json::from_value(v).expect("legacy parses");
        assert_eq!(legacy.disk_digest, "");
        assert_eq!(
            legacy.diff(&snap)[0].to_string(),
            format!(
                "root disk (disk_digest): snapshot (none recorded), host {}",
                "s".repeat(64)
            )
        );
        let legacy_host = SnapshotFingerprint {
            disk_digest: String::new(),
            ..fingerprint()
        };
        assert!(legacy.diff(&legacy_host).is_empty());
    }

    #[test]
    fn checksum_line_round_trips_and_rejects_garbage() {
        let line = checksum_line(b"{}\n");
        assert_eq!(parse_checksum_line(&line), Some(sha256_hex(b"{}\n")));
        assert_eq!(parse_checksum_line("abc  manifest.json\n"), None);
        assert_eq!(
            parse_checksum_line(&format!("{}  other.json\n", "0".repeat(64))),
            None
        );
    }
}
