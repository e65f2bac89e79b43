//! Commands against real VMs beyond one-shot execs: detached commands that outlive their
//! client (attach with replay, list, kill), Ctrl-C delivered as SIGINT (a second one as
//! SIGKILL), commands run as a guest user (`--user`), and the guest console (`kiln logs`,
//! `-f`).

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_e2e::{Kiln, api_request, assert_success, signal, stderr, stdout};

/// Reads lines from `r` until one equals `want` (or the stream ends: a failure).
fn read_until(r: &mut impl BufRead, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).expect("read");
        assert!(n > 0, "stream ended before {want:?}; saw {seen:?}");
        let line = line.trim_end().to_owned();
        let done = line == want;
        seen.push(line);
        if done {
            return seen;
        }
    }
}

fn ls(k: &Kiln, sb: &str) -> serde_json::Value {
    let out = k.run(&["exec", "ls", sb, "--json"]);
    assert_success(&out, "exec ls");
    serde_json::from_slice(&out.stdout).expect("exec ls json")
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn detached_command_outlives_its_client_and_replays_on_attach() {
    let k = Kiln::isolated();
    let sb = k.create("base");
    let out = k.run(&[
        "exec",
        "-d",
        &sb,
        "--",
        "sh",
        "-c",
        "echo start; echo to-stderr >&2; sleep 1; echo mid; exec sleep 600",
    ]);
    assert_success(&out, "exec -d");
    let exec_id = stdout(&out).trim().to_owned();
    assert!(exec_id.starts_with("ex-"), "{exec_id}");
    // The client is gone; the command runs on.
    let v = ls(&k, &sb);
    assert_eq!(v["execs"][0]["id"], exec_id.as_str());
    assert_eq!(v["execs"][0]["state"], "running");

    // An attach replays what was kept and follows.
    let mut attach = k
        .cmd(&["exec", "attach", &exec_id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn attach");
    let mut out_lines = BufReader::new(attach.stdout.take().expect("stdout"));
    let seen = read_until(&mut out_lines, "mid");
    assert_eq!(seen, ["start", "mid"]);
    // A second client can attach at the same time.
    let out = k.run(&["exec", "kill", &exec_id, "--signal", "TERM", "--json"]);
    assert_success(&out, "exec kill");
    let status = attach.wait().expect("attach exits");
    assert_eq!(
        status.code(),
        Some(143),
        "attach exits with the command's code"
    );
    let mut err = String::new();
    attach
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    assert!(err.contains("to-stderr"), "{err}");

    // The status is kept; attaching again replays everything and ends at once.
    let v = ls(&k, &sb);
    assert_eq!(v["execs"][0]["state"], "exited");
    assert_eq!(v["execs"][0]["exit"]["signal"], 15);
    let out = k.run(&["exec", "attach", &exec_id]);
    assert_eq!(out.status.code(), Some(143));
    assert_eq!(stdout(&out), "start\nmid\n");
    // Bad input names what was wrong.
    for (args, expect) in [
        (
            vec!["exec", "attach", "ex-000000000000"],
            "no detached command",
        ),
        (vec!["exec", "attach", "nonsense"], "exec id"),
        (vec!["exec", "kill", &exec_id], "already ended"),
        (
            vec!["exec", "kill", &exec_id, "--signal", "NOPE"],
            "unknown signal",
        ),
        (vec!["exec", "ls", "no-such-sandbox"], "no sandbox"),
    ] {
        let out = k.run(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
    }
    assert_success(&k.run(&["rm", &sb]), "rm");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn ctrl_c_sends_sigint_then_sigkill() {
    let k = Kiln::isolated();
    let sb = k.create("base");
    // The command handles SIGINT itself: it decides what Ctrl-C means.
    let mut child = k
        .cmd(&[
            "exec",
            &sb,
            "--",
            "sh",
            "-c",
            "trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn exec");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
    read_until(&mut lines, "ready");
    signal(child.id() as i32, libc::SIGINT);
    read_until(&mut lines, "got-int");
    assert_eq!(child.wait().expect("wait").code(), Some(7));

    // A command that ignores SIGINT is killed by the second Ctrl-C.
    let mut child = k
        .cmd(&[
            "exec",
            &sb,
            "--",
            "sh",
            "-c",
            "trap '' INT; echo ready; while :; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn exec");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
    read_until(&mut lines, "ready");
    signal(child.id() as i32, libc::SIGINT);
    // Still running after the first: the shell ignores it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "exited on the ignored SIGINT"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(child.id() as i32, libc::SIGINT);
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_success(&k.run(&["rm", &sb]), "rm");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn logs_show_and_follow_the_guest_console() {
    let k = Kiln::isolated();
    let sb = k.create("base");
    let write = |text: &str| {
        let out = k.run(&[
            "exec",
            &sb,
            "--",
            "sh",
            "-c",
            &format!("echo {text} > /dev/console"),
        ]);
        assert_success(&out, "write to the console");
    };
    write("console-line-1");
    // The console reaches the log asynchronously (the guest's UART, QEMU, the daemon's
    // reader): the line is there within a deadline, not at the exec's end.
    kiln_e2e::wait_until("console-line-1 in kiln logs", 30, || {
        let out = k.run(&["logs", &sb]);
        assert_success(&out, "logs");
        stdout(&out).contains("console-line-1")
    });

    let mut follow = k
        .cmd(&["logs", "-f", &sb])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn logs -f");
    let mut lines = BufReader::new(follow.stdout.take().expect("stdout"));
    read_until(&mut lines, "console-line-1");
    write("console-line-2");
    read_until(&mut lines, "console-line-2");
    // Following ends when the sandbox's VM goes away.
    assert_success(&k.run(&["rm", &sb]), "rm");
    let status = follow.wait().expect("logs -f exits");
    assert!(status.success(), "{status:?}");
    let out = k.run(&["logs", &sb]);
    assert!(stderr(&out).contains("no sandbox"), "{}", stderr(&out));
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn exec_user_runs_the_command_as_that_guest_user() {
    let k = Kiln::shared();
    let sb = k.create("base");
    let exec_as =
        |user: &str, script: &str| k.run(&["exec", "--user", user, &sb, "--", "sh", "-c", script]);

    // Debian's nobody is 65534:65534 (nogroup), with HOME /nonexistent.
    let out = exec_as("nobody", r#"id -u; id -g; echo "$HOME $USER""#);
    assert_success(&out, "exec --user nobody");
    assert_eq!(stdout(&out), "65534\n65534\n/nonexistent nobody\n");

    // A numeric user and group need no passwd entry.
    let out = exec_as("1234:1234", r#"id -u; id -g; echo "$HOME""#);
    assert_success(&out, "exec --user 1234:1234");
    assert_eq!(stdout(&out), "1234\n1234\n/\n");

    // What the command creates belongs to it.
    let out = exec_as("nobody", "echo x > /tmp/made-by-nobody");
    assert_success(&out, "exec --user nobody: create a file");
    let out = k.run(&[
        "exec",
        &sb,
        "--",
        "stat",
        "-c",
        "%u:%g",
        "/tmp/made-by-nobody",
    ]);
    assert_success(&out, "stat as root");
    assert_eq!(stdout(&out), "65534:65534\n");
    // And what root keeps to itself stays closed to it.
    let out = exec_as("nobody", "cat /etc/shadow");
    assert!(!out.status.success(), "nobody read /etc/shadow");

    // An unknown name is a clear error and a failure, from the CLI and from the API.
    let out = exec_as("kiln-no-such-user", "true");
    assert!(!out.status.success(), "an unknown user succeeded");
    assert!(
        stderr(&out).contains("unknown user kiln-no-such-user: not in /etc/passwd"),
        "{}",
        stderr(&out)
    );
    let path = format!("/v1/sandboxes/{sb}/execs");
    let (status, body) = api_request(
        k.home(),
        "POST",
        &path,
        br#"{"argv":["true"],"user":"kiln-no-such-user"}"#,
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("exec_rejected") && body.contains("unknown user"),
        "{body}"
    );
    let (status, body) = api_request(
        k.home(),
        "POST",
        &path,
        br#"{"argv":["true"],"user":"a:b:c"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid user"), "{body}");

    assert_success(&k.run(&["rm", &sb]), "rm");
}
