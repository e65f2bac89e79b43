//! kiln's nftables rules for the bridge, as text for `nft -f -`: rendering is pure (unit
//! tested here); [`super::link::BridgeHost`] applies it.
//!
//! Two tables, both named `kiln`, nothing else touched:
//!
//! - `table bridge kiln` sees frames between bridge ports, which never reach the inet forward
//!   hook (unless `br_netfilter` is loaded, see below):
//!   - `prerouting` (anti-spoofing): a frame from a tap (`kt-*`) passes only if
//!     `tap . source MAC . source IP` is in `@src4` (ARP: the sender MAC and IP too); IPv6
//!     and every other ethertype from a tap are dropped;
//!   - `forward` (guest ↔ guest): a frame from a tap to another tap passes only if
//!     `in-tap . out-tap` is in `@peers` (both sandboxes share a network group);
//!   - `input` (no hairpin): a tap may not send the host an IP packet for another address of
//!     the subnet than the gateway, so the host never routes guest → guest around `@peers`.
//! - `table inet kiln`:
//!   - `input` from the bridge: only UDP/TCP 53 to the gateway (kiln's DNS) and replies;
//!   - `forward`: bridge → bridge is accepted (only bridged frames get there, the bridge table
//!     decided them; with `br_netfilter` they pass this hook with the bridge as in and out);
//!     into the bridge only replies (conntrack); from the bridge never to `@closed4`
//!     (loopback, private, shared, link-local, multicast, reserved, the host's connected
//!     subnets and addresses), never IPv6, never a source outside the subnet; the rest passes;
//!   - `postrouting`: masquerade the subnet leaving by any other interface.
//!
//! Per-sandbox state is only elements of `@src4` and `@peers`, keyed by the tap's name:
//! adding or removing a sandbox adds or deletes elements, never rewrites the rules. Every
//! chain has policy accept and drops only traffic of kiln's bridge, so the host's other
//! traffic is left to the host's own rules. Must not: name or change any other table.

use std::fmt::Write as _;

use super::pool::Subnet;
use super::{BridgeConfig, BridgePort, TAP_PREFIX};

/// The closed destination ranges for guest egress, besides the host's connected subnets.
pub const CLOSED_RANGES: &[&str] = &[
    "0.0.0.0/8",      // "this" network
    "10.0.0.0/8",     // private
    "100.64.0.0/10",  // shared address space (CGNAT)
    "127.0.0.0/8",    // loopback
    "169.254.0.0/16", // link-local (cloud metadata)
    "172.16.0.0/12",  // private
    "192.0.0.0/24",   // IETF protocol assignments
    "192.168.0.0/16", // private
    "198.18.0.0/15",  // benchmarking
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
    /// `@peers`: ordered pairs of taps that may talk.
    pub peers: Vec<(String, String)>,
}

impl Elements {
    /// The elements of `ports` (their leases and all same-group pairs among them).
    pub fn of_ports(ports: &[BridgePort]) -> Elements {
        let mut e = Elements::default();
        for p in ports {
            e.src4.push((p.tap(), p.mac.to_string(), p.ip.to_string()));
            for q in ports {
                if p.peers_with(q) {
                    e.peers.push((p.tap(), q.tap()));
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
        for o in others.iter().filter(|o| port.peers_with(o)) {
            e.peers.push((port.tap(), o.tap()));
            e.peers.push((o.tap(), port.tap()));
        }
        e
    }

    /// Only the elements that involve a tap `keep` rejects.
    pub fn filter_dead(&self, keep: impl Fn(&str) -> bool) -> Elements {
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
                .filter(|(a, b)| !keep(a) || !keep(b))
                .cloned()
                .collect(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.src4.is_empty() && self.peers.is_empty()
    }

    /// The taps named anywhere.
    pub fn taps(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .src4
            .iter()
            .map(|(t, _, _)| t.clone())
            .chain(self.peers.iter().flat_map(|(a, b)| [a.clone(), b.clone()]))
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

    fn peers_list(&self) -> String {
        self.peers
            .iter()
            .map(|(a, b)| format!("\"{a}\" . \"{b}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The whole ruleset: (re)creates both kiln tables with `elements`, atomically (one `nft -f`
/// transaction: `table`/`delete table` first, so it works whether or not they exist).
/// `host_nets` are the host's connected subnets and own addresses (closed to guests).
pub fn render_ruleset(cfg: &BridgeConfig, host_nets: &[Subnet], elements: &Elements) -> String {
    let br = &cfg.name;
    let sub = cfg.subnet;
    let gw = cfg.gateway();
    let closed = closed_list(host_nets);
    let tap = format!("{TAP_PREFIX}*");
    let mut s = String::new();
    s.push_str(&render_remove_all());
    let _ = write!(
        s,
        r#"table bridge {TABLE} {{
  set src4 {{
    type ifname . ether_addr . ipv4_addr
{src4}  }}
  set peers {{
    type ifname . ifname
{peers}  }}
  chain prerouting {{
    type filter hook prerouting priority -200; policy accept;
    iifname != "{tap}" accept
    ether type arp iifname . ether saddr . arp saddr ip @src4 iifname . arp saddr ether . arp saddr ip @src4 accept
    ether type ip iifname . ether saddr . ip saddr @src4 accept
    counter drop comment "spoofed or non-IPv4 frame from a tap"
  }}
  chain forward {{
    type filter hook forward priority -200; policy accept;
    iifname "{tap}" iifname . oifname @peers accept
    iifname "{tap}" counter drop comment "guest to guest outside a group"
  }}
  chain input {{
    type filter hook input priority -200; policy accept;
    iifname "{tap}" ip daddr {sub} ip daddr != {gw} counter drop comment "guest to guest routed through the host"
  }}
}}
table inet {TABLE} {{
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
    meta l4proto tcp counter reject with tcp reset comment "guest to host"
    counter reject with icmpx type admin-prohibited comment "guest to host"
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{br}" oifname "{br}" accept
    oifname "{br}" ct state established,related accept
    oifname "{br}" counter drop comment "unsolicited traffic into the bridge"
    iifname "{br}" jump guest_out
  }}
  chain guest_out {{
    meta nfproto ipv6 counter drop
    ip saddr != {sub} counter drop comment "source outside the bridge subnet"
    ip daddr @closed4 meta l4proto tcp counter reject with tcp reset comment "closed destination"
    ip daddr @closed4 counter reject with icmpx type admin-prohibited comment "closed destination"
    accept
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {sub} oifname != "{br}" masquerade
  }}
}}
"#,
        src4 = elements_line(&elements.src4_list()),
        peers = elements_line(&elements.peers_list()),
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
            "{verb} element bridge {TABLE} peers {{ {} }}",
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

/// Reads the elements of `@src4` and `@peers` from `nft -j list table bridge kiln`.
pub fn parse_elements(json: &str) -> Result<Elements, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .ok_or("no `nftables` array")?;
    let mut out = Elements::default();
    for item in items {
        let Some(set) = item.get("set") else {
            continue;
        };
        let name = set.get("name").and_then(|n| n.as_str()).unwrap_or("");
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
                ("peers", [a, b]) => out.peers.push((a.clone(), b.clone())),
                _ => return Err(format!("unexpected element of {name}: {el}")),
            }
        }
    }
    Ok(out)
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
        let r = render_ruleset(&cfg, &host, &Elements::of_ports(&ports));
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
        has(
            r#"elements = { "kt-000000000001" . "kt-000000000002", "kt-000000000002" . "kt-000000000001" }"#,
        );
        has(r#"ether type ip iifname . ether saddr . ip saddr @src4 accept"#);
        has(r#"iifname "kt-*" iifname . oifname @peers accept"#);
        has(
            r#"iifname "kt-*" ip daddr 10.214.0.0/16 ip daddr != 10.214.0.1 counter drop comment "guest to guest routed through the host""#,
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
        let r = render_ruleset(&BridgeConfig::default(), &[], &Elements::default());
        assert!(!r.contains("elements = {  }"), "{r}");
        assert!(
            r.contains("set peers {\n    type ifname . ifname\n  }"),
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
                ("kt-000000000004".into(), "kt-000000000001".into()),
                ("kt-000000000001".into(), "kt-000000000004".into()),
            ]
        );
        let add = render_add(&e);
        assert_eq!(
            add,
            "add element bridge kiln src4 { \"kt-000000000004\" . 02:00:00:00:00:04 . 10.214.0.5 }\n\
             add element bridge kiln peers { \"kt-000000000004\" . \"kt-000000000001\", \"kt-000000000001\" . \"kt-000000000004\" }\n"
        );
        let lone = Elements::of_new_port(&port(5, None), &others);
        assert!(lone.peers.is_empty());
        assert!(!render_add(&lone).contains("peers"));
    }

    #[test]
    fn parse_elements_reads_nft_json_and_filter_dead_keeps_live() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "bridge", "name": "kiln", "handle": 1}},
          {"set": {"family": "bridge", "name": "src4", "table": "kiln", "type": ["ifname", "ether_addr", "ipv4_addr"], "handle": 1,
             "elem": [{"concat": ["kt-000000000001", "02:00:00:00:00:01", "10.214.0.2"]}, {"concat": ["kt-000000000002", "02:00:00:00:00:02", "10.214.0.3"]}]}},
          {"set": {"family": "bridge", "name": "peers", "table": "kiln", "type": ["ifname", "ifname"], "handle": 2,
             "elem": [{"concat": ["kt-000000000001", "kt-000000000002"]}, {"concat": ["kt-000000000002", "kt-000000000001"]}]}},
          {"chain": {"family": "bridge", "table": "kiln", "name": "prerouting"}}]}"#;
        let e = parse_elements(json).unwrap();
        assert_eq!(e.src4.len(), 2);
        assert_eq!(e.peers.len(), 2);
        let dead = e.filter_dead(|t| t == "kt-000000000001");
        assert_eq!(dead.src4.len(), 1);
        assert_eq!(dead.src4[0].0, "kt-000000000002");
        assert_eq!(dead.peers.len(), 2, "both pairs name the dead tap");
        assert_eq!(dead.taps(), vec!["kt-000000000001", "kt-000000000002"]);
        assert!(e.filter_dead(|_| true).is_empty());
        assert!(parse_elements("{}").is_err());
    }
}
