//! The daemon's own routes: health, the OpenAPI document, the host check, the event stream,
//! disk usage and reclaiming space.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_api_types::routes;
use kiln_api_types::{ApiError, DiskUsage, DoctorReport, Event, Health, PruneReport, PruneRequest};

use super::{HttpError, Shared, json, parse_required};

/// Daemon health
///
/// API version, kiln version, the daemon's pid and what its startup janitor reclaimed. The
/// CLI polls this to know a daemon it started is up.
#[utoipa::path(
    get,
    path = routes::HEALTH_GET.path,
    operation_id = routes::HEALTH_GET.operation_id,
    tag = "daemon",
    responses((status = 200, description = "The daemon answers", body = Health)),
)]
pub(super) async fn health_get(State(engine): Shared) -> Response {
    json(Health {
        api_version: kiln_api_types::API_VERSION,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        janitor: engine.janitor_report(),
    })
}

/// This document
///
/// The OpenAPI 3.1 document of this API, generated from the daemon's code (the same text
/// as `docs/openapi.json`).
#[utoipa::path(
    get,
    path = routes::OPENAPI_GET.path,
    operation_id = routes::OPENAPI_GET.operation_id,
    tag = "daemon",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)),
)]
pub(super) async fn openapi_get() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        crate::openapi::openapi_json(),
    )
        .into_response()
}

/// Host check
///
/// What kiln will use on the daemon's host (QEMU, accelerator, agent binary, free space,
/// host packages) and why; `problems` is empty when sandboxes can run.
#[utoipa::path(
    get,
    path = routes::DOCTOR_GET.path,
    operation_id = routes::DOCTOR_GET.operation_id,
    tag = "daemon",
    responses((status = 200, description = "The report (also when it lists problems)", body = DoctorReport)),
)]
pub(super) async fn doctor_get(State(engine): Shared) -> Response {
    json(kiln_core::doctor::run(engine.home()).await)
}

/// Follow events
///
/// Server-sent events: first the comment `: subscribed` (from then on nothing is missed), then
/// one `data:` line with an `Event` (lifecycle transitions, each recorded before it is sent;
/// exec start and end; removals) per event, as they happen. A client that
/// falls behind by more than 1024 events gets an `event: lagged` entry saying how many it
/// missed, then goes on with the newest.
#[utoipa::path(
    get,
    path = routes::EVENT_STREAM.path,
    operation_id = routes::EVENT_STREAM.operation_id,
    tag = "daemon",
    responses((status = 200, description = "The event stream", content_type = "text/event-stream", body = Event)),
)]
pub(super) async fn event_stream(State(engine): Shared) -> Response {
    let rx = engine.events();
    // A comment first: a client that sees it knows it is subscribed (nothing after it is
    // missed).
    let hello = futures_util::stream::once(async {
        Ok::<_, std::io::Error>(Bytes::from_static(b": subscribed\n\n"))
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        let bytes = match rx.recv().await {
            Ok(ev) => {
                let mut line = b"data: ".to_vec();
                line.extend(serde_json::to_vec(&ev).unwrap_or_default());
                line.extend(b"\n\n");
                Bytes::from(line)
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                Bytes::from(format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n"))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::io::Error>(bytes), rx))
    });
    let stream = futures_util::StreamExt::chain(hello, events);
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Disk usage
///
/// What kiln's state directory takes on disk, by category (images, warm and user
/// snapshots, sandboxes, stopped sandboxes' saves, build caches, logs, other): apparent
/// bytes and bytes on disk as `du` counts them (each inode once, in the first category
/// that reaches it), item by item with what `system_prune` would remove and why the rest is
/// kept.
#[utoipa::path(
    get,
    path = routes::SYSTEM_DF.path,
    operation_id = routes::SYSTEM_DF.operation_id,
    tag = "system",
    responses(
        (status = 200, description = "The state directory, category by category", body = DiskUsage),
        (status = 500, description = "The state database or the image manifests could not be read", body = ApiError),
    ),
)]
pub(super) async fn system_df(State(engine): Shared) -> Result<Response, HttpError> {
    Ok(json(engine.storage_df().await?))
}

/// Reclaim space
///
/// Removes what nothing uses: warm snapshots whose image is gone or was rebuilt, cached
/// kernels no image uses and downloaded packages (not while a build runs), build
/// directories of dead builds, and the saves and consoles of removed sandboxes. Never what a
/// sandbox, a start or a build in progress uses. `reclaimed` lists only what was removed,
/// with its size measured before; `kept` what a live user holds; `failed` what could not be
/// removed, with the error. With `dry_run`, nothing is removed and `reclaimed` is what would
/// be.
#[utoipa::path(
    post,
    path = routes::SYSTEM_PRUNE.path,
    operation_id = routes::SYSTEM_PRUNE.operation_id,
    tag = "system",
    request_body(content = PruneRequest, content_type = "application/json", example = json!({"dry_run": true})),
    responses(
        (status = 200, description = "What was (or would be) removed, kept and not removed", body = PruneReport),
        (status = 400, description = "Malformed body (`bad_request`)", body = ApiError),
        (status = 500, description = "The state database or the image manifests could not be read", body = ApiError),
    ),
)]
pub(super) async fn system_prune(
    State(engine): Shared,
    body: Bytes,
) -> Result<Response, HttpError> {
    let req: PruneRequest = parse_required(&body)?;
    Ok(json(engine.storage_prune(req.dry_run).await?))
}
