//! The job routes: submit a program, read its result (long-polling), follow its output,
//! list, cancel; the languages; and cloude's spellings `POST /run` and `GET /status/{id}`.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_api_types::jobs::MAX_JOB_WAIT_SECS;
use kiln_api_types::routes;
use kiln_api_types::{
    ApiError, CloudeJob, ErrorCode, JobCreated, JobEvent, JobId, JobInfo, JobList, JobRequest,
    JobStatus, LanguageList,
};

use super::{HttpError, Shared, error, json, parse_name, parse_required};

const JOB_ID_PARAM: &str = "Job id (`job-` and 12 lowercase hex digits)";
/// Jobs `GET /v1/jobs` lists by default, and at most.
const DEFAULT_LIST: u32 = 100;
const MAX_LIST: u32 = 1000;

fn bad(message: String) -> HttpError {
    error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
}

fn submit(engine: &kiln_core::Engine, body: &Bytes) -> Result<Response, HttpError> {
    let req: JobRequest = parse_required(body)?;
    let info = engine.job_submit(req)?;
    Ok((StatusCode::ACCEPTED, axum::Json(JobCreated { id: info.id })).into_response())
}

/// Submit a job
///
/// Queues a program in one of kiln's languages; it runs once in a fresh sandbox of the
/// language's image (from the warm pool when one is set for the image), in submission order,
/// as many at once as `KILN_JOB_CONCURRENCY` and the host's budget allow. Answers at once with
/// the job's id; `GET /v1/jobs/{job_id}?wait=30` waits for its result.
#[utoipa::path(
    post,
    path = routes::JOB_CREATE.path,
    operation_id = routes::JOB_CREATE.operation_id,
    tag = "jobs",
    request_body(content = JobRequest, content_type = "application/json", example = json!({"language": "python", "code": "print(input()[::-1])", "stdin": "hello\n", "timeout": 10})),
    responses(
        (status = 202, description = "Queued", body = JobCreated),
        (status = 400, description = "Malformed body, unknown language, or a limit passed (`bad_request`)", body = ApiError),
        (status = 404, description = "The language's image is not built (`image_not_found`)", body = ApiError),
        (status = 429, description = "The queue is full (`queue_full`); `Retry-After` says when to try again", body = ApiError),
    ),
)]
pub(super) async fn job_create(State(engine): Shared, body: Bytes) -> Result<Response, HttpError> {
    submit(&engine, &body)
}

/// List jobs
///
/// Jobs, newest first, without their output: `status=S` and `language=L` filter (an alias
/// is accepted), `limit=N` (default 100, at most 1000).
#[utoipa::path(
    get,
    path = routes::JOB_LIST.path,
    operation_id = routes::JOB_LIST.operation_id,
    tag = "jobs",
    params(
        ("status" = Option<JobStatus>, Query, description = "Only jobs of this status"),
        ("language" = Option<String>, Query, description = "Only jobs of this language"),
        ("limit" = Option<u32>, Query, description = "At most this many (default 100, at most 1000)"),
    ),
    responses(
        (status = 200, description = "The jobs", body = JobList),
        (status = 400, description = "Unknown filter or malformed value (`bad_request`)", body = ApiError),
    ),
)]
pub(super) async fn job_list(
    State(engine): Shared,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, HttpError> {
    let (mut status, mut language, mut limit) = (None, None, DEFAULT_LIST);
    for (k, v) in &query {
        match k.as_str() {
            "status" => status = Some(v.parse::<JobStatus>().map_err(|e| bad(e.to_string()))?),
            "language" => language = Some(v.as_str()),
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_LIST).contains(n))
                    .ok_or_else(|| {
                        bad(format!("limit must be between 1 and {MAX_LIST}, got {v:?}"))
                    })?
            }
            other => {
                return Err(bad(format!(
                    "unknown filter {other:?} (status, language, limit)"
                )));
            }
        }
    }
    Ok(json(engine.job_list(status, language, limit)?))
}

/// `?wait=SECS` of `GET /v1/jobs/{job_id}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WaitQuery {
    wait: Option<u64>,
}

async fn get(
    engine: &kiln_core::Engine,
    raw: &str,
    wait: Option<u64>,
) -> Result<JobInfo, HttpError> {
    let id: JobId = parse_name(raw)?;
    if let Some(w) = wait
        && w > MAX_JOB_WAIT_SECS
    {
        return Err(bad(format!(
            "wait must be at most {MAX_JOB_WAIT_SECS} seconds, got {w}"
        )));
    }
    Ok(engine.job_get(&id, wait.map(Duration::from_secs)).await?)
}

/// Get a job
///
/// The job: status, exit code or signal, output (each stream up to `max_output`), the
/// compile step, timing, and whether a warm sandbox was used. With `wait=SECS` (at most 300)
/// the answer comes once the job has ended or SECS have passed, whichever is first.
#[utoipa::path(
    get,
    path = routes::JOB_GET.path,
    operation_id = routes::JOB_GET.operation_id,
    tag = "jobs",
    params(
        ("job_id" = String, Path, description = JOB_ID_PARAM),
        ("wait" = Option<u64>, Query, description = "Wait up to this many seconds for the job to end"),
    ),
    responses(
        (status = 200, description = "The job", body = JobInfo),
        (status = 400, description = "Malformed id or wait (`bad_request`)", body = ApiError),
        (status = 404, description = "No such job (`job_not_found`)", body = ApiError),
    ),
)]
pub(super) async fn job_get(
    State(engine): Shared,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Response, HttpError> {
    Ok(json(get(&engine, &id, q.wait).await?))
}

/// Cancel a job
///
/// A queued job leaves the queue; a running one is stopped and its sandbox removed. Answers
/// once that is done (waited for up to 30 s) with the job as it ended (`cancelled`, or its
/// own end if it ended first).
#[utoipa::path(
    delete,
    path = routes::JOB_CANCEL.path,
    operation_id = routes::JOB_CANCEL.operation_id,
    tag = "jobs",
    params(("job_id" = String, Path, description = JOB_ID_PARAM)),
    responses(
        (status = 200, description = "The job as it ended", body = JobInfo),
        (status = 400, description = "Malformed id (`bad_request`)", body = ApiError),
        (status = 404, description = "No such job (`job_not_found`)", body = ApiError),
    ),
)]
pub(super) async fn job_cancel(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let id: JobId = parse_name(&id)?;
    Ok(json(engine.job_cancel(&id).await?))
}

fn sse(ev: &JobEvent) -> Bytes {
    let mut line = b"data: ".to_vec();
    line.extend(serde_json::to_vec(ev).unwrap_or_default());
    line.extend(b"\n\n");
    Bytes::from(line)
}

/// Follow a job
///
/// Server-sent events, one `JobEvent` per `data:` line: first what happened so far (the
/// status, the output up to now), then output as it comes, and `end` with the job's record
/// last; then the stream ends. A reader that falls behind by more than 1024 events gets an
/// `event: lagged` entry and misses that output (the `end` record still has all of it).
#[utoipa::path(
    get,
    path = routes::JOB_EVENTS.path,
    operation_id = routes::JOB_EVENTS.operation_id,
    tag = "jobs",
    params(("job_id" = String, Path, description = JOB_ID_PARAM)),
    responses(
        (status = 200, description = "The job's events", content_type = "text/event-stream", body = JobEvent),
        (status = 400, description = "Malformed id (`bad_request`)", body = ApiError),
        (status = 404, description = "No such job (`job_not_found`)", body = ApiError),
    ),
)]
pub(super) async fn job_events(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    use futures_util::StreamExt;
    let id: JobId = parse_name(&id)?;
    let events = engine.job_events(&id)?;
    let replay: Vec<Result<Bytes, std::io::Error>> =
        events.replay.iter().map(|e| Ok(sse(e))).collect();
    let follow = futures_util::stream::unfold(events.follow, |rx| async move {
        let mut rx = rx?;
        let bytes = match rx.recv().await {
            Ok(ev @ JobEvent::End { .. }) => return Some((Ok(sse(&ev)), None)),
            Ok(ev) => sse(&ev),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                Bytes::from(format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n"))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::io::Error>(bytes), Some(rx)))
    });
    let stream = futures_util::stream::iter(replay).chain(follow);
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// List languages
///
/// The languages of jobs, in kiln's order: id, name, aliases, image (and whether it is
/// built), whether a job compiles first, and the toolchain's version (asked of a sandbox of
/// each built image the first time, which takes a few seconds; kept per image build).
#[utoipa::path(
    get,
    path = routes::LANGUAGE_LIST.path,
    operation_id = routes::LANGUAGE_LIST.operation_id,
    tag = "jobs",
    responses((status = 200, description = "The languages", body = LanguageList)),
)]
pub(super) async fn language_list(State(engine): Shared) -> Result<Response, HttpError> {
    Ok(json(engine.language_list().await?))
}

/// Submit a job (cloude)
///
/// cloude's spelling of `POST /v1/jobs`: the same body, answered with `{id}`.
#[utoipa::path(
    post,
    path = routes::CLOUDE_RUN.path,
    operation_id = routes::CLOUDE_RUN.operation_id,
    tag = "jobs",
    request_body(content = JobRequest, content_type = "application/json", example = json!({"language": "py", "code": "print('hello')"})),
    responses(
        (status = 202, description = "Queued", body = JobCreated),
        (status = 400, description = "Malformed body, unknown language, or a limit passed (`bad_request`)", body = ApiError),
        (status = 404, description = "The language's image is not built (`image_not_found`)", body = ApiError),
        (status = 429, description = "The queue is full (`queue_full`)", body = ApiError),
    ),
)]
pub(super) async fn cloude_run(State(engine): Shared, body: Bytes) -> Result<Response, HttpError> {
    submit(&engine, &body)
}

/// Get a job (cloude)
///
/// A job in cloude's shape: `status` is `pending`, `running`, `done` (the program ran, or
/// failed to compile: then `stderr` is the compiler's) or `error` (it could not run, timed
/// out, or was cancelled; `stderr` ends with why).
#[utoipa::path(
    get,
    path = routes::CLOUDE_STATUS.path,
    operation_id = routes::CLOUDE_STATUS.operation_id,
    tag = "jobs",
    params(("id" = String, Path, description = JOB_ID_PARAM)),
    responses(
        (status = 200, description = "The job", body = CloudeJob),
        (status = 400, description = "Malformed id (`bad_request`)", body = ApiError),
        (status = 404, description = "No such job (`job_not_found`)", body = ApiError),
    ),
)]
pub(super) async fn cloude_status(
    State(engine): Shared,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let info = get(&engine, &id, None).await?;
    Ok(json(CloudeJob::from(&info)))
}
