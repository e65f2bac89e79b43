//! kiln's nftables rules for the bridge, as text for `nft -f -`: rendering is pure (unit
//! tested here); [`super::link::BridgeHost`] applies it.
//!
//! Every tap is an *isolated* bridge port ([`super::link::BridgeHost::attach_port`]): the
//! bridge never forwards a frame from one tap to another, only between a tap and the host.
//! The bridge answers ARP for every address of the subnet with its own MAC
//! (`proxy_arp_pvlan`), so guest ↔ guest traffic is routed by the host, where the forward hook
//! decides it and refuses what it refuses with a TCP reset or an ICMP error at once (a bridged
//! frame could only be dropped: the kernel's bridge family cannot reject, and a dropped ARP
//! leaves the guest waiting seconds for its neighbour to fail).
//!
//! Two tables, both named `kiln`, nothing else touched:
//!
//! - `table bridge kiln` sees frames on the bridge's ports:
//!   - `prerouting` (anti-spoofing): a frame from a tap (`kt-*`) passes only if
//!     `tap . source MAC . source IP` is in `@src4` (ARP: the sender MAC and IP too); IPv6
//!     and every other ethertype from a tap are dropped;
//!   - `forward`: tap → tap is dropped (a second fence behind the isolated ports).
//! - `table inet kiln`:
//!   - `input` from the bridge: only UDP/TCP 53 to the gateway (kiln's DNS) and replies;
//!   - `forward`: bridge → bridge (guest ↔ guest, routed) only for address pairs in
//!     `@peers4` (both sandboxes share a network group), else refused; into the bridge only
//!     replies (conntrack); from the bridge never to `@closed4` (loopback, private, shared,
//!     link-local, multicast, reserved, the host's connected subnets and addresses), never
//!     IPv6, never a source outside the subnet; the rest passes;
//!   - `output`: no ICMP redirects to the guests (routing back out of the bridge is the point);
//!   - `postrouting`: masquerade the subnet leaving by any other interface.
//!
//! Accounting: each sandbox has named counters `conn_<hex>` (new connections leaving the
//! bridge, `ct state new` before the final accept of `guest_out`) and `ref_<hex>` (refused
//! packets: guest → host, closed destinations, guest → guest outside its group), reached
//! through maps keyed by the guest's address (`@conns4`, `@refused4`: the anti-spoofing above
//! ties the address to the tap). A map lookup that misses ends the rule, so counting rules
//! carry no verdict: the refusing rule follows. Broadcasts and multicasts are neither counted
//! nor logged. With an nflog group, every refusing rule is preceded by a rate-limited
//! `log group N prefix "kiln-…"` rule ([`super::nflog`] reads it).
//!
//! Per-sandbox state is only elements of `@src4`, `@peers4` and the two maps, and the
//! sandbox's counters, named by its tap or keyed by its lease: adding or removing a sandbox
//! adds or deletes those, never rewrites the rules. Every chain has policy accept and drops
//! only traffic of kiln's bridge, so the host's other traffic is left to the host's own
//! rules. Must not: name or change any other table.

use std::collections::HashSet;
use std::fmt::Write as _;

use super::nflog::{PREFIX_CLOSED, PREFIX_HOST, PREFIX_PEER};
use super::pool::Subnet;
use super::{BridgeConfig, BridgePort, TAP_PREFIX};

/// Most refused packets logged per second per refusing rule (all sandboxes together); the
/// counters count every one.
pub const LOG_RATE: u32 = 20;
/// Burst allowed above [`LOG_RATE`].
pub const LOG_BURST: u32 = 40;

/// The closed destination ranges for guest egress, besides the host's connected subnets: the
/// same as the user modes' closed classes (`crate::addr`), so every mode reaches the same
/// internet (documentation and benchmarking ranges are ordinary addresses).
pub const CLOSED_RANGES: &[&str] = &[
    "0.0.0.0/8",      // "this" network
    "10.0.0.0/8",     // private
    "100.64.0.0/10",  // shared address space (CGNAT)
    "127.0.0.0/8",    // loopback
    "169.254.0.0/16", // link-local (cloud metadata)
    "172.16.0.0/12",  // private
    "192.168.0.0/16", // private
    "224.0.0.0/4",    // multicast
    "240.0.0.0/4",    // reserved and limited broadcast
];

/// Name of the table in each family.
pub const TABLE: &str = "kiln";

/// Per-sandbox elements of the bridge table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Elements {
    /// `@src4`: tap, MAC, IP (as nft prints them).
    pub src4: Vec<(String, String, String)>,
    /// `@peers4`: ordered pairs of guest addresses that may talk (as nft prints them).
    pub peers: Vec<(String, String)>,
    /// Per-sandbox accounting, tap and IP: named counters `conn_<hex>` and `ref_<hex>` in
    /// `table inet kiln`, reached from the rules through the maps `@conns4` and `@refused4`
    /// keyed by the guest's address (the bridge table's anti-spoofing ties the address to the
    /// tap).
    pub acct: Vec<(String, String)>,
}

/// Name of a tap's connection counter (`conn_` and the tap's 12 hex digits).
pub fn conn_counter(tap: &str) -> String {
    format!("conn_{}", tap.strip_prefix(TAP_PREFIX).unwrap_or(tap))
}

/// Name of a tap's refusal counter (`ref_` and the tap's 12 hex digits).
pub fn refused_counter(tap: &str) -> String {
    format!("ref_{}", tap.strip_prefix(TAP_PREFIX).unwrap_or(tap))
}

impl Elements {
    /// The elements of `ports` (their leases and all same-group pairs among them).
    pub fn of_ports(ports: &[BridgePort]) -> Elements {
        let mut e = Elements::default();
        for p in ports {
            e.src4.push((p.tap(), p.mac.to_string(), p.ip.to_string()));
            e.acct.push((p.tap(), p.ip.to_string()));
            for q in ports {
                if p.peers_with(q) {
                    e.peers.push((p.ip.to_string(), q.ip.to_string()));
                }
            }
        }
        e
    }

    /// The elements one new sandbox adds, given the sandboxes already on the bridge.
    pub fn of_new_port(port: &BridgePort, others: &[BridgePort]) -> Elements {
        let mut e = Elements::default();
        e.src4
            .push((port.tap(), port.mac.to_string(), port.ip.to_string()));
        e.acct.push((port.tap(), port.ip.to_string()));
        for o in others.iter().filter(|o| port.peers_with(o)) {
            e.peers.push((port.ip.to_string(), o.ip.to_string()));
            e.peers.push((o.ip.to_string(), port.ip.to_string()));
        }
        e
    }

    /// Only the elements that involve a tap `keep` rejects. A pair of `@peers4` is kept while
    /// both its addresses belong to kept taps (by `@src4` or the accounting maps); a pair
    /// naming an address no kept tap has is dead too.
    pub fn filter_dead(&self, keep: impl Fn(&str) -> bool) -> Elements {
        let live: HashSet<&str> = self
            .src4
            .iter()
            .map(|(t, _, ip)| (t, ip))
            .chain(self.acct.iter().map(|(t, ip)| (t, ip)))
            .filter(|(t, _)| keep(t))
            .map(|(_, ip)| ip.as_str())
            .collect();
        Elements {
            src4: self
                .src4
                .iter()
                .filter(|(t, _, _)| !keep(t))
                .cloned()
                .collect(),
            peers: self
                .peers
                .iter()
                .filter(|(a, b)| !live.contains(a.as_str()) || !live.contains(b.as_str()))
                .cloned()
                .collect(),
            acct: self
                .acct
                .iter()
                .filter(|(t, _)| !keep(t))
                .cloned()
                .collect(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.src4.is_empty() && self.peers.is_empty() && self.acct.is_empty()
    }

    /// How many elements (set and map elements; each accounting entry is one sandbox's
    /// counters and their map elements).
    pub fn len(&self) -> usize {
        self.src4.len() + self.peers.len() + self.acct.len()
    }

    /// The taps named anywhere (pairs of `@peers4` name addresses, not taps).
    pub fn taps(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .src4
            .iter()
            .map(|(t, _, _)| t.clone())
            .chain(self.acct.iter().map(|(t, _)| t.clone()))
            .collect();
        t.sort();
        t.dedup();
        t
    }

    fn src4_list(&self) -> String {
        self.src4
            .iter()
            .map(|(t, m, i)| format!("\"{t}\" . {m} . {i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn map_list(&self, counter: fn(&str) -> String) -> String {
        self.acct
            .iter()
            .map(|(t, ip)| format!("{ip} : \"{}\"", counter(t)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn counters_decl(&self, counter: fn(&str) -> String) -> String {
        self.acct
            .iter()
            .map(|(t, _)| format!("  counter {} {{\n  }}\n", counter(t)))
            .collect()
    }

    fn peers_list(&self) -> String {
        self.peers
            .iter()
            .map(|(a, b)| format!("{a} . {b}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The whole ruleset: (re)creates both kiln tables with `elements`, atomically (one `nft -f`
/// transaction: `table`/`delete table` first, so it works whether or not they exist).
/// `host_nets` are the host's connected subnets and own addresses (closed to guests). With
/// `nflog`, every refusing rule also logs the refused packet (rate-limited) to that
/// nfnetlink_log group, prefixed with its reason ([`super::nflog`]).
pub fn render_ruleset(
    cfg: &BridgeConfig,
    host_nets: &[Subnet],
    elements: &Elements,
    nflog: Option<u16>,
) -> String {
    let br = &cfg.name;
    let sub = cfg.subnet;
    let gw = cfg.gateway();
    let closed = closed_list(host_nets);
    let tap = format!("{TAP_PREFIX}*");
    let log = |matches: &str, prefix: &str| match nflog {
        Some(group) => format!(
            "    {matches} limit rate {LOG_RATE}/second burst {LOG_BURST} packets log prefix \"{prefix}\" group {group}\n"
        ),
        None => String::new(),
    };
    let log_peer = log("ip saddr != 0.0.0.0", PREFIX_PEER);
    let log_host = log("meta pkttype host", PREFIX_HOST);
    let log_closed = log("ip daddr @closed4", PREFIX_CLOSED);
    let inet_counters = format!(
        "{}{}",
        elements.counters_decl(conn_counter),
        elements.counters_decl(refused_counter)
    );
    let mut s = String::new();
    s.push_str(&render_remove_all());
    let _ = write!(
        s,
        r#"table bridge {TABLE} {{
  set src4 {{
    type ifname . ether_addr . ipv4_addr
{src4}  }}
  chain prerouting {{
    type filter hook prerouting priority -200; policy accept;
    iifname != "{tap}" accept
    ether type arp iifname . ether saddr . arp saddr ip @src4 iifname . arp saddr ether . arp saddr ip @src4 accept
    ether type ip iifname . ether saddr . ip saddr @src4 accept
    counter drop comment "spoofed or non-IPv4 frame from a tap"
  }}
  chain forward {{
    type filter hook forward priority -200; policy accept;
    iifname "{tap}" oifname "{tap}" counter drop comment "tap to tap: the ports are isolated, guest to guest is routed"
  }}
}}
table inet {TABLE} {{
{inet_counters}  map conns4 {{
    type ipv4_addr : counter
{conns}  }}
  map refused4 {{
    type ipv4_addr : counter
{refused}  }}
  set peers4 {{
    type ipv4_addr . ipv4_addr
{peers}  }}
  set closed4 {{
    type ipv4_addr
    flags interval
    auto-merge
    elements = {{ {closed} }}
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{br}" jump guest_to_host
  }}
  chain guest_to_host {{
    ip daddr {gw} udp dport 53 accept
    ip daddr {gw} tcp dport 53 accept
    ct state established,related accept
    meta pkttype host counter name ip saddr map @refused4
{log_host}    meta l4proto tcp counter reject with tcp reset comment "guest to host"
    counter reject with icmpx type admin-prohibited comment "guest to host"
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{br}" oifname "{br}" jump guest_to_guest
    oifname "{br}" ct state established,related accept
    oifname "{br}" counter drop comment "unsolicited traffic into the bridge"
    iifname "{br}" jump guest_out
  }}
  chain guest_to_guest {{
    ip saddr . ip daddr @peers4 accept
    counter name ip saddr map @refused4
{log_peer}    meta l4proto tcp counter reject with tcp reset comment "guest to guest outside a group"
    counter reject with icmpx type admin-prohibited comment "guest to guest outside a group"
  }}
  chain guest_out {{
    meta nfproto ipv6 counter drop
    ip saddr != {sub} counter drop comment "source outside the bridge subnet"
    ip daddr @closed4 counter name ip saddr map @refused4
{log_closed}    ip daddr @closed4 meta l4proto tcp counter reject with tcp reset comment "closed destination"
    ip daddr @closed4 counter reject with icmpx type admin-prohibited comment "closed destination"
    ct state new counter name ip saddr map @conns4
    accept
  }}
  chain output {{
    type filter hook output priority 0; policy accept;
    oifname "{br}" icmp type redirect drop comment "guest to guest is routed through the host on purpose"
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {sub} oifname != "{br}" masquerade
  }}
}}
"#,
        src4 = elements_line(&elements.src4_list()),
        peers = elements_line(&elements.peers_list()),
        refused = elements_line(&elements.map_list(refused_counter)),
        conns = elements_line(&elements.map_list(conn_counter)),
    );
    s
}

fn closed_list(host_nets: &[Subnet]) -> String {
    let mut closed: Vec<String> = CLOSED_RANGES.iter().map(|s| (*s).to_owned()).collect();
    closed.extend(host_nets.iter().map(Subnet::to_string));
    closed.join(", ")
}

/// Replaces the closed destinations with the fixed ranges and `host_nets` (the host's
/// addresses changed: DHCP, a VPN came up), atomically.
pub fn render_closed_refresh(host_nets: &[Subnet]) -> String {
    format!(
        "flush set inet {TABLE} closed4\nadd element inet {TABLE} closed4 {{ {} }}\n",
        closed_list(host_nets)
    )
}

fn elements_line(list: &str) -> String {
    if list.is_empty() {
        String::new()
    } else {
        format!("    elements = {{ {list} }}\n")
    }
}

/// Adds elements (one transaction).
pub fn render_add(elements: &Elements) -> String {
    render_elements("add", elements)
}

/// Deletes elements (one transaction; every element must exist).
pub fn render_delete(elements: &Elements) -> String {
    render_elements("delete", elements)
}

fn render_elements(verb: &str, e: &Elements) -> String {
    let mut s = String::new();
    // Counters exist before the map elements naming them, and go after them.
    let counters = |s: &mut String| {
        for (t, _) in &e.acct {
            let _ = writeln!(s, "{verb} counter inet {TABLE} {}", conn_counter(t));
            let _ = writeln!(s, "{verb} counter inet {TABLE} {}", refused_counter(t));
        }
    };
    if verb == "add" {
        counters(&mut s);
    }
    if !e.acct.is_empty() {
        let keys = |counter: fn(&str) -> String| {
            if verb == "add" {
                e.map_list(counter)
            } else {
                e.acct
                    .iter()
                    .map(|(_, ip)| ip.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let _ = writeln!(
            s,
            "{verb} element inet {TABLE} conns4 {{ {} }}",
            keys(conn_counter)
        );
        let _ = writeln!(
            s,
            "{verb} element inet {TABLE} refused4 {{ {} }}",
            keys(refused_counter)
        );
    }
    if verb == "delete" {
        counters(&mut s);
    }
    if !e.src4.is_empty() {
        let _ = writeln!(
            s,
            "{verb} element bridge {TABLE} src4 {{ {} }}",
            e.src4_list()
        );
    }
    if !e.peers.is_empty() {
        let _ = writeln!(
            s,
            "{verb} element inet {TABLE} peers4 {{ {} }}",
            e.peers_list()
        );
    }
    s
}

/// Deletes both kiln tables (whether or not they exist), atomically.
pub fn render_remove_all() -> String {
    format!(
        "table bridge {TABLE}\ndelete table bridge {TABLE}\ntable inet {TABLE}\ndelete table inet {TABLE}\n"
    )
}

/// Reads the elements of `@src4` from `nft -j list table bridge kiln`, and those of `@peers4`
/// and the accounting entries (`@conns4`) from `nft -j list table inet kiln`.
pub fn parse_elements(json: &str) -> Result<Elements, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .ok_or("no `nftables` array")?;
    let mut out = Elements::default();
    for item in items {
        if let Some(map) = item.get("map")
            && map.get("name").and_then(|n| n.as_str()) == Some("conns4")
        {
            for el in map
                .get("elem")
                .and_then(|e| e.as_array())
                .into_iter()
                .flatten()
            {
                let pair = el.as_array().map(Vec::as_slice);
                let Some([ip, counter]) = pair else {
                    return Err(format!("unexpected element of conns4: {el}"));
                };
                let hex = counter
                    .as_str()
                    .and_then(|c| c.strip_prefix("conn_"))
                    .ok_or_else(|| format!("unexpected counter in conns4: {el}"))?;
                let ip = ip
                    .as_str()
                    .ok_or_else(|| format!("bad key in conns4: {el}"))?;
                out.acct.push((format!("{TAP_PREFIX}{hex}"), ip.to_owned()));
            }
        }
        let Some(set) = item.get("set") else {
            continue;
        };
        let name = set.get("name").and_then(|n| n.as_str()).unwrap_or("");
        if name != "src4" && name != "peers4" {
            continue;
        }
        let elems = set
            .get("elem")
            .and_then(|e| e.as_array())
            .cloned()
            .unwrap_or_default();
        for el in elems {
            let parts: Vec<String> = el
                .get("concat")
                .and_then(|c| c.as_array())
                .ok_or_else(|| format!("element of {name} is not a concatenation: {el}"))?
                .iter()
                .map(|p| match p {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            match (name, parts.as_slice()) {
                ("src4", [t, m, i]) => out.src4.push((t.clone(), m.clone(), i.clone())),
                ("peers4", [a, b]) => out.peers.push((a.clone(), b.clone())),
                _ => return Err(format!("unexpected element of {name}: {el}")),
            }
        }
    }
    Ok(out)
}

/// A tap's (connections, refused) from `nft -j list counters`: `conn_<hex>` of
/// `table inet kiln` and `ref_<hex>` of the same table. Missing counters are 0.
pub fn parse_counters(json: &str, tap: &str) -> Result<(u64, u64), String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .ok_or("no `nftables` array")?;
    let (conn, refused) = (conn_counter(tap), refused_counter(tap));
    let (mut c, mut r) = (0u64, 0u64);
    for counter in items.iter().filter_map(|i| i.get("counter")) {
        let field = |k: &str| counter.get(k).and_then(|v| v.as_str()).unwrap_or("");
        if field("table") != TABLE {
            continue;
        }
        let packets = counter.get("packets").and_then(|p| p.as_u64()).unwrap_or(0);
        match (field("family"), field("name")) {
            ("inet", n) if n == conn => c = c.saturating_add(packets),
            ("inet", n) if n == refused => r = r.saturating_add(packets),
            _ => {}
        }
    }
    Ok((c, r))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::Mac;

    fn port(n: u8, g: Option<&str>) -> BridgePort {
        BridgePort {
            sandbox_id: format!("sb-00000000000{n:x}").parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 0, n]),
            ip: Ipv4Addr::new(10, 214, 0, n + 1),
            group: g.map(|g| g.parse().unwrap()),
        }
    }

    #[test]
    fn render_ruleset_has_the_rules_that_matter() {
        let cfg = BridgeConfig::default();
        let ports = [port(1, Some("db")), port(2, Some("db")), port(3, None)];
        let host = [
            "192.0.2.0/24".parse().unwrap(),
            "192.0.2.2/32".parse().unwrap(),
        ];
        let r = render_ruleset(&cfg, &host, &Elements::of_ports(&ports), Some(2140));
        let lines: Vec<&str> = r.lines().map(str::trim).collect();
        let has = |l: &str| assert!(lines.contains(&l), "missing line {l:?} in\n{r}");
        // Atomic re-create, only kiln's tables.
        assert!(
            r.starts_with("table bridge kiln\ndelete table bridge kiln\n"),
            "{r}"
        );
        for l in r.lines().filter(|l| l.starts_with("table ")) {
            assert!(l.starts_with("table bridge kiln") || l.starts_with("table inet kiln"));
        }
        has(
            r#"elements = { "kt-000000000001" . 02:00:00:00:00:01 . 10.214.0.2, "kt-000000000002" . 02:00:00:00:00:02 . 10.214.0.3, "kt-000000000003" . 02:00:00:00:00:03 . 10.214.0.4 }"#,
        );
        has(r#"elements = { 10.214.0.2 . 10.214.0.3, 10.214.0.3 . 10.214.0.2 }"#);
        has(r#"ether type ip iifname . ether saddr . ip saddr @src4 accept"#);
        // Guest to guest: never bridged, routed and decided by address pairs.
        has(
            r#"iifname "kt-*" oifname "kt-*" counter drop comment "tap to tap: the ports are isolated, guest to guest is routed""#,
        );
        has(r#"iifname "kiln0" oifname "kiln0" jump guest_to_guest"#);
        has("ip saddr . ip daddr @peers4 accept");
        has(
            r#"meta l4proto tcp counter reject with tcp reset comment "guest to guest outside a group""#,
        );
        has(
            r#"counter reject with icmpx type admin-prohibited comment "guest to guest outside a group""#,
        );
        has(
            r#"oifname "kiln0" icmp type redirect drop comment "guest to guest is routed through the host on purpose""#,
        );
        has("ip daddr 10.214.0.1 udp dport 53 accept");
        has("ip daddr 10.214.0.1 tcp dport 53 accept");
        has(r#"iifname "kiln0" jump guest_to_host"#);
        has(
            r#"ip daddr @closed4 meta l4proto tcp counter reject with tcp reset comment "closed destination""#,
        );
        has(
            r#"ip daddr @closed4 counter reject with icmpx type admin-prohibited comment "closed destination""#,
        );
        has(r#"meta l4proto tcp counter reject with tcp reset comment "guest to host""#);
        has(r#"ip saddr 10.214.0.0/16 oifname != "kiln0" masquerade"#);
        // Accounting: counters per sandbox, reached through maps on the guest's address.
        has("counter conn_000000000001 {");
        has("counter ref_000000000003 {");
        has(
            r#"elements = { 10.214.0.2 : "conn_000000000001", 10.214.0.3 : "conn_000000000002", 10.214.0.4 : "conn_000000000003" }"#,
        );
        has("ct state new counter name ip saddr map @conns4");
        has("ip daddr @closed4 counter name ip saddr map @refused4");
        has(
            r#"ip daddr @closed4 limit rate 20/second burst 40 packets log prefix "kiln-closed" group 2140"#,
        );
        has("meta pkttype host counter name ip saddr map @refused4");
        has(
            r#"ip saddr != 0.0.0.0 limit rate 20/second burst 40 packets log prefix "kiln-peer" group 2140"#,
        );
        assert_eq!(r.matches("log prefix").count(), 3, "{r}");
        // The counting rules come before the verdicts they count.
        let at = |l: &str| r.find(l).unwrap_or_else(|| panic!("{l}"));
        assert!(at("map @conns4\n    accept") > at("comment \"closed destination\""));
        assert!(at("log prefix \"kiln-host\"") < at("comment \"guest to host\""));
        assert!(at("ip saddr . ip daddr @peers4 accept") < at("log prefix \"kiln-peer\""));
        let closed = lines
            .iter()
            .find(|l| l.starts_with("elements = { 0.0.0.0/8"))
            .expect("closed set");
        for c in [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "169.254.0.0/16",
            "127.0.0.0/8",
            "224.0.0.0/4",
            "192.0.2.0/24",
            "192.0.2.2/32",
        ] {
            assert!(closed.contains(c), "{c} not closed: {closed}");
        }
        // Every base chain lets the host's own traffic be.
        assert_eq!(r.matches("policy accept;").count(), 6, "{r}");
        assert!(!r.contains("policy drop"));
    }

    #[test]
    fn render_closed_refresh_flushes_then_adds_in_one_script() {
        let r = render_closed_refresh(&["192.0.2.0/24".parse().unwrap()]);
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines.len(), 2, "{r}");
        assert_eq!(lines[0], "flush set inet kiln closed4");
        assert!(lines[1].starts_with("add element inet kiln closed4 { 0.0.0.0/8, 10.0.0.0/8"));
        assert!(lines[1].ends_with("240.0.0.0/4, 192.0.2.0/24 }"), "{r}");
    }

    #[test]
    fn render_ruleset_without_ports_has_empty_sets() {
        let r = render_ruleset(&BridgeConfig::default(), &[], &Elements::default(), None);
        assert!(!r.contains(" log "), "{r}");
        assert!(!r.contains("elements = {  }"), "{r}");
        assert!(
            r.contains("set peers4 {\n    type ipv4_addr . ipv4_addr\n  }"),
            "{r}"
        );
    }

    #[test]
    fn elements_of_new_port_pairs_only_its_group_both_ways() {
        let others = [port(1, Some("db")), port(2, Some("web")), port(3, None)];
        let e = Elements::of_new_port(&port(4, Some("db")), &others);
        assert_eq!(
            e.peers,
            vec![
                ("10.214.0.5".into(), "10.214.0.2".into()),
                ("10.214.0.2".into(), "10.214.0.5".into()),
            ]
        );
        let add = render_add(&e);
        assert_eq!(
            add,
            "add counter inet kiln conn_000000000004\n\
             add counter inet kiln ref_000000000004\n\
             add element inet kiln conns4 { 10.214.0.5 : \"conn_000000000004\" }\n\
             add element inet kiln refused4 { 10.214.0.5 : \"ref_000000000004\" }\n\
             add element bridge kiln src4 { \"kt-000000000004\" . 02:00:00:00:00:04 . 10.214.0.5 }\n\
             add element inet kiln peers4 { 10.214.0.5 . 10.214.0.2, 10.214.0.2 . 10.214.0.5 }\n"
        );
        // Deleting: the map elements first, then the counters they name.
        let del = render_delete(&e);
        let at = |l: &str| del.find(l).unwrap_or_else(|| panic!("{l} in {del}"));
        assert!(
            at("delete element inet kiln conns4 { 10.214.0.5 }")
                < at("delete counter inet kiln conn_000000000004")
        );
        assert!(del.contains("delete counter inet kiln ref_000000000004\n"));
        assert!(!del.contains("bridge kiln ref_"), "{del}");
        let lone = Elements::of_new_port(&port(5, None), &others);
        assert!(lone.peers.is_empty());
        assert!(!render_add(&lone).contains("peers4"));
    }

    #[test]
    fn parse_elements_reads_nft_json_and_filter_dead_keeps_live() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "bridge", "name": "kiln", "handle": 1}},
          {"set": {"family": "bridge", "name": "src4", "table": "kiln", "type": ["ifname", "ether_addr", "ipv4_addr"], "handle": 1,
             "elem": [{"concat": ["kt-000000000001", "02:00:00:00:00:01", "10.214.0.2"]}, {"concat": ["kt-000000000002", "02:00:00:00:00:02", "10.214.0.3"]}]}},
          {"set": {"family": "inet", "name": "peers4", "table": "kiln", "type": ["ipv4_addr", "ipv4_addr"], "handle": 2,
             "elem": [{"concat": ["10.214.0.2", "10.214.0.3"]}, {"concat": ["10.214.0.3", "10.214.0.2"]}, {"concat": ["10.214.0.3", "10.214.0.9"]}]}},
          {"chain": {"family": "bridge", "table": "kiln", "name": "prerouting"}}]}"#;
        let e = parse_elements(json).unwrap();
        assert_eq!(e.src4.len(), 2);
        assert_eq!(e.peers.len(), 3);
        // Keep tap 1: the pairs with tap 2's address go, and so does the pair naming an
        // address no tap has (left by a crash between two deletions).
        let dead = e.filter_dead(|t| t == "kt-000000000001");
        assert_eq!(dead.src4.len(), 1);
        assert_eq!(dead.src4[0].0, "kt-000000000002");
        assert_eq!(dead.peers.len(), 3, "every pair names tap 2's address");
        assert_eq!(dead.taps(), vec!["kt-000000000002"]);
        let orphan = e.filter_dead(|_| true);
        assert_eq!(
            orphan.peers,
            vec![("10.214.0.3".to_owned(), "10.214.0.9".to_owned())],
            "a pair naming an address of no tap"
        );
        assert!(orphan.src4.is_empty() && orphan.acct.is_empty());
        assert!(parse_elements("{}").is_err());
        let inet = r#"{"nftables": [{"counter": {"family": "inet", "name": "conn_000000000001", "table": "kiln", "packets": 3, "bytes": 180}},
          {"set": {"family": "inet", "name": "closed4", "table": "kiln", "type": "ipv4_addr", "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}]}},
          {"map": {"family": "inet", "name": "conns4", "table": "kiln", "type": "ipv4_addr", "map": "counter", "elem": [["10.214.0.2", "conn_000000000001"]]}}]}"#;
        let e = parse_elements(inet).unwrap();
        assert_eq!(
            e.acct,
            vec![("kt-000000000001".to_owned(), "10.214.0.2".to_owned())]
        );
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn parse_counters_adds_up_kilns_counters_of_the_tap() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"counter": {"family": "inet", "name": "conn_000000000001", "table": "kiln", "packets": 3, "bytes": 180}},
          {"counter": {"family": "inet", "name": "ref_000000000001", "table": "kiln", "packets": 2, "bytes": 120}},
          {"counter": {"family": "bridge", "name": "ref_000000000001", "table": "kiln", "packets": 50, "bytes": 300}},
          {"counter": {"family": "inet", "name": "ref_000000000001", "table": "other", "packets": 100, "bytes": 1}},
          {"counter": {"family": "inet", "name": "conn_000000000002", "table": "kiln", "packets": 9, "bytes": 1}}]}"#;
        assert_eq!(parse_counters(json, "kt-000000000001").unwrap(), (3, 2));
        assert_eq!(parse_counters(json, "kt-00000000000f").unwrap(), (0, 0));
        assert!(parse_counters("[]", "kt-000000000001").is_err());
    }
}
