//! The desktop route: `POST /v1/sandboxes/{id}/desktop/view` mints a viewer link for a
//! browser (the listener that serves it and the relay are [`crate::view`]).

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use kiln_api_types::routes;
use kiln_api_types::{ApiError, DesktopViewRequest, DesktopViewResponse, ErrorCode};

use super::{HttpError, ID_PARAM, Shared, error, json, parse_body, resolve};
use crate::view::{ViewError, Viewers};

/// Get a link to a desktop sandbox's screen
///
/// Mints a viewer link: a URL on the daemon's viewer listener (loopback by default) that a
/// browser on the daemon's host opens to watch the sandbox's screen in noVNC, or with
/// `control` to use its keyboard and mouse too. Without control the daemon drops every input
/// message of the viewer, whatever the page sends. The link is a capability: anyone who has
/// it can use it, several viewers at once, until `expires_at_unix_ms` (24 hours by default,
/// `view_ttl_secs`) or until the sandbox is removed. An empty body is `{"control": false}`.
#[utoipa::path(
    post,
    path = routes::DESKTOP_VIEW.path,
    operation_id = routes::DESKTOP_VIEW.operation_id,
    tag = "sandboxes",
    params(("id" = String, Path, description = ID_PARAM)),
    request_body(content = Option<DesktopViewRequest>, description = "View only unless `control`; an empty body means view only", content_type = "application/json", example = json!({"control": false})),
    responses(
        (status = 200, description = "The link", body = DesktopViewResponse),
        (status = 400, description = "Malformed body or id, or ambiguous id (`bad_request`, `ambiguous_sandbox`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "Not running, or not a desktop (`sandbox_not_running`, `not_a_desktop`)", body = ApiError),
        (status = 503, description = "noVNC is not installed on the daemon's host (`host_setup`), or too many links are alive (`over_capacity`)", body = ApiError),
    ),
)]
pub(super) async fn desktop_view(
    State(engine): Shared,
    viewers: Option<Extension<Viewers>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let req: DesktopViewRequest = parse_body(&body)?;
    let id = resolve(&engine, &id)?;
    let Some(Extension(viewers)) = viewers else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::HostSetup,
            "this daemon serves no desktop viewers".to_owned(),
        ));
    };
    // The engine (`Engine::desktop_vnc_socket`) says whether it runs and has a screen.
    viewers.screen_of(&id)?;
    let link = viewers.mint(&id, req.control).map_err(|e| {
        let code = match e {
            ViewError::NoNovnc { .. } => ErrorCode::HostSetup,
            ViewError::TooMany => ErrorCode::OverCapacity,
        };
        error(StatusCode::SERVICE_UNAVAILABLE, code, e.to_string())
    })?;
    Ok(json(DesktopViewResponse {
        url: link.url,
        control: req.control,
        expires_at_unix_ms: link.expires_at_unix_ms,
    }))
}
