//! `kiln bench images`: image build times through the daemon's API: forced rebuilds of each
//! image (per stage, and the compaction's before/after sizes), and the up-to-date checks —
//! the one `kiln run` makes before every start (`keep_kernel`: no apt query) and the one
//! `kiln image build` makes (resolving the newest kernel package) — reported as p50/p95.
//!
//! A forced rebuild replaces the image (a new rootfs under the same id), so its warm
//! snapshots are recaptured by the next start. Nothing is asserted: the numbers go to stdout
//! (`--json` for machines) and into docs/benchmarks.md by hand.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::bail;
use clap::Args;
use kiln_api_types::{ImageBuildEvent, ImageBuildRequest};
use serde::Serialize;

use crate::bench::{Summary, summary};
use kiln_client::Client;

/// Options of `kiln bench images`.
#[derive(Debug, Args)]
pub struct ImagesBenchArgs {
    /// Images to rebuild (built-in names or images built from recipe files).
    #[arg(long, value_delimiter = ',', default_value = "base,python,postgres")]
    pub images: Vec<String>,
    /// Forced rebuilds per image.
    #[arg(long, default_value_t = 1)]
    pub rebuilds: usize,
    /// Up-to-date checks per image and kind.
    #[arg(long, default_value_t = 20)]
    pub checks: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The results for one image.
#[derive(Debug, Serialize)]
pub struct ImageBench {
    /// Image name.
    pub image: String,
    /// Forced rebuild, whole stream (s).
    pub rebuild_s: Summary,
    /// Median time per stage of the rebuilds (s), by stage name.
    pub stage_s: BTreeMap<String, f64>,
    /// Root file system bytes on disk before compaction (last rebuild).
    pub before_compaction_bytes: u64,
    /// After compaction.
    pub after_compaction_bytes: u64,
    /// Apparent size of the root file system.
    pub apparent_bytes: u64,
    /// Up-to-date check as `kiln run` makes it (ms).
    pub check_keep_kernel_ms: Summary,
    /// Up-to-date check as `kiln image build` makes it, resolving the kernel (ms).
    pub check_resolve_kernel_ms: Summary,
}

/// One build through the API; returns its events (the last one `done`).
async fn build_once(
    client: &Client,
    image: &str,
    req: &ImageBuildRequest,
) -> anyhow::Result<Vec<ImageBuildEvent>> {
    let mut events = Vec::new();
    client
        .image_build(image, req, |ev| {
            events.push(ev);
            Ok::<(), std::io::Error>(())
        })
        .await?;
    match events.last() {
        Some(ImageBuildEvent::Done { .. }) => Ok(events),
        Some(ImageBuildEvent::Error(e)) => bail!("building {image}: {}", e.message),
        _ => bail!("building {image}: the stream ended without a result"),
    }
}

/// Runs `kiln bench images`.
pub async fn run(client: &Client, a: &ImagesBenchArgs) -> anyhow::Result<i32> {
    let mut results = Vec::new();
    for image in &a.images {
        // Built (or up to date) first, so the checks below measure a present image.
        build_once(client, image, &ImageBuildRequest::default()).await?;
        let mut rebuild = Vec::new();
        let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut compaction = (0, 0, 0);
        for _ in 0..a.rebuilds {
            let t = Instant::now();
            let events = build_once(
                client,
                image,
                &ImageBuildRequest {
                    force: true,
                    keep_kernel: false,
                },
            )
            .await?;
            rebuild.push(t.elapsed().as_secs_f64());
            for ev in events {
                match ev {
                    ImageBuildEvent::StageDone {
                        name, elapsed_ms, ..
                    } => stages
                        .entry(name)
                        .or_default()
                        .push(elapsed_ms as f64 / 1000.0),
                    ImageBuildEvent::Compacted {
                        apparent_bytes,
                        before_bytes,
                        after_bytes,
                    } => compaction = (before_bytes, after_bytes, apparent_bytes),
                    _ => {}
                }
            }
        }
        let checks = |keep_kernel: bool| async move {
            let mut ms = Vec::new();
            for _ in 0..a.checks {
                let t = Instant::now();
                build_once(
                    client,
                    image,
                    &ImageBuildRequest {
                        force: false,
                        keep_kernel,
                    },
                )
                .await?;
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(summary(&mut ms))
        };
        let check_keep_kernel_ms = checks(true).await?;
        let check_resolve_kernel_ms = checks(false).await?;
        results.push(ImageBench {
            image: image.clone(),
            rebuild_s: summary(&mut rebuild),
            stage_s: stages
                .into_iter()
                .map(|(k, mut v)| (k, summary(&mut v).p50))
                .collect(),
            before_compaction_bytes: compaction.0,
            after_compaction_bytes: compaction.1,
            apparent_bytes: compaction.2,
            check_keep_kernel_ms,
            check_resolve_kernel_ms,
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(0);
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for r in &results {
        println!(
            "{}: forced rebuild p50 {:.1} s (n={}); up-to-date check p50 {:.1} ms / p95 {:.1} ms (kiln run), p50 {:.0} ms / p95 {:.0} ms (kiln image build)",
            r.image,
            r.rebuild_s.p50,
            r.rebuild_s.n,
            r.check_keep_kernel_ms.p50,
            r.check_keep_kernel_ms.p95,
            r.check_resolve_kernel_ms.p50,
            r.check_resolve_kernel_ms.p95
        );
        let stages: Vec<String> = r
            .stage_s
            .iter()
            .map(|(k, v)| format!("{k} {v:.1} s"))
            .collect();
        println!("  stages: {}", stages.join(", "));
        println!(
            "  rootfs: {:.1} MiB on disk before compaction, {:.1} MiB after ({:.0} MiB apparent)",
            mib(r.before_compaction_bytes),
            mib(r.after_compaction_bytes),
            mib(r.apparent_bytes)
        );
    }
    Ok(0)
}
