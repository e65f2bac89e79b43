//! The guest's serial console: a socket QEMU writes to, a reader task, and a capped log.
//!
//! Owns: [`CappedLog`] (a log that rotates `console.log` → `console.log.1` at a cap, so the
//! two files together never exceed twice the cap), the reader task that copies a VM's console
//! socket into it ([`ConsoleReader`]), and the readers of such a log: [`LogFollower`] (oldest
//! byte first, then follows across rotations) and [`log_tail`] (the last bytes, for error
//! messages).
//!
//! ```text
//!  guest ttyS0 ─▶ QEMU -chardev socket (client, reconnect=1) ─▶ <run>/console.sock
//!                                                  (listener bound by the daemon before QEMU starts)
//!        ─▶ reader task ─▶ console.log ──(at the cap: rename)──▶ console.log.1 (the previous one dropped)
//! ```
//!
//! # Why a socket read by the daemon
//!
//! A hostile or broken guest can print forever (a `yes > /dev/ttyS0` produces ~0.3 MB/s
//! under TCG). With `-chardev file` QEMU appends to the file without bound. Alternatives
//! weighed:
//! - `-chardev file,append=on` truncated or rotated by the daemon: QEMU keeps its descriptor,
//!   so a rename does not stop it, and truncating under an `O_APPEND` writer loses whatever
//!   was written between the copy and the truncation; with no daemon (between a crash and the
//!   next start) the file grows without bound again.
//! - `-chardev ringbuf` read over QMP (`ringbuf-read`): bounded inside QEMU and survives a
//!   daemon restart, but it is polled through the sandbox's QMP connection, in base64 or lossy
//!   UTF-8, and its capacity is guest memory QEMU holds for nothing.
//! - QEMU as the socket server (`server=on,wait=off`) and the daemon connecting after spawn:
//!   whatever the guest prints before the daemon connects is lost.
//!
//! So the daemon binds `console.sock` *before* QEMU starts and QEMU connects to it as a client
//! with `reconnect=1`: nothing printed from the first instruction on is lost while a daemon is
//! there; when none is (a crashed daemon), QEMU's socket is disconnected and its UART drops the
//! bytes (the chardev answers EIO), never buffering them; a restarted daemon binds the same
//! path again ([`crate::Vm::attach`]) and QEMU reconnects within a second. A slow reader
//! back-pressures the guest's UART (the socket buffer fills and QEMU retries the byte), which
//! only slows the flooding guest. The chardev backend is not part of the migration stream, so
//! snapshot restores and stop/start get the same command line shape and the same reader.
//!
//! Invariants:
//! - `console.log` ≤ cap and `console.log.1` ≤ cap at every moment: a write that would pass
//!   the cap is split, the full file renamed over `console.log.1`, and the rest goes to a
//!   fresh `console.log`. Reading `.1` then the current file gives the newest output in order.
//! - One reader task per VM handle; it ends when the handle is dropped (the task is aborted)
//!   and never holds more than one read buffer of console bytes in memory.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Default cap of each console file (the live one and the rotated one).
pub const CONSOLE_LOG_CAP: u64 = 2 << 20;

/// Environment variable overriding [`CONSOLE_LOG_CAP`] (bytes, at least [`MIN_CAP`]): end-to-end
/// tests flood a console past a small cap in seconds instead of minutes.
pub const CAP_ENV: &str = "KILN_CONSOLE_LOG_CAP";

/// The smallest cap [`CAP_ENV`] may set.
pub const MIN_CAP: u64 = 4096;

/// The cap of each console file in effect: [`CAP_ENV`] if set and valid, else
/// [`CONSOLE_LOG_CAP`]. Read once per process.
pub fn console_log_cap() -> u64 {
    static CAP: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var(CAP_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&v| v >= MIN_CAP)
            .unwrap_or(CONSOLE_LOG_CAP)
    })
}

/// Bytes read from the console socket per read.
const READ_CHUNK: usize = 64 << 10;

/// A read shorter than this is followed by a short pause, so that a guest printing byte by
/// byte (QEMU sends each UART byte on its own) costs a few reads per second, not one per byte.
///
/// Measured (TCG, 2 shared cores, a guest running `yes > /dev/ttyS0` for 30 s): with the
/// pause, the guest gets ~9.7 KB/s through, the daemon spends 2.2% of a core and QEMU 4.4%;
/// without it, ~68 KB/s, the daemon 23% and QEMU 36%. A unix socket holds only a few hundred
/// one-byte writes, so the pause is what paces a flooding guest: about the speed of the
/// 115200-baud UART it emulates.
const SMALL_READ: usize = 4 << 10;

/// The pause after a small read. The socket buffers what arrives meanwhile.
const COALESCE_PAUSE: Duration = Duration::from_millis(25);

/// The rotated file of the capped log at `path` (`console.log` → `console.log.1`).
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// The files of the capped log at `path`, oldest first (whether or not they exist).
pub fn log_files(path: &Path) -> [PathBuf; 2] {
    [rotated_path(path), path.to_owned()]
}

/// A log file that rotates once at `cap` bytes: at most `2 × cap` bytes on disk.
#[derive(Debug)]
pub struct CappedLog {
    path: PathBuf,
    cap: u64,
    file: std::fs::File,
    len: u64,
}

impl CappedLog {
    /// Opens (appending) or creates the log at `path`, files of mode 0600. A file already past
    /// the cap (written by an older version) is rotated at the first write.
    pub fn open(path: &Path, cap: u64) -> io::Result<CappedLog> {
        let file = open_append(path)?;
        let len = file.metadata()?.len();
        Ok(CappedLog {
            path: path.to_owned(),
            cap: cap.max(1),
            file,
            len,
        })
    }

    /// Appends `buf`, rotating whenever the current file reaches the cap.
    pub fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.len >= self.cap {
                self.rotate()?;
            }
            let room = usize::try_from(self.cap - self.len).unwrap_or(usize::MAX);
            let n = room.min(buf.len());
            self.file.write_all(&buf[..n])?;
            self.len += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Appends everything `src` yields (e.g. an older log being archived).
    pub fn append_from(&mut self, mut src: impl Read) -> io::Result<u64> {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut total = 0u64;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.write(&buf[..n])?;
            total += n as u64;
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, rotated_path(&self.path))?;
        self.file = open_append(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The last `max_bytes` of the capped log at `path` (both files), from a line boundary, with
/// the serial line's `\r` and NULs removed (for error messages).
pub fn log_tail(path: &Path, max_bytes: usize) -> String {
    let mut out = Vec::new();
    let mut truncated = false;
    for file in log_files(path).iter().rev() {
        let want = max_bytes - out.len();
        if want == 0 {
            truncated = std::fs::metadata(file).is_ok_and(|m| m.len() > 0);
            break;
        }
        let (mut bytes, cut) = file_end(file, want);
        truncated = cut;
        bytes.extend_from_slice(&out);
        out = bytes;
        if cut {
            break;
        }
    }
    let mut text = String::from_utf8_lossy(&out).into_owned();
    if truncated && let Some(nl) = text.find('\n') {
        text.drain(..=nl);
    }
    text.retain(|c| c != '\r' && c != '\0');
    text
}

/// The last `max` bytes of `path` (empty when unreadable), and whether bytes before them were
/// left out.
fn file_end(path: &Path, max: usize) -> (Vec<u8>, bool) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (Vec::new(), false);
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return (Vec::new(), false);
    }
    let mut buf = Vec::new();
    if f.take(max as u64).read_to_end(&mut buf).is_err() {
        return (Vec::new(), false);
    }
    (buf, start > 0)
}

/// Reads a capped log from its oldest kept byte, then (called again later) what was written
/// since, following the live file across rotations.
///
/// A rotation is seen as the live path naming a new file: the handle still open on the old
/// one is read to its end first, so nothing written before the rename is skipped. Only a
/// reader more than a whole file behind (two rotations between calls) misses output, which a
/// bounded log cannot keep anyway.
#[derive(Debug)]
pub struct LogFollower {
    path: PathBuf,
    /// The open file and its inode.
    current: Option<(std::fs::File, u64)>,
    /// Whether the rotated file still has to be opened (only at the start).
    start_with_rotated: bool,
}

impl LogFollower {
    /// A follower of the capped log at `path`, positioned at its oldest byte.
    pub fn new(path: &Path) -> LogFollower {
        LogFollower {
            path: path.to_owned(),
            current: None,
            start_with_rotated: true,
        }
    }

    /// Reads the next bytes into `buf`; `Ok(0)` means nothing new for now.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.start_with_rotated {
            self.start_with_rotated = false;
            if let Ok(f) = std::fs::File::open(rotated_path(&self.path)) {
                let ino = f.metadata()?.ino();
                self.current = Some((f, ino));
            }
        }
        loop {
            if let Some((f, _)) = &mut self.current {
                let n = read_retrying(f, buf)?;
                if n > 0 {
                    return Ok(n);
                }
            }
            // At the end of the open file: is the live path another file now?
            let live_ino = match std::fs::metadata(&self.path) {
                Ok(m) => m.ino(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(e),
            };
            match &mut self.current {
                Some((_, ino)) if *ino == live_ino => return Ok(0),
                Some((f, _)) => {
                    // Rotated (or we were on `.1`): finish the old file, then switch.
                    let n = read_retrying(f, buf)?;
                    if n > 0 {
                        return Ok(n);
                    }
                }
                None => {}
            }
            let f = std::fs::File::open(&self.path)?;
            let ino = f.metadata()?.ino();
            self.current = Some((f, ino));
        }
    }
}

fn read_retrying(f: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match f.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// The task copying a VM's console socket into its capped log. Aborted on drop.
#[derive(Debug)]
pub(crate) struct ConsoleReader {
    task: JoinHandle<()>,
    /// Whether QEMU is connected, and how many of its connections have ended.
    state: watch::Receiver<ReaderState>,
}

/// What the reader task is doing.
#[derive(Debug, Clone, Copy, Default)]
struct ReaderState {
    connected: bool,
    connections_ended: u64,
}

impl Drop for ConsoleReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ConsoleReader {
    /// Binds `socket` (removing a stale one) and starts copying every connection to it into
    /// the capped log at `log`. Call before QEMU starts (or, for a running QEMU, before it
    /// reconnects: it retries every second).
    pub(crate) fn start(socket: &Path, log: &Path, cap: u64) -> io::Result<ConsoleReader> {
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(socket)?;
        let log = CappedLog::open(log, cap)?;
        let (tx, state) = watch::channel(ReaderState::default());
        let task = tokio::spawn(pump(listener, log, tx));
        Ok(ConsoleReader { task, state })
    }

    /// Waits (at most `max`) until no QEMU is connected: after QEMU exited, everything it
    /// printed is then in the log.
    pub(crate) async fn settled(&self, max: Duration) {
        let mut rx = self.state.clone();
        let _ = tokio::time::timeout(max, rx.wait_for(|s| !s.connected)).await;
    }
}

async fn pump(listener: UnixListener, mut log: CappedLog, state: watch::Sender<ReaderState>) {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut log_failed = false;
    loop {
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                tracing::warn!(path = %log.path.display(), error = %e, "console socket accept failed; console output is dropped");
                return;
            }
        };
        state.send_modify(|s| s.connected = true);
        loop {
            let n = match conn.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            // A log that cannot be written (disk full) drops the output but keeps draining,
            // so the guest's UART is not stalled on a full socket.
            match log.write(&buf[..n]) {
                Ok(()) => log_failed = false,
                Err(e) if !log_failed => {
                    log_failed = true;
                    tracing::warn!(path = %log.path.display(), error = %e, "cannot write the console log; dropping console output");
                }
                Err(_) => {}
            }
            if n < SMALL_READ {
                tokio::time::sleep(COALESCE_PAUSE).await;
            }
        }
        state.send_modify(|s| {
            s.connected = false;
            s.connections_ended += 1;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        for f in log_files(path) {
            if let Ok(b) = std::fs::read(&f) {
                out.extend(b);
            }
        }
        out
    }

    fn size(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn capped_log_total_stays_within_twice_the_cap_and_keeps_the_newest_bytes_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut log = CappedLog::open(&path, 1000).expect("open");
        let mut all = Vec::new();
        for i in 0..500u32 {
            let line = format!("line {i:05} {}\n", "x".repeat((i % 37) as usize));
            all.extend_from_slice(line.as_bytes());
            log.write(line.as_bytes()).expect("write");
            assert!(size(&path) <= 1000, "live file past the cap");
            assert!(
                size(&rotated_path(&path)) <= 1000,
                "rotated file past the cap"
            );
        }
        let kept = read_all(&path);
        assert!(kept.len() > 1000 && kept.len() <= 2000, "{}", kept.len());
        assert!(
            all.ends_with(&kept),
            "the kept bytes are the newest, in order"
        );
    }

    #[test]
    fn capped_log_write_larger_than_the_cap_is_split() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut log = CappedLog::open(&path, 100).expect("open");
        let big: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        log.write(&big).expect("write");
        assert_eq!(size(&path), 100);
        assert_eq!(size(&rotated_path(&path)), 100);
        assert_eq!(read_all(&path), &big[800..]);
    }

    #[test]
    fn capped_log_reopened_appends_and_rotates_an_oversized_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        std::fs::write(&path, vec![b'a'; 300]).expect("write");
        let mut log = CappedLog::open(&path, 100).expect("open");
        log.write(b"new").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert_eq!(size(&rotated_path(&path)), 300, "the old file is kept once");
        log.write(b"er").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"newer");
    }

    #[test]
    fn log_tail_spans_the_rotation_from_a_line_boundary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        std::fs::write(rotated_path(&path), "old 1\r\nold 2\r\nold 3\r\n").expect("write");
        std::fs::write(&path, "new 1\r\nnew").expect("write");
        assert_eq!(log_tail(&path, 1000), "old 1\nold 2\nold 3\nnew 1\nnew");
        // 8 bytes of the rotated file ("\nold 3\r\n"): the cut line before "old 3" goes.
        assert_eq!(log_tail(&path, 18), "old 3\nnew 1\nnew");
        assert_eq!(log_tail(&path, 5), "new");
        assert_eq!(log_tail(&dir.path().join("missing"), 100), "");
    }

    #[test]
    fn log_follower_reads_in_order_across_rotations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut log = CappedLog::open(&path, 64).expect("open");
        let mut follower = LogFollower::new(&path);
        let mut buf = [0u8; 16];
        let mut seen = Vec::new();
        let mut written = Vec::new();
        let mut drain = |f: &mut LogFollower, seen: &mut Vec<u8>| {
            loop {
                let n = f.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
        };
        drain(&mut follower, &mut seen);
        assert!(seen.is_empty());
        // Several rotations, but never more than one between two reads.
        for i in 0..40u32 {
            let chunk = format!("<{i:03}:{}>", "y".repeat((i % 11) as usize));
            written.extend_from_slice(chunk.as_bytes());
            log.write(chunk.as_bytes()).expect("write");
            drain(&mut follower, &mut seen);
        }
        assert!(size(&rotated_path(&path)) > 0, "the log rotated");
        assert_eq!(seen, written, "everything, once, in order");

        // A new follower starts at the oldest kept byte.
        let mut late = LogFollower::new(&path);
        let mut from_start = Vec::new();
        drain(&mut late, &mut from_start);
        assert_eq!(from_start, read_all(&path));
        assert!(written.ends_with(&from_start));
    }

    #[tokio::test]
    async fn console_reader_copies_each_connection_into_the_capped_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("console.sock");
        let path = dir.path().join("console.log");
        let reader = ConsoleReader::start(&socket, &path, 1000).expect("start");
        let mut sent = Vec::new();
        // Two connections in turn, like QEMU reconnecting to a restarted daemon.
        for round in 0..2u8 {
            let mut conn = tokio::net::UnixStream::connect(&socket)
                .await
                .expect("connect");
            let data: Vec<u8> = (0..3000u32)
                .map(|i| b'a' + ((i + u32::from(round)) % 26) as u8)
                .collect();
            tokio::io::AsyncWriteExt::write_all(&mut conn, &data)
                .await
                .expect("send");
            sent.extend_from_slice(&data);
            drop(conn);
            // Wait until the reader saw this connection end.
            let mut rx = reader.state.clone();
            rx.wait_for(|s| s.connections_ended == u64::from(round) + 1)
                .await
                .expect("reader alive");
        }
        assert!(size(&path) <= 1000 && size(&rotated_path(&path)) <= 1000);
        let kept = read_all(&path);
        assert_eq!(kept.len(), 2000);
        assert!(sent.ends_with(&kept));
    }
}
