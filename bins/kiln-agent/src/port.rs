//! The virtio-serial port: discovery by name and async I/O on a non-blocking fd.
//!
//! Owns: [`find_port`] (scans `/sys/class/virtio-ports/*/name`, there is no udev in the
//! guest) and [`VirtioPort`], an `AsyncRead + AsyncWrite` over a non-blocking fd driven by
//! tokio's `AsyncFd` (not `tokio::fs::File`, whose parked blocking read would block writes).
//!
//! virtio-serial quirks handled here (kernel `drivers/char/virtio_console.c`):
//! - While no host is connected, `read` returns 0 and `poll` reports `EPOLLIN | EPOLLHUP`
//!   (level, for as long as it lasts); the driver wakes pollers when a host connects, sends,
//!   or disconnects. tokio maps `EPOLLHUP` to a *final* closed state, so registering the port
//!   itself would make every later read attempt spin once a host reconnects (measured: a hot
//!   loop inside `poll_read` after the first disconnect). Instead the port sits in two private
//!   edge-triggered epolls ([`EdgeWatch`]) and tokio watches those.
//! - After a 0-byte read the port reports EOF once; [`Agent::serve`] returns `HostGone`, the
//!   caller serves again on the same port, and the next read waits for a new edge.
//! - While no host is connected, writes would block (`EAGAIN`); they resume when one connects.
//! - The port can be opened only once (`EBUSY`).
//!
//! [`Agent::serve`]: crate::session::Agent::serve

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sys::{Edge, EdgeWatch};

/// Where the kernel lists virtio-serial ports.
const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// The `/dev` node of the virtio-serial port called `name`, if it exists yet.
pub fn find_port(name: &str) -> io::Result<Option<PathBuf>> {
    find_port_in(Path::new(VIRTIO_PORTS), Path::new("/dev"), name)
}

fn find_port_in(sysfs: &Path, dev: &Path, name: &str) -> io::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(sysfs) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Ok(port_name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if port_name.trim_end() == name {
            let node = dev.join(entry.file_name());
            return Ok(node.exists().then_some(node));
        }
    }
    Ok(None)
}

/// A virtio-serial port opened `O_RDWR | O_NONBLOCK | O_CLOEXEC`, driven by tokio through two
/// private edge-triggered epolls (see [`EdgeWatch`]).
///
/// Each direction tries its syscall first; only after `EAGAIN` or EOF does it wait for a new
/// edge on its watch (drain the watch, clear tokio's readiness, retry). A read that returns 0
/// (no host connected) is reported as EOF once, and the next read waits for an edge (the host
/// connecting or sending) instead of returning EOF in a loop.
pub struct VirtioPort {
    read_edges: AsyncFd<EdgeWatch>,
    write_edges: AsyncFd<EdgeWatch>,
    file: File,
    /// The last read found nothing: wait for an edge before reading again.
    read_wait: bool,
    /// The last write would have blocked: wait for an edge before writing again.
    write_wait: bool,
}

impl VirtioPort {
    /// Opens the port device node. Must be called inside a tokio runtime.
    pub fn open(path: &Path) -> io::Result<VirtioPort> {
        // std adds O_CLOEXEC itself.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        VirtioPort::from_file(file)
    }

    /// Wraps an already open, non-blocking descriptor (a port, or a socket in tests).
    pub fn from_file(file: File) -> io::Result<VirtioPort> {
        let fd = file.as_raw_fd();
        Ok(VirtioPort {
            read_edges: EdgeWatch::new(fd, Edge::Readable)?.into_async()?,
            write_edges: EdgeWatch::new(fd, Edge::Writable)?.into_async()?,
            file,
            read_wait: false,
            write_wait: false,
        })
    }
}

/// Waits for a pending edge on `edges`, then consumes it.
fn poll_edge(edges: &AsyncFd<EdgeWatch>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    let mut guard = ready!(edges.poll_read_ready(cx))?;
    guard.get_inner().drain();
    guard.clear_ready();
    Poll::Ready(Ok(()))
}

impl AsyncRead for VirtioPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.read_wait {
                ready!(poll_edge(&this.read_edges, cx))?;
                this.read_wait = false;
            }
            match (&this.file).read(buf.initialize_unfilled()) {
                Ok(0) => {
                    // Host not connected: report EOF once, then wait for a fresh edge.
                    this.read_wait = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.read_wait = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for VirtioPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.write_wait {
                ready!(poll_edge(&this.write_edges, cx))?;
                this.write_wait = false;
            }
            match (&this.file).write(data) {
                Ok(n) => return Poll::Ready(Ok(n)),
                // No host connected, or the virtqueue is full.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.write_wait = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A port over one end of a socket pair, and the other end for the test.
    fn socket_port() -> (VirtioPort, tokio::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        b.set_nonblocking(true).expect("nonblocking");
        let port = VirtioPort::from_file(File::from(OwnedFd::from(a))).expect("port");
        let peer = tokio::net::UnixStream::from_std(b).expect("tokio stream");
        (port, peer)
    }

    #[tokio::test]
    async fn virtio_port_round_trips_both_ways_and_reports_eof() {
        let (mut port, mut peer) = socket_port();
        peer.write_all(b"ping").await.expect("peer write");
        let mut buf = [0u8; 4];
        port.read_exact(&mut buf).await.expect("port read");
        assert_eq!(&buf, b"ping");

        // Larger than the socket buffers: the port must wait for writability edges.
        let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
        let (written, got) = tokio::join!(
            async {
                port.write_all(&big).await.expect("port write");
                port
            },
            async {
                let mut got = vec![0u8; big.len()];
                peer.read_exact(&mut got).await.expect("peer read");
                (got, peer)
            }
        );
        let (got, peer) = got;
        assert!(got == big, "bytes differ");
        let mut port = written;
        drop(peer);
        assert_eq!(port.read(&mut buf).await.expect("eof"), 0);
    }

    #[test]
    fn find_port_matches_name_file() {
        let root = std::env::temp_dir().join(format!("kiln-port-test-{}", std::process::id()));
        let sys = root.join("sys");
        let dev = root.join("dev");
        for (port, name) in [
            ("vport0p0", "org.qemu.other"),
            ("vport1p1", "org.kiln.agent.0"),
        ] {
            std::fs::create_dir_all(sys.join(port)).expect("mkdir");
            std::fs::write(sys.join(port).join("name"), format!("{name}\n")).expect("write");
        }
        std::fs::create_dir_all(&dev).expect("mkdir");
        // Listed in sysfs but no device node yet: not found.
        assert_eq!(
            find_port_in(&sys, &dev, "org.kiln.agent.0").expect("scan"),
            None
        );
        std::fs::write(dev.join("vport1p1"), b"").expect("touch");
        assert_eq!(
            find_port_in(&sys, &dev, "org.kiln.agent.0").expect("scan"),
            Some(dev.join("vport1p1"))
        );
        assert_eq!(find_port_in(&sys, &dev, "nope").expect("scan"), None);
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
