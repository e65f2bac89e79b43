//! SIGKILL of the daemon and of QEMU at seeded points of every long operation: create (cold
//! and warm), clone, warm capture, user snapshot, stop and start (image builds: `builds.rs`,
//! run by hand only). After each kill the daemon is started again at once (its janitor runs
//! before it serves), the invariants are checked (`kiln_faults::invariants`), the
//! acknowledged data is checked (a file copied into a keeper sandbox before any fault, a user
//! snapshot of it, and whatever the faulted operation acknowledged before the kill), and a
//! plain `kiln run` must still work.
//!
//! The keeper is a cold-booted sandbox (so no warm snapshot is pinned by it and the capture
//! point can remove the warm snapshot) whose QEMU is never a kill target. Each test has its
//! own home and daemon.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_faults::home::{COMMAND_DEADLINE, FaultHome, wait_bounded};
use kiln_faults::rng::{Rng, round_rng, rounds, seeds};
use kiln_faults::{Tally, announce, invariants, procs};

/// Where in an operation's life a kill lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    CreateCold,
    CreateWarm,
    Clone,
    Capture,
    UserSnapshot,
    Stop,
    Start,
}

const POINTS: &[Point] = &[
    Point::CreateCold,
    Point::CreateWarm,
    Point::Clone,
    Point::Capture,
    Point::UserSnapshot,
    Point::Stop,
    Point::Start,
];

/// How long each operation takes here and now, measured once per test by running it
/// unfaulted: delays are drawn from `0..=5/4` of it, so most kills land inside the operation
/// (and some just after it) whatever the machine's load.
struct Durations(Vec<(Point, Duration)>);

impl Durations {
    fn measure(fx: &mut Fixture) -> Durations {
        let mut all = Vec::new();
        for &point in POINTS {
            let prepared = prepare(fx, point);
            let args: Vec<&str> = prepared.args.iter().map(String::as_str).collect();
            let t = Instant::now();
            fx.home.run_ok(&args);
            all.push((point, t.elapsed()));
            fx.clean();
        }
        println!(
            "  operation times: {}",
            all.iter()
                .map(|(p, d)| format!("{p:?} {} ms", d.as_millis()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Durations(all)
    }

    /// The delay `permille`/1000 of the way through `point`'s measured duration. The seed
    /// fixes the fraction, not the milliseconds, so it names the same moment of the
    /// operation on a loaded machine as on an idle one.
    fn delay(&self, point: Point, permille: u64) -> Duration {
        let d = self
            .0
            .iter()
            .find(|(p, _)| *p == point)
            .map_or(Duration::from_secs(1), |(_, d)| *d);
        d * permille as u32 / 1000
    }
}

/// What the kill hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Daemon,
    Qemu,
}

/// The home with its keeper sandbox and the data acknowledged before any fault.
struct Fixture {
    home: FaultHome,
    keeper: String,
    /// sha256 of `/root/acked` in the keeper and in the `keep` snapshot.
    acked_sha: String,
    /// A host file with seeded bytes, copied into sandboxes.
    payload: PathBuf,
    payload_sha: String,
    next: u32,
}

fn guest_sha(home: &FaultHome, id: &str, path: &str) -> Result<String, String> {
    let out = home
        .run_bounded(&["exec", id, "--", "sha256sum", path], COMMAND_DEADLINE)
        .map_err(|h| format!("exec in {id} hung: {}", h.stderr))?;
    if !out.status.success() {
        return Err(format!(
            "sha256sum {path} in {id}: {}",
            kiln_e2e::stderr(&out).trim()
        ));
    }
    Ok(kiln_e2e::stdout(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

impl Fixture {
    fn new(label: &str, seed: u64) -> Fixture {
        let home = FaultHome::linked(label);
        let mut rng = Rng::new(seed);
        let bytes: Vec<u8> = (0..64 * 1024).map(|_| rng.next_u64() as u8).collect();
        let payload = home.path().join("faults-payload");
        std::fs::write(&payload, &bytes).expect("write payload");
        let payload_sha = kiln_e2e::sha256_hex(&bytes);
        let keeper = home
            .run_ok(&["create", "--image", "base", "--cold", "--name", "keeper"])
            .trim()
            .to_owned();
        home.run_ok(&[
            "cp",
            &payload.display().to_string(),
            &format!("{keeper}:/root/acked"),
        ]);
        home.run_ok(&["snapshot", &keeper, "--name", "keep"]);
        let acked_sha = guest_sha(&home, &keeper, "/root/acked").expect("keeper file");
        assert_eq!(acked_sha, payload_sha, "the copied file arrived whole");
        Fixture {
            home,
            keeper,
            acked_sha,
            payload,
            payload_sha,
            next: 0,
        }
    }

    fn keeper_qemu(&self) -> Option<i32> {
        procs::qemus_of(self.home.path())
            .into_iter()
            .find(|q| q.sandbox_id().as_deref() == Some(self.keeper.as_str()))
            .map(|q| q.pid)
    }

    /// A running sandbox (warm) holding the payload at `/root/acked`.
    fn victim(&self) -> String {
        let id = self
            .home
            .run_ok(&["create", "--image", "base"])
            .trim()
            .to_owned();
        self.home.run_ok(&[
            "cp",
            &self.payload.display().to_string(),
            &format!("{id}:/root/acked"),
        ]);
        id
    }

    fn warm_snapshots(&self) -> Vec<String> {
        self.home.json(&["snapshot", "ls"])["snapshots"]
            .as_array()
            .expect("snapshots")
            .iter()
            .filter(|s| s["kind"] == "warm")
            .filter_map(|s| s["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// Removes every sandbox but the keeper and every user snapshot but `keep`.
    fn clean(&self) {
        for s in self.home.ps() {
            if s.id != self.keeper {
                let _ = self.home.run(&["rm", &s.id]);
            }
        }
        for s in self.home.json(&["snapshot", "ls"])["snapshots"]
            .as_array()
            .expect("snapshots")
        {
            let name = s["name"].as_str().unwrap_or_default();
            if s["kind"] == "user" && name != "keep" {
                let _ = self.home.run(&["snapshot", "rm", name]);
            }
        }
    }
}

/// What one faulted operation is, once prepared.
struct Prepared {
    args: Vec<String>,
    /// The sandbox the operation acts on, if any (its file is checked when acknowledged).
    victim: Option<String>,
    /// The user snapshot it makes, if any.
    snapshot: Option<String>,
}

fn prepare(fx: &mut Fixture, point: Point) -> Prepared {
    fx.next += 1;
    let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match point {
        Point::CreateCold => Prepared {
            args: own(&["create", "--image", "base", "--cold"]),
            victim: None,
            snapshot: None,
        },
        Point::CreateWarm => {
            // Make sure the warm snapshot exists, so this is a restore.
            if fx.warm_snapshots().is_empty() {
                let id = fx.victim();
                fx.home.run_ok(&["rm", &id]);
            }
            Prepared {
                args: own(&["create", "--image", "base"]),
                victim: None,
                snapshot: None,
            }
        }
        Point::Clone => Prepared {
            args: own(&["clone", "keep", "--count", "2"]),
            victim: None,
            snapshot: None,
        },
        Point::Capture => {
            for w in fx.warm_snapshots() {
                fx.home.run_ok(&["snapshot", "rm", &w]);
            }
            Prepared {
                args: own(&["create", "--image", "base"]),
                victim: None,
                snapshot: None,
            }
        }
        Point::UserSnapshot => {
            let v = fx.victim();
            let name = format!("s{}", fx.next);
            Prepared {
                args: own(&["snapshot", &v, "--name", &name]),
                victim: Some(v),
                snapshot: Some(name),
            }
        }
        Point::Stop => {
            let v = fx.victim();
            Prepared {
                args: own(&["stop", &v]),
                victim: Some(v),
                snapshot: None,
            }
        }
        Point::Start => {
            let v = fx.victim();
            fx.home.run_ok(&["stop", &v]);
            Prepared {
                args: own(&["start", &v]),
                victim: Some(v),
                snapshot: None,
            }
        }
    }
}

/// Injects one kill at a seeded delay into the operation of `point` and checks everything
/// afterwards, counting into `tally`.
fn inject(
    fx: &mut Fixture,
    rng: &mut Rng,
    durations: &Durations,
    point: Point,
    target: Target,
    tally: &mut Tally,
) {
    let prepared = prepare(fx, point);
    let permille = rng.below(1251);
    let delay = durations.delay(point, permille);
    let daemon = fx.home.start_daemon();
    let keeper_qemu = fx.keeper_qemu();
    let args: Vec<&str> = prepared.args.iter().map(String::as_str).collect();
    println!(
        "  {point:?}: kill {target:?} at {permille}‰ = {} ms of `kiln {}`",
        delay.as_millis(),
        args.join(" ")
    );
    let mut child = fx
        .home
        .cmd(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let started = Instant::now();
    std::thread::sleep(delay);
    // Pick the victim process: the daemon, or a QEMU of this home other than the keeper's
    // (waiting for one to appear while the operation runs).
    let mut killed = None;
    let mut running_at_kill = false;
    loop {
        let running = child.try_wait().expect("try_wait").is_none();
        let pid = match target {
            Target::Daemon => Some(daemon),
            Target::Qemu => {
                let candidates: Vec<i32> = procs::qemus_of(fx.home.path())
                    .into_iter()
                    .map(|q| q.pid)
                    .filter(|p| Some(*p) != keeper_qemu)
                    .collect();
                (!candidates.is_empty()).then(|| *rng.pick(&candidates))
            }
        };
        if let Some(pid) = pid {
            running_at_kill = running;
            if procs::kill9(pid) {
                killed = Some(pid);
            }
            break;
        }
        if !running || started.elapsed() > COMMAND_DEADLINE {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = match wait_bounded(child, &args, COMMAND_DEADLINE) {
        Ok(out) => Some(out),
        Err(h) => {
            tally.hangs.push(format!(
                "{point:?}/{target:?}: kiln {:?} hung: {}",
                h.args, h.stderr
            ));
            None
        }
    };
    let Some(pid) = killed else {
        println!("    no process to kill: the operation left none (not counted)");
        fx.clean();
        return;
    };
    tally.injected += 1;
    if running_at_kill {
        tally.mid_op += 1;
    }
    let acked = out.as_ref().is_some_and(|o| o.status.success());
    println!(
        "    killed pid {pid} ({}), operation {}",
        if running_at_kill {
            "mid-operation"
        } else {
            "after it ended"
        },
        if acked { "acknowledged" } else { "failed" }
    );

    if target == Target::Daemon {
        // Kill -9 then start again at once: the case of finding #8 (a quick restart).
        let before: Vec<i32> = procs::qemus_of(fx.home.path())
            .iter()
            .map(|q| q.pid)
            .collect();
        if let Err(e) = fx.home.restart_daemon() {
            tally.hangs.push(format!("{point:?}: {e}"));
            fx.home.start_daemon();
        }
        let after: Vec<i32> = procs::qemus_of(fx.home.path())
            .iter()
            .map(|q| q.pid)
            .collect();
        let gone = before.iter().filter(|p| !after.contains(p)).count() as u64;
        let claimed = fx.home.daemon_status().map_or(0, |s| {
            s["janitor"]["processes_killed"].as_u64().unwrap_or(0)
        });
        if claimed > gone {
            tally.leaks.push(format!(
                "{point:?}: the janitor claims {claimed} QEMU killed, {gone} went away"
            ));
        }
    }

    // The invariants, polled: after a QEMU kill the owner task notices the death on its own.
    let deadline = Instant::now() + Duration::from_secs(60);
    let violations = loop {
        let v = invariants::check_serving(&fx.home);
        if v.is_empty() || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    for v in violations {
        tally.leaks.push(format!("{point:?}/{target:?}: {v}"));
    }

    // Data acknowledged before the fault.
    match guest_sha(&fx.home, &fx.keeper, "/root/acked") {
        Ok(sha) if sha == fx.acked_sha => {}
        other => tally
            .lost
            .push(format!("{point:?}/{target:?}: keeper's file: {other:?}")),
    }
    if target == Target::Daemon && acked {
        check_acknowledged(fx, point, &prepared, out.as_ref(), tally);
    }

    // The engine still works.
    let run = fx.home.run_bounded(
        &["run", "--image", "base", "--", "echo", "ok"],
        COMMAND_DEADLINE,
    );
    match run {
        Ok(o) if o.status.success() && kiln_e2e::stdout(&o) == "ok\n" => {}
        Ok(o) => tally.broken.push(format!(
            "{point:?}/{target:?}: kiln run: {}",
            kiln_e2e::stderr(&o).trim()
        )),
        Err(h) => tally
            .hangs
            .push(format!("{point:?}/{target:?}: kiln run hung: {}", h.stderr)),
    }
    fx.clean();
}

/// What the operation acknowledged (exit 0) before the daemon died must hold after it.
fn check_acknowledged(
    fx: &Fixture,
    point: Point,
    prepared: &Prepared,
    out: Option<&std::process::Output>,
    tally: &mut Tally,
) {
    let listed = fx.home.ps();
    let state_of = |id: &str| listed.iter().find(|s| s.id == id).map(|s| s.state.clone());
    let mut lost = |what: String| tally.lost.push(format!("{point:?}: {what}"));
    match point {
        Point::CreateCold | Point::CreateWarm | Point::Capture | Point::Clone => {
            let printed = out.map(kiln_e2e::stdout).unwrap_or_default();
            for id in printed.split_whitespace() {
                if state_of(id).as_deref() != Some("running") {
                    lost(format!("acknowledged sandbox {id} is {:?}", state_of(id)));
                }
            }
        }
        Point::UserSnapshot => {
            let name = prepared.snapshot.as_deref().expect("snapshot name");
            match fx
                .home
                .run_bounded(&["create", "--snapshot", name], COMMAND_DEADLINE)
            {
                Ok(o) if o.status.success() => {
                    let id = kiln_e2e::stdout(&o).trim().to_owned();
                    if guest_sha(&fx.home, &id, "/root/acked").as_deref()
                        != Ok(fx.payload_sha.as_str())
                    {
                        lost(format!("snapshot {name} restored without its file"));
                    }
                }
                Ok(o) => lost(format!(
                    "acknowledged snapshot {name} does not restore: {}",
                    kiln_e2e::stderr(&o).trim()
                )),
                Err(h) => lost(format!("restoring {name} hung: {}", h.stderr)),
            }
        }
        Point::Stop => {
            let v = prepared.victim.as_deref().expect("victim");
            if state_of(v).as_deref() != Some("stopped") {
                lost(format!("acknowledged stop of {v}, now {:?}", state_of(v)));
            } else if !fx
                .home
                .run_bounded(&["start", v], COMMAND_DEADLINE)
                .is_ok_and(|o| o.status.success())
            {
                lost(format!("{v} stopped with acknowledgement does not start"));
            } else if guest_sha(&fx.home, v, "/root/acked").as_deref()
                != Ok(fx.payload_sha.as_str())
            {
                lost(format!("{v} started without its file"));
            }
        }
        Point::Start => {
            let v = prepared.victim.as_deref().expect("victim");
            if guest_sha(&fx.home, v, "/root/acked").as_deref() != Ok(fx.payload_sha.as_str()) {
                lost(format!(
                    "{v} acknowledged started, file not readable ({:?})",
                    state_of(v)
                ));
            }
        }
    }
}

/// The `keep` snapshot, acknowledged before any fault, still restores with its file.
fn check_keep_snapshot(fx: &Fixture, tally: &mut Tally) {
    match fx
        .home
        .run_bounded(&["create", "--snapshot", "keep"], COMMAND_DEADLINE)
    {
        Ok(o) if o.status.success() => {
            let id = kiln_e2e::stdout(&o).trim().to_owned();
            if guest_sha(&fx.home, &id, "/root/acked").as_deref() != Ok(fx.acked_sha.as_str()) {
                tally
                    .lost
                    .push("the keep snapshot restored without its file".into());
            }
            let _ = fx.home.run(&["rm", &id]);
        }
        Ok(o) => tally.lost.push(format!(
            "the keep snapshot does not restore: {}",
            kiln_e2e::stderr(&o).trim()
        )),
        Err(h) => tally
            .hangs
            .push(format!("restoring keep hung: {}", h.stderr)),
    }
}

fn kill_suite(test: &str, target: Target) {
    let seeds = seeds();
    let mut tally = Tally::new("faults");
    let mut durations = None;
    for &seed in &seeds {
        let mut fx = Fixture::new(test, seed);
        let durations = durations.get_or_insert_with(|| Durations::measure(&mut fx));
        for round in 0..rounds() {
            announce(test, seed, round);
            let mut rng = round_rng(test, seed, round);
            for &point in POINTS {
                inject(&mut fx, &mut rng, durations, point, target, &mut tally);
            }
            check_keep_snapshot(&fx, &mut tally);
        }
        // A clean stop after all the faults leaves nothing behind.
        let _ = fx.home.run(&["daemon", "stop", "--all"]);
        for v in invariants::check_stopped(&fx.home) {
            tally.leaks.push(format!("at the end: {v}"));
        }
    }
    tally.finish(&seeds);
}

#[test]
#[ignore = "boots VMs: run by scripts/test and scripts/faults"]
fn daemon_kill9_at_seeded_points_leaks_nothing_and_loses_nothing() {
    kill_suite("daemon_kill9", Target::Daemon);
}

#[test]
#[ignore = "boots VMs: run by scripts/test and scripts/faults"]
fn qemu_kill9_at_seeded_points_leaks_nothing_and_loses_nothing() {
    kill_suite("qemu_kill9", Target::Qemu);
}
