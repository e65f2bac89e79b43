//! The DNS server of bridge guests: UDP on the gateway's port 53 (the only host port the
//! rules open to guests).
//!
//! It answers `A` questions for the names of sandboxes in the querier's network group (the
//! engine says which, through [`GroupNames`]; the querier is known by its source address,
//! which the bridge's anti-spoofing rules guarantee), and forwards every other question to
//! upstream resolvers (default: the host's `/etc/resolv.conf`), each with a timeout, relaying
//! the first answer whose id matches. A single-label name that is not a group peer is answered
//! NXDOMAIN here and never forwarded, so a guest cannot learn other groups' names or leak
//! lookups for them upstream.
//!
//! TCP (RFC 7766 framing: a two-byte length before each message) is served too, for guests
//! retrying a truncated answer: [`serve_tcp`] relays to the upstreams over TCP, one question
//! per connection, each step under the timeout.
//!
//! Bounds: questions longer than [`MAX_QUERY`] bytes are dropped, answers from upstream longer
//! than [`MAX_ANSWER`] bytes become SERVFAIL, at most [`DnsConfig::max_inflight`] forwarded
//! questions at once (more are dropped: the guest's resolver retries). Wire format: RFC 1035,
//! parsed and built with `hickory-proto`. Must not: answer for names outside the querier's
//! group, or listen anywhere but the address it is given.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Longest question accepted from a guest.
pub const MAX_QUERY: usize = 1232;
/// Longest answer relayed from upstream.
pub const MAX_ANSWER: usize = 4096;
/// TTL of answers for group names (short: a restored sandbox gets a new address).
pub const GROUP_TTL: u32 = 5;

/// The engine's view of groups: the address of sandbox `name` if it shares a network group
/// with the sandbox at address `querier`.
pub trait GroupNames: Send + Sync {
    /// `name` is lowercase without a trailing dot.
    fn lookup(&self, querier: Ipv4Addr, name: &str) -> Option<Ipv4Addr>;
}

/// How the server forwards.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Upstream resolvers, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// How long to wait for each upstream.
    pub timeout: Duration,
    /// Most forwarded questions in flight.
    pub max_inflight: usize,
}

impl Default for DnsConfig {
    /// The host's resolvers from `/etc/resolv.conf`, 2 s each, 256 in flight.
    fn default() -> Self {
        let upstreams = std::fs::read_to_string("/etc/resolv.conf")
            .map(|t| resolv_conf_nameservers(&t))
            .unwrap_or_default();
        DnsConfig {
            upstreams,
            timeout: Duration::from_secs(2),
            max_inflight: 256,
        }
    }
}

/// The IPv4 `nameserver` lines of a resolv.conf, as `ip:53`.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
        })
        .map(|ip| SocketAddr::new(IpAddr::V4(ip), 53))
        .collect()
}

/// What to do with one guest datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this answer back.
    Reply(Vec<u8>),
    /// Forward the question upstream unchanged.
    Forward,
    /// Ignore it (not a DNS question, too long).
    Drop,
}

fn reply(query: &Message, code: ResponseCode, answer: Option<Record>) -> Action {
    let mut m = Message::response(query.metadata.id, query.metadata.op_code);
    m.metadata.response_code = code;
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(query.queries.iter().cloned());
    if let Some(a) = answer {
        m.metadata.authoritative = true;
        m.add_answer(a);
    }
    m.to_vec().map_or(Action::Drop, Action::Reply)
}

/// Decides about one datagram from guest `querier`: answers group names (and refuses
/// unknown single-label names) locally, forwards the rest.
pub fn handle_query(packet: &[u8], querier: Ipv4Addr, names: &dyn GroupNames) -> Action {
    if packet.len() > MAX_QUERY {
        return Action::Drop;
    }
    let Ok(msg) = Message::from_vec(packet) else {
        return Action::Drop;
    };
    if msg.metadata.message_type != MessageType::Query {
        return Action::Drop;
    }
    if msg.metadata.op_code != OpCode::Query {
        return reply(&msg, ResponseCode::NotImp, None);
    }
    let [q] = msg.queries.as_slice() else {
        return reply(&msg, ResponseCode::FormErr, None);
    };
    let name = q.name().to_lowercase().to_ascii();
    let name = name.strip_suffix('.').unwrap_or(&name);
    match names.lookup(querier, name) {
        Some(ip) if q.query_type() == RecordType::A => {
            let rec = Record::from_rdata(q.name().clone(), GROUP_TTL, RData::A(A(ip)));
            reply(&msg, ResponseCode::NoError, Some(rec))
        }
        // The name exists, without records of this type (AAAA: guests are IPv4 only).
        Some(_) => reply(&msg, ResponseCode::NoError, None),
        None if !name.contains('.') => reply(&msg, ResponseCode::NXDomain, None),
        None => Action::Forward,
    }
}

/// A SERVFAIL answer to `query` (when no upstream answered).
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let msg = Message::from_vec(query).ok()?;
    match reply(&msg, ResponseCode::ServFail, None) {
        Action::Reply(b) => Some(b),
        _ => None,
    }
}

/// Asks the upstreams in turn; the first answer with the question's id wins.
async fn forward(query: &[u8], cfg: &DnsConfig) -> Option<Vec<u8>> {
    let id = query.get(..2)?;
    for upstream in &cfg.upstreams {
        let bind: SocketAddr = match upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.connect(upstream).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; MAX_ANSWER + 1];
        let deadline = tokio::time::Instant::now() + cfg.timeout;
        // Skip stray datagrams with another id until the deadline.
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            if n > MAX_ANSWER {
                return servfail(query);
            }
            if n >= 12 && &buf[..2] == id && buf[2] & 0x80 != 0 {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    servfail(query)
}

/// Largest answer relayed over TCP (the framing's limit).
const MAX_TCP_ANSWER: usize = u16::MAX as usize;

async fn read_framed<S: AsyncReadExt + Unpin>(s: &mut S, max: usize) -> io::Result<Vec<u8>> {
    let len = usize::from(s.read_u16().await?);
    if len > max || len < 12 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("dns message of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_framed<S: AsyncWriteExt + Unpin>(s: &mut S, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "dns message too long"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    s.write_all(&framed).await
}

/// Asks the upstreams in turn over TCP.
async fn forward_tcp(query: &[u8], cfg: &DnsConfig) -> Option<Vec<u8>> {
    for upstream in &cfg.upstreams {
        let attempt = async {
            let mut s = TcpStream::connect(upstream).await?;
            write_framed(&mut s, query).await?;
            read_framed(&mut s, MAX_TCP_ANSWER).await
        };
        if let Ok(Ok(answer)) = tokio::time::timeout(cfg.timeout, attempt).await
            && answer.get(..2) == query.get(..2)
        {
            return Some(answer);
        }
    }
    servfail(query)
}

/// One guest's TCP connection: one question, one answer.
async fn tcp_client(mut s: TcpStream, querier: Ipv4Addr, cfg: &DnsConfig, names: &dyn GroupNames) {
    let Ok(Ok(query)) = tokio::time::timeout(cfg.timeout, read_framed(&mut s, MAX_QUERY)).await
    else {
        return;
    };
    let answer = match handle_query(&query, querier, names) {
        Action::Drop => return,
        Action::Reply(a) => Some(a),
        Action::Forward => forward_tcp(&query, cfg).await,
    };
    if let Some(a) = answer {
        let _ = tokio::time::timeout(cfg.timeout, write_framed(&mut s, &a)).await;
    }
}

/// Serves guests over TCP on `listener` until it fails (run it as a task; abort to stop).
/// Connections count against [`DnsConfig::max_inflight`] too.
pub async fn serve_tcp(
    listener: TcpListener,
    cfg: DnsConfig,
    names: Arc<dyn GroupNames>,
) -> io::Result<()> {
    let cfg = Arc::new(cfg);
    let inflight = Arc::new(Semaphore::new(cfg.max_inflight.max(1)));
    loop {
        let (stream, from) = listener.accept().await?;
        let SocketAddr::V4(from4) = from else {
            continue;
        };
        let Ok(permit) = inflight.clone().try_acquire_owned() else {
            tracing::debug!(%from, "dns: too many connections, closed");
            continue;
        };
        let (cfg, names) = (cfg.clone(), names.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tcp_client(stream, *from4.ip(), &cfg, names.as_ref()).await;
        });
    }
}

/// Binds the TCP listener: `gateway:53`.
pub async fn bind_tcp(gateway: Ipv4Addr) -> io::Result<TcpListener> {
    TcpListener::bind((gateway, 53)).await
}

/// Binds the server's socket: UDP `gateway:53` (the bridge must carry the address).
pub async fn bind(gateway: Ipv4Addr) -> io::Result<UdpSocket> {
    UdpSocket::bind((gateway, 53)).await
}

/// Serves guests on `socket` until it fails (run it as a task; abort the task to stop).
pub async fn serve(
    socket: UdpSocket,
    cfg: DnsConfig,
    names: Arc<dyn GroupNames>,
) -> io::Result<()> {
    let socket = Arc::new(socket);
    let cfg = Arc::new(cfg);
    let inflight = Arc::new(Semaphore::new(cfg.max_inflight.max(1)));
    let mut buf = vec![0u8; MAX_QUERY + 1];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let SocketAddr::V4(from4) = from else {
            continue;
        };
        let packet = &buf[..n];
        match handle_query(packet, *from4.ip(), names.as_ref()) {
            Action::Drop => {}
            Action::Reply(answer) => {
                let _ = socket.send_to(&answer, from).await;
            }
            Action::Forward => {
                let Ok(permit) = inflight.clone().try_acquire_owned() else {
                    tracing::debug!(%from, "dns: too many questions in flight, dropped");
                    continue;
                };
                let query = packet.to_vec();
                let (socket, cfg) = (socket.clone(), cfg.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(answer) = forward(&query, &cfg).await {
                        let _ = socket.send_to(&answer, from).await;
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::str::FromStr;

    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use super::*;

    /// Sandboxes by address: (name, group).
    struct FakeGroups(HashMap<Ipv4Addr, (&'static str, &'static str)>);

    impl GroupNames for FakeGroups {
        fn lookup(&self, querier: Ipv4Addr, name: &str) -> Option<Ipv4Addr> {
            let (_, group) = self.0.get(&querier)?;
            self.0
                .iter()
                .find(|(_, (n, g))| *n == name && g == group)
                .map(|(ip, _)| *ip)
        }
    }

    fn groups() -> FakeGroups {
        FakeGroups(HashMap::from([
            (Ipv4Addr::new(10, 214, 0, 2), ("db", "g1")),
            (Ipv4Addr::new(10, 214, 0, 3), ("app", "g1")),
            (Ipv4Addr::new(10, 214, 0, 4), ("other", "g2")),
            (Ipv4Addr::LOCALHOST, ("tester", "g1")),
        ]))
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn answer_of(a: Action) -> Message {
        match a {
            Action::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn handle_query_same_group_name_is_answered() {
        let m = answer_of(handle_query(
            &query("DB.", RecordType::A),
            Ipv4Addr::new(10, 214, 0, 3),
            &groups(),
        ));
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(10, 214, 0, 2)]);
        assert_eq!(m.queries.len(), 1);
    }

    #[test]
    fn handle_query_other_group_name_is_nxdomain_not_forwarded() {
        let m = answer_of(handle_query(
            &query("db", RecordType::A),
            Ipv4Addr::new(10, 214, 0, 4),
            &groups(),
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.answers.is_empty());
        // An address kiln does not know (no sandbox) gets nothing either.
        let m = answer_of(handle_query(
            &query("db", RecordType::A),
            Ipv4Addr::new(10, 214, 0, 99),
            &groups(),
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn handle_query_dotted_names_forward_and_garbage_drops() {
        let g = groups();
        let q = Ipv4Addr::new(10, 214, 0, 3);
        assert_eq!(
            handle_query(&query("example.org.", RecordType::A), q, &g),
            Action::Forward
        );
        let m = answer_of(handle_query(&query("db", RecordType::AAAA), q, &g));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert_eq!(handle_query(b"\x00\x01garbage", q, &g), Action::Drop);
        assert_eq!(handle_query(&vec![0u8; MAX_QUERY + 1], q, &g), Action::Drop);
        // An answer sent to the server is not a question.
        let mut resp = Message::from_vec(&query("db", RecordType::A)).unwrap();
        resp.metadata.message_type = MessageType::Response;
        assert_eq!(handle_query(&resp.to_vec().unwrap(), q, &g), Action::Drop);
    }

    #[test]
    fn resolv_conf_nameservers_reads_ipv4_lines() {
        let t = "# c\nnameserver 192.0.2.53\nnameserver ::1\nsearch x\nnameserver  10.0.0.1 \n";
        assert_eq!(
            resolv_conf_nameservers(t),
            vec![
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:53".parse().unwrap()
            ]
        );
    }

    async fn ask(server: SocketAddr, q: &[u8]) -> Message {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(q, server).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), c.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        Message::from_vec(&buf[..n]).unwrap()
    }

    #[tokio::test]
    async fn serve_tcp_answers_groups_and_forwards_over_tcp() {
        // A fake TCP upstream answering with 192.0.2.81.
        let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = up.accept().await {
                let q = Message::from_vec(&read_framed(&mut s, 4096).await.unwrap()).unwrap();
                let mut m = Message::response(q.metadata.id, OpCode::Query);
                m.add_queries(q.queries.iter().cloned());
                m.add_answer(Record::from_rdata(
                    q.queries[0].name().clone(),
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 81))),
                ));
                write_framed(&mut s, &m.to_vec().unwrap()).await.unwrap();
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = DnsConfig {
            upstreams: vec![up_addr],
            timeout: Duration::from_secs(5),
            max_inflight: 4,
        };
        let server = tokio::spawn(serve_tcp(listener, cfg, Arc::new(groups())));
        let ask_tcp = |q: Vec<u8>| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            write_framed(&mut s, &q).await.unwrap();
            Message::from_vec(&read_framed(&mut s, 65535).await.unwrap()).unwrap()
        };
        let m = ask_tcp(query("db", RecordType::A)).await;
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(10, 214, 0, 2)]);
        let m = ask_tcp(query("other", RecordType::A)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = ask_tcp(query("example.org", RecordType::A)).await;
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(192, 0, 2, 81)]);
        // A length below a DNS header closes the connection without an answer.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
        let mut rest = Vec::new();
        // (Closed with the bytes unread: a reset is as good as an end.)
        match s.read_to_end(&mut rest).await {
            Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        }
        server.abort();
    }

    #[tokio::test]
    async fn serve_answers_groups_forwards_the_rest_and_servfails_silence() {
        // A fake upstream answering every question with 192.0.2.80.
        let up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = up.recv_from(&mut buf).await {
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut m = Message::response(q.metadata.id, OpCode::Query);
                m.add_queries(q.queries.iter().cloned());
                m.add_answer(Record::from_rdata(
                    q.queries[0].name().clone(),
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 80))),
                ));
                up.send_to(&m.to_vec().unwrap(), from).await.unwrap();
            }
        });
        // A silent upstream (bound, never answers).
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();

        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let cfg = DnsConfig {
            upstreams: vec![silent.local_addr().unwrap(), up_addr],
            timeout: Duration::from_millis(300),
            max_inflight: 4,
        };
        let server = tokio::spawn(serve(sock, cfg, Arc::new(groups())));

        let m = ask(addr, &query("app", RecordType::A)).await;
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(10, 214, 0, 3)]);
        let m = ask(addr, &query("other", RecordType::A)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // Forwarded past the silent upstream to the answering one.
        let m = ask(addr, &query("example.org", RecordType::A)).await;
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(192, 0, 2, 80)]);
        assert_eq!(m.metadata.id, 0x4242);
        server.abort();

        // Only a silent upstream: SERVFAIL after its timeout.
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let cfg = DnsConfig {
            upstreams: vec![silent.local_addr().unwrap()],
            timeout: Duration::from_millis(100),
            max_inflight: 4,
        };
        let server = tokio::spawn(serve(sock, cfg, Arc::new(groups())));
        let m = ask(addr, &query("example.org", RecordType::A)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        server.abort();
    }
}
