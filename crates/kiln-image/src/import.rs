//! Imports: an OCI image (`oci-archive:`, `docker-archive:`, `oci:DIR[:TAG]`) or an existing
//! disk image (`qcow2:`, `raw:`) -> a kiln image booted by kiln's own kernel and agent.
//!
//! Stages (the last three are [`build`](crate::build)'s, shared through
//! `build::finish_stages`):
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

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::build::{self, BuildDir, BuildGuest, Stages};
use crate::error::{ImageError, IoContext};
use crate::fingerprint::{FingerprintInputs, sha256_file, short_id};
use crate::manifest::{ImageId, ImageManifest, MANIFEST_SCHEMA, ROOTFS_FILE};
use crate::recipe::{Base, Recipe, validate_name};
use crate::{BuildConfig, BuildEvent, cmd, kernel, publish, rootfs};

/// Number of stages an import reports.
const STAGES: u32 = 7;
/// Largest JSON document read from an OCI layout (index, manifest, config).
const MAX_OCI_JSON_BYTES: u64 = 4 << 20;
/// Largest `/etc/os-release` read from an image.
const MAX_OS_RELEASE_BYTES: u64 = 64 << 10;
/// The tag every source gets in the build directory's OCI layout.
const LAYOUT_TAG: &str = "kiln";
/// GPT partition type of a Linux x86-64 root file system (Discoverable Partitions Spec).
const GPT_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// File systems the guest kernel mounts as its root (ext4 is built into the cloud kernel and
/// serves ext2 and ext3 too).
const BOOTABLE_FS: [&str; 3] = ["ext4", "ext3", "ext2"];

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

fn bad(source: &str, reason: impl Into<String>) -> ImageError {
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

    /// What can be checked without reading much: the file (or layout directory) exists, and
    /// a disk image has the format named, with no backing file. Returns the disk's virtual
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
                disk_info(self, given)
            }
        }
    }
}

/// `qemu-img info` of a disk source: its virtual size; refuses a qcow2 that reads other
/// files (a backing file or an external data file would let an image read any host file).
fn disk_info(src: &ImportSource, given: &str) -> Result<u64, ImageError> {
    let format = match src {
        ImportSource::Qcow2(_) => "qcow2",
        _ => "raw",
    };
    let mut c = Command::new("qemu-img");
    c.args(["info", "--output=json", "-f", format])
        .arg(src.path());
    let out = cmd::run_capture(&mut c).map_err(|e| {
        bad(
            given,
            format!("not a {format} image: {}", crate::error_chain(&e)),
        )
    })?;
    let info: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|e| bad(given, format!("qemu-img info answered no JSON: {e}")))?;
    for key in ["backing-filename", "full-backing-filename"] {
        if let Some(b) = info.get(key) {
            return Err(bad(
                given,
                format!(
                    "the image has a backing file ({b}): import a flattened copy (qemu-img convert)"
                ),
            ));
        }
    }
    if info.pointer("/format-specific/data/data-file").is_some() {
        return Err(bad(given, "the image has an external data file"));
    }
    info.get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| bad(given, "qemu-img info gave no virtual size"))
}

/// The runtime part of an OCI image config (`config` in the config blob).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct OciRuntimeConfig {
    /// `KEY=VALUE` entries.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// Working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `user[:group]`.
    #[serde(default)]
    pub user: Option<String>,
    /// Entrypoint.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
}

impl OciRuntimeConfig {
    /// Sets `recipe`'s env, workdir, user, entrypoint and cmd from this config (Entrypoint
    /// and Cmd stay separate, so a command given replaces only Cmd). Env entries without
    /// `=` are dropped (Docker ignores them too).
    pub fn apply_to(&self, recipe: &mut Recipe) {
        recipe.env = self
            .env
            .iter()
            .flatten()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .filter(|(k, _)| !k.is_empty())
            .collect::<BTreeMap<_, _>>();
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        recipe.workdir = nonempty(&self.working_dir);
        recipe.user = nonempty(&self.user);
        recipe.entrypoint = self.entrypoint.clone().unwrap_or_default();
        recipe.cmd = self.cmd.clone().unwrap_or_default();
    }
}

/// Reads at most `max` bytes of `path`; more is an error naming the file.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ImageError> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .ctx("open", path)?
        .take(max + 1)
        .read_to_end(&mut buf)
        .ctx("read", path)?;
    if buf.len() as u64 > max {
        return Err(bad(
            &path.display().to_string(),
            format!("larger than {max} bytes"),
        ));
    }
    Ok(buf)
}

/// A blob of the layout `dir` by its `sha256:HEX` digest (checked before it becomes a path).
fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(dir.join("blobs/sha256").join(hex))
        }
        _ => Err(bad(
            &dir.display().to_string(),
            format!("unsupported blob digest {digest:?}"),
        )),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::Manifest {
        path: path.to_owned(),
        source,
    })
}

/// What [`read_layout`] finds: the manifest's digest, its layer count, the runtime config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutImage {
    /// `sha256:…` of the image manifest.
    pub digest: String,
    /// Number of layers.
    pub layers: usize,
    /// The config's runtime part.
    pub config: OciRuntimeConfig,
}

/// Reads the image tagged `tag` from the OCI layout `dir`: index.json -> manifest -> config.
pub fn read_layout(dir: &Path, tag: &str) -> Result<LayoutImage, ImageError> {
    #[derive(Deserialize)]
    struct Descriptor {
        digest: String,
        #[serde(default)]
        annotations: BTreeMap<String, String>,
    }
    #[derive(Deserialize)]
    struct Index {
        manifests: Vec<Descriptor>,
    }
    #[derive(Deserialize)]
    struct Manifest {
        config: Descriptor,
        #[serde(default)]
        layers: Vec<Descriptor>,
    }
    #[derive(Deserialize)]
    struct ConfigBlob {
        #[serde(default)]
        config: Option<OciRuntimeConfig>,
    }
    let index_path = dir.join("index.json");
    let index: Index = parse_json(&index_path, &read_bounded(&index_path, MAX_OCI_JSON_BYTES)?)?;
    let entry = index
        .manifests
        .iter()
        .find(|d| {
            d.annotations
                .get("org.opencontainers.image.ref.name")
                .is_some_and(|t| t == tag)
        })
        .ok_or_else(|| {
            bad(
                &dir.display().to_string(),
                format!("no image tagged {tag:?} in index.json"),
            )
        })?;
    let manifest_path = blob_path(dir, &entry.digest)?;
    let manifest: Manifest = parse_json(
        &manifest_path,
        &read_bounded(&manifest_path, MAX_OCI_JSON_BYTES)?,
    )?;
    let config_path = blob_path(dir, &manifest.config.digest)?;
    let config: ConfigBlob = parse_json(
        &config_path,
        &read_bounded(&config_path, MAX_OCI_JSON_BYTES)?,
    )?;
    Ok(LayoutImage {
        digest: entry.digest.clone(),
        layers: manifest.layers.len(),
        config: config.config.unwrap_or_default(),
    })
}

/// Adds what kiln's guests expect and an OCI image may lack: the mount points (the agent
/// creates missing ones itself, but a read-only parent would stop it) and the identity files
/// `rootfs::finish` writes for Debian images (`/etc/machine-id` empty, `/etc/hostname`,
/// `/etc/hosts`). Nothing that exists is changed, and nothing is written through a symlink
/// of the tree (which could point anywhere on the host).
pub fn add_boot_contract(tree: &Path) -> Result<Vec<String>, ImageError> {
    let mut added = Vec::new();
    let real_dir = |rel: &str| -> Result<bool, ImageError> {
        let p = tree.join(rel);
        match std::fs::symlink_metadata(&p) {
            Ok(m) => Ok(m.is_dir()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ImageError::io("stat", p, e)),
        }
    };
    for (rel, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("etc", 0o755),
    ] {
        let p = tree.join(rel);
        if std::fs::symlink_metadata(&p).is_ok() {
            continue;
        }
        std::fs::DirBuilder::new()
            .mode(mode)
            .create(&p)
            .ctx("create directory", &p)?;
        // The umask may have cleared bits (the sticky /tmp in particular).
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .ctx("chmod", &p)?;
        added.push(format!("/{rel}"));
    }
    if !real_dir("etc")? {
        return Ok(added);
    }
    for (rel, content) in [
        ("etc/machine-id", String::new()),
        ("etc/hostname", format!("{}\n", rootfs::GUEST_HOSTNAME)),
        (
            "etc/hosts",
            format!(
                "127.0.0.1\tlocalhost\n127.0.1.1\t{}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
                rootfs::GUEST_HOSTNAME
            ),
        ),
    ] {
        let p = tree.join(rel);
        // create_new (O_EXCL) fails on any existing entry, a dangling symlink included.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&p)
        {
            Ok(mut f) => {
                std::io::Write::write_all(&mut f, content.as_bytes()).ctx("write", &p)?;
                added.push(format!("/{rel}"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ImageError::io("create", p, e)),
        }
    }
    Ok(added)
}

/// One partition of `sfdisk --json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Partition {
    /// Device node (for a file: the file name and the partition number).
    pub node: String,
    /// First sector.
    pub start: u64,
    /// Sectors.
    pub size: u64,
    /// GPT type GUID or MBR type (hex).
    #[serde(rename = "type")]
    pub kind: String,
    /// GPT partition name.
    #[serde(default)]
    pub name: Option<String>,
}

/// `sfdisk --json`'s table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PartitionTable {
    /// `gpt` or `dos`.
    pub label: String,
    /// Bytes per sector (512 when sfdisk does not say).
    #[serde(default = "default_sector")]
    pub sectorsize: u64,
    /// The partitions.
    #[serde(default)]
    pub partitions: Vec<Partition>,
}

fn default_sector() -> u64 {
    512
}

/// Parses `sfdisk --json` output.
pub fn parse_sfdisk(json: &[u8]) -> Result<PartitionTable, serde_json::Error> {
    #[derive(Deserialize)]
    struct Top {
        partitiontable: PartitionTable,
    }
    serde_json::from_slice::<Top>(json).map(|t| t.partitiontable)
}

impl Partition {
    /// The partition number (the digits ending `node`).
    pub fn number(&self) -> &str {
        let digits = self
            .node
            .bytes()
            .rev()
            .take_while(u8::is_ascii_digit)
            .count();
        &self.node[self.node.len() - digits..]
    }

    /// Its type in words, for messages.
    pub fn describe_kind(&self) -> String {
        match self.kind.to_ascii_uppercase().as_str() {
            GPT_ROOT_X86_64 => "Linux root (x86-64)".to_owned(),
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4" | "83" => "Linux filesystem".to_owned(),
            "21686148-6449-6E6F-744E-656564454649" => "BIOS boot".to_owned(),
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" | "EF" => "EFI system".to_owned(),
            "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" | "82" => "Linux swap".to_owned(),
            other => format!("type {other}"),
        }
    }
}

/// Picks the root file system among `parts` (each with the file system type blkid found, if
/// any): the partition with the Linux root x86-64 GPT type, else the largest ext2/3/4 one.
/// The error names every partition and what was in it.
pub fn choose_partition(
    parts: &[(Partition, Option<String>)],
    sector: u64,
) -> Result<usize, String> {
    if let Some(i) = parts
        .iter()
        .position(|(p, _)| p.kind.eq_ignore_ascii_case(GPT_ROOT_X86_64))
    {
        return match &parts[i].1 {
            Some(fs) if BOOTABLE_FS.contains(&fs.as_str()) => Ok(i),
            found => Err(format!(
                "the Linux root partition {} holds {}: only ext2/3/4 root file systems can be booted",
                parts[i].0.number(),
                found.as_deref().unwrap_or("no file system blkid knows")
            )),
        };
    }
    parts
        .iter()
        .enumerate()
        .filter(|(_, (_, fs))| fs.as_deref().is_some_and(|f| BOOTABLE_FS.contains(&f)))
        .max_by_key(|(_, (p, _))| p.size)
        .map(|(i, _)| i)
        .ok_or_else(|| {
            let found: Vec<String> = parts
                .iter()
                .map(|(p, fs)| {
                    format!(
                        "{} ({}, {}, {})",
                        p.number(),
                        p.describe_kind(),
                        human(p.size * sector),
                        fs.as_deref().unwrap_or("no file system")
                    )
                })
                .collect();
            format!(
                "no ext2/3/4 root file system found (partitions: {})",
                if found.is_empty() {
                    "none".to_owned()
                } else {
                    found.join("; ")
                }
            )
        })
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    }
}

/// The file system type blkid finds at `offset` (`size` bytes) of `path`, if any.
fn probe_fs(path: &Path, offset: u64, size: Option<u64>) -> Result<Option<String>, ImageError> {
    let mut c = Command::new("blkid");
    c.args(["-p", "-o", "export", "-O", &offset.to_string()]);
    if let Some(size) = size {
        c.args(["-S", &size.to_string()]);
    }
    c.arg(path);
    let out = match c.stdin(Stdio::null()).output() {
        Ok(o) => o,
        Err(source) => {
            return Err(ImageError::Spawn {
                command: cmd::display(&c),
                source,
            });
        }
    };
    // blkid exits 2 when it finds nothing.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("TYPE="))
        .map(str::to_owned))
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
    let kpkg = kernel::resolve_kernel()?;
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
        build::boot_files(&kernel, &cfg.agent_binary, tmp, on_event)?;

        // 4. The root file system.
        stages.begin(on_event, 4, "unpack");
        let mut recipe = Recipe::debian(&name, "");
        let rootfs_path = tmp.join(ROOTFS_FILE);
        let mut origin = match &disk_digest {
            None => unpack_oci(&src, given, tmp, &rootfs_path, &mut recipe, on_event)?,
            Some(digest) => extract_disk(&src, given, digest, tmp, &rootfs_path, on_event)?,
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

/// OCI sources: skopeo normalizes to a layout in `tmp`, umoci unpacks it, mkfs.ext4 packs
/// the tree. Sets `recipe`'s runtime settings from the image config.
fn unpack_oci(
    src: &ImportSource,
    given: &str,
    tmp: &Path,
    rootfs_path: &Path,
    recipe: &mut Recipe,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<ImportOrigin, ImageError> {
    let layout = tmp.join("oci");
    let mut log = |line: &str| on_event(BuildEvent::Log(line.to_owned()));
    let mut copy = Command::new("skopeo");
    // The sources are local files the user names: there are no signatures to check, and a
    // host without /etc/containers/policy.json would otherwise refuse every copy.
    copy.args(["--insecure-policy", "copy", "--quiet"])
        .arg(src.skopeo_ref())
        .arg(format!("oci:{}:{LAYOUT_TAG}", layout.display()));
    cmd::run_streaming(copy, &mut log)?;
    let image = read_layout(&layout, LAYOUT_TAG)?;
    image.config.apply_to(recipe);
    log(&format!(
        "{} {} layer(s); env {}, workdir {}, user {}, entrypoint {:?}, cmd {:?}",
        image.digest,
        image.layers,
        recipe.env.len(),
        recipe.workdir.as_deref().unwrap_or("/"),
        recipe.user.as_deref().unwrap_or("root"),
        recipe.entrypoint,
        recipe.cmd
    ));
    let bundle = tmp.join("bundle");
    let mut unpack = Command::new("umoci");
    unpack
        .args(["unpack", "--image"])
        .arg(format!("{}:{LAYOUT_TAG}", layout.display()))
        .arg(&bundle);
    cmd::run_streaming(unpack, &mut log)?;
    publish::safe_remove(&layout)?;
    let tree = bundle.join("rootfs");
    let added = add_boot_contract(&tree)?;
    if !added.is_empty() {
        log(&format!("added for kiln's guests: {}", added.join(" ")));
    }
    let uuid = rootfs::uuid_from_fingerprint(&image.digest.replace("sha256:", ""));
    let size = rootfs::pack_ext4(&tree, rootfs_path, &uuid, None, &mut log)?;
    publish::safe_remove(&bundle)?;
    Ok(ImportOrigin {
        source: given.to_owned(),
        digest: image.digest,
        os_release: None,
        filesystem: "ext4".to_owned(),
        partition: None,
        size_bytes: size,
    })
}

/// Disk sources: the root file system's bytes, copied sparsely from the (converted) disk.
fn extract_disk(
    src: &ImportSource,
    given: &str,
    digest: &str,
    tmp: &Path,
    rootfs_path: &Path,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<ImportOrigin, ImageError> {
    let mut log = |line: &str| on_event(BuildEvent::Log(line.to_owned()));
    let raw = match src {
        ImportSource::Qcow2(path) => {
            let raw = tmp.join("disk.raw");
            let mut c = Command::new("qemu-img");
            c.args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(path)
                .arg(&raw);
            cmd::run_streaming(c, &mut log)?;
            raw
        }
        // Only read: sfdisk --json, blkid and dd open it read-only.
        _ => src.path().to_owned(),
    };
    let mut c = Command::new("sfdisk");
    c.arg("--json").arg(&raw);
    let table = cmd::run_capture(&mut c)
        .ok()
        .and_then(|out| parse_sfdisk(&out).ok());
    let (offset, size, filesystem, partition) = match table {
        Some(table) if !table.partitions.is_empty() => {
            let sector = table.sectorsize.max(512);
            let mut parts = Vec::new();
            for p in table.partitions {
                let fs = probe_fs(&raw, p.start * sector, Some(p.size * sector))?;
                parts.push((p, fs));
            }
            let i = choose_partition(&parts, sector).map_err(|why| bad(given, why))?;
            let (p, fs) = &parts[i];
            let desc = format!(
                "{} ({}, {})",
                p.number(),
                p.describe_kind(),
                human(p.size * sector)
            );
            log(&format!(
                "{} partition table; root: partition {desc}",
                table.label
            ));
            (
                p.start * sector,
                p.size * sector,
                fs.clone().unwrap_or_default(),
                Some(desc),
            )
        }
        _ => {
            let len = std::fs::metadata(&raw).ctx("stat", &raw)?.len();
            match probe_fs(&raw, 0, None)? {
                Some(fs) if BOOTABLE_FS.contains(&fs.as_str()) => (0, len, fs, None),
                found => {
                    return Err(bad(
                        given,
                        format!(
                            "no partition table and no ext2/3/4 file system (found {})",
                            found.as_deref().unwrap_or("nothing blkid knows")
                        ),
                    ));
                }
            }
        }
    };
    let mut dd = Command::new("dd");
    dd.arg(format!("if={}", raw.display()))
        .arg(format!("of={}", rootfs_path.display()))
        .args([
            "bs=1M",
            "iflag=skip_bytes,count_bytes",
            "conv=sparse,excl",
            "status=none",
        ])
        .arg(format!("skip={offset}"))
        .arg(format!("count={size}"));
    cmd::run_streaming(dd, &mut log)?;
    // conv=sparse leaves a trailing hole unwritten: give the file its full length.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(rootfs_path)
        .ctx("open", rootfs_path)?;
    f.set_len(size).ctx("resize", rootfs_path)?;
    f.sync_all().ctx("sync", rootfs_path)?;
    if raw.starts_with(tmp) {
        std::fs::remove_file(&raw).ctx("remove", &raw)?;
    }
    Ok(ImportOrigin {
        source: given.to_owned(),
        digest: digest.to_owned(),
        os_release: None,
        filesystem,
        partition,
        size_bytes: size,
    })
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
    fn config_maps_env_workdir_user_entrypoint_cmd() {
        let blob = br#"{"Env":["PATH=/bin:/usr/bin","GREETING=hi=there","BROKEN"],
            "WorkingDir":"/srv","User":"1000:1000","Entrypoint":["/bin/sh","-c"],
            "Cmd":["echo $GREETING"]}"#;
        let cfg: OciRuntimeConfig = serde_json::from_slice(blob).expect("parse");
        let mut r = Recipe::debian("x", "");
        cfg.apply_to(&mut r);
        assert_eq!(r.env["PATH"], "/bin:/usr/bin");
        assert_eq!(r.env["GREETING"], "hi=there");
        assert_eq!(r.env.len(), 2);
        assert_eq!(r.workdir.as_deref(), Some("/srv"));
        assert_eq!(r.user.as_deref(), Some("1000:1000"));
        assert_eq!(r.entrypoint, ["/bin/sh", "-c"]);
        assert_eq!(r.cmd, ["echo $GREETING"]);
        assert_eq!(r.default_argv(&["ls".to_owned()]), ["/bin/sh", "-c", "ls"]);
        let empty: OciRuntimeConfig =
            serde_json::from_slice(br#"{"WorkingDir":"","User":"","Cmd":null}"#).expect("parse");
        empty.apply_to(&mut r);
        assert!(r.workdir.is_none() && r.user.is_none() && r.cmd.is_empty());
        assert!(r.env.is_empty() && r.entrypoint.is_empty());
    }

    fn write_blob(dir: &Path, bytes: &[u8]) -> String {
        use sha2::Digest;
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("mkdir");
        std::fs::write(dir.join("blobs/sha256").join(&hex), bytes).expect("write");
        format!("sha256:{hex}")
    }

    #[test]
    fn read_layout_follows_index_manifest_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let config = write_blob(d, br#"{"config":{"Cmd":["/bin/app"],"Env":["A=1"]}}"#);
        let manifest = write_blob(
            d,
            format!(r#"{{"config":{{"digest":"{config}"}},"layers":[{{"digest":"sha256:{}"}},{{"digest":"sha256:{}"}}]}}"#, "a".repeat(64), "b".repeat(64)).as_bytes(),
        );
        std::fs::write(
            d.join("index.json"),
            format!(r#"{{"manifests":[{{"digest":"{manifest}","annotations":{{"org.opencontainers.image.ref.name":"kiln"}}}}]}}"#),
        )
        .expect("write");
        let img = read_layout(d, "kiln").expect("layout");
        assert_eq!(img.digest, manifest);
        assert_eq!(img.layers, 2);
        assert_eq!(
            img.config.cmd.as_deref(),
            Some(&["/bin/app".to_owned()][..])
        );
        let err = read_layout(d, "other").expect_err("no such tag");
        assert!(err.to_string().contains("\"other\""), "{err}");
        // A digest that would escape the layout never becomes a path.
        std::fs::write(
            d.join("index.json"),
            r#"{"manifests":[{"digest":"sha256:../../etc/passwd","annotations":{"org.opencontainers.image.ref.name":"kiln"}}]}"#,
        )
        .expect("write");
        let err = read_layout(d, "kiln").expect_err("bad digest");
        assert!(err.to_string().contains("unsupported blob digest"), "{err}");
        // An oversized document is refused before it is parsed.
        let big = vec![b' '; (MAX_OCI_JSON_BYTES + 1) as usize];
        std::fs::write(d.join("index.json"), big).expect("write");
        let err = read_layout(d, "kiln").expect_err("too big");
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn boot_contract_adds_missing_and_never_follows_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("rootfs");
        std::fs::create_dir(&tree).expect("mkdir");
        let added = add_boot_contract(&tree).expect("add");
        for p in ["/proc", "/tmp", "/etc", "/etc/machine-id", "/etc/hostname"] {
            assert!(added.iter().any(|a| a == p), "{p} not in {added:?}");
        }
        use std::os::unix::fs::PermissionsExt;
        let tmp_mode = std::fs::metadata(tree.join("tmp"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(tmp_mode & 0o7777, 0o1777);
        assert_eq!(
            std::fs::read(tree.join("etc/machine-id")).expect("read"),
            b""
        );
        // A second run adds nothing; an /etc that is a symlink out of the tree is left alone.
        assert!(add_boot_contract(&tree).expect("again").is_empty());
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        let tree2 = dir.path().join("rootfs2");
        std::fs::create_dir(&tree2).expect("mkdir");
        std::os::unix::fs::symlink(&outside, tree2.join("etc")).expect("symlink");
        add_boot_contract(&tree2).expect("add");
        assert_eq!(std::fs::read_dir(&outside).expect("readdir").count(), 0);
    }

    const GPT: &str = r#"{"partitiontable":{"label":"gpt","id":"X","device":"d.raw","unit":"sectors",
        "firstlba":34,"lastlba":409566,"sectorsize":512,"partitions":[
        {"node":"d.raw1","start":2048,"size":2048,"type":"21686148-6449-6E6F-744E-656564454649","uuid":"A","name":"bios"},
        {"node":"d.raw2","start":4096,"size":8192,"type":"0FC63DAF-8483-4772-8E79-3D69D8477DE4","uuid":"B"},
        {"node":"d.raw14","start":12288,"size":397279,"type":"4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709","uuid":"C","name":"root"}]}}"#;

    #[test]
    fn choose_partition_prefers_gpt_root_type() {
        let t = parse_sfdisk(GPT.as_bytes()).expect("parse");
        assert_eq!(t.label, "gpt");
        assert_eq!(t.partitions[2].number(), "14");
        let with = |fs: [Option<&str>; 3]| -> Vec<(Partition, Option<String>)> {
            t.partitions
                .iter()
                .cloned()
                .zip(fs.map(|f| f.map(str::to_owned)))
                .collect()
        };
        assert_eq!(
            choose_partition(&with([None, Some("ext4"), Some("ext4")]), 512),
            Ok(2)
        );
        // A root partition of another file system is named, not skipped.
        let err =
            choose_partition(&with([None, Some("ext4"), Some("xfs")]), 512).expect_err("xfs root");
        assert!(err.contains("holds xfs"), "{err}");
    }

    #[test]
    fn choose_partition_else_largest_ext_and_names_what_was_found() {
        let dos = r#"{"partitiontable":{"label":"dos","id":"0x1","device":"d.raw","unit":"sectors",
            "partitions":[{"node":"d.raw1","start":2048,"size":4096,"type":"83"},
            {"node":"d.raw2","start":8192,"size":90000,"type":"83"},
            {"node":"d.raw3","start":98192,"size":1000,"type":"82"}]}}"#;
        let t = parse_sfdisk(dos.as_bytes()).expect("parse");
        assert_eq!(t.sectorsize, 512);
        let parts: Vec<_> = t
            .partitions
            .iter()
            .cloned()
            .zip([Some("ext2".to_owned()), Some("ext4".to_owned()), None])
            .collect();
        assert_eq!(choose_partition(&parts, 512), Ok(1));
        let none: Vec<_> = t
            .partitions
            .iter()
            .cloned()
            .zip([Some("btrfs".to_owned()), None, Some("swap".to_owned())])
            .collect();
        let err = choose_partition(&none, 512).expect_err("no ext");
        assert!(err.contains("no ext2/3/4 root file system"), "{err}");
        assert!(
            err.contains("1 (Linux filesystem, 2.0 MiB, btrfs)"),
            "{err}"
        );
        assert!(err.contains("3 (Linux swap"), "{err}");
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
