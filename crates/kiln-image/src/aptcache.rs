//! The package download cache shared by image builds: `$KILN_HOME/cache/apt/`.
//!
//! Every Debian bootstrap (mmdebstrap) downloads the `.deb` files of its image. This cache
//! keeps them, so the next build of any image with the same packages reads them from the
//! disk instead of the mirror:
//!
//! ```text
//!  cache/apt/archives/<package>_<version>_<arch>.deb   the packages (never written in place)
//!  cache/apt/index.json                                sha256 and size of each; per image, the
//!                                                      files its last bootstrap used
//!  cache/apt/.lock                                     held exclusively by stage and harvest
//!
//!  build:  stage   verify every cached file against the index, hard-link the good ones
//!                  into the build directory (a corrupt, partial or unknown file is deleted)
//!          mmdebstrap  a setup hook links them into the tree's /var/cache/apt/archives;
//!                  apt downloads only what is missing there (--skip=essential/unlink and
//!                  --skip=cleanup/apt/cache keep every .deb in the tree)
//!          harvest hash what the tree's archives hold, add it to the cache, record this
//!                  image's set, then prune
//! ```
//!
//! Invariants:
//! - **Only verified bytes are handed out.** apt checks the hash of what it downloads (a file
//!   moves from `partial/` to `archives/` only after that) but trusts a file already in
//!   `archives/` whose *size* matches (measured with apt 2.6: a same-size `.deb` with
//!   changed bytes is installed without a download or a complaint). So the cache records the
//!   sha256 of every file when it takes it from a finished bootstrap (bytes apt verified, or
//!   bytes the cache staged and verified), and [`AptCache::stage`] hashes every file again
//!   before a build may see it: a file that is not in the index, or whose size or sha256
//!   differs, is deleted and apt downloads it again.
//! - **Bounded by what images use.** Each image name keeps the set of files its last
//!   bootstrap used; a file no kept set names is deleted at every harvest. A set is dropped
//!   when its image no longer exists (`kiln image rm`) — except the set of the build being
//!   harvested, which is not published yet. So the cache holds at most the packages of the
//!   images built, at their latest versions (no size cap: an image's packages are needed
//!   again at its next rebuild).
//! - **Concurrent builds** take `.lock` exclusively around stage and harvest (milliseconds
//!   to a few seconds), never during mmdebstrap. Files are added by a link to a temporary
//!   name and a rename, and never written in place; a build's staged hard links keep their
//!   inodes alive if another build prunes the names meanwhile.
//! - A build that fails before its harvest leaves the cache as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{ImageError, IoContext};
use crate::fingerprint::sha256_file;

/// The cache's directory below `$KILN_HOME`.
pub const APT_CACHE_DIR: &str = "cache/apt";
/// Version of `index.json`; another version is discarded (the files are verified anew).
const INDEX_VERSION: u32 = 1;

/// What the cache knows about one `.deb`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    sha256: String,
    size: u64,
}

/// `index.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Index {
    version: u32,
    /// File name → its verified content.
    debs: BTreeMap<String, Entry>,
    /// Image name → the files its last bootstrap used.
    images: BTreeMap<String, BTreeSet<String>>,
}

/// What [`AptCache::stage`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageReport {
    /// Files verified and staged.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files deleted from the cache instead, with the reason.
    pub dropped: Vec<(String, String)>,
    /// Time spent hashing and linking.
    pub elapsed_ms: u64,
}

/// What [`AptCache::harvest`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HarvestReport {
    /// Files the bootstrap used.
    pub used: u64,
    /// Of those, files new to the cache.
    pub added: u64,
    /// Bytes of the new files.
    pub added_bytes: u64,
    /// Files deleted because no image uses them any more.
    pub pruned: u64,
    /// Their bytes.
    pub pruned_bytes: u64,
    /// Files and bytes in the cache afterwards.
    pub total_files: u64,
    /// Bytes in the cache afterwards.
    pub total_bytes: u64,
}

/// The package cache of one kiln home.
#[derive(Debug, Clone)]
pub struct AptCache {
    dir: PathBuf,
    images_dir: PathBuf,
}

/// The exclusive lock on the cache, held until dropped.
struct Locked {
    _file: File,
}

/// Whether `name` looks like a file apt writes into `archives/` (and so may be cached).
fn is_deb_name(name: &str) -> bool {
    name.ends_with(".deb")
        && !name.starts_with('.')
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+~%-:".contains(&b))
}

impl AptCache {
    /// The cache of the home `home` (created on first use).
    pub fn new(home: &Path) -> Self {
        Self {
            dir: home.join(APT_CACHE_DIR),
            images_dir: crate::manifest::images_dir(home),
        }
    }

    /// `cache/apt/archives`.
    pub fn archives(&self) -> PathBuf {
        self.dir.join("archives")
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    fn lock(&self) -> Result<Locked, ImageError> {
        let archives = self.archives();
        std::fs::create_dir_all(&archives).ctx("create directory", &archives)?;
        let path = self.dir.join(".lock");
        let file = crate::publish::open_lock_file(&path)?;
        file.lock()
            .map_err(|source| ImageError::Lock { path, source })?;
        Ok(Locked { _file: file })
    }

    fn load_index(&self) -> Index {
        let path = self.index_path();
        let parsed = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Index>(&b).ok());
        match parsed {
            Some(i) if i.version == INDEX_VERSION => i,
            // Missing, unreadable or another version: start empty, so every cached file is
            // unknown and deleted by the next stage (apt downloads it again).
            _ => Index {
                version: INDEX_VERSION,
                ..Index::default()
            },
        }
    }

    fn save_index(&self, index: &Index) -> Result<(), ImageError> {
        let path = self.index_path();
        let tmp = self
            .dir
            .join(format!(".index.json.tmp-{}", std::process::id()));
        let bytes = serde_json::to_vec_pretty(index).expect("the index serializes");
        let mut f = File::create(&tmp).ctx("create", &tmp)?;
        f.write_all(&bytes).ctx("write", &tmp)?;
        f.sync_all().ctx("sync", &tmp)?;
        std::fs::rename(&tmp, &path).ctx("rename", &path)
    }

    /// Verifies every cached file against the index and hard-links the good ones into
    /// `staging` (created; it must be on the home's file system or the files are copied).
    /// Files that are not in the index, or whose size or sha256 differs, are deleted from
    /// the cache; so are index entries whose file is gone.
    pub fn stage(&self, staging: &Path) -> Result<StageReport, ImageError> {
        let started = Instant::now();
        let _lock = self.lock()?;
        std::fs::create_dir_all(staging).ctx("create directory", staging)?;
        let mut index = self.load_index();
        let archives = self.archives();
        let mut report = StageReport::default();
        let mut present = BTreeSet::new();
        for dent in std::fs::read_dir(&archives).ctx("read directory", &archives)? {
            let dent = dent.ctx("read directory", &archives)?;
            let name = dent.file_name().to_string_lossy().into_owned();
            let path = dent.path();
            let meta = std::fs::symlink_metadata(&path).ctx("stat", &path)?;
            let verdict = if !meta.is_file() || !is_deb_name(&name) {
                Err("not a package file".to_owned())
            } else {
                match index.debs.get(&name) {
                    None => Err("not in the cache's index (a partial or foreign file)".to_owned()),
                    Some(e) if e.size != meta.len() => Err(format!(
                        "size {} instead of {} (truncated or grown)",
                        meta.len(),
                        e.size
                    )),
                    Some(e) => {
                        let got = sha256_file(&path)?;
                        if got == e.sha256 {
                            Ok(e.size)
                        } else {
                            Err(format!("sha256 {got} instead of {}", e.sha256))
                        }
                    }
                }
            };
            match verdict {
                Ok(size) => {
                    link_or_copy(&path, &staging.join(&name))?;
                    report.files += 1;
                    report.bytes += size;
                    present.insert(name);
                }
                Err(why) => {
                    if meta.is_dir() {
                        crate::publish::safe_remove(&path)?;
                    } else {
                        std::fs::remove_file(&path).ctx("remove", &path)?;
                    }
                    index.debs.remove(&name);
                    report.dropped.push((name, why));
                }
            }
        }
        let before = index.debs.len();
        index.debs.retain(|name, _| present.contains(name));
        if index.debs.len() != before || !report.dropped.is_empty() {
            self.save_index(&index)?;
        }
        report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(report)
    }

    /// Takes the `.deb` files of the packages a finished bootstrap installed (the tree
    /// `tree`'s dpkg status names them; the files are in its `/var/cache/apt/archives`) into
    /// the cache, records them as the files of image `image`, and deletes every cached file
    /// no image uses any more. Staged files the bootstrap did not install are not this
    /// image's.
    ///
    /// The files must be ones apt verified: downloaded by this bootstrap, or staged by
    /// [`AptCache::stage`] (those are recognized by their inode and not hashed again).
    pub fn harvest(&self, image: &str, tree: &Path) -> Result<HarvestReport, ImageError> {
        let status_path = tree.join("var/lib/dpkg/status");
        let status = std::fs::read_to_string(&status_path).ctx("read", &status_path)?;
        let installed = installed_deb_names(&status);
        let tree_archives = tree.join("var/cache/apt/archives");
        let tree_archives = tree_archives.as_path();
        let _lock = self.lock()?;
        let mut index = self.load_index();
        let archives = self.archives();
        let mut report = HarvestReport::default();
        let mut used = BTreeSet::new();
        let entries = match std::fs::read_dir(tree_archives) {
            Ok(e) => e
                .collect::<Result<Vec<_>, _>>()
                .ctx("read directory", tree_archives)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(ImageError::io("read directory", tree_archives, e)),
        };
        for dent in entries {
            let name = dent.file_name().to_string_lossy().into_owned();
            let src = dent.path();
            let meta = std::fs::symlink_metadata(&src).ctx("stat", &src)?;
            if !meta.is_file() || !is_deb_name(&name) || !installed.contains(&name) {
                continue;
            }
            let dst = archives.join(&name);
            let same_inode = std::fs::symlink_metadata(&dst)
                .is_ok_and(|d| d.dev() == meta.dev() && d.ino() == meta.ino());
            if same_inode && index.debs.contains_key(&name) {
                used.insert(name);
                continue;
            }
            let sha256 = sha256_file(&src)?;
            let entry = Entry {
                sha256,
                size: meta.len(),
            };
            if index.debs.get(&name) != Some(&entry) || !dst.exists() {
                let tmp = archives.join(format!(".{name}.tmp-{}", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                link_or_copy(&src, &tmp)?;
                std::fs::rename(&tmp, &dst).ctx("rename", &dst)?;
                report.added += 1;
                report.added_bytes += entry.size;
                index.debs.insert(name.clone(), entry);
            }
            used.insert(name);
        }
        report.used = used.len() as u64;
        index.images.insert(image.to_owned(), used);

        // Prune: the sets of images that are gone go, then the files no set names.
        let images_dir = &self.images_dir;
        index
            .images
            .retain(|name, _| name == image || images_dir.join(name).is_dir());
        let referenced: BTreeSet<&String> = index.images.values().flatten().collect();
        let unreferenced: Vec<String> = index
            .debs
            .keys()
            .filter(|n| !referenced.contains(n))
            .cloned()
            .collect();
        for name in unreferenced {
            let path = archives.join(&name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ImageError::io("remove", &path, e)),
            }
            if let Some(e) = index.debs.remove(&name) {
                report.pruned += 1;
                report.pruned_bytes += e.size;
            }
        }
        report.total_files = index.debs.len() as u64;
        report.total_bytes = index.debs.values().map(|e| e.size).sum();
        self.save_index(&index)?;
        Ok(report)
    }
}

/// The file names apt gives the `.deb` files of the packages dpkg's `status` lists as
/// installed: `<package>_<version>_<arch>.deb`, with `_`, `:` (an epoch), `%`, and in the
/// architecture `.`, written as `%xx` (apt's `QuoteString`).
fn installed_deb_names(status: &str) -> BTreeSet<String> {
    fn quote(s: &str, bad: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if bad.as_bytes().contains(&b) || b == b'%' || b <= 0x20 || b >= 0x7f {
                out.push_str(&format!("%{b:02x}"));
            } else {
                out.push(char::from(b));
            }
        }
        out
    }
    let mut names = BTreeSet::new();
    for stanza in status.split("\n\n") {
        let (mut pkg, mut version, mut arch, mut installed) = (None, None, None, false);
        for line in stanza.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key {
                "Package" => pkg = Some(value),
                "Version" => version = Some(value),
                "Architecture" => arch = Some(value),
                "Status" => installed = value.ends_with(" installed"),
                _ => {}
            }
        }
        if let (Some(p), Some(v), Some(a), true) = (pkg, version, arch, installed) {
            names.insert(format!(
                "{}_{}_{}.deb",
                quote(p, "_:"),
                quote(v, "_:"),
                quote(a, "_:.")
            ));
        }
    }
    names
}

/// Hard-links `src` to `dst`, or copies it when they are on different file systems.
fn link_or_copy(src: &Path, dst: &Path) -> Result<(), ImageError> {
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
            std::fs::copy(src, dst).ctx("copy", dst).map(|_| ())
        }
        Err(e) => Err(ImageError::io("link", dst, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A home with an `images/` directory and a finished bootstrap's archives.
    struct Fixture {
        home: tempfile::TempDir,
        cache: AptCache,
    }

    impl Fixture {
        fn new() -> Self {
            let home = tempfile::tempdir().expect("tempdir");
            std::fs::create_dir_all(home.path().join("images")).expect("mkdir");
            let cache = AptCache::new(home.path());
            Self { home, cache }
        }

        /// A finished bootstrap's tree: `/var/cache/apt/archives` holding `files` (name,
        /// content), each installed according to `/var/lib/dpkg/status`.
        fn tree(&self, label: &str, files: &[(&str, &str)]) -> PathBuf {
            let root = self.home.path().join(format!("tree-{label}"));
            let dir = root.join("var/cache/apt/archives");
            std::fs::create_dir_all(dir.join("partial")).expect("mkdir");
            std::fs::write(dir.join("lock"), "").expect("lock");
            for (name, content) in files {
                std::fs::write(dir.join(name), content).expect("write");
            }
            let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
            write_status(&root, &names);
            root
        }

        fn publish_image(&self, name: &str) {
            std::fs::create_dir_all(self.home.path().join("images").join(name)).expect("mkdir");
        }

        fn cached(&self) -> BTreeSet<String> {
            std::fs::read_dir(self.cache.archives())
                .expect("read")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect()
        }

        fn staging(&self, label: &str) -> PathBuf {
            self.home.path().join(format!("staging-{label}"))
        }
    }

    /// Writes a dpkg status file listing the packages of the `.deb` names `installed`
    /// (`package_version_arch.deb`) as installed, plus one package that is not.
    fn write_status(root: &Path, installed: &[&str]) {
        let mut text = String::from(
            "Package: removed\nStatus: deinstall ok config-files\nVersion: 1\nArchitecture: amd64\n",
        );
        for name in installed {
            let Some(stem) = name.strip_suffix(".deb") else {
                continue;
            };
            let parts: Vec<&str> = stem.split('_').collect();
            let [p, v, a] = parts.as_slice() else {
                continue;
            };
            let v = v.replace("%3a", ":");
            text.push_str(&format!(
                "\nPackage: {p}\nStatus: install ok installed\nPriority: optional\n\
                 Version: {v}\nArchitecture: {a}\nDescription: a test\n multi-line\n"
            ));
        }
        let dir = root.join("var/lib/dpkg");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("status"), text).expect("status");
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn harvest_then_stage_hands_the_same_bytes_to_the_next_build() {
        let f = Fixture::new();
        let tree = f.tree("a", &[("a_1_amd64.deb", "AAAA"), ("b_2_all.deb", "BB")]);
        let r = f.cache.harvest("base", &tree).expect("harvest");
        assert_eq!((r.used, r.added, r.added_bytes), (2, 2, 6));
        assert_eq!((r.total_files, r.total_bytes), (2, 6));
        assert_eq!(f.cached(), set(&["a_1_amd64.deb", "b_2_all.deb"]));

        // The next build's tree, with the staged files in its archives.
        let next = f.home.path().join("tree-next");
        let staging = next.join("var/cache/apt/archives");
        let s = f.cache.stage(&staging).expect("stage");
        assert_eq!((s.files, s.bytes), (2, 6));
        assert!(s.dropped.is_empty(), "{:?}", s.dropped);
        assert_eq!(
            std::fs::read_to_string(staging.join("a_1_amd64.deb")).expect("read"),
            "AAAA"
        );
        // Staged files are hard links: harvesting them again hashes and adds nothing.
        write_status(&next, &["a_1_amd64.deb", "b_2_all.deb"]);
        let r = f.cache.harvest("base", &next).expect("harvest");
        assert_eq!((r.used, r.added), (2, 0));
    }

    #[test]
    fn stage_drops_a_corrupt_file_of_the_right_size() {
        let f = Fixture::new();
        let tree = f.tree("a", &[("a_1_amd64.deb", "AAAA"), ("b_2_all.deb", "BB")]);
        f.cache.harvest("base", &tree).expect("harvest");
        // Same size, other bytes: what apt itself would reuse without a complaint.
        let cached = f.cache.archives().join("a_1_amd64.deb");
        std::fs::remove_file(&cached).expect("unlink");
        std::fs::write(&cached, "EVIL").expect("corrupt");

        let staging = f.staging("1");
        let s = f.cache.stage(&staging).expect("stage");
        assert_eq!(s.files, 1);
        assert_eq!(s.dropped.len(), 1, "{:?}", s.dropped);
        assert_eq!(s.dropped[0].0, "a_1_amd64.deb");
        assert!(s.dropped[0].1.starts_with("sha256 "), "{:?}", s.dropped);
        assert!(!staging.join("a_1_amd64.deb").exists(), "never handed out");
        assert!(staging.join("b_2_all.deb").exists());
        assert_eq!(f.cached(), set(&["b_2_all.deb"]), "deleted from the cache");
        // Once apt has downloaded it again, the good bytes are cached again.
        let tree = f.tree("b", &[("a_1_amd64.deb", "AAAA")]);
        let r = f.cache.harvest("base", &tree).expect("harvest");
        assert_eq!(r.added, 1);
        let s = f.cache.stage(&f.staging("2")).expect("stage");
        assert_eq!((s.files, s.dropped.len()), (1, 0));
    }

    #[test]
    fn stage_drops_partial_unknown_and_stray_entries() {
        let f = Fixture::new();
        let tree = f.tree("a", &[("a_1_amd64.deb", "AAAA")]);
        f.cache.harvest("base", &tree).expect("harvest");
        let archives = f.cache.archives();
        // Truncated in place (a crash mid-copy of an older kiln, a full disk).
        std::fs::write(archives.join("a_1_amd64.deb"), "AA").expect("truncate");
        // Never recorded: e.g. a download interrupted on its way in.
        std::fs::write(archives.join("c_3_amd64.deb"), "CCC").expect("write");
        std::fs::create_dir_all(archives.join("partial")).expect("mkdir");
        std::fs::write(archives.join("notes.txt"), "x").expect("write");

        let s = f.cache.stage(&f.staging("1")).expect("stage");
        assert_eq!(s.files, 0);
        let dropped: BTreeMap<_, _> = s.dropped.iter().cloned().collect();
        assert!(dropped["a_1_amd64.deb"].starts_with("size 2 instead of 4"));
        assert!(dropped["c_3_amd64.deb"].contains("not in the cache's index"));
        assert!(dropped.contains_key("partial") && dropped.contains_key("notes.txt"));
        assert!(f.cached().is_empty(), "{:?}", f.cached());
        let s = f.cache.stage(&f.staging("2")).expect("stage");
        assert_eq!(
            (s.files, s.dropped.len()),
            (0, 0),
            "the index forgot them too"
        );
    }

    #[test]
    fn stage_with_a_damaged_index_trusts_nothing() {
        let f = Fixture::new();
        let tree = f.tree("a", &[("a_1_amd64.deb", "AAAA")]);
        f.cache.harvest("base", &tree).expect("harvest");
        std::fs::write(f.cache.index_path(), "{ not json").expect("damage");
        let s = f.cache.stage(&f.staging("1")).expect("stage");
        assert_eq!((s.files, s.dropped.len()), (0, 1));
        assert!(f.cached().is_empty());
    }

    #[test]
    fn harvest_prunes_files_no_image_uses() {
        let f = Fixture::new();
        f.publish_image("base");
        f.publish_image("python");
        let base = f.tree(
            "base",
            &[("libc_1_amd64.deb", "L1"), ("less_1_amd64.deb", "S")],
        );
        f.cache.harvest("base", &base).expect("harvest");
        let python = f.tree(
            "py",
            &[("libc_1_amd64.deb", "L1"), ("py_3_amd64.deb", "PY")],
        );
        f.cache.harvest("python", &python).expect("harvest");
        assert_eq!(f.cached().len(), 3);

        // A rebuild of base with a newer libc: the old libc is still python's.
        let base2 = f.tree(
            "base2",
            &[("libc_2_amd64.deb", "L2"), ("less_1_amd64.deb", "S")],
        );
        let r = f.cache.harvest("base", &base2).expect("harvest");
        assert_eq!((r.added, r.pruned), (1, 0));
        assert_eq!(f.cached().len(), 4);

        // python removed (`kiln image rm`): its set goes at the next harvest, and with it the
        // files only it used.
        std::fs::remove_dir(f.home.path().join("images/python")).expect("rm");
        let r = f.cache.harvest("base", &base2).expect("harvest");
        assert_eq!((r.pruned, r.pruned_bytes), (2, 4));
        assert_eq!(f.cached(), set(&["libc_2_amd64.deb", "less_1_amd64.deb"]));
        assert_eq!((r.total_files, r.total_bytes), (2, 3));
    }

    #[test]
    fn harvest_keeps_the_set_of_the_unpublished_build() {
        let f = Fixture::new();
        let tree = f.tree("a", &[("a_1_amd64.deb", "AAAA")]);
        // No images/new yet: the build being harvested is published later.
        let r = f.cache.harvest("new", &tree).expect("harvest");
        assert_eq!((r.total_files, r.pruned), (1, 0));
        // Another image's harvest drops it while it is still unpublished (a failed build).
        let other = f.tree("b", &[("b_1_amd64.deb", "B")]);
        let r = f.cache.harvest("other", &other).expect("harvest");
        assert_eq!(r.pruned, 1);
        assert_eq!(f.cached(), set(&["b_1_amd64.deb"]));
    }

    #[test]
    fn harvest_ignores_partial_downloads_and_foreign_names() {
        let f = Fixture::new();
        let tree = f.tree("a", &[("a_1_amd64.deb", "AAAA"), ("x.txt", "x")]);
        let archives = tree.join("var/cache/apt/archives");
        std::fs::write(archives.join("partial/b_1_amd64.deb"), "half").expect("partial");
        std::fs::write(archives.join(".hidden.deb"), "h").expect("hidden");
        let r = f.cache.harvest("base", &tree).expect("harvest");
        assert_eq!(r.used, 1);
        assert_eq!(f.cached(), set(&["a_1_amd64.deb"]));
    }

    #[test]
    fn harvest_records_only_the_packages_the_bootstrap_installed() {
        let f = Fixture::new();
        f.publish_image("python");
        let python = f.tree("py", &[("libc_1_amd64.deb", "L"), ("py_3_amd64.deb", "PY")]);
        f.cache.harvest("python", &python).expect("harvest");
        // base's build was given python's packages too, but installed only libc.
        let base = f.tree(
            "base",
            &[("libc_1_amd64.deb", "L"), ("py_3_amd64.deb", "PY")],
        );
        write_status(&base, &["libc_1_amd64.deb"]);
        let r = f.cache.harvest("base", &base).expect("harvest");
        assert_eq!(r.used, 1);
        let index = f.cache.load_index();
        assert_eq!(index.images["base"], set(&["libc_1_amd64.deb"]));
        // Once python is gone, its package goes although base's tree held a copy.
        std::fs::remove_dir(f.home.path().join("images/python")).expect("rm");
        let r = f.cache.harvest("base", &base).expect("harvest");
        assert_eq!(r.pruned, 1);
        assert_eq!(f.cached(), set(&["libc_1_amd64.deb"]));
    }

    #[test]
    fn installed_deb_names_quote_like_apt() {
        let status = "Package: bsdutils\nStatus: install ok installed\nVersion: 1:2.38.1-5+deb12u3\n\
                      Architecture: amd64\n\n\
                      Package: g++\nStatus: install ok installed\nVersion: 4:12.2.0-3\nArchitecture: amd64\n\n\
                      Package: tzdata\nStatus: install ok installed\nVersion: 2025b-0+deb12u1\nArchitecture: all\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\nArchitecture: amd64\n\n\
                      Package: half\nStatus: install ok half-configured\nVersion: 1\nArchitecture: amd64\n";
        assert_eq!(
            installed_deb_names(status),
            set(&[
                "bsdutils_1%3a2.38.1-5+deb12u3_amd64.deb",
                "g++_4%3a12.2.0-3_amd64.deb",
                "tzdata_2025b-0+deb12u1_all.deb",
            ])
        );
    }

    #[test]
    fn concurrent_harvests_and_stages_keep_a_consistent_index() {
        let f = Fixture::new();
        for name in ["a", "b", "c", "d"] {
            f.publish_image(name);
        }
        let trees: Vec<PathBuf> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| {
                let file = format!("{n}_1_amd64.deb");
                f.tree(n, &[(file.as_str(), "12345678"), ("common_1_all.deb", "C")])
            })
            .collect();
        std::thread::scope(|s| {
            for (i, (name, tree)) in ["a", "b", "c", "d"].iter().zip(&trees).enumerate() {
                let cache = f.cache.clone();
                let staging = f.staging(&i.to_string());
                s.spawn(move || {
                    for _ in 0..5 {
                        cache.harvest(name, tree).expect("harvest");
                        let st = cache.stage(&staging).expect("stage");
                        assert!(st.dropped.is_empty(), "{:?}", st.dropped);
                        std::fs::remove_dir_all(&staging).expect("clean");
                    }
                });
            }
        });
        let s = f.cache.stage(&f.staging("end")).expect("stage");
        assert_eq!((s.files, s.dropped.len()), (5, 0));
        let index = f.cache.load_index();
        assert_eq!(index.images.len(), 4);
        assert_eq!(index.debs.len(), 5);
    }

    #[test]
    fn is_deb_name_accepts_apt_names_only() {
        assert!(is_deb_name("libc6_2.36-9+deb12u9_amd64.deb"));
        assert!(is_deb_name("python3.11_3.11.2-6+deb12u5_amd64.deb"));
        assert!(is_deb_name("libgcc-s1_12.2.0-14%3a_amd64.deb"));
        assert!(!is_deb_name("lock"));
        assert!(!is_deb_name(".a_1_amd64.deb.tmp-1"));
        assert!(!is_deb_name("../x.deb"));
        assert!(!is_deb_name("a b.deb"));
    }
}
