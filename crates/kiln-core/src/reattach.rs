//! Re-attaching the sandboxes a previous daemon left running.
//!
//! QEMU outlives the daemon (no parent-death signal), so after a crash, an upgrade or
//! `kiln daemon stop` the next daemon finds its sandboxes still running (the janitor hands
//! them over) and takes them back, all at once:
//!
//! ```text
//!   Vm::attach (pidfile + vm.json, pidfd, QMP) ─▶ [paused: cont] ─▶ agent resync (SYNC/ACK)
//!     ─▶ secrets read back from /run/secrets ─▶ [paused: stop] ─▶ network relay started
//!     ─▶ published ports bound
//!     ─▶ owner task ─▶ serving, in the state it was in
//! ```
//!
//! What does not survive: commands that were running (the agent ends a session's commands
//! when a new host resyncs) and open tunnel connections. Must not: touch a sandbox whose VM
//! is not the one recorded (the janitor checked pid and start time; `Vm::attach` re-checks
//! through a pidfd). Invariant: a sandbox that cannot be re-attached is killed and recorded
//! `failed` with the reason; it is never left running unowned.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_api_types::{SandboxInfo, SandboxState};
use kiln_vmm::Vm;
use tracing::{info, warn};

use crate::error::CoreError;
use crate::sandbox::Sandbox;
use crate::{Engine, guest, owner, ports, remove_dir};

/// How long a running guest's agent may take to answer the resync.
const RESYNC_DEADLINE: Duration = Duration::from_secs(10);

/// Re-attaches every sandbox in `live` concurrently; returns how many came back.
pub(crate) async fn all(engine: &Arc<Engine>, live: Vec<SandboxInfo>) -> u32 {
    if live.is_empty() {
        return 0;
    }
    let started = Instant::now();
    let count = live.len();
    let results = futures_util::future::join_all(live.into_iter().map(|row| {
        let engine = Arc::clone(engine);
        async move {
            let id = row.id.clone();
            match one(&engine, row).await {
                Ok(()) => true,
                Err(e) => {
                    let reason =
                        format!("could not re-attach after a daemon restart: {}", e.chain());
                    warn!(sandbox_id = %id, %reason, "sandbox lost");
                    engine.record_state(&id, SandboxState::Failed, Some(reason));
                    remove_dir(&engine.home.sandbox_dir(&id));
                    false
                }
            }
        }
    }))
    .await;
    let ok = results.iter().filter(|r| **r).count() as u32;
    info!(
        reattached = ok,
        failed = count as u32 - ok,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "re-attached the sandboxes a previous daemon left running"
    );
    ok
}

async fn one(engine: &Arc<Engine>, row: SandboxInfo) -> Result<(), CoreError> {
    let id = row.id.clone();
    let run_dir = engine.home.sandbox_dir(&id);
    let vm = Vm::attach(&run_dir).await?;
    let paused = row.status.state == SandboxState::Paused;
    let attached = async {
        if paused {
            // A paused guest cannot answer the resync: it runs for the handshake only.
            vm.resume().await?;
        }
        let (agent, _info) = crate::sandbox::connect_agent(&vm, RESYNC_DEADLINE).await?;
        // The daemon keeps no secret values: the guest's copies are read back, for
        // re-delivery after a user snapshot and as exec environment.
        let mut secrets = kiln_api_types::Secrets::default();
        for name in row.spec.secrets.0.keys() {
            match guest::read_secret(&agent, name).await {
                Ok(Some(value)) => {
                    secrets.0.insert(name.clone(), value);
                }
                Ok(None) => warn!(sandbox_id = %id, secret = %name, "secret no longer in the guest"),
                Err(e) => warn!(sandbox_id = %id, secret = %name, error = %e.chain(), "secret could not be read back"),
            }
        }
        if paused {
            vm.pause().await?;
        }
        Ok::<_, CoreError>((agent, secrets))
    }
    .await;
    let (agent, secrets) = match attached {
        Ok(v) => v,
        Err(e) => {
            vm.kill().await;
            return Err(e);
        }
    };
    let boot = Duration::from_millis(row.status.boot_ms.unwrap_or(0));
    let sb = Sandbox::assemble(id.clone(), vm, agent, boot);
    {
        let mut extras = sb.extras();
        extras.secrets = secrets;
        extras.secret_env = row.spec.secret_env;
        let image = kiln_image::get(engine.home.root(), row.status.image.as_str())
            .ok()
            .flatten()
            .filter(|i| i.id.to_string() == row.status.image_id);
        extras.hook = image.as_ref().and_then(|i| i.recipe.on_restore.clone());
        extras.defaults = image
            .as_ref()
            .map(|i| crate::sandbox::ExecDefaults::of(&i.recipe))
            .unwrap_or_default();
    }
    // The previous daemon's relay and passt ended with it: start them again. The guest
    // keeps its interface; a failure leaves it without a network (closed), reported.
    if let Err(e) = crate::network::reattach(engine, &sb, &row.spec.network).await {
        warn!(sandbox_id = %id, error = %e.chain(), "network not restored; the sandbox has no network until it restarts");
    }
    // The previous daemon's listeners closed with it: bind the ports again. A port taken
    // meanwhile is reported; the sandbox itself is kept.
    match ports::bind(&row.spec.publish).and_then(|bound| ports::serve(&sb, bound)) {
        Ok(()) => {}
        Err(e) => warn!(sandbox_id = %id, error = %e.chain(), "published ports not restored"),
    }
    let state = match row.status.state {
        // It answered the resync: it is responsive again.
        SandboxState::Unresponsive => {
            let reason = "the guest agent answers again after a daemon restart".to_owned();
            engine.record_state(&id, SandboxState::Running, Some(reason));
            SandboxState::Running
        }
        state => state,
    };
    let handle = owner::spawn(
        engine,
        Arc::clone(&sb),
        state,
        row.status.expires_unix,
        row.spec.lifetime.idle_timeout_secs,
    );
    engine.adopt(id.clone(), handle, Arc::clone(&sb));
    engine.recording_open(&sb, row.status.image.as_str(), "reattached");
    info!(sandbox_id = %id, %state, "sandbox re-attached");
    Ok(())
}
