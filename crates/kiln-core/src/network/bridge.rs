//! The bridge mode in the engine: the host side made once per daemon ([`BridgeState`]: the
//! bridge, kiln's nftables tables with every live bridge sandbox's elements, the DNS server
//! on the gateway), and per sandbox a lease from the bridge pool, a tap and its elements
//! ([`plan`]), removed again by [`release`] and, after a crash, by the janitor ([`reclaim`]).
//!
//! Accounting ([`Accounting`]): the kernel counts each bridge sandbox's new connections and
//! refused packets in nftables counters; the refusing rules also log to nfnetlink_log, which
//! one listener per daemon reads ([`kiln_net::bridge::nflog`]), maps to the sandbox by its
//! guest address ([`Members`]), keeps the newest [`MAX_REFUSALS_KEPT`] per sandbox and
//! publishes as events (at most [`REFUSAL_EVENTS_PER_SEC`] per sandbox per second).
//!
//! Must not: render rules or run `ip`/`nft` itself (that is `kiln_net::bridge`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_api_types::{
    EventKind, NetStats, NetworkSpec, Refusal, SandboxId, SandboxState, network::MAX_REFUSALS_KEPT,
};
use kiln_net::bridge::nflog::{LogRecord, NFLOG_GROUP, NflogListener};
use kiln_net::bridge::{BridgeConfig, BridgeHost, BridgePort, tap_name};
use kiln_net::{GuestNet, Mac};
use tracing::{debug, info, warn};

use crate::Engine;
use crate::error::CoreError;
use crate::network::{BRIDGE_MTU, BRIDGE_POOL, Planned, REFUSAL_EVENTS_PER_SEC};

/// The daemon's bridge, made when the first bridge sandbox starts.
#[derive(Default)]
pub(crate) struct BridgeState {
    host: tokio::sync::OnceCell<Arc<BridgeHost>>,
    /// The DNS server's tasks (UDP and TCP).
    dns: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Who is on the bridge, for the DNS server's group names.
    members: Arc<Members>,
    /// Serializes rule changes: two sandboxes of one group added at once must see each other.
    changes: tokio::sync::Mutex<()>,
    /// Refusals read from the kernel's log, per sandbox.
    refusals: Arc<RefusalLog>,
    /// The kernel log's reader (none when nfnetlink_log is unavailable).
    nflog: Mutex<Option<NflogListener>>,
}

impl Drop for BridgeState {
    fn drop(&mut self) {
        for task in self.dns.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            task.abort();
        }
    }
}

/// One sandbox on the bridge as the DNS server knows it.
#[derive(Debug, Clone)]
struct Member {
    id: SandboxId,
    name: Option<String>,
    ip: Ipv4Addr,
    group: Option<String>,
}

/// The bridge's sandboxes, by address.
#[derive(Debug, Default)]
struct Members(Mutex<Vec<Member>>);

impl Members {
    fn set(&self, member: Member) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|m| m.id != member.id);
        all.push(member);
    }

    fn remove(&self, id: &SandboxId) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|m| &m.id != id);
    }

    /// The sandbox leasing `ip` (the bridge's anti-spoofing ties a source address to its tap).
    fn id_of(&self, ip: Ipv4Addr) -> Option<SandboxId> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|m| m.ip == ip)
            .map(|m| m.id.clone())
    }
}

/// Refusals of bridge sandboxes: the newest [`MAX_REFUSALS_KEPT`] each, and the event rate.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog(Mutex<HashMap<SandboxId, Kept>>);

#[derive(Debug)]
struct Kept {
    refusals: VecDeque<Refusal>,
    window: Instant,
    published: u32,
}

impl RefusalLog {
    /// Keeps `refusal`; says whether it may also be published (the rate limit).
    fn push(&self, id: &SandboxId, refusal: Refusal) -> bool {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let kept = all.entry(id.clone()).or_insert_with(|| Kept {
            refusals: VecDeque::new(),
            window: Instant::now(),
            published: 0,
        });
        if kept.refusals.len() >= MAX_REFUSALS_KEPT {
            kept.refusals.pop_front();
        }
        kept.refusals.push_back(refusal);
        if kept.window.elapsed() >= Duration::from_secs(1) {
            kept.window = Instant::now();
            kept.published = 0;
        }
        if kept.published >= REFUSAL_EVENTS_PER_SEC {
            return false;
        }
        kept.published += 1;
        true
    }

    /// Sandbox `id`'s kept refusals, oldest first.
    fn recent(&self, id: &SandboxId) -> Vec<Refusal> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|k| k.refusals.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn forget(&self, id: &SandboxId) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// What a running bridge sandbox's status reads: the kernel's counters and the refusal log.
#[derive(Debug, Clone)]
pub(crate) struct Accounting {
    host: Arc<BridgeHost>,
    refusals: Arc<RefusalLog>,
}

/// The accounting of the daemon's bridge (none before its bridge host is set up).
pub(crate) fn accounting(engine: &Engine) -> Option<Accounting> {
    Some(Accounting {
        host: Arc::clone(engine.bridge.host.get()?),
        refusals: Arc::clone(&engine.bridge.refusals),
    })
}

/// Starts the daemon's reader of the refusal log; `None` (and a warning) when nfnetlink_log
/// is unavailable: the counters still count.
fn start_refusal_log(engine: &Engine) -> Option<NflogListener> {
    let members = Arc::clone(&engine.bridge.members);
    let log = Arc::clone(&engine.bridge.refusals);
    let events = engine.events.clone();
    let on_record = move |record: LogRecord| {
        let Some(id) = members.id_of(record.source) else {
            return;
        };
        let refusal = refusal_of(&record, unix_ms());
        if log.push(&id, refusal.clone()) {
            let _ = events.send(crate::event(&id, EventKind::NetworkRefused { refusal }));
        }
    };
    match NflogListener::spawn(NFLOG_GROUP, on_record) {
        Ok(listener) => Some(listener),
        Err(e) => {
            warn!(error = %e, group = NFLOG_GROUP, "no refused-connection log for bridge sandboxes (nfnetlink_log unavailable or its group taken): counters only");
            None
        }
    }
}

/// The API's form of a logged refusal.
fn refusal_of(record: &LogRecord, at_unix_ms: u64) -> Refusal {
    Refusal {
        at_unix_ms,
        protocol: record.protocol.to_owned(),
        destination: record.destination_text(),
        name: None,
        reason: record.reason.refusal_reason(record.destination),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl kiln_net::bridge::dns::GroupNames for Members {
    /// A member of the querier's group by name or id; nothing for sandboxes without a group.
    fn lookup(&self, querier: Ipv4Addr, name: &str) -> Option<Ipv4Addr> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let group = all.iter().find(|m| m.ip == querier)?.group.clone()?;
        all.iter()
            .find(|m| {
                m.group.as_deref() == Some(group.as_str())
                    && m.ip != querier
                    && (m.name.as_deref() == Some(name) || m.id.as_str() == name)
            })
            .map(|m| m.ip)
    }
}

impl Engine {
    /// The bridge's configuration.
    pub(crate) fn bridge_config(&self) -> BridgeConfig {
        BridgeConfig::default()
    }

    /// The bridge host, set up on first use (a bridge sandbox's start or re-attach): bridge
    /// up, rules with every live bridge sandbox's elements, DNS server on the gateway.
    pub(crate) async fn bridge_host(self: &Engine) -> Result<Arc<BridgeHost>, CoreError> {
        let unavailable = |reason: String| CoreError::NetworkUnavailable {
            mode: "bridge",
            reason,
        };
        self.bridge
            .host
            .get_or_try_init(|| async {
                let missing: Vec<String> = kiln_net::bridge::doctor()
                    .into_iter()
                    .filter_map(|c| c.reason)
                    .collect();
                if !missing.is_empty() {
                    return Err(unavailable(missing.join("; ")));
                }
                let host = BridgeHost::new(self.bridge_config())
                    .map_err(|e| unavailable(e.to_string()))?;
                host.ensure_bridge().map_err(|e| unavailable(e.to_string()))?;
                let members = self.bridge_members(None)?;
                let ports: Vec<BridgePort> = members.iter().map(|(p, _)| p.clone()).collect();
                host.apply_rules(&ports)
                    .map_err(|e| unavailable(e.to_string()))?;
                // A running sandbox's tap is attached again: isolation is a port setting, and
                // a tap made by an earlier kiln may lack it.
                let taps = host.list_taps().map_err(|e| unavailable(e.to_string()))?;
                for tap in ports.iter().map(BridgePort::tap).filter(|t| taps.contains(t)) {
                    host.attach_port(&tap)
                        .map_err(|e| unavailable(e.to_string()))?;
                }
                for (port, name) in members {
                    self.bridge.members.set(member(&port, name));
                }
                info!(bridge = %host.config().name, subnet = %host.config().subnet, sandboxes = ports.len(), "bridge ready");
                let host = Arc::new(host);
                let tasks = serve_dns(self, host.config().gateway())
                    .await
                    .map_err(|e| unavailable(format!("kiln's DNS on the bridge: {e}")))?;
                *self.bridge.dns.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
                *self.bridge.nflog.lock().unwrap_or_else(|e| e.into_inner()) =
                    start_refusal_log(self);
                Ok(host)
            })
            .await
            .cloned()
    }

    /// Every bridge sandbox with a lease (except `but`), as the rules know them, with its name.
    fn bridge_members(
        &self,
        but: Option<&SandboxId>,
    ) -> Result<Vec<(BridgePort, Option<String>)>, CoreError> {
        let rows = self.store.sandbox_list()?;
        let leases = self.store.leases()?;
        Ok(leases
            .into_iter()
            .filter(|l| l.pool == BRIDGE_POOL && Some(&l.sandbox_id) != but)
            .filter_map(|l| {
                let row = rows.iter().find(|r| r.id == l.sandbox_id)?;
                let NetworkSpec::Bridge { group } = &row.spec.network else {
                    return None;
                };
                let port = BridgePort {
                    sandbox_id: l.sandbox_id.clone(),
                    mac: crate::network::parse_mac(&l.mac)?,
                    ip: l.ip,
                    group: group.clone(),
                };
                Some((port, row.spec.name.as_ref().map(|n| n.to_string())))
            })
            .collect())
    }
}

fn member(port: &BridgePort, name: Option<String>) -> Member {
    Member {
        id: port.sandbox_id.clone(),
        name,
        ip: port.ip,
        group: port.group.as_ref().map(|g| g.to_string()),
    }
}

/// Leases a bridge address, makes the sandbox's tap and adds its elements to the rules.
pub(crate) async fn plan(
    engine: &Engine,
    id: &SandboxId,
    spec: &NetworkSpec,
) -> Result<Option<Planned>, CoreError> {
    let NetworkSpec::Bridge { group } = spec else {
        return Ok(None);
    };
    let host = engine.bridge_host().await?;
    let _serial = engine.bridge.changes.lock().await;
    let cfg = host.config().clone();
    let mac = Mac::random();
    let address = engine.store.lease_acquire(
        BRIDGE_POOL,
        kiln_store::LeaseSubnet {
            addr: cfg.subnet.addr(),
            prefix: cfg.subnet.prefix(),
        },
        id,
        &mac.to_string(),
    )?;
    let port = BridgePort {
        sandbox_id: id.clone(),
        mac,
        ip: address,
        group: group.clone(),
    };
    let others: Vec<BridgePort> = engine
        .bridge_members(Some(id))?
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let tap = tap_name(id);
    let made = host
        .create_tap(&tap)
        .and_then(|()| host.add_port(&port, &others));
    if let Err(e) = made {
        let _ = host.delete_tap(&tap);
        return Err(CoreError::NetworkUnavailable {
            mode: "bridge",
            reason: e.to_string(),
        });
    }
    let name = engine
        .store
        .sandbox_get(id)?
        .and_then(|r| r.spec.name.map(|n| n.to_string()));
    engine.bridge.members.set(member(&port, name));
    Ok(Some(Planned {
        spec: spec.clone(),
        guest: GuestNet {
            mac,
            address,
            prefix_len: cfg.subnet.prefix(),
            gateway: cfg.gateway(),
            mtu: BRIDGE_MTU,
        },
        nic: kiln_vmm::Nic {
            mac: mac.to_string(),
            backend: kiln_vmm::NicBackend::Tap { ifname: tap },
        },
    }))
}

/// Removes sandbox `id`'s tap and rule elements (it held a bridge lease): through this
/// daemon's bridge host, or, when no bridge sandbox started in this daemon yet (it was
/// re-attached), through a host made for the removal alone.
pub(crate) fn release(engine: &Engine, id: &SandboxId) {
    engine.bridge.members.remove(id);
    engine.bridge.refusals.forget(id);
    let host = match engine.bridge.host.get() {
        Some(h) => Arc::clone(h),
        None => match BridgeHost::new(engine.bridge_config()) {
            Ok(h) => Arc::new(h),
            Err(e) => {
                warn!(sandbox_id = %id, error = %e, "tap and bridge rule elements not removed");
                return;
            }
        },
    };
    remove_port(&host, id);
}

/// Deletes `id`'s rule elements and tap; says whether the tap went.
fn remove_port(host: &BridgeHost, id: &SandboxId) -> bool {
    if let Err(e) = host.remove_port(id) {
        warn!(sandbox_id = %id, error = %e, "bridge rule elements not removed");
    }
    match host.delete_tap(&tap_name(id)) {
        Ok(()) => true,
        Err(e) => {
            warn!(sandbox_id = %id, error = %e, "tap not removed");
            false
        }
    }
}

/// A bridge sandbox's counters: its tap's byte counts (what the tap receives, the guest
/// sent), and from `acct` the kernel's counts of its new connections out of the bridge and
/// of its refused packets, with the newest refusals the kernel logged.
pub(crate) fn stats(id: &SandboxId, acct: Option<&Accounting>) -> (NetStats, Vec<Refusal>) {
    let read = |what: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{}/statistics/{what}", tap_name(id)))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (connections, refused) = match acct.map(|a| a.host.counters(id)) {
        Some(Ok(counts)) => counts,
        Some(Err(e)) => {
            debug!(sandbox_id = %id, error = %e, "bridge counters not read");
            (0, 0)
        }
        None => (0, 0),
    };
    (
        NetStats {
            bytes_out: read("rx_bytes"),
            bytes_in: read("tx_bytes"),
            connections,
            refused,
        },
        acct.map(|a| a.refusals.recent(id)).unwrap_or_default(),
    )
}

/// After a daemon crash: leases, taps and rule elements of this home's sandboxes that are
/// gone (`keep` are the ones its store still has that may run again). Only what this store
/// leased is touched: taps of another kiln home on the machine are left alone. Returns the
/// leases released and the taps removed.
pub(crate) fn reclaim(
    store: &kiln_store::Store,
    keep: &HashSet<SandboxId>,
) -> Result<(usize, usize), CoreError> {
    let dead_bridge: Vec<SandboxId> = store
        .leases()?
        .into_iter()
        .filter(|l| l.pool == BRIDGE_POOL && !keep.contains(&l.sandbox_id))
        .map(|l| l.sandbox_id)
        .collect();
    let mut taps = 0;
    if !dead_bridge.is_empty() {
        match BridgeHost::new(BridgeConfig::default()) {
            Ok(host) => {
                for id in &dead_bridge {
                    taps += usize::from(remove_port(&host, id));
                }
            }
            Err(e) => warn!(error = %e, "bridge leftovers not reclaimed"),
        }
    }
    let leases = store.leases_release_except(keep)?.len();
    Ok((leases, taps))
}

/// The sandboxes whose network state must survive a daemon start: every row that is not
/// failed (a failed sandbox's VM is gone and it never runs again).
pub(crate) fn keeps_network(state: SandboxState) -> bool {
    state != SandboxState::Failed
}

/// Starts the DNS server of bridge guests on the gateway (UDP, and TCP for long answers):
/// names of the querier's group members, everything else from the upstream resolvers.
async fn serve_dns(
    engine: &Engine,
    gateway: Ipv4Addr,
) -> std::io::Result<Vec<tokio::task::JoinHandle<()>>> {
    use kiln_net::bridge::dns;
    let cfg = dns::DnsConfig {
        upstreams: engine.net.upstream_dns.clone(),
        ..dns::DnsConfig::default()
    };
    let names: Arc<dyn dns::GroupNames> = engine.bridge.members.clone();
    let udp = dns::bind(gateway).await?;
    let tcp = dns::bind_tcp(gateway).await?;
    let (c1, n1) = (cfg.clone(), Arc::clone(&names));
    Ok(vec![
        tokio::spawn(async move {
            if let Err(e) = dns::serve(udp, c1, n1).await {
                warn!(error = %e, "bridge DNS (UDP) ended");
            }
        }),
        tokio::spawn(async move {
            if let Err(e) = dns::serve_tcp(tcp, cfg, names).await {
                warn!(error = %e, "bridge DNS (TCP) ended");
            }
        }),
    ])
}

#[cfg(test)]
mod tests {
    use kiln_api_types::RefusalReason;
    use kiln_net::bridge::nflog::LogReason;

    use super::*;

    fn record(reason: LogReason, dst: [u8; 4], port: Option<u16>) -> LogRecord {
        LogRecord {
            reason,
            protocol: "tcp",
            source: Ipv4Addr::new(10, 214, 0, 2),
            destination: Ipv4Addr::from(dst),
            port,
        }
    }

    #[test]
    fn logged_refusals_become_api_refusals() {
        let r = refusal_of(&record(LogReason::Closed, [192, 168, 1, 9], Some(22)), 7);
        assert_eq!(r.destination, "192.168.1.9:22");
        assert_eq!(r.reason, RefusalReason::Private);
        assert_eq!(
            (r.protocol.as_str(), r.at_unix_ms, r.name),
            ("tcp", 7, None)
        );
        let r = refusal_of(&record(LogReason::Peer, [10, 214, 0, 3], Some(80)), 0);
        assert_eq!(r.reason, RefusalReason::OtherSandbox);
        let r = refusal_of(&record(LogReason::Host, [10, 214, 0, 1], None), 0);
        assert_eq!(
            (r.reason, r.destination.as_str()),
            (RefusalReason::Host, "10.214.0.1:0")
        );
    }

    #[test]
    fn refusal_log_keeps_the_newest_and_rate_limits_events() {
        let log = RefusalLog::default();
        let id: SandboxId = "sb-0000000000a1".parse().unwrap();
        let other: SandboxId = "sb-0000000000b1".parse().unwrap();
        let mut published = 0;
        for n in 0..(MAX_REFUSALS_KEPT as u64 + 10) {
            let r = refusal_of(&record(LogReason::Closed, [10, 0, 0, 1], Some(1)), n);
            published += u32::from(log.push(&id, r));
        }
        assert_eq!(
            published, REFUSAL_EVENTS_PER_SEC,
            "one second's worth of events"
        );
        let kept = log.recent(&id);
        assert_eq!(kept.len(), MAX_REFUSALS_KEPT);
        assert_eq!(kept[0].at_unix_ms, 10, "the oldest went");
        assert!(log.recent(&other).is_empty());
        assert!(log.push(&other, kept[0].clone()), "limits are per sandbox");
        log.forget(&id);
        assert!(log.recent(&id).is_empty());
    }

    #[test]
    fn members_map_addresses_to_sandboxes() {
        let m = Members::default();
        let id: SandboxId = "sb-0000000000a1".parse().unwrap();
        m.set(Member {
            id: id.clone(),
            name: None,
            ip: Ipv4Addr::new(10, 214, 0, 2),
            group: None,
        });
        assert_eq!(m.id_of(Ipv4Addr::new(10, 214, 0, 2)), Some(id.clone()));
        assert_eq!(m.id_of(Ipv4Addr::new(10, 214, 0, 3)), None);
        m.remove(&id);
        assert_eq!(m.id_of(Ipv4Addr::new(10, 214, 0, 2)), None);
    }
}
