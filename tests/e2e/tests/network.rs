//! Sandbox networks (issue 10) against test hosts of our own (`kiln_e2e::testnet`: a network
//! namespace with a "public", a link-local and a private host, HTTP, TLS with a per-run CA,
//! DNS): `--network allow=RULES|nat|bridge`, `kiln network set`, `kiln inspect`'s `network`,
//! clones and restores, published ports, and bridge groups. The daemon resolves through the
//! TestNet's DNS server (`KILN_NET_DNS`). Guest-side checks are `probe.py` batches (one exec
//! each); a refusal must fail in the guest within [`REFUSED_WITHIN_MS`] (a guard against
//! silently dropped packets that only time out, not a speed check), and the guest prints how
//! long each took.
//!
//! Needs root (namespaces; bridge mode). Few sandboxes, many checks each: a VM start under
//! TCG costs seconds.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use kiln_e2e::testnet::probe::{
    self, body, echo, expect_ok, expect_refused, http, https, resolve, sink, tcp,
};
use kiln_e2e::testnet::{ECHO_PORT, HostListener, SINK_PORT, TestNet, machine_lock};
use kiln_e2e::{Kiln, assert_success, stderr, stdout, wait_bounded, wait_http, wait_until};
use serde_json::Value;

/// A refusal must be seen by the guest within this long (generous: a dropped packet would
/// take the probe's whole 8 s deadline).
const REFUSED_WITHIN_MS: u64 = 5_000;

/// A refusal by a TCP reset (not an ICMP error or a timeout), within [`REFUSED_WITHIN_MS`].
fn expect_reset(r: &Value, what: &str) {
    expect_refused(r, what, REFUSED_WITHIN_MS);
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("ConnectionRefusedError"),
        "{what}: refused, but not by a reset: {r}"
    );
}

/// An isolated home whose daemon resolves through `net`'s DNS server.
fn kiln_on(net: &TestNet) -> Kiln {
    Kiln::isolated().with_env("KILN_NET_DNS", &net.kiln_net_dns())
}

/// `kiln create --json ARGS` → id.
fn create(k: &Kiln, args: &[&str]) -> String {
    k.create_json(args).0
}

fn sh(k: &Kiln, id: &str, script: &str) -> String {
    let out = k.run(&["exec", id, "--", "sh", "-c", script]);
    assert_success(&out, script);
    stdout(&out)
}

/// Starts `python3 -m http.server PORT` in the guest, serving a page naming the sandbox.
fn serve_in_guest(k: &Kiln, id: &str, port: u16, bind: &str) {
    sh(
        k,
        id,
        &format!(
            "mkdir -p /root/www && echo served-by-{id} > /root/www/index.html && cd /root/www && \
             python3 -m http.server {port} --bind {bind} >/dev/null 2>&1 &"
        ),
    );
    wait_until("guest server listening", 30, || {
        k.run(&[
            "exec",
            id,
            "--",
            "python3",
            "-c",
            &format!("import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"),
        ])
        .status
        .success()
    });
}

fn set_network(k: &Kiln, id: &str, spec: &str) {
    let out = k.run(&["network", "set", id, spec]);
    assert_success(&out, &format!("kiln network set {spec}"));
    let spec_now = probe::inspect(k, id)["spec"]["network"].clone();
    eprintln!("{id} network now {spec_now}");
}

fn stats(net: &Value) -> (u64, u64, u64, u64) {
    let s = &net["stats"];
    let f = |k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("stats.{k} in {net}"))
    };
    (
        f("bytes_out"),
        f("bytes_in"),
        f("connections"),
        f("refused"),
    )
}

/// Every refusal is well-formed: a time, a protocol kiln names, a destination, a reason.
fn check_refusals_well_formed(net: &Value) {
    for r in net["refused"].as_array().expect("refused array") {
        assert!(
            r["at_unix_ms"].as_u64().unwrap_or(0) > 1_600_000_000_000,
            "{r}"
        );
        assert!(
            ["tcp", "udp", "icmp", "dns"].contains(&r["protocol"].as_str().unwrap_or("")),
            "{r}"
        );
        assert!(!r["destination"].as_str().unwrap_or("").is_empty(), "{r}");
        assert!(!r["reason"].as_str().unwrap_or("").is_empty(), "{r}");
    }
}

fn assert_reasons(net: &Value, want: &[&str]) {
    let got = probe::refusal_reasons(net);
    for w in want {
        assert!(
            got.iter().any(|g| g == w),
            "no refusal with reason {w:?} in {:#}",
            net["refused"]
        );
    }
}

/// The guest's NIC agrees with `kiln inspect`: (mac, address).
fn nic_matches_inspect(k: &Kiln, id: &str) -> (String, Ipv4Addr) {
    let (mac, ip) = probe::guest_nic(k, id);
    let ip = ip.unwrap_or_else(|| panic!("{id}: no IPv4 address on its NIC"));
    let n = probe::network(k, id);
    assert_eq!(n["mac"].as_str(), Some(mac.as_str()), "{n}");
    assert_eq!(n["address"].as_str(), Some(ip.to_string().as_str()), "{n}");
    assert!(
        n["prefix_len"]
            .as_u64()
            .is_some_and(|p| (8..=30).contains(&p)),
        "{n}"
    );
    assert!(
        n["gateway"]
            .as_str()
            .is_some_and(|g| g.parse::<Ipv4Addr>().is_ok()),
        "{n}"
    );
    (mac, ip)
}

fn gateway(k: &Kiln, id: &str) -> Ipv4Addr {
    probe::network(k, id)["gateway"]
        .as_str()
        .and_then(|g| g.parse().ok())
        .expect("gateway address")
}

/// Checks that everything the host owns is closed to sandbox `id`: its loopback services
/// (through the gateway and by `loopback.test`), its primary address (also by
/// `hostaddr.test`), its address on the TestNet link; none of the listeners saw a connection.
fn host_is_closed(k: &Kiln, id: &str, net: &TestNet, listeners: &[&HostListener], by_name: bool) {
    let gw = gateway(k, id);
    let lo = listeners[0].addr.port();
    let mut checks = vec![
        tcp(gw, lo),
        tcp(net.host_ip, listeners[1].addr.port()),
        tcp(net.root_ip, listeners[2].addr.port()),
    ];
    if by_name {
        checks.push(tcp("loopback.test", lo));
        checks.push(tcp("hostaddr.test", listeners[1].addr.port()));
    }
    let r = probe::run(k, id, &checks);
    for (i, what) in [
        "host loopback via the gateway",
        "host primary address",
        "host address on the test link",
        "loopback.test",
        "hostaddr.test",
    ]
    .iter()
    .enumerate()
    .take(r.len())
    {
        expect_refused(&r[i], what, REFUSED_WITHIN_MS);
    }
    for l in listeners {
        assert_eq!(l.accepted(), 0, "host listener {} was reached", l.addr);
    }
}

/// The three host listeners: loopback, primary address, the TestNet link's root address.
fn host_listeners(net: &TestNet) -> [HostListener; 3] {
    [
        HostListener::start(Ipv4Addr::LOCALHOST),
        HostListener::start(net.host_ip),
        HostListener::start(net.root_ip),
    ]
}

#[test]
#[ignore = "boots VMs, needs root: run by scripts/test"]
fn allow_mode_reaches_named_hosts_only_and_network_set_switches_policy() {
    let net = TestNet::start();
    let k = kiln_on(&net);
    let listeners = host_listeners(&net);
    let ls: Vec<&HostListener> = listeners.iter().collect();
    let port = kiln_e2e::free_port();
    let id = create(
        &k,
        &[
            "--image",
            "python",
            "--network",
            "allow=allowed.test,*.allowed.test",
            "--publish",
            &format!("{port}:8000"),
        ],
    );
    probe::install(&k, &id, Some(&net.ca_pem_text()));
    nic_matches_inspect(&k, &id);
    let before = stats(&probe::network(&k, &id));

    // Allowed names: resolved to the test host, HTTP and TLS (verified with the test CA).
    let p = net.public_ip;
    let r = probe::run(
        &k,
        &id,
        &[
            resolve("allowed.test"),
            resolve("www.allowed.test"),
            http("allowed.test", None),
            https("www.allowed.test", None, None),
        ],
    );
    for x in &r[..2] {
        assert_eq!(
            expect_ok(x, "resolve")["addrs"],
            serde_json::json!([p.to_string()])
        );
    }
    assert!(
        body(expect_ok(&r[2], "http allowed.test")).contains("server=public host=allowed.test")
    );
    assert!(
        body(expect_ok(&r[3], "https www.allowed.test"))
            .contains("server=tls host=www.allowed.test")
    );

    // Forbidden: other names (NXDOMAIN), the allowed address with another name in the TLS
    // SNI or HTTP Host (other.test is in the certificate: only kiln can stop it), the
    // test host's address by number, names pointing at closed ranges, and those ranges.
    let r = probe::run(
        &k,
        &id,
        &[
            resolve("other.test"),
            https("other.test", Some(p), None),
            https("allowed.test", Some(p), Some("other.test")),
            http("other.test", Some(p)),
            resolve("private.test"),
            resolve("linklocal.test"),
            resolve("loopback.test"),
            resolve("hostaddr.test"),
            http("private", Some(net.private_ip)),
            http("linklocal", Some(net.linklocal_ip)),
        ],
    );
    for (x, what) in r.iter().zip([
        "resolve other.test",
        "TLS to allowed.test's address with SNI other.test",
        "TLS with SNI other.test, Host allowed.test",
        "HTTP to allowed.test's address with Host other.test",
        "resolve private.test",
        "resolve linklocal.test",
        "resolve loopback.test",
        "resolve hostaddr.test",
        "private test host by address",
        "link-local test host by address",
    ]) {
        expect_refused(x, what, REFUSED_WITHIN_MS);
    }
    host_is_closed(&k, &id, &net, &ls, false);

    // Published ports still work with a network.
    serve_in_guest(&k, &id, 8000, "127.0.0.1");
    assert!(wait_http(port).contains(&format!("served-by-{id}")));

    // Counters grew; refusals name their reasons.
    let n = probe::network(&k, &id);
    let after = stats(&n);
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "bytes: {before:?} → {after:?}"
    );
    assert!(
        after.2 >= before.2 + 2,
        "connections: {before:?} → {after:?}"
    );
    assert!(after.3 >= before.3 + 8, "refused: {before:?} → {after:?}");
    check_refusals_well_formed(&n);
    assert_reasons(&n, &["dns_name", "name_mismatch", "private", "link_local"]);
    assert!(
        n["refused"]
            .as_array()
            .expect("refused")
            .iter()
            .any(|r| r["reason"] == "name_mismatch" && r["name"] == "other.test"),
        "the SNI/Host refusal names other.test: {:#}",
        n["refused"]
    );

    // An allow rule naming the private and link-local networks opens them (and only them:
    // the host stays closed).
    set_network(
        &k,
        &id,
        &format!(
            "allow=allowed.test,*.allowed.test,{},{}",
            net.private_cidr(),
            net.linklocal_cidr()
        ),
    );
    let r = probe::run(
        &k,
        &id,
        &[
            http("private", Some(net.private_ip)),
            http("linklocal", Some(net.linklocal_ip)),
            resolve("other.test"),
        ],
    );
    assert!(body(expect_ok(&r[0], "private by CIDR rule")).contains("server=private"));
    assert!(body(expect_ok(&r[1], "link-local by CIDR rule")).contains("server=linklocal"));
    expect_refused(&r[2], "other.test still not allowed", REFUSED_WITHIN_MS);
    host_is_closed(&k, &id, &net, &ls, false);

    // nat: every public name and address, TLS for other.test verified; never the private,
    // link-local or host ranges, also when a name points there.
    set_network(&k, &id, "nat");
    let r = probe::run(
        &k,
        &id,
        &[
            http("other.test", None),
            https("other.test", None, None),
            http("by-address", Some(p)),
            http("private.test", None),
            http("linklocal.test", None),
            http("private", Some(net.private_ip)),
            http("linklocal", Some(net.linklocal_ip)),
        ],
    );
    assert!(body(expect_ok(&r[0], "nat http other.test")).contains("host=other.test"));
    assert!(body(expect_ok(&r[1], "nat https other.test")).contains("server=tls host=other.test"));
    assert!(body(expect_ok(&r[2], "nat public by address")).contains("server=public"));
    for (x, what) in r[3..].iter().zip([
        "nat: private.test",
        "nat: linklocal.test",
        "nat: private host by address",
        "nat: link-local host by address",
    ]) {
        expect_refused(x, what, REFUSED_WITHIN_MS);
    }
    host_is_closed(&k, &id, &net, &ls, true);

    // Back to allow=allowed.test: other.test is refused again, allowed.test still works.
    set_network(&k, &id, "allow=allowed.test");
    let r = probe::run(
        &k,
        &id,
        &[
            http("allowed.test", None),
            resolve("other.test"),
            http("other.test", Some(p)),
            resolve("www.allowed.test"),
        ],
    );
    expect_ok(&r[0], "allowed.test after switching back");
    expect_refused(&r[1], "other.test after switching back", REFUSED_WITHIN_MS);
    expect_refused(
        &r[2],
        "Host other.test after switching back",
        REFUSED_WITHIN_MS,
    );
    expect_refused(
        &r[3],
        "www.allowed.test is not allowed.test",
        REFUSED_WITHIN_MS,
    );

    let last = probe::network(&k, &id);
    let end = stats(&last);
    assert!(end.2 > after.2 && end.3 > after.3, "{after:?} → {end:?}");
    check_refusals_well_formed(&last);
    assert_reasons(&last, &["dns_name", "private", "link_local"]);
    assert!(
        probe::refusal_reasons(&last)
            .iter()
            .any(|r| r == "host" || r == "loopback"),
        "{:#}",
        last["refused"]
    );
    // A bad policy is refused and changes nothing.
    let out = k.run(&["network", "set", &id, "allow=bad rule"]);
    assert!(!out.status.success(), "a bad rule was accepted");
    expect_ok(
        &probe::run_one(&k, &id, http("allowed.test", None)),
        "after a bad set",
    );
    assert_success(&k.run(&["rm", &id]), "kiln rm");
}

#[test]
#[ignore = "boots VMs, needs root: run by scripts/test"]
fn nat_clones_and_restores_get_their_own_mac_and_address_and_reach_public_hosts_only() {
    let net = TestNet::start();
    let k = kiln_on(&net);
    let listeners = host_listeners(&net);
    let ls: Vec<&HostListener> = listeners.iter().collect();
    let out = k.run(&[
        "clone",
        "--image",
        "python",
        "--count",
        "3",
        "--network",
        "nat",
    ]);
    assert_success(&out, "kiln clone --network nat");
    let ids: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(ids.len(), 3, "{}", stdout(&out));
    let mut nics = Vec::new();
    for id in &ids {
        probe::install(&k, id, Some(&net.ca_pem_text()));
        nics.push(nic_matches_inspect(&k, id));
    }
    let macs: BTreeSet<&String> = nics.iter().map(|(m, _)| m).collect();
    let ips: BTreeSet<Ipv4Addr> = nics.iter().map(|(_, a)| *a).collect();
    assert_eq!(macs.len(), 3, "MACs not distinct: {nics:?}");
    assert_eq!(ips.len(), 3, "addresses not distinct: {nics:?}");

    // Another sandbox is unreachable, even with a server listening on all its addresses.
    serve_in_guest(&k, &ids[1], 8000, "0.0.0.0");
    let (c0, c1_ip) = (&ids[0], nics[1].1);
    let r = probe::run(
        &k,
        c0,
        &[
            http("allowed.test", None),
            https("other.test", None, None),
            tcp(c1_ip, 8000),
            http("private", Some(net.private_ip)),
            http("linklocal", Some(net.linklocal_ip)),
            sink(net.public_ip, SINK_PORT, 8 << 20),
            echo(net.public_ip, ECHO_PORT, "nat-echo"),
        ],
    );
    expect_ok(&r[0], "nat: allowed.test");
    expect_ok(&r[1], "nat: https other.test");
    expect_refused(&r[2], "nat: another sandbox", REFUSED_WITHIN_MS);
    expect_refused(&r[3], "nat: private host", REFUSED_WITHIN_MS);
    expect_refused(&r[4], "nat: link-local host", REFUSED_WITHIN_MS);
    let s = expect_ok(&r[5], "nat: 8 MiB to the sink");
    eprintln!(
        "nat upload throughput: {} MiB/s (guest-measured)",
        s["mib_s"]
    );
    assert!(net.sink_total() >= 8 << 20);
    assert_eq!(expect_ok(&r[6], "nat: echo")["echoed"], "nat-echo");
    host_is_closed(&k, c0, &net, &ls, true);
    let n = probe::network(&k, c0);
    assert_reasons(&n, &["private", "link_local"]);
    assert!(
        probe::refusal_reasons(&n)
            .iter()
            .any(|r| r == "other_sandbox" || r == "private"),
        "{:#}",
        n["refused"]
    );
    let st = stats(&n);
    assert!(st.0 >= 8 << 20, "bytes_out counts the upload: {st:?}");

    // A user snapshot's restore gets its own identity too, and works.
    assert_success(
        &k.run(&["snapshot", c0, "--name", "natsnap"]),
        "kiln snapshot",
    );
    let restored = create(&k, &["--snapshot", "natsnap", "--network", "nat"]);
    let (mac, ip) = nic_matches_inspect(&k, &restored);
    assert!(!macs.contains(&mac), "restore reused a MAC: {mac}");
    assert!(!ips.contains(&ip), "restore reused an address: {ip}");
    expect_ok(
        &probe::run_one(&k, &restored, http("allowed.test", None)),
        "restored: allowed.test",
    );
    // The source keeps its own.
    assert_eq!(nic_matches_inspect(&k, c0), nics[0]);
    let mut rm = vec!["rm", restored.as_str()];
    rm.extend(ids.iter().map(String::as_str));
    assert_success(&k.run(&rm), "kiln rm");
}

/// Names of the kiln taps in the root namespace (`kt-…`).
/// The tap of sandbox `id` (`kt-` and its 12 hex digits).
fn tap_of(id: &str) -> String {
    format!("kt-{}", id.strip_prefix("sb-").unwrap_or(id))
}

fn taps() -> Vec<String> {
    kiln_e2e::testnet::links()
        .into_iter()
        .filter(|l| l.starts_with("kt-"))
        .collect()
}

/// Every single IPv4 address and MAC in the elements of kiln's nftables sets and maps
/// (`inet kiln` and `bridge kiln`; a missing table has none). Prefixes and ranges (static
/// sets such as the closed ranges) are left out: per-sandbox state is addresses and MACs.
fn nft_elements() -> BTreeSet<String> {
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::String(s)
                if s.parse::<Ipv4Addr>().is_ok()
                    || (s.len() == 17 && s.matches(':').count() == 5) =>
            {
                out.insert(s.to_ascii_lowercase());
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Object(o) if !o.contains_key("prefix") && !o.contains_key("range") => {
                o.values().for_each(|x| walk(x, out))
            }
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for family in ["inet", "bridge"] {
        let o = std::process::Command::new("nft")
            .args(["-j", "list", "table", family, "kiln"])
            .output()
            .expect("run nft");
        if !o.status.success() {
            continue;
        }
        let v: Value = serde_json::from_slice(&o.stdout).expect("nft json");
        for item in v["nftables"].as_array().into_iter().flatten() {
            if let Some(set) = item.get("set").or(item.get("map")) {
                walk(&set["elem"], &mut out);
            }
        }
    }
    out
}

/// Addresses and MACs of the running sandboxes of `k` (per `kiln inspect`), and their ids.
fn running_identities(k: &Kiln) -> (Vec<String>, BTreeSet<String>) {
    let running: Vec<String> = k.ps()["sandboxes"]
        .as_array()
        .expect("array")
        .iter()
        .filter(|s| s["state"] == "running")
        .map(|s| s["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let mut owned = BTreeSet::new();
    for id in &running {
        let n = probe::network(k, id);
        let addr = n["address"].as_str().unwrap_or_default().to_owned();
        assert!(
            owned.insert(addr.clone()),
            "two running sandboxes hold the lease {addr}"
        );
        owned.insert(n["mac"].as_str().unwrap_or_default().to_ascii_lowercase());
    }
    (running, owned)
}

#[test]
#[ignore = "boots VMs, needs root: run by scripts/test"]
fn bridge_groups_reach_each_other_by_name_and_nothing_else() {
    let _bridge = machine_lock("bridge");
    let net = TestNet::start();
    let k = kiln_on(&net);
    let any = HostListener::start(Ipv4Addr::UNSPECIFIED);
    let mk = |name: &str, group: Option<&str>| {
        let mut args = vec!["--image", "python", "--name", name, "--network", "bridge"];
        if let Some(g) = group {
            args.extend_from_slice(&["--network-group", g]);
        }
        let id = create(&k, &args);
        probe::install(&k, &id, None);
        serve_in_guest(&k, &id, 8000, "0.0.0.0");
        let (_, ip) = nic_matches_inspect(&k, &id);
        (id, ip)
    };
    let (a1, _) = mk("tn-a1", Some("ga"));
    let (a2, a2_ip) = mk("tn-a2", Some("ga"));
    let (b1, b1_ip) = mk("tn-b1", Some("gb"));
    let (c1, c1_ip) = mk("tn-c1", None);
    let gw = gateway(&k, &a1);

    let mut by_name = http("tn-a2", None);
    by_name["port"] = 8000.into();
    let r = probe::run(
        &k,
        &a1,
        &[
            resolve("tn-a2"),
            by_name,
            tcp(b1_ip, 8000),
            tcp(c1_ip, 8000),
            resolve("tn-b1"),
            resolve("tn-c1"),
            tcp(gw, any.addr.port()),
            tcp(net.host_ip, any.addr.port()),
            resolve("allowed.test"),
        ],
    );
    assert_eq!(
        expect_ok(&r[0], "a1 resolves a2")["addrs"],
        serde_json::json!([a2_ip.to_string()])
    );
    assert!(body(expect_ok(&r[1], "a1 → a2 by name")).contains(&format!("served-by-{a2}")));
    // Guest to guest is routed through the host, so outside a group it is refused by a reset
    // (a bridged frame could only be dropped: the guest would wait for its ARP to fail).
    expect_reset(&r[2], "a1 → b1 (other group)");
    expect_reset(&r[3], "a1 → c1 (no group)");
    assert_eq!(
        r[4]["ok"], false,
        "b1's name resolves in group ga: {}",
        r[4]
    );
    assert_eq!(
        r[5]["ok"], false,
        "c1's name resolves in group ga: {}",
        r[5]
    );
    expect_refused(
        &r[6],
        "a1 → the host through the gateway",
        REFUSED_WITHIN_MS,
    );
    expect_refused(&r[7], "a1 → the host's primary address", REFUSED_WITHIN_MS);
    // DNS is the one host service a bridge sandbox reaches.
    assert_eq!(
        expect_ok(&r[8], "kiln's DNS on the bridge")["addrs"],
        serde_json::json!([net.public_ip.to_string()])
    );
    for (from, to, what) in [(&b1, a2_ip, "b1 → a2"), (&c1, a2_ip, "c1 → a2")] {
        expect_reset(&probe::run_one(&k, from, tcp(to, 8000)), what);
    }
    assert_eq!(any.accepted(), 0, "a bridge sandbox reached a host service");
    // a1's refusals are counted and logged (nftables counters, the kernel's log), with the
    // host as the reason; its connection to a2 is not a refusal.
    let n = probe::network(&k, &a1);
    assert!(
        n["stats"]["refused"].as_u64().unwrap_or(0) >= 2,
        "a1's refusals are not counted: {n:#}"
    );
    for reason in ["host", "other_sandbox"] {
        assert!(
            probe::refusal_reasons(&n).iter().any(|r| r == reason),
            "a1's refusals do not name {reason}: {n:#}"
        );
    }
    assert!(
        n["stats"]["bytes_out"].as_u64().unwrap_or(0) > 0,
        "a1's tap counted no bytes: {n:#}"
    );
    assert_success(&k.run(&["rm", &a1, &a2, &b1, &c1]), "kiln rm");
    let ours: Vec<String> = [&a1, &a2, &b1, &c1].iter().map(|id| tap_of(id)).collect();
    wait_until("taps removed with their sandboxes", 30, || {
        taps().iter().all(|t| !ours.contains(t))
    });
}

#[test]
#[ignore = "boots VMs, needs root: run by scripts/test"]
fn bridge_daemon_killed_during_clone_leaves_no_tap_nft_element_or_lease() {
    let _bridge = machine_lock("bridge");
    // Taps of other kiln homes on this machine (another run's) are not this test's business.
    let foreign = taps();
    if !foreign.is_empty() {
        eprintln!("kiln taps of other homes, left out: {foreign:?}");
    }
    let ours = || -> Vec<String> {
        taps()
            .into_iter()
            .filter(|t| !foreign.contains(t))
            .collect()
    };
    let k = Kiln::isolated();
    // Start the daemon first, so that its pid is known before the clone.
    assert!(k.ps()["sandboxes"].as_array().expect("array").is_empty());
    let daemon = k.daemon_pid().expect("daemon running");
    let clone = k
        .cmd(&[
            "clone",
            "--image",
            "base",
            "--count",
            "8",
            "--network",
            "bridge",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kiln clone");
    wait_until("a kiln tap appears during the clone", 120, || {
        !ours().is_empty()
    });
    eprintln!("taps at the kill: {:?}", ours());
    kiln_e2e::signal(daemon, libc::SIGKILL);
    let out = wait_bounded(clone, "kiln clone after its daemon died", 60);
    assert!(
        !out.status.success(),
        "clone succeeded although its daemon was killed"
    );
    eprintln!("clone: {}", stderr(&out));

    // The next daemon: whatever survives is a running sandbox with its own tap and lease;
    // nothing else holds a tap.
    wait_until("one tap per running sandbox after the restart", 60, || {
        let (running, _) = running_identities(&k);
        let t = ours();
        eprintln!("running {running:?} taps {t:?}");
        t.len() == running.len()
    });
    let (survivors, owned) = running_identities(&k);
    let at_restart = nft_elements();
    eprintln!("survivors {survivors:?}, nft elements {at_restart:?}");

    // Removing the survivors leaves no tap, and no element beyond what a clean engine keeps
    // with no sandbox: the baseline measured after one clean create and rm below.
    assert_success(&k.run(&["rm", "--all"]), "kiln rm --all");
    wait_until("no tap after rm --all", 30, || ours().is_empty());
    assert!(k.ps()["sandboxes"].as_array().expect("array").is_empty());
    let after_rm = nft_elements();
    // A new bridge sandbox gets a lease (the pool was not leaked); removing it cleanly
    // gives the baseline.
    let id = create(&k, &["--image", "base", "--network", "bridge"]);
    let n = probe::network(&k, &id);
    let fresh = [
        n["address"].as_str().expect("address").to_owned(),
        n["mac"].as_str().expect("mac").to_ascii_lowercase(),
    ];
    assert_eq!(ours().len(), 1, "{:?}", ours());
    assert_success(&k.run(&["rm", &id]), "kiln rm");
    wait_until("its tap removed", 30, || ours().is_empty());
    let baseline = nft_elements();
    for f in &fresh {
        assert!(
            !baseline.contains(f),
            "{f} left in nft after a clean rm: {baseline:?}"
        );
    }
    let leaked: Vec<&String> = after_rm.difference(&baseline).collect();
    assert!(
        leaked.is_empty(),
        "nft elements left by the killed clone: {leaked:?}"
    );
    let orphans: Vec<&String> = at_restart
        .iter()
        .filter(|e| !owned.contains(*e) && !baseline.contains(*e))
        .collect();
    assert!(
        orphans.is_empty(),
        "nft elements of no running sandbox after the restart: {orphans:?}"
    );
}

/// The Debian mirror this host's apt uses: (URI, host), from the deb822 `.sources` files or
/// `sources.list`.
fn host_mirror() -> (String, String) {
    let mut texts = Vec::new();
    if let Ok(d) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in d.flatten() {
            if e.path()
                .extension()
                .is_some_and(|x| x == "sources" || x == "list")
            {
                texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    texts.push(std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    for t in texts {
        for line in t.lines() {
            let line = line.trim();
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if line.starts_with("deb ") {
                line.split_whitespace().find(|w| w.starts_with("http"))
            } else {
                None
            };
            if let Some(uri) = uri.filter(|u| u.starts_with("http://") || u.starts_with("https://"))
                && !uri.contains("security")
            {
                let host = uri
                    .split("://")
                    .nth(1)
                    .and_then(|r| r.split('/').next())
                    .unwrap_or("");
                return (uri.trim_end_matches('/').to_owned(), host.to_owned());
            }
        }
    }
    panic!("no http(s) Debian mirror in this host's apt sources");
}

#[test]
#[ignore = "boots VMs, builds an image from the Debian mirror: run by scripts/test"]
fn allow_rule_for_the_debian_mirror_lets_apt_update_through() {
    // The real mirror through the host's own resolver (no KILN_NET_DNS): the registries
    // are the one outside service these machines reach.
    let (uri, host) = host_mirror();
    let k = Kiln::isolated();
    let dir = tempfile::tempdir().expect("temp dir");
    let recipe = dir.path().join("kiln-e2e-apt-net.toml");
    std::fs::write(
        &recipe,
        format!(
            "name = \"kiln-e2e-apt-net\"\nfrom = \"debian:bookworm\"\n\
             packages = [\"apt\", \"ca-certificates\"]\n\n\
             [[files]]\ndst = \"/etc/apt/sources.list\"\n\
             content = \"deb {uri} bookworm main\\n\"\n"
        ),
    )
    .expect("write the recipe");
    let out = k.run(&["image", "build", recipe.to_str().expect("utf-8")]);
    assert_success(&out, "kiln image build (apt)");
    let id = create(
        &k,
        &[
            "--image",
            "kiln-e2e-apt-net",
            "--network",
            &format!("allow={host}"),
        ],
    );
    // Only the one sources file: the image's own deb822 file (if any) would name the same
    // host, but keep what apt reads to what the test wrote.
    sh(&k, &id, "rm -f /etc/apt/sources.list.d/*.sources");
    let out = k.run(&["exec", &id, "--", "apt-get", "update"]);
    assert_success(&out, "apt-get update through allow=HOST");
    assert!(stdout(&out).contains(&host), "{}", stdout(&out));
    assert!(!stdout(&out).contains("Err:"), "{}", stdout(&out));
    // Another destination: a name no rule allows, and this machine's own address.
    let host_ip = kiln_e2e::testnet::primary_address();
    let listener = HostListener::start(host_ip);
    let t = std::time::Instant::now();
    let out = k.run(&["exec", &id, "--", "getent", "hosts", "security.debian.org"]);
    assert!(
        !out.status.success(),
        "a name no rule allows resolved: {}",
        stdout(&out)
    );
    let out = k.run(&[
        "exec",
        &id,
        "--",
        "timeout",
        "8",
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/{host_ip}/{}", listener.addr.port()),
    ]);
    assert!(!out.status.success(), "the host's own address was reached");
    assert_eq!(listener.accepted(), 0);
    eprintln!("refusals seen in the guest after {:?}", t.elapsed());
    let n = probe::network(&k, &id);
    assert_reasons(&n, &["dns_name", "host"]);
    assert!(stats(&n).2 >= 1, "apt's connections counted: {n}");
    assert_success(&k.run(&["rm", &id]), "kiln rm");
}

#[test]
#[ignore = "boots VMs, needs root: run by scripts/test"]
fn network_none_has_no_nic_and_inspect_has_no_network() {
    let k = Kiln::isolated();
    let id = create(&k, &["--image", "python"]);
    let out = k.run(&["exec", &id, "--", "ls", "/sys/class/net"]);
    assert_success(&out, "ls /sys/class/net");
    assert_eq!(stdout(&out).split_whitespace().collect::<Vec<_>>(), ["lo"]);
    assert!(
        probe::inspect(&k, &id)
            .get("network")
            .is_none_or(Value::is_null)
    );
    // A policy change is refused for a sandbox without a network device.
    let out = k.run(&["network", "set", &id, "nat"]);
    assert!(
        !out.status.success(),
        "network set on a none sandbox succeeded"
    );
    assert_success(&k.run(&["rm", &id]), "kiln rm");
}
