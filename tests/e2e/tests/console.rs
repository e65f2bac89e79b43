//! The guest console under a hostile guest: a flood stays within the capped log (the live file
//! and its rotated `.1`) while `kiln logs` still shows the newest output and the sandbox keeps
//! answering; a daemon restarted under a running sandbox reads its console again.
//!
//! Both use an isolated home whose daemon runs with a small cap (`KILN_CONSOLE_LOG_CAP`), so a
//! flood passes it in seconds (a flooding guest's console is back-pressured to the speed the
//! daemon drains it, about 10 KB/s under TCG).

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use kiln_e2e::{Kiln, assert_success, signal, stdout};

/// The cap of each console file in these tests.
const CAP: u64 = 64 << 10;

/// Runs `kiln args` with the small console cap (it reaches the daemon the first call starts).
fn run(k: &Kiln, args: &[&str]) -> Output {
    k.cmd(args)
        .env("KILN_CONSOLE_LOG_CAP", CAP.to_string())
        .output()
        .expect("spawn kiln")
}

fn create_cold(k: &Kiln) -> String {
    let out = run(k, &["create", "--image", "base", "--cold"]);
    assert_success(&out, "kiln create");
    stdout(&out).trim().to_owned()
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn console_flood_stays_within_its_cap_and_the_sandbox_answers() {
    let k = Kiln::isolated();
    let sb = create_cold(&k);
    // 200 kB of console output (more than both files can hold), then a last line.
    let out = run(
        &k,
        &[
            "exec",
            &sb,
            "--",
            "sh",
            "-c",
            "head -c 200000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo; echo console-flood-end > /dev/ttyS0",
        ],
    );
    assert_success(&out, "flood the console");

    let run_dir = k.home().join("run").join(&sb);
    let live = run_dir.join("console.log");
    let rotated = run_dir.join("console.log.1");
    // The end line reaches the log once the daemon drained the socket.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let logs = run(&k, &["logs", &sb]);
        assert_success(&logs, "logs");
        if stdout(&logs).contains("console-flood-end") {
            let text = stdout(&logs);
            assert!(
                text.len() as u64 <= 2 * CAP,
                "kiln logs returned {} bytes, more than the two capped files",
                text.len()
            );
            assert!(
                text.trim_end().ends_with("console-flood-end"),
                "the newest output comes last: {:?}",
                &text[text.len().saturating_sub(200)..]
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flood's last line never reached kiln logs"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(size(&rotated) > 0, "the console log rotated");
    assert!(size(&live) <= CAP, "console.log is {} bytes", size(&live));
    assert!(
        size(&rotated) <= CAP,
        "console.log.1 is {} bytes",
        size(&rotated)
    );
    assert!(!run_dir.join("console.log.2").exists());

    let out = run(&k, &["exec", &sb, "--", "echo", "still-answering"]);
    assert_success(&out, "exec after the flood");
    assert_eq!(stdout(&out), "still-answering\n");
    assert_success(&run(&k, &["rm", &sb]), "rm");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn console_is_read_again_by_a_restarted_daemon() {
    let k = Kiln::isolated();
    let sb = create_cold(&k);
    let say = |text: &str| {
        let out = run(
            &k,
            &[
                "exec",
                &sb,
                "--",
                "sh",
                "-c",
                &format!("echo {text} > /dev/ttyS0"),
            ],
        );
        assert_success(&out, "write to the console");
    };
    let logs = || stdout(&run(&k, &["logs", &sb]));
    say("before-restart");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !logs().contains("before-restart") {
        assert!(Instant::now() < deadline, "the first line never arrived");
        std::thread::sleep(Duration::from_millis(300));
    }

    let daemon = k.daemon_pid().expect("daemon running");
    signal(daemon, libc::SIGKILL);
    // The next call starts a daemon that re-attaches the sandbox; QEMU's console reconnects
    // to its listener within about a second (what the guest prints before is dropped), so
    // say it again until a line shows up.
    let deadline = Instant::now() + Duration::from_secs(90);
    for i in 0.. {
        let line = format!("after-restart-{i}");
        say(&line);
        std::thread::sleep(Duration::from_millis(500));
        let text = logs();
        if text.contains(&line) {
            assert!(text.contains("before-restart"), "earlier output kept");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted daemon never read the console again:\n{text}"
        );
    }
    assert_ne!(k.daemon_pid(), Some(daemon));
    assert_success(&run(&k, &["rm", &sb]), "rm");
}
