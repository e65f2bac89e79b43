//! Jobs against real VMs, with python and bash programs (the cheapest images): cloude's
//! routes, the event stream, cancelling, a job's files, args and env, the 4xx answers to bad
//! input, fifty jobs at once through a bounded queue, and a daemon restart under a running
//! job and two queued ones.
//!
//! Most tests share the suite's daemon; the queue bound and the restart need daemons of their
//! own (isolated homes with `KILN_JOB_QUEUE` and `KILN_JOB_CONCURRENCY` set).

use kiln_e2e::{
    Kiln, api_call, api_request, assert_success, job_get, job_sandboxes, job_submit, job_wait,
    stderr, stdout, wait_bounded, wait_until,
};
use serde_json::{Value, json};

/// A job that runs until it is stopped (its timeout far away).
fn sleeper() -> Value {
    json!({"language": "bash", "code": "sleep 600\n", "timeout": 900})
}

/// Starts the home's daemon if it is not running (any `kiln` command does), for tests that
/// talk to its socket directly.
fn start_daemon(k: &Kiln) {
    assert_success(&k.run(&["job", "ls"]), "kiln job ls");
}

/// Waits until job `id` runs in a sandbox (a job is `running` from when it leaves the queue,
/// and names its sandbox once it has one); that sandbox's id.
fn wait_for_sandbox(k: &Kiln, id: &str) -> String {
    let mut sandbox = None;
    wait_until(&format!("job {id} runs in a sandbox"), 300, || {
        let job = job_get(k.home(), id);
        assert!(
            matches!(job["status"].as_str(), Some("queued" | "running")),
            "{job:#}"
        );
        sandbox = job["sandbox"].as_str().map(str::to_owned);
        sandbox.is_some()
    });
    sandbox.expect("named")
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// cloude's `POST /run` queues a job under a cloude alias; `GET /status/{id}` answers in
/// cloude's shape, `done` with the program's exit code and output once it ran.
#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn cloude_run_and_status() {
    let k = Kiln::shared();
    start_daemon(&k);
    let (status, body) = api_request(
        k.home(),
        "POST",
        "/run",
        br#"{"language":"py","code":"print(6*7)"}"#,
    );
    assert_eq!(status, 202, "{body}");
    let id = parse(&body)["id"].as_str().expect("id").to_owned();

    let (status, body) = api_request(k.home(), "GET", &format!("/status/{id}"), b"");
    assert_eq!(status, 200, "{body}");
    let early = parse(&body);
    assert!(
        matches!(
            early["status"].as_str(),
            Some("pending" | "running" | "done")
        ),
        "{early:#}"
    );
    assert_eq!(early["id"], id.as_str());

    let job = job_wait(k.home(), &id, 300);
    assert_eq!(job["language"], "python", "{job:#}");
    let (status, body) = api_request(k.home(), "GET", &format!("/status/{id}"), b"");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        parse(&body),
        json!({"id": id, "status": "done", "exit_code": 0, "stdout": "42\n", "stderr": ""})
    );
}

/// `GET /v1/jobs/{id}/events`: every entry a JSON event; the output events add up to the
/// job's output per stream, and the stream ends with `end` and the job's record.
#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn events_stream_output_then_end() {
    let k = Kiln::shared();
    start_daemon(&k);
    let code = "import time\nprint('a', flush=True)\ntime.sleep(1)\nprint('b', flush=True)\n";
    let id = job_submit(
        k.home(),
        &json!({"language": "python", "code": code, "timeout": 120}),
    );
    // Read to its end: the daemon closes the stream after `end`.
    let r = api_call(k.home(), "GET", &format!("/v1/jobs/{id}/events"), b"", 300);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("text/event-stream"),
        "{}",
        r.head
    );
    let mut events = Vec::new();
    for entry in r.body.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data = entry
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("an entry that is not one data line: {entry:?}"));
        assert!(!data.contains('\n'), "{entry:?}");
        events.push(parse(data));
    }
    let last = events.last().expect("at least one event");
    assert_eq!(last["kind"], "end", "{events:#?}");
    let job = &last["job"];
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["stdout"], "a\nb\n", "{job:#}");
    for stream in ["stdout", "stderr"] {
        let said: String = events
            .iter()
            .filter(|e| e["kind"] == "output" && e["stream"] == stream)
            .map(|e| e["data"].as_str().expect("data"))
            .collect();
        assert_eq!(said, job[stream].as_str().expect("stream"), "{events:#?}");
    }
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| e["kind"] != "end"),
        "{events:#?}"
    );
    assert_eq!(job_get(k.home(), &id), *job);
}

/// `DELETE /v1/jobs/{id}` stops a running job: `cancelled`, and its sandbox is gone.
#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn cancel_a_running_job_removes_its_sandbox() {
    let k = Kiln::shared();
    start_daemon(&k);
    let id = job_submit(k.home(), &sleeper());
    let sandbox = wait_for_sandbox(&k, &id);
    assert!(
        job_sandboxes(&k).contains(&(sandbox.clone(), id.clone())),
        "{:#}",
        k.ps()
    );

    let (status, body) = api_request(k.home(), "DELETE", &format!("/v1/jobs/{id}"), b"");
    assert_eq!(status, 200, "{body}");
    let job = parse(&body);
    assert_eq!(job["status"], "cancelled", "{job:#}");
    assert_eq!(job_get(k.home(), &id)["status"], "cancelled");
    // The record is published first, then the sandbox removed.
    wait_until("the cancelled job's sandbox is removed", 120, || {
        k.state_of(&sandbox).is_none()
    });
    assert!(
        job_sandboxes(&k).iter().all(|(_, j)| *j != id),
        "{:#}",
        k.ps()
    );
}

/// A job's files are in its working directory, its args follow the program, its env is set.
#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn files_args_and_env_reach_the_program() {
    let k = Kiln::shared();
    start_daemon(&k);
    let code = "import os, sys\n\
                print(int(open('data/in.txt').read()) + 1, sys.argv[1:], os.environ['K'])\n";
    let id = job_submit(
        k.home(),
        &json!({
            "language": "python",
            "code": code,
            "files": {"data/in.txt": "41"},
            "args": ["x", "-y z"],
            "env": {"K": "v"},
        }),
    );
    let job = job_wait(k.home(), &id, 300);
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["stdout"], "42 ['x', '-y z'] v\n", "{job:#}");
}

/// Bad input is refused with a 4xx naming what is wrong, before anything runs.
#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn bad_input_is_refused() {
    let k = Kiln::shared();
    start_daemon(&k);
    let post = |body: Value| {
        let (status, text) = api_request(k.home(), "POST", "/v1/jobs", body.to_string().as_bytes());
        (status, parse(&text))
    };

    let (status, e) = post(json!({"language": "cobol", "code": "x"}));
    assert_eq!(status, 400, "{e:#}");
    assert_eq!(e["code"], "bad_request", "{e:#}");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(message.contains("cobol"), "{e:#}");
    for known in [
        "python", "node", "ruby", "go", "rust", "c", "cpp", "bash", "py",
    ] {
        assert!(message.contains(known), "{known} missing: {e:#}");
    }

    let (status, e) = post(json!({"language": "python", "code": "x", "files": {"../x": "y"}}));
    assert_eq!(status, 400, "{e:#}");
    assert!(
        e["message"].as_str().unwrap_or_default().contains("../x"),
        "{e:#}"
    );

    let (status, e) = post(json!({"language": "python", "code": "x", "timeout": 0}));
    assert_eq!(status, 400, "{e:#}");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("timeout"),
        "{e:#}"
    );

    let (status, body) = api_request(k.home(), "GET", "/v1/jobs/job-000000000000", b"");
    assert_eq!(status, 404, "{body}");
    assert_eq!(parse(&body)["code"], "job_not_found", "{body}");
    let (status, body) = api_request(k.home(), "GET", "/status/job-000000000000", b"");
    assert_eq!(status, 404, "{body}");
    let (status, body) = api_request(k.home(), "DELETE", "/v1/jobs/job-000000000000", b"");
    assert_eq!(status, 404, "{body}");

    for path in ["/v1/jobs/nope", "/v1/jobs/JOB-000000000000", "/status/nope"] {
        let (status, body) = api_request(k.home(), "GET", path, b"");
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(parse(&body)["code"], "bad_request", "{path}: {body}");
    }
}

/// Fifty jobs submitted at once on a daemon whose queue holds 40: the ones past the bound
/// are refused with 429 `queue_full` and `Retry-After`, and accepted when tried again after
/// it; the daemon keeps answering while they run, and every job succeeds with its own output.
#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn fifty_jobs_through_a_bounded_queue() {
    let k = Kiln::isolated_with_images(&["python"]).with_env("KILN_JOB_QUEUE", "40");
    start_daemon(&k);
    let request = |i: usize| json!({"language": "python", "code": format!("print({i})")});

    let mut ids: Vec<Option<String>> = vec![None; 50];
    let mut refused = 0;
    let mut retry_after = None;
    let post = |i: usize| {
        api_call(
            k.home(),
            "POST",
            "/v1/jobs",
            request(i).to_string().as_bytes(),
            60,
        )
    };
    for (i, slot) in ids.iter_mut().enumerate() {
        let r = post(i);
        match r.status {
            202 => *slot = Some(parse(&r.body)["id"].as_str().expect("id").to_owned()),
            429 => {
                refused += 1;
                assert_eq!(parse(&r.body)["code"], "queue_full", "{}", r.body);
                let secs: u64 = r
                    .header("retry-after")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("429 without Retry-After: {}", r.head));
                retry_after = Some(secs);
            }
            other => panic!("POST /v1/jobs #{i}: {other} {}", r.body),
        }
    }
    // 50 jobs, at most 40 queued and 4 running (2×CPUs): at least 6 must have been refused,
    // unless that many jobs ended while the 50 requests were sent.
    assert!(refused > 0, "no job refused of 50 with a queue of 40");

    // The daemon answers while its queue is full.
    let (status, body) = api_request(k.home(), "GET", "/v1/health", b"");
    assert_eq!(status, 200, "{body}");

    // The refused ones are retried as Retry-After says, until accepted.
    let wait = std::time::Duration::from_secs(retry_after.expect("a Retry-After"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while ids.iter().any(Option::is_none) {
        assert!(
            std::time::Instant::now() < deadline,
            "refused jobs not accepted within 300 s"
        );
        std::thread::sleep(wait);
        for (i, slot) in ids.iter_mut().enumerate().filter(|(_, s)| s.is_none()) {
            let r = post(i);
            match r.status {
                202 => *slot = Some(parse(&r.body)["id"].as_str().expect("id").to_owned()),
                429 => assert!(r.header("retry-after").is_some(), "{}", r.head),
                other => panic!("POST /v1/jobs #{i} again: {other} {}", r.body),
            }
        }
    }

    for (i, id) in ids.iter().enumerate() {
        let id = id.as_deref().expect("accepted");
        let job = job_wait(k.home(), id, 600);
        assert_eq!(job["status"], "succeeded", "job #{i}: {job:#}");
        assert_eq!(job["stdout"], format!("{i}\n"), "job #{i}: {job:#}");
    }
    // Each job's record is published first, then its sandbox removed.
    wait_until("every job's sandbox is removed", 120, || {
        job_sandboxes(&k).is_empty()
    });
}

/// A daemon stopped under a running job and two queued ones: after it starts again the
/// running job is `interrupted` and its sandbox gone, and the queued ones run and succeed.
#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn restart_interrupts_the_running_job_and_runs_the_queued_ones() {
    let k = Kiln::isolated().with_env("KILN_JOB_CONCURRENCY", "1");
    start_daemon(&k);
    let first = job_submit(k.home(), &sleeper());
    let echoes: Vec<String> = ["one", "two"]
        .iter()
        .map(|w| {
            job_submit(
                k.home(),
                &json!({"language": "bash", "code": format!("echo {w}\n")}),
            )
        })
        .collect();
    let sandbox = wait_for_sandbox(&k, &first);
    for id in &echoes {
        assert_eq!(job_get(k.home(), id)["status"], "queued", "{id}");
    }

    let stop = k
        .cmd(&["daemon", "stop"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kiln daemon stop");
    let out = wait_bounded(stop, "kiln daemon stop", 120);
    assert!(
        out.status.success(),
        "daemon stop: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(k.daemon_pid(), None, "the daemon still runs");

    // Any command starts the daemon again.
    assert_success(&k.run(&["job", "ls"]), "restart the daemon");
    let job = job_wait(k.home(), &first, 120);
    assert_eq!(job["status"], "interrupted", "{job:#}");
    for (id, word) in echoes.iter().zip(["one", "two"]) {
        let job = job_wait(k.home(), id, 300);
        assert_eq!(job["status"], "succeeded", "{job:#}");
        assert_eq!(job["stdout"], format!("{word}\n"), "{job:#}");
    }
    wait_until("no job's sandbox is left", 120, || {
        job_sandboxes(&k).is_empty()
    });
    assert_eq!(k.state_of(&sandbox), None, "{:#}", k.ps());
}
