//! Starting `passt`, which turns the frames kiln's filter lets through into host sockets.
//!
//! kiln and passt talk over a `socketpair(AF_UNIX, SOCK_STREAM)`; passt gets its end with
//! `--fd N`. The stream carries Ethernet frames, each prefixed by its length (QEMU's `stream`
//! netdev framing, which passt speaks natively):
//!
//! ```text
//! | length: u32 big-endian | Ethernet frame (length bytes) | length | frame | ...
//! ```
//!
//! passt (0.0~git20230309) exits by itself when kiln's end closes (verified by
//! `passt_exits_when_kiln_end_closes`), so a crashed daemon leaks no passt: the kernel closes
//! kiln's end. Must not: filter anything (passt only sees what `filter.rs` allowed) or read
//! frames (the relay does).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

use crate::GuestNet;

/// Default MTU of user-mode guests: passt's own default and largest useful value (its
/// segments are then up to 64 KiB, which is what makes TCP through passt fast).
pub const DEFAULT_MTU: u16 = 65520;

/// The fd number passt's end of the socketpair gets in the child.
const PASST_FD: i32 = 3;

/// Errors starting passt.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    /// The socketpair could not be made.
    #[error("failed to create the socketpair for passt")]
    Socketpair(#[source] nix::Error),
    /// The process could not be started.
    #[error("failed to start {path}")]
    Spawn {
        /// The passt binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A socket operation failed.
    #[error("passt socket error")]
    Io(#[from] std::io::Error),
}

/// passt's arguments for `guest`, with its end of the socketpair at `fd`.
pub fn args(guest: &GuestNet, fd: i32) -> Vec<String> {
    [
        "-f",
        "-q",
        "-4",
        // Without this, passt maps the gateway address to the host's loopback.
        "--no-map-gw",
        "-t",
        "none",
        "-u",
        "none",
        "--no-dhcp",
        "--no-ndp",
        "--no-dhcpv6",
        "--no-ra",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([
        "--fd".into(),
        fd.to_string(),
        "-a".into(),
        guest.address.to_string(),
        "-n".into(),
        guest.prefix_len.to_string(),
        "-g".into(),
        guest.gateway.to_string(),
        "-m".into(),
        guest.mtu.to_string(),
    ])
    .collect()
}

/// A running passt and kiln's end of its socketpair.
#[derive(Debug)]
pub struct Passt {
    /// The process (killed when dropped).
    pub child: tokio::process::Child,
    /// kiln's end of the socketpair.
    pub stream: tokio::net::UnixStream,
}

/// Starts `binary` for `guest`.
pub fn spawn(binary: &Path, guest: &GuestNet) -> Result<Passt, PasstError> {
    // Both ends close-on-exec: only passt gets its end (dup2'ed to fd 3 in the child), so no
    // other child of the daemon (QEMU) keeps it open and passt exits when kiln's end closes.
    let (ours, theirs): (OwnedFd, OwnedFd) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(PasstError::Socketpair)?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args(guest, PASST_FD))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    let theirs_raw = theirs.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls only dup2 and fcntl
    // (async-signal-safe); it allocates nothing and touches no lock.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            if theirs_raw == PASST_FD {
                // Already at fd 3: just clear close-on-exec.
                let flags = libc::fcntl(PASST_FD, libc::F_GETFD);
                if flags < 0 || libc::fcntl(PASST_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(theirs_raw, PASST_FD) < 0 {
                // dup2 clears close-on-exec on the new descriptor.
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| PasstError::Spawn {
        path: binary.to_owned(),
        source,
    })?;
    drop(theirs);
    let std_stream = std::os::unix::net::UnixStream::from(ours);
    std_stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(std_stream)?;
    Ok(Passt { child, stream })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::Mac;

    fn guest() -> GuestNet {
        GuestNet {
            mac: Mac([2, 0, 0, 0, 0, 1]),
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            mtu: DEFAULT_MTU,
        }
    }

    #[test]
    fn passt_args_carry_the_guest_and_the_safety_flags() {
        let a = args(&guest(), 3).join(" ");
        for want in [
            "--no-map-gw",
            "-t none",
            "-u none",
            "--no-dhcp",
            "--fd 3",
            "-a 10.0.2.15",
            "-n 24",
            "-g 10.0.2.2",
            "-m 65520",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
    }

    /// Needs the passt binary (installed on kiln's machines).
    #[tokio::test]
    async fn passt_exits_when_kiln_end_closes() {
        let mut p = spawn(Path::new("passt"), &guest()).expect("passt starts");
        // It is running (it would have exited at once on bad arguments).
        let early = tokio::time::timeout(Duration::from_millis(300), p.child.wait()).await;
        assert!(early.is_err(), "passt exited early: {early:?}");
        drop(p.stream);
        let status = tokio::time::timeout(Duration::from_secs(10), p.child.wait())
            .await
            .expect("passt exits within 10 s of kiln closing its end")
            .unwrap();
        assert!(status.success(), "{status}");
    }
}
