//! `kiln run`: a fresh sandbox, one command, its output streamed, its exit code returned.
//!
//! The image is built first (with progress) if it does not exist. The command's stdout and
//! stderr go to kiln's stdout and stderr as they arrive; kiln's stdin is forwarded until EOF.
//! Exit code: the command's, 128+N if signal N ended it, 124 on `--timeout`. Ctrl-C destroys
//! the sandbox before kiln exits (130).
//!
//! With `-t` the command runs on a terminal in the guest: kiln's terminal goes into raw mode
//! (restored on every way out, see `term.rs`), every key — Ctrl-C included, as the byte 0x03
//! — goes to the guest, where the terminal's line discipline decides (SIGINT for the
//! foreground process group), and a window resize (SIGWINCH) is sent as a `resize` message.

use std::io::{Read, Write};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use kiln_api_types::{
    ExecClientMessage, ExecRequest, ExecServerMessage, ExecTty, ImageInfo, MachineSpec, RunRequest,
    STREAM_STDERR, STREAM_STDOUT, SandboxId, SandboxSource, SandboxSpec,
};
use tokio_tungstenite::tungstenite::Message;

use kiln_client::{Client, WsStream};

/// Options of `kiln run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The sandbox to start.
    #[command(flatten)]
    pub sandbox: SandboxOpts,
    /// The command to run in it.
    #[command(flatten)]
    pub exec: ExecOpts,
}

/// Options that describe a sandbox (`kiln run`, `kiln create`).
#[derive(Debug, Args)]
pub struct SandboxOpts {
    /// Image to start: a name, or a recipe file (`PATH.toml`, built first under its name)
    /// [default: $KILN_IMAGE, else `image` in config.toml, else python].
    #[arg(long)]
    pub image: Option<String>,
    /// Number of vCPUs [default: $KILN_CPUS, else `cpus` in config.toml, else 1].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest memory in MiB [default: $KILN_MEMORY_MIB, else `memory_mib` in config.toml,
    /// else 256].
    #[arg(long)]
    pub memory: Option<u32>,
    /// Screen of a desktop image's sandbox, WIDTHxHEIGHT [default: the image's, 1280x800].
    #[arg(long, value_name = "WxH")]
    pub screen: Option<kiln_api_types::Screen>,
    /// Boot from scratch instead of restoring the image's warm snapshot.
    #[arg(long)]
    pub cold: bool,
    /// Deliver a secret as /run/secrets/NAME (repeatable); `NAME` alone generates a random
    /// 64-hex value and prints it on stderr.
    #[arg(long = "secret", value_name = "NAME[=VALUE]")]
    pub secrets: Vec<String>,
    /// Also give the secrets to every command as environment variables.
    #[arg(long)]
    pub secret_env: bool,
    /// Tunnel 127.0.0.1:HOST_PORT to the guest's port (repeatable).
    #[arg(long = "publish", short = 'p', value_name = "HOST_PORT:GUEST_PORT")]
    pub publish: Vec<String>,
    /// Restore this user snapshot (see `kiln snapshot`) instead of the image's warm
    /// snapshot; the image and size are the snapshot's.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["image", "cold"])]
    pub snapshot: Option<String>,
    /// A unique name, usable wherever an id is.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// A label (repeatable), for `kiln ps --filter label=K=V`.
    #[arg(long = "label", short = 'l', value_name = "K=V")]
    pub labels: Vec<String>,
    /// Remove the sandbox this long after it started (e.g. 30s, 5m, 2h).
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,
    /// Remove the sandbox after this long without exec, file or tunnel activity.
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Network: `none` (default, no network device), `nat` (outbound internet, never the
    /// host, its loopback, private or link-local ranges), `allow=RULE[,RULE...]` (only what
    /// the rules name: `example.org`, `*.example.org`, `10.1.2.0/24:5432`), or `bridge`
    /// (a tap on kiln's bridge; needs root).
    #[arg(long, value_name = "MODE", default_value = "none")]
    pub network: String,
    /// With `--network bridge`: sandboxes sharing a group reach each other by name.
    #[arg(long, value_name = "GROUP")]
    pub network_group: Option<String>,
}

impl SandboxOpts {
    /// The image these options start from (flag, else `$KILN_IMAGE`, else `image` in
    /// config.toml, else python): a name or a recipe file; `None` with `--snapshot`.
    pub fn image(&self) -> anyhow::Result<Option<String>> {
        use kiln_client::config::{self, Config};
        if self.snapshot.is_some() {
            return Ok(None);
        }
        let file = Config::load(&kiln_client::ClientHome::from_env().config())?;
        Ok(Some(config::pick(
            self.image.clone(),
            config::env("KILN_IMAGE", "an image name")?,
            file.image,
            kiln_api_types::DEFAULT_IMAGE.to_owned(),
        )))
    }

    /// Builds the image if it is missing or stale (a recipe file is built under its name)
    /// and returns it; `None` with `--snapshot`.
    pub async fn ensure_image(&self, client: &Client) -> anyhow::Result<Option<ImageInfo>> {
        match self.image()? {
            Some(image) => Ok(Some(crate::image::ensure_built(client, &image).await?)),
            None => Ok(None),
        }
    }

    /// The spec these options describe for `image` (from [`SandboxOpts::ensure_image`]);
    /// errors name the bad option. The machine size comes from the flags, else the
    /// environment, else `config.toml`, else the image's recipe, else the defaults.
    pub fn request(&self, image: Option<&ImageInfo>) -> anyhow::Result<SandboxSpec> {
        let source = self.source(image)?;
        self.request_from(source)
    }

    /// Where the sandbox starts from: the snapshot, else `image`.
    fn source(&self, image: Option<&ImageInfo>) -> anyhow::Result<SandboxSource> {
        use kiln_client::config::{self, Config};
        Ok(match (&self.snapshot, image) {
            (Some(name), _) => SandboxSource::Snapshot {
                snapshot: name
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--snapshot: {e}"))?,
            },
            (None, None) => bail!("no image to start from"),
            (None, Some(info)) => {
                let file = Config::load(&kiln_client::ClientHome::from_env().config())?;
                SandboxSource::Image {
                    image: info
                        .name
                        .parse()
                        .map_err(|e| anyhow::anyhow!("--image: {e}"))?,
                    machine: MachineSpec {
                        cpus: config::pick(
                            self.cpus,
                            config::env("KILN_CPUS", "a number of vCPUs")?,
                            file.cpus,
                            info.cpus.unwrap_or(kiln_api_types::DEFAULT_CPUS),
                        ),
                        memory_mib: config::pick(
                            self.memory,
                            config::env("KILN_MEMORY_MIB", "a number of MiB")?,
                            file.memory_mib,
                            info.memory_mib
                                .unwrap_or(kiln_api_types::DEFAULT_MEMORY_MIB),
                        ),
                        screen: self.screen,
                    },
                    cold: self.cold,
                }
            }
        })
    }

    /// The network of `--network` and `--network-group`.
    pub fn network(&self) -> anyhow::Result<kiln_api_types::NetworkSpec> {
        let spec: kiln_api_types::NetworkSpec = self
            .network
            .parse()
            .map_err(|e| anyhow::anyhow!("--network: {e}"))?;
        let group = self
            .network_group
            .as_deref()
            .map(|g| {
                g.parse()
                    .map_err(|e| anyhow::anyhow!("--network-group: {e}"))
            })
            .transpose()?;
        spec.with_group(group).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The spec of these options with `source` (the rest: secrets, ports, lifetime, ...).
    pub fn request_from(&self, source: SandboxSource) -> anyhow::Result<SandboxSpec> {
        let duration = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<u64>> {
            v.as_deref()
                .map(|d| {
                    kiln_api_types::parse_duration_secs(d)
                        .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
                })
                .transpose()
        };
        let labels = self
            .labels
            .iter()
            .map(|l| l.parse().map_err(|e| anyhow::anyhow!("--label: {e}")))
            .collect::<anyhow::Result<Vec<kiln_api_types::Label>>>()?;
        let spec = SandboxSpec {
            source,
            name: self
                .name
                .as_deref()
                .map(|n| n.parse().map_err(|e| anyhow::anyhow!("--name: {e}")))
                .transpose()?,
            labels: kiln_api_types::Labels::from_labels(labels)
                .map_err(|e| anyhow::anyhow!("--label: {e}"))?,
            lifetime: kiln_api_types::Lifetime {
                ttl_secs: duration("--ttl", &self.ttl)?,
                idle_timeout_secs: duration("--idle-timeout", &self.idle_timeout)?,
            },
            secrets: parse_secrets(&self.secrets)?,
            secret_env: self.secret_env,
            publish: self
                .publish
                .iter()
                .map(|p| {
                    p.parse()
                        .map_err(|m: String| anyhow::anyhow!("--publish: {m}"))
                })
                .collect::<anyhow::Result<_>>()?,
            network: self.network()?,
        };
        spec.validate().map_err(|e| {
            anyhow::anyhow!(
                e.to_string()
                    .replace("memory_mib", "--memory")
                    .replace("cpus", "--cpus")
            )
        })?;
        Ok(spec)
    }
}

/// `NAME=VALUE` or `NAME` (random value, announced on stderr) → secrets.
pub fn parse_secrets(args: &[String]) -> anyhow::Result<kiln_api_types::Secrets> {
    let mut out = kiln_api_types::Secrets::default();
    for arg in args {
        let (name, value) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => {
                let value = random_hex64()?;
                eprintln!("kiln: generated secret {arg}={value}");
                (arg.clone(), value)
            }
        };
        kiln_api_types::validate_secret_name(&name)
            .map_err(|m| anyhow::anyhow!("--secret: {m}"))?;
        if out.0.insert(name.clone(), value).is_some() {
            bail!("--secret {name} given twice");
        }
    }
    Ok(out)
}

/// 32 random bytes from the kernel, as 64 lowercase hex digits.
fn random_hex64() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| anyhow::anyhow!("cannot read /dev/urandom for a generated secret: {e}"))?;
    Ok(hex::encode(bytes))
}

/// Options that describe a command (`kiln run`, `kiln exec`).
#[derive(Debug, Args)]
pub struct ExecOpts {
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long)]
    pub workdir: Option<String>,
    /// Run the command as this guest user: NAME, UID, NAME:GROUP or UID:GID (like docker's
    /// --user; default root).
    #[arg(short = 'u', long, value_name = "USER")]
    pub user: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Kill the command once its output exceeds this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_output: Option<u64>,
    /// Do not forward stdin (the command reads /dev/null).
    #[arg(long)]
    pub no_stdin: bool,
    /// Keep stdin open and forward it. This is already the default (use --no-stdin to turn
    /// it off); the flag exists so docker's `-it` works as typed.
    #[arg(short = 'i', long, conflicts_with = "no_stdin")]
    pub interactive: bool,
    /// Run the command on a terminal in the guest (kiln's stdin must be a terminal; it is
    /// put in raw mode, so Ctrl-C and other keys go to the command).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// The command and its arguments (`kiln run`: default, the image's command).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl ExecOpts {
    /// The exec request these options describe; errors name the bad option.
    pub fn request(&self) -> anyhow::Result<ExecRequest> {
        if self.command.is_empty() {
            bail!("no command given: put it after `--`, e.g. `-- ls -l`");
        }
        let req = self.unchecked()?;
        req.validate().map_err(anyhow::Error::msg)?;
        Ok(req)
    }

    /// Like [`ExecOpts::request`], with the command still to be validated (it may be empty
    /// until the image's default command fills it in).
    fn unchecked(&self) -> anyhow::Result<ExecRequest> {
        let mut req = ExecRequest::new(self.command.clone());
        for kv in &self.env {
            let Some((k, v)) = kv.split_once('=') else {
                bail!("--env {kv:?}: expected NAME=VALUE");
            };
            req.env.insert(k.to_owned(), v.to_owned());
        }
        req.cwd = self.workdir.clone();
        req.user = self.user.clone();
        req.stdin = !self.no_stdin;
        if let Some(t) = self.timeout {
            if !(t > 0.0 && t.is_finite() && t < 1e9) {
                bail!("--timeout {t}: expected a positive number of seconds");
            }
            req.timeout_ms = Some((t * 1000.0).ceil() as u64);
        }
        req.max_output_bytes = self.max_output;
        if self.tty {
            let (rows, cols) = crate::term::stdin_size()?;
            req.tty = Some(ExecTty {
                rows,
                cols,
                term: crate::term::term_name(),
            });
        }
        Ok(req)
    }
}

/// Runs `kiln run`; returns the process exit code.
pub async fn run(client: &Client, args: &RunArgs) -> anyhow::Result<i32> {
    let mut exec = args.exec.unchecked()?;
    let image = args.sandbox.ensure_image(client).await?;
    let sandbox = args.sandbox.request(image.as_ref())?;
    if let Some(info) = &image {
        // The image's default command (OCI Entrypoint + Cmd); a command given replaces Cmd.
        let argv: Vec<String> = info
            .entrypoint
            .iter()
            .chain(if exec.argv.is_empty() {
                &info.cmd
            } else {
                &exec.argv
            })
            .cloned()
            .collect();
        exec.argv = argv;
    }
    if exec.argv.is_empty() {
        bail!("no command given, and the image has no default command (cmd/entrypoint)");
    }
    exec.validate().map_err(anyhow::Error::msg)?;
    let ws = client.sandbox_run().await?;
    let first = serde_json::to_string(&RunRequest { sandbox, exec })?;
    let io = StreamIo {
        forward_stdin: !args.exec.no_stdin,
        tty: args.exec.tty,
    };
    stream_exec(client, ws, Some(first), io, Stream::Run).await
}

/// Which command a stream belongs to, for what Ctrl-C does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// `kiln run`: Ctrl-C sends SIGINT to the command, a second SIGKILL, a third gives up
    /// and removes the sandbox.
    Run,
    /// `kiln exec`: Ctrl-C sends SIGINT, a second SIGKILL, a third gives up.
    Exec,
    /// `kiln exec attach`: Ctrl-C detaches; the command keeps running.
    Attach,
}

/// How kiln's own stdin and terminal take part in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamIo {
    /// Forward kiln's stdin to the command.
    pub forward_stdin: bool,
    /// The command runs on a terminal (the request has `tty`): raw mode while stdin is
    /// forwarded, window resizes sent along.
    pub tty: bool,
}

/// Drives one exec WebSocket to its end; returns the exit code to use. `first` is the
/// request sent before anything else (none for an attach).
pub async fn stream_exec(
    client: &Client,
    mut ws: WsStream,
    first: Option<String>,
    io: StreamIo,
    kind: Stream,
) -> anyhow::Result<i32> {
    let forward_stdin = io.forward_stdin;
    // Raw mode only while keys are forwarded: without stdin, Ctrl-C stays kiln's own
    // (SIGINT, then SIGKILL, as without a tty). Entered before the request goes out, so
    // nothing the command prints or reads ever meets the cooked terminal; dropped on every
    // return below.
    let mut raw = if io.tty && forward_stdin {
        Some(crate::term::RawMode::enter()?)
    } else {
        None
    };
    if let Some(first) = first {
        ws.send(Message::Text(first.into()))
            .await
            .context("sending the exec request")?;
    }
    let mut resized = io
        .tty
        .then(|| {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
                .context("installing the window-size handler")
        })
        .transpose()?;
    // Signals that would otherwise end kiln without restoring the terminal.
    let mut ended = if raw.is_some() {
        use tokio::signal::unix::{SignalKind, signal};
        Some((
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        ))
    } else {
        None
    };
    let (mut tx, mut rx) = ws.split();
    let mut stdin_rx = if forward_stdin {
        Some(spawn_stdin_reader())
    } else {
        None
    };
    let mut sandbox: Option<SandboxId> = None;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the Ctrl-C handler")?;
    let mut interrupts = 0u32;
    loop {
        tokio::select! {
            msg = rx.next() => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => bail!("connection to kilnd broke: {e}"),
                    None => bail!("kilnd closed the exec stream without an exit status"),
                };
                match msg {
                    Message::Binary(data) if !data.is_empty() => {
                        let (tag, bytes) = (data[0], &data[1..]);
                        let out: &mut dyn Write = if tag == STREAM_STDERR { &mut stderr } else { &mut stdout };
                        debug_assert!(tag == STREAM_STDOUT || tag == STREAM_STDERR);
                        // A closed stdout (e.g. `| head`) ends the command like a shell's SIGPIPE.
                        if out.write_all(bytes).and_then(|_| out.flush()).is_err() {
                            return Ok(141);
                        }
                    }
                    Message::Text(t) => match serde_json::from_str::<ExecServerMessage>(t.as_str())
                        .context("malformed message from kilnd")?
                    {
                        ExecServerMessage::Started {
                            sandbox: id,
                            warnings,
                            ..
                        } => {
                            for w in &warnings {
                                eprintln!("kiln: warning: {w}");
                            }
                            sandbox = Some(id);
                        }
                        ExecServerMessage::Exit(status) => {
                            // Cooked again before kiln's own words, so they end their lines.
                            drop(raw.take());
                            if status.timed_out {
                                eprintln!("kiln: command timed out and was killed");
                            } else if status.output_truncated {
                                eprintln!("kiln: command output exceeded the limit; the command was killed");
                            }
                            return Ok(status.shell_code());
                        }
                        ExecServerMessage::Error(e) => bail!("{}", e.message),
                        ExecServerMessage::Dropped { bytes } => {
                            eprintln!("kiln: {bytes} bytes of earlier output were dropped (each stream keeps its last 1 MiB)");
                        }
                    },
                    Message::Close(_) => bail!("kilnd closed the exec stream without an exit status"),
                    _ => {}
                }
            }
            chunk = async { stdin_rx.as_mut().expect("guarded by if").recv().await }, if stdin_rx.is_some() => {
                let msg = match chunk {
                    Some(data) => Message::Binary(data),
                    None => {
                        stdin_rx = None;
                        Message::Text(serde_json::to_string(&ExecClientMessage::StdinClose)?.into())
                    }
                };
                // The daemon may already have finished; its exit message will still arrive.
                let _ = tx.send(msg).await;
            }
            _ = async { resized.as_mut().expect("guarded by if").recv().await }, if resized.is_some() => {
                if let Ok((rows, cols)) = crate::term::stdin_size() {
                    let msg = serde_json::to_string(&ExecClientMessage::Resize { rows, cols })?;
                    let _ = tx.send(Message::Text(msg.into())).await;
                }
            }
            signo = async {
                let (term, hup) = ended.as_mut().expect("guarded by if");
                tokio::select! {
                    _ = term.recv() => 15,
                    _ = hup.recv() => 1,
                }
            }, if ended.is_some() => {
                // Closing the socket kills the command (and, for `run`, its sandbox); the
                // guard restores the terminal as this returns.
                let _ = tx.close().await;
                if kind == Stream::Run && let Some(id) = &sandbox {
                    let _ = client.sandbox_delete(id).await;
                }
                return Ok(128 + signo);
            }
            _ = interrupt.recv() => {
                interrupts += 1;
                let signo = match (kind, interrupts) {
                    (Stream::Attach, _) => None,
                    (_, 1) => Some(2),
                    (_, 2) => {
                        eprintln!("kiln: killing the command");
                        Some(9)
                    }
                    _ => None,
                };
                if let Some(signo) = signo {
                    // The command decides what SIGINT means; its exit status still arrives.
                    let msg = serde_json::to_string(&ExecClientMessage::Signal { signo })?;
                    let _ = tx.send(Message::Text(msg.into())).await;
                    continue;
                }
                let _ = tx.close().await;
                drop(raw.take());
                if kind == Stream::Attach {
                    eprintln!("kiln: detached; the command keeps running");
                    return Ok(0);
                }
                if kind == Stream::Run && let Some(id) = &sandbox {
                    let _ = client.sandbox_delete(id).await;
                }
                eprintln!("kiln: interrupted");
                return Ok(130);
            }
        }
    }
}

/// Reads kiln's stdin on a thread (stdin may be a terminal or a pipe; neither is reliably
/// non-blocking) and hands chunks to the async side. EOF or an error closes the channel.
fn spawn_stdin_reader() -> tokio::sync::mpsc::Receiver<Bytes> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let spawned = std::thread::Builder::new()
        .name("kiln-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    if spawned.is_err() {
        // Without a reader thread the command simply sees EOF on stdin.
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        return rx;
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> RunArgs {
        T::try_parse_from(std::iter::once("kiln").chain(args.iter().copied()))
            .unwrap()
            .run
    }

    /// An image as `kiln image ls` reports it.
    fn image() -> ImageInfo {
        ImageInfo {
            id: "0123456789ab".into(),
            name: "python".into(),
            recipe: "python".into(),
            size_bytes: 1,
            created_unix: 0,
            kernel_version: "6.1".into(),
            files: Vec::new(),
            from: "debian:bookworm".into(),
            recipe_path: None,
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            cpus: None,
            memory_mib: None,
            origin: None,
        }
    }

    #[test]
    fn sandbox_request_machine_size_flag_else_image_else_default() {
        let a = parse(&["--", "true"]);
        let mut sized = image();
        sized.cpus = Some(2);
        sized.memory_mib = Some(512);
        let SandboxSource::Image {
            machine,
            image: name,
            ..
        } = a.sandbox.request(Some(&sized)).unwrap().source
        else {
            panic!("an image source")
        };
        assert_eq!(name.as_str(), "python");
        if std::env::var_os("KILN_CPUS").is_none() && std::env::var_os("KILN_MEMORY_MIB").is_none()
        {
            assert_eq!((machine.cpus, machine.memory_mib), (2, 512));
        }
        let a = parse(&["--cpus", "3", "--memory", "300", "--", "true"]);
        let SandboxSource::Image { machine, .. } = a.sandbox.request(Some(&sized)).unwrap().source
        else {
            panic!("an image source")
        };
        assert_eq!((machine.cpus, machine.memory_mib), (3, 300));
        // A command is optional for `kiln run` (the image's default), required for exec.
        let a = parse(&[]);
        assert!(a.exec.command.is_empty());
        assert!(
            a.exec
                .request()
                .unwrap_err()
                .to_string()
                .contains("no command")
        );
    }

    #[test]
    fn exec_request_carries_env_workdir_timeout() {
        let a = parse(&[
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--workdir",
            "/tmp",
            "--timeout",
            "1.5",
            "--",
            "ls",
            "-l",
        ]);
        let r = a.exec.request().unwrap();
        assert_eq!(r.argv, vec!["ls", "-l"]);
        assert_eq!(r.env.get("B").map(String::as_str), Some("x=y"));
        assert_eq!(r.cwd.as_deref(), Some("/tmp"));
        assert_eq!(r.timeout_ms, Some(1500));
        assert!(r.stdin);
    }

    #[test]
    fn exec_request_carries_user() {
        for flag in ["--user", "-u"] {
            let a = parse(&[flag, "nobody:nogroup", "--", "id"]);
            let r = a.exec.request().unwrap();
            assert_eq!(r.user.as_deref(), Some("nobody:nogroup"));
        }
        assert_eq!(parse(&["--", "id"]).exec.request().unwrap().user, None);
        let err = parse(&["--user", "a:b:c", "--", "id"])
            .exec
            .request()
            .unwrap_err();
        assert!(err.to_string().contains("invalid user"), "{err}");
    }

    #[test]
    fn exec_opts_it_parses_like_docker() {
        let a = parse(&["-it", "--", "bash"]);
        assert!(a.exec.interactive && a.exec.tty);
        assert!(
            T::try_parse_from(["kiln", "-i", "--no-stdin", "--", "true"]).is_err(),
            "-i and --no-stdin contradict each other"
        );
    }

    #[test]
    fn exec_tty_without_a_terminal_names_the_problem() {
        use std::io::IsTerminal;
        if std::io::stdin().is_terminal() {
            // Run by hand from a terminal: the request would (rightly) succeed.
            return;
        }
        let err = parse(&["-t", "--", "bash"]).exec.request().unwrap_err();
        assert!(err.to_string().contains("stdin is not one"), "{err}");
    }

    #[test]
    fn bad_options_are_named_in_the_error() {
        let a = parse(&["--env", "NOEQUALS", "--", "true"]);
        assert!(a.exec.request().unwrap_err().to_string().contains("--env"));
        let a = parse(&["--timeout", "0", "--", "true"]);
        assert!(
            a.exec
                .request()
                .unwrap_err()
                .to_string()
                .contains("--timeout")
        );
        let a = parse(&["--memory", "1", "--", "true"]);
        assert!(
            a.sandbox
                .request(Some(&image()))
                .unwrap_err()
                .to_string()
                .contains("--memory")
        );
        let a = parse(&["--secret", "../etc/passwd=x", "--", "true"]);
        assert!(
            a.sandbox
                .request(Some(&image()))
                .unwrap_err()
                .to_string()
                .contains("--secret")
        );
        let a = parse(&["--secret", "A=1", "--secret", "A=2", "--", "true"]);
        assert!(
            a.sandbox
                .request(Some(&image()))
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        let a = parse(&["--secret", "TOKEN", "--secret", "K=v=w", "--", "true"]);
        let s = a.sandbox.request(Some(&image())).unwrap().secrets;
        assert_eq!(s.0["K"], "v=w");
        assert_eq!(s.0["TOKEN"].len(), 64);
        assert!(s.0["TOKEN"].bytes().all(|b| b.is_ascii_hexdigit()));
        let a = parse(&["--cpus", "999", "--", "true"]);
        assert!(
            a.sandbox
                .request(Some(&image()))
                .unwrap_err()
                .to_string()
                .contains("--cpus")
        );
    }
}
