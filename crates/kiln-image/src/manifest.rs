//! The image manifest (`images/<name>/manifest.json`) and the on-disk layout of an image.
//!
//! Owns the file names inside an image directory and the manifest schema. Invariants: a
//! manifest is written last, inside the temporary build directory, so an image directory with
//! a manifest is complete; the `schema` field is checked on read and an unknown version is an
//! error rather than a guess. A published image's files are sealed (`publish::seal_image`):
//! never written again, so the recorded `rootfs_sha256` stays true for as long as the
//! directory exists.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ImageError, IoContext};
use crate::fingerprint::FingerprintInputs;
use crate::recipe::Recipe;

/// Version of the manifest's JSON schema.
pub const MANIFEST_SCHEMA: u32 = 1;
/// Kernel image file name inside an image directory.
pub const KERNEL_FILE: &str = "vmlinuz";
/// Initramfs file name inside an image directory.
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
/// Root filesystem image file name inside an image directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// Manifest file name inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// `$KILN_HOME/images`.
pub fn images_dir(home: &Path) -> PathBuf {
    home.join("images")
}

/// Short content id of an image (first 12 hex characters of its fingerprint).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ImageId(pub String);

impl std::fmt::Display for ImageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Size of one file: apparent length and bytes actually allocated (sparse files differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSize {
    /// `st_size`.
    pub apparent_bytes: u64,
    /// `st_blocks * 512`.
    pub allocated_bytes: u64,
}

impl FileSize {
    /// Measures `path`.
    pub fn of(path: &Path) -> Result<Self, ImageError> {
        let m = std::fs::metadata(path).ctx("stat", path)?;
        Ok(Self {
            apparent_bytes: m.len(),
            allocated_bytes: m.blocks() * 512,
        })
    }
}

/// One file of an image and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    /// File name inside the image directory ([`KERNEL_FILE`], [`INITRAMFS_FILE`], ...).
    pub name: String,
    /// `st_size`.
    pub apparent_bytes: u64,
    /// `st_blocks * 512` (the rootfs is sparse: much less than its apparent size).
    pub allocated_bytes: u64,
}

impl ImageFile {
    /// Measures `dir/name`.
    pub fn measure(dir: &Path, name: &str) -> Result<Self, ImageError> {
        let size = FileSize::of(&dir.join(name))?;
        Ok(Self {
            name: name.to_owned(),
            apparent_bytes: size.apparent_bytes,
            allocated_bytes: size.allocated_bytes,
        })
    }
}

/// What `images/<name>/manifest.json` records about a built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// [`MANIFEST_SCHEMA`] at write time.
    pub schema: u32,
    /// Short id derived from the fingerprint.
    pub id: ImageId,
    /// Image name (the directory name; equal to the recipe name for built-in recipes).
    pub name: String,
    /// The recipe it was built from.
    pub recipe: Recipe,
    /// Full hex sha256 fingerprint of `inputs`.
    pub fingerprint: String,
    /// What the fingerprint was computed over.
    pub inputs: FingerprintInputs,
    /// Debian version of the kernel package.
    pub kernel_version: String,
    /// Kernel release (`uname -r` in the guest).
    pub kernel_release: String,
    /// Build completion time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The image's files (kernel, initramfs, rootfs) with their sizes.
    pub files: Vec<ImageFile>,
    /// Hex sha256 of `rootfs.ext4` as built ([`crate::sha256_sparse`]): the exact disk every
    /// overlay and snapshot of this image is backed by. A rebuild under the same id
    /// (`--force`) records another one, so snapshots taken over the previous disk are refused.
    /// `None` for images built before kiln recorded it (schema 1 still): their snapshots
    /// record an empty digest and keep working until the image is rebuilt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_sha256: Option<String>,
    /// The recipe file it was built from (absolute), so that `kiln run` can tell when the
    /// file changed and rebuild; `None` for built-in recipes and imports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe_path: Option<std::path::PathBuf>,
    /// Where an imported image came from and what was found in it (`kiln image import`);
    /// `None` for built images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<crate::import::ImportOrigin>,
}

impl ImageManifest {
    /// The recorded size of file `name`, if the image has it.
    pub fn file(&self, name: &str) -> Option<&ImageFile> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Bytes allocated on disk by all files of the image.
    pub fn allocated_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.allocated_bytes).sum()
    }

    /// `$KILN_HOME/images/<name>/`.
    pub fn dir(&self, home: &Path) -> PathBuf {
        images_dir(home).join(&self.name)
    }

    /// The kernel to pass to QEMU's `-kernel`.
    pub fn kernel_path(&self, home: &Path) -> PathBuf {
        self.dir(home).join(KERNEL_FILE)
    }

    /// The initramfs to pass to QEMU's `-initrd`.
    pub fn initramfs_path(&self, home: &Path) -> PathBuf {
        self.dir(home).join(INITRAMFS_FILE)
    }

    /// The raw ext4 root filesystem (read-only backing file of sandbox overlays).
    pub fn rootfs_path(&self, home: &Path) -> PathBuf {
        self.dir(home).join(ROOTFS_FILE)
    }

    /// Reads and validates a manifest file.
    pub fn read(path: &Path) -> Result<Self, ImageError> {
        let text = std::fs::read(path).ctx("read", path)?;
        // Check the schema before the full parse so an incompatible manifest gets a precise
        // error instead of a missing-field one.
        #[derive(Deserialize)]
        struct Schema {
            schema: u32,
        }
        let Schema { schema } =
            serde_json::from_slice(&text).map_err(|source| ImageError::Manifest {
                path: path.to_owned(),
                source,
            })?;
        if schema != MANIFEST_SCHEMA {
            return Err(ImageError::ManifestVersion {
                path: path.to_owned(),
                found: schema,
                expected: MANIFEST_SCHEMA,
            });
        }
        serde_json::from_slice(&text).map_err(|source| ImageError::Manifest {
            path: path.to_owned(),
            source,
        })
    }

    /// Writes the manifest to `path` (pretty JSON, trailing newline) and syncs it.
    pub fn write(&self, path: &Path) -> Result<(), ImageError> {
        let mut json = serde_json::to_vec_pretty(self).map_err(|source| ImageError::Manifest {
            path: path.to_owned(),
            source,
        })?;
        json.push(b'\n');
        std::fs::write(path, json).ctx("write", path)?;
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .ctx("sync", path)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(name: &str) -> ImageManifest {
        let recipe = crate::recipe::builtin("base").expect("base");
        let inputs = FingerprintInputs::new(&recipe, "", "6.1.192-2", "00", "http://m", "http://s");
        let fingerprint = inputs.fingerprint();
        ImageManifest {
            schema: MANIFEST_SCHEMA,
            id: ImageId(crate::fingerprint::short_id(&fingerprint)),
            name: name.to_owned(),
            recipe,
            fingerprint,
            inputs,
            kernel_version: "6.1.192-2".into(),
            kernel_release: "6.1.0-56-cloud-amd64".into(),
            created_unix: 1_700_000_000,
            files: [KERNEL_FILE, INITRAMFS_FILE, ROOTFS_FILE]
                .map(|name| ImageFile {
                    name: name.to_owned(),
                    apparent_bytes: 10,
                    allocated_bytes: 4096,
                })
                .to_vec(),
            rootfs_sha256: Some("e".repeat(64)),
            recipe_path: None,
            origin: None,
        }
    }

    #[test]
    fn manifest_write_read_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(MANIFEST_FILE);
        let m = sample("base");
        m.write(&path).expect("write");
        assert_eq!(ImageManifest::read(&path).expect("read"), m);
    }

    #[test]
    fn manifest_without_rootfs_digest_still_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(MANIFEST_FILE);
        let mut v = serde_json::to_value(sample("base")).expect("to json");
        v.as_object_mut().expect("object").remove("rootfs_sha256");
        std::fs::write(&path, v.to_string()).expect("write");
        let m = ImageManifest::read(&path).expect("a manifest from before the digest reads");
        assert_eq!(m.rootfs_sha256, None);
        assert_eq!(m.schema, MANIFEST_SCHEMA);
    }

    #[test]
    fn manifest_other_schema_is_version_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(MANIFEST_FILE);
        let mut v = serde_json::to_value(sample("base")).expect("to json");
        v["schema"] = 99.into();
        std::fs::write(&path, v.to_string()).expect("write");
        let err = ImageManifest::read(&path).expect_err("schema 99");
        assert!(
            matches!(err, ImageError::ManifestVersion { found: 99, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn manifest_file_lookup_and_total() {
        let m = sample("base");
        assert_eq!(m.file(ROOTFS_FILE).map(|f| f.allocated_bytes), Some(4096));
        assert_eq!(m.file("nope"), None);
        assert_eq!(m.allocated_bytes(), 3 * 4096);
    }

    #[test]
    fn manifest_paths_follow_layout() {
        let m = sample("python");
        let home = Path::new("/h");
        assert_eq!(m.kernel_path(home), Path::new("/h/images/python/vmlinuz"));
        assert_eq!(
            m.initramfs_path(home),
            Path::new("/h/images/python/initramfs.cpio")
        );
        assert_eq!(
            m.rootfs_path(home),
            Path::new("/h/images/python/rootfs.ext4")
        );
    }

    #[test]
    fn file_size_sparse_file_allocates_less() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sparse");
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(64 << 20).expect("set_len");
        let size = FileSize::of(&path).expect("stat");
        assert_eq!(size.apparent_bytes, 64 << 20);
        assert!(size.allocated_bytes < size.apparent_bytes);
    }
}
