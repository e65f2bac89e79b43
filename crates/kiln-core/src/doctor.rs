//! `kiln doctor`: what kiln will use on this host and why, and whether it can run at all.
//!
//! Runs in the daemon (`GET /v1/doctor`) or, when no daemon runs, in a one-shot
//! `kilnd --doctor` (it must work when the daemon cannot start), and changes nothing on the
//! host except the cached accelerator verdict it may create by probing. The report's type is
//! the API's ([`kiln_api_types::DoctorReport`]).

use std::path::{Path, PathBuf};

use crate::paths::Home;

/// Host commands kiln shells out to, and the Debian package that provides each.
const HOST_TOOLS: &[(&str, &str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86", "runs sandboxes"),
    (
        "qemu-img",
        "qemu-utils",
        "creates each sandbox's disk layer",
    ),
    ("mmdebstrap", "mmdebstrap", "builds images"),
    ("mkfs.ext4", "e2fsprogs", "builds images"),
    ("dpkg-deb", "dpkg", "extracts the guest kernel"),
    ("apt-get", "apt", "downloads the guest kernel"),
];

/// Free space below which doctor warns (an image build needs about 1 GiB of scratch space).
const LOW_SPACE_BYTES: u64 = 2 << 30;

/// The doctor's findings; the type is the API's (`GET /v1/doctor` serves it).
pub use kiln_api_types::DoctorReport;

/// Examines the host.
pub async fn run(home: &Home) -> DoctorReport {
    let mut r = DoctorReport {
        qemu_path: None,
        qemu_version: None,
        qemu_error: None,
        x_ignore_shared: None,
        accel: None,
        accel_reason: String::new(),
        state_dir: home.root().to_owned(),
        free_bytes: None,
        missing_packages: Vec::new(),
        agent_binary: None,
        images: Vec::new(),
        network_modes: crate::network::doctor(),
        problems: Vec::new(),
        warnings: Vec::new(),
    };

    for (cmd, pkg, why) in HOST_TOOLS {
        if find_in_path(cmd).is_none() {
            r.missing_packages
                .push(format!("{pkg} (provides {cmd}, {why})"));
        }
    }
    if !r.missing_packages.is_empty() {
        r.problems.push(format!(
            "missing host packages: {} (run scripts/setup-host)",
            r.missing_packages
                .iter()
                .map(|p| p.split(' ').next().unwrap_or(p))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    let qemu = match kiln_vmm::qemu::detect().await {
        Ok(q) => {
            r.qemu_path = Some(q.path.clone());
            r.qemu_version = Some(q.version.to_string());
            r.x_ignore_shared = Some(q.x_ignore_shared);
            if !q.x_ignore_shared {
                r.warnings.push(
                    "QEMU lacks the x-ignore-shared migration capability: snapshots fall back to full-RAM streams (restores copy guest RAM)".to_owned(),
                );
            }
            Some(q)
        }
        Err(e) => {
            let msg = crate::error::error_chain(&e);
            r.qemu_error = Some(msg.clone());
            r.problems.push(msg);
            None
        }
    };

    match crate::agent_binary() {
        Ok(p) => r.agent_binary = Some(p),
        Err(e) => r.problems.push(e.to_string()),
    }

    let images = kiln_image::list(home.root()).unwrap_or_default();
    r.images = images
        .iter()
        .map(|m| format!("{} ({})", m.name, m.id))
        .collect();

    if let Some(q) = &qemu {
        let probe_input = images
            .first()
            .map(|m| (m.kernel_path(home.root()), m.initramfs_path(home.root())));
        match kiln_vmm::accel::resolve_for_doctor(
            q,
            probe_input
                .as_ref()
                .map(|(k, i)| (k.as_path(), i.as_path())),
            &home.accel_cache(),
        )
        .await
        {
            Ok(v) => {
                r.accel = v.accel.map(|a| a.to_string());
                r.accel_reason = v.reason;
            }
            Err(e) => r.accel_reason = crate::error::error_chain(&e),
        }
    }

    let probe_dir = existing_ancestor(home.root());
    match crate::space::free_bytes(&probe_dir) {
        Ok(free) => {
            r.free_bytes = Some(free);
            if free < LOW_SPACE_BYTES {
                r.warnings.push(format!(
                    "only {} MiB free under {}: image builds need about 1 GiB",
                    free >> 20,
                    probe_dir.display()
                ));
            }
        }
        Err(e) => r.warnings.push(format!(
            "cannot read free space of {}: {e}",
            probe_dir.display()
        )),
    }
    if let Some(w) = loose_home(home.root()) {
        r.warnings.push(w);
    }
    r
}

/// A warning when others than its owner may enter or read the state directory: it holds
/// guest memory and disks (secrets included) and the daemon's token. The daemon tightens it
/// to 0700 when it starts; this catches a home it could not tighten, or one loosened since.
fn loose_home(home: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(home).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "the state directory {} has mode {mode:04o}: others may read guest memory, disks and secrets in it (chmod 700 it; the daemon does when it starts)",
            home.display()
        )
    })
}

/// The first existing directory at or above `p` (the state dir may not exist yet).
fn existing_ancestor(p: &Path) -> PathBuf {
    p.ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"))
        .to_owned()
}

/// Looks a command up in `PATH` (plus the sbin directories, which non-root PATHs omit).
pub fn find_in_path(cmd: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(cmd))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_home_is_warned_about_and_a_private_one_is_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let w = loose_home(dir.path()).expect("0755 is loose");
        assert!(w.contains("mode 0755"), "{w}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(loose_home(dir.path()), None);
    }

    #[test]
    fn find_in_path_finds_sh_and_not_nonsense() {
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("kiln-no-such-tool-xyz").is_none());
    }

    #[test]
    fn free_bytes_of_root_is_nonzero() {
        assert!(crate::space::free_bytes(Path::new("/")).unwrap() > 0);
        assert!(crate::space::free_bytes(Path::new("/no/such/dir")).is_err());
    }

    #[test]
    fn existing_ancestor_walks_up() {
        assert_eq!(
            existing_ancestor(Path::new("/tmp/kiln-no-such/a/b")),
            PathBuf::from("/tmp")
        );
    }
}
