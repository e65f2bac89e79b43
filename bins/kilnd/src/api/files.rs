//! The file routes: write, read, remove, list, stat, mkdir and rename of paths in a sandbox
//! (bodies streamed both ways).

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_api_types::routes;
use kiln_api_types::{ApiError, ErrorCode};

use super::{HttpError, ID_PARAM, Shared, error, json, parse_required, resolve};

/// Write a file into a sandbox
///
/// The request body is the file's bytes (streamed: any size, bounded memory). It is written
/// beside `path` and renamed into place once complete and synced, so `path` never shows a
/// partial file; a request that breaks off leaves nothing. With `tar=true` the body is a tar
/// archive unpacked into the directory `path` (which must not exist or be empty; modes and
/// symlinks kept; entries escaping the directory are refused). Answers the new file's
/// metadata.
#[utoipa::path(
    put,
    path = routes::FILE_WRITE.path,
    operation_id = routes::FILE_WRITE.operation_id,
    tag = "files",
    params(("id" = String, Path, description = ID_PARAM), kiln_api_types::FileWriteQuery),
    request_body(content = Vec<u8>, description = "The file's bytes, or a tar archive with `tar=true`", content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Written and in place", body = kiln_api_types::FileInfo),
        (status = 400, description = "Malformed path, mode or query; a tar entry escaping the target (`bad_request`, `invalid_path`)", body = ApiError),
        (status = 403, description = "The guest refused it (`permission_denied`)", body = ApiError),
        (status = 404, description = "No such sandbox, or the parent directory is missing (`sandbox_not_found`, `file_not_found`)", body = ApiError),
        (status = 409, description = "The sandbox is not running, or the target is a directory or not empty (`sandbox_not_running`, `file_conflict`)", body = ApiError),
        (status = 429, description = "Too many transfers at once in this sandbox (`too_many_transfers`)", body = ApiError),
        (status = 500, description = "Another failure in the guest (`file_io_error`)", body = ApiError),
        (status = 501, description = "The image's agent predates file operations (`files_unsupported`)", body = ApiError),
        (status = 502, description = "The agent channel failed (`agent_error`)", body = ApiError),
        (status = 507, description = "The guest's disk is full (`guest_disk_full`)", body = ApiError),
    ),
)]
pub(super) async fn file_write(
    State(engine): Shared,
    Path(id): Path<String>,
    Query(q): Query<kiln_api_types::FileWriteQuery>,
    body: Body,
) -> Result<Response, HttpError> {
    use futures_util::TryStreamExt;
    use tokio::io::AsyncWriteExt;
    let id = resolve(&engine, &id)?;
    let mode = q
        .mode
        .as_deref()
        .map(kiln_api_types::parse_mode)
        .transpose()
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                e.to_string(),
            )
        })?;
    let mut upload = engine.file_upload(&id, &q.path, mode, q.tar).await?;
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.try_next().await.map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("the request body broke off: {e}"),
        )
    })? {
        upload
            .write_all(&chunk)
            .await
            .map_err(|e| kiln_core::files::transfer_error(&q.path, e))?;
    }
    upload.finish().await?;
    let info = engine.file_stat(&id, &q.path).await?;
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

/// Read a file out of a sandbox
///
/// The file's bytes (streamed), or with `tar=true` a tar archive of the directory `path`.
/// A transfer the guest cannot complete ends the response early (the connection is closed
/// without the final chunk), never silently short. Errors before the first byte are
/// `ApiError` bodies; see `file_write` for their codes.
#[utoipa::path(
    get,
    path = routes::FILE_READ.path,
    operation_id = routes::FILE_READ.operation_id,
    tag = "files",
    params(("id" = String, Path, description = ID_PARAM), kiln_api_types::FileReadQuery),
    responses(
        (status = 200, description = "The bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "Malformed path or query (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox or path (`sandbox_not_found`, `file_not_found`)", body = ApiError),
        (status = 409, description = "Not running, or a directory without `tar` (`sandbox_not_running`, `file_conflict`)", body = ApiError),
    ),
)]
pub(super) async fn file_read(
    State(engine): Shared,
    Path(id): Path<String>,
    Query(q): Query<kiln_api_types::FileReadQuery>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let download = engine.file_download(&id, &q.path, q.tar).await?;
    let size = download.size();
    let stream = futures_util::stream::unfold(download, |mut d| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 << 10];
        match d.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), d))
            }
            // Ends the body with an error: the client sees a broken transfer, not EOF.
            Err(e) => Some((Err(e), d)),
        }
    });
    let mut resp = Response::builder().header(
        "content-type",
        if q.tar {
            "application/x-tar"
        } else {
            "application/octet-stream"
        },
    );
    if let Some(size) = size {
        resp = resp.header("x-kiln-file-size", size);
    }
    resp.body(Body::from_stream(stream)).map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
    })
}

/// Remove a path in a sandbox
#[utoipa::path(
    delete,
    path = routes::FILE_REMOVE.path,
    operation_id = routes::FILE_REMOVE.operation_id,
    tag = "files",
    params(("id" = String, Path, description = ID_PARAM), kiln_api_types::FileRemoveQuery),
    responses(
        (status = 204, description = "Gone"),
        (status = 400, description = "Malformed path (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox or path (`file_not_found`)", body = ApiError),
        (status = 409, description = "A non-empty directory without `recursive`, or not running (`file_conflict`, `sandbox_not_running`)", body = ApiError),
    ),
)]
pub(super) async fn file_remove(
    State(engine): Shared,
    Path(id): Path<String>,
    Query(q): Query<kiln_api_types::FileRemoveQuery>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    engine.file_remove(&id, &q.path, q.recursive).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// List a directory in a sandbox
///
/// One page (at most 256 entries, names in byte order); pass `next_after` as `after` for
/// the next one.
#[utoipa::path(
    get,
    path = routes::FILE_LIST.path,
    operation_id = routes::FILE_LIST.operation_id,
    tag = "files",
    params(("id" = String, Path, description = ID_PARAM), kiln_api_types::FileListQuery),
    responses(
        (status = 200, description = "One page of entries", body = kiln_api_types::FileList),
        (status = 400, description = "Malformed path or name (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox or directory (`file_not_found`)", body = ApiError),
        (status = 409, description = "Not a directory, or not running (`file_conflict`, `sandbox_not_running`)", body = ApiError),
    ),
)]
pub(super) async fn file_list(
    State(engine): Shared,
    Path(id): Path<String>,
    Query(q): Query<kiln_api_types::FileListQuery>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    Ok(json(
        engine.file_list(&id, &q.path, q.after.as_deref()).await?,
    ))
}

/// Metadata of a path in a sandbox
///
/// A symlink is described, not followed.
#[utoipa::path(
    get,
    path = routes::FILE_STAT.path,
    operation_id = routes::FILE_STAT.operation_id,
    tag = "files",
    params(("id" = String, Path, description = ID_PARAM), kiln_api_types::FilePathQuery),
    responses(
        (status = 200, description = "Its metadata", body = kiln_api_types::FileInfo),
        (status = 400, description = "Malformed path (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox or path (`file_not_found`)", body = ApiError),
        (status = 409, description = "Not running (`sandbox_not_running`)", body = ApiError),
    ),
)]
pub(super) async fn file_stat(
    State(engine): Shared,
    Path(id): Path<String>,
    Query(q): Query<kiln_api_types::FilePathQuery>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    Ok(json(engine.file_stat(&id, &q.path).await?))
}

/// Create a directory in a sandbox
#[utoipa::path(
    post,
    path = routes::FILE_MKDIR.path,
    operation_id = routes::FILE_MKDIR.operation_id,
    tag = "files",
    params(("id" = String, Path, description = ID_PARAM)),
    request_body(content = kiln_api_types::FileMkdirRequest, content_type = "application/json", example = json!({"path": "/srv/app/data", "parents": true})),
    responses(
        (status = 201, description = "The directory", body = kiln_api_types::FileInfo),
        (status = 400, description = "Malformed path or mode (`bad_request`)", body = ApiError),
        (status = 404, description = "A parent is missing without `parents` (`file_not_found`)", body = ApiError),
        (status = 409, description = "Something else is in the way, or not running (`file_conflict`, `sandbox_not_running`)", body = ApiError),
    ),
)]
pub(super) async fn file_mkdir(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: kiln_api_types::FileMkdirRequest = parse_required(&body)?;
    let info = engine
        .file_mkdir(&id, &req.path, req.parents, req.mode)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

/// Rename a path in a sandbox
#[utoipa::path(
    post,
    path = routes::FILE_RENAME.path,
    operation_id = routes::FILE_RENAME.operation_id,
    tag = "files",
    params(("id" = String, Path, description = ID_PARAM)),
    request_body(content = kiln_api_types::FileRenameRequest, content_type = "application/json", example = json!({"from": "/tmp/a", "to": "/tmp/b"})),
    responses(
        (status = 200, description = "The renamed path", body = kiln_api_types::FileInfo),
        (status = 400, description = "Malformed path (`bad_request`)", body = ApiError),
        (status = 404, description = "No such path (`file_not_found`)", body = ApiError),
        (status = 409, description = "The target is in the way, or not running (`file_conflict`, `sandbox_not_running`)", body = ApiError),
    ),
)]
pub(super) async fn file_rename(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: kiln_api_types::FileRenameRequest = parse_required(&body)?;
    Ok(json(engine.file_rename(&id, &req.from, &req.to).await?))
}
