//! The command routes: a command over a WebSocket in a sandbox or a fresh one, and detached
//! commands (start, list, get, signal, attach).

use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_api_types::routes;
use kiln_api_types::{ApiError, ExecId, ExecInfo, ExecKillRequest, ExecList, ExecRequest};

use super::{
    HttpError, ID_PARAM, MAX_WS_MESSAGE, Shared, json, parse_body, parse_name, parse_required,
    resolve,
};

/// Run a command in a sandbox (WebSocket)
///
/// Upgrades to a WebSocket. The client's first message is a text `ExecRequest`; the daemon
/// answers `ExecServerMessage` `started`, then binary output frames (first byte 1 = stdout,
/// 2 = stderr), and ends with `exit` or `error`. The client sends stdin as binary frames and
/// `ExecClientMessage`s as text. See docs/protocol.md.
#[utoipa::path(
    get,
    path = routes::SANDBOX_EXEC.path,
    operation_id = routes::SANDBOX_EXEC.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM)),
    responses(
        (status = 101, description = "Switching Protocols: the exec WebSocket (messages: ExecRequest, ExecClientMessage, ExecServerMessage)"),
        (status = 400, description = "Malformed id or not a WebSocket upgrade (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
    ),
)]
pub(super) async fn sandbox_exec(
    State(engine): Shared,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    // Existence is checked before upgrading so that a wrong id is a plain 404.
    engine.sandbox_get(&id)?;
    Ok(ws
        .max_message_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| crate::exec_ws::exec_in(engine, id, socket)))
}

/// Run a command in a fresh sandbox (WebSocket)
///
/// Upgrades to a WebSocket. The client's first message is a text `RunRequest` (the sandbox
/// and the command); the rest is as for `sandbox_exec`, with `started` carrying `boot_ms`.
/// The sandbox is destroyed once the command ends or the client goes away.
#[utoipa::path(
    get,
    path = routes::SANDBOX_RUN.path,
    operation_id = routes::SANDBOX_RUN.operation_id,
    tag = "sandboxes",
    responses(
        (status = 101, description = "Switching Protocols: the exec WebSocket (messages: RunRequest, ExecClientMessage, ExecServerMessage)"),
        (status = 400, description = "Not a WebSocket upgrade", body = ApiError),
    ),
)]
pub(super) async fn sandbox_run(State(engine): Shared, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| crate::exec_ws::run(engine, socket))
}

const EXEC_ID_PARAM: &str = "Detached command id (`ex-` and 12 lowercase hex digits)";

/// Start a detached command
///
/// Starts a command that keeps running with no client attached (its stdin is empty). Each
/// output stream keeps its last 1 MiB for `exec_attach`; the exit status is kept after it
/// ends. A sandbox holds at most 64 detached commands (ended ones make room first).
#[utoipa::path(
    post,
    path = routes::EXEC_DETACH.path,
    operation_id = routes::EXEC_DETACH.operation_id,
    tag = "execs",
    params(("id" = String, Path, description = ID_PARAM)),
    request_body(content = ExecRequest, content_type = "application/json", example = json!({"argv": ["python3", "-m", "http.server"]})),
    responses(
        (status = 201, description = "Started", body = ExecInfo),
        (status = 400, description = "Malformed request, stdin asked for, or too many detached commands (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "The sandbox is not running (`sandbox_not_running`)", body = ApiError),
        (status = 422, description = "The guest refused the command (`exec_rejected`)", body = ApiError),
        (status = 502, description = "The agent channel failed", body = ApiError),
    ),
)]
pub(super) async fn exec_detach(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: ExecRequest = parse_required(&body)?;
    let info = engine.exec_detach(&id, &req).await?;
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

/// List a sandbox's detached commands
#[utoipa::path(
    get,
    path = routes::EXEC_LIST.path,
    operation_id = routes::EXEC_LIST.operation_id,
    tag = "execs",
    params(("id" = String, Path, description = ID_PARAM)),
    responses(
        (status = 200, description = "Its detached commands, oldest first", body = ExecList),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
    ),
)]
pub(super) async fn exec_list(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    Ok(json(ExecList {
        execs: engine.exec_list(&id)?,
    }))
}

/// Get a detached command
#[utoipa::path(
    get,
    path = routes::EXEC_GET.path,
    operation_id = routes::EXEC_GET.operation_id,
    tag = "execs",
    params(("exec_id" = String, Path, description = EXEC_ID_PARAM)),
    responses(
        (status = 200, description = "The command", body = ExecInfo),
        (status = 400, description = "Malformed id (`bad_request`)", body = ApiError),
        (status = 404, description = "No such command (`exec_not_found`)", body = ApiError),
    ),
)]
pub(super) async fn exec_get(
    State(engine): Shared,
    Path(exec_id): Path<String>,
) -> Result<Response, HttpError> {
    let exec_id: ExecId = parse_name(&exec_id)?;
    Ok(json(engine.exec_get(&exec_id)?.info()))
}

/// Signal a detached command
///
/// Delivers a signal (default SIGTERM) to the command's process group.
#[utoipa::path(
    post,
    path = routes::EXEC_KILL.path,
    operation_id = routes::EXEC_KILL.operation_id,
    tag = "execs",
    params(("exec_id" = String, Path, description = EXEC_ID_PARAM)),
    request_body(content = Option<ExecKillRequest>, content_type = "application/json", example = json!({"signal": 9})),
    responses(
        (status = 200, description = "Delivered", body = ExecInfo),
        (status = 400, description = "Malformed id or signal, or the command has ended (`bad_request`)", body = ApiError),
        (status = 404, description = "No such command (`exec_not_found`)", body = ApiError),
    ),
)]
pub(super) async fn exec_kill(
    State(engine): Shared,
    Path(exec_id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let exec_id: ExecId = parse_name(&exec_id)?;
    let req: ExecKillRequest = parse_body(&body)?;
    Ok(json(engine.exec_kill(&exec_id, req.signal).await?))
}

/// Attach to a detached command (WebSocket)
///
/// Upgrades to a WebSocket on which the daemon sends `started`, then what the command's
/// buffer keeps (binary frames as for `sandbox_exec`; a `dropped` message when output was
/// lost before this client read it), then follows the command to its `exit` (or `error` if
/// its sandbox died). `ExecClientMessage` `signal` reaches the command; closing the socket
/// leaves it running.
#[utoipa::path(
    get,
    path = routes::EXEC_ATTACH.path,
    operation_id = routes::EXEC_ATTACH.operation_id,
    tag = "execs",
    params(("exec_id" = String, Path, description = EXEC_ID_PARAM)),
    responses(
        (status = 101, description = "Switching Protocols: the attach WebSocket (messages: ExecClientMessage, ExecServerMessage)"),
        (status = 400, description = "Malformed id or not a WebSocket upgrade (`bad_request`)", body = ApiError),
        (status = 404, description = "No such command (`exec_not_found`)", body = ApiError),
    ),
)]
pub(super) async fn exec_attach(
    State(engine): Shared,
    Path(exec_id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, HttpError> {
    let exec_id: ExecId = parse_name(&exec_id)?;
    let exec = engine.exec_get(&exec_id)?;
    Ok(ws
        .max_message_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| crate::exec_ws::attach(exec, socket)))
}
