//! `kilnd`, kiln's daemon: owns the engine and serves the HTTP API on a unix socket.
//!
//! This binary wires things together and holds no business logic: it takes the
//! single-instance lock, binds `$KILN_HOME/kilnd.sock` (mode 0600), starts the engine (whose
//! janitor reclaims what a previous daemon left), serves [`api::router`], and on SIGTERM or
//! SIGINT stops every sandbox before exiting.

mod api;
mod exec_ws;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use kiln_core::{Engine, Home};
use tracing::info;

/// kilnd: the kiln daemon. Serves kiln's HTTP API on `$KILN_HOME/kilnd.sock`; the `kiln` CLI
/// starts it on demand.
#[derive(Debug, Parser)]
#[command(name = "kilnd", version, about)]
struct Args {
    /// Print the API's OpenAPI 3.1 document (the text of docs/openapi.json) and exit.
    #[arg(long, exclusive = true)]
    print_openapi: bool,
    /// Examine the host as `GET /v1/doctor` would, print the report as JSON and exit (used by
    /// `kiln doctor` when no daemon runs).
    #[arg(long, exclusive = true)]
    doctor: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_openapi {
        print!("{}", api::openapi_json());
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let home = Home::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kilnd-worker")
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    if args.doctor {
        let report = runtime.block_on(kiln_core::doctor::run(&home));
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    runtime.block_on(serve(home))
}

async fn serve(home: Home) -> anyhow::Result<()> {
    home.ensure()
        .with_context(|| format!("failed to create {}", home.root().display()))?;
    let lock_path = home.daemon_lock();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("failed to open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!("another kilnd already serves {}", home.root().display());
    }

    let engine = Engine::start(home.clone())
        .await
        .map_err(|e| anyhow::anyhow!(e.chain()))?;

    let socket = home.socket();
    match std::fs::remove_file(&socket) {
        Ok(()) => info!(path = %socket.display(), "removed stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("failed to remove stale {}", socket.display()));
        }
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("failed to bind {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to restrict {}", socket.display()))?;
    info!(path = %socket.display(), pid = std::process::id(), "kilnd serving");

    let app = api::router(Arc::clone(&engine));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("API server failed")?;

    info!("shutting down: stopping sandboxes");
    engine.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    drop(lock);
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon still serves; it just cannot stop gracefully.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use kiln_client::ClientHome;
    use kiln_core::Home;

    #[test]
    fn client_home_paths_match_engine_home() {
        let root = std::path::PathBuf::from("/k");
        let (home, client) = (Home::new(root.clone()), ClientHome::new(root));
        assert_eq!(client.socket(), home.socket());
        assert_eq!(client.daemon_log(), home.daemon_log());
        let id = kiln_api_types::SandboxId::random();
        assert_eq!(client.sandbox_dir(&id), home.sandbox_dir(&id));
        // Same environment, same default directory.
        assert_eq!(ClientHome::from_env().root(), Home::from_env().root());
    }
}
