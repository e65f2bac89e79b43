//! kiln's engine: sandboxes, images and the host's state, behind one [`Engine`].
//!
//! Owns: the sandbox table (which VM and agent channel belong to which id), the lifecycle of
//! each sandbox, the startup janitor, image builds on behalf of API clients, and the
//! accelerator choice. It must not speak HTTP (that is `kilnd`) nor SQL (that is `kiln-store`)
//! nor QEMU's protocols (that is `kiln-vmm`).
//!
//! Invariants:
//! - every sandbox in the in-memory table has a row in the store; a row without a table entry
//!   is a sandbox that failed or was orphaned, never one that runs;
//! - a sandbox's runtime directory exists exactly while its QEMU may run; teardown removes it,
//!   and the janitor removes any left by a daemon that died;
//! - no lock is held across an `.await`.

pub mod doctor;
pub mod error;
mod images;
mod janitor;
pub mod paths;
pub mod sandbox;
mod warm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_api_types::{
    ExecRequest, ImageBuildEvent, ImageInfo, JanitorReport, SandboxCreateRequest, SandboxId,
    SandboxInfo, SandboxState,
};
use kiln_store::{SandboxRow, Store};
use tokio::sync::{OnceCell, mpsc};
use tracing::{info, warn};

pub use error::CoreError;
pub use paths::Home;
pub use sandbox::{Exec, ExecOutput, Sandbox};

/// The engine. One per daemon; shared behind an `Arc`.
pub struct Engine {
    home: Home,
    store: Store,
    sandboxes: Mutex<HashMap<SandboxId, Arc<Sandbox>>>,
    qemu: OnceCell<kiln_vmm::qemu::QemuInfo>,
    accel: OnceCell<kiln_vmm::accel::AccelVerdict>,
    janitor: JanitorReport,
    /// One lock per warm-snapshot key, so a snapshot is captured once.
    capture_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Engine {
    /// Opens the state directory, reclaims what a previous daemon left behind, and returns the
    /// engine. Must be called from within a tokio runtime.
    pub async fn start(home: Home) -> Result<Arc<Engine>, CoreError> {
        home.ensure().map_err(|source| CoreError::Io {
            what: "create",
            path: home.root().to_owned(),
            source,
        })?;
        let store = Store::open(&home.database())?;
        let janitor = janitor::reclaim(&home, &store)?;
        if janitor != JanitorReport::default() {
            warn!(
                processes_killed = janitor.processes_killed,
                dirs_removed = janitor.dirs_removed,
                bytes_freed = janitor.bytes_freed,
                sandboxes_failed = janitor.sandboxes_failed,
                "reclaimed what a previous daemon left behind"
            );
        }
        Ok(Arc::new(Engine {
            home,
            store,
            sandboxes: Mutex::new(HashMap::new()),
            qemu: OnceCell::new(),
            accel: OnceCell::new(),
            janitor,
            capture_locks: Mutex::new(HashMap::new()),
        }))
    }

    /// The state directory.
    pub fn home(&self) -> &Home {
        &self.home
    }

    /// What the startup janitor reclaimed.
    pub fn janitor_report(&self) -> JanitorReport {
        self.janitor.clone()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, Arc<Sandbox>>> {
        // The table holds plain Arcs; a panic elsewhere cannot leave it inconsistent.
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn qemu(&self) -> Result<&kiln_vmm::qemu::QemuInfo, CoreError> {
        self.qemu
            .get_or_try_init(|| async { kiln_vmm::qemu::detect().await.map_err(CoreError::Vmm) })
            .await
    }

    /// The accelerator verdict, probing once (with the given image's kernel) if not cached.
    async fn accel(
        &self,
        kernel: &std::path::Path,
        initramfs: &std::path::Path,
    ) -> Result<&kiln_vmm::accel::AccelVerdict, CoreError> {
        let qemu = self.qemu().await?;
        self.accel
            .get_or_try_init(|| async {
                let verdict =
                    kiln_vmm::accel::resolve(qemu, kernel, initramfs, &self.home.accel_cache())
                        .await?;
                info!(accel = %verdict.accel, reason = %verdict.reason, "accelerator chosen");
                Ok::<_, CoreError>(verdict)
            })
            .await
    }

    /// Starts a sandbox from a built image and waits until its agent answers.
    pub async fn sandbox_create(
        self: &Arc<Self>,
        req: &SandboxCreateRequest,
    ) -> Result<SandboxInfo, CoreError> {
        req.validate().map_err(CoreError::BadRequest)?;
        let image = kiln_image::get(self.home.root(), &req.image)?.ok_or_else(|| {
            CoreError::ImageNotFound {
                name: req.image.clone(),
            }
        })?;
        let kernel = image.kernel_path(self.home.root());
        let initramfs = image.initramfs_path(self.home.root());
        let qemu_info = self.qemu().await?;
        let qemu = qemu_info.path.clone();
        let accel = self.accel(&kernel, &initramfs).await?.accel;

        let id = SandboxId::random();
        let run_dir = self.home.sandbox_dir(&id);
        std::fs::create_dir_all(&run_dir).map_err(|source| CoreError::Io {
            what: "create",
            path: run_dir.clone(),
            source,
        })?;
        let row = SandboxRow {
            id: id.clone(),
            image: image.name.clone(),
            image_id: image.id.to_string(),
            state: SandboxState::Booting,
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            accel: accel.to_string(),
            created_unix: unix_now(),
            boot_ms: None,
            error: None,
            source: "cold".to_owned(),
        };
        if let Err(e) = self.store.sandbox_insert(&row) {
            remove_dir(&run_dir);
            return Err(e.into());
        }
        let spec = sandbox::BootSpec {
            id: id.clone(),
            run_dir: run_dir.clone(),
            kernel,
            initramfs,
            rootfs: image.rootfs_path(self.home.root()),
            qemu,
            accel,
            cpus: req.cpus,
            memory_mib: req.memory_mib,
        };
        let warm_spec = warm::WarmSpec {
            qemu: qemu_info,
            accel,
            image: &image,
            home: self.home.root(),
            cpus: req.cpus,
            memory_mib: req.memory_mib,
        };
        let restored = if req.cold || snapshots_disabled() {
            None
        } else {
            self.warm_start(&warm_spec, &id, &run_dir).await
        };
        let source = if restored.is_some() {
            "snapshot"
        } else {
            "cold"
        };
        let booted = match restored {
            Some(sb) => Ok(sb),
            None => Sandbox::boot(spec).await,
        };
        let sb = match booted {
            Ok(sb) => sb,
            Err(e) => {
                // Nothing of a sandbox that never ran is kept: its row and directory go.
                remove_dir(&run_dir);
                let _ = self.store.sandbox_delete(&id);
                return Err(e);
            }
        };
        if !req.secrets.0.is_empty()
            && let Err(e) = sb.deliver_secrets(&req.secrets).await
        {
            sb.shutdown().await;
            remove_dir(&run_dir);
            let _ = self.store.sandbox_delete(&id);
            return Err(e);
        }
        let boot_ms = sb.boot.as_millis() as u64;
        self.store
            .sandbox_set_state(&id, SandboxState::Running, Some(boot_ms), None)?;
        self.store.sandbox_set_source(&id, source)?;
        self.table().insert(id.clone(), Arc::clone(&sb));
        info!(sandbox_id = %id, boot_ms, pid = sb.pid(), source, "sandbox running");
        self.spawn_supervisor(sb);
        self.sandbox_get(&id)
    }

    /// Restores a sandbox from the image's warm snapshot, capturing that snapshot first if
    /// there is none. `None` (after one warning with the reason) means: cold-boot instead.
    async fn warm_start(
        &self,
        spec: &warm::WarmSpec<'_>,
        id: &SandboxId,
        run_dir: &Path,
    ) -> Option<Arc<Sandbox>> {
        if !spec.qemu.x_ignore_shared {
            warn!("QEMU lacks x-ignore-shared: warm snapshots are off, sandboxes cold-boot");
            return None;
        }
        let name = spec.name();
        let dir = warm::snapshots_dir(spec.home).join(&name);
        {
            // One capture per snapshot key at a time; later starts wait and then restore it.
            let lock = Arc::clone(
                self.capture_locks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(name.clone())
                    .or_default(),
            );
            let _guard = lock.lock().await;
            if dir.exists() {
                if let Err(e) = warm::verify(spec, &dir).await {
                    warn!(snapshot = %name, reason = %e.chain(), "warm snapshot unusable and removed; cold boot (the next start captures a new one)");
                    return None;
                }
            } else {
                let cap_dir = self.home.run_dir().join(format!("capture-{}", id.as_str()));
                let captured = match std::fs::create_dir_all(&cap_dir) {
                    Ok(()) => {
                        warm::capture(spec, &cap_dir, sandbox::boot_deadline(spec.accel)).await
                    }
                    Err(source) => Err(CoreError::Io {
                        what: "create",
                        path: cap_dir.clone(),
                        source,
                    }),
                };
                remove_dir(&cap_dir);
                match captured {
                    Ok(_) => info!(snapshot = %name, "warm snapshot captured"),
                    Err(e) => {
                        warn!(snapshot = %name, reason = %e.chain(), "warm snapshot capture failed; cold boot");
                        return None;
                    }
                }
            }
        }
        let started = std::time::Instant::now();
        match warm::restore(spec, &dir, run_dir, id.as_str()).await {
            Ok((vm, agent, _ack)) => {
                Some(Sandbox::assemble(id.clone(), vm, agent, started.elapsed()))
            }
            Err(e) => {
                warn!(sandbox_id = %id, snapshot = %name, reason = %e.chain(), "restore failed; snapshot removed, cold boot");
                // A snapshot that failed to restore is not trusted again: the next start
                // captures a fresh one.
                remove_dir(&dir);
                // The cold boot starts from an empty runtime directory.
                remove_dir(run_dir);
                let _ = std::fs::create_dir_all(run_dir);
                None
            }
        }
    }

    /// Watches one sandbox and records its failure.
    fn spawn_supervisor(self: &Arc<Self>, sb: Arc<Sandbox>) {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            let reason = sb.watch_failure().await;
            let Some(engine) = engine.upgrade() else {
                return;
            };
            // A sandbox being deleted is no longer in the table: its death is expected.
            if engine
                .table()
                .get(sb.id())
                .is_some_and(|cur| Arc::ptr_eq(cur, &sb))
            {
                warn!(sandbox_id = %sb.id(), %reason, "sandbox failed");
                if let Err(e) = engine.store.sandbox_set_state(
                    sb.id(),
                    SandboxState::Failed,
                    None,
                    Some(&reason),
                ) {
                    warn!(sandbox_id = %sb.id(), error = %error::error_chain(&e), "could not record failure");
                }
                engine.table().remove(sb.id());
                sb.shutdown().await;
                remove_dir(&engine.home.sandbox_dir(sb.id()));
            }
            sb.mark_failed(reason);
        });
    }

    /// All sandboxes.
    pub fn sandbox_list(&self) -> Result<Vec<SandboxInfo>, CoreError> {
        Ok(self
            .store
            .sandbox_list()?
            .into_iter()
            .map(info_from_row)
            .collect())
    }

    /// One sandbox.
    pub fn sandbox_get(&self, id: &SandboxId) -> Result<SandboxInfo, CoreError> {
        self.store
            .sandbox_get(id)?
            .map(info_from_row)
            .ok_or_else(|| CoreError::SandboxNotFound(id.clone()))
    }

    /// Destroys a sandbox: stops its VM, removes its runtime directory and its row.
    pub async fn sandbox_delete(&self, id: &SandboxId) -> Result<(), CoreError> {
        let sb = self.table().remove(id);
        let known = self.store.sandbox_get(id)?.is_some();
        if sb.is_none() && !known {
            return Err(CoreError::SandboxNotFound(id.clone()));
        }
        if let Some(sb) = sb {
            sb.shutdown().await;
        }
        remove_dir(&self.home.sandbox_dir(id));
        self.store.sandbox_delete(id)?;
        info!(sandbox_id = %id, "sandbox removed");
        Ok(())
    }

    fn running(&self, id: &SandboxId) -> Result<Arc<Sandbox>, CoreError> {
        if let Some(sb) = self.table().get(id) {
            return Ok(Arc::clone(sb));
        }
        match self.store.sandbox_get(id)? {
            Some(row) => Err(CoreError::NotRunning {
                id: id.clone(),
                state: row.state.as_str(),
            }),
            None => Err(CoreError::SandboxNotFound(id.clone())),
        }
    }

    /// One agent round trip, timed in the daemon.
    pub async fn sandbox_ping(&self, id: &SandboxId) -> Result<Duration, CoreError> {
        self.running(id)?.ping().await
    }

    /// Starts a command in a running sandbox.
    pub async fn sandbox_exec(&self, id: &SandboxId, req: &ExecRequest) -> Result<Exec, CoreError> {
        req.validate().map_err(CoreError::BadRequest)?;
        self.running(id)?.exec(req).await
    }

    /// Builds (or confirms up to date) the image `name`, sending progress to `events`.
    pub async fn image_build(
        &self,
        name: &str,
        force: bool,
        events: mpsc::Sender<ImageBuildEvent>,
    ) -> Result<(ImageInfo, bool), CoreError> {
        images::build(&self.home, name, force, events).await
    }

    /// All built images.
    pub fn image_list(&self) -> Result<Vec<ImageInfo>, CoreError> {
        Ok(kiln_image::list(self.home.root())?
            .iter()
            .map(images::info)
            .collect())
    }

    /// Removes a built image.
    pub fn image_remove(&self, name: &str) -> Result<(), CoreError> {
        kiln_api_types::validate_image_name(name).map_err(CoreError::BadRequest)?;
        if kiln_image::get(self.home.root(), name)?.is_none() {
            return Err(CoreError::ImageNotFound {
                name: name.to_owned(),
            });
        }
        kiln_image::remove(self.home.root(), name)?;
        Ok(())
    }

    /// Stops every sandbox (daemon shutdown). Their rows are removed: they cannot outlive us.
    pub async fn shutdown(&self) {
        let all: Vec<_> = self.table().drain().collect();
        for (id, sb) in all {
            sb.shutdown().await;
            remove_dir(&self.home.sandbox_dir(&id));
            let _ = self.store.sandbox_delete(&id);
        }
    }
}

fn info_from_row(r: SandboxRow) -> SandboxInfo {
    SandboxInfo {
        id: r.id,
        image: r.image,
        image_id: r.image_id,
        state: r.state,
        cpus: r.cpus,
        memory_mib: r.memory_mib,
        accel: r.accel,
        created_unix: r.created_unix,
        boot_ms: r.boot_ms,
        error: r.error,
        source: r.source,
    }
}

fn remove_dir(dir: &std::path::Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(path = %dir.display(), error = %e, "could not remove runtime directory");
    }
}

/// `KILN_NO_SNAPSHOT=1` (in the daemon's environment) turns warm snapshots off.
fn snapshots_disabled() -> bool {
    std::env::var_os("KILN_NO_SNAPSHOT").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where the static guest agent binary is: `$KILN_AGENT`, else `kiln-agent` beside the
/// running executable.
pub fn agent_binary() -> Result<PathBuf, CoreError> {
    if let Some(p) = std::env::var_os("KILN_AGENT").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|source| CoreError::Io {
        what: "locate",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let candidate = exe.with_file_name("kiln-agent");
    if candidate.exists() {
        Ok(candidate)
    } else {
        Err(CoreError::HostSetup(format!(
            "the guest agent binary was not found at {} (build it with scripts/build, or set KILN_AGENT)",
            candidate.display()
        )))
    }
}
