//! The bridge mode: a kiln-owned Linux bridge (`kiln0`), one tap per sandbox, addresses from
//! a pool, and nftables rules in kiln's own tables.
//!
//! ```text
//!  guest ─ virtio-net ─ QEMU -netdev tap,ifname=kt-<12 hex> ─ tap ─┐ isolated ports
//!  guest ─ …                                                  tap ─┼─ kiln0 (gateway .1,
//!                                                                  │  proxy ARP for guests)
//!   table bridge kiln: anti-spoofing per tap (MAC+IP, ARP sender),  │ routing, masquerade
//!     no frame from tap to tap                                      ▼
//!   table inet kiln: guest↔guest (routed) only for pairs in @peers4;   eth0 … internet
//!     guest→host only DNS on the gateway; guest→out never to @closed4
//!     (private, link-local, loopback, multicast, the host's connected subnets); masquerade
//! ```
//!
//! Owns: the bridge's configuration ([`BridgeConfig`]), tap names ([`tap_name`]), links
//! ([`link`]: `ip` commands), the rules ([`nft`]: rendered text applied with `nft -f`), the
//! address arithmetic ([`pool`]), the DNS server of bridge guests ([`dns`]) and the janitor's
//! clean-up ([`BridgeHost::reclaim`]). Must not: change anything it did not create (the host's
//! interfaces, routes, other nftables tables; the two host-wide sysctls it sets are named in
//! [`BridgeHost::ensure_bridge`]), know the store (the engine passes leases in),
//! start QEMU, or decide which sandboxes are alive (the engine says).
//!
//! How the engine drives it (each step is idempotent, and every leftover of a crash is
//! keyed by the sandbox id, so the janitor finds it):
//!
//! ```text
//!  daemon start  doctor() → BridgeHost::new(cfg) → ensure_bridge() → apply_rules(live ports)
//!                → reclaim(live ids) → store.leases_release_except(live ids)
//!                → tokio::spawn(dns::serve(dns::bind(gateway), DnsConfig::default(), names))
//!  create        store.lease_acquire("bridge", subnet, id, mac) → create_tap(tap_name(id))
//!                → add_port(port, other ports) → QEMU -netdev tap,ifname=kt-…,script=no,downscript=no
//!  rm            remove_port(id) → delete_tap(tap_name(id)) → store.lease_release(id)
//! ```
//!
//! Invariants: every link kiln creates is named `kt-<12 hex>` (a tap, from the sandbox id) or
//! is the configured bridge; per-sandbox firewall state is only set elements keyed by the
//! tap's name or its lease (and its counters, named by the tap's hex digits), so adding or
//! removing a sandbox never rewrites the ruleset and the janitor can find a dead sandbox's
//! elements by name. Refused packets are also logged to nfnetlink_log
//! ([`nflog`]) for the engine's per-sandbox refusal log.

pub mod dns;
pub mod link;
pub mod nflog;
pub mod nft;
pub mod pool;

#[cfg(test)]
mod netns_tests;

use std::collections::HashSet;
use std::net::Ipv4Addr;

use kiln_api_types::{NetworkGroup, SandboxId};

use crate::Mac;

pub use link::{BridgeHost, DoctorCheck, ReclaimReport, doctor};
pub use pool::{Subnet, lowest_free};

/// Prefix of every tap kiln creates; the rest is the sandbox id's 12 hex digits.
pub const TAP_PREFIX: &str = "kt-";

/// Longest Linux interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// The bridge's configuration (user input, from the daemon's config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// The bridge's interface name (default `kiln0`).
    pub name: String,
    /// The guests' subnet (default 10.214.0.0/16); its first host address is the gateway,
    /// on the bridge.
    pub subnet: Subnet,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            name: "kiln0".into(),
            // 10.214/16: inside 10/8 (so closed to other guests' egress anyway), away from the
            // 10.0/16, 10.1/16 and 10.10/16 that home routers, Docker and VPNs like.
            subnet: Subnet::new(Ipv4Addr::new(10, 214, 0, 0), 16)
                .expect("10.214.0.0/16 is a valid subnet"),
        }
    }
}

impl BridgeConfig {
    /// The gateway: the subnet's first host address, on the bridge (also the guests' DNS).
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.first_host()
    }

    /// Checks the name and that the subnet has room for guests.
    pub fn validate(&self) -> Result<(), BridgeError> {
        if !valid_ifname(&self.name) || self.name.starts_with(TAP_PREFIX) {
            return Err(BridgeError::Config(format!(
                "bridge name {:?} must be 1 to {MAX_IFNAME} of [a-z0-9_-] and not start with \
                 {TAP_PREFIX:?}",
                self.name
            )));
        }
        if self.subnet.prefix() > 30 {
            return Err(BridgeError::Config(format!(
                "bridge subnet {} has no room for guests (use /30 or shorter)",
                self.subnet
            )));
        }
        Ok(())
    }
}

/// Whether `name` is an interface name kiln may put into commands and rules unquoted-safe.
pub(crate) fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The tap of a sandbox: `kt-` and the id's 12 hex digits (15 bytes, the kernel's limit).
pub fn tap_name(id: &SandboxId) -> String {
    let hex = id.as_str().strip_prefix("sb-").unwrap_or(id.as_str());
    format!("{TAP_PREFIX}{hex}")
}

/// The sandbox a kiln tap belongs to, or `None` for any other name.
pub fn sandbox_of_tap(name: &str) -> Option<SandboxId> {
    let hex = name.strip_prefix(TAP_PREFIX)?;
    format!("sb-{hex}").parse().ok()
}

/// One sandbox on the bridge: what the rules need to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgePort {
    /// The sandbox.
    pub sandbox_id: SandboxId,
    /// Its guest's MAC (the only source MAC its tap may send from).
    pub mac: Mac,
    /// Its leased address (the only source address its tap may send from).
    pub ip: Ipv4Addr,
    /// Its network group: sandboxes sharing one reach each other.
    pub group: Option<NetworkGroup>,
}

impl BridgePort {
    /// Its tap's name.
    pub fn tap(&self) -> String {
        tap_name(&self.sandbox_id)
    }

    /// Whether two (different) sandboxes may talk: both in the same group.
    pub fn peers_with(&self, other: &BridgePort) -> bool {
        self.sandbox_id != other.sandbox_id
            && matches!((&self.group, &other.group), (Some(a), Some(b)) if a == b)
    }
}

/// The taps of `live` sandboxes (the janitor keeps these).
pub fn live_taps(live: &HashSet<SandboxId>) -> HashSet<String> {
    live.iter().map(tap_name).collect()
}

/// Errors of the bridge mode.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The configuration is unusable.
    #[error("invalid bridge configuration: {0}")]
    Config(String),
    /// The bridge's subnet overlaps a route of the host.
    #[error(
        "bridge subnet {subnet} overlaps the host's route to {route} (dev {dev}): choose another \
         subnet for the bridge"
    )]
    SubnetCollision {
        /// kiln's subnet.
        subnet: Subnet,
        /// The host's route.
        route: Subnet,
        /// The route's device.
        dev: String,
    },
    /// A tool could not be started.
    #[error("failed to run `{cmd}`")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (trimmed, bounded).
        stderr: String,
    },
    /// A tool's output could not be read.
    #[error("unexpected output from `{cmd}`: {why}")]
    Output {
        /// The command line.
        cmd: String,
        /// What is wrong.
        why: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_name_fits_ifnamsiz_and_round_trips() {
        let id: SandboxId = "sb-0123456789ab".parse().unwrap();
        let tap = tap_name(&id);
        assert_eq!(tap, "kt-0123456789ab");
        assert_eq!(tap.len(), MAX_IFNAME);
        assert!(valid_ifname(&tap));
        assert_eq!(sandbox_of_tap(&tap), Some(id));
        for _ in 0..100 {
            let id = SandboxId::random();
            assert!(tap_name(&id).len() <= MAX_IFNAME);
            assert_eq!(sandbox_of_tap(&tap_name(&id)), Some(id));
        }
    }

    #[test]
    fn sandbox_of_tap_foreign_names_are_none() {
        for name in [
            "kiln0",
            "eth0",
            "kt-xyz",
            "kt-0123456789AB",
            "kt-0123456789abc",
            "kt-",
        ] {
            assert_eq!(sandbox_of_tap(name), None, "{name}");
        }
    }

    #[test]
    fn bridge_config_default_is_valid_with_first_host_gateway() {
        let c = BridgeConfig::default();
        c.validate().unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 214, 0, 1));
        let bad = BridgeConfig {
            name: "kt-bridge".into(),
            ..BridgeConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = BridgeConfig {
            name: "a-name-too-long-x".into(),
            ..BridgeConfig::default()
        };
        assert!(bad.validate().is_err());
        let tiny = BridgeConfig {
            subnet: Subnet::new(Ipv4Addr::new(10, 0, 0, 0), 31).unwrap(),
            ..BridgeConfig::default()
        };
        assert!(tiny.validate().unwrap_err().to_string().contains("no room"));
    }

    #[test]
    fn bridge_port_peers_only_within_one_group() {
        let port = |n: u64, g: Option<&str>| BridgePort {
            sandbox_id: format!("sb-{n:012x}").parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 0, n as u8]),
            ip: Ipv4Addr::new(10, 214, 0, n as u8),
            group: g.map(|g| g.parse().unwrap()),
        };
        assert!(port(1, Some("a")).peers_with(&port(2, Some("a"))));
        assert!(!port(1, Some("a")).peers_with(&port(2, Some("b"))));
        assert!(!port(1, None).peers_with(&port(2, None)));
        assert!(!port(1, Some("a")).peers_with(&port(1, Some("a"))));
    }
}
