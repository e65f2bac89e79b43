//! Finding and characterising the QEMU binary.
//!
//! Owns: where `qemu-system-x86_64` is (`KILN_QEMU` override, else `PATH`), its version
//! (`-version`, minimum [`MIN_VERSION`]) and whether it supports the `x-ignore-shared`
//! migration capability (asked over QMP from a throwaway `-M none -qmp stdio` QEMU).
//!
//! Invariants: the capability answer is cached in memory per (binary path, version), so a
//! daemon asks once per QEMU it sees, and an upgraded binary (new version) is asked again.
//! Helper QEMUs never outlive the call (`kill_on_drop`, bounded by a deadline).

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use kiln_qmp::QmpClient;
use kiln_qmp::commands::{QueryMigrateCapabilities, Quit, X_IGNORE_SHARED};
use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tracing::debug;

use crate::error::VmmError;

/// The QEMU system emulator kiln drives.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Environment variable naming the QEMU binary to use instead of the one in `PATH`.
pub const QEMU_ENV: &str = "KILN_QEMU";

/// Oldest supported QEMU (Debian 12's): `memory-backend-file` + `x-ignore-shared` snapshots
/// are verified on it.
pub const MIN_VERSION: QemuVersion = QemuVersion {
    major: 7,
    minor: 2,
    micro: 0,
};

/// How long a helper QEMU (`-version`, capability query) may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// A QEMU version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl QemuVersion {
    /// Parses `-version` output, e.g. `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)`.
    pub fn parse_version_output(output: &str) -> Option<QemuVersion> {
        let line = output.lines().next()?;
        let rest = &line[line.find("version ")? + "version ".len()..];
        let number: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = number
            .split('.')
            .filter(|p| !p.is_empty())
            .map(str::parse::<u32>);
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let micro = match parts.next() {
            Some(p) => p.ok()?,
            None => 0,
        };
        Some(QemuVersion {
            major,
            minor,
            micro,
        })
    }
}

/// What kiln knows about a QEMU binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuInfo {
    /// The binary.
    pub path: PathBuf,
    /// Its version.
    pub version: QemuVersion,
    /// The first line of `-version` (includes the distribution's package version).
    pub version_line: String,
    /// True when the `x-ignore-shared` migration capability exists (fast snapshots).
    pub x_ignore_shared: bool,
}

/// Capability answers per (binary, version).
static CAPABILITY_CACHE: LazyLock<Mutex<HashMap<(PathBuf, QemuVersion), bool>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Locates the QEMU binary: `$KILN_QEMU` if set (it must be an executable file), else
/// `qemu-system-x86_64` in `PATH`.
pub fn find_binary() -> Result<PathBuf, VmmError> {
    find_binary_in(std::env::var_os(QEMU_ENV), std::env::var_os("PATH"))
}

fn find_binary_in(
    override_path: Option<OsString>,
    path_var: Option<OsString>,
) -> Result<PathBuf, VmmError> {
    if let Some(p) = override_path.filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        // A bare name in KILN_QEMU is looked up in PATH like a shell would.
        let resolved = if p.components().count() == 1 {
            search_path(&p, path_var.as_ref())
        } else {
            Some(p.clone())
        };
        return match resolved {
            Some(r) if is_executable(&r) => Ok(r),
            _ => Err(VmmError::QemuOverrideInvalid { path: p }),
        };
    }
    search_path(Path::new(QEMU_BINARY), path_var.as_ref()).ok_or(VmmError::QemuNotFound {
        binary: QEMU_BINARY,
    })
}

/// Finds an executable named `name` in a `PATH`-style list.
pub(crate) fn search_path(name: &Path, path_var: Option<&OsString>) -> Option<PathBuf> {
    let path_var = path_var?;
    std::env::split_paths(path_var)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds QEMU and characterises it (see [`inspect`]).
pub async fn detect() -> Result<QemuInfo, VmmError> {
    let path = find_binary()?;
    inspect(&path).await
}

/// Reads the version of the QEMU at `path`, refuses versions older than [`MIN_VERSION`], and
/// finds out (cached per path and version) whether it has `x-ignore-shared`.
pub async fn inspect(path: &Path) -> Result<QemuInfo, VmmError> {
    let (version, version_line) = read_version(path).await?;
    if version < MIN_VERSION {
        return Err(VmmError::QemuTooOld {
            path: path.to_owned(),
            found: version,
            min: MIN_VERSION,
        });
    }
    let key = (path.to_owned(), version);
    let cached = CAPABILITY_CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .copied();
    let x_ignore_shared = match cached {
        Some(v) => v,
        None => {
            let caps = query_migrate_capabilities(path).await?;
            let v = caps.iter().any(|c| c == X_IGNORE_SHARED);
            debug!(qemu = %path.display(), %version, x_ignore_shared = v, "queried QEMU capabilities");
            CAPABILITY_CACHE
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, v);
            v
        }
    };
    Ok(QemuInfo {
        path: path.to_owned(),
        version,
        version_line,
        x_ignore_shared,
    })
}

async fn read_version(path: &Path) -> Result<(QemuVersion, String), VmmError> {
    let mut cmd = Command::new(path);
    cmd.arg("-version").stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(HELPER_TIMEOUT, cmd.output())
        .await
        .map_err(|_| VmmError::Timeout {
            what: "qemu -version",
            timeout_ms: HELPER_TIMEOUT.as_millis() as u64,
        })?
        .map_err(|source| VmmError::Run {
            program: path.to_owned(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default().trim().to_owned();
    match QemuVersion::parse_version_output(&text) {
        Some(v) => Ok((v, first)),
        None => Err(VmmError::QemuVersionUnparsable {
            path: path.to_owned(),
            output: first,
        }),
    }
}

/// Lists the migration capabilities of the QEMU at `path` by starting it with no machine and
/// QMP on stdio. The helper is killed if it has not quit by the deadline.
pub async fn query_migrate_capabilities(path: &Path) -> Result<Vec<String>, VmmError> {
    let mut child = Command::new(path)
        .args([
            "-M",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| VmmError::Run {
            program: path.to_owned(),
            source,
        })?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(VmmError::Run {
            program: path.to_owned(),
            source: std::io::Error::other("no stdio pipes"),
        });
    };
    let query = async {
        let qmp = QmpClient::handshake_parts(stdout, stdin).await?;
        let caps = qmp.execute(&QueryMigrateCapabilities).await?;
        // QEMU may close stdout before or after answering `quit`: either is fine.
        let _ = qmp.execute(&Quit).await;
        Ok::<_, kiln_qmp::QmpError>(caps)
    };
    let caps = match tokio::time::timeout(HELPER_TIMEOUT, query).await {
        Ok(Ok(caps)) => caps,
        Ok(Err(source)) => {
            return Err(VmmError::CapabilityProbe {
                path: path.to_owned(),
                source,
            });
        }
        Err(_) => {
            return Err(VmmError::Timeout {
                what: "the migration capability query",
                timeout_ms: HELPER_TIMEOUT.as_millis() as u64,
            });
        }
    };
    // Reap it; if it lingers, kill_on_drop ends it when `child` drops.
    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
    Ok(caps.into_iter().map(|c| c.capability).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_version_output_debian_7_2() {
        let v = QemuVersion::parse_version_output(
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022",
        );
        assert_eq!(
            v,
            Some(QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            })
        );
    }

    #[test]
    fn parse_version_output_two_components_and_garbage() {
        assert_eq!(
            QemuVersion::parse_version_output("QEMU emulator version 9.1 (v9.1)"),
            Some(QemuVersion {
                major: 9,
                minor: 1,
                micro: 0
            })
        );
        assert_eq!(QemuVersion::parse_version_output("hello"), None);
        assert_eq!(QemuVersion::parse_version_output(""), None);
    }

    #[test]
    fn min_version_older_is_less() {
        let old = QemuVersion {
            major: 7,
            minor: 1,
            micro: 99,
        };
        assert!(old < MIN_VERSION);
        assert!(
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 0
            } >= MIN_VERSION
        );
        assert!(
            QemuVersion {
                major: 10,
                minor: 0,
                micro: 0
            } > MIN_VERSION
        );
    }

    #[test]
    fn find_binary_in_override_missing_is_an_error() {
        let e = find_binary_in(Some("/nonexistent/qemu".into()), Some("/usr/bin".into()))
            .expect_err("missing");
        assert!(matches!(e, VmmError::QemuOverrideInvalid { .. }), "{e:?}");
    }

    #[test]
    fn find_binary_in_searches_path_and_skips_non_executables() {
        use std::os::unix::fs::PermissionsExt;
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let plain = a.path().join(QEMU_BINARY);
        std::fs::write(&plain, "").expect("write");
        let exe = b.path().join(QEMU_BINARY);
        std::fs::write(&exe, "").expect("write");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = std::env::join_paths([a.path(), b.path()]).expect("join");
        assert_eq!(
            find_binary_in(None, Some(path.clone())).expect("found"),
            exe
        );
        assert!(matches!(
            find_binary_in(None, Some(a.path().into())),
            Err(VmmError::QemuNotFound { .. })
        ));
        // A bare override name is looked up in PATH.
        assert_eq!(
            find_binary_in(Some(QEMU_BINARY.into()), Some(path)).expect("found"),
            exe
        );
    }
}
