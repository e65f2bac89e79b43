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
    let qemu_img =
        crate::qemu::search_path(Path::new("qemu-img"), std::env::var_os("PATH").as_ref())
            .ok_or(VmmError::QemuImgNotFound)?;
    let base = std::fs::canonicalize(base).map_err(|source| VmmError::Io {
        what: "resolve the base image",
        path: base.to_owned(),
        source,
    })?;
    let mut cmd = Command::new(&qemu_img);
    cmd.args(["create", "-q", "-f", "qcow2", "-F", format.as_str(), "-b"])
        .arg(&base)
        .arg(overlay)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(QEMU_IMG_TIMEOUT, cmd.output())
        .await
        .map_err(|_| VmmError::Timeout {
            what: "qemu-img create",
            timeout_ms: QEMU_IMG_TIMEOUT.as_millis() as u64,
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
    let qemu_img =
        crate::qemu::search_path(Path::new("qemu-img"), std::env::var_os("PATH").as_ref())
            .ok_or(VmmError::QemuImgNotFound)?;
    let base = std::fs::canonicalize(base).map_err(|source| VmmError::Io {
        what: "resolve the base image",
        path: base.to_owned(),
        source,
    })?;
    let mut cmd = Command::new(&qemu_img);
    cmd.args(["rebase", "-q", "-f", "qcow2", "-F", format.as_str(), "-b"])
        .arg(&base)
        .arg(overlay)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(QEMU_IMG_REBASE_TIMEOUT, cmd.output())
        .await
        .map_err(|_| VmmError::Timeout {
            what: "qemu-img rebase",
            timeout_ms: QEMU_IMG_REBASE_TIMEOUT.as_millis() as u64,
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
