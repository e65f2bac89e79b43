//! The snapshot routes: take a user snapshot of a sandbox, list and delete snapshots.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_api_types::routes;
use kiln_api_types::{ApiError, SnapshotCreateRequest, SnapshotInfo, SnapshotList, SnapshotName};

use super::{HttpError, ID_PARAM, Shared, json, parse_name, parse_required, resolve};

/// Snapshot a sandbox
///
/// Captures a user snapshot of a running sandbox, which keeps running (paused for
/// `pause_ms`).
#[utoipa::path(
    post,
    path = routes::SNAPSHOT_CREATE.path,
    operation_id = routes::SNAPSHOT_CREATE.operation_id,
    tag = "snapshots",
    params(("id" = String, Path, description = ID_PARAM)),
    request_body(content = SnapshotCreateRequest, content_type = "application/json", example = json!({"name": "with-deps"})),
    responses(
        (status = 201, description = "The snapshot", body = SnapshotInfo),
        (status = 400, description = "Malformed id, body or name (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "Name taken or sandbox not running (`snapshot_exists`, `sandbox_not_running`)", body = ApiError),
        (status = 502, description = "The VM failed while capturing", body = ApiError),
        (status = 500, description = "Writing the snapshot failed (`snapshot_error`, `io_error`)", body = ApiError),
    ),
)]
pub(super) async fn snapshot_create(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: SnapshotCreateRequest = parse_required(&body)?;
    let info = engine.snapshot_create(&id, &req.name).await?;
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

/// List snapshots
///
/// Warm and user snapshots, with the running sandboxes restored from each.
#[utoipa::path(
    get,
    path = routes::SNAPSHOT_LIST.path,
    operation_id = routes::SNAPSHOT_LIST.operation_id,
    tag = "snapshots",
    responses(
        (status = 200, description = "All snapshots", body = SnapshotList),
        (status = 500, description = "The state database failed", body = ApiError),
    ),
)]
pub(super) async fn snapshot_list(State(engine): Shared) -> Result<Response, HttpError> {
    Ok(json(SnapshotList {
        snapshots: engine.snapshot_list()?,
    }))
}

/// Delete a snapshot
#[utoipa::path(
    delete,
    path = routes::SNAPSHOT_DELETE.path,
    operation_id = routes::SNAPSHOT_DELETE.operation_id,
    tag = "snapshots",
    params(("name" = String, Path, description = "Snapshot name")),
    responses(
        (status = 204, description = "Gone"),
        (status = 404, description = "No such snapshot (`snapshot_not_found`)", body = ApiError),
        (status = 409, description = "A running sandbox was restored from it (`snapshot_in_use`)", body = ApiError,
            example = json!({"code": "snapshot_in_use", "message": "snapshot \"with-deps\" is in use by running sandboxes sb-0123456789ab; remove them first"})),
        (status = 500, description = "Removing it failed", body = ApiError),
    ),
)]
pub(super) async fn snapshot_delete(
    State(engine): Shared,
    Path(name): Path<String>,
) -> Result<Response, HttpError> {
    engine.snapshot_remove(&parse_name::<SnapshotName>(&name)?)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
