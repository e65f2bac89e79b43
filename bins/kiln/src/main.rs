//! `kiln`, the command-line client of `kilnd`.
//!
//! One file per subcommand. Everything goes through the daemon's HTTP API with
//! [`kiln_client`] (the daemon is started on demand); `doctor` asks a running daemon or, when
//! none runs, a one-shot `kilnd --doctor`, so it works even when the daemon cannot start. The
//! CLI does not link the engine: it knows kiln only through `kiln-api-types` and
//! `kiln-client`. Errors are printed with their whole chain as one line
//! `kiln: ...` and give exit code 1 (`kiln run` passes the command's own code through, `kiln
//! job run` the program's; see `job.rs`).

mod bench;
mod bench_desktop;
mod bench_images;
mod bench_jobs;
mod bench_liveview;
mod bench_network;
mod bench_platform;
mod bench_pool;
mod completion;
mod cp;
mod desktop;
mod desktop_view;
mod doctor;
mod execs;
mod image;
mod job;
mod job_result;
mod network;
mod pool;
mod ps;
mod run;
mod sandbox;
mod shell;
mod storage;
mod term;
mod token;

use clap::{Parser, Subcommand};
use kiln_client::{Client, ClientHome};

/// kiln: local microVM sandboxes.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a command in a fresh sandbox, stream its output, exit with its code.
    Run(run::RunArgs),
    /// Build, list and remove guest images.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Start a sandbox that stays up; prints its id.
    Create(sandbox::CreateArgs),
    /// Start N sandboxes at once from one snapshot; prints their ids.
    Clone(sandbox::CloneArgs),
    /// Snapshot a running sandbox (`kiln snapshot ID --name NAME`), list or remove snapshots.
    Snapshot(sandbox::SnapshotArgs),
    /// Manage a running sandbox's secrets.
    #[command(subcommand)]
    Secret(sandbox::SecretCmd),
    /// A running sandbox's network policy (`kiln network set ID RULES`).
    #[command(subcommand)]
    Network(network::NetworkCmd),
    /// Warm pools: sandboxes of an image restored ahead of demand (`kiln pool set IMAGE
    /// --size N`, `kiln pool ls`).
    #[command(subcommand)]
    Pool(pool::PoolCmd),
    /// Desktop sandboxes: screenshots and actions (`kiln desktop screenshot ID -o FILE`,
    /// `kiln desktop click ID X Y`, `kiln desktop type ID TEXT`, `kiln desktop key ID ctrl+l`).
    #[command(subcommand)]
    Desktop(desktop::DesktopCmd),
    /// A desktop's review recording (`kiln review export ID [-o DIR]`).
    #[command(subcommand)]
    Review(desktop::ReviewCmd),
    /// Jobs: programs in one of kiln's languages, run once each in a fresh sandbox by the
    /// daemon's queue (`kiln job run --language python --file main.py`, `kiln job ls`).
    #[command(subcommand)]
    Job(job::JobCmd),
    /// Run a program and wait for its result: `kiln job run` (cloude's spelling, e.g. `kiln
    /// go --language rust --file main.rs`).
    Go(job::JobRunArgs),
    /// Run a command in a running sandbox (same streaming and exit code rules as `run`).
    Exec(sandbox::ExecArgs),
    /// An interactive login shell in a running sandbox (`exec -it ID -- bash -l`, or `sh -l`
    /// if the guest has no bash).
    Shell(shell::ShellArgs),
    /// List sandboxes.
    Ps {
        /// Only sandboxes matching `label=K[=V]`, `status=STATE` or `name=NAME` (repeatable;
        /// all must hold).
        #[arg(long = "filter", short = 'f', value_name = "COND")]
        filters: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show sandboxes as JSON (spec and status).
    Inspect {
        /// Sandbox ids, names or unambiguous id prefixes.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Destroy sandboxes.
    Rm {
        /// Sandbox ids, names or unambiguous id prefixes.
        ids: Vec<String>,
        /// Every sandbox (that passes the filters).
        #[arg(long)]
        all: bool,
        /// With --all: only sandboxes matching this condition (as in `ps`).
        #[arg(long = "filter", short = 'f', value_name = "COND")]
        filters: Vec<String>,
        /// Print the removed ids as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a sandbox's vCPUs in place (no CPU use; memory kept).
    Pause {
        /// Sandbox id, name or unambiguous id prefix.
        id: String,
        /// Print the sandbox as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let a paused sandbox run again.
    Resume {
        /// Sandbox id, name or unambiguous id prefix.
        id: String,
        /// Print the sandbox as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Save a sandbox (memory and disk) and stop its VM; `kiln start` brings it back.
    Stop {
        /// Sandbox id, name or unambiguous id prefix.
        id: String,
        /// Print the sandbox as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bring a stopped sandbox back as it was (secrets are given again: they are never saved).
    Start {
        /// Sandbox id, name or unambiguous id prefix.
        id: String,
        /// Deliver a secret as /run/secrets/NAME (repeatable); `NAME` alone generates one.
        #[arg(long = "secret", value_name = "NAME[=VALUE]")]
        secrets: Vec<String>,
        /// Print the sandbox as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a sandbox's remaining lifetime (e.g. 30s, 5m, 2h) from now.
    Ttl {
        /// Sandbox id, name or unambiguous id prefix.
        id: String,
        /// New remaining lifetime.
        duration: String,
        /// Print the sandbox as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy files or directories between the host and a sandbox (`docker cp` syntax:
    /// `ID:/path` on one side, `-` for a tar archive on stdin or stdout).
    Cp {
        /// Source: a host path, `ID:/path`, or `-` (a tar archive on stdin).
        src: String,
        /// Destination: a host path, `ID:/path`, or `-` (a tar archive to stdout).
        dst: String,
        /// Print what was written into the sandbox as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a directory (or describe a file) in a sandbox: `kiln ls ID:/path`.
    Ls {
        /// `ID:/path`.
        target: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a sandbox's guest console (kernel and agent messages).
    Logs {
        /// Sandbox id, name or unambiguous id prefix.
        id: String,
        /// Keep following new output until the sandbox's VM goes away.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Follow the daemon's events (lifecycle transitions, exec start and end).
    Events {
        /// Print each event as a JSON line.
        #[arg(long)]
        json: bool,
    },
    /// What kiln's state takes on disk (apparent and allocated bytes per category), and what
    /// `kiln prune` would reclaim.
    Df {
        /// Every item, with why it is kept (by default only the reclaimable ones).
        #[arg(long, short = 'v')]
        verbose: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove what nothing uses: warm snapshots of removed or rebuilt images, unused build
    /// caches, dead builds' directories, saves and consoles of removed sandboxes. Exits 1 if
    /// something could not be removed.
    Prune {
        /// List what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Report what kiln will use on this host and why.
    Doctor {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show or stop the daemon.
    #[command(subcommand)]
    Daemon(sandbox::DaemonCmd),
    /// Measure kiln.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Print the API token that `kilnd --listen` requires on TCP (created on first use).
    Token {
        /// Replace the token with a new random one (takes effect at once) and print it.
        #[arg(long)]
        rotate: bool,
        /// Print `{"token": ..., "path": ...}`.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script.
    Completion {
        /// The shell.
        shell: completion::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Cold boot, agent round trips, exec round trips, stdout throughput.
    Boot(bench::BenchArgs),
    /// Cold boot versus warm-snapshot restore, to the first exec result.
    Snapshot(bench::SnapshotBenchArgs),
    /// File upload and download MiB/s beside the stdout stream rate.
    Files(bench_platform::FilesBenchArgs),
    /// Re-attaching sandboxes after a daemon restart; `kiln stop` and `kiln start`.
    Lifecycle(bench_platform::LifecycleBenchArgs),
    /// Image rebuilds (per stage, compaction sizes) and up-to-date checks.
    Images(bench_images::ImagesBenchArgs),
    /// Network modes against a test host of its own (root): connects, DNS, TCP throughput,
    /// start to first connection; and the relay's filter against bare passt.
    Network(bench_network::NetworkBenchArgs),
    /// The warm pool: acquire, `kiln run -- true` with a pool / a restore / a cold boot,
    /// refill, PSS of a pooled sandbox.
    Pool(bench_pool::PoolBenchArgs),
    /// A desktop agent's loop: ready from the warm snapshot, screenshots, input, click →
    /// settled screenshot, idle CPU.
    Desktop(bench_desktop::DesktopBenchArgs),
    /// Jobs: submit → result per language with a warm pool (p50/p95, the job's own step
    /// timings), and jobs per minute with and without a pool.
    Jobs(bench_jobs::JobsBenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: failed to start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            1
        }
    };
    // Do not wait for the stdin reader thread, which may be blocked on a terminal.
    std::process::exit(code);
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let home = ClientHome::from_env();
    match &cli.cmd {
        Cmd::Doctor { json } => return doctor::run(&home, *json).await,
        Cmd::Daemon(cmd) => return sandbox::daemon(&home, cmd).await,
        Cmd::Token { rotate, json } => return token::run(&home, *rotate, *json),
        // Starts a daemon of its own (a home under this one), with its DNS settings.
        Cmd::Bench(BenchCmd::Network(args)) => return bench_network::run(&home, args).await,
        // Reads the program and its files, and checks them, before connecting.
        Cmd::Job(job::JobCmd::Run(args)) | Cmd::Go(args) => return job::run(&home, args).await,
        Cmd::Completion { shell } => {
            completion::write(*shell, &mut std::io::stdout());
            return Ok(0);
        }
        _ => {}
    }
    // A broken config.toml would also stop a daemon started here: say so now, not after the
    // start deadline.
    kiln_client::config::Config::load(&home.config())?;
    let client = Client::connect(&home).await?;
    match &cli.cmd {
        Cmd::Run(args) => run::run(&client, args).await,
        Cmd::Image(cmd) => image::run(&client, cmd).await,
        Cmd::Ps { filters, json } => ps::ps(&client, filters, *json).await,
        Cmd::Inspect { ids } => ps::inspect(&client, ids).await,
        Cmd::Rm {
            ids,
            all,
            filters,
            json,
        } => ps::rm(&client, ids, *all, filters, *json).await,
        Cmd::Pause { id, json } => ps::pause_resume(&client, id, true, *json).await,
        Cmd::Resume { id, json } => ps::pause_resume(&client, id, false, *json).await,
        Cmd::Ttl { id, duration, json } => ps::ttl(&client, id, duration, *json).await,
        Cmd::Network(cmd) => network::run(&client, cmd).await,
        Cmd::Pool(cmd) => pool::run(&client, cmd).await,
        Cmd::Job(cmd) => job::cmd(&client, cmd).await,
        Cmd::Desktop(cmd) => desktop::run(&client, cmd).await,
        Cmd::Review(cmd) => desktop::review(&client, cmd).await,
        Cmd::Events { json } => ps::events(&client, *json).await,
        Cmd::Logs { id, follow } => execs::logs(&client, id, *follow).await,
        Cmd::Cp { src, dst, json } => cp::cp(&client, src, dst, *json).await,
        Cmd::Ls { target, json } => cp::ls(&client, target, *json).await,
        Cmd::Stop { id, json } => ps::stop(&client, id, *json).await,
        Cmd::Start { id, secrets, json } => ps::start(&client, id, secrets, *json).await,
        Cmd::Bench(BenchCmd::Boot(args)) => bench::run(&client, args).await,
        Cmd::Bench(BenchCmd::Pool(args)) => bench_pool::run(&client, &home, args).await,
        Cmd::Bench(BenchCmd::Desktop(args)) => bench_desktop::run(&client, &home, args).await,
        Cmd::Bench(BenchCmd::Jobs(args)) => bench_jobs::run(&client, args).await,
        Cmd::Bench(BenchCmd::Snapshot(args)) => bench::snapshot(&client, &home, args).await,
        Cmd::Bench(BenchCmd::Files(args)) => bench_platform::files(&client, args).await,
        Cmd::Bench(BenchCmd::Images(args)) => bench_images::run(&client, args).await,
        Cmd::Bench(BenchCmd::Lifecycle(args)) => {
            bench_platform::lifecycle(&client, &home, args).await
        }
        Cmd::Create(args) => sandbox::create(&client, args).await,
        Cmd::Exec(args) => sandbox::exec(&client, args).await,
        Cmd::Shell(args) => shell::run(&client, args).await,
        Cmd::Clone(args) => sandbox::clone(&client, args).await,
        Cmd::Snapshot(args) => sandbox::snapshot(&client, args).await,
        Cmd::Secret(cmd) => sandbox::secret(&client, cmd).await,
        Cmd::Df { verbose, json } => storage::df(&client, *json, *verbose).await,
        Cmd::Prune { dry_run, json } => storage::prune(&client, *dry_run, *json).await,
        Cmd::Doctor { .. }
        | Cmd::Daemon(_)
        | Cmd::Token { .. }
        | Cmd::Completion { .. }
        | Cmd::Go(_)
        | Cmd::Bench(BenchCmd::Network(_)) => {
            unreachable!("handled above")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_passes_clap_debug_asserts() {
        use clap::CommandFactory;
        // Panics on duplicate ids, conflicting shorts and the like, for every subcommand.
        Cli::command().debug_assert();
        assert!(Cli::try_parse_from(["kiln", "completion", "zsh"]).is_ok());
        assert!(Cli::try_parse_from(["kiln", "completion", "tcsh"]).is_err());
    }
}
