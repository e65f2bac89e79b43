//! `kiln create`, `kiln exec` and `kiln daemon`: persistent sandboxes and the daemon itself.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, Subcommand};
use kiln_api_types::{SandboxCreateRequest, SandboxId, SandboxInfo};
use kiln_client::{Client, ClientHome};

/// Options of `kiln create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The sandbox to start.
    #[command(flatten)]
    pub sandbox: crate::run::SandboxOpts,
    /// Print the sandbox as JSON instead of its id.
    #[arg(long)]
    pub json: bool,
}

/// `kiln create`.
pub async fn create(client: &Client, a: &CreateArgs) -> anyhow::Result<i32> {
    let req = a.sandbox.request()?;
    if req.snapshot.is_none() {
        crate::image::ensure_built(client, &req.image).await?;
    }
    let info: SandboxInfo = client.sandbox_create(&req).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("{}", info.id);
    }
    Ok(0)
}

/// Most sandboxes one `kiln clone` starts.
pub const MAX_CLONES: u32 = 64;

/// Options of `kiln clone`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// User snapshot to clone (see `kiln snapshot`); without it, the image's warm snapshot.
    // Its own id: the flattened options have a `--snapshot` too, and clap needs unique ids.
    #[arg(id = "snapshot_arg", value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
    /// The sandbox to clone: image, size and secrets (its warm snapshot is restored N times).
    #[command(flatten)]
    pub sandbox: crate::run::SandboxOpts,
    /// How many sandboxes to start, concurrently.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
}

/// `kiln clone --count N`: N sandboxes restored concurrently from one warm snapshot; prints
/// their ids. If any fails, the others are removed and the first error is reported.
pub async fn clone(client: &Client, a: &CloneArgs) -> anyhow::Result<i32> {
    if !(1..=MAX_CLONES).contains(&a.count) {
        bail!(
            "--count must be between 1 and {MAX_CLONES}, got {}",
            a.count
        );
    }
    let mut req = a.sandbox.request()?;
    if let Some(name) = &a.snapshot {
        if req.snapshot.is_some() {
            bail!("give the snapshot either as the argument or with --snapshot, not both");
        }
        req.snapshot = Some(name.clone());
        req.validate().map_err(|m| anyhow::anyhow!(m))?;
    }
    if a.count > 1 && !req.publish.is_empty() {
        bail!("--publish cannot be used with --count above 1: clones cannot share a host port");
    }
    let ids = clone_n(client, &req, a.count).await?;
    for id in ids {
        println!("{id}");
    }
    Ok(0)
}

/// Starts `count` sandboxes concurrently (the daemon captures the warm snapshot once if it
/// is missing; the other starts wait for it); all or nothing.
pub async fn clone_n(
    client: &Client,
    req: &SandboxCreateRequest,
    count: u32,
) -> anyhow::Result<Vec<SandboxId>> {
    if req.snapshot.is_none() {
        crate::image::ensure_built(client, &req.image).await?;
    }
    let starts = (0..count).map(|_| client.sandbox_create(req));
    let results = futures_util::future::join_all(starts).await;
    let (ok, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
    let ids: Vec<SandboxId> = ok
        .into_iter()
        .filter_map(|r| r.ok())
        .map(|i| i.id)
        .collect();
    if let Some(Err(e)) = failed.into_iter().next() {
        for id in &ids {
            let _ = client.sandbox_delete(id).await;
        }
        return Err(anyhow::Error::from(e).context(format!("starting {count} clones")));
    }
    Ok(ids)
}

/// Options of `kiln exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Sandbox id.
    pub id: String,
    /// The command to run.
    #[command(flatten)]
    pub exec: crate::run::ExecOpts,
}

/// `kiln exec`.
pub async fn exec(client: &Client, a: &ExecArgs) -> anyhow::Result<i32> {
    let id: SandboxId = a.id.parse()?;
    let req = a.exec.request()?;
    // A wrong id is reported plainly before any WebSocket is opened.
    let _: SandboxInfo = client.sandbox_get(&id).await?;
    let ws = client.sandbox_exec(&id).await?;
    crate::run::stream_exec(
        client,
        ws,
        serde_json::to_string(&req)?,
        !a.exec.no_stdin,
        false,
    )
    .await
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
pub async fn daemon(home: &ClientHome, cmd: &DaemonCmd) -> anyhow::Result<i32> {
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
            let pid = stop_daemon(&health).await?;
            println!("stopped kilnd (pid {pid})");
            Ok(0)
        }
    }
}

/// Stops the daemon that answered `health` (SIGTERM, it stops its sandboxes) and waits until
/// it is gone; returns its pid.
pub async fn stop_daemon(health: &kiln_api_types::Health) -> anyhow::Result<i32> {
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
    while process_exists(pid) {
        if Instant::now() > deadline {
            bail!("kilnd (pid {pid}) did not exit within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(pid)
}

/// Whether `pid` is a live process: a zombie (e.g. a daemon this very process started, as
/// `kiln bench snapshot` does, and has not reaped) counts as gone.
fn process_exists(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// `kiln snapshot ID --name NAME`, `kiln snapshot ls`, `kiln snapshot rm NAME...`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    /// List or remove snapshots.
    #[command(subcommand)]
    pub cmd: Option<SnapshotCmd>,
    /// Sandbox to snapshot (it keeps running).
    #[arg(required = true)]
    pub id: Option<String>,
    /// Name of the new snapshot.
    #[arg(long, required = true)]
    pub name: Option<String>,
    /// Print the snapshot as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `kiln snapshot ls|rm`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// List snapshots (warm and user) and the sandboxes using them.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots (refused while a running sandbox was restored from one).
    Rm {
        /// Snapshot names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// `kiln snapshot ...`.
pub async fn snapshot(client: &Client, a: &SnapshotArgs) -> anyhow::Result<i32> {
    match &a.cmd {
        Some(SnapshotCmd::Ls { json }) => {
            let list: kiln_api_types::SnapshotList = client.snapshot_list().await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!(
                "{:<40} {:<5} {:<8} {:>4} {:>6} {:>9} {:>6}  USED BY",
                "NAME", "KIND", "IMAGE", "CPUS", "MEMORY", "SIZE", "PAUSE"
            );
            for s in &list.snapshots {
                let used: Vec<String> = s.used_by.iter().map(|i| i.to_string()).collect();
                println!(
                    "{:<40} {:<5} {:<8} {:>4} {:>5}M {:>8}M {:>4}ms  {}",
                    s.name,
                    s.kind,
                    s.image.as_deref().unwrap_or("?"),
                    s.cpus,
                    s.memory_mib,
                    s.size_bytes >> 20,
                    s.pause_ms,
                    if used.is_empty() {
                        "-".to_owned()
                    } else {
                        used.join(",")
                    }
                );
            }
            Ok(0)
        }
        Some(SnapshotCmd::Rm { names }) => {
            let mut code = 0;
            for name in names {
                if let Err(e) = client.snapshot_delete(name).await {
                    eprintln!("kiln: {:#}", anyhow::Error::from(e));
                    code = 1;
                }
            }
            Ok(code)
        }
        None => {
            let (Some(id), Some(name)) = (&a.id, &a.name) else {
                bail!("usage: kiln snapshot ID --name NAME");
            };
            let id: SandboxId = id.parse()?;
            kiln_api_types::validate_snapshot_name(name).map_err(|m| anyhow::anyhow!(m))?;
            let started = Instant::now();
            let info: kiln_api_types::SnapshotInfo = client
                .snapshot_create(
                    &id,
                    &kiln_api_types::SnapshotCreateRequest { name: name.clone() },
                )
                .await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("{}", info.name);
                eprintln!(
                    "kiln: snapshot {} of {id} taken in {:.1} s (sandbox paused {} ms)",
                    info.name,
                    started.elapsed().as_secs_f64(),
                    info.pause_ms
                );
            }
            Ok(0)
        }
    }
}

/// `kiln secret ...`.
#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Deliver new secret values to a running sandbox and rerun its image's on-restore hook.
    Rotate {
        /// Sandbox id.
        id: String,
        /// `NAME=VALUE`, or `NAME` alone for a new random 64-hex value (printed on stderr).
        #[arg(required = true, value_name = "NAME[=VALUE]")]
        secrets: Vec<String>,
    },
}

/// `kiln secret rotate ID NAME[=VALUE]...`.
pub async fn secret(client: &Client, cmd: &SecretCmd) -> anyhow::Result<i32> {
    let SecretCmd::Rotate { id, secrets } = cmd;
    let id: SandboxId = id.parse()?;
    let secrets = crate::run::parse_secrets(secrets)?;
    client
        .sandbox_secrets_update(&id, &kiln_api_types::SecretsUpdateRequest { secrets })
        .await?;
    Ok(0)
}
