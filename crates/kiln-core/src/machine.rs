//! The one place a sandbox's machine becomes a QEMU configuration: [`MachinePlan`] (QEMU,
//! accelerator, image, [`MachineSpec`], snapshot mode) and its [`MachinePlan::vm_config`].
//!
//! Cold boots, warm-snapshot captures and restores, and user snapshots all build their
//! [`VmConfig`] here, so a device or command-line change reaches every path and every
//! snapshot fingerprint at once. Must not: start processes or touch the file system.

use std::path::{Path, PathBuf};

use kiln_api_types::MachineSpec;

use crate::error::CoreError;
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
    /// The network device, if the sandbox has a network. Its backend is this VM's (a
    /// capture gets an unconnected stream); warm snapshots with and without one are kept
    /// apart by [`MachinePlan::name`].
    pub nic: Option<kiln_vmm::Nic>,
}

impl MachinePlan<'_> {
    /// The snapshot's name.
    pub fn name(&self) -> String {
        let suffix = match self.mode {
            CaptureMode::IgnoreShared => "",
            CaptureMode::FullRam => "-fullram",
        };
        let net = if self.nic.is_some() { "-net" } else { "" };
        let screen = self
            .machine
            .screen
            .map_or_else(String::new, |s| format!("-{s}"));
        format!(
            "warm-{}-{}c{}m{screen}{net}{suffix}",
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
            extra_cmdline: tsc_cmdline(self.accel),
            disk: Some(disk),
            memory_file,
            memory_shared: shared,
            run_dir: run_dir.to_owned(),
            incoming: None,
            nic: self.nic.clone(),
            display: self.machine.screen.map(|s| kiln_vmm::Display {
                width: s.width,
                height: s.height,
            }),
        }
    }

    /// The same plan with the network device's backend replaced by an unconnected stream:
    /// what a warm capture runs with (the device state is the same for every backend).
    pub fn for_capture(&self) -> MachinePlan<'_> {
        MachinePlan {
            nic: self.nic.as_ref().map(|n| kiln_vmm::Nic {
                mac: n.mac.clone(),
                backend: kiln_vmm::NicBackend::Stream,
            }),
            ..*self
        }
    }

    /// What must be equal between capture and restore (the kernel command line's host TSC
    /// rate is not: it only steers the boot, and its measurement differs by a few kHz).
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
            // initramfs) and the recipe (the root file system)...
            kernel_digest: self.image.kernel_version.clone(),
            initramfs_digest: self.image.fingerprint.clone(),
            image_digest: self.image.fingerprint.clone(),
            // ...except under `kiln image build --force`, which keeps the id and writes
            // another root file system: the disk's own digest tells them apart. Empty for
            // images built before it was recorded (it then matches only snapshots that
            // record none either).
            disk_digest: self.image.rootfs_sha256.clone().unwrap_or_default(),
            format_version: kiln_snapshot::FORMAT_VERSION,
        }
    }
}

/// The screen of a sandbox of `image` that asked for `asked`: what it asked, else the
/// image's default, for a desktop image; none for any other image, which cannot have one.
pub(crate) fn resolve_screen(
    image: &kiln_image::ImageManifest,
    asked: Option<kiln_api_types::Screen>,
) -> Result<Option<kiln_api_types::Screen>, CoreError> {
    match (&image.recipe.desktop, asked) {
        (Some(_), Some(s)) => Ok(Some(s)),
        (Some(d), None) => Ok(Some(kiln_api_types::Screen {
            width: d.width,
            height: d.height,
        })),
        (None, None) => Ok(None),
        (None, Some(s)) => Err(CoreError::NotADesktop(format!(
            "image {} is not a desktop: a screen ({s}) needs a desktop image, e.g. `desktop`",
            image.name
        ))),
    }
}

/// Under TCG, the host's TSC rate for the guest kernel (`tsc_early_khz`): without it a
/// guest booted on a loaded host can measure its TSC an order of magnitude wrong, and its
/// clocks run that much fast for good (see `kiln_vmm::tsc`).
fn tsc_cmdline(accel: Accel) -> String {
    match (accel, kiln_vmm::tsc::host_tsc_khz()) {
        (Accel::Tcg, Some(khz)) => format!("tsc_early_khz={khz}"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_snapshot::SnapshotError;
    use kiln_vmm::qemu::QemuVersion;

    fn qemu() -> QemuInfo {
        QemuInfo {
            path: "/usr/bin/qemu-system-x86_64".into(),
            version: QemuVersion {
                major: 7,
                minor: 2,
                micro: 22,
            },
            version_line: "QEMU emulator version 7.2.22".into(),
            x_ignore_shared: true,
        }
    }

    fn image(rootfs_sha256: Option<String>) -> kiln_image::ImageManifest {
        let recipe = kiln_image::builtin("base").expect("base recipe");
        let inputs = kiln_image::FingerprintInputs::new(&recipe, "", "6.1", "00", "m", "s");
        let fingerprint = inputs.fingerprint();
        kiln_image::ImageManifest {
            schema: kiln_image::MANIFEST_SCHEMA,
            id: kiln_image::ImageId(kiln_image::short_id(&fingerprint)),
            name: "base".into(),
            recipe,
            fingerprint,
            inputs,
            kernel_version: "6.1".into(),
            kernel_release: "6.1.0-cloud-amd64".into(),
            created_unix: 0,
            files: Vec::new(),
            rootfs_sha256,
            recipe_path: None,
            origin: None,
        }
    }

    fn fingerprint_of(image: &kiln_image::ImageManifest) -> SnapshotFingerprint {
        let qemu = qemu();
        let plan = MachinePlan {
            nic: None,
            qemu: &qemu,
            accel: Accel::Tcg,
            image,
            home: Path::new("/home/kiln"),
            machine: MachineSpec {
                screen: None,
                cpus: 1,
                memory_mib: 256,
            },
            mode: CaptureMode::IgnoreShared,
        };
        let cfg = plan.vm_config(Path::new("/r"), "/r/disk".into(), "/r/mem".into(), false);
        plan.fingerprint(&cfg)
    }

    #[test]
    fn fingerprint_same_id_rebuilt_disk_differs_only_in_disk_digest() {
        let before = image(Some("a".repeat(64)));
        let rebuilt = image(Some("b".repeat(64)));
        assert_eq!(before.id, rebuilt.id, "a --force rebuild keeps the id");
        let diffs = fingerprint_of(&before).diff(&fingerprint_of(&rebuilt));
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        assert_eq!(diffs[0].field, "disk_digest");
        // What a restore reports (warm: the cold-boot reason; user: snapshot_unusable).
        let e = SnapshotError::FingerprintMismatch { diffs };
        assert!(
            e.to_string()
                .starts_with("snapshot is incompatible: root disk (disk_digest): snapshot aaaa"),
            "{e}"
        );
    }

    #[test]
    fn fingerprint_image_without_digest_records_none_and_matches_only_none() {
        let legacy = fingerprint_of(&image(None));
        assert_eq!(legacy.disk_digest, "");
        assert!(legacy.diff(&fingerprint_of(&image(None))).is_empty());
        let rebuilt = fingerprint_of(&image(Some("c".repeat(64))));
        assert_eq!(legacy.diff(&rebuilt).len(), 1);
    }
}
