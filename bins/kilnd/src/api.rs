//! The HTTP API: routes, request parsing and the one mapping from engine errors to HTTP.
//!
//! Routes are declared once. Each handler carries a `#[utoipa::path]` attribute whose path and
//! operation id are the constants of [`kiln_api_types::routes`] (the table the client builds
//! its requests from); `utoipa-axum`'s [`OpenApiRouter`] then turns the same list of handlers
//! into both the axum router ([`router`]) and the OpenAPI 3.1 document
//! ([`crate::openapi::openapi`], served at `GET /v1/openapi.json` and committed as
//! `docs/openapi.json`). Tests in [`crate::openapi`] fail when the route table and the document
//! disagree, when the committed document is stale, and when the engine returns an error code
//! that [`ErrorCode`] does not list.
//!
//! This module must hold no business logic: each handler parses, makes one engine call and
//! shapes the answer. Every error body is an [`ApiError`] with a stable `code`; a malformed
//! request is always a 4xx, never a 5xx. Authentication is not done here: the TCP listener
//! wraps this router in [`crate::auth`].

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_api_types::routes;
use kiln_api_types::{
    ApiError, DiskUsage, DoctorReport, ErrorCode, Event, ExecId, ExecInfo, ExecKillRequest,
    ExecList, ExecRequest, Health, NetworkUpdate, PingResponse, PruneReport, PruneRequest,
    SandboxFilter, SandboxId, SandboxInfo, SandboxList, SandboxSpec, SandboxStartRequest,
    SecretsUpdateRequest, SnapshotCreateRequest, SnapshotInfo, SnapshotList, SnapshotName,
    TtlRequest,
};
use kiln_core::{CoreError, Engine};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod desktop;
mod desktop_view;
mod images;
mod jobs;
mod pools;

type Shared = State<Arc<Engine>>;

/// Largest WebSocket message a client may send (stdin chunks, control messages).
const MAX_WS_MESSAGE: usize = 1 << 20;

/// Every route with its handler. Handlers that share a path go in one `routes!`.
pub(crate) fn api_routes() -> OpenApiRouter<Arc<Engine>> {
    OpenApiRouter::with_openapi(crate::openapi::ApiDoc::openapi())
        .routes(routes!(health_get))
        .routes(routes!(openapi_get))
        .routes(routes!(doctor_get))
        .routes(routes!(sandbox_list, sandbox_create))
        .routes(routes!(sandbox_get, sandbox_delete))
        .routes(routes!(sandbox_ping))
        .routes(routes!(sandbox_secrets_update))
        .routes(routes!(sandbox_pause))
        .routes(routes!(sandbox_resume))
        .routes(routes!(sandbox_stop))
        .routes(routes!(sandbox_start))
        .routes(routes!(sandbox_ttl_set))
        .routes(routes!(sandbox_network_set))
        .routes(routes!(event_stream))
        .routes(routes!(exec_detach, exec_list))
        .routes(routes!(exec_get))
        .routes(routes!(exec_kill))
        .routes(routes!(exec_attach))
        .routes(routes!(sandbox_logs))
        .routes(routes!(file_write, file_read, file_remove))
        .routes(routes!(file_list))
        .routes(routes!(file_stat))
        .routes(routes!(file_mkdir))
        .routes(routes!(file_rename))
        .routes(routes!(sandbox_exec))
        .routes(routes!(sandbox_run))
        .routes(routes!(snapshot_create))
        .routes(routes!(snapshot_list))
        .routes(routes!(snapshot_delete))
        .routes(routes!(images::image_list))
        .routes(routes!(images::image_build))
        .routes(routes!(images::image_build_recipe))
        .routes(routes!(images::image_import))
        .routes(routes!(images::image_delete))
        .routes(routes!(pools::pool_list))
        .routes(routes!(pools::pool_set))
        .routes(routes!(jobs::job_create, jobs::job_list))
        .routes(routes!(jobs::job_get, jobs::job_cancel))
        .routes(routes!(jobs::job_events))
        .routes(routes!(jobs::language_list))
        .routes(routes!(desktop::desktop_screenshot))
        .routes(routes!(desktop::desktop_act))
        .routes(routes!(desktop::review_export))
        .routes(routes!(jobs::cloude_run))
        .routes(routes!(jobs::cloude_status))
        .routes(routes!(desktop_view::desktop_view))
        .routes(routes!(system_df))
        .routes(routes!(system_prune))
}

/// The API's routes, without authentication (the unix socket's router).
pub fn router(engine: Arc<Engine>) -> Router {
    let (router, _) = api_routes().split_for_parts();
    router
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "no such API route".to_owned(),
            )
        })
        .layer(axum::middleware::map_response(json_errors))
        .with_state(engine)
}

/// Largest plain-text error body [`json_errors`] reads to quote it.
const MAX_REJECTION_TEXT: usize = 4096;

/// Turns the error responses axum produces itself (body over the limit, wrong method, a
/// missing WebSocket upgrade, ...) into [`ApiError`] bodies, so that every error of this API
/// has the one documented shape. Handler errors are JSON already and pass unchanged.
pub(crate) async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_REJECTION_TEXT)
        .await
        .unwrap_or_default();
    let code = match status {
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
        StatusCode::URI_TOO_LONG => ErrorCode::UriTooLong,
        s if s.is_client_error() => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        String::from_utf8_lossy(&text).trim().to_owned()
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.remove(axum::http::header::CONTENT_TYPE);
    let mut out = error(status, code, message).into_response();
    for (name, value) in &parts.headers {
        out.headers_mut().insert(name, value.clone());
    }
    out
}

/// An error response.
#[derive(Debug)]
pub struct HttpError(StatusCode, ApiError, Option<u64>);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, axum::Json(self.1)).into_response();
        if let Some(secs) = self.2 {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        resp
    }
}

/// An error answer with an [`ApiError`] body.
pub(crate) fn error(status: StatusCode, code: ErrorCode, message: String) -> HttpError {
    HttpError(
        status,
        ApiError {
            code: code.as_str().to_owned(),
            message,
        },
        None,
    )
}

/// The one mapping from engine errors to HTTP statuses.
pub fn status_of(e: &CoreError) -> StatusCode {
    match e {
        CoreError::BadRequest(_) | CoreError::Invalid(_) | CoreError::AmbiguousSandbox { .. } => {
            StatusCode::BAD_REQUEST
        }
        CoreError::NameTaken(_) | CoreError::WrongState { .. } => StatusCode::CONFLICT,
        CoreError::SandboxNotFound(_)
        | CoreError::ExecNotFound(_)
        | CoreError::JobNotFound(_)
        | CoreError::RecipeNotFound { .. }
        | CoreError::ImageNotFound { .. }
        | CoreError::SnapshotNotFound(_) => StatusCode::NOT_FOUND,
        CoreError::SnapshotExists(_)
        | CoreError::SnapshotUnusable { .. }
        | CoreError::SnapshotInUse { .. }
        | CoreError::ImageInUse { .. }
        | CoreError::PortUnavailable { .. }
        | CoreError::NotADesktop(_) => StatusCode::CONFLICT,
        CoreError::GuestCommand(_) => StatusCode::UNPROCESSABLE_ENTITY,
        CoreError::ExecRejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
        CoreError::SandboxFailed { .. } | CoreError::Agent(_) | CoreError::Vmm(_) => {
            StatusCode::BAD_GATEWAY
        }
        CoreError::HostSetup(_)
        | CoreError::Unresponsive { .. }
        | CoreError::NetworkUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        CoreError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
        CoreError::OverCapacity { .. } | CoreError::QueueFull { .. } => {
            StatusCode::TOO_MANY_REQUESTS
        }
        CoreError::File { kind, .. } => {
            use kiln_core::files::FileErrorKind as K;
            match kind {
                K::NotFound => StatusCode::NOT_FOUND,
                K::Conflict => StatusCode::CONFLICT,
                K::InvalidPath => StatusCode::BAD_REQUEST,
                K::PermissionDenied => StatusCode::FORBIDDEN,
                K::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
                K::Busy => StatusCode::TOO_MANY_REQUESTS,
                K::Unsupported => StatusCode::NOT_IMPLEMENTED,
                K::Io => StatusCode::INTERNAL_SERVER_ERROR,
            }
        }
        CoreError::Image(_) if e.code() == "bad_recipe" => StatusCode::BAD_REQUEST,
        CoreError::Image(_) if e.code() == "build_failed" => StatusCode::UNPROCESSABLE_ENTITY,
        CoreError::Image(_) if e.code() == "image_not_found" => StatusCode::NOT_FOUND,
        CoreError::Image(_)
        | CoreError::Snapshot(_)
        | CoreError::Store(_)
        | CoreError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The API error body of an engine error.
pub fn api_error(e: &CoreError) -> ApiError {
    ApiError {
        code: e.code().to_owned(),
        message: e.chain(),
    }
}

impl From<CoreError> for HttpError {
    fn from(e: CoreError) -> Self {
        let retry_after = match &e {
            CoreError::OverCapacity {
                retry_after_secs, ..
            }
            | CoreError::QueueFull {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        };
        HttpError(status_of(&e), api_error(&e), retry_after)
    }
}

/// Parses a JSON body; an empty body means the type's default.
fn parse_body<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, HttpError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_required(body)
}

/// Parses a JSON body that has required fields. Only a JSON object is a request body: serde
/// would also read a struct from an array of its fields in order (`["base",2,512,true]`),
/// which no client means.
fn parse_required<T: DeserializeOwned>(body: &Bytes) -> Result<T, HttpError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "invalid request body: expected a JSON object".to_owned(),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("invalid request body: {e}"),
        )
    })
}

/// The sandbox a path's `{id}` names: an id, a name or an unambiguous id prefix.
fn resolve(engine: &Engine, raw: &str) -> Result<SandboxId, HttpError> {
    Ok(engine.resolve(raw)?)
}

/// A name from a path segment, as its newtype (400 naming the rule otherwise).
fn parse_name<T: std::str::FromStr<Err = kiln_api_types::InvalidInput>>(
    raw: &str,
) -> Result<T, HttpError> {
    raw.parse().map_err(|e: kiln_api_types::InvalidInput| {
        error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            e.to_string(),
        )
    })
}

fn json<T: Serialize>(v: T) -> Response {
    axum::Json(v).into_response()
}

const ID_PARAM: &str =
    "Sandbox id (`sb-` and 12 lowercase hex digits), its name, or an unambiguous id prefix";

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
async fn health_get(State(engine): Shared) -> Response {
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
async fn openapi_get() -> Response {
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
async fn doctor_get(State(engine): Shared) -> Response {
    json(kiln_core::doctor::run(engine.home()).await)
}

/// List sandboxes
///
/// The sandboxes (oldest first, in every state) that pass every filter given: `label=K=V`
/// (or `label=K`: any value), `status=STATE` (repeatable: any of them), `name=NAME`.
#[utoipa::path(
    get,
    path = routes::SANDBOX_LIST.path,
    operation_id = routes::SANDBOX_LIST.operation_id,
    tag = "sandboxes",
    params(
        ("label" = Option<Vec<String>>, Query, description = "`KEY=VALUE` or `KEY`; repeatable, all must hold"),
        ("status" = Option<Vec<kiln_api_types::SandboxState>>, Query, description = "Any of these states"),
        ("name" = Option<String>, Query, description = "This name"),
    ),
    responses(
        (status = 200, description = "The matching sandboxes", body = SandboxList),
        (status = 400, description = "Unknown filter or malformed value (`bad_request`)", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ),
)]
async fn sandbox_list(
    State(engine): Shared,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, HttpError> {
    let mut filter = SandboxFilter::default();
    for (k, v) in &query {
        filter.add(&format!("{k}={v}")).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                e.to_string(),
            )
        })?;
    }
    Ok(json(SandboxList {
        sandboxes: engine.sandbox_list(&filter)?,
    }))
}

/// Create a sandbox
///
/// Starts a sandbox from an image (built first if missing) or a user snapshot, and answers
/// once the agent answered, secrets are in place and the image's on-restore hook passed. An
/// empty body means all defaults.
#[utoipa::path(
    post,
    path = routes::SANDBOX_CREATE.path,
    operation_id = routes::SANDBOX_CREATE.operation_id,
    tag = "sandboxes",
    request_body(content = Option<SandboxSpec>, description = "The sandbox to start; every field is optional", content_type = "application/json",
        example = json!({"source": {"kind": "image", "image": "python", "machine": {"cpus": 1, "memory_mib": 256}}, "name": "web-1", "labels": {"team": "ml"}, "lifetime": {"ttl_secs": 3600}})),
    responses(
        (status = 201, description = "The sandbox runs", body = SandboxInfo),
        (status = 400, description = "Malformed request or value out of range (`bad_request`)", body = ApiError,
            example = json!({"code": "bad_request", "message": "cpus must be between 1 and 16, got 0"})),
        (status = 404, description = "No such image or snapshot (`image_not_found`, `snapshot_not_found`)", body = ApiError),
        (status = 409, description = "The snapshot is unusable, a host port or the name is taken (`snapshot_unusable`, `port_unavailable`, `name_taken`)", body = ApiError),
        (status = 422, description = "The image's on-boot command, readiness probe or on-restore hook failed (`guest_command_failed`)", body = ApiError),
        (status = 502, description = "The VM died or could not start (`sandbox_failed`, `agent_error`, `vmm_error`)", body = ApiError),
        (status = 503, description = "The host lacks something kiln needs (`host_setup`)", body = ApiError),
        (status = 500, description = "kiln's own state failed (`image_error`, `snapshot_error`, `store_error`, `io_error`)", body = ApiError),
    ),
)]
async fn sandbox_create(State(engine): Shared, body: Bytes) -> Result<Response, HttpError> {
    let spec: SandboxSpec = parse_body(&body)?;
    let info = engine.sandbox_create(&spec).await?;
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

/// Get a sandbox
#[utoipa::path(
    get,
    path = routes::SANDBOX_GET.path,
    operation_id = routes::SANDBOX_GET.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM)),
    responses(
        (status = 200, description = "The sandbox", body = SandboxInfo),
        (status = 400, description = "Malformed or ambiguous id (`bad_request`, `ambiguous_sandbox`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError,
            example = json!({"code": "sandbox_not_found", "message": "no sandbox sb-0123456789ab"})),
    ),
)]
async fn sandbox_get(State(engine): Shared, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(json(engine.sandbox_get(&resolve(&engine, &id)?)?))
}

/// Delete a sandbox
///
/// Stops its VM (if any) and removes it with its disk layer.
#[utoipa::path(
    delete,
    path = routes::SANDBOX_DELETE.path,
    operation_id = routes::SANDBOX_DELETE.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM)),
    responses(
        (status = 204, description = "Gone"),
        (status = 400, description = "Malformed or ambiguous id (`bad_request`, `ambiguous_sandbox`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 500, description = "Removing its state failed", body = ApiError),
    ),
)]
async fn sandbox_delete(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    engine.sandbox_delete(&resolve(&engine, &id)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Ping a sandbox's agent
///
/// One round trip to the guest agent, timed inside the daemon.
#[utoipa::path(
    post,
    path = routes::SANDBOX_PING.path,
    operation_id = routes::SANDBOX_PING.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM)),
    responses(
        (status = 200, description = "The agent answered", body = PingResponse),
        (status = 400, description = "Malformed or ambiguous id (`bad_request`, `ambiguous_sandbox`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "The sandbox is not running (`sandbox_not_running`)", body = ApiError),
        (status = 502, description = "The agent channel failed (`agent_error`, `sandbox_failed`)", body = ApiError),
    ),
)]
async fn sandbox_ping(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let rtt = engine.sandbox_ping(&resolve(&engine, &id)?).await?;
    Ok(json(PingResponse {
        rtt_us: rtt.as_micros() as u64,
    }))
}

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
async fn sandbox_exec(
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
async fn sandbox_run(State(engine): Shared, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| crate::exec_ws::run(engine, socket))
}

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
async fn snapshot_create(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: SnapshotCreateRequest = parse_required(&body)?;
    let info = engine.snapshot_create(&id, &req.name).await?;
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

/// Update a sandbox's secrets
///
/// Delivers new secret values into the guest and reruns the image's on-restore hook.
#[utoipa::path(
    post,
    path = routes::SANDBOX_SECRETS_UPDATE.path,
    operation_id = routes::SANDBOX_SECRETS_UPDATE.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM)),
    request_body(content = SecretsUpdateRequest, content_type = "application/json", example = json!({"secrets": {"PGPASSWORD": "s3cret"}})),
    responses(
        (status = 204, description = "Delivered; the hook reran"),
        (status = 400, description = "Malformed id or body, bad secret name (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "The sandbox is not running (`sandbox_not_running`)", body = ApiError),
        (status = 422, description = "The on-restore hook failed (`guest_command_failed`)", body = ApiError),
        (status = 502, description = "The agent channel failed", body = ApiError),
    ),
)]
async fn sandbox_secrets_update(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: SecretsUpdateRequest = parse_required(&body)?;
    engine.sandbox_secrets_update(&id, &req.secrets).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Pause a sandbox
///
/// Stops its vCPUs in place (no CPU use; memory and devices kept). Commands, files and
/// snapshots are refused with `sandbox_not_running` until it is resumed.
#[utoipa::path(
    post,
    path = routes::SANDBOX_PAUSE.path,
    operation_id = routes::SANDBOX_PAUSE.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM)),
    responses(
        (status = 200, description = "Paused", body = SandboxInfo),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "Not running (`sandbox_not_running`)", body = ApiError),
        (status = 502, description = "QEMU failed (`vmm_error`)", body = ApiError),
    ),
)]
async fn sandbox_pause(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    Ok(json(engine.sandbox_pause(&id).await?))
}

/// Resume a sandbox
#[utoipa::path(
    post,
    path = routes::SANDBOX_RESUME.path,
    operation_id = routes::SANDBOX_RESUME.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM)),
    responses(
        (status = 200, description = "Running again", body = SandboxInfo),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "Not paused (`sandbox_not_paused`)", body = ApiError),
        (status = 502, description = "QEMU failed (`vmm_error`)", body = ApiError),
    ),
)]
async fn sandbox_resume(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    Ok(json(engine.sandbox_resume(&id).await?))
}

/// Stop a sandbox, keeping its data
///
/// Saves its memory and disk (secret values are scrubbed first and never saved) and stops
/// its VM. `sandbox_start` brings it back as it was, also after a daemon restart or a host
/// reboot. If the save fails the sandbox goes on running.
#[utoipa::path(
    post,
    path = routes::SANDBOX_STOP.path,
    operation_id = routes::SANDBOX_STOP.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM)),
    responses(
        (status = 200, description = "Stopped and saved", body = SandboxInfo),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "Neither running nor paused (`sandbox_not_running`)", body = ApiError),
        (status = 502, description = "The VM failed while saving", body = ApiError),
        (status = 500, description = "Writing the save failed (`snapshot_error`, `io_error`)", body = ApiError),
    ),
)]
async fn sandbox_stop(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    Ok(json(engine.sandbox_stop(&id).await?))
}

/// Start a stopped sandbox
///
/// Restores it from its save under the same id, delivers the given secrets and reruns the
/// image's on-restore hook. A start that fails leaves it stopped with its save.
#[utoipa::path(
    post,
    path = routes::SANDBOX_START.path,
    operation_id = routes::SANDBOX_START.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM)),
    request_body(content = Option<SandboxStartRequest>, description = "Secrets to deliver; an empty body means none", content_type = "application/json"),
    responses(
        (status = 200, description = "Running again", body = SandboxInfo),
        (status = 400, description = "Malformed body or secret (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "Not stopped, or a host port is taken (`sandbox_not_stopped`, `port_unavailable`, `snapshot_unusable`)", body = ApiError),
        (status = 422, description = "The on-restore hook failed (`guest_command_failed`)", body = ApiError),
        (status = 502, description = "The VM failed to restore", body = ApiError),
    ),
)]
async fn sandbox_start(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: SandboxStartRequest = parse_body(&body)?;
    Ok(json(engine.sandbox_start(&id, &req.secrets).await?))
}

/// Set a sandbox's remaining lifetime
///
/// The sandbox is removed `ttl_secs` from now (replacing any earlier deadline).
#[utoipa::path(
    post,
    path = routes::SANDBOX_TTL_SET.path,
    operation_id = routes::SANDBOX_TTL_SET.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM)),
    request_body(content = TtlRequest, content_type = "application/json", example = json!({"ttl_secs": 600})),
    responses(
        (status = 200, description = "The new deadline is `expires_unix`", body = SandboxInfo),
        (status = 400, description = "Malformed body or out of range (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "Not running or paused (`sandbox_not_running`)", body = ApiError),
    ),
)]
async fn sandbox_ttl_set(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: TtlRequest = parse_required(&body)?;
    Ok(json(engine.sandbox_set_ttl(&id, req.ttl_secs).await?))
}

/// Change a sandbox's network policy
///
/// Between `allow` (new rules) and `nat`, while it runs; connections the new policy forbids
/// are reset at once. `none` and `bridge` are chosen at create and do not change.
#[utoipa::path(
    post,
    path = routes::SANDBOX_NETWORK_SET.path,
    operation_id = routes::SANDBOX_NETWORK_SET.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM)),
    request_body(content = NetworkUpdate, content_type = "application/json", example = json!({"network": {"mode": "allow", "rules": ["pypi.org", "*.pythonhosted.org:443"]}})),
    responses(
        (status = 200, description = "The policy is in force; `network` shows it", body = SandboxInfo),
        (status = 400, description = "Malformed body, a bad rule, or a change between modes that cannot change at run time (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "Not running or paused (`sandbox_not_running`)", body = ApiError),
    ),
)]
async fn sandbox_network_set(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: NetworkUpdate = parse_required(&body)?;
    Ok(json(engine.sandbox_network_set(&id, &req.network).await?))
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
async fn event_stream(State(engine): Shared) -> Response {
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
async fn exec_detach(
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
async fn exec_list(State(engine): Shared, Path(id): Path<String>) -> Result<Response, HttpError> {
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
async fn exec_get(
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
async fn exec_kill(
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
async fn exec_attach(
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

/// Query of [`sandbox_logs`].
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    /// Keep the response open and send what the console prints next, until the sandbox's
    /// VM goes away.
    #[serde(default)]
    follow: bool,
}

/// How often a followed console is checked for new output.
const LOG_FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(200);
/// Bytes read from a console file at a time.
const LOG_CHUNK: usize = 64 << 10;

/// A sandbox's guest console
///
/// What the guest's serial console printed (kernel and agent messages), kept while the
/// sandbox exists: earlier VMs of it (before a stop, or until it failed), then the current
/// one. Each part is capped (the newest 2 to 4 MiB are kept), so a guest that floods its
/// console loses its oldest output, never the host's disk. With `follow=true` the response
/// stays open and carries new output as it comes.
#[utoipa::path(
    get,
    path = routes::SANDBOX_LOGS.path,
    operation_id = routes::SANDBOX_LOGS.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM), LogsQuery),
    responses(
        (status = 200, description = "The console text", content_type = "text/plain", body = String),
        (status = 400, description = "Malformed id or query (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
    ),
)]
async fn sandbox_logs(
    State(engine): Shared,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let console = engine.console_stream(&id)?;
    let (line_tx, line_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut console = Some(console);
        let mut first = true;
        // Everything kept, then (following) what the console prints next, across rotations
        // of its capped log, until the sandbox's VM goes away.
        while first || (q.follow && engine.console_live(&id) && !line_tx.is_closed()) {
            if !first {
                tokio::time::sleep(LOG_FOLLOW_POLL).await;
            }
            first = false;
            loop {
                let Some(mut c) = console.take() else { return };
                // File reads stay off the async workers.
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; LOG_CHUNK];
                    let r = c.read(&mut buf).map(|n| {
                        buf.truncate(n);
                        buf
                    });
                    (c, r)
                })
                .await;
                let Ok((c, r)) = read else { return };
                console = Some(c);
                match r {
                    Ok(chunk) if chunk.is_empty() => break,
                    Ok(chunk) => {
                        if line_tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(line_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                e.to_string(),
            )
        })
}

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
async fn file_write(
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
async fn file_read(
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
async fn file_remove(
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
async fn file_list(
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
async fn file_stat(
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
async fn file_mkdir(
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
async fn file_rename(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: kiln_api_types::FileRenameRequest = parse_required(&body)?;
    Ok(json(engine.file_rename(&id, &req.from, &req.to).await?))
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
async fn snapshot_list(State(engine): Shared) -> Result<Response, HttpError> {
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
async fn snapshot_delete(
    State(engine): Shared,
    Path(name): Path<String>,
) -> Result<Response, HttpError> {
    engine.snapshot_remove(&parse_name::<SnapshotName>(&name)?)?;
    Ok(StatusCode::NO_CONTENT.into_response())
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
async fn system_df(State(engine): Shared) -> Result<Response, HttpError> {
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
async fn system_prune(State(engine): Shared, body: Bytes) -> Result<Response, HttpError> {
    let req: PruneRequest = parse_required(&body)?;
    Ok(json(engine.storage_prune(req.dry_run).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_of_bad_request_is_4xx() {
        assert_eq!(
            status_of(&CoreError::BadRequest("x".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status_of(&CoreError::SandboxNotFound("sb-0".into())),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn image_import_bad_sources_are_400_before_the_stream() {
        for (source, name, why) in [
            ("docker://alpine", None, "unknown scheme"),
            (
                "oci-archive:/nonexistent/kiln/app.tar",
                None,
                "/nonexistent/kiln/app.tar",
            ),
            ("oci-archive:relative.tar", None, "must be absolute"),
            ("qcow2:/nonexistent/disk.qcow2", None, "--name"),
            (
                "raw:/nonexistent/disk.img",
                Some("disk"),
                "/nonexistent/disk.img",
            ),
            (
                "oci-archive:/nonexistent/app.tar",
                Some("../x"),
                "invalid image name",
            ),
        ] {
            let err = kiln_core::images::check_import(source, name).expect_err(source);
            assert_eq!(status_of(&err), StatusCode::BAD_REQUEST, "{source}: {err}");
            assert_eq!(err.code(), "bad_request", "{source}");
            assert!(err.chain().contains(why), "{source}: {}", err.chain());
        }
    }

    #[test]
    fn parse_body_takes_only_objects() {
        for body in [
            &b"[\"base\",2,512,true]"[..],
            b"[true]",
            b"5",
            b"\"x\"",
            b"null",
        ] {
            let err =
                parse_body::<SandboxSpec>(&Bytes::copy_from_slice(body)).expect_err("refused");
            assert_eq!(err.0, StatusCode::BAD_REQUEST);
            assert!(err.1.message.contains("JSON object"), "{}", err.1.message);
        }
        assert!(parse_required::<TtlRequest>(&Bytes::from_static(b" {\"ttl_secs\":5}")).is_ok());
    }

    #[test]
    fn parse_body_rejects_garbage_with_400() {
        let err = parse_body::<SandboxSpec>(&Bytes::from_static(b"{nope"))
            .err()
            .unwrap();
        assert_eq!(err.0, StatusCode::BAD_REQUEST);
        assert_eq!(err.1.code, "bad_request");
        let ok: SandboxSpec = parse_body(&Bytes::from_static(b"  ")).unwrap();
        assert_eq!(ok, SandboxSpec::default());
    }

    #[test]
    fn parse_name_rejects_path_tricks() {
        assert!(parse_name::<SnapshotName>("..").is_err());
        assert!(parse_name::<kiln_api_types::ImageName>("a/b").is_err());
        assert!(parse_name::<SnapshotName>("warm-abc").is_ok());
    }
}
