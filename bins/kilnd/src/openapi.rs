//! The OpenAPI 3.1 document: its fixed parts ([`ApiDoc`]), what every operation shares (the
//! optional bearer token and its 401, the edge's 400/408/413/414, `x-kiln-websocket`),
//! and the tests that keep the document honest.
//!
//! The paths themselves are not written here: they come from the handlers' `#[utoipa::path]`
//! attributes in [`crate::api`] through the same `OpenApiRouter` that builds the axum router,
//! so the document cannot list a route the daemon does not serve. `docs/openapi.json` is this
//! document, regenerated with `kilnd --print-openapi > docs/openapi.json` (or
//! `KILN_BLESS=1 cargo nextest run -p kilnd openapi_document`); a test fails while the
//! committed copy differs. The output is deterministic (ordered maps only).

use std::sync::OnceLock;

use kiln_api_types::routes;
use kiln_api_types::{
    ApiError, ErrorCode, ExecClientMessage, ExecRequest, ExecServerMessage, ImageBuildEvent,
    RunRequest,
};
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{RefOr, Response as OaResponse, ResponseBuilder};

/// The document's fixed parts; the paths come from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "kiln",
        version = "1",
        description = "Local microVM sandboxes. `kilnd` serves this API on the unix socket `$KILN_HOME/kilnd.sock` (no token) and, if asked, on a TCP address where every request needs `Authorization: Bearer <token>` (the token is in `$KILN_HOME/token`). Every error body is an `ApiError` whose `code` is one of `ErrorCode`; a method a path does not serve is 405 `method_not_allowed`. The WebSocket routes exchange `ExecRequest`/`RunRequest`, `ExecClientMessage` and `ExecServerMessage` as described in docs/protocol.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    servers((url = "http://localhost", description = "kilnd (unix socket or TCP listener)")),
    tags(
        (name = "daemon", description = "The daemon itself"),
        (name = "sandboxes", description = "Sandboxes and commands in them"),
        (name = "snapshots", description = "Warm and user snapshots"),
        (name = "images", description = "Guest images"),
        (name = "system", description = "The state directory: what it takes on disk, and reclaiming what nothing uses"),
        (name = "execs", description = "Detached commands: started once, attached to any number of times"),
        (name = "files", description = "Files in a sandbox: transfers in and out, listings and small operations"),
        (name = "pools", description = "Warm pools: sandboxes restored ahead of demand"),
        (name = "jobs", description = "Jobs: a program in one of kiln's languages, run once in a fresh sandbox; cloude's `/run` and `/status/{id}`"),
        (name = "desktop", description = "Desktop sandboxes: screenshots and actions (pointer, keys, text) through QEMU, for computer-use agents"),
    ),
    components(schemas(
        ApiError,
        ErrorCode,
        ExecRequest,
        RunRequest,
        ExecClientMessage,
        ExecServerMessage,
        ImageBuildEvent,
    )),
)]
pub struct ApiDoc;

/// The OpenAPI 3.1 document of [`crate::api::router`].
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = crate::api::api_routes().split_for_parts();
    add_common_parts(&mut doc);
    doc
}

/// The document as pretty JSON with a final newline, exactly as committed in
/// `docs/openapi.json`.
pub fn openapi_json() -> String {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let mut s = openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        s.push('\n');
        s
    })
    .clone()
}

/// `x-kiln-websocket` of a WebSocket operation: its message schemas, machine-readable for SDK
/// generators (OpenAPI has no vocabulary for WebSocket messages).
fn websocket_extension(
    operation_id: Option<&str>,
) -> Option<utoipa::openapi::extensions::Extensions> {
    let route = routes::ALL
        .iter()
        .find(|r| Some(r.operation_id) == operation_id)?;
    if route.body != routes::Body::WebSocket {
        return None;
    }
    let first = if *route == routes::SANDBOX_RUN {
        "RunRequest"
    } else {
        "ExecRequest"
    };
    let schema = |name: &str| serde_json::json!({ "$ref": format!("#/components/schemas/{name}") });
    let value = serde_json::json!({
        "protocol": "docs/protocol.md",
        "client_first_text": schema(first),
        "client_text": schema("ExecClientMessage"),
        "client_binary": "stdin bytes (when the first message set stdin)",
        "server_text": schema("ExecServerMessage"),
        "server_binary": "output: first byte 1 (stdout) or 2 (stderr), then the bytes",
    });
    Some(
        utoipa::openapi::extensions::ExtensionsBuilder::new()
            .add("x-kiln-websocket", value)
            .build(),
    )
}

/// An error response whose body is an `ApiError`.
fn api_error_response(description: &str) -> OaResponse {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            utoipa::openapi::ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "ApiError",
                ))))
                .build(),
        )
        .build()
}

/// What every operation shares: the optional bearer token (TCP only) and its 401, and the
/// answers of the API's edge (`crate::listen`, `crate::api::json_errors`): 414 for any
/// operation, 400 for one with parameters, 408 and 413 for one with a body.
fn add_common_parts(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::SecurityRequirement;
    let components = doc.components.get_or_insert_with(Default::default);
    components.security_schemes.insert(
        "bearer".to_owned(),
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    let shared = [
        (
            "400",
            "BadRequest",
            "Bad Request (`code` `bad_request`): a malformed request, e.g. a path parameter that is not percent-encoded UTF-8 or an unknown query parameter.",
        ),
        (
            "401",
            "Unauthorized",
            "Unauthorized (`code` `unauthorized`): a request on the TCP listener without the right `Authorization: Bearer` token. Never on the unix socket.",
        ),
        (
            "408",
            "RequestTimeout",
            "Request Timeout (`code` `request_timeout`): the request body sent nothing for the daemon's `request_body_timeout_secs` (docs/config.md); the connection is closed.",
        ),
        (
            "413",
            "PayloadTooLarge",
            "Payload Too Large (`code` `payload_too_large`): the body is larger than the daemon's `max_body_bytes` (docs/config.md).",
        ),
        (
            "414",
            "UriTooLong",
            "URI Too Long (`code` `uri_too_long`): the path and query are longer than 8 KiB.",
        ),
    ];
    for (_, name, description) in shared {
        components
            .responses
            .insert(name.to_owned(), RefOr::T(api_error_response(description)));
    }
    let shared_ref = |status: &str| {
        let (_, name, _) = shared
            .iter()
            .find(|(s, _, _)| *s == status)
            .expect("a shared response of this status");
        RefOr::Ref(utoipa::openapi::Ref::from_response_name(*name))
    };
    // `{}` makes the token optional: the unix socket needs none.
    doc.security = Some(vec![
        SecurityRequirement::default(),
        SecurityRequirement::new("bearer", Vec::<String>::new()),
    ]);
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.delete,
            &mut item.put,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            let responses = &mut op.responses.responses;
            responses.insert("401".to_owned(), shared_ref("401"));
            responses.insert("414".to_owned(), shared_ref("414"));
            if let Some(ext) = websocket_extension(op.operation_id.as_deref()) {
                op.extensions
                    .get_or_insert_with(Default::default)
                    .merge(ext);
            }
            let has_params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
            if has_params || op.request_body.is_some() {
                responses
                    .entry("400".to_owned())
                    .or_insert_with(|| shared_ref("400"));
            }
            if op.request_body.is_some() {
                responses.insert("408".to_owned(), shared_ref("408"));
                responses.insert("413".to_owned(), shared_ref("413"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api_types::ErrorCode;

    /// Operations of the generated document as (method, path, operation id).
    fn documented_operations() -> Vec<(&'static str, String, String)> {
        let doc = openapi();
        let mut ops = Vec::new();
        for (path, item) in &doc.paths.paths {
            for (method, op) in [
                ("GET", &item.get),
                ("POST", &item.post),
                ("DELETE", &item.delete),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
                ("HEAD", &item.head),
                ("OPTIONS", &item.options),
            ] {
                if let Some(op) = op {
                    ops.push((
                        method,
                        path.clone(),
                        op.operation_id.clone().unwrap_or_default(),
                    ));
                }
            }
        }
        ops
    }

    #[test]
    fn route_table_and_openapi_document_agree() {
        let ops = documented_operations();
        for r in routes::ALL {
            assert!(
                ops.iter().any(|(m, p, id)| *m == r.method.as_str()
                    && p == r.path
                    && id == r.operation_id),
                "route {} {} ({}) is in kiln_api_types::routes but not in the document: {ops:?}",
                r.method.as_str(),
                r.path,
                r.operation_id
            );
        }
        for (m, p, id) in &ops {
            assert!(
                routes::ALL
                    .iter()
                    .any(|r| r.method.as_str() == *m && r.path == p && r.operation_id == id),
                "operation {m} {p} ({id}) is documented but not in kiln_api_types::routes"
            );
        }
        assert_eq!(ops.len(), routes::ALL.len());
    }

    #[test]
    fn openapi_document_committed_copy_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let generated = openapi_json();
        if std::env::var_os("KILN_BLESS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json is stale: regenerate it with `cargo run -p kilnd -- --print-openapi > docs/openapi.json` (or `KILN_BLESS=1 cargo nextest run -p kilnd openapi_document`)"
        );
    }

    #[test]
    fn openapi_document_is_3_1_with_components_and_error_schema() {
        let v: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        assert!(v["openapi"].as_str().unwrap().starts_with("3.1"));
        for name in [
            "ApiError",
            "ErrorCode",
            "ExecRequest",
            "RunRequest",
            "ExecClientMessage",
            "ExecServerMessage",
            "ImageBuildEvent",
            "SandboxSpec",
            "Event",
            "SandboxInfo",
            "DoctorReport",
        ] {
            assert!(
                v["components"]["schemas"][name].is_object(),
                "schema {name} missing"
            );
        }
        // Every 4xx/5xx response of every operation has the one error schema.
        for (path, item) in v["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for (status, resp) in op["responses"].as_object().unwrap() {
                    if status.starts_with('4') || status.starts_with('5') {
                        // A shared response is a $ref into components.responses.
                        let resp = match resp["$ref"].as_str() {
                            Some(r) => {
                                let name = r.rsplit('/').next().unwrap();
                                &v["components"]["responses"][name]
                            }
                            None => resp,
                        };
                        assert_eq!(
                            resp["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/ApiError",
                            "{method} {path} {status} has no ApiError body: {resp}"
                        );
                    }
                }
            }
        }
    }

    /// The codes `CoreError::code()` returns, read from the engine's source: that match is
    /// the one place the engine spells them, and it cannot be enumerated at run time.
    fn core_error_codes() -> Vec<String> {
        // CoreError::code(), and FileErrorKind::code() which it delegates file errors to.
        let sources = [
            (
                include_str!("../../../crates/kiln-core/src/error.rs"),
                "pub fn code(&self)",
            ),
            (
                include_str!("../../../crates/kiln-core/src/files.rs"),
                "pub fn code(self)",
            ),
        ];
        let mut codes = Vec::new();
        for (src, marker) in sources {
            let body = src
                .split(marker)
                .nth(1)
                .and_then(|rest| rest.split("\n    }\n").next())
                .expect("a code() function in kiln-core");
            codes.extend(
                body.split("=> \"")
                    .skip(1)
                    .filter_map(|s| s.split('"').next())
                    .map(str::to_owned),
            );
        }
        codes
    }

    /// The codes only the daemon's edge produces (`api.rs`, `auth.rs`, `listen.rs`).
    const DAEMON_CODES: &[&str] = &[
        "not_found",
        "internal",
        "unauthorized",
        "method_not_allowed",
        "request_timeout",
        "payload_too_large",
        "uri_too_long",
    ];

    #[test]
    fn error_codes_of_engine_are_all_listed() {
        let codes = core_error_codes();
        assert!(codes.len() >= 19, "parsed only {codes:?}");
        for code in &codes {
            assert!(
                code.parse::<ErrorCode>().is_ok(),
                "CoreError::code() returns {code:?}, which kiln_api_types::ErrorCode does not list"
            );
        }
        // The daemon's own codes.
        for code in DAEMON_CODES.iter().chain(&["bad_request"]) {
            assert!(code.parse::<ErrorCode>().is_ok(), "{code}");
        }
        // And nothing listed is dead: each code is the engine's or the daemon's.
        for c in ErrorCode::ALL {
            assert!(
                codes.iter().any(|k| k == c.as_str()) || DAEMON_CODES.contains(&c.as_str()),
                "ErrorCode {c} is produced by nobody"
            );
        }
    }
}
