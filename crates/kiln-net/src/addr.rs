//! Address classes of IPv4 destinations: which ones no rule can open (loopback, the host's own
//! addresses, multicast, broadcast, reserved, unspecified, the gateway), and which ones only a
//! CIDR rule that names them explicitly opens (private, shared, link-local, and the host's
//! directly connected subnets).
//!
//! Owns [`HostAddrs`] (the host's addresses and subnets, read with `getifaddrs`) and
//! [`classify`]. Must not: decide per-rule policy beyond "does a CIDR rule lie inside this
//! closed range" ([`rule_names`]), or cache the host's addresses longer than the caller asks
//! ([`HostAddrs::refresh`] re-reads at most once a second).
//!
//! Documentation and benchmark ranges (192.0.2/24, 198.51.100/24, 203.0.113/24, 198.18/15) are
//! deliberately ordinary: real mirrors and test hosts live there on this project's machines.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use kiln_api_types::network::{NetRule, RefusalReason, prefix_mask};

/// How often [`HostAddrs::refresh`] may re-read the host's interfaces.
pub const HOST_ADDRS_MAX_AGE: Duration = Duration::from_secs(1);

/// An IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    /// Network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl Net {
    /// The network of `addr/prefix` (host bits cleared).
    pub const fn new(addr: Ipv4Addr, prefix: u8) -> Net {
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Net {
            addr: Ipv4Addr::from_bits(addr.to_bits() & mask),
            prefix,
        }
    }

    /// Whether `ip` lies in it.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip.to_bits() & prefix_mask(self.prefix) == self.addr.to_bits()
    }

    /// Whether the network `other` lies entirely inside this one.
    pub fn covers(&self, other: Net) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }
}

/// What a destination address is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Ordinary (internet) address: the mode and rules decide.
    Open,
    /// Never reachable, whatever the rules say.
    Closed(RefusalReason),
    /// Reachable only when a CIDR rule lying inside each of these ranges contains it.
    Guarded(RefusalReason),
}

const fn net(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Net {
    Net::new(Ipv4Addr::new(a, b, c, d), prefix)
}

/// Always closed: (range, reason).
const CLOSED: [(Net, RefusalReason); 5] = [
    (net(127, 0, 0, 0, 8), RefusalReason::Loopback),
    (net(0, 0, 0, 0, 8), RefusalReason::Special),
    (net(224, 0, 0, 0, 4), RefusalReason::Special),
    // 240/4 includes the limited broadcast 255.255.255.255.
    (net(240, 0, 0, 0, 4), RefusalReason::Special),
    (net(255, 255, 255, 255, 32), RefusalReason::Special),
];

/// Closed unless a CIDR rule inside the range names them.
const GUARDED: [(Net, RefusalReason); 5] = [
    (net(10, 0, 0, 0, 8), RefusalReason::Private),
    (net(172, 16, 0, 0, 12), RefusalReason::Private),
    (net(192, 168, 0, 0, 16), RefusalReason::Private),
    (net(100, 64, 0, 0, 10), RefusalReason::Private),
    (net(169, 254, 0, 0, 16), RefusalReason::LinkLocal),
];

/// The host's own IPv4 addresses and directly connected subnets.
#[derive(Debug, Clone, Default)]
pub struct HostAddrs {
    addrs: Vec<Ipv4Addr>,
    nets: Vec<Net>,
    read_at: Option<Instant>,
}

impl HostAddrs {
    /// A fixed set (tests, or a caller that knows better).
    pub fn fixed(addrs: Vec<Ipv4Addr>, nets: Vec<Net>) -> HostAddrs {
        HostAddrs {
            addrs,
            nets,
            read_at: None,
        }
    }

    /// Reads the host's interfaces now. On failure the set is empty and a warning is logged:
    /// the fixed closed classes still hold.
    pub fn read(now: Instant) -> HostAddrs {
        let mut h = HostAddrs {
            read_at: Some(now),
            ..HostAddrs::default()
        };
        match nix::ifaddrs::getifaddrs() {
            Ok(list) => {
                for ifa in list {
                    let Some(ip) = ifa
                        .address
                        .as_ref()
                        .and_then(|a| a.as_sockaddr_in())
                        .map(|s| s.ip())
                    else {
                        continue;
                    };
                    if !h.addrs.contains(&ip) {
                        h.addrs.push(ip);
                    }
                    let prefix = ifa
                        .netmask
                        .as_ref()
                        .and_then(|a| a.as_sockaddr_in())
                        .map(|s| s.ip().to_bits().leading_ones() as u8)
                        .unwrap_or(32);
                    let n = Net::new(ip, prefix);
                    // A /0 "subnet" (some point-to-point setups) would close the internet.
                    if prefix > 0 && !h.nets.contains(&n) {
                        h.nets.push(n);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the host's addresses"),
        }
        h
    }

    /// Re-reads the interfaces if the last read is older than [`HOST_ADDRS_MAX_AGE`] (a
    /// [`HostAddrs::fixed`] set is never re-read). Returns whether it re-read.
    pub fn refresh(&mut self, now: Instant) -> bool {
        match self.read_at {
            Some(t) if now.saturating_duration_since(t) >= HOST_ADDRS_MAX_AGE => {
                *self = HostAddrs::read(now);
                true
            }
            _ => false,
        }
    }

    /// The host's addresses.
    pub fn addrs(&self) -> &[Ipv4Addr] {
        &self.addrs
    }

    /// The host's directly connected subnets.
    pub fn nets(&self) -> &[Net] {
        &self.nets
    }
}

/// The class of destination `ip` for a guest whose gateway is `gateway`.
pub fn classify(ip: Ipv4Addr, gateway: Ipv4Addr, host: &HostAddrs) -> Class {
    if ip == gateway || host.addrs.contains(&ip) {
        return Class::Closed(RefusalReason::Host);
    }
    if let Some((_, r)) = CLOSED.iter().find(|(n, _)| n.contains(ip)) {
        return Class::Closed(*r);
    }
    if let Some((_, r)) = GUARDED.iter().find(|(n, _)| n.contains(ip)) {
        return Class::Guarded(*r);
    }
    if host.nets.iter().any(|n| n.contains(ip)) {
        return Class::Guarded(RefusalReason::Host);
    }
    Class::Open
}

/// The guarded ranges (fixed ones and the host's subnets) that contain `ip`.
fn guarded_ranges(ip: Ipv4Addr, host: &HostAddrs) -> impl Iterator<Item = Net> + '_ {
    GUARDED
        .iter()
        .map(|(n, _)| *n)
        .chain(host.nets.iter().copied())
        .filter(move |n| n.contains(ip))
}

/// Whether `rule` opens the guarded address `ip`: it is a CIDR rule containing `ip` whose
/// network lies inside every guarded range containing `ip` (so `10.1.2.0/24` opens
/// `10.1.2.3`, but `0.0.0.0/0` or `8.0.0.0/6` do not open `10/8`).
pub fn rule_names(rule: &NetRule, ip: Ipv4Addr, host: &HostAddrs) -> bool {
    let NetRule::Cidr { addr, prefix, .. } = rule else {
        return false;
    };
    let r = Net::new(*addr, *prefix);
    r.contains(ip) && guarded_ranges(ip, host).all(|g| g.covers(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn host() -> HostAddrs {
        HostAddrs::fixed(
            vec![ip("192.0.2.10"), ip("127.0.0.1")],
            vec![Net::new(ip("192.0.2.10"), 24), Net::new(ip("10.9.0.1"), 16)],
        )
    }

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

    #[test]
    fn classify_fixed_classes() {
        let h = host();
        let cases = [
            ("127.0.0.1", Class::Closed(RefusalReason::Host)),
            ("127.1.2.3", Class::Closed(RefusalReason::Loopback)),
            ("0.0.0.0", Class::Closed(RefusalReason::Special)),
            ("224.0.0.251", Class::Closed(RefusalReason::Special)),
            ("255.255.255.255", Class::Closed(RefusalReason::Special)),
            ("240.1.1.1", Class::Closed(RefusalReason::Special)),
            ("10.0.2.2", Class::Closed(RefusalReason::Host)),
            ("192.0.2.10", Class::Closed(RefusalReason::Host)),
            ("192.0.2.99", Class::Guarded(RefusalReason::Host)),
            ("10.1.2.3", Class::Guarded(RefusalReason::Private)),
            ("172.31.255.1", Class::Guarded(RefusalReason::Private)),
            ("172.32.0.1", Class::Open),
            ("192.168.1.1", Class::Guarded(RefusalReason::Private)),
            ("100.64.0.1", Class::Guarded(RefusalReason::Private)),
            ("169.254.169.254", Class::Guarded(RefusalReason::LinkLocal)),
            ("203.0.113.80", Class::Open),
            ("198.18.0.5", Class::Open),
            ("198.51.100.1", Class::Open),
            ("1.1.1.1", Class::Open),
        ];
        for (a, want) in cases {
            assert_eq!(classify(ip(a), GW, &h), want, "{a}");
        }
    }

    #[test]
    fn rule_names_only_rules_inside_the_range() {
        let h = host();
        let r = |s: &str| s.parse::<NetRule>().unwrap();
        assert!(rule_names(&r("10.1.2.0/24"), ip("10.1.2.3"), &h));
        assert!(rule_names(&r("10.1.2.3:5432"), ip("10.1.2.3"), &h));
        assert!(!rule_names(&r("10.1.2.0/24"), ip("10.1.3.3"), &h));
        assert!(!rule_names(&r("0.0.0.0/0"), ip("10.1.2.3"), &h));
        assert!(!rule_names(&r("8.0.0.0/6"), ip("10.1.2.3"), &h));
        assert!(rule_names(&r("10.0.0.0/8"), ip("10.1.2.3"), &h));
        // Inside the host's LAN 10.9/16: the rule must lie inside the LAN too.
        assert!(!rule_names(&r("10.0.0.0/8"), ip("10.9.1.1"), &h));
        assert!(rule_names(&r("10.9.1.0/24"), ip("10.9.1.1"), &h));
        assert!(!rule_names(&r("example.org"), ip("10.1.2.3"), &h));
    }

    #[test]
    fn host_addrs_read_finds_loopback_and_refresh_is_rate_limited() {
        let t = Instant::now();
        let mut h = HostAddrs::read(t);
        assert!(h.addrs().contains(&Ipv4Addr::LOCALHOST), "{h:?}");
        assert!(!h.refresh(t + Duration::from_millis(500)));
        assert!(h.refresh(t + Duration::from_secs(2)));
    }
}
