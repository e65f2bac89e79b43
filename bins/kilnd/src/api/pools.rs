//! The warm pool routes: list the pools, set one pool's size (per image and machine size).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use kiln_api_types::routes;
use kiln_api_types::{ApiError, ImageName, PoolInfo, PoolList, PoolSetRequest};

use super::{HttpError, Shared, json, parse_name, parse_required};

/// List warm pools
///
/// Per image and machine size: how many sandboxes the daemon keeps restored ahead of demand,
/// how many are ready, and how often starts took one or found the pool empty.
#[utoipa::path(
    get,
    path = routes::POOL_LIST.path,
    operation_id = routes::POOL_LIST.operation_id,
    tag = "pools",
    responses(
        (status = 200, description = "Every pool", body = PoolList),
    ),
)]
pub(super) async fn pool_list(State(engine): Shared) -> Result<Response, HttpError> {
    Ok(json(engine.pool_list()))
}

/// Set a warm pool
///
/// Keeps `size` sandboxes of the image at this machine size restored ahead of demand (0
/// empties the pool). Kept in the store: it outlives the daemon and wins over the config
/// file. Starts of the image at exactly this machine size, without a network and not cold,
/// take a ready sandbox when there is one (`source: pool`) and restore otherwise.
#[utoipa::path(
    put,
    path = routes::POOL_SET.path,
    operation_id = routes::POOL_SET.operation_id,
    tag = "pools",
    params(("image" = String, Path, description = "Image name")),
    request_body(content = PoolSetRequest, content_type = "application/json", example = json!({"size": 2, "machine": {"cpus": 1, "memory_mib": 256}, "warmup": ["python3", "-c", "pass"]})),
    responses(
        (status = 200, description = "The pool as it is now (it fills in the background)", body = PoolInfo),
        (status = 400, description = "Malformed name or body, or a value out of range (`bad_request`)", body = ApiError),
        (status = 404, description = "No such image (`image_not_found`)", body = ApiError),
    ),
)]
pub(super) async fn pool_set(
    State(engine): Shared,
    Path(image): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let image: ImageName = parse_name(&image)?;
    let req: PoolSetRequest = parse_required(&body)?;
    Ok(json(engine.pool_set(&image, &req).await?))
}
