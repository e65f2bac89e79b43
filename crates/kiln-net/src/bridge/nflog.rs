//! The refused-connection log of the bridge mode: the refusing rules of [`super::nft`] also
//! send the packet's first bytes to nfnetlink_log group [`NFLOG_GROUP`] (`log group N prefix
//! "kiln-…"`, rate-limited in the rules); [`NflogListener`] reads them on a netlink socket
//! (`NETLINK_NETFILTER`) and turns each into a [`LogRecord`] (source, destination, protocol,
//! why).
//!
//! Why hand-written and not a netlink crate: the part of nfnetlink_log used is three config
//! messages and one message type with two attributes (prefix, payload), plus an IPv4 header
//! and a port; the rust-netlink crates would add a dependency stack (and `netlink-sys`'s
//! socket layer) for that, while `nix` (already a dependency) gives a safe netlink socket. Every
//! length read from the kernel is bounded and checked before use ([`parse_messages`] never
//! panics, tested with random bytes).
//!
//! A netlink socket belongs to the network namespace of the thread that creates it:
//! [`NflogListener::spawn`] opens it on the calling thread. Only one socket per namespace can
//! bind a group: a second daemon in the same namespace gets `EBUSY` and runs without the log.
//! Must not: change rules (the log only reads).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kiln_api_types::RefusalReason;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};

/// The nfnetlink_log group kiln's bridge rules log refusals to.
pub const NFLOG_GROUP: u16 = 2140;
/// Bytes of each refused packet copied to kiln: the IPv4 header with options (at most 60)
/// and the ports.
pub const COPY_RANGE: u32 = 64;
/// Log prefix of guest → host refusals.
pub const PREFIX_HOST: &str = "kiln-host";
/// Log prefix of guest → closed destination refusals.
pub const PREFIX_CLOSED: &str = "kiln-closed";
/// Log prefix of guest → guest (outside the group) refusals.
pub const PREFIX_PEER: &str = "kiln-peer";

/// Most records one [`parse_messages`] returns (a datagram holds a few dozen at most).
const MAX_RECORDS: usize = 256;
/// The receive buffer: one netlink datagram.
const RECV_BUF: usize = 64 * 1024;
/// How often the listener thread checks whether it should stop.
const POLL: Duration = Duration::from_millis(200);

// nfnetlink constants (linux/netfilter/nfnetlink.h, nfnetlink_log.h).
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_CFG_CMD_PF_BIND: u8 = 3;
const NFULNL_CFG_CMD_PF_UNBIND: u8 = 4;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
const AF_INET: u8 = 2;
const AF_BRIDGE: u8 = 7;

/// Which rule refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogReason {
    /// Guest → the host (anything but DNS on the gateway).
    Host,
    /// Guest → a closed destination (private, loopback, link-local, the host's networks…).
    Closed,
    /// Guest → another guest outside its group.
    Peer,
}

impl LogReason {
    /// The reason of a log prefix kiln's rules set; `None` for any other.
    pub fn from_prefix(prefix: &[u8]) -> Option<LogReason> {
        match prefix {
            p if p == PREFIX_HOST.as_bytes() => Some(LogReason::Host),
            p if p == PREFIX_CLOSED.as_bytes() => Some(LogReason::Closed),
            p if p == PREFIX_PEER.as_bytes() => Some(LogReason::Peer),
            _ => None,
        }
    }

    /// The API's reason for a refusal of `dst`: a closed destination is named by its range.
    pub fn refusal_reason(self, dst: Ipv4Addr) -> RefusalReason {
        match self {
            LogReason::Host => RefusalReason::Host,
            LogReason::Peer => RefusalReason::OtherSandbox,
            LogReason::Closed if dst.is_loopback() => RefusalReason::Loopback,
            LogReason::Closed if dst.is_link_local() => RefusalReason::LinkLocal,
            LogReason::Closed if dst.is_private() => RefusalReason::Private,
            LogReason::Closed => RefusalReason::Special,
        }
    }
}

/// One refused packet as the log reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Which rule refused it.
    pub reason: LogReason,
    /// `tcp`, `udp`, `icmp` or `ip`.
    pub protocol: &'static str,
    /// The guest's address.
    pub source: Ipv4Addr,
    /// Where it wanted to go.
    pub destination: Ipv4Addr,
    /// The destination port (TCP and UDP).
    pub port: Option<u16>,
}

impl LogRecord {
    /// `ip:port` (port 0 for protocols without ports), as [`kiln_api_types::Refusal`] has it.
    pub fn destination_text(&self) -> String {
        format!("{}:{}", self.destination, self.port.unwrap_or(0))
    }
}

fn u16_ne(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_ne(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Netlink alignment (4 bytes), `None` on overflow.
fn align4(n: usize) -> Option<usize> {
    n.checked_add(3).map(|n| n & !3)
}

/// The records of kiln's prefixes in one netlink datagram; anything else (other prefixes,
/// non-IPv4 payloads, truncated or malformed messages) is skipped.
pub fn parse_messages(buf: &[u8]) -> Vec<LogRecord> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while out.len() < MAX_RECORDS {
        let Some(len) = u32_ne(buf, at).and_then(|l| usize::try_from(l).ok()) else {
            break;
        };
        if len < NLMSG_HDRLEN || len > buf.len() - at {
            break;
        }
        let Some(kind) = u16_ne(buf, at + 4) else {
            break;
        };
        let msg = &buf[at..at + len];
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
            && let Some(r) = parse_packet(msg)
        {
            out.push(r);
        }
        match align4(len).and_then(|l| at.checked_add(l)) {
            Some(next) if next > at => at = next,
            _ => break,
        }
    }
    out
}

/// One `NFULNL_MSG_PACKET` (netlink header included).
fn parse_packet(msg: &[u8]) -> Option<LogRecord> {
    let family = *msg.get(NLMSG_HDRLEN)?;
    if family != AF_INET && family != AF_BRIDGE {
        return None;
    }
    let mut at = NLMSG_HDRLEN + NFGENMSG_LEN;
    let (mut prefix, mut payload) = (None, None);
    while at + NLA_HDRLEN <= msg.len() {
        let len = usize::from(u16_ne(msg, at)?);
        let kind = u16_ne(msg, at + 2)? & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > msg.len() - at {
            return None;
        }
        let value = &msg[at + NLA_HDRLEN..at + len];
        match kind {
            NFULA_PREFIX => prefix = Some(value.split(|b| *b == 0).next().unwrap_or(value)),
            NFULA_PAYLOAD => payload = Some(value),
            _ => {}
        }
        at = at.checked_add(align4(len)?)?;
    }
    let reason = LogReason::from_prefix(prefix?)?;
    let (protocol, source, destination, port) = parse_ipv4(payload?)?;
    Some(LogRecord {
        reason,
        protocol,
        source,
        destination,
        port,
    })
}

/// Protocol, source, destination and destination port of an IPv4 packet's first bytes.
pub fn parse_ipv4(p: &[u8]) -> Option<(&'static str, Ipv4Addr, Ipv4Addr, Option<u16>)> {
    let first = *p.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 || p.len() < 20 {
        return None;
    }
    let addr = |at: usize| -> Option<Ipv4Addr> {
        let b: [u8; 4] = p.get(at..at + 4)?.try_into().ok()?;
        Some(Ipv4Addr::from(b))
    };
    let (src, dst) = (addr(12)?, addr(16)?);
    // A non-first fragment has no transport header.
    let fragment_offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
    let port = || {
        (fragment_offset == 0)
            .then(|| p.get(ihl + 2..ihl + 4))
            .flatten()
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    Some(match p[9] {
        6 => ("tcp", src, dst, port()),
        17 => ("udp", src, dst, port()),
        1 => ("icmp", src, dst, None),
        _ => ("ip", src, dst, None),
    })
}

/// A config message: `cmd` for group `group` (and protocol family `family`), or the copy mode.
fn config_message(seq: u32, family: u8, group: u16, attr: (u16, &[u8])) -> Vec<u8> {
    let (kind, value) = attr;
    let nla_len = NLA_HDRLEN + value.len();
    let total = NLMSG_HDRLEN + NFGENMSG_LEN + nla_len.div_ceil(4) * 4;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, 0]);
    m.extend_from_slice(&group.to_be_bytes());
    m.extend_from_slice(&(nla_len as u16).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(value);
    m.resize(total, 0);
    m
}

/// The error code of an `NLMSG_ERROR` answer to `seq` (0 is an ACK), if `buf` holds one.
fn ack_of(buf: &[u8], seq: u32) -> Option<i32> {
    let mut at = 0usize;
    loop {
        let len = usize::try_from(u32_ne(buf, at)?).ok()?;
        if len < NLMSG_HDRLEN || len > buf.len() - at {
            return None;
        }
        if u16_ne(buf, at + 4)? == NLMSG_ERROR && u32_ne(buf, at + NLMSG_HDRLEN + 12)? == seq {
            return Some(i32::from_ne_bytes(
                buf.get(at + NLMSG_HDRLEN..at + NLMSG_HDRLEN + 4)?
                    .try_into()
                    .ok()?,
            ));
        }
        at = at.checked_add(align4(len)?)?;
    }
}

/// A bound nfnetlink_log socket.
#[derive(Debug)]
pub struct NflogSocket {
    fd: OwnedFd,
    seq: u32,
}

impl NflogSocket {
    /// Opens a socket in the calling thread's network namespace, binds `group` and asks for the
    /// first [`COPY_RANGE`] bytes of each packet. Fails when nfnetlink_log is unavailable or
    /// the group is bound by another socket.
    pub fn open(group: u16) -> io::Result<NflogSocket> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, POLL.as_micros() as _),
        )?;
        // A larger buffer loses fewer records in a burst; the kernel caps it.
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(1 << 20));
        let mut s = NflogSocket { fd, seq: 0 };
        // Pre-3.17 kernels need a logger per protocol family; newer ones ignore these.
        for family in [AF_INET, AF_BRIDGE] {
            let _ = s.config(family, 0, (NFULA_CFG_CMD, &[NFULNL_CFG_CMD_PF_UNBIND]));
            let _ = s.config(family, 0, (NFULA_CFG_CMD, &[NFULNL_CFG_CMD_PF_BIND]));
        }
        s.config(0, group, (NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]))?;
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        s.config(0, group, (NFULA_CFG_MODE, &mode))?;
        // Every record at once: by default the kernel batches up to 100 and flushes them
        // after up to a second, so `kiln inspect` right after a refusal would not show it.
        s.config(0, group, (NFULA_CFG_QTHRESH, &1u32.to_be_bytes()))?;
        Ok(s)
    }

    fn config(&mut self, family: u8, group: u16, attr: (u16, &[u8])) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let msg = config_message(self.seq, family, group, attr);
        send(self.fd.as_raw_fd(), &msg, MsgFlags::empty())?;
        let mut buf = vec![0u8; 8192];
        for _ in 0..16 {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            match ack_of(&buf[..n], self.seq) {
                Some(0) => return Ok(()),
                Some(e) => return Err(io::Error::from_raw_os_error(-e)),
                None => continue,
            }
        }
        Err(io::Error::other(
            "no answer to an nfnetlink_log config message",
        ))
    }

    /// The records of the next datagram; empty after [`POLL`] without one (or when the kernel
    /// dropped records because the socket's buffer was full: they are lost, counters still
    /// count them).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Vec<LogRecord>> {
        match recv(self.fd.as_raw_fd(), buf, MsgFlags::empty()) {
            Ok(n) => Ok(parse_messages(&buf[..n.min(buf.len())])),
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::ENOBUFS) => Ok(Vec::new()),
            Err(nix::errno::Errno::EINTR) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }
}

/// A thread reading [`NflogSocket`] records into a callback; stops (and joins) on drop.
#[derive(Debug)]
pub struct NflogListener {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NflogListener {
    /// Opens the socket on the calling thread (so in its network namespace) and starts a
    /// thread passing each record to `on_record`.
    pub fn spawn(
        group: u16,
        mut on_record: impl FnMut(LogRecord) + Send + 'static,
    ) -> io::Result<NflogListener> {
        let socket = NflogSocket::open(group)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("kiln-nflog".into())
            .spawn(move || {
                let mut buf = vec![0u8; RECV_BUF];
                while !stopped.load(Ordering::Relaxed) {
                    match socket.recv(&mut buf) {
                        Ok(records) => records.into_iter().for_each(&mut on_record),
                        Err(e) => {
                            tracing::warn!(error = %e, "refusal log (nflog) ended");
                            return;
                        }
                    }
                }
            })?;
        Ok(NflogListener {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for NflogListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((NLA_HDRLEN + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn packet_msg(family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = attrs.concat();
        let total = NLMSG_HDRLEN + NFGENMSG_LEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(total as u32).to_ne_bytes());
        m.extend_from_slice(&(NFNL_SUBSYS_ULOG << 8).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[family, 0]);
        m.extend_from_slice(&NFLOG_GROUP.to_be_bytes());
        m.extend_from_slice(&body);
        m
    }

    fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, proto, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    #[test]
    fn parses_kiln_records_and_skips_the_rest() {
        let tcp = packet_msg(
            AF_INET,
            &[
                attr(1, &[8, 0, 2, 0]),
                attr(NFULA_PREFIX, b"kiln-closed\0"),
                attr(
                    NFULA_PAYLOAD,
                    &ipv4(6, [10, 214, 0, 2], [192, 168, 77, 2], 8080),
                ),
            ],
        );
        let udp = packet_msg(
            AF_BRIDGE,
            &[
                attr(
                    NFULA_PAYLOAD,
                    &ipv4(17, [10, 214, 0, 4], [10, 214, 0, 3], 7000),
                ),
                attr(NFULA_PREFIX | 0x4000, b"kiln-peer\0"),
            ],
        );
        let foreign = packet_msg(
            AF_INET,
            &[
                attr(NFULA_PREFIX, b"someone-else\0"),
                attr(NFULA_PAYLOAD, &ipv4(6, [1, 1, 1, 1], [2, 2, 2, 2], 1)),
            ],
        );
        let buf = [tcp, foreign, udp].concat();
        let got = parse_messages(&buf);
        assert_eq!(
            got,
            vec![
                LogRecord {
                    reason: LogReason::Closed,
                    protocol: "tcp",
                    source: Ipv4Addr::new(10, 214, 0, 2),
                    destination: Ipv4Addr::new(192, 168, 77, 2),
                    port: Some(8080),
                },
                LogRecord {
                    reason: LogReason::Peer,
                    protocol: "udp",
                    source: Ipv4Addr::new(10, 214, 0, 4),
                    destination: Ipv4Addr::new(10, 214, 0, 3),
                    port: Some(7000),
                },
            ]
        );
        assert_eq!(got[0].destination_text(), "192.168.77.2:8080");
        // Truncated: the datagram's last message cut anywhere yields only whole ones.
        for cut in 0..buf.len() {
            assert!(parse_messages(&buf[..cut]).len() <= 2);
        }
    }

    #[test]
    fn ipv4_parsing_bounds_and_fragments() {
        let p = ipv4(6, [10, 0, 0, 1], [10, 0, 0, 2], 443);
        assert_eq!(parse_ipv4(&p).unwrap().3, Some(443));
        // Header only: no port.
        assert_eq!(parse_ipv4(&p[..20]).unwrap().3, None);
        assert_eq!(parse_ipv4(&p[..19]), None);
        let mut frag = p.clone();
        frag[7] = 1;
        assert_eq!(parse_ipv4(&frag).unwrap().3, None);
        let mut v6 = p.clone();
        v6[0] = 0x60;
        assert_eq!(parse_ipv4(&v6), None);
        let mut short_ihl = p.clone();
        short_ihl[0] = 0x44;
        assert_eq!(parse_ipv4(&short_ihl), None);
        // Options push the ports out of the copied range: no port, no panic.
        let mut long = p.clone();
        long[0] = 0x4f;
        assert_eq!(parse_ipv4(&long).unwrap().3, None);
        let icmp = ipv4(1, [10, 0, 0, 1], [127, 0, 0, 1], 0);
        assert_eq!(parse_ipv4(&icmp).unwrap().0, "icmp");
    }

    #[test]
    fn reasons_name_the_closed_range() {
        let r = |ip: [u8; 4]| LogReason::Closed.refusal_reason(Ipv4Addr::from(ip));
        assert_eq!(r([127, 0, 0, 1]), RefusalReason::Loopback);
        assert_eq!(r([169, 254, 169, 254]), RefusalReason::LinkLocal);
        assert_eq!(r([192, 168, 1, 1]), RefusalReason::Private);
        assert_eq!(r([100, 64, 0, 1]), RefusalReason::Special);
        assert_eq!(
            LogReason::Host.refusal_reason(Ipv4Addr::new(10, 214, 0, 1)),
            RefusalReason::Host
        );
        assert_eq!(
            LogReason::Peer.refusal_reason(Ipv4Addr::new(10, 214, 0, 3)),
            RefusalReason::OtherSandbox
        );
        assert_eq!(LogReason::from_prefix(b"kiln-hostx"), None);
    }

    #[test]
    fn config_messages_are_well_formed_and_acks_are_found() {
        let m = config_message(7, 0, NFLOG_GROUP, (NFULA_CFG_MODE, &[0, 0, 0, 64, 2, 0]));
        assert_eq!(m.len(), 32);
        assert_eq!(u32_ne(&m, 0), Some(32));
        assert_eq!(&m[18..20], &NFLOG_GROUP.to_be_bytes());
        assert_eq!(u16_ne(&m, 20), Some(10));
        // An NLMSG_ERROR carrying errno and the request's header.
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&[0; 10]);
        ack.extend_from_slice(&(-16i32).to_ne_bytes());
        ack.extend_from_slice(&m[..16]);
        assert_eq!(ack_of(&ack, 7), Some(-16));
        assert_eq!(ack_of(&ack, 8), None);
        assert_eq!(ack_of(&ack[..30], 7), None);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_messages(&buf);
            let _ = parse_ipv4(&buf);
            let _ = ack_of(&buf, 1);
        }

        #[test]
        fn random_attributes_in_a_valid_header_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            family in prop_oneof![Just(AF_INET), Just(AF_BRIDGE)],
        ) {
            let mut m = packet_msg(family, &[]);
            m.extend_from_slice(&body);
            let total = m.len() as u32;
            m[..4].copy_from_slice(&total.to_ne_bytes());
            let _ = parse_messages(&m);
        }
    }
}
