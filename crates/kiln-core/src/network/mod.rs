//! Sandbox networks in the engine: what a sandbox's [`NetworkSpec`] becomes before its VM
//! starts ([`plan`]: a lease, a fresh MAC, the NIC's backend, for a bridge its tap and rules),
//! once its agent answers ([`attach`]: the relay in front of passt, the guest's interface
//! configured), while it runs ([`Live`]: policy changes, counters, refusals as events), and
//! after it is gone ([`release`]).
//!
//! ```text
//!   plan ──▶ VM starts (cold, warm restore, clone, user snapshot, own save)
//!        ──▶ attach: relay + passt (allow, nat) ─▶ agent configure_network (fresh MAC, IP)
//!        ──▶ Live in the Sandbox ── set_policy / status ── refusals ─▶ events
//!   rm, failure, stop ──▶ Live dropped (relay and passt end) ─▶ release (lease, tap, rules)
//! ```
//!
//! Invariants: every address a guest is given is leased in the store first, so two sandboxes
//! never share one and the janitor finds what a crashed daemon left; the guest's interface is
//! configured by the host after every start, never from a snapshot's memory; a sandbox of mode
//! `none` has no network device and nothing here runs for it. Must not: parse frames or apply
//! policy (that is `kiln-net`), or start VMs.

pub(crate) mod bridge;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_api_types::{EventKind, NetworkSpec, NetworkStatus, SandboxId};
use kiln_net::{GuestNet, Mac};
use tracing::{info, warn};

use crate::Engine;
use crate::error::CoreError;
use crate::sandbox::Sandbox;

/// The store's lease pool of the user modes' guest addresses.
pub const USER_POOL: &str = "user";
/// The store's lease pool of bridge guests.
pub const BRIDGE_POOL: &str = "bridge";
/// The user modes' guest subnet. Each user-mode sandbox has its own passt, so the subnet is
/// never seen outside the guest; addresses are still leased so that every guest's differs.
pub const USER_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 213, 0, 0), 16);
/// MTU of user-mode guests: passt's maximum, so a guest sends few, large frames (measured in
/// `docs/benchmarks.md`).
pub const USER_MTU: u16 = 65520;
/// MTU of bridge guests.
pub const BRIDGE_MTU: u16 = 1500;
/// Most refusal events published per sandbox per second; the rest are only counted (and the
/// newest 64 kept for `kiln inspect`).
pub(crate) const REFUSAL_EVENTS_PER_SEC: u32 = 5;

/// The daemon's network settings.
#[derive(Debug, Clone)]
pub struct NetSettings {
    /// Upstream resolvers kiln's DNS asks (`KILN_NET_DNS`, else the host's resolv.conf).
    pub upstream_dns: Vec<SocketAddr>,
    /// The `passt` binary, if found.
    pub passt: Option<PathBuf>,
    /// `KILN_NET_BASELINE=qemu-user`: `nat` sandboxes get QEMU's own user networking
    /// (libslirp) with no policy of kiln's at all — the baseline `kiln bench network`
    /// measures the policy's cost against, in a daemon of its own. Such a guest reaches the
    /// host's loopback through its gateway; never set it for real sandboxes.
    pub qemu_user_baseline: bool,
}

/// slirp's DNS address in the baseline (it must differ from the gateway; the last host
/// address of the subnet, which the lowest-free leases reach last).
const BASELINE_DNS: Ipv4Addr = Ipv4Addr::new(10, 213, 255, 254);

impl NetSettings {
    /// From the environment: `KILN_NET_DNS` (`IP[:PORT],...`), `KILN_NET_BASELINE` and
    /// `PATH` for passt.
    pub fn from_env() -> Result<NetSettings, CoreError> {
        let upstream_dns = match std::env::var("KILN_NET_DNS") {
            Ok(v) if !v.trim().is_empty() => parse_dns_list(&v)
                .map_err(|e| CoreError::HostSetup(format!("KILN_NET_DNS: {e}")))?,
            _ => kiln_net::dns::system_upstreams(),
        };
        let qemu_user_baseline = match std::env::var("KILN_NET_BASELINE").as_deref() {
            Err(_) | Ok("") => false,
            Ok("qemu-user") => {
                warn!(
                    "KILN_NET_BASELINE=qemu-user: nat sandboxes use QEMU's user networking \
                     with no policy (they reach this host's loopback); for kiln bench network only"
                );
                true
            }
            Ok(other) => {
                return Err(CoreError::HostSetup(format!(
                    "KILN_NET_BASELINE={other:?}: the only value is qemu-user"
                )));
            }
        };
        Ok(NetSettings {
            upstream_dns,
            passt: crate::doctor::find_in_path("passt"),
            qemu_user_baseline,
        })
    }
}

/// `IP[:PORT],...` (port 53 by default).
fn parse_dns_list(s: &str) -> Result<Vec<SocketAddr>, String> {
    s.split(',')
        .map(|item| {
            let item = item.trim();
            if let Ok(ip) = item.parse::<Ipv4Addr>() {
                return Ok(SocketAddr::from((ip, 53)));
            }
            item.parse::<SocketAddr>()
                .map_err(|_| format!("{item:?} is not IP or IP:PORT"))
        })
        .collect()
}

/// Which modes this host supports, for `kiln doctor`.
pub fn doctor() -> Vec<kiln_api_types::NetworkModeSupport> {
    let support = |mode: &str, missing: Option<String>| kiln_api_types::NetworkModeSupport {
        mode: mode.to_owned(),
        available: missing.is_none(),
        missing,
    };
    let passt = crate::doctor::find_in_path("passt").is_none().then(|| {
        "passt is not installed (apt-get install passt, or scripts/setup-host)".to_owned()
    });
    let bridge = kiln_net::bridge::doctor()
        .into_iter()
        .filter_map(|c| c.reason)
        .collect::<Vec<_>>();
    vec![
        support("none", None),
        support("allow", passt.clone()),
        support("nat", passt),
        support("bridge", (!bridge.is_empty()).then(|| bridge.join("; "))),
    ]
}

/// A sandbox's network before its VM starts: what the NIC is and what the guest will be told.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    /// The policy.
    pub spec: NetworkSpec,
    /// The guest's interface, fresh.
    pub guest: GuestNet,
    /// The VM's device.
    pub nic: kiln_vmm::Nic,
}

/// Leases an address and picks a fresh MAC for sandbox `id`'s network `spec` (nothing for
/// `none`). A bridge's tap and rules are made here too, since QEMU opens the tap by name.
pub(crate) async fn plan(
    engine: &Engine,
    id: &SandboxId,
    spec: &NetworkSpec,
) -> Result<Option<Planned>, CoreError> {
    let unavailable = |reason: String| CoreError::NetworkUnavailable {
        mode: spec.mode(),
        reason,
    };
    match spec {
        NetworkSpec::None => Ok(None),
        NetworkSpec::Allow { .. } | NetworkSpec::Nat => {
            if engine.net.passt.is_none() {
                return Err(unavailable(
                    "passt is not installed (apt-get install passt, or scripts/setup-host)".into(),
                ));
            }
            let mac = Mac::random();
            let address = engine.store.lease_acquire(
                USER_POOL,
                lease_subnet(USER_SUBNET),
                id,
                &mac.to_string(),
            )?;
            let guest = GuestNet {
                mac,
                address,
                prefix_len: USER_SUBNET.1,
                gateway: first_host(USER_SUBNET),
                mtu: USER_MTU,
            };
            let backend = if engine.net.qemu_user_baseline && *spec == NetworkSpec::Nat {
                kiln_vmm::NicBackend::User {
                    net: format!("{}/{}", USER_SUBNET.0, USER_SUBNET.1),
                    host: guest.gateway.to_string(),
                    dns: BASELINE_DNS.to_string(),
                }
            } else {
                kiln_vmm::NicBackend::Stream
            };
            Ok(Some(Planned {
                spec: spec.clone(),
                nic: kiln_vmm::Nic {
                    mac: mac.to_string(),
                    backend,
                },
                guest,
            }))
        }
        NetworkSpec::Bridge { .. } => bridge::plan(engine, id, spec).await,
    }
}

/// The gateway of a subnet: its first host address.
pub(crate) fn first_host((net, _): (Ipv4Addr, u8)) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net) + 1)
}

/// A running sandbox's network.
pub(crate) struct Live {
    id: SandboxId,
    guest: GuestNet,
    spec: Mutex<NetworkSpec>,
    relay: Option<Arc<kiln_net::relay::RelayHandle>>,
    /// A bridge sandbox's counters and refusal log.
    bridge: Option<bridge::Accounting>,
}

impl Live {
    /// What `kiln inspect` shows.
    pub(crate) fn status(&self) -> NetworkStatus {
        let (stats, refused) = match &self.relay {
            Some(r) => r.stats(),
            None => bridge::stats(&self.id, self.bridge.as_ref()),
        };
        NetworkStatus {
            mac: self.guest.mac.to_string(),
            address: self.guest.address,
            prefix_len: self.guest.prefix_len,
            gateway: self.guest.gateway,
            stats,
            refused,
        }
    }

    /// The policy it runs with now.
    pub(crate) fn spec(&self) -> NetworkSpec {
        self.spec.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The relay of a user-mode network, for a policy change: `Err` names why this network's
    /// policy cannot change to `spec` (only `allow` ↔ `nat` change at run time).
    pub(crate) fn relay_for(
        &self,
        spec: &NetworkSpec,
    ) -> Result<Arc<kiln_net::relay::RelayHandle>, CoreError> {
        let current = self.spec();
        match (&self.relay, spec.is_user_mode()) {
            (Some(r), true) => Ok(Arc::clone(r)),
            _ => Err(CoreError::BadRequest(format!(
                "the network of a running sandbox changes only between allow and nat \
                     (it is {}, asked {}); {} is fixed when the sandbox is created",
                current.mode(),
                spec.mode(),
                if current.is_user_mode() {
                    spec.mode()
                } else {
                    current.mode()
                }
            ))),
        }
    }

    /// Records the policy now in force.
    pub(crate) fn set_spec(&self, spec: &NetworkSpec) {
        *self.spec.lock().unwrap_or_else(|e| e.into_inner()) = spec.clone();
    }
}

/// Puts a started VM's network into service: for the user modes the relay and passt (on the
/// VM's stream socket), then the guest's interface (fresh MAC and address; `configure` is
/// false only when re-attaching a guest that is configured already).
pub(crate) async fn attach(
    engine: &Arc<Engine>,
    sb: &Arc<Sandbox>,
    planned: Planned,
    configure: bool,
) -> Result<(), CoreError> {
    let started = Instant::now();
    // The user modes' frames go through kiln's relay (QEMU's stream socket); the baseline's
    // stay inside QEMU.
    let relay = if planned.nic.backend == kiln_vmm::NicBackend::Stream {
        let passt = engine
            .net
            .passt
            .clone()
            .ok_or_else(|| CoreError::NetworkUnavailable {
                mode: planned.spec.mode(),
                reason: "passt is not installed".into(),
            })?;
        let cfg = kiln_net::relay::RelayConfig {
            qemu_socket: kiln_vmm::RunPaths::new(&sb.vm().config().run_dir).net_socket,
            guest: planned.guest.clone(),
            spec: planned.spec.clone(),
            upstream_dns: engine.net.upstream_dns.clone(),
            passt,
        };
        let mut relay = kiln_net::relay::Relay::start(cfg).await.map_err(|e| {
            CoreError::NetworkUnavailable {
                mode: planned.spec.mode(),
                reason: format!("the relay did not start: {e}"),
            }
        })?;
        if let Some(rx) = relay.refusals() {
            sb.add_forward(tokio::spawn(publish_refusals(
                Arc::downgrade(engine),
                sb.id().clone(),
                rx,
            )));
        }
        Some(Arc::new(relay))
    } else {
        None
    };
    if configure {
        let cfg = agent_config(&planned.guest)?;
        sb.agent()
            .configure_network(&cfg)
            .await
            .map_err(CoreError::Agent)?;
    }
    info!(
        sandbox_id = %sb.id(),
        mode = planned.spec.mode(),
        address = %planned.guest.address,
        mac = %planned.guest.mac,
        ms = started.elapsed().as_millis() as u64,
        "network attached"
    );
    sb.set_network(Live {
        id: sb.id().clone(),
        guest: planned.guest,
        bridge: matches!(planned.spec, NetworkSpec::Bridge { .. })
            .then(|| bridge::accounting(engine))
            .flatten(),
        spec: Mutex::new(planned.spec),
        relay,
    });
    Ok(())
}

/// What the agent is told: the interface, and the gateway as its only resolver.
fn agent_config(g: &GuestNet) -> Result<kiln_agent_host::NetworkConfig, CoreError> {
    use kiln_agent_host::{MacAddr, NetworkConfig};
    let bad = |e: kiln_agent_host::NetworkError| {
        CoreError::HostSetup(format!("the guest's network configuration is invalid: {e}"))
    };
    NetworkConfig::new(
        MacAddr::new(g.mac.0).map_err(bad)?,
        g.address,
        g.prefix_len,
        g.gateway,
        u32::from(g.mtu),
        vec![g.gateway],
    )
    .map_err(bad)
}

/// The store's form of a subnet.
pub(crate) fn lease_subnet((addr, prefix): (Ipv4Addr, u8)) -> kiln_store::LeaseSubnet {
    kiln_store::LeaseSubnet { addr, prefix }
}

/// Publishes refusals as events, at most [`REFUSAL_EVENTS_PER_SEC`] per second.
async fn publish_refusals(
    engine: std::sync::Weak<Engine>,
    id: SandboxId,
    mut rx: tokio::sync::mpsc::Receiver<kiln_api_types::Refusal>,
) {
    let mut window = Instant::now();
    let mut sent = 0u32;
    while let Some(refusal) = rx.recv().await {
        if window.elapsed() >= Duration::from_secs(1) {
            window = Instant::now();
            sent = 0;
        }
        if sent >= REFUSAL_EVENTS_PER_SEC {
            continue;
        }
        sent += 1;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        engine.publish(&id, EventKind::NetworkRefused { refusal });
    }
}

/// Releases what sandbox `id`'s network held on the host: its lease, and a bridge's tap and
/// rules. Idempotent; failures are logged (the janitor retries at the next start).
pub(crate) fn release(engine: &Engine, id: &SandboxId) {
    let lease = match engine.store.lease_of(id) {
        Ok(lease) => lease,
        Err(e) => {
            warn!(sandbox_id = %id, error = %crate::error::error_chain(&e), "network lease not read");
            None
        }
    };
    let Some(lease) = lease else {
        return;
    };
    if lease.pool == BRIDGE_POOL {
        bridge::release(engine, id);
    }
    if let Err(e) = engine.store.lease_release(id) {
        warn!(sandbox_id = %id, error = %crate::error::error_chain(&e), "network lease not released");
    }
}

/// Rebuilds a re-attached sandbox's network from its lease: the guest keeps the interface it
/// was given; the relay and passt (which ended with the previous daemon) start again.
pub(crate) async fn reattach(
    engine: &Arc<Engine>,
    sb: &Arc<Sandbox>,
    spec: &NetworkSpec,
) -> Result<(), CoreError> {
    if !spec.has_nic() {
        return Ok(());
    }
    let lease = engine
        .store
        .lease_of(sb.id())?
        .ok_or_else(|| CoreError::NetworkUnavailable {
            mode: spec.mode(),
            reason: "its address lease is gone".into(),
        })?;
    let mac = parse_mac(&lease.mac).ok_or_else(|| {
        CoreError::HostSetup(format!(
            "lease of {} has a bad MAC {:?}",
            sb.id(),
            lease.mac
        ))
    })?;
    let (subnet, mtu) = if spec.is_user_mode() {
        (USER_SUBNET, USER_MTU)
    } else {
        // The bridge and its tables outlived the previous daemon; its DNS server did not.
        engine.bridge_host().await?;
        let subnet = engine.bridge_config().subnet;
        ((subnet.addr(), subnet.prefix()), BRIDGE_MTU)
    };
    let planned = Planned {
        spec: spec.clone(),
        guest: GuestNet {
            mac,
            address: lease.ip,
            prefix_len: subnet.1,
            gateway: first_host(subnet),
            mtu,
        },
        nic: sb
            .vm()
            .config()
            .nic
            .clone()
            .ok_or_else(|| CoreError::HostSetup(format!("sandbox {} has no NIC", sb.id())))?,
    };
    attach(engine, sb, planned, false).await
}

/// `aa:bb:cc:dd:ee:ff`, as the store keeps it.
pub(crate) fn parse_mac(s: &str) -> Option<Mac> {
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_lists_parse_with_default_port_and_name_bad_items() {
        assert_eq!(
            parse_dns_list("198.18.0.53, 10.0.0.1:5353").unwrap(),
            vec![
                "198.18.0.53:53".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:5353".parse().unwrap()
            ]
        );
        let e = parse_dns_list("1.2.3.4,dns.example").unwrap_err();
        assert!(e.contains("\"dns.example\""), "{e}");
    }

    #[test]
    fn macs_round_trip_and_bad_ones_are_refused() {
        let m = Mac::random();
        assert_eq!(parse_mac(&m.to_string()), Some(m));
        assert_eq!(m.0[0] & 0x03, 0x02, "unicast, locally administered");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "zz:00:00:00:00:00",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn gateway_is_the_subnets_first_host() {
        assert_eq!(first_host(USER_SUBNET), Ipv4Addr::new(10, 213, 0, 1));
    }
}
