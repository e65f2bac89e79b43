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
mod guest;
mod images;
mod janitor;
pub mod paths;
mod ports;
pub mod sandbox;
mod usersnap;
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
    /// Whether the full-RAM snapshot mode was announced in the log.
    full_ram_announced: std::sync::atomic::AtomicBool,
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
            full_ram_announced: std::sync::atomic::AtomicBool::new(false),
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

    /// How snapshots save RAM on this host: file-mapped (`x-ignore-shared`) when QEMU can,
    /// else (or with `KILN_SNAPSHOT_MODE=full-ram`) a full-RAM stream. Says so once.
    fn snapshot_mode(&self, qemu: &kiln_vmm::qemu::QemuInfo) -> kiln_vmm::CaptureMode {
        let forced = std::env::var("KILN_SNAPSHOT_MODE").is_ok_and(|v| v == "full-ram");
        if qemu.x_ignore_shared && !forced {
            return kiln_vmm::CaptureMode::IgnoreShared;
        }
        if !self
            .full_ram_announced
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            if forced {
                warn!("KILN_SNAPSHOT_MODE=full-ram: snapshots carry all of RAM in their stream");
            } else {
                warn!(
                    "QEMU lacks x-ignore-shared: snapshots carry all of RAM in their stream (slower restores, no page sharing between clones)"
                );
            }
        }
        kiln_vmm::CaptureMode::FullRam
    }

    /// Starts a sandbox from a built image (restoring its warm snapshot, or cold-booting) or
    /// from a user snapshot, and waits until its agent answers, its secrets are in place and
    /// the image's on-restore hook has run.
    pub async fn sandbox_create(
        self: &Arc<Self>,
        req: &SandboxCreateRequest,
    ) -> Result<SandboxInfo, CoreError> {
        req.validate().map_err(CoreError::BadRequest)?;
        let user_snap = match &req.snapshot {
            Some(name) => Some(usersnap::open(&self.home, name)?),
            None => None,
        };
        let (image, cpus, memory_mib) = match &user_snap {
            Some(u) => (u.image.clone(), u.cpus, u.memory_mib),
            None => (
                kiln_image::get(self.home.root(), &req.image)?.ok_or_else(|| {
                    CoreError::ImageNotFound {
                        name: req.image.clone(),
                    }
                })?,
                req.cpus,
                req.memory_mib,
            ),
        };
        // Published ports are bound first: a port in use fails before anything starts.
        let bound = ports::bind(&req.publish)?;
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
            cpus,
            memory_mib,
            accel: accel.to_string(),
            created_unix: unix_now(),
            boot_ms: None,
            error: None,
            source: "cold".to_owned(),
            // Recorded from the start: a snapshot being restored is already in use.
            snapshot: user_snap.as_ref().map(|u| u.name.clone()),
            publish: req
                .publish
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(","),
        };
        if let Err(e) = self.store.sandbox_insert(&row) {
            remove_dir(&run_dir);
            return Err(e.into());
        }
        let warm_spec = warm::WarmSpec {
            qemu: qemu_info,
            accel,
            image: &image,
            home: self.home.root(),
            cpus,
            memory_mib,
            mode: match &user_snap {
                Some(u) => u.mode,
                None => self.snapshot_mode(qemu_info),
            },
        };
        let started = match &user_snap {
            Some(u) => usersnap::restore(&warm_spec, u, &id, &run_dir)
                .await
                .map(|sb| (sb, Some(u.name.clone()))),
            None => {
                let restored = if req.cold || snapshots_disabled() {
                    None
                } else {
                    self.warm_start(&warm_spec, &id, &run_dir).await
                };
                match restored {
                    Some(sb) => Ok((sb, Some(warm_spec.name()))),
                    None => self
                        .cold_boot(&image, &id, &run_dir, qemu, accel, cpus, memory_mib)
                        .await
                        .map(|sb| (sb, None)),
                }
            }
        };
        let (sb, snapshot) = match started {
            Ok(v) => v,
            Err(e) => {
                // Nothing of a sandbox that never ran is kept: its row and directory go.
                remove_dir(&run_dir);
                let _ = self.store.sandbox_delete(&id);
                return Err(e);
            }
        };
        {
            let mut extras = sb.extras();
            extras.secrets = req.secrets.clone();
            extras.secret_env = req.secret_env;
            extras.hook = image.recipe.on_restore.clone();
        }
        let ready = async {
            if !req.secrets.0.is_empty() {
                guest::deliver_secrets(sb.agent(), &req.secrets).await?;
            }
            if let Some(hook) = &image.recipe.on_restore {
                guest::run_hook(sb.agent(), hook).await?;
            }
            ports::serve(&sb, bound)
        }
        .await;
        if let Err(e) = ready {
            sb.shutdown().await;
            remove_dir(&run_dir);
            let _ = self.store.sandbox_delete(&id);
            return Err(e);
        }
        let source = if snapshot.is_some() {
            "snapshot"
        } else {
            "cold"
        };
        let boot_ms = sb.boot.as_millis() as u64;
        self.store
            .sandbox_set_state(&id, SandboxState::Running, Some(boot_ms), None)?;
        self.store
            .sandbox_set_source(&id, source, snapshot.as_deref())?;
        self.table().insert(id.clone(), Arc::clone(&sb));
        info!(sandbox_id = %id, boot_ms, pid = sb.pid(), source, snapshot = snapshot.as_deref().unwrap_or("-"), "sandbox running");
        self.spawn_supervisor(sb);
        self.sandbox_get(&id)
    }

    /// Boots a sandbox from scratch and runs the image's on-boot commands and readiness probe.
    #[allow(clippy::too_many_arguments)]
    async fn cold_boot(
        &self,
        image: &kiln_image::ImageManifest,
        id: &SandboxId,
        run_dir: &Path,
        qemu: PathBuf,
        accel: kiln_vmm::Accel,
        cpus: u32,
        memory_mib: u32,
    ) -> Result<Arc<Sandbox>, CoreError> {
        let spec = sandbox::BootSpec {
            id: id.clone(),
            run_dir: run_dir.to_owned(),
            kernel: image.kernel_path(self.home.root()),
            initramfs: image.initramfs_path(self.home.root()),
            rootfs: image.rootfs_path(self.home.root()),
            qemu,
            accel,
            cpus,
            memory_mib,
        };
        let sb = Sandbox::boot(spec).await?;
        if let Err(e) = guest::prepare(sb.agent(), &image.recipe).await {
            sb.shutdown().await;
            return Err(e);
        }
        Ok(sb)
    }

    /// Restores a sandbox from the image's warm snapshot, capturing that snapshot first if
    /// there is none. `None` (after one warning with the reason) means: cold-boot instead.
    async fn warm_start(
        &self,
        spec: &warm::WarmSpec<'_>,
        id: &SandboxId,
        run_dir: &Path,
    ) -> Option<Arc<Sandbox>> {
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

    /// Secrets of a running sandbox: delivers the given values (new names are added, known
    /// ones replaced), then reruns the image's on-restore hook.
    pub async fn sandbox_secrets_update(
        &self,
        id: &SandboxId,
        secrets: &kiln_api_types::Secrets,
    ) -> Result<(), CoreError> {
        secrets.validate().map_err(CoreError::BadRequest)?;
        if secrets.0.is_empty() {
            return Err(CoreError::BadRequest("no secrets given".to_owned()));
        }
        let sb = self.running(id)?;
        let _ops = sb.ops.lock().await;
        let mut merged = sb.extras().secrets.clone();
        merged
            .0
            .extend(secrets.0.iter().map(|(k, v)| (k.clone(), v.clone())));
        merged.validate().map_err(CoreError::BadRequest)?;
        guest::deliver_secrets(sb.agent(), secrets).await?;
        let hook = {
            let mut extras = sb.extras();
            extras.secrets = merged;
            extras.hook.clone()
        };
        if let Some(hook) = hook {
            guest::run_hook(sb.agent(), &hook).await?;
        }
        info!(sandbox_id = %id, count = secrets.0.len(), "secrets rotated");
        Ok(())
    }

    /// Saves running sandbox `id` as user snapshot `name`; the sandbox keeps running.
    pub async fn snapshot_create(
        &self,
        id: &SandboxId,
        name: &str,
    ) -> Result<kiln_api_types::SnapshotInfo, CoreError> {
        kiln_api_types::validate_snapshot_name(name).map_err(CoreError::BadRequest)?;
        let sb = self.running(id)?;
        let row = self
            .store
            .sandbox_get(id)?
            .ok_or_else(|| CoreError::SandboxNotFound(id.clone()))?;
        let image = kiln_image::get(self.home.root(), &row.image)?
            .filter(|i| i.id.to_string() == row.image_id)
            .ok_or_else(|| {
                CoreError::BadRequest(format!(
                    "sandbox {id} runs image {} (id {}), which has been removed or rebuilt since; it cannot be snapshotted",
                    row.image, row.image_id
                ))
            })?;
        let qemu = self.qemu().await?;
        let spec = warm::WarmSpec {
            qemu,
            accel: sb.vm().config().accel,
            image: &image,
            home: self.home.root(),
            cpus: row.cpus,
            memory_mib: row.memory_mib,
            mode: self.snapshot_mode(qemu),
        };
        usersnap::capture(&self.home, &spec, &sb, name).await
    }

    /// All snapshots (warm and user) with the running sandboxes that use them.
    pub fn snapshot_list(&self) -> Result<Vec<kiln_api_types::SnapshotInfo>, CoreError> {
        let rows = self.store.sandbox_list()?;
        let images = kiln_image::list(self.home.root())?;
        let mut out = usersnap::list(&self.home);
        for snap in &mut out {
            if snap.image.is_none() {
                snap.image = images
                    .iter()
                    .find(|i| i.id.to_string() == snap.image_id)
                    .map(|i| i.name.clone());
            }
            snap.used_by = users_of(&rows, &snap.name);
        }
        Ok(out)
    }

    /// Removes a snapshot; refused while a running sandbox was restored from it.
    pub fn snapshot_remove(&self, name: &str) -> Result<(), CoreError> {
        // Warm snapshots may be removed too; their names pass the same character rules.
        let plain = name.strip_prefix("warm-").map_or(name, |rest| rest);
        if plain.is_empty() || name.len() > 128 {
            return Err(CoreError::BadRequest(format!(
                "invalid snapshot name {name:?}"
            )));
        }
        kiln_api_types::validate_snapshot_name(plain).map_err(CoreError::BadRequest)?;
        let dir = warm::snapshots_dir(self.home.root()).join(name);
        if !dir.is_dir() {
            return Err(CoreError::SnapshotNotFound(name.to_owned()));
        }
        let users = users_of(&self.store.sandbox_list()?, name);
        if !users.is_empty() {
            let users: Vec<String> = users.iter().map(|id| id.to_string()).collect();
            return Err(CoreError::SnapshotInUse {
                name: name.to_owned(),
                users: users.join(", "),
            });
        }
        // Out of sight first (one rename), then deleted: never a half-removed snapshot.
        let gone = warm::snapshots_dir(self.home.root())
            .join(format!(".tmp-rm-{name}-{}", std::process::id()));
        std::fs::rename(&dir, &gone).map_err(|source| CoreError::Io {
            what: "remove",
            path: dir.clone(),
            source,
        })?;
        remove_dir(&gone);
        info!(snapshot = name, "snapshot removed");
        Ok(())
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

/// The sandboxes (booting or running) restored from snapshot `name`.
fn users_of(rows: &[SandboxRow], name: &str) -> Vec<SandboxId> {
    rows.iter()
        .filter(|r| r.snapshot.as_deref() == Some(name) && r.state != SandboxState::Failed)
        .map(|r| r.id.clone())
        .collect()
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
        snapshot: r.snapshot,
        publish: r
            .publish
            .split(',')
            .filter_map(|p| p.parse().ok())
            .collect(),
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

/// File name of the static guest agent that `scripts/build` installs beside `kiln`/`kilnd`.
/// Deliberately not `kiln-agent`: that name is cargo's own output for the agent package, and
/// a plain `cargo build --release --workspace` would overwrite it with a dynamic binary.
pub const AGENT_BINARY_NAME: &str = "kiln-agent-static";

/// Where the static guest agent binary is: `$KILN_AGENT`, else [`AGENT_BINARY_NAME`] beside
/// the running executable. Either way the file must be a static x86-64 executable (it runs
/// as `/init` in a guest without a dynamic loader); otherwise the error says how to fix it.
pub fn agent_binary() -> Result<PathBuf, CoreError> {
    let path = match std::env::var_os("KILN_AGENT").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().map_err(|source| CoreError::Io {
                what: "locate",
                path: PathBuf::from("/proc/self/exe"),
                source,
            })?;
            exe.with_file_name(AGENT_BINARY_NAME)
        }
    };
    check_agent_binary(&path)?;
    Ok(path)
}

/// The checks of [`agent_binary`] on a given path.
fn check_agent_binary(path: &std::path::Path) -> Result<(), CoreError> {
    const FIX: &str = "run scripts/build, which installs the static agent as \
                       target/release/kiln-agent-static, or point KILN_AGENT at a static build";
    if !path.exists() {
        return Err(CoreError::HostSetup(format!(
            "the guest agent binary was not found at {} ({FIX})",
            path.display()
        )));
    }
    kiln_image::check_static_exec(path).map_err(|e| {
        CoreError::HostSetup(format!(
            "{} cannot be the guest agent: {} ({FIX})",
            path.display(),
            kiln_image::error_chain(&e)
        ))
    })
}

#[cfg(test)]
mod agent_binary_tests {
    use super::*;

    #[test]
    fn check_agent_binary_dynamic_executable_names_the_fix() {
        // Debian's /bin/true is dynamically linked, like a plain `cargo build` of the agent.
        let err = check_agent_binary(std::path::Path::new("/bin/true"))
            .expect_err("a dynamic binary is refused");
        let text = err.to_string();
        assert!(text.contains("dynamically linked"), "{text}");
        assert!(text.contains("scripts/build"), "{text}");
    }

    #[test]
    fn check_agent_binary_missing_file_names_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = check_agent_binary(&dir.path().join(AGENT_BINARY_NAME))
            .expect_err("a missing binary is refused");
        let text = err.to_string();
        assert!(text.contains("not found"), "{text}");
        assert!(text.contains("kiln-agent-static"), "{text}");
    }
}
