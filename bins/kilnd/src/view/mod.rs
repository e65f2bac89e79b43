//! The live view of desktop sandboxes: a small HTTP listener for browsers, separate from the
//! API, that serves Debian's noVNC and relays its WebSocket to the sandbox's VNC server
//! (QEMU's `-vnc unix:<run dir>/vnc.sock`). No VNC port is ever on the network.
//!
//! A browser can send neither a unix-socket request nor an `Authorization` header on a
//! WebSocket, so the API mints a *viewer link* instead (`POST
//! /v1/sandboxes/{id}/desktop/view`, [`Viewers::mint`]): a random capability token (32
//! bytes, 64 hex digits) bound to one sandbox and to view-only or control, valid until the
//! sandbox is removed or its TTL (`view_ttl_secs`, default 24 h) passes. Tokens live only in
//! the daemon's memory (a restarted daemon forgets them) and are looked up by their SHA-256,
//! so a lookup's timing says nothing about a token's bytes.
//!
//! Paths of the viewer listener (default `127.0.0.1` with a port picked at start; not part of
//! the `/v1` API nor of the OpenAPI document):
//! - `GET /view/<token>/<file>`: a file under the noVNC directory (`novnc_dir`, default
//!   `/usr/share/novnc`). Only `GET` (and `HEAD`); a path with an empty, `.`, `..` or hidden
//!   segment is refused, and the file's canonical path must lie under the directory's, so
//!   neither `..` nor a symlink can leave it.
//! - `GET /view/<token>/websockify`: a WebSocket whose binary messages are relayed to and
//!   from a new connection to the sandbox's VNC socket (one per viewer: QEMU serves several
//!   clients when they are shared). Server → browser bytes pass untouched; browser → server
//!   bytes go through [`rfb::RfbFilter`], which forces the shared flag and, without control,
//!   drops every input message. Memory per viewer is bounded: one WebSocket message
//!   ([`MAX_WS_MESSAGE`]) in, [`RELAY_BUFFER`] out.
//!
//! A refused client message ends the connection and nothing of the WebSocket message that
//! held it is forwarded. Both directions end together; a viewer also ends when its link expires, when its sandbox
//! is removed ([`Viewers::watch_events`]), when QEMU closes the socket (the VM stopped) and
//! when the daemon stops ([`Viewers::close_all`]). Unknown or expired tokens are 404.

pub mod rfb;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use kiln_api_types::{Event, EventKind, SandboxId};
use kiln_core::{CoreError, Engine};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};
use tracing::{Instrument, debug, info, info_span, warn};

/// Where Debian's `novnc` package puts noVNC.
pub const DEFAULT_NOVNC_DIR: &str = "/usr/share/novnc";
/// Most viewer links alive at once; minting more is refused until some expire.
pub const MAX_GRANTS: usize = 4096;
/// Largest WebSocket message a viewer may send (a clipboard at its limit fits).
pub const MAX_WS_MESSAGE: usize = rfb::MAX_CUT_TEXT as usize + (64 << 10);
/// Bytes read from QEMU at once and sent as one WebSocket message.
pub const RELAY_BUFFER: usize = 64 << 10;
/// Largest file served from the noVNC directory (its largest is about 200 KiB).
const MAX_FILE_BYTES: u64 = 8 << 20;

/// Where the screen of a sandbox is; the engine in the daemon, a fixed socket in tests.
pub trait VncLocator: Send + Sync + 'static {
    /// The VNC unix socket of a running desktop sandbox.
    fn vnc_socket(&self, id: &SandboxId) -> Result<PathBuf, CoreError>;
}

impl VncLocator for Engine {
    fn vnc_socket(&self, id: &SandboxId) -> Result<PathBuf, CoreError> {
        self.desktop_vnc_socket(id)
    }
}

/// What the viewer listener needs to know, from the daemon's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewConfig {
    /// The address browsers reach the listener at (its bound address).
    pub addr: SocketAddr,
    /// How long a link is valid.
    pub ttl: Duration,
    /// The noVNC directory.
    pub novnc_dir: PathBuf,
}

/// Why no link could be minted.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// noVNC is not installed where the daemon looks for it.
    #[error(
        "noVNC is not installed: {path} is missing (install Debian's `novnc` package, or set novnc_dir)"
    )]
    NoNovnc {
        /// The page that should be there.
        path: PathBuf,
    },
    /// [`MAX_GRANTS`] links are alive.
    #[error("{MAX_GRANTS} viewer links are alive; try again when some have expired")]
    TooMany,
}

/// A minted link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewLink {
    /// The page to open.
    pub url: String,
    /// When it stops working, in milliseconds since the Unix epoch.
    pub expires_at_unix_ms: u64,
}

/// One link's rights.
#[derive(Debug, Clone)]
struct Grant {
    sandbox: SandboxId,
    control: bool,
    deadline: Instant,
}

/// The viewer side of the daemon: links, the listener's router, live viewers. Cheap to
/// clone (one shared table).
#[derive(Clone)]
pub struct Viewers(Arc<Inner>);

struct Inner {
    config: ViewConfig,
    locator: Arc<dyn VncLocator>,
    /// SHA-256 of the token → its grant.
    grants: Mutex<HashMap<[u8; 32], Grant>>,
    /// Sandboxes whose viewers must end now.
    revoked: broadcast::Sender<SandboxId>,
    /// Set once: every viewer ends (the daemon stops).
    closing: watch::Sender<bool>,
}

impl std::fmt::Debug for Viewers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Viewers")
            .field("config", &self.0.config)
            .finish_non_exhaustive()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Viewers {
    /// The viewer side for `config`, finding screens with `locator`.
    pub fn new(config: ViewConfig, locator: Arc<dyn VncLocator>) -> Viewers {
        let (revoked, _) = broadcast::channel(64);
        let (closing, _) = watch::channel(false);
        Viewers(Arc::new(Inner {
            config,
            locator,
            grants: Mutex::new(HashMap::new()),
            revoked,
            closing,
        }))
    }

    fn grants(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Grant>> {
        // A panic while holding the lock cannot leave the map half-updated (each use is
        // one insert, remove or retain), so a poisoned lock is still usable.
        self.0
            .grants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new link to the screen of `sandbox` (whose existence and screen the caller checked).
    pub fn mint(&self, sandbox: &SandboxId, control: bool) -> Result<ViewLink, ViewError> {
        let page = self.0.config.novnc_dir.join("vnc.html");
        if !page.is_file() {
            return Err(ViewError::NoNovnc { path: page });
        }
        let token: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let ttl = self.0.config.ttl;
        {
            let mut grants = self.grants();
            let now = Instant::now();
            grants.retain(|_, g| g.deadline > now);
            if grants.len() >= MAX_GRANTS {
                return Err(ViewError::TooMany);
            }
            grants.insert(
                digest(&token),
                Grant {
                    sandbox: sandbox.clone(),
                    control,
                    deadline: now + ttl,
                },
            );
        }
        info!(sandbox_id = %sandbox, control, ttl_secs = ttl.as_secs(), "viewer link minted");
        Ok(ViewLink {
            url: view_url(self.0.config.addr, &token, control),
            expires_at_unix_ms: unix_ms(SystemTime::now() + ttl),
        })
    }

    /// The VNC socket of `sandbox`, or why it has none (not running, not a desktop).
    pub fn screen_of(&self, sandbox: &SandboxId) -> Result<PathBuf, CoreError> {
        self.0.locator.vnc_socket(sandbox)
    }

    /// The grant of a live token.
    fn lookup(&self, token: &str) -> Option<Grant> {
        let key = digest(token);
        let mut grants = self.grants();
        match grants.get(&key) {
            Some(g) if g.deadline > Instant::now() => Some(g.clone()),
            Some(_) => {
                grants.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends every link of `sandbox` and its live viewers.
    pub fn revoke(&self, sandbox: &SandboxId) {
        let before = {
            let mut grants = self.grants();
            let before = grants.len();
            grants.retain(|_, g| &g.sandbox != sandbox);
            before - grants.len()
        };
        let _ = self.0.revoked.send(sandbox.clone());
        if before > 0 {
            info!(sandbox_id = %sandbox, links = before, "viewer links revoked");
        }
    }

    /// Ends every live viewer and refuses new ones (the daemon stops).
    pub fn close_all(&self) {
        self.0.closing.send_replace(true);
    }

    /// Revokes a sandbox's links when the engine reports it removed; runs until `events`
    /// closes.
    pub fn watch_events(&self, mut events: broadcast::Receiver<Event>) {
        let me = self.clone();
        tokio::spawn(
            async move {
                loop {
                    match events.recv().await {
                        Ok(Event {
                            sandbox,
                            kind: EventKind::Removed { .. },
                            ..
                        }) => me.revoke(&sandbox),
                        Ok(_) => {}
                        // A missed removal only delays: the link's next use asks the engine,
                        // and QEMU's exit closes its viewers.
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            warn!(missed = n, "viewer link watcher lagged behind the events")
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    }
                }
            }
            .instrument(info_span!("view-events")),
        );
    }

    /// The viewer listener's routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/view/{token}/websockify", get(websockify))
            .route("/view/{token}/{*path}", get(static_file))
            .fallback(|| async { plain(StatusCode::NOT_FOUND, "not found") })
            .with_state(self.clone())
    }
}

/// The noVNC page of a link: it connects by itself to the link's WebSocket, reconnects when
/// the VM restarts, scales the screen to the window, and is view-only unless `control`.
pub fn view_url(addr: SocketAddr, token: &str, control: bool) -> String {
    let view_only = if control { 0 } else { 1 };
    format!(
        "http://{addr}/view/{token}/vnc.html?autoconnect=1&reconnect=1&reconnect_delay=2000&resize=scale&shared=1&view_only={view_only}&path=view/{token}/websockify"
    )
}

fn plain(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{text}\n"),
    )
        .into_response()
}

/// The unknown or expired token answer (the same for both, and for a bad path).
fn no_such_link() -> Response {
    plain(
        StatusCode::NOT_FOUND,
        "no such viewer link (it expired, or its sandbox was removed); ask for a new one with `kiln desktop view`",
    )
}

/// A relative path inside the noVNC directory, checked segment by segment.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for seg in path.split('/') {
        if seg.is_empty()
            || seg.starts_with('.')
            || seg.contains('\\')
            || seg.contains('\0')
            || seg.len() > 255
        {
            return None;
        }
        out.push(seg);
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "mp3" => "audio/mpeg",
        "oga" => "audio/ogg",
        _ => "application/octet-stream",
    }
}

/// `GET /view/<token>/<path>`: one file of noVNC.
async fn static_file(
    State(v): State<Viewers>,
    UrlPath((token, path)): UrlPath<(String, String)>,
) -> Response {
    if v.lookup(&token).is_none() {
        return no_such_link();
    }
    let Some(rel) = safe_relative(&path) else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    let root = &v.0.config.novnc_dir;
    let found = async {
        let root = tokio::fs::canonicalize(root).await.ok()?;
        let file = tokio::fs::canonicalize(root.join(&rel)).await.ok()?;
        if !file.starts_with(&root) {
            return None;
        }
        let meta = tokio::fs::metadata(&file).await.ok()?;
        if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
            return None;
        }
        tokio::fs::read(&file).await.ok().map(|b| (file, b))
    }
    .await;
    let Some((file, bytes)) = found else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    let mut resp = Response::new(Body::from(bytes));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&file)),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The token is in the URL: never send it to another site.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `GET /view/<token>/websockify`: the relay.
async fn websockify(
    State(v): State<Viewers>,
    UrlPath(token): UrlPath<String>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(grant) = v.lookup(&token) else {
        return no_such_link();
    };
    if *v.0.closing.borrow() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping");
    }
    let socket = match v.0.locator.vnc_socket(&grant.sandbox) {
        Ok(s) => s,
        Err(e) => {
            debug!(sandbox_id = %grant.sandbox, error = %e.chain(), "viewer refused");
            return plain(StatusCode::CONFLICT, &e.chain());
        }
    };
    let vnc = match tokio::net::UnixStream::connect(&socket).await {
        Ok(s) => s,
        Err(e) => {
            warn!(sandbox_id = %grant.sandbox, socket = %socket.display(), error = %e, "cannot reach the sandbox's VNC server");
            return plain(
                StatusCode::BAD_GATEWAY,
                "the sandbox's screen cannot be reached",
            );
        }
    };
    let span = info_span!("viewer", sandbox_id = %grant.sandbox, control = grant.control);
    let key = digest(&token);
    ws.protocols(["binary"])
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .on_upgrade(move |ws| relay(v, key, grant, ws, vnc).instrument(span))
}

/// Why a relay ended.
#[derive(Debug)]
enum End {
    /// The browser closed or went away.
    Browser,
    /// QEMU closed the socket (the VM stopped).
    Server,
    /// The browser sent what the filter refuses.
    Refused(rfb::RfbError),
    /// Reading or writing failed.
    Io(String),
    /// The link expired.
    Expired,
    /// The sandbox was removed.
    Revoked,
    /// The daemon is stopping.
    Closing,
}

/// Copies one viewer's bytes both ways until either side ends, then closes both.
async fn relay(
    v: Viewers,
    key: [u8; 32],
    grant: Grant,
    ws: WebSocket,
    vnc: tokio::net::UnixStream,
) {
    info!("viewer connected");
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut vnc_rx, mut vnc_tx) = vnc.into_split();
    let mut revoked_rx = v.0.revoked.subscribe();
    let mut closing = v.0.closing.subscribe();
    let mut filter = rfb::RfbFilter::new(grant.control);
    let end = {
        let up = async {
            let mut out = Vec::with_capacity(4096);
            while let Some(msg) = ws_rx.next().await {
                let data = match msg {
                    Ok(Message::Binary(b)) => b,
                    Ok(Message::Close(_)) => break,
                    Ok(Message::Text(_)) => {
                        return End::Io("the viewer sent a text message".to_owned());
                    }
                    Ok(_) => continue,
                    Err(e) => return End::Io(e.to_string()),
                };
                out.clear();
                if let Err(e) = filter.feed(&data, &mut out) {
                    return End::Refused(e);
                }
                if !out.is_empty()
                    && let Err(e) = vnc_tx.write_all(&out).await
                {
                    return End::Io(e.to_string());
                }
            }
            End::Browser
        };
        let down = async {
            let mut buf = vec![0u8; RELAY_BUFFER];
            loop {
                match vnc_rx.read(&mut buf).await {
                    Ok(0) => return End::Server,
                    Ok(n) => {
                        if ws_tx
                            .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                        {
                            return End::Browser;
                        }
                    }
                    Err(e) => return End::Io(e.to_string()),
                }
            }
        };
        let revoked = async {
            loop {
                match revoked_rx.recv().await {
                    Ok(id) if id == grant.sandbox => return,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if !v.grants().contains_key(&key) {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        };
        tokio::select! {
            e = up => e,
            e = down => e,
            () = tokio::time::sleep_until(grant.deadline.into()) => End::Expired,
            () = revoked => End::Revoked,
            _ = closing.wait_for(|c| *c) => End::Closing,
        }
    };
    let (code, reason) = match &end {
        End::Browser => (1000, "closed"),
        End::Server => (1000, "the screen closed (the sandbox stopped)"),
        End::Refused(_) => (1008, "message refused"),
        End::Io(_) => (1011, "relay error"),
        End::Expired => (1008, "viewer link expired"),
        End::Revoked => (1000, "the sandbox was removed"),
        End::Closing => (1001, "the daemon is stopping"),
    };
    match &end {
        End::Refused(e) => warn!(error = %e, "viewer closed: it sent what the relay refuses"),
        End::Io(e) => info!(error = %e, "viewer closed"),
        other => info!(reason = ?other, dropped_inputs = filter.dropped(), "viewer closed"),
    }
    let close = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    // Best effort, bounded: a browser that stopped reading must not hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(2), ws_tx.send(close)).await;
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_real;
