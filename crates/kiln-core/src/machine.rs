//! The one place a sandbox's machine becomes a QEMU configuration: [`MachinePlan`] (QEMU,
//! accelerator, image, [`MachineSpec`], snapshot mode) and its [`MachinePlan::vm_config`].
//!
//! Cold boots, warm-snapshot captures and restores, and user snapshots all build their
//! [`VmConfig`] here, so a device or command-line change reaches every path and every
//! snapshot fingerprint at once. Must not: start processes or touch the file system.

use std::path::{Path, PathBuf};

use kiln_api_types::MachineSpec;
use kiln_snapshot::SnapshotFingerprint;
use kiln_vmm::qemu::QemuInfo;
use kiln_vmm::{Accel, CaptureMode, VmConfig};

/// Everything a VM of one sandbox is made of: the QEMU and accelerator in use, the image,
/// the machine size and how snapshots save RAM. Keys a warm snapshot and is what a restore
/// must match.
pub struct MachinePlan<'a> {
    /// QEMU in use.
    pub qemu: &'a QemuInfo,
    /// Accelerator in use.
    pub accel: Accel,
    /// The image.
    pub image: &'a kiln_image::ImageManifest,
    /// `$KILN_HOME`.
    pub home: &'a Path,
    /// vCPUs and memory, as the spec asked (or as the snapshot was taken).
    pub machine: MachineSpec,
    /// How RAM is saved: `IgnoreShared` (RAM is the snapshot's `mem`, mapped copy-on-write),
    /// or `FullRam` (RAM in the `state` stream, copied into every restore; for QEMUs without
    /// `x-ignore-shared`, and for comparison in `kiln bench snapshot`).
    pub mode: CaptureMode,
}

impl MachinePlan<'_> {
    /// The snapshot's name.
    pub fn name(&self) -> String {
        let suffix = match self.mode {
            CaptureMode::IgnoreShared => "",
            CaptureMode::FullRam => "-fullram",
        };
        format!(
            "warm-{}-{}c{}m{suffix}",
            self.image.id, self.machine.cpus, self.machine.memory_mib
        )
    }

    /// The one `MachineSpec → VmConfig` function: the VM configuration of a cold boot, the
    /// capture VM and every restore (paths and RAM sharing aside).
    pub fn vm_config(
        &self,
        run_dir: &Path,
        disk: PathBuf,
        memory_file: PathBuf,
        shared: bool,
    ) -> VmConfig {
        VmConfig {
            qemu: self.qemu.path.clone(),
            accel: self.accel,
            cpus: self.machine.cpus,
            memory_mib: self.machine.memory_mib,
            kernel: self.image.kernel_path(self.home),
            initramfs: self.image.initramfs_path(self.home),
            extra_cmdline: String::new(),
            disk: Some(disk),
            memory_file,
            memory_shared: shared,
            run_dir: run_dir.to_owned(),
            incoming: None,
        }
    }

    /// What must be equal between capture and restore.
    pub fn fingerprint(&self, cfg: &VmConfig) -> SnapshotFingerprint {
        SnapshotFingerprint {
            qemu_version: self.qemu.version_line.clone(),
            machine: kiln_vmm::cmdline::MACHINE.to_owned(),
            device_fingerprint: kiln_vmm::device_fingerprint(cfg),
            cpu_model: match self.accel {
                Accel::Kvm => "host".to_owned(),
                Accel::Tcg => "max".to_owned(),
            },
            accel: self.accel.to_string(),
            cpus: self.machine.cpus,
            memory_mib: self.machine.memory_mib,
            // The image fingerprint covers the kernel package, the agent binary (the
            // initramfs) and the recipe (the root file system); image files never change
            // under one id.
            kernel_digest: self.image.kernel_version.clone(),
            initramfs_digest: self.image.fingerprint.clone(),
            image_digest: self.image.fingerprint.clone(),
            format_version: kiln_snapshot::FORMAT_VERSION,
        }
    }
}
