//! File operations (feature `files-v1`): streamed writes and reads of files and directories
//! (tar), and stat, list, mkdir, remove, rename.
//!
//! Owns: [`start_write`] and [`start_read`], which validate a transfer and return a
//! [`FileHandle`] (kept by the session's stream table) plus the transfer's task; the one-shot
//! operations ([`stat`], [`list`], [`mkdir`], [`remove`], [`rename`]), which the session runs on
//! a blocking thread; and the errno → [`ErrorCode`] mapping ([`fs_error`]).
//!
//! ```text
//!  write: start_write ─ temp file (or dir) created beside the target, O_EXCL, mode 0600
//!         task: WINDOW + file_write_ready ─▶ STDIN bytes ─▶ queue (≤ 4 chunks) ─▶ writer thread
//!               (WINDOW back once a chunk is handed over)                (tar: unpack entries)
//!         file_end ─▶ thread: chmod, fsync, rename over the target, fsync dir ─▶ file_done
//!         file_abort / failure / session drop ─▶ temp removed ─▶ file_done{error}
//!  read:  start_read ─ open (tar: the directory must exist)
//!         task: file_read_started ─▶ reader thread ─▶ queue (≤ 4 chunks of 64 KiB)
//!               ─▶ STDOUT frames within the host's credit ─▶ file_done{bytes, error}
//! ```
//!
//! Must not: leave a partial file at a write's target (only the final rename makes it
//! appear, and the temp file or dir is removed by `Drop` on every other path, panics
//! included); hold more than the window plus 4 chunks of a transfer in memory; block the
//! session loop (file I/O runs on blocking threads); unpack a tar entry outside its target.
//!
//! Invariants: a transfer's request is answered by its task before any other frame of the
//! stream; `file_done` is the stream's last message and follows the last STDOUT frame.

use std::collections::BinaryHeap;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use kiln_agent_proto::{
    DataChannel, EntryName, ErrorBody, ErrorCode, FileEntry, FileKind, FileList, FileStat, Frame,
    GuestMessage, GuestPath, LinkTarget, MAX_DATA_PAYLOAD, MAX_LIST_ENTRIES, MAX_PATH_BYTES,
    MAX_WINDOW, RequestId, Response, StreamId,
};
use tokio::sync::{mpsc, oneshot};

use crate::exec::os_message;
use crate::outbound::Outbound;
use crate::streams::{FeedError, InboundRx, InboundTx, OutputCredit, inbound};

type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Chunks queued between a transfer's task and its blocking thread.
const THREAD_QUEUE: usize = 4;
/// Write buffer of a plain file write.
const WRITE_BUFFER: usize = 1 << 20;
/// Default permission bits of a written file and of a created directory.
const DEFAULT_FILE_MODE: u32 = 0o644;
const DEFAULT_DIR_MODE: u32 = 0o755;

/// What the session hands to a write's task, in stream order.
enum ToWriter {
    /// Bytes from STDIN frames.
    Data(Bytes),
    /// `file_end`: every byte has been sent.
    End,
}

/// The session's view of a transfer.
pub(crate) struct FileHandle {
    /// Credit for a read's bytes to the host, fed by the host's WINDOW frames.
    credit: Option<Arc<OutputCredit>>,
    /// A write's byte queue; `None` for reads and after `file_end`.
    input: Option<InboundTx<ToWriter>>,
    /// Fired (or dropped) to abort the transfer.
    abort: Option<oneshot::Sender<()>>,
    /// The request the task answers.
    pub(crate) request: RequestId,
    /// Set by the task just before it answers the request.
    pub(crate) answered: Arc<AtomicBool>,
}

impl FileHandle {
    /// The host's credit for this transfer's bytes, for a read.
    pub(crate) fn credit(&self) -> Option<&OutputCredit> {
        self.credit.as_deref()
    }

    /// Hands STDIN bytes to a write's task.
    pub(crate) fn feed(&mut self, data: Bytes) -> Result<(), FeedError> {
        if self.credit.is_some() {
            return Err(FeedError::NoInput);
        }
        let Some(input) = &self.input else {
            return Err(FeedError::AfterEnd);
        };
        Ok(input.send_data(data.len(), ToWriter::Data(data))?)
    }

    /// `file_end`: the write is complete once the bytes already received are written.
    pub(crate) fn end(&mut self) {
        if let Some(input) = self.input.take() {
            input.send_marker(ToWriter::End);
        }
    }

    /// `file_abort`: stop now, leaving nothing behind. Idempotent.
    pub(crate) fn abort(&mut self) {
        if let Some(abort) = self.abort.take() {
            let _ = abort.send(());
        }
    }
}

/// A started transfer.
pub(crate) struct Started {
    pub(crate) handle: FileHandle,
    pub(crate) task: Task,
}

fn error(code: ErrorCode, message: String) -> ErrorBody {
    ErrorBody { code, message }
}

/// Maps an I/O error of a file operation to a typed answer; `what` says what was attempted
/// (`"cannot open /x"`).
pub(crate) fn fs_error(e: &io::Error, what: impl std::fmt::Display) -> ErrorBody {
    let code = match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorCode::NotFound,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorCode::PermissionDenied,
        Some(libc::EISDIR) => ErrorCode::IsADirectory,
        Some(libc::ENOTDIR) => ErrorCode::NotADirectory,
        Some(libc::EEXIST) => ErrorCode::AlreadyExists,
        Some(libc::ENOTEMPTY) => ErrorCode::NotEmpty,
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorCode::NoSpace,
        Some(libc::ENAMETOOLONG | libc::ELOOP) => ErrorCode::InvalidPath,
        _ if e.kind() == io::ErrorKind::ConnectionAborted => ErrorCode::Aborted,
        _ => ErrorCode::Io,
    };
    error(code, format!("{what}: {}", os_message(e)))
}

fn aborted() -> ErrorBody {
    error(
        ErrorCode::Aborted,
        "the host aborted the transfer".to_owned(),
    )
}

/// The I/O error a thread sees when its task is gone (the transfer was aborted).
fn aborted_io() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the host aborted the transfer",
    )
}

fn check_mode(mode: Option<u32>, default: u32) -> Result<u32, ErrorBody> {
    match mode {
        None => Ok(default),
        Some(m) if m <= 0o7777 => Ok(m),
        Some(m) => Err(error(
            ErrorCode::BadRequest,
            format!("mode {m:#o} has bits beyond 0o7777"),
        )),
    }
}

/// The parent directory and final name of a path that names something below `/`.
fn split_target(path: &GuestPath) -> Result<(PathBuf, PathBuf), ErrorBody> {
    let p = Path::new(path.as_str());
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => Ok((parent.to_path_buf(), PathBuf::from(name))),
        _ => Err(error(
            ErrorCode::InvalidPath,
            format!("{path} does not name a file in a directory"),
        )),
    }
}

/// A fresh temporary name in `dir` (fixed length, so a 255-byte target name still fits).
fn temp_path(dir: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".kiln-write-{}-{n}.tmp", std::process::id()))
}

/// A temporary file or directory that is removed when dropped, unless committed.
struct Temp {
    path: PathBuf,
    dir: bool,
    committed: bool,
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.committed {
            let _ = if self.dir {
                fs::remove_dir_all(&self.path)
            } else {
                fs::remove_file(&self.path)
            };
        }
    }
}

/// Where a write goes and what it has prepared.
struct WriteTarget {
    target: PathBuf,
    parent: PathBuf,
    temp: Temp,
    /// The open temp file of a plain write.
    file: Option<File>,
    mode: u32,
    tar: bool,
}

/// Validates a `file_write` and creates its temporary file (or directory). On `Ok` the
/// returned task answers the request; on `Err` the caller answers with the error.
pub(crate) fn start_write(
    request: RequestId,
    stream: StreamId,
    path: &GuestPath,
    mode: Option<u32>,
    tar: bool,
    window: u32,
    out: Outbound,
) -> Result<Started, ErrorBody> {
    let mode = check_mode(mode, DEFAULT_FILE_MODE)?;
    let (parent, name) = split_target(path)?;
    let target = parent.join(name);
    match fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() && !tar => {
            return Err(error(
                ErrorCode::IsADirectory,
                format!("{path} is a directory"),
            ));
        }
        Ok(m) if tar && !m.is_dir() => {
            return Err(error(
                ErrorCode::NotADirectory,
                format!("{path} exists and is not a directory"),
            ));
        }
        Ok(_) if tar => {
            let mut entries = fs::read_dir(&target).map_err(|e| fs_error(&e, path))?;
            if entries.next().is_some() {
                return Err(error(
                    ErrorCode::AlreadyExists,
                    format!("{path} is a directory that is not empty"),
                ));
            }
        }
        _ => {}
    }
    let temp_path = temp_path(&parent);
    let (temp, file) = if tar {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&temp_path)
            .map_err(|e| fs_error(&e, format!("cannot write in {}", parent.display())))?;
        let temp = Temp {
            path: temp_path,
            dir: true,
            committed: false,
        };
        // The archive's own `./` entry, if any, sets the final mode.
        fs::set_permissions(&temp.path, fs::Permissions::from_mode(DEFAULT_DIR_MODE))
            .map_err(|e| fs_error(&e, format!("cannot write in {}", parent.display())))?;
        (temp, None)
    } else {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp_path)
            .map_err(|e| fs_error(&e, format!("cannot write in {}", parent.display())))?;
        let temp = Temp {
            path: temp_path,
            dir: false,
            committed: false,
        };
        (temp, Some(file))
    };
    let window = window.clamp(1, MAX_WINDOW as u32);
    let (input_tx, input_rx) = inbound(window);
    let (abort_tx, abort_rx) = oneshot::channel();
    let answered = Arc::new(AtomicBool::new(false));
    let write = WriteJob {
        request,
        stream,
        window,
        answered: Arc::clone(&answered),
        out,
        input: input_rx,
        abort: abort_rx,
        target: WriteTarget {
            target,
            parent,
            temp,
            file,
            mode,
            tar,
        },
    };
    Ok(Started {
        handle: FileHandle {
            credit: None,
            input: Some(input_tx),
            abort: Some(abort_tx),
            request,
            answered,
        },
        task: Box::pin(write.run()),
    })
}

/// Everything a write's task owns.
struct WriteJob {
    request: RequestId,
    stream: StreamId,
    window: u32,
    answered: Arc<AtomicBool>,
    out: Outbound,
    input: InboundRx<ToWriter>,
    abort: oneshot::Receiver<()>,
    target: WriteTarget,
}

impl WriteJob {
    async fn run(mut self) {
        let stream = self.stream;
        let grant = Frame::Window {
            stream,
            increment: self.window,
        };
        if !self.out.send(&grant).await {
            return;
        }
        self.answered.store(true, Ordering::SeqCst);
        let ready = GuestMessage::Response {
            id: self.request,
            response: Response::FileWriteReady,
        };
        if !self.out.message(&ready).await {
            return;
        }
        let (to_thread, from_task) = mpsc::channel(THREAD_QUEUE);
        let target = self.target;
        let job = tokio::task::spawn_blocking(move || target.write_from(from_task));
        let mut bytes = 0u64;
        let mut aborted_by_host = false;
        loop {
            tokio::select! {
                item = self.input.recv() => match item {
                    Some(ToWriter::Data(data)) => {
                        let n = data.len();
                        if to_thread.send(ToWriter::Data(data)).await.is_err() {
                            // The thread failed; its result says why.
                            break;
                        }
                        bytes += n as u64;
                        if let Some(increment) = self.input.consumed(n)
                            && !self.out.send(&Frame::Window { stream, increment }).await
                        {
                            return;
                        }
                    }
                    Some(ToWriter::End) => {
                        let _ = to_thread.send(ToWriter::End).await;
                        break;
                    }
                    // The handle is gone: the session is being dropped.
                    None => return,
                },
                _ = &mut self.abort => {
                    aborted_by_host = true;
                    break;
                }
            }
        }
        // Without `End`, the thread sees the queue close and removes the temp file.
        drop(to_thread);
        let result = match job.await {
            Ok(r) => r,
            Err(_) => Err(error(
                ErrorCode::Internal,
                "the file writer failed inside the agent".to_owned(),
            )),
        };
        let error = match result {
            Ok(()) if aborted_by_host => Some(aborted()),
            Ok(()) => None,
            Err(e) => Some(if aborted_by_host { aborted() } else { e }),
        };
        let done = GuestMessage::FileDone {
            stream,
            bytes,
            error,
        };
        self.out.message(&done).await;
    }
}

/// Reads a write's bytes from its task, on the blocking thread.
struct QueueReader {
    rx: mpsc::Receiver<ToWriter>,
    current: Bytes,
    ended: bool,
}

impl QueueReader {
    /// Writes every chunk to `w` as it comes, until the end of the transfer.
    fn drain_into(&mut self, w: &mut impl Write) -> io::Result<()> {
        loop {
            if !self.current.is_empty() {
                w.write_all(&self.current)?;
                self.current.clear();
            }
            if self.ended {
                return Ok(());
            }
            match self.rx.blocking_recv() {
                Some(ToWriter::Data(data)) => self.current = data,
                Some(ToWriter::End) => self.ended = true,
                None => return Err(aborted_io()),
            }
        }
    }
}

impl Read for QueueReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(ToWriter::Data(data)) => self.current = data,
                Some(ToWriter::End) => self.ended = true,
                None => return Err(aborted_io()),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Fails unless every component of a tar entry path stays inside the target directory.
fn check_inside(path: &Path, what: &str) -> Result<(), ErrorBody> {
    let inside = path
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if inside {
        Ok(())
    } else {
        Err(error(
            ErrorCode::InvalidPath,
            format!("tar {what} {} escapes the target directory", path.display()),
        ))
    }
}

/// Fails if a directory on the way to `path` inside `root` is a symlink (an earlier entry
/// could point it anywhere): the entry would land outside the target.
fn check_no_symlink_ancestor(root: &Path, path: &Path) -> Result<(), ErrorBody> {
    let mut at = root.to_path_buf();
    let parents = path.parent().map(Path::components).into_iter().flatten();
    for component in parents {
        let Component::Normal(part) = component else {
            continue;
        };
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(error(
                    ErrorCode::InvalidPath,
                    format!(
                        "tar entry {} goes through a symlink and escapes the target directory",
                        path.display()
                    ),
                ));
            }
            Ok(_) => {}
            // Not there yet: unpacking creates it as a directory.
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

impl WriteTarget {
    /// Writes (or unpacks) everything the task hands over, then commits; any failure or an
    /// abort leaves nothing at the target (the temp is removed on drop).
    fn write_from(mut self, rx: mpsc::Receiver<ToWriter>) -> Result<(), ErrorBody> {
        let mut reader = QueueReader {
            rx,
            current: Bytes::new(),
            ended: false,
        };
        let shown = self.target.display().to_string();
        if self.tar {
            self.unpack(&mut reader)?;
        } else if let Some(mut file) = self.file.take() {
            // Whole chunks into a 1 MiB buffer: under TCG every syscall is dear, and
            // `io::copy`'s 8 KiB steps cost 0.2x of the upload rate (`kiln bench files`).
            let mut out = io::BufWriter::with_capacity(WRITE_BUFFER, &mut file);
            reader
                .drain_into(&mut out)
                .and_then(|()| out.flush())
                .map_err(|e| fs_error(&e, format!("cannot write {shown}")))?;
            drop(out);
            file.set_permissions(fs::Permissions::from_mode(self.mode))
                .and_then(|()| file.sync_all())
                .map_err(|e| fs_error(&e, format!("cannot write {shown}")))?;
        }
        fs::rename(&self.temp.path, &self.target)
            .map_err(|e| fs_error(&e, format!("cannot create {shown}")))?;
        self.temp.committed = true;
        // Make the rename durable; a failure here does not undo it.
        if let Ok(dir) = File::open(&self.parent) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    fn unpack(&self, reader: &mut QueueReader) -> Result<(), ErrorBody> {
        let shown = self.target.display().to_string();
        let bad = |e: io::Error| fs_error(&e, format!("cannot unpack into {shown}"));
        let mut archive = tar::Archive::new(&mut *reader);
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        archive.set_overwrite(true);
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let path = entry.path().map_err(bad)?.into_owned();
            check_inside(&path, "entry")?;
            if entry.header().entry_type().is_hard_link()
                && let Some(link) = entry.link_name().map_err(bad)?
            {
                check_inside(&link, "hard link target")?;
            }
            check_no_symlink_ancestor(&self.temp.path, &path)?;
            if !entry.unpack_in(&self.temp.path).map_err(bad)? {
                return Err(error(
                    ErrorCode::InvalidPath,
                    format!("tar entry {} escapes the target directory", path.display()),
                ));
            }
        }
        // Bytes after the end-of-archive marker still belong to the stream: wait for its end
        // (an abort must still remove everything).
        io::copy(archive.into_inner(), &mut io::sink()).map_err(bad)?;
        // Directories unpacked without a `./` entry keep the default mode; fsync what we can.
        if let Ok(dir) = File::open(&self.temp.path) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// What a read sends.
enum Source {
    File(File),
    Tar(PathBuf),
}

/// Validates a `file_read` and opens its source. On `Ok` the returned task answers the
/// request; on `Err` the caller answers with the error.
pub(crate) fn start_read(
    request: RequestId,
    stream: StreamId,
    path: &GuestPath,
    tar: bool,
    window: u32,
    out: Outbound,
) -> Result<Started, ErrorBody> {
    if window == 0 || u64::from(window) > MAX_WINDOW {
        return Err(error(
            ErrorCode::BadRequest,
            format!("window {window} is not in 1..={MAX_WINDOW}"),
        ));
    }
    let meta =
        fs::metadata(path.as_str()).map_err(|e| fs_error(&e, format!("cannot read {path}")))?;
    let (source, size) = if tar {
        if !meta.is_dir() {
            return Err(error(
                ErrorCode::NotADirectory,
                format!("{path} is not a directory"),
            ));
        }
        (Source::Tar(PathBuf::from(path.as_str())), None)
    } else {
        if meta.is_dir() {
            return Err(error(
                ErrorCode::IsADirectory,
                format!("{path} is a directory"),
            ));
        }
        let file =
            File::open(path.as_str()).map_err(|e| fs_error(&e, format!("cannot read {path}")))?;
        (Source::File(file), Some(meta.len()))
    };
    let credit = Arc::new(OutputCredit::new(window));
    let (abort_tx, abort_rx) = oneshot::channel();
    let answered = Arc::new(AtomicBool::new(false));
    let read = ReadJob {
        request,
        stream,
        size,
        answered: Arc::clone(&answered),
        out,
        credit: Arc::clone(&credit),
        abort: abort_rx,
        source,
        shown: path.to_string(),
    };
    Ok(Started {
        handle: FileHandle {
            credit: Some(credit),
            input: None,
            abort: Some(abort_tx),
            request,
            answered,
        },
        task: Box::pin(read.run()),
    })
}

/// Everything a read's task owns.
struct ReadJob {
    request: RequestId,
    stream: StreamId,
    size: Option<u64>,
    answered: Arc<AtomicBool>,
    out: Outbound,
    credit: Arc<OutputCredit>,
    abort: oneshot::Receiver<()>,
    source: Source,
    shown: String,
}

impl ReadJob {
    async fn run(mut self) {
        let stream = self.stream;
        self.answered.store(true, Ordering::SeqCst);
        let started = GuestMessage::Response {
            id: self.request,
            response: Response::FileReadStarted { size: self.size },
        };
        if !self.out.message(&started).await {
            return;
        }
        let (tx, mut rx) = mpsc::channel::<Bytes>(THREAD_QUEUE);
        let (source, shown) = (self.source, self.shown);
        let job = tokio::task::spawn_blocking(move || read_into(source, &shown, tx));
        let mut bytes = 0u64;
        let mut aborted_by_host = false;
        'chunks: loop {
            let mut chunk = tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => c,
                    None => break,
                },
                _ = &mut self.abort => {
                    aborted_by_host = true;
                    break;
                }
            };
            while !chunk.is_empty() {
                let n = tokio::select! {
                    n = self.credit.acquire(chunk.len()) => n,
                    _ = &mut self.abort => {
                        aborted_by_host = true;
                        break 'chunks;
                    }
                };
                let frame = Frame::Data {
                    stream,
                    channel: DataChannel::Stdout,
                    data: chunk.split_to(n),
                };
                if !self.out.send(&frame).await {
                    return;
                }
                bytes += n as u64;
            }
        }
        // Closing the queue stops a thread still producing.
        drop(rx);
        let result = match job.await {
            Ok(r) => r,
            Err(_) => Err(error(
                ErrorCode::Internal,
                "the file reader failed inside the agent".to_owned(),
            )),
        };
        let error = if aborted_by_host {
            Some(aborted())
        } else {
            result.err()
        };
        let done = GuestMessage::FileDone {
            stream,
            bytes,
            error,
        };
        self.out.message(&done).await;
    }
}

/// Collects bytes into 64 KiB chunks for a read's task, on the blocking thread.
struct QueueWriter {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
}

impl QueueWriter {
    fn send(&mut self, len: usize) -> io::Result<()> {
        let chunk = self.buf.split_to(len).freeze();
        self.tx.blocking_send(chunk).map_err(|_| aborted_io())
    }
}

impl Write for QueueWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        while self.buf.len() >= MAX_DATA_PAYLOAD {
            self.send(MAX_DATA_PAYLOAD)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send(self.buf.len())?;
        }
        Ok(())
    }
}

/// Reads (or packs) the source into the task's queue. An abort (the queue closed) is not an
/// error here: the task reports it.
fn read_into(source: Source, shown: &str, tx: mpsc::Sender<Bytes>) -> Result<(), ErrorBody> {
    let mut writer = QueueWriter {
        tx,
        buf: BytesMut::new(),
    };
    let result = match source {
        Source::File(mut file) => loop {
            let mut chunk = BytesMut::zeroed(MAX_DATA_PAYLOAD);
            match file.read(&mut chunk) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    chunk.truncate(n);
                    if writer.tx.blocking_send(chunk.freeze()).is_err() {
                        break Err(aborted_io());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        },
        Source::Tar(dir) => {
            let mut builder = tar::Builder::new(&mut writer);
            builder.follow_symlinks(false);
            builder
                .append_dir_all(".", &dir)
                .and_then(|()| builder.into_inner())
                .and_then(|w| w.flush())
        }
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => Ok(()),
        Err(e) => Err(fs_error(&e, format!("cannot read {shown}"))),
    }
}

fn stat_of(meta: &fs::Metadata) -> FileStat {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    let mtime_unix_ns = meta
        .mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec());
    FileStat {
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        mtime_unix_ns,
        uid: meta.uid(),
        gid: meta.gid(),
        symlink_target: None,
    }
}

/// `file_stat`: `lstat` of `path`, with the target of a symlink.
pub(crate) fn stat(path: &GuestPath) -> Result<Response, ErrorBody> {
    let meta = fs::symlink_metadata(path.as_str())
        .map_err(|e| fs_error(&e, format!("cannot stat {path}")))?;
    let mut stat = stat_of(&meta);
    if stat.kind == FileKind::Symlink
        && let Ok(target) = fs::read_link(path.as_str())
        && let Some(target) = target.to_str()
        && target.len() <= MAX_PATH_BYTES
    {
        stat.symlink_target = LinkTarget::new(target).ok();
    }
    Ok(Response::FileStat(stat))
}

/// `file_list`: the first [`MAX_LIST_ENTRIES`] names after `after`, in byte order. Memory is
/// bounded by one page whatever the directory's size (a heap of the smallest names seen);
/// names that are not UTF-8 cannot travel in JSON and are left out.
pub(crate) fn list(path: &GuestPath, after: Option<&EntryName>) -> Result<Response, ErrorBody> {
    let dir =
        fs::read_dir(path.as_str()).map_err(|e| fs_error(&e, format!("cannot list {path}")))?;
    let mut smallest: BinaryHeap<String> = BinaryHeap::new();
    for entry in dir {
        let entry = entry.map_err(|e| fs_error(&e, format!("cannot list {path}")))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if after.is_some_and(|a| name.as_str() <= a.as_str()) {
            continue;
        }
        if smallest.len() <= MAX_LIST_ENTRIES {
            smallest.push(name);
        } else if smallest.peek().is_some_and(|max| name < *max) {
            smallest.pop();
            smallest.push(name);
        }
    }
    let mut names = smallest.into_sorted_vec();
    let more = names.len() > MAX_LIST_ENTRIES;
    names.truncate(MAX_LIST_ENTRIES);
    let next_after = if more {
        names.last().and_then(|n| EntryName::new(n.clone()).ok())
    } else {
        None
    };
    let base = Path::new(path.as_str());
    let mut entries = Vec::with_capacity(names.len());
    for name in names {
        // An entry removed since it was listed is simply left out.
        let Ok(meta) = fs::symlink_metadata(base.join(&name)) else {
            continue;
        };
        let Ok(name) = EntryName::new(name) else {
            continue;
        };
        entries.push(FileEntry {
            name,
            stat: stat_of(&meta),
        });
    }
    let list = FileList::new(entries, next_after)
        .map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
    Ok(Response::FileList(list))
}

/// `file_mkdir`.
pub(crate) fn mkdir(
    path: &GuestPath,
    parents: bool,
    mode: Option<u32>,
) -> Result<Response, ErrorBody> {
    let mode = check_mode(mode, DEFAULT_DIR_MODE)?;
    fs::DirBuilder::new()
        .recursive(parents)
        .mode(mode)
        .create(path.as_str())
        .map_err(|e| fs_error(&e, format!("cannot create directory {path}")))?;
    Ok(Response::FileOk)
}

/// `file_remove`: a file, a symlink, an empty directory, or (with `recursive`) a tree.
pub(crate) fn remove(path: &GuestPath, recursive: bool) -> Result<Response, ErrorBody> {
    if path.as_str().trim_end_matches('/').is_empty() {
        return Err(error(
            ErrorCode::InvalidPath,
            "refusing to remove /".to_owned(),
        ));
    }
    let bad = |e: io::Error| fs_error(&e, format!("cannot remove {path}"));
    let meta = fs::symlink_metadata(path.as_str()).map_err(bad)?;
    if meta.is_dir() {
        if recursive {
            fs::remove_dir_all(path.as_str()).map_err(bad)?;
        } else {
            fs::remove_dir(path.as_str()).map_err(bad)?;
        }
    } else {
        fs::remove_file(path.as_str()).map_err(bad)?;
    }
    Ok(Response::FileOk)
}

/// `file_rename`: `rename(2)`.
pub(crate) fn rename(from: &GuestPath, to: &GuestPath) -> Result<Response, ErrorBody> {
    fs::rename(from.as_str(), to.as_str())
        .map_err(|e| fs_error(&e, format!("cannot rename {from} to {to}")))?;
    Ok(Response::FileOk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_error_maps_errno_to_typed_codes() {
        let cases = [
            (libc::ENOENT, ErrorCode::NotFound),
            (libc::EACCES, ErrorCode::PermissionDenied),
            (libc::EROFS, ErrorCode::PermissionDenied),
            (libc::EISDIR, ErrorCode::IsADirectory),
            (libc::ENOTDIR, ErrorCode::NotADirectory),
            (libc::EEXIST, ErrorCode::AlreadyExists),
            (libc::ENOTEMPTY, ErrorCode::NotEmpty),
            (libc::ENOSPC, ErrorCode::NoSpace),
            (libc::ENAMETOOLONG, ErrorCode::InvalidPath),
            (libc::EIO, ErrorCode::Io),
        ];
        for (errno, code) in cases {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(fs_error(&e, "x").code, code, "errno {errno}");
        }
        assert_eq!(fs_error(&aborted_io(), "x").code, ErrorCode::Aborted);
    }

    #[test]
    fn check_inside_refuses_parent_and_absolute_components() {
        assert!(check_inside(Path::new("./a/b"), "entry").is_ok());
        for bad in ["../x", "a/../../x", "/etc/passwd"] {
            let e = check_inside(Path::new(bad), "entry").expect_err(bad);
            assert_eq!(e.code, ErrorCode::InvalidPath);
        }
    }

    #[test]
    fn check_mode_refuses_bits_beyond_permissions() {
        assert_eq!(check_mode(None, 0o644).ok(), Some(0o644));
        assert_eq!(check_mode(Some(0o4755), 0o644).ok(), Some(0o4755));
        assert!(check_mode(Some(0o10000), 0o644).is_err());
    }
}
