//! One isolated `$KILN_HOME` per fault test, and bounded runs of the `kiln` binary in it.
//!
//! A [`FaultHome`] is a fresh directory `kiln-faults-<label>-…` under the temp dir whose
//! `images` links to the shared e2e home's (so no image is built), or holds images of its own
//! ([`FaultHome::own_images`], for the image-build faults: a build must never write into the
//! shared images). When it is dropped, its daemon is stopped with its sandboxes, any QEMU or
//! `kilnd` still naming it is SIGKILLed (only those: see [`crate::procs`]), mounts left below
//! it are detached, the immutable flags of its files are cleared and it is removed.
//! `KILN_FAULTS_KEEP=1` keeps the directory of a failed test for inspection (its processes
//! are still stopped).
//!
//! Every command runs with a deadline ([`FaultHome::run_bounded`]): a fault must never hang a
//! client, and a hang is reported as one, not as a stuck test.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::procs;

/// How long any one `kiln` command may take before it counts as hung. Generous: the machine
/// is shared and VMs run under TCG.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(180);

/// An isolated kiln home under test.
pub struct FaultHome {
    bin: PathBuf,
    home: PathBuf,
}

/// A command that did not finish by its deadline (it was killed).
#[derive(Debug)]
pub struct Hung {
    /// What ran.
    pub args: Vec<String>,
    /// What it printed before it was killed.
    pub stderr: String,
}

/// A sandbox as `kiln ps --json` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its id.
    pub id: String,
    /// Its lifecycle state.
    pub state: String,
}

impl Listed {
    /// Whether the store says its VM runs (`running` or `paused`).
    pub fn is_live(&self) -> bool {
        self.state == "running" || self.state == "paused"
    }
}

fn shared_home() -> PathBuf {
    match std::env::var_os("KILN_E2E_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => panic!("KILN_E2E_HOME is not set: run the fault suite through scripts/faults"),
    }
}

fn kiln_bin() -> PathBuf {
    match std::env::var_os("KILN_BIN") {
        Some(b) if !b.is_empty() => PathBuf::from(b),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/kiln"),
    }
}

fn fresh_dir(label: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "kiln-faults-{label}-{}-{nanos:08x}",
        std::process::id()
    ));
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

impl FaultHome {
    /// A fresh home using the shared images.
    pub fn linked(label: &str) -> FaultHome {
        let home = fresh_dir(label);
        std::os::unix::fs::symlink(shared_home().join("images"), home.join("images"))
            .expect("link shared images");
        FaultHome {
            bin: kiln_bin(),
            home,
        }
    }

    /// A fresh home with an images directory of its own (empty: build into it).
    pub fn own_images(label: &str) -> FaultHome {
        FaultHome {
            bin: kiln_bin(),
            home: fresh_dir(label),
        }
    }

    /// The state directory.
    pub fn path(&self) -> &Path {
        &self.home
    }

    /// A `kiln` command with this home.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("KILN_HOME", &self.home)
            .stdin(Stdio::null());
        c
    }

    /// Runs `kiln args`; `Err` if it had not finished by `deadline` (it is then killed).
    pub fn run_bounded(&self, args: &[&str], deadline: Duration) -> Result<Output, Hung> {
        let child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln");
        wait_bounded(child, args, deadline)
    }

    /// Runs `kiln args`, panicking if it hangs.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_bounded(args, COMMAND_DEADLINE)
            .unwrap_or_else(|h| panic!("kiln {:?} hung: {}", h.args, h.stderr))
    }

    /// Runs `kiln args`, panicking unless it succeeds; its stdout.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        kiln_e2e::assert_success(&out, &format!("kiln {}", args.join(" ")));
        kiln_e2e::stdout(&out)
    }

    /// `kiln args --json` parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.run_ok(&all)).expect("kiln --json output")
    }

    /// Every sandbox per `kiln ps --json` (which starts a daemon if none runs).
    pub fn ps(&self) -> Vec<Listed> {
        self.json(&["ps"])["sandboxes"]
            .as_array()
            .expect("sandboxes array")
            .iter()
            .map(|s| Listed {
                id: s["id"].as_str().expect("id").to_owned(),
                state: s["state"].as_str().expect("state").to_owned(),
            })
            .collect()
    }

    /// `kiln daemon status --json`, or `None` when no daemon serves this home.
    pub fn daemon_status(&self) -> Option<serde_json::Value> {
        let out = self.run(&["daemon", "status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Starts a daemon at once (the CLI starts one on demand; its janitor runs before it
    /// serves) and returns its pid.
    pub fn start_daemon(&self) -> i32 {
        self.ps();
        self.daemon_status()
            .and_then(|s| s["pid"].as_i64())
            .expect("a daemon serves after kiln ps") as i32
    }

    /// Starts a daemon again after a fault, as [`FaultHome::start_daemon`], but reports a
    /// start that fails (the CLI waits 20 s for the socket) instead of panicking: the error
    /// says whether a daemon served later (within a minute: a slow start) or not at all, and
    /// quotes `kilnd.log`'s panics and tail. `Ok` holds the pid.
    pub fn restart_daemon(&self) -> Result<i32, String> {
        let out = match self.run_bounded(&["ps", "--json"], COMMAND_DEADLINE) {
            Ok(out) => out,
            Err(h) => return Err(format!("kiln ps hung after a restart: {}", h.stderr)),
        };
        let pid = || {
            self.daemon_status()
                .and_then(|s| s["pid"].as_i64())
                .map(|p| p as i32)
        };
        if out.status.success() {
            return pid().ok_or_else(|| "kiln ps answered but no daemon serves".to_owned());
        }
        let first = kiln_e2e::stderr(&out);
        let deadline = Instant::now() + Duration::from_secs(60);
        let later = loop {
            if let Some(p) = pid() {
                break Some(p);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let log = std::fs::read_to_string(self.home.join("kilnd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let panics: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains("panicked") || l.contains("ERROR"))
            .collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        Err(format!(
            "the daemon did not start after a fault ({}): {}\nkilnd.log panics/errors:\n{}\nkilnd.log tail:\n{tail}",
            match later {
                Some(p) => format!("pid {p} served later"),
                None => "none served within another minute".to_owned(),
            },
            first.lines().next().unwrap_or_default(),
            panics.join("\n")
        ))
    }

    /// The names of `dir`'s entries (empty if it does not exist).
    pub fn entries(&self, dir: &str) -> Vec<String> {
        std::fs::read_dir(self.home.join(dir))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Stops every process of this home: `kiln daemon stop --all`, then SIGKILL for any
    /// `kilnd`, QEMU or helper still naming it. Returns what had to be killed (a leak if
    /// non-empty).
    pub fn stop_everything(&self) -> Vec<String> {
        let _ = self.run_bounded(&["daemon", "stop", "--all"], COMMAND_DEADLINE);
        let mut killed = Vec::new();
        for p in procs::daemons_of(&self.home)
            .into_iter()
            .chain(procs::qemus_of(&self.home))
            .chain(procs::helpers_of(&self.home))
        {
            if procs::kill9(p.pid) {
                killed.push(format!("pid {} {}", p.pid, p.argv.join(" ")));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && !(procs::daemons_of(&self.home).is_empty() && procs::qemus_of(&self.home).is_empty())
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        killed
    }
}

impl Drop for FaultHome {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The CLI quotes only the log's tail; a daemon's panic message is further up.
            let log = std::fs::read_to_string(self.home.join("kilnd.log")).unwrap_or_default();
            for (i, line) in log.lines().enumerate() {
                if line.contains("panicked") {
                    let tail: Vec<&str> = log.lines().skip(i).take(4).collect();
                    eprintln!("faults: kilnd.log line {}:\n{}", i + 1, tail.join("\n"));
                }
            }
        }
        self.stop_everything();
        // A leaked mount (counted by the invariants) would keep the home from going.
        for m in procs::detach_mounts_under(&self.home) {
            eprintln!("faults: detached leaked mount {m}");
        }
        let keep = std::thread::panicking()
            && std::env::var_os("KILN_FAULTS_KEEP").is_some_and(|v| v == "1");
        if keep {
            eprintln!("faults: kept {}", self.home.display());
        } else if let Err(e) = crate::corrupt::remove_tree(&self.home) {
            eprintln!("faults: could not remove {}: {e}", self.home.display());
        }
    }
}

/// Waits for `child` until `deadline`, collecting its output; kills it if it runs longer.
pub fn wait_bounded(
    mut child: std::process::Child,
    args: &[&str],
    deadline: Duration,
) -> Result<Output, Hung> {
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let until = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for kiln") {
            break Some(status);
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(Hung {
            args: args.iter().map(|a| a.to_string()).collect(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }),
    }
}
