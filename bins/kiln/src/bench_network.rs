//! `kiln bench network`: what a sandbox's network costs, per mode, side by side in one run.
//!
//! The bench brings its own test host (root only): a network namespace `kiln-bn-PID` joined
//! to this one by a veth pair, with a routed "public" address 198.51.100.2 (TEST-NET-2,
//! on a /32 route so the host's own routes stay; outside the host's connected subnets, which
//! every mode refuses) serving an HTTP sink (:9000, answers
//! `received N` after Content-Length bytes: no EOF after a half-close is needed), an HTTP
//! connect target (:9001) and dnsmasq (`bench.test` → 198.51.100.2). The sandboxes run in a
//! daemon started for the bench (home `$KILN_HOME/bench-network`, the images shared) with
//! `KILN_NET_DNS` pointing at that dnsmasq; it is stopped at the end.
//!
//! - VM, per mode (`nat`, `allow=bench.test`, `allow=198.51.100.0/24`, `bridge` when the
//!   daemon offers it, and the baseline: QEMU's own user networking, libslirp, with no policy
//!   of kiln's, from a second daemon started with `KILN_NET_BASELINE=qemu-user` in
//!   `$KILN_HOME/bench-network-baseline`): one python3 probe inside the guest measures TCP
//!   connects and the first HTTP answer (p50/p95), DNS answers from the guest's resolver
//!   (not for the CIDR mode nor the baseline, whose resolver is the host's), and TCP
//!   throughput guest → test host (median of `--runs`); then `kiln run --network MODE --
//!   python3 -c <connect once>` wall time, interleaved with `kiln run -- true` and `kiln run
//!   -- python3 -c pass` without network, so the network's share of a start shows. Each
//!   mode's throughput and connect time are also given as a ratio to the baseline's: the
//!   cost of kiln's policy.
//! - relay: the filter's cost where the guest's CPU does not hide it. A native Linux stack
//!   (a tap in namespace `kiln-bng-PID`) is bridged, by this process, either to kiln's relay
//!   (filter + real passt) or straight to a passt started the same way; the ratio is
//!   throughput with policy / without.
//!
//! Everything it creates is removed at the end, on error, panic or Ctrl-C. Nothing is
//! asserted: numbers go to stdout (`--json`) and into docs/benchmarks.md by hand.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use kiln_client::{Client, ClientHome};
use serde::{Deserialize, Serialize};

use crate::bench::{Summary, summary};

/// The test host's routed address.
const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Its network, as a CIDR rule.
const HOST_CIDR: &str = "198.51.100.0/24";
/// This namespace's end of the veth (a /30; the test host's end is .2).
const LINK_NET: &str = "198.18.251";
/// The baseline's row: QEMU's user networking without kiln's policy.
const BASELINE: &str = "qemu-user (no policy)";
/// The name dnsmasq answers with [`HOST_IP`].
const NAME: &str = "bench.test";
const SINK_PORT: u16 = 9000;
const CONNECT_PORT: u16 = 9001;

/// Options of `kiln bench network`.
#[derive(Debug, Args)]
pub struct NetworkBenchArgs {
    /// Throughput runs per mode, and `kiln run` starts of each kind.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Image of the sandboxes (needs python3).
    #[arg(long, default_value = "python")]
    pub image: String,
    /// TCP connects (and DNS lookups) per mode.
    #[arg(long, default_value_t = 50)]
    pub connects: usize,
    /// MiB sent guest → test host per VM throughput run.
    #[arg(long, default_value_t = 64)]
    pub mib: u64,
    /// MiB per relay throughput run (native stack as guest).
    #[arg(long, default_value_t = 256)]
    pub relay_mib: u64,
    /// Only the relay part (no daemon, no VMs).
    #[arg(long, conflicts_with = "no_relay")]
    pub relay_only: bool,
    /// Skip the relay part.
    #[arg(long)]
    pub no_relay: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// One network mode measured in a VM.
#[derive(Debug, Serialize)]
pub struct VmMode {
    /// `--network` value.
    pub mode: String,
    /// TCP connect() in the guest (ms).
    pub connect_ms: Summary,
    /// connect() → first byte of the HTTP answer (ms): includes inspection for name rules.
    pub first_answer_ms: Summary,
    /// A query for bench.test to the guest's resolver → answer (ms); none for CIDR rules.
    pub dns_ms: Option<Summary>,
    /// TCP guest → test host (MiB/s).
    pub tcp_mib_s: Summary,
    /// p50 throughput / p50 of `nat`.
    pub tcp_vs_nat: f64,
    /// p50 throughput / p50 of the baseline (QEMU user networking, no policy).
    pub tcp_vs_baseline: Option<f64>,
    /// p50 connect time / p50 of the baseline.
    pub connect_vs_baseline: Option<f64>,
    /// Wall time of `kiln run --network MODE -- python3 -c <connect once>` (ms).
    pub run_connect_ms: Summary,
    /// p50 of that minus p50 of `kiln run -- python3 -c pass` (no network) (ms).
    pub network_share_ms: f64,
    /// Probe connections that failed (not counted in the figures), and the last failure.
    pub failed_connections: u64,
    /// The last such failure.
    pub last_failure: Option<String>,
}

/// The VM part.
#[derive(Debug, Serialize)]
pub struct VmBench {
    /// Accelerator.
    pub accel: String,
    /// Image.
    pub image: String,
    /// The daemon's home.
    pub daemon_home: String,
    /// `kiln run -- true`, no network (ms).
    pub run_true_ms: Summary,
    /// `kiln run -- python3 -c pass`, no network (ms).
    pub run_python_ms: Summary,
    /// Per mode.
    pub modes: Vec<VmMode>,
    /// Why bridge was not measured.
    pub bridge_skipped: Option<String>,
}

/// One relay configuration.
#[derive(Debug, Serialize)]
pub struct RelayMode {
    /// `passt only` or the policy.
    pub mode: String,
    /// TCP native guest → test host (MiB/s).
    pub tcp_mib_s: Summary,
    /// TCP connect() (ms).
    pub connect_ms: Summary,
    /// p50 throughput / p50 of passt only.
    pub ratio: f64,
    /// Probe connections that failed (not counted in the figures).
    pub failed_connections: u64,
    /// The last such failure.
    pub last_failure: Option<String>,
}

/// The relay part.
#[derive(Debug, Serialize)]
pub struct RelayBench {
    /// Link MTU.
    pub mtu: u16,
    /// MiB per run.
    pub mib: u64,
    /// passt only first, then the policies.
    pub modes: Vec<RelayMode>,
}

/// The result of `kiln bench network`.
#[derive(Debug, Serialize)]
pub struct NetworkBench {
    /// Runs.
    pub runs: usize,
    /// The test host.
    pub test_host: String,
    /// VM part.
    pub vm: Option<VmBench>,
    /// Relay part.
    pub relay: Option<RelayBench>,
}

/// The probe run in guests (VMs and the relay's native stack). argv[1]: JSON config.
const PROBE: &str = r#"
import json, os, socket, struct, sys, time
c = json.loads(sys.argv[1])
out = {"dns_ms": [], "connect_ms": [], "answer_ms": [], "mib_s": [], "errors": 0, "error": None}
def server():
    if c.get("dns_server"): return c["dns_server"]
    for l in open("/etc/resolv.conf"):
        p = l.split()
        if len(p) >= 2 and p[0] == "nameserver": return p[1]
    raise SystemExit("no nameserver in /etc/resolv.conf")
def lookup(name, srv):
    qid = int.from_bytes(os.urandom(2), "big")
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for l in name.split("."): q += bytes([len(l)]) + l.encode()
    q += b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    t = time.monotonic(); s.sendto(q, (srv, 53)); r = s.recv(512); dt = time.monotonic() - t
    s.close()
    if r[:2] != q[:2] or r[3] & 15 or struct.unpack(">H", r[6:8])[0] == 0:
        raise SystemExit("DNS: no answer for %s from %s (rcode %d)" % (name, srv, r[3] & 15))
    return ".".join(str(b) for b in r[-4:]), dt * 1000
ip, host = c["ip"], c["ip"]
if c["name"]:
    srv = server(); host = c["name"]
    for i in range(max(c["dns"], 1)):
        ip, dt = lookup(c["name"], srv)
        if i < c["dns"]: out["dns_ms"].append(dt)
def fail(e):
    out["errors"] += 1; out["error"] = "%s: %s" % (type(e).__name__, e)
    if out["errors"] > 5: raise SystemExit("too many failed connections: " + out["error"])
for _ in range(c["connects"]):
    try:
        t = time.monotonic()
        s = socket.create_connection((ip, c["connect_port"]), timeout=20)
        t1 = time.monotonic()
        s.sendall(("GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode())
        d = s.recv(100)
        t2 = time.monotonic(); s.close()
    except OSError as e:
        fail(e); continue
    if not d.startswith(b"HTTP/1.0 200"): raise SystemExit("connect target answered %r" % d)
    out["connect_ms"].append((t1 - t) * 1000); out["answer_ms"].append((t2 - t) * 1000)
buf = b"x" * (1 << 20)
while len(out["mib_s"]) < c["runs"]:
  n = c["mib"] << 20
  try:
    t = time.monotonic()
    s = socket.create_connection((ip, c["sink_port"]), timeout=60)
    s.sendall(("POST /sink HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (host, n)).encode())
    left = n
    while left > 0:
        k = min(left, len(buf)); s.sendall(buf[:k] if k < len(buf) else buf); left -= k
    r = b""
    while not r.endswith(b"\n") or b"received" not in r:
        d = s.recv(4096)
        if not d: raise SystemExit("sink closed early: %r" % r)
        r += d
    dt = time.monotonic() - t; s.close()
  except OSError as e:
    fail(e); continue
  got = int(r.split(b"received ")[1].split()[0])
  if got != n: raise SystemExit("sink received %d of %d bytes" % (got, n))
  out["mib_s"].append(c["mib"] / dt)
print(json.dumps(out))
"#;

/// The test host's servers (run with `ip netns exec`). argv[1]: address to bind.
const SERVERS: &str = r#"
import socket, sys, threading
ip = sys.argv[1]
def handle(c, sink):
    try:
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = c.recv(65536)
            if not d: return
            buf += d
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not sink:
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n"); return
        n = 0
        for l in head.split(b"\r\n")[1:]:
            k, _, v = l.partition(b":")
            if k.strip().lower() == b"content-length": n = int(v)
        got = len(rest); mem = memoryview(bytearray(1 << 20))
        while got < n:
            k = c.recv_into(mem)
            if not k: break
            got += k
        c.sendall(b"HTTP/1.0 200 OK\r\n\r\nreceived %d\n" % got)
    except OSError:
        pass
    finally:
        c.close()
def serve(l, sink):
    while True:
        c, _ = l.accept()
        threading.Thread(target=handle, args=(c, sink), daemon=True).start()
ls = []
for port, sink in ((9000, True), (9001, False)):
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((ip, port)); l.listen(512); ls.append((l, sink))
for l, sink in ls:
    threading.Thread(target=serve, args=(l, sink), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

#[derive(Debug, Deserialize)]
struct ProbeOut {
    dns_ms: Vec<f64>,
    connect_ms: Vec<f64>,
    answer_ms: Vec<f64>,
    mib_s: Vec<f64>,
    /// Connections that failed (reset, timeout) and were not counted; at most 5.
    errors: u64,
    /// The last such failure.
    error: Option<String>,
}

fn probe_config(name: Option<&str>, dns_server: Option<&str>, a: &NetworkBenchArgs) -> String {
    serde_json::json!({
        "name": name,
        "ip": HOST_IP.to_string(),
        "dns_server": dns_server,
        "dns": if name.is_some() { a.connects } else { 0 },
        "connects": a.connects,
        "runs": a.runs,
        "mib": a.mib,
        "connect_port": CONNECT_PORT,
        "sink_port": SINK_PORT,
    })
    .to_string()
}

fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The test host and everything else the bench creates on the machine; removed on drop.
struct TestHost {
    ns: String,
    guest_ns: String,
    link: String,
    dir: PathBuf,
    children: Vec<Child>,
}

impl TestHost {
    fn start() -> anyhow::Result<TestHost> {
        let pid = std::process::id();
        let mut h = TestHost {
            ns: format!("kiln-bn-{pid}"),
            guest_ns: format!("kiln-bng-{pid}"),
            link: format!("kbn{pid}h"),
            dir: std::env::temp_dir().join(format!("kiln-bench-network-{pid}")),
            children: Vec::new(),
        };
        let routes = sh(&["ip", "-4", "route", "show", &format!("{HOST_IP}/32")])?;
        let addrs = sh(&["ip", "-4", "-o", "addr", "show"])?;
        if !routes.trim().is_empty() || addrs.contains(&format!("{LINK_NET}.")) {
            bail!(
                "{HOST_IP} or {LINK_NET}.0/30 is already in use here (another `kiln bench \
                 network`?)"
            );
        }
        std::fs::create_dir_all(&h.dir)?;
        // From here on, an error drops `h`, which removes what was made.
        let peer = format!("kbn{pid}n");
        sh(&["ip", "netns", "add", &h.ns])?;
        sh(&[
            "ip", "link", "add", &h.link, "type", "veth", "peer", "name", &peer, "netns", &h.ns,
        ])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{LINK_NET}.1/30"),
            "dev",
            &h.link,
        ])?;
        sh(&["ip", "link", "set", &h.link, "up"])?;
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &format!("{LINK_NET}.2/30"), "dev", &peer],
            vec!["addr", "add", &format!("{HOST_IP}/24"), "dev", &peer],
            vec!["link", "set", &peer, "up"],
            vec!["route", "add", "default", "via", &format!("{LINK_NET}.1")],
        ] {
            let mut v = vec!["ip", "-n", h.ns.as_str()];
            v.extend(args.iter().copied());
            sh(&v)?;
        }
        // A /32 route: the host's other routes (its package mirror may share the /24) stay.
        let host_route = format!("{HOST_IP}/32");
        sh(&[
            "ip",
            "route",
            "add",
            &host_route,
            "dev",
            &h.link,
            "src",
            &format!("{LINK_NET}.1"),
        ])?;
        // Servers.
        let script = h.dir.join("servers.py");
        std::fs::write(&script, SERVERS)?;
        let log = File::create(h.dir.join("servers.log"))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &h.ns, "python3", "-u"])
            .arg(&script)
            .arg(HOST_IP.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("cannot start the test host's servers (python3)")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        h.children.push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!(
                "the test host's servers did not start: {}",
                std::fs::read_to_string(h.dir.join("servers.log")).unwrap_or_default()
            );
        }
        // DNS.
        let dns = Command::new("ip")
            .args(["netns", "exec", &h.ns, "dnsmasq", "--no-daemon"])
            .args([
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--user=root",
                "--pid-file=",
                "--local=/test/",
            ])
            .arg(format!("--listen-address={HOST_IP}"))
            .arg(format!("--address=/{NAME}/{HOST_IP}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start dnsmasq (apt-get install dnsmasq-base)")?;
        h.children.push(dns);
        // Readiness: every server answers from this namespace.
        poll("the test host's TCP servers", || {
            [SINK_PORT, CONNECT_PORT].iter().all(|p| {
                std::net::TcpStream::connect_timeout(
                    &SocketAddr::from((HOST_IP, *p)),
                    Duration::from_secs(1),
                )
                .is_ok()
            })
        })?;
        poll("dnsmasq", || dns_answers(NAME))?;
        Ok(h)
    }

    fn dns(&self) -> String {
        format!("{HOST_IP}:53")
    }
}

fn poll(what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(15) {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not answer within 15 s")
}

/// Whether dnsmasq answers an A query for `name` with [`HOST_IP`].
fn dns_answers(name: &str) -> bool {
    let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0") else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut q = vec![0x42, 0x42, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if s.send_to(&q, (HOST_IP, 53)).is_err() {
        return false;
    }
    let mut r = [0u8; 512];
    matches!(s.recv(&mut r), Ok(n) if n >= 4 && r[n - 4..n] == HOST_IP.octets())
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.ns, &self.guest_ns] {
            if let Ok(pids) = sh(&["ip", "netns", "pids", ns]) {
                for pid in pids.split_whitespace() {
                    let _ = sh(&["kill", "-9", pid]);
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(relay_dir());
    }
}

/// The relay part's sockets (removed by [`TestHost`]'s drop too, also after an error).
fn relay_dir() -> PathBuf {
    std::env::temp_dir().join(format!("kiln-bench-relay-{}", std::process::id()))
}

/// Runs `kiln bench network`.
pub async fn run(home: &ClientHome, a: &NetworkBenchArgs) -> anyhow::Result<i32> {
    if a.runs == 0 || a.connects == 0 {
        bail!("--runs and --connects must be at least 1");
    }
    if !is_root() {
        bail!(
            "kiln bench network needs root: it creates a test host (network namespace, veth \
             link, route, dnsmasq) and, for the relay part, a tap device; run it as root"
        );
    }
    let host = TestHost::start()?;
    let homes = BenchHomes {
        kiln: ClientHome::new(home.root().join("bench-network")),
        baseline: ClientHome::new(home.root().join("bench-network-baseline")),
    };
    let result = tokio::select! {
        r = bench(home, &homes, &host, a) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // Whatever happened: the bench's daemons go, then the test host (drop).
    if !a.relay_only {
        for h in [&homes.kiln, &homes.baseline] {
            if let Some(c) = Client::existing(h).await {
                let _ = crate::sandbox::remove_all(&c).await;
                if let Ok(h) = c.health().await {
                    let _ = crate::sandbox::stop_daemon(&h).await;
                }
            }
        }
    }
    drop(host);
    let out = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(&out, a);
    }
    Ok(0)
}

/// The homes of the bench's two daemons (the images shared with the user's home).
struct BenchHomes {
    /// kiln's networks.
    kiln: ClientHome,
    /// The baseline: `KILN_NET_BASELINE=qemu-user`.
    baseline: ClientHome,
}

async fn bench(
    home: &ClientHome,
    homes: &BenchHomes,
    host: &TestHost,
    a: &NetworkBenchArgs,
) -> anyhow::Result<NetworkBench> {
    let vm = if a.relay_only {
        None
    } else {
        Some(vm_bench(home, homes, host, a).await?)
    };
    let relay = if a.no_relay {
        None
    } else {
        let (guest_ns, relay_mib, runs, cfg) = (
            host.guest_ns.clone(),
            a.relay_mib,
            a.runs,
            probe_config(Some(NAME), Some("10.0.2.2"), a),
        );
        let dns: SocketAddr = host.dns().parse()?;
        // Its own multi-threaded runtime (the CLI's is single-threaded): the frame pumps and
        // the relay get both cores, as in the daemon.
        let t = std::thread::spawn(move || -> anyhow::Result<RelayBench> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(relay_bench(guest_ns, dns, relay_mib, runs, cfg))
        });
        Some(
            tokio::task::spawn_blocking(move || t.join())
                .await?
                .map_err(|_| anyhow::anyhow!("the relay bench panicked"))??,
        )
    };
    Ok(NetworkBench {
        runs: a.runs,
        test_host: format!("{HOST_IP} ({NAME}) in netns {}", host.ns),
        vm,
        relay,
    })
}

// ---------------------------------------------------------------- VM part

fn kiln_cmd(home: &ClientHome) -> anyhow::Result<Command> {
    let mut c = Command::new(std::env::current_exe()?);
    c.env("KILN_HOME", home.root()).stdin(Stdio::null());
    Ok(c)
}

fn kiln_out(home: &ClientHome, args: &[&str]) -> anyhow::Result<String> {
    let out = kiln_cmd(home)?.args(args).output()?;
    if !out.status.success() {
        bail!(
            "`kiln {}` failed ({}): {}",
            args.join(" ").chars().take(120).collect::<String>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Wall time of a `kiln run` (ms); fails if the command fails.
async fn timed_run(home: &ClientHome, args: Vec<String>) -> anyhow::Result<f64> {
    let home = home.clone();
    tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = Instant::now();
        kiln_out(&home, &argv)?;
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    })
    .await?
}

/// A daemon of the bench's own in `bench_home` (images linked to `home`'s) with `env`: a
/// stale one from an earlier run is stopped first, so that `env` applies.
async fn fresh_daemon(
    home: &ClientHome,
    bench_home: &ClientHome,
    env: &[(&str, &str)],
) -> anyhow::Result<Client> {
    std::fs::create_dir_all(bench_home.root())?;
    let link = bench_home.root().join("images");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(home.root().join("images"), &link)?;
    }
    if let Some(c) = Client::existing(bench_home).await {
        crate::sandbox::remove_all(&c).await?;
        crate::sandbox::stop_daemon(&c.health().await?).await?;
        let t = Instant::now();
        while Client::existing(bench_home).await.is_some() && t.elapsed().as_secs() < 20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(Client::connect_with_env(bench_home, env).await?)
}

/// One row of the VM part: a `--network` value in one of the bench's daemons.
struct Row {
    label: String,
    network: String,
    home: ClientHome,
    /// The name the probe resolves and connects to (`None`: the test host's address).
    name: Option<&'static str>,
}

async fn vm_bench(
    home: &ClientHome,
    homes: &BenchHomes,
    host: &TestHost,
    a: &NetworkBenchArgs,
) -> anyhow::Result<VmBench> {
    let dns = host.dns();
    let client = fresh_daemon(home, &homes.kiln, &[("KILN_NET_DNS", dns.as_str())]).await?;
    crate::image::ensure_built(&client, &a.image).await?;
    fresh_daemon(
        home,
        &homes.baseline,
        &[
            ("KILN_NET_DNS", dns.as_str()),
            ("KILN_NET_BASELINE", "qemu-user"),
        ],
    )
    .await?;
    let report = client.doctor().await?;
    let accel = report.accel.clone().unwrap_or_else(|| "unknown".into());
    let bridge = report.network_modes.iter().find(|m| m.mode == "bridge");
    let row = |network: String, name: Option<&'static str>| Row {
        label: network.clone(),
        network,
        home: homes.kiln.clone(),
        name,
    };
    let mut rows = vec![
        row("nat".into(), Some(NAME)),
        row(format!("allow={NAME}"), Some(NAME)),
        row(format!("allow={HOST_CIDR}"), None),
    ];
    let bridge_skipped = match bridge {
        Some(m) if m.available => {
            rows.push(row("bridge".into(), Some(NAME)));
            None
        }
        Some(m) => Some(m.missing.clone().unwrap_or_else(|| "unavailable".into())),
        None => Some("the daemon does not report it".into()),
    };
    rows.push(Row {
        label: BASELINE.into(),
        network: "nat".into(),
        home: homes.baseline.clone(),
        name: None,
    });
    let img = a.image.as_str();
    // Warm-up (outside the measurement): each daemon's warm snapshot.
    for h in [&homes.kiln, &homes.baseline] {
        kiln_out(h, &["run", "--image", img, "--", "true"]).context("warm-up run")?;
    }
    let mut probes = Vec::new();
    for r in &rows {
        let (mode, h) = (&r.label, &r.home);
        let id = kiln_out(h, &["create", "--image", img, "--network", &r.network])?;
        let id = id.trim().to_string();
        let cfg = probe_config(r.name, None, a);
        let out = kiln_out(h, &["exec", &id, "--", "python3", "-c", PROBE, &cfg]);
        let relayed = relayed_bytes(h, &id);
        let _ = kiln_out(h, &["rm", &id]);
        let p: ProbeOut =
            serde_json::from_str(out.with_context(|| format!("probe, {mode}"))?.trim())
                .with_context(|| format!("probe output, {mode}"))?;
        // The baseline's frames never reach kiln: a relay that counted them would mean the
        // baseline daemon was not one.
        let relayed = relayed?;
        if (mode == BASELINE) != (relayed == 0) {
            bail!(
                "{mode}: kiln counted {relayed} bytes out of the guest; the baseline must count none and kiln's modes some"
            );
        }
        if !a.json {
            eprintln!(
                "{mode}: {:.1} MiB/s, connect p50 {:.2} ms",
                median(&p.mib_s),
                median(&p.connect_ms)
            );
        }
        probes.push(p);
    }
    // Starts: interleaved, so drift hits every kind alike.
    let base = |extra: &[&str], cmd: &[&str]| -> Vec<String> {
        let mut v = vec!["run", "--image", img];
        v.extend_from_slice(extra);
        v.push("--");
        v.extend_from_slice(cmd);
        v.into_iter().map(String::from).collect()
    };
    let connect_once = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30).close()";
    let (mut t_true, mut t_py) = (Vec::new(), Vec::new());
    let mut t_modes: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    let port = CONNECT_PORT.to_string();
    for n in 0..a.runs {
        t_true.push(timed_run(&homes.kiln, base(&[], &["true"])).await?);
        t_py.push(timed_run(&homes.kiln, base(&[], &["python3", "-c", "pass"])).await?);
        for (i, r) in rows.iter().enumerate() {
            let target = r.name.map_or(HOST_IP.to_string(), str::to_string);
            let args = base(
                &["--network", &r.network],
                &["python3", "-c", connect_once, &target, &port],
            );
            t_modes[i].push(timed_run(&r.home, args).await?);
        }
        if !a.json {
            eprintln!("starts {}/{}", n + 1, a.runs);
        }
    }
    let run_python = summary(&mut t_py);
    let nat_tput = median(&probes[0].mib_s);
    let baseline = probes
        .last()
        .map(|p| (median(&p.mib_s), median(&p.connect_ms)));
    let out_modes = rows
        .iter()
        .zip(probes)
        .zip(t_modes)
        .map(|((r, mut p), mut t)| {
            let run_connect = summary(&mut t);
            let tcp = summary(&mut p.mib_s);
            let connect = summary(&mut p.connect_ms);
            VmMode {
                mode: r.label.clone(),
                tcp_vs_baseline: baseline.map(|(b, _)| tcp.p50 / b),
                connect_vs_baseline: baseline.map(|(_, b)| connect.p50 / b),
                connect_ms: connect,
                first_answer_ms: summary(&mut p.answer_ms),
                dns_ms: (!p.dns_ms.is_empty()).then(|| summary(&mut p.dns_ms)),
                tcp_vs_nat: tcp.p50 / nat_tput,
                tcp_mib_s: tcp,
                network_share_ms: run_connect.p50 - run_python.p50,
                failed_connections: p.errors,
                last_failure: p.error.clone(),
                run_connect_ms: run_connect,
            }
        })
        .collect();
    Ok(VmBench {
        accel,
        image: a.image.clone(),
        daemon_home: format!(
            "{} (started for the bench, KILN_NET_DNS={dns}; the baseline's: {})",
            homes.kiln.root().display(),
            homes.baseline.root().display()
        ),
        run_true_ms: summary(&mut t_true),
        run_python_ms: run_python,
        modes: out_modes,
        bridge_skipped,
    })
}

/// Bytes kiln counted out of sandbox `id`'s guest (`kiln inspect`: `network.stats.bytes_out`).
fn relayed_bytes(home: &ClientHome, id: &str) -> anyhow::Result<u64> {
    let out = kiln_out(home, &["inspect", id])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("kiln inspect output")?;
    v[0]["network"]["stats"]["bytes_out"]
        .as_u64()
        .with_context(|| format!("kiln inspect {id}: no network.stats.bytes_out"))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    summary(&mut v).p50
}

// ---------------------------------------------------------------- relay part

const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

type Tap = Arc<tokio::io::unix::AsyncFd<File>>;

/// Copies frames between the tap and a stream in QEMU's framing (u32 BE length + frame)
/// until the stream closes or the tasks are aborted. Shaped like the relay's I/O (a frame
/// queue in front of the socket's writer, buffered reads), so that both configurations
/// differ only by the relay.
fn pump(tap: Tap, stream: tokio::net::UnixStream) -> [tokio::task::JoinHandle<()>; 4] {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(512);
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if wr.write_all(&f).await.is_err() {
                return;
            }
        }
    });
    let tap_r = tap.clone();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536 + 14];
        loop {
            let Ok(mut guard) = tap_r.readable().await else {
                return;
            };
            match guard.try_io(|f| f.get_ref().read(&mut buf)) {
                Ok(Ok(n)) => {
                    let mut f = Vec::with_capacity(4 + n);
                    f.extend_from_slice(&(n as u32).to_be_bytes());
                    f.extend_from_slice(&buf[..n]);
                    // A full queue drops the frame, like a full NIC ring (as the relay does).
                    if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) = tx.try_send(f) {
                        return;
                    }
                }
                Ok(Err(_)) => return,
                Err(_) => continue,
            }
        }
    });
    // The other way: reading never waits for the tap (as in the relay), a task writes it.
    let (ttx, mut trx) = tokio::sync::mpsc::channel::<Vec<u8>>(512);
    let down = tokio::spawn(async move {
        let mut rd = tokio::io::BufReader::with_capacity(1 << 20, rd);
        loop {
            let mut len = [0u8; 4];
            if rd.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
            if frame.len() > 65536 + 14 || rd.read_exact(&mut frame).await.is_err() {
                return;
            }
            if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) = ttx.try_send(frame) {
                return;
            }
        }
    });
    let tap_writer = tokio::spawn(async move {
        while let Some(frame) = trx.recv().await {
            loop {
                let Ok(mut guard) = tap.writable().await else {
                    return;
                };
                match guard.try_io(|f| f.get_ref().write(&frame)) {
                    Ok(_) => break,
                    Err(_) => continue,
                }
            }
        }
    });
    [writer, up, down, tap_writer]
}

async fn guest_probe(ns: &str, cfg: String) -> anyhow::Result<ProbeOut> {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", PROBE, &cfg])
        .stdin(Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "probe in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

async fn relay_bench(
    ns: String,
    dns: SocketAddr,
    mib: u64,
    runs: usize,
    name_cfg: String,
) -> anyhow::Result<RelayBench> {
    let mtu = kiln_net::passt::DEFAULT_MTU;
    let mac = kiln_net::Mac::random();
    let tap_name = format!("kbt{}", std::process::id());
    let tap = kiln_net::tap::open_tap(&tap_name)?;
    sh(&["ip", "netns", "add", &ns])?;
    sh(&["ip", "link", "set", &tap_name, "netns", &ns])?;
    let (mac_s, mtu_s) = (mac.to_string(), mtu.to_string());
    for cmd in [
        vec!["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
        // Each connection starts afresh: no cwnd/ssthresh carried over from earlier runs to
        // the same destination (the configurations are interleaved).
        vec!["sysctl", "-qw", "net.ipv4.tcp_no_metrics_save=1"],
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "link", "set", &tap_name, "address", &mac_s],
        vec!["ip", "link", "set", &tap_name, "mtu", &mtu_s],
        vec!["ip", "addr", "add", "10.0.2.15/24", "dev", &tap_name],
        vec!["ip", "link", "set", &tap_name, "up"],
        vec!["ip", "route", "add", "default", "via", "10.0.2.2"],
    ] {
        let mut v = vec!["ip", "netns", "exec", ns.as_str()];
        v.extend_from_slice(&cmd);
        sh(&v)?;
    }
    #[allow(deprecated)] // `AsyncFd::new`'s replacement is not in the locked tokio.
    let tap: Tap = Arc::new(tokio::io::unix::AsyncFd::new(tap)?);
    let guest = kiln_net::GuestNet {
        mac,
        address: GUEST_IP,
        prefix_len: 24,
        gateway: GATEWAY,
        mtu,
    };
    let dir = relay_dir();
    std::fs::create_dir_all(&dir)?;
    // Throughput-only config for most modes; the name mode resolves through the relay first.
    let mut cidr_cfg: serde_json::Value = serde_json::from_str(&name_cfg)?;
    cidr_cfg["name"] = serde_json::Value::Null;
    cidr_cfg["dns"] = 0.into();
    cidr_cfg["runs"] = 1.into();
    cidr_cfg["mib"] = mib.into();
    let mut name_v: serde_json::Value = serde_json::from_str(&name_cfg)?;
    name_v["runs"] = 1.into();
    name_v["mib"] = mib.into();
    name_v["dns"] = 1.into();
    let modes = [
        "passt only".to_string(),
        "nat".to_string(),
        format!("allow={HOST_CIDR}"),
        format!("allow={NAME}"),
    ];
    let mut tput: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut conn: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut failed: Vec<(u64, Option<String>)> = vec![(0, None); modes.len()];
    // One warm-up run of each, then `runs` rounds, interleaved.
    for round in 0..=runs {
        for (i, mode) in modes.iter().enumerate() {
            let _ = sh(&["ip", "-n", &ns, "neigh", "flush", "all"]);
            let cfg = if mode.ends_with(NAME) {
                name_v.to_string()
            } else {
                cidr_cfg.to_string()
            };
            let p = if i == 0 {
                let mut p = kiln_net::passt::spawn(Path::new("passt"), &guest)?;
                let pumps = pump(tap.clone(), p.stream);
                let r = guest_probe(&ns, cfg).await;
                pumps.iter().for_each(|t| t.abort());
                let _ = p.child.kill().await;
                r.context("passt only")?
            } else {
                let sock = dir.join(format!("net-{round}-{i}.sock"));
                let listener = tokio::net::UnixListener::bind(&sock)?;
                let relay = kiln_net::relay::Relay::start(kiln_net::relay::RelayConfig {
                    qemu_socket: sock.clone(),
                    guest: guest.clone(),
                    spec: mode.parse().map_err(|e| anyhow::anyhow!("{mode}: {e}"))?,
                    upstream_dns: vec![dns],
                    passt: PathBuf::from("passt"),
                })
                .await?;
                let (qemu_side, _) = listener.accept().await?;
                let pumps = pump(tap.clone(), qemu_side);
                let r = guest_probe(&ns, cfg).await;
                pumps.iter().for_each(|t| t.abort());
                let _ = relay.shutdown().await;
                let _ = std::fs::remove_file(&sock);
                r.with_context(|| format!("relay {mode}"))?
            };
            if p.errors > 0 {
                failed[i].0 += p.errors;
                failed[i].1 = p.error.clone();
            }
            if round > 0 {
                tput[i].extend(p.mib_s);
                conn[i].extend(p.connect_ms);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let base = median(&tput[0]);
    Ok(RelayBench {
        mtu,
        mib,
        modes: modes
            .iter()
            .zip(tput.iter_mut().zip(conn.iter_mut()))
            .zip(failed)
            .map(|((m, (t, c)), (failed_connections, last_failure))| {
                let t = summary(t);
                RelayMode {
                    failed_connections,
                    last_failure,
                    mode: m.clone(),
                    ratio: t.p50 / base,
                    tcp_mib_s: t,
                    connect_ms: summary(c),
                }
            })
            .collect(),
    })
}

// ---------------------------------------------------------------- output

fn print_table(out: &NetworkBench, a: &NetworkBenchArgs) {
    println!(
        "kiln bench network: {} runs; test host {}",
        out.runs, out.test_host
    );
    if let Some(vm) = &out.vm {
        println!(
            "VM (image {}, accel {}; daemon {}), measured in the guest; {} connects/lookups, \
             {} MiB per throughput run:",
            vm.image, vm.accel, vm.daemon_home, a.connects, a.mib
        );
        println!(
            "  {:<26} {:>17} {:>17} {:>17} {:>15} {:>17} {:>9} {:>20}",
            "mode",
            "connect p50/p95",
            "1st answer",
            "DNS p50/p95",
            "TCP MiB/s (x nat)",
            "run->connect p50",
            "net share",
            "x baseline TCP/conn"
        );
        for m in &vm.modes {
            let dns = m
                .dns_ms
                .as_ref()
                .map(|d| format!("{:.2}/{:.2} ms", d.p50, d.p95))
                .unwrap_or_else(|| "-".into());
            let vs = match (m.tcp_vs_baseline, m.connect_vs_baseline) {
                (Some(t), Some(c)) => format!("{t:.2}x / {c:.2}x"),
                _ => "-".into(),
            };
            println!(
                "  {:<26} {:>17} {:>17} {:>17} {:>8.1} ({:.2}x) {:>14.0} ms {:>6.0} ms {:>20}",
                m.mode,
                format!("{:.2}/{:.2} ms", m.connect_ms.p50, m.connect_ms.p95),
                format!(
                    "{:.2}/{:.2} ms",
                    m.first_answer_ms.p50, m.first_answer_ms.p95
                ),
                dns,
                m.tcp_mib_s.p50,
                m.tcp_vs_nat,
                m.run_connect_ms.p50,
                m.network_share_ms,
                vs
            );
            if let Some(e) = &m.last_failure {
                println!(
                    "    {} probe connection(s) failed and were not counted, last: {e}",
                    m.failed_connections
                );
            }
        }
        println!(
            "  kiln run -- true (no network)              p50 {:>7.0} ms  p95 {:>7.0} ms",
            vm.run_true_ms.p50, vm.run_true_ms.p95
        );
        println!(
            "  kiln run -- python3 -c pass (no network)   p50 {:>7.0} ms  p95 {:>7.0} ms",
            vm.run_python_ms.p50, vm.run_python_ms.p95
        );
        if let Some(why) = &vm.bridge_skipped {
            println!("  bridge not measured: {why}");
        }
    }
    if let Some(r) = &out.relay {
        println!(
            "relay, native Linux stack as guest (tap), MTU {}, {} MiB per run, real passt:",
            r.mtu, r.mib
        );
        for m in &r.modes {
            println!(
                "  {:<26} TCP p50 {:>7.1} MiB/s (n={})  {:.2}x passt only   connect p50 {:.3} ms",
                m.mode, m.tcp_mib_s.p50, m.tcp_mib_s.n, m.ratio, m.connect_ms.p50
            );
        }
    }
}
