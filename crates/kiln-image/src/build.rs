//! Orchestration: recipe -> `images/<name>/{vmlinuz, initramfs.cpio, rootfs.ext4,
//! manifest.json}`, plus listing and removal.
//!
//! Stages (each reported as a [`BuildEvent::Stage`]):
//!
//! ```text
//! 1 resolve    agent checked static + hashed, mirror chosen, kernel resolved (apt-cache),
//!              fingerprint computed; unchanged inputs and a complete image -> UpToDate
//! 2 kernel     download + extract into cache/kernel/<version>/ (once per version)
//! 3 initramfs  modules closure + agent -> initramfs.cpio
//! 4 rootfs     mmdebstrap + trim + identity files
//! 5 pack       mkfs.ext4 -d -> sparse rootfs.ext4
//! 6 publish    rootfs sha256, manifest.json, files sealed (read-only, immutable flag),
//!              atomic swap into images/<name>/
//! ```
//!
//! Invariants: all work happens in `images/.tmp-<name>-<pid>/` under an exclusive lock on the
//! name; any error removes that directory and leaves the previous image as it was; readers
//! ([`list`], [`get`]) never take the lock, they rely on the atomic swap.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{ImageError, IoContext};
use crate::fingerprint::{FingerprintInputs, sha256_file, short_id};
use crate::manifest::{
    INITRAMFS_FILE, ImageFile, ImageId, ImageManifest, KERNEL_FILE, MANIFEST_FILE, MANIFEST_SCHEMA,
    ROOTFS_FILE, images_dir,
};
use crate::publish::{self, TMP_PREFIX};
use crate::recipe::{Recipe, validate_name};
use crate::rootfs::{self, Mirror};
use crate::{BuildConfig, BuildEvent, BuildOutcome, initramfs, kernel, modules};

/// Number of stages a full build reports.
const STAGES: u32 = 6;

/// Environment variable overriding the Debian mirror when [`BuildConfig::mirror`] is `None`.
pub const MIRROR_ENV: &str = "KILN_DEBIAN_MIRROR";

/// Builds `recipe` into `$KILN_HOME/images/<recipe.name>/`, or reports that the image there is
/// already up to date. Blocking; reports progress through `on_event` on the calling thread.
pub fn build(
    cfg: &BuildConfig,
    recipe: &Recipe,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<BuildOutcome, ImageError> {
    validate_name(&recipe.name)?;
    let stage = |on_event: &mut dyn FnMut(BuildEvent), index: u32, name: &str| {
        tracing::info!(image = %recipe.name, stage = name, "image build stage");
        on_event(BuildEvent::Stage {
            index,
            total: STAGES,
            name: name.to_owned(),
        });
    };

    // 1. Inputs.
    stage(on_event, 1, "resolve");
    crate::elf::check_static_exec(&cfg.agent_binary)?;
    let agent_sha256 = sha256_file(&cfg.agent_binary)?;
    let env_mirror = std::env::var(MIRROR_ENV).ok();
    let mirror = Mirror::resolve(cfg.mirror.as_deref().or(env_mirror.as_deref()));
    let kpkg = kernel::resolve_kernel()?;
    let inputs = FingerprintInputs::new(
        recipe,
        &kpkg.version,
        &agent_sha256,
        &mirror.uri,
        &mirror.security_uri,
    );
    let fingerprint = inputs.fingerprint();
    on_event(BuildEvent::Log(format!(
        "kernel {} {}, mirror {}, fingerprint {}",
        kpkg.package,
        kpkg.version,
        mirror.uri,
        short_id(&fingerprint)
    )));

    let images = images_dir(&cfg.home);
    std::fs::create_dir_all(&images).ctx("create directory", &images)?;
    let _lock = publish::lock_name(&images, &recipe.name, &mut || {
        on_event(BuildEvent::Log(format!(
            "waiting for another build of {} to finish",
            recipe.name
        )));
    })?;
    // Held until the image is published: it reads the kernel it extracts into the cache
    // before any image names that kernel, so `kiln prune` must leave the caches alone.
    let _caches = publish::lock_caches_shared(&cfg.home)?;
    publish::clean_stale_tmp(&images);
    if let Some(existing) = get(&cfg.home, &recipe.name)?
        && !cfg.force
        && existing.fingerprint == fingerprint
        && files_present(&existing, &cfg.home)
    {
        on_event(BuildEvent::Log(format!(
            "image {} ({}) is up to date",
            existing.name, existing.id
        )));
        return Ok(BuildOutcome::UpToDate(existing));
    }
    if !rustix::process::geteuid().is_root() {
        return Err(ImageError::NotRoot);
    }

    // 2. Kernel.
    stage(on_event, 2, "kernel");
    let kernel = kernel::ensure_package(&cfg.home, &kpkg, &mut |line| {
        on_event(BuildEvent::Log(line.to_owned()));
    })?;

    let dest = images.join(&recipe.name);
    let manifest = publish::build_atomically(&dest, &recipe.name, |tmp| {
        link_or_copy(&kernel.vmlinuz, &tmp.join(KERNEL_FILE))?;

        // 3. Initramfs.
        stage(on_event, 3, "initramfs");
        let mods = modules::initramfs_modules(
            &kernel.modules_dir,
            &kernel.release,
            &mut |done, total| {
                on_event(BuildEvent::Progress { done, total });
            },
        )?;
        let names: Vec<&str> = mods.iter().map(|m| m.file_name.as_str()).collect();
        on_event(BuildEvent::Log(format!("modules: {}", names.join(" "))));
        initramfs::write(&cfg.agent_binary, mods, &tmp.join(INITRAMFS_FILE))?;

        // 4. Root filesystem tree.
        stage(on_event, 4, "rootfs");
        let tree = tmp.join("rootfs.d");
        let mut log = |line: &str| on_event(BuildEvent::Log(line.to_owned()));
        rootfs::bootstrap(recipe, &mirror, &tree, &mut log)?;
        rootfs::finish(&tree)?;

        // 5. Pack.
        stage(on_event, 5, "pack");
        let uuid = rootfs::uuid_from_fingerprint(&fingerprint);
        rootfs::pack_ext4(&tree, &tmp.join(ROOTFS_FILE), &uuid, &mut |line| {
            on_event(BuildEvent::Log(line.to_owned()))
        })?;
        publish::safe_remove(&tree)?;
        // The exact disk, recorded once: every snapshot taken over it records it too, and a
        // rebuild under the same id records another.
        let hashed_at = std::time::Instant::now();
        let rootfs_sha256 = crate::fingerprint::sha256_sparse(&tmp.join(ROOTFS_FILE))?;
        on_event(BuildEvent::Log(format!(
            "rootfs sha256 {rootfs_sha256} ({} ms)",
            hashed_at.elapsed().as_millis()
        )));

        // 6. Publish.
        stage(on_event, 6, "publish");
        let manifest = ImageManifest {
            schema: MANIFEST_SCHEMA,
            id: ImageId(short_id(&fingerprint)),
            name: recipe.name.clone(),
            recipe: recipe.clone(),
            fingerprint: fingerprint.clone(),
            inputs,
            kernel_version: kernel.version.clone(),
            kernel_release: kernel.release.clone(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            files: [KERNEL_FILE, INITRAMFS_FILE, ROOTFS_FILE]
                .iter()
                .map(|name| ImageFile::measure(tmp, name))
                .collect::<Result<_, _>>()?,
            rootfs_sha256: Some(rootfs_sha256),
        };
        manifest.write(&tmp.join(MANIFEST_FILE))?;
        publish::seal_image(tmp)?;
        Ok(manifest)
    })?;
    on_event(BuildEvent::Log(format!(
        "built image {} ({})",
        manifest.name, manifest.id
    )));
    Ok(BuildOutcome::Built(manifest))
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
        };
        let recipe = crate::recipe::builtin("base").expect("base");
        let mut events = Vec::new();
        let err = build(&cfg, &recipe, &mut |e| events.push(e)).expect_err("dynamic agent");
        assert!(matches!(err, ImageError::BadAgent { .. }), "{err:?}");
        assert!(!cfg.home.exists());
        assert!(matches!(events[0], BuildEvent::Stage { index: 1, .. }));
    }
}
