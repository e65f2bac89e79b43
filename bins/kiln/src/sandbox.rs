//! `kiln create`, `kiln exec` and `kiln daemon`: persistent sandboxes and the daemon itself.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, Subcommand};
use kiln_api_types::{SandboxInfo, SandboxSpec};
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
    let image = a.sandbox.ensure_image(client).await?;
    let req = a.sandbox.request(image.as_ref())?;
    let info: SandboxInfo = client.sandbox_create(&req).await?;
    for w in &info.status.warnings {
        eprintln!("kiln: warning: {w}");
    }
    if a.json {
        // Generated secret values are nowhere else to be had: they are part of the answer.
        let mut out = serde_json::to_value(&info)?;
        let generated: serde_json::Map<String, serde_json::Value> = a
            .sandbox
            .secrets
            .iter()
            .filter(|arg| !arg.contains('='))
            .filter_map(|name| {
                req.secrets
                    .0
                    .get(name)
                    .map(|v| (name.clone(), serde_json::Value::String(v.clone())))
            })
            .collect();
        if !generated.is_empty() {
            out["generated_secrets"] = serde_json::Value::Object(generated);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
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
    /// Print the sandboxes as JSON instead of their ids.
    #[arg(long)]
    pub json: bool,
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
    let req = match &a.snapshot {
        Some(name) => {
            if a.sandbox.snapshot.is_some() {
                bail!("give the snapshot either as the argument or with --snapshot, not both");
            }
            a.sandbox
                .request_from(kiln_api_types::SandboxSource::Snapshot {
                    snapshot: name.parse().map_err(|e| anyhow::anyhow!("{e}"))?,
                })?
        }
        None => {
            let image = a.sandbox.ensure_image(client).await?;
            a.sandbox.request(image.as_ref())?
        }
    };
    if a.count > 1 && !req.publish.is_empty() {
        bail!("--publish cannot be used with --count above 1: clones cannot share a host port");
    }
    if a.count > 1 && req.name.is_some() {
        bail!("--name cannot be used with --count above 1: names are unique");
    }
    let infos = clone_n(client, &req, a.count).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&infos)?);
    } else {
        for info in infos {
            println!("{}", info.id);
        }
    }
    Ok(0)
}

/// Starts `count` sandboxes concurrently (the daemon captures the warm snapshot once if it
/// is missing; the other starts wait for it); all or nothing.
pub async fn clone_n(
    client: &Client,
    req: &SandboxSpec,
    count: u32,
) -> anyhow::Result<Vec<SandboxInfo>> {
    let starts = (0..count).map(|_| client.sandbox_create(req));
    let results = futures_util::future::join_all(starts).await;
    let (ok, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
    let infos: Vec<SandboxInfo> = ok.into_iter().filter_map(|r| r.ok()).collect();
    // One clone's warning is every clone's (they started from the same snapshot).
    if let Some(w) = infos.iter().find(|i| !i.status.warnings.is_empty()) {
        for w in &w.status.warnings {
            eprintln!("kiln: warning: {w}");
        }
    }
    if let Some(Err(e)) = failed.into_iter().next() {
        for id in infos.iter().map(|i| &i.id) {
            let _ = client.sandbox_delete(id).await;
        }
        return Err(anyhow::Error::from(e).context(format!("starting {count} clones")));
    }
    Ok(infos)
}

/// Options of `kiln exec`: `kiln exec [-d] ID -- CMD`, or one of its subcommands.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ExecArgs {
    /// Sandbox id, name or unambiguous id prefix.
    #[arg(required = true)]
    pub id: Option<String>,
    /// Start the command detached: print its exec id and return at once; the command keeps
    /// running (`kiln exec attach`, `kiln exec ls`, `kiln exec kill`).
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// With --detach: print the command as JSON instead of its id.
    #[arg(long, requires = "detach")]
    pub json: bool,
    /// The command to run.
    #[command(flatten)]
    pub exec: crate::run::ExecOpts,
    /// Detached commands.
    #[command(subcommand)]
    pub sub: Option<crate::execs::ExecCmd>,
}

/// `kiln exec`.
pub async fn exec(client: &Client, a: &ExecArgs) -> anyhow::Result<i32> {
    if let Some(sub) = &a.sub {
        return crate::execs::run(client, sub).await;
    }
    let key = a.id.as_deref().unwrap_or_default();
    if a.detach && a.exec.tty {
        anyhow::bail!(
            "-t/--tty and -d/--detach do not go together: a detached command has no terminal"
        );
    }
    let mut req = a.exec.request()?;
    // A wrong id is reported plainly before any WebSocket is opened; the id it resolves to
    // is used from here on.
    let id = crate::ps::resolve(client, key).await?;
    if a.detach {
        req.stdin = false;
        let info = client.exec_detach(&id, &req).await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&info)?);
        } else {
            println!("{}", info.id);
        }
        return Ok(0);
    }
    let ws = client.sandbox_exec(&id).await?;
    let io = crate::run::StreamIo {
        forward_stdin: !a.exec.no_stdin,
        tty: a.exec.tty,
    };
    crate::run::stream_exec(
        client,
        ws,
        Some(serde_json::to_string(&req)?),
        io,
        crate::run::Stream::Exec,
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
    /// Stop the daemon and wait until it is gone. Its sandboxes keep running (the next
    /// daemon re-attaches them) unless `--all` is given.
    Stop {
        /// Remove every sandbox first.
        #[arg(long)]
        all: bool,
        /// Print `{"pid": ..., "removed": ...}`.
        #[arg(long)]
        json: bool,
    },
}

/// `kiln daemon ...`.
pub async fn daemon(home: &ClientHome, cmd: &DaemonCmd) -> anyhow::Result<i32> {
    let Some(client) = Client::existing(home).await else {
        eprintln!("kiln: no daemon is serving {}", home.root().display());
        return Ok(match cmd {
            DaemonCmd::Status { .. } => 1,
            DaemonCmd::Stop { .. } => 0,
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
        DaemonCmd::Stop { all, json } => {
            let mut removed = 0;
            if *all {
                removed = remove_all(&client).await?;
            }
            let pid = stop_daemon(&health).await?;
            if *json {
                println!("{}", serde_json::json!({ "pid": pid, "removed": removed }));
            } else if *all {
                println!("stopped kilnd (pid {pid}) and removed {removed} sandboxes");
            } else {
                println!("stopped kilnd (pid {pid}); its sandboxes keep running");
            }
            Ok(0)
        }
    }
}

/// Removes every sandbox of the daemon `client` talks to, concurrently; returns how many.
pub async fn remove_all(client: &Client) -> anyhow::Result<usize> {
    let list = client.sandbox_list(&[]).await?;
    let removals = list
        .sandboxes
        .iter()
        .map(|s| async move { client.sandbox_delete(&s.id).await });
    let results = futures_util::future::join_all(removals).await;
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    if !failed.is_empty() {
        bail!("could not remove every sandbox: {}", failed.join("; "));
    }
    Ok(list.sandboxes.len())
}

/// Stops the daemon that answered `health` (SIGTERM: it lets go of its sandboxes, which keep
/// running) and waits until it is gone; returns its pid.
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
        /// Print the removed names as JSON.
        #[arg(long)]
        json: bool,
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
                if let Some(reason) = &s.unusable {
                    println!("{:<40} {:<5} unusable: {reason}", s.name, s.kind);
                    continue;
                }
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
        Some(SnapshotCmd::Rm { names, json }) => {
            let mut code = 0;
            let mut removed = Vec::new();
            for name in names {
                match client.snapshot_delete(name).await {
                    Ok(()) => removed.push(name.clone()),
                    Err(e) => {
                        eprintln!("kiln: {:#}", anyhow::Error::from(e));
                        code = 1;
                    }
                }
            }
            if *json {
                println!("{}", serde_json::json!({ "removed": removed }));
            }
            Ok(code)
        }
        None => {
            let (Some(id), Some(name)) = (&a.id, &a.name) else {
                bail!("usage: kiln snapshot ID --name NAME");
            };
            let id = crate::ps::resolve(client, id).await?;
            let name =
                kiln_api_types::SnapshotName::user(name).map_err(|e| anyhow::anyhow!("{e}"))?;
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
        /// Sandbox id, name or unambiguous id prefix.
        id: String,
        /// `NAME=VALUE`, or `NAME` alone for a new random 64-hex value (printed on stderr).
        #[arg(required = true, value_name = "NAME[=VALUE]")]
        secrets: Vec<String>,
        /// Print what was rotated as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `kiln secret rotate ID NAME[=VALUE]...`.
pub async fn secret(client: &Client, cmd: &SecretCmd) -> anyhow::Result<i32> {
    let SecretCmd::Rotate { id, secrets, json } = cmd;
    let id = crate::ps::resolve(client, id).await?;
    let secrets = crate::run::parse_secrets(secrets)?;
    let names: Vec<String> = secrets.0.keys().cloned().collect();
    client
        .sandbox_secrets_update(&id, &kiln_api_types::SecretsUpdateRequest { secrets })
        .await?;
    if *json {
        println!("{}", serde_json::json!({ "sandbox": id, "rotated": names }));
    }
    Ok(0)
}
