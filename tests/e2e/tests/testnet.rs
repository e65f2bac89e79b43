//! Self-tests of the network test hosts (`kiln_e2e::testnet`), from the root namespace: no
//! VM, no kiln. Root only (namespaces, veth links, routes).

use std::net::SocketAddr;
use std::process::Command;

use kiln_e2e::testnet::{
    self, CERT_NAMES, DnsAnswer, ECHO_PORT, HTTP_PORT, SINK_PORT, TLS_PORT, TestNet, dns_query,
    http_get_from_root,
};

fn status_ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// HTTPS GET with the host's Python, verified against `ca` with SNI `sni`, to `ip`.
fn python_https(net: &TestNet, sni: &str, host: &str) -> std::process::Output {
    let script = r#"
import socket, ssl, sys
ip, sni, host, ca = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection((ip, 443), timeout=10), server_hostname=sni)
s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
print(data.decode())
"#;
    Command::new("/usr/bin/python3")
        .args(["-c", script, &net.public_ip.to_string(), sni, host])
        .arg(net.ca_pem())
        .output()
        .expect("run python3")
}

#[test]
#[ignore = "needs root: run by scripts/test"]
fn testnet_servers_and_dns_answer_from_the_root_namespace() {
    let t = std::time::Instant::now();
    let net = TestNet::start();
    eprintln!("TestNet {} up in {:?}", net.ns, t.elapsed());

    // HTTP on each test host names the server and echoes the Host header.
    for (ip, label) in [
        (net.public_ip, "public"),
        (net.linklocal_ip, "linklocal"),
        (net.private_ip, "private"),
    ] {
        let text = http_get_from_root(ip, HTTP_PORT, "allowed.test").expect("HTTP GET");
        assert!(text.starts_with("HTTP/1.0 200"), "{text}");
        assert!(
            text.contains(&format!("server={label} host=allowed.test")),
            "{text}"
        );
    }

    // TLS, verified with the run's CA, for every name in the certificate.
    for name in ["allowed.test", "www.allowed.test", "other.test"] {
        let out = python_https(&net, name, name);
        let text = status_ok(&out, &format!("python https {name}"));
        assert!(text.contains(&format!("server=tls host={name}")), "{text}");
    }
    // A name outside the certificate fails verification.
    let out = python_https(&net, "unlisted.test", "unlisted.test");
    assert!(
        !out.status.success(),
        "SNI outside the certificate verified"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CERTIFICATE_VERIFY_FAILED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(CERT_NAMES.len(), 3);
    if Command::new("curl").arg("--version").output().is_ok() {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(net.ca_pem())
            .arg("--resolve")
            .arg(format!("www.allowed.test:{TLS_PORT}:{}", net.public_ip))
            .arg("https://www.allowed.test/")
            .output()
            .expect("run curl");
        let text = status_ok(&out, "curl https");
        assert!(text.contains("server=tls host=www.allowed.test"), "{text}");
    }

    // Sink counts, echo echoes.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((net.public_ip, SINK_PORT)).expect("sink");
        s.write_all(&vec![7u8; 300_000]).expect("send");
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("reply");
        assert_eq!(reply, "received 300000\n");
        assert_eq!(net.sink_total(), 300_000);
        let mut s = std::net::TcpStream::connect((net.public_ip, ECHO_PORT)).expect("echo");
        s.write_all(b"kiln echo").expect("send");
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("reply");
        assert_eq!(reply, "kiln echo");
    }

    // DNS: every name of the table, NXDOMAIN for other names under .test.
    let server = SocketAddr::V4(net.dns());
    for (name, ip) in net.dns_table() {
        assert_eq!(
            dns_query(server, name).expect("dns answer"),
            DnsAnswer {
                rcode: 0,
                addrs: vec![ip]
            },
            "{name}\n{}",
            net.logs()
        );
    }
    assert_eq!(
        dns_query(server, "nothing.test").expect("dns answer").rcode,
        3,
        "NXDOMAIN expected"
    );
    assert_eq!(net.host_ip, testnet::primary_address());
    assert!(net.ca_pem_text().contains("BEGIN CERTIFICATE"));
    eprintln!("self-test done in {:?}", t.elapsed());
}

#[test]
#[ignore = "needs root: run by scripts/test"]
fn testnet_drop_removes_namespace_link_routes_and_lock_also_on_panic() {
    let gone = |ns: &str, link: &str, n: u8| {
        assert!(!testnet::namespaces().contains(&ns.to_owned()), "{ns} left");
        assert!(!testnet::links().contains(&link.to_owned()), "{link} left");
        let routes = Command::new("ip")
            .args(["-4", "route"])
            .output()
            .expect("ip route");
        let routes = String::from_utf8_lossy(&routes.stdout);
        assert!(
            !routes.contains(&format!("198.19.{n}.0/24")),
            "route left: {routes}"
        );
        assert!(
            !std::path::Path::new(testnet::LOCK_DIR)
                .join(n.to_string())
                .exists(),
            "lock file {n} left"
        );
    };

    // Two at once get distinct numbers; dropping them removes everything.
    let a = TestNet::start();
    let b = TestNet::start();
    assert_ne!(a.n, b.n);
    assert!(testnet::namespaces().contains(&a.ns));
    assert!(testnet::links().contains(&b.link));
    let server_pids = |ns: &str| {
        let out = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .collect::<Vec<_>>()
    };
    let pids = server_pids(&a.ns);
    assert!(pids.len() >= 2, "servers and dnsmasq run in {}", a.ns);
    let (ans, alink, an) = (a.ns.clone(), a.link.clone(), a.n);
    let (bns, blink, bn) = (b.ns.clone(), b.link.clone(), b.n);
    drop(a);
    drop(b);
    gone(&ans, &alink, an);
    gone(&bns, &blink, bn);
    for pid in pids {
        assert!(!kiln_e2e::process_alive(pid), "server {pid} still running");
    }

    // A panic while one is alive: unwinding drops it.
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::thread::spawn(move || {
        let net = TestNet::start();
        tx.send((net.ns.clone(), net.link.clone(), net.n))
            .expect("send");
        panic!("a test failing with a TestNet alive");
    })
    .join();
    assert!(r.is_err());
    let (ns, link, n) = rx.recv().expect("names");
    gone(&ns, &link, n);

    // Leftovers of a crashed run (a dead pid's lock file, namespace and link) are swept.
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead = child.id();
    child.wait().expect("wait");
    let n = 251u8;
    let ns = format!("{}{n}-{dead}", testnet::NS_PREFIX);
    let link = format!("{}{n}h", testnet::LINK_PREFIX);
    std::fs::create_dir_all(testnet::LOCK_DIR).expect("lock dir");
    std::fs::write(
        std::path::Path::new(testnet::LOCK_DIR).join(n.to_string()),
        format!("{dead} 1"),
    )
    .expect("lock file");
    for args in [
        vec!["netns", "add", ns.as_str()],
        vec![
            "link", "add", &link, "type", "veth", "peer", "name", "ktn251n", "netns", &ns,
        ],
    ] {
        let out = Command::new("ip").args(&args).output().expect("ip");
        status_ok(&out, &format!("ip {args:?}"));
    }
    testnet::sweep_leftovers();
    gone(&ns, &link, n);
}
