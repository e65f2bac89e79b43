//! `kiln run`, `kiln create` / `kiln exec` against real VMs: output streams, exit codes,
//! stdin, environment, working directory, timeouts, limits, concurrency and large output.

use kiln_e2e::{Kiln, assert_success, sha256_hex, stderr, stdout};

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn run_python_prints_42() {
    let out = Kiln::shared().run(&["run", "--", "python3", "-c", "print(6*7)"]);
    assert_success(&out, "kiln run python");
    assert_eq!(stdout(&out), "42\n");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn run_exit_code_is_the_commands() {
    let k = Kiln::shared();
    let out = k.run(&["run", "--image", "base", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let out = k.run(&["run", "--image", "base", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{}", stderr(&out));
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn run_stdout_and_stderr_are_separate_and_ordered() {
    let script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done";
    let out = Kiln::shared().run(&["run", "--image", "base", "--", "sh", "-c", script]);
    assert_success(&out, "kiln run");
    assert_eq!(stdout(&out), "out1\nout2\nout3\nout4\nout5\n");
    let err = stderr(&out);
    let errs: Vec<&str> = err.lines().filter(|l| l.starts_with("err")).collect();
    assert_eq!(errs, ["err1", "err2", "err3", "err4", "err5"]);
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn run_stdin_reaches_the_command() {
    let out = Kiln::shared().run_with_stdin(
        &["run", "--image", "base", "--", "tr", "a-z", "A-Z"],
        b"hello\nworld\n",
    );
    assert_success(&out, "kiln run tr");
    assert_eq!(stdout(&out), "HELLO\nWORLD\n");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn run_env_and_workdir_apply() {
    let out = Kiln::shared().run(&[
        "run",
        "--image",
        "base",
        "--env",
        "GREETING=hi there",
        "--workdir",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd",
    ]);
    assert_success(&out, "kiln run env");
    assert_eq!(stdout(&out), "hi there\n/tmp\n");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn run_timeout_kills_and_exits_124() {
    let out = Kiln::shared().run(&[
        "run",
        "--image",
        "base",
        "--timeout",
        "2",
        "--",
        "sleep",
        "600",
    ]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn run_missing_command_exits_127() {
    let out = Kiln::shared().run(&["run", "--image", "base", "--", "no-such-command-kiln"]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no-such-command-kiln"),
        "{}",
        stderr(&out)
    );
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn run_output_limit_kills_a_flood() {
    let out = Kiln::shared().run(&[
        "run",
        "--image",
        "base",
        "--max-output",
        "100000",
        "--",
        "yes",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        out.stdout.len() <= 100_000,
        "got {} bytes",
        out.stdout.len()
    );
    assert!(
        out.stdout.len() >= 50_000,
        "limit cut too early: {} bytes",
        out.stdout.len()
    );
    assert!(stderr(&out).contains("exceeded"), "{}", stderr(&out));
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn run_large_output_arrives_intact() {
    // 64 MiB of random data: the guest reports its checksum on stderr, the host computes its own.
    let script =
        "head -c 67108864 /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob";
    let out = Kiln::shared().run(&[
        "run", "--image", "base", "--memory", "512", "--", "sh", "-c", script,
    ]);
    assert_success(&out, "kiln run large output");
    assert_eq!(out.stdout.len(), 64 << 20);
    // The checksum line (`<hex>  /tmp/blob`); kiln may have said something first (a warm
    // snapshot from an older kiln is replaced with a warning).
    let err = stderr(&out);
    let guest_sum = err
        .lines()
        .find(|l| l.ends_with("/tmp/blob"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no checksum line in stderr: {err}"))
        .to_owned();
    assert_eq!(sha256_hex(&out.stdout), guest_sum);
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn exec_ten_concurrent_in_one_sandbox() {
    let k = Kiln::shared();
    let id = k.create("base");
    let children: Vec<_> = (0..10)
        .map(|i| {
            let script = format!("sleep 0.$((RANDOM % 5)); echo {i}-$(expr {i} \\* {i})");
            k.cmd(&["exec", &id, "--", "bash", "-c", &script])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn exec")
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().expect("wait exec");
        assert_success(&out, "kiln exec");
        assert_eq!(stdout(&out), format!("{i}-{}\n", i * i));
    }
    assert_eq!(k.state_of(&id).as_deref(), Some("running"));
    assert_success(&k.run(&["rm", &id]), "kiln rm");
    assert_eq!(k.state_of(&id), None);
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn exec_sees_files_written_by_earlier_exec() {
    let k = Kiln::shared();
    let id = k.create("base");
    assert_success(
        &k.run(&["exec", &id, "--", "sh", "-c", "echo persisted > /root/note"]),
        "write",
    );
    let out = k.run(&["exec", &id, "--", "cat", "/root/note"]);
    assert_success(&out, "read");
    assert_eq!(stdout(&out), "persisted\n");
    assert_success(&k.run(&["rm", &id]), "kiln rm");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn image_build_unchanged_is_a_noop() {
    let out = Kiln::shared().run(&["image", "build", "base"]);
    assert_success(&out, "kiln image build base");
    assert!(stderr(&out).contains("up to date"), "{}", stderr(&out));
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn doctor_names_accelerator_and_reason() {
    let out = Kiln::shared().run(&["doctor", "--json"]);
    assert_success(&out, "kiln doctor");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor json");
    let accel = v["accel"].as_str().unwrap_or_default();
    assert!(accel == "tcg" || accel == "kvm", "accel {accel:?}");
    assert!(!v["accel_reason"].as_str().unwrap_or_default().is_empty());
    assert_eq!(v["x_ignore_shared"], true);
}
