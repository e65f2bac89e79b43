//! `kiln bench pool`: what the warm pool saves, side by side in one run.
//!
//! Against the running daemon, for one image at the default machine size (the pool's size
//! and warm-up are set for the bench and put back as they were at the end):
//! - `acquire_ms`: `POST /v1/sandboxes` answered from a ready pool, plus the first agent
//!   ping through the API (client-side wall time: take, launch, first answer);
//! - `run_pool_ms`, `run_restore_ms`, `run_cold_ms`: the whole `kiln run --image IMAGE --
//!   true` process (start to exit) with a ready pool, with no pool (a warm restore), and
//!   with `--cold`, interleaved over `--runs` rounds so drift hits each kind alike; before
//!   each pool run the bench waits until the pool is full again (refill is not on the
//!   critical path, and is measured separately as `refill_ms`);
//! - `cold_vs_pool`: p50 of the cold run / p50 of the pool run (the ≥ 20× target);
//! - `refill_ms`: a take → the pool full again (restore + warm-up in the background);
//! - `pooled_pss_mib`: PSS of each idle pooled sandbox's QEMU process;
//! - `stdout_mib_s`, `guest_pipe_mib_s`, `stdout_vs_guest_pipe`: in each round's pooled
//!   sandbox, the guest's own pipe rate and then kiln's stdout stream, and their ratio
//!   (`kiln bench boot`'s measurement, `bench::StreamRates`).
//!
//! Nothing is asserted: numbers go to stdout (`--json` for machines) and into
//! docs/benchmarks.md by hand.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use kiln_api_types::{MachineSpec, PoolInfo, PoolSetRequest, SandboxSource, SandboxSpec};
use kiln_client::{Client, ClientHome};
use serde::Serialize;

use crate::bench::{Summary, summary};

/// Options of `kiln bench pool`.
#[derive(Debug, Args)]
pub struct PoolBenchArgs {
    /// Rounds (each: one pool run, one restore run, one cold run, one acquire).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Image.
    #[arg(long, default_value = "python")]
    pub image: String,
    /// Pool size during the bench.
    #[arg(long, default_value_t = 2)]
    pub size: u32,
    /// MiB per stream (stdout and the guest's pipe), one pair per round.
    #[arg(long, default_value_t = 128)]
    pub stream_mib: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The result.
#[derive(Debug, Serialize)]
pub struct PoolBench {
    /// Image.
    pub image: String,
    /// Rounds.
    pub runs: usize,
    /// Pool take + launch + first ping through the API (ms).
    pub acquire_ms: Summary,
    /// `kiln run -- true` with a ready pool (ms).
    pub run_pool_ms: Summary,
    /// `kiln run -- true` restoring the warm snapshot, no pool (ms).
    pub run_restore_ms: Summary,
    /// `kiln run --cold -- true` (ms).
    pub run_cold_ms: Summary,
    /// p50 cold / p50 pool.
    pub cold_vs_pool: f64,
    /// p50 restore / p50 pool.
    pub restore_vs_pool: f64,
    /// A take → the pool full again (ms).
    pub refill_ms: Summary,
    /// PSS of an idle pooled sandbox's QEMU (MiB).
    pub pooled_pss_mib: Summary,
    /// stdout streaming guest → client through kiln (MiB/s), in sandboxes from the pool.
    pub stdout_mib_s: Summary,
    /// The guest's own pipe (`head -c N /dev/zero | cat > /dev/null`, timed in the guest),
    /// right before each stdout stream in the same sandbox (MiB/s).
    pub guest_pipe_mib_s: Summary,
    /// stdout / guest pipe, per sandbox (the ≥ 0.8× target).
    pub stdout_vs_guest_pipe: Summary,
}

fn kiln(home: &ClientHome, args: &[&str]) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = Command::new(std::env::current_exe()?)
        .env("KILN_HOME", home.root())
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!(
            "`kiln {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ms)
}

async fn pool_of(client: &Client, image: &str) -> anyhow::Result<Option<PoolInfo>> {
    Ok(client
        .pool_list()
        .await?
        .pools
        .into_iter()
        .find(|p| p.image.as_str() == image && p.machine == MachineSpec::default()))
}

/// Waits until the pool holds `size` ready sandboxes; how long that took (ms).
async fn wait_full(client: &Client, image: &str, size: u32) -> anyhow::Result<f64> {
    let t = Instant::now();
    loop {
        let p = pool_of(client, image).await?;
        if p.as_ref().is_some_and(|p| p.ready >= size) {
            return Ok(t.elapsed().as_secs_f64() * 1000.0);
        }
        if let Some(e) = p.and_then(|p| p.last_error) {
            bail!("the pool does not fill: {e}");
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("the pool of {image} did not fill within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sets the pool of `image` at the default machine size.
async fn set(
    client: &Client,
    image: &str,
    size: u32,
    warmup: Option<Vec<String>>,
) -> anyhow::Result<()> {
    let req = PoolSetRequest {
        size,
        cpus: Some(MachineSpec::default().cpus),
        memory_mib: Some(MachineSpec::default().memory_mib),
        warmup,
        warmup_timeout_secs: None,
    };
    client.pool_set(image, &req).await?;
    Ok(())
}

/// Runs `kiln bench pool`.
pub async fn run(client: &Client, home: &ClientHome, a: &PoolBenchArgs) -> anyhow::Result<i32> {
    if a.runs == 0 || a.size == 0 {
        bail!("--runs and --size must be at least 1");
    }
    crate::image::ensure_built(client, &a.image).await?;
    let before = pool_of(client, &a.image).await?;
    let result = bench(client, home, a).await;
    // The pool as it was (none: size 0).
    let (size, warmup) = before.map_or((0, None), |p| (p.size, p.warmup));
    set(client, &a.image, size, warmup)
        .await
        .context("putting the pool back as it was")?;
    let out = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let row = |name: &str, s: &Summary| {
            println!(
                "  {name:<44} p50 {:>8.1} ms  p95 {:>8.1} ms  (n={})",
                s.p50, s.p95, s.n
            );
        };
        println!("kiln bench pool: image {}, {} rounds", out.image, out.runs);
        row(
            "acquire (create from the pool + first ping)",
            &out.acquire_ms,
        );
        row("kiln run -- true, pool", &out.run_pool_ms);
        row("kiln run -- true, restore (no pool)", &out.run_restore_ms);
        row("kiln run --cold -- true", &out.run_cold_ms);
        row("refill (take -> pool full again)", &out.refill_ms);
        println!(
            "  stdout {:.1} MiB/s, guest pipe {:.1} MiB/s, stdout / guest pipe {:.2}x (p50)",
            out.stdout_mib_s.p50, out.guest_pipe_mib_s.p50, out.stdout_vs_guest_pipe.p50
        );
        println!(
            "  cold / pool {:.1}x, restore / pool {:.1}x; idle pooled sandbox PSS p50 {:.1} MiB",
            out.cold_vs_pool, out.restore_vs_pool, out.pooled_pss_mib.p50
        );
    }
    Ok(0)
}

async fn bench(client: &Client, home: &ClientHome, a: &PoolBenchArgs) -> anyhow::Result<PoolBench> {
    let img = a.image.as_str();
    let image = img.parse().map_err(|e| anyhow::anyhow!("--image: {e}"))?;
    // Warm-up outside the measurement: the warm snapshot exists, a cold boot's files are in
    // the page cache.
    set(client, img, 0, None).await?;
    kiln(home, &["run", "--image", img, "--", "true"])?;
    kiln(home, &["run", "--cold", "--image", img, "--", "true"])?;
    let (mut acquire, mut pool, mut restore, mut cold, mut refill, mut pss) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut streams = crate::bench::StreamRates::default();
    for round in 0..a.runs {
        set(client, img, a.size, None).await?;
        wait_full(client, img, a.size).await?;
        if round == 0 {
            pss.extend(pooled_pss(client, home).await?);
        }
        pool.push(kiln(home, &["run", "--image", img, "--", "true"])?);
        refill.push(wait_full(client, img, a.size).await?);
        let spec = SandboxSpec {
            source: SandboxSource::Image {
                image: kiln_api_types::ImageName::clone(&image),
                machine: MachineSpec::default(),
                cold: false,
            },
            ..SandboxSpec::default()
        };
        let t = Instant::now();
        let info = client.sandbox_create(&spec).await?;
        client.sandbox_ping(&info.id).await?;
        acquire.push(t.elapsed().as_secs_f64() * 1000.0);
        if info.status.source != kiln_api_types::StartSource::Pool {
            bail!(
                "the bench's create did not come from the pool ({:?})",
                info.status.source
            );
        }
        streams
            .measure(client, &info.id, a.stream_mib << 20)
            .await
            .context("stdout and guest pipe rates")?;
        client.sandbox_delete(&info.id).await?;
        set(client, img, 0, None).await?;
        restore.push(kiln(home, &["run", "--image", img, "--", "true"])?);
        cold.push(kiln(
            home,
            &["run", "--cold", "--image", img, "--", "true"],
        )?);
        if !a.json {
            eprintln!("round {}/{}", round + 1, a.runs);
        }
    }
    let (pool, restore, cold) = (
        summary(&mut pool),
        summary(&mut restore),
        summary(&mut cold),
    );
    Ok(PoolBench {
        image: a.image.clone(),
        runs: a.runs,
        acquire_ms: summary(&mut acquire),
        cold_vs_pool: cold.p50 / pool.p50,
        restore_vs_pool: restore.p50 / pool.p50,
        run_pool_ms: pool,
        run_restore_ms: restore,
        run_cold_ms: cold,
        refill_ms: summary(&mut refill),
        pooled_pss_mib: summary(&mut pss),
        stdout_mib_s: summary(&mut streams.stdout),
        guest_pipe_mib_s: summary(&mut streams.guest_pipe),
        stdout_vs_guest_pipe: summary(&mut streams.ratio),
    })
}

/// PSS (MiB) of each pooled sandbox's QEMU: runtime directories of the home that belong to
/// no listed sandbox.
async fn pooled_pss(client: &Client, home: &ClientHome) -> anyhow::Result<Vec<f64>> {
    let listed: Vec<String> = client
        .sandbox_list(&[])
        .await?
        .sandboxes
        .into_iter()
        .map(|s| s.id.to_string())
        .collect();
    let mut out = Vec::new();
    for e in std::fs::read_dir(home.root().join("run"))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("sb-") || listed.contains(&name) {
            continue;
        }
        if let Ok(id) = name.parse()
            && let Some(kib) = crate::bench::qemu_pss_kib(home, &id)
        {
            out.push(kib / 1024.0);
        }
    }
    Ok(out)
}
