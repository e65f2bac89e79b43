//! Files in a sandbox as the API describes them: metadata ([`FileInfo`]), directory listings
//! ([`FileList`]), and the requests and query strings of the file routes.
//!
//! The bytes themselves travel as raw HTTP bodies (`PUT`/`GET /v1/sandboxes/{id}/files`),
//! a tar archive when `tar=true`; nothing here holds file content. Must not: validate guest
//! paths beyond their shape (the guest agent checks them again, and the engine checks what
//! the guest answers).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Longest guest path, in bytes.
pub const MAX_GUEST_PATH: usize = 4096;

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (described, not followed).
    Symlink,
    /// A device, fifo or socket.
    Other,
}

/// Metadata of one path in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileInfo {
    /// Absolute path in the guest.
    pub path: String,
    /// What it is.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (e.g. 420 = 0o644).
    pub mode: u32,
    /// Last modification, milliseconds since the Unix epoch.
    pub mtime_unix_ms: i64,
    /// Owner's uid in the guest.
    pub uid: u32,
    /// Group's gid in the guest.
    pub gid: u32,
    /// Where a symlink points (given by `file_stat`; listings leave it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

/// One page of a directory listing, names in byte order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileList {
    /// The directory.
    pub path: String,
    /// Its entries (at most 256 per page).
    pub entries: Vec<FileInfo>,
    /// Set when more entries follow: pass it as `after` for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// `?path=…` of the file routes that name one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FilePathQuery {
    /// Absolute path in the guest.
    pub path: String,
}

/// `?path=…&mode=…&tar=…` of `PUT /v1/sandboxes/{id}/files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FileWriteQuery {
    /// Where the file appears once complete (atomically: written beside it, then renamed);
    /// with `tar`, the directory the archive is unpacked into (it must not exist or be empty).
    pub path: String,
    /// Permission bits, in octal (e.g. `0755`; default `0644`; ignored with `tar`).
    #[serde(default)]
    pub mode: Option<String>,
    /// The body is a tar archive to unpack (modes kept, symlinks kept, nothing may escape
    /// the directory).
    #[serde(default)]
    pub tar: bool,
}

/// `?path=…&tar=…` of `GET /v1/sandboxes/{id}/files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FileReadQuery {
    /// The file (with `tar`, the directory) to read.
    pub path: String,
    /// Answer a tar archive of the directory `path`.
    #[serde(default)]
    pub tar: bool,
}

/// `?path=…&after=…` of `GET /v1/sandboxes/{id}/files/list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FileListQuery {
    /// The directory.
    pub path: String,
    /// Start after this name (the previous page's `next_after`).
    #[serde(default)]
    pub after: Option<String>,
}

/// `?path=…&recursive=…` of `DELETE /v1/sandboxes/{id}/files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FileRemoveQuery {
    /// What to remove.
    pub path: String,
    /// Remove a non-empty directory with everything in it.
    #[serde(default)]
    pub recursive: bool,
}

/// `POST /v1/sandboxes/{id}/files/mkdir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileMkdirRequest {
    /// The directory to create.
    pub path: String,
    /// Create missing parents too, and accept an existing directory (`mkdir -p`).
    #[serde(default = "yes")]
    pub parents: bool,
    /// Permission bits (default 0o755).
    #[serde(default)]
    pub mode: Option<u32>,
}

fn yes() -> bool {
    true
}

/// `POST /v1/sandboxes/{id}/files/rename`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileRenameRequest {
    /// Current path.
    pub from: String,
    /// New path (replaced if it is a file).
    pub to: String,
}

/// Parses an octal mode such as `0755` or `644` (at most `07777`).
pub fn parse_mode(s: &str) -> Result<u32, crate::InvalidInput> {
    let bad = || {
        crate::InvalidInput::Rule(format!(
            "invalid mode {s:?}: expected octal permission bits such as 0644 or 755"
        ))
    };
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(bad());
    }
    let m = u32::from_str_radix(s, 8).map_err(|_| bad())?;
    if m > 0o7777 {
        return Err(bad());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_mode_is_octal_and_bounded() {
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert_eq!(parse_mode("755").unwrap(), 0o755);
        assert_eq!(parse_mode("4755").unwrap(), 0o4755);
        for bad in ["", "8", "0o644", "-1", "77777", "644 "] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mkdir_request_defaults_to_parents() {
        let r: FileMkdirRequest = serde_json::from_str(r#"{"path":"/a/b"}"#).unwrap();
        assert!(r.parents);
        assert!(serde_json::from_str::<FileMkdirRequest>(r#"{"path":"/a","p":1}"#).is_err());
    }
}
