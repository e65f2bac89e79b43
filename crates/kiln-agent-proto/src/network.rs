//! The network configuration a host hands the agent after a cold boot and after every
//! restore or clone (`configure_network`, feature `net-v1`).
//!
//! Owns: [`NetworkConfig`] (the request body), [`NetworkAck`] (its answer), the validated
//! value types [`MacAddr`] and [`InterfaceName`], and [`NetworkError`].
//!
//! ```text
//!  host                                                guest agent
//!   │ ◀──────────────────── SYNC_ACK (features: "net-v1")
//!   │ configure_network {mac, address, prefix_len, gateway, mtu, nameservers}
//!   │   ─────────────────────────────────────────▶     1. find the NIC (the one Ethernet
//!   │                                                      interface that is not loopback)
//!   │                                                   2. link down (flushes routes, neighbours)
//!   │                                                   3. disable_ipv6 = 1
//!   │                                                   4. MAC    5. MTU
//!   │                                                   6. address + netmask (replaces)
//!   │                                                   7. link up
//!   │                                                   8. default route (replaces)
//!   │                                                   9. /etc/resolv.conf (temp + rename)
//!   │ ◀──── network_configured {interface, mac, address, prefix_len, gateway, mtu, ...}
//!   │       or error {code: network_failed, message names the failed step}
//! ```
//!
//! Invariants:
//! - A [`NetworkConfig`] is only ever built valid: its fields are private, [`NetworkConfig::new`]
//!   checks every rule (including the ones between fields: the gateway lies in the address's
//!   subnet and differs from it), and deserialisation goes through the same function
//!   (`#[serde(try_from)]`), so a hostile or buggy value fails to parse as a whole message
//!   (the agent answers `bad_request`) and never reaches the agent logic.
//! - Validation errors name the field and the rule; they never echo a string the peer sent
//!   (it may be huge or binary). Numbers and addresses, being bounded, may be shown.
//! - JSON encodings: the MAC is `"aa:bb:cc:dd:ee:ff"` (lowercase on output, either case on
//!   input), IPv4 addresses dotted quads, `prefix_len` and `mtu` JSON integers.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Feature string in [`crate::AgentInfo::features`] of an agent that understands
/// `configure_network` as described here.
pub const FEATURE_NET_V1: &str = "net-v1";

/// Shortest accepted prefix length.
pub const MIN_PREFIX_LEN: u8 = 1;
/// Longest accepted prefix length: a /30 is the smallest subnet with a gateway, a host and
/// distinct network and broadcast addresses.
pub const MAX_PREFIX_LEN: u8 = 30;
/// Smallest accepted MTU (the IPv4 minimum datagram every host must accept).
pub const MIN_MTU: u16 = 576;
/// Largest accepted MTU (what virtio-net and most Linux drivers accept at most, rounded to
/// leave room for headers).
pub const MAX_MTU: u16 = 65520;
/// Most nameservers (glibc's resolver reads at most three, `MAXNS`).
pub const MAX_NAMESERVERS: usize = 3;
/// Longest Linux interface name (`IFNAMSIZ` − 1).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;

/// A network value that breaks its rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    /// The MAC is not six `:`-separated pairs of hex digits.
    #[error(
        "mac must be six ':'-separated pairs of hex digits like aa:bb:cc:dd:ee:ff (got {len} characters)"
    )]
    MacSyntax {
        /// Its length in bytes.
        len: usize,
    },
    /// The MAC is a multicast (or broadcast) address: its first octet's low bit is set.
    #[error("mac must be unicast (the low bit of the first octet is set)")]
    MacMulticast,
    /// The MAC is all zeros.
    #[error("mac must not be all zeros")]
    MacZero,
    /// An IPv4 address is not usable as a host address (unspecified, loopback, multicast,
    /// broadcast or reserved).
    #[error("{field} {addr} is not a unicast host address")]
    NotUnicast {
        /// Which field.
        field: &'static str,
        /// The address.
        addr: Ipv4Addr,
    },
    /// The prefix length is outside [`MIN_PREFIX_LEN`]`..=`[`MAX_PREFIX_LEN`].
    #[error("prefix_len {len} is outside {MIN_PREFIX_LEN}..={MAX_PREFIX_LEN}")]
    PrefixLen {
        /// The value.
        len: u8,
    },
    /// The address is its subnet's network or broadcast address.
    #[error("address {address} is the network or broadcast address of its /{prefix_len}")]
    AddressNotHost {
        /// The address.
        address: Ipv4Addr,
        /// The prefix length.
        prefix_len: u8,
    },
    /// The gateway is not inside the address's subnet (or is its network or broadcast
    /// address), so the guest could not reach it on the link.
    #[error("gateway {gateway} is not a host of the subnet {network}/{prefix_len}")]
    GatewayOutsideSubnet {
        /// The gateway.
        gateway: Ipv4Addr,
        /// The subnet's network address.
        network: Ipv4Addr,
        /// The prefix length.
        prefix_len: u8,
    },
    /// The gateway is the guest's own address.
    #[error("gateway must differ from address ({address})")]
    GatewayIsAddress {
        /// The address.
        address: Ipv4Addr,
    },
    /// The MTU is outside [`MIN_MTU`]`..=`[`MAX_MTU`].
    #[error("mtu {mtu} is outside {MIN_MTU}..={MAX_MTU}")]
    Mtu {
        /// The value.
        mtu: u32,
    },
    /// More than [`MAX_NAMESERVERS`] nameservers.
    #[error("nameservers may list at most {MAX_NAMESERVERS} addresses (got {count})")]
    TooManyNameservers {
        /// How many were given.
        count: usize,
    },
    /// An interface name (reported by the guest) breaks Linux's rules.
    #[error("interface name {reason} (got {len} characters)")]
    BadInterfaceName {
        /// The rule it breaks.
        reason: &'static str,
        /// Its length in bytes.
        len: usize,
    },
}

/// A unicast Ethernet MAC address (not all zeros). `"aa:bb:cc:dd:ee:ff"` on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// Checks that `octets` are a unicast, non-zero MAC.
    pub fn new(octets: [u8; 6]) -> Result<MacAddr, NetworkError> {
        if octets[0] & 1 != 0 {
            return Err(NetworkError::MacMulticast);
        }
        if octets == [0; 6] {
            return Err(NetworkError::MacZero);
        }
        Ok(MacAddr(octets))
    }

    /// Parses `aa:bb:cc:dd:ee:ff` (hex digits of either case).
    pub fn parse(s: &str) -> Result<MacAddr, NetworkError> {
        let syntax = || NetworkError::MacSyntax { len: s.len() };
        let b = s.as_bytes();
        if b.len() != 17 {
            return Err(syntax());
        }
        let mut octets = [0u8; 6];
        for (i, octet) in octets.iter_mut().enumerate() {
            let at = i * 3;
            if i < 5 && b[at + 2] != b':' {
                return Err(syntax());
            }
            let hi = hex_val(b[at]).ok_or_else(syntax)?;
            let lo = hex_val(b[at + 1]).ok_or_else(syntax)?;
            *octet = (hi << 4) | lo;
        }
        MacAddr::new(octets)
    }

    /// The six octets.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl TryFrom<String> for MacAddr {
    type Error = NetworkError;
    fn try_from(s: String) -> Result<MacAddr, NetworkError> {
        MacAddr::parse(&s)
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// A Linux network interface name as the guest reports it: 1..=15 bytes of printable ASCII
/// without `/`, `:` or whitespace, and neither `.` nor `..`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InterfaceName(String);

impl InterfaceName {
    /// Validates a name.
    pub fn new(s: impl Into<String>) -> Result<InterfaceName, NetworkError> {
        let s = s.into();
        let bad = |reason| NetworkError::BadInterfaceName {
            reason,
            len: s.len(),
        };
        if s.is_empty() {
            return Err(bad("must not be empty"));
        }
        if s.len() > MAX_INTERFACE_NAME_LEN {
            return Err(bad("must be at most 15 bytes"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
        {
            return Err(bad(
                "may contain only printable ascii other than '/' and ':'",
            ));
        }
        if s == "." || s == ".." {
            return Err(bad("must not be '.' or '..'"));
        }
        Ok(InterfaceName(s))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for InterfaceName {
    type Error = NetworkError;
    fn try_from(s: String) -> Result<InterfaceName, NetworkError> {
        InterfaceName::new(s)
    }
}

impl From<InterfaceName> for String {
    fn from(n: InterfaceName) -> String {
        n.0
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InterfaceName({:?})", self.0)
    }
}

/// The netmask of a prefix length in 1..=32.
fn mask(prefix_len: u8) -> u32 {
    u32::MAX << (32 - u32::from(prefix_len))
}

fn check_unicast(field: &'static str, addr: Ipv4Addr) -> Result<(), NetworkError> {
    let reserved = addr.octets()[0] >= 240;
    if addr.is_unspecified()
        || addr.is_loopback()
        || addr.is_multicast()
        || addr.is_broadcast()
        || reserved
    {
        return Err(NetworkError::NotUnicast { field, addr });
    }
    Ok(())
}

/// The guest's whole IPv4 network configuration: body of the `configure_network` request.
/// Fields are private so that every value that exists has passed [`NetworkConfig::new`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawNetworkConfig", into = "RawNetworkConfig")]
pub struct NetworkConfig {
    mac: MacAddr,
    address: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
    mtu: u16,
    nameservers: Vec<Ipv4Addr>,
}

/// The wire shape of [`NetworkConfig`], before its cross-field checks.
#[derive(Serialize, Deserialize)]
struct RawNetworkConfig {
    mac: MacAddr,
    address: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
    // u32 so that an out-of-range value is a validation error naming the field, not a
    // generic integer overflow.
    mtu: u32,
    nameservers: Vec<Ipv4Addr>,
}

impl NetworkConfig {
    /// Checks every rule: `address` and `gateway` are unicast host addresses of the same
    /// `/prefix_len` subnet ([`MIN_PREFIX_LEN`]`..=`[`MAX_PREFIX_LEN`]), neither its network
    /// nor its broadcast address, and different; `mtu` is in [`MIN_MTU`]`..=`[`MAX_MTU`];
    /// at most [`MAX_NAMESERVERS`] nameservers, each a unicast address.
    pub fn new(
        mac: MacAddr,
        address: Ipv4Addr,
        prefix_len: u8,
        gateway: Ipv4Addr,
        mtu: u32,
        nameservers: Vec<Ipv4Addr>,
    ) -> Result<NetworkConfig, NetworkError> {
        check_unicast("address", address)?;
        if !(MIN_PREFIX_LEN..=MAX_PREFIX_LEN).contains(&prefix_len) {
            return Err(NetworkError::PrefixLen { len: prefix_len });
        }
        let m = mask(prefix_len);
        let host_part = |a: Ipv4Addr| u32::from(a) & !m;
        if host_part(address) == 0 || host_part(address) == !m {
            return Err(NetworkError::AddressNotHost {
                address,
                prefix_len,
            });
        }
        check_unicast("gateway", gateway)?;
        let network = Ipv4Addr::from(u32::from(address) & m);
        if u32::from(gateway) & m != u32::from(network)
            || host_part(gateway) == 0
            || host_part(gateway) == !m
        {
            return Err(NetworkError::GatewayOutsideSubnet {
                gateway,
                network,
                prefix_len,
            });
        }
        if gateway == address {
            return Err(NetworkError::GatewayIsAddress { address });
        }
        let mtu = match u16::try_from(mtu) {
            Ok(v) if (MIN_MTU..=MAX_MTU).contains(&v) => v,
            _ => return Err(NetworkError::Mtu { mtu }),
        };
        if nameservers.len() > MAX_NAMESERVERS {
            return Err(NetworkError::TooManyNameservers {
                count: nameservers.len(),
            });
        }
        for ns in &nameservers {
            check_unicast("nameservers", *ns)?;
        }
        Ok(NetworkConfig {
            mac,
            address,
            prefix_len,
            gateway,
            mtu,
            nameservers,
        })
    }

    /// The interface's new MAC.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The guest's IPv4 address.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The subnet's prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The subnet mask of [`NetworkConfig::prefix_len`].
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix_len))
    }

    /// The default gateway (inside the subnet).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The interface's MTU.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The DNS servers, in order (may be empty).
    pub fn nameservers(&self) -> &[Ipv4Addr] {
        &self.nameservers
    }
}

impl TryFrom<RawNetworkConfig> for NetworkConfig {
    type Error = NetworkError;
    fn try_from(r: RawNetworkConfig) -> Result<NetworkConfig, NetworkError> {
        NetworkConfig::new(
            r.mac,
            r.address,
            r.prefix_len,
            r.gateway,
            r.mtu,
            r.nameservers,
        )
    }
}

impl From<NetworkConfig> for RawNetworkConfig {
    fn from(c: NetworkConfig) -> RawNetworkConfig {
        RawNetworkConfig {
            mac: c.mac,
            address: c.address,
            prefix_len: c.prefix_len,
            gateway: c.gateway,
            mtu: u32::from(c.mtu),
            nameservers: c.nameservers,
        }
    }
}

/// Successful answer to `configure_network`: every step ran, in order, and the interface now
/// has exactly this configuration. A step that fails makes the agent answer `network_failed`
/// instead (naming the step and the steps already done).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAck {
    /// The interface that was configured (e.g. `eth0`, `ens3`).
    pub interface: InterfaceName,
    /// The MAC that was set.
    pub mac: MacAddr,
    /// The address that was set (replacing any earlier one).
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The default route's gateway (replacing any earlier default route).
    pub gateway: Ipv4Addr,
    /// The MTU that was set.
    pub mtu: u16,
    /// `true`: `disable_ipv6` was set on the interface; `false`: the guest kernel has no IPv6
    /// at all (nothing to disable).
    pub ipv6_disabled: bool,
    /// How many nameservers `/etc/resolv.conf` now lists (it was rewritten even when 0).
    pub nameservers: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac() -> MacAddr {
        MacAddr::parse("52:54:00:12:34:56").expect("valid")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("valid ip")
    }

    fn config(address: &str, prefix_len: u8, gateway: &str) -> Result<NetworkConfig, NetworkError> {
        NetworkConfig::new(mac(), ip(address), prefix_len, ip(gateway), 1500, vec![])
    }

    #[test]
    fn mac_syntax_and_unicast_rules_are_enforced() {
        assert_eq!(mac().to_string(), "52:54:00:12:34:56");
        assert_eq!(
            MacAddr::parse("02:AB:cd:EF:00:01")
                .expect("either case")
                .to_string(),
            "02:ab:cd:ef:00:01"
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "5254.0012.3456.",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:5",
            "52:54:00:12:34:567",
        ] {
            assert!(
                matches!(MacAddr::parse(bad), Err(NetworkError::MacSyntax { .. })),
                "{bad:?} accepted"
            );
        }
        assert_eq!(
            MacAddr::parse("01:00:5e:00:00:01"),
            Err(NetworkError::MacMulticast)
        );
        assert_eq!(
            MacAddr::parse("ff:ff:ff:ff:ff:ff"),
            Err(NetworkError::MacMulticast)
        );
        assert_eq!(
            MacAddr::parse("00:00:00:00:00:00"),
            Err(NetworkError::MacZero)
        );
        let msg = MacAddr::parse("x").expect_err("bad").to_string();
        assert!(msg.starts_with("mac "), "{msg}");
    }

    #[test]
    fn prefix_len_bounds_are_enforced() {
        assert!(config("10.0.0.2", 30, "10.0.0.1").is_ok());
        assert!(config("10.0.0.2", 1, "10.0.0.1").is_ok());
        for len in [0, 31, 32, 255] {
            let err = config("10.0.0.2", len, "10.0.0.1").expect_err("rejected");
            assert_eq!(err, NetworkError::PrefixLen { len });
            assert!(err.to_string().starts_with("prefix_len "), "{err}");
        }
    }

    #[test]
    fn gateway_must_be_another_host_of_the_subnet() {
        let err = config("10.0.0.2", 24, "10.0.1.1").expect_err("outside");
        assert!(matches!(err, NetworkError::GatewayOutsideSubnet { .. }));
        assert!(err.to_string().starts_with("gateway "), "{err}");
        // The subnet's network and broadcast addresses are not hosts.
        assert!(matches!(
            config("10.0.0.2", 24, "10.0.0.0"),
            Err(NetworkError::GatewayOutsideSubnet { .. })
        ));
        assert!(matches!(
            config("10.0.0.2", 24, "10.0.0.255"),
            Err(NetworkError::GatewayOutsideSubnet { .. })
        ));
        let err = config("10.0.0.2", 24, "10.0.0.2").expect_err("same");
        assert_eq!(
            err,
            NetworkError::GatewayIsAddress {
                address: ip("10.0.0.2")
            }
        );
        assert!(err.to_string().starts_with("gateway "), "{err}");
    }

    #[test]
    fn address_must_be_a_unicast_host() {
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
        ] {
            let err = config(bad, 8, "10.0.0.1").expect_err("rejected");
            assert!(
                matches!(
                    err,
                    NetworkError::NotUnicast {
                        field: "address",
                        ..
                    }
                ),
                "{bad}: {err:?}"
            );
        }
        assert!(matches!(
            config("10.0.0.0", 24, "10.0.0.1"),
            Err(NetworkError::AddressNotHost { .. })
        ));
        assert!(matches!(
            config("10.0.0.255", 24, "10.0.0.1"),
            Err(NetworkError::AddressNotHost { .. })
        ));
    }

    #[test]
    fn mtu_and_nameservers_are_bounded() {
        let make = |mtu, ns: Vec<Ipv4Addr>| {
            NetworkConfig::new(mac(), ip("10.0.0.2"), 24, ip("10.0.0.1"), mtu, ns)
        };
        assert!(make(576, vec![]).is_ok());
        assert!(make(65520, vec![ip("1.1.1.1"); 3]).is_ok());
        for mtu in [0, 575, 65521, 65536, u32::MAX] {
            let err = make(mtu, vec![]).expect_err("rejected");
            assert_eq!(err, NetworkError::Mtu { mtu });
            assert!(err.to_string().starts_with("mtu "), "{err}");
        }
        let err = make(1500, vec![ip("1.1.1.1"); 4]).expect_err("too many");
        assert_eq!(err, NetworkError::TooManyNameservers { count: 4 });
        assert!(err.to_string().starts_with("nameservers "), "{err}");
        assert!(matches!(
            make(1500, vec![ip("0.0.0.0")]),
            Err(NetworkError::NotUnicast {
                field: "nameservers",
                ..
            })
        ));
    }

    #[test]
    fn netmask_matches_prefix_len() {
        let c = config("192.168.7.10", 20, "192.168.0.1").expect("valid");
        assert_eq!(c.netmask(), ip("255.255.240.0"));
        let c = config("10.0.0.2", 1, "10.0.0.1").expect("valid");
        assert_eq!(c.netmask(), ip("128.0.0.0"));
    }

    #[test]
    fn interface_name_rules_are_enforced() {
        assert!(InterfaceName::new("eth0").is_ok());
        assert!(InterfaceName::new("a".repeat(15)).is_ok());
        for bad in ["", ".", "..", "a/b", "a:1", "a b", "é", "a\0"] {
            assert!(InterfaceName::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            InterfaceName::new("a".repeat(16)),
            Err(NetworkError::BadInterfaceName { len: 16, .. })
        ));
    }

    #[test]
    fn error_messages_do_not_echo_strings() {
        let huge = "x".repeat(10_000);
        for e in [
            MacAddr::parse(&huge).err(),
            InterfaceName::new(huge.clone()).err(),
        ] {
            let msg = e.expect("rejected").to_string();
            assert!(msg.len() < 200 && !msg.contains("xxx"), "{msg}");
        }
    }
}
