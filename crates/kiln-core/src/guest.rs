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
    fn describe(&self, what: &str, timeout: Duration) -> String {
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
            ProbeCheck::TcpPort { port } => match agent.open_tcp(*port).await {
                // The agent connected to the port inside the guest: something listens.
                Ok(_tunnel) => return Ok(()),
                // Refused (nothing listens yet) is the usual "not ready"; anything else
                // (a dead channel) ends the wait at once.
                Err(kiln_agent_host::AgentError::Remote { message, .. }) => {
                    format!("connecting to guest port {port}: {message}")
                }
                Err(e) => return Err(CoreError::Agent(e)),
            },
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
