//! The exec WebSocket: streams a command's output to the client and the client's stdin and
//! signals and terminal resizes to the command.
//!
//! Three flows run at once so that none can stall another: the main loop pumps output to the
//! client (and applies signals), a reader task takes client messages, and stdin bytes go to the
//! guest from that reader task (waiting on the guest's flow-control credit without blocking
//! output). When the client goes away the command is killed; for `/v1/run` the sandbox is then
//! destroyed, whatever happened before.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use kiln_api_types::{
    ApiError, ErrorCode, ExecClientMessage, ExecRequest, ExecServerMessage, RunRequest,
    STREAM_STDERR, STREAM_STDOUT, SandboxId,
};
use kiln_core::{CoreError, Engine, Exec, ExecOutput};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

/// SIGKILL.
const SIGKILL: i32 = 9;

/// Client messages (after the first) queued between the socket and the exec, at most this many.
const CLIENT_QUEUE: usize = 64;

/// The client's side of an exec socket, read by a forwarder task from the moment the request
/// arrived, so stdin sent while a sandbox boots is queued (bounded) rather than lost.
struct ClientSide {
    /// Messages in arrival order; closed when the client has gone.
    msgs: mpsc::Receiver<Message>,
    /// Becomes true when the client closed the socket or it broke.
    gone: watch::Receiver<bool>,
}

fn spawn_forwarder(mut rx: SplitStream<WebSocket>) -> ClientSide {
    let (msg_tx, msgs) = mpsc::channel(CLIENT_QUEUE);
    let (gone_tx, gone) = watch::channel(false);
    tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.next().await {
            if matches!(msg, Message::Close(_)) || msg_tx.send(msg).await.is_err() {
                break;
            }
        }
        gone_tx.send_replace(true);
    });
    ClientSide { msgs, gone }
}

/// `/v1/sandboxes/{id}/exec`.
pub async fn exec_in(engine: Arc<Engine>, id: SandboxId, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let req: ExecRequest = match first_message(&mut rx).await {
        Ok(r) => r,
        Err(e) => return send_error(&mut tx, e).await,
    };
    let client = spawn_forwarder(rx);
    match engine.sandbox_exec(&id, &req).await {
        Ok(exec) => {
            let started = ExecServerMessage::Started {
                sandbox: id,
                boot_ms: None,
                warnings: Vec::new(),
            };
            pump(exec, started, tx, client, false).await;
        }
        Err(e) => send_error(&mut tx, crate::api::api_error(&e)).await,
    }
}

/// `/v1/run`: boot a fresh sandbox, run one command, destroy the sandbox.
pub async fn run(engine: Arc<Engine>, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let req: RunRequest = match first_message(&mut rx).await {
        Ok(r) => r,
        Err(e) => return send_error(&mut tx, e).await,
    };
    if let Err(m) = req
        .exec
        .validate()
        .and_then(|_| req.sandbox.validate().map_err(|e| e.to_string()))
    {
        return send_error(
            &mut tx,
            ApiError {
                code: ErrorCode::BadRequest.as_str().to_owned(),
                message: m,
            },
        )
        .await;
    }
    let mut client = spawn_forwarder(rx);
    // Boot in its own task so that a client leaving mid-boot is noticed; the sandbox is then
    // destroyed as soon as the boot settles.
    let boot = tokio::spawn({
        let engine = Arc::clone(&engine);
        let sreq = req.sandbox.clone();
        async move { engine.sandbox_create(&sreq).await }
    });
    tokio::pin!(boot);
    let info = tokio::select! {
        res = &mut boot => res,
        _ = async { drop(client.gone.wait_for(|g| *g).await) } => {
            debug!("client left during boot");
            if let Ok(Ok(info)) = boot.await {
                let _ = engine.sandbox_delete(&info.id).await;
            }
            return;
        }
    };
    let info = match info {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => return send_error(&mut tx, crate::api::api_error(&e)).await,
        Err(e) => {
            return send_error(
                &mut tx,
                ApiError {
                    code: ErrorCode::Internal.as_str().to_owned(),
                    message: format!("boot task failed: {e}"),
                },
            )
            .await;
        }
    };
    let id = info.id.clone();
    // The exit status is held back until the sandbox is gone: a client that has seen it
    // never finds its run sandbox still listed.
    let last = match engine.sandbox_exec(&id, &req.exec).await {
        Ok(exec) => {
            let started = ExecServerMessage::Started {
                sandbox: id.clone(),
                boot_ms: info.status.boot_ms,
                warnings: info.status.warnings.clone(),
            };
            pump(exec, started, tx, client, true).await
        }
        Err(e) => {
            let text = serde_json::to_string(&ExecServerMessage::Error(crate::api::api_error(&e)))
                .unwrap_or_default();
            Some((tx, Message::Text(text.into())))
        }
    };
    if let Err(e) = engine.sandbox_delete(&id).await {
        warn!(sandbox_id = %id, error = %e.chain(), "could not remove run sandbox");
    }
    if let Some((mut tx, msg)) = last {
        let _ = tx.send(msg).await;
        let _ = tx.close().await;
    }
}

/// `/v1/execs/{exec_id}/attach`: replays what a detached command's buffer keeps, then
/// follows it to its end. Signals from the client reach the command; the client leaving
/// does not stop it.
pub async fn attach(exec: Arc<kiln_core::DetachedExec>, socket: WebSocket) {
    let (mut tx, rx) = socket.split();
    let mut client = spawn_forwarder(rx);
    let started = ExecServerMessage::Started {
        sandbox: exec.sandbox().clone(),
        boot_ms: None,
        warnings: Vec::new(),
    };
    if send_json(&mut tx, &started).await.is_err() {
        return;
    }
    let mut cursor = exec.attach();
    loop {
        tokio::select! {
            item = cursor.next() => {
                let (msg, last) = match item {
                    Some(kiln_core::AttachItem::Output(tag, b)) => (tagged(tag, &b), false),
                    Some(kiln_core::AttachItem::Gap(bytes)) => {
                        let text = serde_json::to_string(&ExecServerMessage::Dropped { bytes }).unwrap_or_default();
                        (Message::Text(text.into()), false)
                    }
                    Some(kiln_core::AttachItem::Exit(status)) => {
                        let text = serde_json::to_string(&ExecServerMessage::Exit(status)).unwrap_or_default();
                        (Message::Text(text.into()), true)
                    }
                    None => return,
                    Some(kiln_core::AttachItem::Lost(reason)) => {
                        let body = ApiError {
                            code: ErrorCode::SandboxFailed.as_str().to_owned(),
                            message: reason,
                        };
                        let text = serde_json::to_string(&ExecServerMessage::Error(body)).unwrap_or_default();
                        (Message::Text(text.into()), true)
                    }
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
                if last {
                    let _ = tx.close().await;
                    return;
                }
            }
            msg = client.msgs.recv() => match msg {
                Some(Message::Text(t)) => {
                    if let Ok(ExecClientMessage::Signal { signo }) = serde_json::from_str(t.as_str()) {
                        let _ = exec.signal(signo).await;
                    }
                }
                Some(_) => {}
                // The client left: the command goes on.
                None => return,
            },
        }
    }
}

async fn first_message<T: serde::de::DeserializeOwned>(
    rx: &mut SplitStream<WebSocket>,
) -> Result<T, ApiError> {
    let bad = |message: String| ApiError {
        code: ErrorCode::BadRequest.as_str().to_owned(),
        message,
    };
    loop {
        match rx.next().await {
            Some(Ok(Message::Text(t))) => {
                // An object only: serde would also read a struct from an array of its fields.
                if !t.as_str().trim_start().starts_with('{') {
                    return Err(bad("invalid exec request: expected a JSON object".into()));
                }
                return serde_json::from_str(t.as_str())
                    .map_err(|e| bad(format!("invalid exec request: {e}")));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(_)) => return Err(bad("the first message must be a JSON text message".into())),
            Some(Err(e)) => return Err(bad(format!("websocket error: {e}"))),
            None => {
                return Err(bad(
                    "the client closed the connection before sending a request".into(),
                ));
            }
        }
    }
}

async fn send_error(tx: &mut SplitSink<WebSocket, Message>, e: ApiError) {
    let _ = send_json(tx, &ExecServerMessage::Error(e)).await;
    let _ = tx.close().await;
}

async fn send_json(
    tx: &mut SplitSink<WebSocket, Message>,
    msg: &ExecServerMessage,
) -> Result<(), axum::Error> {
    let text = serde_json::to_string(msg).unwrap_or_else(|_| "{\"type\":\"error\"}".to_owned());
    tx.send(Message::Text(text.into())).await
}

fn tagged(tag: u8, data: &Bytes) -> Message {
    let mut buf = BytesMut::with_capacity(data.len() + 1);
    buf.put_u8(tag);
    buf.extend_from_slice(data);
    Message::Binary(buf.freeze())
}

/// What the reader task tells the main loop.
enum Control {
    Signal(i32),
    Resize { rows: u16, cols: u16 },
}

/// Streams `exec` to the client until it ends. With `hold_last`, the final message (exit
/// status or error) is not sent but returned with the socket, for the caller to send once it
/// has cleaned up.
async fn pump(
    mut exec: Exec,
    started: ExecServerMessage,
    mut tx: SplitSink<WebSocket, Message>,
    client: ClientSide,
    hold_last: bool,
) -> Option<(SplitSink<WebSocket, Message>, Message)> {
    if send_json(&mut tx, &started).await.is_err() {
        let _ = exec.signal(SIGKILL).await;
        return None;
    }
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Control>(8);
    let reader = tokio::spawn(read_client(client.msgs, exec.stdin(), ctl_tx));
    loop {
        tokio::select! {
            out = exec.next() => {
                let (msg, last) = match out {
                    Ok(ExecOutput::Stdout(b)) => (tagged(STREAM_STDOUT, &b), false),
                    Ok(ExecOutput::Stderr(b)) => (tagged(STREAM_STDERR, &b), false),
                    Ok(ExecOutput::Exit(status)) => {
                        let text = serde_json::to_string(&ExecServerMessage::Exit(status)).unwrap_or_default();
                        (Message::Text(text.into()), true)
                    }
                    Err(e) => {
                        let text = serde_json::to_string(&ExecServerMessage::Error(error_body(&e))).unwrap_or_default();
                        (Message::Text(text.into()), true)
                    }
                };
                if last && hold_last {
                    reader.abort();
                    return Some((tx, msg));
                }
                if tx.send(msg).await.is_err() {
                    // The client is gone: the command must not run on unobserved.
                    let _ = exec.signal(SIGKILL).await;
                    break;
                }
                if last {
                    let _ = tx.close().await;
                    break;
                }
            }
            ctl = ctl_rx.recv() => match ctl {
                Some(Control::Signal(signo)) => {
                    match exec.signal(signo).await {
                        Ok(()) => debug!(signo, "signal delivered"),
                        Err(e) => debug!(signo, error = %e.chain(), "signal not delivered"),
                    }
                }
                // A refused resize (no tty, out of range, the command just ended) leaves the
                // command running: terminals resize racing with an exit all the time.
                Some(Control::Resize { rows, cols }) => {
                    if let Err(e) = exec.resize(rows, cols).await {
                        debug!(error = %e.chain(), rows, cols, "resize refused");
                    }
                }
                None => {
                    // The reader ended: the client closed its side.
                    let _ = exec.signal(SIGKILL).await;
                    break;
                }
            },
        }
    }
    reader.abort();
    None
}

fn error_body(e: &CoreError) -> ApiError {
    crate::api::api_error(e)
}

/// Takes the client's messages: stdin bytes go to the guest, signals to the main loop.
async fn read_client(
    mut msgs: mpsc::Receiver<Message>,
    stdin: kiln_core::sandbox::StdinHandle,
    ctl: mpsc::Sender<Control>,
) {
    let mut stdin_open = true;
    while let Some(msg) = msgs.recv().await {
        match msg {
            // A command that stopped reading stdin loses the rest; output still flows.
            Message::Binary(data) if stdin_open => stdin_open = stdin.write(data).await.is_ok(),
            Message::Text(t) => match serde_json::from_str::<ExecClientMessage>(t.as_str()) {
                Ok(ExecClientMessage::StdinClose) => {
                    if stdin_open {
                        let _ = stdin.close().await;
                        stdin_open = false;
                    }
                }
                Ok(ExecClientMessage::Signal { signo }) => {
                    debug!(signo, "signal from the client");
                    if ctl.send(Control::Signal(signo)).await.is_err() {
                        return;
                    }
                }
                Ok(ExecClientMessage::Resize { rows, cols }) => {
                    if ctl.send(Control::Resize { rows, cols }).await.is_err() {
                        return;
                    }
                }
                Err(e) => debug!(error = %e, "ignoring malformed client message"),
            },
            Message::Close(_) => return,
            _ => {}
        }
    }
}
