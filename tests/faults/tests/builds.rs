//! SIGKILL of the daemon at seeded points of an image build (`kiln image build base
//! --force`), in a home with an images directory of its own (never the shared one). After
//! each kill the daemon starts again at once; the invariants hold (no build helper such as
//! `mmdebstrap` still working in the home), the image built before is intact (same manifest)
//! and boots, and an unfaulted rebuild succeeds and leaves no `images/.tmp-*` behind (build
//! directories are reclaimed by the next build, not by the janitor).
//!
//! A forced build of `base` costs about 20 s on an idle machine (about 25 s with the first
//! kernel fetch), so CI does not run this test; `scripts/faults --only image_build` does.

use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_faults::home::{COMMAND_DEADLINE, FaultHome, wait_bounded};
use kiln_faults::rng::{round_rng, rounds, seeds};
use kiln_faults::{Tally, announce, invariants, procs};

/// The built image's id per its manifest, or why it cannot be read.
fn image_id(home: &FaultHome) -> Result<String, String> {
    let text = std::fs::read_to_string(home.path().join("images/base/manifest.json"))
        .map_err(|e| format!("manifest unreadable: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("manifest is not JSON: {e}"))?;
    v["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("manifest without an id: {text}"))
}

#[test]
#[ignore = "builds images (about 20 s each): run by scripts/faults only"]
fn image_build_interrupted_by_kill9_keeps_the_previous_image_and_leaks_nothing() {
    let test = "image_build";
    let seeds = seeds();
    let mut tally = Tally::new("faults");
    let home = FaultHome::own_images(test);
    let t = Instant::now();
    home.run_ok(&["image", "build", "base"]);
    let build = t.elapsed();
    println!("  first build: {} ms", build.as_millis());
    for &seed in &seeds {
        for round in 0..rounds() {
            announce(test, seed, round);
            let mut rng = round_rng(test, seed, round);
            let before = image_id(&home).expect("the image built before the fault");
            let daemon = home.start_daemon();
            // A fraction of the first build's time, as for the other kill points.
            let permille = rng.below(1251);
            let delay = build * permille as u32 / 1000;
            println!(
                "  kill Daemon at {permille}‰ = {} ms of `kiln image build base --force`",
                delay.as_millis()
            );
            let args = ["image", "build", "base", "--force"];
            let child = home
                .cmd(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn kiln");
            std::thread::sleep(delay);
            let mut child = child;
            let running = child.try_wait().expect("try_wait").is_none();
            assert!(procs::kill9(daemon), "the daemon was gone before the kill");
            tally.injected += 1;
            if running {
                tally.mid_op += 1;
            }
            if let Err(h) = wait_bounded(child, &args, COMMAND_DEADLINE) {
                tally.hangs.push(format!("build client hung: {}", h.stderr));
            }
            if let Err(e) = home.restart_daemon() {
                tally.hangs.push(e);
                home.start_daemon();
            }
            // The killed daemon's helpers get a moment to notice; then none may be left.
            let deadline = Instant::now() + Duration::from_secs(30);
            let violations = loop {
                let v = invariants::check_serving(&home);
                if v.is_empty() || Instant::now() > deadline {
                    break v;
                }
                std::thread::sleep(Duration::from_millis(250));
            };
            tally.leaks.extend(violations);
            // Either the old image or (if the build published before the kill) its rebuild,
            // which has the same id: never a half-written one.
            match image_id(&home) {
                Ok(id) if id == before => {}
                other => tally
                    .lost
                    .push(format!("the image before the fault: {other:?}")),
            }
            match home.run_bounded(
                &["run", "--image", "base", "--", "echo", "ok"],
                COMMAND_DEADLINE,
            ) {
                Ok(o) if o.status.success() => {}
                Ok(o) => tally
                    .broken
                    .push(format!("run: {}", kiln_e2e::stderr(&o).trim())),
                Err(h) => tally.hangs.push(format!("run hung: {}", h.stderr)),
            }
            home.run_ok(&["image", "build", "base", "--force"]);
            for e in home.entries("images") {
                if e.starts_with(".tmp-") {
                    tally.leaks.push(format!("images/{e} left after a rebuild"));
                }
            }
        }
    }
    let _ = home.run(&["daemon", "stop", "--all"]);
    tally.leaks.extend(invariants::check_stopped(&home));
    tally.finish(&seeds);
}
