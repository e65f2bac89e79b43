//! Guest-side network probes: `probe.py` (beside this file) copied into a sandbox once
//! ([`install`]) and run with a batch of [`Check`]s per `kiln exec` ([`run`]), so that a test
//! pays one exec (and one Python start under TCG) per batch, not per check. Also the
//! readers of `kiln inspect`'s `network` object.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::{Kiln, assert_success, stdout};

/// Where [`install`] puts the probe script in the guest.
pub const GUEST_PROBE: &str = "/root/kiln-probe.py";
/// Where [`install`] puts the test CA in the guest.
pub const GUEST_CA: &str = "/root/kiln-test-ca.pem";

const PROBE_PY: &str = include_str!("probe.py");

/// One check; see `probe.py` for what each does and returns.
pub type Check = Value;

/// Resolve `name` (A records).
pub fn resolve(name: &str) -> Check {
    json!({"op": "resolve", "name": name})
}

/// Plain HTTP `GET /` with `Host: host`, to `addr` (default: `host` resolved).
pub fn http(host: &str, addr: Option<Ipv4Addr>) -> Check {
    let mut c = json!({"op": "http", "host": host});
    if let Some(a) = addr {
        c["addr"] = json!(a.to_string());
    }
    c
}

/// HTTPS `GET /` with `Host: host`, verified against the test CA, with TLS SNI `sni`
/// (default `host`), to `addr` (default: `host` resolved).
pub fn https(host: &str, addr: Option<Ipv4Addr>, sni: Option<&str>) -> Check {
    let mut c = json!({"op": "http", "host": host, "tls": true, "ca": GUEST_CA});
    if let Some(a) = addr {
        c["addr"] = json!(a.to_string());
    }
    if let Some(s) = sni {
        c["sni"] = json!(s);
    }
    c
}

/// TCP connect to `addr:port` (and read a banner, if any, within a second).
pub fn tcp(addr: impl ToString, port: u16) -> Check {
    json!({"op": "tcp", "addr": addr.to_string(), "port": port})
}

/// Send `data` to an echo server and read it back.
pub fn echo(addr: impl ToString, port: u16, data: &str) -> Check {
    json!({"op": "echo", "addr": addr.to_string(), "port": port, "data": data})
}

/// Send `bytes` bytes to a counting sink; the result has `received` and `mib_s`.
pub fn sink(addr: impl ToString, port: u16, bytes: u64) -> Check {
    json!({"op": "sink", "addr": addr.to_string(), "port": port, "bytes": bytes})
}

/// The guest's interfaces (`ifaces`: name, mac, ipv4), loopback excepted.
pub fn iface() -> Check {
    json!({"op": "iface"})
}

/// Copies the probe script and the CA PEM `ca_pem` (if any) into sandbox `id`.
pub fn install(k: &Kiln, id: &str, ca_pem: Option<&str>) {
    let out = k.run_with_stdin(
        &[
            "exec",
            id,
            "--",
            "sh",
            "-c",
            &format!("cat > {GUEST_PROBE}"),
        ],
        PROBE_PY.as_bytes(),
    );
    assert_success(&out, "copy the probe script into the guest");
    if let Some(pem) = ca_pem {
        let out = k.run_with_stdin(
            &["exec", id, "--", "sh", "-c", &format!("cat > {GUEST_CA}")],
            pem.as_bytes(),
        );
        assert_success(&out, "copy the test CA into the guest");
    }
}

/// Runs `checks` in sandbox `id` (one `kiln exec`); one result per check, each printed.
pub fn run(k: &Kiln, id: &str, checks: &[Check]) -> Vec<Value> {
    let arg = Value::Array(checks.to_vec()).to_string();
    let out = k.run(&["exec", id, "--", "python3", GUEST_PROBE, &arg]);
    assert_success(&out, "run the guest probe");
    let v: Vec<Value> = serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("probe output is not JSON ({e}): {}", stdout(&out)));
    assert_eq!(v.len(), checks.len(), "one result per check");
    for r in &v {
        eprintln!(
            "probe {id}: {} ok={} ms={} {}",
            r["check"],
            r["ok"],
            r["ms"],
            r.get("error").or(r.get("body")).unwrap_or(&Value::Null)
        );
    }
    v
}

/// Runs one check.
pub fn run_one(k: &Kiln, id: &str, check: Check) -> Value {
    run(k, id, &[check]).remove(0)
}

/// Asserts that a result succeeded; returns it.
pub fn expect_ok<'a>(r: &'a Value, what: &str) -> &'a Value {
    assert_eq!(r["ok"], true, "{what}: expected success, got {r}");
    r
}

/// Asserts that a result failed, and within `bound_ms` (a guard against silent drops that
/// only time out, not a speed check); returns the guest-measured milliseconds.
pub fn expect_refused(r: &Value, what: &str, bound_ms: u64) -> u64 {
    assert_eq!(r["ok"], false, "{what}: expected a refusal, got {r}");
    let ms = r["ms"].as_u64().unwrap_or(u64::MAX);
    eprintln!("{what}: refused after {ms} ms ({})", r["error"]);
    assert!(
        ms < bound_ms,
        "{what}: took {ms} ms to fail (bound {bound_ms} ms: dropped, not refused?): {r}"
    );
    ms
}

/// The HTTP body of a successful `http` result.
pub fn body(r: &Value) -> &str {
    r["body"].as_str().unwrap_or_default()
}

/// `kiln inspect ID` → the sandbox's JSON object.
pub fn inspect(k: &Kiln, id: &str) -> Value {
    let out = k.run(&["inspect", id]);
    assert_success(&out, "kiln inspect");
    let v: Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    v[0].clone()
}

/// `kiln inspect ID` → its `network` object (panics if absent).
pub fn network(k: &Kiln, id: &str) -> Value {
    let v = inspect(k, id);
    assert!(v["network"].is_object(), "no network in inspect: {v:#}");
    v["network"].clone()
}

/// The reasons of a `network` object's refusals, in order.
pub fn refusal_reasons(net: &Value) -> Vec<String> {
    net["refused"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["reason"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The guest's one non-loopback interface: (mac, ipv4).
pub fn guest_nic(k: &Kiln, id: &str) -> (String, Option<Ipv4Addr>) {
    let r = run_one(k, id, iface());
    let ifaces = r["ifaces"].as_array().cloned().unwrap_or_default();
    assert_eq!(ifaces.len(), 1, "expected one NIC in {id}: {r}");
    (
        ifaces[0]["mac"].as_str().unwrap_or_default().to_owned(),
        ifaces[0]["ipv4"].as_str().and_then(|a| a.parse().ok()),
    )
}
