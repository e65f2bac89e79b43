//! Orchestration: recipe -> `images/<name>/{vmlinuz, initramfs.cpio, rootfs.ext4,
//! manifest.json}`, plus listing and removal.
//!
//! Stages (each reported as a [`BuildEvent::Stage`] and ended by a [`BuildEvent::StageDone`]):
//!
//! ```text
//! 1 resolve    agent checked static + hashed, parent image read (from = IMAGE), mirror
//!              chosen, kernel resolved (apt-cache; or the existing image's with keep_kernel),
//!              fingerprint computed; unchanged inputs and a complete image -> UpToDate
//! 2 kernel     download + extract into cache/kernel/<version>/ (once per version)
//! 3 initramfs  modules closure + agent -> initramfs.cpio
//! 4 rootfs     Debian: mmdebstrap + trim + identity files + mkfs.ext4 -d (sparse);
//!              from an image: a sparse copy of its rootfs.ext4 (grown to disk_mib)
//! 5 steps      files and `run` steps in a build guest ([`BuildGuest::apply`])
//! 6 compact    e2fsck -E discard: free blocks become holes; sizes before and after
//! 7 self-test  a fresh guest: agent, on_boot, readiness, `test` ([`BuildGuest::self_test`])
//! 8 publish    rootfs sha256, manifest.json, files sealed (read-only, immutable flag),
//!              atomic swap into images/<name>/
//! ```
//!
//! Invariants: all work happens in `images/.tmp-<name>-<pid>/` under an exclusive lock on the
//! name; any error (a failing step, a failing self-test) removes that directory and leaves
//! the previous image as it was; readers ([`list`], [`get`]) never take the lock, they rely on
//! the atomic swap. Booting guests is the caller's ([`BuildGuest`]): this crate boots nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::aptcache::AptCache;
use crate::error::{ImageError, IoContext};
use crate::fingerprint::{FingerprintInputs, sha256_file, short_id};
use crate::manifest::{
    FileSize, INITRAMFS_FILE, ImageFile, ImageId, ImageManifest, KERNEL_FILE, MANIFEST_FILE,
    MANIFEST_SCHEMA, ROOTFS_FILE, images_dir,
};
use crate::publish::{self, TMP_PREFIX};
use crate::recipe::KernelFlavour;
use crate::recipe::{Base, Recipe, validate_name};
use crate::rootfs::{self, Mirror};
use crate::{BuildConfig, BuildEvent, BuildOutcome, cmd, initramfs, kernel, modules};

/// Number of stages a build reports.
const STAGES: u32 = 8;

/// Environment variable overriding the Debian mirror when [`BuildConfig::mirror`] is `None`.
pub const MIRROR_ENV: &str = "KILN_DEBIAN_MIRROR";

/// The files of an image being built, for booting it.
#[derive(Debug, Clone, Copy)]
pub struct BootFiles<'a> {
    /// Kernel.
    pub kernel: &'a Path,
    /// Initramfs (the agent is `/init`).
    pub initramfs: &'a Path,
    /// The raw ext4 root file system (written to by [`BuildGuest::apply`] only).
    pub rootfs: &'a Path,
    /// A scratch directory beside them, removed with the build.
    pub scratch: &'a Path,
}

/// The guest side of a build, implemented by the engine (which boots VMs).
pub trait BuildGuest {
    /// Boots `boot` with its root file system writable, copies `recipe.files` into it and runs
    /// `recipe.run` in order, streaming output as [`BuildEvent::Log`]s; powers the guest off
    /// cleanly. The first failing step fails it ([`ImageError::GuestStep`]).
    fn apply(
        &mut self,
        boot: &BootFiles<'_>,
        recipe: &Recipe,
        on_event: &mut dyn FnMut(BuildEvent),
    ) -> Result<(), ImageError>;

    /// Boots `boot` over a throw-away layer (the root file system is not changed): the agent
    /// answers, `on_boot` runs, the readiness probe passes, `test` exits 0.
    fn self_test(
        &mut self,
        boot: &BootFiles<'_>,
        recipe: &Recipe,
        on_event: &mut dyn FnMut(BuildEvent),
    ) -> Result<(), ImageError>;
}

/// Resolves `recipe` against its parent image (`from = IMAGE`): takes over what the parent
/// defines and the recipe does not ([`Recipe::inherit`]). Returns the parent's manifest.
pub fn resolve_parent(
    home: &Path,
    recipe: &mut Recipe,
) -> Result<Option<ImageManifest>, ImageError> {
    let Base::Image { name } = &recipe.from else {
        return Ok(None);
    };
    let parent =
        get(home, name)?.ok_or_else(|| ImageError::ImageNotFound { name: name.clone() })?;
    recipe.inherit(&parent.recipe);
    Ok(Some(parent))
}

/// How deep `from = IMAGE` chains may go.
const MAX_CHAIN: usize = 8;

/// The recipe an image was built from, read again (its file, or the built-in recipe): what a
/// child that adds packages re-applies.
fn source_recipe(m: &ImageManifest) -> Result<Recipe, ImageError> {
    if let Some(path) = &m.recipe_path
        && path.is_file()
    {
        return crate::recipe::file::load(path, Some(&m.name));
    }
    if m.recipe.from.is_debian()
        && let Some(r) = crate::recipe::builtin(&m.name)
    {
        return Ok(r);
    }
    Err(no_source_recipe(m))
}

/// Why packages cannot be added on top of `m`.
fn no_source_recipe(m: &ImageManifest) -> ImageError {
    ImageError::BadRecipe {
        file: "recipe".to_owned(),
        line: 0,
        column: 0,
        field: "packages".to_owned(),
        message: format!(
            "packages cannot be added on top of image {}: it was {} and kiln has no recipe to bootstrap it again with more packages",
            m.name,
            match &m.recipe.from {
                Base::Import { source, .. } => format!("imported from {source}"),
                _ => "built from a recipe file that is gone".to_owned(),
            }
        ),
    }
}

/// A recipe that extends a Debian-based image *and* adds packages cannot install them on the
/// parent's disk (mmdebstrap builds trees; build guests have no network). It is built as one
/// Debian bootstrap instead: the root ancestor's suite, every ancestor's packages and its
/// own, then every ancestor's files and steps (root first) and its own, in the build guest.
/// Returns that plan (the recipe's own run configuration kept), or `None` when it adds none.
pub fn flatten(
    home: &Path,
    recipe: &Recipe,
    parent: Option<&ImageManifest>,
) -> Result<Option<Recipe>, ImageError> {
    let Some(mut m) = parent.cloned() else {
        return Ok(None);
    };
    if recipe.packages.is_empty() {
        return Ok(None);
    }
    let mut chain = Vec::new();
    loop {
        let src = source_recipe(&m)?;
        let next = match &src.from {
            Base::Image { name } => Some(name.clone()),
            Base::Debian => None,
            // (A recipe file never says `Import`: only an imported manifest does, and
            // `source_recipe` refused that already.)
            Base::Import { .. } => return Err(no_source_recipe(&m)),
        };
        chain.push(src);
        let Some(name) = next else { break };
        if chain.len() >= MAX_CHAIN {
            return Err(ImageError::BadRecipe {
                file: "recipe".to_owned(),
                line: 0,
                column: 0,
                field: "from".to_owned(),
                message: format!("the chain of extended images is deeper than {MAX_CHAIN}"),
            });
        }
        m = get(home, &name)?.ok_or(ImageError::ImageNotFound { name })?;
    }
    let root = chain.last().expect("at least the parent");
    let mut flat = recipe.clone();
    flat.suite = root.suite.clone();
    flat.packages = Vec::new();
    flat.files = Vec::new();
    flat.run = Vec::new();
    for src in chain.iter().rev().chain(std::iter::once(recipe)) {
        for p in &src.packages {
            if !flat.packages.contains(p) {
                flat.packages.push(p.clone());
            }
        }
        flat.files.extend(src.files.iter().cloned());
        flat.run.extend(src.run.iter().cloned());
    }
    Ok(Some(flat))
}

/// The fingerprint inputs of building `recipe` (already resolved against `parent`) with the
/// given kernel version and agent digest.
fn inputs_for(
    recipe: &Recipe,
    parent: Option<&ImageManifest>,
    kernel_version: &str,
    agent_sha256: &str,
    mirror: &Mirror,
) -> FingerprintInputs {
    match parent {
        // An extended image's bytes come from its parent, not from a mirror.
        Some(p) => {
            FingerprintInputs::new(recipe, &p.fingerprint, kernel_version, agent_sha256, "", "")
        }
        None => FingerprintInputs::new(
            recipe,
            "",
            kernel_version,
            agent_sha256,
            &mirror.uri,
            &mirror.security_uri,
        ),
    }
}

/// Whether the image of `recipe` is up to date without building anything: the fingerprint
/// with the existing image's kernel version (the kernel package is resolved only by a build).
/// `Ok(None)` means up to date; `Ok(Some(why))` names what changed; a missing image is
/// `Some("not built yet")`.
pub fn staleness(cfg: &BuildConfig, recipe: &Recipe) -> Result<Option<String>, ImageError> {
    let mut recipe = recipe.clone();
    let Some(existing) = get(&cfg.home, &recipe.name)? else {
        return Ok(Some("not built yet".to_owned()));
    };
    let parent = resolve_parent(&cfg.home, &mut recipe)?;
    let agent_sha256 = sha256_file(&cfg.agent_binary)?;
    let env_mirror = std::env::var(MIRROR_ENV).ok();
    let mirror = Mirror::resolve(cfg.mirror.as_deref().or(env_mirror.as_deref()));
    let now = inputs_for(
        &recipe,
        parent.as_ref(),
        &existing.kernel_version,
        &agent_sha256,
        &mirror,
    );
    if now.fingerprint() == existing.fingerprint && files_present(&existing, &cfg.home) {
        return Ok(None);
    }
    Ok(Some(describe_change(&existing.inputs, &now)))
}

/// What differs between the inputs an image was built from and today's, in words.
pub fn describe_change(old: &FingerprintInputs, new: &FingerprintInputs) -> String {
    let mut what = Vec::new();
    if old.format_version != new.format_version {
        what.push("kiln's image format".to_owned());
    }
    if old.suite != new.suite || old.packages != new.packages {
        what.push("its packages".to_owned());
    }
    if old.guest_commands != new.guest_commands {
        what.push("its guest commands (on_boot, readiness, on_restore)".to_owned());
    }
    if old.config != new.config {
        let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
        let (o, n) = (parse(&old.config), parse(&new.config));
        let keys = [
            "from",
            "files",
            "run",
            "env",
            "workdir",
            "user",
            "entrypoint",
            "cmd",
            "test",
            "cpus",
            "memory_mib",
            "disk_mib",
        ];
        // A key an empty config lacks reads as its default.
        let norm = |v: Option<&serde_json::Value>| match v {
            None => serde_json::Value::Null,
            Some(v) if v == &serde_json::json!([]) || v == &serde_json::json!({}) => {
                serde_json::Value::Null
            }
            Some(v) if v == &serde_json::json!({"kind": "debian"}) => serde_json::Value::Null,
            Some(v) => v.clone(),
        };
        let changed: Vec<&str> = keys
            .into_iter()
            .filter(|k| norm(o.get(k)) != norm(n.get(k)))
            .collect();
        what.push(if changed.is_empty() {
            "its recipe".to_owned()
        } else {
            format!("its recipe's {}", changed.join(", "))
        });
    }
    if old.parent_fingerprint != new.parent_fingerprint {
        what.push("the image it extends (rebuilt since)".to_owned());
    }
    if old.agent_sha256 != new.agent_sha256 {
        what.push("the guest agent".to_owned());
    }
    if old.kernel_version != new.kernel_version {
        what.push(format!(
            "the kernel ({} -> {})",
            old.kernel_version, new.kernel_version
        ));
    }
    if old.mirror != new.mirror || old.security_mirror != new.security_mirror {
        what.push("the Debian mirror".to_owned());
    }
    if what.is_empty() {
        "its files are incomplete".to_owned()
    } else {
        format!("changed: {}", what.join("; "))
    }
}

/// Builds `recipe` into `$KILN_HOME/images/<recipe.name>/`, or reports that the image there is
/// already up to date. Blocking; reports progress through `on_event` on the calling thread;
/// `guest` runs the steps that need a guest.
pub fn build(
    cfg: &BuildConfig,
    recipe: &Recipe,
    guest: &mut dyn BuildGuest,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<BuildOutcome, ImageError> {
    validate_name(&recipe.name)?;
    let mut recipe = recipe.clone();
    let mut stages = Stages::new(&recipe.name, STAGES);

    // 1. Inputs.
    stages.begin(on_event, 1, "resolve");
    let agent_sha256 = check_agent(cfg)?;
    let parent = resolve_parent(&cfg.home, &mut recipe)?;
    let flat = flatten(&cfg.home, &recipe, parent.as_ref())?;
    let env_mirror = std::env::var(MIRROR_ENV).ok();
    let mirror = Mirror::resolve(cfg.mirror.as_deref().or(env_mirror.as_deref()));
    let existing_now = get(&cfg.home, &recipe.name)?;
    let kpkg = match (&parent, &existing_now) {
        // An extended image boots its parent's kernel (its modules are in the initramfs).
        (Some(p), _) => kernel::KernelPackage::of_image(&p.kernel_version, &p.kernel_release),
        (None, Some(e))
            if cfg.keep_kernel && KernelFlavour::of_release(&e.kernel_release) == recipe.kernel =>
        {
            kernel::KernelPackage::of_image(&e.kernel_version, &e.kernel_release)
        }
        _ => kernel::resolve_kernel(recipe.kernel)?,
    };
    let inputs = inputs_for(
        &recipe,
        parent.as_ref(),
        &kpkg.version,
        &agent_sha256,
        &mirror,
    );
    let fingerprint = inputs.fingerprint();
    on_event(BuildEvent::Log(format!(
        "kernel {} {}, {}, fingerprint {}",
        kpkg.package,
        kpkg.version,
        match &parent {
            Some(p) => format!("extending image {} ({})", p.name, p.id),
            None => format!("mirror {}", mirror.uri),
        },
        short_id(&fingerprint)
    )));

    let (images, _lock, _caches) = lock_for_build(&cfg.home, &recipe.name, on_event)?;
    let existing = get(&cfg.home, &recipe.name)?;
    if let Some(existing) = &existing
        && !cfg.force
        && existing.fingerprint == fingerprint
        && files_present(existing, &cfg.home)
    {
        on_event(BuildEvent::Log(format!(
            "image {} ({}) is up to date",
            existing.name, existing.id
        )));
        return Ok(BuildOutcome::UpToDate(existing.clone()));
    }
    if let Some(existing) = &existing
        && existing.fingerprint != fingerprint
    {
        on_event(BuildEvent::Log(format!(
            "rebuilding {}: {}",
            existing.name,
            describe_change(&existing.inputs, &inputs)
        )));
    }
    if !rustix::process::geteuid().is_root() {
        return Err(ImageError::NotRoot);
    }

    // 2. Kernel.
    stages.begin(on_event, 2, "kernel");
    let kernel = kernel::ensure_package(&cfg.home, &kpkg, &mut |line| {
        on_event(BuildEvent::Log(line.to_owned()));
    })?;

    let dest = images.join(&recipe.name);
    let manifest = publish::build_atomically(&dest, &recipe.name, |tmp| {
        stages.begin(on_event, 3, "initramfs");
        boot_files(&kernel, &recipe.modules, &cfg.agent_binary, tmp, on_event)?;

        // 4. Root file system.
        stages.begin(on_event, 4, "rootfs");
        let rootfs_path = tmp.join(ROOTFS_FILE);
        // What the root file system and the build guest are made from: the recipe, or its
        // flattened plan when it adds packages to an extended image.
        let plan = flat.as_ref().unwrap_or(&recipe);
        if flat.is_some() {
            on_event(BuildEvent::Log(format!(
                "{} adds packages to an extended image: bootstrapping {} with {} packages and re-applying {} files and {} steps",
                recipe.name,
                plan.suite,
                plan.packages.len(),
                plan.files.len(),
                plan.run.len()
            )));
        }
        match (&parent, &flat) {
            (None, _) | (Some(_), Some(_)) => {
                let tree = tmp.join("rootfs.d");
                let mut log = |line: &str| on_event(BuildEvent::Log(line.to_owned()));
                let cache = AptCache::new(&cfg.home);
                let staging = tmp.join("debs.in");
                rootfs::bootstrap(plan, &mirror, &tree, Some((&cache, &staging)), &mut log)?;
                rootfs::finish(&tree)?;
                let uuid = rootfs::uuid_from_fingerprint(&fingerprint);
                rootfs::pack_ext4(&tree, &rootfs_path, &uuid, recipe.disk_mib, &mut |line| {
                    on_event(BuildEvent::Log(line.to_owned()))
                })?;
                publish::safe_remove(&tree)?;
            }
            (Some(p), None) => {
                copy_sparse(&p.rootfs_path(&cfg.home), &rootfs_path)?;
                if let Some(mib) = recipe.disk_mib {
                    grow_ext4(&rootfs_path, u64::from(mib) << 20, &mut |line| {
                        on_event(BuildEvent::Log(line.to_owned()))
                    })?;
                }
            }
        }
        let dir = BuildDir::create(tmp)?;

        // 5. Files and build steps, in a guest.
        stages.begin(on_event, 5, "steps");
        if plan.has_guest_steps() {
            guest.apply(&dir.boot(), plan, on_event)?;
        } else {
            on_event(BuildEvent::Log("no files or build steps".to_owned()));
        }

        // 6-8. Compaction, self-test, publish.
        let manifest = ImageManifest {
            schema: MANIFEST_SCHEMA,
            id: ImageId(short_id(&fingerprint)),
            name: recipe.name.clone(),
            recipe: recipe.clone(),
            fingerprint: fingerprint.clone(),
            inputs: inputs.clone(),
            kernel_version: kernel.version.clone(),
            kernel_release: kernel.release.clone(),
            created_unix: 0,
            files: Vec::new(),
            rootfs_sha256: None,
            recipe_path: cfg.recipe_path.clone(),
            origin: None,
        };
        finish_stages(&dir, guest, &mut stages, 6, manifest, on_event)
    })?;
    stages.finish(on_event);
    on_event(BuildEvent::Log(format!(
        "built image {} ({})",
        manifest.name, manifest.id
    )));
    Ok(BuildOutcome::Built(manifest))
}

/// The files of an image inside its build directory, and a scratch directory beside them.
pub(crate) struct BuildDir {
    tmp: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    rootfs: PathBuf,
    scratch: PathBuf,
}

impl BuildDir {
    /// The files in the build directory `tmp`; creates its scratch directory.
    pub(crate) fn create(tmp: &Path) -> Result<BuildDir, ImageError> {
        let scratch = tmp.join("scratch");
        std::fs::create_dir_all(&scratch).ctx("create directory", &scratch)?;
        Ok(BuildDir {
            tmp: tmp.to_owned(),
            kernel: tmp.join(KERNEL_FILE),
            initramfs: tmp.join(INITRAMFS_FILE),
            rootfs: tmp.join(ROOTFS_FILE),
            scratch,
        })
    }

    /// The files for booting a guest.
    pub(crate) fn boot(&self) -> BootFiles<'_> {
        BootFiles {
            kernel: &self.kernel,
            initramfs: &self.initramfs,
            rootfs: &self.rootfs,
            scratch: &self.scratch,
        }
    }
}

/// The last three stages of every image (numbered from `first`): compaction (blocks freed by
/// build steps, or never used, become holes), the self-test (a fresh guest of the finished
/// files: [`BuildGuest::self_test`] with `manifest.recipe`) and publish
/// ([`seal_with_manifest`]). Returns the sealed manifest; the caller renames the directory
/// into place.
pub(crate) fn finish_stages(
    dir: &BuildDir,
    guest: &mut dyn BuildGuest,
    stages: &mut Stages,
    first: u32,
    manifest: ImageManifest,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<ImageManifest, ImageError> {
    stages.begin(on_event, first, "compact");
    compact_reporting(&dir.rootfs, on_event)?;
    stages.begin(on_event, first + 1, "self-test");
    guest.self_test(&dir.boot(), &manifest.recipe, on_event)?;
    publish::safe_remove(&dir.scratch)?;
    stages.begin(on_event, first + 2, "publish");
    seal_with_manifest(&dir.tmp, manifest, on_event)
}

/// Reports a pipeline's stages: each [`BuildEvent::Stage`] ends the previous one with a
/// [`BuildEvent::StageDone`] (builds and imports share it).
pub(crate) struct Stages {
    image: String,
    total: u32,
    current: Option<(u32, String, Instant)>,
}

impl Stages {
    /// A pipeline of `total` stages for image `image`.
    pub(crate) fn new(image: &str, total: u32) -> Stages {
        Stages {
            image: image.to_owned(),
            total,
            current: None,
        }
    }

    /// Ends the current stage (if any) and begins stage `index` called `name`.
    pub(crate) fn begin(&mut self, on_event: &mut dyn FnMut(BuildEvent), index: u32, name: &str) {
        self.finish(on_event);
        tracing::info!(image = %self.image, stage = name, "image build stage");
        on_event(BuildEvent::Stage {
            index,
            total: self.total,
            name: name.to_owned(),
        });
        self.current = Some((index, name.to_owned(), Instant::now()));
    }

    /// Ends the current stage, if any.
    pub(crate) fn finish(&mut self, on_event: &mut dyn FnMut(BuildEvent)) {
        if let Some((index, name, t)) = self.current.take() {
            on_event(BuildEvent::StageDone {
                index,
                name,
                elapsed_ms: t.elapsed().as_millis() as u64,
            });
        }
    }
}

/// Checks that the agent is a static executable; returns its sha256 (a fingerprint input).
pub(crate) fn check_agent(cfg: &BuildConfig) -> Result<String, ImageError> {
    crate::elf::check_static_exec(&cfg.agent_binary)?;
    sha256_file(&cfg.agent_binary)
}

/// Takes the exclusive lock on `name` (saying so when another build holds it) and the shared
/// lock on the caches, and removes stale `.tmp-*` directories. Returns the images directory
/// and both locks, held until the image is published: the build reads the kernel it extracts
/// into the cache before any image names that kernel, so `kiln prune` must leave the caches
/// alone meanwhile.
pub(crate) fn lock_for_build(
    home: &Path,
    name: &str,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<(PathBuf, publish::NameLock, publish::CacheLock), ImageError> {
    let images = images_dir(home);
    std::fs::create_dir_all(&images).ctx("create directory", &images)?;
    let lock = publish::lock_name(&images, name, &mut || {
        on_event(BuildEvent::Log(format!(
            "waiting for another build of {name} to finish"
        )));
    })?;
    let caches = publish::lock_caches_shared(home)?;
    publish::clean_stale_tmp(&images);
    Ok((images, lock, caches))
}

/// Puts the kernel and a fresh initramfs (its modules closure and the agent as `/init`) into
/// the build directory `tmp`.
pub(crate) fn boot_files(
    kernel: &kernel::Kernel,
    extra_modules: &[String],
    agent_binary: &Path,
    tmp: &Path,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<(), ImageError> {
    link_or_copy(&kernel.vmlinuz, &tmp.join(KERNEL_FILE))?;
    let mods = modules::initramfs_modules(
        &kernel.modules_dir,
        &kernel.release,
        extra_modules,
        &mut |done, total| {
            on_event(BuildEvent::Progress { done, total });
        },
    )?;
    let names: Vec<&str> = mods.iter().map(|m| m.file_name.as_str()).collect();
    on_event(BuildEvent::Log(format!("modules: {}", names.join(" "))));
    initramfs::write(agent_binary, mods, &tmp.join(INITRAMFS_FILE)).map(drop)
}

/// [`compact`]s `rootfs` and reports the sizes before and after as [`BuildEvent::Compacted`].
pub(crate) fn compact_reporting(
    rootfs: &Path,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<(), ImageError> {
    let before = FileSize::of(rootfs)?;
    compact(rootfs, &mut |line| {
        on_event(BuildEvent::Log(line.to_owned()))
    })?;
    let after = FileSize::of(rootfs)?;
    on_event(BuildEvent::Compacted {
        apparent_bytes: after.apparent_bytes,
        before_bytes: before.allocated_bytes,
        after_bytes: after.allocated_bytes,
    });
    Ok(())
}

/// The publish stage inside the build directory `tmp`: records the exact disk's sha256 (every
/// snapshot taken over it records it too, and a rebuild under the same id records another),
/// the creation time and the files' sizes in `manifest`, writes it and seals the files.
pub(crate) fn seal_with_manifest(
    tmp: &Path,
    mut manifest: ImageManifest,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<ImageManifest, ImageError> {
    let hashed_at = Instant::now();
    let rootfs_sha256 = crate::fingerprint::sha256_sparse(&tmp.join(ROOTFS_FILE))?;
    on_event(BuildEvent::Log(format!(
        "rootfs sha256 {rootfs_sha256} ({} ms)",
        hashed_at.elapsed().as_millis()
    )));
    manifest.rootfs_sha256 = Some(rootfs_sha256);
    manifest.created_unix = unix_now();
    manifest.files = [KERNEL_FILE, INITRAMFS_FILE, ROOTFS_FILE]
        .iter()
        .map(|name| ImageFile::measure(tmp, name))
        .collect::<Result<_, _>>()?;
    manifest.write(&tmp.join(MANIFEST_FILE))?;
    publish::seal_image(tmp)?;
    Ok(manifest)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Copies `from` to `to` keeping holes (and sharing extents where the file system can).
pub fn copy_sparse(from: &Path, to: &Path) -> Result<(), ImageError> {
    let mut c = Command::new("cp");
    c.args(["--sparse=always", "--reflink=auto", "--"])
        .arg(from)
        .arg(to);
    cmd::run_capture(&mut c).map(drop)?;
    // The parent's file is sealed read-only; the copy is ours to write.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644)).ctx("chmod", to)
}

/// Grows the ext4 file system in `path` to `size` bytes (never shrinks: a smaller size than
/// the parent's is an error naming both).
fn grow_ext4(path: &Path, size: u64, on_line: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
    let current = std::fs::metadata(path).ctx("stat", path)?.len();
    if size < current {
        return Err(ImageError::BadRecipe {
            file: "recipe".to_owned(),
            line: 0,
            column: 0,
            field: "disk_mib".to_owned(),
            message: format!(
                "{} MiB is smaller than the extended image's disk ({} MiB); disks only grow",
                size >> 20,
                current >> 20
            ),
        });
    }
    if size == current {
        return Ok(());
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .ctx("open", path)?;
    file.set_len(size).ctx("resize", path)?;
    drop(file);
    let mut fsck = Command::new("e2fsck");
    fsck.args(["-f", "-p"]).arg(path);
    cmd::run_streaming(fsck, on_line)?;
    let mut resize = Command::new("resize2fs");
    resize.arg(path);
    cmd::run_streaming(resize, on_line)
}

/// Checks the file system in `path` and turns its free blocks into holes (`e2fsck -E
/// discard` punches them in a regular file), so blocks that build steps wrote and freed take
/// no space.
pub fn compact(path: &Path, on_line: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
    let mut c = Command::new("e2fsck");
    c.args(["-f", "-y", "-E", "discard"]).arg(path);
    // e2fsck exits 1 when it fixed something (e.g. a guest powered off with an orphan
    // inode): still a consistent file system.
    match cmd::run_streaming(c, on_line) {
        Ok(()) => Ok(()),
        Err(ImageError::CommandFailed { status, .. }) if status.ends_with(": 1") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether all files of an image are present.
fn files_present(m: &ImageManifest, home: &Path) -> bool {
    [
        m.kernel_path(home),
        m.initramfs_path(home),
        m.rootfs_path(home),
    ]
    .iter()
    .all(|p| p.is_file())
}

/// Hard-links `from` to `to` (same filesystem: no copy, and the image keeps its kernel even if
/// the cache is cleaned), falling back to a copy.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), ImageError> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).ctx("copy", from)?;
    Ok(())
}

/// All built images, sorted by name. Directories without a manifest are skipped.
pub fn list(home: &Path) -> Result<Vec<ImageManifest>, ImageError> {
    let dir = images_dir(home);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::io("read directory", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.ctx("read directory", &dir)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let manifest = entry.path().join(MANIFEST_FILE);
        if manifest.is_file() {
            out.push(ImageManifest::read(&manifest)?);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The image called `name`, if it exists.
pub fn get(home: &Path, name: &str) -> Result<Option<ImageManifest>, ImageError> {
    validate_name(name)?;
    let path = images_dir(home).join(name).join(MANIFEST_FILE);
    match ImageManifest::read(&path) {
        Ok(m) => Ok(Some(m)),
        Err(ImageError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Deletes the image called `name` (waiting for a build of it to finish first).
///
/// The directory is first renamed to a `.tmp-` name, so a crash mid-removal leaves debris that
/// the next build cleans, never a half-deleted image.
pub fn remove(home: &Path, name: &str) -> Result<(), ImageError> {
    validate_name(name)?;
    let images = images_dir(home);
    let dir = images.join(name);
    if !dir.is_dir() {
        return Err(ImageError::ImageNotFound {
            name: name.to_owned(),
        });
    }
    let _lock = publish::lock_name(&images, name, &mut || {})?;
    let doomed = images.join(format!("{TMP_PREFIX}{name}-rm-{}", std::process::id()));
    match std::fs::rename(&dir, &doomed) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImageError::ImageNotFound {
                name: name.to_owned(),
            });
        }
        Err(e) => return Err(ImageError::io("rename", dir, e)),
    }
    publish::safe_remove(&doomed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;

    /// A build that must not reach a guest.
    struct NoGuest;

    impl BuildGuest for NoGuest {
        fn apply(
            &mut self,
            _: &BootFiles<'_>,
            _: &Recipe,
            _: &mut dyn FnMut(BuildEvent),
        ) -> Result<(), ImageError> {
            panic!("no guest expected")
        }

        fn self_test(
            &mut self,
            _: &BootFiles<'_>,
            _: &Recipe,
            _: &mut dyn FnMut(BuildEvent),
        ) -> Result<(), ImageError> {
            panic!("no guest expected")
        }
    }

    #[test]
    fn flatten_reapplies_every_ancestor_on_one_bootstrap() {
        let home = tempfile::tempdir().expect("tempdir");
        let h = home.path();
        install(h, &sample("base"));
        let mid_toml = h.join("mid.toml");
        std::fs::write(
            &mid_toml,
            "name = \"mid\"\nfrom = \"base\"\npackages = [\"jq\"]\nrun = [\"echo mid\"]\n\
             [[files]]\ncontent = \"m\"\ndst = \"/mid\"\n",
        )
        .expect("write");
        let mut mid = sample("mid");
        mid.recipe = crate::recipe::file::load(&mid_toml, None).expect("mid recipe");
        // A manifest records the recipe resolved against its parent.
        mid.recipe
            .inherit(&crate::recipe::builtin("base").expect("base"));
        mid.recipe_path = Some(mid_toml.clone());
        install(h, &mid);

        let mut child = Recipe::debian("child", "");
        child.from = Base::Image { name: "mid".into() };
        child.packages = vec!["git".into(), "jq".into()];
        child.run.push(crate::recipe::GuestCommand {
            argv: vec!["echo".into(), "child".into()],
            timeout_ms: 1,
        });
        let parent = resolve_parent(h, &mut child).expect("parent");
        let flat = flatten(h, &child, parent.as_ref())
            .expect("flatten")
            .expect("a plan: the child adds packages");
        assert_eq!(flat.suite, "bookworm");
        let base = crate::recipe::builtin("base").expect("base");
        let mut want = base.packages.clone();
        want.extend(["jq".to_owned(), "git".to_owned()]);
        assert_eq!(flat.packages, want);
        assert_eq!(flat.files.len(), 1);
        assert_eq!(flat.files[0].dst, "/mid");
        let runs: Vec<String> = flat.run.iter().map(|c| c.argv.join(" ")).collect();
        assert_eq!(runs, ["/bin/sh -c echo mid", "echo child"]);
        // The child's own run configuration stays (inherited from the chain).
        assert_eq!(flat.test, base.test);

        // Without packages nothing is flattened; on top of an import it is refused.
        let mut plain = Recipe::debian("plain", "");
        plain.from = Base::Image { name: "mid".into() };
        let p = resolve_parent(h, &mut plain).expect("parent");
        assert!(flatten(h, &plain, p.as_ref()).expect("ok").is_none());
        let mut imported = sample("imp");
        imported.recipe.from = Base::Import {
            source: "oci-archive:/x.tar".into(),
            digest: String::new(),
        };
        install(h, &imported);
        let mut on_import = Recipe::debian("c2", "");
        on_import.from = Base::Image { name: "imp".into() };
        on_import.packages = vec!["git".into()];
        let p = resolve_parent(h, &mut on_import).expect("parent");
        let err = flatten(h, &on_import, p.as_ref()).expect_err("import");
        assert!(
            err.to_string().contains("imported from oci-archive:/x.tar"),
            "{err}"
        );
    }

    #[test]
    fn describe_change_names_what_changed() {
        let m = sample("base");
        let mut new = m.inputs.clone();
        assert_eq!(describe_change(&m.inputs, &new), "its files are incomplete");
        new.config = serde_json::json!({"env": {"A": "1"}}).to_string();
        new.parent_fingerprint = "ff".into();
        new.agent_sha256 = "11".into();
        let why = describe_change(&m.inputs, &new);
        assert!(why.contains("recipe's env"), "{why}");
        assert!(why.contains("the image it extends"), "{why}");
        assert!(why.contains("guest agent"), "{why}");
        assert!(!why.contains("packages"), "{why}");
    }

    #[test]
    fn resolve_parent_missing_image_is_named() {
        let home = tempfile::tempdir().expect("tempdir");
        let mut r = Recipe::debian("child", "");
        r.from = Base::Image {
            name: "nothere".into(),
        };
        let err = resolve_parent(home.path(), &mut r).expect_err("no parent");
        assert!(err.to_string().contains("nothere"), "{err}");
        let mut plain = Recipe::debian("x", "bookworm");
        assert!(
            resolve_parent(home.path(), &mut plain)
                .expect("debian")
                .is_none()
        );
    }

    #[test]
    fn compact_punches_freed_blocks_and_grow_keeps_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("t");
        std::fs::create_dir(&tree).expect("mkdir");
        std::fs::write(tree.join("keep"), "kept").expect("write");
        let img = dir.path().join("fs.ext4");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(256 << 20))
            .expect("create");
        let run = |args: &[&str]| {
            let out = Command::new(args[0])
                .args(&args[1..])
                .output()
                .expect("run");
            assert!(out.status.success(), "{args:?}: {out:?}");
            out
        };
        let img_s = img.to_str().expect("utf-8");
        let tree_s = tree.to_str().expect("utf-8");
        run(&[
            "mkfs.ext4",
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-d",
            tree_s,
            img_s,
        ]);
        // 32 MiB of data written and deleted: allocated blocks that compaction frees.
        let blob = dir.path().join("blob");
        std::fs::write(&blob, vec![7u8; 32 << 20]).expect("write");
        let write = format!("write {} blob", blob.display());
        run(&["debugfs", "-w", "-R", &write, img_s]);
        run(&["debugfs", "-w", "-R", "rm blob", img_s]);
        let before = FileSize::of(&img).expect("size").allocated_bytes;
        compact(&img, &mut |_| {}).expect("compact");
        let after = FileSize::of(&img).expect("size").allocated_bytes;
        assert!(before >= 32 << 20, "{before}");
        assert!(
            after + (30 << 20) < before,
            "before {before}, after {after}"
        );
        grow_ext4(&img, 512 << 20, &mut |_| {}).expect("grow");
        assert_eq!(std::fs::metadata(&img).expect("stat").len(), 512 << 20);
        let cat = run(&["debugfs", "-R", "cat /keep", img_s]);
        assert_eq!(String::from_utf8_lossy(&cat.stdout), "kept");
        let err = grow_ext4(&img, 128 << 20, &mut |_| {}).expect_err("shrink");
        assert!(err.to_string().contains("disks only grow"), "{err}");
    }

    fn install(home: &Path, m: &ImageManifest) {
        let dir = m.dir(home);
        std::fs::create_dir_all(&dir).expect("mkdir");
        m.write(&dir.join(MANIFEST_FILE)).expect("write");
        for f in [KERNEL_FILE, INITRAMFS_FILE, ROOTFS_FILE] {
            std::fs::write(dir.join(f), "x").expect("write");
        }
    }

    #[test]
    fn list_get_remove_round_trip() {
        let home = tempfile::tempdir().expect("tempdir");
        let h = home.path();
        assert!(list(h).expect("list").is_empty());
        install(h, &sample("python"));
        install(h, &sample("base"));
        std::fs::create_dir_all(images_dir(h).join(".tmp-base-1")).expect("mkdir");
        let names: Vec<String> = list(h).expect("list").into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["base", "python"]);
        assert_eq!(get(h, "base").expect("get"), Some(sample("base")));
        assert!(files_present(&sample("base"), h));
        remove(h, "base").expect("remove");
        assert_eq!(get(h, "base").expect("get"), None);
        assert!(matches!(
            remove(h, "base"),
            Err(ImageError::ImageNotFound { .. })
        ));
        let left: Vec<String> = std::fs::read_dir(images_dir(h))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".lock-"))
            .collect();
        assert_eq!(left.len(), 2, "{left:?}"); // python and the foreign .tmp-base-1
    }

    #[test]
    fn get_invalid_name_is_rejected() {
        let home = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            get(home.path(), "../etc"),
            Err(ImageError::InvalidName { .. })
        ));
    }

    #[test]
    fn build_dynamic_agent_fails_before_touching_home() {
        let home = tempfile::tempdir().expect("tempdir");
        let cfg = BuildConfig {
            home: home.path().join("kiln"),
            agent_binary: "/bin/true".into(),
            mirror: None,
            force: false,
            keep_kernel: false,
            recipe_path: None,
        };
        let recipe = crate::recipe::builtin("base").expect("base");
        let mut events = Vec::new();
        let err =
            build(&cfg, &recipe, &mut NoGuest, &mut |e| events.push(e)).expect_err("dynamic agent");
        assert!(matches!(err, ImageError::BadAgent { .. }), "{err:?}");
        assert!(!cfg.home.exists());
        assert!(matches!(events[0], BuildEvent::Stage { index: 1, .. }));
    }
}
