//! Startup janitor: tells the sandboxes a previous daemon left running (to be re-attached)
//! from what is really dead, and reclaims the dead.
//!
//! QEMU outlives its daemon. So at start, before serving anything, the janitor keeps every
//! `running` or `paused` sandbox whose QEMU still runs (pidfile identity: pid *and* start
//! time) and whose VM config is on record: those are handed back for re-attaching. Everything
//! else is reclaimed: a QEMU without such a row (a capture or conversion VM, a sandbox caught
//! while `creating` or `stopping`) is killed, its runtime directory removed, and rows whose
//! VM is gone are marked `failed`. It never kills a process it cannot prove is the one a
//! daemon started (pids recycle).

use std::path::Path;

use kiln_api_types::{JanitorReport, SandboxInfo, SandboxState};
use kiln_store::Store;
use tracing::{info, warn};

use crate::error::CoreError;
use crate::paths::Home;

/// Why a sandbox found at startup was failed.
pub const ORPHAN_REASON: &str =
    "its VM was gone (or half-started) when the daemon restarted; reclaimed at the next start";

/// Why a sandbox whose start or stop a daemon restart cut short is stopped (its last
/// complete save is kept).
pub const INTERRUPTED_REASON: &str =
    "a daemon restart interrupted its start or stop; its last save is kept";

/// Whether `dir` holds a complete save (a published `gen-N` snapshot).
fn has_save(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("gen-"))
                && e.path().join(kiln_snapshot::MANIFEST_FILE).is_file()
        })
}

/// What the janitor found.
pub struct Reclaimed {
    /// What was reclaimed.
    pub report: JanitorReport,
    /// Sandboxes whose VM still runs, to be re-attached.
    pub live: Vec<SandboxInfo>,
}

/// Whether the VM of `row` still runs and can be adopted.
fn adoptable(home: &Home, row: &SandboxInfo) -> bool {
    if !matches!(
        row.status.state,
        SandboxState::Running | SandboxState::Paused | SandboxState::Unresponsive
    ) {
        return false;
    }
    let run = home.sandbox_dir(&row.id);
    if !run.join("vm.json").is_file() {
        return false;
    }
    matches!(
        kiln_vmm::procid::ProcessIdentity::read(&run.join("qemu.pid")),
        Ok(Some(ident)) if ident.is_same_process_alive()
    )
}

/// Reclaims orphans and returns the live sandboxes. Runs before the daemon serves requests,
/// so nothing here races a sandbox of this daemon.
pub fn reclaim(home: &Home, store: &Store) -> Result<Reclaimed, CoreError> {
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
    // Image build directories of a dead daemon (a build killed with it; its build guest's
    // QEMU is found below `run/` like any other).
    kiln_image::clean_stale_tmp(&home.images_dir());
    let rows = store.sandbox_list()?;
    // Review recordings of sandboxes that are gone, once their pin has ended.
    let ids: std::collections::HashSet<String> =
        rows.iter().map(|r| r.id.as_str().to_owned()).collect();
    match crate::desktop::retention::reclaim(
        &home.recordings_dir(),
        &ids,
        std::time::SystemTime::now(),
    ) {
        Ok(r) if !r.removed.is_empty() => {
            tracing::info!(
                count = r.removed.len(),
                "removed review recordings of gone sandboxes"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not sweep review recordings"),
    }
    let live: Vec<SandboxInfo> = rows
        .iter()
        .filter(|r| adoptable(home, r))
        .cloned()
        .collect();
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
    let mut killed = Vec::new();
    for entry in entries.into_iter().flatten() {
        let dir = entry.path();
        if live
            .iter()
            .any(|r| entry.file_name().to_str() == Some(r.id.as_str()))
        {
            continue;
        }
        let pidfile = dir.join("qemu.pid");
        match kiln_vmm::procid::ProcessIdentity::read(&pidfile) {
            Ok(Some(ident)) => {
                if ident.kill_if_same() {
                    info!(pid = ident.pid, dir = %dir.display(), "killed orphaned QEMU");
                    report.processes_killed += 1;
                    killed.push(ident);
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
    // A QEMU whose daemon died after spawning it but before writing its pidfile has no
    // pidfile to be found by: its command line names its run directory.
    for (ident, dir) in kiln_vmm::procid::qemus_below(&run) {
        let adopted = live
            .iter()
            .any(|r| dir.file_name().and_then(|n| n.to_str()) == Some(r.id.as_str()));
        if !adopted && !killed.contains(&ident) && ident.kill_if_same() {
            info!(pid = ident.pid, dir = %dir.display(), "killed orphaned QEMU without a pidfile");
            report.processes_killed += 1;
        }
    }
    for row in &rows {
        let orphan = matches!(
            row.status.state,
            SandboxState::Creating
                | SandboxState::Running
                | SandboxState::Paused
                | SandboxState::Unresponsive
                | SandboxState::Stopping
        ) && !live.iter().any(|l| l.id == row.id);
        if !orphan {
            continue;
        }
        // A start or stop cut short with a complete save to fall back on: still stopped.
        let saved = matches!(
            row.status.state,
            SandboxState::Creating | SandboxState::Stopping
        ) && has_save(&home.saved_dir(&row.id));
        if saved {
            store.sandbox_set_state(
                &row.id,
                SandboxState::Stopped,
                None,
                Some(INTERRUPTED_REASON),
            )?;
        } else {
            store.sandbox_set_state(&row.id, SandboxState::Failed, None, Some(ORPHAN_REASON))?;
            report.sandboxes_failed += 1;
        }
    }
    // Saves whose sandbox is gone (a removal cut short).
    for entry in std::fs::read_dir(home.root().join("saved"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let known = rows
            .iter()
            .any(|r| entry.file_name().to_str() == Some(r.id.as_str()));
        if !known {
            let dir = entry.path();
            report.bytes_freed += allocated_bytes(&dir);
            // Saves are published snapshots: their files are sealed (remove_tree unseals).
            if kiln_snapshot::remove_tree(&dir).is_ok() {
                report.dirs_removed += 1;
            }
        }
    }
    // Network state of sandboxes that are gone or failed: leases, taps, rule elements.
    let keep: std::collections::HashSet<_> = store
        .sandbox_list()?
        .into_iter()
        .filter(|r| crate::network::bridge::keeps_network(r.status.state))
        .map(|r| r.id)
        .collect();
    match crate::network::bridge::reclaim(store, &keep) {
        Ok((leases, taps)) => {
            report.leases_released = leases as u32;
            report.taps_removed = taps as u32;
            if leases + taps > 0 {
                info!(leases, taps, "released the network state of gone sandboxes");
            }
        }
        Err(e) => warn!(error = %e.chain(), "network state of gone sandboxes not reclaimed"),
    }
    Ok(Reclaimed { report, live })
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
            store.sandbox_insert(&row(id, state)).unwrap();
        }
        let dir = home.sandbox_dir(&live);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("console.log"), vec![b'x'; 10_000]).unwrap();
        // An image build directory of a dead builder (no process has this pid).
        let dead_build = home.images_dir().join(format!(".tmp-app-{}", u32::MAX - 7));
        std::fs::create_dir_all(dead_build.join("scratch")).unwrap();
        // One of a live builder (this process).
        let live_build = home
            .images_dir()
            .join(format!(".tmp-app-{}", std::process::id()));
        std::fs::create_dir_all(&live_build).unwrap();

        let Reclaimed {
            report,
            live: adopt,
        } = reclaim(&home, &store).unwrap();
        assert!(
            adopt.is_empty(),
            "a running row without a live QEMU is not adoptable"
        );
        assert_eq!(report.dirs_removed, 1);
        assert!(report.bytes_freed >= 10_000, "freed {}", report.bytes_freed);
        assert!(!dead_build.exists(), "a dead build's directory was kept");
        assert!(live_build.exists(), "a live build's directory was removed");
        assert_eq!(report.sandboxes_failed, 1);
        assert_eq!(report.processes_killed, 0);
        assert!(!dir.exists());
        let row = store.sandbox_get(&live).unwrap().unwrap();
        assert_eq!(row.status.state, SandboxState::Failed);
        assert_eq!(row.status.error.as_deref(), Some(ORPHAN_REASON));
        // A second run finds nothing more.
        assert_eq!(
            reclaim(&home, &store).unwrap().report,
            JanitorReport::default()
        );
    }

    fn row(id: &SandboxId, state: SandboxState) -> SandboxRow {
        SandboxRow {
            id: id.clone(),
            spec: kiln_api_types::SandboxSpec::default(),
            status: kiln_api_types::SandboxStatus {
                network: None,
                state,
                image: "base".parse().unwrap(),
                image_id: "x".into(),
                cpus: 1,
                memory_mib: 256,
                accel: "tcg".into(),
                created_unix: 1,
                boot_ms: None,
                error: None,
                warnings: Vec::new(),
                source: kiln_api_types::StartSource::Cold,
                snapshot: None,
                expires_unix: None,
            },
        }
    }

    /// A live process standing in for a QEMU, recorded in `dir` like one.
    fn fake_qemu(dir: &Path, with_config: bool) -> std::process::Child {
        std::fs::create_dir_all(dir).unwrap();
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        kiln_vmm::procid::ProcessIdentity::of_pid(child.id())
            .unwrap()
            .write(&dir.join("qemu.pid"))
            .unwrap();
        if with_config {
            std::fs::write(dir.join("vm.json"), "{}").unwrap();
        }
        child
    }

    #[test]
    fn reclaim_keeps_live_vms_and_kills_the_rest() {
        use std::os::unix::process::ExitStatusExt;
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path().to_owned());
        home.ensure().unwrap();
        let store = Store::open_in_memory().unwrap();
        // A running sandbox whose QEMU lives: kept, directory and process untouched.
        let running = SandboxId::random();
        store
            .sandbox_insert(&row(&running, SandboxState::Running))
            .unwrap();
        let mut kept = fake_qemu(&home.sandbox_dir(&running), true);
        // A sandbox caught while creating: its QEMU is killed, its row failed.
        let creating = SandboxId::random();
        store
            .sandbox_insert(&row(&creating, SandboxState::Creating))
            .unwrap();
        let mut half = fake_qemu(&home.sandbox_dir(&creating), true);
        // A capture VM's directory (no row): killed and removed.
        let mut capture = fake_qemu(&home.run_dir().join("capture-sb-1"), false);

        let Reclaimed { report, live } = reclaim(&home, &store).unwrap();
        assert_eq!(
            live.iter().map(|r| &r.id).collect::<Vec<_>>(),
            vec![&running]
        );
        assert_eq!(report.processes_killed, 2);
        assert_eq!(report.dirs_removed, 2);
        assert_eq!(report.sandboxes_failed, 1);
        assert!(home.sandbox_dir(&running).is_dir());
        assert!(!home.sandbox_dir(&creating).exists());
        assert!(!home.run_dir().join("capture-sb-1").exists());
        assert_eq!(half.wait().unwrap().signal(), Some(9));
        assert_eq!(capture.wait().unwrap().signal(), Some(9));
        assert!(
            kept.try_wait().unwrap().is_none(),
            "the live VM was touched"
        );
        let st = store.sandbox_get(&creating).unwrap().unwrap().status;
        assert_eq!(st.state, SandboxState::Failed);
        assert_eq!(
            store.sandbox_get(&running).unwrap().unwrap().status.state,
            SandboxState::Running
        );
        kept.kill().unwrap();
        kept.wait().unwrap();
    }
}
