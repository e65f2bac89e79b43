//! Where kiln keeps its state: the `$KILN_HOME` layout.
//!
//! Every path kiln touches on disk is derived here, so the layout is written down once
//! (see `docs/architecture.md`). Nothing in this module creates or deletes anything except
//! [`Home::ensure`], which creates the top-level directories.

use std::path::{Path, PathBuf};

use kiln_api_types::SandboxId;

/// The state directory and the paths inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `$KILN_HOME` if set, else `/var/lib/kiln` for root and `~/.local/share/kiln` otherwise.
    pub fn from_env() -> Home {
        if let Some(dir) = std::env::var_os("KILN_HOME").filter(|v| !v.is_empty()) {
            return Home::new(PathBuf::from(dir));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        #[allow(unsafe_code)]
        let euid = unsafe { libc::geteuid() };
        if euid == 0 {
            return Home::new(PathBuf::from("/var/lib/kiln"));
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."));
        Home::new(base.join("kiln"))
    }

    /// A state directory at `root`.
    pub fn new(root: PathBuf) -> Home {
        Home { root }
    }

    /// Creates the top-level directories. The root and the directories that hold guest RAM,
    /// disk layers and consoles (`run`, `snapshots`, `saved`, `logs`) get mode 0700, and any
    /// of them that exists with looser permissions is tightened to 0700: kiln's files are the
    /// owner's alone whatever the home was like before.
    pub fn ensure(&self) -> std::io::Result<()> {
        for dir in [
            self.root.clone(),
            self.run_dir(),
            self.root.join("snapshots"),
            self.root.join("saved"),
            self.root.join("logs"),
        ] {
            private_dir(&dir)?;
        }
        for dir in [self.images_dir(), self.root.join("cache")] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The daemon's API socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("kilnd.sock")
    }

    /// The daemon's single-instance lock.
    pub fn daemon_lock(&self) -> PathBuf {
        self.root.join("kilnd.lock")
    }

    /// The daemon's log when started by the CLI.
    pub fn daemon_log(&self) -> PathBuf {
        self.root.join("kilnd.log")
    }

    /// The SQLite database.
    pub fn database(&self) -> PathBuf {
        self.root.join("kiln.db")
    }

    /// The cached accelerator verdict.
    pub fn accel_cache(&self) -> PathBuf {
        self.root.join("accel.json")
    }

    /// Parent of all sandbox runtime directories.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Runtime directory of one sandbox.
    pub fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.run_dir().join(id.as_str())
    }

    /// Where a stopped sandbox's saved state lives (`kiln stop`): outside `run/`, so it
    /// survives daemon restarts, the janitor and host reboots.
    pub fn saved_dir(&self, id: &SandboxId) -> PathBuf {
        self.root.join("saved").join(id.as_str())
    }

    /// The guest console of a sandbox whose VM has gone (stopped or failed), kept while the
    /// sandbox exists.
    pub fn console_archive(&self, id: &SandboxId) -> PathBuf {
        self.root
            .join("logs")
            .join(format!("{}.console.log", id.as_str()))
    }

    /// Parent of all built images.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Parent of the desktop sandboxes' review recordings (`kiln_core::desktop::review`).
    pub fn recordings_dir(&self) -> PathBuf {
        self.root.join("recordings")
    }

    /// The review recording of one sandbox: kept while the sandbox exists, and after its
    /// removal while a failed action pins it.
    pub fn recording_dir(&self, id: &SandboxId) -> PathBuf {
        self.recordings_dir().join(id.as_str())
    }

    /// Where review bundles are exported: the user's, never removed by kiln.
    pub fn exports_dir(&self) -> PathBuf {
        self.root.join("exports")
    }
}

/// Creates `dir` with mode 0700, or tightens it to 0700 if it exists with a looser mode.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        tracing::warn!(path = %dir.display(), mode = format!("{:o}", mode & 0o7777), "directory was readable by others; tightened to 0700");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_tightens_a_loose_existing_root() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("home");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(root.join("run")).unwrap();
        std::fs::set_permissions(root.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
        Home::new(root.clone()).ensure().unwrap();
        for dir in ["", "run", "snapshots", "saved", "logs"] {
            let mode = std::fs::metadata(root.join(dir))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o700, "{dir:?}");
        }
    }

    #[test]
    fn sandbox_dir_is_under_run_dir() {
        let home = Home::new(PathBuf::from("/k"));
        let id: SandboxId = "sb-0123456789ab".parse().unwrap();
        assert_eq!(
            home.sandbox_dir(&id),
            PathBuf::from("/k/run/sb-0123456789ab")
        );
        assert_eq!(home.socket(), PathBuf::from("/k/kilnd.sock"));
        assert_eq!(
            home.recording_dir(&id),
            PathBuf::from("/k/recordings/sb-0123456789ab")
        );
        assert_eq!(home.exports_dir(), PathBuf::from("/k/exports"));
    }
}
