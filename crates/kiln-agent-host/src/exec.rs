//! One running command on the host side: output inbox, stdin credit, signals.
//!
//! Owns: [`ExecSession`], [`StdinSender`], [`ExecEvent`] and the per-exec state the reader
//! task fills ([`ExecShared`]).
//!
//! Invariants:
//! - The inbox holds at most the exec's output window in payload bytes (the reader rejects a
//!   guest that overruns its credit) plus one small segment record per frame; consecutive
//!   frames of the same channel are merged, and payloads are copied out of the decoder so they
//!   never pin its buffers.
//! - Credit is granted back only as events are taken, so a slow consumer slows the guest.
//! - `Exit` is delivered after every byte of output that preceded it.
//! - A session dropped before its exit is detached: buffered and future output is discarded
//!   and credited back immediately (so the guest never stalls on it), and its process group is
//!   sent SIGKILL.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use kiln_agent_proto::{
    DataChannel, ExitStatus, Frame, HostMessage, MAX_DATA_PAYLOAD, Request, Response, SendCredit,
    StreamId, TtySize,
};
use tokio::sync::Notify;

use crate::client::ClientInner;
use crate::error::{AgentError, ClosedReason};
use crate::registry::{self, StreamEndpoint};

/// Signal sent to the process group of an abandoned exec.
const SIGKILL: i32 = 9;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Something a running command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes written to stdout.
    Stdout(Bytes),
    /// Bytes written to stderr.
    Stderr(Bytes),
    /// The command ended; always the last event.
    Exit(ExitStatus),
}

/// Everything a command produced, from [`ExecSession::collect`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutput {
    /// All stdout bytes.
    pub stdout: Vec<u8>,
    /// All stderr bytes.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub status: ExitStatus,
}

struct Inbox {
    /// Queued output, bounded by the output window.
    output: registry::Inbox,
    exit: Option<ExitStatus>,
    exit_delivered: bool,
    closed: Option<ClosedReason>,
    detached: bool,
}

enum StdinEnd {
    Exited,
    Closed(ClosedReason),
}

struct StdinState {
    credit: SendCredit,
    ended: Option<StdinEnd>,
}

/// Per-exec state shared by the reader task and the session.
pub(crate) struct ExecShared {
    stream: StreamId,
    stdin_enabled: bool,
    inbox: Mutex<Inbox>,
    /// Wakes the (single) consumer of the inbox.
    inbox_notify: Notify,
    stdin: Mutex<StdinState>,
    /// Wakes every stdin writer (`notify_waiters` with enabled `Notified`s).
    stdin_notify: Notify,
}

impl ExecShared {
    pub(crate) fn new(stream: StreamId, output_window: u32, stdin_enabled: bool) -> ExecShared {
        ExecShared {
            stream,
            stdin_enabled,
            inbox: Mutex::new(Inbox {
                output: registry::Inbox::new(output_window),
                exit: None,
                exit_delivered: false,
                closed: None,
                detached: false,
            }),
            inbox_notify: Notify::new(),
            stdin: Mutex::new(StdinState {
                // The guest grants stdin credit with a WINDOW frame once the exec starts.
                credit: SendCredit::new(0),
                ended: None,
            }),
            stdin_notify: Notify::new(),
        }
    }

    fn violation(&self, what: impl std::fmt::Display) -> ClosedReason {
        ClosedReason::Violation {
            what: format!("stream {}: {what}", self.stream),
        }
    }

    /// The guest reported the exit (after all output).
    pub(crate) fn on_exit(&self, status: ExitStatus) {
        lock(&self.inbox).exit = Some(status);
        self.inbox_notify.notify_one();
        lock(&self.stdin).ended.get_or_insert(StdinEnd::Exited);
        self.stdin_notify.notify_waiters();
    }

    async fn acquire_stdin(&self, max: usize) -> Result<usize, AgentError> {
        loop {
            let notified = self.stdin_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&self.stdin);
                match &st.ended {
                    Some(StdinEnd::Exited) => return Err(AgentError::ExecFinished),
                    Some(StdinEnd::Closed(r)) => return Err(AgentError::ChannelClosed(r.clone())),
                    None => {}
                }
                let n = st.credit.take(max);
                if n > 0 {
                    return Ok(n);
                }
            }
            notified.await;
        }
    }
}

impl StreamEndpoint for ExecShared {
    /// Queues output from the guest. Returns a grant to send at once if the session is
    /// detached; fails if the guest overran its credit.
    fn on_data(&self, channel: DataChannel, data: &[u8]) -> Result<Option<u32>, ClosedReason> {
        let mut inbox = lock(&self.inbox);
        if inbox.detached {
            return inbox
                .output
                .accept_discarded(data.len())
                .map_err(|e| self.violation(e));
        }
        inbox
            .output
            .push(channel, data)
            .map_err(|e| self.violation(e))?;
        drop(inbox);
        self.inbox_notify.notify_one();
        Ok(None)
    }

    /// Adds stdin credit granted by the guest.
    fn on_grant(&self, increment: u32) -> Result<(), ClosedReason> {
        lock(&self.stdin)
            .credit
            .grant(increment)
            .map_err(|e| self.violation(e))?;
        self.stdin_notify.notify_waiters();
        Ok(())
    }

    fn on_channel_closed(&self, reason: &ClosedReason) {
        lock(&self.inbox).closed = Some(reason.clone());
        self.inbox_notify.notify_one();
        lock(&self.stdin)
            .ended
            .get_or_insert(StdinEnd::Closed(reason.clone()));
        self.stdin_notify.notify_waiters();
    }
}

/// A running command. Take its events with [`ExecSession::next_event`] until `Exit`.
pub struct ExecSession {
    client: Arc<ClientInner>,
    exec: Arc<ExecShared>,
    pid: Option<u32>,
    /// The guest acknowledged the exec request.
    started: bool,
}

impl ExecSession {
    pub(crate) fn new(client: Arc<ClientInner>, exec: Arc<ExecShared>) -> ExecSession {
        ExecSession {
            client,
            exec,
            pid: None,
            started: false,
        }
    }

    pub(crate) fn set_started(&mut self, pid: Option<u32>) {
        self.pid = pid;
        self.started = true;
    }

    /// The stream carrying this command's data.
    pub fn stream(&self) -> StreamId {
        self.exec.stream
    }

    /// The command's pid in the guest (`None` if it could not be executed: exit 126/127).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The next output chunk or the exit. `None` after `Exit` was returned, or when the
    /// channel died (output received before that is still delivered first); then
    /// [`ExecSession::close_reason`] says why. Taking an event grants its bytes back to the
    /// guest as credit.
    pub async fn next_event(&mut self) -> Option<ExecEvent> {
        loop {
            let grant = {
                let mut inbox = lock(&self.exec.inbox);
                if let Some((channel, bytes, grant)) = inbox.output.pop_segment() {
                    let event = match channel {
                        DataChannel::Stderr => ExecEvent::Stderr(bytes),
                        _ => ExecEvent::Stdout(bytes),
                    };
                    Some((event, grant))
                } else if let Some(status) = inbox.exit.take() {
                    inbox.exit_delivered = true;
                    return Some(ExecEvent::Exit(status));
                } else if inbox.exit_delivered || inbox.closed.is_some() {
                    return None;
                } else {
                    None
                }
            };
            if let Some((event, grant)) = grant {
                if let Some(increment) = grant {
                    self.client.shared.queue_grant(self.exec.stream, increment);
                }
                return Some(event);
            }
            self.exec.inbox_notify.notified().await;
        }
    }

    /// Why the session ended without an exit: the channel's death, if it died first.
    pub fn close_reason(&self) -> Option<AgentError> {
        let inbox = lock(&self.exec.inbox);
        if inbox.exit_delivered || inbox.exit.is_some() {
            return None;
        }
        inbox.closed.clone().map(AgentError::ChannelClosed)
    }

    /// A handle for writing the command's stdin (requires `stdin: true` in the request).
    pub fn stdin(&self) -> StdinSender {
        StdinSender {
            client: Arc::clone(&self.client),
            exec: Arc::clone(&self.exec),
        }
    }

    /// Sends `signo` to the command's process group.
    pub async fn signal(&self, signo: i32) -> Result<(), AgentError> {
        let request = Request::Signal {
            stream: self.exec.stream,
            signo,
        };
        match self.client.request(request).await? {
            Response::Signaled => Ok(()),
            _ => Err(AgentError::UnexpectedResponse { op: "signal" }),
        }
    }

    /// Gives a tty exec's terminal a new size; the guest kernel sends `SIGWINCH` to its
    /// foreground process group. Fails with [`AgentError::Remote`] `bad_request` for an exec
    /// without a tty and `no_such_stream` once it has exited.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        let size = TtySize::new(rows.into(), cols.into()).map_err(AgentError::BadTtySize)?;
        let request = Request::ExecResize {
            stream: self.exec.stream,
            size,
        };
        match self.client.request(request).await? {
            Response::Resized => Ok(()),
            _ => Err(AgentError::UnexpectedResponse { op: "exec_resize" }),
        }
    }

    /// Reads every event until the exit and returns all output. Buffers without bound: use
    /// `max_output_bytes` for commands whose output size is unknown.
    pub async fn collect(mut self) -> Result<ExecOutput, AgentError> {
        let mut out = ExecOutput::default();
        while let Some(event) = self.next_event().await {
            match event {
                ExecEvent::Stdout(b) => out.stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => out.stderr.extend_from_slice(&b),
                ExecEvent::Exit(status) => {
                    out.status = status;
                    return Ok(out);
                }
            }
        }
        Err(self
            .close_reason()
            .unwrap_or(AgentError::ChannelClosed(ClosedReason::Eof)))
    }
}

impl Drop for ExecSession {
    fn drop(&mut self) {
        let grant = {
            let mut inbox = lock(&self.exec.inbox);
            if inbox.exit_delivered || inbox.exit.is_some() || inbox.closed.is_some() {
                return;
            }
            inbox.detached = true;
            inbox.output.discard()
        };
        if let Some(increment) = grant {
            self.client.shared.queue_grant(self.exec.stream, increment);
        }
        if !self.started {
            // Never started (rejected, or the exec() call was cancelled): forget it. If the
            // guest did start it after all, the kill below still reaches it.
            self.client.shared.forget_stream(self.exec.stream);
        }
        self.client.try_send_request(Request::Signal {
            stream: self.exec.stream,
            signo: SIGKILL,
        });
    }
}

/// Writes a command's stdin, respecting the guest's credit. Cheap to clone.
#[derive(Clone)]
pub struct StdinSender {
    client: Arc<ClientInner>,
    exec: Arc<ExecShared>,
}

impl StdinSender {
    /// Sends `data`, waiting for credit as needed. Fails once the command has exited or the
    /// channel died.
    pub async fn write(&self, data: impl Into<Bytes>) -> Result<(), AgentError> {
        if !self.exec.stdin_enabled {
            return Err(AgentError::NoStdin);
        }
        let mut rest: Bytes = data.into();
        while !rest.is_empty() {
            let n = self
                .exec
                .acquire_stdin(rest.len().min(MAX_DATA_PAYLOAD))
                .await?;
            let frame = Frame::Data {
                stream: self.exec.stream,
                channel: DataChannel::Stdin,
                data: rest.split_to(n),
            };
            self.client.send_frame(&frame).await?;
        }
        Ok(())
    }

    /// Closes stdin (the command sees EOF after the bytes already sent). A no-op once the
    /// command has exited.
    pub async fn close(&self) -> Result<(), AgentError> {
        if !self.exec.stdin_enabled {
            return Err(AgentError::NoStdin);
        }
        if matches!(lock(&self.exec.stdin).ended, Some(StdinEnd::Exited)) {
            return Ok(());
        }
        let frame = HostMessage::StdinClose {
            stream: self.exec.stream,
        }
        .to_frame()
        .map_err(AgentError::Encode)?;
        self.client.send_frame(&frame).await
    }
}
