//! Failure cases against real VMs: bad input, QEMU dying or the guest panicking mid-exec, the
//! daemon killed with SIGKILL, and Ctrl-C on `kiln run`. Each must give a clear error and
//! leave nothing behind.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_e2e::{Kiln, assert_success, free_port, process_alive, signal, stderr, stdout, wait_http};

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn bad_input_gets_a_clear_error() {
    let k = Kiln::shared();
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--image", "nosuch", "--", "true"],
            "unknown recipe \"nosuch\"",
        ),
        (&["run", "--memory", "1", "--", "true"], "--memory"),
        (&["run", "--cpus", "0", "--", "true"], "--cpus"),
        (&["run", "--", ""], "empty command"),
        (&["run", "--workdir", "relative", "--", "true"], "absolute"),
        (
            &["exec", "sb-000000000000", "--", "true"],
            "no sandbox sb-000000000000",
        ),
        (&["rm", "not-an-id"], "no sandbox not-an-id"),
        (&["image", "rm", "nosuch"], "not built"),
    ];
    for (args, expect) in cases {
        let out = k.run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr(&out).contains(expect),
            "{args:?}: expected {expect:?} in:\n{}",
            stderr(&out)
        );
        assert!(
            !stderr(&out).contains("panicked"),
            "{args:?} panicked:\n{}",
            stderr(&out)
        );
    }
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn run_workdir_missing_in_guest_is_an_error() {
    let out = Kiln::shared().run(&[
        "run",
        "--image",
        "base",
        "--workdir",
        "/no/such/dir",
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/no/such/dir"), "{}", stderr(&out));
}

/// Starts `kiln exec ID -- sh -c 'echo ready; sleep 600'` and waits for `ready`.
fn exec_waiting(k: &Kiln, id: &str) -> std::process::Child {
    let mut child = k
        .cmd(&["exec", id, "--", "sh", "-c", "echo ready; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln exec");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read ready");
    assert_eq!(line, "ready\n");
    child
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn qemu_killed_mid_exec_fails_the_exec_and_the_sandbox() {
    let k = Kiln::shared();
    let id = k.create("base");
    let qemu = k.qemu_pid(&id);
    let child = exec_waiting(&k, &id);
    let killed = Instant::now();
    signal(qemu, libc::SIGKILL);
    let out = child.wait_with_output().expect("wait exec");
    let waited = killed.elapsed();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("QEMU exited"), "{}", stderr(&out));
    // Not a timing assertion on performance: a dead VM must not leave the client hanging.
    assert!(
        waited < Duration::from_secs(10),
        "exec noticed the death after {waited:?}"
    );
    assert_eq!(k.state_of(&id).as_deref(), Some("failed"));
    assert!(
        !k.home().join("run").join(&id).exists(),
        "runtime dir left behind"
    );
    assert_success(&k.run(&["rm", &id]), "kiln rm failed sandbox");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn guest_panic_mid_exec_reports_console_tail() {
    let k = Kiln::shared();
    let id = k.create("base");
    let out = k.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo c > /proc/sysrq-trigger; sleep 600",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("QEMU exited"), "{err}");
    assert!(
        err.contains("sysrq") || err.contains("Kernel panic"),
        "console tail missing:\n{err}"
    );
    assert_eq!(k.state_of(&id).as_deref(), Some("failed"));
    assert_success(&k.run(&["rm", &id]), "kiln rm failed sandbox");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn daemon_sigkill_sandbox_keeps_running_and_is_reattached() {
    let k = Kiln::isolated();
    let port = free_port();
    let out = k.run(&[
        "create",
        "--image",
        "python",
        "--name",
        "web",
        "--secret",
        "TOKEN=kept-across-restarts",
        "--secret-env",
        "--publish",
        &format!("{port}:8000"),
    ]);
    assert_success(&out, "create");
    let id = stdout(&out).trim().to_owned();
    let out = k.run(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "cd /root && echo served-by-kiln > index.html && echo state-1 > /root/state && python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &",
    ]);
    assert_success(&out, "start the server");
    assert!(wait_http(port).contains("served-by-kiln"));
    let paused = k.create("base");
    assert_success(&k.run(&["pause", &paused]), "pause");
    // Two more whose records the janitor cannot trust once the daemon is dead: one lost its
    // VM config (as if killed half-started), one its pidfile too (as if the daemon died
    // between spawning QEMU and recording it). Their QEMUs must be killed by the janitor
    // itself: nothing else kills a QEMU whose daemon died.
    let no_config = k.create("base");
    let no_pidfile = k.create("base");
    let orphan_qemus = [k.qemu_pid(&no_config), k.qemu_pid(&no_pidfile)];
    let qemu = k.qemu_pid(&id);
    let daemon = k.daemon_pid().expect("daemon running");

    signal(daemon, libc::SIGKILL);
    // QEMU does not die with its daemon, and the published port is gone with the daemon.
    assert!(process_alive(qemu), "QEMU {qemu} died with its daemon");
    for q in orphan_qemus {
        assert!(process_alive(q), "QEMU {q} died with its daemon");
    }
    let run = k.home().join("run");
    std::fs::remove_file(run.join(&no_config).join("vm.json")).expect("remove vm.json");
    for f in ["vm.json", "qemu.pid"] {
        std::fs::remove_file(run.join(&no_pidfile).join(f)).expect("remove a record");
    }

    // The next CLI call starts a new daemon, which re-attaches before it serves.
    assert_eq!(k.state_of(&id).as_deref(), Some("running"));
    assert_eq!(k.state_of(&paused).as_deref(), Some("paused"));
    let new_daemon = k.daemon_pid().expect("new daemon");
    assert_ne!(new_daemon, daemon);
    assert_eq!(k.qemu_pid(&id), qemu, "the same QEMU serves the sandbox");
    let status = k.run(&["daemon", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(v["janitor"]["sandboxes_reattached"], 2, "{v}");
    assert_eq!(v["janitor"]["sandboxes_failed"], 2, "{v}");
    assert_eq!(v["janitor"]["processes_killed"], 2, "{v}");
    // The janitor killed both orphans' QEMUs (by pidfile, and by command line), removed their
    // runtime directories and failed their rows with the reason.
    for q in orphan_qemus {
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(q) {
            assert!(Instant::now() < deadline, "orphaned QEMU {q} still runs");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for orphan in [&no_config, &no_pidfile] {
        assert!(!run.join(orphan).exists(), "run/{orphan} left behind");
        let out = k.run(&["inspect", orphan]);
        assert_success(&out, "inspect an orphan");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
        assert_eq!(info[0]["state"], "failed", "{info}");
        assert!(
            info[0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("daemon restarted")),
            "{info}"
        );
        assert_success(&k.run(&["rm", orphan]), "rm an orphan");
    }
    // Its files, its running server (through the published port, bound again), its name
    // and its secrets (read back from the guest for --secret-env) are all still there.
    let out = k.run(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "cat /root/state; echo $TOKEN",
    ]);
    assert_success(&out, "exec after restart");
    assert_eq!(stdout(&out), "state-1\nkept-across-restarts\n");
    assert!(wait_http(port).contains("served-by-kiln"));
    // The paused one is still paused (its guest ran only for the resync) and resumes.
    let out = k.run(&["exec", &paused, "--", "true"]);
    assert!(stderr(&out).contains("is paused"), "{}", stderr(&out));
    assert_success(&k.run(&["resume", &paused]), "resume after restart");
    assert_success(
        &k.run(&["exec", &paused, "--", "true"]),
        "exec after resume",
    );

    // A graceful stop keeps them too; `--all` removes them and their QEMUs.
    assert_success(&k.run(&["daemon", "stop"]), "daemon stop");
    assert!(
        process_alive(qemu),
        "QEMU {qemu} stopped with a plain daemon stop"
    );
    assert_eq!(k.state_of(&id).as_deref(), Some("running"));
    let out = k.run(&["daemon", "stop", "--all"]);
    assert_success(&out, "daemon stop --all");
    assert!(
        stdout(&out).contains("removed 2 sandboxes"),
        "{}",
        stdout(&out)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while process_alive(qemu) {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU {qemu} survived --all"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!k.home().join("run").join(&id).exists());
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn run_interrupted_tears_the_sandbox_down() {
    let k = Kiln::isolated();
    let mut child = k
        .cmd(&[
            "run",
            "--image",
            "base",
            "--",
            "sh",
            "-c",
            // The command decides what SIGINT means; this one exits 130 at once. (A bare
            // `echo ready; sleep 600` can lose a SIGINT that lands while dash is between
            // fork and exec of `sleep`: dash catches SIGINT under `-c` and only re-raises it
            // when its child died of it. Under TCG that window is wide.)
            "trap 'exit 130' INT; echo ready; while :; do sleep 1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln run");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read ready");
    assert_eq!(line, "ready\n");
    let sandboxes = k.ps()["sandboxes"].as_array().expect("array").clone();
    assert_eq!(sandboxes.len(), 1);
    let id = sandboxes[0]["id"].as_str().expect("id").to_owned();
    let qemu = k.qemu_pid(&id);
    signal(child.id() as i32, libc::SIGINT);
    let out = child.wait_with_output().expect("wait kiln run");
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert_eq!(k.state_of(&id), None, "sandbox still listed");
    assert!(!process_alive(qemu), "QEMU {qemu} still runs");
    assert!(!k.home().join("run").join(&id).exists());
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn qemu_missing_or_too_old_is_named() {
    // Each case gets its own home, so its daemon starts with the broken KILN_QEMU.
    let dir = tempfile::tempdir().expect("temp dir");
    let old = dir.path().join("qemu-system-x86_64");
    std::fs::write(&old, "#!/bin/sh\necho 'QEMU emulator version 6.2.0'\n")
        .expect("write fake qemu");
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let cases = [
        ("/nonexistent/qemu", "KILN_QEMU=/nonexistent/qemu"),
        (old.to_str().expect("utf-8"), "too old"),
    ];
    for (qemu, expect) in cases {
        let k = Kiln::isolated();
        let out = k
            .cmd(&["run", "--image", "base", "--", "true"])
            .env("KILN_QEMU", qemu)
            .output()
            .expect("run kiln");
        assert!(!out.status.success(), "run with KILN_QEMU={qemu} succeeded");
        assert!(
            stderr(&out).contains(expect),
            "expected {expect:?}:\n{}",
            stderr(&out)
        );
        let doctor = k
            .cmd(&["doctor"])
            .env("KILN_QEMU", qemu)
            .output()
            .expect("run doctor");
        assert_eq!(
            doctor.status.code(),
            Some(1),
            "doctor must fail without a usable QEMU"
        );
        assert!(String::from_utf8_lossy(&doctor.stdout).contains(expect));
        assert_eq!(
            k.ps()["sandboxes"].as_array().map(Vec::len),
            Some(0),
            "a sandbox was left behind"
        );
    }
}

/// One raw HTTP/1.0 GET over TCP: (status, body).
fn tcp_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: kilnd\r\n{auth}\r\n").expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, resp)
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn tcp_listener_needs_the_token_and_refuses_public_addresses() {
    let k = Kiln::isolated();
    let kilnd = k.bin().with_file_name("kilnd");
    // A non-loopback address is refused unless asked for explicitly.
    let out = std::process::Command::new(&kilnd)
        .args(["--listen", "0.0.0.0:1"])
        .env("KILN_HOME", k.home())
        .output()
        .expect("run kilnd");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--listen-public"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let mut daemon = std::process::Command::new(&kilnd)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("KILN_HOME", k.home())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kilnd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "kilnd never listened on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (st, body) = tcp_get(port, "/v1/sandboxes", None);
    assert_eq!(st, 401, "{body}");
    assert!(body.contains(r#""code":"unauthorized""#), "{body}");
    let (st, _) = tcp_get(port, "/v1/sandboxes", Some("0000"));
    assert_eq!(st, 401);
    let out = k.run(&["token"]);
    assert_success(&out, "kiln token");
    let token = stdout(&out).trim().to_owned();
    let (st, body) = tcp_get(port, "/v1/sandboxes", Some(&token));
    assert_eq!(st, 200, "{body}");
    assert!(body.contains(r#""sandboxes":[]"#), "{body}");
    // A rotation takes effect at once.
    let out = k.run(&["token", "--rotate"]);
    assert_success(&out, "kiln token --rotate");
    let (st, _) = tcp_get(port, "/v1/sandboxes", Some(&token));
    assert_eq!(st, 401, "the old token still works after a rotation");
    let (st, _) = tcp_get(port, "/v1/health", Some(stdout(&out).trim()));
    assert_eq!(st, 200);
    // The unix socket needs no token.
    assert_success(&k.run(&["ps"]), "ps over the unix socket");
    let _ = k.run(&["daemon", "stop", "--all"]);
    let _ = daemon.wait();
}
