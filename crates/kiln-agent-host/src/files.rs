//! File transfers on the host side (feature `files-v1`): [`FileWriter`] streams bytes into a
//! guest file (or a tar archive into a guest directory), [`FileReader`] streams a guest file
//! (or a directory packed as tar) out.
//!
//! Owns: the two handles, their requests ([`FileWriteRequest`], [`FileReadRequest`]) and the
//! per-transfer state the reader task fills ([`TransferShared`]). The one-shot operations
//! (stat, list, mkdir, remove, rename) are plain requests on [`crate::AgentClient`].
//!
//! ```text
//!  file_write ── request ─▶ ◀─ WINDOW + file_write_ready ── FileWriter
//!     poll_write ── STDIN frames (≤ guest credit) ─▶        ◀─ WINDOW as written
//!     finish() ── file_end (after the bytes) ─▶  ◀─ file_done{bytes, error}  ─▶ Ok(bytes) / Err
//!     drop without finish ── file_abort ─▶ guest removes its temp file: nothing appears
//!  file_read ── request ─▶ ◀─ file_read_started{size} ── FileReader
//!     poll_read ◀─ inbox (≤ window) ◀─ STDOUT frames; credit back as read
//!     ◀─ file_done: error → read fails; bytes ≠ bytes received → read fails (truncation);
//!                   otherwise read returns 0 (end of file)
//! ```
//!
//! Invariants:
//! - Host memory per read is bounded by its window (an overrun is a protocol violation that
//!   closes the channel) and per write by the connection's frame queue, whatever the file
//!   size; sizes the guest claims (`size`, `bytes`) are compared, never used to allocate.
//! - A read returns end of file only after a `file_done` without error whose byte count
//!   equals the bytes received: a stream cut short is an error, never a short file.
//! - Bytes after `file_done`, STDERR, or bytes on a write's stream are protocol violations.
//! - A transfer stays registered until its handle is dropped; dropping it before
//!   `file_done` sends `file_abort` through the close list (never blocks, never lost).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use kiln_agent_proto::{
    DataChannel, ErrorBody, ErrorCode, GuestPath, HostMessage, MAX_DATA_PAYLOAD, SendCredit,
    StreamId,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::client::ClientInner;
use crate::error::{AgentError, ClosedReason};
use crate::registry::{FrameSlot, Inbox, StreamEndpoint, closed_io_error, send_data};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What to write and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileWriteRequest {
    /// Where the file appears once complete (or the directory a tar archive is unpacked
    /// into; it must not exist or be empty).
    pub path: GuestPath,
    /// Permission bits of the file (default 0o644; ignored with `tar`).
    pub mode: Option<u32>,
    /// The bytes are a tar archive to unpack into the directory `path`.
    pub tar: bool,
}

impl FileWriteRequest {
    /// A plain file write of `path` with the default mode.
    pub fn new(path: GuestPath) -> FileWriteRequest {
        FileWriteRequest {
            path,
            mode: None,
            tar: false,
        }
    }
}

/// What to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReadRequest {
    /// The file (or, with `tar`, the directory) to read.
    pub path: GuestPath,
    /// Pack the directory `path` as a tar archive.
    pub tar: bool,
}

impl FileReadRequest {
    /// A plain file read of `path`.
    pub fn new(path: GuestPath) -> FileReadRequest {
        FileReadRequest { path, tar: false }
    }
}

/// How the guest ended a transfer (`file_done`).
#[derive(Debug, Clone)]
struct Done {
    bytes: u64,
    error: Option<ErrorBody>,
}

struct State {
    /// A read's bytes not yet taken by the caller, bounded by the read's window.
    inbox: Inbox,
    /// Bytes received on a read's stream.
    received: u64,
    /// Credit for a write's bytes toward the guest.
    credit: SendCredit,
    done: Option<Done>,
    channel_closed: Option<ClosedReason>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl State {
    fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

/// Per-transfer state shared by the reader task and the [`FileWriter`] / [`FileReader`].
pub(crate) struct TransferShared {
    stream: StreamId,
    path: GuestPath,
    /// A read (guest → host bytes) rather than a write.
    reading: bool,
    state: Mutex<State>,
}

impl TransferShared {
    /// A write (`reading: false`) or a read with a window of `window` bytes.
    pub(crate) fn new(stream: StreamId, path: GuestPath, reading: bool, window: u32) -> Self {
        TransferShared {
            stream,
            path,
            reading,
            state: Mutex::new(State {
                inbox: Inbox::new(window),
                received: 0,
                // A write's initial credit comes in a WINDOW frame before file_write_ready.
                credit: SendCredit::new(0),
                done: None,
                channel_closed: None,
                read_waker: None,
                write_waker: None,
            }),
        }
    }

    fn violation(&self, what: impl fmt::Display) -> ClosedReason {
        ClosedReason::Violation {
            what: format!("file stream {}: {what}", self.stream),
        }
    }

    /// `file_done`: the guest ended the transfer.
    pub(crate) fn on_done(&self, bytes: u64, error: Option<ErrorBody>) {
        let mut st = lock(&self.state);
        if st.done.is_none() {
            st.done = Some(Done { bytes, error });
        }
        st.wake_all();
    }

    /// Marks a transfer the guest never started (its request failed) as ended.
    pub(crate) fn mark_never_opened(&self) {
        lock(&self.state).done = Some(Done {
            bytes: 0,
            error: None,
        });
    }

    /// Whether the guest side is already gone (no `file_abort` needed).
    fn is_finished(&self) -> bool {
        let st = lock(&self.state);
        st.done.is_some() || st.channel_closed.is_some()
    }
}

impl StreamEndpoint for TransferShared {
    fn on_data(&self, channel: DataChannel, data: &[u8]) -> Result<Option<u32>, ClosedReason> {
        if !self.reading {
            return Err(self.violation("sent data on a file write stream"));
        }
        if channel != DataChannel::Stdout {
            return Err(self.violation(format!("sent a {channel:?} frame")));
        }
        let mut st = lock(&self.state);
        if st.done.is_some() {
            return Err(self.violation("bytes after file_done"));
        }
        st.inbox
            .push(channel, data)
            .map_err(|e| self.violation(e))?;
        st.received += data.len() as u64;
        if let Some(w) = st.read_waker.take() {
            w.wake();
        }
        Ok(None)
    }

    fn on_grant(&self, increment: u32) -> Result<(), ClosedReason> {
        let mut st = lock(&self.state);
        st.credit.grant(increment).map_err(|e| self.violation(e))?;
        if let Some(w) = st.write_waker.take() {
            w.wake();
        }
        Ok(())
    }

    fn on_channel_closed(&self, reason: &ClosedReason) {
        let mut st = lock(&self.state);
        st.channel_closed = Some(reason.clone());
        st.wake_all();
    }
}

/// The `io::ErrorKind` closest to a guest error code (the [`AgentError::Remote`] inside the
/// `io::Error` keeps the exact code).
fn io_kind(code: ErrorCode) -> io::ErrorKind {
    match code {
        ErrorCode::NotFound => io::ErrorKind::NotFound,
        ErrorCode::PermissionDenied => io::ErrorKind::PermissionDenied,
        ErrorCode::AlreadyExists => io::ErrorKind::AlreadyExists,
        ErrorCode::IsADirectory => io::ErrorKind::IsADirectory,
        ErrorCode::NotADirectory => io::ErrorKind::NotADirectory,
        ErrorCode::NotEmpty => io::ErrorKind::DirectoryNotEmpty,
        ErrorCode::NoSpace => io::ErrorKind::StorageFull,
        ErrorCode::InvalidPath | ErrorCode::BadRequest => io::ErrorKind::InvalidInput,
        ErrorCode::Aborted => io::ErrorKind::ConnectionAborted,
        _ => io::ErrorKind::Other,
    }
}

fn remote_io_error(op: &'static str, error: &ErrorBody) -> io::Error {
    io::Error::new(
        io_kind(error.code),
        AgentError::Remote {
            op,
            code: error.code,
            message: error.message.clone(),
        },
    )
}

/// A guest file being written, from [`crate::AgentClient::file_write`].
///
/// Write the bytes with [`AsyncWrite`] (each write waits for the guest's credit), then call
/// [`FileWriter::finish`]: the file appears at its path, complete, only then. Dropping the
/// writer without `finish` aborts: the guest removes its temporary file and nothing appears.
/// If the guest fails (disk full, ...) writes fail with an `io::Error` wrapping
/// [`AgentError::Remote`] (the typed code is there), and so does `finish`.
pub struct FileWriter {
    client: Arc<ClientInner>,
    shared: Arc<TransferShared>,
    reservation: FrameSlot,
    finished: bool,
}

impl fmt::Debug for FileWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileWriter")
            .field("stream", &self.shared.stream)
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

// What callers rely on (a spawned copy task), checked at compile time.
const _: () = {
    const fn assert_io<T: Unpin + Send + 'static>() {}
    assert_io::<FileWriter>();
    assert_io::<FileReader>();
};

impl FileWriter {
    pub(crate) fn new(client: Arc<ClientInner>, shared: Arc<TransferShared>) -> FileWriter {
        FileWriter {
            client,
            shared,
            reservation: FrameSlot::default(),
            finished: false,
        }
    }

    /// The stream carrying this file's bytes.
    pub fn stream(&self) -> StreamId {
        self.shared.stream
    }

    /// Why writing is impossible, if it is.
    fn write_error(st: &State) -> Option<io::Error> {
        if let Some(reason) = &st.channel_closed {
            return Some(closed_io_error(reason));
        }
        match &st.done {
            Some(Done {
                error: Some(error), ..
            }) => Some(remote_io_error("file_write", error)),
            Some(_) => Some(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the guest already ended this file write",
            )),
            None => None,
        }
    }

    /// Ends the write: the guest syncs the file and renames it over the target. Returns the
    /// number of bytes written. Fails with [`AgentError::Remote`] (typed code) if the guest
    /// could not complete the file, in which case nothing appeared at the target.
    pub async fn finish(mut self) -> Result<u64, AgentError> {
        const OP: &str = "file_write";
        let end = HostMessage::FileEnd {
            stream: self.shared.stream,
        }
        .to_frame()
        .map_err(AgentError::Encode)?;
        // A guest that already failed answered file_done: report that, not the end.
        if lock(&self.shared.state).done.is_none() {
            // If this future is dropped before file_end is queued, Drop still aborts.
            self.client.send_frame(&end).await?;
        }
        // From here the guest completes the file whether or not anyone awaits the result.
        self.finished = true;
        let shared = Arc::clone(&self.shared);
        std::future::poll_fn(|cx| {
            let mut st = lock(&shared.state);
            if let Some(done) = &st.done {
                return Poll::Ready(match &done.error {
                    Some(e) => Err(AgentError::Remote {
                        op: OP,
                        code: e.code,
                        message: e.message.clone(),
                    }),
                    None => Ok(done.bytes),
                });
            }
            if let Some(reason) = &st.channel_closed {
                return Poll::Ready(Err(AgentError::ChannelClosed(reason.clone())));
            }
            st.write_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl AsyncWrite for FileWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        {
            let mut st = lock(&this.shared.state);
            if let Some(e) = Self::write_error(&st) {
                return Poll::Ready(Err(e));
            }
            if st.credit.available() == 0 {
                st.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        // Credit only grows while we wait for a slot: only this writer takes it.
        let permit = ready!(this.reservation.poll_reserve(&this.client, cx))?;
        let chunk = {
            let mut st = lock(&this.shared.state);
            if let Some(e) = Self::write_error(&st) {
                return Poll::Ready(Err(e));
            }
            let n = st.credit.take(data.len().min(MAX_DATA_PAYLOAD));
            Bytes::copy_from_slice(&data[..n])
        };
        Poll::Ready(send_data(permit, this.shared.stream, chunk))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued frames are written and flushed by the connection's writer task.
        Poll::Ready(Ok(()))
    }

    /// Does not end the file (that is [`FileWriter::finish`], which reports the result).
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        let stream = self.shared.stream;
        self.client.shared.forget_stream(stream);
        if !self.finished && !self.shared.is_finished() {
            self.client
                .shared
                .queue_stream_close(stream, HostMessage::FileAbort { stream });
        }
    }
}

/// A guest file being read, from [`crate::AgentClient::file_read`].
///
/// Reading returns the file's bytes, then `Ok(0)` once the guest confirmed the whole file
/// was sent. It fails instead of ending early if the guest reports an error (an `io::Error`
/// wrapping [`AgentError::Remote`] with the typed code), if the byte count the guest reports
/// differs from the bytes received (`InvalidData`), or if the channel dies
/// (`ConnectionAborted`). Dropping it early tells the guest to stop.
pub struct FileReader {
    client: Arc<ClientInner>,
    shared: Arc<TransferShared>,
    size: Option<u64>,
}

impl fmt::Debug for FileReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileReader")
            .field("stream", &self.shared.stream)
            .field("path", &self.shared.path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl FileReader {
    pub(crate) fn new(client: Arc<ClientInner>, shared: Arc<TransferShared>) -> FileReader {
        FileReader {
            client,
            shared,
            size: None,
        }
    }

    pub(crate) fn set_size(&mut self, size: Option<u64>) {
        self.size = size;
    }

    /// The stream carrying this file's bytes.
    pub fn stream(&self) -> StreamId {
        self.shared.stream
    }

    /// The file's size when the guest opened it (`None` for a tar stream). A claim of the
    /// guest, for progress reporting only: the reader's end is what counts.
    pub fn size(&self) -> Option<u64> {
        self.size
    }
}

impl AsyncRead for FileReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let grant = {
            let mut st = lock(&this.shared.state);
            if st.inbox.is_empty() {
                if let Some(done) = &st.done {
                    return Poll::Ready(match &done.error {
                        Some(error) => Err(remote_io_error("file_read", error)),
                        None if done.bytes != st.received => Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "guest ended the read of {} after {} bytes but reported {}",
                                this.shared.path, st.received, done.bytes
                            ),
                        )),
                        None => Ok(()),
                    });
                }
                if let Some(reason) = &st.channel_closed {
                    return Poll::Ready(Err(closed_io_error(reason)));
                }
                st.read_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let (_, grant) = st.inbox.read(buf);
            grant
        };
        if let Some(increment) = grant {
            this.client
                .shared
                .queue_grant(this.shared.stream, increment);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for FileReader {
    fn drop(&mut self) {
        let stream = self.shared.stream;
        self.client.shared.forget_stream(stream);
        if !self.shared.is_finished() {
            self.client
                .shared
                .queue_stream_close(stream, HostMessage::FileAbort { stream });
        }
    }
}
