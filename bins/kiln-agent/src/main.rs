//! kiln guest agent binary: the initramfs `/init` (PID 1) or, for debugging, a normal process.
//!
//! Wires the library together: boot duties when PID 1, then a current-thread tokio runtime
//! serving the virtio-serial port forever (reconnects included). Shutdown requests and fatal
//! boot errors power the guest off when PID 1; nothing here ever returns to the kernel.
//!
//! Only as PID 1 does the agent get the real identity sink (`apply_identity` after a snapshot
//! restore changes the guest's clock, RNG, hostname and machine id) and the real network
//! (`configure_network`); otherwise it answers those requests `unsupported`.
//!
//! Not PID 1: skips boot duties, serves the port named on the kernel command line (or the
//! device path in `KILN_AGENT_PORT`) and exits on shutdown.

mod zalloc;

/// Freed memory is zeroed (see `zalloc`): no secret outlives its use in the agent's heap.
#[global_allocator]
static ALLOC: zalloc::ZeroOnFree = zalloc::ZeroOnFree;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_agent::console::{error_chain, say, warn};
use kiln_agent::init::{self, BootError, Cmdline};
use kiln_agent::port::{VirtioPort, find_port};
use kiln_agent::{Agent, AgentConfig, ReapMode, Reaper, ServeEnd, SystemIdentity, SystemNetwork};

/// How long to wait for the agent's virtio-serial port to appear.
const PORT_WAIT: Duration = Duration::from_secs(30);
/// A serve call shorter than this counts as a quick EOF (backed off to avoid spinning).
const QUICK_EOF: Duration = Duration::from_secs(1);
/// Consecutive quick EOFs tolerated before backing off.
const QUICK_EOFS_FREE: u32 = 3;

fn main() -> ExitCode {
    let is_init = std::process::id() == 1;
    if is_init {
        init::install_panic_power_off();
    }
    let result = run(is_init);
    if let Err(e) = &result {
        init::console_line(&format!("kiln-agent: fatal: {}", error_chain(e)));
    }
    if is_init {
        init::power_off_now();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

fn run(is_init: bool) -> Result<(), BootError> {
    let cmdline = if is_init {
        init::early_mounts()?;
        Cmdline::read()?
    } else {
        Cmdline::read().unwrap_or_default()
    };
    if is_init && cmdline.probe {
        init::console_line("KILN-PROBE-OK");
        init::power_off_now();
    }
    if is_init {
        init::load_modules();
        init::mount_root()?;
        init::switch_root()?;
        init::late_setup();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|source| BootError::Step {
            step: "start the async runtime".to_owned(),
            source,
        })?;
    runtime.block_on(serve_forever(&cmdline, is_init))
}

async fn serve_forever(cmdline: &Cmdline, is_init: bool) -> Result<(), BootError> {
    let mode = if is_init {
        ReapMode::AllChildren
    } else {
        ReapMode::RegisteredOnly
    };
    let reaper = Reaper::start(mode).map_err(|source| BootError::Step {
        step: "listen for SIGCHLD".to_owned(),
        source,
    })?;
    let path = match std::env::var_os("KILN_AGENT_PORT").filter(|_| !is_init) {
        Some(p) => PathBuf::from(p),
        None => wait_for_port(&cmdline.port_name).await?,
    };
    let mut port = VirtioPort::open(&path).map_err(|source| BootError::Step {
        step: format!("open {}", path.display()),
        source,
    })?;
    let mut agent = Agent::new(AgentConfig::default(), reaper);
    // Only the guest's init may change the clock, hostname, RNG and machine id.
    if is_init && let Some(system) = SystemIdentity::for_pid1() {
        agent = agent.with_identity_sink(Arc::new(system));
    }
    // Only the guest's init configures the guest's network (and only when asked).
    if is_init && let Some(network) = SystemNetwork::for_pid1() {
        agent = agent.with_network(Arc::new(network));
    }
    say(format_args!("ready"));
    let mut quick_eofs = 0u32;
    loop {
        let started = Instant::now();
        match agent.serve(&mut port).await {
            Ok(ServeEnd::Shutdown) => return Ok(()),
            Ok(ServeEnd::HostGone) => {}
            Err(e) => warn(format_args!("channel error: {}", error_chain(&e))),
        }
        quick_eofs = if started.elapsed() >= QUICK_EOF {
            0
        } else {
            quick_eofs.saturating_add(1)
        };
        if quick_eofs > QUICK_EOFS_FREE {
            // A read after EOF waits for a fresh readiness edge (host connecting or sending),
            // so this only triggers if the port misbehaves; never spin. Not applied to the
            // first few EOFs: a host reconnecting (e.g. after a restore) must not wait.
            let backoff_ms = (1u64 << (quick_eofs - QUICK_EOFS_FREE).min(7)).min(100);
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
        }
    }
}

async fn wait_for_port(name: &str) -> Result<PathBuf, BootError> {
    let start = Instant::now();
    loop {
        match find_port(name) {
            Ok(Some(path)) => return Ok(path),
            Ok(None) => {}
            Err(e) => warn(format_args!("scanning virtio ports: {e}")),
        }
        if start.elapsed() >= PORT_WAIT {
            return Err(BootError::Timeout {
                what: format!("virtio-serial port {name}"),
                waited: PORT_WAIT,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
