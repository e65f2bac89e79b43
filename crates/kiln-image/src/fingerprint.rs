//! The image fingerprint: a sha256 over everything that determines an image's bytes.
//!
//! Inputs: the image format version (bumped whenever this crate changes what it produces:
//! trimming rules, mkfs options, initramfs layout), the recipe (name, suite, packages,
//! customize hooks), the kernel package version, the agent binary's sha256 and the Debian
//! mirrors. Package versions inside the rootfs are *not* inputs (they drift with the archive);
//! rebuild explicitly to pick them up. The recipe's runtime hooks (`on_boot`,
//! `readiness_probe`, `on_restore`) are behaviour, not image bytes, and are not inputs.
//!
//! Canonical encoding (pinned by a golden test; changing it changes every image id):
//!
//! ```text
//! "kiln-image-fingerprint\0"
//! for each field, in the order of `FingerprintInputs`:
//!     key bytes, 0x00, u64 LE length, value bytes
//! packages: sorted, deduplicated; encoded as the key "packages", u64 LE count, then each
//!     package as a length-prefixed value
//! customize: in recipe order (hooks run in order); encoded like packages under the key
//!     "customize", and left out entirely when empty, so recipes without hooks keep the
//!     fingerprints they had before the field existed
//! ```

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[cfg(test)]
use crate::recipe::GuestCommand;
use crate::recipe::Recipe;

/// Version of what this crate produces; part of every fingerprint. Bump it when the
/// initramfs or root file system changes in a way the other inputs do not show (the module
/// list `modules::GUEST_MODULES` is one): 2 = the initramfs loads virtio_net.
pub const IMAGE_FORMAT_VERSION: u32 = 2;

/// Length of the short id derived from a fingerprint (hex characters).
pub const ID_LEN: usize = 12;

/// Everything that determines an image, recorded in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintInputs {
    /// [`IMAGE_FORMAT_VERSION`] at build time.
    pub format_version: u32,
    /// Recipe name.
    pub recipe: String,
    /// Debian suite.
    pub suite: String,
    /// Recipe packages, sorted and deduplicated.
    pub packages: Vec<String>,
    /// Recipe customize hooks, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub customize: Vec<String>,
    /// The recipe's guest commands (on-boot, readiness probe, on-restore hook) as JSON: they
    /// shape the warm snapshot, so a change must give a new image id. Empty when it has none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub guest_commands: String,
    /// Everything else of the recipe as canonical JSON: its base, copied files (by sha256),
    /// build steps, run configuration (env, workdir, user, entrypoint, cmd), self-test and
    /// sizes. Empty when it has none of them.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub config: String,
    /// Fingerprint of the image this one extends (`from = "IMAGE"`): a rebuilt parent makes
    /// its children stale. Empty for Debian-based and imported images.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent_fingerprint: String,
    /// Debian version of the kernel package.
    pub kernel_version: String,
    /// Hex sha256 of the agent binary.
    pub agent_sha256: String,
    /// Debian mirror URI the rootfs was bootstrapped from.
    pub mirror: String,
    /// Debian security mirror URI.
    pub security_mirror: String,
}

/// The canonical JSON of what a recipe sets beyond name, suite, packages and guest commands,
/// or "" when it sets nothing more (built-in recipes before files and steps existed).
fn config(recipe: &Recipe) -> String {
    let r = recipe;
    let empty = r.from.is_debian()
        && r.files.is_empty()
        && r.run.is_empty()
        && r.env.is_empty()
        && r.workdir.is_none()
        && r.user.is_none()
        && r.entrypoint.is_empty()
        && r.cmd.is_empty()
        && r.test.is_none()
        && r.cpus.is_none()
        && r.memory_mib.is_none()
        && r.disk_mib.is_none()
        && r.kernel.is_cloud()
        && r.modules.is_empty()
        && r.desktop.is_none();
    if empty {
        return String::new();
    }
    // serde_json's maps are sorted (no preserve_order): the text is canonical.
    let mut config = serde_json::json!({
        "from": r.from,
        "files": r.files,
        "run": r.run,
        "env": r.env,
        "workdir": r.workdir,
        "user": r.user,
        "entrypoint": r.entrypoint,
        "cmd": r.cmd,
        "test": r.test,
        "cpus": r.cpus,
        "memory_mib": r.memory_mib,
        "disk_mib": r.disk_mib,
    });
    // Keys added later appear only when set, so the recipes of before keep their
    // fingerprints.
    if let Some(map) = config.as_object_mut() {
        if !r.kernel.is_cloud() {
            map.insert("kernel".into(), serde_json::json!(r.kernel));
        }
        if !r.modules.is_empty() {
            map.insert("modules".into(), serde_json::json!(r.modules));
        }
        if let Some(d) = &r.desktop {
            map.insert("desktop".into(), serde_json::json!(d));
        }
    }
    config.to_string()
}

/// The canonical JSON of a recipe's guest commands, or "" when it has none.
fn guest_commands(recipe: &Recipe) -> String {
    if recipe.on_boot.is_empty() && recipe.readiness_probe.is_none() && recipe.on_restore.is_none()
    {
        return String::new();
    }
    serde_json::json!({
        "on_boot": recipe.on_boot,
        "readiness_probe": recipe.readiness_probe,
        "on_restore": recipe.on_restore,
    })
    .to_string()
}

impl FingerprintInputs {
    /// Collects the inputs of building `recipe` with the given kernel, agent and mirrors.
    pub fn new(
        recipe: &Recipe,
        parent_fingerprint: &str,
        kernel_version: &str,
        agent_sha256: &str,
        mirror: &str,
        security_mirror: &str,
    ) -> Self {
        let mut packages = recipe.packages.clone();
        packages.sort();
        packages.dedup();
        Self {
            format_version: IMAGE_FORMAT_VERSION,
            recipe: recipe.name.clone(),
            suite: recipe.suite.clone(),
            packages,
            customize: Vec::new(),
            guest_commands: guest_commands(recipe),
            config: config(recipe),
            parent_fingerprint: parent_fingerprint.to_owned(),
            kernel_version: kernel_version.to_owned(),
            agent_sha256: agent_sha256.to_owned(),
            mirror: mirror.to_owned(),
            security_mirror: security_mirror.to_owned(),
        }
    }

    /// The canonical byte encoding described in the module docs.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        fn field(out: &mut Vec<u8>, key: &str, value: &[u8]) {
            out.extend_from_slice(key.as_bytes());
            out.push(0);
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
            out.extend_from_slice(value);
        }
        fn list(out: &mut Vec<u8>, key: &str, values: &[String]) {
            out.extend_from_slice(key.as_bytes());
            out.push(0);
            out.extend_from_slice(&(values.len() as u64).to_le_bytes());
            for v in values {
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                out.extend_from_slice(v.as_bytes());
            }
        }
        let mut packages = self.packages.clone();
        packages.sort();
        packages.dedup();
        let mut out = b"kiln-image-fingerprint\0".to_vec();
        field(
            &mut out,
            "format_version",
            self.format_version.to_string().as_bytes(),
        );
        field(&mut out, "recipe", self.recipe.as_bytes());
        field(&mut out, "suite", self.suite.as_bytes());
        list(&mut out, "packages", &packages);
        if !self.customize.is_empty() {
            list(&mut out, "customize", &self.customize);
        }
        if !self.guest_commands.is_empty() {
            field(&mut out, "guest_commands", self.guest_commands.as_bytes());
        }
        if !self.config.is_empty() {
            field(&mut out, "config", self.config.as_bytes());
        }
        if !self.parent_fingerprint.is_empty() {
            field(
                &mut out,
                "parent_fingerprint",
                self.parent_fingerprint.as_bytes(),
            );
        }
        field(&mut out, "kernel_version", self.kernel_version.as_bytes());
        field(&mut out, "agent_sha256", self.agent_sha256.as_bytes());
        field(&mut out, "mirror", self.mirror.as_bytes());
        field(&mut out, "security_mirror", self.security_mirror.as_bytes());
        out
    }

    /// Hex sha256 of [`Self::canonical_bytes`].
    pub fn fingerprint(&self) -> String {
        fingerprint(self)
    }
}

/// Hex sha256 of the canonical encoding of `inputs`.
pub fn fingerprint(inputs: &FingerprintInputs) -> String {
    hex::encode(Sha256::digest(inputs.canonical_bytes()))
}

/// The short image id: the first [`ID_LEN`] hex characters of a fingerprint.
pub fn short_id(fingerprint: &str) -> String {
    fingerprint.chars().take(ID_LEN).collect()
}

/// Hex sha256 of a sparse file's contents (equal to `sha256sum`), reading only its data:
/// holes (found with `SEEK_DATA`/`SEEK_HOLE`) are hashed as the zeros they read as, without
/// reading them. The root file system is a 2 GiB sparse file with ~130 MB of data; reading
/// its holes cost ~4 s of system time on the dev machine, hashing zeros from memory does not.
pub fn sha256_sparse(path: &std::path::Path) -> Result<String, crate::ImageError> {
    use std::os::unix::fs::FileExt;

    use crate::error::IoContext;
    use rustix::fs::SeekFrom;
    const CHUNK: usize = 1 << 20;
    let file = std::fs::File::open(path).ctx("open", path)?;
    let size = file.metadata().ctx("stat", path)?.len();
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut hasher = Sha256::new();
    let feed_zeros = |hasher: &mut Sha256, mut n: u64| {
        while n > 0 {
            let k = n.min(CHUNK as u64) as usize;
            hasher.update(&zeros[..k]);
            n -= k as u64;
        }
    };
    let mut pos = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(&file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            // No data after `pos`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => size,
            // No SEEK_DATA here: read everything from `pos`.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => pos,
            Err(e) => return Err(std::io::Error::from(e)).ctx("seek", path),
        };
        feed_zeros(&mut hasher, data.min(size) - pos);
        pos = data.min(size);
        if pos >= size {
            break;
        }
        let hole = match rustix::fs::seek(&file, SeekFrom::Hole(pos)) {
            Ok(h) => h.min(size),
            Err(_) => size,
        };
        while pos < hole {
            let want = (hole - pos).min(CHUNK as u64) as usize;
            let n = file.read_at(&mut buf[..want], pos).ctx("read", path)?;
            if n == 0 {
                // Shrunk while hashing: what is missing reads as nothing, and the digest
                // differs from the whole file's, as it must.
                return Ok(hex::encode(hasher.finalize()));
            }
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Hex sha256 of a file's contents, streamed.
pub fn sha256_file(path: &std::path::Path) -> Result<String, crate::ImageError> {
    use crate::error::IoContext;
    let mut file = std::fs::File::open(path).ctx("open", path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).ctx("read", path)?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> FingerprintInputs {
        // A bare recipe: its fingerprint keeps the encoding the golden value pins.
        let mut recipe = Recipe::debian("base", "bookworm");
        recipe.packages = vec!["procps".into(), "less".into()];
        FingerprintInputs::new(
            &recipe,
            "",
            "6.1.192-2",
            &"ab".repeat(32),
            "http://deb.debian.org/debian",
            "http://deb.debian.org/debian-security",
        )
    }

    #[test]
    fn sha256_sparse_equals_the_plain_digest_of_a_file_with_holes() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rootfs.ext4");
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(16 << 20).expect("set_len");
        f.write_all_at(b"superblock", 1024).expect("write");
        f.write_all_at(&[0xa5; 5000], 9 << 20).expect("write");
        f.write_all_at(b"tail", (16 << 20) - 4).expect("write");
        let plain = sha256_file(&path).expect("plain");
        assert_eq!(sha256_sparse(&path).expect("sparse"), plain);
        // One flipped byte anywhere, in data or in a hole, changes it.
        f.write_all_at(b"x", 5 << 20).expect("write into a hole");
        assert_ne!(sha256_sparse(&path).expect("sparse"), plain);
        assert_eq!(
            sha256_sparse(&path).expect("sparse"),
            sha256_file(&path).expect("plain")
        );
        // Empty and fully sparse files.
        let empty = dir.path().join("empty");
        std::fs::File::create(&empty).expect("create");
        assert_eq!(
            sha256_sparse(&empty).expect("sparse"),
            sha256_file(&empty).expect("plain")
        );
        let hole = dir.path().join("hole");
        std::fs::File::create(&hole)
            .and_then(|f| f.set_len(3 << 20))
            .expect("create");
        assert_eq!(
            sha256_sparse(&hole).expect("sparse"),
            sha256_file(&hole).expect("plain")
        );
    }

    #[test]
    fn fingerprint_same_inputs_same_value() {
        assert_eq!(inputs().fingerprint(), inputs().fingerprint());
        assert_eq!(inputs().fingerprint().len(), 64);
    }

    #[test]
    fn fingerprint_golden_value_is_stable() {
        // Pinned: a change here changes the id of every image ever built. Only update it
        // together with IMAGE_FORMAT_VERSION.
        let mut i = inputs();
        i.packages = vec!["a".into(), "b".into()];
        i.recipe = "t".into();
        assert_eq!(
            i.fingerprint(),
            "3433283d093274302e212fbc7b741d14c9035e9f9cc8963f41d4d3cbea3655e5"
        );
    }

    #[test]
    fn fingerprint_each_input_changes_it() {
        let base = inputs().fingerprint();
        type Mutation = Box<dyn Fn(&mut FingerprintInputs)>;
        let mutations: Vec<(&str, Mutation)> = vec![
            ("format", Box::new(|i| i.format_version += 1)),
            ("recipe", Box::new(|i| i.recipe.push('x'))),
            ("suite", Box::new(|i| i.suite = "trixie".into())),
            ("add pkg", Box::new(|i| i.packages.push("zsh".into()))),
            (
                "rm pkg",
                Box::new(|i| {
                    i.packages.pop();
                }),
            ),
            (
                "kernel",
                Box::new(|i| i.kernel_version = "6.1.193-1".into()),
            ),
            ("agent", Box::new(|i| i.agent_sha256 = "cd".repeat(32))),
            ("mirror", Box::new(|i| i.mirror = "http://m/debian".into())),
            (
                "security",
                Box::new(|i| i.security_mirror = "http://m/s".into()),
            ),
            (
                "add customize",
                Box::new(|i| i.customize.push("true".into())),
            ),
            ("config", Box::new(|i| i.config = "{}".into())),
            ("parent", Box::new(|i| i.parent_fingerprint = "ab".into())),
            (
                "guest commands",
                Box::new(|i| i.guest_commands = "{\"on_boot\":[]}".into()),
            ),
        ];
        for (what, mutate) in mutations {
            let mut i = inputs();
            mutate(&mut i);
            assert_ne!(
                i.fingerprint(),
                base,
                "changing {what} kept the fingerprint"
            );
        }
    }

    #[test]
    fn fingerprint_package_order_and_duplicates_do_not_matter() {
        let mut a = inputs();
        let mut b = inputs();
        a.packages = vec!["x".into(), "y".into()];
        b.packages = vec!["y".into(), "x".into(), "x".into()];
        assert_eq!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn fingerprint_field_boundaries_are_unambiguous() {
        let mut a = inputs();
        let mut b = inputs();
        a.packages = vec!["ab".into()];
        b.packages = vec!["a".into(), "b".into()];
        assert_ne!(a.fingerprint(), b.fingerprint());
        a.mirror = "http://x/".into();
        a.security_mirror = "y".into();
        b.mirror = "http://x".into();
        b.security_mirror = "/y".into();
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn fingerprint_covers_files_steps_config_and_parent() {
        let fp = |edit: &dyn Fn(&mut Recipe)| {
            let mut r = crate::recipe::builtin("base").expect("base");
            edit(&mut r);
            FingerprintInputs::new(&r, "", "6.1.192-2", "00", "http://m", "http://s").fingerprint()
        };
        let plain = fp(&|_| {});
        let file = |sha: &str| crate::recipe::RecipeFile {
            dst: "/etc/a".into(),
            mode: 0o644,
            owner: None,
            sha256: sha.into(),
            source: None,
        };
        type Edit = Box<dyn Fn(&mut Recipe)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("file", Box::new(move |r| r.files.push(file("aa")))),
            (
                "env",
                Box::new(|r| {
                    r.env.insert("A".into(), "1".into());
                }),
            ),
            ("workdir", Box::new(|r| r.workdir = Some("/srv".into()))),
            ("user", Box::new(|r| r.user = Some("app".into()))),
            ("cmd", Box::new(|r| r.cmd = vec!["x".into()])),
            ("entrypoint", Box::new(|r| r.entrypoint = vec!["x".into()])),
            ("test", Box::new(|r| r.test = None)),
            ("disk", Box::new(|r| r.disk_mib = Some(4096))),
            ("memory", Box::new(|r| r.memory_mib = Some(512))),
            (
                "run",
                Box::new(|r| {
                    r.run.push(GuestCommand {
                        argv: vec!["true".into()],
                        timeout_ms: 1,
                    })
                }),
            ),
            (
                "from",
                Box::new(|r| {
                    r.from = crate::recipe::Base::Image {
                        name: "python".into(),
                    }
                }),
            ),
        ];
        for (what, edit) in &edits {
            assert_ne!(
                fp(edit.as_ref()),
                plain,
                "changing {what} kept the fingerprint"
            );
        }
        // A changed file content (its sha256) changes it.
        assert_ne!(
            fp(&|r| r.files.push(file("aa"))),
            fp(&|r| r.files.push(file("bb")))
        );
        // So does the parent's fingerprint.
        let r = crate::recipe::builtin("base").expect("base");
        let with_parent = |p: &str| {
            FingerprintInputs::new(&r, p, "6.1.192-2", "00", "http://m", "http://s").fingerprint()
        };
        assert_ne!(with_parent("p1"), with_parent("p2"));
        assert_eq!(with_parent(""), plain);
    }

    #[test]
    fn fingerprint_empty_customize_keeps_old_encoding_and_json() {
        let i = inputs();
        assert!(i.customize.is_empty());
        assert!(
            !i.canonical_bytes()
                .windows(b"customize".len())
                .any(|w| w == b"customize")
        );
        let json = serde_json::to_string(&i).expect("serialize");
        assert!(!json.contains("customize"), "{json}");
        let back: FingerprintInputs = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, i);
    }

    #[test]
    fn short_id_is_prefix() {
        let fp = inputs().fingerprint();
        assert_eq!(short_id(&fp).len(), ID_LEN);
        assert!(fp.starts_with(&short_id(&fp)));
    }

    #[test]
    fn fingerprint_covers_the_recipes_guest_commands() {
        let pg = crate::recipe::builtin("postgres").expect("postgres");
        let base = crate::recipe::builtin("base").expect("base");
        let inputs = |r: &Recipe| FingerprintInputs::new(r, "", "6.1", "ab", "m", "s");
        assert!(inputs(&base).guest_commands.is_empty());
        let mut changed = pg.clone();
        changed.on_restore.as_mut().expect("hook").timeout_ms += 1;
        assert_ne!(inputs(&pg).fingerprint(), inputs(&changed).fingerprint());
    }
}
