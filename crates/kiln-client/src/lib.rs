//! Client of kiln's HTTP API, used by the `kiln` CLI (and any Rust program driving `kilnd`).
//!
//! Owns the transport and nothing else: HTTP/1.1 over the daemon's unix socket (no token) or
//! over a TCP listener with a bearer token, plain JSON requests, the NDJSON image build
//! stream and the exec WebSockets, plus starting a daemon on demand ([`Client::connect`]).
//! Every request is built from the route table [`kiln_api_types::routes`], the same constants
//! the daemon declares its handlers and its OpenAPI document with, so a path cannot drift.
//! It must not depend on the engine (`kiln-core`): what it knows of `$KILN_HOME` is in
//! [`ClientHome`].
//!
//! Starting the daemon: if nothing answers on `$KILN_HOME/kilnd.sock`, [`Client::connect`]
//! spawns `kilnd` (found beside the current executable, or `$KILN_KILND`) detached in its own
//! session with its output in `kilnd.log`, then waits until the socket answers
//! `GET /v1/health`, bounded by a deadline. A second client racing to start one is harmless:
//! kilnd's lock lets only one serve.

pub mod config;
mod daemon;
mod home;
pub mod token;
mod typed;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use kiln_api_types::ApiError;
use kiln_api_types::routes::{Method, PathParamsError, Route};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

pub use daemon::{kilnd_path, tail_of};
pub use home::ClientHome;

/// How long to wait for a freshly started daemon to answer.
pub const DAEMON_START_DEADLINE: Duration = Duration::from_secs(20);

/// A byte stream to the daemon (unix or TCP).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An open exec WebSocket.
pub type WsStream = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error body.
    #[error("{}", body.message)]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body (`code` `http` if the body was not an `ApiError`).
        body: ApiError,
    },
    /// Nothing accepts connections at the endpoint.
    #[error("cannot connect to kilnd at {endpoint}")]
    Connect {
        /// Socket path or TCP address.
        endpoint: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("{what}")]
    Http {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: hyper::Error,
    },
    /// Reading a response body failed.
    #[error("reading the response failed")]
    Read(#[source] std::io::Error),
    /// The request could not be built (e.g. a token that is not a valid header value).
    #[error("building the request failed")]
    Build(#[source] hyper::http::Error),
    /// A request body could not be encoded.
    #[error("encoding the request failed")]
    Encode(#[source] serde_json::Error),
    /// An answer was not the JSON expected.
    #[error("malformed answer from kilnd")]
    Decode(#[source] serde_json::Error),
    /// The WebSocket handshake failed.
    #[error("WebSocket handshake with kilnd failed")]
    WebSocket(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    /// A route was given the wrong number of path parameters (a bug in the caller).
    #[error("bad route parameters")]
    Route(#[source] PathParamsError),
    /// A callback given to a streaming call failed.
    #[error("{0}")]
    Callback(Box<dyn std::error::Error + Send + Sync>),
    /// Starting the daemon failed.
    #[error("{what} {path}")]
    Start {
        /// What was being done.
        what: &'static str,
        /// File involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The `kilnd` binary is not where it was looked for.
    #[error("kilnd not found at {} (build with scripts/build, or set KILN_KILND)", path.display())]
    KilndMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A daemon was started but did not answer in time.
    #[error("kilnd did not start within {deadline:?}: {last}\nkilnd.log:\n{log}")]
    StartTimeout {
        /// The deadline.
        deadline: Duration,
        /// The last connection error, with its chain.
        last: String,
        /// The end of the daemon's log.
        log: String,
    },
}

impl ClientError {
    /// The API error body, if the daemon answered with one.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api { body, .. } => Some(body),
            _ => None,
        }
    }
}

/// Result of the client.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Where the daemon listens.
#[derive(Debug, Clone)]
enum Endpoint {
    Unix(PathBuf),
    Tcp { addr: String, token: String },
}

impl Endpoint {
    fn describe(&self) -> String {
        match self {
            Endpoint::Unix(p) => p.display().to_string(),
            Endpoint::Tcp { addr, .. } => addr.clone(),
        }
    }

    fn host(&self) -> &str {
        match self {
            Endpoint::Unix(_) => "kilnd",
            Endpoint::Tcp { addr, .. } => addr,
        }
    }

    fn token(&self) -> Option<&str> {
        match self {
            Endpoint::Unix(_) => None,
            Endpoint::Tcp { token, .. } => Some(token),
        }
    }

    async fn open(&self) -> Result<Box<dyn Io>> {
        let connect_err = |source| ClientError::Connect {
            endpoint: self.describe(),
            source,
        };
        Ok(match self {
            Endpoint::Unix(p) => Box::new(
                tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(connect_err)?,
            ),
            Endpoint::Tcp { addr, .. } => Box::new(
                tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(connect_err)?,
            ),
        })
    }
}

/// A client of one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
}

impl Client {
    /// A client of the daemon on the unix socket `socket` (nothing is checked yet).
    pub fn unix(socket: PathBuf) -> Client {
        Client {
            endpoint: Endpoint::Unix(socket),
        }
    }

    /// A client of a daemon's TCP listener at `addr` (`host:port`), sending `token`.
    pub fn tcp(addr: impl Into<String>, token: impl Into<String>) -> Client {
        Client {
            endpoint: Endpoint::Tcp {
                addr: addr.into(),
                token: token.into(),
            },
        }
    }

    /// Connects to the daemon of `home`, starting one if none answers.
    pub async fn connect(home: &ClientHome) -> Result<Client> {
        Client::connect_with_env(home, &[]).await
    }

    /// Like [`Client::connect`]; a daemon started here also gets `env`.
    pub async fn connect_with_env(home: &ClientHome, env: &[(&str, &str)]) -> Result<Client> {
        let client = Client::unix(home.socket());
        if client.health().await.is_ok() {
            return Ok(client);
        }
        daemon::start(home, env)?;
        let started = Instant::now();
        let mut delay = Duration::from_millis(5);
        loop {
            match client.health().await {
                Ok(_) => return Ok(client),
                Err(e) if started.elapsed() > DAEMON_START_DEADLINE => {
                    return Err(ClientError::StartTimeout {
                        deadline: DAEMON_START_DEADLINE,
                        last: error_chain(&e),
                        log: tail_of(&home.daemon_log(), 2000),
                    });
                }
                // Polling the socket is the handshake here: nothing else can tell us it is up.
                Err(_) => tokio::time::sleep(delay).await,
            }
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// The daemon of `home` if one answers; never starts one.
    pub async fn existing(home: &ClientHome) -> Option<Client> {
        let client = Client::unix(home.socket());
        client.health().await.ok().map(|_| client)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let body = Full::new(Bytes::from(body.unwrap_or_default()))
            .map_err(|never| match never {})
            .boxed_unsync();
        self.send_body(method, path, "application/json", body).await
    }

    async fn send_body(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: UnsyncBoxBody<Bytes, std::io::Error>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let stream = self.endpoint.open().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ClientError::Http {
                what: "HTTP handshake with kilnd failed",
                source,
            })?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method.as_str())
            .uri(path)
            .header("host", self.endpoint.host())
            .header("content-type", content_type);
        if let Some(token) = self.endpoint.token() {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req.body(body).map_err(ClientError::Build)?;
        sender
            .send_request(req)
            .await
            .map_err(|source| ClientError::Http {
                what: "request to kilnd failed",
                source,
            })
    }

    /// `route` with `params` and `query`, its body streamed from `reader` (64 KiB at a time:
    /// memory stays bounded whatever the size), answering one JSON document.
    pub async fn upload<T: DeserializeOwned>(
        &self,
        route: Route,
        params: &[&str],
        query: &[(&str, &str)],
        content_type: &str,
        reader: impl AsyncRead + Send + Unpin + 'static,
    ) -> Result<T> {
        use tokio::io::AsyncReadExt;
        let path = with_query(route.path_with(params).map_err(ClientError::Route)?, query);
        let chunks = futures_util::stream::unfold(reader, |mut r| async move {
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            match r.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(hyper::body::Frame::data(Bytes::from(buf))), r))
                }
                Err(e) => Some((Err(e), r)),
            }
        });
        let body = http_body_util::StreamBody::new(chunks).boxed_unsync();
        let resp = self
            .send_body(route.method, &path, content_type, body)
            .await?;
        let status = resp.status();
        let bytes = read_body(resp).await?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    /// `route` with `params`, answering one JSON document (or an API error).
    pub async fn call<T: DeserializeOwned>(
        &self,
        route: Route,
        params: &[&str],
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        self.call_with_query(route, params, &[], body).await
    }

    /// [`Client::call`] with query parameters (`key=value` pairs, form-encoded).
    pub async fn call_with_query<T: DeserializeOwned>(
        &self,
        route: Route,
        params: &[&str],
        query: &[(&str, &str)],
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let path = with_query(route.path_with(params).map_err(ClientError::Route)?, query);
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(ClientError::Encode)?;
        let resp = self.send(route.method, &path, body).await?;
        let status = resp.status();
        let bytes = read_body(resp).await?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    /// `route` with `params`, answering no body (204), or an API error.
    pub async fn call_no_content(
        &self,
        route: Route,
        params: &[&str],
        body: Option<&impl Serialize>,
    ) -> Result<()> {
        let path = route.path_with(params).map_err(ClientError::Route)?;
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(ClientError::Encode)?;
        let resp = self.send(route.method, &path, body).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        Err(api_error(status, &read_body(resp).await?))
    }

    /// `route` at `path` (already filled) with `query`, answering no body (204).
    pub(crate) async fn call_no_content_path(
        &self,
        route: Route,
        path: String,
        query: &[(&str, &str)],
    ) -> Result<()> {
        let path = with_query(path, query);
        let resp = self.send(route.method, &path, None).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        Err(api_error(status, &read_body(resp).await?))
    }

    /// `route` with `params`, answering newline-delimited JSON; `on_line` sees each decoded
    /// line, and its error ends the stream.
    pub async fn stream_lines<T: DeserializeOwned, E>(
        &self,
        route: Route,
        params: &[&str],
        body: &impl Serialize,
        mut on_line: impl FnMut(T) -> Result<(), E>,
    ) -> Result<()>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = route.path_with(params).map_err(ClientError::Route)?;
        let body = serde_json::to_vec(body).map_err(ClientError::Encode)?;
        let resp = self.send(route.method, &path, Some(body)).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(api_error(status, &read_body(resp).await?));
        }
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|source| ClientError::Http {
                what: "kilnd's stream broke off",
                source,
            })?;
            if let Some(data) = frame.data_ref() {
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let item = serde_json::from_slice(&line).map_err(ClientError::Decode)?;
                    on_line(item).map_err(|e| ClientError::Callback(e.into()))?;
                }
            }
        }
        Ok(())
    }

    /// `route` with `params` and `query`, answering a byte stream; `on_chunk` sees each
    /// piece as it arrives, until the stream ends or `on_chunk` answers `false`.
    pub async fn stream_bytes<E>(
        &self,
        route: Route,
        params: &[&str],
        query: &[(&str, &str)],
        mut on_chunk: impl FnMut(&[u8]) -> Result<bool, E>,
    ) -> Result<()>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = with_query(route.path_with(params).map_err(ClientError::Route)?, query);
        let resp = self.send(route.method, &path, None).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(api_error(status, &read_body(resp).await?));
        }
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|source| ClientError::Http {
                what: "kilnd's stream broke off",
                source,
            })?;
            if let Some(data) = frame.data_ref()
                && !on_chunk(data).map_err(|e| ClientError::Callback(e.into()))?
            {
                return Ok(());
            }
        }
        Ok(())
    }

    /// `route` with `params` and `query`, answering a byte stream, as an [`AsyncRead`]; a
    /// stream the daemon broke off is an error, never a short clean end.
    pub async fn download(
        &self,
        route: Route,
        params: &[&str],
        query: &[(&str, &str)],
    ) -> Result<ByteStream> {
        use futures_util::TryStreamExt;
        let path = with_query(route.path_with(params).map_err(ClientError::Route)?, query);
        let resp = self.send(route.method, &path, None).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(api_error(status, &read_body(resp).await?));
        }
        let stream = resp
            .into_body()
            .into_data_stream()
            .map_err(std::io::Error::other);
        Ok(Box::pin(tokio_util::io::StreamReader::new(stream)))
    }

    /// `route` with `params`, answering a text stream (server-sent events); `on_line` sees
    /// each line without its newline, until the stream ends or `on_line` answers `false`.
    pub async fn stream_text_lines<E>(
        &self,
        route: Route,
        params: &[&str],
        mut on_line: impl FnMut(&str) -> Result<bool, E>,
    ) -> Result<()>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = route.path_with(params).map_err(ClientError::Route)?;
        let resp = self.send(route.method, &path, None).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(api_error(status, &read_body(resp).await?));
        }
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|source| ClientError::Http {
                what: "kilnd's stream broke off",
                source,
            })?;
            if let Some(data) = frame.data_ref() {
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let text = String::from_utf8_lossy(&line[..line.len() - 1]);
                    if !on_line(&text).map_err(|e| ClientError::Callback(e.into()))? {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Opens the WebSocket of `route` with `params`.
    pub async fn websocket(&self, route: Route, params: &[&str]) -> Result<WsStream> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let path = route.path_with(params).map_err(ClientError::Route)?;
        let stream = self.endpoint.open().await?;
        let ws_err = |e| ClientError::WebSocket(Box::new(e));
        let mut req = format!("ws://{}{path}", self.endpoint.host())
            .into_client_request()
            .map_err(ws_err)?;
        if let Some(token) = self.endpoint.token() {
            let value = format!("Bearer {token}").parse().map_err(
                |e: hyper::header::InvalidHeaderValue| {
                    ClientError::Build(hyper::http::Error::from(e))
                },
            )?;
            req.headers_mut().insert("authorization", value);
        }
        let (ws, _) = tokio_tungstenite::client_async(req, stream)
            .await
            .map_err(ws_err)?;
        Ok(ws)
    }
}

/// A response body being read ([`Client::download`]).
pub type ByteStream = std::pin::Pin<Box<dyn AsyncRead + Send>>;

/// Bytes of an upload read and sent at a time.
const UPLOAD_CHUNK: usize = 64 << 10;

/// `path` with `query` appended, form-encoded.
fn with_query(mut path: String, query: &[(&str, &str)]) -> String {
    if !query.is_empty() {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in query {
            q.append_pair(k, v);
        }
        path.push('?');
        path.push_str(&q.finish());
    }
    path
}

/// The whole body of an answer.
async fn read_body(resp: hyper::Response<hyper::body::Incoming>) -> Result<Bytes> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(|source| ClientError::Http {
            what: "reading kilnd's answer failed",
            source,
        })?
        .to_bytes())
}

fn api_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    let body = serde_json::from_slice(bytes).unwrap_or_else(|_| ApiError {
        code: "http".into(),
        message: format!(
            "kilnd answered {status}: {}",
            String::from_utf8_lossy(bytes)
        ),
    });
    ClientError::Api {
        status: status.as_u16(),
        body,
    }
}

/// Formats an error and all its sources as one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_decodes_body_or_quotes_plain_text() {
        let e = api_error(
            StatusCode::NOT_FOUND,
            br#"{"code":"sandbox_not_found","message":"no sandbox sb-0123456789ab"}"#,
        );
        assert_eq!(e.api().map(|b| b.code.as_str()), Some("sandbox_not_found"));
        assert_eq!(e.to_string(), "no sandbox sb-0123456789ab");
        let e = api_error(StatusCode::BAD_GATEWAY, b"upstream gone");
        assert!(matches!(e, ClientError::Api { status: 502, .. }));
        assert_eq!(e.api().map(|b| b.code.as_str()), Some("http"));
        assert!(e.to_string().contains("upstream gone"), "{e}");
    }

    #[tokio::test]
    async fn connect_error_names_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("kilnd.sock");
        let err = Client::unix(sock.clone()).health().await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }));
        assert!(err.to_string().contains(&sock.display().to_string()));
    }
}
