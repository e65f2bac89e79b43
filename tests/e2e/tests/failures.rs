//! Failure cases against real VMs: bad input, QEMU dying or the guest panicking mid-exec, the
//! daemon killed with SIGKILL, and Ctrl-C on `kiln run`. Each must give a clear error and
//! leave nothing behind.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_e2e::{Kiln, assert_success, process_alive, signal, stderr};

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
fn daemon_sigkill_orphans_are_reclaimed_by_next_daemon() {
    let k = Kiln::isolated();
    let id = k.create("base");
    let qemu = k.qemu_pid(&id);
    let daemon = k.daemon_pid().expect("daemon running");
    signal(daemon, libc::SIGKILL);
    // The next CLI call starts a new daemon, whose janitor runs before it serves.
    let state = k.state_of(&id);
    assert_eq!(state.as_deref(), Some("failed"));
    let new_daemon = k.daemon_pid().expect("new daemon");
    assert_ne!(new_daemon, daemon);
    assert!(!process_alive(qemu), "orphaned QEMU {qemu} still runs");
    assert!(
        !k.home().join("run").join(&id).exists(),
        "orphaned runtime dir left behind"
    );
    let status = k.run(&["daemon", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(v["janitor"]["dirs_removed"], 1, "{v}");
    assert_eq!(v["janitor"]["sandboxes_failed"], 1, "{v}");
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
            "echo ready; sleep 600",
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
