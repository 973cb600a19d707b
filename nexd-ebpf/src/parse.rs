//! Header parsing shared by the classifiers. Every read is bounds-checked
//! against `data_end` (the verifier insists, and so do we); headers that
//! are not in the linear part of the skb are pulled in once, first.
//!
//! Stated rules for odd input:
//! * shorter than its headers, wrong IP version, IPv4 IHL < 5 or a total
//!   length below the header length: `Malformed`;
//! * 802.1Q / 802.1ad tags (in the frame or in skb metadata): `Vlan`;
//! * ARP: `Arp` (the uplink needs it; the guard lets it out);
//! * any other EtherType (PPPoE, MPLS, QinQ 0x9100, LLDP...): `NotIp`;
//! * IPv4 fragments: classified by their destination like any packet (the
//!   destination is in every fragment); only first fragments carry ports,
//!   so port-based checks skip later fragments.

use aya_ebpf::programs::TcContext;
use core::mem::size_of;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_P_ARP: u16 = 0x0806;

/// What a packet is, as far as nexd cares.
pub enum Parsed {
    Arp,
    NotIp,
    Vlan,
    Malformed,
    V4(V4),
    V6(V6),
}

pub struct V4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    /// Offset of the L4 header from the start of the packet data.
    pub l4: usize,
    /// A fragment other than the first (no L4 header).
    pub later_fragment: bool,
}

pub struct V6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The fixed header's next header (extension headers are not followed).
    pub next: u8,
    /// Neighbour discovery is valid only with 255 (never forwarded).
    pub hop_limit: u8,
    pub l4: usize,
}

/// A pointer to a `T` at `off`, if the whole `T` lies within the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Reads a `T` at `off` (unaligned), if in bounds.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the T lies within [data, data_end).
    ptr_at::<T>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Makes the first bytes (enough for link, IP and L4 port headers)
/// directly readable when the skb keeps them in paged data.
#[inline(always)]
fn linearize(ctx: &TcContext, l2: usize) {
    let want = (l2 + 40 + 8) as u32;
    let have = (ctx.data_end() - ctx.data()) as u32;
    let len = ctx.len();
    if have < want && have < len {
        let _ = ctx.pull_data(if len < want { len } else { want });
    }
}

/// Parses the packet; `l2` says whether it starts with an Ethernet header
/// (LAN and uplink NICs) or directly with IP (tun/WireGuard/PPP).
#[inline(always)]
pub fn parse(ctx: &TcContext, l2: bool) -> Parsed {
    let (proto, off) = if l2 {
        // SAFETY: the skb pointer is valid for the program's run.
        if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
            return Parsed::Vlan;
        }
        linearize(ctx, ETH_HLEN);
        let Some(eth_type) = read::<u16>(ctx, 12) else {
            return Parsed::Malformed;
        };
        let eth_type = u16::from_be(eth_type);
        if eth_type == ETH_P_8021Q || eth_type == ETH_P_8021AD {
            return Parsed::Vlan;
        }
        (eth_type, ETH_HLEN)
    } else {
        linearize(ctx, 0);
        // SAFETY: as above.
        (u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16), 0)
    };
    match proto {
        ETH_P_IP => parse_v4(ctx, off),
        ETH_P_IPV6 => parse_v6(ctx, off),
        ETH_P_ARP if l2 => Parsed::Arp,
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, off: usize) -> Parsed {
    let Some(hdr) = read::<[u8; 20]>(ctx, off) else {
        return Parsed::Malformed;
    };
    let version = hdr[0] >> 4;
    let ihl = (hdr[0] & 0x0f) as usize;
    let total = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if version != 4 || ihl < 5 || total < ihl * 4 {
        return Parsed::Malformed;
    }
    let frag_off = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
    Parsed::V4(V4 {
        src: [hdr[12], hdr[13], hdr[14], hdr[15]],
        dst: [hdr[16], hdr[17], hdr[18], hdr[19]],
        proto: hdr[9],
        l4: off + ihl * 4,
        later_fragment: frag_off != 0,
    })
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, off: usize) -> Parsed {
    let Some(hdr) = read::<[u8; 40]>(ctx, off) else {
        return Parsed::Malformed;
    };
    if hdr[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&hdr[24..40]);
    Parsed::V6(V6 {
        src,
        dst,
        next: hdr[6],
        hop_limit: hdr[7],
        l4: off + 40,
    })
}
