//! TCP MSS clamping: a SYN (or SYN-ACK) announcing a maximum segment size
//! larger than the tunnel can carry gets its MSS option lowered, so both
//! ends send segments that fit without relying on ICMP "fragmentation
//! needed" (which many networks filter: large transfers then stall).
//!
//! Used by the exit programs on both directions of the exit node's
//! WireGuard interface, and on its own (`nexd_mss_clamp`) for a LAN
//! gateway's tunnel or LAN interfaces.
//!
//! Stated rules: only TCP directly after the IP header (IPv6 extension
//! headers are not followed) and never IPv4 later fragments (no TCP
//! header); only a well-formed MSS option (kind 2, length 4) found by
//! walking the options up to the end of the header (EOL, a length below
//! 2 or the end stop the walk); never raised, only lowered. The TCP
//! checksum is updated incrementally (`bpf_l4_csum_replace`), which also
//! does the right thing for CHECKSUM_PARTIAL packets (the checksum is
//! finished later over the rewritten bytes).

use aya_ebpf::{macros::classifier, programs::TcContext};
use nexd_common::counters::Counter;

use crate::{
    TC_NEXT,
    maps::{count, mss_config},
    parse::{Parsed, parse, read},
};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const TCP_FLAG_SYN: u8 = 0x02;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
/// The fixed TCP header.
const TCP_HLEN: usize = 20;
/// The largest options area (a 60-byte header).
const MAX_OPTIONS: usize = 40;
/// Offset of the checksum in the TCP header.
const TCP_CSUM_OFF: usize = 16;

/// Makes the first `upto` bytes of the packet directly readable (or as
/// many as it has), if they are not yet.
#[inline(always)]
fn ensure_linear(ctx: &TcContext, upto: usize) {
    let have = ctx.data_end() - ctx.data();
    let len = ctx.len() as usize;
    if have < upto && have < len {
        let want = if len < upto { len } else { upto };
        let _ = ctx.pull_data(want as u32);
    }
}

/// The length of the TCP header at `l4` (20 when it cannot be read).
/// Read with a helper copy rather than a direct access: it needs no pull
/// of paged data, which would invalidate the caller's packet pointers.
#[inline(always)]
pub fn tcp_header_len(ctx: &TcContext, l4: usize) -> usize {
    match ctx.load::<u8>(l4 + 12) {
        Ok(doff) if usize::from(doff >> 4) * 4 >= TCP_HLEN => usize::from(doff >> 4) * 4,
        _ => TCP_HLEN,
    }
}

/// If the TCP segment at `l4` is a SYN announcing an MSS above `max`,
/// lowers it to `max` and fixes the checksum. Returns whether it did.
#[inline(always)]
pub fn clamp_syn(ctx: &TcContext, l4: usize, max: u16) -> bool {
    if max == 0 {
        return false;
    }
    // Data offset and flags (bytes 12 and 13 of the header).
    ensure_linear(ctx, l4 + TCP_HLEN);
    let Some([doff, flags]) = read::<[u8; 2]>(ctx, l4 + 12) else {
        return false;
    };
    if flags & TCP_FLAG_SYN == 0 {
        return false;
    }
    let hlen = usize::from(doff >> 4) * 4;
    if hlen <= TCP_HLEN {
        return false;
    }
    let opt_len = hlen - TCP_HLEN;
    ensure_linear(ctx, l4 + hlen);
    let opts = l4 + TCP_HLEN;
    // `rel` only grows and stays below MAX_OPTIONS (checked against the
    // constant, so the verifier sees the bound), so this ends within 40
    // rounds.
    let mut rel: usize = 0;
    loop {
        if rel >= opt_len || rel >= MAX_OPTIONS {
            return false;
        }
        // Kind and length together: a one-byte read at a variable offset
        // compiles to a bounds check the verifier cannot use. A NOP or EOL
        // in the very last byte then ends the walk, which is right: no MSS
        // option can follow it.
        let Some([kind, olen]) = read::<[u8; 2]>(ctx, opts + rel) else {
            return false;
        };
        match kind {
            TCPOPT_EOL => return false,
            TCPOPT_NOP => rel += 1,
            TCPOPT_MSS => {
                let Some([_, _, hi, lo]) = read::<[u8; 4]>(ctx, opts + rel) else {
                    return false;
                };
                if olen != 4 || u16::from_be_bytes([hi, lo]) <= max {
                    return false;
                }
                return rewrite_mss(ctx, l4, TCP_HLEN + rel + 2, [hi, lo], max);
            }
            _ => {
                if olen < 2 {
                    return false;
                }
                rel += usize::from(olen);
            }
        }
    }
}

/// Writes `max` over the MSS value at `pos` (from the TCP header start)
/// and updates the checksum by the difference.
#[inline(always)]
fn rewrite_mss(ctx: &TcContext, l4: usize, pos: usize, old: [u8; 2], max: u16) -> bool {
    let new = max.to_be_bytes();
    // The checksum sums 16-bit words aligned to the header's start. At an
    // even position the value is one word; at an odd one its bytes are
    // the low half of one word and the high half of the next, which adds
    // up to the byte-swapped value. The helper takes the words as they
    // lie in memory.
    let (from, to) = if pos & 1 == 0 {
        (u16::from_ne_bytes(old), u16::from_ne_bytes(new))
    } else {
        (
            u16::from_ne_bytes([old[1], old[0]]),
            u16::from_ne_bytes([new[1], new[0]]),
        )
    };
    if ctx.store(l4 + pos, &new, 0).is_err() {
        return false;
    }
    // Size 2 in the flags' low bits; not a pseudo-header field.
    ctx.l4_csum_replace(l4 + TCP_CSUM_OFF, u64::from(from), u64::from(to), 2)
        .is_ok()
}

/// Clamps a SYN in a parsed packet to the configured MSS of its family,
/// counting it. Returns whether it rewrote the packet.
#[inline(always)]
pub fn clamp_parsed(ctx: &TcContext, tcp_l4: Option<usize>, v6: bool, len: u32) -> bool {
    let Some(l4) = tcp_l4 else {
        return false;
    };
    let cfg = mss_config();
    let max = if v6 { cfg.mss_v6 } else { cfg.mss_v4 };
    let clamped = clamp_syn(ctx, l4, max);
    if clamped {
        count(Counter::MssClamped, len);
    }
    clamped
}

#[inline(always)]
fn mss_clamp(ctx: &TcContext, l2: bool) -> i32 {
    let len = ctx.len();
    let (tcp_l4, v6) = match parse(ctx, l2) {
        Parsed::V4(p) if p.proto == IPPROTO_TCP && !p.later_fragment => (Some(p.l4), false),
        Parsed::V6(p) if p.next == IPPROTO_TCP => (Some(p.l4), true),
        _ => return TC_NEXT,
    };
    clamp_parsed(ctx, tcp_l4, v6, len);
    TC_NEXT
}

/// The MSS clamp alone, for links without an Ethernet header (the
/// WireGuard interface of a LAN gateway), either direction.
#[classifier]
pub fn nexd_mss_clamp(ctx: TcContext) -> i32 {
    mss_clamp(&ctx, false)
}

/// The MSS clamp alone, for Ethernet links (a LAN interface), either
/// direction.
#[classifier]
pub fn nexd_mss_clamp_l2(ctx: TcContext) -> i32 {
    mss_clamp(&ctx, true)
}
