//! The CLI's connection to `kilnd`: finds or starts the daemon, then speaks its HTTP API over
//! the unix socket (plain requests, NDJSON streams and the exec WebSocket).
//!
//! Starting the daemon: if nothing answers on `$KILN_HOME/kilnd.sock`, the CLI spawns `kilnd`
//! (found beside the `kiln` executable, or `$KILN_KILND`) detached in its own session with its
//! output in `kilnd.log`, then waits until the socket answers `GET /v1/health`, bounded by a
//! deadline. A second CLI racing to start one is harmless: kilnd's lock lets only one serve.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use kiln_api_types::{ApiError, Health};
use kiln_core::Home;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

/// How long to wait for a freshly started daemon to answer.
const DAEMON_START_DEADLINE: Duration = Duration::from_secs(20);

/// A client of one daemon.
pub struct Client {
    socket: PathBuf,
}

/// An API error answered by the daemon.
#[derive(Debug)]
pub struct DaemonError {
    /// Error body.
    pub body: ApiError,
}

impl std::fmt::Display for DaemonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.body.message)
    }
}

impl std::error::Error for DaemonError {}

impl Client {
    /// Connects to the daemon of `home`, starting one if none answers.
    pub async fn connect(home: &Home) -> anyhow::Result<Client> {
        Client::connect_with_env(home, &[]).await
    }

    /// Like [`Client::connect`]; a daemon started here also gets `env`.
    pub async fn connect_with_env(home: &Home, env: &[(&str, &str)]) -> anyhow::Result<Client> {
        let client = Client {
            socket: home.socket(),
        };
        if client.health().await.is_ok() {
            return Ok(client);
        }
        start_daemon(home, env)?;
        let started = Instant::now();
        let mut delay = Duration::from_millis(5);
        loop {
            match client.health().await {
                Ok(_) => return Ok(client),
                Err(e) if started.elapsed() > DAEMON_START_DEADLINE => {
                    let log = tail_of(&home.daemon_log(), 2000);
                    bail!(
                        "kilnd did not start within {DAEMON_START_DEADLINE:?}: {e:#}\nkilnd.log:\n{log}"
                    );
                }
                // Polling the socket is the handshake here: nothing else can tell us it is up.
                Err(_) => tokio::time::sleep(delay).await,
            }
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// The daemon of `home` if one answers; never starts one.
    pub async fn existing(home: &Home) -> Option<Client> {
        let client = Client {
            socket: home.socket(),
        };
        client.health().await.ok().map(|_| client)
    }

    /// The daemon's health report.
    pub async fn health(&self) -> anyhow::Result<Health> {
        self.get("/v1/health").await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("cannot connect to kilnd at {}", self.socket.display()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with kilnd failed")?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "kilnd")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .context("building request")?;
        sender
            .send_request(req)
            .await
            .context("request to kilnd failed")
    }

    /// A request whose answer is one JSON document (or an API error).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = read_body(resp).await?;
        decode(status, &bytes)
    }

    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// A request answering no body (204), or an API error.
    pub async fn call_empty(&self, method: Method, path: &str) -> anyhow::Result<()> {
        self.send_no_content(method, path, None).await
    }

    /// A request with a JSON body answering no body (204), or an API error.
    pub async fn call_no_content(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<()> {
        self.send_no_content(method, path, Some(serde_json::to_vec(body)?))
            .await
    }

    async fn send_no_content(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<()> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let bytes = read_body(resp).await?;
        Err(api_error(status, &bytes).into())
    }

    /// A request answering newline-delimited JSON; `on_line` sees each decoded line.
    pub async fn stream_lines<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
        mut on_line: impl FnMut(T) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let resp = self
            .send(method, path, Some(serde_json::to_vec(body)?))
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(api_error(status, &read_body(resp).await?).into());
        }
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("kilnd's stream broke off")?;
            if let Some(data) = frame.data_ref() {
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    on_line(serde_json::from_slice(&line).context("malformed line from kilnd")?)?;
                }
            }
        }
        Ok(())
    }

    /// `GET path` answering a text stream; `on_line` sees each line (without its newline)
    /// until the stream ends or `on_line` says stop (`Ok(false)`).
    pub async fn stream_text_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&str) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let resp = self.send(Method::GET, path, None).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(api_error(status, &read_body(resp).await?).into());
        }
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("kilnd's stream broke off")?;
            if let Some(data) = frame.data_ref() {
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let text = String::from_utf8_lossy(&line[..line.len() - 1]);
                    if !on_line(&text)? {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Opens a WebSocket to `path`.
    pub async fn websocket(
        &self,
        path: &str,
    ) -> anyhow::Result<tokio_tungstenite::WebSocketStream<UnixStream>> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("cannot connect to kilnd at {}", self.socket.display()))?;
        let (ws, _) = tokio_tungstenite::client_async(format!("ws://kilnd{path}"), stream)
            .await
            .context("WebSocket handshake with kilnd failed")?;
        Ok(ws)
    }
}

/// The whole body of an answer.
async fn read_body(resp: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<Bytes> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .context("reading kilnd's answer")?
        .to_bytes())
}

fn decode<T: DeserializeOwned>(status: StatusCode, bytes: &[u8]) -> anyhow::Result<T> {
    if !status.is_success() {
        return Err(api_error(status, bytes).into());
    }
    serde_json::from_slice(bytes).context("malformed answer from kilnd")
}

fn api_error(status: StatusCode, bytes: &[u8]) -> DaemonError {
    let body = serde_json::from_slice(bytes).unwrap_or_else(|_| ApiError {
        code: "http".into(),
        message: format!(
            "kilnd answered {status}: {}",
            String::from_utf8_lossy(bytes)
        ),
    });
    DaemonError { body }
}

/// Starts `kilnd` detached, logging to `kilnd.log`.
fn start_daemon(home: &Home, env: &[(&str, &str)]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let kilnd = match std::env::var_os("KILN_KILND").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .context("locating the kiln executable")?
            .with_file_name("kilnd"),
    };
    if !kilnd.exists() {
        bail!(
            "kilnd not found at {} (build with scripts/build, or set KILN_KILND)",
            kilnd.display()
        );
    }
    home.ensure()
        .with_context(|| format!("failed to create {}", home.root().display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.daemon_log())
        .with_context(|| format!("failed to open {}", home.daemon_log().display()))?;
    let mut cmd = std::process::Command::new(&kilnd);
    cmd.env("KILN_HOME", home.root())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    cmd.spawn()
        .with_context(|| format!("failed to start {}", kilnd.display()))?;
    Ok(())
}

/// The last `max` bytes of a file, as text.
pub fn tail_of(path: &std::path::Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b[b.len().saturating_sub(max)..]).into_owned(),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
