//! Sandbox lifecycle against real VMs: names, labels and id prefixes wherever an id is taken,
//! filters, `inspect`, `rm --all --filter`, pause/resume, TTL and idle expiry, and the event
//! stream that reports every transition.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_e2e::{Kiln, assert_success, stderr, stdout};

/// `kiln create --image base --json ARGS` → the sandbox as JSON.
fn create(k: &Kiln, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["create", "--image", "base", "--json"];
    args.extend_from_slice(extra);
    let out = k.run(&args);
    assert_success(&out, "kiln create");
    serde_json::from_slice(&out.stdout).expect("create json")
}

/// Polls `cond` until it holds or `limit` passes (a guard against hangs, not a timing claim).
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ids_of(v: &serde_json::Value) -> Vec<String> {
    v["sandboxes"]
        .as_array()
        .expect("sandboxes")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_owned())
        .collect()
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn names_labels_prefixes_filters_and_bulk_rm() {
    let k = Kiln::isolated();
    let tag = format!("t{}", std::process::id());
    let name = format!("web-{tag}");
    let a = create(
        &k,
        &[
            "--name",
            &name,
            "--label",
            &format!("run={tag}"),
            "--label",
            "tier=web",
        ],
    );
    let b = create(
        &k,
        &["--label", &format!("run={tag}"), "--label", "tier=db"],
    );
    let (ida, idb) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    assert_eq!(a["spec"]["name"], name.as_str());
    assert_eq!(a["spec"]["labels"]["tier"], "web");

    // The name, the id and an id prefix all reach the same sandbox.
    for key in [name.as_str(), ida, &ida[..9], &ida[3..10]] {
        let out = k.run(&["exec", key, "--", "hostname"]);
        assert_success(&out, key);
        assert_eq!(stdout(&out).trim(), ida, "{key}");
    }
    // A taken name is refused, naming it; nothing is left of the refused start.
    let out = k.run(&["create", "--image", "base", "--name", &name]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists already"), "{}", stderr(&out));
    // Bad names and labels are refused before anything starts.
    for (args, expect) in [
        (vec!["create", "--name", "sb-123"], "sandbox name"),
        (vec!["create", "--name", "a/b"], "sandbox name"),
        (vec!["create", "--label", "Tier=x"], "label key"),
        (vec!["create", "--label", "novalue"], "KEY=VALUE"),
        (vec!["create", "--ttl", "5 minutes"], "--ttl"),
        (vec!["ps", "--filter", "colour=red"], "unknown filter"),
        (
            vec!["exec", "no-such-name", "--", "true"],
            "no sandbox no-such-name",
        ),
    ] {
        let out = k.run(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(
        ids_of(&k.ps()).len(),
        2,
        "a refused create left a sandbox behind"
    );

    // Filters: labels (with and without value), status, name; all must hold.
    let ps = |filters: &[&str]| {
        let mut args = vec!["ps", "--json"];
        for f in filters {
            args.extend_from_slice(&["--filter", f]);
        }
        let out = k.run(&args);
        assert_success(&out, "ps --filter");
        let mut ids = ids_of(&serde_json::from_slice(&out.stdout).expect("ps json"));
        ids.sort();
        ids
    };
    let mut both = vec![ida.to_owned(), idb.to_owned()];
    both.sort();
    assert_eq!(ps(&[&format!("label=run={tag}")]), both);
    assert_eq!(ps(&["label=tier=db"]), vec![idb.to_owned()]);
    assert_eq!(ps(&["label=tier", "status=running"]), both);
    assert_eq!(ps(&[&format!("name={name}")]), vec![ida.to_owned()]);
    assert!(ps(&["status=paused"]).is_empty());

    // inspect: spec and status, by name.
    let out = k.run(&["inspect", &name]);
    assert_success(&out, "inspect");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    assert_eq!(v[0]["id"], ida);
    assert_eq!(v[0]["state"], "running");
    assert_eq!(v[0]["spec"]["labels"]["run"], tag.as_str());

    // rm --all --filter removes exactly the matching ones.
    let out = k.run(&["rm", "--all", "--filter", "label=tier=db", "--json"]);
    assert_success(&out, "rm --all --filter");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("rm json");
    assert_eq!(v["removed"], serde_json::json!([idb]));
    assert_eq!(ids_of(&k.ps()), vec![ida.to_owned()]);
    let out = k.run(&["rm", "--filter", "label=tier=web"]);
    assert!(stderr(&out).contains("add --all"), "{}", stderr(&out));
    let out = k.run(&["rm", &name]);
    assert_success(&out, "rm by name");
    assert!(ids_of(&k.ps()).is_empty());
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn pause_resume_and_events_report_every_transition() {
    let k = Kiln::isolated();
    // The event stream, followed from before the sandbox exists.
    let mut events = k
        .cmd(&["events", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln events");
    // `kiln events` starts the daemon if needed and says when it is subscribed: from then
    // on no event is missed.
    let mut err = BufReader::new(events.stderr.take().expect("piped"));
    let mut said = String::new();
    err.read_line(&mut said).expect("read kiln events' stderr");
    assert_eq!(said.trim(), "kiln: following events");
    let lines = BufReader::new(events.stdout.take().expect("piped"));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });

    let v = create(&k, &[]);
    let id = v["id"].as_str().unwrap().to_owned();
    let out = k.run(&["pause", &id, "--json"]);
    assert_success(&out, "pause");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("pause json");
    assert_eq!(v["state"], "paused");
    assert_eq!(k.state_of(&id).as_deref(), Some("paused"));
    // A paused guest runs nothing: the QEMU process is stopped in place, and commands are
    // refused at once with the state, instead of hanging.
    let out = k.run(&["exec", &id, "--", "true"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is paused, not running"),
        "{}",
        stderr(&out)
    );
    let out = k.run(&["pause", &id]);
    assert!(
        stderr(&out).contains("is paused, not running"),
        "{}",
        stderr(&out)
    );
    let out = k.run(&["resume", &id]);
    assert_success(&out, "resume");
    let out = k.run(&["resume", &id]);
    assert!(
        stderr(&out).contains("is running, not paused"),
        "{}",
        stderr(&out)
    );
    let out = k.run(&["exec", &id, "--", "echo", "back"]);
    assert_success(&out, "exec after resume");
    assert_eq!(stdout(&out), "back\n");
    assert_success(&k.run(&["rm", &id]), "rm");

    // The stream saw, for this sandbox and in order: creating, running, paused, running,
    // exec started, exec ended, removed.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.iter().any(|s: &String| s == "removed") {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("events until removal");
        let ev: serde_json::Value = serde_json::from_str(&line).expect("event json");
        if ev["sandbox"] != id.as_str() {
            continue;
        }
        seen.push(match ev["type"].as_str().unwrap() {
            "state" => ev["state"].as_str().unwrap().to_owned(),
            other => other.to_owned(),
        });
    }
    let _ = events.kill();
    let _ = events.wait();
    assert_eq!(
        seen,
        [
            "creating",
            "running",
            "paused",
            "running",
            "exec_started",
            "exec_ended",
            "removed"
        ],
        "events for {id}"
    );
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn ttl_and_idle_timeout_remove_the_sandbox() {
    let k = Kiln::isolated();
    // A command running longer than the idle timeout keeps the sandbox alive.
    let idle = create(&k, &["--idle-timeout", "4s"]);
    let idle = idle["id"].as_str().unwrap().to_owned();
    let out = k.run(&["exec", &idle, "--", "sleep", "6"]);
    assert_success(&out, "exec longer than the idle timeout");
    let ttl = create(&k, &["--ttl", "4s"]);
    let keep = create(&k, &["--ttl", "10s"]);
    let (ttl, keep) = (
        ttl["id"].as_str().unwrap().to_owned(),
        keep["id"].as_str().unwrap().to_owned(),
    );
    // `kiln ttl` moves the deadline: this one now lives an hour.
    let out = k.run(&["ttl", &keep, "1h", "--json"]);
    assert_success(&out, "kiln ttl");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ttl json");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = v["expires_unix"].as_u64().expect("expires_unix");
    assert!(
        exp >= now + 3500 && exp <= now + 3700,
        "expires {exp}, now {now}"
    );
    wait_until(Duration::from_secs(60), "TTL and idle expiry", || {
        let ids = ids_of(&k.ps());
        !ids.contains(&ttl) && !ids.contains(&idle)
    });
    assert_eq!(k.state_of(&keep).as_deref(), Some("running"));
    // Their runtime directories are gone with them.
    assert!(!k.home().join("run").join(&ttl).exists());
    assert!(!k.home().join("run").join(&idle).exists());
    assert_success(&k.run(&["rm", &keep]), "rm");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn stop_and_start_keep_disk_memory_and_processes() {
    let k = Kiln::isolated();
    let v = create(&k, &["--name", "keeper", "--secret", "S=first"]);
    let id = v["id"].as_str().unwrap().to_owned();
    // State on disk, state in RAM only (/run is tmpfs) and a live process holding a value.
    let out = k.run(&[
        "exec",
        "keeper",
        "--",
        "sh",
        "-c",
        "echo on-disk > /root/f; echo in-ram > /run/marker; \
         (n=$(od -An -tu4 -N4 /dev/urandom | tr -d ' '); while :; do echo $n > /run/value.tmp && mv /run/value.tmp /run/value; sleep 1; done) >/dev/null 2>&1 & \
         echo $! > /run/loop.pid; \
         until [ -s /run/value ]; do sleep 0.05; done",
    ]);
    assert_success(&out, "prepare state");
    let probe = "cat /root/f /run/marker; pid=$(cat /run/loop.pid); kill -0 $pid && echo alive $pid; cat /run/value";
    let before = stdout(&k.run(&["exec", "keeper", "--", "sh", "-c", probe]));
    assert!(before.contains("alive"), "{before}");

    let out = k.run(&["stop", "keeper", "--json"]);
    assert_success(&out, "stop");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stop json");
    assert_eq!(v["state"], "stopped");
    assert!(
        !k.home().join("run").join(&id).exists(),
        "QEMU's runtime dir kept"
    );
    let out = k.run(&["exec", "keeper", "--", "true"]);
    assert!(
        stderr(&out).contains("is stopped, not running"),
        "{}",
        stderr(&out)
    );
    let out = k.run(&["stop", "keeper"]);
    assert!(stderr(&out).contains("is stopped"), "{}", stderr(&out));
    // A new daemon (as after an upgrade or a host reboot) starts it just the same.
    assert_success(&k.run(&["daemon", "stop"]), "daemon stop");
    assert_eq!(k.state_of(&id).as_deref(), Some("stopped"));

    let out = k.run(&["start", "keeper", "--secret", "S=second", "--json"]);
    assert_success(&out, "start");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("start json");
    assert_eq!(v["state"], "running");
    assert_eq!(v["id"], id.as_str(), "same sandbox");
    let after = stdout(&k.run(&["exec", "keeper", "--", "sh", "-c", probe]));
    assert_eq!(
        after, before,
        "disk, RAM and the running process came back as they were"
    );
    let out = k.run(&["exec", "keeper", "--", "cat", "/run/secrets/S"]);
    assert_eq!(stdout(&out), "second");
    let out = k.run(&["start", "keeper"]);
    assert!(
        stderr(&out).contains("is running, not stopped"),
        "{}",
        stderr(&out)
    );
    // A second stop/start cycle works on the restored sandbox too, and rm removes the save.
    assert_success(&k.run(&["stop", "keeper"]), "second stop");
    assert_success(&k.run(&["start", "keeper"]), "second start");
    let again = stdout(&k.run(&["exec", "keeper", "--", "sh", "-c", probe]));
    assert_eq!(again, before);
    let saves: Vec<_> = std::fs::read_dir(k.home().join("saved").join(&id))
        .expect("save dir")
        .collect();
    assert_eq!(saves.len(), 1, "older saves are pruned");
    assert_success(&k.run(&["rm", "keeper"]), "rm");
    assert!(
        !k.home().join("saved").join(&id).exists(),
        "save left after rm"
    );
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn lifecycle_routes_answer_bad_input_with_documented_4xx() {
    let k = Kiln::isolated();
    let v = create(&k, &["--name", "target"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let long = "n".repeat(65);
    let cases: Vec<(&str, String, &[u8], u16, &str)> = vec![
        (
            "POST",
            format!("/v1/sandboxes/{id}/ttl"),
            br#"{"ttl_secs":"soon"}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/ttl"),
            br#"{"ttl_secs":0}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/start"),
            b"",
            409,
            "sandbox_not_stopped",
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/resume"),
            b"",
            409,
            "sandbox_not_paused",
        ),
        (
            "POST",
            "/v1/sandboxes/sb-000000000000/pause".to_owned(),
            b"",
            404,
            "sandbox_not_found",
        ),
        (
            "POST",
            "/v1/sandboxes/no-such-name/stop".to_owned(),
            b"",
            404,
            "sandbox_not_found",
        ),
        (
            "GET",
            "/v1/sandboxes?status=sleeping".to_owned(),
            b"",
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/sandboxes?colour=red".to_owned(),
            b"",
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/execs/nonsense".to_owned(),
            b"",
            400,
            "bad_request",
        ),
        (
            "GET",
            "/v1/execs/ex-000000000000".to_owned(),
            b"",
            404,
            "exec_not_found",
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/execs"),
            br#"{"argv":["true"],"stdin":true}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/sandboxes".to_owned(),
            format!(r#"{{"name":"{long}"}}"#).leak().as_bytes(),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/sandboxes".to_owned(),
            br#"{"name":"target"}"#,
            409,
            "name_taken",
        ),
        (
            "POST",
            "/v1/sandboxes".to_owned(),
            br#"{"labels":{"Bad Key":"x"}}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/sandboxes".to_owned(),
            br#"{"source":{"kind":"image","image":"base","machine":{"cpus":"two"}}}"#,
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/sandboxes".to_owned(),
            br#"{"lifetime":{"ttl_secs":99999999999}}"#,
            400,
            "bad_request",
        ),
    ];
    for (method, path, body, want, code) in cases {
        let (st, resp) = kiln_e2e::api_request(k.home(), method, &path, body);
        assert_eq!(st, want, "{method} {path}: {resp}");
        assert!(
            resp.contains(&format!("\"code\":\"{code}\"")),
            "{method} {path}: {resp}"
        );
    }
    // Nothing was started by the refused creates.
    assert_eq!(ids_of(&k.ps()), vec![id.clone()]);
    // `sb-` alone is no prefix of anything.
    let (st, _) = kiln_e2e::api_request(k.home(), "GET", "/v1/sandboxes/sb-", b"");
    assert_eq!(st, 404);
    assert_success(&k.run(&["rm", "target"]), "rm");
}
