//! One running QEMU process: spawn, QMP connection, exit notification, shutdown.
//!
//! ```text
//!  Vm::spawn ─▶ QEMU started ─▶ pidfile written ─▶ QMP connected ─▶ Vm (running)
//!                   │ exits early / QMP silent past the deadline
//!                   ▼
//!             killed, reaped, error carrying qemu.log's tail
//!
//!  Vm::attach(run):     pidfile + vm.json ─▶ pidfd opened, start time checked ─▶ console
//!                       socket bound again (QEMU reconnects within 1 s) ─▶ QMP connected
//!  Vm::shutdown(grace): QMP quit ─▶ wait ≤ grace ─▶ SIGKILL ─▶ reaped
//!  Vm::kill:            SIGKILL ─▶ reaped
//!  drop(Vm):            SIGKILL (asynchronously, by the supervisor task)
//!  Vm::release:         nothing: QEMU keeps running for the next daemon to attach
//! ```
//!
//! Invariants:
//! - QEMU outlives the daemon that started it (no parent-death signal): a daemon that
//!   restarts attaches to it; only [`Vm::kill`], [`Vm::shutdown`] or dropping an unreleased
//!   `Vm` ends it. QEMU dying resolves every [`Vm::wait_exit`] at once.
//! - Every `Vm` reads its console: `<run>/console.sock` is bound before QEMU starts (or, when
//!   attaching, before QEMU's next reconnect) and copied into the capped `console.log`
//!   ([`crate::console`]); [`Vm::wait_exit`] returns once that copy has everything QEMU
//!   printed (bounded wait), so a console tail read after an exit is complete.
//! - `<run>/qemu.pid` (pid and start time) and `<run>/vm.json` (the config) are written before
//!   `spawn` returns, so a later daemon can tell this QEMU from a process that reuses its pid
//!   and knows what it runs.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use kiln_qmp::QmpClient;
use kiln_qmp::commands::Quit;
use tokio::process::Command;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::cmdline::{RunPaths, VmConfig, build_args};
use crate::console::{ConsoleReader, console_log_cap, log_tail};
use crate::error::VmmError;
use crate::process::{Lifetime, Supervised, VmExit, file_tail, pass_fd, supervise_settings};
use crate::procid::ProcessIdentity;

/// How long QEMU may take to open its QMP socket and greet. QEMU is up in ~50 ms; the margin
/// covers a loaded CI host.
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How much of qemu.log goes into error messages.
pub(crate) const LOG_TAIL_BYTES: usize = 2048;

/// Longest unix socket path (`sun_path` is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How long to wait for QEMU's exit after the QMP handshake broke.
const EXIT_AFTER_RESET: Duration = Duration::from_secs(2);

/// Retry interval while waiting for the QMP socket to appear.
const CONNECT_RETRY: Duration = Duration::from_millis(5);

/// How long an exit waits for the console reader to drain what QEMU wrote before exiting.
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);

/// A running QEMU.
#[derive(Debug)]
pub struct Vm {
    identity: ProcessIdentity,
    paths: RunPaths,
    qmp: QmpClient,
    child: Supervised,
    /// Copies the console socket into the capped log; stops when this handle drops.
    console: ConsoleReader,
    /// The config QEMU was started with (snapshot capture checks `memory_shared`).
    config: VmConfig,
    /// Whether dropping this handle kills QEMU (cleared by [`Vm::release`]).
    armed: std::sync::atomic::AtomicBool,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.armed.load(std::sync::atomic::Ordering::Relaxed) {
            self.child.request_kill();
        }
    }
}

impl Vm {
    /// Starts QEMU for `cfg` and connects to its QMP socket. Creates the runtime directory if
    /// needed and removes stale sockets from a previous run. On any error QEMU is killed and
    /// reaped before this returns.
    ///
    /// Call from a tokio worker thread, not from `spawn_blocking` (QEMU gets
    /// `PR_SET_PDEATHSIG`, which fires when the spawning thread exits).
    pub async fn spawn(cfg: &VmConfig) -> Result<Vm, VmmError> {
        Vm::spawn_passing(cfg, None).await
    }

    /// [`Vm::spawn`], handing QEMU `pass` = (descriptor, number it gets in QEMU), e.g. a state
    /// file for `migrate-incoming fd:<number>` (no `exec:` shell and `cat` in between).
    pub(crate) async fn spawn_passing(
        cfg: &VmConfig,
        pass: Option<(std::os::fd::OwnedFd, std::os::fd::RawFd)>,
    ) -> Result<Vm, VmmError> {
        validate(cfg)?;
        let paths = RunPaths::new(&cfg.run_dir);
        std::fs::create_dir_all(&cfg.run_dir).map_err(|source| VmmError::Io {
            what: "create",
            path: cfg.run_dir.clone(),
            source,
        })?;
        for stale in [
            &paths.console_socket,
            &paths.qmp_socket,
            &paths.agent_socket,
            &paths.pidfile,
            &paths.config_file,
        ] {
            match std::fs::remove_file(stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(VmmError::Io {
                        what: "remove",
                        path: stale.clone(),
                        source,
                    });
                }
            }
        }
        let log = std::fs::File::create(&paths.qemu_log).map_err(|source| VmmError::Io {
            what: "create",
            path: paths.qemu_log.clone(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| VmmError::Io {
            what: "open",
            path: paths.qemu_log.clone(),
            source,
        })?;

        // Listening before QEMU starts: not a byte of its console is lost.
        let console = start_console(&paths)?;
        let args = build_args(cfg);
        let mut cmd = Command::new(&cfg.qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        supervise_settings(&mut cmd, Lifetime::OutlivesParent);
        if let Some((fd, target)) = pass {
            pass_fd(&mut cmd, fd, target);
        }
        let child = cmd.spawn().map_err(|source| VmmError::Spawn {
            qemu: cfg.qemu.clone(),
            source,
        })?;
        // Closes our copies of descriptors passed to QEMU.
        drop(cmd);
        let Some(pid) = child.id() else {
            return Err(VmmError::Spawn {
                qemu: cfg.qemu.clone(),
                source: std::io::Error::other("no pid"),
            });
        };
        // Read the identity before the supervisor can reap the child: even an already exited
        // QEMU still has its /proc entry as a zombie here.
        let identity = ProcessIdentity::of_pid(pid);
        let child = Supervised::start(child);
        let identity = match identity {
            Ok(i) => i,
            Err(source) => {
                child.request_kill();
                child.wait().await;
                return Err(VmmError::Io {
                    what: "read the start time of",
                    path: format!("/proc/{pid}/stat").into(),
                    source,
                });
            }
        };
        let recorded = serde_json::to_vec_pretty(cfg)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&paths.config_file, json))
            .map_err(|source| (paths.config_file.clone(), source))
            .and_then(|()| {
                identity
                    .write(&paths.pidfile)
                    .map_err(|source| (paths.pidfile.clone(), source))
            });
        if let Err((path, source)) = recorded {
            child.request_kill();
            child.wait().await;
            return Err(VmmError::Io {
                what: "write",
                path,
                source,
            });
        }
        debug!(pid, run_dir = %cfg.run_dir.display(), "QEMU started");

        match connect_qmp(&paths, &child).await {
            Ok(qmp) => {
                info!(pid, version = %qmp.version(), accel = %cfg.accel, "QEMU is up");
                Ok(Vm {
                    identity,
                    paths,
                    qmp,
                    child,
                    console,
                    config: cfg.clone(),
                    armed: std::sync::atomic::AtomicBool::new(true),
                })
            }
            Err(e) => {
                child.request_kill();
                child.wait().await;
                Err(e)
            }
        }
    }

    /// Adopts the QEMU a previous daemon started in `run_dir`: reads its pidfile and config,
    /// checks that the pid still names that process (by start time, through a pidfd) and
    /// connects to its QMP socket. Its exit is then seen like a spawned VM's (without the
    /// status, which went to its parent).
    pub async fn attach(run_dir: &Path) -> Result<Vm, VmmError> {
        let paths = RunPaths::new(run_dir);
        let io = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| VmmError::Io { what, path, source }
        };
        let identity = ProcessIdentity::read(&paths.pidfile)
            .map_err(|e| VmmError::InvalidConfig {
                reason: e.to_string(),
            })?
            .ok_or_else(|| VmmError::InvalidConfig {
                reason: format!("{} is missing", paths.pidfile.display()),
            })?;
        let json = std::fs::read(&paths.config_file).map_err(io("read", &paths.config_file))?;
        let config: VmConfig =
            serde_json::from_slice(&json).map_err(|e| VmmError::InvalidConfig {
                reason: format!("{}: {e}", paths.config_file.display()),
            })?;
        let child = Supervised::adopt(identity).map_err(io("adopt the QEMU of", run_dir))?;
        // QEMU's console chardev retries its connection every second: it finds this one.
        let console = start_console(&paths)?;
        let qmp = connect_qmp(&paths, &child).await?;
        debug!(pid = identity.pid, run_dir = %run_dir.display(), "QEMU adopted");
        Ok(Vm {
            identity,
            paths,
            qmp,
            child,
            console,
            config,
            armed: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Lets go of QEMU without stopping it (daemon shutdown that keeps sandboxes running):
    /// the next daemon [`Vm::attach`]es to it.
    pub fn release(&self) {
        self.armed
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// The config this QEMU was started with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.identity.pid
    }

    /// QEMU's identity (pid and start time), as written to the pidfile.
    pub fn identity(&self) -> ProcessIdentity {
        self.identity
    }

    /// The QMP connection.
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// The files of the runtime directory.
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// The agent's virtio-serial unix socket (QEMU listens; connect to talk to the guest).
    pub fn agent_socket(&self) -> &Path {
        &self.paths.agent_socket
    }

    /// The guest's serial console log (the live file; `console.log.1` holds the output
    /// before it, see [`crate::console::log_files`]).
    pub fn console_log(&self) -> &Path {
        &self.paths.console_log
    }

    /// The last lines of the guest console, at most `max_bytes` (for error messages).
    pub fn console_tail(&self, max_bytes: usize) -> String {
        log_tail(&self.paths.console_log, max_bytes)
    }

    /// The last lines of QEMU's own output (stderr/stdout), at most `max_bytes`.
    pub fn qemu_log_tail(&self, max_bytes: usize) -> String {
        file_tail(&self.paths.qemu_log, max_bytes)
    }

    /// How QEMU exited, if it has.
    pub fn try_exit(&self) -> Option<VmExit> {
        self.child.try_exit()
    }

    /// Resolves when QEMU exits (any number of concurrent waiters; promptly, since one task
    /// sits in `waitpid`) and its last console output is in the log.
    pub async fn wait_exit(&self) -> VmExit {
        let exit = self.child.wait().await;
        self.console.settled(CONSOLE_DRAIN).await;
        exit
    }

    /// SIGKILLs QEMU and waits until it is reaped. Idempotent.
    pub async fn kill(&self) -> VmExit {
        self.child.request_kill();
        self.child.wait().await
    }

    /// Asks QEMU to quit over QMP and waits up to `grace` in total; then SIGKILLs it. Returns
    /// once QEMU is reaped. Idempotent.
    pub async fn shutdown(&self, grace: Duration) -> VmExit {
        if let Some(exit) = self.try_exit() {
            return exit;
        }
        let deadline = Instant::now() + grace;
        // The reply may be lost when QEMU closes the socket first: the exit is what counts.
        let _ = tokio::time::timeout_at(deadline, self.qmp.execute(&Quit)).await;
        match tokio::time::timeout_at(deadline, self.wait_exit()).await {
            Ok(exit) => exit,
            Err(_) => {
                warn!(
                    pid = self.pid(),
                    grace_ms = grace.as_millis() as u64,
                    "QEMU ignored quit; killing it"
                );
                self.kill().await
            }
        }
    }
}

fn validate(cfg: &VmConfig) -> Result<(), VmmError> {
    let invalid = |reason: String| Err(VmmError::InvalidConfig { reason });
    if !(1..=255).contains(&cfg.cpus) {
        return invalid(format!("cpus must be 1..=255, got {}", cfg.cpus));
    }
    if cfg.memory_mib < 64 {
        return invalid(format!(
            "memory must be at least 64 MiB, got {}",
            cfg.memory_mib
        ));
    }
    let paths = RunPaths::new(&cfg.run_dir);
    for sock in [
        &paths.qmp_socket,
        &paths.agent_socket,
        &paths.console_socket,
        &paths.net_socket,
    ] {
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return invalid(format!(
                "socket path {} is longer than {MAX_SOCKET_PATH} bytes (use a shorter KILN_HOME)",
                sock.display()
            ));
        }
    }
    Ok(())
}

/// Binds the console socket of `paths` and starts copying it into the capped console log.
fn start_console(paths: &RunPaths) -> Result<ConsoleReader, VmmError> {
    ConsoleReader::start(&paths.console_socket, &paths.console_log, console_log_cap()).map_err(
        |source| VmmError::Io {
            what: "listen on",
            path: paths.console_socket.clone(),
            source,
        },
    )
}

/// Connects to QMP, retrying until the socket answers, QEMU exits, or the deadline passes.
async fn connect_qmp(paths: &RunPaths, child: &Supervised) -> Result<QmpClient, VmmError> {
    let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
    let early_exit = |status: VmExit| VmmError::EarlyExit {
        status,
        log_tail: file_tail(&paths.qemu_log, LOG_TAIL_BYTES),
    };
    let timeout = || VmmError::QmpTimeout {
        path: paths.qmp_socket.clone(),
        timeout_ms: QMP_CONNECT_TIMEOUT.as_millis() as u64,
        log_tail: file_tail(&paths.qemu_log, LOG_TAIL_BYTES),
    };
    loop {
        if let Some(status) = child.try_exit() {
            return Err(early_exit(status));
        }
        match tokio::net::UnixStream::connect(&paths.qmp_socket).await {
            Ok(stream) => {
                let handshake = QmpClient::handshake(stream);
                return tokio::select! {
                    r = tokio::time::timeout_at(deadline, handshake) => match r {
                        Ok(Ok(qmp)) => Ok(qmp),
                        // A QEMU that fails after creating its socket (e.g. cannot load the
                        // kernel) resets the connection while exiting: report the exit.
                        Ok(Err(e)) => match tokio::time::timeout(EXIT_AFTER_RESET, child.wait()).await {
                            Ok(status) => Err(early_exit(status)),
                            Err(_) => Err(VmmError::Qmp(e)),
                        },
                        Err(_) => Err(timeout()),
                    },
                    status = child.wait() => Err(early_exit(status)),
                };
            }
            // Not created yet, or created but not listening yet.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(source) => {
                return Err(VmmError::Io {
                    what: "connect to",
                    path: paths.qmp_socket.clone(),
                    source,
                });
            }
        }
        if Instant::now() >= deadline {
            return Err(timeout());
        }
        tokio::select! {
            () = tokio::time::sleep(CONNECT_RETRY) => {}
            status = child.wait() => return Err(early_exit(status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::Accel;

    fn config(run_dir: &Path) -> VmConfig {
        VmConfig {
            qemu: "/bin/false".into(),
            accel: Accel::Tcg,
            cpus: 1,
            memory_mib: 256,
            kernel: "/k".into(),
            initramfs: "/i".into(),
            extra_cmdline: String::new(),
            disk: None,
            memory_file: run_dir.join("mem"),
            memory_shared: true,
            run_dir: run_dir.to_owned(),
            incoming: None,
            nic: None,
            display: None,
        }
    }

    #[test]
    fn validate_rejects_long_socket_paths_and_bad_sizes() {
        let long = Path::new("/tmp").join("x".repeat(120));
        assert!(matches!(
            validate(&config(&long)),
            Err(VmmError::InvalidConfig { .. })
        ));
        let ok = Path::new("/tmp/run/abc");
        assert!(validate(&config(ok)).is_ok());
        assert!(
            validate(&VmConfig {
                cpus: 0,
                ..config(ok)
            })
            .is_err()
        );
        assert!(
            validate(&VmConfig {
                memory_mib: 16,
                ..config(ok)
            })
            .is_err()
        );
    }

    /// A "QEMU" that exits at once must turn into an error carrying its output, not a hang.
    #[tokio::test]
    async fn spawn_process_exiting_early_is_an_error_with_log_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("fake-qemu");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'qemu-system-x86_64: could not load kernel' >&2\nexit 1\n",
        )
        .expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let run = dir.path().join("run");
        let cfg = VmConfig {
            qemu: fake,
            ..config(&run)
        };
        let err = Vm::spawn(&cfg).await.expect_err("must fail");
        match err {
            VmmError::EarlyExit { status, log_tail } => {
                assert_eq!(status, VmExit::Exited(1));
                assert!(log_tail.contains("could not load kernel"), "{log_tail}");
            }
            other => panic!("expected EarlyExit, got {other:?}"),
        }
        let ident = ProcessIdentity::read(&run.join("qemu.pid")).expect("pidfile readable");
        assert!(ident.is_some_and(|i| !i.is_same_process_alive()));
    }
}
