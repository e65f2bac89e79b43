//! Validated values of the file operations (feature [`FEATURE_FILES_V1`]).
//!
//! Owns: [`GuestPath`] (an absolute guest path, checked when parsed), [`FileStat`],
//! [`FileKind`], [`FileEntry`], [`FileList`] and the limits of the feature.
//!
//! Must not: touch a filesystem. Paths are plain strings here; the agent resolves them.
//!
//! ```text
//!  host                                               guest
//!  file_write{stream,path,mode,tar} ───────────────▶  temp file (or dir) beside the target
//!  ◀── WINDOW(stream, 256 KiB) ◀── file_write_ready
//!  STDIN(stream) bytes (≤ credit) ─────────────────▶  written (tar: unpacked), WINDOW back
//!  file_end{stream} ───────────────────────────────▶  fsync, rename over the target, fsync dir
//!  ◀── file_done{stream, bytes, error: null | {code, message}}   (the stream's last message)
//!  file_abort{stream} (drop) ──────────────────────▶  temp removed ─▶ file_done{error: aborted}
//!
//!  file_read{stream,path,tar,window} ──────────────▶  open (tar: walk the directory)
//!  ◀── file_read_started{size} ◀── STDOUT(stream) bytes (≤ window, then as granted)
//!  ◀── file_done{stream, bytes, error}                after the last STDOUT frame
//! ```
//!
//! Invariants (checked when a message is parsed, so a bad value fails the whole message):
//! - A [`GuestPath`] is absolute, at most [`MAX_PATH_BYTES`] bytes and has no NUL byte.
//! - A [`FileEntry`] name is 1..=[`MAX_NAME_BYTES`] bytes, not `.` or `..`, without NUL or
//!   `/`; a [`FileList`] has at most [`MAX_LIST_ENTRIES`] entries.
//! - A symlink target in a [`FileStat`] is at most [`MAX_PATH_BYTES`] bytes without NUL.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Feature string in [`crate::AgentInfo::features`] of an agent that serves `file_write`,
/// `file_read`, `file_stat`, `file_list`, `file_mkdir`, `file_remove` and `file_rename`.
pub const FEATURE_FILES_V1: &str = "files-v1";

/// Longest path, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// Longest directory entry name, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;

/// Most entries in one `file_list` answer. With names of ≤ 255 bytes (≤ 1530 once JSON
/// escaped) and fixed-size metadata, a full answer stays far below the 1 MiB CONTROL cap.
pub const MAX_LIST_ENTRIES: usize = 256;

/// Why a path or name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not starting with `/`.
    #[error("path is not absolute")]
    NotAbsolute,
    /// Longer than the limit.
    #[error("path is {len} bytes long, more than {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Contains a NUL byte.
    #[error("path contains a nul byte")]
    Nul,
    /// A directory entry name that is empty, `.`, `..`, too long or contains `/` or NUL.
    #[error("invalid directory entry name")]
    BadName,
}

/// An absolute path in the guest: starts with `/`, at most [`MAX_PATH_BYTES`] bytes, no NUL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GuestPath(String);

impl GuestPath {
    /// Validates `path`.
    pub fn new(path: impl Into<String>) -> Result<GuestPath, PathError> {
        let path = path.into();
        if !path.starts_with('/') {
            return Err(PathError::NotAbsolute);
        }
        if path.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong {
                len: path.len(),
                max: MAX_PATH_BYTES,
            });
        }
        if path.contains('\0') {
            return Err(PathError::Nul);
        }
        Ok(GuestPath(path))
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for GuestPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<GuestPath, PathError> {
        GuestPath::new(s)
    }
}

impl From<GuestPath> for String {
    fn from(p: GuestPath) -> String {
        p.0
    }
}

impl fmt::Display for GuestPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks one directory entry name (a single path component).
pub fn check_entry_name(name: &str) -> Result<(), PathError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > MAX_NAME_BYTES
        || name.contains('/')
        || name.contains('\0')
    {
        return Err(PathError::BadName);
    }
    Ok(())
}

/// A symlink target: at most [`MAX_PATH_BYTES`] bytes, no NUL (may be relative).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LinkTarget(String);

impl LinkTarget {
    /// Validates `target`.
    pub fn new(target: impl Into<String>) -> Result<LinkTarget, PathError> {
        let target = target.into();
        if target.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong {
                len: target.len(),
                max: MAX_PATH_BYTES,
            });
        }
        if target.contains('\0') {
            return Err(PathError::Nul);
        }
        Ok(LinkTarget(target))
    }

    /// The target as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for LinkTarget {
    type Error = PathError;
    fn try_from(s: String) -> Result<LinkTarget, PathError> {
        LinkTarget::new(s)
    }
}

impl From<LinkTarget> for String {
    fn from(t: LinkTarget) -> String {
        t.0
    }
}

/// A directory entry name, validated with [`check_entry_name`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EntryName(String);

impl EntryName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<EntryName, PathError> {
        let name = name.into();
        check_entry_name(&name)?;
        Ok(EntryName(name))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EntryName {
    type Error = PathError;
    fn try_from(s: String) -> Result<EntryName, PathError> {
        EntryName::new(s)
    }
}

impl From<EntryName> for String {
    fn from(n: EntryName) -> String {
        n.0
    }
}

/// What kind of file a path names (symlinks are not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, fifo, socket).
    Other,
    /// A kind this build does not know.
    #[serde(other)]
    Unknown,
}

/// Metadata of one path (`lstat`: a symlink is described, not followed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// What it is.
    pub kind: FileKind,
    /// Size in bytes (a claim of the guest: never used to size a buffer).
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Last modification, nanoseconds since the Unix epoch (negative before 1970).
    pub mtime_unix_ns: i64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Where a symlink points (only for [`FileKind::Symlink`], only from `file_stat`).
    #[serde(default)]
    pub symlink_target: Option<LinkTarget>,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its name in the directory.
    pub name: EntryName,
    /// Its metadata (without symlink target).
    pub stat: FileStat,
}

/// One page of a directory listing, in byte order of the names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawFileList", into = "RawFileList")]
pub struct FileList {
    entries: Vec<FileEntry>,
    /// Set when more entries follow: pass it as `after` to get the next page.
    next_after: Option<EntryName>,
}

/// The wire shape of [`FileList`], before its entry count is checked.
#[derive(Serialize, Deserialize)]
struct RawFileList {
    entries: Vec<FileEntry>,
    #[serde(default)]
    next_after: Option<EntryName>,
}

/// Why a [`FileList`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a file list has {count} entries, more than {max}")]
pub struct TooManyEntries {
    /// How many it had.
    pub count: usize,
    /// The limit.
    pub max: usize,
}

impl FileList {
    /// A page of at most [`MAX_LIST_ENTRIES`] entries.
    pub fn new(
        entries: Vec<FileEntry>,
        next_after: Option<EntryName>,
    ) -> Result<FileList, TooManyEntries> {
        if entries.len() > MAX_LIST_ENTRIES {
            return Err(TooManyEntries {
                count: entries.len(),
                max: MAX_LIST_ENTRIES,
            });
        }
        Ok(FileList {
            entries,
            next_after,
        })
    }

    /// The entries of this page.
    pub fn entries(&self) -> &[FileEntry] {
        &self.entries
    }

    /// The name to pass as `after` for the next page; `None` on the last page.
    pub fn next_after(&self) -> Option<&EntryName> {
        self.next_after.as_ref()
    }

    /// The entries and the continuation, by value.
    pub fn into_parts(self) -> (Vec<FileEntry>, Option<EntryName>) {
        (self.entries, self.next_after)
    }
}

impl TryFrom<RawFileList> for FileList {
    type Error = TooManyEntries;
    fn try_from(raw: RawFileList) -> Result<FileList, TooManyEntries> {
        FileList::new(raw.entries, raw.next_after)
    }
}

impl From<FileList> for RawFileList {
    fn from(l: FileList) -> RawFileList {
        RawFileList {
            entries: l.entries,
            next_after: l.next_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_path_hostile_values_are_refused() {
        assert_eq!(GuestPath::new("rel/x"), Err(PathError::NotAbsolute));
        assert_eq!(GuestPath::new(""), Err(PathError::NotAbsolute));
        assert_eq!(GuestPath::new("/a\0b"), Err(PathError::Nul));
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert!(matches!(
            GuestPath::new(long),
            Err(PathError::TooLong { .. })
        ));
        let max = format!("/{}", "a".repeat(MAX_PATH_BYTES - 1));
        assert!(GuestPath::new(max).is_ok());
        assert!(serde_json::from_str::<GuestPath>(r#""relative""#).is_err());
    }

    #[test]
    fn entry_name_hostile_values_are_refused() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(EntryName::new(bad).is_err(), "{bad:?}");
        }
        assert!(EntryName::new("a".repeat(MAX_NAME_BYTES + 1)).is_err());
        assert!(EntryName::new("a".repeat(MAX_NAME_BYTES)).is_ok());
        assert!(EntryName::new("...").is_ok());
    }

    #[test]
    fn file_list_too_many_entries_fails_to_parse() {
        let entry = r#"{"name":"a","stat":{"kind":"file","size":0,"mode":420,"mtime_unix_ns":0,"uid":0,"gid":0}}"#;
        let json = |n: usize| {
            format!(
                r#"{{"entries":[{}],"next_after":null}}"#,
                vec![entry; n].join(",")
            )
        };
        assert!(serde_json::from_str::<FileList>(&json(MAX_LIST_ENTRIES)).is_ok());
        assert!(serde_json::from_str::<FileList>(&json(MAX_LIST_ENTRIES + 1)).is_err());
    }
}
