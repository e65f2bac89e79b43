//! Process identity: a pid plus its start time, so that a process can be recognised (and
//! killed) later without ever hitting a recycled pid.
//!
//! Owns the pidfile format (`<run>/qemu.pid`): one line, `"<pid> <start_time>\n"`, where
//! `start_time` is field 22 of `/proc/<pid>/stat` (clock ticks since boot). Written
//! atomically (temporary file + rename).
//!
//! Invariants: [`ProcessIdentity::kill_if_same`] signals only a process whose start time
//! matches, through a pidfd opened *before* the check, so the pid cannot be recycled between
//! the check and the signal.

use std::io;
use std::path::Path;

use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

/// A process, identified by pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessIdentity {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// Errors reading a pidfile.
#[derive(Debug, thiserror::Error)]
pub enum ProcIdError {
    /// The pidfile could not be read.
    #[error("failed to read the pidfile {path}")]
    Read {
        /// The pidfile.
        path: std::path::PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The pidfile's content is not `"<pid> <start_time>"`.
    #[error("malformed pidfile {path}: {content:?}")]
    Malformed {
        /// The pidfile.
        path: std::path::PathBuf,
        /// Its content (truncated).
        content: String,
    },
}

impl ProcessIdentity {
    /// Reads the identity of a running process from `/proc`.
    pub fn of_pid(pid: u32) -> io::Result<ProcessIdentity> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let start_time = parse_stat_start_time(&stat).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unparsable /proc/{pid}/stat"),
            )
        })?;
        Ok(ProcessIdentity { pid, start_time })
    }

    /// Writes the pidfile atomically.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("pid.tmp");
        std::fs::write(&tmp, format!("{} {}\n", self.pid, self.start_time))?;
        std::fs::rename(&tmp, path)
    }

    /// Reads a pidfile; `Ok(None)` when it does not exist.
    pub fn read(path: &Path) -> Result<Option<ProcessIdentity>, ProcIdError> {
        let content = match std::fs::read_to_string(path) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ProcIdError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let malformed = || ProcIdError::Malformed {
            path: path.to_owned(),
            content: content.chars().take(64).collect(),
        };
        let mut it = content.split_ascii_whitespace();
        let pid = it
            .next()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|p| *p > 0)
            .ok_or_else(malformed)?;
        let start_time = it
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(malformed)?;
        if it.next().is_some() {
            return Err(malformed());
        }
        Ok(Some(ProcessIdentity { pid, start_time }))
    }

    /// True when a process with this pid exists, started at the recorded time, and has not
    /// exited (a zombie keeps its `/proc` entry until it is reaped, but runs nothing).
    pub fn is_same_process_alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let zombie = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_ascii_whitespace().next())
            .is_none_or(|state| matches!(state, "Z" | "X" | "x"));
        !zombie && parse_stat_start_time(&stat) == Some(self.start_time)
    }

    /// Sends SIGKILL if (and only if) the process is still the recorded one. Returns true when
    /// the signal was delivered. Never signals a recycled pid: the pidfd pins the process
    /// before its start time is compared.
    pub fn kill_if_same(&self) -> bool {
        let Some(pid) = i32::try_from(self.pid).ok().and_then(Pid::from_raw) else {
            return false;
        };
        let Ok(pidfd) = pidfd_open(pid, PidfdFlags::empty()) else {
            return false;
        };
        if !self.is_same_process_alive() {
            return false;
        }
        pidfd_send_signal(&pidfd, Signal::KILL).is_ok()
    }
}

/// Extracts field 22 (`starttime`) from a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may itself contain spaces and parentheses, so parsing starts after
/// the *last* `)`.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields after comm start at field 3 (state); starttime is field 22 → index 19.
    after_comm.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The QEMU processes (argv[0] named `qemu-system-*`) whose command line names a path below
/// `dir`, with the first such directory below `dir` each one names: how a janitor finds a QEMU
/// whose pidfile was never written (its daemon died between spawning it and recording it).
pub fn qemus_below(dir: &Path) -> Vec<(ProcessIdentity, std::path::PathBuf)> {
    let prefix = format!("{}/", dir.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let mut args = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned());
        let is_qemu = args.next().is_some_and(|a0| {
            Path::new(&a0)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("qemu-system"))
        });
        if !is_qemu {
            continue;
        }
        let named = args.find_map(|a| {
            let at = a.find(&prefix)?;
            let rest = &a[at + prefix.len()..];
            let first = rest.split(['/', ',']).next().filter(|f| !f.is_empty())?;
            Some(dir.join(first))
        });
        if let (Some(run), Ok(ident)) = (named, ProcessIdentity::of_pid(pid)) {
            out.push((ident, run));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemus_below_finds_a_qemu_by_the_run_directory_its_arguments_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let run = tmp.path().join("run");
        // A stand-in QEMU: a shell under a qemu-system name, and a plain shell beside it, each
        // with the run directory in its arguments.
        let fake = tmp.path().join("qemu-system-x86_64");
        std::fs::copy("/bin/sh", &fake).expect("copy sh");
        let chardev = format!("socket,id=qmp,path={}/sb-1/qmp.sock", run.display());
        let mut qemu = std::process::Command::new(&fake)
            .args(["-c", "sleep 30; :", "sh", &chardev])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        let mut other = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30; :", "sh", &chardev])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        // Right after fork the children still show this test's command line: poll until
        // both have exec'd (the plain shell's cmdline names the run dir too, once it runs).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let exec_done = |pid: u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(chardev.len()).any(|w| w == chardev.as_bytes()))
        };
        while !(exec_done(qemu.id()) && exec_done(other.id())) {
            assert!(
                std::time::Instant::now() < deadline,
                "children never exec'd"
            );
            std::thread::yield_now();
        }
        let found = qemus_below(&run);
        let _ = qemu.kill();
        let _ = other.kill();
        let _ = qemu.wait();
        let _ = other.wait();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0.pid, qemu.id());
        assert_eq!(found[0].1, run.join("sb-1"));
    }

    #[test]
    fn parse_stat_start_time_comm_with_spaces_and_parens() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 1000 0 0 0 10 5 0 0 20 0 3 0 987654 100000 50 18446744073709551615";
        assert_eq!(parse_stat_start_time(stat), Some(987_654));
        assert_eq!(parse_stat_start_time("garbage"), None);
        assert_eq!(parse_stat_start_time("1 (x) S 1 2"), None);
    }

    #[test]
    fn of_pid_self_is_alive_and_same() {
        let me = ProcessIdentity::of_pid(std::process::id()).expect("own stat");
        assert!(me.is_same_process_alive());
        let other = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_same_process_alive());
    }

    #[test]
    fn kill_if_same_wrong_start_time_never_signals() {
        // Our own pid with a wrong start time stands for a recycled pid: it must be spared
        // (if it were not, this test process would die).
        let me = ProcessIdentity::of_pid(std::process::id()).expect("own stat");
        assert!(
            !ProcessIdentity {
                start_time: me.start_time + 1,
                ..me
            }
            .kill_if_same()
        );
    }

    #[test]
    fn kill_if_same_matching_child_is_killed() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let ident = ProcessIdentity::of_pid(child.id()).expect("child stat");
        assert!(ident.kill_if_same());
        let status = child.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
        // Reaped: nothing left to kill.
        assert!(!ident.kill_if_same());
    }

    #[test]
    fn pidfile_round_trip_and_missing_and_malformed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qemu.pid");
        assert!(
            ProcessIdentity::read(&path)
                .expect("missing is fine")
                .is_none()
        );
        let id = ProcessIdentity {
            pid: 4242,
            start_time: 77,
        };
        id.write(&path).expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "4242 77\n");
        assert_eq!(ProcessIdentity::read(&path).expect("read"), Some(id));
        std::fs::write(&path, "4242\n").expect("write");
        assert!(matches!(
            ProcessIdentity::read(&path),
            Err(ProcIdError::Malformed { .. })
        ));
        std::fs::write(&path, "0 5\n").expect("write");
        assert!(matches!(
            ProcessIdentity::read(&path),
            Err(ProcIdError::Malformed { .. })
        ));
    }

    #[test]
    fn is_same_process_alive_is_false_for_a_zombie() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let ident = ProcessIdentity::of_pid(child.id()).expect("identity");
        let stat = format!("/proc/{}/stat", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&stat)
            .expect("zombie's stat")
            .contains(") Z ")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "child never became a zombie"
            );
            std::thread::yield_now();
        }
        assert!(!ident.is_same_process_alive(), "a zombie counted as alive");
        assert!(!ident.kill_if_same(), "a zombie counted as killed");
        child.wait().expect("reap");
        let me = ProcessIdentity::of_pid(std::process::id()).expect("self");
        assert!(me.is_same_process_alive());
    }
}
