//! Filter decisions on crafted frames.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use etherparse::{
    Ethernet2Header, Icmpv4Type, Ipv4Header, PacketBuilder, SlicedPacket, TcpHeader, TransportSlice,
};
use kiln_api_types::network::{NetworkSpec, RefusalReason};

use super::*;
use crate::addr::{HostAddrs, Net};
use crate::dns::{Resolved, Screened};
use crate::inspect::tests::client_hello;
use crate::{GuestNet, Mac};

const GMAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const GWMAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
const GIP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 80);

fn guest() -> GuestNet {
    GuestNet {
        mac: Mac(GMAC),
        address: GIP,
        prefix_len: 24,
        gateway: GW,
        mtu: 65520,
    }
}

fn filter(spec: &str) -> Filter {
    let spec: NetworkSpec = spec.parse().unwrap();
    let host = HostAddrs::fixed(
        vec![Ipv4Addr::new(198, 51, 100, 10)],
        vec![Net::new(Ipv4Addr::new(198, 51, 100, 10), 24)],
    );
    Filter::new(guest(), &spec, host, None).unwrap()
}

fn at(t0: Instant, secs: u64) -> Now {
    Now {
        mono: t0 + Duration::from_secs(secs),
        unix_ms: 1_000 + secs * 1000,
    }
}

fn build(b: PacketBuilderStep<TcpHeader>, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

use etherparse::PacketBuilderStep;

fn from_guest_tcp(dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> PacketBuilderStep<TcpHeader> {
    PacketBuilder::ethernet2(GMAC, GWMAC)
        .ipv4(GIP.octets(), dst.octets(), 64)
        .tcp(sport, dport, seq, 64000)
}

fn syn(dst: Ipv4Addr, dport: u16, sport: u16, isn: u32) -> Vec<u8> {
    build(from_guest_tcp(dst, sport, dport, isn).syn(), &[])
}

fn data(dst: Ipv4Addr, dport: u16, sport: u16, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    build(
        from_guest_tcp(dst, sport, dport, seq).ack(ack).psh(),
        payload,
    )
}

fn synack(src: Ipv4Addr, sport: u16, dport: u16, seq: u32, ack: u32) -> Vec<u8> {
    build(
        PacketBuilder::ethernet2(GWMAC, GMAC)
            .ipv4(src.octets(), GIP.octets(), 64)
            .tcp(sport, dport, seq, 64000)
            .syn()
            .ack(ack),
        &[],
    )
}

fn udp(dst: Ipv4Addr, dport: u16, sport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(GMAC, GWMAC)
        .ipv4(GIP.octets(), dst.octets(), 64)
        .udp(sport, dport);
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

/// A TCP frame's Ethernet, IP and TCP headers; checks the TCP checksum.
fn tcp_of(frame: &[u8]) -> (Ethernet2Header, Ipv4Header, TcpHeader) {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let eth = Ethernet2Header::from_slice(frame).unwrap().0;
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("not ipv4")
    };
    let Some(TransportSlice::Tcp(tcp)) = p.transport else {
        panic!("not tcp")
    };
    let h = tcp.to_header();
    let ip = ip.header().to_header();
    assert_eq!(
        h.calc_checksum_ipv4(&ip, tcp.payload()).unwrap(),
        h.checksum,
        "tcp checksum"
    );
    (eth, ip, h)
}

fn assert_rst_to_guest(
    frame: &[u8],
    from: Ipv4Addr,
    from_port: u16,
    to_port: u16,
    seq: u32,
    ack: u32,
) {
    let (eth, ip, t) = tcp_of(frame);
    assert_eq!(eth.source, GWMAC);
    assert_eq!(eth.destination, GMAC);
    assert_eq!(Ipv4Addr::from(ip.source), from);
    assert_eq!(Ipv4Addr::from(ip.destination), GIP);
    assert_eq!((t.source_port, t.destination_port), (from_port, to_port));
    assert!(t.rst && t.ack && !t.syn && !t.fin, "{t:?}");
    assert_eq!(t.sequence_number, seq, "seq");
    assert_eq!(t.acknowledgment_number, ack, "ack");
}

#[test]
fn filter_nat_syn_to_internet_is_forwarded() {
    let mut f = filter("nat");
    let t0 = Instant::now();
    let mut out = Output::default();
    let s = syn(PUBLIC, 80, 40000, 1000);
    f.from_guest(&s, at(t0, 0), &mut out);
    assert_eq!(out.to_passt, vec![s]);
    assert!(out.to_guest.is_empty());
    assert_eq!(f.stats().connections, 1);
    assert_eq!(f.stats().refused, 0);
}

#[test]
fn filter_nat_syn_to_closed_classes_gets_rst_ack() {
    let cases = [
        (Ipv4Addr::new(10, 1, 2, 3), RefusalReason::Private),
        (Ipv4Addr::new(192, 168, 1, 1), RefusalReason::Private),
        (Ipv4Addr::new(127, 0, 0, 1), RefusalReason::Loopback),
        (GW, RefusalReason::Host),
        (Ipv4Addr::new(198, 51, 100, 10), RefusalReason::Host),
        (Ipv4Addr::new(198, 51, 100, 77), RefusalReason::Host),
        (Ipv4Addr::new(169, 254, 169, 254), RefusalReason::LinkLocal),
        (Ipv4Addr::new(224, 0, 0, 1), RefusalReason::Special),
    ];
    for (dst, reason) in cases {
        let mut f = filter("nat");
        let mut out = Output::default();
        f.from_guest(&syn(dst, 80, 40000, 1000), at(Instant::now(), 0), &mut out);
        assert!(out.to_passt.is_empty(), "{dst}");
        assert_eq!(out.to_guest.len(), 1, "{dst}");
        assert_rst_to_guest(&out.to_guest[0], dst, 80, 40000, 0, 1001);
        let r = f.refusals();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].reason, reason, "{dst}");
        assert_eq!(r[0].destination, format!("{dst}:80"));
        assert_eq!(r[0].protocol, "tcp");
    }
}

#[test]
fn filter_tcp_to_gateway_dns_port_is_reset() {
    let mut f = filter("nat");
    let mut out = Output::default();
    f.from_guest(&syn(GW, 53, 40000, 7), at(Instant::now(), 0), &mut out);
    assert!(out.to_passt.is_empty());
    assert_rst_to_guest(&out.to_guest[0], GW, 53, 40000, 0, 8);
}

#[test]
fn filter_allow_cidr_rules_open_named_ranges_and_ports_only() {
    let mut f = filter("allow=10.1.2.0/24:5432,0.0.0.0/0:443");
    let t = at(Instant::now(), 0);
    let mut out = Output::default();
    f.from_guest(&syn(Ipv4Addr::new(10, 1, 2, 3), 5432, 1, 1), t, &mut out);
    assert_eq!(out.to_passt.len(), 1, "10.1.2.3:5432 is named");
    let mut out = Output::default();
    f.from_guest(&syn(Ipv4Addr::new(10, 1, 2, 3), 22, 2, 1), t, &mut out);
    assert!(out.to_passt.is_empty(), "port 22 is not");
    let mut out = Output::default();
    f.from_guest(&syn(Ipv4Addr::new(10, 9, 9, 9), 443, 3, 1), t, &mut out);
    assert!(out.to_passt.is_empty(), "0.0.0.0/0 does not open 10/8");
    let mut out = Output::default();
    f.from_guest(&syn(PUBLIC, 443, 4, 1), t, &mut out);
    assert_eq!(
        out.to_passt.len(),
        1,
        "0.0.0.0/0:443 opens the internet on 443"
    );
    let mut out = Output::default();
    f.from_guest(&syn(PUBLIC, 80, 5, 1), t, &mut out);
    assert!(out.to_passt.is_empty());
    let reasons: Vec<_> = f.refusals().iter().map(|r| r.reason).collect();
    assert_eq!(
        reasons,
        [
            RefusalReason::NotAllowed,
            RefusalReason::Private,
            RefusalReason::NotAllowed
        ]
    );
}

#[test]
fn filter_refused_udp_gets_icmp_prohibited_quoting_the_datagram() {
    let mut f = filter("allow=example.org");
    let mut out = Output::default();
    let d = udp(PUBLIC, 9999, 5555, b"hello");
    f.from_guest(&d, at(Instant::now(), 0), &mut out);
    assert!(out.to_passt.is_empty());
    let p = SlicedPacket::from_ethernet(&out.to_guest[0]).unwrap();
    let Some(TransportSlice::Icmpv4(icmp)) = p.transport else {
        panic!("not icmp")
    };
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 13));
    assert!(matches!(
        icmp.icmp_type(),
        Icmpv4Type::DestinationUnreachable(_)
    ));
    // The quote: the original IP header and the first 8 bytes (the UDP header).
    assert_eq!(icmp.payload(), &d[14..14 + 20 + 8]);
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!()
    };
    assert_eq!(ip.header().source_addr(), GW);
    assert_eq!(ip.header().destination_addr(), GIP);
    assert_eq!(f.refusals()[0].protocol, "udp");
}

#[test]
fn filter_spoofed_and_ipv6_frames_are_dropped_and_counted_logged_once() {
    let mut f = filter("nat");
    let t = at(Instant::now(), 0);
    let mut out = Output::default();
    let mut bad_mac = syn(PUBLIC, 80, 1, 1);
    bad_mac[6..12].copy_from_slice(&[2, 9, 9, 9, 9, 9]);
    f.from_guest(&bad_mac, t, &mut out);
    let bad_ip = build(
        PacketBuilder::ethernet2(GMAC, GWMAC)
            .ipv4([10, 0, 2, 16], PUBLIC.octets(), 64)
            .tcp(1, 80, 1, 100)
            .syn(),
        &[],
    );
    f.from_guest(&bad_ip, t, &mut out);
    let v6 = build(
        PacketBuilder::ethernet2(GMAC, GWMAC)
            .ipv6([0xfe; 16], [0x20; 16], 64)
            .tcp(1, 80, 1, 100)
            .syn(),
        &[],
    );
    f.from_guest(&v6, t, &mut out);
    assert!(out.to_passt.is_empty() && out.to_guest.is_empty());
    assert_eq!(f.stats().refused, 3);
    assert_eq!(f.refusals().len(), 1, "rate-limited log");
    assert_eq!(f.refusals()[0].reason, RefusalReason::Protocol);
    assert_eq!(f.flow_count(), 0);
}

#[test]
fn filter_arp_from_guest_passes_spoofed_arp_does_not() {
    let mut f = filter("nat");
    let t = at(Instant::now(), 0);
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&GMAC);
    arp.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&GMAC);
    arp.extend_from_slice(&GIP.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&GW.octets());
    let mut out = Output::default();
    f.from_guest(&arp, t, &mut out);
    assert_eq!(out.to_passt, vec![arp.clone()]);
    let mut spoof = arp.clone();
    spoof[28..32].copy_from_slice(&[10, 0, 2, 99]);
    let mut out = Output::default();
    f.from_guest(&spoof, t, &mut out);
    assert!(out.to_passt.is_empty());
}

fn dns_query_frame(name: &str) -> Vec<u8> {
    udp(
        GW,
        53,
        33333,
        &crate::dns::tests::query(name, hickory_proto::rr::RecordType::A),
    )
}

/// Asks the filter for `name` and answers with `addrs`; returns the reply frame's answers.
fn resolve(
    f: &mut Filter,
    t: Now,
    name: &str,
    addrs: &[Ipv4Addr],
    ttl: u32,
) -> hickory_proto::op::Message {
    let mut out = Output::default();
    f.from_guest(&dns_query_frame(&format!("{name}.")), t, &mut out);
    assert!(out.to_passt.is_empty(), "DNS is never forwarded");
    let reply = if let Some(req) = out.dns.pop() {
        assert_eq!(req.question.name, name);
        let mut out = Output::default();
        f.dns_done(
            req,
            Ok(Resolved {
                addrs: addrs.to_vec(),
                ttl,
            }),
            t,
            &mut out,
        );
        out.to_guest.pop().unwrap()
    } else {
        out.to_guest.pop().unwrap()
    };
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    let Some(TransportSlice::Udp(u)) = p.transport else {
        panic!("not udp")
    };
    assert_eq!((u.source_port(), u.destination_port()), (53, 33333));
    hickory_proto::op::Message::from_vec(u.payload()).unwrap()
}

#[test]
fn filter_dns_is_intercepted_and_closed_answers_dropped() {
    let mut f = filter("allow=example.org");
    let t = at(Instant::now(), 0);
    let m = resolve(
        &mut f,
        t,
        "example.org",
        &[PUBLIC, Ipv4Addr::new(10, 0, 0, 1)],
        300,
    );
    assert_eq!(m.answers.len(), 1, "the private answer is dropped");
    assert_eq!(f.refusals()[0].reason, RefusalReason::DnsAnswer);
    let m = resolve(&mut f, t, "evil.org", &[], 0);
    assert_eq!(
        m.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain
    );
    assert_eq!(f.refusals()[1].reason, RefusalReason::DnsName);
    let m = resolve(
        &mut f,
        t,
        "example.org",
        &[Ipv4Addr::new(127, 0, 0, 1)],
        300,
    );
    assert_eq!(
        m.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain
    );
}

#[test]
fn dns_screen_in_filter_matches_module() {
    // Guard: the helper query parses as a resolvable question.
    let q = crate::dns::tests::query("example.org.", hickory_proto::rr::RecordType::A);
    assert!(matches!(
        crate::dns::screen(&q, |_| true),
        Screened::Resolve(_)
    ));
}

/// Opens a connection to PUBLIC:443 allowed by name; returns the filter after the handshake
/// (guest ISN 1000, server ISN 5000).
fn named_flow(rules: &str, port: u16) -> (Filter, Instant) {
    let mut f = filter(rules);
    let t0 = Instant::now();
    resolve(&mut f, at(t0, 0), "example.org", &[PUBLIC], 5);
    let mut out = Output::default();
    f.from_guest(&syn(PUBLIC, port, 40000, 1000), at(t0, 1), &mut out);
    assert_eq!(out.to_passt.len(), 1, "SYN to a resolved name passes");
    assert!(f.from_passt(
        &synack(PUBLIC, port, 40000, 5000, 1001),
        at(t0, 1),
        &mut Output::default()
    ));
    let mut out = Output::default();
    f.from_guest(
        &data(PUBLIC, port, 40000, 1001, 5001, &[]),
        at(t0, 1),
        &mut out,
    );
    assert_eq!(out.to_passt.len(), 1, "the handshake's ACK passes");
    (f, t0)
}

#[test]
fn filter_sni_allowed_forwards_held_bytes() {
    let (mut f, t0) = named_flow("allow=example.org:443", 443);
    let hello = client_hello(Some("example.org"));
    let mut out = Output::default();
    let seg = data(PUBLIC, 443, 40000, 1001, 5001, &hello);
    f.from_guest(&seg, at(t0, 2), &mut out);
    assert_eq!(out.to_passt, vec![seg]);
    assert!(out.to_guest.is_empty());
    // Later data flows straight through.
    let mut out = Output::default();
    let more = data(PUBLIC, 443, 40000, 1001 + hello.len() as u32, 5001, b"x");
    f.from_guest(&more, at(t0, 2), &mut out);
    assert_eq!(out.to_passt, vec![more]);
}

#[test]
fn filter_sni_mismatch_resets_both_ways() {
    let (mut f, t0) = named_flow("allow=example.org:443", 443);
    let hello = client_hello(Some("evil.org"));
    let mut out = Output::default();
    f.from_guest(
        &data(PUBLIC, 443, 40000, 1001, 5001, &hello),
        at(t0, 2),
        &mut out,
    );
    assert_eq!(out.to_guest.len(), 1);
    assert_rst_to_guest(
        &out.to_guest[0],
        PUBLIC,
        443,
        40000,
        5001,
        1001 + hello.len() as u32,
    );
    assert_eq!(out.to_passt.len(), 1, "only the RST reaches passt");
    let (eth, ip, t) = tcp_of(&out.to_passt[0]);
    assert_eq!((eth.source, eth.destination), (GMAC, GWMAC));
    assert_eq!(Ipv4Addr::from(ip.destination), PUBLIC);
    assert!(t.rst);
    assert_eq!(
        t.sequence_number, 1001,
        "at the first byte passt has not seen"
    );
    let r = f.refusals().pop().unwrap();
    assert_eq!(r.reason, RefusalReason::NameMismatch);
    assert_eq!(r.name.as_deref(), Some("evil.org"));
}

#[test]
fn filter_sni_split_across_segments_and_retransmission_deduplicated() {
    let (mut f, t0) = named_flow("allow=example.org", 443);
    let hello = client_hello(Some("example.org"));
    let (a, b) = hello.split_at(30);
    let s1 = data(PUBLIC, 443, 40000, 1001, 5001, a);
    let mut out = Output::default();
    f.from_guest(&s1, at(t0, 2), &mut out);
    assert!(out.to_passt.is_empty(), "held");
    // The guest retransmits the first segment: not held twice.
    f.from_guest(&s1, at(t0, 2), &mut out);
    assert!(out.to_passt.is_empty());
    // Out of order (a gap): dropped, the guest will retransmit.
    let gap = data(PUBLIC, 443, 40000, 1001 + 40, 5001, &b[10..]);
    f.from_guest(&gap, at(t0, 2), &mut out);
    assert!(out.to_passt.is_empty());
    let s2 = data(PUBLIC, 443, 40000, 1001 + 30, 5001, b);
    f.from_guest(&s2, at(t0, 2), &mut out);
    assert_eq!(
        out.to_passt,
        vec![s1, s2],
        "held segments in order, once each"
    );
}

#[test]
fn filter_tiny_segments_are_bounded_then_decided() {
    let (mut f, t0) = named_flow("allow=example.org", 443);
    let hello = client_hello(Some("example.org"));
    let mut out = Output::default();
    for i in 0..MAX_HELD_FRAMES {
        f.from_guest(
            &data(PUBLIC, 443, 40000, 1001 + i as u32, 5001, &hello[i..i + 1]),
            at(t0, 2),
            &mut out,
        );
    }
    // 32 one-byte segments of a TLS start without an SNI yet: refused, not held forever.
    assert!(
        out.to_passt.len() == 1 && out.to_guest.len() == 1,
        "{out:?}"
    );
    assert_eq!(
        f.refusals().pop().unwrap().reason,
        RefusalReason::NameMismatch
    );
}

#[test]
fn filter_http_host_decides() {
    let (mut f, t0) = named_flow("allow=example.org:80", 80);
    let req = b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n";
    let mut out = Output::default();
    f.from_guest(
        &data(PUBLIC, 80, 40000, 1001, 5001, req),
        at(t0, 2),
        &mut out,
    );
    assert_eq!(out.to_passt.len(), 1);
    let (mut f, t0) = named_flow("allow=example.org:80", 80);
    let req = b"GET / HTTP/1.1\r\nHost: other.org\r\n\r\n";
    let mut out = Output::default();
    f.from_guest(
        &data(PUBLIC, 80, 40000, 1001, 5001, req),
        at(t0, 2),
        &mut out,
    );
    assert_eq!(out.to_guest.len(), 1);
    assert_eq!(
        f.refusals().pop().unwrap().reason,
        RefusalReason::NameMismatch
    );
}

#[test]
fn filter_other_protocol_on_named_address_passes() {
    let (mut f, t0) = named_flow("allow=example.org", 22);
    let mut out = Output::default();
    let s = data(PUBLIC, 22, 40000, 1001, 5001, b"SSH-2.0-x\r\n");
    f.from_guest(&s, at(t0, 2), &mut out);
    assert_eq!(out.to_passt, vec![s]);
}

#[test]
fn filter_set_policy_keeps_name_allowed_flows_by_their_name() {
    // An SSH flow (no name to check) and an HTTP flow checked for example.org.
    let (mut f, t0) = named_flow("allow=example.org", 22);
    let mut out = Output::default();
    f.from_guest(
        &data(PUBLIC, 22, 40000, 1001, 5001, b"SSH-2.0-x\r\n"),
        at(t0, 2),
        &mut out,
    );
    f.from_guest(&syn(PUBLIC, 80, 40001, 1000), at(t0, 2), &mut out);
    f.from_passt(
        &synack(PUBLIC, 80, 40001, 5000, 1001),
        at(t0, 2),
        &mut Output::default(),
    );
    let req = b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n";
    f.from_guest(
        &data(PUBLIC, 80, 40001, 1001, 5001, req),
        at(t0, 2),
        &mut out,
    );
    assert_eq!(f.flow_count(), 2);
    // Still allowed (another name added): both stay.
    let mut out = Output::default();
    f.set_policy(
        &"allow=example.org,other.org".parse().unwrap(),
        at(t0, 3),
        &mut out,
    )
    .unwrap();
    assert!(out.to_guest.is_empty(), "{out:?}");
    assert_eq!(f.flow_count(), 2);
    // example.org no longer allowed: both reset.
    let mut out = Output::default();
    f.set_policy(&"allow=other.org".parse().unwrap(), at(t0, 3), &mut out)
        .unwrap();
    assert_eq!(out.to_guest.len(), 2, "both reset");
    assert_eq!(f.flow_count(), 0);
}

#[test]
fn filter_name_ttl_is_clamped_and_expires() {
    let mut f = filter("allow=example.org");
    let t0 = Instant::now();
    resolve(&mut f, at(t0, 0), "example.org", &[PUBLIC], 1);
    let mut out = Output::default();
    f.from_guest(&syn(PUBLIC, 443, 1, 1), at(t0, 59), &mut out);
    assert_eq!(out.to_passt.len(), 1, "a 1 s TTL still opens for 60 s");
    let mut out = Output::default();
    f.from_guest(&syn(PUBLIC, 443, 2, 1), at(t0, 61), &mut out);
    assert!(out.to_passt.is_empty(), "expired after 60 s");
    assert_eq!(f.refusals().pop().unwrap().name.as_deref(), None);
}

#[test]
fn filter_set_policy_resets_flows_no_longer_allowed() {
    let mut f = filter("nat");
    let t0 = Instant::now();
    let mut out = Output::default();
    f.from_guest(&syn(PUBLIC, 80, 40000, 1000), at(t0, 0), &mut out);
    f.from_passt(
        &synack(PUBLIC, 80, 40000, 5000, 1001),
        at(t0, 0),
        &mut Output::default(),
    );
    f.from_guest(
        &data(PUBLIC, 80, 40000, 1001, 5001, b"abc"),
        at(t0, 0),
        &mut out,
    );
    let other = Ipv4Addr::new(198, 18, 0, 5);
    f.from_guest(&syn(other, 80, 40001, 1), at(t0, 0), &mut out);
    let mut out = Output::default();
    f.set_policy(&"allow=198.18.0.0/15".parse().unwrap(), at(t0, 1), &mut out)
        .unwrap();
    assert_eq!(out.to_guest.len(), 1, "one flow reset");
    assert_rst_to_guest(&out.to_guest[0], PUBLIC, 80, 40000, 5001, 1004);
    let (_, _, t) = tcp_of(&out.to_passt[0]);
    assert!(t.rst);
    assert_eq!(t.sequence_number, 1004);
    assert_eq!(f.flow_count(), 1);
    // The reset flow's next segment is dropped.
    let mut out = Output::default();
    f.from_guest(
        &data(PUBLIC, 80, 40000, 1004, 5001, b"d"),
        at(t0, 1),
        &mut out,
    );
    assert!(out.to_passt.is_empty());
    assert!(
        f.set_policy(&NetworkSpec::None, at(t0, 1), &mut out)
            .is_err()
    );
}

#[test]
fn filter_flow_table_limit_refuses_then_evicts_closed() {
    let mut f = filter("nat").with_max_flows(2);
    let t = at(Instant::now(), 0);
    let mut out = Output::default();
    f.from_guest(&syn(PUBLIC, 80, 1, 1), t, &mut out);
    f.from_guest(&syn(PUBLIC, 80, 2, 1), t, &mut out);
    let mut out = Output::default();
    f.from_guest(&syn(PUBLIC, 80, 3, 1), t, &mut out);
    assert!(out.to_passt.is_empty());
    assert_rst_to_guest(&out.to_guest[0], PUBLIC, 80, 3, 0, 2);
    assert_eq!(f.refusals().pop().unwrap().reason, RefusalReason::Limit);
    // Flow 1 is reset by the guest: its slot is reusable.
    let rst = build(from_guest_tcp(PUBLIC, 1, 80, 2).rst(), &[]);
    f.from_guest(&rst, t, &mut out);
    let mut out = Output::default();
    f.from_guest(&syn(PUBLIC, 80, 3, 1), t, &mut out);
    assert_eq!(out.to_passt.len(), 1);
}

#[test]
fn filter_non_syn_of_unknown_flow_is_dropped() {
    let mut f = filter("nat");
    let mut out = Output::default();
    f.from_guest(
        &data(PUBLIC, 80, 1, 1, 1, b"x"),
        at(Instant::now(), 0),
        &mut out,
    );
    assert!(out.to_passt.is_empty() && out.to_guest.is_empty());
}

#[test]
fn filter_refusal_log_keeps_the_newest() {
    let (tx, mut rx) = mpsc::channel(2);
    let spec: NetworkSpec = "allow=example.org".parse().unwrap();
    let mut f = Filter::new(guest(), &spec, HostAddrs::default(), Some(tx)).unwrap();
    let t = at(Instant::now(), 0);
    for port in 1..=100u16 {
        let mut out = Output::default();
        f.from_guest(&syn(PUBLIC, port, port, 1), t, &mut out);
    }
    let r = f.refusals();
    assert_eq!(r.len(), MAX_REFUSALS_KEPT);
    assert_eq!(r.last().unwrap().destination, format!("{PUBLIC}:100"));
    assert_eq!(f.stats().refused, 100);
    assert_eq!(rx.try_recv().unwrap().destination, format!("{PUBLIC}:1"));
    assert_eq!(rx.try_recv().unwrap().destination, format!("{PUBLIC}:2"));
    assert!(rx.try_recv().is_err(), "the full channel dropped the rest");
}

proptest::proptest! {
    #[test]
    fn filter_random_frames_never_panic(
        tail in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        kind in 0u8..4,
    ) {
        let mut f = filter("allow=example.org,10.1.2.0/24");
        let t = at(Instant::now(), 0);
        // Prefix with plausible headers so the bytes reach the deeper parsers.
        let mut frame = Vec::new();
        match kind {
            0 => frame.extend_from_slice(&tail),
            1 => { frame.extend_from_slice(&GWMAC); frame.extend_from_slice(&GMAC); frame.extend_from_slice(&[8, 0]); frame.extend_from_slice(&tail); }
            2 => { frame = syn(PUBLIC, 443, 1, 1); frame.truncate(34); frame.extend_from_slice(&tail); }
            _ => { frame = udp(GW, 53, 1, &[]); frame.truncate(42); frame.extend_from_slice(&tail); }
        }
        let mut out = Output::default();
        f.from_guest(&frame, t, &mut out);
        f.from_passt(&frame, t, &mut Output::default());
        for req in out.dns.drain(..) {
            let mut o = Output::default();
            f.dns_done(req, Ok(Resolved { addrs: vec![PUBLIC], ttl: 60 }), t, &mut o);
        }
    }
}

// The half-close workaround for passt (see `HalfClose`): guest ISN 1000, passt's 5000.

fn from_passt_data(seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    build(
        PacketBuilder::ethernet2(GWMAC, GMAC)
            .ipv4(PUBLIC.octets(), GIP.octets(), 64)
            .tcp(80, 40000, seq, 64000)
            .ack(ack),
        payload,
    )
}

fn guest_ack(seq: u32, ack: u32, fin: bool) -> Vec<u8> {
    let b = from_guest_tcp(PUBLIC, 40000, 80, seq).ack(ack);
    build(if fin { b.fin() } else { b }, &[])
}

fn ms(t0: Instant, ms: u64) -> Now {
    Now {
        mono: t0 + Duration::from_millis(ms),
        unix_ms: 1_000 + ms,
    }
}

/// A connection where the guest sent 5 bytes, then its FIN (passt has discarded up to 5001).
fn half_closed() -> (Filter, Instant) {
    let mut f = filter("nat");
    let t0 = Instant::now();
    let mut out = Output::default();
    f.from_guest(&syn(PUBLIC, 80, 40000, 1000), ms(t0, 0), &mut out);
    assert!(f.from_passt(&synack(PUBLIC, 80, 40000, 5000, 1001), ms(t0, 0), &mut out));
    f.from_guest(&guest_ack(1001, 5001, false), ms(t0, 0), &mut out);
    f.from_guest(
        &data(PUBLIC, 80, 40000, 1001, 5001, b"hello"),
        ms(t0, 0),
        &mut out,
    );
    f.from_guest(&guest_ack(1006, 5001, true), ms(t0, 0), &mut out);
    assert_eq!(out.to_passt.len(), 4);
    assert!(out.to_guest.is_empty());
    (f, t0)
}

#[test]
fn filter_half_close_clamps_acks_probes_then_sends_the_missing_fin() {
    let (mut f, t0) = half_closed();
    let mut out = Output::default();
    // The server's answer reaches the guest; the guest's ACK of it reaches passt clamped.
    assert!(f.from_passt(&from_passt_data(5001, 1007, b"hello"), ms(t0, 10), &mut out));
    f.from_guest(&guest_ack(1007, 5006, false), ms(t0, 10), &mut out);
    let (_, _, t) = tcp_of(&out.to_passt[0]);
    assert_eq!(
        t.acknowledgment_number, 5001,
        "clamped to passt's discard point"
    );
    assert!(f.half_closing());
    // Not quiet long enough: nothing.
    out = Output::default();
    f.poll(ms(t0, 300), &mut out);
    assert!(out.to_passt.is_empty() && out.to_guest.is_empty());
    // Quiet: the real ACK goes to passt once.
    f.poll(ms(t0, 600), &mut out);
    assert_eq!(out.to_passt.len(), 1);
    let (eth, _, t) = tcp_of(&out.to_passt[0]);
    assert_eq!(eth.source, GMAC);
    assert!(t.ack && !t.fin && !t.rst);
    assert_eq!((t.sequence_number, t.acknowledgment_number), (1007, 5006));
    out = Output::default();
    f.poll(ms(t0, 700), &mut out);
    assert!(out.to_passt.is_empty() && out.to_guest.is_empty());
    // passt stayed silent (it closed the connection): kiln sends the guest its FIN.
    f.poll(ms(t0, 850), &mut out);
    assert_eq!(out.to_guest.len(), 1);
    let (eth, ip, t) = tcp_of(&out.to_guest[0]);
    assert_eq!((eth.source, eth.destination), (GWMAC, GMAC));
    assert_eq!(Ipv4Addr::from(ip.source), PUBLIC);
    assert!(t.fin && t.ack && !t.rst);
    assert_eq!((t.sequence_number, t.acknowledgment_number), (5006, 1007));
    assert!(!f.half_closing());
    // The guest's ACK of that FIN does not go to passt, which forgot the connection.
    out = Output::default();
    f.from_guest(&guest_ack(1007, 5007, false), ms(t0, 860), &mut out);
    assert!(out.to_passt.is_empty());
    f.poll(ms(t0, 5000), &mut out);
    assert!(out.to_guest.is_empty());
}

#[test]
fn filter_half_close_resets_when_passt_answers_the_probe_with_old_bytes() {
    let (mut f, t0) = half_closed();
    let mut out = Output::default();
    assert!(f.from_passt(&from_passt_data(5001, 1007, b"abc"), ms(t0, 10), &mut out));
    f.from_guest(&guest_ack(1007, 5004, false), ms(t0, 10), &mut out);
    f.poll(ms(t0, 600), &mut out);
    out = Output::default();
    // The server is still open: passt sends the same bytes again, as new ones.
    assert!(!f.from_passt(&from_passt_data(5004, 1007, b"abc"), ms(t0, 601), &mut out));
    assert_eq!(out.to_guest.len(), 1);
    assert_rst_to_guest(&out.to_guest[0], PUBLIC, 80, 40000, 5004, 1007);
    assert_eq!(out.to_passt.len(), 1);
    let (_, _, t) = tcp_of(&out.to_passt[0]);
    assert!(t.rst);
    f.poll(ms(t0, 602), &mut Output::default());
    assert!(!f.half_closing());
}

#[test]
fn filter_half_close_resets_when_the_window_is_used_up() {
    let (mut f, t0) = half_closed();
    let mut out = Output::default();
    // The guest's window at its FIN was 64000 (no scaling): passt sent all of it.
    let chunk = vec![7u8; 32000];
    assert!(f.from_passt(&from_passt_data(5001, 1007, &chunk), ms(t0, 10), &mut out));
    assert!(f.from_passt(&from_passt_data(37001, 1007, &chunk), ms(t0, 10), &mut out));
    f.from_guest(&guest_ack(1007, 69001, false), ms(t0, 10), &mut out);
    out = Output::default();
    f.poll(ms(t0, 600), &mut out);
    assert_eq!(
        out.to_guest.len(),
        1,
        "a reset, not a FIN after a truncated answer"
    );
    assert_rst_to_guest(&out.to_guest[0], PUBLIC, 80, 40000, 69001, 1007);
}

#[test]
fn filter_half_close_without_later_data_leaves_the_fin_to_passt() {
    let (mut f, t0) = half_closed();
    let mut out = Output::default();
    f.poll(ms(t0, 2000), &mut out);
    assert!(out.to_passt.is_empty() && out.to_guest.is_empty());
    // passt's own FIN passes, and the workaround ends.
    let fin = build(
        PacketBuilder::ethernet2(GWMAC, GMAC)
            .ipv4(PUBLIC.octets(), GIP.octets(), 64)
            .tcp(80, 40000, 5001, 64000)
            .ack(1007)
            .fin(),
        &[],
    );
    assert!(f.from_passt(&fin, ms(t0, 2001), &mut out));
    f.poll(ms(t0, 2002), &mut out);
    assert!(!f.half_closing());
    // The server closing first needs nothing either: the guest's later FIN starts nothing.
    let mut g = filter("nat");
    g.from_guest(&syn(PUBLIC, 80, 40001, 1000), ms(t0, 0), &mut out);
    g.from_passt(&synack(PUBLIC, 80, 40001, 5000, 1001), ms(t0, 0), &mut out);
    let ack = build(from_guest_tcp(PUBLIC, 40001, 80, 1001).ack(5001), &[]);
    g.from_guest(&ack, ms(t0, 0), &mut out);
    let sfin = build(
        PacketBuilder::ethernet2(GWMAC, GMAC)
            .ipv4(PUBLIC.octets(), GIP.octets(), 64)
            .tcp(80, 40001, 5001, 64000)
            .ack(1001)
            .fin(),
        &[],
    );
    g.from_passt(&sfin, ms(t0, 1), &mut out);
    let gfin = build(from_guest_tcp(PUBLIC, 40001, 80, 1001).ack(5002).fin(), &[]);
    g.from_guest(&gfin, ms(t0, 2), &mut out);
    assert!(!g.half_closing(), "nothing to poll for");
}

#[test]
fn set_tcp_ack_keeps_the_checksum_valid() {
    for (seq, ack, new) in [
        (1, 2, 3),
        (0xffff_fff0, 0x1234_5678, 0xfedc_ba98),
        (7, 0, u32::MAX),
    ] {
        let mut f = data(PUBLIC, 80, 40000, seq, ack, b"some payload");
        frames::set_tcp_ack(&mut f, new);
        let (_, _, t) = tcp_of(&f);
        assert_eq!(t.acknowledgment_number, new);
    }
}

#[test]
fn filter_half_close_retransmission_below_the_probe_passes() {
    let (mut f, t0) = half_closed();
    let mut out = Output::default();
    assert!(f.from_passt(&from_passt_data(5001, 1007, b"abc"), ms(t0, 10), &mut out));
    f.from_guest(&guest_ack(1007, 5004, false), ms(t0, 10), &mut out);
    f.poll(ms(t0, 600), &mut out);
    out = Output::default();
    // passt's ACK-timeout retransmission (from what it has discarded), sent before the probe
    // reached it: harmless, delivered, no reset.
    assert!(f.from_passt(&from_passt_data(5001, 1007, b"abc"), ms(t0, 601), &mut out));
    assert!(out.to_guest.is_empty() && out.to_passt.is_empty());
    f.poll(ms(t0, 900), &mut out);
    let (_, _, t) = tcp_of(&out.to_guest[0]);
    assert!(t.fin && !t.rst);
}
