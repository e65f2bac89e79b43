//! The egress filter of user-mode networks: every Ethernet frame the guest sends passes
//! [`Filter::from_guest`] before passt sees it. Pure: no I/O and no clock reads (the caller
//! passes [`Now`]), so it is unit-tested and fuzzed with crafted frames.
//!
//! Owns: anti-spoofing (the guest's MAC and IPv4 address), the flow table (TCP/UDP/ICMP by
//! 5-tuple, at most [`MAX_FLOWS`]), policy decisions (address classes from `addr.rs`, CIDR
//! rules, names kiln's DNS answered), the inspection of connections allowed only by name
//! (SNI/Host through `inspect.rs`, holding at most 16 KiB per flow and [`MAX_INSPECTING`]
//! flows), fail-fast refusals (TCP RST|ACK; ICMP unreachable code 13), the stats and the
//! refusal log. Must not: touch sockets or processes (the relay does), or trust frames from
//! passt to open flows.
//!
//! ```text
//! guest frame ─▶ MAC/IP spoof check ─▶ ARP: pass │ not IPv4: drop (Protocol)
//!   UDP gw:53 ─▶ dns::screen ─▶ reply now │ Output::dns (relay resolves, then dns_done)
//!   TCP SYN / first UDP / ICMP echo ─▶ verdict: Allow │ Inspect │ Refuse (RST / ICMP 13)
//!   Inspect: hold payload until SNI/Host known ─▶ forward held in order │ RST both ways
//! ```
//!
//! IP fragments are dropped (the link MTU is large, and ports of later fragments cannot be
//! checked).

mod frames;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use etherparse::{IpNumber, Ipv4Slice, TcpSlice, UdpSlice};
use kiln_api_types::network::{
    MAX_REFUSALS_KEPT, NetRule, NetStats, NetworkSpec, Refusal, RefusalReason,
};
use tokio::sync::mpsc;

use crate::GuestNet;
use crate::addr::{self, Class, HostAddrs};
use crate::dns;
use crate::inspect::{self, Inspection, MAX_INSPECT_BYTES};

/// Most flows tracked at once.
pub const MAX_FLOWS: usize = 4096;
/// Most TCP flows being inspected (payload held) at once.
pub const MAX_INSPECTING: usize = 128;
/// Most segments held per inspected flow (tiny segments must not multiply the frames the
/// relay releases at once); reaching it decides on what is held.
pub const MAX_HELD_FRAMES: usize = 32;
/// Most DNS questions being resolved at once.
pub const MAX_DNS_PENDING: usize = 64;
/// Most addresses remembered with the names kiln's DNS answered for them.
pub const MAX_NAMED_ADDRS: usize = 4096;
/// Bounds of how long a DNS answer opens its addresses.
pub const NAME_TTL_MIN: Duration = Duration::from_secs(60);
/// See [`NAME_TTL_MIN`].
pub const NAME_TTL_MAX: Duration = Duration::from_secs(3600);

const TCP_IDLE: Duration = Duration::from_secs(3600);
const TCP_EMBRYONIC_IDLE: Duration = Duration::from_secs(60);
const UDP_IDLE: Duration = Duration::from_secs(120);
const ICMP_IDLE: Duration = Duration::from_secs(30);
/// Half-close workaround ([`HalfClose`]): how long passt must have sent no new data, with
/// all of it acknowledged by the guest, before the filter lets passt see that acknowledgment.
pub const HALF_CLOSE_QUIET: Duration = Duration::from_millis(500);
/// Half-close workaround: how long after that probe a silent passt counts as having closed
/// the connection (it answers a still-open one at once, in the same event-loop turn).
pub const HALF_CLOSE_GRACE: Duration = Duration::from_millis(200);
/// Protocol drops (spoofing, IPv6...) are counted each time but logged at most this often.
const PROTOCOL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The time, as the caller read it.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time (expiry).
    pub mono: Instant,
    /// Wall-clock time in milliseconds since the Unix epoch (refusal timestamps).
    pub unix_ms: u64,
}

impl Now {
    /// Reads both clocks (for callers; the filter never does).
    pub fn read() -> Now {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Now {
            mono: Instant::now(),
            unix_ms,
        }
    }
}

/// Errors of the filter's configuration.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// Only `allow` and `nat` go through the filter.
    #[error("network mode {0} does not use kiln's user-mode filter")]
    Mode(&'static str),
}

/// A DNS question the relay must resolve, then hand back to [`Filter::dns_done`].
#[derive(Debug)]
pub struct DnsRequest {
    /// The screened question.
    pub question: dns::Question,
    guest_port: u16,
    gw_mac: [u8; 6],
}

/// What processing a frame produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Frames for passt, in order.
    pub to_passt: Vec<Vec<u8>>,
    /// Frames for the guest (refusals, DNS replies), in order.
    pub to_guest: Vec<Vec<u8>>,
    /// DNS questions to resolve.
    pub dns: Vec<DnsRequest>,
}

#[derive(Debug, Clone)]
enum Policy {
    Nat,
    Allow(Vec<NetRule>),
}

impl Policy {
    fn from_spec(spec: &NetworkSpec) -> Result<Policy, FilterError> {
        match spec {
            NetworkSpec::Nat => Ok(Policy::Nat),
            NetworkSpec::Allow { rules } => Ok(Policy::Allow(rules.iter().cloned().collect())),
            other => Err(FilterError::Mode(other.mode())),
        }
    }

    fn rules(&self) -> &[NetRule] {
        match self {
            Policy::Nat => &[],
            Policy::Allow(r) => r,
        }
    }

    fn name_allowed(&self, name: &str) -> bool {
        match self {
            Policy::Nat => true,
            Policy::Allow(r) => r.iter().any(|r| r.matches_name(name)),
        }
    }

    /// Whether `name` is allowed on `port` (`None`: ICMP, only rules without a port).
    fn name_admits(&self, name: &str, port: Option<u16>) -> bool {
        match self {
            Policy::Nat => true,
            Policy::Allow(r) => r.iter().any(|r| r.matches_name(name) && admits(r, port)),
        }
    }
}

fn admits(r: &NetRule, port: Option<u16>) -> bool {
    match port {
        Some(p) => r.admits_port(p),
        None => r.port().is_none(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

/// A flow from the guest: the guest's address is fixed, so (proto, guest port or ICMP id,
/// destination, destination port) is the 5-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    proto: Proto,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
}

#[derive(Debug)]
struct Hold {
    /// Sequence number of the stream's first byte (ISN + 1).
    start: u32,
    bytes: Vec<u8>,
    frames: Vec<Vec<u8>>,
}

/// Works around passt 0.0~git20230309 (Debian bookworm) mishandling a connection the guest
/// half-closed first (`shutdown(SHUT_WR)`). passt reads server data with `MSG_PEEK` and
/// discards it from its socket only when the guest acknowledges it, in `tcp_data_from_tap()`;
/// once it has the guest's FIN (`TAP_FIN_RCVD`) it handles guest segments elsewhere and never
/// discards again, yet still advances its acknowledged sequence. So, for server data that
/// arrives after the guest's FIN:
/// - passt's FIN to the guest needs an empty socket queue, so it is never sent: when the
///   guest then acknowledges everything and the server has closed, passt marks the
///   connection closed and forgets it silently (the guest waits for EOF forever);
/// - if the server has not closed yet, each guest ACK makes passt send the same bytes again
///   at later sequence numbers (a livelock of corrupted data).
///
/// Measured with `relay_netns` (passt's pcap and its source at that commit). The filter
/// therefore keeps passt's view consistent and supplies the missing FIN itself:
/// - after forwarding the guest's FIN, every later guest segment reaches passt with its ACK
///   clamped to what passt had discarded then (`consumed`), so passt's peek offsets stay right
///   and it sends the server's data correctly (up to the guest's window; beyond, passt
///   retransmits and eventually resets, as it would for a silent guest);
/// - when the guest has acknowledged all of it and passt sent nothing new for
///   [`HALF_CLOSE_QUIET`], the filter sends passt that real ACK once (the probe). If the server
///   has closed, passt closes silently: after [`HALF_CLOSE_GRACE`] the filter sends the guest a
///   FIN|ACK in passt's place. If not, passt's answer is the duplicated data: the filter drops
///   it and resets the connection both ways (an explicit error instead of corrupt data; only a
///   server pausing longer than the quiet time after the guest's FIN meets this).
///
/// Without data after the guest's FIN, passt's socket queue is empty and it sends its own FIN;
/// the filter then does nothing.
#[derive(Debug)]
struct HalfClose {
    /// passt's discard point: the ACK of the guest's FIN (last ACK passt acted on).
    consumed: u32,
    /// The guest's window as passt last took it (from the FIN segment): passt sends at most
    /// this much past `consumed`, so reaching it may mean data passt can never send.
    window: u32,
    /// The guest's newest ACK and window (unclamped).
    guest_ack: u32,
    guest_win: u16,
    /// When passt last sent new data (or the half-close began).
    last_data: Instant,
    /// When the probe ACK went to passt, and what it acknowledged.
    probe: Option<(Instant, u32)>,
    /// The filter sent the guest its FIN.
    fin_sent: bool,
}

#[derive(Debug)]
struct TcpState {
    /// Next sequence number passt expects from the guest.
    guest_next: u32,
    /// Next sequence number the guest expects from the server (after the SYN-ACK).
    server_next: Option<u32>,
    guest_fin: bool,
    server_fin: bool,
    reset: bool,
    hold: Option<Hold>,
    /// A guest segment after the SYN reached passt (passt handles a FIN on the handshake's
    /// final ACK correctly, without [`HalfClose`]).
    handshake_acked: bool,
    /// The window scale of the guest's SYN.
    guest_wscale: u8,
    half: Option<HalfClose>,
}

/// Whether `flow` is (still) in the half-close workaround.
fn half_active(flow: Option<&Flow>) -> bool {
    flow.and_then(|f| f.tcp.as_ref())
        .is_some_and(|t| t.half.as_ref().is_some_and(|h| !h.fin_sent) && !(t.reset || t.server_fin))
}

/// The ACK number and window of a TCP segment in an Ethernet frame, if it has the ACK flag.
fn tcp_ack_of(frame: &[u8]) -> Option<(u32, u16)> {
    let ip = Ipv4Slice::from_slice(frame.get(14..)?).ok()?;
    let tcp = TcpSlice::from_slice(ip.payload().payload).ok()?;
    tcp.ack()
        .then(|| (tcp.acknowledgment_number(), tcp.window_size()))
}

impl TcpState {
    /// The guest's FIN (in `fin_frame`) is going to passt: start the workaround unless passt
    /// will handle the close itself (see [`HalfClose`]).
    /// Returns whether it started.
    fn guest_fin_forwarded(&mut self, fin_frame: &[u8], now: Instant) -> bool {
        if self.half.is_some() || self.server_fin || !self.handshake_acked {
            return false;
        }
        if let Some((ack, win)) = tcp_ack_of(fin_frame) {
            self.half = Some(HalfClose {
                consumed: ack,
                window: u32::from(win) << self.guest_wscale.min(14),
                guest_ack: ack,
                guest_win: win,
                last_data: now,
                probe: None,
                fin_sent: false,
            });
            return true;
        }
        false
    }
}

#[derive(Debug)]
struct Flow {
    gw_mac: [u8; 6],
    last: Instant,
    /// The name the connection was allowed for (SNI/Host), when inspected.
    name: Option<String>,
    tcp: Option<TcpState>,
}

impl Flow {
    fn closed(&self) -> bool {
        self.tcp
            .as_ref()
            .is_some_and(|t| t.reset || (t.guest_fin && t.server_fin))
    }

    fn expired(&self, proto: Proto, now: Instant) -> bool {
        let idle = now.saturating_duration_since(self.last);
        match (proto, &self.tcp) {
            // Not yet established, or still inspecting (holding bytes): short-lived.
            (Proto::Tcp, Some(t)) if t.server_next.is_none() || t.hold.is_some() => {
                idle >= TCP_EMBRYONIC_IDLE
            }
            (Proto::Tcp, _) => idle >= TCP_IDLE,
            (Proto::Udp, _) => idle >= UDP_IDLE,
            (Proto::Icmp, _) => idle >= ICMP_IDLE,
        }
    }
}

enum Verdict {
    Allow,
    Inspect,
    Refuse(RefusalReason, Option<String>),
}

/// The filter of one sandbox.
#[derive(Debug)]
pub struct Filter {
    guest: GuestNet,
    policy: Policy,
    host: HostAddrs,
    flows: HashMap<Key, Flow>,
    /// Flows in the half-close workaround (a superset: [`Filter::poll`] prunes it).
    half_closes: HashSet<Key>,
    names: HashMap<Ipv4Addr, Vec<(String, Instant)>>,
    max_flows: usize,
    dns_pending: usize,
    stats: NetStats,
    refusals: VecDeque<Refusal>,
    events: Option<mpsc::Sender<Refusal>>,
    last_protocol_log: Option<Instant>,
}

fn tcp_seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl Filter {
    /// A filter for `guest` with policy `spec` (`allow` or `nat`); refusals are also
    /// `try_send`-ed on `events` when given (dropped when the channel is full).
    pub fn new(
        guest: GuestNet,
        spec: &NetworkSpec,
        host: HostAddrs,
        events: Option<mpsc::Sender<Refusal>>,
    ) -> Result<Filter, FilterError> {
        Ok(Filter {
            guest,
            policy: Policy::from_spec(spec)?,
            host,
            flows: HashMap::new(),
            half_closes: HashSet::new(),
            names: HashMap::new(),
            max_flows: MAX_FLOWS,
            dns_pending: 0,
            stats: NetStats::default(),
            refusals: VecDeque::new(),
            events,
            last_protocol_log: None,
        })
    }

    /// Lowers the flow-table bound (tests).
    pub fn with_max_flows(mut self, n: usize) -> Filter {
        self.max_flows = n.max(1);
        self
    }

    /// The host's addresses, for the caller to refresh.
    pub fn host_addrs_mut(&mut self) -> &mut HostAddrs {
        &mut self.host
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The newest refusals (at most [`MAX_REFUSALS_KEPT`]), oldest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.refusals.iter().cloned().collect()
    }

    /// Number of flows tracked.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    fn refuse(
        &mut self,
        now: Now,
        protocol: &str,
        destination: String,
        name: Option<String>,
        reason: RefusalReason,
    ) {
        self.stats.refused += 1;
        let r = Refusal {
            at_unix_ms: now.unix_ms,
            protocol: protocol.into(),
            destination,
            name,
            reason,
        };
        tracing::debug!(protocol, destination = %r.destination, reason = ?reason, "refused");
        if let Some(tx) = &self.events {
            let _ = tx.try_send(r.clone());
        }
        if self.refusals.len() >= MAX_REFUSALS_KEPT {
            self.refusals.pop_front();
        }
        self.refusals.push_back(r);
    }

    /// A dropped frame that is not a connection attempt (spoofed, IPv6, non-IP): counted each
    /// time, logged at most every [`PROTOCOL_LOG_EVERY`].
    fn protocol_drop(&mut self, now: Now, what: String) {
        let log = self
            .last_protocol_log
            .is_none_or(|t| now.mono.saturating_duration_since(t) >= PROTOCOL_LOG_EVERY);
        if log {
            self.last_protocol_log = Some(now.mono);
            self.refuse(now, "other", what, None, RefusalReason::Protocol);
        } else {
            self.stats.refused += 1;
        }
    }

    fn emit_to_guest(&mut self, out: &mut Output, frame: Vec<u8>) {
        self.stats.bytes_in += frame.len() as u64;
        out.to_guest.push(frame);
    }

    /// Handles one frame from the guest.
    pub fn from_guest(&mut self, frame: &[u8], now: Now, out: &mut Output) {
        self.stats.bytes_out += frame.len() as u64;
        if frame.len() < 14 {
            return self.protocol_drop(now, "runt frame".into());
        }
        let dst_mac: [u8; 6] = frame[0..6].try_into().expect("6 bytes");
        if frame[6..12] != self.guest.mac.0 {
            return self.protocol_drop(now, "spoofed source MAC".into());
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        match ethertype {
            0x0806 => return self.arp(frame, now, out),
            0x0800 => {}
            t => return self.protocol_drop(now, format!("ethertype {t:#06x}")),
        }
        let Ok(ip) = Ipv4Slice::from_slice(&frame[14..]) else {
            return self.protocol_drop(now, "malformed IPv4".into());
        };
        let h = ip.header();
        if h.source_addr() != self.guest.address {
            return self.protocol_drop(now, format!("spoofed source {}", h.source_addr()));
        }
        if ip.payload().fragmented {
            return self.protocol_drop(now, format!("IP fragment to {}", h.destination_addr()));
        }
        let dst = h.destination_addr();
        let ip_packet = &frame[14..];
        let payload = ip.payload().payload;
        match ip.payload().ip_number {
            IpNumber::TCP => {
                let Ok(tcp) = TcpSlice::from_slice(payload) else {
                    return self.protocol_drop(now, "malformed TCP".into());
                };
                self.tcp(frame, dst_mac, dst, &tcp, now, out);
            }
            IpNumber::UDP => {
                let Ok(udp) = UdpSlice::from_slice(payload) else {
                    return self.protocol_drop(now, "malformed UDP".into());
                };
                if dst == self.guest.gateway && udp.destination_port() == 53 {
                    return self.dns_query(dst_mac, udp.source_port(), udp.payload(), now, out);
                }
                let key = Key {
                    proto: Proto::Udp,
                    sport: udp.source_port(),
                    dst,
                    dport: udp.destination_port(),
                };
                self.datagram(frame, ip_packet, dst_mac, key, now, out);
            }
            IpNumber::ICMP => {
                // Echo requests only; the id plays the port.
                if payload.len() < 8 || payload[0] != 8 {
                    return self.protocol_drop(now, format!("ICMP type {:?}", payload.first()));
                }
                let key = Key {
                    proto: Proto::Icmp,
                    sport: u16::from_be_bytes([payload[4], payload[5]]),
                    dst,
                    dport: 0,
                };
                self.datagram(frame, ip_packet, dst_mac, key, now, out);
            }
            other => {
                // A connection attempt in another protocol: fail fast.
                let f = frames::icmp_prohibited(&self.guest, dst_mac, ip_packet);
                self.emit_to_guest(out, f);
                self.refuse(
                    now,
                    "other",
                    format!("{dst} protocol {}", other.0),
                    None,
                    RefusalReason::Protocol,
                );
            }
        }
    }

    fn arp(&mut self, frame: &[u8], now: Now, out: &mut Output) {
        // Ethernet/IPv4 ARP: sender MAC at 22..28, sender IP at 28..32.
        if frame.len() < 42 || frame[14..22] != [0, 1, 8, 0, 6, 4, 0, frame[21]] {
            return self.protocol_drop(now, "malformed ARP".into());
        }
        let sender_ip = Ipv4Addr::new(frame[28], frame[29], frame[30], frame[31]);
        if frame[22..28] != self.guest.mac.0
            || (sender_ip != self.guest.address && sender_ip != Ipv4Addr::UNSPECIFIED)
        {
            return self.protocol_drop(now, format!("spoofed ARP from {sender_ip}"));
        }
        out.to_passt.push(frame.to_vec());
    }

    fn dns_query(
        &mut self,
        gw_mac: [u8; 6],
        guest_port: u16,
        q: &[u8],
        now: Now,
        out: &mut Output,
    ) {
        let policy = self.policy.clone();
        let reply = match dns::screen(q, |n| policy.name_allowed(n)) {
            dns::Screened::Drop => return,
            dns::Screened::Reply(r) => r,
            dns::Screened::Refused { reply, name } => {
                self.refuse(now, "dns", name.clone(), Some(name), RefusalReason::DnsName);
                reply
            }
            dns::Screened::Resolve(question) => {
                if self.dns_pending >= MAX_DNS_PENDING {
                    self.refuse(
                        now,
                        "dns",
                        question.name.clone(),
                        Some(question.name.clone()),
                        RefusalReason::Limit,
                    );
                    dns::servfail(&question)
                } else {
                    self.dns_pending += 1;
                    out.dns.push(DnsRequest {
                        question,
                        guest_port,
                        gw_mac,
                    });
                    return;
                }
            }
        };
        let f = frames::dns_reply(&self.guest, gw_mac, guest_port, &reply);
        self.emit_to_guest(out, f);
    }

    /// Completes a DNS question from [`Output::dns`]: drops answers in closed classes,
    /// remembers which names the remaining addresses came from, and queues the reply.
    pub fn dns_done(
        &mut self,
        req: DnsRequest,
        result: Result<dns::Resolved, dns::DnsError>,
        now: Now,
        out: &mut Output,
    ) {
        self.dns_pending = self.dns_pending.saturating_sub(1);
        let q = &req.question;
        let reply = match result {
            Err(e) => {
                tracing::debug!(name = %q.name, error = %e, "dns resolution failed");
                dns::servfail(q)
            }
            // The policy may have changed while resolving.
            Ok(_) if !self.policy.name_allowed(&q.name) => {
                self.refuse(
                    now,
                    "dns",
                    q.name.clone(),
                    Some(q.name.clone()),
                    RefusalReason::DnsName,
                );
                dns::answer(q, &[], 0)
            }
            Ok(res) => {
                let mut kept = Vec::new();
                let mut dropped = None;
                for ip in res.addrs {
                    match self.dest_class_verdict(ip) {
                        Ok(()) => kept.push(ip),
                        Err(_) => dropped = Some(ip),
                    }
                }
                if let Some(ip) = dropped {
                    self.refuse(
                        now,
                        "dns",
                        format!("{} -> {ip}", q.name),
                        Some(q.name.clone()),
                        RefusalReason::DnsAnswer,
                    );
                }
                let ttl = Duration::from_secs(u64::from(res.ttl)).clamp(NAME_TTL_MIN, NAME_TTL_MAX);
                for ip in &kept {
                    self.remember_name(*ip, &q.name, now.mono, now.mono + ttl);
                }
                dns::answer(q, &kept, res.ttl)
            }
        };
        let f = frames::dns_reply(&self.guest, req.gw_mac, req.guest_port, &reply);
        self.emit_to_guest(out, f);
    }

    fn remember_name(&mut self, ip: Ipv4Addr, name: &str, now: Instant, until: Instant) {
        if !self.names.contains_key(&ip) && self.names.len() >= MAX_NAMED_ADDRS {
            self.names.retain(|_, v| {
                v.retain(|(_, t)| *t > now);
                !v.is_empty()
            });
            if self.names.len() >= MAX_NAMED_ADDRS
                && let Some(k) = self.names.keys().next().copied()
            {
                self.names.remove(&k);
            }
        }
        let v = self.names.entry(ip).or_default();
        if let Some(e) = v.iter_mut().find(|(n, _)| n == name) {
            e.1 = e.1.max(until);
        } else if v.len() < 8 {
            v.push((name.to_owned(), until));
        } else {
            v.sort_by_key(|(_, t)| *t);
            v[0] = (name.to_owned(), until);
        }
    }

    /// The live names kiln's DNS answered `ip` for.
    fn names_of(&self, ip: Ipv4Addr, now: Instant) -> impl Iterator<Item = &str> {
        self.names
            .get(&ip)
            .into_iter()
            .flatten()
            .filter(move |(_, t)| *t > now)
            .map(|(n, _)| n.as_str())
    }

    /// Address-class check alone: `Err(reason)` when the class closes `ip` under the policy.
    fn dest_class_verdict(&self, ip: Ipv4Addr) -> Result<(), RefusalReason> {
        match addr::classify(ip, self.guest.gateway, &self.host) {
            Class::Open => Ok(()),
            Class::Closed(r) => Err(r),
            Class::Guarded(r) => {
                if self
                    .policy
                    .rules()
                    .iter()
                    .any(|rule| addr::rule_names(rule, ip, &self.host))
                {
                    Ok(())
                } else {
                    Err(r)
                }
            }
        }
    }

    fn verdict(&self, proto: Proto, dst: Ipv4Addr, port: Option<u16>, now: Instant) -> Verdict {
        let first_name = || self.names_of(dst, now).next().map(str::to_owned);
        if let Err(r) = self.dest_class_verdict(dst) {
            return Verdict::Refuse(r, first_name());
        }
        let rules = match &self.policy {
            Policy::Nat => return Verdict::Allow,
            Policy::Allow(r) => r,
        };
        if rules.iter().any(|r| r.contains_ip(dst) && admits(r, port)) {
            return Verdict::Allow;
        }
        if self
            .names_of(dst, now)
            .any(|n| self.policy.name_admits(n, port))
        {
            return if proto == Proto::Tcp {
                Verdict::Inspect
            } else {
                Verdict::Allow
            };
        }
        Verdict::Refuse(RefusalReason::NotAllowed, first_name())
    }

    /// Drops expired flows and stale names.
    pub fn expire(&mut self, now: Instant) {
        self.flows.retain(|k, f| !f.expired(k.proto, now));
        self.names.retain(|_, v| {
            v.retain(|(_, t)| *t > now);
            !v.is_empty()
        });
    }

    /// Room for one more flow (evicting closed and expired ones when full).
    fn has_room(&mut self, now: Instant) -> bool {
        if self.flows.len() < self.max_flows {
            return true;
        }
        self.flows
            .retain(|k, f| !f.closed() && !f.expired(k.proto, now));
        self.flows.len() < self.max_flows
    }

    fn inspecting(&self) -> usize {
        self.flows
            .values()
            .filter(|f| f.tcp.as_ref().is_some_and(|t| t.hold.is_some()))
            .count()
    }

    fn datagram(
        &mut self,
        frame: &[u8],
        ip_packet: &[u8],
        gw_mac: [u8; 6],
        key: Key,
        now: Now,
        out: &mut Output,
    ) {
        if let Some(f) = self.flows.get_mut(&key)
            && !f.expired(key.proto, now.mono)
        {
            f.last = now.mono;
            out.to_passt.push(frame.to_vec());
            return;
        }
        self.flows.remove(&key);
        let port = (key.proto == Proto::Udp).then_some(key.dport);
        let dest = match port {
            Some(p) => format!("{}:{p}", key.dst),
            None => key.dst.to_string(),
        };
        let reason = match self.verdict(key.proto, key.dst, port, now.mono) {
            Verdict::Refuse(r, name) => Some((r, name)),
            _ if !self.has_room(now.mono) => Some((RefusalReason::Limit, None)),
            _ => None,
        };
        if let Some((r, name)) = reason {
            let f = frames::icmp_prohibited(&self.guest, gw_mac, ip_packet);
            self.emit_to_guest(out, f);
            return self.refuse(now, key.proto.name(), dest, name, r);
        }
        self.stats.connections += 1;
        self.flows.insert(
            key,
            Flow {
                gw_mac,
                last: now.mono,
                name: None,
                tcp: None,
            },
        );
        out.to_passt.push(frame.to_vec());
    }

    fn tcp(
        &mut self,
        frame: &[u8],
        gw_mac: [u8; 6],
        dst: Ipv4Addr,
        tcp: &TcpSlice<'_>,
        now: Now,
        out: &mut Output,
    ) {
        let key = Key {
            proto: Proto::Tcp,
            sport: tcp.source_port(),
            dst,
            dport: tcp.destination_port(),
        };
        let seq = tcp.sequence_number();
        let len = tcp.payload().len() as u32;
        let is_syn = tcp.syn() && !tcp.ack();
        let known = self
            .flows
            .get(&key)
            .is_some_and(|f| !(f.expired(Proto::Tcp, now.mono) || (is_syn && f.closed())));
        if !known {
            self.flows.remove(&key);
            if !is_syn || tcp.rst() {
                return; // segment of an unknown flow
            }
            let dest = format!("{dst}:{}", key.dport);
            let mut refusal = match self.verdict(Proto::Tcp, dst, Some(key.dport), now.mono) {
                Verdict::Refuse(r, name) => Some((r, name, false)),
                Verdict::Allow => None,
                Verdict::Inspect => Some((RefusalReason::Limit, None, true)),
            };
            let inspect = matches!(refusal, Some((_, _, true)));
            if inspect && self.inspecting() < MAX_INSPECTING {
                refusal = None;
            }
            if refusal.is_none() && !self.has_room(now.mono) {
                refusal = Some((RefusalReason::Limit, None, false));
            }
            if let Some((r, name, _)) = refusal {
                let ack = seq.wrapping_add(1).wrapping_add(len);
                let f = frames::rst(
                    gw_mac,
                    self.guest.mac.0,
                    dst,
                    self.guest.address,
                    key.dport,
                    key.sport,
                    0,
                    Some(ack),
                );
                self.emit_to_guest(out, f);
                return self.refuse(now, "tcp", dest, name, r);
            }
            self.stats.connections += 1;
            let start = seq.wrapping_add(1);
            self.flows.insert(
                key,
                Flow {
                    gw_mac,
                    last: now.mono,
                    name: None,
                    tcp: Some(TcpState {
                        guest_next: start.wrapping_add(len),
                        server_next: None,
                        guest_fin: false,
                        server_fin: false,
                        reset: false,
                        handshake_acked: false,
                        guest_wscale: tcp
                            .options_iterator()
                            .find_map(|o| match o {
                                Ok(etherparse::TcpOptionElement::WindowScale(w)) => Some(w),
                                _ => None,
                            })
                            .unwrap_or(0),
                        half: None,
                        hold: inspect.then(|| Hold {
                            start,
                            bytes: Vec::new(),
                            frames: Vec::new(),
                        }),
                    }),
                },
            );
            out.to_passt.push(frame.to_vec());
            return;
        }
        let Some(flow) = self.flows.get_mut(&key) else {
            return;
        };
        flow.last = now.mono;
        let Some(t) = flow.tcp.as_mut() else {
            return;
        };
        if tcp.rst() {
            t.reset = true;
            out.to_passt.push(frame.to_vec());
            return;
        }
        let Some(hold) = t.hold.as_mut() else {
            let end = seq.wrapping_add(len).wrapping_add(u32::from(tcp.fin()));
            if tcp_seq_after(end, t.guest_next) {
                t.guest_next = end;
            }
            if let Some(h) = t.half.as_mut() {
                if h.fin_sent {
                    return; // passt forgot the connection; the guest ACKs kiln's FIN
                }
                if tcp.ack() {
                    let ack = tcp.acknowledgment_number();
                    if tcp_seq_after(ack, h.guest_ack) {
                        h.guest_ack = ack;
                    }
                    h.guest_win = tcp.window_size();
                    if tcp_seq_after(ack, h.consumed) {
                        let mut f = frame.to_vec();
                        frames::set_tcp_ack(&mut f, h.consumed);
                        out.to_passt.push(f);
                        return;
                    }
                }
                out.to_passt.push(frame.to_vec());
                return;
            }
            t.guest_fin |= tcp.fin();
            let half = tcp.fin() && t.guest_fin_forwarded(frame, now.mono);
            t.handshake_acked = true;
            out.to_passt.push(frame.to_vec());
            if half {
                self.half_closes.insert(key);
            }
            return;
        };
        // Inspecting: hold payload until the name is known.
        if len == 0 && !tcp.fin() {
            // A pure ACK (of server data, e.g. a greeting): passt needs it.
            t.handshake_acked = true;
            out.to_passt.push(frame.to_vec());
            return;
        }
        let off = seq.wrapping_sub(hold.start) as usize;
        let have = hold.bytes.len();
        if off > have {
            return; // out of order (or before the stream): the guest retransmits
        }
        let end = off + len as usize;
        if end > have || tcp.fin() {
            if end > have {
                hold.bytes.extend_from_slice(&tcp.payload()[have - off..]);
            }
            hold.frames.push(frame.to_vec());
        } else {
            return; // retransmission of held bytes
        }
        let verdict = if tcp.fin()
            || hold.bytes.len() >= MAX_INSPECT_BYTES
            || hold.frames.len() >= MAX_HELD_FRAMES
        {
            inspect::inspect_final(&hold.bytes)
        } else {
            inspect::inspect(&hold.bytes)
        };
        if tcp.fin() {
            t.guest_fin = true;
        }
        self.inspected(key, verdict, now, out);
    }

    fn inspected(&mut self, key: Key, verdict: Inspection, now: Now, out: &mut Output) {
        let name = match verdict {
            Inspection::NeedMore => return,
            Inspection::Other => None,
            Inspection::Tls(n) | Inspection::Http(n) => Some(n),
        };
        let allowed = match &name {
            None => true,
            Some(Some(n)) => self.policy.name_admits(n, Some(key.dport)),
            Some(None) => false,
        };
        let Some(flow) = self.flows.get_mut(&key) else {
            return;
        };
        let Some(t) = flow.tcp.as_mut() else {
            return;
        };
        let Some(hold) = t.hold.take() else {
            return;
        };
        if allowed {
            flow.name = name.flatten();
            t.guest_next = hold
                .start
                .wrapping_add(hold.bytes.len() as u32)
                .wrapping_add(u32::from(t.guest_fin));
            let half = t.guest_fin
                && hold
                    .frames
                    .last()
                    .is_some_and(|last| t.guest_fin_forwarded(last, now.mono));
            out.to_passt.extend(hold.frames);
            if half {
                self.half_closes.insert(key);
            }
            return;
        }
        // Refuse: RST to the guest (at the server's next sequence number) and to passt (at
        // the first held byte, which passt has not seen).
        t.reset = true;
        t.guest_next = hold.start;
        let guest_acked = hold.start.wrapping_add(hold.bytes.len() as u32);
        let name = name.flatten();
        self.reset_both(key, Some(guest_acked), out);
        self.refuse(
            now,
            "tcp",
            format!("{}:{}", key.dst, key.dport),
            name,
            RefusalReason::NameMismatch,
        );
    }

    /// RST|ACK to the guest and RST to passt for flow `key`. `guest_acked` overrides what the
    /// RST to the guest acknowledges (default: what passt has seen).
    fn reset_both(&mut self, key: Key, guest_acked: Option<u32>, out: &mut Output) {
        let Some(flow) = self.flows.get(&key) else {
            return;
        };
        let Some(t) = flow.tcp.as_ref() else {
            return;
        };
        let gw_mac = flow.gw_mac;
        let guest = self.guest.clone();
        let to_guest = frames::rst(
            gw_mac,
            guest.mac.0,
            key.dst,
            guest.address,
            key.dport,
            key.sport,
            t.server_next.unwrap_or(0),
            Some(guest_acked.unwrap_or(t.guest_next)),
        );
        let to_passt = frames::rst(
            guest.mac.0,
            gw_mac,
            guest.address,
            key.dst,
            key.sport,
            key.dport,
            t.guest_next,
            None,
        );
        self.emit_to_guest(out, to_guest);
        out.to_passt.push(to_passt);
    }

    /// Handles one frame from passt; returns whether to deliver it to the guest (the frame
    /// only updates the state of flows the guest opened; it is held back only by the
    /// half-close workaround, see [`HalfClose`], which may also queue resets in `out`).
    pub fn from_passt(&mut self, frame: &[u8], now: Now, out: &mut Output) -> bool {
        self.stats.bytes_in += frame.len() as u64;
        if frame.len() < 14 || frame[12..14] != [8, 0] {
            return true;
        }
        let Ok(ip) = Ipv4Slice::from_slice(&frame[14..]) else {
            return true;
        };
        if ip.payload().ip_number != IpNumber::TCP || ip.payload().fragmented {
            return true;
        }
        let Ok(tcp) = TcpSlice::from_slice(ip.payload().payload) else {
            return true;
        };
        let key = Key {
            proto: Proto::Tcp,
            sport: tcp.destination_port(),
            dst: ip.header().source_addr(),
            dport: tcp.source_port(),
        };
        let mut bogus = false;
        if let Some(f) = self.flows.get_mut(&key)
            && let Some(t) = f.tcp.as_mut()
        {
            f.last = now.mono;
            let len = tcp.payload().len() as u32;
            if let Some(h) = t.half.as_mut()
                && !tcp.rst()
                && len > 0
            {
                if let Some((_, acked)) = h.probe
                    && !tcp_seq_after(acked, tcp.sequence_number())
                {
                    // passt's answer to the probe: the server is still open and passt now
                    // sends already-sent bytes as new ones; nothing good can follow (reset
                    // below, once the flow is no longer borrowed). A retransmission from
                    // before the probe's ACK is harmless and passes.
                    tracing::debug!(dst = %key.dst, dport = key.dport, "passt half-close: connection still open after the probe; resetting");
                    bogus = true;
                }
                if !bogus {
                    let end = tcp.sequence_number().wrapping_add(len);
                    if t.server_next.is_none_or(|n| tcp_seq_after(end, n)) {
                        h.last_data = now.mono;
                    }
                }
            }
            if bogus {
                t.half = None;
                t.reset = true;
                self.reset_both(key, None, out);
                return false;
            }
            let end = tcp
                .sequence_number()
                .wrapping_add(tcp.payload().len() as u32)
                .wrapping_add(u32::from(tcp.syn()))
                .wrapping_add(u32::from(tcp.fin()));
            match t.server_next {
                Some(n) if !tcp_seq_after(end, n) => {}
                _ if tcp.rst() => {}
                _ => t.server_next = Some(end),
            }
            t.reset |= tcp.rst();
            t.server_fin |= tcp.fin();
        }
        true
    }

    /// Drives the half-close workaround ([`HalfClose`]): the probe ACK to passt once the guest
    /// has acknowledged everything and passt has been quiet, then the FIN to the guest when
    /// passt stayed silent. The relay calls it every few tens of milliseconds.
    pub fn poll(&mut self, now: Now, out: &mut Output) {
        let guest = self.guest.clone();
        let mut stuck = Vec::new();
        let flows = &mut self.flows;
        self.half_closes.retain(|key| half_active(flows.get(key)));
        for key in &self.half_closes {
            let Some(flow) = flows.get_mut(key) else {
                continue;
            };
            let Some(t) = flow.tcp.as_mut() else {
                continue;
            };
            let Some(h) = t.half.as_mut() else {
                continue;
            };
            let Some(server_next) = t.server_next else {
                continue;
            };
            match h.probe {
                None => {
                    // Only data after the guest's FIN needs the workaround; all of it must be
                    // acknowledged, and passt quiet.
                    if server_next == h.consumed
                        || h.guest_ack != server_next
                        || now.mono.saturating_duration_since(h.last_data) < HALF_CLOSE_QUIET
                    {
                        continue;
                    }
                    if server_next.wrapping_sub(h.consumed) >= h.window {
                        // passt filled the window it will ever use: more may wait in its
                        // socket that it can never send. A reset, not a silent truncation.
                        stuck.push(*key);
                        continue;
                    }
                    h.probe = Some((now.mono, server_next));
                    out.to_passt.push(frames::tcp_ack(
                        guest.mac.0,
                        flow.gw_mac,
                        guest.address,
                        key.dst,
                        key.sport,
                        key.dport,
                        t.guest_next,
                        server_next,
                        h.guest_win,
                        false,
                    ));
                }
                Some((at, _)) if now.mono.saturating_duration_since(at) >= HALF_CLOSE_GRACE => {
                    // passt closed the connection without its FIN: send it in its place.
                    h.fin_sent = true;
                    t.server_fin = true;
                    t.server_next = Some(server_next.wrapping_add(1));
                    let f = frames::tcp_ack(
                        flow.gw_mac,
                        guest.mac.0,
                        key.dst,
                        guest.address,
                        key.dport,
                        key.sport,
                        server_next,
                        t.guest_next,
                        65535,
                        true,
                    );
                    self.stats.bytes_in += f.len() as u64;
                    out.to_guest.push(f);
                }
                Some(_) => {}
            }
        }
        self.half_closes.retain(|key| half_active(flows.get(key)));
        for key in stuck {
            tracing::debug!(dst = %key.dst, dport = key.dport, "passt half-close: window exhausted after the guest's FIN; resetting");
            if let Some(t) = self.flows.get_mut(&key).and_then(|f| f.tcp.as_mut()) {
                t.half = None;
                t.reset = true;
            }
            self.reset_both(key, None, out);
        }
    }

    /// Whether any connection is in the half-close workaround (the relay polls meanwhile).
    pub fn half_closing(&self) -> bool {
        !self.half_closes.is_empty()
    }

    /// Replaces the policy; flows the new one no longer allows are reset both ways at once
    /// (TCP) or forgotten (UDP, ICMP: their next datagram is decided afresh).
    pub fn set_policy(
        &mut self,
        spec: &NetworkSpec,
        now: Now,
        out: &mut Output,
    ) -> Result<(), FilterError> {
        self.policy = Policy::from_spec(spec)?;
        let keys: Vec<Key> = self.flows.keys().copied().collect();
        for key in keys {
            let port = (key.proto != Proto::Icmp).then_some(key.dport);
            let keep = match self.verdict(key.proto, key.dst, port, now.mono) {
                Verdict::Allow => true,
                // The address is still allowed by a name: a flow whose SNI/Host was checked
                // keeps that name's verdict; one still being inspected or carrying neither
                // TLS nor HTTP stays.
                Verdict::Inspect => self.flows.get(&key).is_some_and(|f| {
                    f.tcp.as_ref().is_some_and(|t| t.hold.is_some())
                        || f.name
                            .as_deref()
                            .is_none_or(|n| self.policy.name_admits(n, port))
                }),
                Verdict::Refuse(..) => false,
            };
            if keep {
                continue;
            }
            let closed = self.flows.get(&key).is_none_or(Flow::closed);
            if key.proto == Proto::Tcp && !closed {
                self.reset_both(key, None, out);
                let name = self.flows.get(&key).and_then(|f| f.name.clone());
                self.refuse(
                    now,
                    "tcp",
                    format!("{}:{}", key.dst, key.dport),
                    name,
                    RefusalReason::NotAllowed,
                );
            }
            self.flows.remove(&key);
        }
        Ok(())
    }

    /// Forgets every flow, resetting open TCP connections towards the guest (passt was
    /// restarted and lost their host sockets).
    pub fn reset_all(&mut self, out: &mut Output) {
        let keys: Vec<Key> = self.flows.keys().copied().collect();
        for key in keys {
            let open = self.flows.get(&key).is_some_and(|f| !f.closed());
            if key.proto == Proto::Tcp && open {
                self.reset_both(key, None, out);
            }
        }
        // The RSTs meant for passt would reach a fresh passt that never saw these flows.
        out.to_passt.clear();
        self.flows.clear();
    }
}

#[cfg(test)]
mod tests;
