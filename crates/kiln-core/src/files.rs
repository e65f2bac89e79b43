//! Files in a running sandbox (the `Engine::file_*` methods live here): transfers in and out (plain files or tar archives of
//! directories) and the small operations (stat, list, mkdir, remove, rename), on top of the
//! agent's `files-v1` operations.
//!
//! Every operation is a [`FileOp`] to the sandbox's owner task, which refuses it unless the
//! sandbox runs (a paused or stopped sandbox answers with its state). A transfer is only
//! *opened* there: the owner hands back the [`Upload`] or [`Download`], and the bytes then
//! flow without holding the owner, under the channel's flow control, so memory stays bounded
//! whatever the size. Must not: trust what the guest answers beyond its shape (the agent
//! protocol bounds names, counts and sizes; sizes are never used to size a buffer here).

use std::pin::Pin;
use std::task::{Context, Poll};

use kiln_agent_host::{
    AgentClient, AgentError, EntryName, ErrorCode, FileKind as WireKind, FileList as WireList,
    FileReadRequest, FileReader, FileStat, FileWriteRequest, FileWriter, GuestPath,
};
use kiln_api_types::{FileInfo, FileKind, FileList, SandboxId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::CoreError;
use crate::sandbox::BusyGuard;

/// A file operation for a sandbox's owner task.
pub(crate) enum FileOp {
    Write(FileWriteRequest),
    Read(FileReadRequest),
    Stat(GuestPath),
    List(GuestPath, Option<EntryName>),
    Mkdir(GuestPath, bool, Option<u32>),
    Remove(GuestPath, bool),
    Rename(GuestPath, GuestPath),
}

/// What a [`FileOp`] gives back.
pub(crate) enum FileAnswer {
    Writer(FileWriter),
    Reader(FileReader),
    Stat(FileStat),
    List(WireList),
    Done,
}

/// Runs `op` against the agent (in the owner task: it only opens transfers).
pub(crate) async fn run(agent: &AgentClient, op: FileOp) -> Result<FileAnswer, CoreError> {
    let path = match &op {
        FileOp::Write(r) => r.path.as_str().to_owned(),
        FileOp::Read(r) => r.path.as_str().to_owned(),
        FileOp::Stat(p) | FileOp::List(p, _) | FileOp::Mkdir(p, ..) | FileOp::Remove(p, _) => {
            p.as_str().to_owned()
        }
        FileOp::Rename(from, _) => from.as_str().to_owned(),
    };
    let answer = match op {
        FileOp::Write(r) => agent.file_write(r).await.map(FileAnswer::Writer),
        FileOp::Read(r) => agent.file_read(r).await.map(FileAnswer::Reader),
        FileOp::Stat(p) => agent.file_stat(&p).await.map(FileAnswer::Stat),
        FileOp::List(p, after) => agent
            .file_list(&p, after.as_ref())
            .await
            .map(FileAnswer::List),
        FileOp::Mkdir(p, parents, mode) => agent
            .file_mkdir(&p, parents, mode)
            .await
            .map(|()| FileAnswer::Done),
        FileOp::Remove(p, recursive) => agent
            .file_remove(&p, recursive)
            .await
            .map(|()| FileAnswer::Done),
        FileOp::Rename(from, to) => agent
            .file_rename(&from, &to)
            .await
            .map(|()| FileAnswer::Done),
    };
    answer.map_err(|e| file_error(&path, e))
}

/// A guest path from API input: absolute, at most 4096 bytes, no NUL.
pub fn guest_path(raw: &str) -> Result<GuestPath, CoreError> {
    GuestPath::new(raw).map_err(|e| CoreError::BadRequest(format!("invalid path {raw:?}: {e}")))
}

/// A directory entry name from API input (`after` of a listing).
pub fn entry_name(raw: &str) -> Result<EntryName, CoreError> {
    EntryName::new(raw).map_err(|e| CoreError::BadRequest(format!("invalid name {raw:?}: {e}")))
}

/// What the engine reports for a failed file operation on `path`.
pub(crate) fn file_error(path: &str, e: AgentError) -> CoreError {
    match e {
        AgentError::Remote { code, message, .. } => {
            let kind = FileErrorKind::of(code);
            CoreError::File {
                path: path.to_owned(),
                kind,
                message: explain(kind, message),
            }
        }
        other => CoreError::Agent(other),
    }
}

/// The guest's message, or for an agent without file operations, what to do about it.
fn explain(kind: FileErrorKind, message: String) -> String {
    if kind == FileErrorKind::Unsupported {
        format!(
            "the guest agent of this sandbox's image has no file operations ({message}); rebuild the image with `kiln image build NAME` and start a new sandbox"
        )
    } else {
        message
    }
}

/// An I/O error of a transfer, with the guest's code when the guest gave one.
pub fn transfer_error(path: &str, e: std::io::Error) -> CoreError {
    let agent = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<AgentError>());
    match agent {
        Some(AgentError::Remote { code, message, .. }) => {
            let kind = FileErrorKind::of(*code);
            CoreError::File {
                path: path.to_owned(),
                kind,
                message: explain(kind, message.clone()),
            }
        }
        _ => CoreError::Io {
            what: "transfer",
            path: path.into(),
            source: e,
        },
    }
}

/// The classes of file errors the API distinguishes (each has its status and code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileErrorKind {
    /// The path (or a parent) does not exist: 404.
    NotFound,
    /// It exists, is (not) a directory, or is not empty: 409.
    Conflict,
    /// The path or an archive entry is not acceptable: 400.
    InvalidPath,
    /// Permissions or a read-only file system: 403.
    PermissionDenied,
    /// The guest's disk is full: 507.
    NoSpace,
    /// Too many transfers at once: 429.
    Busy,
    /// The guest agent has no file operations (an image built before them): 501.
    Unsupported,
    /// Anything else the guest reported: 500.
    Io,
}

impl FileErrorKind {
    fn of(code: ErrorCode) -> FileErrorKind {
        match code {
            ErrorCode::NotFound => FileErrorKind::NotFound,
            ErrorCode::AlreadyExists
            | ErrorCode::NotEmpty
            | ErrorCode::IsADirectory
            | ErrorCode::NotADirectory => FileErrorKind::Conflict,
            ErrorCode::InvalidPath | ErrorCode::BadRequest => FileErrorKind::InvalidPath,
            ErrorCode::PermissionDenied => FileErrorKind::PermissionDenied,
            ErrorCode::NoSpace => FileErrorKind::NoSpace,
            ErrorCode::TooManyStreams => FileErrorKind::Busy,
            ErrorCode::Unsupported => FileErrorKind::Unsupported,
            _ => FileErrorKind::Io,
        }
    }

    /// The stable API code.
    pub fn code(self) -> &'static str {
        match self {
            FileErrorKind::NotFound => "file_not_found",
            FileErrorKind::Conflict => "file_conflict",
            FileErrorKind::InvalidPath => "invalid_path",
            FileErrorKind::PermissionDenied => "permission_denied",
            FileErrorKind::NoSpace => "guest_disk_full",
            FileErrorKind::Busy => "too_many_transfers",
            FileErrorKind::Unsupported => "files_unsupported",
            FileErrorKind::Io => "file_io_error",
        }
    }
}

/// The API's view of the guest's metadata of `path`.
pub(crate) fn info(path: &str, s: &FileStat) -> FileInfo {
    FileInfo {
        path: path.to_owned(),
        kind: match s.kind {
            WireKind::File => FileKind::File,
            WireKind::Dir => FileKind::Dir,
            WireKind::Symlink => FileKind::Symlink,
            WireKind::Other | WireKind::Unknown => FileKind::Other,
        },
        size: s.size,
        mode: s.mode,
        mtime_unix_ms: s.mtime_unix_ns.div_euclid(1_000_000),
        uid: s.uid,
        gid: s.gid,
        symlink_target: s.symlink_target.as_ref().map(|t| t.as_str().to_owned()),
    }
}

/// The API's view of one page of a listing of `dir`.
pub(crate) fn list(dir: &str, l: &WireList) -> FileList {
    let join = |name: &str| {
        if dir.ends_with('/') {
            format!("{dir}{name}")
        } else {
            format!("{dir}/{name}")
        }
    };
    FileList {
        path: dir.to_owned(),
        entries: l
            .entries()
            .iter()
            .map(|e| info(&join(e.name.as_str()), &e.stat))
            .collect(),
        next_after: l.next_after().map(|n| n.as_str().to_owned()),
    }
}

/// A file (or tar archive) being written into a sandbox: write the bytes, then
/// [`Upload::finish`]. Dropped unfinished, the write is aborted and nothing appears.
pub struct Upload {
    pub(crate) sandbox: SandboxId,
    pub(crate) path: String,
    pub(crate) writer: FileWriter,
    pub(crate) _busy: BusyGuard,
}

impl Upload {
    /// The sandbox.
    pub fn sandbox(&self) -> &SandboxId {
        &self.sandbox
    }

    /// Waits until the guest has the whole file in place (fsynced and renamed); returns the
    /// bytes written.
    pub async fn finish(self) -> Result<u64, CoreError> {
        let path = self.path;
        self.writer.finish().await.map_err(|e| file_error(&path, e))
    }
}

impl AsyncWrite for Upload {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

/// A file (or tar archive) being read out of a sandbox. Ends with an error, never a clean
/// end of file, if the guest could not send all of it.
pub struct Download {
    pub(crate) reader: FileReader,
    pub(crate) _busy: BusyGuard,
}

impl Download {
    /// The size the guest announced (a plain file; `None` for a tar archive). A claim of
    /// the guest: the stream itself is what counts.
    pub fn size(&self) -> Option<u64> {
        self.reader.size()
    }
}

impl AsyncRead for Download {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl crate::Engine {
    async fn file_op(
        &self,
        id: &SandboxId,
        op: FileOp,
    ) -> Result<(FileAnswer, BusyGuard), CoreError> {
        self.call(id, |r| crate::owner::Op::File(op, r)).await
    }

    /// Opens a write of `path` in sandbox `id` (a tar archive unpacked into the directory
    /// `path` with `tar`); see [`Upload`].
    pub async fn file_upload(
        &self,
        id: &SandboxId,
        path: &str,
        mode: Option<u32>,
        tar: bool,
    ) -> Result<Upload, CoreError> {
        let gp = guest_path(path)?;
        let req = kiln_agent_host::FileWriteRequest {
            path: gp,
            mode,
            tar,
        };
        match self.file_op(id, FileOp::Write(req)).await? {
            (FileAnswer::Writer(writer), busy) => Ok(Upload {
                sandbox: id.clone(),
                path: path.to_owned(),
                writer,
                _busy: busy,
            }),
            _ => Err(unexpected_answer()),
        }
    }

    /// Opens a read of `path` in sandbox `id` (a tar archive of the directory with `tar`).
    pub async fn file_download(
        &self,
        id: &SandboxId,
        path: &str,
        tar: bool,
    ) -> Result<Download, CoreError> {
        let req = kiln_agent_host::FileReadRequest {
            path: guest_path(path)?,
            tar,
        };
        match self.file_op(id, FileOp::Read(req)).await? {
            (FileAnswer::Reader(reader), busy) => Ok(Download {
                reader,
                _busy: busy,
            }),
            _ => Err(unexpected_answer()),
        }
    }

    /// Metadata of `path` (a symlink is described, not followed).
    pub async fn file_stat(
        &self,
        id: &SandboxId,
        path: &str,
    ) -> Result<kiln_api_types::FileInfo, CoreError> {
        let gp = guest_path(path)?;
        match self.file_op(id, FileOp::Stat(gp)).await? {
            (FileAnswer::Stat(s), _) => Ok(info(path, &s)),
            _ => Err(unexpected_answer()),
        }
    }

    /// One page of the listing of directory `path`, after the name `after`.
    pub async fn file_list(
        &self,
        id: &SandboxId,
        path: &str,
        after: Option<&str>,
    ) -> Result<kiln_api_types::FileList, CoreError> {
        let gp = guest_path(path)?;
        let after = after.map(entry_name).transpose()?;
        match self.file_op(id, FileOp::List(gp, after)).await? {
            (FileAnswer::List(l), _) => Ok(list(path, &l)),
            _ => Err(unexpected_answer()),
        }
    }

    /// Creates directory `path` (with its parents, `mkdir -p`, when `parents`).
    pub async fn file_mkdir(
        &self,
        id: &SandboxId,
        path: &str,
        parents: bool,
        mode: Option<u32>,
    ) -> Result<kiln_api_types::FileInfo, CoreError> {
        if mode.is_some_and(|m| m > 0o7777) {
            return Err(CoreError::BadRequest(format!(
                "mode {:o} has bits beyond 0o7777",
                mode.unwrap_or_default()
            )));
        }
        let gp = guest_path(path)?;
        self.file_op(id, FileOp::Mkdir(gp, parents, mode)).await?;
        self.file_stat(id, path).await
    }

    /// Removes `path` (a non-empty directory only with `recursive`).
    pub async fn file_remove(
        &self,
        id: &SandboxId,
        path: &str,
        recursive: bool,
    ) -> Result<(), CoreError> {
        let gp = guest_path(path)?;
        self.file_op(id, FileOp::Remove(gp, recursive))
            .await
            .map(|_| ())
    }

    /// Renames `from` to `to` within the guest.
    pub async fn file_rename(
        &self,
        id: &SandboxId,
        from: &str,
        to: &str,
    ) -> Result<kiln_api_types::FileInfo, CoreError> {
        let (f, t) = (guest_path(from)?, guest_path(to)?);
        self.file_op(id, FileOp::Rename(f, t)).await?;
        self.file_stat(id, to).await
    }
}

/// A file operation answered with another operation's kind: a bug, reported, not a panic.
fn unexpected_answer() -> CoreError {
    CoreError::HostSetup("the sandbox's owner answered a file operation with the wrong kind".into())
}
