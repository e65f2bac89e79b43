//! The API token file `$KILN_HOME/token`: 32 random bytes as 64 hex digits, mode 0600.
//!
//! Shared by `kiln token` (prints or rotates it) and `kilnd` (checks TCP requests against it;
//! it reads the file on each check, so a rotation takes effect without a restart). Invariants:
//! the file is never world- or group-readable, and a rotation replaces it atomically (write a
//! 0600 temporary file, then rename), so a reader sees the old or the new token, never half.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Errors reading or writing the token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read, created or replaced.
    #[error("failed to {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but holds no token.
    #[error("{path} is empty: run `kiln token --rotate` to write a new token")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TokenError {
    let path = path.to_owned();
    move |source| TokenError::Io { what, path, source }
}

/// A new random token.
pub fn generate() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The token in `path`, if the file exists.
pub fn read(path: &Path) -> Result<Option<String>, TokenError> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let t = s.trim();
            if t.is_empty() {
                Err(TokenError::Empty {
                    path: path.to_owned(),
                })
            } else {
                Ok(Some(t.to_owned()))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

/// The token in `path`, created first if the file does not exist.
pub fn read_or_create(path: &Path) -> Result<String, TokenError> {
    if let Some(t) = read(path)? {
        return Ok(t);
    }
    let token = generate();
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut f) => {
            f.write_all(format!("{token}\n").as_bytes())
                .map_err(io("write", path))?;
            Ok(token)
        }
        // Someone else created it between our read and our create: theirs wins.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read(path)?.ok_or_else(|| TokenError::Empty {
                path: path.to_owned(),
            })
        }
        Err(e) => Err(io("create", path)(e)),
    }
}

/// Replaces the token in `path` with a new random one and returns it.
pub fn rotate(path: &Path) -> Result<String, TokenError> {
    let token = generate();
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("replace", path))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn read_or_create_new_file_is_0600_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        assert_eq!(read(&path).unwrap(), None);
        let t = read_or_create(&path).unwrap();
        assert_eq!(t.len(), 64);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_or_create(&path).unwrap(), t);
    }

    #[test]
    fn rotate_replaces_token_and_keeps_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let old = read_or_create(&path).unwrap();
        let new = rotate(&path).unwrap();
        assert_ne!(old, new);
        assert_eq!(read(&path).unwrap(), Some(new));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn read_empty_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(read(&path), Err(TokenError::Empty { .. })));
    }
}
