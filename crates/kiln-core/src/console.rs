//! A sandbox's guest console as `kiln logs` sees it: the archive of its earlier VMs, then the
//! live log of its current VM.
//!
//! Owns: [`ConsoleStream`] (reads both in order and follows the live one across rotations)
//! and the archive `logs/<id>.console.log` (what stopped or failed VMs of the sandbox
//! printed). Both are capped logs ([`kiln_vmm::console::CappedLog`]: the file and its `.1`,
//! each at most [`console_log_cap`], 2 MiB by default), so a sandbox's console never takes more than four times
//! that on disk, however much its guest prints and however often it is stopped and started.
//!
//! Invariants: the archive only grows by whole VM consoles, appended oldest first before the
//! VM's runtime directory goes; it is removed with the sandbox's records.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use kiln_api_types::SandboxId;
use kiln_vmm::console::{CappedLog, LogFollower, console_log_cap, log_files};
use tracing::warn;

use crate::{CoreError, Engine};

/// A sandbox's console from its oldest kept byte: the archived files, then the live log,
/// which [`ConsoleStream::read`] keeps following (`Ok(0)` = nothing new for now).
#[derive(Debug)]
pub struct ConsoleStream {
    archived: VecDeque<std::fs::File>,
    live: LogFollower,
}

impl ConsoleStream {
    /// Reads the next console bytes into `buf`; `Ok(0)` means nothing more for now (the live
    /// log may grow later).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(f) = self.archived.front_mut() {
            match f.read(buf) {
                Ok(0) => {
                    self.archived.pop_front();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
        self.live.read(buf)
    }
}

impl Engine {
    /// The guest console of sandbox `id` so far: what earlier VMs of it printed (kept when
    /// they stopped or failed), then its current VM's console, if it has one.
    pub fn console_stream(&self, id: &SandboxId) -> Result<ConsoleStream, CoreError> {
        self.sandbox_get(id)?;
        let archived = log_files(&self.home.console_archive(id))
            .iter()
            .filter_map(|p| std::fs::File::open(p).ok())
            .collect();
        Ok(ConsoleStream {
            archived,
            live: LogFollower::new(&self.live_console(id)),
        })
    }

    /// Whether sandbox `id` has a VM that may still print to its console.
    pub fn console_live(&self, id: &SandboxId) -> bool {
        self.table().contains_key(id)
    }

    /// The live console log of sandbox `id`'s current VM.
    fn live_console(&self, id: &SandboxId) -> PathBuf {
        self.home.sandbox_dir(id).join("console.log")
    }

    /// Appends the console of sandbox `id`'s VM to its archive (before its runtime directory
    /// goes), so `kiln logs` still shows it.
    pub(crate) fn archive_console(&self, id: &SandboxId) {
        let archive = self.home.console_archive(id);
        if let Err(e) = append_log(&self.live_console(id), &archive) {
            warn!(sandbox_id = %id, error = %e, "could not keep the guest console");
        }
    }

    /// Removes the archived console of sandbox `id`.
    pub(crate) fn remove_console_archive(&self, id: &SandboxId) {
        for f in log_files(&self.home.console_archive(id)) {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Appends the capped log at `src` (both files, oldest first) to the capped log at `dst`.
fn append_log(src: &Path, dst: &Path) -> io::Result<()> {
    let mut sources = Vec::new();
    for f in log_files(src) {
        match std::fs::File::open(&f) {
            Ok(file) => sources.push(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if sources.is_empty() {
        return Ok(());
    }
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut log = CappedLog::open(dst, console_log_cap())?;
    for file in sources {
        log.append_from(file)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_vmm::console::rotated_path;

    #[test]
    fn append_log_takes_both_files_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = dir.path().join("run").join("console.log");
        std::fs::create_dir_all(live.parent().expect("parent")).expect("mkdir");
        std::fs::write(rotated_path(&live), "first ").expect("write");
        std::fs::write(&live, "second").expect("write");
        let archive = dir.path().join("logs").join("sb.console.log");
        append_log(&live, &archive).expect("append");
        append_log(&live, &archive).expect("append again");
        assert_eq!(
            std::fs::read_to_string(&archive).expect("read"),
            "first secondfirst second"
        );
        // Nothing to archive is not an error and creates nothing.
        let none = dir.path().join("none").join("console.log");
        append_log(&none, &dir.path().join("x.log")).expect("nothing");
        assert!(!dir.path().join("x.log").exists());
    }

    #[test]
    fn append_log_keeps_the_archive_within_its_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = dir.path().join("console.log");
        let archive = dir.path().join("archive.log");
        let cap = console_log_cap();
        let chunk = vec![b'z'; (cap / 2) as usize];
        std::fs::write(&live, &chunk).expect("write");
        for _ in 0..9 {
            append_log(&live, &archive).expect("append");
        }
        let total: u64 = log_files(&archive)
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(total <= 2 * cap, "{total}");
        assert!(total > cap, "{total}");
    }

    #[test]
    fn console_stream_reads_archive_then_live_across_a_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("archive.log");
        std::fs::write(rotated_path(&archive), "a1 ").expect("write");
        std::fs::write(&archive, "a2 ").expect("write");
        let live = dir.path().join("console.log");
        let mut log = CappedLog::open(&live, 4).expect("open");
        log.write(b"l1 ").expect("write");
        let mut stream = ConsoleStream {
            archived: log_files(&archive)
                .iter()
                .filter_map(|p| std::fs::File::open(p).ok())
                .collect(),
            live: LogFollower::new(&live),
        };
        let mut buf = [0u8; 2];
        let mut seen = Vec::new();
        let mut drain = |s: &mut ConsoleStream, seen: &mut Vec<u8>| {
            loop {
                let n = s.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
        };
        drain(&mut stream, &mut seen);
        assert_eq!(seen, b"a1 a2 l1 ");
        log.write(b"l2 l3").expect("write");
        drain(&mut stream, &mut seen);
        assert_eq!(seen, b"a1 a2 l1 l2 l3");
    }
}
