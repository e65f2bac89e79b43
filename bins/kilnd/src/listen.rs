//! The API's edge: the two front doors (the unix socket's router, no token; the TCP
//! listener's, the same router behind [`crate::auth::require_token`]), the limits every
//! request meets before a handler sees it, and the accept loop that serves them.
//!
//! Limits, all from [`Settings`] (docs/config.md) and all answered with an `ApiError` body:
//! - at most `max_connections` connections at once per listener: the accept loop takes a
//!   permit before it accepts, so connection `N + 1` waits in the kernel's backlog, unserved,
//!   until one of the `N` closes;
//! - the request head (request line and headers) must arrive within `header_timeout`, also
//!   on an idle keep-alive connection; otherwise hyper closes the connection;
//! - a request body that sends nothing for `body_timeout` while a handler waits for it is
//!   answered 408 `request_timeout` (or cut off, if the answer had started) and its
//!   connection closed. The clock runs only while the handler waits for the body, so a long
//!   upload that keeps moving, a slow guest, WebSockets (no body after the upgrade) and
//!   response streams are never cut;
//! - a path and query longer than [`MAX_URI_BYTES`] is 414 `uri_too_long`;
//! - a body over `max_body_bytes` is 413 (in the extractors, see [`crate::api::json_errors`]);
//! - a stopping daemon waits at most [`SHUTDOWN_DRAIN`] for requests in flight, so an open
//!   event stream or followed log cannot keep it from stopping.
//!
//! Hyper answers some malformed requests itself before any of this runs (a request line it
//! cannot parse: 400; a URI over 64 KiB: 414; a head over its buffer: 431); those answers have
//! no body and the connection is closed. Must not hold routes of its own.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use kiln_api_types::ErrorCode;
use kiln_core::Engine;
use tracing::{debug, warn};

use crate::Settings;
use crate::auth::{TokenFile, require_token};
use crate::view::Viewers;

/// Longest path and query a request may have (8 KiB: far above any real id, name or guest
/// path, which are capped at 4 KiB by the guest).
pub const MAX_URI_BYTES: usize = 8 << 10;

/// The router served on the unix socket; `viewers` mints the desktop viewer links.
pub fn unix_app(engine: Arc<Engine>, settings: &Settings, viewers: &Viewers) -> Router {
    let limits = EdgeLimits {
        body_timeout: settings.body_timeout,
    };
    crate::api::router(engine)
        .layer(axum::Extension(viewers.clone()))
        .layer(DefaultBodyLimit::max(body_limit(settings)))
        .layer(axum::middleware::from_fn_with_state(limits, edge_limits))
}

/// The router served on the TCP listener: every request needs the bearer token in
/// `token_path`.
pub fn tcp_app(
    engine: Arc<Engine>,
    settings: &Settings,
    viewers: &Viewers,
    token_path: PathBuf,
) -> Router {
    unix_app(engine, settings, viewers).layer(axum::middleware::from_fn_with_state(
        TokenFile(Arc::new(token_path)),
        require_token,
    ))
}

fn body_limit(settings: &Settings) -> usize {
    usize::try_from(settings.max_body_bytes).unwrap_or(usize::MAX)
}

/// What [`edge_limits`] enforces per request.
#[derive(Debug, Clone, Copy)]
struct EdgeLimits {
    body_timeout: Duration,
}

/// The body [`stall_guard`] ended because the client sent nothing for too long.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for {0:?}")]
struct BodyStalled(Duration);

/// The per-request limits: the URI cap, and the body deadline whose expiry turns the
/// handler's error answer (whatever it made of the broken body) into 408 with
/// `connection: close`.
async fn edge_limits(
    axum::extract::State(limits): axum::extract::State<EdgeLimits>,
    req: Request,
    next: Next,
) -> Response {
    let uri_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return edge_error(
            StatusCode::URI_TOO_LONG,
            ErrorCode::UriTooLong,
            format!(
                "the request's path and query are {uri_len} bytes; at most {MAX_URI_BYTES} are accepted"
            ),
        );
    }
    let stalled = Arc::new(AtomicBool::new(false));
    let req = if axum::body::HttpBody::size_hint(req.body()).exact() == Some(0) {
        req
    } else {
        req.map(|body| stall_guard(body, limits.body_timeout, Arc::clone(&stalled)))
    };
    let resp = next.run(req).await;
    if stalled.load(Ordering::Acquire)
        && (resp.status().is_client_error() || resp.status().is_server_error())
    {
        debug!(timeout = ?limits.body_timeout, "request body stalled");
        return edge_error(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::RequestTimeout,
            BodyStalled(limits.body_timeout).to_string(),
        );
    }
    resp
}

/// An `ApiError` answer of the edge; the connection is closed after it (the rest of the
/// request cannot be trusted to follow).
fn edge_error(status: StatusCode, code: ErrorCode, message: String) -> Response {
    let mut resp = crate::api::error(status, code, message).into_response();
    resp.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

/// `body` with a deadline on each wait: when the handler asks for the next chunk and none
/// comes within `timeout`, the body ends with [`BodyStalled`] and `stalled` is set. Time the
/// handler spends elsewhere (writing to a slow guest) does not count.
fn stall_guard(body: Body, timeout: Duration, stalled: Arc<AtomicBool>) -> Body {
    use futures_util::StreamExt;
    let stream = futures_util::stream::unfold(Some(body.into_data_stream()), move |state| {
        let stalled = Arc::clone(&stalled);
        async move {
            let mut data = state?;
            match tokio::time::timeout(timeout, data.next()).await {
                Ok(Some(chunk)) => Some((chunk, Some(data))),
                Ok(None) => None,
                Err(_) => {
                    stalled.store(true, Ordering::Release);
                    Some((Err(axum::Error::new(BodyStalled(timeout))), None))
                }
            }
        }
    });
    Body::from_stream(stream)
}

/// How long a stopping daemon waits for connections to finish their requests in flight; a
/// stream that never ends (events, `logs?follow=true`) must not keep the daemon from
/// stopping.
const SHUTDOWN_DRAIN: Duration = if cfg!(test) {
    Duration::from_secs(2)
} else {
    Duration::from_secs(10)
};

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting, lets each
/// connection finish its request in flight (hyper's graceful shutdown) and returns once all
/// are closed, or after [`SHUTDOWN_DRAIN`] with those still open left to be dropped.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    settings: &Settings,
    shutdown: impl Future<Output = ()>,
) where
    L: Listener,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(settings.max_connections.max(1)));
    // Each connection task holds a receiver: `closed()` on the sender is "all are done".
    let (done_tx, done_rx) = tokio::sync::watch::channel(());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let header_timeout = settings.header_timeout;
    tokio::pin!(shutdown);
    let mut warned_full = false;
    loop {
        // A permit first: over the cap, the next connection waits unaccepted.
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !warned_full {
                    warn!(
                        max = settings.max_connections,
                        "connection limit reached; new connections wait"
                    );
                    warned_full = true;
                }
                tokio::select! {
                    p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let io = tokio::select! {
            (io, _addr) = listener.accept() => io,
            () = &mut shutdown => break,
        };
        if permits.available_permits() > 0 {
            warned_full = false;
        }
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        let done = done_rx.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    res = conn.as_mut() => {
                        if let Err(e) = res {
                            debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stop.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(permit);
            drop(done);
        });
    }
    stop_tx.send_replace(true);
    drop(done_rx);
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_DRAIN, done_tx.closed())
        .await
        .is_err()
    {
        warn!(
            open = done_tx.receiver_count(),
            "connections still open after {SHUTDOWN_DRAIN:?}; stopping without them"
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kiln_client::{Client, ClientError, ClientHome};
    use kiln_core::Home;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A bound against a hang, not a speed: a test that waits this long has failed.
    const HANG: Duration = Duration::from_secs(60);

    struct Daemon {
        _dir: tempfile::TempDir,
        home: ClientHome,
        tcp: std::net::SocketAddr,
    }

    /// The limits of a test daemon: small enough for tests, large enough not to fire by
    /// accident on a slow machine.
    pub(crate) fn test_settings() -> Settings {
        Settings {
            listen: None,
            max_body_bytes: 1 << 20,
            max_connections: 64,
            header_timeout: Duration::from_secs(60),
            pools: Vec::new(),
            body_timeout: Duration::from_secs(60),
            view_listen: "127.0.0.1:0".parse().unwrap(),
            view_ttl: Duration::from_secs(60),
            novnc_dir: crate::view::DEFAULT_NOVNC_DIR.into(),
        }
    }

    /// The viewer side of a test daemon (its listener is not served).
    pub(crate) fn test_viewers(engine: &Arc<Engine>, settings: &Settings) -> Viewers {
        let locator: Arc<dyn crate::view::VncLocator> = engine.clone();
        Viewers::new(
            crate::view::ViewConfig {
                addr: settings.view_listen,
                ttl: settings.view_ttl,
                novnc_dir: settings.novnc_dir.clone(),
            },
            locator,
        )
    }

    async fn start() -> Daemon {
        start_with(test_settings()).await
    }

    /// A test engine (no VM is started by the routes used here) served by [`serve`] on a
    /// loopback TCP port and on a unix socket, both in-process.
    async fn start_with(settings: Settings) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let home = ClientHome::new(dir.path().to_owned());
        let engine = Engine::start(Home::new(dir.path().to_owned()))
            .await
            .unwrap();
        kiln_client::token::read_or_create(&home.token()).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let viewers = test_viewers(&engine, &settings);
        let app = tcp_app(Arc::clone(&engine), &settings, &viewers, home.token());
        let s = settings.clone();
        tokio::spawn(async move { serve(tcp, app, &s, std::future::pending()).await });
        let unix = tokio::net::UnixListener::bind(home.socket()).unwrap();
        let app = unix_app(engine, &settings, &viewers);
        tokio::spawn(async move { serve(unix, app, &settings, std::future::pending()).await });
        Daemon {
            _dir: dir,
            home,
            tcp: addr,
        }
    }

    fn token(d: &Daemon) -> String {
        kiln_client::token::read(&d.home.token()).unwrap().unwrap()
    }

    fn status_and_code(e: ClientError) -> (u16, String) {
        match e {
            ClientError::Api { status, body } => (status, body.code),
            other => panic!("expected an API error, got {other:?}"),
        }
    }

    /// One raw HTTP/1.1 request to the unix socket: the whole answer.
    async fn raw_unix(d: &Daemon, request: &str) -> String {
        let mut s = tokio::net::UnixStream::connect(d.home.socket())
            .await
            .unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn image_build_unknown_recipe_is_404_before_any_stream() {
        let d = start().await;
        let c = Client::unix(d.home.socket());
        let err = c
            .image_build(
                "nosuch",
                &kiln_api_types::ImageBuildRequest::default(),
                |_| Ok::<(), std::io::Error>(()),
            )
            .await
            .unwrap_err();
        assert_eq!(status_and_code(err), (404, "recipe_not_found".to_owned()));
    }

    #[tokio::test]
    async fn array_bodies_are_refused_not_read_as_fields() {
        let d = start().await;
        let body = r#"["base",2,512,true]"#;
        let out = raw_unix(
            &d,
            &format!(
                "POST /v1/sandboxes HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(out.contains("expected a JSON object"), "{out}");
    }

    #[tokio::test]
    async fn tcp_without_token_is_401_unauthorized() {
        let d = start().await;
        let mut s = tokio::net::TcpStream::connect(d.tcp).await.unwrap();
        s.write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
        let body: kiln_api_types::ApiError =
            serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body.code, "unauthorized");
    }

    #[tokio::test]
    async fn tcp_wrong_token_is_401_right_token_is_200() {
        let d = start().await;
        let wrong = Client::tcp(d.tcp.to_string(), "0".repeat(64));
        let (status, code) = status_and_code(wrong.sandbox_list(&[]).await.unwrap_err());
        assert_eq!((status, code.as_str()), (401, "unauthorized"));
        let right = Client::tcp(d.tcp.to_string(), token(&d));
        assert!(right.sandbox_list(&[]).await.unwrap().sandboxes.is_empty());
        assert_eq!(right.health().await.unwrap().api_version, 1);
        let doc = right.openapi().await.unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
    }

    #[tokio::test]
    async fn tcp_rotated_token_takes_effect_without_restart() {
        let d = start().await;
        let old = Client::tcp(d.tcp.to_string(), token(&d));
        assert!(old.health().await.is_ok());
        let new = kiln_client::token::rotate(&d.home.token()).unwrap();
        let (status, _) = status_and_code(old.health().await.unwrap_err());
        assert_eq!(status, 401);
        assert!(Client::tcp(d.tcp.to_string(), new).health().await.is_ok());
    }

    /// Sends `head` (request line and headers, without the final blank line) and `body` on
    /// the TCP listener with the right token; returns the status and the decoded error body.
    async fn raw(d: &Daemon, head: &str, body: &[u8]) -> (u16, kiln_api_types::ApiError) {
        let mut s = tokio::net::TcpStream::connect(d.tcp).await.unwrap();
        let req = format!(
            "{head}\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            token(d),
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        // The daemon may answer before reading a body it refuses; ignore a reset here.
        let _ = s.write_all(body).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let out = String::from_utf8_lossy(&out);
        let status = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
        let err = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"));
        (status, err)
    }

    #[tokio::test]
    async fn axum_rejections_have_api_error_bodies() {
        let d = start().await;
        let big = vec![b' '; (1 << 20) + 1];
        let (status, err) = raw(&d, "POST /v1/sandboxes HTTP/1.1", &big).await;
        assert_eq!((status, err.code.as_str()), (413, "payload_too_large"));
        let (status, err) = raw(&d, "PUT /v1/health HTTP/1.1", b"").await;
        assert_eq!((status, err.code.as_str()), (405, "method_not_allowed"));
        let (status, err) = raw(&d, "DELETE /v1/run HTTP/1.1", b"").await;
        assert_eq!((status, err.code.as_str()), (405, "method_not_allowed"));
        let (status, err) = raw(&d, "GET /v1/run HTTP/1.1", b"").await;
        assert_eq!((status, err.code.as_str()), (400, "bad_request"));
        let (status, err) = raw(&d, "GET /v1/sandboxes/x/exec HTTP/1.1", b"").await;
        assert_eq!((status, err.code.as_str()), (400, "bad_request"));
        let (status, err) = raw(&d, "GET /v1/nope HTTP/1.1", b"").await;
        assert_eq!((status, err.code.as_str()), (404, "not_found"));
    }

    #[tokio::test]
    async fn bad_percent_encoding_in_path_parameter_is_400_api_error() {
        let d = start().await;
        for req in [
            "GET /v1/sandboxes/%ff",
            "DELETE /v1/sandboxes/%ff",
            "GET /v1/execs/%c3%28",
            "POST /v1/execs/%c3%28/kill",
            "DELETE /v1/snapshots/%80x",
            "POST /v1/images/%fe%ff/build",
        ] {
            let (status, err) = raw(&d, &format!("{req} HTTP/1.1"), b"").await;
            assert_eq!((status, err.code.as_str()), (400, "bad_request"), "{req}");
        }
    }

    #[tokio::test]
    async fn uri_over_the_cap_is_414_uri_too_long() {
        let d = start().await;
        let long = "a".repeat(MAX_URI_BYTES);
        let (status, err) = raw(&d, &format!("GET /v1/sandboxes/{long} HTTP/1.1"), b"").await;
        assert_eq!((status, err.code.as_str()), (414, "uri_too_long"));
        let (status, err) = raw(&d, &format!("GET /v1/sandboxes?name={long} HTTP/1.1"), b"").await;
        assert_eq!((status, err.code.as_str()), (414, "uri_too_long"));
        // Just under the cap is an ordinary request.
        let id = "a".repeat(MAX_URI_BYTES - "/v1/sandboxes/".len());
        let (status, _) = raw(&d, &format!("GET /v1/sandboxes/{id} HTTP/1.1"), b"").await;
        assert_ne!(status, 414);
    }

    /// Reads from `s` until the peer closes (or resets) the connection; what was read.
    async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
        let mut out = Vec::new();
        let read = tokio::time::timeout(HANG, async {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the daemon kept the connection open: {out:?}");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn half_sent_request_head_is_closed_after_header_timeout() {
        let d = start_with(Settings {
            header_timeout: Duration::from_secs(1),
            ..test_settings()
        })
        .await;
        let mut s = tokio::net::UnixStream::connect(d.home.socket())
            .await
            .unwrap();
        s.write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nx-slow: ")
            .await
            .unwrap();
        let out = read_until_closed(&mut s).await;
        assert!(!out.contains("200 OK"), "{out}");
        // A connection that never sends anything is closed too.
        let mut idle = tokio::net::UnixStream::connect(d.home.socket())
            .await
            .unwrap();
        read_until_closed(&mut idle).await;
        // A whole request is still served.
        let out = raw_unix(
            &d,
            "GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }

    #[tokio::test]
    async fn stalled_request_body_is_408_request_timeout_and_closed() {
        let d = start_with(Settings {
            body_timeout: Duration::from_secs(1),
            ..test_settings()
        })
        .await;
        for head in [
            "POST /v1/sandboxes HTTP/1.1",
            "PUT /v1/sandboxes/nosuch/files?path=/tmp/x HTTP/1.1",
            "POST /v1/images/nosuch/build HTTP/1.1",
        ] {
            let mut s = tokio::net::UnixStream::connect(d.home.socket())
                .await
                .unwrap();
            s.write_all(
                format!("{head}\r\nhost: x\r\ncontent-length: 100\r\n\r\n{{\"name\":").as_bytes(),
            )
            .await
            .unwrap();
            let out = read_until_closed(&mut s).await;
            if head.starts_with("PUT") {
                // The sandbox is looked up before the body is read: its 404 comes first.
                assert!(out.starts_with("HTTP/1.1 404"), "{out}");
                continue;
            }
            assert!(out.starts_with("HTTP/1.1 408"), "{head}: {out}");
            let body: kiln_api_types::ApiError =
                serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            assert_eq!(body.code, "request_timeout");
        }
    }

    #[tokio::test]
    async fn stalled_chunked_body_is_408_too() {
        let d = start_with(Settings {
            body_timeout: Duration::from_secs(1),
            ..test_settings()
        })
        .await;
        let mut s = tokio::net::UnixStream::connect(d.home.socket())
            .await
            .unwrap();
        s.write_all(b"POST /v1/sandboxes HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"nam\r\n")
            .await
            .unwrap();
        let out = read_until_closed(&mut s).await;
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        assert!(out.contains("request_timeout"), "{out}");
    }

    #[tokio::test]
    async fn event_stream_outlives_the_header_and_body_timeouts() {
        let d = start_with(Settings {
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            ..test_settings()
        })
        .await;
        let mut s = tokio::net::UnixStream::connect(d.home.socket())
            .await
            .unwrap();
        s.write_all(b"GET /v1/events HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        tokio::time::timeout(HANG, async {
            while !String::from_utf8_lossy(&seen).contains(": subscribed") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("the stream opens");
        // Well past both deadlines, the healthy stream is still open (a read waits, it does
        // not see the end).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let read = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(read.is_err(), "the event stream ended: {read:?}");
    }

    #[tokio::test]
    async fn shutdown_is_not_held_up_by_an_open_event_stream() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::start(Home::new(dir.path().to_owned()))
            .await
            .unwrap();
        let socket = dir.path().join("t.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let settings = test_settings();
        let viewers = test_viewers(&engine, &settings);
        let app = unix_app(engine, &settings, &viewers);
        let served = tokio::spawn(async move {
            serve(listener, app, &settings, async {
                let _ = stop_rx.await;
            })
            .await
        });
        let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
        s.write_all(b"GET /v1/events HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(HANG, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        stop_tx.send(()).unwrap();
        tokio::time::timeout(HANG, served)
            .await
            .expect("serve returned although a stream was open")
            .unwrap();
        // New connections are refused once it returned.
        assert!(tokio::net::UnixStream::connect(&socket).await.is_err());
    }

    #[tokio::test]
    async fn slow_but_moving_request_body_is_served() {
        let d = start_with(Settings {
            body_timeout: Duration::from_secs(2),
            ..test_settings()
        })
        .await;
        let body = br#"{"source": {"kind": "snapshot", "snapshot": "nosuch"}}"#;
        let mut s = tokio::net::UnixStream::connect(d.home.socket())
            .await
            .unwrap();
        s.write_all(
            format!(
                "POST /v1/sandboxes HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        // Each piece comes well within the deadline; all of them together take longer.
        for piece in body.chunks(10) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            s.write_all(piece).await.unwrap();
        }
        let out = read_until_closed(&mut s).await;
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        assert!(out.contains("snapshot_not_found"), "{out}");
    }

    /// Sends one keep-alive request on `s` and reads its whole (small, JSON) answer.
    async fn keep_alive_health(s: &mut tokio::net::UnixStream) -> String {
        s.write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(HANG, async {
            while !out.ends_with(b"}") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed");
                out.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("an answer");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn connections_over_the_cap_wait_until_one_closes() {
        let d = start_with(Settings {
            max_connections: 2,
            ..test_settings()
        })
        .await;
        let mut a = tokio::net::UnixStream::connect(d.home.socket())
            .await
            .unwrap();
        let mut b = tokio::net::UnixStream::connect(d.home.socket())
            .await
            .unwrap();
        assert!(keep_alive_health(&mut a).await.starts_with("HTTP/1.1 200"));
        assert!(keep_alive_health(&mut b).await.starts_with("HTTP/1.1 200"));
        // The third connects (the kernel's backlog) but is not served while two are open.
        let mut c = tokio::net::UnixStream::connect(d.home.socket())
            .await
            .unwrap();
        c.write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(500), c.read(&mut buf)).await;
        assert!(early.is_err(), "a third connection was served: {early:?}");
        // The two still work; once one closes, the third is served.
        assert!(keep_alive_health(&mut a).await.starts_with("HTTP/1.1 200"));
        drop(b);
        let out = read_until_closed(&mut c).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }

    #[tokio::test]
    async fn tcp_websocket_without_right_token_is_refused() {
        let d = start().await;
        let wrong = Client::tcp(d.tcp.to_string(), "f".repeat(64));
        let Err(err) = wrong.sandbox_run().await else {
            panic!("the WebSocket opened without the right token");
        };
        assert!(
            format!("{:?}", err).contains("401"),
            "expected a 401 handshake failure, got {err:?}"
        );
    }

    #[tokio::test]
    async fn unix_socket_needs_no_token() {
        let d = start().await;
        let c = Client::unix(d.home.socket());
        assert!(c.health().await.is_ok());
        assert!(c.sandbox_list(&[]).await.unwrap().sandboxes.is_empty());
        // Errors keep their documented codes through the client.
        let id: kiln_api_types::SandboxId = "sb-0123456789ab".parse().unwrap();
        let (status, code) = status_and_code(c.sandbox_get(&id).await.unwrap_err());
        assert_eq!((status, code.as_str()), (404, "sandbox_not_found"));
    }
}
