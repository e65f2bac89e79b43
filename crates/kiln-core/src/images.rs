//! Image builds on behalf of API clients: runs the (blocking) builder on a blocking thread and
//! forwards its progress as [`ImageBuildEvent`]s.
//!
//! A client that disconnects does not cancel a build (the builder publishes atomically, so a
//! finished build is simply there for the next request); its events are dropped.

use kiln_api_types::{ImageBuildEvent, ImageFileSize, ImageInfo};
use tokio::sync::mpsc;

use crate::error::CoreError;
use crate::paths::Home;

/// The built-in recipe `name`.
pub fn recipe(name: &str) -> Result<kiln_image::Recipe, CoreError> {
    let _: kiln_api_types::ImageName = name.parse()?;
    kiln_image::builtin(name).ok_or_else(|| CoreError::RecipeNotFound {
        name: name.to_owned(),
        known: kiln_image::builtin_names().join(", "),
    })
}

/// Builds the image `name` from the built-in recipe of the same name.
pub async fn build(
    home: &Home,
    name: &str,
    force: bool,
    events: mpsc::Sender<ImageBuildEvent>,
) -> Result<(ImageInfo, bool), CoreError> {
    let recipe = recipe(name)?;
    let cfg = kiln_image::BuildConfig {
        home: home.root().to_owned(),
        agent_binary: crate::agent_binary()?,
        mirror: std::env::var("KILN_DEBIAN_MIRROR")
            .ok()
            .filter(|m| !m.is_empty()),
        force,
    };
    let outcome = tokio::task::spawn_blocking(move || {
        kiln_image::build(&cfg, &recipe, &mut |ev| {
            let ev = match ev {
                kiln_image::BuildEvent::Stage { index, total, name } => {
                    ImageBuildEvent::Stage { index, total, name }
                }
                kiln_image::BuildEvent::Log(line) => ImageBuildEvent::Log { line },
                kiln_image::BuildEvent::Progress { done, total } => {
                    ImageBuildEvent::Progress { done, total }
                }
            };
            // A slow or vanished client must not stall the build: drop what does not fit.
            let _ = events.try_send(ev);
        })
    })
    .await
    .map_err(|e| CoreError::HostSetup(format!("image build task panicked: {e}")))??;
    Ok(match outcome {
        kiln_image::BuildOutcome::Built(m) => (info(&m), false),
        kiln_image::BuildOutcome::UpToDate(m) => (info(&m), true),
    })
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
    ImageInfo {
        id: m.id.to_string(),
        name: m.name.clone(),
        recipe: m.recipe.name.clone(),
        size_bytes: files.iter().map(|f| f.allocated_bytes).sum(),
        created_unix: m.created_unix,
        kernel_version: m.kernel_version.clone(),
        files,
    }
}
