//! The warm pool: sandboxes restored from their image's warm snapshot *ahead of demand*, so
//! that a start takes one that is ready instead of restoring (under TCG a restore costs
//! 0.25–0.35 s before the first command answers; taking a pooled sandbox costs what delivering
//! secrets and the on-restore hook cost).
//!
//! ```text
//!  PUT /v1/pools/{image} ─▶ Engine::pool_set ─▶ targets (store: `pools`) ─┐ wake
//!  config.toml [[pool]]  ─▶ Engine::pool_configure ─▶ targets ───────────┤
//!                                                                         ▼
//!  refill task: while a pool holds fewer than its size: warm_start(plan, id, run/<id>)
//!               (restore + fresh identity) ─▶ warm-up command ─▶ ready queue
//!  sandbox_create(image, machine, no network, not cold) ─▶ take() ─▶ launch (secrets,
//!               on-restore hook, ports, owner task) ─▶ running, source `pool` ─▶ wake
//! ```
//!
//! Owns: the pool targets (per image name and machine size), the pooled VMs and the refill
//! task. A pooled sandbox has an id and a runtime directory (`run/<id>`, where its QEMU's
//! sockets are) but no row in the store and no owner task: nothing lists it as a sandbox.
//! Must not: deliver secrets or run hooks (acquisition does, through the engine's `launch`,
//! like every start), or hold a lock across an `.await`.
//!
//! Invariants:
//! - a pooled sandbox is handed out at most once: [`Pools::take`] removes it from its queue
//!   under the lock;
//! - a pooled sandbox of an image that was rebuilt since it was restored, or whose QEMU has
//!   exited, is shut down, never handed out (the queue is checked at every take, and against
//!   the image's id at every refill);
//! - a crashed daemon's pooled VMs are QEMUs without a row: the next daemon's janitor kills
//!   them and removes their directories, like any half-started sandbox;
//! - starts with a network, a user snapshot, `cold` or `KILN_NO_SNAPSHOT` never take from
//!   the pool (their VM is made differently).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kiln_api_types::{
    ImageName, MachineSpec, PoolInfo, PoolList, PoolOrigin, PoolSetRequest, SandboxId,
};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::admission::{Cost, Verdict};
use crate::error::CoreError;
use crate::machine::MachinePlan;
use crate::sandbox::Sandbox;
use crate::{Engine, remove_dir};

/// Longest a warm-up command may run when its pool does not say.
const DEFAULT_WARMUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a pool waits after a failed refill before it tries again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);
/// Longest a daemon shutdown waits for a pool's restore in flight.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);
/// How long a pool waits when the budget has no room for a refill.
const WAIT_FOR_ROOM: Duration = Duration::from_secs(1);
/// How often the refill task looks at the pools without being woken (rebuilt images).
const RECHECK: Duration = Duration::from_secs(5);

/// A pool's key: image name and machine size.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    image: String,
    cpus: u32,
    memory_mib: u32,
    screen: Option<kiln_api_types::Screen>,
}

impl Key {
    fn of(image: &str, machine: MachineSpec) -> Key {
        Key {
            image: image.to_owned(),
            cpus: machine.cpus,
            memory_mib: machine.memory_mib,
            screen: machine.screen,
        }
    }

    fn machine(&self) -> MachineSpec {
        MachineSpec {
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            screen: self.screen,
        }
    }
}

/// What a pool should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTarget {
    /// Sandboxes to keep ready.
    pub size: u32,
    /// Run once in each pooled sandbox after its restore.
    pub warmup: Option<Vec<String>>,
    /// Longest the warm-up may run.
    pub warmup_timeout: Duration,
    /// Where the size was set.
    pub origin: PoolOrigin,
}

impl PoolTarget {
    /// The target a request asks for.
    pub fn of_request(req: &PoolSetRequest, origin: PoolOrigin) -> PoolTarget {
        PoolTarget {
            size: req.size,
            warmup: req.warmup.clone(),
            warmup_timeout: req
                .warmup_timeout_secs
                .map_or(DEFAULT_WARMUP_TIMEOUT, Duration::from_secs),
            origin,
        }
    }
}

/// One sandbox restored ahead of demand.
pub(crate) struct Pooled {
    /// The sandbox (its id is its hostname and its runtime directory's name).
    pub sb: Arc<Sandbox>,
    /// The image id it was restored from.
    image_id: String,
    /// The warm snapshot it was restored from.
    pub snapshot: String,
}

struct Pool {
    target: PoolTarget,
    ready: VecDeque<Pooled>,
    filling: u32,
    handed_out: u64,
    misses: u64,
    last_error: Option<String>,
    /// No refill before this (after a failure).
    not_before: Option<Instant>,
}

impl Pool {
    fn new(target: PoolTarget) -> Pool {
        Pool {
            target,
            ready: VecDeque::new(),
            filling: 0,
            handed_out: 0,
            misses: 0,
            last_error: None,
            not_before: None,
        }
    }
}

/// Every pool of the engine.
#[derive(Default)]
pub(crate) struct Pools {
    pools: Mutex<BTreeMap<Key, Pool>>,
    /// Wakes the refill task (a permit is kept when it is not waiting).
    wake: Arc<Notify>,
    /// Set at daemon shutdown: no refill starts, and one that ends gives its VM back.
    closed: std::sync::atomic::AtomicBool,
}

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Pool>> {
        // Plain data; a panic elsewhere cannot leave it inconsistent.
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets pool `image`/`machine`'s target; returns the sandboxes it no longer needs (to be
    /// shut down by the caller: no lock across an await).
    fn set(&self, image: &str, machine: MachineSpec, target: PoolTarget) -> Vec<Pooled> {
        let mut pools = self.lock();
        let pool = pools
            .entry(Key::of(image, machine))
            .or_insert_with(|| Pool::new(target.clone()));
        let warmup_changed = pool.target.warmup != target.warmup;
        pool.target = target;
        pool.not_before = None;
        pool.last_error = None;
        let keep = if warmup_changed {
            0
        } else {
            pool.target.size as usize
        };
        let excess = pool.ready.len().saturating_sub(keep);
        let out: Vec<Pooled> = pool.ready.drain(..excess).collect();
        drop(pools);
        self.wake.notify_one();
        out
    }

    /// A ready sandbox of `image` (at `image_id`) and `machine`, if the pool has one.
    /// Counts a miss when the pool exists but is empty.
    pub(crate) fn take(
        &self,
        image: &str,
        image_id: &str,
        machine: MachineSpec,
    ) -> (Option<Pooled>, Vec<Pooled>) {
        let mut pools = self.lock();
        let Some(pool) = pools.get_mut(&Key::of(image, machine)) else {
            return (None, Vec::new());
        };
        // Restored from an older build of the image, or its QEMU is gone (killed, crashed):
        // never handed out.
        let (stale, fresh): (Vec<Pooled>, Vec<Pooled>) = pool
            .ready
            .drain(..)
            .partition(|p| p.image_id != image_id || p.sb.vm().try_exit().is_some());
        pool.ready = fresh.into();
        let got = pool.ready.pop_front();
        match &got {
            Some(_) => pool.handed_out += 1,
            None if pool.target.size > 0 => pool.misses += 1,
            None => {}
        }
        drop(pools);
        self.wake.notify_one();
        (got, stale)
    }

    /// The next pool to refill (its `filling` counted up), if one is short.
    fn next_fill(&self) -> Option<(Key, PoolTarget)> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let now = Instant::now();
        let mut pools = self.lock();
        let (key, pool) = pools.iter_mut().find(|(_, p)| {
            (p.ready.len() as u32 + p.filling) < p.target.size
                && p.not_before.is_none_or(|t| t <= now)
        })?;
        pool.filling += 1;
        Some((key.clone(), pool.target.clone()))
    }

    /// A refill's end: the sandbox joins the pool if its target still wants it, else it is
    /// returned to be shut down — after a shutdown began, still counted as filling (the
    /// `bool`), so that the shutdown waits until [`Pools::fill_discarded`] says it is gone.
    fn filled(
        &self,
        key: &Key,
        target: &PoolTarget,
        result: Result<Pooled, String>,
    ) -> Option<(Pooled, bool)> {
        let mut pools = self.lock();
        let Some(pool) = pools.get_mut(key) else {
            return result.ok().map(|p| (p, false));
        };
        if self.closed.load(std::sync::atomic::Ordering::Acquire) && result.is_ok() {
            return result.ok().map(|p| (p, true));
        }
        pool.filling = pool.filling.saturating_sub(1);
        match result {
            Ok(p) => {
                pool.last_error = None;
                let wanted = (pool.ready.len() as u32) < pool.target.size
                    && pool.target.warmup == target.warmup;
                if wanted {
                    pool.ready.push_back(p);
                    None
                } else {
                    Some((p, false))
                }
            }
            Err(why) => {
                pool.last_error = Some(why);
                pool.not_before = Some(Instant::now() + RETRY_AFTER_FAILURE);
                None
            }
        }
    }

    /// Pooled sandboxes whose image is no longer at their id (rebuilt or removed) or whose
    /// QEMU has exited.
    fn take_stale(&self, current: &dyn Fn(&str) -> Option<String>) -> Vec<Pooled> {
        let mut pools = self.lock();
        let mut out = Vec::new();
        for (key, pool) in pools.iter_mut() {
            let id = current(&key.image);
            let (stale, fresh): (Vec<Pooled>, Vec<Pooled>) = pool
                .ready
                .drain(..)
                .partition(|p| Some(&p.image_id) != id.as_ref() || p.sb.vm().try_exit().is_some());
            pool.ready = fresh.into();
            out.extend(stale);
        }
        out
    }

    /// What the pooled VMs cost (ready and being restored).
    pub(crate) fn cost(&self) -> Cost {
        let pools = self.lock();
        pools.iter().fold(Cost::default(), |acc, (key, p)| {
            let n = p.ready.len() as u64 + u64::from(p.filling);
            let one = Cost::of(key.machine());
            Cost {
                memory_mib: acc.memory_mib + n * one.memory_mib,
                vcpus: acc.vcpus + n * one.vcpus,
            }
        })
    }

    /// Ready pooled sandboxes worth at least `short` (or all there are), to give their room
    /// to a start: from the largest pools first.
    pub(crate) fn shrink(&self, short: Cost) -> Vec<Pooled> {
        let mut pools = self.lock();
        let mut freed = Cost::default();
        let mut out = Vec::new();
        loop {
            if freed.memory_mib >= short.memory_mib && freed.vcpus >= short.vcpus {
                break;
            }
            let Some((key, pool)) = pools
                .iter_mut()
                .filter(|(_, p)| !p.ready.is_empty())
                .max_by_key(|(_, p)| p.ready.len())
            else {
                break;
            };
            let one = Cost::of(key.machine());
            if let Some(p) = pool.ready.pop_back() {
                freed.memory_mib += one.memory_mib;
                freed.vcpus += one.vcpus;
                out.push(p);
            }
        }
        out
    }

    /// A refill that found no room in the budget: not filling after all, and not again
    /// before a while (no error: the pool waits for room).
    fn unfill(&self, key: &Key) {
        let mut pools = self.lock();
        if let Some(pool) = pools.get_mut(key) {
            pool.filling = pool.filling.saturating_sub(1);
            pool.not_before = Some(Instant::now() + WAIT_FOR_ROOM);
        }
    }

    /// A refill that ended after the shutdown began: its VM is shut down now.
    fn fill_discarded(&self, key: &Key) {
        if let Some(pool) = self.lock().get_mut(key) {
            pool.filling = pool.filling.saturating_sub(1);
        }
    }

    /// Restores in flight.
    fn filling(&self) -> u32 {
        self.lock().values().map(|p| p.filling).sum()
    }

    /// Every pooled sandbox (daemon shutdown).
    fn drain(&self) -> Vec<Pooled> {
        let mut pools = self.lock();
        pools
            .values_mut()
            .flat_map(|p| p.ready.drain(..).collect::<Vec<_>>())
            .collect()
    }

    /// What `GET /v1/pools` shows.
    fn list(&self) -> Vec<PoolInfo> {
        let pools = self.lock();
        pools
            .iter()
            .filter_map(|(key, p)| {
                Some(PoolInfo {
                    image: key.image.parse::<ImageName>().ok()?,
                    machine: key.machine(),
                    size: p.target.size,
                    ready: p.ready.len() as u32,
                    filling: p.filling,
                    handed_out: p.handed_out,
                    misses: p.misses,
                    warmup: p.target.warmup.clone(),
                    origin: p.target.origin,
                    last_error: p.last_error.clone(),
                })
            })
            .collect()
    }
}

/// Shuts pooled sandboxes down and removes their runtime directories.
pub(crate) async fn discard(engine: &Engine, pooled: Vec<Pooled>, why: &str) {
    for p in pooled {
        let id = p.sb.id().clone();
        p.sb.shutdown().await;
        remove_dir(&engine.home.sandbox_dir(&id));
        info!(sandbox_id = %id, reason = why, "pooled sandbox discarded");
    }
}

impl Engine {
    /// Sets the pool of `image` (API: kept in the store, wins over the config file).
    pub async fn pool_set(
        &self,
        image: &ImageName,
        req: &PoolSetRequest,
    ) -> Result<PoolInfo, CoreError> {
        req.validate()?;
        let machine = self.pool_machine(image, req.cpus, req.memory_mib)?;
        self.store.pool_set(&kiln_store::StoredPool {
            image: image.to_string(),
            cpus: machine.cpus,
            memory_mib: machine.memory_mib,
            size: req.size,
            warmup: req.warmup.clone(),
            warmup_timeout_secs: req.warmup_timeout_secs,
        })?;
        let excess = self.pools.set(
            image.as_str(),
            machine,
            PoolTarget::of_request(req, PoolOrigin::Api),
        );
        discard(self, excess, "pool made smaller").await;
        self.pool_list()
            .pools
            .into_iter()
            .find(|p| p.image == *image && p.machine == machine)
            .ok_or_else(|| CoreError::HostSetup("the pool vanished while being set".into()))
    }

    /// The machine size a pool (or a job) means: the sizes given, else the image's
    /// defaults, else kiln's (as a start of the image without sizes would ask).
    pub(crate) fn pool_machine(
        &self,
        image: &ImageName,
        cpus: Option<u32>,
        memory_mib: Option<u32>,
    ) -> Result<MachineSpec, CoreError> {
        let manifest = kiln_image::get(self.home.root(), image.as_str())?.ok_or_else(|| {
            CoreError::ImageNotFound {
                name: image.to_string(),
            }
        })?;
        let machine = MachineSpec {
            cpus: cpus
                .or(manifest.recipe.cpus)
                .unwrap_or(kiln_api_types::DEFAULT_CPUS),
            memory_mib: memory_mib
                .or(manifest.recipe.memory_mib)
                .unwrap_or(kiln_api_types::DEFAULT_MEMORY_MIB),
            screen: crate::machine::resolve_screen(&manifest, None)?,
        };
        machine.validate()?;
        Ok(machine)
    }

    /// The config file's pools (the daemon passes them at start). A pool the API set (kept
    /// in the store) wins over the config file's of the same image and size.
    pub async fn pool_configure(
        &self,
        pools: &[(ImageName, PoolSetRequest)],
    ) -> Result<(), CoreError> {
        let stored = self.store.pools()?;
        for (image, req) in pools {
            req.validate()?;
            let machine = self.pool_machine(image, req.cpus, req.memory_mib)?;
            let overridden = stored.iter().any(|s| {
                s.image == image.as_str()
                    && s.cpus == machine.cpus
                    && s.memory_mib == machine.memory_mib
            });
            if !overridden {
                let excess = self.pools.set(
                    image.as_str(),
                    machine,
                    PoolTarget::of_request(req, PoolOrigin::Config),
                );
                discard(self, excess, "pool made smaller").await;
            }
        }
        Ok(())
    }

    /// Every pool.
    pub fn pool_list(&self) -> PoolList {
        PoolList {
            pools: self.pools.list(),
        }
    }

    /// Loads the stored pools and starts the refill task (engine start).
    pub(crate) fn start_pools(self: &Arc<Engine>) -> Result<(), CoreError> {
        for s in self.store.pools()? {
            let machine = MachineSpec {
                cpus: s.cpus,
                memory_mib: s.memory_mib,
                screen: kiln_image::get(self.home.root(), &s.image)
                    .ok()
                    .flatten()
                    .and_then(|m| crate::machine::resolve_screen(&m, None).ok().flatten()),
            };
            let req = PoolSetRequest {
                size: s.size,
                cpus: Some(s.cpus),
                memory_mib: Some(s.memory_mib),
                warmup: s.warmup,
                warmup_timeout_secs: s.warmup_timeout_secs,
            };
            let _ = self.pools.set(
                &s.image,
                machine,
                PoolTarget::of_request(&req, PoolOrigin::Api),
            );
        }
        tokio::spawn(refill(Arc::downgrade(self)));
        Ok(())
    }

    /// A pooled sandbox for a start of `image` at `machine`, if there is one ready; stale
    /// ones found on the way are shut down.
    pub(crate) async fn pool_take(
        &self,
        image: &kiln_image::ImageManifest,
        machine: MachineSpec,
    ) -> Option<Pooled> {
        let (got, stale) = self.pools.take(&image.name, &image.id.to_string(), machine);
        discard(self, stale, "its image was rebuilt or its VM is gone").await;
        got
    }

    /// Daemon shutdown: pooled sandboxes have no row to be re-attached by; they go. A
    /// restore in flight is waited for (its VM is shut down when it ends), up to
    /// [`SHUTDOWN_WAIT`]; one still running then is left to the next daemon's janitor.
    pub(crate) async fn pool_shutdown(&self) {
        self.pools
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        let since = Instant::now();
        while self.pools.filling() > 0 && since.elapsed() < SHUTDOWN_WAIT {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let all = self.pools.drain();
        discard(self, all, "daemon shutdown").await;
    }

    /// Restores one sandbox for pool `key` and runs its warm-up.
    async fn pool_fill(
        self: &Arc<Engine>,
        key: &Key,
        target: &PoolTarget,
    ) -> Result<Pooled, String> {
        let image = kiln_image::get(self.home.root(), &key.image)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("image {} is not built", key.image))?;
        let qemu = self.qemu().await.map_err(|e| e.to_string())?;
        let accel = self
            .accel(
                &image.kernel_path(self.home.root()),
                &image.initramfs_path(self.home.root()),
            )
            .await
            .map_err(|e| e.to_string())?
            .accel;
        let plan = MachinePlan {
            qemu,
            accel,
            image: &image,
            home: self.home.root(),
            machine: key.machine(),
            mode: self.snapshot_mode(qemu),
            nic: None,
        };
        let id = SandboxId::random();
        let run_dir = self.home.sandbox_dir(&id);
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| format!("create {}: {e}", run_dir.display()))?;
        let sb = match self.warm_start(&plan, &id, &run_dir).await {
            Ok(sb) => sb,
            Err(why) => {
                remove_dir(&run_dir);
                return Err(why);
            }
        };
        // Without a warm-up of its own, a pool of a language's image runs the language's
        // toolchain once (`python3 -c pass`: the interpreter's start is then translated, and
        // a python job takes 168 instead of 376 ms), any other pool `true`: one command
        // through the agent translates the exec path (fork, exec, exit, the stream's end)
        // once, so the first command of whoever takes the sandbox does not pay for it
        // (measured in docs/benchmarks.md). A sandbox whose default warm-up fails is pooled
        // all the same.
        let (argv, explicit) = match &target.warmup {
            Some(argv) => (argv.clone(), true),
            None => (default_warmup(&image.name), false),
        };
        let warmed = crate::guest::run(sb.agent(), &argv, None, target.warmup_timeout).await;
        let failed = match warmed {
            Ok(r) if r.code == 0 => None,
            Ok(r) => Some(r.describe(
                &format!("the pool's warm-up `{}`", argv.join(" ")),
                target.warmup_timeout,
            )),
            Err(e) => Some(format!("the pool's warm-up: {e}")),
        };
        match failed {
            Some(why) if explicit => {
                sb.shutdown().await;
                remove_dir(&run_dir);
                return Err(why);
            }
            Some(why) => {
                info!(sandbox_id = %id, reason = %why, "default warm-up failed; pooled without it")
            }
            None => {}
        }
        Ok(Pooled {
            sb,
            image_id: image.id.to_string(),
            snapshot: plan.name(),
        })
    }
}

/// The refill task: one restore at a time (restores compete for the same CPUs as the
/// sandboxes in use), until every pool holds its size; ends with the engine.
async fn refill(engine: Weak<Engine>) {
    loop {
        let Some(e) = engine.upgrade() else {
            return;
        };
        let current = |image: &str| {
            kiln_image::get(e.home.root(), image)
                .ok()
                .flatten()
                .map(|m| m.id.to_string())
        };
        let stale = e.pools.take_stale(&current);
        discard(
            &e,
            stale,
            "its image was rebuilt or removed, or its VM is gone",
        )
        .await;
        match e.pools.next_fill() {
            Some((key, target)) => {
                // The refill is counted as filling already: room for it means room beside
                // everything else.
                let own = Cost::of(key.machine());
                let used = e.used();
                let used = Cost {
                    memory_mib: used.memory_mib.saturating_sub(own.memory_mib),
                    vcpus: used.vcpus.saturating_sub(own.vcpus),
                };
                let _reservation = match e.admission.try_admit(used, own) {
                    Verdict::Admitted(r) => r,
                    Verdict::Short(_) => {
                        e.pools.unfill(&key);
                        continue;
                    }
                };
                let started = Instant::now();
                let result = e.pool_fill(&key, &target).await;
                match &result {
                    Ok(p) => {
                        info!(sandbox_id = %p.sb.id(), image = %key.image, ms = started.elapsed().as_millis() as u64, "pooled sandbox ready")
                    }
                    Err(why) => {
                        warn!(image = %key.image, reason = %why, "pool refill failed; retried later")
                    }
                }
                if let Some((extra, counted)) = e.pools.filled(&key, &target, result) {
                    discard(&e, vec![extra], "its pool no longer wants it").await;
                    if counted {
                        e.pools.fill_discarded(&key);
                    }
                }
            }
            None => {
                let wake = Arc::clone(&e.pools.wake);
                drop(e);
                let _ = tokio::time::timeout(RECHECK, wake.notified()).await;
            }
        }
    }
}

/// The warm-up of a pool that names none: the language's own for a language's image
/// (`languages.rs`), else `true`.
fn default_warmup(image: &str) -> Vec<String> {
    crate::languages::Language::all()
        .iter()
        .find(|l| l.image() == image)
        .map_or(&["true"][..], |l| l.info().warmup)
        .iter()
        .map(|a| (*a).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_warmup_is_the_language_s_own_for_its_image() {
        assert_eq!(default_warmup("python"), ["python3", "-c", "pass"]);
        assert_eq!(default_warmup("cpp"), ["g++", "--version"]);
        assert_eq!(default_warmup("base"), ["true"]);
    }

    fn target(size: u32) -> PoolTarget {
        PoolTarget {
            size,
            warmup: None,
            warmup_timeout: DEFAULT_WARMUP_TIMEOUT,
            origin: PoolOrigin::Api,
        }
    }

    #[test]
    fn next_fill_counts_filling_and_stops_at_size() {
        let pools = Pools::default();
        let m = MachineSpec::default();
        assert!(pools.set("python", m, target(2)).is_empty());
        let a = pools.next_fill().expect("short of 2");
        let b = pools.next_fill().expect("short of 2, one filling");
        assert_eq!(a.0, b.0);
        assert!(pools.next_fill().is_none(), "two filling: none more");
        // A failed refill is retried only after a pause.
        assert!(pools.filled(&a.0, &a.1, Err("no image".into())).is_none());
        assert!(pools.next_fill().is_none(), "backing off after a failure");
        let info = pools.list();
        assert_eq!(info[0].filling, 1);
        assert_eq!(info[0].last_error.as_deref(), Some("no image"));
        // Setting the target again clears the back-off.
        let _ = pools.set("python", m, target(2));
        assert!(pools.next_fill().is_some());
    }

    #[test]
    fn take_counts_misses_only_for_configured_pools() {
        let pools = Pools::default();
        let m = MachineSpec::default();
        let (got, stale) = pools.take("python", "id1", m);
        assert!(got.is_none() && stale.is_empty());
        assert!(pools.list().is_empty(), "no pool made by a take");
        let _ = pools.set("python", m, target(1));
        let (got, _) = pools.take("python", "id1", m);
        assert!(got.is_none());
        assert_eq!(pools.list()[0].misses, 1);
        // Another size is another pool.
        let other = MachineSpec {
            cpus: 2,
            memory_mib: 512,
        };
        let (got, _) = pools.take("python", "id1", other);
        assert!(got.is_none());
        assert_eq!(pools.list().len(), 1);
    }
}
