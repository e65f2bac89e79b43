//! The QMP connection: handshake, reader and writer tasks, id correlation, events.
//!
//! ```text
//!  execute() ──register id──▶ pending map ◀──reply by id── reader task ◀── socket
//!      │                                                       │
//!      └──whole line──▶ writer task ──▶ socket                  └──events──▶ broadcast
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use crate::commands::QmpCommand;
use crate::error::QmpError;

/// Longest line accepted from the peer. QEMU's largest replies (`query-qmp-schema`) are a few
/// hundred KiB; anything past this is a broken or hostile peer.
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// Events buffered per subscriber before a slow one starts lagging.
const EVENT_CAPACITY: usize = 256;

/// Commands queued for the writer task.
const WRITE_QUEUE: usize = 64;

/// QEMU's version as announced in the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub struct QmpVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro (patch) version.
    pub micro: u32,
}

impl std::fmt::Display for QmpVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The server's greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpGreeting {
    /// QEMU's version.
    pub version: QmpVersion,
    /// Distribution package string (e.g. `Debian 1:7.2+dfsg-7+deb12u18`), may be empty.
    pub package: String,
    /// Capabilities the server offers (e.g. `oob`); none are enabled by this client.
    pub capabilities: Vec<String>,
}

/// When QEMU emitted an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub struct QmpTimestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// An asynchronous event (`{"event": NAME, "data": {...}, "timestamp": {...}}`).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `STOP`, `SHUTDOWN`, `MIGRATION`.
    pub event: String,
    /// Event payload (`{}` when absent).
    pub data: Value,
    /// When QEMU emitted it.
    pub timestamp: QmpTimestamp,
}

/// What the reader task hands to a waiting `execute`.
enum Reply {
    Return(Value),
    Error { class: String, desc: String },
    Closed(String),
}

struct State {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// `Some(reason)` once the connection is closed.
    closed: Option<String>,
}

/// State shared by the client handles and both tasks.
struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<QmpEvent>,
    closed_tx: watch::Sender<bool>,
    next_id: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // The map holds plain senders; a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection closed (first reason wins) and fails every pending command.
    fn close(&self, reason: String) {
        let drained: Vec<_> = {
            let mut st = self.state();
            if st.closed.is_none() {
                debug!(%reason, "qmp connection closed");
                st.closed = Some(reason);
            }
            st.pending.drain().collect()
        };
        let reason = self.closed_reason();
        for (_, tx) in drained {
            let _ = tx.send(Reply::Closed(reason.clone()));
        }
        self.closed_tx.send_replace(true);
    }

    fn closed_reason(&self) -> String {
        self.state().closed.clone().unwrap_or_default()
    }
}

struct Inner {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Vec<u8>>,
    greeting: QmpGreeting,
    tasks: [AbortHandle; 2],
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.close("client dropped".to_owned());
    }
}

/// A QMP connection. Cheap to clone; all clones share the connection, which closes when the
/// last clone is dropped. One QEMU monitor serves one client: keep one per VM.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("version", &self.inner.greeting.version)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Removes a pending slot when its `execute` future is dropped before the reply arrives.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.state().pending.remove(&self.id);
    }
}

impl QmpClient {
    /// Connects to a QMP unix socket and negotiates capabilities. Must run inside a tokio
    /// runtime (it spawns the reader and writer tasks). Callers bound it with a timeout.
    pub async fn connect(path: &Path) -> Result<QmpClient, QmpError> {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Self::handshake(stream).await
    }

    /// Runs the handshake over an already connected byte stream (a socket, a socket pair in
    /// tests).
    pub async fn handshake<S>(stream: S) -> Result<QmpClient, QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Self::handshake_parts(r, w).await
    }

    /// Runs the handshake over separate read and write halves (e.g. a child's stdout and
    /// stdin with `-qmp stdio`).
    pub async fn handshake_parts<R, W>(read: R, write: W) -> Result<QmpClient, QmpError>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let mut reader = BufReader::with_capacity(64 * 1024, read);
        let mut line = Vec::new();
        match read_line_bounded(&mut reader, &mut line, MAX_LINE_BYTES).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(QmpError::Disconnected {
                    reason: "end of stream before the greeting".to_owned(),
                });
            }
            Err(LineError::TooLong) => {
                return Err(QmpError::LineTooLong {
                    max_bytes: MAX_LINE_BYTES,
                });
            }
            Err(LineError::Io(e)) => return Err(QmpError::GreetingIo(e)),
        }
        let greeting = parse_greeting(&line)?;

        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (closed_tx, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                closed: None,
            }),
            events,
            closed_tx,
            next_id: AtomicU64::new(1),
        });
        let (writer_tx, writer_rx) = mpsc::channel(WRITE_QUEUE);
        let reader_task = tokio::spawn(reader_loop(reader, Arc::clone(&shared)));
        let writer_task = tokio::spawn(writer_loop(write, writer_rx, Arc::clone(&shared)));
        let client = QmpClient {
            inner: Arc::new(Inner {
                shared,
                writer: writer_tx,
                greeting,
                tasks: [reader_task.abort_handle(), writer_task.abort_handle()],
            }),
        };
        client.execute_raw("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// The server's greeting.
    pub fn greeting(&self) -> &QmpGreeting {
        &self.inner.greeting
    }

    /// QEMU's version from the greeting.
    pub fn version(&self) -> QmpVersion {
        self.inner.greeting.version
    }

    /// Subscribes to events. Only events received after this call are delivered; a receiver
    /// that falls more than 256 events behind gets `RecvError::Lagged`.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.inner.shared.events.subscribe()
    }

    /// True once the connection is closed.
    pub fn is_closed(&self) -> bool {
        *self.inner.shared.closed_tx.borrow()
    }

    /// Resolves once the connection is closed (QEMU exited or the socket broke).
    pub async fn closed(&self) {
        let mut rx = self.inner.shared.closed_tx.subscribe();
        // `wait_for` fails only if the sender is dropped, which `self` prevents.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Runs a typed command.
    pub async fn execute<C: QmpCommand>(&self, cmd: &C) -> Result<C::Returns, QmpError> {
        let args = serde_json::to_value(cmd).map_err(|source| QmpError::Encode {
            command: C::NAME.to_owned(),
            source,
        })?;
        let args = match args {
            Value::Null => None,
            Value::Object(m) if m.is_empty() => None,
            other => Some(other),
        };
        let ret = self.execute_raw(C::NAME, args).await?;
        serde_json::from_value(ret).map_err(|source| QmpError::Decode {
            command: C::NAME.to_owned(),
            source,
        })
    }

    /// Runs any command by name with optional arguments (a JSON object) and returns the raw
    /// `return` value. Waits as long as QEMU takes; bound it with `tokio::time::timeout`.
    pub async fn execute_raw(&self, name: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let shared = &*self.inner.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = shared.state();
            if let Some(reason) = &st.closed {
                return Err(QmpError::Disconnected {
                    reason: reason.clone(),
                });
            }
            st.pending.insert(id, tx);
        }
        let _guard = PendingGuard { shared, id };

        let mut msg = Map::new();
        msg.insert("execute".to_owned(), Value::String(name.to_owned()));
        if let Some(args) = args {
            msg.insert("arguments".to_owned(), args);
        }
        msg.insert("id".to_owned(), Value::from(id));
        let mut line =
            serde_json::to_vec(&Value::Object(msg)).map_err(|source| QmpError::Encode {
                command: name.to_owned(),
                source,
            })?;
        line.push(b'\n');
        if self.inner.writer.send(line).await.is_err() {
            return Err(QmpError::Disconnected {
                reason: shared.closed_reason(),
            });
        }
        match rx.await {
            Ok(Reply::Return(v)) => Ok(v),
            Ok(Reply::Error { class, desc }) => Err(QmpError::Command {
                command: name.to_owned(),
                class,
                desc,
            }),
            Ok(Reply::Closed(reason)) => Err(QmpError::Disconnected { reason }),
            Err(_) => Err(QmpError::Disconnected {
                reason: shared.closed_reason(),
            }),
        }
    }
}

fn parse_greeting(line: &[u8]) -> Result<QmpGreeting, QmpError> {
    #[derive(Deserialize)]
    struct Top {
        #[serde(rename = "QMP")]
        qmp: Body,
    }
    #[derive(Deserialize)]
    struct Body {
        version: Version,
        #[serde(default)]
        capabilities: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Version {
        qemu: QmpVersion,
        #[serde(default)]
        package: String,
    }
    let top: Top = serde_json::from_slice(line).map_err(|e| QmpError::Greeting {
        detail: format!(
            "{e} in {:?}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        ),
    })?;
    Ok(QmpGreeting {
        version: top.qmp.version.qemu,
        package: top.qmp.version.package.trim().to_owned(),
        capabilities: top.qmp.capabilities,
    })
}

enum LineError {
    TooLong,
    Io(std::io::Error),
}

/// Reads one `\n`-terminated line into `buf` (without the terminator and a trailing `\r`),
/// never holding more than `max` bytes. `Ok(false)` means a clean end of stream.
async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<bool, LineError> {
    buf.clear();
    loop {
        let available = r.fill_buf().await.map_err(LineError::Io)?;
        if available.is_empty() {
            if buf.is_empty() {
                return Ok(false);
            }
            return Err(LineError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "end of stream inside a line",
            )));
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if buf.len() + chunk > max {
            return Err(LineError::TooLong);
        }
        buf.extend_from_slice(&available[..chunk]);
        r.consume(if done { chunk + 1 } else { chunk });
        if done {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(true);
        }
    }
}

async fn reader_loop<R: AsyncBufRead + Unpin>(mut reader: R, shared: Arc<Shared>) {
    let mut line = Vec::new();
    let reason = loop {
        match read_line_bounded(&mut reader, &mut line, MAX_LINE_BYTES).await {
            Ok(true) => {}
            Ok(false) => break "end of stream".to_owned(),
            Err(LineError::TooLong) => {
                break format!("peer sent a line longer than {MAX_LINE_BYTES} bytes");
            }
            Err(LineError::Io(e)) => break format!("read failed: {e}"),
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(&line) {
            Ok(Value::Object(msg)) => dispatch(&shared, msg),
            Ok(_) => break "peer sent a message that is not a json object".to_owned(),
            Err(e) => break format!("peer sent malformed json: {e}"),
        }
    };
    shared.close(reason);
}

fn dispatch(shared: &Shared, mut msg: Map<String, Value>) {
    if let Some(Value::String(event)) = msg.remove("event") {
        let data = msg
            .remove("data")
            .unwrap_or_else(|| Value::Object(Map::new()));
        let timestamp = msg
            .remove("timestamp")
            .and_then(|t| serde_json::from_value(t).ok())
            .unwrap_or_default();
        debug!(%event, "qmp event");
        // No subscribers is fine: events are advisory.
        let _ = shared.events.send(QmpEvent {
            event,
            data,
            timestamp,
        });
        return;
    }
    let reply = if let Some(ret) = msg.remove("return") {
        Reply::Return(ret)
    } else if let Some(err) = msg.remove("error") {
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Reply::Error {
            class: field("class"),
            desc: field("desc"),
        }
    } else {
        warn!(keys = ?msg.keys().collect::<Vec<_>>(), "ignoring unknown qmp message");
        return;
    };
    let Some(id) = msg.get("id").and_then(Value::as_u64) else {
        // QEMU answers a line it could not parse with an error without our id.
        if let Reply::Error { class, desc } = &reply {
            warn!(%class, %desc, "qmp error reply without an id");
        }
        return;
    };
    let tx = shared.state().pending.remove(&id);
    match tx {
        // The receiver may have been dropped (caller cancelled): nothing to do.
        Some(tx) => drop(tx.send(reply)),
        None => debug!(id, "qmp reply for a command nobody waits for"),
    }
}

async fn writer_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(line) = rx.recv().await {
        let res = async {
            w.write_all(&line).await?;
            w.flush().await
        }
        .await;
        if let Err(e) = res {
            shared.close(format!("write failed: {e}"));
            return;
        }
    }
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_line_bounded_long_line_is_rejected_without_buffering_it() {
        let data = [b'x'; 100];
        let mut r = BufReader::with_capacity(8, &data[..]);
        let mut buf = Vec::new();
        assert!(matches!(
            read_line_bounded(&mut r, &mut buf, 50).await,
            Err(LineError::TooLong)
        ));
        assert!(buf.len() <= 50);
    }

    #[tokio::test]
    async fn read_line_bounded_strips_crlf_and_reports_eof() {
        let data = b"{\"a\":1}\r\n{\"b\":2}\n";
        let mut r = BufReader::with_capacity(4, &data[..]);
        let mut buf = Vec::new();
        assert!(
            read_line_bounded(&mut r, &mut buf, 64)
                .await
                .ok()
                .unwrap_or(false)
        );
        assert_eq!(buf, b"{\"a\":1}");
        assert!(
            read_line_bounded(&mut r, &mut buf, 64)
                .await
                .ok()
                .unwrap_or(false)
        );
        assert_eq!(buf, b"{\"b\":2}");
        assert!(matches!(
            read_line_bounded(&mut r, &mut buf, 64).await,
            Ok(false)
        ));
    }

    #[test]
    fn parse_greeting_qemu_7_2_extracts_version() {
        let g = parse_greeting(
            br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#,
        )
        .expect("valid greeting");
        assert_eq!(
            g.version,
            QmpVersion {
                major: 7,
                minor: 2,
                micro: 22
            }
        );
        assert_eq!(g.version.to_string(), "7.2.22");
        assert_eq!(g.capabilities, vec!["oob".to_owned()]);
        assert!(g.package.starts_with("Debian"));
    }

    #[test]
    fn parse_greeting_other_json_is_an_error() {
        let e = parse_greeting(br#"{"return": {}}"#).expect_err("not a greeting");
        assert!(matches!(e, QmpError::Greeting { .. }), "{e:?}");
    }
}
