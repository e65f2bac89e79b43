//! IPv4 subnets and address allocation for the bridge: pure arithmetic, no I/O.
//!
//! Owns: [`Subnet`] (network + prefix, parsing and printing `a.b.c.d/len`), overlap tests and
//! [`lowest_free`]. Must not: remember leases (the store does, in one transaction; this is the
//! same rule, for callers without a store and for tests).
//!
//! Invariant: an allocated address is never the subnet's network address, its first host
//! address (the gateway) or its broadcast address.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network: address with host bits zero, and a prefix length 0..=32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet {
    addr: Ipv4Addr,
    prefix: u8,
}

/// A pool without a free address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no free address in {subnet}: all {capacity} guest addresses are in use")]
pub struct PoolExhausted {
    /// The subnet.
    pub subnet: Subnet,
    /// How many addresses it has for guests.
    pub capacity: u64,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl Subnet {
    /// The network of `addr`/`prefix` (host bits must be zero), or `None` when they are not
    /// or the prefix exceeds 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Subnet> {
        (prefix <= 32 && u32::from(addr) & !mask(prefix) == 0).then_some(Subnet { addr, prefix })
    }

    /// The network containing `addr` (host bits cleared).
    pub fn containing(addr: Ipv4Addr, prefix: u8) -> Subnet {
        let prefix = prefix.min(32);
        Subnet {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        }
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask as an integer.
    pub fn mask(&self) -> u32 {
        mask(self.prefix)
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// The first host address (the gateway of a bridge subnet).
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).saturating_add(1))
    }

    /// Whether `ip` lies in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let p = self.prefix.min(other.prefix);
        u32::from(self.addr) & mask(p) == u32::from(other.addr) & mask(p)
    }

    /// How many addresses guests can get (all but network, gateway and broadcast).
    pub fn guest_capacity(&self) -> u64 {
        if self.prefix > 30 {
            0
        } else {
            (1u64 << (32 - self.prefix)) - 3
        }
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Subnet, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("subnet {s:?} needs a prefix length (a.b.c.d/len)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("subnet {s:?}: {a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("subnet {s:?}: the prefix length must be 0 to 32"))?;
        Subnet::new(addr, prefix).ok_or_else(|| {
            format!(
                "subnet {s:?} has host bits set (did you mean {}?)",
                Subnet::containing(addr, prefix)
            )
        })
    }
}

/// The lowest address of `subnet` that is not in `used`, skipping network, gateway (first
/// host) and broadcast.
pub fn lowest_free(subnet: Subnet, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr, PoolExhausted> {
    let exhausted = PoolExhausted {
        subnet,
        capacity: subnet.guest_capacity(),
    };
    if subnet.guest_capacity() == 0 {
        return Err(exhausted);
    }
    let first = u32::from(subnet.addr()) + 2;
    let last = u32::from(subnet.broadcast()) - 1;
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|a| !used.contains(a))
        .ok_or(exhausted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    #[test]
    fn lowest_free_skips_network_gateway_and_reuses_holes() {
        let s = net("10.214.0.0/16");
        let mut used = HashSet::new();
        assert_eq!(lowest_free(s, &used), Ok(Ipv4Addr::new(10, 214, 0, 2)));
        used.extend([
            Ipv4Addr::new(10, 214, 0, 2),
            Ipv4Addr::new(10, 214, 0, 4),
            Ipv4Addr::new(192, 0, 2, 3), // outside: irrelevant
        ]);
        assert_eq!(lowest_free(s, &used), Ok(Ipv4Addr::new(10, 214, 0, 3)));
        used.insert(Ipv4Addr::new(10, 214, 0, 3));
        assert_eq!(lowest_free(s, &used), Ok(Ipv4Addr::new(10, 214, 0, 5)));
        // Past .255 into the next /24.
        let s = net("10.9.0.0/23");
        let used: HashSet<_> = (2..=255).map(|n| Ipv4Addr::new(10, 9, 0, n)).collect();
        assert_eq!(lowest_free(s, &used), Ok(Ipv4Addr::new(10, 9, 1, 0)));
    }

    #[test]
    fn lowest_free_exhausted_never_hands_out_broadcast() {
        let s = net("10.9.0.0/29");
        let used: HashSet<_> = (2..=6).map(|n| Ipv4Addr::new(10, 9, 0, n)).collect();
        let e = lowest_free(s, &used).unwrap_err();
        assert_eq!(e.capacity, 5);
        assert!(
            e.to_string().contains("no free address in 10.9.0.0/29"),
            "{e}"
        );
        assert!(lowest_free(net("10.9.0.0/31"), &HashSet::new()).is_err());
        assert_eq!(
            lowest_free(net("10.9.0.0/30"), &HashSet::new()),
            Ok(Ipv4Addr::new(10, 9, 0, 2))
        );
    }

    #[test]
    fn subnet_parse_overlap_and_errors() {
        assert!(net("10.214.0.0/16").overlaps(&net("10.0.0.0/8")));
        assert!(net("10.0.0.0/8").overlaps(&net("10.214.3.0/24")));
        assert!(!net("10.214.0.0/16").overlaps(&net("10.215.0.0/16")));
        assert!(net("0.0.0.0/0").overlaps(&net("10.0.0.0/8")));
        let e = "10.214.0.1/16".parse::<Subnet>().unwrap_err();
        assert!(e.contains("did you mean 10.214.0.0/16"), "{e}");
        assert!("10.0.0.0".parse::<Subnet>().is_err());
        assert!("10.0.0.0/33".parse::<Subnet>().is_err());
        assert_eq!(net("10.9.0.0/24").broadcast(), Ipv4Addr::new(10, 9, 0, 255));
        assert_eq!(net("10.9.0.0/24").first_host(), Ipv4Addr::new(10, 9, 0, 1));
    }
}
