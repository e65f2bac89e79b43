//! Guest image builder: recipes -> kernel + initramfs + rootfs.
//!
//! Owns `$KILN_HOME/images/` and `$KILN_HOME/cache/{kernel,debs,apt}/` (layout and boot contract in
//! docs/architecture.md, "Boot contract"). One function per stage, one module per concern:
//!
//! | module        | owns                                                                |
//! |---------------|---------------------------------------------------------------------|
//! | `recipe`      | the recipe model, recipe files (TOML), built-in recipes, names      |
//! | `kernel`      | resolving (apt-cache), downloading and extracting the cloud kernel  |
//! | `modules`     | modules.dep, the virtio closure in load order, decompression        |
//! | `elf`         | static-executable check of the agent, `.modinfo` of modules          |
//! | `cpio`        | reproducible newc writer                                            |
//! | `initramfs`   | the initramfs layout of the boot contract                           |
//! | `rootfs`      | mirrors, mmdebstrap, trimming, `mkfs.ext4 -d`                        |
//! | `aptcache`    | the `.deb` download cache shared by bootstraps (`cache/apt/`)        |
//! | `fingerprint` | canonical encoding and sha256 of the build inputs                   |
//! | `manifest`    | `manifest.json` and the file layout of one image                    |
//! | `publish`     | temp dirs, atomic swap, per-name and cache locks, mount-safe removal, sealing |
//! | `build`       | the stages in order, `list`/`get`/`remove`                          |
//! | `import`      | `kiln image import`: OCI images and disk images -> an image         |
//!
//! What it must not do: boot VMs (kiln-vmm does), know about sandboxes, or run anything async.
//! Everything here is blocking; the daemon calls it from `spawn_blocking`.
//!
//! Host tools used: apt-cache, apt-get, dpkg-deb, mmdebstrap, mkfs.ext4 (and xz/zstd only for
//! compressed modules); for imports skopeo, umoci, qemu-img, sfdisk, blkid, debugfs, dd. `scripts/setup-host` installs them.

mod aptcache;
mod build;
mod cmd;
mod cpio;
mod elf;
mod error;
mod fingerprint;
mod import;
mod initramfs;
mod kernel;
mod manifest;
mod modules;
mod publish;
mod recipe;
mod rootfs;

use std::path::PathBuf;

use serde::Serialize;

pub use aptcache::{APT_CACHE_DIR, AptCache, HarvestReport, StageReport};
pub use build::{
    BootFiles, BuildGuest, MIRROR_ENV, build, compact, copy_sparse, describe_change, get, list,
    remove, resolve_parent, staleness,
};
pub use cpio::{Archive as CpioArchive, EntryKind as CpioEntryKind};
pub use elf::check_static_exec;
pub use error::ImageError;
pub use fingerprint::{
    FingerprintInputs, IMAGE_FORMAT_VERSION, fingerprint, sha256_file, sha256_sparse, short_id,
};
pub use import::{
    ImportOrigin, ImportSource, OciRuntimeConfig, check_import, import, parse_os_release,
};
pub use kernel::{
    KERNEL_METAPACKAGE, Kernel, KernelPackage, cache_key as kernel_cache_key, ensure_kernel,
    resolve_kernel,
};
pub use manifest::{
    FileSize, INITRAMFS_FILE, ImageFile, ImageId, ImageManifest, KERNEL_FILE, MANIFEST_FILE,
    MANIFEST_SCHEMA, ROOTFS_FILE, images_dir,
};
pub use modules::GUEST_MODULES;
pub use publish::{
    CACHE_LOCK_FILE, CacheLock, clean_stale_tmp, safe_remove, tmp_pid, try_lock_caches,
};
pub use recipe::file::load as load_recipe;
pub use recipe::{
    Base, DEFAULT_SUITE, DesktopSpec, FileSource, GuestCommand, KernelFlavour, ProbeCheck,
    ReadinessProbe, Recipe, RecipeFile, RestoreHook, SCREEN_MAX, SCREEN_MIN, builtin,
    builtin_names, lookup, parse_screen, validate_name,
};
pub use rootfs::{DEFAULT_MIRROR, MIN_ROOTFS_BYTES, Mirror};

/// What a build needs besides the recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildConfig {
    /// `$KILN_HOME`.
    pub home: PathBuf,
    /// The static guest agent, installed as the initramfs's `/init`.
    pub agent_binary: PathBuf,
    /// Debian mirror URI; `None` means `$KILN_DEBIAN_MIRROR`, else the host's apt sources,
    /// else deb.debian.org.
    pub mirror: Option<String>,
    /// Rebuild even if the image is up to date (e.g. to pick up new package versions, which
    /// are not part of the fingerprint).
    pub force: bool,
    /// Keep the kernel version of the existing image instead of asking apt-cache for the
    /// newest (what `kiln run` does when it checks that an image is up to date: ~1 s faster,
    /// and a new kernel package is picked up by an explicit `kiln image build`).
    pub keep_kernel: bool,
    /// The recipe file being built, recorded in the manifest.
    pub recipe_path: Option<PathBuf>,
}

/// Progress of a build, delivered in order on the building thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    /// A new stage began (`index` counts from 1 to `total`).
    Stage {
        /// 1-based stage number.
        index: u32,
        /// Number of stages in a full build.
        total: u32,
        /// Short stage name: resolve, kernel, initramfs, rootfs, pack, publish.
        name: String,
    },
    /// The current stage ended successfully after `elapsed_ms`.
    StageDone {
        /// 1-based stage number.
        index: u32,
        /// Its name.
        name: String,
        /// How long it took.
        elapsed_ms: u64,
    },
    /// One line of output (ours or a tool's, e.g. mmdebstrap's, or a build step's).
    Log(String),
    /// A build step in the build guest began (`index` of `total`, counting file copies and
    /// `run` steps).
    Step {
        /// 1-based step number.
        index: u32,
        /// Number of steps.
        total: u32,
        /// What it does, e.g. "run `make install`" or "copy /etc/app.conf".
        what: String,
    },
    /// The step ended.
    StepDone {
        /// 1-based step number.
        index: u32,
        /// Exit code (0 for a copy).
        exit_code: i32,
        /// How long it took.
        elapsed_ms: u64,
    },
    /// The root file system was compacted: on-disk bytes before and after (apparent size
    /// unchanged).
    Compacted {
        /// Apparent size of `rootfs.ext4`.
        apparent_bytes: u64,
        /// Bytes allocated before compaction.
        before_bytes: u64,
        /// Bytes allocated after.
        after_bytes: u64,
    },
    /// Progress within the current stage, where the stage knows its total.
    Progress {
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
    },
}

/// The result of [`build`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildOutcome {
    /// A new image was built and published.
    Built(ImageManifest),
    /// The existing image already matches the inputs; nothing was done.
    UpToDate(ImageManifest),
}

impl BuildOutcome {
    /// The manifest of the image now in place.
    pub fn manifest(&self) -> &ImageManifest {
        match self {
            BuildOutcome::Built(m) | BuildOutcome::UpToDate(m) => m,
        }
    }
}

/// Renders an error with its whole `source()` chain, `: `-separated (for logs).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
