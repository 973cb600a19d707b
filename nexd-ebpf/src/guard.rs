//! The leak guard, on the uplink's egress while exit mode is active with
//! `--kill-switch`. It lets through only:
//!
//! * WireGuard's own packets (carrying its fwmark) to a mesh endpoint;
//! * packets to a bypass prefix (LAN, excluded routes, endpoints,
//!   link-local, multicast, broadcast);
//! * what keeps the uplink itself alive: non-IP frames (ARP), ICMPv6
//!   neighbour discovery (types 133-137), DHCPv4 (to port 67 from 68) and
//!   DHCPv6 (to port 547).
//!
//! Everything else is dropped and counted: VLAN-tagged frames and malformed
//! IP headers too (they cannot be classified, so they must not pass).

use aya_ebpf::{macros::classifier, programs::TcContext};
use nexd_common::{
    config::{FLAG_GUARD, FLAG_LOG_DROPS},
    counters::Counter,
};

use crate::{
    TC_NEXT,
    maps::{BYPASS_V4, BYPASS_V6, config, count, in_trie4, in_trie6, is_endpoint4, is_endpoint6},
    parse::{Parsed, V4, V6, parse, read},
};

const TC_ACT_SHOT: i32 = 2;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

#[inline(always)]
fn udp_ports(ctx: &TcContext, l4: usize) -> Option<(u16, u16)> {
    let p = read::<[u8; 4]>(ctx, l4)?;
    Some((
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    ))
}

#[inline(always)]
fn allowed_v4(ctx: &TcContext, p: &V4, mark: u32, fwmark: u32) -> bool {
    if mark == fwmark && is_endpoint4(p.dst) {
        return true;
    }
    if in_trie4(&BYPASS_V4, p.dst) {
        return true;
    }
    p.proto == IPPROTO_UDP && !p.later_fragment && udp_ports(ctx, p.l4) == Some((68, 67))
}

#[inline(always)]
fn allowed_v6(ctx: &TcContext, p: &V6, mark: u32, fwmark: u32) -> bool {
    if mark == fwmark && is_endpoint6(p.dst) {
        return true;
    }
    if in_trie6(&BYPASS_V6, p.dst) {
        return true;
    }
    match p.next {
        IPPROTO_ICMPV6 => read::<u8>(ctx, p.l4).is_some_and(|t| (133..=137).contains(&t)),
        IPPROTO_UDP => udp_ports(ctx, p.l4).is_some_and(|(_, dport)| dport == 547),
        _ => false,
    }
}

#[inline(always)]
fn guard(ctx: &TcContext, l2: bool) -> i32 {
    let cfg = config();
    if cfg.flags & FLAG_GUARD == 0 {
        return TC_NEXT;
    }
    let len = ctx.len();
    // SAFETY: the skb pointer is valid for the program's run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let allowed = match parse(ctx, l2) {
        Parsed::NotIp => {
            count(Counter::NotIp, len);
            return TC_NEXT;
        }
        Parsed::Vlan => {
            count(Counter::Vlan, len);
            false
        }
        Parsed::Malformed => {
            count(Counter::Malformed, len);
            false
        }
        Parsed::V4(p) => {
            let ok = allowed_v4(ctx, &p, mark, cfg.fwmark);
            if !ok && cfg.flags & FLAG_LOG_DROPS != 0 {
                aya_log_ebpf::debug!(ctx, "leak guard dropped a packet to {:i}", p.dst);
            }
            ok
        }
        Parsed::V6(p) => {
            let ok = allowed_v6(ctx, &p, mark, cfg.fwmark);
            if !ok && cfg.flags & FLAG_LOG_DROPS != 0 {
                aya_log_ebpf::debug!(ctx, "leak guard dropped a packet to {:i}", p.dst);
            }
            ok
        }
    };
    if allowed {
        count(Counter::GuardPassed, len);
        TC_NEXT
    } else {
        count(Counter::GuardDropped, len);
        TC_ACT_SHOT
    }
}

#[classifier]
pub fn nexd_guard(ctx: TcContext) -> i32 {
    guard(&ctx, true)
}

#[classifier]
pub fn nexd_guard_l3(ctx: TcContext) -> i32 {
    guard(&ctx, false)
}
