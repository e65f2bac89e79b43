//! `configure_network` end to end: the real agent (with a real [`SystemNetwork`]) and the real
//! host client over `tokio::io::duplex`, inside a private network namespace.
//!
//! Each test that configures a network runs on its own thread that first `unshare`s a new
//! network namespace (the namespace of a thread, not of the process: the rest of the test
//! binary, and the host, are untouched), creates a tap or veth interface there as the guest's
//! "NIC" with `ip`, runs a current-thread runtime serving the agent and the client on that
//! same thread (the agent acts on its thread's namespace), then reads the result back with
//! `ip -j` run from that thread (children inherit its namespace). The namespace, and every
//! interface in it, vanish when the thread ends.
//!
//! These tests need root (`CAP_NET_ADMIN` and `CAP_SYS_ADMIN` for `unshare`) and `ip`
//! (iproute2). Without them they fail with a message saying so: they never pass silently.
//! Under `sudo`: `sudo -E cargo test -p kiln-agent --test network`.
#![allow(unsafe_code)] // unshare(2) for the test thread: one call, see `enter_private_netns`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kiln_agent::{Agent, AgentConfig, ReapMode, Reaper, SystemNetwork};
use kiln_agent_host::{
    AgentClient, AgentError, ClientConfig, ErrorCode, FEATURE_NET_V1, MacAddr, NetworkConfig,
};
use serde_json::Value;

const GUARD: Duration = Duration::from_secs(30);

fn require_root() {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the configure_network tests need root (a private network namespace and interfaces in \
         it); run them as root, e.g. `sudo -E cargo test -p kiln-agent --test network`"
    );
    let ip = Command::new("ip").arg("-V").output();
    assert!(
        ip.is_ok_and(|o| o.status.success()),
        "the configure_network tests need `ip` (iproute2) on the host to create and inspect \
         the test interfaces"
    );
}

/// Moves the calling thread (only it) into a new, empty network namespace.
fn enter_private_netns() {
    // SAFETY: unshare takes a flag word; CLONE_NEWNET affects only the calling thread's
    // namespace membership and touches no memory.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        ret,
        0,
        "unshare(CLONE_NEWNET) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Runs `test` on a fresh thread inside a private network namespace, with a current-thread
/// runtime on that thread; `setup` (shell words for `ip`, run first) creates its interfaces.
fn in_netns<F, Fut>(setup: &[&[&str]], test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    require_root();
    let setup: Vec<Vec<String>> = setup
        .iter()
        .map(|c| c.iter().map(|s| (*s).to_owned()).collect())
        .collect();
    let handle = std::thread::Builder::new()
        .name("netns-test".to_owned())
        .spawn(move || {
            enter_private_netns();
            for args in &setup {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ip(&args);
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                tokio::time::timeout(GUARD, test())
                    .await
                    .expect("test finished within the guard time");
            });
        })
        .expect("spawn the test thread");
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `ip ARGS` (in the calling thread's namespace) and returns its stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn ip_json(args: &[&str]) -> Value {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    serde_json::from_str(&ip(&all)).expect("ip -j prints json")
}

/// A tap device (Ethernet, no carrier until someone opens it) named `name`.
const TAP: &[&str] = &["tuntap", "add", "dev", "kiln0", "mode", "tap"];

fn client_config() -> ClientConfig {
    ClientConfig {
        handshake_deadline: Duration::from_secs(10),
        ..ClientConfig::default()
    }
}

/// An agent serving one connection with `network`, and a client connected to it.
async fn connect(network: Option<SystemNetwork>) -> AgentClient {
    let reaper = Reaper::start(ReapMode::RegisteredOnly).expect("sigchld listener");
    let mut agent = Agent::new(AgentConfig::default(), reaper);
    if let Some(network) = network {
        agent = agent.with_network(Arc::new(network));
    }
    let (host, guest) = tokio::io::duplex(64 << 10);
    tokio::spawn(async move {
        let _ = agent.serve(guest).await;
    });
    let (client, _) = AgentClient::connect_with(host, client_config())
        .await
        .expect("handshake");
    client
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("kiln-agent-network-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir is writable");
    dir
}

fn config(
    mac: &str,
    address: &str,
    prefix: u8,
    gateway: &str,
    mtu: u32,
    ns: &[&str],
) -> NetworkConfig {
    NetworkConfig::new(
        MacAddr::parse(mac).expect("valid mac"),
        address.parse().expect("ip"),
        prefix,
        gateway.parse().expect("ip"),
        mtu,
        ns.iter().map(|s| s.parse().expect("ip")).collect(),
    )
    .expect("valid config")
}

/// The interface's MAC, MTU, whether it is up, and its addresses as `addr/prefix` (inet and
/// inet6).
fn link_state(name: &str) -> (String, u64, bool, Vec<String>) {
    let addr = ip_json(&["addr", "show", "dev", name]);
    let link = &addr[0];
    let flags: Vec<&str> = link["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let addrs = link["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .map(|a| {
            format!(
                "{} {}/{}",
                a["family"].as_str().expect("family"),
                a["local"].as_str().expect("local"),
                a["prefixlen"]
            )
        })
        .collect();
    (
        link["address"].as_str().expect("mac").to_owned(),
        link["mtu"].as_u64().expect("mtu"),
        flags.contains(&"UP"),
        addrs,
    )
}

/// Every IPv4 default route as `gateway dev`.
fn default_routes() -> Vec<String> {
    ip_json(&["-4", "route", "show", "default"])
        .as_array()
        .expect("routes")
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["gateway"].as_str().unwrap_or("-"),
                r["dev"].as_str().unwrap_or("-")
            )
        })
        .collect()
}

/// Addresses someone else put on the NIC before the agent configures it: a primary and a
/// secondary of one subnet, and another subnet.
const STRAY_ADDRESSES: &[&[&str]] = &[
    &["addr", "add", "10.1.1.1/24", "dev", "kiln0"],
    &["addr", "add", "10.1.1.2/24", "dev", "kiln0"],
    &["addr", "add", "172.20.0.5/16", "dev", "kiln0"],
];

#[test]
fn configure_network_applies_everything_and_a_second_config_replaces_the_first() {
    let mut setup = vec![TAP];
    setup.extend_from_slice(STRAY_ADDRESSES);
    in_netns(&setup, || async {
        let dir = scratch("applies");
        let resolv = dir.join("resolv.conf");
        // Like many images: resolv.conf is a symlink (to systemd-resolved's stub file).
        let stub = dir.join("stub-resolv.conf");
        std::fs::write(&stub, "nameserver 127.0.0.53\n").expect("write stub");
        std::os::unix::fs::symlink(&stub, &resolv).expect("symlink");

        let net = SystemNetwork::in_private_netns(&resolv).expect("private namespace");
        let client = connect(Some(net)).await;
        assert!(client.has_feature(FEATURE_NET_V1));

        let first = config(
            "52:54:00:aa:bb:01",
            "10.77.0.2",
            24,
            "10.77.0.1",
            9000,
            &["10.77.0.1", "9.9.9.9"],
        );
        let ack = client.configure_network(&first).await.expect("configured");
        assert_eq!(ack.interface.as_str(), "kiln0");
        assert_eq!(ack.mac, first.mac());
        assert_eq!((ack.address, ack.prefix_len), (first.address(), 24));
        assert_eq!(
            (ack.gateway, ack.mtu, ack.nameservers),
            (first.gateway(), 9000, 2)
        );

        let (mac, mtu, up, addrs) = link_state("kiln0");
        assert_eq!(mac, "52:54:00:aa:bb:01");
        assert_eq!(mtu, 9000);
        assert!(up, "link is up");
        assert_eq!(
            addrs,
            ["inet 10.77.0.2/24"],
            "one address, no stray one, no ipv6"
        );
        assert_eq!(default_routes(), ["10.77.0.1 kiln0"]);
        if ack.ipv6_disabled {
            let v6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/kiln0/disable_ipv6")
                .expect("ipv6 switch readable");
            assert_eq!(v6.trim(), "1");
        }
        let meta = std::fs::symlink_metadata(&resolv).expect("resolv.conf exists");
        assert!(
            meta.file_type().is_file(),
            "the symlink was replaced by a file"
        );
        assert_eq!(
            std::fs::read_to_string(&resolv).expect("read"),
            "# written by kiln-agent (configure_network)\nnameserver 10.77.0.1\nnameserver 9.9.9.9\n"
        );
        assert_eq!(
            std::fs::read_to_string(&stub).expect("read"),
            "nameserver 127.0.0.53\n",
            "the symlink's target is untouched"
        );

        // A guest command adds an address of its own (then the sandbox is snapshotted and
        // cloned): the clone's configuration must not keep it.
        ip(&["addr", "add", "10.77.0.99/24", "dev", "kiln0"]);
        // A clone gets its own configuration: nothing of the first may survive.
        let second = config(
            "02:00:00:00:00:2a",
            "192.168.50.9",
            28,
            "192.168.50.14",
            1400,
            &[],
        );
        let ack = client
            .configure_network(&second)
            .await
            .expect("reconfigured");
        assert_eq!(ack.nameservers, 0);
        let (mac, mtu, up, addrs) = link_state("kiln0");
        assert_eq!(mac, "02:00:00:00:00:2a");
        assert_eq!(mtu, 1400);
        assert!(up);
        assert_eq!(addrs, ["inet 192.168.50.9/28"], "the first address is gone");
        assert_eq!(
            default_routes(),
            ["192.168.50.14 kiln0"],
            "one default route, the new one"
        );
        let routes = ip(&["-4", "route", "show"]);
        assert!(!routes.contains("10.77.0."), "old routes flushed: {routes}");
        assert_eq!(
            std::fs::read_to_string(&resolv).expect("read"),
            "# written by kiln-agent (configure_network)\n"
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        assert!(
            !names.iter().any(|n| n.contains("kiln-tmp")),
            "no temp file left: {names:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn configure_network_without_a_nic_fails_naming_the_step() {
    in_netns(&[], || async {
        let dir = scratch("no-nic");
        let net = SystemNetwork::in_private_netns(dir.join("resolv.conf")).expect("namespace");
        let client = connect(Some(net)).await;
        let cfg = config("52:54:00:00:00:01", "10.0.0.2", 24, "10.0.0.1", 1500, &[]);
        let err = client.configure_network(&cfg).await.expect_err("no nic");
        let AgentError::Remote { code, message, .. } = err else {
            panic!("expected a remote error, got {err:?}");
        };
        assert_eq!(code, ErrorCode::NetworkFailed);
        assert!(
            message.starts_with("failed to find the network interface: ")
                && message.contains("no ethernet interface")
                && message.ends_with("(already done: nothing)"),
            "{message}"
        );
        assert!(!dir.join("resolv.conf").exists(), "nothing was written");
        // The agent keeps serving: the failure is the request's, not the session's.
        let after = client.ping().await;
        assert!(after.is_ok(), "{after:?}");
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn configure_network_with_two_nics_is_ambiguous() {
    let veth: &[&str] = &[
        "link", "add", "kiln0", "type", "veth", "peer", "name", "kiln1",
    ];
    in_netns(&[veth], || async {
        let dir = scratch("two-nics");
        let net = SystemNetwork::in_private_netns(dir.join("resolv.conf")).expect("namespace");
        let client = connect(Some(net)).await;
        let cfg = config("52:54:00:00:00:01", "10.0.0.2", 24, "10.0.0.1", 1500, &[]);
        let err = client.configure_network(&cfg).await.expect_err("ambiguous");
        let message = err.to_string();
        assert!(
            message.contains("network_failed")
                && message.contains("2 ethernet interfaces")
                && message.contains("kiln0")
                && message.contains("kiln1"),
            "{message}"
        );
        // Nothing was touched.
        let (_, mtu, up, addrs) = link_state("kiln0");
        assert_eq!((mtu, up, addrs.len()), (1500, false, 0));
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn configure_network_failed_step_names_it_and_the_steps_done() {
    in_netns(&[TAP], || async {
        // resolv.conf in a directory that does not exist: the last step fails.
        let missing = Path::new("/nonexistent-kiln-dir/resolv.conf");
        let net = SystemNetwork::in_private_netns(missing).expect("namespace");
        let client = connect(Some(net)).await;
        let cfg = config(
            "52:54:00:00:00:07",
            "10.0.0.2",
            24,
            "10.0.0.1",
            1500,
            &["10.0.0.1"],
        );
        let err = client
            .configure_network(&cfg)
            .await
            .expect_err("resolv.conf fails");
        let AgentError::Remote { code, message, .. } = err else {
            panic!("expected a remote error, got {err:?}");
        };
        assert_eq!(code, ErrorCode::NetworkFailed);
        assert!(
            message.starts_with("failed to write resolv.conf of kiln0: "),
            "{message}"
        );
        assert!(
            message.ends_with(
                "(already done: find the network interface, take the link down, disable ipv6, \
                 set the mac, set the mtu, set the address, bring the link up, set the default \
                 route)"
            ),
            "{message}"
        );
    });
}

#[test]
fn configure_network_agent_without_the_feature_is_refused_before_sending() {
    // No namespace and no root needed: nothing reaches an agent that could act.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = connect(None).await;
        assert!(!client.has_feature(FEATURE_NET_V1));
        let cfg = config("52:54:00:00:00:01", "10.0.0.2", 24, "10.0.0.1", 1500, &[]);
        let err = client.configure_network(&cfg).await.expect_err("refused");
        assert!(
            matches!(
                err,
                AgentError::MissingFeature {
                    feature: FEATURE_NET_V1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("net-v1"), "{err}");
    });
}

#[test]
fn system_network_refuses_the_host_namespace() {
    // The test harness's threads are in the host's namespace: a SystemNetwork made there
    // could reconfigure the host's interfaces, so it must not exist.
    let err = SystemNetwork::in_private_netns("/tmp/never-written").expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
}

#[test]
fn system_network_refuses_a_thread_of_another_namespace() {
    // Made in one private namespace, used from a thread in another: refused before anything
    // is touched (the agent must act only where it was set up).
    in_netns(&[TAP], || async {
        let net = std::thread::spawn(|| {
            enter_private_netns();
            SystemNetwork::in_private_netns("/tmp/never-written").expect("namespace")
        })
        .join()
        .expect("thread");
        let client = connect(Some(net)).await;
        let cfg = config("52:54:00:00:00:01", "10.0.0.2", 24, "10.0.0.1", 1500, &[]);
        let err = client.configure_network(&cfg).await.expect_err("refused");
        let message = err.to_string();
        assert!(
            message.contains("failed to find the network interface")
                && message.contains("not in the network namespace"),
            "{message}"
        );
        let (_, _, up, addrs) = link_state("kiln0");
        assert!(!up && addrs.is_empty(), "the interface was not touched");
    });
}
