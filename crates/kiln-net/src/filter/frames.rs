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

/// A TCP segment without payload: ACK `ack`, with FIN when `fin` (the half-close workaround's
/// probe ACK to passt and FIN to the guest).
#[allow(clippy::too_many_arguments)]
pub(super) fn tcp_ack(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    window: u16,
    fin: bool,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, seq, window)
        .ack(ack);
    let b = if fin { b.fin() } else { b };
    let mut v = Vec::with_capacity(b.size(0));
    b.write(&mut v, &[])
        .expect("a header-only frame always serializes");
    v
}

/// Rewrites the acknowledgment number of the TCP segment in `frame` (Ethernet + IPv4 + TCP,
/// already parsed by the caller) to `ack`, updating the TCP checksum incrementally
/// (RFC 1624). Does nothing if the frame is too short.
pub(super) fn set_tcp_ack(frame: &mut [u8], ack: u32) {
    let Some(&vihl) = frame.get(14) else {
        return;
    };
    let tcp = 14 + usize::from(vihl & 0x0f) * 4;
    if frame.len() < tcp + 20 {
        return;
    }
    let old: [u8; 4] = frame[tcp + 8..tcp + 12].try_into().expect("4 bytes");
    let new = ack.to_be_bytes();
    let mut sum = u32::from(!u16::from_be_bytes([frame[tcp + 16], frame[tcp + 17]]));
    for i in [0, 2] {
        sum += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[tcp + 8..tcp + 12].copy_from_slice(&new);
    frame[tcp + 16..tcp + 18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}
