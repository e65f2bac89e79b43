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

mod admission;
mod build_guest;
pub mod console;
pub mod desktop;
mod detached;
pub mod doctor;
pub mod error;
pub mod files;
mod guest;
pub mod images;
mod janitor;
mod jobs;
pub mod languages;
mod machine;
pub mod network;
mod owner;
pub mod paths;
mod pool;
mod ports;
mod reattach;
pub mod sandbox;
mod space;
mod start;
mod storage;
mod usersnap;
mod warm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_api_types::{
    Event, EventKind, ExecRequest, ImageBuildEvent, ImageInfo, JanitorReport, MachineSpec,
    SandboxFilter, SandboxId, SandboxInfo, SandboxState, SnapshotName,
};
use kiln_store::Store;
use tokio::sync::{OnceCell, broadcast, mpsc};

use crate::machine::MachinePlan;

/// Events a slow subscriber may fall behind by before it misses some (it is told so).
const EVENT_BACKLOG: usize = 1024;
use tracing::{info, warn};

pub use detached::{AttachItem, DetachedExec};
pub use error::CoreError;
pub use jobs::JobEvents;
pub use paths::Home;
pub use sandbox::{Exec, ExecOutput, Sandbox};

/// The engine. One per daemon; shared behind an `Arc`.
pub struct Engine {
    pub(crate) home: Home,
    pub(crate) store: Store,
    /// Live sandboxes: their owner's queue, and the sandbox itself (for shutdown).
    sandboxes: Mutex<HashMap<SandboxId, (owner::Handle, Arc<Sandbox>)>>,
    /// Lifecycle and exec events, for `GET /v1/events`.
    events: broadcast::Sender<Event>,
    /// Detached commands of every sandbox, by id.
    detached: Mutex<HashMap<kiln_api_types::ExecId, Arc<DetachedExec>>>,
    qemu: OnceCell<kiln_vmm::qemu::QemuInfo>,
    accel: OnceCell<kiln_vmm::accel::AccelVerdict>,
    /// What the startup janitor reclaimed and re-attached.
    janitor: Mutex<JanitorReport>,
    /// One lock per warm-snapshot key, so a snapshot is captured once.
    capture_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Whether the full-RAM snapshot mode was announced in the log.
    full_ram_announced: std::sync::atomic::AtomicBool,
    /// Network settings (resolvers, passt).
    pub(crate) net: network::NetSettings,
    /// The bridge mode's host side, once a bridge sandbox started.
    pub(crate) bridge: network::bridge::BridgeState,
    /// The warm pool.
    pub(crate) pools: pool::Pools,
    /// The budget for sandboxes, and the starts in flight.
    pub(crate) admission: admission::Admission,
    /// The job queue and the jobs in flight.
    pub(crate) jobs: jobs::Jobs,
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
        let net = network::NetSettings::from_env()?;
        let budget = admission::Budget::from_env()?;
        let job_settings = jobs::Settings::from_env()?;
        // Measured once (60 ms), off the runtime's threads, before any VM boots.
        let _ = tokio::task::spawn_blocking(kiln_vmm::tsc::host_tsc_khz).await;
        info!(
            memory_mib = budget.memory_mib,
            vcpus = budget.vcpus,
            "budget for sandboxes"
        );
        let janitor::Reclaimed {
            report: mut janitor,
            live,
        } = janitor::reclaim(&home, &store)?;
        if janitor != JanitorReport::default() {
            warn!(
                processes_killed = janitor.processes_killed,
                dirs_removed = janitor.dirs_removed,
                bytes_freed = janitor.bytes_freed,
                sandboxes_failed = janitor.sandboxes_failed,
                "reclaimed what a previous daemon left behind"
            );
        }
        let engine = Arc::new(Engine {
            home,
            store,
            sandboxes: Mutex::new(HashMap::new()),
            events: broadcast::channel(EVENT_BACKLOG).0,
            detached: Mutex::new(HashMap::new()),
            qemu: OnceCell::new(),
            accel: OnceCell::new(),
            janitor: Mutex::new(janitor.clone()),
            capture_locks: Mutex::new(HashMap::new()),
            full_ram_announced: std::sync::atomic::AtomicBool::new(false),
            net,
            bridge: network::bridge::BridgeState::default(),
            pools: pool::Pools::default(),
            admission: admission::Admission::new(budget),
            jobs: jobs::Jobs::new(job_settings),
        });
        let count = live.len() as u32;
        let started = std::time::Instant::now();
        let reattached = reattach::all(&engine, live).await;
        janitor.reattach_ms = started.elapsed().as_millis() as u64;
        janitor.sandboxes_reattached = reattached;
        janitor.sandboxes_failed += count - reattached;
        *engine.janitor.lock().unwrap_or_else(|e| e.into_inner()) = janitor;
        engine.start_pools()?;
        engine.jobs_start().await?;
        Ok(engine)
    }

    /// Takes a sandbox back under this engine (re-attach after a daemon restart).
    pub(crate) fn adopt(&self, id: SandboxId, handle: owner::Handle, sb: Arc<Sandbox>) {
        self.table().insert(id, (handle, sb));
    }

    /// The state directory.
    pub fn home(&self) -> &Home {
        &self.home
    }

    /// What the startup janitor reclaimed.
    pub fn janitor_report(&self) -> JanitorReport {
        self.janitor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn table(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<SandboxId, (owner::Handle, Arc<Sandbox>)>> {
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

    /// The events channel (lifecycle transitions, exec start and end).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Publishes an event (nobody listening is fine).
    pub(crate) fn publish(&self, id: &SandboxId, kind: EventKind) {
        let _ = self.events.send(event(id, kind));
    }

    /// Records a state transition in the store, then publishes it.
    pub(crate) fn record_state(&self, id: &SandboxId, to: SandboxState, reason: Option<String>) {
        // The reason is the sandbox's `error` while it is in a state kiln put it in.
        let error = match to {
            SandboxState::Failed | SandboxState::Unresponsive | SandboxState::Paused => {
                reason.as_deref()
            }
            _ => None,
        };
        let recorded = self
            .store
            .sandbox_set_state(id, to, None, error)
            .and_then(|_| match (to, error) {
                // Back in a state a user asked for: what went wrong before is over.
                (SandboxState::Running | SandboxState::Paused, None) => {
                    self.store.sandbox_set_error(id, None)
                }
                _ => Ok(true),
            });
        if let Err(e) = recorded {
            warn!(sandbox_id = %id, error = %error::error_chain(&e), "could not record state");
        }
        self.publish(id, EventKind::State { state: to, reason });
    }

    /// Drops the table entry of `sb` (if it is still the one registered under `id`).
    pub(crate) fn forget(&self, id: &SandboxId, sb: &Arc<Sandbox>) {
        let mut table = self.table();
        if table.get(id).is_some_and(|(_, cur)| Arc::ptr_eq(cur, sb)) {
            table.remove(id);
        }
    }

    /// Removes a sandbox's runtime directory, saves and row, and publishes its removal.
    pub(crate) fn remove_records(&self, id: &SandboxId, reason: &str) {
        self.remove_console_archive(id);
        network::release(self, id);
        self.detached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, d| d.sandbox() != id);
        remove_dir(&self.home.sandbox_dir(id));
        remove_dir(&self.home.saved_dir(id));
        // A desktop's review recording goes too, unless a failed action pinned it.
        match desktop::retention::remove_or_keep(
            &self.home.recording_dir(id),
            std::time::SystemTime::now(),
        ) {
            Ok(desktop::retention::Kept::Pinned { until }) => {
                info!(sandbox_id = %id, ?until, "review recording kept: pinned after a failed action");
            }
            Ok(_) => {}
            Err(e) => warn!(sandbox_id = %id, error = %e, "could not remove the review recording"),
        }
        match self.store.sandbox_delete(id) {
            Ok(true) => {
                self.publish(
                    id,
                    EventKind::Removed {
                        reason: reason.to_owned(),
                    },
                );
                info!(sandbox_id = %id, reason, "sandbox removed");
            }
            Ok(false) => {}
            Err(e) => {
                warn!(sandbox_id = %id, error = %error::error_chain(&e), "could not remove the sandbox's row")
            }
        }
    }

    /// Finds a sandbox by id, name, or unambiguous id prefix (with or without `sb-`).
    pub fn resolve(&self, key: &str) -> Result<SandboxId, CoreError> {
        let not_found = || CoreError::SandboxNotFound(key.to_owned());
        if key.is_empty() || key.len() > 128 || key.chars().any(char::is_control) {
            return Err(not_found());
        }
        if let Ok(id) = key.parse::<SandboxId>() {
            if self.store.sandbox_get(&id)?.is_some() {
                return Ok(id);
            }
            return Err(not_found());
        }
        let rows = self.store.sandbox_list()?;
        if let Some(row) = rows
            .iter()
            .find(|r| r.spec.name.as_ref().is_some_and(|n| n.as_str() == key))
        {
            return Ok(row.id.clone());
        }
        let hex = key.strip_prefix("sb-").unwrap_or(key);
        if hex.is_empty() {
            return Err(not_found());
        }
        let matches: Vec<&SandboxInfo> = rows
            .iter()
            .filter(|r| r.id.as_str()[3..].starts_with(hex))
            .collect();
        match matches.as_slice() {
            [one] => Ok(one.id.clone()),
            [] => Err(not_found()),
            many => Err(CoreError::AmbiguousSandbox {
                key: key.to_owned(),
                matches: many
                    .iter()
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The sandboxes that pass `filter`, oldest first.
    pub fn sandbox_list(&self, filter: &SandboxFilter) -> Result<Vec<SandboxInfo>, CoreError> {
        Ok(self
            .store
            .sandbox_list()?
            .into_iter()
            .filter(|r| filter.matches(r))
            .map(|r| self.with_live(r))
            .collect())
    }

    /// One sandbox.
    pub fn sandbox_get(&self, id: &SandboxId) -> Result<SandboxInfo, CoreError> {
        self.store
            .sandbox_get(id)?
            .map(|row| self.with_live(row))
            .ok_or_else(|| CoreError::SandboxNotFound(id.to_string()))
    }

    /// `info` with what only the running sandbox knows (its network).
    fn with_live(&self, mut info: SandboxInfo) -> SandboxInfo {
        if let Some((_, sb)) = self.table().get(&info.id) {
            info.status.network = sb.with_network(|live| live.status());
        }
        info
    }

    /// Changes a running sandbox's network policy (`kiln network set`): between `allow` and
    /// `nat`; connections the new policy forbids are reset at once.
    pub async fn sandbox_network_set(
        &self,
        id: &SandboxId,
        spec: &kiln_api_types::NetworkSpec,
    ) -> Result<SandboxInfo, CoreError> {
        spec.validate()?;
        let spec = spec.clone();
        self.call(id, |tx| owner::Op::Network(spec, tx)).await?;
        self.sandbox_get(id)
    }

    /// Destroys a sandbox: stops its VM, removes its runtime directory and its row.
    pub async fn sandbox_delete(&self, id: &SandboxId) -> Result<(), CoreError> {
        let handle = self.table().get(id).map(|(h, _)| h.clone());
        if let Some(handle) = handle
            && let Some(done) = handle
                .call(|r| owner::Op::Remove("removed".to_owned(), r))
                .await
        {
            return done;
        }
        // No owner (failed or never ran): only records are left.
        if self.store.sandbox_get(id)?.is_none() {
            return Err(CoreError::SandboxNotFound(id.to_string()));
        }
        self.remove_records(id, "removed");
        Ok(())
    }

    /// Sends `op` to the owner of `id`. Without a live owner the answer is the sandbox's
    /// current state (or that it does not exist).
    async fn call<T>(
        &self,
        id: &SandboxId,
        make: impl FnOnce(owner::Reply<T>) -> owner::Op,
    ) -> Result<T, CoreError> {
        let handle = self.table().get(id).map(|(h, _)| h.clone());
        if let Some(handle) = handle
            && let Some(answer) = handle.call(make).await
        {
            return answer;
        }
        match self.store.sandbox_get(id)? {
            Some(row) => Err(CoreError::WrongState {
                id: id.clone(),
                state: row.status.state,
                wanted: SandboxState::Running,
            }),
            None => Err(CoreError::SandboxNotFound(id.to_string())),
        }
    }

    /// One agent round trip, timed in the daemon.
    pub async fn sandbox_ping(&self, id: &SandboxId) -> Result<Duration, CoreError> {
        self.call(id, owner::Op::Ping).await
    }

    /// Starts a command in a running sandbox.
    pub async fn sandbox_exec(&self, id: &SandboxId, req: &ExecRequest) -> Result<Exec, CoreError> {
        req.validate().map_err(CoreError::BadRequest)?;
        self.call(id, |r| owner::Op::Exec(Box::new(req.clone()), r))
            .await
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
        self.call(id, |r| owner::Op::Secrets(secrets.clone(), r))
            .await
    }

    /// Saves a running or paused sandbox (memory and disk) and stops its VM (`kiln stop`).
    pub async fn sandbox_stop(&self, id: &SandboxId) -> Result<SandboxInfo, CoreError> {
        self.call(id, owner::Op::Stop).await?;
        self.sandbox_get(id)
    }

    /// Stops a running sandbox's vCPUs in place.
    pub async fn sandbox_pause(&self, id: &SandboxId) -> Result<SandboxInfo, CoreError> {
        self.call(id, owner::Op::Pause).await?;
        self.sandbox_get(id)
    }

    /// Lets a paused sandbox run again.
    pub async fn sandbox_resume(&self, id: &SandboxId) -> Result<SandboxInfo, CoreError> {
        self.call(id, owner::Op::Resume).await?;
        self.sandbox_get(id)
    }

    /// Sets a sandbox's remaining lifetime to `secs` from now.
    pub async fn sandbox_set_ttl(
        &self,
        id: &SandboxId,
        secs: u64,
    ) -> Result<SandboxInfo, CoreError> {
        kiln_api_types::names::check_duration("ttl_secs", secs)?;
        self.call(id, |r| owner::Op::Ttl(secs, r)).await?;
        self.sandbox_get(id)
    }

    /// Saves running sandbox `id` as user snapshot `name`; the sandbox keeps running.
    pub async fn snapshot_create(
        &self,
        id: &SandboxId,
        name: &SnapshotName,
    ) -> Result<kiln_api_types::SnapshotInfo, CoreError> {
        SnapshotName::user(name.as_str())?;
        self.call(id, |r| owner::Op::Snapshot(name.clone(), r))
            .await
    }

    /// Takes the user snapshot (called by the sandbox's owner task).
    pub(crate) async fn snapshot_of(
        &self,
        sb: &Arc<Sandbox>,
        name: &SnapshotName,
    ) -> Result<kiln_api_types::SnapshotInfo, CoreError> {
        let root = warm::snapshots_dir(self.home.root());
        self.capture_running(sb, &root, name.as_str(), "snapshotted")
            .await
    }

    /// Captures running `sb` as snapshot `name` under `root` (a user snapshot, or a save of
    /// `kiln stop`), with the machine it runs; `what` completes "it cannot be …" in the error
    /// when its image has been removed or rebuilt since it started.
    async fn capture_running(
        &self,
        sb: &Arc<Sandbox>,
        root: &Path,
        name: &str,
        what: &str,
    ) -> Result<kiln_api_types::SnapshotInfo, CoreError> {
        let id = sb.id();
        let row = self.sandbox_get(id)?;
        let image = kiln_image::get(self.home.root(), row.status.image.as_str())?
            .filter(|i| i.id.to_string() == row.status.image_id)
            .ok_or_else(|| {
                CoreError::BadRequest(format!(
                    "sandbox {id} runs image {} (id {}), which has been removed or rebuilt since; it cannot be {what}",
                    row.status.image, row.status.image_id
                ))
            })?;
        let qemu = self.qemu().await?;
        let plan = MachinePlan {
            qemu,
            accel: sb.vm().config().accel,
            image: &image,
            home: self.home.root(),
            machine: MachineSpec {
                cpus: row.status.cpus,
                memory_mib: row.status.memory_mib,
                screen: sb.vm().config().display.map(|d| kiln_api_types::Screen {
                    width: d.width,
                    height: d.height,
                }),
            },
            mode: self.snapshot_mode(qemu),
            nic: sb.vm().config().nic.clone(),
        };
        let what = format!("for sandbox {id} to be {what}");
        let disk = std::fs::metadata(sb.vm().config().run_dir.join("disk.qcow2"))
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
        space::ensure(&what, root, (u64::from(row.status.memory_mib) << 20) + disk)?;
        usersnap::capture_into(&self.home, root, &plan, sb, name)
            .await
            .map_err(|e| space::explain(e, &what, root))
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
    pub fn snapshot_remove(&self, name: &SnapshotName) -> Result<(), CoreError> {
        let name = name.as_str();
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
        discard_snapshot(&dir)?;
        info!(snapshot = name, "snapshot removed");
        Ok(())
    }

    /// Builds (or confirms up to date) the image of `src`, sending progress to `events`.
    pub async fn image_build(
        self: &Arc<Self>,
        src: images::RecipeSource,
        force: bool,
        keep_kernel: bool,
        events: mpsc::Sender<ImageBuildEvent>,
    ) -> Result<(ImageInfo, bool), CoreError> {
        images::build(self, src, force, keep_kernel, events).await
    }

    /// Checks that `src` names something to build (before a build streams).
    pub fn image_recipe_check(&self, src: &images::RecipeSource) -> Result<(), CoreError> {
        images::check(self.home.root(), src)
    }

    /// Checks an import source and name before an import streams (on a blocking thread:
    /// a disk image is inspected with `qemu-img info`); returns the image name.
    pub async fn image_import_check(
        &self,
        source: &str,
        name: Option<&str>,
    ) -> Result<String, CoreError> {
        let (source, name) = (source.to_owned(), name.map(str::to_owned));
        tokio::task::spawn_blocking(move || images::check_import(&source, name.as_deref()))
            .await
            .map_err(|e| CoreError::HostSetup(format!("import check task panicked: {e}")))?
    }

    /// Imports a container image or a disk image (see [`images::import`]).
    pub async fn image_import(
        self: &Arc<Self>,
        source: String,
        name: Option<String>,
        events: mpsc::Sender<ImageBuildEvent>,
    ) -> Result<ImageInfo, CoreError> {
        images::import(self, source, name, events).await
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
        let _: kiln_api_types::ImageName = name.parse()?;
        let Some(image) = kiln_image::get(self.home.root(), name)? else {
            return Err(CoreError::ImageNotFound {
                name: name.to_owned(),
            });
        };
        let id = image.id.to_string();
        // Sandboxes (also stopped ones: `kiln start` needs the image) and user snapshots
        // that run on it keep it.
        let mut users: Vec<String> = self
            .store
            .sandbox_list()?
            .iter()
            .filter(|r| r.status.image_id == id && r.status.state != SandboxState::Failed)
            .map(|r| format!("sandbox {}", r.id))
            .collect();
        users.extend(
            usersnap::list(&self.home)
                .into_iter()
                .filter(|s| s.kind == "user" && s.image_id == id)
                .map(|s| format!("snapshot {}", s.name)),
        );
        if !users.is_empty() {
            return Err(CoreError::ImageInUse {
                name: name.to_owned(),
                users: users.join(", "),
            });
        }
        // Its warm snapshots (each about the size of guest RAM) go with it: nothing else
        // can restore them.
        let root = warm::snapshots_dir(self.home.root());
        let prefix = format!("warm-{id}-");
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let file_name = entry.file_name();
            let Some(snap) = file_name.to_str().filter(|n| n.starts_with(&prefix)) else {
                continue;
            };
            match discard_snapshot(&entry.path()) {
                Ok(()) => {
                    info!(
                        snapshot = snap,
                        image = name,
                        "warm snapshot removed with its image"
                    )
                }
                Err(e) => {
                    warn!(snapshot = snap, error = %e.chain(), "could not remove a warm snapshot of a removed image")
                }
            }
        }
        kiln_image::remove(self.home.root(), name)?;
        Ok(())
    }

    /// What kiln's state takes on disk, by category, and what `storage_prune` would remove
    /// (`kiln df`).
    pub async fn storage_df(self: &Arc<Self>) -> Result<kiln_api_types::DiskUsage, CoreError> {
        let engine = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let (survey, _caches) = engine.storage_survey()?;
            Ok(survey.usage())
        })
        .await
        .map_err(|e| CoreError::HostSetup(format!("disk usage task panicked: {e}")))?
    }

    /// Removes what nothing uses: warm snapshots of images that are gone, unused build
    /// caches, dead builds' directories, saves and consoles of removed sandboxes (`kiln
    /// prune`); with `dry_run`, only says what would go.
    pub async fn storage_prune(
        self: &Arc<Self>,
        dry_run: bool,
    ) -> Result<kiln_api_types::PruneReport, CoreError> {
        let engine = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            // The caches' lock is held until every removal is done.
            let (survey, _caches) = engine.storage_survey()?;
            let report = storage::prune(&survey, dry_run, &mut |e| engine.prune_one(e));
            info!(
                dry_run,
                removed = report.reclaimed.len(),
                kept = report.kept.len(),
                failed = report.failed.len(),
                disk_bytes = report.reclaimed_disk_bytes,
                "prune"
            );
            Ok(report)
        })
        .await
        .map_err(|e| CoreError::HostSetup(format!("prune task panicked: {e}")))?
    }

    /// After a build or import replaced an image: the warm snapshots nothing can restore any
    /// more (of an image id that is gone, or of a same-id rebuild's old disk) and no sandbox
    /// uses are removed now, instead of waiting for `kiln prune` (each is about the size of
    /// guest RAM). Best effort: what cannot go is left to `kiln prune`, which says why.
    pub(crate) async fn discard_stale_warm(self: &Arc<Self>) {
        let engine = Arc::clone(self);
        let done = tokio::task::spawn_blocking(move || {
            let (mut survey, _caches) = engine.storage_survey()?;
            survey
                .entries
                .retain(|e| e.kind == kiln_api_types::UsageKind::WarmSnapshots);
            Ok::<_, CoreError>(storage::prune(&survey, false, &mut |e| engine.prune_one(e)))
        })
        .await;
        match done {
            Ok(Ok(report)) if !report.reclaimed.is_empty() => info!(
                removed = report.reclaimed.len(),
                disk_bytes = report.reclaimed_disk_bytes,
                "stale warm snapshots removed after an image build"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e.chain(), "could not look for stale warm snapshots"),
            Err(e) => warn!(error = %e, "stale warm snapshot removal panicked"),
        }
    }

    /// Surveys the home with the engine's facts. The caches' lock is returned held when no
    /// build holds it (`None`: a build runs, and the caches are left alone).
    fn storage_survey(
        &self,
    ) -> Result<(storage::Survey, Option<kiln_image::CacheLock>), CoreError> {
        let caches = kiln_image::try_lock_caches(self.home.root())?;
        let rows = self.store.sandbox_list()?;
        let images = kiln_image::list(self.home.root())?;
        let facts = storage::Facts {
            rows: &rows,
            images: &images,
            build_running: caches.is_none(),
            me: std::process::id(),
        };
        Ok((storage::survey(&self.home, &facts), caches))
    }

    /// Removes one reclaimable item. A warm snapshot is first taken from the starts: its
    /// capture lock (held by a start that captures or verifies it), then the rows are read
    /// again (a sandbox that began restoring it since the survey keeps it).
    fn prune_one(&self, entry: &storage::Entry) -> storage::Outcome {
        let _start = if entry.kind == kiln_api_types::UsageKind::WarmSnapshots {
            let lock = Arc::clone(
                self.capture_locks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(entry.name.clone())
                    .or_default(),
            );
            let Ok(guard) = lock.try_lock_owned() else {
                return storage::Outcome::Held(
                    "a sandbox start is capturing or verifying it".into(),
                );
            };
            let rows = match self.store.sandbox_list() {
                Ok(rows) => rows,
                Err(e) => return storage::Outcome::Failed(error::error_chain(&e)),
            };
            let users = users_of(&rows, &entry.name);
            if !users.is_empty() {
                let users: Vec<String> = users.iter().map(|id| id.to_string()).collect();
                return storage::Outcome::Held(format!("in use by sandbox {}", users.join(", ")));
            }
            Some(guard)
        } else {
            None
        };
        match storage::remove_entry(self.home.root(), entry) {
            Ok(()) => {
                info!(path = %entry.rel.display(), disk_bytes = entry.size.disk, "pruned");
                storage::Outcome::Removed
            }
            Err(e) => {
                warn!(path = %entry.rel.display(), error = %e, "could not prune");
                storage::Outcome::Failed(e)
            }
        }
    }

    /// Daemon shutdown: lets go of every sandbox, leaving its VM running for the next
    /// daemon to re-attach (`kiln daemon stop --all` removes them first).
    pub async fn shutdown(&self) {
        self.jobs_shutdown().await;
        self.pool_shutdown().await;
        let all: Vec<_> = self.table().drain().collect();
        for (id, (handle, sb)) in all {
            if handle.call(owner::Op::Detach).await.is_none() {
                // The owner ended meanwhile (removed or failed): nothing to keep.
                sb.detach();
            }
            info!(sandbox_id = %id, "sandbox left running for the next daemon");
        }
    }
}

/// The sandboxes (booting or running) restored from snapshot `name`.
fn users_of(rows: &[SandboxInfo], name: &str) -> Vec<SandboxId> {
    rows.iter()
        .filter(|r| {
            r.status.snapshot.as_deref() == Some(name) && r.status.state != SandboxState::Failed
        })
        .map(|r| r.id.clone())
        .collect()
}

/// An event about sandbox `id`, stamped now.
pub(crate) fn event(id: &SandboxId, kind: EventKind) -> Event {
    Event {
        time_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        sandbox: id.clone(),
        kind,
    }
}

/// Removes a published snapshot directory: out of sight first (one rename to a `.tmp-rm-`
/// name the janitor also cleans), then deleted, so there is never a half-removed snapshot.
fn discard_snapshot(dir: &Path) -> Result<(), CoreError> {
    let gone = out_of_sight(dir)?;
    remove_dir(&gone);
    Ok(())
}

/// Renames snapshot directory `dir` to a `.tmp-rm-<name>-<pid>` name beside it (which no
/// reader looks at and the janitor cleans) and returns the new path.
pub(crate) fn out_of_sight(dir: &Path) -> Result<PathBuf, CoreError> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let gone = dir.with_file_name(format!(".tmp-rm-{name}-{}", std::process::id()));
    std::fs::rename(dir, &gone).map_err(|source| CoreError::Io {
        what: "remove",
        path: dir.to_owned(),
        source,
    })?;
    Ok(gone)
}

/// Removes a directory kiln owns (runtime directory, saves, a snapshot taken out of sight),
/// clearing the immutable flags of published snapshot files first.
pub(crate) fn remove_dir(dir: &std::path::Path) {
    if let Err(e) = kiln_snapshot::remove_tree(dir) {
        warn!(path = %dir.display(), error = %error::error_chain(&e), "could not remove directory");
    }
}

/// `KILN_NO_SNAPSHOT=1` (in the daemon's environment) turns warm snapshots off.
fn snapshots_disabled() -> bool {
    std::env::var_os("KILN_NO_SNAPSHOT").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api_types::{SandboxSpec, SandboxStatus, StartSource};

    fn row(id: &str, name: Option<&str>) -> SandboxInfo {
        SandboxInfo {
            id: id.parse().unwrap(),
            spec: SandboxSpec {
                name: name.map(|n| n.parse().unwrap()),
                ..SandboxSpec::default()
            },
            status: SandboxStatus {
                network: None,
                state: SandboxState::Stopped,
                image: "base".parse().unwrap(),
                image_id: "x".into(),
                cpus: 1,
                memory_mib: 256,
                accel: "tcg".into(),
                created_unix: 1,
                boot_ms: None,
                source: StartSource::Cold,
                snapshot: None,
                expires_unix: None,
                error: None,
                warnings: Vec::new(),
            },
        }
    }

    #[tokio::test]
    async fn resolve_takes_ids_names_and_unambiguous_prefixes() {
        let tmp = tempfile::tempdir().unwrap();
        let engine = Engine::start(Home::new(tmp.path().to_owned()))
            .await
            .unwrap();
        engine
            .store
            .sandbox_insert(&row("sb-aaaaaaaaaaa1", Some("web")))
            .unwrap();
        engine
            .store
            .sandbox_insert(&row("sb-aaaaaaaaaaa2", None))
            .unwrap();
        engine
            .store
            .sandbox_insert(&row("sb-bbbbbbbbbbbb", None))
            .unwrap();
        let id = |s: &str| s.parse::<SandboxId>().unwrap();
        assert_eq!(
            engine.resolve("sb-aaaaaaaaaaa2").unwrap(),
            id("sb-aaaaaaaaaaa2")
        );
        assert_eq!(engine.resolve("web").unwrap(), id("sb-aaaaaaaaaaa1"));
        assert_eq!(engine.resolve("bbb").unwrap(), id("sb-bbbbbbbbbbbb"));
        assert_eq!(engine.resolve("sb-b").unwrap(), id("sb-bbbbbbbbbbbb"));
        match engine.resolve("aaaa") {
            Err(CoreError::AmbiguousSandbox { matches, .. }) => {
                assert!(matches.contains("sb-aaaaaaaaaaa1") && matches.contains("sb-aaaaaaaaaaa2"));
            }
            other => panic!("expected ambiguity, got {other:?}"),
        }
        for missing in ["sb-cccccccccccc", "ccc", "sb-", "", "nope"] {
            assert!(
                matches!(engine.resolve(missing), Err(CoreError::SandboxNotFound(_))),
                "{missing:?}"
            );
        }
        assert!(matches!(
            engine.resolve("a\nb"),
            Err(CoreError::SandboxNotFound(_))
        ));
    }
}
