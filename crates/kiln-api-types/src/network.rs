//! A sandbox's network as the API describes it: the [`NetworkSpec`] a client asks for (mode
//! `none`, `allow=RULES`, `nat` or `bridge`), the egress [`NetRule`]s of `allow`, and the
//! [`NetworkStatus`] the engine reports (addresses, counters, refused connections).
//!
//! The command-line spelling (`--network allow=example.org,*.example.org,10.1.2.0/24:5432`)
//! and the JSON form (`{"mode":"allow","rules":["example.org", ...]}`) parse through the same
//! [`NetRule`] parser, so a rule that one accepts the other accepts too. Must not: resolve
//! names or touch the network (that is `kiln-net`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::InvalidInput;

/// Most rules one `allow` policy may carry.
pub const MAX_NET_RULES: usize = 64;
/// Longest domain pattern (a DNS name is at most 253 characters).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest network group name.
pub const MAX_GROUP_LEN: usize = 32;
/// Most refused connections a sandbox's [`NetworkStatus`] keeps (the newest win).
pub const MAX_REFUSALS_KEPT: usize = 64;

/// How a sandbox reaches the network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum NetworkSpec {
    /// No network device: published ports and files go through the agent channel.
    #[default]
    None,
    /// Egress only to what the rules name, through kiln's filter; DNS answered by kiln for
    /// allowed names only; nothing inbound.
    Allow {
        /// Domains (`example.org`, `*.example.org`) and IPv4 networks (`10.1.2.0/24`), each
        /// with an optional `:PORT`.
        rules: NetRules,
    },
    /// Outbound internet through kiln's filter; never the host, its loopback, private or
    /// link-local ranges; nothing inbound.
    Nat,
    /// A tap on kiln's bridge with an address from kiln's pool (needs root); egress by
    /// masquerade, the host only for kiln's DNS, other sandboxes only within one `group`.
    Bridge {
        /// Sandboxes sharing a group reach each other (by name through kiln's DNS).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<NetworkGroup>,
    },
}

impl NetworkSpec {
    /// The mode's name: `none`, `allow`, `nat` or `bridge`.
    pub fn mode(&self) -> &'static str {
        match self {
            NetworkSpec::None => "none",
            NetworkSpec::Allow { .. } => "allow",
            NetworkSpec::Nat => "nat",
            NetworkSpec::Bridge { .. } => "bridge",
        }
    }

    /// Whether the sandbox has a network device.
    pub fn has_nic(&self) -> bool {
        !matches!(self, NetworkSpec::None)
    }

    /// Whether egress goes through kiln's user-mode filter (`allow` and `nat`).
    pub fn is_user_mode(&self) -> bool {
        matches!(self, NetworkSpec::Allow { .. } | NetworkSpec::Nat)
    }

    /// Checks what the types alone cannot (the rule count).
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if let NetworkSpec::Allow { rules } = self {
            rules.validate()?;
        }
        Ok(())
    }

    /// Attaches a group (`--network-group`): only a bridge has groups.
    pub fn with_group(self, group: Option<NetworkGroup>) -> Result<NetworkSpec, InvalidInput> {
        match (self, group) {
            (spec, None) => Ok(spec),
            (NetworkSpec::Bridge { .. }, Some(g)) => Ok(NetworkSpec::Bridge { group: Some(g) }),
            (spec, Some(_)) => Err(InvalidInput::Rule(format!(
                "--network-group needs --network bridge (the network is {})",
                spec.mode()
            ))),
        }
    }
}

/// The command-line form: `none`, `nat`, `bridge`, `allow=RULE[,RULE...]`.
impl FromStr for NetworkSpec {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<NetworkSpec, InvalidInput> {
        match s {
            "none" => Ok(NetworkSpec::None),
            "nat" => Ok(NetworkSpec::Nat),
            "bridge" => Ok(NetworkSpec::Bridge { group: None }),
            _ => match s.strip_prefix("allow=") {
                Some(rules) => Ok(NetworkSpec::Allow {
                    rules: rules.parse()?,
                }),
                None if s == "allow" => Err(InvalidInput::Rule(
                    "network mode allow needs rules: allow=RULE[,RULE...]".into(),
                )),
                None => Err(InvalidInput::Rule(format!(
                    "unknown network mode {s:?} (expected none, nat, bridge or allow=RULES)"
                ))),
            },
        }
    }
}

impl fmt::Display for NetworkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkSpec::Allow { rules } => write!(f, "allow={rules}"),
            NetworkSpec::Bridge { group: Some(g) } => write!(f, "bridge (group {g})"),
            other => f.write_str(other.mode()),
        }
    }
}

/// A bridge network group: `[a-z0-9]` then `[a-z0-9_-]`, at most 32 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NetworkGroup(String);

impl NetworkGroup {
    /// The group as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NetworkGroup {
    type Error = InvalidInput;
    fn try_from(s: String) -> Result<NetworkGroup, InvalidInput> {
        let ok = !s.is_empty()
            && s.len() <= MAX_GROUP_LEN
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(NetworkGroup(s))
        } else {
            Err(InvalidInput::Name {
                kind: "network group",
                value: s,
                rule: "1 to 32 of [a-z0-9_-], starting with a letter or digit",
            })
        }
    }
}

impl FromStr for NetworkGroup {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<NetworkGroup, InvalidInput> {
        NetworkGroup::try_from(s.to_owned())
    }
}

impl From<NetworkGroup> for String {
    fn from(g: NetworkGroup) -> String {
        g.0
    }
}

impl fmt::Display for NetworkGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The rules of an `allow` policy, in the order given. At most [`MAX_NET_RULES`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct NetRules(pub Vec<NetRule>);

impl NetRules {
    /// Checks the count.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if self.0.len() > MAX_NET_RULES {
            return Err(InvalidInput::TooMany {
                what: "network rules",
                got: self.0.len(),
                max: MAX_NET_RULES,
            });
        }
        Ok(())
    }

    /// The rules.
    pub fn iter(&self) -> std::slice::Iter<'_, NetRule> {
        self.0.iter()
    }

    /// Whether there are none (such a policy allows nothing but is valid).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `RULE[,RULE...]`; blanks around rules are ignored, an empty rule is an error.
impl FromStr for NetRules {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<NetRules, InvalidInput> {
        let rules = s
            .split(',')
            .map(|r| r.trim().parse::<NetRule>())
            .collect::<Result<Vec<_>, _>>()?;
        let rules = NetRules(rules);
        rules.validate()?;
        Ok(rules)
    }
}

impl fmt::Display for NetRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// One egress rule of an `allow` policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum NetRule {
    /// A domain: `example.org` (that name only) or `*.example.org` (any name below it, not
    /// the name itself), on any port or on `port` only.
    Domain {
        /// The pattern, lowercase, without a trailing dot.
        pattern: DomainPattern,
        /// Only this destination port.
        port: Option<u16>,
    },
    /// An IPv4 network (`10.1.2.0/24`, or one address `10.1.2.3`), on any port or on `port`
    /// only. A network that names a private, link-local or loopback range opens it
    /// (the host's own addresses and loopback stay closed: see `docs/network.md`).
    Cidr {
        /// Network address (host bits zero).
        addr: Ipv4Addr,
        /// Prefix length, 0..=32.
        prefix: u8,
        /// Only this destination port.
        port: Option<u16>,
    },
}

impl NetRule {
    /// The rule's port restriction.
    pub fn port(&self) -> Option<u16> {
        match self {
            NetRule::Domain { port, .. } | NetRule::Cidr { port, .. } => *port,
        }
    }

    /// Whether `name` (lowercase, no trailing dot) matches a domain rule.
    pub fn matches_name(&self, name: &str) -> bool {
        match self {
            NetRule::Domain { pattern, .. } => pattern.matches(name),
            NetRule::Cidr { .. } => false,
        }
    }

    /// Whether `ip` lies in a network rule.
    pub fn contains_ip(&self, ip: Ipv4Addr) -> bool {
        match self {
            NetRule::Cidr { addr, prefix, .. } => {
                let mask = prefix_mask(*prefix);
                u32::from(ip) & mask == u32::from(*addr)
            }
            NetRule::Domain { .. } => false,
        }
    }

    /// Whether the rule admits destination port `port`.
    pub fn admits_port(&self, port: u16) -> bool {
        self.port().is_none_or(|p| p == port)
    }
}

/// The netmask of a prefix length.
pub fn prefix_mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

impl FromStr for NetRule {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<NetRule, InvalidInput> {
        let bad = |why: &str| InvalidInput::Rule(format!("invalid network rule {s:?}: {why}"));
        if s.is_empty() {
            return Err(bad(
                "empty rule (two commas in a row, or a trailing comma?)",
            ));
        }
        if s.starts_with('[') || s.matches(':').count() > 1 {
            return Err(bad(
                "IPv6 destinations are not supported (guests get IPv4 only)",
            ));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => {
                let port: u16 = p
                    .parse()
                    .map_err(|_| bad("the port must be a number from 1 to 65535"))?;
                if port == 0 {
                    return Err(bad("the port must be a number from 1 to 65535"));
                }
                (h, Some(port))
            }
            None => (s, None),
        };
        if host.is_empty() {
            return Err(bad("nothing before the port"));
        }
        let looks_numeric = host
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/');
        if looks_numeric {
            let (a, prefix) = match host.split_once('/') {
                Some((a, p)) => {
                    let prefix: u8 = p
                        .parse()
                        .ok()
                        .filter(|p| *p <= 32)
                        .ok_or_else(|| bad("the prefix length must be 0 to 32"))?;
                    (a, prefix)
                }
                None => (host, 32),
            };
            let addr: Ipv4Addr = a
                .parse()
                .map_err(|_| bad("not an IPv4 address (four numbers 0-255 with dots)"))?;
            if u32::from(addr) & !prefix_mask(prefix) != 0 {
                let net = Ipv4Addr::from(u32::from(addr) & prefix_mask(prefix));
                return Err(bad(&format!(
                    "host bits set below the prefix (did you mean {net}/{prefix}?)"
                )));
            }
            return Ok(NetRule::Cidr { addr, prefix, port });
        }
        let pattern = DomainPattern::parse(host).map_err(|why| bad(&why))?;
        Ok(NetRule::Domain { pattern, port })
    }
}

impl fmt::Display for NetRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetRule::Domain { pattern, .. } => write!(f, "{pattern}")?,
            NetRule::Cidr { addr, prefix, .. } if *prefix == 32 => write!(f, "{addr}")?,
            NetRule::Cidr { addr, prefix, .. } => write!(f, "{addr}/{prefix}")?,
        }
        if let Some(p) = self.port() {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for NetRule {
    type Error = InvalidInput;
    fn try_from(s: String) -> Result<NetRule, InvalidInput> {
        s.parse()
    }
}

impl From<NetRule> for String {
    fn from(r: NetRule) -> String {
        r.to_string()
    }
}

/// A domain pattern: a DNS name, optionally with a leading `*.` (any name strictly below).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainPattern {
    /// The name without `*.`, lowercase, no trailing dot.
    base: String,
    /// `*.base`.
    wildcard: bool,
}

impl DomainPattern {
    /// Parses `name` or `*.name`; the error says what is wrong.
    pub fn parse(s: &str) -> Result<DomainPattern, String> {
        let (wildcard, base) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let base = base.strip_suffix('.').unwrap_or(base).to_ascii_lowercase();
        if base.contains('*') {
            return Err("a wildcard is allowed only as the first label (`*.example.org`)".into());
        }
        if base.is_empty() || base.len() > MAX_DOMAIN_LEN {
            return Err(format!("a domain is 1 to {MAX_DOMAIN_LEN} characters"));
        }
        for label in base.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(format!(
                    "label {label:?} is not a DNS label (1 to 63 of [a-z0-9-_], no leading or \
                     trailing hyphen)"
                ));
            }
        }
        Ok(DomainPattern { base, wildcard })
    }

    /// Whether `name` (any case, optional trailing dot) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if self.wildcard {
            name.len() > self.base.len() + 1
                && name[name.len() - self.base.len()..].eq_ignore_ascii_case(&self.base)
                && name.as_bytes()[name.len() - self.base.len() - 1] == b'.'
        } else {
            name.eq_ignore_ascii_case(&self.base)
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.base)
    }
}

/// `PUT /v1/sandboxes/{id}/network`: the new policy of a running sandbox. Only the user-mode
/// modes change at run time (`allow` ↔ `nat`); `none` and `bridge` are fixed at create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkUpdate {
    /// The new network (mode `allow` or `nat`).
    pub network: NetworkSpec,
}

/// A running sandbox's network: where it sits and what crossed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkStatus {
    /// The guest's MAC address (`aa:bb:cc:dd:ee:ff`), fresh after every restore.
    pub mac: String,
    /// The guest's IPv4 address, fresh after every restore.
    #[schema(value_type = String)]
    pub address: Ipv4Addr,
    /// Prefix length of the guest's subnet.
    pub prefix_len: u8,
    /// The guest's gateway (also its DNS server).
    #[schema(value_type = String)]
    pub gateway: Ipv4Addr,
    /// Traffic counters since the sandbox started.
    pub stats: NetStats,
    /// The newest refused connections (at most 64), oldest first.
    pub refused: Vec<Refusal>,
}

/// Traffic counters of one sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetStats {
    /// Bytes the guest sent (Ethernet frames).
    pub bytes_out: u64,
    /// Bytes the guest received (Ethernet frames).
    pub bytes_in: u64,
    /// Outbound connections (TCP) and flows (UDP) that were allowed.
    pub connections: u64,
    /// Connections, flows and DNS questions that were refused.
    pub refused: u64,
}

/// One refused connection or DNS question.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Refusal {
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// `tcp`, `udp`, `icmp` or `dns`.
    pub protocol: String,
    /// What was asked for: `ip:port`, or the name of a DNS question.
    pub destination: String,
    /// The name the connection was made for (TLS SNI, HTTP Host or the DNS name the address
    /// came from), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Why it was refused.
    pub reason: RefusalReason,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// No rule allows the destination.
    NotAllowed,
    /// The destination is one of the host's own addresses or networks.
    Host,
    /// A loopback address.
    Loopback,
    /// A private range (RFC 1918, shared address space, unique local) not named by a rule.
    Private,
    /// A link-local address (e.g. cloud metadata at 169.254.169.254).
    LinkLocal,
    /// Multicast, broadcast, unspecified or reserved.
    Special,
    /// The TLS SNI or HTTP Host does not match an allowed name.
    NameMismatch,
    /// A DNS question for a name no rule allows.
    DnsName,
    /// A DNS answer pointing into a closed range (private, loopback, link-local, the host).
    DnsAnswer,
    /// Another sandbox not in the same network group.
    OtherSandbox,
    /// A protocol kiln does not forward (IPv6, non-IP frames, spoofed source addresses).
    Protocol,
    /// Too many flows or buffered bytes at once.
    Limit,
}

impl RefusalReason {
    /// The reason in words, for `kiln inspect`.
    pub fn describe(self) -> &'static str {
        match self {
            RefusalReason::NotAllowed => "no rule allows it",
            RefusalReason::Host => "the host itself",
            RefusalReason::Loopback => "loopback",
            RefusalReason::Private => "a private range",
            RefusalReason::LinkLocal => "link-local",
            RefusalReason::Special => "a special-purpose address",
            RefusalReason::NameMismatch => "TLS SNI or HTTP Host not allowed",
            RefusalReason::DnsName => "name not allowed",
            RefusalReason::DnsAnswer => "answer in a closed range",
            RefusalReason::OtherSandbox => "another sandbox outside the group",
            RefusalReason::Protocol => "protocol not forwarded",
            RefusalReason::Limit => "too many flows",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        assert_eq!("none".parse::<NetworkSpec>().unwrap(), NetworkSpec::None);
        assert_eq!("nat".parse::<NetworkSpec>().unwrap(), NetworkSpec::Nat);
        assert_eq!(
            "bridge".parse::<NetworkSpec>().unwrap(),
            NetworkSpec::Bridge { group: None }
        );
        let allow: NetworkSpec = "allow=example.org,*.pypi.org:443,10.1.2.0/24:5432"
            .parse()
            .unwrap();
        assert_eq!(
            allow.to_string(),
            "allow=example.org,*.pypi.org:443,10.1.2.0/24:5432"
        );
        let e = "alow=x".parse::<NetworkSpec>().unwrap_err().to_string();
        assert!(e.contains("unknown network mode \"alow=x\""), "{e}");
        let e = "allow".parse::<NetworkSpec>().unwrap_err().to_string();
        assert!(e.contains("needs rules"), "{e}");
    }

    #[test]
    fn bad_rules_name_what_is_wrong() {
        let cases = [
            ("", "empty rule"),
            ("a,,b", "empty rule"),
            ("example.org:0", "port"),
            ("example.org:99999", "port"),
            ("10.1.2.3/33", "prefix length"),
            ("10.1.2.3/24", "did you mean 10.1.2.0/24"),
            ("300.1.2.3", "not an IPv4 address"),
            ("[::1]:80", "IPv6"),
            ("a.*.org", "wildcard"),
            ("-bad.org", "not a DNS label"),
            ("exa mple.org", "not a DNS label"),
            (":80", "nothing before the port"),
        ];
        for (input, want) in cases {
            let e = input.parse::<NetRules>().unwrap_err().to_string();
            assert!(e.contains(want), "{input:?}: {e}");
        }
    }

    #[test]
    fn too_many_rules_is_refused() {
        let many = (0..=MAX_NET_RULES)
            .map(|i| format!("h{i}.example.org"))
            .collect::<Vec<_>>()
            .join(",");
        let e = many.parse::<NetRules>().unwrap_err().to_string();
        assert!(e.contains("too many network rules"), "{e}");
    }

    #[test]
    fn domain_patterns_match_exactly_or_strictly_below() {
        let exact = DomainPattern::parse("Example.ORG.").unwrap();
        assert!(exact.matches("example.org"));
        assert!(exact.matches("EXAMPLE.org."));
        assert!(!exact.matches("www.example.org"));
        assert!(!exact.matches("badexample.org"));
        let wild = DomainPattern::parse("*.example.org").unwrap();
        assert!(wild.matches("www.example.org"));
        assert!(wild.matches("a.b.example.org"));
        assert!(!wild.matches("example.org"));
        assert!(!wild.matches("badexample.org"));
        assert!(!wild.matches(".example.org"));
    }

    #[test]
    fn cidr_rules_contain_their_network_and_ports() {
        let r: NetRule = "10.1.2.0/24:5432".parse().unwrap();
        assert!(r.contains_ip(Ipv4Addr::new(10, 1, 2, 200)));
        assert!(!r.contains_ip(Ipv4Addr::new(10, 1, 3, 1)));
        assert!(r.admits_port(5432));
        assert!(!r.admits_port(5433));
        let all: NetRule = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains_ip(Ipv4Addr::new(8, 8, 8, 8)));
        assert!(all.admits_port(1));
        let one: NetRule = "192.0.2.7".parse().unwrap();
        assert_eq!(one.to_string(), "192.0.2.7");
        assert!(one.contains_ip(Ipv4Addr::new(192, 0, 2, 7)));
        assert!(!one.contains_ip(Ipv4Addr::new(192, 0, 2, 8)));
    }

    #[test]
    fn json_form_round_trips_and_refuses_bad_rules() {
        let spec: NetworkSpec =
            serde_json::from_str(r#"{"mode":"allow","rules":["example.org:443"]}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&spec).unwrap(),
            r#"{"mode":"allow","rules":["example.org:443"]}"#
        );
        let e = serde_json::from_str::<NetworkSpec>(r#"{"mode":"allow","rules":["a..b"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a DNS label"), "{e}");
        let bridge: NetworkSpec =
            serde_json::from_str(r#"{"mode":"bridge","group":"db"}"#).unwrap();
        assert_eq!(
            bridge,
            NetworkSpec::Bridge {
                group: Some("db".parse().unwrap())
            }
        );
        assert!(serde_json::from_str::<NetworkSpec>(r#"{"mode":"bridge","group":"Db!"}"#).is_err());
    }

    #[test]
    fn groups_need_a_bridge() {
        let g: NetworkGroup = "web".parse().unwrap();
        assert!(NetworkSpec::Nat.with_group(Some(g.clone())).is_err());
        assert_eq!(
            NetworkSpec::Bridge { group: None }
                .with_group(Some(g.clone()))
                .unwrap(),
            NetworkSpec::Bridge { group: Some(g) }
        );
    }
}
