//! Starting sandboxes: the engine's start paths, one room.
//!
//! Owns `Engine::sandbox_create` (a new sandbox from an image — taken from the warm pool,
//! restored from the image's warm snapshot, or cold-booted — or from a user snapshot),
//! `Engine::sandbox_start` (back from a stop's save), and what they share: admission, the
//! network plan, the warm snapshot's capture, and `launch`, which puts a started VM into
//! service (secrets, on-restore hook, published ports, owner task, `running` recorded).
//!
//! Must not: keep state of its own (the table, the store and the pools are the engine's), or
//! leave anything of a start that failed: a sandbox that never ran loses its row and its
//! runtime directory, and its VM is shut down.

use std::path::Path;
use std::sync::Arc;

use kiln_api_types::{
    EventKind, MachineSpec, SandboxId, SandboxInfo, SandboxSource, SandboxSpec, SandboxState,
    SandboxStatus, StartSource,
};
use tracing::{info, warn};

use crate::error::CoreError;
use crate::machine::MachinePlan;
use crate::sandbox::Sandbox;
use crate::{
    Engine, guest, network, owner, pool, ports, remove_dir, sandbox, snapshots_disabled, space,
    unix_now, usersnap, warm,
};

impl Engine {
    /// Starts a sandbox as `spec` says: from a built image (restoring its warm snapshot, or
    /// cold-booting) or from a user snapshot. Returns once its agent answers, its secrets are
    /// in place, the image's on-restore hook has run and its owner task serves it.
    pub async fn sandbox_create(
        self: &Arc<Self>,
        spec: &SandboxSpec,
    ) -> Result<SandboxInfo, CoreError> {
        spec.validate()?;
        let (image, machine, user_snap) = match &spec.source {
            SandboxSource::Snapshot { snapshot } => {
                let u = usersnap::open(&self.home, snapshot)?;
                (u.image.clone(), u.machine, Some(u))
            }
            SandboxSource::Image { image, machine, .. } => {
                let image =
                    kiln_image::get(self.home.root(), image.as_str())?.ok_or_else(|| {
                        CoreError::ImageNotFound {
                            name: image.to_string(),
                        }
                    })?;
                let machine = MachineSpec {
                    screen: crate::machine::resolve_screen(&image, machine.screen)?,
                    ..*machine
                };
                (image, machine, None)
            }
        };
        let cold = matches!(spec.source, SandboxSource::Image { cold: true, .. });
        // Room for its disk overlay to start with.
        space::ensure("to start a sandbox", &self.home.run_dir(), 0)?;
        // Published ports are bound first: a port in use fails before anything starts.
        let bound = ports::bind(&spec.publish)?;
        let qemu_info = self.qemu().await?;
        let accel = self
            .accel(
                &image.kernel_path(self.home.root()),
                &image.initramfs_path(self.home.root()),
            )
            .await?
            .accel;

        // A sandbox restored ahead of demand, for starts whose VM it fits (an image's warm
        // snapshot, no network device).
        let poolable = user_snap.is_none()
            && !cold
            && !snapshots_disabled()
            && spec.network == kiln_api_types::NetworkSpec::None;
        let pooled = if poolable {
            self.pool_take(&image, machine).await
        } else {
            None
        };
        // A pooled sandbox is counted already; any other start must fit the budget.
        let _reservation = match pooled {
            Some(_) => None,
            None => Some(
                self.admit(
                    machine,
                    format!(
                        "to start a sandbox of image {} ({} vCPU, {} MiB)",
                        image.name, machine.cpus, machine.memory_mib
                    ),
                )
                .await?,
            ),
        };
        let id = pooled
            .as_ref()
            .map_or_else(SandboxId::random, |p| p.sb.id().clone());
        let run_dir = self.home.sandbox_dir(&id);
        let discard_pooled = |pooled: Option<pool::Pooled>| async move {
            if let Some(p) = pooled {
                p.sb.shutdown().await;
            }
        };
        if let Err(source) = std::fs::create_dir_all(&run_dir) {
            discard_pooled(pooled).await;
            return Err(CoreError::Io {
                what: "create",
                path: run_dir.clone(),
                source,
            });
        }
        let created_unix = unix_now();
        let row = SandboxInfo {
            id: id.clone(),
            spec: spec.redacted(),
            status: SandboxStatus {
                state: SandboxState::Creating,
                image: image.name.parse()?,
                image_id: image.id.to_string(),
                cpus: machine.cpus,
                memory_mib: machine.memory_mib,
                accel: accel.to_string(),
                created_unix,
                boot_ms: None,
                source: StartSource::Cold,
                // Recorded from the start: a snapshot being restored is already in use.
                snapshot: user_snap.as_ref().map(|u| u.name.clone()),
                expires_unix: spec.lifetime.ttl_secs.map(|t| created_unix + t),
                error: None,
                warnings: Vec::new(),
                network: None,
            },
        };
        if let Err(e) = self.store.sandbox_insert(&row) {
            discard_pooled(pooled).await;
            remove_dir(&run_dir);
            return Err(e.into());
        }
        self.publish(
            &id,
            EventKind::State {
                state: SandboxState::Creating,
                reason: None,
            },
        );
        let net = match self
            .plan_network(&id, &spec.network, user_snap.as_ref().map(|u| u.nic))
            .await
        {
            Ok(net) => net,
            Err(e) => {
                discard_pooled(pooled).await;
                self.remove_records(&id, "failed to start");
                return Err(e);
            }
        };
        let plan = MachinePlan {
            qemu: qemu_info,
            accel,
            image: &image,
            home: self.home.root(),
            machine,
            mode: match &user_snap {
                Some(u) => u.mode,
                None => self.snapshot_mode(qemu_info),
            },
            nic: nic_of(net.as_ref(), user_snap.as_ref().is_some_and(|u| u.nic)),
        };
        let mut warnings = Vec::new();
        let from_pool = pooled.is_some();
        let started = match (&user_snap, pooled) {
            (_, Some(p)) => Ok((p.sb, Some(p.snapshot))),
            (Some(u), None) => usersnap::restore(&plan, u, &id, &run_dir)
                .await
                .map(|sb| (sb, Some(u.name.clone()))),
            (None, None) => {
                let restored = if cold || snapshots_disabled() {
                    None
                } else {
                    match self.warm_start(&plan, &id, &run_dir).await {
                        Ok(sb) => Some(sb),
                        Err(why) => {
                            // Said once to the caller and as an event, not only in the log.
                            let message = format!("cold boot instead of a warm restore: {why}");
                            self.publish(
                                &id,
                                EventKind::Warning {
                                    message: message.clone(),
                                },
                            );
                            warnings.push(message);
                            None
                        }
                    }
                };
                match restored {
                    Some(sb) => Ok((sb, Some(plan.name()))),
                    None => self
                        .cold_boot(&plan, &id, &run_dir)
                        .await
                        .map(|sb| (sb, None)),
                }
            }
        };
        let (sb, snapshot) = match started {
            Ok(v) => v,
            Err(e) => {
                // Nothing of a sandbox that never ran is kept: its row and directory go.
                self.remove_records(&id, "failed to start");
                return Err(e);
            }
        };
        let source = match (from_pool, snapshot.is_some()) {
            (true, _) => StartSource::Pool,
            (false, true) => StartSource::Snapshot,
            (false, false) => StartSource::Cold,
        };
        let launch = Launch {
            sb,
            secrets: spec.secrets.clone(),
            secret_env: spec.secret_env,
            hook: image.recipe.on_restore.clone(),
            defaults: sandbox::ExecDefaults::of(&image.recipe),
            bound,
            expires_unix: row.status.expires_unix,
            idle_timeout_secs: spec.lifetime.idle_timeout_secs,
            source,
            snapshot,
            net,
        };
        if let Err(e) = self.launch(launch).await {
            self.remove_records(&id, "failed to start");
            return Err(e);
        }
        let mut info = self.sandbox_get(&id)?;
        info.status.warnings = warnings;
        Ok(info)
    }

    /// Puts a started VM into service: secrets delivered, the image's on-restore hook run,
    /// published ports served, its owner task started, `running` recorded and published.
    /// On error the VM is shut down (the caller decides what happens to the records).
    async fn launch(self: &Arc<Self>, l: Launch) -> Result<(), CoreError> {
        let sb = l.sb;
        let id = sb.id().clone();
        {
            let mut extras = sb.extras();
            extras.secrets = l.secrets.clone();
            extras.secret_env = l.secret_env;
            extras.hook = l.hook.clone();
            extras.defaults = l.defaults.clone();
        }
        let ready = async {
            if let Some(net) = l.net {
                network::attach(self, &sb, net, true).await?;
            }
            if !l.secrets.is_empty() {
                guest::deliver_secrets(sb.agent(), &l.secrets).await?;
            }
            if let Some(hook) = &l.hook {
                guest::run_hook(sb.agent(), hook, &l.defaults.image_env()).await?;
            }
            ports::serve(&sb, l.bound)?;
            self.store
                .sandbox_set_source(&id, l.source, l.snapshot.as_deref())?;
            Ok::<_, CoreError>(())
        }
        .await;
        if let Err(e) = ready {
            sb.shutdown().await;
            return Err(e);
        }
        let boot_ms = sb.boot.as_millis() as u64;
        let handle = owner::spawn(
            self,
            Arc::clone(&sb),
            SandboxState::Running,
            l.expires_unix,
            l.idle_timeout_secs,
        );
        self.table().insert(id.clone(), (handle, Arc::clone(&sb)));
        self.store
            .sandbox_set_state(&id, SandboxState::Running, Some(boot_ms), None)?;
        if let Ok(row) = self.sandbox_get(&id) {
            self.recording_open(&sb, row.status.image.as_str(), l.source.as_str());
        }
        self.publish(
            &id,
            EventKind::State {
                state: SandboxState::Running,
                reason: None,
            },
        );
        info!(sandbox_id = %id, boot_ms, pid = sb.pid(), source = l.source.as_str(), snapshot = l.snapshot.as_deref().unwrap_or("-"), "sandbox running");
        Ok(())
    }

    /// Brings a stopped sandbox back from its save (`kiln start`): same id, name, labels,
    /// disk and memory. Secret values were never saved: `secrets` are delivered anew, then
    /// the image's on-restore hook runs. A start that fails leaves it stopped, its save kept.
    pub async fn sandbox_start(
        self: &Arc<Self>,
        id: &SandboxId,
        secrets: &kiln_api_types::Secrets,
    ) -> Result<SandboxInfo, CoreError> {
        secrets.validate().map_err(CoreError::BadRequest)?;
        space::ensure(&format!("to start sandbox {id}"), &self.home.run_dir(), 0)?;
        if !self
            .store
            .sandbox_transition(id, SandboxState::Stopped, SandboxState::Creating)?
        {
            let row = self.sandbox_get(id)?;
            return Err(CoreError::WrongState {
                id: id.clone(),
                state: row.status.state,
                wanted: SandboxState::Stopped,
            });
        }
        self.publish(
            id,
            EventKind::State {
                state: SandboxState::Creating,
                reason: None,
            },
        );
        let machine = self.sandbox_get(id).map(|row| MachineSpec {
            cpus: row.status.cpus,
            memory_mib: row.status.memory_mib,
            screen: None,
        });
        let admitted = match machine {
            Ok(m) => {
                self.admit(
                    m,
                    format!(
                        "to start sandbox {id} ({} vCPU, {} MiB)",
                        m.cpus, m.memory_mib
                    ),
                )
                .await
            }
            Err(e) => Err(e),
        };
        let started = match admitted {
            Ok(_reservation) => self.start_saved(id, secrets).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(()) => self.sandbox_get(id),
            Err(e) => {
                let reason = format!("start failed, still stopped: {}", e.chain());
                remove_dir(&self.home.sandbox_dir(id));
                let _ =
                    self.store
                        .sandbox_set_state(id, SandboxState::Stopped, None, Some(&reason));
                self.publish(
                    id,
                    EventKind::State {
                        state: SandboxState::Stopped,
                        reason: Some(reason),
                    },
                );
                Err(e)
            }
        }
    }

    async fn start_saved(
        self: &Arc<Self>,
        id: &SandboxId,
        secrets: &kiln_api_types::Secrets,
    ) -> Result<(), CoreError> {
        let row = self.sandbox_get(id)?;
        let root = self.home.saved_dir(id);
        let generation = latest_save(&root).ok_or_else(|| {
            CoreError::HostSetup(format!(
                "sandbox {id} is stopped but its save in {} is missing",
                root.display()
            ))
        })?;
        let snap = usersnap::open_in(&self.home, &root, &generation)?;
        let bound = ports::bind(&row.spec.publish)?;
        let qemu = self.qemu().await?;
        let accel = self
            .accel(
                &snap.image.kernel_path(self.home.root()),
                &snap.image.initramfs_path(self.home.root()),
            )
            .await?
            .accel;
        let net = self
            .plan_network(id, &row.spec.network, Some(snap.nic))
            .await?;
        let plan = MachinePlan {
            qemu,
            accel,
            image: &snap.image,
            home: self.home.root(),
            machine: snap.machine,
            mode: snap.mode,
            nic: nic_of(net.as_ref(), snap.nic),
        };
        let run_dir = self.home.sandbox_dir(id);
        remove_dir(&run_dir);
        std::fs::create_dir_all(&run_dir).map_err(|source| CoreError::Io {
            what: "create",
            path: run_dir.clone(),
            source,
        })?;
        let sb = usersnap::restore(&plan, &snap, id, &run_dir).await?;
        let expires_unix = row
            .spec
            .lifetime
            .ttl_secs
            .map(|t| unix_now().saturating_add(t));
        self.store.sandbox_set_expiry(id, expires_unix)?;
        self.launch(Launch {
            sb,
            secrets: secrets.clone(),
            secret_env: row.spec.secret_env,
            hook: snap.image.recipe.on_restore.clone(),
            defaults: sandbox::ExecDefaults::of(&snap.image.recipe),
            bound,
            expires_unix,
            idle_timeout_secs: row.spec.lifetime.idle_timeout_secs,
            source: StartSource::Snapshot,
            snapshot: None,
            net,
        })
        .await
    }

    /// Plans sandbox `id`'s network for a start (fresh lease and MAC); `snapshot_nic` says
    /// whether the snapshot it restores had a network device, if it restores one that must.
    async fn plan_network(
        &self,
        id: &SandboxId,
        spec: &kiln_api_types::NetworkSpec,
        snapshot_nic: Option<bool>,
    ) -> Result<Option<network::Planned>, CoreError> {
        if snapshot_nic == Some(false) && spec.has_nic() {
            return Err(CoreError::BadRequest(format!(
                "the snapshot was taken of a sandbox without a network device, so it starts \
                 only with network none (asked: {})",
                spec.mode()
            )));
        }
        network::release(self, id);
        network::plan(self, id, spec).await
    }

    /// Saves `sb` for `kiln stop` (called by its owner task, which then stops the VM):
    /// memory and disk, secrets scrubbed first, as a new generation under its save
    /// directory; older generations are removed once the VM is gone ([`Engine::prune_saves`]).
    pub(crate) async fn save_for_stop(&self, sb: &Arc<Sandbox>) -> Result<(), CoreError> {
        let id = sb.id();
        let root = self.home.saved_dir(id);
        std::fs::create_dir_all(&root).map_err(|source| CoreError::Io {
            what: "create",
            path: root.clone(),
            source,
        })?;
        let next = latest_save(&root)
            .and_then(|g| g.strip_prefix("gen-").and_then(|n| n.parse::<u64>().ok()))
            .map_or(1, |n| n + 1);
        self.capture_running(sb, &root, &format!("gen-{next}"), "saved")
            .await?;
        // The save depends on the image only (its disk layer was rebased).
        self.store
            .sandbox_set_source(id, StartSource::Snapshot, None)?;
        Ok(())
    }

    /// Removes every save of `id` but the latest (its VM no longer uses them).
    pub(crate) fn prune_saves(&self, id: &SandboxId) {
        let root = self.home.saved_dir(id);
        let Some(keep) = latest_save(&root) else {
            return;
        };
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if entry.file_name().to_str() != Some(keep.as_str()) {
                remove_dir(&entry.path());
            }
        }
    }

    /// Boots a sandbox from scratch and runs the image's on-boot commands and readiness probe.
    async fn cold_boot(
        &self,
        plan: &MachinePlan<'_>,
        id: &SandboxId,
        run_dir: &Path,
    ) -> Result<Arc<Sandbox>, CoreError> {
        let sb = Sandbox::boot(plan, id, run_dir)
            .await
            .map_err(|e| space::explain(e, &format!("to start sandbox {id}"), run_dir))?;
        if let Err(e) = guest::prepare(sb.agent(), &plan.image.recipe).await {
            sb.shutdown().await;
            return Err(e);
        }
        Ok(sb)
    }

    /// Restores a sandbox from the image's warm snapshot, capturing that snapshot first if
    /// there is none. `Err(why)` (after one warning in the log) means: cold-boot instead.
    pub(crate) async fn warm_start(
        &self,
        spec: &MachinePlan<'_>,
        id: &SandboxId,
        run_dir: &Path,
    ) -> Result<Arc<Sandbox>, String> {
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
                    let why = format!(
                        "warm snapshot {name} is unusable and was removed ({}); the next start captures a new one",
                        e.chain()
                    );
                    warn!(snapshot = %name, reason = %e.chain(), "warm snapshot unusable and removed; cold boot (the next start captures a new one)");
                    return Err(why);
                }
            } else {
                let cap_dir = self.home.run_dir().join(format!("capture-{}", id.as_str()));
                let captured = self.capture_warm(spec, &name, &cap_dir).await;
                remove_dir(&cap_dir);
                match captured {
                    Ok(_) => info!(snapshot = %name, "warm snapshot captured"),
                    Err(e) => {
                        warn!(snapshot = %name, reason = %e.chain(), "warm snapshot capture failed; cold boot");
                        return Err(format!(
                            "capturing warm snapshot {name} failed: {}",
                            e.chain()
                        ));
                    }
                }
            }
        }
        let started = std::time::Instant::now();
        match warm::restore(spec, &dir, run_dir, id.as_str()).await {
            Ok((vm, agent, _ack)) => {
                Ok(Sandbox::assemble(id.clone(), vm, agent, started.elapsed()))
            }
            Err(e) => {
                warn!(sandbox_id = %id, snapshot = %name, reason = %e.chain(), "restore failed; snapshot removed, cold boot");
                // A snapshot that failed to restore is not trusted again: the next start
                // captures a fresh one.
                remove_dir(&dir);
                // The cold boot starts from an empty runtime directory.
                remove_dir(run_dir);
                let _ = std::fs::create_dir_all(run_dir);
                Err(format!(
                    "restoring warm snapshot {name} failed and it was removed ({}); the next start captures a new one",
                    e.chain()
                ))
            }
        }
    }

    /// Captures warm snapshot `name` with a capture VM in `cap_dir`, checking first that the
    /// VM's memory file fits; a failure on a full file system is reported as `no_space`.
    async fn capture_warm(
        &self,
        spec: &MachinePlan<'_>,
        name: &str,
        cap_dir: &Path,
    ) -> Result<(), CoreError> {
        let what = format!("to capture warm snapshot {name}");
        let run = self.home.run_dir();
        space::ensure(&what, &run, u64::from(spec.machine.memory_mib) << 20)?;
        std::fs::create_dir_all(cap_dir).map_err(|source| CoreError::Io {
            what: "create",
            path: cap_dir.to_owned(),
            source,
        })?;
        warm::capture(
            &spec.for_capture(),
            cap_dir,
            sandbox::boot_deadline(spec.accel),
        )
        .await
        .map(|_| ())
        .map_err(|e| space::explain(e, &what, &run))
    }
}

/// What [`Engine::launch`] puts into service.
struct Launch {
    sb: Arc<Sandbox>,
    secrets: kiln_api_types::Secrets,
    secret_env: bool,
    hook: Option<kiln_image::GuestCommand>,
    defaults: sandbox::ExecDefaults,
    bound: Vec<ports::Bound>,
    expires_unix: Option<u64>,
    idle_timeout_secs: Option<u64>,
    source: StartSource,
    snapshot: Option<String>,
    /// Its network, planned before the VM started.
    net: Option<network::Planned>,
}

/// The VM's network device: the planned one, else (a snapshot taken with a device, started
/// with network `none`) a device whose frames go nowhere.
fn nic_of(net: Option<&network::Planned>, snapshot_has_nic: bool) -> Option<kiln_vmm::Nic> {
    match net {
        Some(n) => Some(n.nic.clone()),
        None if snapshot_has_nic => Some(kiln_vmm::Nic {
            mac: kiln_net::Mac::random().to_string(),
            backend: kiln_vmm::NicBackend::Stream,
        }),
        None => None,
    }
}

/// The newest save generation (`gen-N`) under `root`.
fn latest_save(root: &Path) -> Option<String> {
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u64 = name.strip_prefix("gen-")?.parse().ok()?;
            Some((n, name))
        })
        .max()
        .map(|(_, name)| name)
}
