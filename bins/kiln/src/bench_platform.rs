//! `kiln bench files` and `kiln bench lifecycle`: what programs building on kiln wait for.
//!
//! - files: upload and download MiB/s of one large file, side by side in each run with the
//!   stdout stream rate of the same sandbox (the channel's reference rate), as ratios;
//! - lifecycle: the time a restarted daemon takes to re-attach N running sandboxes, and the
//!   wall time of `kiln stop` and `kiln start`.
//!
//! Nothing is asserted: numbers go to stdout (`--json`) and into docs/benchmarks.md by hand.

use std::time::Instant;

use anyhow::bail;
use clap::Args;
use kiln_api_types::SandboxId;
use kiln_client::{Client, ClientHome};
use serde::Serialize;

use crate::bench::{Summary, exec_collect, stdout_rate, summary};

/// Options of `kiln bench files`.
#[derive(Debug, Args)]
pub struct FilesBenchArgs {
    /// Rounds (each: stdout stream, upload, download).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Image of the sandbox.
    #[arg(long, default_value = "base")]
    pub image: String,
    /// MiB per transfer.
    #[arg(long, default_value_t = 256)]
    pub mib: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The result of `kiln bench files`.
#[derive(Debug, Serialize)]
pub struct FilesBench {
    /// MiB per transfer.
    pub mib: u64,
    /// Rounds.
    pub runs: usize,
    /// `head -c` of that many bytes to stdout, guest → client (MiB/s).
    pub stdout_mib_s: Summary,
    /// `kiln cp`-style upload, client → guest file, until it is synced and renamed (MiB/s).
    pub upload_mib_s: Summary,
    /// Download, guest file → client (MiB/s).
    pub download_mib_s: Summary,
    /// p50 upload / p50 stdout.
    pub upload_ratio_p50: f64,
    /// p50 download / p50 stdout.
    pub download_ratio_p50: f64,
}

/// Runs `kiln bench files`.
pub async fn files(client: &Client, a: &FilesBenchArgs) -> anyhow::Result<i32> {
    crate::image::ensure_built(client, &a.image).await?;
    let spec = crate::bench::image_spec(&a.image, false)?;
    let info = client.sandbox_create(&spec).await?;
    let id = info.id.clone();
    let result = files_in(client, &id, a).await;
    client.sandbox_delete(&id).await?;
    let out = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "files ({} MiB, {} runs): stdout {:.1} MiB/s, upload {:.1} MiB/s ({:.2}x), download {:.1} MiB/s ({:.2}x) (p50)",
            out.mib,
            out.runs,
            out.stdout_mib_s.p50,
            out.upload_mib_s.p50,
            out.upload_ratio_p50,
            out.download_mib_s.p50,
            out.download_ratio_p50
        );
    }
    Ok(0)
}

async fn files_in(
    client: &Client,
    id: &SandboxId,
    a: &FilesBenchArgs,
) -> anyhow::Result<FilesBench> {
    let bytes = a.mib << 20;
    // One buffer of varied bytes, reused: the host's disk is not part of the measurement.
    let data: std::sync::Arc<Vec<u8>> = std::sync::Arc::new(
        (0..bytes / 8)
            .flat_map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes())
            .collect(),
    );
    let (mut stdout, mut up, mut down) = (Vec::new(), Vec::new(), Vec::new());
    let mib_s = |secs: f64| (bytes as f64 / (1024.0 * 1024.0)) / secs;
    for run in 0..a.runs {
        stdout.push(stdout_rate(client, id, bytes).await?);

        let t = Instant::now();
        let reader = std::io::Cursor::new(SharedBytes(std::sync::Arc::clone(&data)));
        let written = client
            .file_write(id, "/root/bench.bin", None, false, reader)
            .await?;
        up.push(mib_s(t.elapsed().as_secs_f64()));
        if written.size != bytes {
            bail!("uploaded {} of {bytes} bytes", written.size);
        }

        let t = Instant::now();
        let mut stream = client.file_read(id, "/root/bench.bin", false).await?;
        let got = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await?;
        down.push(mib_s(t.elapsed().as_secs_f64()));
        if got != bytes {
            bail!("downloaded {got} of {bytes} bytes");
        }
        if !a.json {
            eprintln!(
                "run {}/{}: stdout {:.1}, upload {:.1}, download {:.1} MiB/s",
                run + 1,
                a.runs,
                stdout[run],
                up[run],
                down[run]
            );
        }
    }
    let (s, u, d) = (summary(&mut stdout), summary(&mut up), summary(&mut down));
    Ok(FilesBench {
        mib: a.mib,
        runs: a.runs,
        upload_ratio_p50: u.p50 / s.p50,
        download_ratio_p50: d.p50 / s.p50,
        stdout_mib_s: s,
        upload_mib_s: u,
        download_mib_s: d,
    })
}

/// An `Arc<Vec<u8>>` as a byte slice, for a cheap `Cursor` over shared data.
struct SharedBytes(std::sync::Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Options of `kiln bench lifecycle`.
#[derive(Debug, Args)]
pub struct LifecycleBenchArgs {
    /// Sandboxes running while the daemon restarts.
    #[arg(long, default_value_t = 10)]
    pub sandboxes: usize,
    /// Daemon restarts, and stop/start cycles.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Image of the sandboxes.
    #[arg(long, default_value = "base")]
    pub image: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The result of `kiln bench lifecycle`.
#[derive(Debug, Serialize)]
pub struct LifecycleBench {
    /// Sandboxes re-attached per restart.
    pub sandboxes: usize,
    /// Re-attaching them all, measured in the new daemon (ms).
    pub reattach_ms: Summary,
    /// Daemon stopped → new daemon answering with all of them re-attached, client wall (ms).
    pub restart_wall_ms: Summary,
    /// `kiln stop` of a running 256 MiB guest (ms).
    pub stop_ms: Summary,
    /// `kiln start` of it, until it runs again (ms).
    pub start_ms: Summary,
}

/// Runs `kiln bench lifecycle`.
pub async fn lifecycle(
    client: &Client,
    home: &ClientHome,
    a: &LifecycleBenchArgs,
) -> anyhow::Result<i32> {
    crate::image::ensure_built(client, &a.image).await?;
    let spec = crate::bench::image_spec(&a.image, false)?;
    let infos = crate::sandbox::clone_n(client, &spec, a.sandboxes as u32).await?;
    let ids: Vec<SandboxId> = infos.into_iter().map(|i| i.id).collect();
    let result = lifecycle_in(home, &ids, a).await;
    let client = Client::connect(home).await?;
    for id in &ids {
        let _ = client.sandbox_delete(id).await;
    }
    let out = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "lifecycle: re-attach {} sandboxes {:.0} ms (p50, daemon-side; {:.0} ms restart wall), stop {:.0} ms, start {:.0} ms (p50)",
            out.sandboxes,
            out.reattach_ms.p50,
            out.restart_wall_ms.p50,
            out.stop_ms.p50,
            out.start_ms.p50
        );
    }
    Ok(0)
}

async fn lifecycle_in(
    home: &ClientHome,
    ids: &[SandboxId],
    a: &LifecycleBenchArgs,
) -> anyhow::Result<LifecycleBench> {
    let (mut reattach, mut wall, mut stop, mut start) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..a.runs {
        let client = Client::connect(home).await?;
        let t = Instant::now();
        crate::sandbox::stop_daemon(&client.health().await?).await?;
        let client = Client::connect(home).await?;
        let health = client.health().await?;
        wall.push(t.elapsed().as_secs_f64() * 1000.0);
        if health.janitor.sandboxes_reattached as usize != ids.len() {
            bail!(
                "restart {}: {} of {} sandboxes re-attached",
                run + 1,
                health.janitor.sandboxes_reattached,
                ids.len()
            );
        }
        reattach.push(health.janitor.reattach_ms as f64);
        for id in ids {
            client.sandbox_ping(id).await?;
        }
        // stop / start of one of them, a marker file proving its disk came back.
        let id = &ids[run % ids.len()];
        let (s, _) = exec_collect(
            &client,
            id,
            vec!["sh".into(), "-c".into(), format!("echo {run} > /root/mark")],
        )
        .await?;
        if s.shell_code() != 0 {
            bail!("writing the marker failed");
        }
        let t = Instant::now();
        client.sandbox_stop(id).await?;
        stop.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        client
            .sandbox_start(id, &kiln_api_types::SandboxStartRequest::default())
            .await?;
        start.push(t.elapsed().as_secs_f64() * 1000.0);
        let (s, _) = exec_collect(
            &client,
            id,
            vec![
                "grep".into(),
                "-qx".into(),
                run.to_string(),
                "/root/mark".into(),
            ],
        )
        .await?;
        if s.shell_code() != 0 {
            bail!("the marker did not survive stop/start");
        }
        if !a.json {
            eprintln!(
                "run {}/{}: re-attach {} ms, stop {:.0} ms, start {:.0} ms",
                run + 1,
                a.runs,
                health.janitor.reattach_ms,
                stop[run],
                start[run]
            );
        }
    }
    Ok(LifecycleBench {
        sandboxes: ids.len(),
        reattach_ms: summary(&mut reattach),
        restart_wall_ms: summary(&mut wall),
        stop_ms: summary(&mut stop),
        start_ms: summary(&mut start),
    })
}
