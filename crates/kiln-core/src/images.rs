//! Image builds on behalf of API clients: finds the recipe (a built-in name, a recipe file,
//! or the file an image was built from), builds the image it extends first when that is
//! stale, runs the (blocking) builder on a blocking thread with build guests from
//! [`crate::build_guest`], and forwards its progress as [`ImageBuildEvent`]s.
//!
//! Imports (`kiln image import`) run the same way through [`kiln_image::import`].
//!
//! A client that disconnects does not cancel a build (the builder publishes atomically, so a
//! finished build is simply there for the next request); its events are dropped.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_api_types::{ImageBuildEvent, ImageFileSize, ImageInfo};
use tokio::sync::mpsc;

use crate::Engine;
use crate::error::CoreError;

/// How deep `from = IMAGE` chains may go.
const MAX_PARENT_DEPTH: usize = 8;

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipeSource {
    /// An image by name: the recipe file it was built from, else the built-in recipe of that
    /// name. An imported image (or one whose recipe file is gone) is kept as it is.
    Named(String),
    /// A recipe file (absolute path), under its own name or `name`.
    File {
        /// The TOML file.
        path: PathBuf,
        /// Overrides the file's `name`.
        name: Option<String>,
    },
}

/// A recipe to build, or an image that has none and stays as it is.
#[allow(clippy::large_enum_variant)] // one per build request, moved once
enum Found {
    Recipe(kiln_image::Recipe, Option<PathBuf>),
    Kept(Box<kiln_image::ImageManifest>, String),
}

fn find(home: &std::path::Path, src: &RecipeSource) -> Result<Found, CoreError> {
    match src {
        RecipeSource::File { path, name } => {
            if !path.is_absolute() {
                return Err(CoreError::BadRequest(format!(
                    "recipe_path must be absolute, got {}",
                    path.display()
                )));
            }
            let recipe = kiln_image::load_recipe(path, name.as_deref())?;
            Ok(Found::Recipe(recipe, Some(path.clone())))
        }
        RecipeSource::Named(name) => {
            let _: kiln_api_types::ImageName = name.parse()?;
            let existing = kiln_image::get(home, name)?;
            if let Some(m) = &existing
                && let Some(path) = &m.recipe_path
            {
                if path.is_file() {
                    let recipe = kiln_image::load_recipe(path, Some(name))?;
                    return Ok(Found::Recipe(recipe, Some(path.clone())));
                }
                return Ok(Found::Kept(
                    Box::new(m.clone()),
                    format!("its recipe file {} is gone: kept as built", path.display()),
                ));
            }
            // An import keeps its name even when a built-in recipe has it too: rebuilding
            // it from that recipe would silently replace the imported image.
            if let Some(m) = &existing
                && let kiln_image::Base::Import { source, .. } = &m.recipe.from
            {
                let why = format!("imported from {source}: nothing to rebuild");
                return Ok(Found::Kept(Box::new(m.clone()), why));
            }
            if let Some(recipe) = kiln_image::builtin(name) {
                return Ok(Found::Recipe(recipe, None));
            }
            match existing {
                Some(m) => Ok(Found::Kept(
                    Box::new(m),
                    "no recipe to rebuild it from: kept as built".to_owned(),
                )),
                None => Err(CoreError::RecipeNotFound {
                    name: name.clone(),
                    known: kiln_image::builtin_names().join(", "),
                }),
            }
        }
    }
}

/// Checks, before a build streams, that there is something to build (unknown names and bad
/// recipe files are errors with a status code, not a stream that ends in an error).
pub fn check(home: &std::path::Path, src: &RecipeSource) -> Result<(), CoreError> {
    find(home, src).map(drop)
}

/// Builds `src` (and, first, the image it extends when that is stale), forwarding events.
/// Returns the image and whether it was already up to date.
pub async fn build(
    engine: &Arc<Engine>,
    src: RecipeSource,
    force: bool,
    keep_kernel: bool,
    events: mpsc::Sender<ImageBuildEvent>,
) -> Result<(ImageInfo, bool), CoreError> {
    let mut chain = Vec::new();
    build_chain(engine, src, force, keep_kernel, &events, &mut chain).await
}

async fn build_chain(
    engine: &Arc<Engine>,
    src: RecipeSource,
    force: bool,
    keep_kernel: bool,
    events: &mpsc::Sender<ImageBuildEvent>,
    chain: &mut Vec<String>,
) -> Result<(ImageInfo, bool), CoreError> {
    let home = engine.home.root().to_owned();
    let (recipe, recipe_path) = match find(&home, &src)? {
        Found::Kept(m, why) => {
            let _ = events.try_send(ImageBuildEvent::Log {
                line: format!("image {} ({}): {why}", m.name, m.id),
            });
            return Ok((info(&m), true));
        }
        Found::Recipe(r, p) => (r, p),
    };
    if chain.contains(&recipe.name) || chain.len() >= MAX_PARENT_DEPTH {
        chain.push(recipe.name.clone());
        return Err(CoreError::BadRequest(format!(
            "image chain {} loops or is deeper than {MAX_PARENT_DEPTH}",
            chain.join(" -> ")
        )));
    }
    chain.push(recipe.name.clone());
    if let kiln_image::Base::Image { name: parent } = &recipe.from {
        // The parent first (a no-op when it is up to date): a child of a stale parent is
        // stale too, and is rebuilt on the new parent.
        let _ = events.try_send(ImageBuildEvent::Log {
            line: format!("{} extends image {parent}: checking it first", recipe.name),
        });
        Box::pin(build_chain(
            engine,
            RecipeSource::Named(parent.clone()),
            false,
            keep_kernel,
            events,
            chain,
        ))
        .await?;
    }
    let cfg = kiln_image::BuildConfig {
        home,
        agent_binary: crate::agent_binary()?,
        mirror: std::env::var("KILN_DEBIAN_MIRROR")
            .ok()
            .filter(|m| !m.is_empty()),
        force,
        keep_kernel,
        recipe_path,
    };
    let mut guest = crate::build_guest::EngineBuildGuest {
        rt: tokio::runtime::Handle::current(),
        engine: Arc::clone(engine),
        run_dir: engine.home.run_dir(),
    };
    let events = events.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        kiln_image::build(&cfg, &recipe, &mut guest, &mut |ev| {
            // A slow or vanished client must not stall the build: drop what does not fit.
            let _ = events.try_send(event(ev));
        })
    })
    .await
    .map_err(|e| CoreError::HostSetup(format!("image build task panicked: {e}")))??;
    Ok(match outcome {
        kiln_image::BuildOutcome::Built(m) => {
            // The image it replaced leaves warm snapshots nothing can restore.
            engine.discard_stale_warm().await;
            (info(&m), false)
        }
        kiln_image::BuildOutcome::UpToDate(m) => (info(&m), true),
    })
}

/// Checks an import before its stream starts (unknown scheme, missing file, a disk image of
/// another format or with a backing file, no name): the request's fault, so `bad_request`.
pub fn check_import(source: &str, name: Option<&str>) -> Result<String, CoreError> {
    kiln_image::check_import(source, name).map_err(|e| match e {
        kiln_image::ImageError::BadImport { .. } | kiln_image::ImageError::InvalidName { .. } => {
            CoreError::BadRequest(kiln_image::error_chain(&e))
        }
        other => CoreError::Image(other),
    })
}

/// Imports `source` as image `name` (see [`kiln_image::import`]), forwarding events.
pub async fn import(
    engine: &Arc<Engine>,
    source: String,
    name: Option<String>,
    events: mpsc::Sender<ImageBuildEvent>,
) -> Result<ImageInfo, CoreError> {
    let cfg = kiln_image::BuildConfig {
        home: engine.home.root().to_owned(),
        agent_binary: crate::agent_binary()?,
        mirror: None,
        force: true,
        keep_kernel: false,
        recipe_path: None,
    };
    let mut guest = crate::build_guest::EngineBuildGuest {
        rt: tokio::runtime::Handle::current(),
        engine: Arc::clone(engine),
        run_dir: engine.home.run_dir(),
    };
    let manifest = tokio::task::spawn_blocking(move || {
        kiln_image::import(&cfg, &source, name.as_deref(), &mut guest, &mut |ev| {
            // A slow or vanished client must not stall the import: drop what does not fit.
            let _ = events.try_send(event(ev));
        })
    })
    .await
    .map_err(|e| CoreError::HostSetup(format!("image import task panicked: {e}")))??;
    engine.discard_stale_warm().await;
    Ok(info(&manifest))
}

/// The API's form of a builder event.
fn event(ev: kiln_image::BuildEvent) -> ImageBuildEvent {
    use kiln_image::BuildEvent as B;
    match ev {
        B::Stage { index, total, name } => ImageBuildEvent::Stage { index, total, name },
        B::StageDone {
            index,
            name,
            elapsed_ms,
        } => ImageBuildEvent::StageDone {
            index,
            name,
            elapsed_ms,
        },
        B::Log(line) => ImageBuildEvent::Log { line },
        B::Progress { done, total } => ImageBuildEvent::Progress { done, total },
        B::Step { index, total, what } => ImageBuildEvent::Step { index, total, what },
        B::StepDone {
            index,
            exit_code,
            elapsed_ms,
        } => ImageBuildEvent::StepDone {
            index,
            exit_code,
            elapsed_ms,
        },
        B::Compacted {
            apparent_bytes,
            before_bytes,
            after_bytes,
        } => ImageBuildEvent::Compacted {
            apparent_bytes,
            before_bytes,
            after_bytes,
        },
    }
}

/// The API's view of a manifest.
pub fn info(m: &kiln_image::ImageManifest) -> ImageInfo {
    let files: Vec<ImageFileSize> = m
        .files
        .iter()
        .map(|f| ImageFileSize {
            name: f.name.clone(),
            apparent_bytes: f.apparent_bytes,
            allocated_bytes: f.allocated_bytes,
        })
        .collect();
    let r = &m.recipe;
    ImageInfo {
        id: m.id.to_string(),
        name: m.name.clone(),
        recipe: r.name.clone(),
        size_bytes: files.iter().map(|f| f.allocated_bytes).sum(),
        created_unix: m.created_unix,
        kernel_version: m.kernel_version.clone(),
        files,
        from: match &r.from {
            kiln_image::Base::Debian => format!("debian:{}", r.suite),
            kiln_image::Base::Image { name } => name.clone(),
            kiln_image::Base::Import { source, .. } => source.clone(),
        },
        recipe_path: m.recipe_path.as_ref().map(|p| p.display().to_string()),
        entrypoint: r.entrypoint.clone(),
        cmd: r.cmd.clone(),
        cpus: r.cpus,
        memory_mib: r.memory_mib,
        origin: m.origin.as_ref().map(|o| kiln_api_types::ImageOrigin {
            source: o.source.clone(),
            digest: o.digest.clone(),
            os_release: o.os_release.clone(),
            filesystem: o.filesystem.clone(),
            partition: o.partition.clone(),
            size_bytes: o.size_bytes,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_import_named_like_a_builtin_is_kept() {
        let home = tempfile::tempdir().expect("tempdir");
        let mut recipe = kiln_image::Recipe::debian("base", "");
        recipe.from = kiln_image::Base::Import {
            source: "oci-archive:/x/base.tar".into(),
            digest: "sha256:00".into(),
        };
        let m = kiln_image::ImageManifest {
            schema: kiln_image::MANIFEST_SCHEMA,
            id: kiln_image::ImageId("0123456789ab".into()),
            name: "base".into(),
            inputs: kiln_image::FingerprintInputs::new(&recipe, "", "k", "a", "", ""),
            recipe,
            fingerprint: "f".into(),
            kernel_version: "k".into(),
            kernel_release: "r".into(),
            created_unix: 1,
            files: Vec::new(),
            rootfs_sha256: None,
            recipe_path: None,
            origin: None,
        };
        let dir = m.dir(home.path());
        std::fs::create_dir_all(&dir).expect("mkdir");
        m.write(&dir.join(kiln_image::MANIFEST_FILE))
            .expect("write");
        match find(home.path(), &RecipeSource::Named("base".into())).expect("find") {
            Found::Kept(kept, why) => {
                assert_eq!(kept.name, "base");
                assert!(
                    why.contains("imported from oci-archive:/x/base.tar"),
                    "{why}"
                );
            }
            Found::Recipe(..) => panic!("the import would be rebuilt from the built-in recipe"),
        }
        // Without the import, the name is the built-in recipe again.
        std::fs::remove_dir_all(&dir).expect("rm");
        assert!(matches!(
            find(home.path(), &RecipeSource::Named("base".into())).expect("find"),
            Found::Recipe(..)
        ));
    }
}
