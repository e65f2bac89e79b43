//! Warm snapshots: one per (image, vCPUs, memory), captured once the guest's agent answers,
//! and restored by mapping its memory file privately instead of booting.
//!
//! ```text
//!   capture: SnapshotBuilder(tmp dir) ─ boot VM with RAM = tmp/mem (share=on), disk = tmp/disk.qcow2
//!            ─ agent handshake ─ stop + migrate device state (x-ignore-shared) to tmp/state
//!            ─ kill VM ─ publish (hash, fsync, atomic rename) ─▶ snapshots/warm-<image>-<c>c<m>m/
//!   restore: verify (fingerprint, sha256 via seals) ─ qcow2 overlay on the snapshot's disk layer
//!            ─ QEMU -incoming defer, same devices, RAM = snapshot mem (share=off, copy-on-write)
//!            ─ migrate-incoming state ─ cont ─ agent resync + fresh identity ─▶ Running
//! ```
//!
//! Invariants: a snapshot directory is visible only once complete (atomic publish) and its
//! files are sealed from then on (read-only, immutable flag: `kiln_snapshot::seal_file`;
//! only a starting QEMU's read-write open of `mem` lifts it, see [`restore`]); a snapshot
//! that fails verification is removed, so the next start captures a fresh one; any failure
//! here is reported to the caller, which cold-boots instead — never a half-working sandbox.
//! Clones never write the template: their RAM mapping is private and their disk is an overlay.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_agent_host::{
    AgentClient, ClientConfig, Entropy, GuestIdentity, Hostname, MachineId, RestoreId, UnixNanos,
};
use kiln_snapshot::{
    CaptureInfo, CaptureKind, ManifestInput, SnapshotBuilder, SnapshotName, VerifyLevel,
};
use kiln_vmm::{AfterCapture, BackingFormat, CaptureMode, Vm, create_overlay_with};

use crate::error::CoreError;
use crate::machine::MachinePlan;

/// How long a restored guest's agent may take to answer the resync.
const RESTORE_AGENT_DEADLINE: Duration = Duration::from_secs(30);
/// How long a restored guest may take to acknowledge its new identity once its agent has
/// answered the resync (generous: under TCG on a loaded host it takes milliseconds).
const IDENTITY_DEADLINE: Duration = Duration::from_secs(60);
/// Bytes of host entropy given to each restored guest.
const ENTROPY_BYTES: usize = 64;

/// The directory holding all snapshots.
pub fn snapshots_dir(home: &Path) -> PathBuf {
    home.join("snapshots")
}

/// Boots a capture VM in `run_dir`, waits for its agent, captures, and publishes the warm
/// snapshot. Returns its directory.
pub async fn capture(
    spec: &MachinePlan<'_>,
    run_dir: &Path,
    boot_deadline: Duration,
) -> Result<PathBuf, CoreError> {
    let root = snapshots_dir(spec.home);
    std::fs::create_dir_all(&root).map_err(|source| CoreError::Io {
        what: "create",
        path: root.clone(),
        source,
    })?;
    let _ = kiln_snapshot::cleanup_stale_tmp(&root);
    let name = SnapshotName::new(spec.name()).map_err(snapshot_err)?;
    let builder = SnapshotBuilder::begin(&root, name).map_err(snapshot_err)?;
    let disk = builder.file(kiln_snapshot::DISK_FILE);
    create_overlay_with(
        &spec.image.rootfs_path(spec.home),
        BackingFormat::Raw,
        &disk,
    )
    .await?;
    let cfg = match spec.mode {
        CaptureMode::IgnoreShared => {
            spec.vm_config(run_dir, disk, builder.file(kiln_snapshot::MEM_FILE), true)
        }
        CaptureMode::FullRam => {
            // RAM goes into the stream; the snapshot's `mem` stays an empty placeholder.
            let mem = builder.file(kiln_snapshot::MEM_FILE);
            std::fs::write(&mem, b"").map_err(|source| CoreError::Io {
                what: "create",
                path: mem.clone(),
                source,
            })?;
            spec.vm_config(run_dir, disk, run_dir.join("mem"), false)
        }
    };
    let vm = Vm::spawn(&cfg).await?;
    let result = async {
        let stream = tokio::net::UnixStream::connect(vm.agent_socket())
            .await
            .map_err(|source| CoreError::Io { what: "connect to", path: vm.agent_socket().to_owned(), source })?;
        let connect = AgentClient::connect(stream, boot_deadline);
        let (agent, _) = tokio::select! {
            r = connect => r.map_err(CoreError::Agent)?,
            status = vm.wait_exit() => return Err(CoreError::HostSetup(format!("capture VM exited during boot ({status})"))),
        };
        // The image's services start and pass their probe before the capture, so every
        // restore resumes them ready.
        crate::guest::prepare(&agent, &spec.image.recipe).await?;
        // Run one command before capturing, so the exec path (the agent's spawn code, the
        // guest's fork/exec, /bin/true's pages) is resident in the snapshot's memory.
        let warm_up = agent.exec(kiln_agent_host::ExecRequest::new(["true"])).await.map_err(CoreError::Agent)?;
        warm_up.collect().await.map_err(CoreError::Agent)?;
        // The agent is idle: the restored guest resumes waiting for its next host.
        drop(agent);
        let report = vm
            .capture(&builder.file(kiln_snapshot::STATE_FILE), spec.mode, AfterCapture::Paused)
            .await?;
        Ok(report)
    }
    .await;
    vm.kill().await;
    let report = result?;
    let input = ManifestInput {
        image_id: spec.image.id.to_string(),
        fingerprint: spec.fingerprint(&cfg),
        capture: CaptureInfo {
            pause_ms: report.pause.as_millis() as u64,
            mode: capture_kind(spec.mode),
        },
    };
    let (dir, _manifest) = tokio::task::spawn_blocking(move || builder.publish(input))
        .await
        .map_err(|e| CoreError::HostSetup(format!("snapshot publish task failed: {e}")))?
        .map_err(snapshot_err)?;
    Ok(dir)
}

/// Checks a snapshot against this host before use. A snapshot that fails is removed.
pub async fn verify(spec: &MachinePlan<'_>, dir: &Path) -> Result<(), CoreError> {
    // Paths do not enter the device fingerprint, so any run dir gives the same answer.
    let cfg = spec.vm_config(
        dir,
        dir.join(kiln_snapshot::DISK_FILE),
        dir.join(kiln_snapshot::MEM_FILE),
        false,
    );
    let expected = spec.fingerprint(&cfg);
    let d = dir.to_owned();
    // Every byte is checked, but a file this daemon already hashed (at publish or an earlier
    // restore) and that has not changed since (same inode, size, mtime, ctime) is not read
    // again: a few `stat` calls instead of ~200 ms per 256 MiB.
    let res = tokio::task::spawn_blocking(move || {
        kiln_snapshot::verify_with_report(&d, &expected, VerifyLevel::FullCached)
    })
    .await
    .map_err(|e| CoreError::HostSetup(format!("snapshot verify task failed: {e}")))?;
    match res {
        Ok(report) => {
            tracing::debug!(snapshot = %dir.display(), hashed = ?report.hashed, "snapshot verified");
            reseal(dir);
            Ok(())
        }
        Err(e) => {
            // Its files are sealed: remove_tree clears the flags first. Running clones keep
            // their open descriptors of the unlinked files.
            if let Err(rm) = kiln_snapshot::remove_tree(dir) {
                tracing::warn!(snapshot = %dir.display(), error = %crate::error::error_chain(&rm),
                    "could not remove an unusable warm snapshot");
            }
            Err(snapshot_err(e))
        }
    }
}

/// Seals again any file of a verified snapshot that lost its seal (a daemon killed while a
/// restore had lifted the flag of `mem`); files of restores starting now are left alone.
pub(crate) fn reseal(dir: &Path) {
    if let Err(e) = kiln_snapshot::reseal_dir(dir) {
        tracing::warn!(snapshot = %dir.display(), error = %crate::error::error_chain(&e),
            "could not seal the snapshot's files again");
    }
}

/// Restores a VM from the snapshot in `dir` into `run_dir` and hands it a fresh identity.
pub async fn restore(
    spec: &MachinePlan<'_>,
    dir: &Path,
    run_dir: &Path,
    hostname: &str,
) -> Result<(Vm, AgentClient, kiln_agent_host::IdentityAck), CoreError> {
    let disk = run_dir.join("disk.qcow2");
    create_overlay_with(
        &dir.join(kiln_snapshot::DISK_FILE),
        BackingFormat::Qcow2,
        &disk,
    )
    .await?;
    let mem = match spec.mode {
        CaptureMode::IgnoreShared => dir.join(kiln_snapshot::MEM_FILE),
        // A fresh private RAM file: the stream fills it.
        CaptureMode::FullRam => run_dir.join("mem"),
    };
    let cfg = spec.vm_config(run_dir, disk, mem, false);
    // QEMU before 8.2 opens a memory backend's file read-write even for a private mapping,
    // which the published (immutable) `mem` refuses: the flag is lifted until this QEMU has
    // its mapping, i.e. until the incoming migration ran (counted per file, so concurrent
    // clones share one window).
    let window = match spec.mode {
        CaptureMode::IgnoreShared => {
            Some(kiln_snapshot::WritableWindow::open(&cfg.memory_file).map_err(snapshot_err)?)
        }
        CaptureMode::FullRam => None,
    };
    let restored = Vm::restore(&cfg, &dir.join(kiln_snapshot::STATE_FILE), spec.mode).await;
    drop(window);
    let (vm, report) = restored?;
    let identity = fresh_identity(hostname)?;
    let result = async {
        let stream = tokio::net::UnixStream::connect(vm.agent_socket())
            .await
            .map_err(|source| CoreError::Io { what: "connect to", path: vm.agent_socket().to_owned(), source })?;
        let config = ClientConfig {
            handshake_deadline: RESTORE_AGENT_DEADLINE,
            output_window: crate::sandbox::OUTPUT_WINDOW,
            file_window: crate::sandbox::OUTPUT_WINDOW,
            ..Default::default()
        };
        let handshake = async {
            let t = Instant::now();
            let (agent, _info) = AgentClient::connect_with(stream, config).await?;
            let resync = t.elapsed();
            // Nothing but the client's nudges (pings, `ClientConfig::nudge_after`) is sent
            // before the identity is acknowledged.
            let ack = agent.apply_identity(&identity).await?;
            Ok::<_, kiln_agent_host::AgentError>((agent, ack, resync, t.elapsed() - resync))
        };
        // The identity's acknowledgement has a deadline too: a restored guest that answers
        // neither it nor the nudges fails the start instead of leaving it `creating` (before
        // the nudges, a clone of a busy two-vCPU desktop once waited over 10 minutes).
        let deadline = RESTORE_AGENT_DEADLINE + IDENTITY_DEADLINE;
        tokio::select! {
            r = tokio::time::timeout(deadline, handshake) => match r {
                Ok(r) => r.map_err(CoreError::Agent),
                Err(_) => Err(CoreError::HostSetup(format!(
                    "the restored guest did not take its new identity within {} s",
                    deadline.as_secs()
                ))),
            },
            status = vm.wait_exit() => Err(CoreError::HostSetup(format!("restored QEMU exited ({status})"))),
        }
    }
    .await;
    match result {
        Ok((agent, ack, resync, identity_time)) => {
            tracing::debug!(
                restore_ms = report.running.as_millis() as u64,
                resync_ms = resync.as_millis() as u64,
                identity_ms = identity_time.as_millis() as u64,
                "restored and re-identified"
            );
            Ok((vm, agent, ack))
        }
        Err(e) => {
            vm.kill().await;
            Err(e)
        }
    }
}

/// A new identity: random restore id, machine id and entropy, the host's clock, `hostname`.
fn fresh_identity(hostname: &str) -> Result<GuestIdentity, CoreError> {
    let bad = |e: kiln_agent_host::IdentityError| {
        CoreError::HostSetup(format!("cannot build an identity: {e}"))
    };
    let mut entropy = vec![0u8; ENTROPY_BYTES];
    rand::fill(&mut entropy[..]);
    Ok(GuestIdentity {
        restore_id: RestoreId::from_bytes(rand::random()),
        entropy: Entropy::new(entropy).map_err(bad)?,
        wall_clock_unix_ns: UnixNanos::now().map_err(bad)?,
        hostname: Hostname::new(hostname).map_err(bad)?,
        machine_id: MachineId::from_bytes(rand::random()).map_err(bad)?,
    })
}

/// The manifest's name for a capture mode.
pub fn capture_kind(mode: CaptureMode) -> CaptureKind {
    match mode {
        CaptureMode::IgnoreShared => CaptureKind::IgnoreShared,
        CaptureMode::FullRam => CaptureKind::FullRam,
    }
}

fn snapshot_err(e: kiln_snapshot::SnapshotError) -> CoreError {
    CoreError::Snapshot(e)
}
