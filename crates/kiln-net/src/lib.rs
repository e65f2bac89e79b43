//! Sandbox networks. A guest with a network has one virtio-net device; what is behind it
//! depends on the mode (`kiln_api_types::NetworkSpec`):
//!
//! ```text
//!  allow / nat:  guest ─ virtio-net ─ QEMU -netdev stream (unix socket, QEMU listens)
//!                  ─▶ kiln relay (relay.rs: every guest frame through filter.rs; DNS answered
//!                     by dns.rs) ─▶ socketpair ─▶ passt --no-map-gw (host sockets)
//!  bridge:       guest ─ virtio-net ─ QEMU -netdev tap ─ tap ─ kiln bridge ─ nftables
//!                  (bridge/: links, address pool, rules in kiln's own table, DNS server)
//! ```
//!
//! The engine's entry points for `allow` and `nat`: [`relay::Relay::start`] with a
//! [`relay::RelayConfig`] (QEMU's socket, the [`GuestNet`], the policy, upstream DNS servers
//! from [`dns::system_upstreams`], the passt binary), then [`relay::RelayHandle`]'s
//! `set_policy`, `stats`, `refusals` and `shutdown` (or drop it).
//!
//! MTU: user-mode guests default to [`passt::DEFAULT_MTU`] (65520). Measured through the real
//! relay and passt (`tests/relay_netns.rs`, release build, guest stack in a namespace, one TCP
//! stream guest → server, 256 MiB): MTU 1500 ≈ 240 MiB/s, 4000 ≈ 500, 9000 ≈ 620,
//! 16000 ≈ 730, 65520 ≈ 940 MiB/s.
//!
//! Must not: know about sandboxes' lifecycles or the store (the engine calls in with
//! addresses and policies), or start QEMU.

pub mod addr;
pub mod bridge;
pub mod dns;
pub mod filter;
pub mod inspect;
pub mod passt;
pub mod relay;
pub mod tap;

use std::fmt;
use std::net::Ipv4Addr;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A random unicast, locally administered address (`x2:..`, `x6:..`, `xa:..`, `xe:..`).
    pub fn random() -> Mac {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] & 0xfc) | 0x02;
        Mac(b)
    }
}

/// `aa:bb:cc:dd:ee:ff` (any case).
impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *b = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        match parts.next() {
            None => Ok(Mac(out)),
            Some(_) => Err(bad()),
        }
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// What the guest's interface is configured with (by the agent, after boot and after every
/// restore): fresh per sandbox and per restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    /// The interface's MAC.
    pub mac: Mac,
    /// The guest's address.
    pub address: Ipv4Addr,
    /// Its subnet's prefix length.
    pub prefix_len: u8,
    /// Default gateway; also the DNS server the guest is given.
    pub gateway: Ipv4Addr,
    /// MTU of the link.
    pub mtu: u16,
}
