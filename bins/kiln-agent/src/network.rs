//! Configuring the guest's network (`configure_network`, feature `net-v1`).
//!
//! Owns: [`SystemNetwork`] (where the effects land: the network namespace and the
//! `resolv.conf` path) and `apply`, which runs the steps in their fixed order:
//!
//! ```text
//!  1 find       the one interface that is Ethernet (ARPHRD_ETHER) and not loopback;
//!               none or several: fail (nothing touched)
//!  2 link down  SIOCSIFFLAGS without IFF_UP: the kernel flushes the interface's routes and
//!               neighbour (ARP) entries, so nothing of an earlier configuration survives
//!  3 ipv6       /proc/sys/net/ipv6/conf/<if>/disable_ipv6 = 1 (the guest is IPv4-only; no
//!               link-local address or router solicitation once the link is up)
//!  4 mac        SIOCSIFHWADDR (while down: not every driver changes a live address)
//!  5 mtu        SIOCSIFMTU
//!  6 address    every IPv4 address removed (rtnetlink RTM_GETADDR dump + RTM_DELADDR), then
//!               SIOCSIFADDR + SIOCSIFNETMASK
//!  7 link up    SIOCSIFFLAGS with IFF_UP (the kernel adds the subnet route)
//!  8 route      SIOCDELRT every IPv4 default route, then SIOCADDRT default via the gateway
//!  9 resolver   resolv.conf: temp file + rename (a symlink there is replaced by a file)
//! ```
//!
//! Why ioctls (and two rtnetlink messages) rather than a netlink crate: they are a handful of
//! fixed-size structs in `sys` and need no dependency in the static guest binary; the guest
//! may have no `ip` binary, so nothing is shelled out. rtnetlink is used only where no ioctl
//! exists: removing IPv4 addresses other than the primary one (`SIOCSIFADDR` replaces only
//! that), e.g. one a guest command added before a snapshot that is now being cloned. Why interfaces are found with `if_nameindex` and
//! `SIOCGIFHWADDR` rather than `/sys/class/net`: sysfs shows the network namespace of whoever
//! mounted it, the ioctls and rtnetlink that of the calling thread, so the same code is
//! correct in the guest and testable in a private namespace on a developer's host.
//!
//! Must not: act outside the network namespace it was made for. The in-process tests run the
//! agent on a developer's host as root: [`SystemNetwork::for_pid1`] exists only in the guest's
//! init, and [`SystemNetwork::in_private_netns`] refuses the namespace of the host's PID 1 and
//! re-checks, before every configuration, that the calling thread is still in the namespace it
//! was made in. The agent never configures the interface on its own (a warm snapshot is taken
//! with the NIC down and unconfigured).
//!
//! Invariants: steps run in order and stop at the first failure, answered as `network_failed`
//! naming the step, the interface and the steps already done (they are not undone: the link
//! may be left down). Success is reported only when all nine succeeded. The request runs
//! synchronously on the agent's only thread (no exec observes a half-applied configuration;
//! and the thread's namespace is the one configured). A second configuration replaces the
//! first: the link-down flush, every IPv4 address removed before the new one is set, every
//! default route replaced, resolv.conf rewritten.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_agent_proto::{ErrorBody, ErrorCode, InterfaceName, NetworkAck, NetworkConfig};

use crate::identity::write_atomically;
use crate::sys::{self, NetSocket};

/// Where the resolver configuration lives in the guest.
pub const RESOLV_CONF_PATH: &str = "/etc/resolv.conf";
/// Per-interface IPv6 switches (absent when the kernel has no IPv6).
const IPV6_CONF_DIR: &str = "/proc/sys/net/ipv6/conf";
/// The calling thread's network namespace.
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";
/// The network namespace of this process's main thread (`/proc/self` is the thread group
/// leader): the host's, when the agent runs in tests or by hand.
const MAIN_THREAD_NETNS: &str = "/proc/self/ns/net";
/// The network namespace of PID 1 (the host's, when the agent is not the guest's init); not
/// always readable (containers, hardened `/proc`), so only checked when it is.
const INIT_NETNS: &str = "/proc/1/ns/net";
/// Most default routes removed before the new one is added (a loop bound, far above what any
/// guest has).
const MAX_DEFAULT_ROUTES: usize = 64;

/// One step of `configure_network`, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetworkStep {
    /// Find the one Ethernet interface.
    FindInterface,
    /// Take the link down.
    LinkDown,
    /// Disable IPv6 on the interface.
    DisableIpv6,
    /// Set the MAC.
    SetMac,
    /// Set the MTU.
    SetMtu,
    /// Set the address and netmask.
    SetAddress,
    /// Bring the link up.
    LinkUp,
    /// Replace the default route.
    DefaultRoute,
    /// Rewrite resolv.conf.
    ResolvConf,
}

impl NetworkStep {
    /// What the step does, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            NetworkStep::FindInterface => "find the network interface",
            NetworkStep::LinkDown => "take the link down",
            NetworkStep::DisableIpv6 => "disable ipv6",
            NetworkStep::SetMac => "set the mac",
            NetworkStep::SetMtu => "set the mtu",
            NetworkStep::SetAddress => "set the address",
            NetworkStep::LinkUp => "bring the link up",
            NetworkStep::DefaultRoute => "set the default route",
            NetworkStep::ResolvConf => "write resolv.conf",
        }
    }
}

/// Where a network configuration takes effect: the network namespace (checked, see the
/// module docs) and the resolver file.
#[derive(Debug)]
pub struct SystemNetwork {
    resolv_conf: PathBuf,
    /// The namespace inode every configuration must run in (`None`: the guest's init, whose
    /// namespace is the guest's by construction).
    netns: Option<u64>,
}

fn netns_inode(path: &str) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

impl SystemNetwork {
    /// The real effects, if this process is PID 1 (the guest's init); `None` anywhere else.
    pub fn for_pid1() -> Option<SystemNetwork> {
        (std::process::id() == 1).then(|| SystemNetwork {
            resolv_conf: PathBuf::from(RESOLV_CONF_PATH),
            netns: None,
        })
    }

    /// For tests: configures the network namespace of the calling thread (which must be
    /// neither that of this process's main thread nor, where readable, PID 1's: both are the
    /// host's) and writes the resolver file at `resolv_conf`. Every later configuration must
    /// run on a thread of this same namespace, or it fails before touching anything.
    pub fn in_private_netns(resolv_conf: impl Into<PathBuf>) -> io::Result<SystemNetwork> {
        let here = netns_inode(THREAD_NETNS)?;
        let host = [
            Some(netns_inode(MAIN_THREAD_NETNS)?),
            netns_inode(INIT_NETNS).ok(),
        ];
        if host.contains(&Some(here)) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "refusing to configure the host's network namespace (that of the process's \
                 main thread or of pid 1): call this on a thread that unshared its own",
            ));
        }
        Ok(SystemNetwork {
            resolv_conf: resolv_conf.into(),
            netns: Some(here),
        })
    }

    /// Where resolv.conf is written.
    pub fn resolv_conf(&self) -> &Path {
        &self.resolv_conf
    }

    fn check_namespace(&self) -> io::Result<()> {
        match self.netns {
            Some(expected) if netns_inode(THREAD_NETNS)? != expected => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the agent thread is not in the network namespace it was set up for",
            )),
            _ => Ok(()),
        }
    }
}

/// The one non-loopback Ethernet interface of the calling thread's namespace.
fn find_interface(sock: &NetSocket) -> io::Result<InterfaceName> {
    let mut found = Vec::new();
    for name in sys::interface_names()? {
        let flags = sock.flags(&name)?;
        if flags & libc::IFF_LOOPBACK != 0 {
            continue;
        }
        let (kind, _) = sock.hwaddr(&name)?;
        if kind == libc::ARPHRD_ETHER {
            found.push(name);
        }
    }
    match found.len() {
        0 => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the guest has no ethernet interface besides loopback",
        )),
        1 => {
            let name = found.remove(0);
            InterfaceName::new(name)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
        }
        n => {
            found.truncate(4);
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{n} ethernet interfaces ({}{}), expected exactly one",
                    found.join(", "),
                    if n > 4 { ", ..." } else { "" }
                ),
            ))
        }
    }
}

/// Writes `1` to the interface's `disable_ipv6`; `Ok(false)` when the kernel has no IPv6.
fn disable_ipv6(interface: &str) -> io::Result<bool> {
    let dir = Path::new(IPV6_CONF_DIR);
    if !dir.exists() {
        return Ok(false);
    }
    fs::write(dir.join(interface).join("disable_ipv6"), b"1\n")?;
    Ok(true)
}

/// The resolver file for `config`.
fn resolv_conf_text(config: &NetworkConfig) -> String {
    let mut text = String::from("# written by kiln-agent (configure_network)\n");
    for ns in config.nameservers() {
        text.push_str(&format!("nameserver {ns}\n"));
    }
    text
}

fn replace_default_route(
    sock: &NetSocket,
    interface: &str,
    config: &NetworkConfig,
) -> io::Result<()> {
    let mut removed = 0;
    while sock.delete_default_route()? {
        removed += 1;
        if removed >= MAX_DEFAULT_ROUTES {
            return Err(io::Error::other("default routes keep reappearing"));
        }
    }
    sock.add_default_route(interface, config.gateway())
}

/// Runs the nine steps in order (see the module docs). On failure, the error names the step,
/// the interface (once known), the cause and the steps already done.
pub(crate) fn apply(net: &SystemNetwork, config: &NetworkConfig) -> Result<NetworkAck, ErrorBody> {
    let mut done: Vec<NetworkStep> = Vec::with_capacity(9);
    let fail =
        |step: NetworkStep, on: Option<&InterfaceName>, done: &[NetworkStep], e: io::Error| {
            let applied = if done.is_empty() {
                "nothing".to_owned()
            } else {
                let names: Vec<&str> = done.iter().map(|s| s.describe()).collect();
                names.join(", ")
            };
            let on = on.map(|i| format!(" of {i}")).unwrap_or_default();
            ErrorBody {
                code: ErrorCode::NetworkFailed,
                message: format!(
                    "failed to {}{on}: {e} (already done: {applied})",
                    step.describe()
                ),
            }
        };
    let find = || {
        net.check_namespace()?;
        let sock = NetSocket::open()?;
        let interface = find_interface(&sock)?;
        Ok::<_, io::Error>((sock, interface))
    };
    let (sock, ifc) = find().map_err(|e| fail(NetworkStep::FindInterface, None, &done, e))?;
    done.push(NetworkStep::FindInterface);
    let name = ifc.as_str();
    let step = |step: NetworkStep, done: &mut Vec<NetworkStep>, r: io::Result<()>| {
        r.map_err(|e| fail(step, Some(&ifc), done, e))?;
        done.push(step);
        Ok::<(), ErrorBody>(())
    };

    let down = sock
        .flags(name)
        .and_then(|f| sock.set_flags(name, f & !libc::IFF_UP));
    step(NetworkStep::LinkDown, &mut done, down)?;
    let mut ipv6_disabled = false;
    let v6 = disable_ipv6(name).map(|d| ipv6_disabled = d);
    step(NetworkStep::DisableIpv6, &mut done, v6)?;
    step(
        NetworkStep::SetMac,
        &mut done,
        sock.set_hwaddr(name, config.mac().octets()),
    )?;
    step(
        NetworkStep::SetMtu,
        &mut done,
        sock.set_mtu(name, config.mtu()),
    )?;
    let addr = sys::interface_index(name)
        .and_then(sys::flush_ipv4_addresses)
        .and_then(|_| sock.set_address(name, config.address()))
        .and_then(|()| sock.set_netmask(name, config.netmask()));
    step(NetworkStep::SetAddress, &mut done, addr)?;
    let up = sock
        .flags(name)
        .and_then(|f| sock.set_flags(name, f | libc::IFF_UP));
    step(NetworkStep::LinkUp, &mut done, up)?;
    step(
        NetworkStep::DefaultRoute,
        &mut done,
        replace_default_route(&sock, name, config),
    )?;
    let resolv = write_atomically(&net.resolv_conf, resolv_conf_text(config).as_bytes(), 0o644);
    step(NetworkStep::ResolvConf, &mut done, resolv)?;
    Ok(NetworkAck {
        interface: ifc.clone(),
        mac: config.mac(),
        address: config.address(),
        prefix_len: config.prefix_len(),
        gateway: config.gateway(),
        mtu: config.mtu(),
        ipv6_disabled,
        // At most MAX_NAMESERVERS (3): fits.
        nameservers: config.nameservers().len() as u8,
    })
}

#[cfg(test)]
mod tests {
    use kiln_agent_proto::MacAddr;

    use super::*;

    #[test]
    fn resolv_conf_lists_nameservers_in_order() {
        let config = NetworkConfig::new(
            MacAddr::parse("52:54:00:00:00:01").expect("valid"),
            "10.0.0.2".parse().expect("ip"),
            24,
            "10.0.0.1".parse().expect("ip"),
            1500,
            vec![
                "10.0.0.1".parse().expect("ip"),
                "9.9.9.9".parse().expect("ip"),
            ],
        )
        .expect("valid");
        assert_eq!(
            resolv_conf_text(&config),
            "# written by kiln-agent (configure_network)\nnameserver 10.0.0.1\nnameserver 9.9.9.9\n"
        );
    }

    #[test]
    fn system_network_is_refused_outside_pid1() {
        assert!(SystemNetwork::for_pid1().is_none());
    }

    #[test]
    fn in_private_netns_refuses_the_host_namespace() {
        // A unit-test thread is in the host's namespace (its main thread's).
        let err = SystemNetwork::in_private_netns("/nonexistent/resolv.conf").expect_err("host");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }
}
