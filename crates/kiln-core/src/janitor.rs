//! Startup janitor: finds and reclaims what a daemon that died left behind.
//!
//! A daemon killed with SIGKILL leaves QEMU processes (unless PDEATHSIG already took them),
//! runtime directories and store rows in `booting`/`running`. The next daemon, before it serves
//! anything, kills each orphaned QEMU whose identity (pid *and* start time, from the pidfile in
//! its runtime directory) still matches, removes every runtime directory, and marks the rows
//! `failed`. It never kills a process it cannot prove is the one it started (pids recycle).

use std::path::Path;

use kiln_api_types::{JanitorReport, SandboxState};
use kiln_store::Store;
use tracing::{info, warn};

use crate::error::CoreError;
use crate::paths::Home;

/// Why a sandbox found at startup was failed.
pub const ORPHAN_REASON: &str = "its daemon stopped; the sandbox was reclaimed at the next start";

/// Reclaims orphans. Runs before the daemon serves requests, so nothing here races a live
/// sandbox of this daemon.
pub fn reclaim(home: &Home, store: &Store) -> Result<JanitorReport, CoreError> {
    let mut report = JanitorReport::default();
    // Snapshot build directories of a dead daemon (crashed captures, interrupted removals).
    match kiln_snapshot::cleanup_stale_tmp(&home.root().join("snapshots")) {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(
                count = removed.len(),
                "removed stale snapshot build directories"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not clean snapshot build directories"),
    }
    let run = home.run_dir();
    let entries = match std::fs::read_dir(&run) {
        Ok(e) => e.collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(CoreError::Io {
                what: "read",
                path: run,
                source,
            });
        }
    };
    for entry in entries.into_iter().flatten() {
        let dir = entry.path();
        let pidfile = dir.join("qemu.pid");
        match kiln_vmm::procid::ProcessIdentity::read(&pidfile) {
            Ok(Some(ident)) => {
                if ident.kill_if_same() {
                    info!(pid = ident.pid, dir = %dir.display(), "killed orphaned QEMU");
                    report.processes_killed += 1;
                }
            }
            Ok(None) => {}
            Err(e) => warn!(path = %pidfile.display(), error = %e, "unreadable pidfile"),
        }
        let bytes = allocated_bytes(&dir);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                report.dirs_removed += 1;
                report.bytes_freed += bytes;
            }
            Err(e) => {
                warn!(path = %dir.display(), error = %e, "could not remove orphaned runtime directory")
            }
        }
    }
    for row in store.sandbox_list()? {
        if matches!(
            row.status.state,
            SandboxState::Creating
                | SandboxState::Running
                | SandboxState::Paused
                | SandboxState::Stopping
        ) {
            store.sandbox_set_state(&row.id, SandboxState::Failed, None, Some(ORPHAN_REASON))?;
            report.sandboxes_failed += 1;
        }
    }
    Ok(report)
}

/// Bytes allocated on disk below `path` (sparse files count what they use).
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let children = std::fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| allocated_bytes(&e.path())).sum())
        .unwrap_or(0);
    own + children
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api_types::SandboxId;
    use kiln_store::SandboxRow;

    #[test]
    fn reclaim_removes_dirs_and_fails_live_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path().to_owned());
        home.ensure().unwrap();
        let store = Store::open_in_memory().unwrap();
        let live = SandboxId::random();
        let dead = SandboxId::random();
        for (id, state) in [
            (&live, SandboxState::Running),
            (&dead, SandboxState::Failed),
        ] {
            store
                .sandbox_insert(&SandboxRow {
                    id: id.clone(),
                    spec: kiln_api_types::SandboxSpec::default(),
                    status: kiln_api_types::SandboxStatus {
                        state,
                        image: "base".parse().unwrap(),
                        image_id: "x".into(),
                        cpus: 1,
                        memory_mib: 256,
                        accel: "tcg".into(),
                        created_unix: 1,
                        boot_ms: None,
                        error: None,
                        source: kiln_api_types::StartSource::Cold,
                        snapshot: None,
                        expires_unix: None,
                    },
                })
                .unwrap();
        }
        let dir = home.sandbox_dir(&live);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("console.log"), vec![b'x'; 10_000]).unwrap();

        let report = reclaim(&home, &store).unwrap();
        assert_eq!(report.dirs_removed, 1);
        assert!(report.bytes_freed >= 10_000, "freed {}", report.bytes_freed);
        assert_eq!(report.sandboxes_failed, 1);
        assert_eq!(report.processes_killed, 0);
        assert!(!dir.exists());
        let row = store.sandbox_get(&live).unwrap().unwrap();
        assert_eq!(row.status.state, SandboxState::Failed);
        assert_eq!(row.status.error.as_deref(), Some(ORPHAN_REASON));
        // A second run finds nothing more.
        assert_eq!(reclaim(&home, &store).unwrap(), JanitorReport::default());
    }
}
