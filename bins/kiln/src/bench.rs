//! `kiln bench boot`: cold boot, agent round trips, exec round trips and stdout throughput,
//! measured through the daemon's API over repeated runs and reported as p50/p95.
//!
//! Each run boots a fresh sandbox (`POST /v1/sandboxes`, which answers once the agent has
//! completed its handshake), then measures in it: agent pings (timed inside the daemon, and
//! through the API), `true` execs (client-side wall time from request to exit status), a
//! stdout stream of `--stream-mib` MiB (bytes received / wall time), and the guest's own pipe
//! rate for the same number of bytes (`head -c N /dev/zero | cat > /dev/null`, timed inside the
//! guest), so the stream is also reported as a ratio to what the guest itself can move through
//! a pipe in the same sandbox. Nothing is asserted: the numbers go to stdout (`--json` for
//! machines) and into docs/benchmarks.md by hand.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use kiln_api_types::{
    ExecRequest, ExecServerMessage, ExitStatus, PingResponse, SandboxId, SandboxInfo, SandboxSpec,
};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use kiln_client::{Client, ClientHome};

/// Options of `kiln bench boot`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Number of sandboxes to boot.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Image to boot.
    #[arg(long, default_value = "base")]
    pub image: String,
    /// Pings per sandbox.
    #[arg(long, default_value_t = 50)]
    pub pings: usize,
    /// `true` execs per sandbox.
    #[arg(long, default_value_t = 10)]
    pub execs: usize,
    /// MiB streamed from the guest's stdout per sandbox (large enough that the command's
    /// start-up and TCG's first translation of the copy loop do not dominate).
    #[arg(long, default_value_t = 256)]
    pub stream_mib: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// p50 / p95 of a series.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// Number of samples.
    pub n: usize,
}

/// The benchmark's result.
#[derive(Debug, Serialize)]
pub struct BootBench {
    /// Accelerator used.
    pub accel: String,
    /// Image booted.
    pub image: String,
    /// Sandboxes booted.
    pub runs: usize,
    /// QEMU start → agent handshake done, measured in the daemon (ms).
    pub cold_boot_ms: Summary,
    /// `POST /v1/sandboxes` wall time seen by the client (ms).
    pub create_wall_ms: Summary,
    /// Agent ping round trip, timed in the daemon (ms).
    pub ping_ms: Summary,
    /// Ping through the API (client → daemon → agent → client) (ms).
    pub api_ping_ms: Summary,
    /// `true` exec round trip through the API (ms).
    pub exec_true_ms: Summary,
    /// stdout throughput guest → client (MiB/s).
    pub stdout_mib_s: Summary,
    /// The guest's own pipe rate, `head -c N /dev/zero | cat > /dev/null` timed in the guest,
    /// in the same sandboxes as `stdout_mib_s` (MiB/s).
    pub guest_pipe_mib_s: Summary,
    /// stdout throughput / guest pipe rate, one ratio per sandbox (both measured in it, one
    /// after the other).
    pub stdout_vs_guest_pipe: Summary,
}

/// Options of `kiln bench snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotBenchArgs {
    /// Starts of each kind.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Image to start.
    #[arg(long, default_value = "base")]
    pub image: String,
    /// Clones started at once for the clone figures (0 skips them).
    #[arg(long, default_value_t = 20)]
    pub clones: u32,
    /// Skip the full-RAM comparison (a second daemon whose snapshots stream all of RAM).
    #[arg(long)]
    pub no_full_ram: bool,
    /// User snapshots taken for the pause-window figure (0 skips them).
    #[arg(long, default_value_t = 5)]
    pub user_snapshots: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The result of `kiln bench snapshot`.
#[derive(Debug, Serialize)]
pub struct SnapshotBench {
    /// Accelerator used.
    pub accel: String,
    /// Image started.
    pub image: String,
    /// Starts of each kind.
    pub runs: usize,
    /// Cold boot: create request → first `true` exec result, client wall time (ms).
    pub cold_first_exec_ms: Summary,
    /// Restore from the warm snapshot: create request → first `true` exec result (ms).
    pub restore_first_exec_ms: Summary,
    /// The same from a full-RAM snapshot (RAM copied from the stream, the method of
    /// emulators that save whole VMs), measured in a second daemon (ms).
    pub full_ram_restore_first_exec_ms: Option<Summary>,
    /// QEMU start → agent ready, cold (daemon-side, ms).
    pub cold_boot_ms: Summary,
    /// QEMU start → identity applied, restore (daemon-side, ms).
    pub restore_boot_ms: Summary,
    /// p50 cold / p50 restore, first exec result.
    pub speedup_p50: f64,
    /// Clones started at once.
    pub clones: u32,
    /// Wall time until all clones were exec-ready (ms), one sample.
    pub clones_ready_wall_ms: Option<f64>,
    /// PSS of each idle clone's QEMU process (MiB).
    pub clone_pss_mib: Option<Summary>,
    /// Guest pause of a user snapshot (`kiln snapshot`) of a running sandbox (ms).
    pub user_snapshot_pause_ms: Option<Summary>,
    /// Wall time of a whole user snapshot, conversion included (ms).
    pub user_snapshot_wall_ms: Option<Summary>,
}

/// Runs `kiln bench snapshot`: cold boots and warm restores side by side, interleaved.
pub async fn snapshot(
    client: &Client,
    home: &ClientHome,
    a: &SnapshotBenchArgs,
) -> anyhow::Result<i32> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    crate::image::ensure_built(client, &a.image).await?;
    // One start outside the measurement makes sure the warm snapshot exists.
    let warm_up = start_and_exec(client, &a.image, false).await?;
    let mut accel = warm_up.0.status.accel.clone();
    // The full-RAM daemon: its own home (sharing the images), its own warm snapshot.
    let full = if a.no_full_ram {
        None
    } else {
        let full_home = ClientHome::new(home.root().join("bench-full-ram"));
        std::fs::create_dir_all(full_home.root())?;
        let link = full_home.root().join("images");
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(home.root().join("images"), &link)?;
        }
        let c = Client::connect_with_env(&full_home, &[("KILN_SNAPSHOT_MODE", "full-ram")]).await?;
        start_and_exec(&c, &a.image, false).await?;
        Some((full_home, c))
    };
    let (mut cold, mut restore, mut cold_boot, mut restore_boot, mut full_restore) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..a.runs {
        if let Some((_, c)) = &full {
            let (info, wall) = start_and_exec(c, &a.image, false).await?;
            if info.status.source != kiln_api_types::StartSource::Snapshot {
                bail!("the full-RAM daemon did not restore (see bench-full-ram/kilnd.log)");
            }
            full_restore.push(wall);
        }
        for is_cold in [true, false] {
            let (info, wall) = start_and_exec(client, &a.image, is_cold).await?;
            let expect = if is_cold {
                kiln_api_types::StartSource::Cold
            } else {
                kiln_api_types::StartSource::Snapshot
            };
            if info.status.source != expect {
                bail!(
                    "asked for a {} start, got {} (see kilnd.log)",
                    expect.as_str(),
                    info.status.source.as_str()
                );
            }
            accel = info.status.accel.clone();
            let boot = info.status.boot_ms.unwrap_or(0) as f64;
            if is_cold {
                cold.push(wall);
                cold_boot.push(boot);
            } else {
                restore.push(wall);
                restore_boot.push(boot);
            }
        }
        if !a.json {
            eprintln!(
                "run {}/{}: cold {:.0} ms, restore {:.0} ms",
                run + 1,
                a.runs,
                cold[run],
                restore[run]
            );
        }
    }
    let (mut clones_wall, mut clone_pss) = (None, None);
    if a.clones > 0 {
        let req = image_spec(&a.image, false)?;
        let t = Instant::now();
        let ids: Vec<SandboxId> = crate::sandbox::clone_n(client, &req, a.clones)
            .await?
            .into_iter()
            .map(|i| i.id)
            .collect();
        clones_wall = Some(ms(t.elapsed()));
        let mut pss: Vec<f64> = ids
            .iter()
            .filter_map(|id| qemu_pss_kib(home, id))
            .map(|k| k / 1024.0)
            .collect();
        for id in &ids {
            client.sandbox_delete(id).await?;
        }
        if pss.len() != ids.len() {
            bail!("could not read the PSS of every clone's QEMU");
        }
        clone_pss = Some(summary(&mut pss));
    }
    if let Some((_, c)) = &full {
        crate::sandbox::remove_all(c).await?;
        crate::sandbox::stop_daemon(&c.health().await?).await?;
    }
    let (mut pause, mut snap_wall) = (Vec::new(), Vec::new());
    if a.user_snapshots > 0 {
        let req = image_spec(&a.image, false)?;
        let info: SandboxInfo = client.sandbox_create(&req).await?;
        let taken = async {
            // Some RAM in use, as in a working sandbox: 64 MiB of page cache in tmpfs.
            let (s, _) = exec_collect(
                client,
                &info.id,
                vec![
                    "sh".into(),
                    "-c".into(),
                    "head -c 64M /dev/urandom > /tmp/fill".into(),
                ],
            )
            .await?;
            if s.shell_code() != 0 {
                bail!("filling guest memory failed");
            }
            for i in 0..a.user_snapshots {
                let name = format!("bench-pause-{}-{i}", std::process::id());
                let t = Instant::now();
                let snap = client
                    .snapshot_create(
                        &info.id,
                        &kiln_api_types::SnapshotCreateRequest {
                            name: name.parse()?,
                        },
                    )
                    .await?;
                snap_wall.push(ms(t.elapsed()));
                pause.push(snap.pause_ms as f64);
                client.snapshot_delete(&name).await?;
            }
            Ok(())
        }
        .await;
        client.sandbox_delete(&info.id).await?;
        taken?;
    }
    let (c, r) = (summary(&mut cold), summary(&mut restore));
    let out = SnapshotBench {
        full_ram_restore_first_exec_ms: full.as_ref().map(|_| summary(&mut full_restore)),
        user_snapshot_pause_ms: (!pause.is_empty()).then(|| summary(&mut pause)),
        user_snapshot_wall_ms: (!snap_wall.is_empty()).then(|| summary(&mut snap_wall)),
        accel,
        image: a.image.clone(),
        runs: a.runs,
        speedup_p50: c.p50 / r.p50,
        cold_first_exec_ms: c,
        restore_first_exec_ms: r,
        cold_boot_ms: summary(&mut cold_boot),
        restore_boot_ms: summary(&mut restore_boot),
        clones: a.clones,
        clones_ready_wall_ms: clones_wall,
        clone_pss_mib: clone_pss,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "kiln bench snapshot: image {}, accel {}, {} runs each",
            out.image, out.accel, out.runs
        );
        let row = |name: &str, s: &Summary| {
            println!(
                "  {name:<34} p50 {:>9.1} ms  p95 {:>9.1} ms  (n={})",
                s.p50, s.p95, s.n
            )
        };
        row("cold boot -> first exec result", &out.cold_first_exec_ms);
        row("restore -> first exec result", &out.restore_first_exec_ms);
        if let Some(f) = &out.full_ram_restore_first_exec_ms {
            row("full-RAM restore -> first exec", f);
            println!(
                "  file-mapped restore is {:.1}x faster than full-RAM (p50)",
                f.p50 / out.restore_first_exec_ms.p50
            );
        }
        row("cold: QEMU start -> agent ready", &out.cold_boot_ms);
        row("restore: QEMU start -> identity", &out.restore_boot_ms);
        println!(
            "  restore is {:.1}x faster to the first exec result (p50)",
            out.speedup_p50
        );
        if let (Some(wall), Some(pss)) = (out.clones_ready_wall_ms, &out.clone_pss_mib) {
            println!(
                "  {} clones at once: all exec-ready after {wall:.0} ms",
                out.clones
            );
            println!(
                "  PSS per idle clone (QEMU)           p50 {:>9.1} MiB p95 {:>9.1} MiB",
                pss.p50, pss.p95
            );
        }
        if let (Some(p), Some(w)) = (&out.user_snapshot_pause_ms, &out.user_snapshot_wall_ms) {
            row("user snapshot: guest pause", p);
            row("user snapshot: whole (wall)", w);
        }
    }
    Ok(0)
}

/// Creates a sandbox (cold or from the warm snapshot), runs `true` in it, deletes it; returns
/// the sandbox and the wall time from the create request to the exec's exit status (ms).
async fn start_and_exec(
    client: &Client,
    image: &str,
    cold: bool,
) -> anyhow::Result<(SandboxInfo, f64)> {
    let req = image_spec(image, cold)?;
    let t = Instant::now();
    let info: SandboxInfo = client.sandbox_create(&req).await?;
    let result = exec_collect(client, &info.id, vec!["true".into()]).await;
    let wall = ms(t.elapsed());
    client.sandbox_delete(&info.id).await?;
    let (status, _) = result?;
    if status.shell_code() != 0 {
        bail!("`true` exited {}", status.shell_code());
    }
    Ok((info, wall))
}

/// PSS in KiB of a sandbox's QEMU (`/proc/PID/smaps_rollup`), via its pidfile.
pub(crate) fn qemu_pss_kib(home: &ClientHome, id: &SandboxId) -> Option<f64> {
    let pidfile = std::fs::read_to_string(home.sandbox_dir(id).join("qemu.pid")).ok()?;
    let pid: u32 = pidfile.split_whitespace().next()?.parse().ok()?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs `kiln bench boot`.
pub async fn run(client: &Client, a: &BenchArgs) -> anyhow::Result<i32> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    crate::image::ensure_built(client, &a.image).await?;
    let (mut boot, mut create, mut ping, mut api_ping, mut exec) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut tput = StreamRates::default();
    let mut accel = String::new();
    for run in 0..a.runs {
        // This benchmark measures cold boots; `kiln bench snapshot` measures restores.
        let req = image_spec(&a.image, true)?;
        let t = Instant::now();
        let info: SandboxInfo = client.sandbox_create(&req).await?;
        create.push(ms(t.elapsed()));
        boot.push(info.status.boot_ms.unwrap_or(0) as f64);
        accel = info.status.accel.clone();
        let result = measure_in(
            client,
            &info.id,
            a,
            &mut ping,
            &mut api_ping,
            &mut exec,
            &mut tput,
        )
        .await;
        client.sandbox_delete(&info.id).await?;
        result?;
        if !a.json {
            let stream = match (tput.stdout.last(), tput.guest_pipe.last()) {
                (Some(s), Some(p)) if a.stream_mib > 0 => {
                    format!(
                        ", stdout {s:.1} MiB/s, guest pipe {p:.1} MiB/s ({:.2}x)",
                        s / p
                    )
                }
                _ => String::new(),
            };
            eprintln!(
                "run {}/{}: boot {} ms{stream}",
                run + 1,
                a.runs,
                info.status.boot_ms.unwrap_or(0)
            );
        }
    }
    let out = BootBench {
        accel,
        image: a.image.clone(),
        runs: a.runs,
        cold_boot_ms: summary(&mut boot),
        create_wall_ms: summary(&mut create),
        ping_ms: summary(&mut ping),
        api_ping_ms: summary(&mut api_ping),
        exec_true_ms: summary(&mut exec),
        stdout_mib_s: summary(&mut tput.stdout),
        guest_pipe_mib_s: summary(&mut tput.guest_pipe),
        stdout_vs_guest_pipe: summary(&mut tput.ratio),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "kiln bench boot: image {}, accel {}, {} runs",
            out.image, out.accel, out.runs
        );
        let row = |name: &str, s: &Summary, unit: &str| {
            println!(
                "  {name:<28} p50 {:>9.3} {unit:<6} p95 {:>9.3} {unit:<6} (n={})",
                s.p50, s.p95, s.n
            )
        };
        row("cold boot -> agent ready", &out.cold_boot_ms, "ms");
        row("create (API wall)", &out.create_wall_ms, "ms");
        row("agent ping (in daemon)", &out.ping_ms, "ms");
        row("ping via API", &out.api_ping_ms, "ms");
        row("exec true round trip", &out.exec_true_ms, "ms");
        row("stdout throughput", &out.stdout_mib_s, "MiB/s");
        row("guest pipe (in guest)", &out.guest_pipe_mib_s, "MiB/s");
        row("stdout / guest pipe", &out.stdout_vs_guest_pipe, "x");
    }
    Ok(0)
}

async fn measure_in(
    client: &Client,
    id: &SandboxId,
    a: &BenchArgs,
    ping: &mut Vec<f64>,
    api_ping: &mut Vec<f64>,
    exec: &mut Vec<f64>,
    tput: &mut StreamRates,
) -> anyhow::Result<()> {
    for _ in 0..a.pings {
        let t = Instant::now();
        let p: PingResponse = client.sandbox_ping(id).await?;
        api_ping.push(ms(t.elapsed()));
        ping.push(p.rtt_us as f64 / 1000.0);
    }
    for _ in 0..a.execs {
        let t = Instant::now();
        let (status, _) = exec_collect(client, id, vec!["true".into()]).await?;
        exec.push(ms(t.elapsed()));
        if status.shell_code() != 0 {
            bail!("`true` exited {}", status.shell_code());
        }
    }
    if a.stream_mib > 0 {
        tput.measure(client, id, a.stream_mib << 20).await?;
    }
    Ok(())
}

/// stdout stream rates and the guest's own pipe rate, paired per sandbox.
#[derive(Debug, Default)]
pub struct StreamRates {
    /// stdout throughput guest → client (MiB/s), one per [`StreamRates::measure`].
    pub stdout: Vec<f64>,
    /// The guest's pipe rate (MiB/s), measured right before each stdout stream.
    pub guest_pipe: Vec<f64>,
    /// stdout / guest pipe of each pair.
    pub ratio: Vec<f64>,
}

impl StreamRates {
    /// Measures the guest's pipe rate, then the stdout stream, for `bytes` each, in sandbox
    /// `id`, and records both and their ratio.
    pub async fn measure(
        &mut self,
        client: &Client,
        id: &SandboxId,
        bytes: u64,
    ) -> anyhow::Result<()> {
        let pipe = guest_pipe_rate(client, id, bytes).await?;
        let stdout = stdout_rate(client, id, bytes).await?;
        self.guest_pipe.push(pipe);
        self.stdout.push(stdout);
        self.ratio.push(stdout / pipe);
        Ok(())
    }
}

/// The shell script of [`guest_pipe_rate`]: `bytes` zero bytes through a pipe inside the
/// guest, between two readings of the guest's `/proc/uptime`, which it prints. The file is
/// read with the shell's `read` builtin, so no extra process start falls inside the interval
/// (it holds the start of `head` and `cat`, as the stdout stream holds the start of `head`);
/// the clock's 10 ms resolution is below 1 % of a stream of a few seconds.
pub fn guest_pipe_script(bytes: u64) -> String {
    format!(
        "read t0 _ < /proc/uptime; head -c {bytes} /dev/zero | cat > /dev/null; \
         read t1 _ < /proc/uptime; echo \"$t0 $t1\""
    )
}

/// Seconds between the two uptime readings [`guest_pipe_script`] prints.
pub fn guest_pipe_seconds(printed: &str) -> anyhow::Result<f64> {
    let mut it = printed.split_whitespace().map(str::parse::<f64>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(t0)), Some(Ok(t1)), None) if t1 >= t0 => Ok(t1 - t0),
        _ => bail!("the guest pipe probe printed {printed:?}, not two uptime readings"),
    }
}

/// The guest's own pipe rate for `bytes` bytes (`head -c N /dev/zero | cat > /dev/null`,
/// timed in the guest); MiB/s.
pub async fn guest_pipe_rate(client: &Client, id: &SandboxId, bytes: u64) -> anyhow::Result<f64> {
    let argv = vec!["sh".into(), "-c".into(), guest_pipe_script(bytes)];
    let (status, out) = exec_output(client, id, argv).await?;
    let text = String::from_utf8_lossy(&out);
    if status.shell_code() != 0 {
        bail!(
            "the guest pipe probe exited {}: {text}",
            status.shell_code()
        );
    }
    // A stream shorter than the clock's resolution still gets a finite rate.
    let secs = guest_pipe_seconds(&text)?.max(0.01);
    Ok(bytes as f64 / (1024.0 * 1024.0) / secs)
}

/// Streams `bytes` zero bytes from a guest command's stdout to this client; MiB/s.
pub async fn stdout_rate(client: &Client, id: &SandboxId, bytes: u64) -> anyhow::Result<f64> {
    let t = Instant::now();
    let (status, got) = exec_collect(
        client,
        id,
        vec![
            "head".into(),
            "-c".into(),
            bytes.to_string(),
            "/dev/zero".into(),
        ],
    )
    .await?;
    let secs = t.elapsed().as_secs_f64();
    if status.shell_code() != 0 || got != bytes {
        bail!(
            "stream of {bytes} bytes ended with {} after {got} bytes",
            status.shell_code()
        );
    }
    Ok(got as f64 / (1024.0 * 1024.0) / secs)
}

/// Runs a command in a sandbox, counting (not keeping) its stdout bytes.
pub async fn exec_collect(
    client: &Client,
    id: &SandboxId,
    argv: Vec<String>,
) -> anyhow::Result<(ExitStatus, u64)> {
    let mut stdout = 0u64;
    let status = exec_stdout(client, id, argv, |b| stdout += b.len() as u64).await?;
    Ok((status, stdout))
}

/// Runs a command in a sandbox and keeps its stdout (for commands that print little).
pub async fn exec_output(
    client: &Client,
    id: &SandboxId,
    argv: Vec<String>,
) -> anyhow::Result<(ExitStatus, Vec<u8>)> {
    let mut stdout = Vec::new();
    let status = exec_stdout(client, id, argv, |b| stdout.extend_from_slice(b)).await?;
    Ok((status, stdout))
}

/// Runs a command in a sandbox, handing each stdout chunk to `on_stdout`.
async fn exec_stdout(
    client: &Client,
    id: &SandboxId,
    argv: Vec<String>,
    mut on_stdout: impl FnMut(&[u8]),
) -> anyhow::Result<ExitStatus> {
    let mut ws = client.sandbox_exec(id).await?;
    ws.send(Message::Text(
        serde_json::to_string(&ExecRequest::new(argv))?.into(),
    ))
    .await?;
    while let Some(msg) = ws.next().await {
        match msg.context("exec stream broke")? {
            Message::Binary(b) if b.first() == Some(&kiln_api_types::STREAM_STDOUT) => {
                on_stdout(&b[1..])
            }
            Message::Text(t) => match serde_json::from_str::<ExecServerMessage>(t.as_str())? {
                ExecServerMessage::Exit(s) => return Ok(s),
                ExecServerMessage::Error(e) => bail!("{}", e.message),
                ExecServerMessage::Started { .. } | ExecServerMessage::Dropped { .. } => {}
            },
            _ => {}
        }
    }
    bail!("exec stream ended without an exit status")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50/p95 by nearest rank.
pub fn summary(v: &mut [f64]) -> Summary {
    if v.is_empty() {
        return Summary {
            p50: f64::NAN,
            p95: f64::NAN,
            n: 0,
        };
    }
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Summary {
        p50: rank(0.50),
        p95: rank(0.95),
        n: v.len(),
    }
}

/// A spec starting `image` (cold or from its warm snapshot) with default size.
pub fn image_spec(image: &str, cold: bool) -> anyhow::Result<SandboxSpec> {
    Ok(SandboxSpec {
        source: kiln_api_types::SandboxSource::Image {
            image: image.parse()?,
            machine: kiln_api_types::MachineSpec::default(),
            cold,
        },
        ..SandboxSpec::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_uses_nearest_rank() {
        let mut v: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        let s = summary(&mut v);
        assert_eq!((s.p50, s.p95, s.n), (10.0, 19.0, 20));
        let s = summary(&mut [7.0]);
        assert_eq!((s.p50, s.p95), (7.0, 7.0));
        assert!(summary(&mut []).p50.is_nan());
    }

    #[test]
    fn guest_pipe_seconds_reads_two_uptimes() {
        let secs = guest_pipe_seconds("1234.56 1239.81\n").expect("two readings");
        assert!((secs - 5.25).abs() < 1e-9, "{secs}");
        assert!(guest_pipe_seconds("1234.56").is_err());
        assert!(guest_pipe_seconds("1239.81 1234.56").is_err());
        assert!(guest_pipe_seconds("1 2 3").is_err());
        assert!(guest_pipe_seconds("sh: 1: head: not found").is_err());
    }

    #[test]
    fn guest_pipe_script_prints_both_readings_around_the_pipe() {
        let s = guest_pipe_script(4096);
        let pipe = s
            .find("head -c 4096 /dev/zero | cat > /dev/null")
            .expect("pipe");
        assert!(s.find("read t0").expect("t0") < pipe);
        assert!(s.find("read t1").expect("t1") > pipe);
        assert!(s.ends_with("echo \"$t0 $t1\""), "{s}");
    }
}
