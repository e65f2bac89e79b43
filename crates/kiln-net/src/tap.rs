//! Opening a tap device by name (`IFF_TAP | IFF_NO_PI`, non-blocking), for the harnesses that
//! play a guest with a namespaced Linux stack (`kiln bench network --relay`, the relay's
//! integration test). The engine's taps are opened by QEMU, not here. Must not: create
//! persistent taps or move them between namespaces (`ip` does that).

use std::fs::File;
use std::io;

/// Opens (creating it if missing) the tap `name` in the calling thread's network namespace.
#[allow(unsafe_code)]
pub fn open_tap(name: &str) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    if name.is_empty() || name.len() >= 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap name {name:?} must be 1 to 15 bytes"),
        ));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which IfReq matches in size (40
    // bytes) and layout for the fields used; the fd is a valid open /dev/net/tun and `req`
    // outlives the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bad_names_are_refused_before_any_ioctl() {
        for bad in ["", "a-name-of-16-byt"] {
            let e = super::open_tap(bad).expect_err(bad);
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{bad}");
        }
    }
}
