//! The few paths under `$KILN_HOME` a client needs: the daemon's socket, its log, the API
//! token, and (for local benchmarks only) a sandbox's runtime directory.
//!
//! The defaults are the engine's (`kiln_core::paths::Home`): `$KILN_HOME` if set, else
//! `/var/lib/kiln` for root and `$XDG_DATA_HOME/kiln` or `~/.local/share/kiln` otherwise. A
//! test in `kilnd` (which links both crates) fails if the two disagree. Nothing here creates
//! or deletes anything except [`ClientHome::ensure`].

use std::path::{Path, PathBuf};

use kiln_api_types::SandboxId;

/// A client's view of a kiln state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHome {
    root: PathBuf,
}

impl ClientHome {
    /// The state directory kiln uses by default (see the module docs).
    pub fn from_env() -> ClientHome {
        if let Some(dir) = std::env::var_os("KILN_HOME").filter(|v| !v.is_empty()) {
            return ClientHome::new(PathBuf::from(dir));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        #[allow(unsafe_code)]
        let euid = unsafe { libc::geteuid() };
        if euid == 0 {
            return ClientHome::new(PathBuf::from("/var/lib/kiln"));
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."));
        ClientHome::new(base.join("kiln"))
    }

    /// The state directory at `root`.
    pub fn new(root: PathBuf) -> ClientHome {
        ClientHome { root }
    }

    /// Creates the state directory (mode 0700) if missing.
    pub fn ensure(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The daemon's API socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("kilnd.sock")
    }

    /// The daemon's log when a client started it.
    pub fn daemon_log(&self) -> PathBuf {
        self.root.join("kilnd.log")
    }

    /// The bearer token of the TCP listener (mode 0600).
    pub fn token(&self) -> PathBuf {
        self.root.join("token")
    }

    /// The config file (`docs/config.md`).
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    /// Runtime directory of one sandbox; only for local diagnostics such as `kiln bench`
    /// reading QEMU's pid file, never for talking to the daemon.
    pub fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.root.join("run").join(id.as_str())
    }
}
