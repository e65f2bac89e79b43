//! Imports: an OCI image (`oci-archive:`, `docker-archive:`, `oci:DIR[:TAG]`) or an existing
//! disk image (`qcow2:`, `raw:`) -> a kiln image booted by kiln's own kernel and agent.
//!
//! The container side lives in `oci.rs`, the disk side in `disk.rs`. Stages (the last three
//! are [`build`](crate::build)'s, shared through `build::finish_stages`):
//!
//! ```text
//! 1 resolve    source parsed and checked (disk images: format, no backing file, sha256),
//!              agent checked static + hashed, kernel resolved (apt-cache)
//! 2 kernel     download + extract into cache/kernel/<version>/ (once per version)
//! 3 initramfs  modules closure + agent -> initramfs.cpio
//! 4 unpack     OCI: skopeo copy SRC oci:TMP:kiln (all three kinds become one OCI layout),
//!              config read from index.json -> manifest -> config blob, umoci unpack (layers
//!              and whiteouts applied, ownership kept), boot-contract files added,
//!              mkfs.ext4 -d. Disk: qemu-img convert to raw (qcow2), sfdisk --json, the root
//!              partition's bytes copied sparsely into rootfs.ext4; ext2/3/4 only.
//!              Both: os-release read with debugfs, the origin recorded
//! 5 compact    e2fsck -E discard
//! 6 self-test  a fresh guest: the agent answers (BuildGuest::self_test)
//! 7 publish    rootfs sha256, manifest.json (with the origin), files sealed, atomic swap
//! ```
//!
//! Invariants: the user's source is only ever read (qemu-img, sfdisk, blkid and dd read it;
//! every write goes to the build directory `images/.tmp-<name>-<pid>/`, which any failure
//! removes, under the name's lock). Inputs are hostile: JSON documents of the OCI layout are
//! read with a size cap and blob digests are checked before they become paths; layer paths
//! are umoci's to confine; files added to an unpacked tree never follow the tree's symlinks;
//! a qcow2 with a backing or external data file is refused (it would read host files);
//! tool output read back (debugfs) is capped. The agent needs nothing from the image: it is
//! static, creates its mount points itself (`bins/kiln-agent/src/init.rs`), and only writes
//! `/etc/machine-id`, which the importer provides with the other identity files of
//! `rootfs::finish` when an OCI image lacks them. Disk images are not changed.

mod disk;
mod oci;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::build::{self, BuildDir, BuildGuest, Stages};
use crate::error::{ImageError, IoContext};
use crate::fingerprint::{FingerprintInputs, sha256_file, short_id};
use crate::manifest::{ImageId, ImageManifest, MANIFEST_SCHEMA, ROOTFS_FILE};
use crate::recipe::{Base, Recipe, validate_name};
use crate::{BuildConfig, BuildEvent, cmd, kernel, publish};

pub use oci::OciRuntimeConfig;

/// Number of stages an import reports.
const STAGES: u32 = 7;
/// Largest `/etc/os-release` read from an image.
const MAX_OS_RELEASE_BYTES: u64 = 64 << 10;

/// What `kiln image import SRC` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportSource {
    /// `oci-archive:PATH`: a tar of an OCI layout.
    OciArchive(PathBuf),
    /// `docker-archive:PATH`: what `docker save` / `podman save` write.
    DockerArchive(PathBuf),
    /// `oci:DIR[:TAG]`: an OCI layout directory.
    OciLayout {
        /// The layout directory.
        dir: PathBuf,
        /// The image's `org.opencontainers.image.ref.name`, when the layout holds several.
        tag: Option<String>,
    },
    /// `qcow2:PATH`: a disk image (e.g. a cloud image).
    Qcow2(PathBuf),
    /// `raw:PATH`: a raw disk image or a bare file system.
    Raw(PathBuf),
}

/// Where an imported image came from and what was found in it (the manifest's `origin`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportOrigin {
    /// The source as given, e.g. `qcow2:/srv/debian-12.qcow2`.
    pub source: String,
    /// `sha256:…` of the OCI manifest, or of the disk image file.
    pub digest: String,
    /// `PRETTY_NAME` of the image's `/etc/os-release`, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_release: Option<String>,
    /// The root file system's type as found (`ext4`, ...); OCI images are packed as ext4.
    pub filesystem: String,
    /// The partition the root file system came from (disk images with a partition table),
    /// e.g. `1 (Linux root (x86-64), 2.0 GiB)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Size of the root file system as found (bytes).
    pub size_bytes: u64,
}

pub(crate) fn bad(source: &str, reason: impl Into<String>) -> ImageError {
    ImageError::BadImport {
        input: source.to_owned(),
        reason: reason.into(),
    }
}

impl ImportSource {
    /// Parses `SCHEME:PATH`; the path must be absolute (the daemon resolves nothing against
    /// its own working directory).
    pub fn parse(s: &str) -> Result<ImportSource, ImageError> {
        let (scheme, rest) = s.split_once(':').ok_or_else(|| {
            bad(
                s,
                "expected SCHEME:PATH with SCHEME one of oci-archive, docker-archive, oci, qcow2, raw",
            )
        })?;
        if rest.is_empty() {
            return Err(bad(s, "no path after the scheme"));
        }
        let path = |p: &str| -> Result<PathBuf, ImageError> {
            let path = PathBuf::from(p);
            if !path.is_absolute() {
                return Err(bad(s, format!("path {p} must be absolute")));
            }
            Ok(path)
        };
        Ok(match scheme {
            "oci-archive" => ImportSource::OciArchive(path(rest)?),
            "docker-archive" => ImportSource::DockerArchive(path(rest)?),
            "oci" => {
                // The tag follows the last ':' after the last '/': `oci:/a/b:v1`.
                let last = rest.rsplit('/').next().unwrap_or(rest);
                match last.rsplit_once(':') {
                    Some((_, tag)) => {
                        let dir = &rest[..rest.len() - tag.len() - 1];
                        if tag.is_empty() {
                            return Err(bad(s, "empty tag after ':'"));
                        }
                        ImportSource::OciLayout {
                            dir: path(dir)?,
                            tag: Some(tag.to_owned()),
                        }
                    }
                    None => ImportSource::OciLayout {
                        dir: path(rest)?,
                        tag: None,
                    },
                }
            }
            "qcow2" => ImportSource::Qcow2(path(rest)?),
            "raw" => ImportSource::Raw(path(rest)?),
            other => {
                return Err(bad(
                    s,
                    format!(
                        "unknown scheme {other:?} (known: oci-archive, docker-archive, oci, qcow2, raw)"
                    ),
                ));
            }
        })
    }

    /// The file or directory read.
    pub fn path(&self) -> &Path {
        match self {
            ImportSource::OciArchive(p)
            | ImportSource::DockerArchive(p)
            | ImportSource::Qcow2(p)
            | ImportSource::Raw(p) => p,
            ImportSource::OciLayout { dir, .. } => dir,
        }
    }

    /// Whether this is a container image (as opposed to a disk image).
    pub fn is_oci(&self) -> bool {
        !matches!(self, ImportSource::Qcow2(_) | ImportSource::Raw(_))
    }

    /// The source as skopeo names it.
    fn skopeo_ref(&self) -> String {
        match self {
            ImportSource::OciArchive(p) => format!("oci-archive:{}", p.display()),
            ImportSource::DockerArchive(p) => format!("docker-archive:{}", p.display()),
            ImportSource::OciLayout { dir, tag } => match tag {
                Some(t) => format!("oci:{}:{t}", dir.display()),
                None => format!("oci:{}", dir.display()),
            },
            ImportSource::Qcow2(p) | ImportSource::Raw(p) => p.display().to_string(),
        }
    }

    /// The image name when none is given: for container images the last path component
    /// without its extension, lowercased; disk images have none (their file names are
    /// rarely names: `debian-12-genericcloud-amd64-20241125-1942.qcow2`).
    pub fn default_name(&self) -> Option<String> {
        if !self.is_oci() {
            return None;
        }
        let file = self.path().file_name()?.to_str()?;
        let stem = file
            .strip_suffix(".tar.gz")
            .or_else(|| file.rsplit_once('.').map(|(stem, _)| stem))
            .unwrap_or(file)
            .to_ascii_lowercase();
        validate_name(&stem).ok().map(|()| stem)
    }

    /// What can be checked without reading much: the file (or layout directory) exists, a
    /// disk image has the format named, with no backing file, and a raw disk has an ext2/3/4
    /// root file system (a qcow2 must be converted first: found by the import). Returns the disk's virtual
    /// size (0 for container images).
    pub fn check(&self, given: &str) -> Result<u64, ImageError> {
        let p = self.path();
        let meta = std::fs::metadata(p)
            .map_err(|e| bad(given, format!("cannot read {}: {e}", p.display())))?;
        match self {
            ImportSource::OciLayout { .. } => {
                if !meta.is_dir() || !p.join("index.json").is_file() {
                    return Err(bad(
                        given,
                        format!("{} is not an OCI layout (no index.json)", p.display()),
                    ));
                }
                Ok(0)
            }
            ImportSource::OciArchive(_) | ImportSource::DockerArchive(_) => {
                if !meta.is_file() {
                    return Err(bad(given, format!("{} is not a file", p.display())));
                }
                Ok(0)
            }
            ImportSource::Qcow2(_) | ImportSource::Raw(_) => {
                if !meta.is_file() {
                    return Err(bad(given, format!("{} is not a file", p.display())));
                }
                let size = disk::disk_info(self, given)?;
                if let ImportSource::Raw(path) = self {
                    // A raw disk is read in place: finding its root costs a few reads.
                    disk::find_root(path, given)?;
                }
                Ok(size)
            }
        }
    }
}

pub(crate) fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    }
}

/// Parses `PRETTY_NAME` out of an os-release file (quotes and backslash escapes removed).
pub fn parse_os_release(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let value = line.trim().strip_prefix("PRETTY_NAME=")?;
        let unquoted = match value.as_bytes().first() {
            Some(q @ (b'"' | b'\'')) => value
                .strip_prefix(*q as char)?
                .strip_suffix(*q as char)
                .unwrap_or(&value[1..]),
            _ => value,
        };
        let mut out = String::new();
        let mut chars = unquoted.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            } else {
                out.push(c);
            }
        }
        Some(out).filter(|s| !s.is_empty())
    })
}

/// `PRETTY_NAME` of the ext4 image `fs`: `/etc/os-release`, or `/usr/lib/os-release` where
/// that is a symlink to it (debugfs does not follow a final symlink). Reads at most
/// [`MAX_OS_RELEASE_BYTES`].
fn os_release_of(fs: &Path) -> Result<Option<String>, ImageError> {
    for file in ["/etc/os-release", "/usr/lib/os-release"] {
        let mut c = Command::new("debugfs");
        c.args(["-R", &format!("cat {file}")]).arg(fs);
        let command = cmd::display(&c);
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| ImageError::Spawn {
                command: command.clone(),
                source,
            })?;
        let mut text = Vec::new();
        if let Some(out) = child.stdout.take() {
            out.take(MAX_OS_RELEASE_BYTES)
                .read_to_end(&mut text)
                .ctx("read the output of", &command)?;
        }
        // Whatever is left unread is not wanted.
        let _ = child.kill();
        let _ = child.wait();
        if let Some(name) = parse_os_release(&String::from_utf8_lossy(&text)) {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Imports `given` (`SCHEME:PATH`) as image `name` (or the source's default name),
/// replacing an image of that name atomically. Blocking; progress through `on_event`.
pub fn import(
    cfg: &BuildConfig,
    given: &str,
    name: Option<&str>,
    guest: &mut dyn BuildGuest,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<ImageManifest, ImageError> {
    let src = ImportSource::parse(given)?;
    let name = resolve_name(&src, given, name)?;
    let mut stages = Stages::new(&name, STAGES);

    // 1. Inputs.
    stages.begin(on_event, 1, "resolve");
    let virtual_size = src.check(given)?;
    let agent_sha256 = build::check_agent(cfg)?;
    let disk_digest = if src.is_oci() {
        None
    } else {
        on_event(BuildEvent::Log(format!(
            "disk image {} ({} virtual): hashing it",
            src.path().display(),
            human(virtual_size)
        )));
        Some(format!("sha256:{}", sha256_file(src.path())?))
    };
    let kpkg = kernel::resolve_kernel(crate::recipe::KernelFlavour::Cloud)?;
    on_event(BuildEvent::Log(format!(
        "importing {given} as {name}; kernel {} {}",
        kpkg.package, kpkg.version
    )));
    if !rustix::process::geteuid().is_root() {
        return Err(ImageError::NotRoot);
    }
    let (images, _lock, _caches) = build::lock_for_build(&cfg.home, &name, on_event)?;
    if let Some(existing) = build::get(&cfg.home, &name)? {
        on_event(BuildEvent::Log(format!(
            "replacing image {} ({})",
            existing.name, existing.id
        )));
    }

    // 2. Kernel.
    stages.begin(on_event, 2, "kernel");
    let kernel = kernel::ensure_package(&cfg.home, &kpkg, &mut |line| {
        on_event(BuildEvent::Log(line.to_owned()));
    })?;

    let dest = images.join(&name);
    let manifest = publish::build_atomically(&dest, &name, |tmp| {
        // 3. Initramfs.
        stages.begin(on_event, 3, "initramfs");
        build::boot_files(&kernel, &[], &cfg.agent_binary, tmp, on_event)?;

        // 4. The root file system.
        stages.begin(on_event, 4, "unpack");
        let mut recipe = Recipe::debian(&name, "");
        let rootfs_path = tmp.join(ROOTFS_FILE);
        let mut origin = match &disk_digest {
            None => oci::unpack(&src, given, tmp, &rootfs_path, &mut recipe, on_event)?,
            Some(digest) => disk::extract(&src, given, digest, tmp, &rootfs_path, on_event)?,
        };
        origin.os_release = os_release_of(&rootfs_path)?;
        on_event(BuildEvent::Log(format!(
            "found {}: {} file system, {}{}",
            origin.os_release.as_deref().unwrap_or("no /etc/os-release"),
            origin.filesystem,
            human(origin.size_bytes),
            origin
                .partition
                .as_deref()
                .map(|p| format!(", partition {p}"))
                .unwrap_or_default()
        )));
        recipe.from = Base::Import {
            source: given.to_owned(),
            digest: origin.digest.clone(),
        };
        let inputs = FingerprintInputs::new(&recipe, "", &kernel.version, &agent_sha256, "", "");
        let fingerprint = inputs.fingerprint();
        let dir = BuildDir::create(tmp)?;

        // 5-7. Compaction, self-test, publish.
        let manifest = ImageManifest {
            schema: MANIFEST_SCHEMA,
            id: ImageId(short_id(&fingerprint)),
            name: name.clone(),
            recipe,
            fingerprint,
            inputs,
            kernel_version: kernel.version.clone(),
            kernel_release: kernel.release.clone(),
            created_unix: 0,
            files: Vec::new(),
            rootfs_sha256: None,
            recipe_path: None,
            origin: Some(origin),
        };
        build::finish_stages(&dir, guest, &mut stages, 5, manifest, on_event)
    })?;
    stages.finish(on_event);
    on_event(BuildEvent::Log(format!(
        "imported image {} ({})",
        manifest.name, manifest.id
    )));
    Ok(manifest)
}

/// The image name: `name`, else the source's default; validated.
pub fn resolve_name(
    src: &ImportSource,
    given: &str,
    name: Option<&str>,
) -> Result<String, ImageError> {
    match name {
        Some(n) => {
            validate_name(n)?;
            Ok(n.to_owned())
        }
        None => src.default_name().ok_or_else(|| {
            bad(
                given,
                if src.is_oci() {
                    "cannot derive an image name from the file name: give one (--name)"
                } else {
                    "a disk image needs an image name (--name)"
                },
            )
        }),
    }
}

/// Checks `given` as far as that is cheap (before a stream starts): the scheme, the path, a
/// disk image's format and backing file, the name. Returns the image name.
pub fn check_import(given: &str, name: Option<&str>) -> Result<String, ImageError> {
    let src = ImportSource::parse(given)?;
    let name = resolve_name(&src, given, name)?;
    src.check(given)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sources_by_scheme() {
        assert_eq!(
            ImportSource::parse("oci-archive:/a/app.tar").expect("ok"),
            ImportSource::OciArchive("/a/app.tar".into())
        );
        assert_eq!(
            ImportSource::parse("docker-archive:/a/app.tar").expect("ok"),
            ImportSource::DockerArchive("/a/app.tar".into())
        );
        assert_eq!(
            ImportSource::parse("oci:/a/lay:v1").expect("ok"),
            ImportSource::OciLayout {
                dir: "/a/lay".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImportSource::parse("oci:/a:b/lay").expect("ok"),
            ImportSource::OciLayout {
                dir: "/a:b/lay".into(),
                tag: None
            }
        );
        assert_eq!(
            ImportSource::parse("qcow2:/d/x.qcow2").expect("ok"),
            ImportSource::Qcow2("/d/x.qcow2".into())
        );
        assert_eq!(
            ImportSource::parse("raw:/d/x.img").expect("ok"),
            ImportSource::Raw("/d/x.img".into())
        );
        for (bad_src, why) in [
            ("docker://alpine", "unknown scheme \"docker\""),
            ("/a/app.tar", "expected SCHEME:PATH"),
            ("qcow2:rel/x.qcow2", "must be absolute"),
            ("raw:", "no path"),
            ("oci:/a/lay:", "empty tag"),
        ] {
            let err = ImportSource::parse(bad_src).expect_err(bad_src);
            assert!(err.to_string().contains(why), "{bad_src}: {err}");
        }
    }

    #[test]
    fn default_name_from_file_for_oci_only() {
        let name = |s: &str| {
            let src = ImportSource::parse(s).expect("parse");
            resolve_name(&src, s, None)
        };
        assert_eq!(name("oci-archive:/x/My-App.tar").expect("name"), "my-app");
        assert_eq!(name("docker-archive:/x/web.tar.gz").expect("name"), "web");
        assert_eq!(name("oci:/x/layout:v2").expect("name"), "layout");
        let err = name("qcow2:/x/debian.qcow2").expect_err("disk");
        assert!(err.to_string().contains("--name"), "{err}");
        let err = name("oci-archive:/x/_bad.tar").expect_err("bad name");
        assert!(err.to_string().contains("--name"), "{err}");
        let src = ImportSource::parse("raw:/x/d.img").expect("parse");
        assert_eq!(resolve_name(&src, "", Some("deb")).expect("given"), "deb");
        assert!(resolve_name(&src, "", Some("../x")).is_err());
    }

    #[test]
    fn check_missing_file_is_bad_import() {
        let err = check_import("oci-archive:/nonexistent/kiln/app.tar", None).expect_err("missing");
        assert!(matches!(err, ImageError::BadImport { .. }), "{err:?}");
        assert!(
            err.to_string().contains("/nonexistent/kiln/app.tar"),
            "{err}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let src = format!("oci:{}", dir.path().display());
        let err = check_import(&src, Some("x")).expect_err("no index");
        assert!(err.to_string().contains("index.json"), "{err}");
    }

    #[test]
    fn os_release_pretty_name_unquoted() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n";
        assert_eq!(
            parse_os_release(text).as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(
            parse_os_release("PRETTY_NAME='Kiln \\\"Test\\\" OS'\n").as_deref(),
            Some("Kiln \"Test\" OS")
        );
        assert_eq!(
            parse_os_release("PRETTY_NAME=Plain\n").as_deref(),
            Some("Plain")
        );
        assert_eq!(parse_os_release("ID=x\n"), None);
        assert_eq!(parse_os_release("PRETTY_NAME=\"\"\n"), None);
    }
}
