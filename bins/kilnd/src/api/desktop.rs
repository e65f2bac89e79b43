//! The desktop routes: a desktop sandbox's screenshot and its actions (pointer, keys, text,
//! wait), each answered with a receipt. The engine does the work (`kiln_core::desktop`).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use kiln_api_types::routes;
use kiln_api_types::{
    ActionQuery, ActionReceipt, ApiError, DesktopAction, ReviewExport, ReviewExportRequest,
    ScreenshotQuery,
};

use super::{HttpError, ID_PARAM, Shared, json, parse_required, resolve};

/// Take a screenshot
///
/// A PNG of a desktop sandbox's screen as QEMU shows it (the guest is not asked), scaled to
/// `width` pixels wide if given.
#[utoipa::path(
    get,
    path = routes::DESKTOP_SCREENSHOT.path,
    operation_id = routes::DESKTOP_SCREENSHOT.operation_id,
    tag = "desktop",
    params(("id" = String, Path, description = ID_PARAM), ScreenshotQuery),
    responses(
        (status = 200, description = "The screen", content_type = "image/png", body = Vec<u8>),
        (status = 400, description = "Malformed id or width (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "Not running, or not a desktop (`sandbox_not_running`, `not_a_desktop`)", body = ApiError),
        (status = 502, description = "QEMU failed (`vmm_error`)", body = ApiError),
    ),
)]
pub(super) async fn desktop_screenshot(
    State(engine): Shared,
    Path(id): Path<String>,
    Query(q): Query<ScreenshotQuery>,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let shot = engine.desktop_screenshot(&id, q.width).await?;
    Ok(([(CONTENT_TYPE, "image/png")], shot.png).into_response())
}

/// Act on a desktop
///
/// One action, as the body's `kind` says: `mouse_move`, `mouse_click`, `mouse_drag`,
/// `scroll`, `key_press`, `type_text` or `wait`. Coordinates are screen pixels. Pointer and
/// keys reach the guest through QEMU's tablet and keyboard; text a US keyboard cannot type
/// is typed by the guest's `xdotool` as the desktop's user. With `screenshot=true` the
/// answer waits until the screen stops changing (frames compared, at most `settle_ms`) and
/// carries a screenshot. Every action is written to the sandbox's review timeline.
#[utoipa::path(
    post,
    path = routes::DESKTOP_ACT.path,
    operation_id = routes::DESKTOP_ACT.operation_id,
    tag = "desktop",
    params(("id" = String, Path, description = ID_PARAM), ActionQuery),
    request_body(content = DesktopAction, content_type = "application/json", example = json!({"kind": "mouse_click", "x": 100, "y": 200})),
    responses(
        (status = 200, description = "Done", body = ActionReceipt),
        (status = 400, description = "Malformed action, off-screen coordinates, unknown key, unknown secret (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "Not running, or not a desktop (`sandbox_not_running`, `not_a_desktop`)", body = ApiError),
        (status = 422, description = "The guest failed to type text (`guest_command_failed`)", body = ApiError),
        (status = 502, description = "QEMU failed (`vmm_error`)", body = ApiError),
    ),
)]
pub(super) async fn desktop_act(
    State(engine): Shared,
    Path(id): Path<String>,
    Query(q): Query<ActionQuery>,
    body: Bytes,
) -> Result<Response, HttpError> {
    let id = resolve(&engine, &id)?;
    let action: DesktopAction = parse_required(&body)?;
    let receipt = engine.desktop_act(&id, &action, &q).await?;
    Ok(json(receipt))
}

/// Export a desktop's review bundle
///
/// Writes the sandbox's review recording as a self-contained bundle (`manifest.json`,
/// `timeline.jsonl`, the screenshots it names, and an `index.html` that shows them offline)
/// into `dest`, or a new directory of kiln's exports. Works after `kiln rm` while a failed
/// action keeps the recording pinned; the bundle itself is never removed by kiln.
#[utoipa::path(
    post,
    path = routes::REVIEW_EXPORT.path,
    operation_id = routes::REVIEW_EXPORT.operation_id,
    tag = "desktop",
    params(("id" = String, Path, description = ID_PARAM)),
    request_body(content = ReviewExportRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Written", body = ReviewExport),
        (status = 400, description = "Malformed id or body, or `dest` not empty (`bad_request`)", body = ApiError),
        (status = 404, description = "No such sandbox and no kept recording (`sandbox_not_found`)", body = ApiError),
        (status = 409, description = "Not a desktop (`not_a_desktop`)", body = ApiError),
    ),
)]
pub(super) async fn review_export(
    State(engine): Shared,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HttpError> {
    // A removed sandbox's recording is found by its full id.
    let id = match resolve(&engine, &id) {
        Ok(id) => id,
        Err(e) => match id.parse::<kiln_api_types::SandboxId>() {
            Ok(full) => full,
            Err(_) => return Err(e),
        },
    };
    let req: ReviewExportRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReviewExportRequest::default()
    } else {
        parse_required(&body)?
    };
    let export = engine
        .review_export(&id, req.dest.map(std::path::PathBuf::from))
        .await?;
    Ok(json(export))
}
