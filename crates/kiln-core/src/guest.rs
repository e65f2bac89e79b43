//! What the host does inside a guest through its agent on the sandbox's behalf: the image's
//! after-boot commands and readiness probe, secret delivery and scrubbing, and the image's
//! on-restore hook.
//!
//! ```text
//!   cold boot / capture VM:  on_boot commands (each exit 0) ─▶ readiness probe (retried)
//!   every start:             deliver secrets (/run/secrets, 0400) ─▶ on-restore hook
//!   before a user snapshot:  scrub secrets (overwrite with zeros, unlink)
//! ```
//!
//! Invariants: secret values travel only on a command's stdin, never in an argv or an
//! environment the host logs; every guest command has a deadline, and a failure carries the
//! command's own output (bounded) so the user sees why.

use std::time::{Duration, Instant};

use kiln_agent_host::{AgentClient, ExecEvent, ExecRequest};
use kiln_api_types::Secrets;
use kiln_image::{GuestCommand, ProbeCheck, ReadinessProbe};

use crate::error::CoreError;

/// How much of a failed command's stdout and stderr an error quotes.
const OUTPUT_QUOTE_BYTES: usize = 4096;
/// Deadline of the small housekeeping commands (secret delivery and scrubbing).
pub(crate) const HOUSEKEEPING_TIMEOUT: Duration = Duration::from_secs(30);

/// The end of one guest command.
#[derive(Debug)]
pub struct GuestRun {
    /// Shell-style exit code (124 on timeout, 128+N on signal N).
    pub code: i32,
    /// Whether the deadline killed it.
    pub timed_out: bool,
    /// The first bytes of stdout and stderr, interleaved as they arrived.
    pub output: String,
}

impl GuestRun {
    pub(crate) fn describe(&self, what: &str, timeout: Duration) -> String {
        let how = if self.timed_out {
            format!(
                "did not finish within {} ms and was killed",
                timeout.as_millis()
            )
        } else {
            format!("exited with status {}", self.code)
        };
        let out = self.output.trim();
        if out.is_empty() {
            format!("{what} {how} (no output)")
        } else {
            format!("{what} {how}; its output:\n{out}")
        }
    }
}

/// Runs `argv` in the guest with a deadline, feeding `stdin` (if any), and returns its end.
pub async fn run(
    agent: &AgentClient,
    argv: &[String],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<GuestRun, CoreError> {
    run_in(agent, argv, stdin, timeout, &ImageEnv::default()).await
}

/// The image's environment and working directory, for its guest commands (`on_boot`, the
/// readiness probe, `on_restore`). They run as root (they start and configure services),
/// not as the image's `user`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageEnv {
    /// The recipe's `env`.
    pub env: std::collections::BTreeMap<String, String>,
    /// The recipe's `workdir`.
    pub workdir: Option<String>,
}

impl ImageEnv {
    /// What `recipe` sets.
    pub fn of(recipe: &kiln_image::Recipe) -> ImageEnv {
        ImageEnv {
            env: recipe.env.clone(),
            workdir: recipe.workdir.clone(),
        }
    }
}

/// [`run`] with the image's environment and working directory.
async fn run_in(
    agent: &AgentClient,
    argv: &[String],
    stdin: Option<&[u8]>,
    timeout: Duration,
    image: &ImageEnv,
) -> Result<GuestRun, CoreError> {
    let mut req = ExecRequest::new(argv.iter().cloned());
    req.env = image.env.clone();
    req.cwd = image.workdir.clone();
    req.stdin = stdin.is_some();
    req.timeout_ms = Some(timeout.as_millis().max(1) as u64);
    let mut session = agent.exec(req).await.map_err(CoreError::Agent)?;
    if let Some(data) = stdin {
        let tx = session.stdin();
        tx.write(bytes::Bytes::copy_from_slice(data))
            .await
            .map_err(CoreError::Agent)?;
        tx.close().await.map_err(CoreError::Agent)?;
    }
    let mut output = Vec::new();
    loop {
        match session.next_event().await {
            Some(ExecEvent::Stdout(b)) | Some(ExecEvent::Stderr(b)) => {
                let room = OUTPUT_QUOTE_BYTES.saturating_sub(output.len());
                output.extend_from_slice(&b[..b.len().min(room)]);
            }
            Some(ExecEvent::Exit(s)) => {
                return Ok(GuestRun {
                    code: crate::sandbox::api_status(&s).shell_code(),
                    timed_out: s.timed_out,
                    output: String::from_utf8_lossy(&output).into_owned(),
                });
            }
            None => {
                return Err(match session.close_reason() {
                    Some(e) => CoreError::Agent(e),
                    None => CoreError::GuestCommand(
                        "the guest agent ended a command without an exit status".to_owned(),
                    ),
                });
            }
        }
    }
}

/// Runs `cmd` and fails with `what` and the command's output unless it exits 0.
async fn run_checked(
    agent: &AgentClient,
    cmd: &GuestCommand,
    what: &str,
    image: &ImageEnv,
) -> Result<(), CoreError> {
    let timeout = Duration::from_millis(cmd.timeout_ms.max(1));
    let r = run_in(agent, &cmd.argv, None, timeout, image).await?;
    if r.code == 0 {
        Ok(())
    } else {
        Err(CoreError::GuestCommand(r.describe(
            &format!("{what} `{}`", cmd.argv.join(" ")),
            timeout,
        )))
    }
}

/// After a cold boot: the image's `on_boot` commands in order, then its readiness probe.
pub async fn prepare(agent: &AgentClient, recipe: &kiln_image::Recipe) -> Result<(), CoreError> {
    let image = ImageEnv::of(recipe);
    for cmd in &recipe.on_boot {
        run_checked(agent, cmd, "the image's on-boot command", &image).await?;
    }
    if let Some(probe) = &recipe.readiness_probe {
        wait_ready(agent, probe, &image).await?;
    }
    Ok(())
}

/// Retries the probe until it passes or its deadline passes; the error quotes the last
/// attempt.
pub async fn wait_ready(
    agent: &AgentClient,
    probe: &ReadinessProbe,
    image: &ImageEnv,
) -> Result<(), CoreError> {
    let started = Instant::now();
    let deadline = Duration::from_millis(probe.deadline_ms);
    let interval = Duration::from_millis(probe.interval_ms.max(10));
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match &probe.check {
            ProbeCheck::Command(cmd) => {
                let timeout = Duration::from_millis(cmd.timeout_ms.max(1));
                let r = run_in(agent, &cmd.argv, None, timeout, image).await?;
                if r.code == 0 {
                    return Ok(());
                }
                r.describe(&format!("`{}`", cmd.argv.join(" ")), timeout)
            }
            ProbeCheck::TcpPort { port } => {
                if listening(agent, *port).await? {
                    return Ok(());
                }
                format!("nothing listens on guest port {port} yet")
            }
        };
        if started.elapsed() + interval > deadline {
            return Err(CoreError::GuestCommand(format!(
                "the image's readiness probe did not pass within {} ms ({attempts} attempts); last attempt: {last}",
                deadline.as_millis()
            )));
        }
        tokio::time::sleep(interval).await;
    }
}

/// Most bytes of `/proc/net/tcp{,6}` read for a readiness check (about 6 600 sockets).
const MAX_PROC_NET_BYTES: u64 = 1 << 20;

/// Whether a socket listens on TCP `port` in the guest, read from `/proc/net/tcp` and
/// `/proc/net/tcp6` through the file channel. No connection is made: the guest kernel draws
/// the keys of its TCP sequence numbers, timestamp offsets and ephemeral ports at its first
/// TCP connection, and a warm snapshot captured before any lets every clone draw its own
/// (after the fresh entropy of its restore). A missing file (no IPv6) counts as no socket.
async fn listening(agent: &AgentClient, port: u16) -> Result<bool, CoreError> {
    use tokio::io::AsyncReadExt;
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let path = kiln_agent_host::GuestPath::new(path)
            .map_err(|e| CoreError::HostSetup(format!("{path}: {e}")))?;
        let reader = match agent
            .file_read(kiln_agent_host::FileReadRequest::new(path))
            .await
        {
            Ok(r) => r,
            Err(kiln_agent_host::AgentError::Remote { .. }) => continue,
            Err(e) => return Err(CoreError::Agent(e)),
        };
        let mut text = Vec::new();
        reader
            .take(MAX_PROC_NET_BYTES)
            .read_to_end(&mut text)
            .await
            .map_err(|e| CoreError::GuestCommand(format!("reading the guest's sockets: {e}")))?;
        if proc_net_listens(&text, port) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a `/proc/net/tcp`-format table has a socket in state `0A` (LISTEN) on `port`.
fn proc_net_listens(table: &[u8], port: u16) -> bool {
    String::from_utf8_lossy(table).lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        state == Some("0A")
            && local
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

/// Writes each secret to `/run/secrets/<name>` (tmpfs, mode 0400) in the guest. The value
/// travels on the command's stdin, never on a command line, and is logged nowhere.
pub async fn deliver_secrets(agent: &AgentClient, secrets: &Secrets) -> Result<(), CoreError> {
    for (name, value) in &secrets.0 {
        let argv = [
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            // Write beside, then rename: a rotation never shows a half-written value.
            "mkdir -p -m 0700 /run/secrets && umask 0377 && rm -f \"/run/secrets/.$1\" && cat > \"/run/secrets/.$1\" && mv -f \"/run/secrets/.$1\" \"/run/secrets/$1\"".to_owned(),
            "kiln-secret".to_owned(),
            name.clone(),
        ];
        let r = run(agent, &argv, Some(value.as_bytes()), HOUSEKEEPING_TIMEOUT).await?;
        if r.code != 0 {
            return Err(CoreError::GuestCommand(r.describe(
                &format!("delivering secret {name}"),
                HOUSEKEEPING_TIMEOUT,
            )));
        }
    }
    Ok(())
}

/// Reads secret `name` back from `/run/secrets` in the guest (a daemon that re-attaches keeps
/// no secret values of its own). `None` when the guest has no such file. The guest is
/// hostile: at most [`kiln_api_types::MAX_SECRET_BYTES`] are accepted.
pub async fn read_secret(agent: &AgentClient, name: &str) -> Result<Option<String>, CoreError> {
    kiln_api_types::validate_secret_name(name).map_err(CoreError::BadRequest)?;
    let mut req = ExecRequest::new([
        "/bin/cat".to_owned(),
        "--".to_owned(),
        format!("/run/secrets/{name}"),
    ]);
    req.timeout_ms = Some(HOUSEKEEPING_TIMEOUT.as_millis() as u64);
    req.max_output_bytes = Some(kiln_api_types::MAX_SECRET_BYTES as u64 + 1);
    let mut session = agent.exec(req).await.map_err(CoreError::Agent)?;
    let mut value = Vec::new();
    loop {
        match session.next_event().await {
            Some(ExecEvent::Stdout(b)) => {
                if value.len() + b.len() > kiln_api_types::MAX_SECRET_BYTES {
                    return Err(CoreError::GuestCommand(format!(
                        "secret {name} read back from the guest is larger than {} bytes",
                        kiln_api_types::MAX_SECRET_BYTES
                    )));
                }
                value.extend_from_slice(&b);
            }
            Some(ExecEvent::Stderr(_)) => {}
            Some(ExecEvent::Exit(s)) => {
                if crate::sandbox::api_status(&s).shell_code() != 0 {
                    return Ok(None);
                }
                return String::from_utf8(value).map(Some).map_err(|_| {
                    CoreError::GuestCommand(format!("secret {name} in the guest is not UTF-8"))
                });
            }
            None => {
                return Err(match session.close_reason() {
                    Some(e) => CoreError::Agent(e),
                    None => CoreError::GuestCommand(
                        "the guest agent ended a command without an exit status".to_owned(),
                    ),
                });
            }
        }
    }
}

/// Overwrites every file under `/run/secrets` with zeros and removes the directory, so a
/// memory snapshot taken next holds no secret value in the file's pages.
pub async fn scrub_secrets(agent: &AgentClient) -> Result<(), CoreError> {
    let argv = [
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        "if [ -d /run/secrets ]; then for f in /run/secrets/* /run/secrets/.[!.]*; do [ -f \"$f\" ] && shred -n 0 -z \"$f\"; done; rm -rf /run/secrets; fi".to_owned(),
    ];
    let r = run(agent, &argv, None, HOUSEKEEPING_TIMEOUT).await?;
    if r.code != 0 {
        return Err(CoreError::GuestCommand(r.describe(
            "removing /run/secrets before the snapshot",
            HOUSEKEEPING_TIMEOUT,
        )));
    }
    Ok(())
}

/// Bytes pushed through the agent channel by [`purge_channel`]: more than the guest's
/// virtio-serial receive buffers (128 × 4 KiB) and the agent's read buffer together.
const PURGE_BYTES: usize = 1 << 20;

/// Streams [`PURGE_BYTES`] of zeros through the channel into `cat > /dev/null`, overwriting
/// every receive buffer on the way (the guest's virtio-serial buffers, the agent's read
/// buffer) that may still hold bytes of an earlier secret delivery.
pub async fn purge_channel(agent: &AgentClient) -> Result<(), CoreError> {
    let argv = [
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        "cat > /dev/null".to_owned(),
    ];
    let zeros = vec![0u8; PURGE_BYTES];
    let r = run(agent, &argv, Some(&zeros), HOUSEKEEPING_TIMEOUT).await?;
    if r.code != 0 {
        return Err(CoreError::GuestCommand(
            r.describe("purging the agent channel", HOUSEKEEPING_TIMEOUT),
        ));
    }
    Ok(())
}

/// Runs the image's on-restore hook; its failure (or timeout) is an error quoting its output.
pub async fn run_hook(
    agent: &AgentClient,
    hook: &GuestCommand,
    image: &ImageEnv,
) -> Result<(), CoreError> {
    run_checked(agent, hook, "the image's on-restore hook", image).await
}

#[cfg(test)]
mod tests {
    //! The real agent in process (real host processes, no VM) behind the real client.

    use super::*;
    use kiln_agent::{Agent, AgentConfig, ReapMode, Reaper};
    use kiln_agent_host::ClientConfig;

    async fn agent() -> AgentClient {
        let reaper = Reaper::start(ReapMode::RegisteredOnly).expect("sigchld listener");
        let agent = Agent::new(AgentConfig::default(), reaper);
        let (host, guest) = tokio::io::duplex(64 << 10);
        tokio::spawn(async move {
            let _ = agent.serve(guest).await;
        });
        let config = ClientConfig {
            handshake_deadline: Duration::from_secs(10),
            ..ClientConfig::default()
        };
        AgentClient::connect_with(host, config)
            .await
            .expect("handshake")
            .0
    }

    fn cmd(script: &str, timeout_ms: u64) -> GuestCommand {
        GuestCommand {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            timeout_ms,
        }
    }

    #[tokio::test]
    async fn guest_commands_get_the_images_env_and_workdir() {
        let a = agent().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let workdir = dir.path().to_str().expect("utf-8").to_owned();
        let mut recipe = kiln_image::Recipe::debian("x", "bookworm");
        recipe.env.insert("KILN_T".into(), "from-recipe".into());
        recipe.workdir = Some(workdir.clone());
        let check = format!("test \"$KILN_T\" = from-recipe && test \"$(pwd)\" = '{workdir}'");
        recipe.on_boot.push(cmd(&check, 10_000));
        recipe.readiness_probe = Some(ReadinessProbe {
            check: ProbeCheck::Command(cmd(&check, 10_000)),
            interval_ms: 10,
            deadline_ms: 10_000,
        });
        prepare(&a, &recipe)
            .await
            .expect("on_boot and the probe see env and workdir");
        run_hook(&a, &cmd(&check, 10_000), &ImageEnv::of(&recipe))
            .await
            .expect("the hook sees them");
        // Without them the same check fails: the test can tell.
        let err = run_hook(&a, &cmd(&check, 10_000), &ImageEnv::default())
            .await
            .expect_err("no env");
        assert!(err.to_string().contains("on-restore hook"), "{err}");
    }

    #[tokio::test]
    async fn hook_that_hangs_is_killed_at_its_deadline_with_a_clear_error() {
        let a = agent().await;
        let t = Instant::now();
        let err = run_hook(
            &a,
            &cmd("echo started; sleep 30", 300),
            &ImageEnv::default(),
        )
        .await
        .expect_err("a hanging hook fails");
        let msg = err.to_string();
        assert!(
            msg.contains("on-restore hook") && msg.contains("did not finish within 300 ms"),
            "{msg}"
        );
        assert!(msg.contains("started"), "output quoted: {msg}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "killed, not waited out"
        );
    }

    #[tokio::test]
    async fn failing_hook_reports_status_and_output() {
        let a = agent().await;
        let msg = run_hook(
            &a,
            &cmd("echo 'role does not exist' >&2; exit 3", 10_000),
            &ImageEnv::default(),
        )
        .await
        .expect_err("exit 3 fails")
        .to_string();
        assert!(msg.contains("exited with status 3"), "{msg}");
        assert!(msg.contains("role does not exist"), "{msg}");
        run_hook(&a, &cmd("true", 10_000), &ImageEnv::default())
            .await
            .expect("exit 0 passes");
    }

    #[tokio::test]
    async fn probe_passes_once_the_service_is_ready() {
        let a = agent().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let flag = dir.path().join("ready");
        let counter = dir.path().join("attempts");
        // Ready on the third attempt: each attempt appends a line, the third creates the flag.
        let script = format!(
            "echo x >> {c}; [ $(wc -l < {c}) -ge 3 ] && touch {f}; test -f {f}",
            c = counter.display(),
            f = flag.display()
        );
        let probe = ReadinessProbe {
            check: ProbeCheck::Command(cmd(&script, 5_000)),
            interval_ms: 10,
            deadline_ms: 30_000,
        };
        wait_ready(&a, &probe, &ImageEnv::default())
            .await
            .expect("ready");
        let attempts = std::fs::read_to_string(&counter)
            .expect("counter")
            .lines()
            .count();
        assert_eq!(attempts, 3);
    }

    #[tokio::test]
    async fn probe_that_never_passes_fails_at_its_deadline_quoting_the_last_attempt() {
        let a = agent().await;
        let probe = ReadinessProbe {
            check: ProbeCheck::Command(cmd("echo not yet; exit 1", 5_000)),
            interval_ms: 20,
            deadline_ms: 300,
        };
        let msg = wait_ready(&a, &probe, &ImageEnv::default())
            .await
            .expect_err("never ready")
            .to_string();
        assert!(msg.contains("did not pass within 300 ms"), "{msg}");
        assert!(msg.contains("not yet"), "{msg}");
    }

    #[test]
    fn proc_net_tables_show_listening_ports_only() {
        let table = b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   105        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
";
        assert!(proc_net_listens(table, 5432), "0x1538 listens");
        assert!(
            !proc_net_listens(table, 8080),
            "0x1F90 is established, not listening"
        );
        assert!(!proc_net_listens(table, 22));
        assert!(!proc_net_listens(b"", 5432));
        assert!(!proc_net_listens(b"header\n0: garbage\n\xff\xfe 0A", 5432));
    }

    #[tokio::test]
    async fn tcp_probe_checks_a_listening_port() {
        let a = agent().await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let probe = |port| ReadinessProbe {
            check: ProbeCheck::TcpPort { port },
            interval_ms: 20,
            deadline_ms: 300,
        };
        wait_ready(&a, &probe(port), &ImageEnv::default())
            .await
            .expect("listening port is ready");
        drop(listener);
        let msg = wait_ready(&a, &probe(port), &ImageEnv::default())
            .await
            .expect_err("closed port is not ready")
            .to_string();
        assert!(msg.contains(&format!("port {port}")), "{msg}");
    }
}
