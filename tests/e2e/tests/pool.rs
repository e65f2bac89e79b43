//! The warm pool against real VMs (issue 11): `kiln pool set/ls`, starts that take a pooled
//! sandbox (`source: pool`) with their own secrets and labels applied at acquisition, a
//! pooled sandbox handed out once, the refill, starts the pool does not serve, the pool kept
//! across a daemon restart, and no pooled QEMU left behind by `--size 0` or a daemon stop.
//!
//! One isolated home; the pool is small (2) so that the whole file costs a handful of
//! restores under TCG.

use std::path::Path;

use kiln_e2e::{Kiln, api_request, assert_success, stdout, wait_until};
use serde_json::Value;

fn pools(k: &Kiln) -> Value {
    let out = k.run(&["pool", "ls", "--json"]);
    assert_success(&out, "kiln pool ls");
    serde_json::from_slice(&out.stdout).expect("pool ls json")
}

/// The python pool's entry (1 vCPU, 256 MiB).
fn python_pool(k: &Kiln) -> Value {
    pools(k)["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .find(|p| p["image"] == "python" && p["machine"]["memory_mib"] == 256)
        .cloned()
        .unwrap_or(Value::Null)
}

fn ready(k: &Kiln) -> u64 {
    python_pool(k)["ready"].as_u64().unwrap_or(0)
}

/// QEMU processes whose command line names this home (pooled or not).
fn qemus_of(home: &Path) -> usize {
    let needle = home.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("qemu-system") && c.contains(&needle))
        .count()
}

/// Whether process `pid` has exited (gone, or a zombie not yet reaped).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// QEMU pids of the pooled sandboxes: runtime directories no listed sandbox owns.
fn pooled_pids(k: &Kiln) -> Vec<i32> {
    let listed: Vec<String> = k.ps()["sandboxes"]
        .as_array()
        .expect("ps")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_owned())
        .collect();
    std::fs::read_dir(k.home().join("run"))
        .expect("run dir")
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("sb-") && !listed.contains(&name)
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("qemu.pid")).ok())
        .filter_map(|p| p.split_whitespace().next()?.parse().ok())
        .collect()
}

fn create(k: &Kiln, extra: &[&str]) -> Value {
    let mut args = vec!["create", "--image", "python", "--json"];
    args.extend_from_slice(extra);
    let out = k.run(&args);
    assert_success(&out, "kiln create");
    serde_json::from_slice(&out.stdout).expect("create json")
}

fn sh(k: &Kiln, id: &str, script: &str) -> String {
    let out = k.run(&["exec", id, "--", "sh", "-c", script]);
    assert_success(&out, script);
    stdout(&out)
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn pool_hands_out_ready_sandboxes_once_refills_and_leaves_nothing_behind() {
    let k = Kiln::isolated();
    // Errors name what was wrong and change nothing.
    let out = k.run(&["pool", "set", "nosuchimage", "--size", "1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nosuchimage"),
        "{out:?}"
    );
    let out = k.run(&["pool", "set", "python", "--size", "33"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("size"),
        "{out:?}"
    );
    assert!(pools(&k)["pools"].as_array().expect("pools").is_empty());

    // The warm-up runs in every pooled sandbox before it is ready.
    assert_success(
        &k.run(&[
            "pool",
            "set",
            "python",
            "--size",
            "2",
            "--warmup",
            "sh",
            "-c",
            "echo $KILN_RESTORE_ID > /tmp/warmed",
        ]),
        "kiln pool set",
    );
    wait_until("two pooled sandboxes ready", 240, || ready(&k) == 2);
    // Two pooled VMs run (a capture VM of the first fill may still be exiting: counted by
    // their runtime directories, not by every QEMU of the home).
    let pooled = pooled_pids(&k);
    assert_eq!(pooled.len(), 2, "{pooled:?}");
    assert!(
        pooled.iter().all(|p| kiln_e2e::process_alive(*p)),
        "{pooled:?}"
    );
    assert!(
        k.ps()["sandboxes"].as_array().expect("ps").is_empty(),
        "pooled sandboxes are not sandboxes yet"
    );

    // Two starts take the two pooled sandboxes: distinct ids, each with its own secret and
    // label applied at acquisition, warmed, restored (not booted) with a fresh identity.
    let a = create(&k, &["--secret", "TOKEN=alpha", "--label", "who=a"]);
    let b = create(&k, &["--secret", "TOKEN=beta"]);
    let (ida, idb) = (
        a["id"].as_str().expect("id").to_owned(),
        b["id"].as_str().expect("id").to_owned(),
    );
    assert_ne!(ida, idb, "one pooled sandbox handed out twice");
    for (v, id, secret) in [(&a, &ida, "alpha"), (&b, &idb, "beta")] {
        assert_eq!(v["source"], "pool", "{v:#}");
        assert!(
            v["snapshot"]
                .as_str()
                .is_some_and(|s| s.starts_with("warm-")),
            "{v:#}"
        );
        let got = sh(
            &k,
            id,
            "cat /run/secrets/TOKEN; echo; hostname; test -s /tmp/warmed && echo warmed",
        );
        assert_eq!(got, format!("{secret}\n{id}\nwarmed\n"), "{id}");
    }
    assert_eq!(a["spec"]["labels"]["who"], "a", "{a:#}");
    // Each restore drew its own identity (the warm-up saw it).
    let restore_ids: Vec<String> = [&ida, &idb]
        .iter()
        .map(|id| sh(&k, id, "cat /tmp/warmed"))
        .collect();
    assert_ne!(restore_ids[0], restore_ids[1]);

    // The pool refills behind them, and counts what it handed out.
    wait_until("the pool refilled", 240, || ready(&k) == 2);
    let p = python_pool(&k);
    assert_eq!(p["handed_out"], 2, "{p:#}");
    assert_eq!(p["misses"], 0, "{p:#}");
    assert_eq!(p["origin"], "api", "{p:#}");

    // Pooled VMs that died (killed here) are never handed out: the start still gets a
    // working sandbox, and the pool replaces them.
    let pooled = pooled_pids(&k);
    assert_eq!(pooled.len(), 2, "{pooled:?}");
    for &pid in &pooled {
        kiln_e2e::signal(pid, libc::SIGKILL);
    }
    // Dead as the kernel sees it (a zombie until the daemon reaps it): what the pool checks.
    wait_until("the killed QEMUs exited", 30, || {
        pooled.iter().all(|&p| exited(p))
    });
    // The start gets a live VM: restored now, or from the pool if its refill already
    // replaced the dead ones.
    let survivor = create(&k, &[]);
    let survivor_id = survivor["id"].as_str().expect("id").to_owned();
    assert_eq!(
        sh(&k, &survivor_id, "echo alive"),
        "alive\n",
        "{survivor:#}"
    );
    wait_until("the pool replaced its dead VMs", 240, || ready(&k) == 2);
    assert_success(
        &k.run(&["rm", survivor["id"].as_str().expect("id")]),
        "kiln rm",
    );

    // Starts the pool does not serve: another machine size, a cold boot.
    let handed_out = python_pool(&k)["handed_out"].clone();
    let other = create(&k, &["--memory", "384"]);
    assert_eq!(other["source"], "snapshot", "{other:#}");
    let cold = create(&k, &["--cold"]);
    assert_eq!(cold["source"], "cold", "{cold:#}");
    assert_eq!(
        python_pool(&k)["handed_out"],
        handed_out,
        "not from the pool"
    );
    let others = [
        other["id"].as_str().expect("id"),
        cold["id"].as_str().expect("id"),
    ];
    assert_success(&k.run(&["rm", &ida, &idb, others[0], others[1]]), "kiln rm");

    // A daemon stop takes the pooled VMs with it; the next daemon fills the kept pool again.
    assert_success(&k.run(&["daemon", "stop"]), "kiln daemon stop");
    wait_until("no QEMU of this home after the daemon stopped", 60, || {
        qemus_of(k.home()) == 0
    });
    wait_until("the restarted daemon refilled the kept pool", 240, || {
        ready(&k) == 2
    });
    let (status, body) = api_request(k.home(), "GET", "/v1/health", b"");
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).expect("health json");
    assert_eq!(
        health["janitor"]["processes_killed"], 0,
        "the new daemon found pooled QEMUs left behind: {health:#}"
    );

    // Size 0 empties the pool at once.
    assert_success(
        &k.run(&["pool", "set", "python", "--size", "0"]),
        "kiln pool set 0",
    );
    wait_until("no pooled QEMU after --size 0", 60, || {
        qemus_of(k.home()) == 0
    });
    assert_eq!(ready(&k), 0);
    let c = create(&k, &[]);
    assert_eq!(c["source"], "snapshot", "{c:#}");
    assert_success(&k.run(&["rm", c["id"].as_str().expect("id")]), "kiln rm");
}

/// One raw request to the daemon of `home`: the whole answer (status line, headers, body).
fn raw_request(home: &Path, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(home.join("kilnd.sock"))
        .expect("connect to kilnd.sock");
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .expect("timeout");
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: kilnd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    String::from_utf8_lossy(&resp).into_owned()
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn admission_refuses_what_does_not_fit_with_429_and_shrinks_pools_first() {
    // Room for two 256 MiB sandboxes (256 + 64 MiB each), not three.
    let k = Kiln::isolated().with_env("KILN_MEMORY_BUDGET_MIB", "700");
    let a = create(&k, &[]);
    let b = create(&k, &[]);
    let ids = [
        a["id"].as_str().expect("id").to_owned(),
        b["id"].as_str().expect("id").to_owned(),
    ];
    let out = k.run(&["create", "--image", "python"]);
    assert!(!out.status.success(), "a third sandbox started over budget");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("no room") && err.contains("640 of 700 MiB"),
        "the refusal names the budget: {err}"
    );
    let resp = raw_request(
        k.home(),
        "POST",
        "/v1/sandboxes",
        r#"{"source":{"kind":"image","image":"python"}}"#,
    );
    let head = resp
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 429") || head.starts_with("http/1.0 429"),
        "{resp}"
    );
    assert!(head.contains("retry-after: 2"), "{resp}");
    assert!(resp.contains("\"code\":\"over_capacity\""), "{resp}");
    assert_eq!(
        k.ps()["sandboxes"].as_array().expect("ps").len(),
        2,
        "the refusals left nothing behind"
    );
    // Room again once one ends.
    assert_success(&k.run(&["rm", &ids[0]]), "kiln rm");
    let c = create(&k, &[]);
    let c_id = c["id"].as_str().expect("id").to_owned();

    // A pool fills only the room there is, and gives it up for a start that needs it.
    assert_success(&k.run(&["rm", &ids[1], &c_id]), "kiln rm");
    assert_success(
        &k.run(&["pool", "set", "python", "--size", "2"]),
        "kiln pool set",
    );
    wait_until("the pool filled the budget", 240, || ready(&k) == 2);
    let big = create(&k, &["--memory", "300"]);
    assert_eq!(big["source"], "snapshot", "{big:#}");
    assert!(
        ready(&k) <= 1,
        "a pooled sandbox gave its room to the start: {:#}",
        python_pool(&k)
    );
    assert_success(
        &k.run(&["pool", "set", "python", "--size", "0"]),
        "kiln pool set 0",
    );
    assert_success(&k.run(&["rm", big["id"].as_str().expect("id")]), "kiln rm");
}
