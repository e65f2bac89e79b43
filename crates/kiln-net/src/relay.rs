//! The user-mode relay of one sandbox: QEMU's `-netdev stream` socket on one side, passt on
//! the other, every guest frame through the [`Filter`], DNS answered by kiln.
//!
//! ```text
//!  QEMU (server, net.sock) ◀──len|frame──▶ relay task ◀──len|frame──▶ passt (--fd)
//!                                            │  Filter (Mutex, never held across .await)
//!                                            └─ DNS tasks (Resolver) ─▶ dns_done ─▶ guest
//! ```
//!
//! One task per sandbox (`kiln-net-relay`) owns both sockets and passt; frames are read with
//! cancel-safe buffered readers inside one `select!`. Owns: connecting to QEMU (retrying
//! while QEMU starts, reconnecting when QEMU's side closes but its socket still accepts: a
//! restarted daemon attaches the same way), frame-length validation, passt restarts
//! (rate-limited), periodic flow expiry. Must not: start QEMU or know sandboxes.
//!
//! Dropping the [`RelayHandle`] stops the task; passt is killed (and would exit anyway when
//! its socket closes).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_api_types::network::{NetStats, NetworkSpec, Refusal};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::GuestNet;
use crate::addr::HostAddrs;
use crate::dns::{self, Resolver};
use crate::filter::{DnsRequest, Filter, FilterError, Now, Output};
use crate::passt;

/// Largest frame on either socket: a 64 KiB IP packet plus its Ethernet header.
pub const MAX_FRAME: usize = 65535 + 14;
/// How long [`Relay::start`] keeps trying to connect to QEMU's socket.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// How long the relay keeps trying to reconnect after QEMU's side closed.
pub const RECONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Least time between two passt starts.
pub const PASST_RESTART_EVERY: Duration = Duration::from_secs(1);
/// How often the filter's half-close workaround is driven while a connection needs it.
pub const HALF_CLOSE_POLL: Duration = Duration::from_millis(50);
/// Capacity of the refusal channel ([`RelayHandle::refusals`]).
pub const REFUSAL_CHANNEL: usize = 256;

/// What the relay needs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// QEMU's `-netdev stream,server=on,addr.type=unix,addr.path=...` socket.
    pub qemu_socket: PathBuf,
    /// The guest's interface.
    pub guest: GuestNet,
    /// The policy (`allow` or `nat`).
    pub spec: NetworkSpec,
    /// Upstream DNS servers (see [`dns::upstreams_from_resolv_conf`]).
    pub upstream_dns: Vec<SocketAddr>,
    /// The passt binary.
    pub passt: PathBuf,
}

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The policy is not a user-mode one.
    #[error("invalid policy for the relay")]
    Policy(#[from] FilterError),
    /// QEMU's socket did not accept a connection in time.
    #[error("cannot connect to qemu's network socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The last error.
        #[source]
        source: std::io::Error,
    },
    /// A frame length out of bounds: the stream is corrupt.
    #[error("bad frame length {len} from {from}")]
    BadFrame {
        /// `qemu` or `passt`.
        from: &'static str,
        /// The length read.
        len: usize,
    },
    /// passt could not be started.
    #[error("cannot start passt")]
    Passt(#[from] passt::PasstError),
    /// Socket I/O failed.
    #[error("relay i/o error")]
    Io(#[from] std::io::Error),
    /// The relay has stopped.
    #[error("the network relay has stopped")]
    Stopped,
}

/// Reads length-prefixed frames; cancel-safe (bytes land in `buf` before any await ends).
struct FrameReader<R> {
    r: R,
    buf: Vec<u8>,
    from: &'static str,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(r: R, from: &'static str) -> Self {
        FrameReader {
            r,
            buf: Vec::with_capacity(2 * MAX_FRAME),
            from,
        }
    }

    /// The next frame, `None` at end of stream.
    async fn next(&mut self) -> Result<Option<Vec<u8>>, RelayError> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > MAX_FRAME {
                    return Err(RelayError::BadFrame {
                        from: self.from,
                        len,
                    });
                }
                if self.buf.len() >= 4 + len {
                    let frame = self.buf[4..4 + len].to_vec();
                    self.buf.drain(..4 + len);
                    return Ok(Some(frame));
                }
            }
            self.buf.reserve(MAX_FRAME);
            if self.r.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(w: &mut W, frames: &[Vec<u8>]) -> std::io::Result<()> {
    if frames.is_empty() {
        return Ok(());
    }
    let mut b = Vec::with_capacity(frames.iter().map(|f| f.len() + 4).sum());
    for f in frames {
        b.extend_from_slice(&(f.len() as u32).to_be_bytes());
        b.extend_from_slice(f);
    }
    w.write_all(&b).await
}

async fn connect_qemu(
    path: &std::path::Path,
    deadline: Duration,
) -> Result<UnixStream, RelayError> {
    let until = Instant::now() + deadline;
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= until => {
                return Err(RelayError::Connect {
                    path: path.to_owned(),
                    source: e,
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

enum Ctl {
    SetPolicy(NetworkSpec, oneshot::Sender<Result<(), RelayError>>),
}

struct Shared {
    filter: Mutex<Filter>,
    /// The running passt's pid (0 while none).
    passt_pid: AtomicU32,
}

impl Shared {
    fn filter(&self) -> MutexGuard<'_, Filter> {
        self.filter.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts relays.
#[derive(Debug)]
pub struct Relay;

/// A running relay. Dropping it stops the relay and kills passt.
#[derive(Debug)]
pub struct RelayHandle {
    ctl: mpsc::Sender<Ctl>,
    shared: Arc<SharedDebug>,
    refusals: Option<mpsc::Receiver<Refusal>>,
    task: Option<tokio::task::JoinHandle<Result<(), RelayError>>>,
}

/// `Shared` behind a Debug-able wrapper.
struct SharedDebug(Shared);

impl std::fmt::Debug for SharedDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared { .. }")
    }
}

impl Relay {
    /// Connects to QEMU's socket (retrying up to [`CONNECT_DEADLINE`] while QEMU starts),
    /// starts passt and the relay task.
    pub async fn start(cfg: RelayConfig) -> Result<RelayHandle, RelayError> {
        let (ev_tx, ev_rx) = mpsc::channel(REFUSAL_CHANNEL);
        let filter = Filter::new(
            cfg.guest.clone(),
            &cfg.spec,
            HostAddrs::read(Instant::now()),
            Some(ev_tx),
        )?;
        let qemu = connect_qemu(&cfg.qemu_socket, CONNECT_DEADLINE).await?;
        let p = passt::spawn(&cfg.passt, &cfg.guest)?;
        let shared = Arc::new(SharedDebug(Shared {
            filter: Mutex::new(filter),
            passt_pid: AtomicU32::new(p.child.id().unwrap_or(0)),
        }));
        let (ctl_tx, ctl_rx) = mpsc::channel(8);
        let span = tracing::info_span!("kiln-net-relay", guest = %cfg.guest.address);
        let task = tokio::spawn(tracing::Instrument::instrument(
            run(cfg, shared.clone(), qemu, p, ctl_rx),
            span,
        ));
        Ok(RelayHandle {
            ctl: ctl_tx,
            shared,
            refusals: Some(ev_rx),
            task: Some(task),
        })
    }
}

impl RelayHandle {
    /// Replaces the policy (`allow` or `nat`); flows no longer allowed are reset at once.
    pub async fn set_policy(&self, spec: NetworkSpec) -> Result<(), RelayError> {
        let (tx, rx) = oneshot::channel();
        self.ctl
            .send(Ctl::SetPolicy(spec, tx))
            .await
            .map_err(|_| RelayError::Stopped)?;
        rx.await.map_err(|_| RelayError::Stopped)?
    }

    /// Counters and the newest refusals (oldest first).
    pub fn stats(&self) -> (NetStats, Vec<Refusal>) {
        let f = self.shared.0.filter();
        (f.stats(), f.refusals())
    }

    /// The refusals as they happen (bounded; refusals are dropped while it is full). Taken
    /// once: later calls return `None`.
    pub fn refusals(&mut self) -> Option<mpsc::Receiver<Refusal>> {
        self.refusals.take()
    }

    /// The pid of the running passt, if any.
    pub fn passt_pid(&self) -> Option<u32> {
        Some(self.shared.0.passt_pid.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    /// Whether the relay task still runs.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the relay and passt; returns how the relay ended (an error if it had failed).
    pub async fn shutdown(mut self) -> Result<(), RelayError> {
        let Some(t) = self.task.take() else {
            return Ok(());
        };
        t.abort();
        match t.await {
            Ok(r) => r,
            Err(e) if e.is_cancelled() => Ok(()),
            Err(_) => Err(RelayError::Stopped),
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

type DnsDone = (DnsRequest, Result<dns::Resolved, dns::DnsError>);

/// Frames queued towards one socket. Each frame is written with its length in one `write`,
/// so it reaches the socket as one piece whenever it fits in one socket buffer chunk: passt's
/// reader (0.0~git20230309) drops a length header that arrives split from its frame.
pub const WRITE_QUEUE: usize = 512;
/// Least free room in a write queue before the relay reads more frames for it (one guest
/// frame can release up to this many held frames).
const QUEUE_HEADROOM: usize = 64;

/// Starts a task writing the frames sent on the returned channel to `w`; it ends when the
/// channel closes or a write fails (the reader of that socket then sees the end).
fn spawn_writer<W: AsyncWrite + Unpin + Send + 'static>(
    mut w: W,
    to: &'static str,
) -> mpsc::Sender<Vec<u8>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if let Err(e) = write_frames(&mut w, std::slice::from_ref(&f)).await {
                tracing::debug!(to, error = %e, "relay write failed");
                return;
            }
        }
    });
    tx
}

/// Queues frames without waiting; the callers keep [`QUEUE_HEADROOM`] free, so a full queue
/// (a stuck peer) only drops frames, like a full NIC ring.
fn queue(tx: &mpsc::Sender<Vec<u8>>, frames: Vec<Vec<u8>>) {
    for f in frames {
        if tx.try_send(f).is_err() {
            tracing::debug!("relay queue full or closed; frame dropped");
        }
    }
}

/// The relay task. Reading never waits for a write: both directions keep flowing when one
/// peer is slow (passt drops frames it cannot send, so a stalled reader would cost it ACKs).
async fn run(
    cfg: RelayConfig,
    shared: Arc<SharedDebug>,
    qemu: UnixStream,
    p: passt::Passt,
    mut ctl: mpsc::Receiver<Ctl>,
) -> Result<(), RelayError> {
    let resolver = Arc::new(Resolver::new(cfg.upstream_dns.clone()));
    let (dns_tx, mut dns_rx) = mpsc::channel::<DnsDone>(64);
    let (qr, qw) = qemu.into_split();
    let mut qr = FrameReader::new(qr, "qemu");
    let mut to_guest = spawn_writer(qw, "qemu");
    let passt::Passt { mut child, stream } = p;
    let (pr, pw) = stream.into_split();
    let mut pr = FrameReader::new(pr, "passt");
    let mut to_passt = spawn_writer(pw, "passt");
    let mut last_passt_start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut half_tick = tokio::time::interval(HALF_CLOSE_POLL);
    half_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let filter = || shared.0.filter();
    loop {
        let mut out = Output::default();
        let passt_room = to_passt.capacity() >= QUEUE_HEADROOM;
        let guest_room = to_guest.capacity() >= QUEUE_HEADROOM;
        let (passt_q, guest_q) = (to_passt.clone(), to_guest.clone());
        let half_closing = filter().half_closing();
        tokio::select! {
            frame = qr.next(), if passt_room => match frame? {
                Some(frame) => {
                    let now = Now::read();
                    let mut f = filter();
                    f.host_addrs_mut().refresh(now.mono);
                    f.from_guest(&frame, now, &mut out);
                }
                None => {
                    tracing::info!(socket = %cfg.qemu_socket.display(), "qemu closed the network socket; reconnecting");
                    let s = connect_qemu(&cfg.qemu_socket, RECONNECT_DEADLINE).await?;
                    let (r, w) = s.into_split();
                    qr = FrameReader::new(r, "qemu");
                    to_guest = spawn_writer(w, "qemu");
                    continue;
                }
            },
            frame = pr.next(), if guest_room => match frame {
                Ok(Some(frame)) => {
                    if filter().from_passt(&frame, Now::read(), &mut out) {
                        out.to_guest.push(frame);
                    }
                }
                Ok(None) | Err(_) => {
                    // passt closed its end (or corrupted the stream): restart it.
                    let _ = child.start_kill();
                    let status = child.wait().await;
                    shared.0.passt_pid.store(0, Ordering::Relaxed);
                    tracing::warn!(?status, "passt exited; restarting");
                    let wait = PASST_RESTART_EVERY.saturating_sub(last_passt_start.elapsed());
                    tokio::time::sleep(wait).await;
                    let p = passt::spawn(&cfg.passt, &cfg.guest)?;
                    child = p.child;
                    shared.0.passt_pid.store(child.id().unwrap_or(0), Ordering::Relaxed);
                    last_passt_start = Instant::now();
                    let (r, w) = p.stream.into_split();
                    pr = FrameReader::new(r, "passt");
                    to_passt = spawn_writer(w, "passt");
                    filter().reset_all(&mut out);
                }
            },
            // Wake up when a full queue drains.
            _ = passt_q.reserve(), if !passt_room => {}
            _ = guest_q.reserve(), if !guest_room => {}
            done = dns_rx.recv() => {
                if let Some((req, result)) = done {
                    filter().dns_done(req, result, Now::read(), &mut out);
                }
            }
            c = ctl.recv() => match c {
                Some(Ctl::SetPolicy(spec, reply)) => {
                    let r = filter().set_policy(&spec, Now::read(), &mut out);
                    let _ = reply.send(r.map_err(RelayError::from));
                }
                None => return Ok(()),
            },
            _ = tick.tick() => filter().expire(Instant::now()),
            // The filter's half-close workaround for passt (see `filter::HalfClose`).
            _ = half_tick.tick(), if half_closing => filter().poll(Now::read(), &mut out),
        }
        for req in out.dns.drain(..) {
            let resolver = resolver.clone();
            let tx = dns_tx.clone();
            tokio::spawn(async move {
                let r = resolver.resolve(&req.question.name).await;
                let _ = tx.send((req, r)).await;
            });
        }
        queue(&to_passt, out.to_passt);
        queue(&to_guest, out.to_guest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frame_reader_splits_frames_and_rejects_bad_lengths() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = FrameReader::new(b, "qemu");
        write_frames(&mut a, &[vec![1; 60], vec![2; 14]])
            .await
            .unwrap();
        assert_eq!(r.next().await.unwrap().unwrap(), vec![1; 60]);
        assert_eq!(r.next().await.unwrap().unwrap(), vec![2; 14]);
        a.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let e = r.next().await.unwrap_err();
        assert!(
            matches!(e, RelayError::BadFrame { len, .. } if len == MAX_FRAME + 1),
            "{e}"
        );
        drop(a);
        let (a, b) = tokio::io::duplex(64);
        drop(a);
        assert!(FrameReader::new(b, "qemu").next().await.unwrap().is_none());
    }

    use std::net::Ipv4Addr;

    use tokio::net::UnixListener;

    use crate::Mac;

    fn config(sock: PathBuf) -> RelayConfig {
        RelayConfig {
            qemu_socket: sock,
            guest: GuestNet {
                mac: Mac([2, 0, 0, 0, 0, 1]),
                address: Ipv4Addr::new(10, 0, 2, 15),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 0, 2, 2),
                mtu: passt::DEFAULT_MTU,
            },
            spec: NetworkSpec::Nat,
            upstream_dns: vec![],
            passt: PathBuf::from("passt"),
        }
    }

    fn alive(pid: u32) -> bool {
        // A killed child may linger as a zombie until reaped: count that as gone.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
            .unwrap_or(false)
    }

    async fn poll_until(what: &str, mut f: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn relay_reconnects_when_qemu_side_closes() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("net.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let h = Relay::start(config(sock)).await.unwrap();
        let (first, _) = l.accept().await.unwrap();
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(10), l.accept()).await;
        assert!(second.is_ok(), "the relay connected again");
        assert!(h.is_running());
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn relay_bad_frame_length_ends_with_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("net.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let h = Relay::start(config(sock)).await.unwrap();
        let (mut c, _) = l.accept().await.unwrap();
        c.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        poll_until("the relay to stop", || !h.is_running()).await;
        let e = h.shutdown().await.unwrap_err();
        assert!(
            matches!(e, RelayError::BadFrame { from: "qemu", .. }),
            "{e}"
        );
    }

    #[tokio::test]
    async fn relay_restarts_passt_and_drop_kills_it() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("net.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let h = Relay::start(config(sock)).await.unwrap();
        let _c = l.accept().await.unwrap();
        let first = h.passt_pid().expect("passt runs");
        assert!(alive(first));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(first as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        poll_until("a new passt", || h.passt_pid().is_some_and(|p| p != first)).await;
        let second = h.passt_pid().unwrap();
        assert!(alive(second));
        drop(h);
        poll_until("passt to end after the handle is dropped", || {
            !alive(second)
        })
        .await;
    }
}
