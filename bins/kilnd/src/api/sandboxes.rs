//! The sandbox routes: list, create, get, delete, ping, secrets, pause and resume, stop and
//! start, lifetime, network policy, and the guest console.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_api_types::routes;
use kiln_api_types::{
    ApiError, ErrorCode, NetworkUpdate, PingResponse, SandboxFilter, SandboxInfo, SandboxList,
    SandboxSpec, SandboxStartRequest, SecretsUpdateRequest, TtlRequest,
};

use super::{HttpError, ID_PARAM, Shared, error, json, parse_body, parse_required, resolve};

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
pub(super) async fn sandbox_list(
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
pub(super) async fn sandbox_create(
    State(engine): Shared,
    body: Bytes,
) -> Result<Response, HttpError> {
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
pub(super) async fn sandbox_get(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
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
pub(super) async fn sandbox_delete(
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
pub(super) async fn sandbox_ping(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let rtt = engine.sandbox_ping(&resolve(&engine, &id)?).await?;
    Ok(json(PingResponse {
        rtt_us: rtt.as_micros() as u64,
    }))
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
pub(super) async fn sandbox_secrets_update(
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
pub(super) async fn sandbox_pause(
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
pub(super) async fn sandbox_resume(
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
pub(super) async fn sandbox_stop(
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
pub(super) async fn sandbox_start(
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
pub(super) async fn sandbox_ttl_set(
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
pub(super) async fn sandbox_network_set(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let req: NetworkUpdate = parse_required(&body)?;
    Ok(json(engine.sandbox_network_set(&id, &req.network).await?))
}

/// Query of [`sandbox_logs`].
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct LogsQuery {
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
pub(super) async fn sandbox_logs(
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
