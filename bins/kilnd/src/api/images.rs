//! The image routes: list, remove, build (a built-in or recorded recipe, a recipe file) and
//! import, the last three streamed as NDJSON `ImageBuildEvent`s (`stream_events`). What
//! cannot be built or imported is an error status before the stream starts; errors after it
//! started arrive as its last (`error`) line.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_api_types::routes;
use kiln_api_types::{
    ApiError, ImageBuildEvent, ImageBuildRecipeRequest, ImageBuildRequest, ImageImportRequest,
    ImageInfo, ImageList, ImageName,
};
use kiln_core::images::RecipeSource;
use kiln_core::{CoreError, Engine};
use serde::Serialize;

use super::{HttpError, Shared, api_error, json, parse_body, parse_name, parse_required};

/// List images
#[utoipa::path(
    get,
    path = routes::IMAGE_LIST.path,
    operation_id = routes::IMAGE_LIST.operation_id,
    tag = "images",
    responses(
        (status = 200, description = "All built images", body = ImageList),
        (status = 500, description = "Reading the images failed", body = ApiError),
    ),
)]
pub(super) async fn image_list(State(engine): Shared) -> Result<Response, HttpError> {
    Ok(json(ImageList {
        images: engine.image_list()?,
    }))
}

/// Delete an image
///
/// Removes the image and its warm snapshots. Refused (409 `image_in_use`, naming them) while
/// a sandbox (also a stopped one) or a user snapshot uses it.
#[utoipa::path(
    delete,
    path = routes::IMAGE_DELETE.path,
    operation_id = routes::IMAGE_DELETE.operation_id,
    tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses(
        (status = 204, description = "Gone"),
        (status = 400, description = "Malformed name (`bad_request`)", body = ApiError),
        (status = 404, description = "No such image (`image_not_found`)", body = ApiError),
        (status = 409, description = "Sandboxes or user snapshots use it (`image_in_use`)", body = ApiError),
        (status = 500, description = "Removing it failed", body = ApiError),
    ),
)]
pub(super) async fn image_delete(
    State(engine): Shared,
    Path(name): Path<String>,
) -> Result<Response, HttpError> {
    engine.image_remove(&name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Build an image
///
/// Builds (or finds up to date) the image of a recipe and streams the build as
/// newline-delimited JSON: one `ImageBuildEvent` per line, the last one `done` or `error`.
/// Errors after the stream started arrive as an `error` line, not as a status code.
#[utoipa::path(
    post,
    path = routes::IMAGE_BUILD.path,
    operation_id = routes::IMAGE_BUILD.operation_id,
    tag = "images",
    params(("name" = String, Path, description = "Image (recipe) name, e.g. `python`")),
    request_body(content = Option<ImageBuildRequest>, description = "Build options; an empty body means defaults", content_type = "application/json"),
    responses(
        (status = 200, description = "The build's events, one JSON document per line", content_type = "application/x-ndjson", body = ImageBuildEvent),
        (status = 400, description = "Malformed name or body (`bad_request`)", body = ApiError),
        (status = 404, description = "No recipe of that name (`recipe_not_found`)", body = ApiError),
    ),
)]
pub(super) async fn image_build(
    State(engine): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let req: ImageBuildRequest = parse_body(&body)?;
    parse_name::<ImageName>(&name)?;
    stream_build(
        engine,
        RecipeSource::Named(name),
        req.force,
        req.keep_kernel,
    )
}

/// Build an image from a recipe file
///
/// Builds (or finds up to date) the image of a recipe file on the daemon's host and streams
/// the build like `image_build`. The image extended by the recipe (`from = "IMAGE"`) is
/// checked first and rebuilt if stale.
#[utoipa::path(
    post,
    path = routes::IMAGE_BUILD_RECIPE.path,
    operation_id = routes::IMAGE_BUILD_RECIPE.operation_id,
    tag = "images",
    request_body(content = ImageBuildRecipeRequest, description = "The recipe file and build options", content_type = "application/json"),
    responses(
        (status = 200, description = "The build's events, one JSON document per line", content_type = "application/x-ndjson", body = ImageBuildEvent),
        (status = 400, description = "Malformed body (`bad_request`), or a recipe file that cannot be read or used (`bad_recipe`: file, line, key, what was expected)", body = ApiError),
        (status = 404, description = "The image it extends does not exist and has no recipe (`recipe_not_found`)", body = ApiError),
    ),
)]
pub(super) async fn image_build_recipe(
    State(engine): Shared,
    body: Bytes,
) -> Result<Response, HttpError> {
    let req: ImageBuildRecipeRequest = parse_body(&body)?;
    if let Some(name) = &req.name {
        parse_name::<ImageName>(name)?;
    }
    stream_build(
        engine,
        RecipeSource::File {
            path: req.recipe_path.into(),
            name: req.name,
        },
        req.force,
        req.keep_kernel,
    )
}

/// Streams a build as NDJSON; what cannot be built is an error status before the stream.
fn stream_build(
    engine: Arc<Engine>,
    src: RecipeSource,
    force: bool,
    keep_kernel: bool,
) -> Result<Response, HttpError> {
    // Known before the stream starts: an unknown recipe is a 404, a bad one a 400, not a 200
    // with an error.
    engine.image_recipe_check(&src)?;
    Ok(stream_events(move |ev_tx| async move {
        engine.image_build(src, force, keep_kernel, ev_tx).await
    }))
}

/// Streams the events a builder (`work`, given the event channel) sends as NDJSON, ending
/// with `done` (the image, and whether it was up to date) or `error`.
fn stream_events<F, Fut>(work: F) -> Response
where
    F: FnOnce(tokio::sync::mpsc::Sender<ImageBuildEvent>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(ImageInfo, bool), CoreError>> + Send,
{
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::channel::<ImageBuildEvent>(256);
    let (line_tx, line_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let build = work(ev_tx);
        tokio::pin!(build);
        let last = loop {
            tokio::select! {
                Some(ev) = ev_rx.recv() => { let _ = line_tx.send(Ok(ndjson(&ev))).await; }
                res = &mut build => break res,
            }
        };
        while let Ok(ev) = ev_rx.try_recv() {
            let _ = line_tx.send(Ok(ndjson(&ev))).await;
        }
        let last = match last {
            Ok((image, up_to_date)) => ImageBuildEvent::Done {
                up_to_date,
                image: Box::new(image),
            },
            Err(e) => ImageBuildEvent::Error(api_error(&e)),
        };
        let _ = line_tx.send(Ok(ndjson(&last))).await;
    });
    let stream = futures_util::stream::unfold(line_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// Import an image
///
/// Imports a container image (`oci-archive:PATH`, `docker-archive:PATH`, `oci:DIR[:TAG]`)
/// or a disk image (`qcow2:PATH`, `raw:PATH`) on the daemon's host as an image booted by
/// kiln's kernel and agent, and streams the import like `image_build`. A container image's
/// `Env`, `WorkingDir`, `User`, `Entrypoint` and `Cmd` become the image's; a disk image's
/// root partition (ext2/3/4) becomes its root file system. The source is never modified.
#[utoipa::path(
    post,
    path = routes::IMAGE_IMPORT.path,
    operation_id = routes::IMAGE_IMPORT.operation_id,
    tag = "images",
    request_body(content = ImageImportRequest, description = "The source and the image name", content_type = "application/json", example = json!({"source": "oci-archive:/srv/app.tar", "name": "app"})),
    responses(
        (status = 200, description = "The import's events, one JSON document per line, the last one `done` or `error`", content_type = "application/x-ndjson", body = ImageBuildEvent),
        (status = 400, description = "Malformed body, unknown scheme, relative or missing path, a disk image that is not of the named format or has a backing file, no name for a disk image, an invalid name (`bad_request`)", body = ApiError),
        (status = 500, description = "The import's checks could not run (`image_error`)", body = ApiError),
    ),
)]
pub(super) async fn image_import(
    State(engine): Shared,
    body: Bytes,
) -> Result<Response, HttpError> {
    let req: ImageImportRequest = parse_required(&body)?;
    let name = engine
        .image_import_check(&req.source, req.name.as_deref())
        .await?;
    Ok(stream_events(move |ev_tx| async move {
        let image = engine.image_import(req.source, Some(name), ev_tx).await?;
        Ok((image, false))
    }))
}

fn ndjson<T: Serialize>(v: &T) -> Bytes {
    let mut line = serde_json::to_vec(v)
        .unwrap_or_else(|e| format!("{{\"type\":\"log\",\"line\":\"{e}\"}}").into_bytes());
    line.push(b'\n');
    Bytes::from(line)
}
