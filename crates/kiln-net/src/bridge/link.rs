//! The host side of the bridge: links with iproute2 (`ip`), rules with `nft`, the janitor's
//! clean-up, and the doctor's checks.
//!
//! Why the command-line tools and not netlink: `ip` and `nft` are on every host that can run
//! the bridge mode, their text and JSON forms are stable and are what an operator reads when
//! debugging, the ruleset stays one reviewable text (applied as one atomic `nft -f`
//! transaction), and the crate needs no `unsafe` or a netlink stack. The price is a process
//! per operation (milliseconds), paid at sandbox create and remove only.
//!
//! Every command can run inside a network namespace ([`BridgeHost::in_netns`], via
//! `ip netns exec`): the integration tests do all their work in namespaces they make, and
//! never touch the host's own links, routes or tables.
//!
//! Must not: create, change or delete any link but the configured bridge and `kt-*` taps, or
//! any nftables table but `kiln`. Blocking (it waits for the tools): async callers use
//! `spawn_blocking`.

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};

use kiln_api_types::SandboxId;

use super::nft::{self, Elements};
use super::pool::Subnet;
use super::{BridgeConfig, BridgeError, BridgePort, live_taps, sandbox_of_tap, tap_name};
use crate::Mac;

/// Most bytes of a tool's stderr kept in an error.
const MAX_STDERR: usize = 2000;

/// The bridge on one host (or in one network namespace).
#[derive(Debug, Clone)]
pub struct BridgeHost {
    cfg: BridgeConfig,
    netns: Option<String>,
}

/// What [`BridgeHost::reclaim`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Taps deleted (their sandboxes are gone).
    pub taps: Vec<String>,
    /// Taps whose firewall elements were deleted.
    pub rule_taps: Vec<String>,
    /// How many elements were deleted (set elements, and per sandbox one for its counters
    /// and their map elements).
    pub elements: usize,
}

impl ReclaimReport {
    /// Whether nothing was left behind.
    pub fn is_empty(&self) -> bool {
        self.taps.is_empty() && self.rule_taps.is_empty()
    }
}

/// Whether `cfg`'s subnet overlaps a route of the host that is not the bridge's own.
/// `routes` are `(destination, device)`; the default route is ignored.
pub fn subnet_collision(
    cfg: &BridgeConfig,
    routes: &[(Subnet, String)],
) -> Result<(), BridgeError> {
    for (route, dev) in routes {
        if route.prefix() == 0 || dev == &cfg.name {
            continue;
        }
        if route.overlaps(&cfg.subnet) {
            return Err(BridgeError::SubnetCollision {
                subnet: cfg.subnet,
                route: *route,
                dev: dev.clone(),
            });
        }
    }
    Ok(())
}

impl BridgeHost {
    /// The bridge of `cfg` on this host.
    pub fn new(cfg: BridgeConfig) -> Result<BridgeHost, BridgeError> {
        cfg.validate()?;
        Ok(BridgeHost { cfg, netns: None })
    }

    /// The bridge of `cfg` inside network namespace `netns` (every command runs through
    /// `ip netns exec`).
    pub fn in_netns(cfg: BridgeConfig, netns: &str) -> Result<BridgeHost, BridgeError> {
        cfg.validate()?;
        Ok(BridgeHost {
            cfg,
            netns: Some(netns.to_owned()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BridgeConfig {
        &self.cfg
    }

    fn command(&self, prog: &str, args: &[&str]) -> (Command, String) {
        let mut line = String::new();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, prog]);
                line.push_str(&format!("ip netns exec {ns} "));
                c
            }
            None => Command::new(prog),
        };
        cmd.args(args);
        line.push_str(prog);
        for a in args {
            line.push(' ');
            line.push_str(a);
        }
        (cmd, line)
    }

    /// Runs `prog args` (stdin from `input`), returns stdout.
    fn run_with(
        &self,
        prog: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, BridgeError> {
        let (mut cmd, line) = self.command(prog, args);
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let spawn_err = |source| BridgeError::Spawn {
            cmd: line.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if stderr.len() > MAX_STDERR {
                let mut cut = MAX_STDERR;
                while !stderr.is_char_boundary(cut) {
                    cut -= 1;
                }
                stderr.truncate(cut);
            }
            return Err(BridgeError::Command {
                cmd: line,
                status: out.status.to_string(),
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run(&self, prog: &str, args: &[&str]) -> Result<String, BridgeError> {
        self.run_with(prog, args, None)
    }

    fn nft_apply(&self, script: &str) -> Result<(), BridgeError> {
        if script.is_empty() {
            return Ok(());
        }
        self.run_with("nft", &["-f", "-"], Some(script)).map(drop)
    }

    fn json(&self, prog: &str, args: &[&str]) -> Result<serde_json::Value, BridgeError> {
        let out = self.run(prog, args)?;
        serde_json::from_str(&out).map_err(|e| BridgeError::Output {
            cmd: format!("{prog} {}", args.join(" ")),
            why: e.to_string(),
        })
    }

    /// The host's IPv4 routes of the main table, `(destination, device)`.
    pub fn routes(&self) -> Result<Vec<(Subnet, String)>, BridgeError> {
        let v = self.json("ip", &["-j", "-4", "route", "show", "table", "main"])?;
        let mut out = Vec::new();
        for r in v.as_array().into_iter().flatten() {
            let dst = r.get("dst").and_then(|d| d.as_str()).unwrap_or("");
            let dev = r
                .get("dev")
                .and_then(|d| d.as_str())
                .unwrap_or("")
                .to_owned();
            let net = match dst {
                "default" => Subnet::containing(std::net::Ipv4Addr::UNSPECIFIED, 0),
                d if d.contains('/') => match d.parse() {
                    Ok(n) => n,
                    Err(_) => continue,
                },
                d => match d.parse() {
                    Ok(a) => Subnet::containing(a, 32),
                    Err(_) => continue,
                },
            };
            out.push((net, dev));
        }
        Ok(out)
    }

    /// The host's own IPv4 addresses (as /32) and connected subnets, except the bridge's:
    /// destinations closed to guests.
    pub fn host_networks(&self) -> Result<Vec<Subnet>, BridgeError> {
        let v = self.json("ip", &["-j", "-4", "addr", "show"])?;
        let mut out = Vec::new();
        for link in v.as_array().into_iter().flatten() {
            if link.get("ifname").and_then(|n| n.as_str()) == Some(self.cfg.name.as_str()) {
                continue;
            }
            for a in link
                .get("addr_info")
                .and_then(|a| a.as_array())
                .into_iter()
                .flatten()
            {
                let local = a
                    .get("local")
                    .and_then(|l| l.as_str())
                    .and_then(|l| l.parse().ok());
                let prefix = a.get("prefixlen").and_then(|p| p.as_u64());
                if let (Some(local), Some(prefix)) = (local, prefix) {
                    let prefix = u8::try_from(prefix.min(32)).unwrap_or(32);
                    out.push(Subnet::containing(local, prefix));
                    out.push(Subnet::containing(local, 32));
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn link_exists(&self, name: &str) -> Result<bool, BridgeError> {
        Ok(self.link_names()?.iter().any(|n| n == name))
    }

    fn link_names(&self) -> Result<Vec<String>, BridgeError> {
        let v = self.json("ip", &["-j", "link", "show"])?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.get("ifname").and_then(|n| n.as_str()).map(str::to_owned))
            .collect())
    }

    /// Creates the bridge if missing, gives it the gateway address and brings it up;
    /// idempotent. Refuses a subnet that overlaps a route of the host
    /// ([`BridgeError::SubnetCollision`]). Also enables IPv4 forwarding
    /// (`net.ipv4.ip_forward=1`): the guests' egress is routed by the host. That sysctl is
    /// host-wide; kiln never turns it off again (other software may rely on it), and the
    /// forward chain of `table inet kiln` is what confines the guests. On the bridge:
    /// `proxy_arp_pvlan=1` and `proxy_delay=0`, so the host answers every guest's ARP
    /// question for another guest at once with its own MAC: the taps are isolated ports
    /// ([`BridgeHost::attach_port`]) and guest ↔ guest traffic is routed through the rules.
    /// And no ICMP redirects out of the bridge: the kernel sends one whenever it routes a
    /// packet back out of the interface it came in by, and sending it resets the rate limit
    /// its ICMP errors to that guest share, so the guest's next refusal (an ICMP error) would
    /// be lost. A device sends redirects if its own `send_redirects` *or* `all`'s is on, so
    /// both are turned off; `all` alone changes no other interface (each keeps its own
    /// setting, on by default).
    pub fn ensure_bridge(&self) -> Result<(), BridgeError> {
        subnet_collision(&self.cfg, &self.routes()?)?;
        let name = self.cfg.name.as_str();
        if !self.link_exists(name)? {
            match self.run("ip", &["link", "add", name, "type", "bridge"]) {
                Ok(_) => {}
                // Another daemon won the race: fine, it is the same bridge.
                Err(BridgeError::Command { stderr, .. }) if stderr.contains("File exists") => {}
                Err(e) => return Err(e),
            }
        }
        // A bridge whose MAC was never set takes its lowest port's MAC, and changes it as
        // taps come and go (all zeros without ports): every guest's neighbour entry for the
        // gateway (and, through proxy ARP, for its peers) would go stale. Setting the MAC it
        // has pins it; a bridge left without ports gets a random one.
        let out = self.json("ip", &["-j", "link", "show", "dev", name])?;
        let mac = match out[0]["address"].as_str().map(str::parse::<Mac>) {
            Some(Ok(mac)) if mac.0 != [0; 6] && mac.0[0] & 1 == 0 => mac,
            _ => Mac::random(),
        };
        self.run(
            "ip",
            &["link", "set", "dev", name, "address", &mac.to_string()],
        )?;
        let addr = format!("{}/{}", self.cfg.gateway(), self.cfg.subnet.prefix());
        self.run("ip", &["addr", "replace", &addr, "dev", name])?;
        self.sysctl(&format!("net/ipv4/conf/{name}/proxy_arp_pvlan"), "1")?;
        self.sysctl(&format!("net/ipv4/neigh/{name}/proxy_delay"), "0")?;
        self.sysctl(&format!("net/ipv4/conf/{name}/send_redirects"), "0")?;
        self.sysctl("net/ipv4/conf/all/send_redirects", "0")?;
        self.run("ip", &["link", "set", name, "up"])?;
        self.sysctl("net/ipv4/ip_forward", "1")
    }

    /// Sets `/proc/sys/<key>` to `value`.
    fn sysctl(&self, key: &str, value: &str) -> Result<(), BridgeError> {
        match &self.netns {
            // On the host: no tool needed.
            None => {
                let path = format!("/proc/sys/{key}");
                std::fs::write(&path, value).map_err(|source| BridgeError::Spawn {
                    cmd: format!("write {value} to {path}"),
                    source,
                })
            }
            // In a namespace, its own /proc/sys/net is seen from inside it.
            Some(_) => {
                let assignment = format!("{}={value}", key.replace('/', "."));
                self.run("sysctl", &["-q", "-w", &assignment]).map(drop)
            }
        }
    }

    /// Puts link `name` on the bridge as an isolated port (the bridge forwards its frames to
    /// the host only, never to another isolated port) and brings it up.
    pub fn attach_port(&self, name: &str) -> Result<(), BridgeError> {
        self.run("ip", &["link", "set", name, "master", &self.cfg.name])?;
        self.run(
            "ip",
            &[
                "link",
                "set",
                name,
                "type",
                "bridge_slave",
                "isolated",
                "on",
            ],
        )?;
        self.run("ip", &["link", "set", name, "up"]).map(drop)
    }

    /// Deletes the bridge (full reset; taps on it must be gone first). Missing is fine.
    pub fn delete_bridge(&self) -> Result<(), BridgeError> {
        self.delete_link(&self.cfg.name.clone())
    }

    /// (Re)creates kiln's tables with the rules and the elements of `ports`, in one atomic
    /// transaction. The host's connected subnets are read now and closed to guests.
    /// Refusing rules log to [`super::nflog::NFLOG_GROUP`]; when the kernel has no
    /// nfnetlink_log (the rules do not load), the rules are applied without logging (the
    /// counters still count) and a warning says so.
    pub fn apply_rules(&self, ports: &[BridgePort]) -> Result<(), BridgeError> {
        let host = self.host_networks()?;
        let elements = Elements::of_ports(ports);
        let logged =
            nft::render_ruleset(&self.cfg, &host, &elements, Some(super::nflog::NFLOG_GROUP));
        match self.nft_apply(&logged) {
            Ok(()) => Ok(()),
            Err(e) => {
                let plain = nft::render_ruleset(&self.cfg, &host, &elements, None);
                self.nft_apply(&plain)?;
                tracing::warn!(error = %e, "bridge rules without the refusal log (nflog unavailable?): counters only");
                Ok(())
            }
        }
    }

    /// Sandbox `id`'s counters: new connections it opened out of the bridge, and packets of
    /// it refused (to the host, to closed destinations, to guests outside its group). Zero
    /// for a sandbox without counters.
    pub fn counters(&self, id: &SandboxId) -> Result<(u64, u64), BridgeError> {
        let out = self.run("nft", &["-j", "list", "counters"])?;
        nft::parse_counters(&out, &tap_name(id)).map_err(|why| BridgeError::Output {
            cmd: "nft -j list counters".into(),
            why,
        })
    }

    /// Re-reads the host's addresses and replaces the closed destinations with them (call it
    /// when the host's addresses change; one atomic transaction, sandboxes untouched).
    pub fn refresh_closed(&self) -> Result<(), BridgeError> {
        let host = self.host_networks()?;
        self.nft_apply(&nft::render_closed_refresh(&host))
    }

    /// Adds one sandbox's elements (its lease; pairs with `others` of its group). `others` must
    /// be every sandbox on the bridge: the engine serializes bridge changes (one lock), or
    /// two sandboxes of one group created at once would not see each other.
    pub fn add_port(&self, port: &BridgePort, others: &[BridgePort]) -> Result<(), BridgeError> {
        self.nft_apply(&nft::render_add(&Elements::of_new_port(port, others)))
    }

    /// Deletes every element naming `id`'s tap.
    pub fn remove_port(&self, id: &SandboxId) -> Result<(), BridgeError> {
        let tap = tap_name(id);
        let dead = self.elements()?.filter_dead(|t| t != tap);
        self.nft_apply(&nft::render_delete(&dead))
    }

    /// The per-sandbox elements now in kiln's tables (none from a table that does not exist).
    pub fn elements(&self) -> Result<Elements, BridgeError> {
        let mut all = Elements::default();
        for family in ["bridge", "inet"] {
            let out = match self.run("nft", &["-j", "list", "table", family, nft::TABLE]) {
                Ok(out) => out,
                Err(BridgeError::Command { stderr, .. })
                    if stderr.contains("No such file or directory") =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let e = nft::parse_elements(&out).map_err(|why| BridgeError::Output {
                cmd: format!("nft -j list table {family} kiln"),
                why,
            })?;
            all.src4.extend(e.src4);
            all.peers.extend(e.peers);
            all.acct.extend(e.acct);
        }
        Ok(all)
    }

    /// Deletes both kiln tables (tests, full reset).
    pub fn remove_all(&self) -> Result<(), BridgeError> {
        self.nft_apply(&nft::render_remove_all())
    }

    /// Creates persistent tap `name` on the bridge and brings it up; QEMU opens it with
    /// `-netdev tap,ifname=NAME,script=no,downscript=no`. A tap left by a crash is re-used.
    pub fn create_tap(&self, name: &str) -> Result<(), BridgeError> {
        if sandbox_of_tap(name).is_none() {
            return Err(BridgeError::Config(format!(
                "{name:?} is not a kiln tap name (kt- and 12 hex digits)"
            )));
        }
        if !self.link_exists(name)? {
            self.run("ip", &["tuntap", "add", "dev", name, "mode", "tap"])?;
        }
        if let Err(e) = self.attach_port(name) {
            let _ = self.delete_link(name);
            return Err(e);
        }
        Ok(())
    }

    /// Deletes tap `name`; a missing tap is fine.
    pub fn delete_tap(&self, name: &str) -> Result<(), BridgeError> {
        if sandbox_of_tap(name).is_none() {
            return Err(BridgeError::Config(format!(
                "{name:?} is not a kiln tap name (kt- and 12 hex digits)"
            )));
        }
        self.delete_link(name)
    }

    fn delete_link(&self, name: &str) -> Result<(), BridgeError> {
        match self.run("ip", &["link", "del", name]) {
            Ok(_) => Ok(()),
            Err(BridgeError::Command { stderr, .. }) if stderr.contains("Cannot find device") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The kiln taps that exist (`kt-` and 12 hex digits), sorted.
    pub fn list_taps(&self) -> Result<Vec<String>, BridgeError> {
        let mut taps: Vec<String> = self
            .link_names()?
            .into_iter()
            .map(|n| n.split('@').next().unwrap_or("").to_owned())
            .filter(|n| sandbox_of_tap(n).is_some())
            .collect();
        taps.sort();
        Ok(taps)
    }

    /// The janitor: deletes the taps and firewall elements of every sandbox not in `live`,
    /// and says what it removed. Safe to run while live sandboxes run.
    pub fn reclaim(&self, live: &HashSet<SandboxId>) -> Result<ReclaimReport, BridgeError> {
        let keep = live_taps(live);
        let mut report = ReclaimReport::default();
        let dead = self.elements()?.filter_dead(|t| keep.contains(t));
        if !dead.is_empty() {
            self.nft_apply(&nft::render_delete(&dead))?;
            report.elements = dead.len();
            report.rule_taps = dead
                .taps()
                .into_iter()
                .filter(|t| !keep.contains(t))
                .collect();
        }
        for tap in self.list_taps()? {
            if !keep.contains(&tap) {
                self.delete_link(&tap)?;
                report.taps.push(tap);
            }
        }
        Ok(report)
    }
}

/// One prerequisite of the bridge mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorCheck {
    /// What is checked: `root`, `/dev/net/tun`, `nft`, `ip`.
    pub name: &'static str,
    /// Whether it is there.
    pub ok: bool,
    /// Why not, when it is not.
    pub reason: Option<String>,
}

/// CAP_NET_ADMIN's bit in the capability sets.
const CAP_NET_ADMIN: u32 = 12;

/// Whether the effective capabilities in `/proc/self/status` text include CAP_NET_ADMIN.
fn has_net_admin(status: &str) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << CAP_NET_ADMIN) != 0)
}

fn tool_check(name: &'static str, args: &[&str]) -> DoctorCheck {
    let reason = match Command::new(name)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("`{name} {}` failed ({s})", args.join(" "))),
        Err(e) => Some(format!(
            "`{name}` cannot be run ({e}); install {}",
            if name == "nft" {
                "nftables"
            } else {
                "iproute2"
            }
        )),
    };
    DoctorCheck {
        name,
        ok: reason.is_none(),
        reason,
    }
}

/// Which prerequisites of the bridge mode this host has: root (CAP_NET_ADMIN),
/// `/dev/net/tun`, `nft` and `ip`, each with the reason when missing.
pub fn doctor() -> Vec<DoctorCheck> {
    let root = match std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(has_net_admin)
    {
        Some(true) => None,
        Some(false) => Some(
            "kilnd lacks CAP_NET_ADMIN: the bridge mode needs root (taps, bridge, nftables)"
                .to_owned(),
        ),
        None => Some("cannot read the capabilities in /proc/self/status".to_owned()),
    };
    let tun = match std::fs::metadata("/dev/net/tun") {
        Ok(_) => None,
        Err(e) => Some(format!(
            "/dev/net/tun is missing ({e}): load the tun module (modprobe tun)"
        )),
    };
    vec![
        DoctorCheck {
            name: "root",
            ok: root.is_none(),
            reason: root,
        },
        DoctorCheck {
            name: "/dev/net/tun",
            ok: tun.is_none(),
            reason: tun,
        },
        tool_check("nft", &["--version"]),
        tool_check("ip", &["-V"]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_net_admin_reads_cap_eff() {
        assert_eq!(
            has_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n"),
            Some(true)
        );
        assert_eq!(has_net_admin("CapEff:\t0000000000000000\n"), Some(false));
        assert_eq!(has_net_admin("CapEff:\t0000000000001000\n"), Some(true));
        assert_eq!(has_net_admin("nothing"), None);
    }

    #[test]
    fn subnet_collision_names_the_route_and_ignores_default_and_own() {
        let cfg = BridgeConfig::default();
        let routes = vec![
            ("0.0.0.0/0".parse().unwrap(), "eth0".to_owned()),
            ("192.0.2.0/24".parse().unwrap(), "eth0".to_owned()),
            ("10.214.0.0/16".parse().unwrap(), "kiln0".to_owned()),
        ];
        subnet_collision(&cfg, &routes).unwrap();
        let mut bad = routes.clone();
        bad.push(("10.0.0.0/8".parse().unwrap(), "wg0".to_owned()));
        let e = subnet_collision(&cfg, &bad).unwrap_err().to_string();
        assert!(
            e.contains("10.214.0.0/16 overlaps the host's route to 10.0.0.0/8 (dev wg0)"),
            "{e}"
        );
    }

    #[test]
    fn doctor_names_every_prerequisite() {
        let names: Vec<_> = doctor().into_iter().map(|c| c.name).collect();
        assert_eq!(names, vec!["root", "/dev/net/tun", "nft", "ip"]);
        for c in doctor() {
            assert_eq!(c.ok, c.reason.is_none(), "{c:?}");
        }
    }
}
