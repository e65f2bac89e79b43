//! Warm snapshots of a running [`Vm`]: capture its device state with QEMU migration, restore
//! clones that map the captured RAM file copy-on-write.
//!
//! ```text
//!  capture (VM started with memory_shared = true, i.e. share=on):
//!    stop ─▶ migrate-set-capabilities x-ignore-shared ─▶ migrate exec:… ─▶ MIGRATION completed
//!      │                                                                    │
//!      └──────────────── pause window ─────────────────────────────────────┤
//!                                          AfterCapture::Resume ─▶ cont ◀──┘
//!                                          AfterCapture::Paused ─▶ stays in postmigrate
//!
//!  restore (same VmConfig except run_dir/disk; forced share=off + -incoming defer; the
//!  state file open as QEMU's fd 3; kernel and initramfs replaced by stubs, see `boot_stub`):
//!    spawn ─▶ QMP up ─▶ migrate-set-capabilities + announce-rounds 0 + migrate-incoming fd:3 (pipelined)
//!          ─▶ paused ─▶ cont
//!    any failure: QEMU is killed and reaped, the error carries qemu.log's tail
//! ```
//!
//! Modes ([`CaptureMode`]): `IgnoreShared` keeps RAM out of the state stream (RAM *is* the
//! memory file; ~0.3 MB of device state), `FullRam` streams all RAM (for QEMUs without
//! `x-ignore-shared`; ~100 MB for a small guest). Restore must use the capture's mode.
//!
//! Invariants and caveats:
//! - With `IgnoreShared`, the memory file is the snapshot's RAM. A captured VM that is resumed
//!   keeps writing into that file (`share=on`), so copy the file while the VM is paused (or
//!   never resume it) before clones use it. Clones map it `share=off`: their writes never
//!   reach the file.
//! - The state file appears under its final name only once it is complete: QEMU reports
//!   `completed` before its `exec:` helper has flushed the last bytes, and then SIGTERMs that
//!   helper after 10 ms. So the helper runs in the background (immune to that signal), writes
//!   `<state>.part` and renames it. On any capture error the state file's content is
//!   unspecified: capture into a temporary directory and discard it on error.
//! - The disk overlay is *not* part of the state: copy it while the VM is paused after capture
//!   (QEMU has flushed and inactivated its block devices then).

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_qmp::QmpCommand;
use kiln_qmp::commands::{
    Cont, Migrate, MigrateIncoming, MigrateSetCapabilities, MigrationCapabilityStatus,
    MigrationInfo, MigrationStatus, QueryMigrate, QueryStatus, RunState, Stop, X_IGNORE_SHARED,
};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::cmdline::{Incoming, VmConfig};
use crate::error::VmmError;
use crate::vm::{LOG_TAIL_BYTES, Vm};

/// Deadline for a capture (stop → state file complete). A `FullRam` stream of a 256 MiB guest
/// takes well under a second; the margin covers large guests and loaded hosts.
pub const CAPTURE_TIMEOUT: Duration = Duration::from_secs(60);

/// Deadline for a restore's incoming migration (QMP up → paused).
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// Fallback polling interval while waiting for migration events.
const POLL: Duration = Duration::from_millis(2);

/// Migration bandwidth during a capture, bytes per second (effectively unlimited).
const MAX_BANDWIDTH: u64 = 1 << 40;

/// Most milliseconds a live capture may pause the guest for its last dirty pages (QEMU's
/// default is 300).
pub const LIVE_DOWNTIME_LIMIT_MS: u64 = 50;

/// Suffix of the state file while it is being written.
const PART_SUFFIX: &str = ".part";

/// How guest RAM is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CaptureMode {
    /// `x-ignore-shared`: RAM stays in the (shared) memory file; the stream holds device state
    /// only. Needs a VM started with `memory_shared: true`.
    IgnoreShared,
    /// All RAM goes into the stream (fallback for QEMUs without `x-ignore-shared`).
    FullRam,
}

impl CaptureMode {
    /// Stable name (stored in snapshot manifests): `ignore-shared` or `full-ram`.
    pub fn as_str(&self) -> &'static str {
        match self {
            CaptureMode::IgnoreShared => "ignore-shared",
            CaptureMode::FullRam => "full-ram",
        }
    }

    /// The capability setting for this mode. Set explicitly in both modes so that a previous
    /// capture's setting never leaks into the next one.
    fn capabilities(self) -> MigrateSetCapabilities {
        MigrateSetCapabilities {
            capabilities: vec![MigrationCapabilityStatus {
                capability: X_IGNORE_SHARED.to_owned(),
                state: self == CaptureMode::IgnoreShared,
            }],
        }
    }
}

impl std::fmt::Display for CaptureMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the captured VM does afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCapture {
    /// Stay paused (run state `postmigrate`), e.g. to copy the disk overlay; [`Vm::resume`]
    /// continues it.
    Paused,
    /// `cont` as soon as the migration completed.
    Resume,
}

/// Measurements of one capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureReport {
    /// The mode used.
    pub mode: CaptureMode,
    /// Guest pause window: `stop` sent → `cont` answered ([`AfterCapture::Resume`]) or
    /// → migration completed ([`AfterCapture::Paused`]).
    pub pause: Duration,
    /// `migrate` sent → QEMU reported `completed`.
    pub migrate: Duration,
    /// `stop` sent → state file complete on disk.
    pub total: Duration,
    /// Size of the state file.
    pub state_bytes: u64,
    /// QEMU's own downtime figure, if it reported one.
    pub qemu_downtime_ms: Option<u64>,
}

/// Measurements of one restore (all from the same start instant, just before spawning QEMU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// The mode used.
    pub mode: CaptureMode,
    /// Spawn → QMP handshake done.
    pub qmp_up: Duration,
    /// Spawn → incoming migration done (run state `paused`).
    pub incoming_done: Duration,
    /// Spawn → `cont` answered (guest running).
    pub running: Duration,
}

impl Vm {
    /// Captures this VM's device state into `state_file` (see the module docs for the
    /// sequence). Returns once the state file is complete. `state_file` must be absolute and
    /// quotable (no `'`, no control characters, UTF-8); an existing file is replaced.
    ///
    /// On error the VM is left as it is (usually paused); the state file must be discarded.
    pub async fn capture(
        &self,
        state_file: &Path,
        mode: CaptureMode,
        after: AfterCapture,
    ) -> Result<CaptureReport, VmmError> {
        self.capture_inner(state_file, mode, after, false).await
    }

    /// Captures a running VM with a live (pre-copy) full-RAM migration: the guest keeps
    /// running while its RAM is copied and QEMU pauses it only for the last dirty pages
    /// (downtime limit [`LIVE_DOWNTIME_LIMIT_MS`]). Returns with the VM paused
    /// (`postmigrate`, block devices flushed): copy its disk, then [`Vm::resume`].
    /// `report.pause` is QEMU's downtime figure (stop → completed); the caller adds the time
    /// until it resumes.
    pub async fn capture_live(&self, state_file: &Path) -> Result<CaptureReport, VmmError> {
        self.capture_inner(state_file, CaptureMode::FullRam, AfterCapture::Paused, true)
            .await
    }

    async fn capture_inner(
        &self,
        state_file: &Path,
        mode: CaptureMode,
        after: AfterCapture,
        live: bool,
    ) -> Result<CaptureReport, VmmError> {
        let out = outgoing_uri(state_file)?;
        if mode == CaptureMode::IgnoreShared && !self.config().memory_shared {
            return Err(VmmError::InvalidConfig {
                reason: "an x-ignore-shared capture needs a VM started with memory_shared: true \
                         (share=on), or its RAM would be neither in the file nor in the stream"
                    .to_owned(),
            });
        }
        for stale in [state_file, out.part.as_path()] {
            remove_if_exists(stale)?;
        }
        let deadline = Instant::now() + CAPTURE_TIMEOUT;
        let mut events = self.qmp().events();
        let start = Instant::now();
        if !live {
            self.snapshot_step("stop", &Stop).await?;
        }
        self.snapshot_step("migrate-set-capabilities", &mode.capabilities())
            .await?;
        self.unthrottle().await?;
        let migrate_start = Instant::now();
        self.snapshot_step(
            "migrate",
            &Migrate {
                uri: out.uri,
                resume: None,
            },
        )
        .await?;
        let info = self.wait_migration(&mut events, deadline).await?;
        let migrate = migrate_start.elapsed();
        let mut pause = if live {
            Duration::from_millis(info.downtime.unwrap_or(0))
        } else {
            start.elapsed()
        };
        if after == AfterCapture::Resume {
            self.snapshot_step("cont", &Cont).await?;
            pause = start.elapsed();
        }
        let state_bytes = self.wait_state_file(state_file, deadline).await?;
        let report = CaptureReport {
            mode,
            pause,
            migrate,
            total: start.elapsed(),
            state_bytes,
            qemu_downtime_ms: info.downtime,
        };
        info!(
            pid = self.pid(),
            mode = %mode,
            pause_ms = report.pause.as_millis() as u64,
            state_bytes,
            "captured"
        );
        Ok(report)
    }

    /// Lifts QEMU's default migration bandwidth cap (128 MiB/s), which would stretch a
    /// `FullRam` capture of a 256 MiB guest to ~1 s of pause for no reason: the stream goes
    /// to a local file.
    async fn unthrottle(&self) -> Result<(), VmmError> {
        match self
            .qmp()
            .execute_raw(
                "migrate-set-parameters",
                Some(serde_json::json!({
                    "max-bandwidth": MAX_BANDWIDTH,
                    "downtime-limit": LIVE_DOWNTIME_LIMIT_MS,
                })),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(source) => Err(VmmError::SnapshotQmp {
                step: "migrate-set-parameters",
                log_tail: self.qemu_log_tail(LOG_TAIL_BYTES),
                source,
            }),
        }
    }

    /// Turns off QEMU's self-announcement after an incoming migration (`announce-rounds` 0).
    /// QEMU would otherwise send RARP frames with the snapshot's MAC from every network
    /// device as the restored VM starts, before kiln has connected the device's backend: a
    /// `-netdev stream` whose client is not there yet makes QEMU 7.2 dereference a missing
    /// channel (a SIGSEGV at `cont`, seen in about one restore in ten), and on a bridge the
    /// frames carry a MAC the guest no longer owns. A restored guest gets a fresh MAC and
    /// address from kiln anyway; nothing needs to learn the old one.
    async fn no_announce(&self) -> Result<(), VmmError> {
        match self
            .qmp()
            .execute_raw(
                "migrate-set-parameters",
                Some(serde_json::json!({ "announce-rounds": 0 })),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(source) => Err(VmmError::SnapshotQmp {
                step: "migrate-set-parameters",
                log_tail: self.qemu_log_tail(LOG_TAIL_BYTES),
                source,
            }),
        }
    }

    /// `stop`: pauses the VM's vCPUs in place (no CPU use; memory and devices kept).
    pub async fn pause(&self) -> Result<(), VmmError> {
        self.snapshot_step("stop", &Stop).await.map(|_| ())
    }

    /// `query-status`: the VM's run state (`io-error` when QEMU stopped the guest after a
    /// failed disk write, e.g. on a full host file system).
    pub async fn run_state(&self) -> Result<RunState, VmmError> {
        self.snapshot_step("query-status", &QueryStatus)
            .await
            .map(|s| s.status)
    }

    /// `cont`: resumes a paused VM (e.g. after [`AfterCapture::Paused`] or [`Vm::pause`]).
    pub async fn resume(&self) -> Result<(), VmmError> {
        self.snapshot_step("cont", &Cont).await.map(|_| ())
    }

    /// Starts a clone of a captured VM: `cfg` must be the captured VM's config (same machine,
    /// devices, memory size and memory file; compare [`crate::cmdline::device_fingerprint`])
    /// with its own `run_dir` and disk. `memory_shared` and `incoming` are overridden
    /// (`share=off`, `-incoming defer`). `mode` must be the capture's.
    ///
    /// On any error QEMU is killed and reaped before this returns; the error carries
    /// qemu.log's tail.
    pub async fn restore(
        cfg: &VmConfig,
        state_file: &Path,
        mode: CaptureMode,
    ) -> Result<(Vm, RestoreReport), VmmError> {
        let cfg = VmConfig {
            memory_shared: false,
            ..cfg.clone()
        };
        Vm::restore_inner(&cfg, state_file, mode, true).await
    }

    /// Loads a captured state into a new VM and leaves it paused, keeping `cfg.memory_shared`:
    /// with `share=on` and a `FullRam` stream this writes the guest's RAM into
    /// `cfg.memory_file`, which turns a full-RAM capture into an `IgnoreShared` one (capture
    /// the loaded VM again with [`CaptureMode::IgnoreShared`]).
    pub async fn load_paused(
        cfg: &VmConfig,
        state_file: &Path,
        mode: CaptureMode,
    ) -> Result<(Vm, RestoreReport), VmmError> {
        Vm::restore_inner(cfg, state_file, mode, false).await
    }

    async fn restore_inner(
        cfg: &VmConfig,
        state_file: &Path,
        mode: CaptureMode,
        resume: bool,
    ) -> Result<(Vm, RestoreReport), VmmError> {
        let state = std::fs::File::open(state_file).map_err(|source| VmmError::Io {
            what: "read",
            path: state_file.to_owned(),
            source,
        })?;
        if mode == CaptureMode::IgnoreShared {
            check_memory_file(cfg)?;
        }
        std::fs::create_dir_all(&cfg.run_dir).map_err(|source| VmmError::Io {
            what: "create",
            path: cfg.run_dir.clone(),
            source,
        })?;
        let (kernel, initramfs) = boot_stub(cfg)?;
        let cfg = VmConfig {
            incoming: Some(Incoming::Defer),
            kernel,
            initramfs,
            ..cfg.clone()
        };
        let start = Instant::now();
        let vm = Vm::spawn_passing(&cfg, Some((state.into(), INCOMING_FD))).await?;
        let qmp_up = start.elapsed();
        let deadline = Instant::now() + RESTORE_TIMEOUT;
        let resumed = async {
            // Pipelined: QMP runs commands in order, so the capability is set before the
            // migration starts, and the second command does not wait for the first reply.
            let caps = mode.capabilities();
            let incoming = MigrateIncoming {
                uri: incoming_uri(),
            };
            let (set, quiet, load) = tokio::join!(
                vm.snapshot_step("migrate-set-capabilities", &caps),
                vm.no_announce(),
                vm.snapshot_step("migrate-incoming", &incoming),
            );
            set?;
            quiet?;
            load?;
            let state = vm.wait_incoming(deadline).await?;
            let incoming_done = start.elapsed();
            if resume && state != RunState::Running {
                vm.snapshot_step("cont", &Cont).await?;
            }
            Ok::<_, VmmError>(incoming_done)
        }
        .await;
        match resumed {
            Ok(incoming_done) => {
                let report = RestoreReport {
                    mode,
                    qmp_up,
                    incoming_done,
                    running: start.elapsed(),
                };
                info!(
                    pid = vm.pid(),
                    mode = %mode,
                    running_ms = report.running.as_millis() as u64,
                    "restored"
                );
                Ok((vm, report))
            }
            Err(e) => {
                vm.kill().await;
                Err(e)
            }
        }
    }

    /// Runs one QMP command of a snapshot step, mapping its error (and a QEMU that died
    /// meanwhile) to an error with qemu.log's tail.
    async fn snapshot_step<C: QmpCommand>(
        &self,
        step: &'static str,
        cmd: &C,
    ) -> Result<C::Returns, VmmError> {
        match self.qmp().execute(cmd).await {
            Ok(r) => Ok(r),
            Err(source) => {
                // A closed connection usually means QEMU died: let its exit explain.
                if let Ok(status) =
                    tokio::time::timeout(Duration::from_millis(200), self.wait_exit()).await
                {
                    return Err(self.exited_during(step, status));
                }
                Err(VmmError::SnapshotQmp {
                    step,
                    log_tail: self.qemu_log_tail(LOG_TAIL_BYTES),
                    source,
                })
            }
        }
    }

    fn exited_during(&self, step: &'static str, status: crate::VmExit) -> VmmError {
        VmmError::ExitedDuring {
            step,
            status,
            log_tail: self.qemu_log_tail(LOG_TAIL_BYTES),
        }
    }

    fn timed_out(&self, step: &'static str, limit: Duration) -> VmmError {
        VmmError::SnapshotTimeout {
            step,
            timeout_ms: limit.as_millis() as u64,
            log_tail: self.qemu_log_tail(LOG_TAIL_BYTES),
        }
    }

    /// Waits for the outgoing migration to finish: woken by `MIGRATION` events, with a
    /// `query-migrate` poll as the fallback (events can lag or be missed).
    async fn wait_migration(
        &self,
        events: &mut tokio::sync::broadcast::Receiver<kiln_qmp::QmpEvent>,
        deadline: Instant,
    ) -> Result<MigrationInfo, VmmError> {
        loop {
            let info = self
                .snapshot_step("capture (query-migrate)", &QueryMigrate)
                .await?;
            match &info.status {
                Some(MigrationStatus::Completed) => return Ok(info),
                Some(s @ (MigrationStatus::Failed | MigrationStatus::Cancelled)) => {
                    return Err(VmmError::MigrationFailed {
                        step: "capture",
                        desc: info.error_desc.clone().unwrap_or_else(|| s.to_string()),
                        log_tail: self.qemu_log_tail(LOG_TAIL_BYTES),
                    });
                }
                _ => {}
            }
            tokio::select! {
                ev = events.recv() => {
                    if let Ok(ev) = ev {
                        debug!(event = %ev.event, data = %ev.data, "qmp event during capture");
                    }
                }
                () = tokio::time::sleep(POLL) => {}
                status = self.wait_exit() => return Err(self.exited_during("capture", status)),
                () = tokio::time::sleep_until(deadline) => {
                    return Err(self.timed_out("capture", CAPTURE_TIMEOUT));
                }
            }
        }
    }

    /// Waits until the state file has its final name (the helper renamed it, see module
    /// docs); returns its size.
    async fn wait_state_file(&self, state_file: &Path, deadline: Instant) -> Result<u64, VmmError> {
        loop {
            match std::fs::metadata(state_file) {
                Ok(m) => return Ok(m.len()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(VmmError::Io {
                        what: "read",
                        path: state_file.to_owned(),
                        source,
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timed_out("writing the state file", CAPTURE_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits until an incoming migration has loaded: run state `paused` (the capture was
    /// taken from a stopped VM) or `running`. A failed load makes QEMU exit.
    async fn wait_incoming(&self, deadline: Instant) -> Result<RunState, VmmError> {
        let mut events = self.qmp().events();
        loop {
            let s = self
                .snapshot_step("restore (query-status)", &QueryStatus)
                .await?;
            match s.status {
                RunState::Paused | RunState::Running => return Ok(s.status),
                RunState::InMigrate | RunState::Prelaunch | RunState::RestoreVm => {}
                other => {
                    return Err(VmmError::MigrationFailed {
                        step: "restore",
                        desc: format!("run state {other} after the incoming migration"),
                        log_tail: self.qemu_log_tail(LOG_TAIL_BYTES),
                    });
                }
            }
            tokio::select! {
                _ = events.recv() => {}
                () = tokio::time::sleep(POLL) => {}
                status = self.wait_exit() => return Err(self.exited_during("restore", status)),
                () = tokio::time::sleep_until(deadline) => {
                    return Err(self.timed_out("restore", RESTORE_TIMEOUT));
                }
            }
        }
    }
}

/// The memory file of an `IgnoreShared` restore must exist with exactly the guest's RAM size:
/// QEMU would otherwise extend (write to) the template or map garbage.
fn check_memory_file(cfg: &VmConfig) -> Result<(), VmmError> {
    let want = u64::from(cfg.memory_mib) << 20;
    let meta = std::fs::metadata(&cfg.memory_file).map_err(|source| VmmError::Io {
        what: "read the snapshot memory file",
        path: cfg.memory_file.clone(),
        source,
    })?;
    if meta.len() != want {
        return Err(VmmError::InvalidConfig {
            reason: format!(
                "memory file {} has {} bytes, the guest has {want}",
                cfg.memory_file.display(),
                meta.len()
            ),
        });
    }
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<(), VmmError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmmError::Io {
            what: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Single-quotes `path` for `/bin/sh` (QEMU runs `exec:` URIs with `sh -c`). Only paths that
/// quote without escapes are accepted.
fn shell_quote(path: &Path) -> Result<String, VmmError> {
    let bad = |reason| VmmError::StatePath {
        path: path.to_owned(),
        reason,
    };
    if !path.is_absolute() {
        return Err(bad("it must be absolute"));
    }
    let s = path.to_str().ok_or_else(|| bad("it is not UTF-8"))?;
    if s.contains('\'') {
        return Err(bad("it contains a single quote"));
    }
    if s.chars().any(char::is_control) {
        return Err(bad("it contains a control character"));
    }
    Ok(format!("'{s}'"))
}

/// The outgoing `exec:` URI and the temporary name it writes first.
struct Outgoing {
    uri: String,
    part: PathBuf,
}

/// `exec:` URI for a capture. The writer runs in the background with stdin taken from the
/// migration pipe (fd 3): QEMU's SIGTERM to its direct child then cannot cut it short, and the
/// rename marks completion (see the module docs).
fn outgoing_uri(state_file: &Path) -> Result<Outgoing, VmmError> {
    let mut part = state_file.as_os_str().to_owned();
    part.push(PART_SUFFIX);
    let part = PathBuf::from(part);
    let q = shell_quote(state_file)?;
    let qp = shell_quote(&part)?;
    Ok(Outgoing {
        uri: format!("exec:exec 3<&0 </dev/null; (cat <&3 >{qp} && exec mv -f {qp} {q}) &"),
        part,
    })
}

/// The descriptor number a restored QEMU reads its state from (`fd:3`): the state file is
/// opened by kiln and inherited, so no `exec:` shell and `cat` process start per restore
/// (measured: QEMU start → running 20 → 8.5 ms for the migration steps, medians of 10).
const INCOMING_FD: std::os::fd::RawFd = 3;

/// `fd:` URI for a restore (QEMU takes a numeric name as the descriptor itself).
fn incoming_uri() -> String {
    format!("fd:{INCOMING_FD}")
}

/// Offset of `setup_sects` in a bzImage (Linux boot protocol).
const SETUP_SECTS_OFFSET: usize = 0x1f1;
/// Offset of the `HdrS` magic in a bzImage.
const HDRS_OFFSET: usize = 0x202;

/// The kernel and initramfs a restored QEMU is given: stubs when the kernel is a bzImage.
///
/// Why: QEMU reads `-kernel` and `-initrd` into its own memory at start (fw_cfg), ~16 MiB
/// here, to hand them to the firmware at boot. A restored guest never boots again (a reboot
/// exits QEMU, `-no-reboot`), so per clone that was ~13 MiB of private memory and ~20 ms of
/// start-up (reading the files, faulting the copies in) for nothing. The stub keeps the real
/// kernel's setup header (so QEMU sets up the same boot ROM, `linuxboot_dma.bin`, whose RAM
/// block the migration stream carries) and drops the payload; the initramfs stub is empty.
/// Nothing of either is guest state: fw_cfg migrates only its read position, and ROMs'
/// contents come from the stream. A kernel that is not a bzImage (e.g. an ELF `vmlinux`)
/// is passed as it is.
fn boot_stub(cfg: &VmConfig) -> Result<(PathBuf, PathBuf), VmmError> {
    use std::io::Read;
    let read_err = |source| VmmError::Io {
        what: "read",
        path: cfg.kernel.clone(),
        source,
    };
    let mut kernel = std::fs::File::open(&cfg.kernel).map_err(read_err)?;
    let kernel_len = kernel.metadata().map_err(read_err)?.len();
    let mut header = vec![0u8; HDRS_OFFSET + 4];
    if kernel.read_exact(&mut header).is_err() || &header[HDRS_OFFSET..] != b"HdrS" {
        debug!(kernel = %cfg.kernel.display(), "not a bzImage: restoring with the real kernel");
        return Ok((cfg.kernel.clone(), cfg.initramfs.clone()));
    }
    let sects = match header[SETUP_SECTS_OFFSET] {
        0 => 4,
        n => usize::from(n),
    };
    let setup_len = (sects + 1) * 512;
    if (setup_len as u64) > kernel_len {
        return Ok((cfg.kernel.clone(), cfg.initramfs.clone()));
    }
    header.resize(setup_len, 0);
    kernel
        .read_exact(&mut header[HDRS_OFFSET + 4..])
        .map_err(read_err)?;
    let stub_kernel = cfg.run_dir.join("boot-stub-kernel");
    let stub_initrd = cfg.run_dir.join("boot-stub-initrd");
    for (path, bytes) in [(&stub_kernel, &header[..]), (&stub_initrd, &[][..])] {
        std::fs::write(path, bytes).map_err(|source| VmmError::Io {
            what: "write",
            path: path.clone(),
            source,
        })?;
    }
    Ok((stub_kernel, stub_initrd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_accepts_plain_paths_and_rejects_unquotable() {
        assert_eq!(
            shell_quote(Path::new("/var/lib/kiln/snap shots/a,b/state")).ok(),
            Some("'/var/lib/kiln/snap shots/a,b/state'".to_owned())
        );
        for bad in ["relative/state", "/tmp/it's", "/tmp/a\nb", "/tmp/a\tb"] {
            assert!(
                matches!(shell_quote(Path::new(bad)), Err(VmmError::StatePath { .. })),
                "{bad:?} must be rejected"
            );
        }
        use std::os::unix::ffi::OsStrExt;
        let non_utf8 = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/\xff"));
        assert!(shell_quote(non_utf8).is_err());
    }

    #[test]
    fn outgoing_uri_writes_part_then_renames() {
        let out = outgoing_uri(Path::new("/s/state")).expect("quotable");
        assert_eq!(out.part, Path::new("/s/state.part"));
        assert_eq!(
            out.uri,
            "exec:exec 3<&0 </dev/null; (cat <&3 >'/s/state.part' && exec mv -f '/s/state.part' '/s/state') &"
        );
        assert_eq!(incoming_uri(), "fd:3");
    }

    /// The capture helper really produces the file under its final name, complete, even when
    /// its direct child is SIGKILLed right after the writer closes (what QEMU does).
    #[tokio::test]
    async fn outgoing_uri_command_survives_killing_the_direct_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let out = outgoing_uri(&state).expect("quotable");
        let cmd = out.uri.strip_prefix("exec:").expect("exec uri");
        let mut child = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(cmd)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut stdin = child.stdin.take().expect("stdin");
        let payload = vec![0x5au8; 1 << 20];
        use tokio::io::AsyncWriteExt;
        stdin.write_all(&payload).await.expect("write");
        drop(stdin);
        let _ = child.start_kill();
        let _ = child.wait().await;
        let t = std::time::Instant::now();
        while !state.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "state never appeared"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(std::fs::read(&state).expect("read"), payload);
        assert!(!out.part.exists());
    }

    fn stub_config(dir: &Path, kernel: Vec<u8>) -> VmConfig {
        let k = dir.join("vmlinuz");
        std::fs::write(&k, kernel).expect("kernel");
        let i = dir.join("initramfs");
        std::fs::write(&i, b"07070100").expect("initramfs");
        VmConfig {
            qemu: "/q".into(),
            accel: crate::Accel::Tcg,
            cpus: 1,
            memory_mib: 64,
            kernel: k,
            initramfs: i,
            extra_cmdline: String::new(),
            disk: None,
            memory_file: dir.join("mem"),
            memory_shared: false,
            run_dir: dir.join("run"),
            incoming: None,
            nic: None,
            display: None,
        }
    }

    #[test]
    fn boot_stub_bzimage_keeps_setup_header_only_and_empty_initrd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut kernel = vec![0xabu8; 64 * 1024];
        kernel[SETUP_SECTS_OFFSET] = 3;
        kernel[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(b"HdrS");
        let cfg = stub_config(dir.path(), kernel.clone());
        std::fs::create_dir_all(&cfg.run_dir).expect("run dir");
        let (k, i) = boot_stub(&cfg).expect("stub");
        assert!(k.starts_with(&cfg.run_dir) && i.starts_with(&cfg.run_dir));
        assert_eq!(std::fs::read(&k).expect("stub kernel"), kernel[..4 * 512]);
        assert_eq!(std::fs::read(&i).expect("stub initrd"), b"");
    }

    #[test]
    fn boot_stub_non_bzimage_uses_the_real_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = stub_config(dir.path(), b"\x7fELF not a bzImage".to_vec());
        let (k, i) = boot_stub(&cfg).expect("no stub");
        assert_eq!((k, i), (cfg.kernel.clone(), cfg.initramfs.clone()));
        let mut short = vec![0u8; 1024];
        short[SETUP_SECTS_OFFSET] = 40; // setup larger than the file
        short[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(b"HdrS");
        let cfg = stub_config(dir.path(), short);
        assert_eq!(boot_stub(&cfg).expect("no stub").0, cfg.kernel);
    }

    #[test]
    fn capture_mode_sets_x_ignore_shared_explicitly() {
        assert!(CaptureMode::IgnoreShared.capabilities().capabilities[0].state);
        assert!(!CaptureMode::FullRam.capabilities().capabilities[0].state);
        assert_eq!(CaptureMode::FullRam.to_string(), "full-ram");
    }

    #[test]
    fn check_memory_file_requires_exact_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mem = dir.path().join("mem");
        let cfg = VmConfig {
            qemu: "/q".into(),
            accel: crate::Accel::Tcg,
            cpus: 1,
            memory_mib: 64,
            kernel: "/k".into(),
            initramfs: "/i".into(),
            extra_cmdline: String::new(),
            disk: None,
            memory_file: mem.clone(),
            memory_shared: false,
            run_dir: dir.path().to_owned(),
            incoming: None,
            nic: None,
            display: None,
        };
        assert!(matches!(check_memory_file(&cfg), Err(VmmError::Io { .. })));
        let f = std::fs::File::create(&mem).expect("create");
        f.set_len(63 << 20).expect("len");
        assert!(matches!(
            check_memory_file(&cfg),
            Err(VmmError::InvalidConfig { .. })
        ));
        f.set_len(64 << 20).expect("len");
        assert!(check_memory_file(&cfg).is_ok());
    }
}
