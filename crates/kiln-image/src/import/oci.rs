//! The container side of imports: `skopeo copy` normalizes `oci-archive:`, `docker-archive:`
//! and `oci:` sources into one OCI layout in the build directory; the image config is read
//! from it (index.json -> manifest -> config blob) and mapped onto the recipe; `umoci unpack`
//! applies the layers and their whiteouts (as root: ownership kept; umoci confines paths);
//! what kiln's guests expect is added; `mkfs.ext4 -d` packs the tree.
//!
//! Invariants: every JSON document is read with a size cap, and a blob digest is checked to
//! be `sha256:` + 64 hex digits before it becomes a path; files added to the unpacked tree
//! never replace an entry and never follow one of the tree's symlinks.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use super::{ImportOrigin, ImportSource, bad};
use crate::error::{ImageError, IoContext};
use crate::recipe::Recipe;
use crate::{BuildEvent, cmd, publish, rootfs};

/// Largest JSON document read from an OCI layout (index, manifest, config).
const MAX_OCI_JSON_BYTES: u64 = 4 << 20;
/// The tag every source gets in the build directory's OCI layout.
const LAYOUT_TAG: &str = "kiln";

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

/// OCI sources: skopeo normalizes to a layout in `tmp`, umoci unpacks it, mkfs.ext4 packs
/// the tree. Sets `recipe`'s runtime settings from the image config.
pub(super) fn unpack(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
