//! kiln's DNS for user-mode guests: the guest's resolver is its gateway, and the filter hands
//! every UDP query to the gateway's port 53 to this module instead of forwarding it.
//!
//! Owns: screening a query ([`screen`]: size and shape checks, A only, names the policy
//! allows), resolving allowed names on the host against upstream servers ([`Resolver`]: UDP,
//! timeout, one retry, a small TTL-honoring cache), and building replies. Must not: decide
//! which answers are admissible (the filter drops answers in closed address classes) or send
//! anything towards the guest (the relay does).
//!
//! Parsing and building use `hickory-proto`; a query over 512 bytes or with other than one
//! question gets FORMERR; AAAA and other types for allowed names get an empty NOERROR; a
//! forbidden name gets NXDOMAIN at once.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// Largest query accepted from a guest (plain DNS over UDP without EDNS).
pub const MAX_QUERY_BYTES: usize = 512;
/// How long one upstream attempt may take.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Most names the resolver's cache keeps.
const MAX_CACHE: usize = 1024;
/// Most answer addresses kept per name.
const MAX_ADDRS: usize = 16;

/// Errors resolving on the host.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// No upstream server is configured.
    #[error("no upstream DNS server configured")]
    NoUpstream,
    /// Every attempt timed out or failed.
    #[error("upstream DNS servers did not answer for {name}")]
    Upstream {
        /// The name asked for.
        name: String,
    },
    /// A socket error.
    #[error("dns socket error")]
    Io(#[from] std::io::Error),
}

/// A screened question that must be resolved upstream.
#[derive(Debug, Clone)]
pub struct Question {
    /// The guest's query id.
    pub id: u16,
    /// The name, lowercase, no trailing dot.
    pub name: String,
    query: Query,
    recursion_desired: bool,
}

/// The outcome of [`screen`].
#[derive(Debug)]
pub enum Screened {
    /// Answer the guest at once with these bytes.
    Reply(Vec<u8>),
    /// The name is not allowed: answer with these bytes (NXDOMAIN) and record a refusal.
    Refused {
        /// The NXDOMAIN reply.
        reply: Vec<u8>,
        /// The name asked for.
        name: String,
    },
    /// Resolve this A question upstream.
    Resolve(Question),
    /// Not even a DNS header: nothing to answer.
    Drop,
}

fn lower_name(n: &Name) -> String {
    let s = n.to_ascii().to_ascii_lowercase();
    s.strip_suffix('.').map(str::to_owned).unwrap_or(s)
}

fn reply(
    id: u16,
    q: Option<&Query>,
    rd: bool,
    code: ResponseCode,
    answers: Vec<Record>,
) -> Vec<u8> {
    let mut m = Message::response(id, OpCode::Query);
    m.metadata.response_code = code;
    m.metadata.recursion_desired = rd;
    m.metadata.recursion_available = true;
    if let Some(q) = q {
        m.add_query(q.clone());
    }
    m.add_answers(answers);
    // Encoding our own well-formed message cannot fail; fall back to a bare header.
    m.to_vec().unwrap_or_else(|_| {
        let mut h = id.to_be_bytes().to_vec();
        h.extend_from_slice(&[0x81, 0x82, 0, 0, 0, 0, 0, 0, 0, 0]);
        h
    })
}

/// Screens a guest's query: `name_allowed` says whether the policy allows a name.
pub fn screen(query: &[u8], name_allowed: impl Fn(&str) -> bool) -> Screened {
    if query.len() < 12 {
        return Screened::Drop;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    let formerr = || Screened::Reply(reply(id, None, true, ResponseCode::FormErr, vec![]));
    if query.len() > MAX_QUERY_BYTES {
        return formerr();
    }
    let Ok(m) = Message::from_vec(query) else {
        return formerr();
    };
    if m.metadata.message_type != MessageType::Query || m.queries.len() != 1 {
        return formerr();
    }
    let rd = m.metadata.recursion_desired;
    if m.metadata.op_code != OpCode::Query {
        return Screened::Reply(reply(id, None, rd, ResponseCode::NotImp, vec![]));
    }
    let q = &m.queries[0];
    let name = lower_name(q.name());
    if q.query_class() != DNSClass::IN || !name_allowed(&name) {
        return Screened::Refused {
            reply: reply(id, Some(q), rd, ResponseCode::NXDomain, vec![]),
            name,
        };
    }
    if q.query_type() != RecordType::A {
        return Screened::Reply(reply(id, Some(q), rd, ResponseCode::NoError, vec![]));
    }
    Screened::Resolve(Question {
        id,
        name,
        query: q.clone(),
        recursion_desired: rd,
    })
}

/// The reply to `q` with these addresses (NXDOMAIN when there are none).
pub fn answer(q: &Question, addrs: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
    if addrs.is_empty() {
        return reply(
            q.id,
            Some(&q.query),
            q.recursion_desired,
            ResponseCode::NXDomain,
            vec![],
        );
    }
    let records = addrs
        .iter()
        .map(|ip| Record::from_rdata(q.query.name().clone(), ttl, RData::A(A(*ip))))
        .collect();
    reply(
        q.id,
        Some(&q.query),
        q.recursion_desired,
        ResponseCode::NoError,
        records,
    )
}

/// SERVFAIL for `q` (upstream failed).
pub fn servfail(q: &Question) -> Vec<u8> {
    reply(
        q.id,
        Some(&q.query),
        q.recursion_desired,
        ResponseCode::ServFail,
        vec![],
    )
}

/// What upstream said about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// A addresses (at most 16), possibly none (NXDOMAIN or no data).
    pub addrs: Vec<Ipv4Addr>,
    /// The smallest TTL of the answers, in seconds.
    pub ttl: u32,
}

/// The host's resolvers: the `nameserver` lines of `/etc/resolv.conf` (the default upstream
/// servers; queries to them come from the host, never from the guest).
pub fn system_upstreams() -> Vec<SocketAddr> {
    upstreams_from_resolv_conf(Path::new("/etc/resolv.conf"))
}

/// The `nameserver` lines of a resolv.conf (port 53); empty when unreadable.
pub fn upstreams_from_resolv_conf(path: &Path) -> Vec<SocketAddr> {
    std::fs::read_to_string(path)
        .map(|s| parse_resolv_conf(&s))
        .unwrap_or_default()
}

fn parse_resolv_conf(s: &str) -> Vec<SocketAddr> {
    s.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then_some(())?;
            let ip: IpAddr = w.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Resolves A questions on the host.
#[derive(Debug)]
pub struct Resolver {
    upstreams: Vec<SocketAddr>,
    cache: Mutex<HashMap<String, (Resolved, Instant)>>,
}

impl Resolver {
    /// A resolver asking `upstreams` in turn.
    pub fn new(upstreams: Vec<SocketAddr>) -> Resolver {
        Resolver {
            upstreams,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The upstream servers.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// The A addresses of `name`: from the cache while its TTL lasts, else from upstream (two
    /// attempts, each with [`UPSTREAM_TIMEOUT`], over the configured servers in turn).
    pub async fn resolve(&self, name: &str) -> Result<Resolved, DnsError> {
        let now = Instant::now();
        if let Some((r, exp)) = self.cache_get(name)
            && exp > now
        {
            let ttl = exp.saturating_duration_since(now).as_secs().max(1);
            return Ok(Resolved {
                addrs: r.addrs,
                ttl: u32::try_from(ttl).unwrap_or(u32::MAX),
            });
        }
        if self.upstreams.is_empty() {
            return Err(DnsError::NoUpstream);
        }
        for attempt in 0..2 {
            let server = self.upstreams[attempt % self.upstreams.len()];
            match tokio::time::timeout(UPSTREAM_TIMEOUT, ask(server, name)).await {
                Ok(Ok(r)) => {
                    self.cache_put(name, &r, Instant::now());
                    return Ok(r);
                }
                Ok(Err(e)) => tracing::debug!(%server, name, error = %e, "upstream dns failed"),
                Err(_) => tracing::debug!(%server, name, "upstream dns timed out"),
            }
        }
        Err(DnsError::Upstream { name: name.into() })
    }

    fn cache_get(&self, name: &str) -> Option<(Resolved, Instant)> {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.get(name).cloned()
    }

    fn cache_put(&self, name: &str, r: &Resolved, now: Instant) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.len() >= MAX_CACHE {
            c.retain(|_, (_, exp)| *exp > now);
            if c.len() >= MAX_CACHE {
                c.clear();
            }
        }
        // Negative answers are kept briefly.
        let ttl = if r.addrs.is_empty() {
            30
        } else {
            r.ttl.min(3600)
        };
        c.insert(
            name.to_owned(),
            (r.clone(), now + Duration::from_secs(u64::from(ttl))),
        );
    }
}

/// One upstream exchange.
async fn ask(server: SocketAddr, name: &str) -> Result<Resolved, DnsError> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal address")
    } else {
        "[::]:0".parse().expect("literal address")
    };
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    let qname = Name::from_ascii(format!("{name}."))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(qname, RecordType::A));
    let id = m.metadata.id;
    let bytes = m
        .to_vec()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    sock.send(&bytes).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).await?;
        if let Some(r) = parse_upstream(&buf[..n], id, name) {
            return Ok(r);
        }
    }
}

/// Parses an upstream reply to query `id` for `name`; `None` for an unrelated or malformed
/// packet (keep waiting) or a failure code.
fn parse_upstream(b: &[u8], id: u16, name: &str) -> Option<Resolved> {
    let m = Message::from_vec(b).ok()?;
    if m.metadata.id != id
        || m.metadata.message_type != MessageType::Response
        || m.queries.len() != 1
        || lower_name(m.queries[0].name()) != name
    {
        return None;
    }
    match m.metadata.response_code {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        _ => return None,
    }
    let mut addrs = Vec::new();
    let mut ttl = u32::MAX;
    for r in &m.answers {
        if let RData::A(A(ip)) = r.data
            && addrs.len() < MAX_ADDRS
            && !addrs.contains(&ip)
        {
            addrs.push(ip);
            ttl = ttl.min(r.ttl);
        }
    }
    if addrs.is_empty() {
        ttl = 0;
    }
    Some(Resolved { addrs, ttl })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn parse(b: &[u8]) -> Message {
        Message::from_vec(b).unwrap()
    }

    #[test]
    fn screen_allowed_a_is_resolved_forbidden_is_nxdomain() {
        let allow = |n: &str| n == "example.org";
        match screen(&query("Example.ORG.", RecordType::A), allow) {
            Screened::Resolve(q) => {
                assert_eq!(q.name, "example.org");
                assert_eq!(q.id, 0x1234);
            }
            other => panic!("{other:?}"),
        }
        match screen(&query("evil.org.", RecordType::A), allow) {
            Screened::Refused { reply, name } => {
                assert_eq!(name, "evil.org");
                let m = parse(&reply);
                assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
                assert_eq!(m.metadata.id, 0x1234);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn screen_aaaa_is_empty_noerror() {
        let Screened::Reply(r) = screen(&query("example.org.", RecordType::AAAA), |_| true) else {
            panic!("expected a reply");
        };
        let m = parse(&r);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert_eq!(m.queries.len(), 1);
    }

    #[test]
    fn screen_bad_shapes_get_formerr() {
        let mut two = Message::new(7, MessageType::Query, OpCode::Query);
        two.add_query(Query::query(
            Name::from_ascii("a.org.").unwrap(),
            RecordType::A,
        ));
        two.add_query(Query::query(
            Name::from_ascii("b.org.").unwrap(),
            RecordType::A,
        ));
        let mut big = query("example.org.", RecordType::A);
        big.resize(600, 0);
        for (what, q) in [("two questions", two.to_vec().unwrap()), ("too big", big)] {
            let Screened::Reply(r) = screen(&q, |_| true) else {
                panic!("{what}: expected a reply");
            };
            assert_eq!(
                parse(&r).metadata.response_code,
                ResponseCode::FormErr,
                "{what}"
            );
        }
        assert!(matches!(screen(&[1, 2, 3], |_| true), Screened::Drop));
        let mut garbage = vec![0xab, 0xcd];
        garbage.extend_from_slice(&[0xff; 30]);
        let Screened::Reply(r) = screen(&garbage, |_| true) else {
            panic!("garbage: expected a reply");
        };
        assert_eq!(r[..2], [0xab, 0xcd]);
    }

    #[test]
    fn answer_carries_addresses_and_ttl() {
        let Screened::Resolve(q) = screen(&query("example.org.", RecordType::A), |_| true) else {
            panic!("expected resolve");
        };
        let m = parse(&answer(&q, &[Ipv4Addr::new(203, 0, 113, 80)], 120));
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].ttl, 120);
        assert!(
            matches!(m.answers[0].data, RData::A(A(ip)) if ip == Ipv4Addr::new(203, 0, 113, 80))
        );
        let m = parse(&answer(&q, &[], 120));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn parse_upstream_checks_id_and_name() {
        let mut m = Message::response(9, OpCode::Query);
        let n = Name::from_ascii("example.org.").unwrap();
        m.add_query(Query::query(n.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            n.clone(),
            300,
            RData::A(A(Ipv4Addr::new(1, 2, 3, 4))),
        ));
        m.add_answer(Record::from_rdata(
            n,
            100,
            RData::A(A(Ipv4Addr::new(1, 2, 3, 5))),
        ));
        let b = m.to_vec().unwrap();
        let r = parse_upstream(&b, 9, "example.org").unwrap();
        assert_eq!(r.addrs.len(), 2);
        assert_eq!(r.ttl, 100);
        assert!(parse_upstream(&b, 10, "example.org").is_none());
        assert!(parse_upstream(&b, 9, "other.org").is_none());
    }

    #[test]
    fn resolv_conf_nameservers() {
        let s =
            "# c\nnameserver 10.255.255.53\nsearch x\nnameserver fe80::1%eth0\nnameserver bad\n";
        assert_eq!(
            parse_resolv_conf(s),
            vec![
                "10.255.255.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    #[tokio::test]
    async fn resolver_asks_upstream_and_caches() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut m = Message::response(q.metadata.id, OpCode::Query);
            m.add_query(q.queries[0].clone());
            m.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                600,
                RData::A(A(Ipv4Addr::new(198, 18, 0, 7))),
            ));
            server.send_to(&m.to_vec().unwrap(), from).await.unwrap();
        });
        let r = Resolver::new(vec![addr]);
        let got = r.resolve("example.org").await.unwrap();
        assert_eq!(got.addrs, vec![Ipv4Addr::new(198, 18, 0, 7)]);
        task.await.unwrap();
        // The server is gone: a second answer can only come from the cache.
        let again = r.resolve("example.org").await.unwrap();
        assert_eq!(again.addrs, got.addrs);
    }

    proptest::proptest! {
        #[test]
        fn screen_random_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..700)) {
            let _ = screen(&b, |_| true);
        }
    }
}
