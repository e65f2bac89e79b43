//! Thin, safe wrappers around the Linux syscalls the agent needs.
//!
//! Owns: every `unsafe` block of the agent. Each wrapper validates its inputs (no interior NUL
//! bytes), makes exactly one libc call (or a short fixed sequence), and turns the result into
//! `io::Result`. Nothing here knows about the protocol or sessions.
//!
//! Invariants: every `unsafe` block has a `// SAFETY:` comment; pointers handed to the kernel
//! point to live, correctly sized, NUL-terminated buffers for the whole call.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// How a child process ended, decoded from a `waitpid` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// It called `exit(code)`.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interior nul byte"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `mount(2)`.
pub fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstring(source)?;
    let target = cstring(target)?;
    let fstype = fstype.map(cstring).transpose()?;
    let data = data.map(cstring).transpose()?;
    // SAFETY: all pointers are either null or point to NUL-terminated CStrings that outlive
    // the call; mount(2) only reads them.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast::<libc::c_void>()),
        )
    };
    check(ret).map(drop)
}

/// `finit_module(2)` with empty parameters.
pub fn finit_module(module: &File) -> io::Result<()> {
    let params = c"";
    // SAFETY: the fd is owned by `module` and open for the whole call; `params` is a static
    // NUL-terminated string.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            module.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    let ret = unsafe { libc::sethostname(name.as_ptr().cast::<libc::c_char>(), name.len()) };
    check(ret).map(drop)
}

/// `sync(2)`.
pub fn sync() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// `reboot(RB_POWER_OFF)`. Returns only if the kernel refused.
pub fn power_off() -> io::Error {
    // SAFETY: reboot takes a plain integer command; on success it does not return.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    io::Error::last_os_error()
}

/// `tcdrain(3)`: waits until output written to a terminal has been transmitted.
pub fn tcdrain(fd: RawFd) -> io::Result<()> {
    // SAFETY: tcdrain only takes an fd; an invalid one yields EBADF.
    check(unsafe { libc::tcdrain(fd) }).map(drop)
}

/// `fcntl(F_SETPIPE_SZ)`: grows a pipe's kernel buffer. Fewer, larger transfers between a
/// command and the agent matter under TCG, where every context switch is emulated.
pub fn set_pipe_size(fd: RawFd, bytes: i32) -> io::Result<()> {
    // SAFETY: fcntl with F_SETPIPE_SZ takes an fd and an integer; a non-pipe fd yields EBADF
    // or EINVAL and nothing else happens.
    check(unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, bytes) }).map(drop)
}

/// `kill(-pgid, signo)`: signals a whole process group.
pub fn kill_group(pgid: i32, signo: i32) -> io::Result<()> {
    if pgid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to signal process group <= 1",
        ));
    }
    // SAFETY: kill takes plain integers; a negative pid addresses a process group.
    check(unsafe { libc::kill(-pgid, signo) }).map(drop)
}

/// `waitpid(pid, WNOHANG)`; `pid == -1` waits for any child. `Ok(None)` if no matching child
/// has exited yet.
pub fn waitpid_nohang(pid: i32) -> io::Result<Option<(i32, ChildExit)>> {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid, writable c_int for the duration of the call.
    let ret = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    if ret == 0 {
        return Ok(None);
    }
    let exit = if libc::WIFEXITED(status) {
        ChildExit::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ChildExit::Signaled(libc::WTERMSIG(status))
    } else {
        // Stopped/continued are not reported without WUNTRACED/WCONTINUED.
        return Ok(None);
    };
    Ok(Some((ret, exit)))
}

/// Makes the child call `setsid()` before exec, so it leads a new session and process group
/// whose id equals its pid (the agent signals the whole group).
pub fn set_new_session(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and calls only setsid(2), which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A pseudo-terminal pair: the master the agent drives and the slave a command gets.
#[derive(Debug)]
pub struct Pty {
    /// The master side (close-on-exec, non-blocking).
    pub master: File,
    /// The slave side (close-on-exec; `Command` dups it onto 0, 1 and 2 of the child).
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal of `rows` × `cols`: `posix_openpt`, `unlockpt` and
/// `ioctl(TIOCGPTPEER)` (Linux ≥ 4.13), which opens the slave from the master itself, so no
/// `/dev/pts` path is looked up and both descriptors are close-on-exec from birth (no other
/// exec spawned meanwhile can inherit them).
pub fn open_pty(rows: u16, cols: u16) -> io::Result<Pty> {
    // SAFETY: posix_openpt takes flags and returns a new descriptor or -1.
    let raw = check(unsafe {
        libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
    })?;
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: unlockpt takes the master descriptor, open for the call.
    check(unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    set_winsize(master.as_raw_fd(), rows, cols)?;
    // SAFETY: TIOCGPTPEER takes open(2) flags as its argument and returns a new descriptor.
    let raw = check(unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok(Pty {
        master: File::from(master),
        slave,
    })
}

/// Registers a non-blocking file (a pty master) with the current tokio reactor.
pub fn async_file(file: File) -> io::Result<tokio::io::unix::AsyncFd<File>> {
    // SAFETY: `File` owns its descriptor: it stays open and refers to the same open file
    // description until the `AsyncFd` (which takes ownership) is dropped.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(file) }?)
}

/// `ioctl(TIOCSWINSZ)`: sets a terminal's size. On a pty master the kernel then sends
/// `SIGWINCH` to the slave's foreground process group (if the size changed).
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `ws` is a valid winsize the kernel only reads during the call; a descriptor
    // that is no terminal yields ENOTTY.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// Like [`set_new_session`], and then makes the child's stdin (the pty slave the caller put
/// on fd 0) its controlling terminal with `ioctl(TIOCSCTTY)`, so the line discipline's
/// Ctrl-C, `SIGWINCH` and job control reach its process groups.
pub fn set_new_session_with_ctty(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec (after the stdio dups) and calls only
    // setsid(2) and ioctl(2), both async-signal-safe, touching no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the child drop the agent's privileges before exec: `setgroups(groups)`,
/// `setgid(gid)`, `setuid(uid)`, in that order (each later call would lose the right to
/// make the earlier ones). Registered after [`set_new_session`] or
/// [`set_new_session_with_ctty`], it runs after them, and after `Command`'s own `chdir`, so a
/// working directory only root can enter (`/root`) is still entered, as runc does.
pub fn set_user(cmd: &mut Command, uid: u32, gid: u32, groups: Vec<u32>) {
    // SAFETY: the closure runs between fork and exec and calls only setgroups(2), setgid(2)
    // and setuid(2), all async-signal-safe; `groups` was allocated before the fork and is
    // only read (its pointer and length stay valid for the call), nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The agent's effective user and group ids.
pub fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid(2) and getegid(2) take no arguments and cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// `fchown(2)`: gives an open file (a pty slave) to `uid`:`gid`.
pub fn fchown(fd: &OwnedFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: fchown takes an open descriptor (borrowed for the call) and two integers.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

/// The kernel release (`uname -r`).
pub fn kernel_release() -> Option<String> {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } < 0 {
        return None;
    }
    // SAFETY: uname NUL-terminates every field within its fixed-size array.
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) };
    Some(release.to_string_lossy().into_owned())
}

/// Sets `IFF_UP` on a network interface (used for `lo`).
pub fn interface_up(name: &str) -> io::Result<()> {
    let sock = NetSocket::open()?;
    let flags = sock.flags(name)?;
    sock.set_flags(name, flags | libc::IFF_UP | libc::IFF_RUNNING)
}

/// The names of every network interface of the calling thread's network namespace
/// (`if_nameindex(3)`, which asks the kernel over rtnetlink, so it sees the namespace of the
/// calling thread, unlike `/sys/class/net`, which shows the namespace of whoever mounted
/// sysfs).
pub fn interface_names() -> io::Result<Vec<String>> {
    // SAFETY: if_nameindex takes no arguments and returns a heap array or null.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut names = Vec::new();
    let mut at = list;
    // SAFETY: the array ends with an entry whose index is 0 and name null; every entry before
    // it has a NUL-terminated name. `at` never passes that terminator, and the array stays
    // allocated until if_freenameindex below.
    unsafe {
        while (*at).if_index != 0 && !(*at).if_name.is_null() {
            names.push(CStr::from_ptr((*at).if_name).to_string_lossy().into_owned());
            at = at.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(names)
}

/// The kernel's `struct rtentry` (`<net/route.h>`; glibc's libc crate bindings lack it),
/// for `SIOCADDRT` / `SIOCDELRT`.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_tos: libc::c_uchar,
    rt_class: libc::c_uchar,
    rt_pad4: [libc::c_short; 3],
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// A `sockaddr` holding an `AF_INET` address (port 0).
fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-old-data structs; the kernel
    // reads a sockaddr of family AF_INET as a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// An `AF_INET` datagram socket for the interface and routing ioctls. Every ioctl acts on the
/// network namespace the socket was created in: that of the thread that called
/// [`NetSocket::open`].
#[derive(Debug)]
pub struct NetSocket(OwnedFd);

impl NetSocket {
    /// Opens the socket (close-on-exec).
    pub fn open() -> io::Result<NetSocket> {
        // SAFETY: socket takes plain integers; the result is checked before use.
        let raw = check(unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: `raw` is a fresh socket fd that nothing else owns.
        Ok(NetSocket(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    /// An `ifreq` naming `name`, everything else zero.
    fn ifreq(name: &str) -> io::Result<libc::ifreq> {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= ifr.ifr_name.len() || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad interface name",
            ));
        }
        for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        Ok(ifr)
    }

    /// `ioctl(request)` that only reads `ifr`.
    fn set(&self, request: libc::c_ulong, ifr: &libc::ifreq) -> io::Result<()> {
        // SAFETY: `ifr` is a valid ifreq with a NUL-terminated name and the member `request`
        // reads initialised by the caller; the set-requests only read it.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), request as _, ifr as *const libc::ifreq) })
            .map(drop)
    }

    /// `ioctl(request)` that fills `ifr`.
    fn get(&self, request: libc::c_ulong, ifr: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: `ifr` is a valid, writable ifreq with a NUL-terminated name; the
        // get-requests write one member of its union.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), request as _, ifr as *mut libc::ifreq) })
            .map(drop)
    }

    /// `SIOCGIFFLAGS`.
    pub fn flags(&self, name: &str) -> io::Result<libc::c_int> {
        let mut ifr = Self::ifreq(name)?;
        self.get(libc::SIOCGIFFLAGS, &mut ifr)?;
        // SAFETY: SIOCGIFFLAGS initialised the flags member of the union just above.
        Ok(libc::c_int::from(unsafe { ifr.ifr_ifru.ifru_flags }) & 0xffff)
    }

    /// `SIOCSIFFLAGS`.
    pub fn set_flags(&self, name: &str, flags: libc::c_int) -> io::Result<()> {
        let mut ifr = Self::ifreq(name)?;
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        self.set(libc::SIOCSIFFLAGS, &ifr)
    }

    /// The hardware type (`ARPHRD_*`) and address of an interface (`SIOCGIFHWADDR`).
    pub fn hwaddr(&self, name: &str) -> io::Result<(u16, [u8; 6])> {
        let mut ifr = Self::ifreq(name)?;
        self.get(libc::SIOCGIFHWADDR, &mut ifr)?;
        // SAFETY: SIOCGIFHWADDR initialised the hwaddr member of the union just above.
        let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (dst, src) in mac.iter_mut().zip(sa.sa_data.iter()) {
            *dst = *src as u8;
        }
        Ok((sa.sa_family, mac))
    }

    /// `SIOCSIFHWADDR` with an Ethernet address.
    pub fn set_hwaddr(&self, name: &str, mac: [u8; 6]) -> io::Result<()> {
        let mut ifr = Self::ifreq(name)?;
        // SAFETY: sockaddr is plain old data; all-zero is a valid value.
        let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
        sa.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in sa.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_hwaddr = sa;
        self.set(libc::SIOCSIFHWADDR, &ifr)
    }

    /// `SIOCSIFMTU`.
    pub fn set_mtu(&self, name: &str, mtu: u16) -> io::Result<()> {
        let mut ifr = Self::ifreq(name)?;
        ifr.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        self.set(libc::SIOCSIFMTU, &ifr)
    }

    /// `SIOCSIFADDR`: sets the interface's primary IPv4 address, replacing the previous one
    /// (with a classful netmask until [`NetSocket::set_netmask`]).
    pub fn set_address(&self, name: &str, addr: Ipv4Addr) -> io::Result<()> {
        let mut ifr = Self::ifreq(name)?;
        ifr.ifr_ifru.ifru_addr = sockaddr_v4(addr);
        self.set(libc::SIOCSIFADDR, &ifr)
    }

    /// `SIOCSIFNETMASK` (the broadcast address follows the new mask).
    pub fn set_netmask(&self, name: &str, mask: Ipv4Addr) -> io::Result<()> {
        let mut ifr = Self::ifreq(name)?;
        ifr.ifr_ifru.ifru_netmask = sockaddr_v4(mask);
        self.set(libc::SIOCSIFNETMASK, &ifr)
    }

    /// `SIOCDELRT` of one IPv4 default route (any device). `Ok(false)`: there was none.
    pub fn delete_default_route(&self) -> io::Result<bool> {
        // SAFETY: RtEntry is plain old data (a null rt_dev means "any device").
        let mut rt: RtEntry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
        rt.rt_flags = libc::RTF_UP;
        // SAFETY: `rt` is a valid rtentry for the whole call; SIOCDELRT only reads it.
        let ret = unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCDELRT as _, &rt) };
        match check(ret) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `SIOCADDRT` of the IPv4 default route via `gateway` on interface `name`.
    pub fn add_default_route(&self, name: &str, gateway: Ipv4Addr) -> io::Result<()> {
        let dev = cstring(name)?;
        // SAFETY: RtEntry is plain old data; all-zero is a valid value.
        let mut rt: RtEntry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr_v4(gateway);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        // The kernel copies the name in (strncpy_from_user) and never writes through it.
        rt.rt_dev = dev.as_ptr().cast_mut();
        // SAFETY: `rt` is a valid rtentry and `dev` a NUL-terminated string, both alive for
        // the whole call; SIOCADDRT only reads them.
        let ret = unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCADDRT as _, &rt) };
        check(ret).map(drop)
    }
}

/// The index of interface `name` (`if_nametoindex(3)`).
pub fn interface_index(name: &str) -> io::Result<u32> {
    let name = cstring(name)?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call; 0 means failure.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// rtnetlink message types and flags (`<linux/rtnetlink.h>`, `<linux/netlink.h>`).
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// `struct nlmsghdr` and `struct ifaddrmsg` sizes.
const NLMSG_HDR_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
/// Receive buffer for one batch of rtnetlink messages.
const NETLINK_RECV_BUF: usize = 32 << 10;

/// One IPv4 address of an interface, as rtnetlink reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ipv4IfAddr {
    prefix_len: u8,
    local: Option<[u8; 4]>,
    address: Option<[u8; 4]>,
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

const fn nl_align(len: usize) -> usize {
    (len + 3) & !3
}

/// An `ifaddrmsg` request: header, `ifaddrmsg`, and 4-byte IPv4 attributes.
fn addr_request(
    kind: u16,
    flags: u16,
    seq: u32,
    prefix_len: u8,
    index: u32,
    attrs: &[(u16, [u8; 4])],
) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + IFADDRMSG_LEN + attrs.len() * 8;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[libc::AF_INET as u8, prefix_len, 0, 0]);
    m.extend_from_slice(&index.to_ne_bytes());
    for (kind, value) in attrs {
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(value);
    }
    m
}

/// What one received batch of rtnetlink messages said.
#[derive(Debug, Default, PartialEq, Eq)]
struct NetlinkBatch {
    /// Addresses of the wanted interface (`RTM_NEWADDR`).
    addrs: Vec<Ipv4IfAddr>,
    /// `NLMSG_DONE` or an `NLMSG_ERROR` (ack) was seen: the request is answered.
    finished: bool,
    /// The error of an `NLMSG_ERROR` (0 = ack).
    errno: i32,
}

/// Parses a batch of rtnetlink messages, keeping the IPv4 addresses of interface `index`.
/// Malformed lengths end the parse (the kernel never sends them).
fn parse_netlink(b: &[u8], index: u32) -> NetlinkBatch {
    let mut out = NetlinkBatch::default();
    let mut at = 0;
    while let (Some(len), Some(kind)) = (read_u32(b, at), read_u16(b, at + 4)) {
        let len = len as usize;
        if len < NLMSG_HDR_LEN || at + len > b.len() {
            break;
        }
        let msg = &b[at..at + len];
        match kind {
            NLMSG_DONE => out.finished = true,
            NLMSG_ERROR => {
                out.finished = true;
                out.errno = read_u32(msg, NLMSG_HDR_LEN).map_or(0, |e| (e as i32).wrapping_neg());
            }
            RTM_NEWADDR if msg.len() >= NLMSG_HDR_LEN + IFADDRMSG_LEN => {
                let family = msg[NLMSG_HDR_LEN];
                let ifa_index = read_u32(msg, NLMSG_HDR_LEN + 4).unwrap_or(0);
                if family == libc::AF_INET as u8 && ifa_index == index {
                    let mut addr = Ipv4IfAddr {
                        prefix_len: msg[NLMSG_HDR_LEN + 1],
                        local: None,
                        address: None,
                    };
                    let mut a = NLMSG_HDR_LEN + IFADDRMSG_LEN;
                    while let (Some(alen), Some(akind)) = (read_u16(msg, a), read_u16(msg, a + 2)) {
                        let alen = usize::from(alen);
                        if alen < 4 || a + alen > msg.len() {
                            break;
                        }
                        let value: Option<[u8; 4]> = msg[a + 4..a + alen].try_into().ok();
                        match akind {
                            IFA_LOCAL => addr.local = value,
                            IFA_ADDRESS => addr.address = value,
                            _ => {}
                        }
                        a += nl_align(alen);
                    }
                    out.addrs.push(addr);
                }
            }
            _ => {}
        }
        at += nl_align(len);
    }
    out
}

/// A `NETLINK_ROUTE` socket of the calling thread's network namespace.
struct RtNetlink(OwnedFd);

impl RtNetlink {
    fn open() -> io::Result<RtNetlink> {
        // SAFETY: socket takes plain integers; the result is checked before use.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        })?;
        // SAFETY: `raw` is a fresh socket fd that nothing else owns.
        Ok(RtNetlink(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    /// Sends `msg` to the kernel (an unconnected netlink socket's default peer).
    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: the pointer and length describe `msg`, alive for the call; send only reads.
        let n = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one batch of messages into `buf`; returns its length.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the pointer and length describe `buf`, writable and alive for the call.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receives until the request is answered, collecting the addresses of `index`.
    fn answer(&self, index: u32, buf: &mut [u8]) -> io::Result<Vec<Ipv4IfAddr>> {
        let mut addrs = Vec::new();
        loop {
            let n = self.recv(buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "rtnetlink socket closed",
                ));
            }
            let batch = parse_netlink(&buf[..n], index);
            addrs.extend(batch.addrs);
            if batch.finished {
                if batch.errno != 0 {
                    return Err(io::Error::from_raw_os_error(batch.errno));
                }
                return Ok(addrs);
            }
        }
    }
}

/// Removes every IPv4 address of interface `index` (rtnetlink: an `RTM_GETADDR` dump, then
/// one `RTM_DELADDR` per address). Returns how many were removed. An address already gone
/// (a primary's secondaries go with it) is not an error.
pub fn flush_ipv4_addresses(index: u32) -> io::Result<usize> {
    let nl = RtNetlink::open()?;
    let mut buf = vec![0u8; NETLINK_RECV_BUF];
    nl.send(&addr_request(
        RTM_GETADDR,
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        0,
        0,
        &[],
    ))?;
    let addrs = nl.answer(index, &mut buf)?;
    let mut removed = 0;
    for (seq, addr) in (2u32..).zip(&addrs) {
        let attrs: Vec<(u16, [u8; 4])> = [(IFA_LOCAL, addr.local), (IFA_ADDRESS, addr.address)]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        let msg = addr_request(
            RTM_DELADDR,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            addr.prefix_len,
            index,
            &attrs,
        );
        nl.send(&msg)?;
        match nl.answer(index, &mut buf) {
            Ok(_) => removed += 1,
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Points fds 0, 1 and 2 at `file` (used by init to talk to /dev/console). If `file` itself
/// landed on one of them (they were closed), it stays open as that descriptor.
pub fn dup_to_stdio(file: File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    for target in 0..=2 {
        if fd == target {
            continue;
        }
        // SAFETY: dup2 takes plain fds; `file` is open for the call, and replacing 0..=2 is
        // the intent (no Rust object in this process owns them).
        check(unsafe { libc::dup2(fd, target) })?;
    }
    if fd <= 2 {
        // It is now one of the standard descriptors: keep it open.
        let _ = file.into_raw_fd();
    }
    Ok(())
}

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` (linux/random.h; not in the libc crate).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)` (linux/random.h; not in the libc crate).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `ioctl(RNDADDENTROPY)` on a random device: mixes `bytes` into the input pool and credits
/// `8 * bytes.len()` bits of entropy. Needs `CAP_SYS_ADMIN`.
pub fn rng_add_entropy(random: &File, bytes: &[u8]) -> io::Result<()> {
    let len = libc::c_int::try_from(bytes.len())
        .ok()
        .filter(|n| n.checked_mul(8).is_some())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many entropy bytes"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in a u32
    // buffer so it is correctly aligned.
    let mut info: Vec<u32> = Vec::with_capacity(2 + bytes.len().div_ceil(4));
    info.push(u32::from_ne_bytes((len * 8).to_ne_bytes()));
    info.push(u32::from_ne_bytes(len.to_ne_bytes()));
    for chunk in bytes.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info.push(u32::from_ne_bytes(word));
    }
    // SAFETY: `info` is a live, aligned rand_pool_info whose buffer holds `buf_size` bytes
    // (rounded up to whole words); the kernel only reads it during the call.
    let ret = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    check(ret).map(drop)
}

/// `ioctl(RNDRESEEDCRNG)`: re-keys the kernel's CRNG from the input pool now. Needs
/// `CAP_SYS_ADMIN` and an initialised CRNG.
pub fn rng_reseed_crng(random: &File) -> io::Result<()> {
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open for the call.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) }).map(drop)
}

/// `clock_gettime(CLOCK_REALTIME)` in nanoseconds since the epoch (negative before 1970).
pub fn clock_realtime_ns() -> io::Result<i128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    check(unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) })?;
    Ok(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
}

/// `clock_settime(CLOCK_REALTIME)`. Needs `CAP_SYS_TIME`.
pub fn set_clock_realtime(secs: u64, nanos: u32) -> io::Result<()> {
    let out_of_range = || io::Error::new(io::ErrorKind::InvalidInput, "time out of range");
    if nanos >= 1_000_000_000 {
        return Err(out_of_range());
    }
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(secs).map_err(|_| out_of_range())?,
        tv_nsec: libc::c_long::from(nanos),
    };
    // SAFETY: `ts` is a valid timespec the kernel only reads during the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

/// Which readiness an [`EdgeWatch`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    /// `EPOLLIN` (plus the always-reported `EPOLLHUP`/`EPOLLERR`).
    Readable,
    /// `EPOLLOUT` (plus the always-reported `EPOLLHUP`/`EPOLLERR`).
    Writable,
}

/// A private edge-triggered epoll instance watching one descriptor.
///
/// Why: tokio treats `EPOLLHUP` as a final "closed" state that is never cleared, but a
/// virtio-serial port reports `EPOLLHUP` whenever the host side is disconnected and recovers
/// when a host connects again. Watching the port through an inner edge-triggered epoll (whose
/// own fd is what tokio watches, and which never reports hangup) gives "something happened on
/// the port" edges without tokio's sticky closed state.
#[derive(Debug)]
pub struct EdgeWatch {
    epfd: OwnedFd,
}

impl EdgeWatch {
    /// Watches `fd` for `edge`. `fd` must stay open as long as the watch is used (the kernel
    /// drops the registration when it is closed).
    pub fn new(fd: RawFd, edge: Edge) -> io::Result<EdgeWatch> {
        // SAFETY: epoll_create1 takes a flag and returns a new descriptor or -1.
        let raw = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let epfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let events = match edge {
            Edge::Readable => libc::EPOLLIN,
            Edge::Writable => libc::EPOLLOUT,
        } | libc::EPOLLET;
        let mut event = libc::epoll_event {
            events: events as u32,
            u64: 0,
        };
        // SAFETY: both descriptors are valid for the call and `event` is a valid epoll_event.
        check(unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) })?;
        Ok(EdgeWatch { epfd })
    }

    /// Consumes every pending edge (non-blocking).
    pub fn drain(&self) {
        const BATCH: usize = 4;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        loop {
            // SAFETY: `events` is a writable array of BATCH epoll_events; timeout 0 never
            // blocks.
            let n = unsafe {
                libc::epoll_wait(
                    self.epfd.as_raw_fd(),
                    events.as_mut_ptr(),
                    BATCH as libc::c_int,
                    0,
                )
            };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if n < BATCH as libc::c_int {
                return;
            }
        }
    }

    /// Registers the watch with the current tokio reactor (it becomes readable when an edge
    /// is pending).
    pub fn into_async(self) -> io::Result<tokio::io::unix::AsyncFd<EdgeWatch>> {
        // SAFETY: `EdgeWatch` owns its epoll descriptor: it stays open and refers to the same
        // open file description until the `AsyncFd` (which takes ownership) is dropped, and
        // `as_raw_fd` always returns that same descriptor.
        Ok(unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        }?)
    }
}

impl AsRawFd for EdgeWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.epfd.as_raw_fd()
    }
}

#[cfg(test)]
mod netlink_tests {
    use super::*;

    #[test]
    fn parse_netlink_keeps_ipv4_addresses_of_the_interface_and_sees_done() {
        let mut batch = addr_request(
            RTM_NEWADDR,
            0,
            1,
            24,
            7,
            &[(IFA_ADDRESS, [10, 0, 0, 2]), (IFA_LOCAL, [10, 0, 0, 2])],
        );
        batch.extend(addr_request(
            RTM_NEWADDR,
            0,
            1,
            8,
            9,
            &[(IFA_LOCAL, [10, 9, 9, 9])],
        ));
        batch.extend(addr_request(NLMSG_DONE, 0, 1, 0, 0, &[]));
        let parsed = parse_netlink(&batch, 7);
        assert!(parsed.finished);
        assert_eq!(parsed.errno, 0);
        assert_eq!(
            parsed.addrs,
            [Ipv4IfAddr {
                prefix_len: 24,
                local: Some([10, 0, 0, 2]),
                address: Some([10, 0, 0, 2]),
            }]
        );
    }

    #[test]
    fn parse_netlink_reports_the_error_of_an_ack_and_stops_at_bad_lengths() {
        let mut err = Vec::new();
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-libc::EADDRNOTAVAIL).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        let parsed = parse_netlink(&err, 1);
        assert!(parsed.finished);
        assert_eq!(parsed.errno, libc::EADDRNOTAVAIL);
        // A length beyond the buffer: nothing parsed, no panic.
        let mut bad = addr_request(RTM_NEWADDR, 0, 1, 24, 1, &[(IFA_LOCAL, [1, 2, 3, 4])]);
        bad[0] = 200;
        assert_eq!(parse_netlink(&bad, 1), NetlinkBatch::default());
        assert_eq!(parse_netlink(&[1, 2, 3], 1), NetlinkBatch::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::zombie_processes)] // reaped by waitpid_nohang, the function under test
    fn waitpid_nohang_reports_exit_code() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exit 7"]);
        let child = cmd.spawn().expect("sh runs");
        let pid = i32::try_from(child.id()).expect("pid fits");
        let exit = loop {
            if let Some((p, exit)) = waitpid_nohang(pid).expect("child exists") {
                assert_eq!(p, pid);
                break exit;
            }
            std::thread::yield_now();
        };
        assert_eq!(exit, ChildExit::Exited(7));
    }

    #[test]
    fn kill_group_refuses_init_and_everyone() {
        assert!(kill_group(1, 0).is_err());
        assert!(kill_group(0, 0).is_err());
        assert!(kill_group(-5, 0).is_err());
    }

    #[test]
    fn clock_realtime_is_after_2000() {
        let ns = clock_realtime_ns().expect("readable");
        assert!(ns > 946_684_800 * 1_000_000_000);
    }

    #[test]
    fn set_clock_realtime_rejects_bad_nanos_before_the_kernel() {
        // Never reaches clock_settime: the host's clock is not touched.
        let err = set_clock_realtime(1, 1_000_000_000).expect_err("invalid");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn open_pty_slave_is_a_terminal_of_the_asked_size() {
        let pty = open_pty(33, 77).expect("ptys available");
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: `ws` is a valid, writable winsize; the slave is open.
        let ret = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(ret, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (33, 77));
        set_winsize(pty.master.as_raw_fd(), 40, 100).expect("resizes");
        // SAFETY: as above.
        let ret = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(ret, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (40, 100));
    }

    #[test]
    fn kernel_release_is_known() {
        assert!(kernel_release().is_some_and(|r| !r.is_empty()));
    }
}
