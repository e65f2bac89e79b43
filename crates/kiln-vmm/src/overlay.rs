//! Copy-on-write disk overlays: a qcow2 file backed by the image's read-only raw rootfs.
//!
//! Invariant: the base image is never written; the backing path recorded in the overlay is
//! absolute, so the overlay works from any working directory.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::error::VmmError;

/// How long `qemu-img create` may take (it writes a few KiB).
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `qemu-img rebase` (which reads the whole virtual disk) may take.
const QEMU_IMG_REBASE_TIMEOUT: Duration = Duration::from_secs(300);

/// Format of an overlay's backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// A raw image (an image's `rootfs.ext4`).
    Raw,
    /// A qcow2 file (a snapshot's captured disk layer).
    Qcow2,
}

impl BackingFormat {
    fn as_str(self) -> &'static str {
        match self {
            BackingFormat::Raw => "raw",
            BackingFormat::Qcow2 => "qcow2",
        }
    }
}

/// Creates `overlay` as a qcow2 backed by the raw image `base`
/// (`qemu-img create -f qcow2 -F raw -b <base> <overlay>`), replacing any existing file.
pub async fn create_overlay(base: &Path, overlay: &Path) -> Result<(), VmmError> {
    create_overlay_with(base, BackingFormat::Raw, overlay).await
}

/// Creates `overlay` as a qcow2 backed by `base` of the given format (a snapshot clone's disk
/// is backed by the snapshot's qcow2 layer, itself backed by the image's rootfs).
pub async fn create_overlay_with(
    base: &Path,
    format: BackingFormat,
    overlay: &Path,
) -> Result<(), VmmError> {
    let base_abs = std::fs::canonicalize(base).map_err(|source| VmmError::Io {
        what: "resolve the base image",
        path: base.to_owned(),
        source,
    })?;
    let size = backing_size(&base_abs, format)?;
    match qcow2_overlay_bytes(&base_abs, format, size) {
        Some(bytes) => std::fs::write(overlay, bytes).map_err(|source| VmmError::Io {
            what: "write",
            path: overlay.to_owned(),
            source,
        }),
        None => create_overlay_qemu_img(&base_abs, format, overlay).await,
    }
}

/// The virtual size of a backing file: a raw file's length, a qcow2's header `size`.
fn backing_size(base: &Path, format: BackingFormat) -> Result<u64, VmmError> {
    use std::io::Read;
    let err = |source| VmmError::Io {
        what: "read the base image",
        path: base.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(base).map_err(err)?;
    match format {
        BackingFormat::Raw => Ok(f.metadata().map_err(err)?.len()),
        BackingFormat::Qcow2 => {
            let mut h = [0u8; 32];
            f.read_exact(&mut h).map_err(err)?;
            if h[..4] != QCOW2_MAGIC.to_be_bytes() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a qcow2 file (bad magic)",
                )));
            }
            Ok(u64::from_be_bytes(h[24..32].try_into().expect("8 bytes")))
        }
    }
}

/// qcow2 magic, `QFI\xfb`.
const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Cluster size of the overlays (64 KiB, qemu-img's default).
const CLUSTER_BITS: u32 = 16;
const CLUSTER: usize = 1 << CLUSTER_BITS;
/// Header extension: backing file format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Version 3 header length including the compression type byte and its padding.
const HEADER_LEN: usize = 112;
/// The feature name table qemu-img 7.2 writes: (type, bit, name); type 0 incompatible,
/// 1 compatible, 2 autoclear.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// The bytes of an empty qcow2 v3 overlay over `base`, as `qemu-img create -f qcow2 -F <fmt>
/// -b <base>` (QEMU 7.2) writes it, or `None` for a case this writer does not cover (then
/// qemu-img is run): a size that is not a multiple of 512, zero, or so large that the L1
/// table needs more than one cluster (> 4 TiB); a backing path over 1023 bytes.
///
/// Layout (64 KiB clusters): cluster 0 header, extensions (backing format, feature names,
/// end) and the backing path; cluster 1 the refcount table (one entry → cluster 2);
/// cluster 2 the refcount block (16-bit refcounts, clusters 0–3 used once); cluster 3 the
/// L1 table, all zero (nothing allocated: every read falls through to the backing file).
/// Why in-process: spawning qemu-img cost ~10 ms of every restore.
fn qcow2_overlay_bytes(base: &Path, format: BackingFormat, size: u64) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let backing = base.as_os_str().as_bytes();
    // One L2 table maps CLUSTER / 8 clusters.
    let per_l1_entry = (CLUSTER as u64) * (CLUSTER as u64 / 8);
    let l1_size = size.div_ceil(per_l1_entry);
    if size == 0
        || !size.is_multiple_of(512)
        || l1_size > (CLUSTER as u64 / 8)
        || backing.len() > 1023
    {
        return None;
    }
    let fmt = format.as_str().as_bytes();
    let l1_offset = 3 * CLUSTER;
    let mut b = vec![0u8; l1_offset + (l1_size as usize) * 8];
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    // Extensions: each is type, length, data padded to 8 bytes.
    let mut at = HEADER_LEN;
    put32(&mut b, at, EXT_BACKING_FORMAT);
    put32(&mut b, at + 4, fmt.len() as u32);
    b[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt);
    at += 8 + fmt.len().next_multiple_of(8);
    put32(&mut b, at, EXT_FEATURE_TABLE);
    put32(&mut b, at + 4, (FEATURE_NAMES.len() * 48) as u32);
    at += 8;
    for (kind, bit, name) in FEATURE_NAMES {
        b[at] = kind;
        b[at + 1] = bit;
        b[at + 2..at + 2 + name.len()].copy_from_slice(name.as_bytes());
        at += 48;
    }
    at += 8; // end-of-extensions marker (zeros)
    let backing_offset = at;
    b[at..at + backing.len()].copy_from_slice(backing);
    // Header.
    put32(&mut b, 0, QCOW2_MAGIC);
    put32(&mut b, 4, 3);
    put64(&mut b, 8, backing_offset as u64);
    put32(&mut b, 16, backing.len() as u32);
    put32(&mut b, 20, CLUSTER_BITS);
    put64(&mut b, 24, size);
    put32(&mut b, 32, 0); // no encryption
    put32(&mut b, 36, l1_size as u32);
    put64(&mut b, 40, l1_offset as u64);
    put64(&mut b, 48, CLUSTER as u64); // refcount table
    put32(&mut b, 56, 1); // refcount table clusters
    // 60..96: no snapshots, no feature bits.
    put32(&mut b, 96, 4); // refcount_order: 16-bit refcounts
    put32(&mut b, 100, HEADER_LEN as u32);
    // 104: compression type zlib (0) and padding.
    // Refcount table → the block in cluster 2, which counts clusters 0..=3.
    put64(&mut b, CLUSTER, 2 * CLUSTER as u64);
    for cluster in 0..4 {
        b[2 * CLUSTER + cluster * 2..2 * CLUSTER + cluster * 2 + 2]
            .copy_from_slice(&1u16.to_be_bytes());
    }
    Some(b)
}

/// `qemu-img create` of the overlay (`base` already absolute).
async fn create_overlay_qemu_img(
    base: &Path,
    format: BackingFormat,
    overlay: &Path,
) -> Result<(), VmmError> {
    let cmd = QemuImg {
        verb: "create",
        what: "qemu-img create",
        timeout: QEMU_IMG_TIMEOUT,
    };
    cmd.run(base, format, overlay).await
}

/// Makes `overlay` self-contained above `base`: `qemu-img rebase` in safe mode copies into
/// the overlay every cluster in which its current backing chain differs from `base`, then
/// points it at `base`. A user snapshot's disk layer uses this to depend on the image only,
/// not on the snapshot its sandbox was restored from. Reads the whole virtual disk: seconds
/// for a few GB of sparse image; call it off any pause window.
pub async fn rebase_overlay(
    overlay: &Path,
    base: &Path,
    format: BackingFormat,
) -> Result<(), VmmError> {
    let base = std::fs::canonicalize(base).map_err(|source| VmmError::Io {
        what: "resolve the base image",
        path: base.to_owned(),
        source,
    })?;
    let cmd = QemuImg {
        verb: "rebase",
        what: "qemu-img rebase",
        timeout: QEMU_IMG_REBASE_TIMEOUT,
    };
    cmd.run(&base, format, overlay).await
}

/// One `qemu-img <verb> -q -f qcow2 -F <format> -b <base> <overlay>` run.
struct QemuImg {
    verb: &'static str,
    /// Named in a timeout error.
    what: &'static str,
    timeout: Duration,
}

impl QemuImg {
    /// Runs it with its deadline; a failure carries qemu-img's stderr.
    async fn run(
        &self,
        base: &Path,
        format: BackingFormat,
        overlay: &Path,
    ) -> Result<(), VmmError> {
        let (verb, timeout) = (self.verb, self.timeout);
        let qemu_img =
            crate::qemu::search_path(Path::new("qemu-img"), std::env::var_os("PATH").as_ref())
                .ok_or(VmmError::QemuImgNotFound)?;
        let mut cmd = Command::new(&qemu_img);
        cmd.args([verb, "-q", "-f", "qcow2", "-F", format.as_str(), "-b"])
            .arg(base)
            .arg(overlay)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| VmmError::Timeout {
                what: self.what,
                timeout_ms: timeout.as_millis() as u64,
            })?
            .map_err(|source| VmmError::Run {
                program: qemu_img.clone(),
                source,
            })?;
        if !out.status.success() {
            let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            stderr.truncate(2048);
            return Err(VmmError::OverlayCreate {
                overlay: overlay.to_owned(),
                status: out.status.to_string(),
                stderr,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }

    fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }

    #[test]
    fn qcow2_overlay_bytes_two_gib_over_qcow2_has_qemu_img_layout() {
        let base = Path::new("/snapshots/warm-x/disk.qcow2");
        let b = qcow2_overlay_bytes(base, BackingFormat::Qcow2, 2 << 30).expect("covered");
        // The layout qemu-img 7.2 writes for this case (196,640 bytes).
        assert_eq!(b.len(), 0x30000 + 4 * 8);
        assert_eq!(be32(&b, 0), QCOW2_MAGIC);
        assert_eq!(be32(&b, 4), 3);
        assert_eq!(be64(&b, 8), 0x210, "backing path offset");
        assert_eq!(be32(&b, 16) as usize, base.as_os_str().len());
        assert_eq!(
            &b[0x210..0x210 + base.as_os_str().len()],
            b"/snapshots/warm-x/disk.qcow2"
        );
        assert_eq!(be32(&b, 20), 16);
        assert_eq!(be64(&b, 24), 2 << 30);
        assert_eq!(be32(&b, 36), 4, "L1 entries: 512 MiB each");
        assert_eq!(be64(&b, 40), 0x30000);
        assert_eq!(be64(&b, 48), 0x10000);
        assert_eq!(be32(&b, 56), 1);
        assert_eq!(be32(&b, 96), 4);
        assert_eq!(be32(&b, 100), 112);
        assert_eq!(be32(&b, 0x70), EXT_BACKING_FORMAT);
        assert_eq!(be32(&b, 0x74), 5);
        assert_eq!(&b[0x78..0x7d], b"qcow2");
        assert_eq!(be32(&b, 0x80), EXT_FEATURE_TABLE);
        assert_eq!(be64(&b, 0x10000), 0x20000);
        for cluster in 0..4 {
            assert_eq!(
                b[0x20000 + 2 * cluster + 1],
                1,
                "cluster {cluster} refcount"
            );
        }
        assert!(
            b[0x20008..].iter().all(|&x| x == 0),
            "L1 empty, nothing else counted"
        );
    }

    #[test]
    fn qcow2_overlay_bytes_uncovered_sizes_and_paths_fall_back() {
        let base = Path::new("/b");
        assert!(qcow2_overlay_bytes(base, BackingFormat::Raw, 0).is_none());
        assert!(qcow2_overlay_bytes(base, BackingFormat::Raw, (1 << 20) + 1).is_none());
        assert!(qcow2_overlay_bytes(base, BackingFormat::Raw, 5 << 40).is_none());
        let long = format!("/{}", "a".repeat(1023));
        assert!(qcow2_overlay_bytes(Path::new(&long), BackingFormat::Raw, 1 << 30).is_none());
        let raw = qcow2_overlay_bytes(base, BackingFormat::Raw, 1 << 30).expect("covered");
        assert_eq!(&raw[0x78..0x80], b"raw\0\0\0\0\0");
        assert_eq!(be64(&raw, 8), 0x210, "format names pad to the same offset");
    }

    #[test]
    fn backing_size_reads_raw_length_and_qcow2_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("raw");
        std::fs::File::create(&raw)
            .and_then(|f| f.set_len(3 << 20))
            .expect("raw");
        assert_eq!(backing_size(&raw, BackingFormat::Raw).ok(), Some(3 << 20));
        let q = dir.path().join("q");
        let bytes = qcow2_overlay_bytes(&raw, BackingFormat::Raw, 3 << 20).expect("covered");
        std::fs::write(&q, bytes).expect("write");
        assert_eq!(backing_size(&q, BackingFormat::Qcow2).ok(), Some(3 << 20));
        assert!(
            backing_size(&raw, BackingFormat::Qcow2).is_err(),
            "bad magic"
        );
    }

    /// The in-process overlay is byte-identical to qemu-img's and passes `qemu-img check`.
    /// Needs only `qemu-img` (scripts/setup-host installs it), so it runs with the unit tests.
    #[tokio::test]
    async fn create_overlay_with_matches_qemu_img_and_passes_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("rootfs.raw");
        std::fs::File::create(&raw)
            .and_then(|f| f.set_len(2 << 30))
            .expect("raw");
        let layer = dir.path().join("layer.qcow2");
        create_overlay_with(&raw, BackingFormat::Raw, &layer)
            .await
            .expect("layer");
        let ours = dir.path().join("ours.qcow2");
        create_overlay_with(&layer, BackingFormat::Qcow2, &ours)
            .await
            .expect("ours");
        let theirs = dir.path().join("theirs.qcow2");
        let layer_abs = std::fs::canonicalize(&layer).expect("canonical");
        create_overlay_qemu_img(&layer_abs, BackingFormat::Qcow2, &theirs)
            .await
            .expect("qemu-img");
        assert_eq!(std::fs::read(&ours).ok(), std::fs::read(&theirs).ok());
        let raw_theirs = dir.path().join("raw-theirs.qcow2");
        let raw_abs = std::fs::canonicalize(&raw).expect("canonical");
        create_overlay_qemu_img(&raw_abs, BackingFormat::Raw, &raw_theirs)
            .await
            .expect("qemu-img");
        assert_eq!(std::fs::read(&layer).ok(), std::fs::read(&raw_theirs).ok());
        for image in [&layer, &ours] {
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-q", "-f", "qcow2"])
                .arg(image)
                .output()
                .expect("qemu-img check");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
