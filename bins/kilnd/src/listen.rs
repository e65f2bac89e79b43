//! The two front doors of the API: the unix socket's router (no token) and the TCP
//! listener's (the same router behind [`crate::auth::require_token`]).
//!
//! Both share [`crate::api::router`] and the request body limit; only authentication
//! differs. Must not hold routes of its own.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use kiln_core::Engine;

use crate::Settings;
use crate::auth::{TokenFile, require_token};

/// The router served on the unix socket.
pub fn unix_app(engine: Arc<Engine>, settings: &Settings) -> Router {
    crate::api::router(engine).layer(DefaultBodyLimit::max(body_limit(settings)))
}

/// The router served on the TCP listener: every request needs the bearer token in
/// `token_path`.
pub fn tcp_app(engine: Arc<Engine>, settings: &Settings, token_path: PathBuf) -> Router {
    unix_app(engine, settings).layer(axum::middleware::from_fn_with_state(
        TokenFile(Arc::new(token_path)),
        require_token,
    ))
}

fn body_limit(settings: &Settings) -> usize {
    usize::try_from(settings.max_body_bytes).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_client::{Client, ClientError, ClientHome};
    use kiln_core::Home;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Daemon {
        _dir: tempfile::TempDir,
        home: ClientHome,
        tcp: std::net::SocketAddr,
    }

    /// A test engine (no VM is started by the routes used here) served on a loopback TCP
    /// port and on a unix socket, both in-process.
    async fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let home = ClientHome::new(dir.path().to_owned());
        let engine = Engine::start(Home::new(dir.path().to_owned()))
            .await
            .unwrap();
        let settings = Settings {
            listen: None,
            max_body_bytes: 1 << 20,
        };
        kiln_client::token::read_or_create(&home.token()).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let app = tcp_app(Arc::clone(&engine), &settings, home.token());
        tokio::spawn(async move { axum::serve(tcp, app).await });
        let unix = tokio::net::UnixListener::bind(home.socket()).unwrap();
        let app = unix_app(engine, &settings);
        tokio::spawn(async move { axum::serve(unix, app).await });
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
        assert_eq!((status, err.code.as_str()), (413, "bad_request"));
        let (status, err) = raw(&d, "PUT /v1/health HTTP/1.1", b"").await;
        assert_eq!((status, err.code.as_str()), (405, "not_found"));
        let (status, err) = raw(&d, "GET /v1/run HTTP/1.1", b"").await;
        assert!((400..500).contains(&status), "{status}");
        assert_eq!(err.code, "bad_request");
        let (status, err) = raw(&d, "GET /v1/nope HTTP/1.1", b"").await;
        assert_eq!((status, err.code.as_str()), (404, "not_found"));
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
