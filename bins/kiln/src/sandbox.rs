//! `kiln create`, `kiln exec` and `kiln daemon`: persistent sandboxes and the daemon itself.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, Subcommand};
use hyper::Method;
use kiln_api_types::{SandboxCreateRequest, SandboxId, SandboxInfo};
use kiln_core::Home;

use crate::client::Client;

/// Options of `kiln create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image to start (a recipe name).
    #[arg(long, default_value = kiln_api_types::DEFAULT_IMAGE)]
    pub image: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = kiln_api_types::DEFAULT_CPUS)]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = kiln_api_types::DEFAULT_MEMORY_MIB)]
    pub memory: u32,
    /// Print the sandbox as JSON instead of its id.
    #[arg(long)]
    pub json: bool,
}

/// `kiln create`.
pub async fn create(client: &Client, a: &CreateArgs) -> anyhow::Result<i32> {
    let req = SandboxCreateRequest {
        image: a.image.clone(),
        cpus: a.cpus,
        memory_mib: a.memory,
    };
    req.validate().map_err(|m| {
        anyhow::anyhow!(
            m.replace("memory_mib", "--memory")
                .replace("cpus", "--cpus")
        )
    })?;
    crate::image::ensure_built(client, &req.image).await?;
    let info: SandboxInfo = client
        .call(Method::POST, "/v1/sandboxes", Some(&req))
        .await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("{}", info.id);
    }
    Ok(0)
}

/// Options of `kiln exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Sandbox id.
    pub id: String,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long)]
    pub workdir: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Kill the command once its output exceeds this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_output: Option<u64>,
    /// Do not forward stdin (the command reads /dev/null).
    #[arg(long)]
    pub no_stdin: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `kiln exec`.
pub async fn exec(client: &Client, a: &ExecArgs) -> anyhow::Result<i32> {
    let id: SandboxId = a.id.parse()?;
    let run = crate::run::RunArgs {
        image: String::new(),
        cpus: 1,
        memory: kiln_api_types::DEFAULT_MEMORY_MIB,
        env: a.env.clone(),
        workdir: a.workdir.clone(),
        timeout: a.timeout,
        max_output: a.max_output,
        no_stdin: a.no_stdin,
        command: a.command.clone(),
    };
    let req = run.exec_request()?;
    // A wrong id is reported plainly before any WebSocket is opened.
    let _: SandboxInfo = client.get(&format!("/v1/sandboxes/{id}")).await?;
    let ws = client
        .websocket(&format!("/v1/sandboxes/{id}/exec"))
        .await?;
    crate::run::stream_exec(client, ws, serde_json::to_string(&req)?, !a.no_stdin, false).await
}

/// `kiln daemon ...`.
#[derive(Debug, Subcommand)]
pub enum DaemonCmd {
    /// Print the daemon's pid and what its janitor reclaimed (exit 1 if none runs).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemon (its sandboxes are destroyed) and wait until it is gone.
    Stop,
}

/// `kiln daemon ...`.
pub async fn daemon(home: &Home, cmd: &DaemonCmd) -> anyhow::Result<i32> {
    let Some(client) = Client::existing(home).await else {
        eprintln!("kiln: no daemon is serving {}", home.root().display());
        return Ok(match cmd {
            DaemonCmd::Status { .. } => 1,
            DaemonCmd::Stop => 0,
        });
    };
    let health = client.health().await?;
    match cmd {
        DaemonCmd::Status { json } => {
            if *json {
                println!("{}", serde_json::to_string_pretty(&health)?);
            } else {
                let j = &health.janitor;
                println!(
                    "kilnd {} pid {} serving {}",
                    health.version,
                    health.pid,
                    home.root().display()
                );
                println!(
                    "janitor at start: {} processes killed, {} runtime dirs removed ({} bytes), {} sandboxes failed",
                    j.processes_killed, j.dirs_removed, j.bytes_freed, j.sandboxes_failed
                );
            }
            Ok(0)
        }
        DaemonCmd::Stop => {
            let pid = i32::try_from(health.pid)?;
            // SAFETY: kill(2) with a pid the daemon reported for itself and SIGTERM; no memory
            // is involved.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
            if rc != 0 {
                bail!(
                    "cannot signal kilnd (pid {pid}): {}",
                    std::io::Error::last_os_error()
                );
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            // The daemon exits once it has stopped its sandboxes; /proc tells when.
            while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                if Instant::now() > deadline {
                    bail!("kilnd (pid {pid}) did not exit within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!("stopped kilnd (pid {pid})");
            Ok(0)
        }
    }
}
