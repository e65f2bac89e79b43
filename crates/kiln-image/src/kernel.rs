//! The guest kernel: Debian's `linux-image-cloud-amd64` (or, for desktop images, the generic
//! `linux-image-amd64`: see [`KernelFlavour`]), resolved with the host's apt, downloaded with
//! `apt-get download` and extracted with `dpkg-deb -x` (never installed).
//!
//! Owns `$KILN_HOME/cache/debs/` and `$KILN_HOME/cache/kernel/<key>/` (the key is the deb
//! version for the cloud kernel and `generic-<deb version>` for the generic one, whose
//! packages share version numbers: [`cache_key`]), which holds
//! `vmlinuz` and `lib/modules/<release>/` (with a `modules.dep`, generated here because
//! Debian's packages leave that to depmod at install time).
//!
//! Invariants: a `cache/kernel/<version>/` directory that exists is complete: it is extracted
//! into `cache/kernel/.tmp-<version>-<pid>/` and renamed into place, so concurrent builders
//! never see (or corrupt) a half-extracted kernel; the loser of a race discards its copy.
//! The same holds for `.deb` files in `cache/debs/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd;
use crate::error::{ImageError, IoContext};
use crate::modules;
use crate::publish::{self, TmpDir};
use crate::recipe::KernelFlavour;

/// The Debian metapackage that names the current cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// The name of an extracted kernel's directory in `cache/kernel/`: the deb version for the
/// cloud kernel (as before there were flavours), `<flavour>-<version>` otherwise.
pub fn cache_key(version: &str, release: &str) -> String {
    match KernelFlavour::of_release(release) {
        KernelFlavour::Cloud => version.to_owned(),
        other => format!("{}-{version}", other.as_str()),
    }
}

/// A kernel package as resolved by apt-cache (not necessarily downloaded yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    /// The real package, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Its Debian version, e.g. `6.1.192-2`.
    pub version: String,
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
}

impl KernelPackage {
    /// The package an image was built with (its manifest's kernel version and release):
    /// builds that keep an image's kernel do not ask apt-cache.
    pub fn of_image(version: &str, release: &str) -> KernelPackage {
        KernelPackage {
            package: format!("linux-image-{release}"),
            version: version.to_owned(),
            release: release.to_owned(),
        }
    }
}

/// An extracted kernel in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The real package name.
    pub package: String,
    /// The Debian package version (the cache key).
    pub version: String,
    /// The kernel release (`uname -r`).
    pub release: String,
    /// The compressed kernel image to pass to QEMU's `-kernel`.
    pub vmlinuz: PathBuf,
    /// `.../lib/modules/<release>/`, with a `modules.dep`.
    pub modules_dir: PathBuf,
}

/// Parses `apt-cache show --no-all-versions <metapackage>` output into the real package and
/// its version (from the `Depends: linux-image-X (= V)` line).
pub(crate) fn parse_metapackage(show: &str, metapackage: &str) -> Option<(String, Option<String>)> {
    let depends = show
        .lines()
        .find_map(|l| l.strip_prefix("Depends:"))?
        .split(',');
    for dep in depends {
        // Alternatives (`a | b`): take the first linux-image one.
        for alt in dep.split('|') {
            let alt = alt.trim();
            let (name, rest) = alt.split_once(' ').unwrap_or((alt, ""));
            if name.starts_with("linux-image-") && name != metapackage {
                let version = rest
                    .trim()
                    .strip_prefix("(=")
                    .and_then(|v| v.strip_suffix(')'))
                    .map(|v| v.trim().to_owned());
                return Some((name.to_owned(), version));
            }
        }
    }
    None
}

/// Parses the `Candidate:` line of `apt-cache policy <package>` output.
pub(crate) fn parse_candidate(policy: &str) -> Option<String> {
    let candidate = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))?
        .trim();
    (!candidate.is_empty() && candidate != "(none)").then(|| candidate.to_owned())
}

/// Resolves the metapackage of the kernel `flavour` to the real package and its candidate
/// version using the host's apt lists. Cheap (no download); the fingerprint of an image
/// needs only this.
pub fn resolve_kernel(flavour: KernelFlavour) -> Result<KernelPackage, ImageError> {
    let metapackage = flavour.metapackage();
    let unresolvable = |detail: String| ImageError::KernelUnresolvable {
        package: metapackage.to_owned(),
        detail,
    };
    let show = cmd::run_capture(Command::new("apt-cache").args([
        "show",
        "--no-all-versions",
        metapackage,
    ]))
    .map_err(|e| match e {
        ImageError::CommandFailed { output_tail, .. } => unresolvable(output_tail),
        other => other,
    })?;
    let show = String::from_utf8_lossy(&show);
    let (package, version) = parse_metapackage(&show, metapackage)
        .ok_or_else(|| unresolvable("its Depends names no linux-image package".into()))?;
    let version = match version {
        Some(v) => v,
        None => {
            let policy = cmd::run_capture(Command::new("apt-cache").args(["policy", &package]))?;
            parse_candidate(&String::from_utf8_lossy(&policy))
                .ok_or_else(|| unresolvable(format!("{package} has no candidate version")))?
        }
    };
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_owned();
    Ok(KernelPackage {
        package,
        version,
        release,
    })
}

/// Resolves, downloads and extracts the current cloud kernel into `$KILN_HOME/cache/`.
/// Returns at once if that version is already extracted.
pub fn ensure_kernel(home: &Path) -> Result<Kernel, ImageError> {
    let pkg = resolve_kernel(KernelFlavour::Cloud)?;
    ensure_package(home, &pkg, &mut |_| {})
}

/// The cache layout of an extracted kernel version.
fn cached(home: &Path, pkg: &KernelPackage) -> Kernel {
    let dir = home
        .join("cache/kernel")
        .join(cache_key(&pkg.version, &pkg.release));
    Kernel {
        package: pkg.package.clone(),
        version: pkg.version.clone(),
        release: pkg.release.clone(),
        vmlinuz: dir.join("vmlinuz"),
        modules_dir: dir.join("lib/modules").join(&pkg.release),
    }
}

/// Downloads and extracts `pkg` unless already in the cache; logs through `on_log`.
pub(crate) fn ensure_package(
    home: &Path,
    pkg: &KernelPackage,
    on_log: &mut dyn FnMut(&str),
) -> Result<Kernel, ImageError> {
    let kernel = cached(home, pkg);
    if is_complete(&kernel) {
        return Ok(kernel);
    }
    let deb = ensure_deb(home, pkg, on_log)?;
    let kernel_root = home.join("cache/kernel");
    std::fs::create_dir_all(&kernel_root).ctx("create directory", &kernel_root)?;
    publish::clean_stale_tmp(&kernel_root);
    let key = cache_key(&pkg.version, &pkg.release);
    let tmp = TmpDir::create(&kernel_root, &key)?;
    on_log(&format!("extracting {}", deb.display()));
    cmd::run_capture(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(tmp.path()))?;
    let layout = |detail: String| ImageError::KernelLayout {
        package: pkg.package.clone(),
        detail,
    };
    let boot_image = tmp.path().join(format!("boot/vmlinuz-{}", pkg.release));
    if !boot_image.is_file() {
        return Err(layout(format!("no boot/vmlinuz-{}", pkg.release)));
    }
    let vmlinuz = tmp.path().join("vmlinuz");
    std::fs::rename(&boot_image, &vmlinuz).ctx("rename", &boot_image)?;
    // Newer (merged-/usr) packages ship modules under usr/lib/modules: normalize to lib/.
    let modules_dir = tmp.path().join("lib/modules").join(&pkg.release);
    let usr_modules = tmp.path().join("usr/lib/modules").join(&pkg.release);
    if !modules_dir.is_dir() && usr_modules.is_dir() {
        std::fs::create_dir_all(tmp.path().join("lib/modules"))
            .ctx("create directory", tmp.path())?;
        std::fs::rename(&usr_modules, &modules_dir).ctx("rename", &usr_modules)?;
    }
    if !modules_dir.is_dir() {
        return Err(layout(format!("no lib/modules/{}", pkg.release)));
    }
    let dep_file = modules_dir.join("modules.dep");
    if !dep_file.is_file() {
        on_log("generating modules.dep from module metadata");
        let deps = modules::generate_modules_dep(&modules_dir)?;
        std::fs::write(&dep_file, deps.render()).ctx("write", &dep_file)?;
    }
    let dest = kernel_root.join(&key);
    match std::fs::rename(tmp.path(), &dest) {
        Ok(()) => tmp.disarm(),
        // Another builder won the race; its copy is complete by construction. Ours is
        // removed when `tmp` drops.
        Err(_) if is_complete(&kernel) => {}
        Err(e) => return Err(ImageError::io("rename", tmp.path(), e)),
    }
    Ok(kernel)
}

/// Whether the cached kernel has everything a build needs.
fn is_complete(k: &Kernel) -> bool {
    k.vmlinuz.is_file() && k.modules_dir.join("modules.dep").is_file()
}

/// Returns the path of the `.deb` for `pkg` in `cache/debs/`, downloading it if missing.
fn ensure_deb(
    home: &Path,
    pkg: &KernelPackage,
    on_log: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    let debs = home.join("cache/debs");
    let deb = debs.join(format!(
        "{}_{}_amd64.deb",
        pkg.package,
        pkg.version.replace(':', "%3a")
    ));
    if deb.is_file() {
        return Ok(deb);
    }
    std::fs::create_dir_all(&debs).ctx("create directory", &debs)?;
    publish::clean_stale_tmp(&debs);
    let tmp = TmpDir::create(&debs, &pkg.package)?;
    let mut c = Command::new("apt-get");
    c.current_dir(tmp.path())
        .args(["download", "-q"])
        .arg(format!("{}={}", pkg.package, pkg.version));
    cmd::run_streaming(c, &mut |line| {
        // apt warns that it downloads unsandboxed as root into a directory _apt cannot read:
        // expected here and not worth alarming anyone.
        if !line.contains("unsandboxed") {
            on_log(line);
        }
    })
    .map_err(|e| match e {
        // The usual cause is stale lists naming a version the archive no longer has (404).
        ImageError::CommandFailed { output_tail, .. } => ImageError::KernelUnresolvable {
            package: format!("{}={}", pkg.package, pkg.version),
            detail: format!("apt-get download failed: {output_tail}"),
        },
        other => other,
    })?;
    let downloaded = std::fs::read_dir(tmp.path())
        .ctx("read directory", tmp.path())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| ImageError::KernelLayout {
            package: pkg.package.clone(),
            detail: "apt-get download produced no .deb file".into(),
        })?;
    std::fs::rename(&downloaded, &deb).ctx("rename", &downloaded)?;
    Ok(deb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_metapackage_real_output_gives_package_and_version() {
        let show = "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\n\
                    Version: 6.1.192-2\nDepends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\n\
                    Description: Linux for x86-64 cloud (meta-package)\n";
        assert_eq!(
            parse_metapackage(show, KERNEL_METAPACKAGE),
            Some((
                "linux-image-6.1.0-56-cloud-amd64".into(),
                Some("6.1.192-2".into())
            ))
        );
    }

    #[test]
    fn parse_metapackage_unversioned_alternative() {
        let show = "Depends: foo, linux-image-6.12.1-cloud-amd64 | linux-image-x\n";
        assert_eq!(
            parse_metapackage(show, KERNEL_METAPACKAGE),
            Some(("linux-image-6.12.1-cloud-amd64".into(), None))
        );
    }

    #[test]
    fn parse_metapackage_without_depends_is_none() {
        assert_eq!(parse_metapackage("Package: x\n", KERNEL_METAPACKAGE), None);
    }

    #[test]
    fn parse_metapackage_generic_kernel_skips_its_own_name() {
        let show = "Package: linux-image-amd64\nVersion: 6.1.192-3\n\
                    Depends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)\n";
        assert_eq!(
            parse_metapackage(show, "linux-image-amd64"),
            Some((
                "linux-image-6.1.0-57-amd64".into(),
                Some("6.1.192-3".into())
            ))
        );
    }

    #[test]
    fn cache_key_keeps_cloud_versions_and_prefixes_other_flavours() {
        // The two flavours of one Debian kernel upload share its version: their
        // extractions must not share a directory.
        assert_eq!(cache_key("6.1.192-3", "6.1.0-57-cloud-amd64"), "6.1.192-3");
        assert_eq!(
            cache_key("6.1.192-3", "6.1.0-57-amd64"),
            "generic-6.1.192-3"
        );
    }

    fn fake_pkg() -> KernelPackage {
        KernelPackage {
            package: "linux-image-9.9.9-1-cloud-amd64".into(),
            version: "9.9.9-1".into(),
            release: "9.9.9-1-cloud-amd64".into(),
        }
    }

    #[test]
    fn ensure_package_cached_kernel_needs_no_tools() {
        let home = tempfile::tempdir().expect("tempdir");
        let pkg = fake_pkg();
        let k = cached(home.path(), &pkg);
        std::fs::create_dir_all(&k.modules_dir).expect("mkdir");
        std::fs::write(&k.vmlinuz, "kernel").expect("write");
        std::fs::write(k.modules_dir.join("modules.dep"), "").expect("write");
        let got = ensure_package(home.path(), &pkg, &mut |l| panic!("no work expected: {l}"))
            .expect("cached");
        assert_eq!(got, k);
    }

    #[test]
    fn ensure_package_extracts_deb_and_generates_modules_dep() {
        // A fake kernel .deb built with dpkg-deb, placed where a download would put it.
        let home = tempfile::tempdir().expect("tempdir");
        let pkg = fake_pkg();
        let src = home.path().join("src");
        let mdir = src.join("lib/modules/9.9.9-1-cloud-amd64/kernel/drivers/virtio");
        std::fs::create_dir_all(&mdir).expect("mkdir");
        std::fs::create_dir_all(src.join("boot")).expect("mkdir");
        std::fs::create_dir_all(src.join("DEBIAN")).expect("mkdir");
        std::fs::write(src.join("boot/vmlinuz-9.9.9-1-cloud-amd64"), "kernel").expect("write");
        let m = crate::elf::tests::fake_module;
        std::fs::write(mdir.join("virtio.ko"), m(b"depends=\0")).expect("write");
        std::fs::write(mdir.join("virtio_blk.ko"), m(b"depends=virtio\0")).expect("write");
        std::fs::write(
            src.join("DEBIAN/control"),
            "Package: linux-image-9.9.9-1-cloud-amd64\nVersion: 9.9.9-1\nArchitecture: amd64\n\
             Maintainer: kiln <kiln@localhost>\nDescription: test kernel\n",
        )
        .expect("write");
        let debs = home.path().join("cache/debs");
        std::fs::create_dir_all(&debs).expect("mkdir");
        let deb = debs.join("linux-image-9.9.9-1-cloud-amd64_9.9.9-1_amd64.deb");
        cmd::run_capture(
            Command::new("dpkg-deb")
                .args(["--root-owner-group", "-Znone", "-b"])
                .arg(&src)
                .arg(&deb),
        )
        .expect("dpkg-deb -b");

        let k = ensure_package(home.path(), &pkg, &mut |_| {}).expect("extract");
        assert_eq!(std::fs::read_to_string(&k.vmlinuz).expect("read"), "kernel");
        let dep = std::fs::read_to_string(k.modules_dir.join("modules.dep")).expect("read");
        assert!(
            dep.contains("kernel/drivers/virtio/virtio_blk.ko: kernel/drivers/virtio/virtio.ko"),
            "{dep}"
        );
        let names: Vec<String> = std::fs::read_dir(home.path().join("cache/kernel"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["9.9.9-1"], "temporary directory left behind");
    }

    #[test]
    fn parse_candidate_none_is_none() {
        let policy = "linux-image-x:\n  Installed: (none)\n  Candidate: (none)\n";
        assert_eq!(parse_candidate(policy), None);
        let policy = "linux-image-x:\n  Installed: (none)\n  Candidate: 6.1.192-2\n";
        assert_eq!(parse_candidate(policy), Some("6.1.192-2".into()));
    }
}
