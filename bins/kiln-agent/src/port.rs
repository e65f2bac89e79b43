//! The virtio-serial port: discovery by name and async I/O on a non-blocking fd.
//!
//! Owns: [`find_port`] (scans `/sys/class/virtio-ports/*/name`, there is no udev in the
//! guest) and [`VirtioPort`], an `AsyncRead + AsyncWrite` over `AsyncFd` (not
//! `tokio::fs::File`, whose parked blocking read would block writes).
//!
//! virtio-serial quirks handled here (kernel `drivers/char/virtio_console.c`):
//! - While no host is connected, `read` returns 0 and `poll` reports readable+hangup at once.
//!   A 0-byte read clears the fd's read readiness, so the next read waits for a new edge
//!   (the host connecting or sending) instead of spinning; [`Agent::serve`] returns `HostGone`
//!   and the caller serves again on the same port.
//! - While no host is connected, writes would block (`EAGAIN`); they resume when one connects.
//! - The port can be opened only once (`EBUSY`).
//!
//! [`Agent::serve`]: crate::session::Agent::serve

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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

/// A virtio-serial port opened `O_RDWR | O_NONBLOCK | O_CLOEXEC` and registered with tokio.
pub struct VirtioPort {
    fd: AsyncFd<File>,
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
        Ok(VirtioPort {
            fd: crate::sys::register_async_fd(file)?,
        })
    }
}

impl AsyncRead for VirtioPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| inner.get_ref().read(unfilled)) {
                Ok(Ok(0)) => {
                    // Host not connected: report EOF and wait for a fresh edge next time.
                    guard.clear_ready();
                    return Poll::Ready(Ok(()));
                }
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
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
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|inner| inner.get_ref().write(data)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
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
