//! `GET /v1/doctor`: what kiln will use on the daemon's host and why.
//!
//! Only the report's shape lives here; the engine (`kiln_core::doctor`) fills it in. Paths are
//! absolute host paths of the daemon's machine.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The doctor's findings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DoctorReport {
    /// QEMU binary, if found.
    #[schema(value_type = Option<String>)]
    pub qemu_path: Option<PathBuf>,
    /// QEMU version, if found.
    pub qemu_version: Option<String>,
    /// Why QEMU is unusable, if it is.
    pub qemu_error: Option<String>,
    /// Whether QEMU supports the `x-ignore-shared` migration capability (file-mapped snapshots).
    pub x_ignore_shared: Option<bool>,
    /// Accelerator kiln will use (`kvm`/`tcg`), if known.
    pub accel: Option<String>,
    /// Why that accelerator.
    pub accel_reason: String,
    /// The state directory.
    #[schema(value_type = String)]
    pub state_dir: PathBuf,
    /// Free bytes under it.
    pub free_bytes: Option<u64>,
    /// Host packages that are missing, with what each is for.
    pub missing_packages: Vec<String>,
    /// The guest agent binary, if found.
    #[schema(value_type = Option<String>)]
    pub agent_binary: Option<PathBuf>,
    /// Built images.
    pub images: Vec<String>,
    /// Which network modes sandboxes can have here, and why not.
    #[serde(default)]
    pub network_modes: Vec<NetworkModeSupport>,
    /// Problems that stop kiln from running.
    pub problems: Vec<String>,
    /// Things worth knowing that do not stop kiln.
    pub warnings: Vec<String>,
}

/// Whether this host supports one network mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkModeSupport {
    /// `none`, `allow`, `nat` or `bridge`.
    pub mode: String,
    /// Whether sandboxes can use it here.
    pub available: bool,
    /// What is missing (and how to get it), when not available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<String>,
}

impl DoctorReport {
    /// Whether kiln can run sandboxes here.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}
