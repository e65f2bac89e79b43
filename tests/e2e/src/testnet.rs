//! Test hosts for the network end-to-end tests: the machines have no internet, so tests bring
//! their own, in a network namespace they create ([`TestNet::start`], root only).
//!
//! ```text
//!  root namespace                              namespace kiln-tn-N-PID
//!  ktnNh 198.18.N.1/30 ──── veth ──── ktnNn 198.18.N.2/30  (the link)
//!    route 198.19.N.0/24  dev ktnNh         198.19.N.2/24   "public" host: HTTP :80,
//!                                                           TLS :443, sink :9000,
//!                                                           echo :9001, DNS :53
//!    route 169.254.N.0/24 dev ktnNh         169.254.N.2/24  link-local host: HTTP :80
//!    route 10.213.N.0/24  dev ktnNh         10.213.N.2/24   private host: HTTP :80
//!                                           default via 198.18.N.1
//! ```
//!
//! The public host sits outside the veth's own /30 on purpose: kiln's `nat` refuses the
//! host's *connected* subnets, and 198.18.N.0/30 is one while a TestNet lives; 198.19.N.0/24
//! is only routed, as a real public network would be.
//!
//! `N` (1..=250) is unique among live TestNets on the machine: each holds the lock file
//! `/run/kiln-testnet/N` (pid and start time of its process). A start sweeps the leftovers
//! of crashed runs first (lock files, namespaces and links whose process is gone). Drop
//! kills the servers and removes the namespace, the link and the lock file, also when the
//! test panicked.
//!
//! Must not: send anything outside this machine, or touch links, routes or namespaces it
//! did not create.

pub mod probe;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Prefix of every namespace a TestNet creates (`kiln-tn-N-PID`).
pub const NS_PREFIX: &str = "kiln-tn-";
/// Prefix of every link a TestNet creates (`ktnNh` in the root namespace, `ktnNn` inside).
pub const LINK_PREFIX: &str = "ktn";
/// Where the lock files that keep `N` unique live.
pub const LOCK_DIR: &str = "/run/kiln-testnet";
/// The second octet of the private test host's network (10.213.N.0/24).
pub const PRIVATE_OCTET: u8 = 213;

/// HTTP port of every test host.
pub const HTTP_PORT: u16 = 80;
/// TLS port of the public test host.
pub const TLS_PORT: u16 = 443;
/// Byte-counting sink of the public test host (answers `received N` after EOF).
pub const SINK_PORT: u16 = 9000;
/// Echo server of the public test host.
pub const ECHO_PORT: u16 = 9001;
/// DNS port of the public test host.
pub const DNS_PORT: u16 = 53;

/// Names in the test certificate (signed by the run's own CA).
pub const CERT_NAMES: [&str; 3] = ["allowed.test", "*.allowed.test", "other.test"];

const SERVERS_PY: &str = include_str!("testnet/servers.py");
const PYTHON: &str = "/usr/bin/python3";

/// A network namespace with test hosts and their servers; everything is removed on drop.
pub struct TestNet {
    /// Unique number (1..=250) of this TestNet, part of every name and address.
    pub n: u8,
    /// The namespace (`kiln-tn-N-PID`).
    pub ns: String,
    /// The veth end in the root namespace (`ktnNh`).
    pub link: String,
    /// Root namespace's address on the link (198.18.N.1).
    pub root_ip: Ipv4Addr,
    /// The "public" test host (198.19.N.2): HTTP, TLS, sink, echo, DNS.
    pub public_ip: Ipv4Addr,
    /// The link-local test host (169.254.N.2): HTTP.
    pub linklocal_ip: Ipv4Addr,
    /// The private test host (10.213.N.2): HTTP.
    pub private_ip: Ipv4Addr,
    /// This machine's primary address (what `hostaddr.test` resolves to).
    pub host_ip: Ipv4Addr,
    dir: tempfile::TempDir,
    children: Vec<Child>,
    lock: PathBuf,
}

impl TestNet {
    /// Creates the namespace, link, addresses and routes, starts the servers and waits until
    /// each answers. Panics (after cleaning up) if anything fails. Needs root.
    pub fn start() -> TestNet {
        // SAFETY: geteuid has no arguments and cannot fail.
        #[allow(unsafe_code)]
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "TestNet needs root (network namespaces, veth links, routes)"
        );
        sweep_leftovers();
        let (n, lock) = claim_number();
        let pid = std::process::id();
        let dir = tempfile::Builder::new()
            .prefix("kiln-testnet-")
            .tempdir()
            .expect("create the TestNet directory");
        let mut net = TestNet {
            n,
            ns: format!("{NS_PREFIX}{n}-{pid}"),
            link: format!("{LINK_PREFIX}{n}h"),
            root_ip: Ipv4Addr::new(198, 18, n, 1),
            public_ip: Ipv4Addr::new(198, 19, n, 2),
            linklocal_ip: Ipv4Addr::new(169, 254, n, 2),
            private_ip: Ipv4Addr::new(10, PRIVATE_OCTET, n, 2),
            host_ip: primary_address(),
            dir,
            children: Vec::new(),
            lock,
        };
        // From here on, a panic drops `net`, which removes whatever was made.
        net.check_private_range_unused();
        net.make_links();
        net.make_ca();
        net.start_servers();
        net.start_dns();
        net
    }

    /// The directory holding the CA, certificates, scripts and server logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The test CA's certificate (PEM): give it to guests to verify the TLS server.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir().join("ca.pem")
    }

    /// The test CA's certificate as text.
    pub fn ca_pem_text(&self) -> String {
        std::fs::read_to_string(self.ca_pem()).expect("read ca.pem")
    }

    /// The DNS server (dnsmasq on the public host, port 53).
    pub fn dns(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.public_ip, DNS_PORT)
    }

    /// The value of `KILN_NET_DNS` that points a daemon at this TestNet's DNS server.
    pub fn kiln_net_dns(&self) -> String {
        format!("{}:{}", self.public_ip, DNS_PORT)
    }

    /// The name → address table the DNS server answers (anything else under `.test` is
    /// NXDOMAIN; names outside `.test` are REFUSED, as there is no upstream).
    pub fn dns_table(&self) -> Vec<(&'static str, Ipv4Addr)> {
        vec![
            ("allowed.test", self.public_ip),
            ("www.allowed.test", self.public_ip),
            ("other.test", self.public_ip),
            ("private.test", self.private_ip),
            ("linklocal.test", self.linklocal_ip),
            ("loopback.test", Ipv4Addr::LOCALHOST),
            ("hostaddr.test", self.host_ip),
        ]
    }

    /// The IPv4 network of the private test host, as an allow rule (`10.213.N.0/24`).
    pub fn private_cidr(&self) -> String {
        format!("10.{PRIVATE_OCTET}.{}.0/24", self.n)
    }

    /// The IPv4 network of the link-local test host, as an allow rule (`169.254.N.0/24`).
    pub fn linklocal_cidr(&self) -> String {
        format!("169.254.{}.0/24", self.n)
    }

    /// Total bytes the sink has received from all connections so far.
    pub fn sink_total(&self) -> u64 {
        std::fs::read_to_string(self.dir().join("sink_total"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The servers' and dnsmasq's logs so far (for failure messages).
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for name in ["servers.log", "dnsmasq.log"] {
            s += &format!(
                "--- {name}\n{}",
                std::fs::read_to_string(self.dir().join(name)).unwrap_or_default()
            );
        }
        s
    }

    /// A command run inside the namespace.
    pub fn exec(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).args(argv);
        c
    }

    fn check_private_range_unused(&self) {
        // The private test network must not shadow one this machine really uses.
        let out = run(&["ip", "-4", "-o", "addr", "show"]);
        let prefix = format!("10.{PRIVATE_OCTET}.");
        assert!(
            !out.contains(&prefix),
            "10.{PRIVATE_OCTET}.0.0/16 is in use on this machine; TestNet needs it free:\n{out}"
        );
    }

    fn make_links(&mut self) {
        let n = self.n;
        let peer = format!("{LINK_PREFIX}{n}n");
        let ns = self.ns.clone();
        let link = self.link.clone();
        run(&["ip", "netns", "add", &ns]);
        run(&[
            "ip", "link", "add", &link, "type", "veth", "peer", "name", &peer, "netns", &ns,
        ]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("198.18.{n}.1/30"),
            "dev",
            &link,
        ]);
        run(&["ip", "link", "set", &link, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["ip", "-n", ns.as_str()];
            all.extend_from_slice(args);
            run(&all);
        };
        in_ns(&["link", "set", "lo", "up"]);
        for a in [
            format!("198.18.{n}.2/30"),
            format!("198.19.{n}.2/24"),
            format!("169.254.{n}.2/24"),
            format!("10.{PRIVATE_OCTET}.{n}.2/24"),
        ] {
            in_ns(&["addr", "add", &a, "dev", &peer]);
        }
        in_ns(&["link", "set", &peer, "up"]);
        in_ns(&["route", "add", "default", "via", &format!("198.18.{n}.1")]);
        let src = format!("198.18.{n}.1");
        for net in [
            format!("198.19.{n}.0/24"),
            self.linklocal_cidr(),
            self.private_cidr(),
        ] {
            run(&["ip", "route", "add", &net, "dev", &link, "src", &src]);
        }
    }

    fn make_ca(&self) {
        let d = self.dir();
        let ossl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let subject = format!("/CN=kiln test CA {}", self.ns);
        let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
        ca.extend_from_slice(&ec);
        ca.extend_from_slice(&[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        ossl(&ca);
        let mut csr = vec!["req", "-nodes"];
        csr.extend_from_slice(&ec);
        csr.extend_from_slice(&[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=allowed.test",
        ]);
        ossl(&csr);
        let sans: Vec<String> = CERT_NAMES.iter().map(|n| format!("DNS:{n}")).collect();
        std::fs::write(
            d.join("server.ext"),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n\
                 authorityKeyIdentifier=keyid\n",
                sans.join(",")
            ),
        )
        .expect("write server.ext");
        ossl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
    }

    fn start_servers(&mut self) {
        let d = self.dir().to_owned();
        std::fs::write(d.join("servers.py"), SERVERS_PY).expect("write servers.py");
        let (p, ll, pr) = (
            self.public_ip.to_string(),
            self.linklocal_ip.to_string(),
            self.private_ip.to_string(),
        );
        let conf = serde_json::json!({
            "http": [[p, HTTP_PORT, "public"], [ll, HTTP_PORT, "linklocal"], [pr, HTTP_PORT, "private"]],
            "tls": [[p, TLS_PORT, "tls", d.join("server.pem"), d.join("server.key")]],
            "sink": [[p, SINK_PORT]],
            "echo": [[p, ECHO_PORT]],
            "sink_total": d.join("sink_total"),
        });
        let log = std::fs::File::create(d.join("servers.log")).expect("create servers.log");
        let mut child = self
            .exec(&[PYTHON, "-u"])
            .arg(d.join("servers.py"))
            .arg(conf.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start the test servers");
        let stdout = child.stdout.take().expect("piped stdout");
        self.children.push(child);
        // "ready" comes once every socket is bound; a thread reads it so that a server that
        // never says it cannot hang the test.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        assert_eq!(
            line.trim(),
            "ready",
            "test servers did not start\n{}",
            self.logs()
        );
        for (ip, port) in [
            (self.public_ip, HTTP_PORT),
            (self.public_ip, TLS_PORT),
            (self.public_ip, SINK_PORT),
            (self.public_ip, ECHO_PORT),
            (self.linklocal_ip, HTTP_PORT),
            (self.private_ip, HTTP_PORT),
        ] {
            let addr = SocketAddr::from((ip, port));
            poll(&format!("test server {addr} answering"), 10, || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
            });
        }
    }

    fn start_dns(&mut self) {
        let d = self.dir().to_owned();
        let mut args: Vec<String> = [
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--user=root",
            "--pid-file=",
            "--local=/test/",
            "--log-queries",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--listen-address={}", self.public_ip));
        args.push(format!("--port={DNS_PORT}"));
        args.push(format!(
            "--log-facility={}",
            d.join("dnsmasq.log").display()
        ));
        // `--address=/allowed.test/IP` also answers every name below allowed.test.
        for (name, ip) in self.dns_table() {
            if name != "www.allowed.test" {
                args.push(format!("--address=/{name}/{ip}"));
            }
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = self
            .exec(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dnsmasq (apt-get install dnsmasq-base)");
        self.children.push(child);
        let server = SocketAddr::V4(self.dns());
        poll(
            "dnsmasq answering",
            10,
            || matches!(dns_query(server, "allowed.test"), Ok(a) if a.rcode == 0),
        );
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_leftovers(&self.ns, &self.link);
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// Kills whatever runs in namespace `ns`, deletes it and the root-side link `link` (routes go
/// with the link). Missing pieces are fine.
fn remove_leftovers(ns: &str, link: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) takes plain integers and touches no memory of ours.
                #[allow(unsafe_code)]
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
    // Deleting the namespace destroys the peer and so the pair; this is for a half-made one.
    let _ = Command::new("ip")
        .args(["link", "del", link])
        .stderr(Stdio::null())
        .status();
}

/// `pid starttime` of this process: a pid alone may be reused by the time a sweep looks.
fn process_key(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let start = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .to_owned();
    Some(format!("{pid} {start}"))
}

fn key_alive(key: &str) -> bool {
    key.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .and_then(process_key)
        .is_some_and(|now| now == key.trim())
}

/// Removes what crashed runs left: lock files whose process is gone (with their namespace and
/// link), and namespaces `kiln-tn-N-PID` whose PID is dead.
pub fn sweep_leftovers() {
    let _ = std::fs::create_dir_all(LOCK_DIR);
    if let Ok(entries) = std::fs::read_dir(LOCK_DIR) {
        for e in entries.flatten() {
            let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u8>().ok()) else {
                continue;
            };
            let key = std::fs::read_to_string(e.path()).unwrap_or_default();
            if key.is_empty() || key_alive(&key) {
                // Empty: being written right now by a starting TestNet.
                continue;
            }
            let pid = key.split_whitespace().next().unwrap_or_default();
            remove_leftovers(
                &format!("{NS_PREFIX}{n}-{pid}"),
                &format!("{LINK_PREFIX}{n}h"),
            );
            let _ = std::fs::remove_file(e.path());
        }
    }
    for ns in namespaces() {
        let pid = ns
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<i32>().ok());
        if let Some(pid) = pid
            && !crate::process_alive(pid)
        {
            let n = ns
                .strip_prefix(NS_PREFIX)
                .and_then(|r| r.split_once('-'))
                .map(|(n, _)| n.to_owned())
                .unwrap_or_default();
            remove_leftovers(&ns, &format!("{LINK_PREFIX}{n}h"));
        }
    }
}

/// The network namespaces that exist (`ip netns list`), by name.
pub fn namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Names of the links in the root namespace (`ip -br link`, without `@peer`).
pub fn links() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-br", "link"])
        .output()
        .expect("run ip -br link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

/// Takes the first free `N`, starting from one derived from the pid, by creating its lock
/// file exclusively.
fn claim_number() -> (u8, PathBuf) {
    let key = process_key(std::process::id()).expect("read /proc/self/stat");
    let start = std::process::id() % 250;
    for i in 0..250 {
        let n = ((start + i) % 250 + 1) as u8;
        let path = Path::new(LOCK_DIR).join(n.to_string());
        let taken = links().contains(&format!("{LINK_PREFIX}{n}h"));
        if taken {
            continue;
        }
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            f.write_all(key.as_bytes())
                .expect("write the TestNet lock file");
            return (n, path);
        }
    }
    panic!("no free TestNet number in {LOCK_DIR} (250 in use?)");
}

/// This machine's primary IPv4 address: the source of its default route (a route lookup;
/// nothing is sent).
pub fn primary_address() -> Ipv4Addr {
    let out = run(&["ip", "-4", "-o", "route", "get", "192.0.0.9"]);
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "src")
        .and_then(|i| words.get(i + 1))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no primary address in {out:?}"))
}

fn run(argv: &[&str]) -> String {
    let out: Output = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn poll(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A DNS answer: the response code (0 NOERROR, 3 NXDOMAIN, 5 REFUSED) and the A records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    /// RCODE of the header.
    pub rcode: u8,
    /// Addresses of the A records in the answer section.
    pub addrs: Vec<Ipv4Addr>,
}

/// One `A` question for `name` to `server` over UDP (1 s per try, 3 tries).
pub fn dns_query(server: SocketAddr, name: &str) -> std::io::Result<DnsAnswer> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let id: u16 = (std::process::id() as u16) ^ 0x4b4e;
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut buf = [0u8; 1500];
    let mut last = std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer");
    for _ in 0..3 {
        sock.send_to(&q, server)?;
        match sock.recv_from(&mut buf) {
            Ok((len, _)) if len >= 12 && buf[..2] == id.to_be_bytes() => {
                return parse_dns(&buf[..len]).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed answer")
                });
            }
            Ok(_) => continue,
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn parse_dns(m: &[u8]) -> Option<DnsAnswer> {
    let rcode = m[3] & 0x0f;
    let qd = u16::from_be_bytes([m[4], m[5]]);
    let an = u16::from_be_bytes([m[6], m[7]]);
    let mut i = 12;
    let skip_name = |mut i: usize| -> Option<usize> {
        loop {
            let l = *m.get(i)? as usize;
            if l == 0 {
                return Some(i + 1);
            }
            if l & 0xc0 == 0xc0 {
                return Some(i + 2);
            }
            i += 1 + l;
        }
    };
    for _ in 0..qd {
        i = skip_name(i)? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..an {
        i = skip_name(i)?;
        let ty = u16::from_be_bytes([*m.get(i)?, *m.get(i + 1)?]);
        let len = u16::from_be_bytes([*m.get(i + 8)?, *m.get(i + 9)?]) as usize;
        let data = m.get(i + 10..i + 10 + len)?;
        if ty == 1 && len == 4 {
            addrs.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + len;
    }
    Some(DnsAnswer { rcode, addrs })
}

/// A TCP listener on a host address that answers every connection with a banner and counts
/// them: the host services a sandbox must not reach.
pub struct HostListener {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl HostListener {
    /// Listens on `ip`, any free port; serves until the process ends.
    pub fn start(ip: Ipv4Addr) -> HostListener {
        let l = TcpListener::bind((ip, 0)).expect("bind a host listener");
        let addr = l.local_addr().expect("listener address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::Builder::new()
            .name(format!("host-listener-{addr}"))
            .spawn(move || {
                for mut s in l.incoming().flatten() {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = s.write_all(b"kiln-host-listener\n");
                }
            })
            .expect("spawn the listener thread");
        HostListener { addr, accepted }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// `GET /` with `Host: host` to `ip:port` over plain HTTP from this process; the body.
pub fn http_get_from_root(ip: Ipv4Addr, port: u16, host: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// An exclusive lock on `/run/kiln-testnet/NAME.lock` held until dropped: for tests that
/// must not overlap with each other on one machine (bridge mode shares one bridge and one
/// nftables table across daemons).
pub struct MachineLock(#[allow(dead_code)] std::fs::File);

/// Takes the machine-wide lock `name`, waiting for it.
pub fn machine_lock(name: &str) -> MachineLock {
    let _ = std::fs::create_dir_all(LOCK_DIR);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(Path::new(LOCK_DIR).join(format!("{name}.lock")))
        .expect("open the machine lock");
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor we own; no memory is shared.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    MachineLock(f)
}
