//! `kiln bench desktop`: what a computer-use agent's loop costs on a desktop sandbox, in one
//! run against the running daemon (the `desktop` image, or `--image`):
//! - `ready_ms`: `POST /v1/sandboxes` of a desktop answered (restored from its warm snapshot,
//!   the screen drawn, input ready), and `cold_ms` beside it (`--cold`, one run: under TCG a
//!   cold desktop takes tens of seconds); one restore before them is not counted (a daemon's
//!   first start also probes QEMU);
//! - `screenshot_ms`: `GET .../desktop/screenshot` (QEMU's frame, PNG encoded), client wall
//!   time; `screenshot_kib`: its size;
//! - `input_ms`: the receipt's `input_ms` of a `mouse_move` (the QMP round trips), and
//!   `move_ms` the whole action request;
//! - `click_settled_ms`: a right click on the desktop (openbox opens its menu) with
//!   `?screenshot=true`: input, the menu drawn, the screen still, its screenshot in the
//!   receipt — client wall time; the menu is closed with Escape between runs;
//! - `idle_cpu_pct`: the desktop's QEMU's CPU time over `--idle-secs` with nothing to do
//!   (percent of one core; includes kiln's screen watch of the review recording);
//! - `live_view`: frames per second a view-only live viewer receives (RFB over the viewer
//!   listener's WebSocket, one incremental request after each update, as noVNC does) while
//!   a terminal prints without pause (`bench_liveview.rs`).
//!
//! Nothing is asserted: numbers go to stdout (`--json` for machines) and into
//! docs/benchmarks.md by hand.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use kiln_api_types::{
    ActionQuery, DesktopAction, MachineSpec, MouseButton, SandboxSource, SandboxSpec,
};
use kiln_client::{Client, ClientHome};
use serde::Serialize;

use crate::bench::{Summary, summary};

/// Options of `kiln bench desktop`.
#[derive(Debug, Args)]
pub struct DesktopBenchArgs {
    /// Samples of each measurement (restores: a third of them, at least 3).
    #[arg(long, default_value_t = 30)]
    pub runs: usize,
    /// Image (a desktop).
    #[arg(long, default_value = "desktop")]
    pub image: String,
    /// Also cold-boot one desktop for `cold_ms`.
    #[arg(long)]
    pub cold: bool,
    /// Seconds of idle CPU measurement.
    #[arg(long, default_value_t = 20)]
    pub idle_secs: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The result.
#[derive(Debug, Serialize)]
pub struct DesktopBench {
    /// Image.
    pub image: String,
    /// Screen.
    pub screen: String,
    /// Desktop sandbox created from its warm snapshot, answered (ms).
    pub ready_ms: Summary,
    /// The same, booted cold (ms; with `--cold`).
    pub cold_ms: Option<Summary>,
    /// A screenshot through the API (ms).
    pub screenshot_ms: Summary,
    /// Its PNG (KiB).
    pub screenshot_kib: Summary,
    /// The input of a pointer move, as the receipt reports it (ms).
    pub input_ms: Summary,
    /// A pointer move action, client wall time (ms).
    pub move_ms: Summary,
    /// A right click until its settled screenshot is back (ms).
    pub click_settled_ms: Summary,
    /// Whether every click's screen changed (the menu appeared) before it settled.
    pub clicks_changed: usize,
    /// Idle QEMU CPU use (percent of one core).
    pub idle_cpu_pct: f64,
    /// Frames a live viewer gets per second while a terminal prints without pause.
    pub live_view: crate::bench_liveview::LiveViewFps,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn spec(image: &str, cold: bool) -> anyhow::Result<SandboxSpec> {
    Ok(SandboxSpec {
        source: SandboxSource::Image {
            image: image.parse()?,
            machine: MachineSpec {
                cpus: 2,
                memory_mib: 1536,
                screen: None,
            },
            cold,
        },
        ..SandboxSpec::default()
    })
}

/// User + system CPU time of a sandbox's QEMU (seconds).
fn qemu_cpu_secs(home: &ClientHome, id: &kiln_api_types::SandboxId) -> Option<f64> {
    let pidfile = std::fs::read_to_string(home.sandbox_dir(id).join("qemu.pid")).ok()?;
    let pid: u32 = pidfile.split_whitespace().next()?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based).
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// Runs `kiln bench desktop`.
pub async fn run(client: &Client, home: &ClientHome, a: &DesktopBenchArgs) -> anyhow::Result<i32> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    crate::image::ensure_built(client, &a.image).await?;

    // One restore first, not counted: a daemon's first start also probes QEMU and the
    // accelerator (about a second), which no later start pays.
    let first = client.sandbox_create(&spec(&a.image, false)?).await?;
    client.sandbox_delete(&first.id).await?;
    // Restores; the last one stays for the rest of the bench.
    let mut ready = Vec::new();
    let restores = (a.runs / 3).max(3);
    let mut kept = None;
    for i in 0..restores {
        let t = Instant::now();
        let info = client.sandbox_create(&spec(&a.image, false)?).await?;
        ready.push(ms(t.elapsed()));
        if i + 1 == restores {
            kept = Some(info);
        } else {
            client.sandbox_delete(&info.id).await?;
        }
    }
    let info = kept.expect("at least one restore");
    let id = info.id.clone();
    let cold = if a.cold {
        let t = Instant::now();
        let c = client.sandbox_create(&spec(&a.image, true)?).await?;
        let took = ms(t.elapsed());
        client.sandbox_delete(&c.id).await?;
        Some(summary(&mut [took]))
    } else {
        None
    };

    let (mut shot, mut kib) = (Vec::new(), Vec::new());
    let mut screen = String::new();
    for _ in 0..a.runs {
        let t = Instant::now();
        let png = client.desktop_screenshot(&id, None).await?;
        shot.push(ms(t.elapsed()));
        kib.push(png.len() as f64 / 1024.0);
        // The PNG's IHDR: width and height, big-endian, at bytes 16..24.
        if let (Some(w), Some(h)) = (png.get(16..20), png.get(20..24)) {
            let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            screen = format!("{}x{}", be(w), be(h));
        }
    }

    let no_shot = ActionQuery::default();
    let (mut input, mut moves) = (Vec::new(), Vec::new());
    for i in 0..a.runs {
        let action = DesktopAction::MouseMove {
            x: 200 + (i as u32 % 20) * 30,
            y: 300,
        };
        let t = Instant::now();
        let r = client.desktop_act(&id, &action, &no_shot).await?;
        moves.push(ms(t.elapsed()));
        input.push(r.input_ms);
    }

    let settled = ActionQuery {
        screenshot: true,
        ..ActionQuery::default()
    };
    let (mut clicks, mut changed) = (Vec::new(), 0);
    for i in 0..a.runs {
        let click = DesktopAction::MouseClick {
            x: Some(400 + (i as u32 % 5) * 20),
            y: Some(250),
            button: MouseButton::Right,
            count: 1,
        };
        let t = Instant::now();
        let r = client.desktop_act(&id, &click, &settled).await?;
        clicks.push(ms(t.elapsed()));
        if r.settle.as_ref().is_some_and(|s| s.changed) {
            changed += 1;
        }
        let escape = DesktopAction::KeyPress {
            keys: "Escape".into(),
        };
        client.desktop_act(&id, &escape, &settled).await?;
    }

    let before = qemu_cpu_secs(home, &id);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.idle_secs)).await;
    let idle_cpu_pct = match (before, qemu_cpu_secs(home, &id)) {
        (Some(b), Some(e)) => (e - b) / t.elapsed().as_secs_f64() * 100.0,
        _ => f64::NAN,
    };
    let live_view = crate::bench_liveview::live_view_fps(client, &id, 10.0).await?;
    client.sandbox_delete(&id).await?;

    let out = DesktopBench {
        image: a.image.clone(),
        screen,
        ready_ms: summary(&mut ready),
        cold_ms: cold,
        screenshot_ms: summary(&mut shot),
        screenshot_kib: summary(&mut kib),
        input_ms: summary(&mut input),
        move_ms: summary(&mut moves),
        click_settled_ms: summary(&mut clicks),
        clicks_changed: changed,
        idle_cpu_pct,
        live_view,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    let row = |name: &str, s: &Summary| {
        println!(
            "{name:<22} p50 {:>9.1}  p95 {:>9.1}  (n={})",
            s.p50, s.p95, s.n
        );
    };
    row("ready_ms", &out.ready_ms);
    if let Some(c) = &out.cold_ms {
        row("cold_ms", c);
    }
    row("screenshot_ms", &out.screenshot_ms);
    row("screenshot_kib", &out.screenshot_kib);
    row("input_ms", &out.input_ms);
    row("move_ms", &out.move_ms);
    row("click_settled_ms", &out.click_settled_ms);
    println!(
        "clicks that changed the screen: {}/{}",
        out.clicks_changed, out.click_settled_ms.n
    );
    println!("idle_cpu_pct           {:.1}", out.idle_cpu_pct);
    println!(
        "live_view_fps          {:.1} ({} updates, {:.1} MiB in {:.1} s)",
        out.live_view.fps,
        out.live_view.updates,
        out.live_view.bytes as f64 / (1 << 20) as f64,
        out.live_view.secs
    );
    Ok(0)
}
