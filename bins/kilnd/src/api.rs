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
//!
//! The handlers live in one submodule per resource (`system`, `sandboxes`, `execs`, `files`,
//! `snapshots`, `images`, `pools`, `jobs`, `desktop`, `desktop_view`); this file holds the
//! route list and what they share: body and name parsing, id resolution, and the error
//! mapping.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_api_types::{ApiError, ErrorCode, SandboxId};
use kiln_core::{CoreError, Engine};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod desktop;
mod desktop_view;
mod execs;
mod files;
mod images;
mod jobs;
mod pools;
mod sandboxes;
mod snapshots;
mod system;

type Shared = State<Arc<Engine>>;

/// Largest WebSocket message a client may send (stdin chunks, control messages).
const MAX_WS_MESSAGE: usize = 1 << 20;

/// Every route with its handler. Handlers that share a path go in one `routes!`.
pub(crate) fn api_routes() -> OpenApiRouter<Arc<Engine>> {
    OpenApiRouter::with_openapi(crate::openapi::ApiDoc::openapi())
        .routes(routes!(system::health_get))
        .routes(routes!(system::openapi_get))
        .routes(routes!(system::doctor_get))
        .routes(routes!(sandboxes::sandbox_list, sandboxes::sandbox_create))
        .routes(routes!(sandboxes::sandbox_get, sandboxes::sandbox_delete))
        .routes(routes!(sandboxes::sandbox_ping))
        .routes(routes!(sandboxes::sandbox_secrets_update))
        .routes(routes!(sandboxes::sandbox_pause))
        .routes(routes!(sandboxes::sandbox_resume))
        .routes(routes!(sandboxes::sandbox_stop))
        .routes(routes!(sandboxes::sandbox_start))
        .routes(routes!(sandboxes::sandbox_ttl_set))
        .routes(routes!(sandboxes::sandbox_network_set))
        .routes(routes!(system::event_stream))
        .routes(routes!(execs::exec_detach, execs::exec_list))
        .routes(routes!(execs::exec_get))
        .routes(routes!(execs::exec_kill))
        .routes(routes!(execs::exec_attach))
        .routes(routes!(sandboxes::sandbox_logs))
        .routes(routes!(
            files::file_write,
            files::file_read,
            files::file_remove
        ))
        .routes(routes!(files::file_list))
        .routes(routes!(files::file_stat))
        .routes(routes!(files::file_mkdir))
        .routes(routes!(files::file_rename))
        .routes(routes!(execs::sandbox_exec))
        .routes(routes!(execs::sandbox_run))
        .routes(routes!(snapshots::snapshot_create))
        .routes(routes!(snapshots::snapshot_list))
        .routes(routes!(snapshots::snapshot_delete))
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
        .routes(routes!(system::system_df))
        .routes(routes!(system::system_prune))
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

#[cfg(test)]
mod tests {
    use kiln_api_types::{SandboxSpec, SnapshotName, TtlRequest};

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
