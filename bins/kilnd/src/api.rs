//! The HTTP API: routes, request parsing and the one mapping from engine errors to HTTP.
//!
//! ```text
//! GET    /v1/health                      Health
//! GET    /v1/sandboxes                   ?label=K=V&status=S&name=N -> SandboxList
//! POST   /v1/sandboxes                   SandboxSpec -> SandboxInfo (once the agent answers)
//! GET    /v1/sandboxes/{id}              SandboxInfo
//! DELETE /v1/sandboxes/{id}              204
//! POST   /v1/sandboxes/{id}/ping         PingResponse
//! POST   /v1/sandboxes/{id}/snapshot     SnapshotCreateRequest -> SnapshotInfo (201; sandbox keeps running)
//! POST   /v1/sandboxes/{id}/secrets      SecretsUpdateRequest -> 204 (delivered, hook rerun)
//! POST   /v1/sandboxes/{id}/pause        SandboxInfo (vCPUs stopped in place)
//! POST   /v1/sandboxes/{id}/resume       SandboxInfo
//! POST   /v1/sandboxes/{id}/ttl          TtlRequest -> SandboxInfo (lifetime ends ttl_secs from now)
//! POST   /v1/sandboxes/{id}/stop         SandboxInfo (memory and disk saved, QEMU stopped)
//! POST   /v1/sandboxes/{id}/start        SandboxStartRequest -> SandboxInfo (restored from its save)
//! GET    /v1/events                      text/event-stream of Event (lifecycle, exec start/end)
//! GET    /v1/sandboxes/{id}/exec         WebSocket: ExecRequest, then streams (docs/protocol.md)
//! GET    /v1/run                         WebSocket: RunRequest; fresh sandbox, one exec, teardown
//! GET    /v1/images                      ImageList
//! POST   /v1/images/{name}/build         ImageBuildRequest -> NDJSON stream of ImageBuildEvent
//! DELETE /v1/images/{name}               204
//! GET    /v1/snapshots                   SnapshotList
//! DELETE /v1/snapshots/{name}            204 (409 while a sandbox uses it)
//! ```
//!
//! `{id}` is a sandbox id, its name, or an unambiguous id prefix.
//!
//! Every error body is an [`ApiError`] with a stable `code`; a malformed request is always a
//! 4xx, never a 5xx.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kiln_api_types::{
    ApiError, Health, ImageBuildEvent, ImageBuildRequest, ImageList, PingResponse, SandboxFilter,
    SandboxId, SandboxList, SandboxSpec, SandboxStartRequest, SecretsUpdateRequest,
    SnapshotCreateRequest, SnapshotList, SnapshotName, TtlRequest,
};
use kiln_core::{CoreError, Engine};
use serde::Serialize;
use serde::de::DeserializeOwned;

type Shared = State<Arc<Engine>>;

/// Largest WebSocket message a client may send (stdin chunks, control messages).
const MAX_WS_MESSAGE: usize = 1 << 20;

/// The API's routes.
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/sandboxes", get(sandbox_list).post(sandbox_create))
        .route(
            "/v1/sandboxes/{id}",
            get(sandbox_get).delete(sandbox_delete),
        )
        .route("/v1/sandboxes/{id}/ping", post(sandbox_ping))
        .route("/v1/sandboxes/{id}/exec", get(sandbox_exec))
        .route("/v1/sandboxes/{id}/snapshot", post(snapshot_create))
        .route("/v1/sandboxes/{id}/secrets", post(secrets_update))
        .route("/v1/sandboxes/{id}/pause", post(sandbox_pause))
        .route("/v1/sandboxes/{id}/resume", post(sandbox_resume))
        .route("/v1/sandboxes/{id}/ttl", post(sandbox_ttl))
        .route("/v1/sandboxes/{id}/stop", post(sandbox_stop))
        .route("/v1/sandboxes/{id}/start", post(sandbox_start))
        .route("/v1/events", get(events))
        .route("/v1/snapshots", get(snapshot_list))
        .route(
            "/v1/snapshots/{name}",
            axum::routing::delete(snapshot_remove),
        )
        .route("/v1/run", get(run))
        .route("/v1/images", get(image_list))
        .route("/v1/images/{name}/build", post(image_build))
        .route("/v1/images/{name}", axum::routing::delete(image_remove))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such API route".to_owned(),
            )
        })
        .with_state(engine)
}

/// An error response.
#[derive(Debug)]
pub struct HttpError(StatusCode, ApiError);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

fn error(status: StatusCode, code: &str, message: String) -> HttpError {
    HttpError(
        status,
        ApiError {
            code: code.to_owned(),
            message,
        },
    )
}

/// The one mapping from engine errors to HTTP statuses.
pub fn status_of(e: &CoreError) -> StatusCode {
    match e {
        CoreError::BadRequest(_) => StatusCode::BAD_REQUEST,
        CoreError::Invalid(_) | CoreError::AmbiguousSandbox { .. } => StatusCode::BAD_REQUEST,
        CoreError::NameTaken(_) => StatusCode::CONFLICT,
        CoreError::SandboxNotFound(_)
        | CoreError::ImageNotFound { .. }
        | CoreError::SnapshotNotFound(_) => StatusCode::NOT_FOUND,
        CoreError::SnapshotExists(_)
        | CoreError::SnapshotUnusable { .. }
        | CoreError::SnapshotInUse { .. }
        | CoreError::PortUnavailable { .. } => StatusCode::CONFLICT,
        CoreError::GuestCommand(_) => StatusCode::UNPROCESSABLE_ENTITY,
        CoreError::WrongState { .. } => StatusCode::CONFLICT,
        CoreError::ExecRejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
        CoreError::SandboxFailed { .. } | CoreError::Agent(_) | CoreError::Vmm(_) => {
            StatusCode::BAD_GATEWAY
        }
        CoreError::HostSetup(_) => StatusCode::SERVICE_UNAVAILABLE,
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
        HttpError(status_of(&e), api_error(&e))
    }
}

/// Parses a JSON body; an empty body means the type's default.
fn parse_body<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, HttpError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("invalid request body: {e}"),
        )
    })
}

/// Parses a JSON body that has required fields.
fn parse_required<T: DeserializeOwned>(body: &Bytes) -> Result<T, HttpError> {
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("invalid request body: {e}"),
        )
    })
}

/// The sandbox a path's `{id}` names: an id, a name or an unambiguous id prefix.
fn resolve(engine: &Engine, raw: &str) -> Result<SandboxId, HttpError> {
    Ok(engine.resolve(raw)?)
}

fn json<T: Serialize>(v: T) -> Response {
    axum::Json(v).into_response()
}

async fn health(State(engine): Shared) -> Response {
    json(Health {
        api_version: kiln_api_types::API_VERSION,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        janitor: engine.janitor_report(),
    })
}

/// `?label=K=V&status=running&name=N`: every condition must hold.
async fn sandbox_list(
    State(engine): Shared,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, HttpError> {
    let mut filter = SandboxFilter::default();
    for (k, v) in &query {
        filter
            .add(&format!("{k}={v}"))
            .map_err(|e| error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    }
    Ok(json(SandboxList {
        sandboxes: engine.sandbox_list(&filter)?,
    }))
}

async fn sandbox_create(State(engine): Shared, body: Bytes) -> Result<Response, HttpError> {
    let spec: SandboxSpec = parse_body(&body)?;
    let info = engine.sandbox_create(&spec).await?;
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

async fn sandbox_get(State(engine): Shared, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(json(engine.sandbox_get(&resolve(&engine, &id)?)?))
}

async fn sandbox_delete(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    engine.sandbox_delete(&resolve(&engine, &id)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn sandbox_ping(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let rtt = engine.sandbox_ping(&resolve(&engine, &id)?).await?;
    Ok(json(PingResponse {
        rtt_us: rtt.as_micros() as u64,
    }))
}

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

async fn secrets_update(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: SecretsUpdateRequest = parse_required(&body)?;
    engine.sandbox_secrets_update(&id, &req.secrets).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn sandbox_pause(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    Ok(json(engine.sandbox_pause(&id).await?))
}

async fn sandbox_resume(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    Ok(json(engine.sandbox_resume(&id).await?))
}

async fn sandbox_stop(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    Ok(json(engine.sandbox_stop(&id).await?))
}

async fn sandbox_start(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: SandboxStartRequest = parse_body(&body)?;
    Ok(json(engine.sandbox_start(&id, &req.secrets).await?))
}

async fn sandbox_ttl(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: TtlRequest = parse_required(&body)?;
    Ok(json(engine.sandbox_set_ttl(&id, req.ttl_secs).await?))
}

/// Server-sent events: one `data:` line of JSON ([`kiln_api_types::Event`]) per event.
async fn events(State(engine): Shared) -> Response {
    let rx = engine.events();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let bytes = match rx.recv().await {
            Ok(ev) => {
                let mut line = b"data: ".to_vec();
                line.extend(serde_json::to_vec(&ev).unwrap_or_default());
                line.extend(b"\n\n");
                Bytes::from(line)
            }
            // A slow client missed some: it is told, and goes on with the newest.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                Bytes::from(format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n"))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::io::Error>(bytes), rx))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn snapshot_list(State(engine): Shared) -> Result<Response, HttpError> {
    Ok(json(SnapshotList {
        snapshots: engine.snapshot_list()?,
    }))
}

async fn snapshot_remove(
    State(engine): Shared,
    Path(name): Path<String>,
) -> Result<Response, HttpError> {
    let name: SnapshotName = name.parse().map_err(|e: kiln_api_types::InvalidInput| {
        error(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
    })?;
    engine.snapshot_remove(&name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn run(State(engine): Shared, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| crate::exec_ws::run(engine, socket))
}

async fn image_list(State(engine): Shared) -> Result<Response, HttpError> {
    Ok(json(ImageList {
        images: engine.image_list()?,
    }))
}

async fn image_remove(
    State(engine): Shared,
    Path(name): Path<String>,
) -> Result<Response, HttpError> {
    engine.image_remove(&name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Streams the build as newline-delimited JSON; the last line is `done` or `error`.
async fn image_build(
    State(engine): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let req: ImageBuildRequest = parse_body(&body)?;
    let _: kiln_api_types::ImageName =
        name.parse().map_err(|e: kiln_api_types::InvalidInput| {
            error(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
        })?;
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::channel::<ImageBuildEvent>(256);
    let (line_tx, line_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let build = engine.image_build(&name, req.force, ev_tx);
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
            Ok((image, up_to_date)) => ImageBuildEvent::Done { up_to_date, image },
            Err(e) => ImageBuildEvent::Error(api_error(&e)),
        };
        let _ = line_tx.send(Ok(ndjson(&last))).await;
    });
    let stream = futures_util::stream::unfold(line_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

fn ndjson<T: Serialize>(v: &T) -> Bytes {
    let mut line = serde_json::to_vec(v)
        .unwrap_or_else(|e| format!("{{\"type\":\"log\",\"line\":\"{e}\"}}").into_bytes());
    line.push(b'\n');
    Bytes::from(line)
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
    fn parse_body_rejects_garbage_with_400() {
        let err = parse_body::<SandboxSpec>(&Bytes::from_static(b"{nope"))
            .err()
            .unwrap();
        assert_eq!(err.0, StatusCode::BAD_REQUEST);
        assert_eq!(err.1.code, "bad_request");
        let ok: SandboxSpec = parse_body(&Bytes::from_static(b"  ")).unwrap();
        assert_eq!(ok, SandboxSpec::default());
    }
}
