//! `kiln doctor`: prints what kiln will use and why; exits non-zero when kiln cannot run.
//!
//! The running daemon examines its host (`GET /v1/doctor`); when none runs, a one-shot
//! `kilnd --doctor` does the same without starting a daemon, so doctor also works when the
//! daemon cannot start.

use anyhow::{Context, bail};
use kiln_api_types::DoctorReport;
use kiln_client::{Client, ClientHome};

use crate::image::human_bytes;

/// Runs `kiln doctor`.
pub async fn run(home: &ClientHome, json: bool) -> anyhow::Result<i32> {
    let r = match Client::existing(home).await {
        Some(client) => match client.doctor().await {
            Ok(r) => r,
            // A daemon from before `GET /v1/doctor` existed: examine the host here instead.
            Err(e) if e.api().is_some_and(|b| b.code == "not_found") => one_shot(home).await?,
            Err(e) => return Err(e.into()),
        },
        None => one_shot(home).await?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_report(&r);
    }
    Ok(if r.ok() { 0 } else { 1 })
}

/// `kilnd --doctor` for `home`, without a daemon.
async fn one_shot(home: &ClientHome) -> anyhow::Result<DoctorReport> {
    let kilnd = kiln_client::kilnd_path()?;
    let out = tokio::process::Command::new(&kilnd)
        .arg("--doctor")
        .env("KILN_HOME", home.root())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("failed to run {} --doctor", kilnd.display()))?;
    if !out.status.success() {
        bail!(
            "{} --doctor failed ({}): {}",
            kilnd.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("malformed report from kilnd --doctor")
}

fn print_report(r: &DoctorReport) {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    match (&r.qemu_path, &r.qemu_error) {
        (Some(p), _) => println!(
            "qemu:            {} (version {})",
            p.display(),
            or_dash(&r.qemu_version)
        ),
        (None, Some(e)) => println!("qemu:            unusable: {e}"),
        (None, None) => println!("qemu:            not found"),
    }
    println!(
        "x-ignore-shared: {}",
        match r.x_ignore_shared {
            Some(true) => "supported: snapshots map guest memory instead of copying it",
            Some(false) =>
                "NOT supported: snapshots fall back to full-RAM streams (every restore copies guest RAM; clones share no pages)",
            None => "unknown",
        }
    );
    println!(
        "accelerator:     {} ({})",
        or_dash(&r.accel),
        r.accel_reason
    );
    println!(
        "state dir:       {} ({} free)",
        r.state_dir.display(),
        r.free_bytes.map(human_bytes).unwrap_or_else(|| "?".into())
    );
    println!(
        "guest agent:     {}",
        r.agent_binary
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "not found".into())
    );
    println!(
        "images:          {}",
        if r.images.is_empty() {
            "none built yet".to_owned()
        } else {
            r.images.join(", ")
        }
    );
    if r.missing_packages.is_empty() {
        println!("host packages:   all present");
    } else {
        println!("host packages:   missing {}", r.missing_packages.join("; "));
    }
    for m in &r.network_modes {
        match &m.missing {
            None => println!("network {:<8} available", format!("{}:", m.mode)),
            Some(why) => println!("network {:<8} unavailable: {why}", format!("{}:", m.mode)),
        }
    }
    for w in &r.warnings {
        println!("warning: {w}");
    }
    for p in &r.problems {
        println!("problem: {p}");
    }
    println!(
        "{}",
        if r.ok() {
            "kiln can run here"
        } else {
            "kiln cannot run here until the problems above are fixed"
        }
    );
}
