//! The API's route table: method, path template and operation id of every endpoint, declared
//! once here.
//!
//! Who uses it:
//! - the daemon (`bins/kilnd/src/api.rs`) names each handler's path and operation id with
//!   these constants in its `#[utoipa::path]` attribute, so the axum router and the OpenAPI
//!   document are both built from that one declaration (`utoipa-axum`'s `OpenApiRouter`);
//! - the client (`kiln-client`) builds every request from these constants with
//!   [`Route::path_with`], never from a hand-written string.
//!
//! The HTTP method appears twice (here and as the attribute's keyword, which must be a
//! literal): a test in `kilnd` walks the generated OpenAPI document and fails unless every
//! operation there is in [`ALL`] with the same method, path and id, and vice versa.
//!
//! Invariants: paths use axum 0.8 / OpenAPI `{param}` syntax; operation ids are `noun_verb`
//! and unique; no I/O here.

/// HTTP method of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET` (also the WebSocket upgrades).
    Get,
    /// `POST`.
    Post,
    /// `DELETE`.
    Delete,
    /// `PUT`.
    Put,
}

impl Method {
    /// The method's name as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::Put => "PUT",
        }
    }
}

/// How a route answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// One JSON document.
    Json,
    /// No body (204).
    Empty,
    /// Newline-delimited JSON, one document per line.
    NdJson,
    /// A WebSocket upgrade (101), then the exec protocol of `docs/protocol.md`.
    WebSocket,
    /// Server-sent events (`text/event-stream`), one JSON document per `data:` line.
    EventStream,
    /// Plain text (`text/plain`), possibly streamed.
    Text,
    /// Raw bytes (`application/octet-stream` or `application/x-tar`), streamed.
    Bytes,
}

/// One endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// HTTP method.
    pub method: Method,
    /// Path template with `{param}` placeholders.
    pub path: &'static str,
    /// OpenAPI operation id (`noun_verb`).
    pub operation_id: &'static str,
    /// How it answers on success.
    pub body: Body,
}

/// A [`Route::path_with`] call whose parameters do not fit the template.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("route {path} takes {expected} path parameters, got {got}")]
pub struct PathParamsError {
    /// The template.
    pub path: &'static str,
    /// Placeholders in it.
    pub expected: usize,
    /// Values given.
    pub got: usize,
}

impl Route {
    /// Names of the path's `{param}` placeholders, in order.
    pub fn params(&self) -> impl Iterator<Item = &'static str> {
        self.path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
    }

    /// The path with each placeholder replaced, in order, by a value (percent-encoded, so a
    /// value can never add a path segment).
    pub fn path_with(&self, values: &[&str]) -> Result<String, PathParamsError> {
        let expected = self.params().count();
        if expected != values.len() {
            return Err(PathParamsError {
                path: self.path,
                expected,
                got: values.len(),
            });
        }
        let mut values = values.iter();
        let mut out = String::with_capacity(self.path.len() + 16);
        for seg in self.path.split('/').skip(1) {
            out.push('/');
            if seg.starts_with('{') && seg.ends_with('}') {
                if let Some(v) = values.next() {
                    percent_encode_into(v, &mut out);
                }
            } else {
                out.push_str(seg);
            }
        }
        Ok(out)
    }
}

/// Appends `s` with every byte outside RFC 3986's unreserved set percent-encoded.
fn percent_encode_into(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

macro_rules! routes {
    ($( $(#[$doc:meta])* $name:ident = $method:ident $path:literal $op:literal $body:ident; )*) => {
        $(
            $(#[$doc])*
            pub const $name: Route = Route {
                method: Method::$method,
                path: $path,
                operation_id: $op,
                body: Body::$body,
            };
        )*
        /// Every route, in the order of `docs/api.md`.
        pub const ALL: &[Route] = &[$($name),*];
    };
}

routes! {
    /// `GET /v1/health`: daemon version, pid and janitor report.
    HEALTH_GET = Get "/v1/health" "health_get" Json;
    /// `GET /v1/openapi.json`: this API's OpenAPI 3.1 document.
    OPENAPI_GET = Get "/v1/openapi.json" "openapi_get" Json;
    /// `GET /v1/doctor`: what kiln will use on the daemon's host and why.
    DOCTOR_GET = Get "/v1/doctor" "doctor_get" Json;
    /// `GET /v1/sandboxes`.
    SANDBOX_LIST = Get "/v1/sandboxes" "sandbox_list" Json;
    /// `POST /v1/sandboxes`.
    SANDBOX_CREATE = Post "/v1/sandboxes" "sandbox_create" Json;
    /// `GET /v1/sandboxes/{id}`.
    SANDBOX_GET = Get "/v1/sandboxes/{id}" "sandbox_get" Json;
    /// `DELETE /v1/sandboxes/{id}`.
    SANDBOX_DELETE = Delete "/v1/sandboxes/{id}" "sandbox_delete" Empty;
    /// `POST /v1/sandboxes/{id}/ping`.
    SANDBOX_PING = Post "/v1/sandboxes/{id}/ping" "sandbox_ping" Json;
    /// `POST /v1/sandboxes/{id}/secrets`.
    SANDBOX_SECRETS_UPDATE = Post "/v1/sandboxes/{id}/secrets" "sandbox_secrets_update" Empty;
    /// `POST /v1/sandboxes/{id}/pause`.
    SANDBOX_PAUSE = Post "/v1/sandboxes/{id}/pause" "sandbox_pause" Json;
    /// `POST /v1/sandboxes/{id}/resume`.
    SANDBOX_RESUME = Post "/v1/sandboxes/{id}/resume" "sandbox_resume" Json;
    /// `POST /v1/sandboxes/{id}/stop`: save and stop the VM.
    SANDBOX_STOP = Post "/v1/sandboxes/{id}/stop" "sandbox_stop" Json;
    /// `POST /v1/sandboxes/{id}/start`: back from the save.
    SANDBOX_START = Post "/v1/sandboxes/{id}/start" "sandbox_start" Json;
    /// `POST /v1/sandboxes/{id}/ttl`: a new remaining lifetime.
    SANDBOX_TTL_SET = Post "/v1/sandboxes/{id}/ttl" "sandbox_ttl_set" Json;
    /// `POST /v1/sandboxes/{id}/network`: a new network policy (`allow` ↔ `nat`).
    SANDBOX_NETWORK_SET = Post "/v1/sandboxes/{id}/network" "sandbox_network_set" Json;
    /// `GET /v1/events` (server-sent events of `Event`).
    EVENT_STREAM = Get "/v1/events" "event_stream" EventStream;
    /// `POST /v1/sandboxes/{id}/execs`: start a detached command.
    EXEC_DETACH = Post "/v1/sandboxes/{id}/execs" "exec_detach" Json;
    /// `GET /v1/sandboxes/{id}/execs`: the sandbox's detached commands.
    EXEC_LIST = Get "/v1/sandboxes/{id}/execs" "exec_list" Json;
    /// `GET /v1/execs/{exec_id}`.
    EXEC_GET = Get "/v1/execs/{exec_id}" "exec_get" Json;
    /// `POST /v1/execs/{exec_id}/kill`.
    EXEC_KILL = Post "/v1/execs/{exec_id}/kill" "exec_kill" Json;
    /// `GET /v1/execs/{exec_id}/attach` (WebSocket): replay, then follow.
    EXEC_ATTACH = Get "/v1/execs/{exec_id}/attach" "exec_attach" WebSocket;
    /// `GET /v1/sandboxes/{id}/logs`: the guest console (`?follow=true` to follow).
    SANDBOX_LOGS = Get "/v1/sandboxes/{id}/logs" "sandbox_logs" Text;
    /// `PUT /v1/sandboxes/{id}/files?path=…`: raw body (a tar archive with `tar=true`).
    FILE_WRITE = Put "/v1/sandboxes/{id}/files" "file_write" Json;
    /// `GET /v1/sandboxes/{id}/files?path=…`: raw bytes (a tar archive with `tar=true`).
    FILE_READ = Get "/v1/sandboxes/{id}/files" "file_read" Bytes;
    /// `DELETE /v1/sandboxes/{id}/files?path=…&recursive=…`.
    FILE_REMOVE = Delete "/v1/sandboxes/{id}/files" "file_remove" Empty;
    /// `GET /v1/sandboxes/{id}/files/list?path=…&after=…`.
    FILE_LIST = Get "/v1/sandboxes/{id}/files/list" "file_list" Json;
    /// `GET /v1/sandboxes/{id}/files/stat?path=…`.
    FILE_STAT = Get "/v1/sandboxes/{id}/files/stat" "file_stat" Json;
    /// `POST /v1/sandboxes/{id}/files/mkdir`.
    FILE_MKDIR = Post "/v1/sandboxes/{id}/files/mkdir" "file_mkdir" Json;
    /// `POST /v1/sandboxes/{id}/files/rename`.
    FILE_RENAME = Post "/v1/sandboxes/{id}/files/rename" "file_rename" Json;
    /// `GET /v1/sandboxes/{id}/exec` (WebSocket).
    SANDBOX_EXEC = Get "/v1/sandboxes/{id}/exec" "sandbox_exec" WebSocket;
    /// `GET /v1/run` (WebSocket): fresh sandbox, one exec, teardown.
    SANDBOX_RUN = Get "/v1/run" "sandbox_run" WebSocket;
    /// `POST /v1/sandboxes/{id}/snapshot`.
    SNAPSHOT_CREATE = Post "/v1/sandboxes/{id}/snapshot" "snapshot_create" Json;
    /// `GET /v1/snapshots`.
    SNAPSHOT_LIST = Get "/v1/snapshots" "snapshot_list" Json;
    /// `DELETE /v1/snapshots/{name}`.
    SNAPSHOT_DELETE = Delete "/v1/snapshots/{name}" "snapshot_delete" Empty;
    /// `GET /v1/images`.
    IMAGE_LIST = Get "/v1/images" "image_list" Json;
    /// `POST /v1/images/{name}/build` (NDJSON stream of `ImageBuildEvent`).
    IMAGE_BUILD = Post "/v1/images/{name}/build" "image_build" NdJson;
    /// `POST /v1/builds` (NDJSON stream of `ImageBuildEvent`): build from a recipe file.
    IMAGE_BUILD_RECIPE = Post "/v1/builds" "image_build_recipe" NdJson;
    /// `POST /v1/imports` (NDJSON stream of `ImageBuildEvent`): import a container image or
    /// a disk image.
    IMAGE_IMPORT = Post "/v1/imports" "image_import" NdJson;
    /// `DELETE /v1/images/{name}`.
    IMAGE_DELETE = Delete "/v1/images/{name}" "image_delete" Empty;
    /// `GET /v1/pools`: the warm pools.
    POOL_LIST = Get "/v1/pools" "pool_list" Json;
    /// `PUT /v1/pools/{image}`: one pool's size (per image and machine size).
    POOL_SET = Put "/v1/pools/{image}" "pool_set" Json;
    /// `POST /v1/jobs`: run a program once in a fresh sandbox of its language (202).
    JOB_CREATE = Post "/v1/jobs" "job_create" Json;
    /// `GET /v1/jobs`: jobs, newest first (`?status=…&language=…&limit=…`).
    JOB_LIST = Get "/v1/jobs" "job_list" Json;
    /// `GET /v1/jobs/{job_id}` (`?wait=SECS` waits for the end).
    JOB_GET = Get "/v1/jobs/{job_id}" "job_get" Json;
    /// `DELETE /v1/jobs/{job_id}`: cancel a queued or running job.
    JOB_CANCEL = Delete "/v1/jobs/{job_id}" "job_cancel" Json;
    /// `GET /v1/jobs/{job_id}/events` (server-sent events of `JobEvent`).
    JOB_EVENTS = Get "/v1/jobs/{job_id}/events" "job_events" EventStream;
    /// `GET /v1/languages`: the languages of jobs, with their versions.
    LANGUAGE_LIST = Get "/v1/languages" "language_list" Json;
    /// `GET /v1/sandboxes/{id}/desktop/screenshot`: a PNG of a desktop's screen.
    DESKTOP_SCREENSHOT = Get "/v1/sandboxes/{id}/desktop/screenshot" "desktop_screenshot" Bytes;
    /// `POST /v1/sandboxes/{id}/desktop/actions`: one action (pointer, keys, text, wait) and
    /// its receipt.
    DESKTOP_ACT = Post "/v1/sandboxes/{id}/desktop/actions" "desktop_act" Json;
    /// `POST /v1/sandboxes/{id}/review/export`: a desktop's review bundle (timeline,
    /// screenshots, a static page), kept after the sandbox is removed.
    REVIEW_EXPORT = Post "/v1/sandboxes/{id}/review/export" "review_export" Json;
    /// `POST /run`: cloude's spelling of `POST /v1/jobs`.
    CLOUDE_RUN = Post "/run" "cloude_run" Json;
    /// `GET /status/{id}`: cloude's spelling of `GET /v1/jobs/{job_id}`, in its shape.
    CLOUDE_STATUS = Get "/status/{id}" "cloude_status" Json;
    /// `POST /v1/sandboxes/{id}/desktop/view`: a browser link to watch (or control) a desktop
    /// sandbox's screen.
    DESKTOP_VIEW = Post "/v1/sandboxes/{id}/desktop/view" "desktop_view" Json;
    /// `GET /v1/system/df`: what kiln's state takes on disk, and what could be reclaimed.
    SYSTEM_DF = Get "/v1/system/df" "system_df" Json;
    /// `POST /v1/system/prune`: remove what nothing uses (`{"dry_run": true}` to only list it).
    SYSTEM_PRUNE = Post "/v1/system/prune" "system_prune" Json;
}

/// Routes that keep another service's spelling (cloude's), outside `/v1/`.
pub const COMPAT: &[Route] = &[CLOUDE_RUN, CLOUDE_STATUS];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_with_fills_and_encodes_params() {
        assert_eq!(
            SANDBOX_GET.path_with(&["sb-0123456789ab"]).unwrap(),
            "/v1/sandboxes/sb-0123456789ab"
        );
        assert_eq!(
            SNAPSHOT_DELETE.path_with(&["../x y"]).unwrap(),
            "/v1/snapshots/..%2Fx%20y"
        );
        assert_eq!(SANDBOX_LIST.path_with(&[]).unwrap(), "/v1/sandboxes");
    }

    #[test]
    fn path_with_wrong_param_count_is_an_error() {
        let err = SANDBOX_GET.path_with(&[]).unwrap_err();
        assert_eq!((err.expected, err.got), (1, 0));
        assert!(HEALTH_GET.path_with(&["x"]).is_err());
    }

    #[test]
    fn route_table_ids_unique_and_noun_verb() {
        let mut ids = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for r in ALL {
            assert!(ids.insert(r.operation_id), "{} twice", r.operation_id);
            assert!(
                keys.insert((r.method, r.path)),
                "{} {} twice",
                r.method.as_str(),
                r.path
            );
            assert!(
                r.operation_id.contains('_'),
                "{} is not noun_verb",
                r.operation_id
            );
            // Only the aliases of another service's API live outside `/v1/`.
            assert!(
                r.path.starts_with("/v1/") || COMPAT.contains(r),
                "{}",
                r.path
            );
        }
    }
}
