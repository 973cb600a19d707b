//! Packets for BPF_PROG_TEST_RUN: Ethernet frames carrying IPv4 or IPv6
//! with TCP or UDP, checksums included, and readers for what a program
//! changed. Shared by the program tests and the exit benchmark (`#[path]`).
#![allow(dead_code, reason = "each includer uses a different subset")]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_HLEN: usize = 14;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// One's complement sum of 16-bit big-endian words.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    p
}

/// The L4 checksum of `segment` (its checksum field included as it is).
fn l4_sum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    fold(sum16(
        segment,
        sum16(&pseudo(src, dst, proto, segment.len()), 0),
    ))
}

/// An IPv4 packet (header checksum included) in an Ethernet frame.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, frag_offset: u16, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h.extend_from_slice(&frag_offset.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = fold(sum16(&h, 0));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(l4);
    eth(0x0800, &h)
}

/// An IPv6 packet in an Ethernet frame.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(l4);
    eth(0x86DD, &h)
}

/// An IP packet of either family in an Ethernet frame.
pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, proto, 0, l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, proto, l4),
        _ => panic!("mixed families"),
    }
}

/// A TCP segment with a valid checksum. `options` is padded to a multiple
/// of 4 with EOL.
pub fn tcp_segment(src: IpAddr, dst: IpAddr, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let doff = ((20 + opts.len()) / 4) as u8;
    let mut t = vec![0xc0, 0x01, 0x01, 0xbb];
    t.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]);
    t.extend_from_slice(&[0, 0, 0, if flags & ACK != 0 { 1 } else { 0 }]);
    t.extend_from_slice(&[doff << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    t.extend_from_slice(&opts);
    t.extend_from_slice(payload);
    let c = l4_sum(src, dst, TCP, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// A whole TCP frame.
pub fn tcp_packet(src: IpAddr, dst: IpAddr, flags: u8, options: &[u8]) -> Vec<u8> {
    ip(src, dst, TCP, &tcp_segment(src, dst, flags, options, &[]))
}

/// A UDP frame with `payload` bytes.
pub fn udp_packet(src: IpAddr, dst: IpAddr, payload: usize) -> Vec<u8> {
    let mut u = 40000u16.to_be_bytes().to_vec();
    u.extend_from_slice(&443u16.to_be_bytes());
    u.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend(std::iter::repeat_n(0xab, payload));
    let c = l4_sum(src, dst, UDP, &u);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    ip(src, dst, UDP, &u)
}

/// The MSS option (kind 2, length 4).
pub fn mss_option(mss: u16) -> Vec<u8> {
    let [hi, lo] = mss.to_be_bytes();
    vec![2, 4, hi, lo]
}

/// Addresses and the L4 segment of a frame this module made.
fn split(frame: &[u8]) -> (IpAddr, IpAddr, &[u8]) {
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 == 4 {
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let s: [u8; 4] = ip[12..16].try_into().expect("v4 src");
        let d: [u8; 4] = ip[16..20].try_into().expect("v4 dst");
        (IpAddr::from(s), IpAddr::from(d), &ip[ihl..])
    } else {
        let s: [u8; 16] = ip[8..24].try_into().expect("v6 src");
        let d: [u8; 16] = ip[24..40].try_into().expect("v6 dst");
        (IpAddr::from(s), IpAddr::from(d), &ip[40..])
    }
}

/// Whether the TCP checksum of a frame is right.
pub fn tcp_checksum_ok(frame: &[u8]) -> bool {
    let (s, d, seg) = split(frame);
    // Summing a segment with its (correct) checksum gives 0 after the
    // final complement.
    l4_sum(s, d, TCP, seg) == 0
}

/// The MSS option's value in a TCP frame, if it has one.
pub fn mss_of(frame: &[u8]) -> Option<u16> {
    let (_, _, seg) = split(frame);
    let hlen = usize::from(seg[12] >> 4) * 4;
    let opts = &seg[20..hlen];
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return None,
            1 => i += 1,
            2 => return Some(u16::from_be_bytes([opts[i + 2], opts[i + 3]])),
            _ => i += usize::from(opts[i + 1]).max(2),
        }
    }
    None
}
