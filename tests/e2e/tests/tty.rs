//! Terminals against a real VM: `kiln exec -it` driven through a real pty on the host
//! (util-linux `script`), the way a user's terminal drives it. The guest sees a `/dev/pts`
//! terminal of the host terminal's size, follows a resize of the host terminal, and gets
//! Ctrl-C (the byte 0x03 typed into the host terminal, forwarded in raw mode) as SIGINT;
//! the command's exit code comes back as kiln's; `kiln shell` is a bash login shell.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_e2e::Kiln;

/// Upper bound on any one wait: boots and commands under TCG take seconds, not minutes.
const WAIT: Duration = Duration::from_secs(120);

/// `s` quoted for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Everything the host terminal showed so far, fed by a reader thread.
struct Screen {
    rx: mpsc::Receiver<Vec<u8>>,
    seen: String,
}

impl Screen {
    /// Waits until the screen shows `marker`; returns the line it is on (without `\r`).
    fn wait_for(&mut self, marker: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.seen.lines().find(|l| l.contains(marker)) {
                return line.trim_end_matches('\r').to_owned();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                Err(e) => panic!(
                    "no {marker:?} on the terminal ({e}); it showed:\n{}",
                    self.seen
                ),
            }
        }
    }
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn exec_it_gets_a_pty_that_resizes_and_takes_ctrl_c() {
    let k = Kiln::isolated();
    let sb = k.create("base");
    // In the guest: report the terminal and its size, wait (bounded) for the size to change,
    // report it again, then run a foreground child that Ctrl-C interrupts; the shell's trap
    // decides the exit code. "READY" comes from that child, so the Ctrl-C cannot arrive
    // before it runs.
    let guest = concat!(
        r#"echo "GUEST_TTY=$(tty)"; echo "SIZE1=$(stty size)"; "#,
        r#"i=0; while [ "$(stty size)" = "30 90" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; "#,
        r#"echo "SIZE2=$(stty size)"; "#,
        r#"trap "echo GOT-INT; exit 5" INT; sh -c "echo READY; exec sleep 100"; echo NOT-REACHED"#,
    );
    // On the host: a 30x90 terminal (script's pty), its name, then kiln on it.
    let host = format!(
        r#"stty rows 30 cols 90; echo "HOST_TTY=$(tty)"; exec {} exec -it {} -- sh -c {}"#,
        sh_quote(&k.bin().to_string_lossy()),
        sh_quote(&sb),
        sh_quote(guest),
    );
    let (mut script, mut keyboard, mut screen) = on_host_pty(&k, &host);

    let host_tty = screen.wait_for("HOST_TTY=");
    let host_tty = host_tty
        .split_once("HOST_TTY=")
        .map(|(_, t)| t.trim().to_owned())
        .expect("host tty name");
    let guest_tty = screen.wait_for("GUEST_TTY=");
    assert!(guest_tty.contains("GUEST_TTY=/dev/pts/"), "{guest_tty:?}");
    assert!(screen.wait_for("SIZE1=").ends_with("SIZE1=30 90"));

    // Resize the host terminal: the kernel sends kiln SIGWINCH, kiln sends `resize`.
    let stty = Command::new("stty")
        .args(["-F", &host_tty, "rows", "40", "cols", "100"])
        .status()
        .expect("run stty");
    assert!(stty.success(), "stty -F {host_tty} failed");
    assert!(screen.wait_for("SIZE2=").ends_with("SIZE2=40 100"));

    // Ctrl-C as a terminal sends it: kiln is in raw mode, so the byte goes to the guest.
    screen.wait_for("READY");
    keyboard.write_all(b"\x03").expect("type Ctrl-C");
    keyboard.flush().expect("flush");
    screen.wait_for("GOT-INT");
    let status = wait_exit(&mut script, &screen);
    drop(keyboard);
    assert!(!screen.seen.contains("NOT-REACHED"), "{}", screen.seen);
    // script -e returns its child's code: kiln's, which is the command's.
    assert_eq!(status.code(), Some(5), "{}", screen.seen);
}

/// Runs `host` (a shell command line) on a fresh host pty under `script`; returns the
/// process, its keyboard and its screen.
fn on_host_pty(k: &Kiln, host: &str) -> (std::process::Child, std::process::ChildStdin, Screen) {
    let mut script = Command::new("script")
        .args(["-q", "-e", "-c", host, "/dev/null"])
        .env("KILN_HOME", k.home())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn script (util-linux)");
    let keyboard = script.stdin.take().expect("piped stdin");
    let mut out = script.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let screen = Screen {
        rx,
        seen: String::new(),
    };
    (script, keyboard, screen)
}

/// Waits (bounded) for `script` to exit.
fn wait_exit(script: &mut std::process::Child, screen: &Screen) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = script.try_wait().expect("wait for script") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "kiln did not exit:\n{}",
            screen.seen
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn shell_is_a_bash_login_shell_whose_exit_code_is_kilns() {
    let k = Kiln::isolated();
    let sb = k.create("base");
    let host = format!(
        "stty rows 30 cols 90; exec {} shell {}",
        sh_quote(&k.bin().to_string_lossy()),
        sh_quote(&sb),
    );
    let (mut script, mut keyboard, mut screen) = on_host_pty(&k, &host);
    // bash's prompt for root ends in "# ".
    screen.wait_for("# ");
    // Enter is a carriage return on a terminal in raw mode; the guest's terminal maps it.
    keyboard
        .write_all(b"echo \"SHELL=$0 LOGIN=$(shopt -q login_shell && echo yes)\"; exit 3\r")
        .expect("type");
    keyboard.flush().expect("flush");
    let line = screen.wait_for("SHELL=bash");
    assert!(line.contains("SHELL=bash LOGIN=yes"), "{line:?}");
    let status = wait_exit(&mut script, &screen);
    drop(keyboard);
    assert_eq!(status.code(), Some(3), "{}", screen.seen);
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn exec_t_without_a_terminal_is_refused_with_the_reason() {
    let k = Kiln::shared();
    let out = k.run(&["exec", "-t", "no-such-sandbox", "--", "true"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stdin is not one"), "{err}");
}
