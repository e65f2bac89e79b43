//! `kilnd`, kiln's daemon: owns the engine and serves the HTTP API on a unix socket and,
//! if asked, on a TCP address.
//!
//! This binary wires things together and holds no business logic: it reads its settings
//! (flags > environment > `$KILN_HOME/config.toml` > defaults, see `docs/config.md`), takes
//! the single-instance lock, binds `$KILN_HOME/kilnd.sock` (mode 0600), starts the engine
//! (whose janitor reclaims what a previous daemon left), serves [`api::router`] (on TCP behind
//! [`auth::require_token`]) and the desktop viewer listener ([`view`], loopback by default),
//! and on SIGTERM or SIGINT closes every viewer and stops every sandbox before exiting.
//!
//! Invariant: a TCP listener on a non-loopback address is refused unless `--listen-public`
//! (or `listen_public = true`) asks for it: whoever holds the token can run code here.

mod api;
#[cfg(test)]
mod api_fuzz;
mod auth;
mod exec_ws;
mod listen;
mod openapi;
mod view;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use kiln_client::ClientHome;
use kiln_client::config::{self, Config};
use kiln_core::{Engine, Home};
use tracing::info;

/// Largest request body by default (64 secrets of 64 KiB fit).
const DEFAULT_MAX_BODY_BYTES: u64 = 8 << 20;
/// Connections served at once per listener by default; more wait to be accepted.
const DEFAULT_MAX_CONNECTIONS: u32 = 512;
/// Time a client has to send a request head by default (also an idle keep-alive's limit).
const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 30;
/// Time a request body may send nothing while the daemon waits for it, by default.
const DEFAULT_BODY_TIMEOUT_SECS: u64 = 60;

/// kilnd: the kiln daemon. Serves kiln's HTTP API on `$KILN_HOME/kilnd.sock`; the `kiln` CLI
/// starts it on demand. Settings: flags > environment > $KILN_HOME/config.toml > defaults
/// (docs/config.md).
#[derive(Debug, Parser)]
#[command(name = "kilnd", version, about)]
struct Args {
    /// Also serve the API on this TCP address (e.g. 127.0.0.1:7070); every request there
    /// needs `Authorization: Bearer <token>` (`kiln token`). Env: KILN_LISTEN; config: listen.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Allow --listen on an address that is not loopback. Env: KILN_LISTEN_PUBLIC; config:
    /// listen_public.
    #[arg(long)]
    listen_public: bool,
    /// Print the API's OpenAPI 3.1 document (the text of docs/openapi.json) and exit.
    #[arg(long, exclusive = true)]
    print_openapi: bool,
    /// Examine the host as `GET /v1/doctor` would, print the report as JSON and exit (used by
    /// `kiln doctor` when no daemon runs).
    #[arg(long, exclusive = true)]
    doctor: bool,
}

/// What the daemon serves, resolved from flags, environment, config file and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// TCP listener, if any.
    pub listen: Option<SocketAddr>,
    /// Largest request body in bytes.
    pub max_body_bytes: u64,
    /// Connections served at once per listener (at least 1).
    pub max_connections: usize,
    /// Time a client has to send a request's head.
    pub header_timeout: Duration,
    /// Time a request body may send nothing while a handler waits for it.
    pub body_timeout: Duration,
    /// The config file's warm pools.
    pub pools: Vec<(kiln_api_types::ImageName, kiln_api_types::PoolSetRequest)>,
    /// The viewer listener's address (port 0: picked at start).
    pub view_listen: SocketAddr,
    /// How long a viewer link is valid.
    pub view_ttl: Duration,
    /// Where noVNC's files are.
    pub novnc_dir: std::path::PathBuf,
}

impl Settings {
    /// Applies the precedence rule and the loopback check.
    fn resolve(args: &Args, file: &Config) -> anyhow::Result<Settings> {
        let file_listen = file
            .listen
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .with_context(|| format!("config key listen: {a:?} is not an ADDRESS:PORT"))
            })
            .transpose()?;
        let listen = args
            .listen
            .or(config::env(
                "KILN_LISTEN",
                "an ADDRESS:PORT such as 127.0.0.1:7070",
            )?)
            .or(file_listen);
        let public = config::pick(
            args.listen_public.then_some(true),
            config::env_bool("KILN_LISTEN_PUBLIC")?,
            file.listen_public,
            false,
        );
        if let Some(addr) = listen
            && !addr.ip().is_loopback()
            && !public
        {
            bail!(
                "refusing to listen on {addr}: it is not a loopback address, and anyone who can reach it with the token can run code on this host; pass --listen-public (or set listen_public = true in config.toml) if that is what you want"
            );
        }
        let secs = |name: &'static str, v: u64| {
            if v == 0 {
                bail!("{name} must be at least 1 second");
            }
            Ok(Duration::from_secs(v))
        };
        let file_view_listen = file
            .view_listen
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>().with_context(|| {
                    format!("config key view_listen: {a:?} is not an ADDRESS:PORT")
                })
            })
            .transpose()?;
        let view_listen = config::pick(
            None,
            config::env("KILN_VIEW_LISTEN", "an ADDRESS:PORT such as 127.0.0.1:7080")?,
            file_view_listen,
            SocketAddr::from(([127, 0, 0, 1], 0)),
        );
        if !view_listen.ip().is_loopback() && !public {
            bail!(
                "refusing to serve desktop viewers on {view_listen}: it is not a loopback address, and viewer links travel unencrypted; set listen_public = true in config.toml (or pass --listen-public) if that is what you want"
            );
        }
        let view_ttl = secs(
            "view_ttl_secs",
            config::pick(
                None,
                config::env("KILN_VIEW_TTL_SECS", "a number of seconds")?,
                file.view_ttl_secs,
                kiln_api_types::DEFAULT_VIEW_TTL_SECS,
            ),
        )?;
        let novnc_dir = config::pick(
            None,
            config::env("KILN_NOVNC_DIR", "a directory")?,
            file.novnc_dir.clone(),
            std::path::PathBuf::from(view::DEFAULT_NOVNC_DIR),
        );
        let max_body_bytes = config::pick(
            None,
            config::env("KILN_MAX_BODY_BYTES", "a number of bytes")?,
            file.max_body_bytes,
            DEFAULT_MAX_BODY_BYTES,
        );
        let max_connections = config::pick(
            None,
            config::env("KILN_MAX_CONNECTIONS", "a number of connections")?,
            file.max_connections,
            DEFAULT_MAX_CONNECTIONS,
        );
        if max_connections == 0 {
            bail!("max_connections must be at least 1");
        }
        let header_timeout = secs(
            "request_header_timeout_secs",
            config::pick(
                None,
                config::env("KILN_REQUEST_HEADER_TIMEOUT_SECS", "a number of seconds")?,
                file.request_header_timeout_secs,
                DEFAULT_HEADER_TIMEOUT_SECS,
            ),
        )?;
        let body_timeout = secs(
            "request_body_timeout_secs",
            config::pick(
                None,
                config::env("KILN_REQUEST_BODY_TIMEOUT_SECS", "a number of seconds")?,
                file.request_body_timeout_secs,
                DEFAULT_BODY_TIMEOUT_SECS,
            ),
        )?;
        let pools = file
            .pool
            .iter()
            .map(|p| {
                let image = p
                    .image
                    .parse()
                    .map_err(|e| anyhow::anyhow!("config [[pool]] of image {:?}: {e}", p.image))?;
                let req = kiln_api_types::PoolSetRequest {
                    size: p.size,
                    // A pool serves the starts that ask for its size: by default the size
                    // `kiln run` asks for with this config file (then the image's).
                    cpus: p.cpus.or(file.cpus),
                    memory_mib: p.memory_mib.or(file.memory_mib),
                    warmup: p.warmup.clone(),
                    warmup_timeout_secs: p.warmup_timeout_secs,
                };
                req.validate()
                    .map_err(|e| anyhow::anyhow!("config [[pool]] of image {:?}: {e}", p.image))?;
                Ok((image, req))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Settings {
            listen,
            max_body_bytes,
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
            header_timeout,
            body_timeout,
            pools,
            view_listen,
            view_ttl,
            novnc_dir,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_openapi {
        print!("{}", openapi::openapi_json());
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
    let client_home = ClientHome::new(home.root().to_owned());
    let settings = Settings::resolve(&args, &Config::load(&client_home.config())?)?;
    runtime.block_on(serve(home, settings))
}

async fn serve(home: Home, settings: Settings) -> anyhow::Result<()> {
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

    // Bind the TCP address before starting the engine, so a taken port fails fast.
    let tcp = match settings.listen {
        Some(addr) => {
            let token_path = ClientHome::new(home.root().to_owned()).token();
            kiln_client::token::read_or_create(&token_path)?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("failed to listen on {addr}"))?;
            Some((listener, token_path))
        }
        None => None,
    };
    let view_listener = tokio::net::TcpListener::bind(settings.view_listen)
        .await
        .with_context(|| {
            format!(
                "failed to listen for desktop viewers on {}",
                settings.view_listen
            )
        })?;

    let engine = Engine::start(home.clone())
        .await
        .map_err(|e| anyhow::anyhow!(e.chain()))?;
    engine
        .pool_configure(&settings.pools)
        .await
        .map_err(|e| anyhow::anyhow!("config [[pool]]: {}", e.chain()))?;

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

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        stop_tx.send_replace(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let view_addr = view_listener.local_addr()?;
    let locator: Arc<dyn view::VncLocator> = engine.clone();
    let viewers = view::Viewers::new(
        view::ViewConfig {
            addr: view_addr,
            ttl: settings.view_ttl,
            novnc_dir: settings.novnc_dir.clone(),
        },
        locator,
    );
    viewers.watch_events(engine.events());
    info!(addr = %view_addr, "kilnd serving desktop viewers");
    let view_app = viewers.router();
    let view_stop = {
        let (viewers, stop) = (viewers.clone(), stopped(stop_rx.clone()));
        async move {
            stop.await;
            viewers.close_all();
        }
    };
    let view = listen::serve(view_listener, view_app, &settings, view_stop);
    let unix_app = listen::unix_app(Arc::clone(&engine), &settings, &viewers);
    let unix = listen::serve(listener, unix_app, &settings, stopped(stop_rx.clone()));
    match tcp {
        Some((tcp_listener, token_path)) => {
            info!(addr = %tcp_listener.local_addr()?, "kilnd serving on TCP (bearer token required)");
            let tcp_app = listen::tcp_app(Arc::clone(&engine), &settings, &viewers, token_path);
            let tcp = listen::serve(tcp_listener, tcp_app, &settings, stopped(stop_rx.clone()));
            tokio::join!(unix, tcp, view);
        }
        None => {
            tokio::join!(unix, view);
        }
    }

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
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::parse_from(std::iter::once("kilnd").chain(list.iter().copied()))
    }

    #[test]
    fn args_definition_passes_clap_debug_asserts() {
        use clap::CommandFactory;
        Args::command().debug_assert();
        assert!(Args::try_parse_from(["kilnd", "--listen", "not-an-address"]).is_err());
    }

    #[test]
    fn settings_non_loopback_listen_is_refused_without_public() {
        let err = Settings::resolve(&args(&["--listen", "0.0.0.0:7070"]), &Config::default())
            .unwrap_err();
        assert!(err.to_string().contains("--listen-public"), "{err}");
        let file = Config {
            listen: Some("0.0.0.0:7070".into()),
            ..Default::default()
        };
        assert!(Settings::resolve(&args(&[]), &file).is_err());
        let ok = Settings::resolve(
            &args(&["--listen", "0.0.0.0:7070", "--listen-public"]),
            &file,
        )
        .unwrap();
        assert_eq!(ok.listen, Some("0.0.0.0:7070".parse().unwrap()));
    }

    #[test]
    fn settings_flag_beats_config_file() {
        let file = Config {
            listen: Some("127.0.0.1:1111".into()),
            max_body_bytes: Some(4096),
            ..Default::default()
        };
        let s = Settings::resolve(&args(&["--listen", "127.0.0.1:2222"]), &file).unwrap();
        assert_eq!(s.listen, Some("127.0.0.1:2222".parse().unwrap()));
        assert_eq!(s.max_body_bytes, 4096);
        let s = Settings::resolve(&args(&[]), &file).unwrap();
        assert_eq!(s.listen, Some("127.0.0.1:1111".parse().unwrap()));
        let s = Settings::resolve(&args(&[]), &Config::default()).unwrap();
        assert_eq!(s.listen, None);
        assert_eq!(s.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    }

    #[test]
    fn settings_edge_limits_come_from_the_file_and_zero_is_refused() {
        let s = Settings::resolve(&args(&[]), &Config::default()).unwrap();
        assert_eq!(s.max_connections, DEFAULT_MAX_CONNECTIONS as usize);
        assert_eq!(
            s.header_timeout,
            Duration::from_secs(DEFAULT_HEADER_TIMEOUT_SECS)
        );
        assert_eq!(
            s.body_timeout,
            Duration::from_secs(DEFAULT_BODY_TIMEOUT_SECS)
        );
        let file = Config {
            max_connections: Some(7),
            request_header_timeout_secs: Some(3),
            request_body_timeout_secs: Some(4),
            ..Default::default()
        };
        let s = Settings::resolve(&args(&[]), &file).unwrap();
        assert_eq!(
            (s.max_connections, s.header_timeout, s.body_timeout),
            (7, Duration::from_secs(3), Duration::from_secs(4))
        );
        for file in [
            Config {
                max_connections: Some(0),
                ..Default::default()
            },
            Config {
                request_header_timeout_secs: Some(0),
                ..Default::default()
            },
            Config {
                request_body_timeout_secs: Some(0),
                ..Default::default()
            },
        ] {
            let err = Settings::resolve(&args(&[]), &file).unwrap_err();
            assert!(err.to_string().contains("at least 1"), "{err}");
        }
        let parsed = Config::parse(
            "max_connections = 9\nrequest_header_timeout_secs = 2\nrequest_body_timeout_secs = 5\n",
            std::path::Path::new("config.toml"),
        )
        .unwrap();
        assert_eq!(parsed.max_connections, Some(9));
    }

    #[test]
    fn settings_viewer_listener_defaults_file_values_and_loopback_rule() {
        let s = Settings::resolve(&args(&[]), &Config::default()).unwrap();
        assert_eq!(s.view_listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(
            s.view_ttl,
            Duration::from_secs(kiln_api_types::DEFAULT_VIEW_TTL_SECS)
        );
        assert_eq!(s.novnc_dir, std::path::Path::new(view::DEFAULT_NOVNC_DIR));
        let file = Config {
            view_listen: Some("127.0.0.1:7080".into()),
            view_ttl_secs: Some(600),
            novnc_dir: Some("/opt/novnc".into()),
            ..Default::default()
        };
        let s = Settings::resolve(&args(&[]), &file).unwrap();
        assert_eq!(
            (s.view_listen, s.view_ttl, s.novnc_dir.as_path()),
            (
                "127.0.0.1:7080".parse().unwrap(),
                Duration::from_secs(600),
                std::path::Path::new("/opt/novnc")
            )
        );
        let public = Config {
            view_listen: Some("0.0.0.0:7080".into()),
            ..Default::default()
        };
        let err = Settings::resolve(&args(&[]), &public).unwrap_err();
        assert!(err.to_string().contains("listen_public"), "{err}");
        assert!(Settings::resolve(&args(&["--listen-public"]), &public).is_ok());
        for bad in [
            Config {
                view_listen: Some("localhost".into()),
                ..Default::default()
            },
            Config {
                view_ttl_secs: Some(0),
                ..Default::default()
            },
        ] {
            assert!(Settings::resolve(&args(&[]), &bad).is_err());
        }
        let parsed = Config::parse(
            "view_listen = \"127.0.0.1:1\"\nview_ttl_secs = 5\nnovnc_dir = \"/x\"\n",
            std::path::Path::new("config.toml"),
        )
        .unwrap();
        assert_eq!(parsed.view_ttl_secs, Some(5));
    }

    #[test]
    fn settings_bad_config_listen_names_key() {
        let file = Config {
            listen: Some("localhost".into()),
            ..Default::default()
        };
        let err = Settings::resolve(&args(&[]), &file).unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
    }

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
