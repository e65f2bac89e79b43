//! The invariants every fault must leave intact, checked against reality.
//!
//! [`check_serving`] runs once a daemon serves again after a fault (its janitor has run, and
//! no operation is in flight): exactly one `kilnd` of the home and it is the one that
//! answers; every QEMU naming the home runs a sandbox the store lists as `running` or
//! `paused`, and every such sandbox has exactly one QEMU and its `run/` directory; no other
//! process (an image build's helpers) works in the home and nothing is mounted below it; `run/`
//! holds nothing else; no row is left in a transitional state (`creating`, `stopping`); no
//! snapshot build directory (`snapshots/.tmp-*`) and no save (`saved/<id>`) without a row.
//! [`check_stopped`] runs after `kiln daemon stop --all`: no process or mount of the home at
//! all, no runtime directory, and the API socket accepts nothing.
//!
//! Each returns the violations found, as sentences naming the leaked thing; an empty list
//! means the invariants hold. Callers count them (the tallies' "leaks") and fail at the end.

use std::collections::BTreeMap;

use crate::home::FaultHome;
use crate::procs;

/// Checks the invariants of a home whose daemon serves and whose janitor has run.
pub fn check_serving(home: &FaultHome) -> Vec<String> {
    let mut bad = Vec::new();
    let rows = home.ps();
    let status = home.daemon_status();
    let daemons = procs::daemons_of(home.path());
    let serving = status
        .as_ref()
        .and_then(|s| s["pid"].as_i64())
        .map(|p| p as i32);
    match (daemons.as_slice(), serving) {
        ([one], Some(pid)) if one.pid == pid => {}
        _ => bad.push(format!(
            "daemons: {:?} running, {serving:?} serving",
            daemons.iter().map(|d| d.pid).collect::<Vec<_>>()
        )),
    }

    let qemus = procs::qemus_of(home.path());
    let mut per_sandbox: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for q in &qemus {
        match q.sandbox_id() {
            Some(id) if rows.iter().any(|r| r.id == id && r.is_live()) => {
                per_sandbox.entry(id).or_default().push(q.pid);
            }
            Some(id) => bad.push(format!(
                "QEMU pid {} of {id} runs but the store says {:?}",
                q.pid,
                rows.iter().find(|r| r.id == id).map(|r| r.state.as_str())
            )),
            None => bad.push(format!(
                "QEMU pid {} belongs to no sandbox: {}",
                q.pid,
                q.argv.join(" ")
            )),
        }
    }
    for h in procs::helpers_of(home.path()) {
        bad.push(format!(
            "pid {} still works in the home: {}",
            h.pid,
            h.argv.join(" ")
        ));
    }
    for m in procs::mounts_under(home.path()) {
        bad.push(format!("{m} is still mounted"));
    }
    let run_dirs = home.entries("run");
    for r in &rows {
        if r.is_live() {
            match per_sandbox.get(&r.id).map(Vec::len) {
                Some(1) => {}
                n => bad.push(format!(
                    "{} is {} with {} QEMU processes",
                    r.id,
                    r.state,
                    n.unwrap_or(0)
                )),
            }
            if !run_dirs.contains(&r.id) {
                bad.push(format!("{} is {} without run/{}", r.id, r.state, r.id));
            }
        }
        if r.state == "creating" || r.state == "stopping" {
            bad.push(format!(
                "{} left {} with no operation running",
                r.id, r.state
            ));
        }
    }
    for d in &run_dirs {
        if !rows.iter().any(|r| &r.id == d && r.is_live()) {
            bad.push(format!("run/{d} left without a live sandbox"));
        }
    }
    for s in home.entries("snapshots") {
        if s.starts_with(".tmp-") {
            bad.push(format!("snapshots/{s} left after the janitor ran"));
        }
    }
    for s in home.entries("saved") {
        if !rows.iter().any(|r| r.id == s) {
            bad.push(format!("saved/{s} left without a sandbox"));
        }
    }
    bad
}

/// Checks that nothing of the home runs after `kiln daemon stop --all`.
pub fn check_stopped(home: &FaultHome) -> Vec<String> {
    let mut bad = Vec::new();
    for d in procs::daemons_of(home.path()) {
        bad.push(format!("kilnd pid {} still runs after a stop", d.pid));
    }
    for q in procs::qemus_of(home.path()) {
        bad.push(format!(
            "QEMU pid {} still runs after daemon stop --all: {}",
            q.pid,
            q.argv.join(" ")
        ));
    }
    for h in procs::helpers_of(home.path()) {
        bad.push(format!(
            "pid {} still works in the home after a stop: {}",
            h.pid,
            h.argv.join(" ")
        ));
    }
    for m in procs::mounts_under(home.path()) {
        bad.push(format!("{m} is still mounted after a stop"));
    }
    for d in home.entries("run") {
        bad.push(format!("run/{d} left after daemon stop --all"));
    }
    if std::os::unix::net::UnixStream::connect(home.path().join("kilnd.sock")).is_ok() {
        bad.push("kilnd.sock still accepts connections after a stop".to_owned());
    }
    bad
}
