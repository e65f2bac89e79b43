//! The frames the filter makes itself: RSTs, ICMP "administratively prohibited" and DNS
//! replies from the gateway. Built with `etherparse` (checksums included); pure.

use std::net::Ipv4Addr;

use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};

use crate::GuestNet;

/// A TCP RST (with ACK when `ack` is given), no payload.
#[allow(clippy::too_many_arguments)]
pub(super) fn rst(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: Option<u32>,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, seq, 0)
        .rst();
    let b = match ack {
        Some(a) => b.ack(a),
        None => b,
    };
    let mut v = Vec::with_capacity(b.size(0));
    b.write(&mut v, &[])
        .expect("a header-only frame always serializes");
    v
}

/// ICMP destination unreachable, administratively prohibited (code 13), from the gateway,
/// quoting the refused packet's IP header and first 8 payload bytes.
pub(super) fn icmp_prohibited(guest: &GuestNet, gw_mac: [u8; 6], ip_packet: &[u8]) -> Vec<u8> {
    let ihl = usize::from(ip_packet.first().map_or(5, |b| b & 0x0f)) * 4;
    let quote = &ip_packet[..ip_packet.len().min(ihl + 8)];
    let b = PacketBuilder::ethernet2(gw_mac, guest.mac.0)
        .ipv4(guest.gateway.octets(), guest.address.octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FilterProhibited,
        ));
    let mut v = Vec::with_capacity(b.size(quote.len()));
    b.write(&mut v, quote)
        .expect("a small ICMP frame always serializes");
    v
}

/// A DNS reply datagram from the gateway's port 53 to the guest's `guest_port`.
pub(super) fn dns_reply(
    guest: &GuestNet,
    gw_mac: [u8; 6],
    guest_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(gw_mac, guest.mac.0)
        .ipv4(guest.gateway.octets(), guest.address.octets(), 64)
        .udp(53, guest_port);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("a DNS reply frame always serializes");
    v
}
