//! The leak guard, on every uplink's egress while the kill switch holds
//! (`--kill-switch` with exit mode wanted: waiting, active or held). It
//! lets out exactly:
//!
//! * WireGuard's own packets: UDP from WireGuard's listen port, carrying
//!   its fwmark, to a mesh peer's endpoint address *and* port (an
//!   application cannot forge all three: the fwmark needs CAP_NET_ADMIN),
//!   and marked fragments, whose ports cannot be read;
//! * destinations the operator lets out directly: excluded routes and
//!   `--kill-switch-allow` prefixes (the guard trie's `GUARD_ALLOW`);
//! * what keeps the uplink itself alive, and no more: ARP; DHCPv4 from
//!   port 68 to 67, broadcast or to the uplink's own subnet (the server of
//!   a unicast renewal); DHCPv6 from 546 to 547 to ff02::1:2 or a
//!   link-local address; ICMPv6 neighbour discovery (133-137) with hop
//!   limit 255 to a link-local or link-scope multicast address, and MLD
//!   (hop limit 1, to link-scope multicast: what an MLD-snooping switch
//!   needs to deliver neighbour solicitations).
//!
//! Everything else is dropped and counted: every other EtherType (PPPoE,
//! MPLS, QinQ), VLAN-tagged frames and malformed IP headers too (they
//! cannot be classified, so they must not pass).

use aya_ebpf::{macros::classifier, programs::TcContext};
use nexd_common::{
    config::{FLAG_GUARD, FLAG_LOG_DROPS, GUARD_ALLOW, GUARD_UPLINK_NET},
    counters::Counter,
};

use crate::{
    TC_NEXT,
    maps::{config, count, guard_flags4, guard_flags6, is_endpoint4, is_endpoint6},
    mss::IPPROTO_UDP,
    parse::{Parsed, V4, V6, parse, read},
};

const TC_ACT_SHOT: i32 = 2;
const IPPROTO_ICMPV6: u8 = 58;
/// The ports of a packet that has none (not UDP, a later fragment, too
/// short): port 0 matches no check below. Plain values rather than an
/// `Option`: LLVM may compare an `Option`'s payload even when it is
/// `None`, reading a stack slot nothing wrote on that path, and some
/// kernels' verifiers (Debian's arm64 6.1.0-50) refuse that read.
const NO_PORTS: (u16, u16) = (0, 0);
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_HOPOPTS: u8 = 0;

#[inline(always)]
fn udp_ports(ctx: &TcContext, l4: usize) -> (u16, u16) {
    match read::<[u8; 4]>(ctx, l4) {
        Some(p) => (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ),
        None => NO_PORTS,
    }
}

/// fe80::/10.
#[inline(always)]
fn link_local6(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// ff02::/16, link-scope multicast (all-nodes, all-routers, solicited-node,
/// All_DHCP_Relay_Agents_and_Servers).
#[inline(always)]
fn link_multicast6(a: &[u8; 16]) -> bool {
    a[0] == 0xff && a[1] == 0x02
}

/// ff02::1:2, All_DHCP_Relay_Agents_and_Servers.
#[inline(always)]
fn dhcp6_servers(a: &[u8; 16]) -> bool {
    link_multicast6(a) && a[2..13].iter().all(|b| *b == 0) && a[13] == 1 && a[14] == 0 && a[15] == 2
}

#[inline(always)]
fn allowed_v4(ctx: &TcContext, p: &V4, mark: u32, fwmark: u32, listen_port: u16) -> bool {
    let ports = if p.proto == IPPROTO_UDP && !p.later_fragment {
        udp_ports(ctx, p.l4)
    } else {
        NO_PORTS
    };
    let (sport, dport) = ports;
    if ports != NO_PORTS && mark == fwmark && sport == listen_port && is_endpoint4(p.dst, dport) {
        return true;
    }
    // A later fragment has no ports to check; WireGuard's (marked: only
    // CAP_NET_ADMIN can set a mark) may pass, so a path that fragments the
    // tunnel's UDP still works.
    if p.later_fragment && mark == fwmark {
        return true;
    }
    let flags = guard_flags4(p.dst);
    if flags & GUARD_ALLOW != 0 {
        return true;
    }
    ports == (68, 67) && (p.dst == [255, 255, 255, 255] || flags & GUARD_UPLINK_NET != 0)
}

#[inline(always)]
fn allowed_v6(ctx: &TcContext, p: &V6, mark: u32, fwmark: u32, listen_port: u16) -> bool {
    let ports = if p.next == IPPROTO_UDP {
        udp_ports(ctx, p.l4)
    } else {
        NO_PORTS
    };
    let (sport, dport) = ports;
    if ports != NO_PORTS && mark == fwmark && sport == listen_port && is_endpoint6(p.dst, dport) {
        return true;
    }
    // Fragments (the ports sit behind the fragment header): as IPv4's.
    if p.next == IPPROTO_FRAGMENT && mark == fwmark {
        return true;
    }
    if guard_flags6(p.dst) & GUARD_ALLOW != 0 {
        return true;
    }
    match p.next {
        IPPROTO_ICMPV6 => {
            let Some(t) = read::<u8>(ctx, p.l4) else {
                return false;
            };
            let link_scope = link_local6(&p.dst) || link_multicast6(&p.dst);
            // Neighbour discovery (hop limit 255), and the multicast
            // listener reports that keep solicited-node groups working on
            // MLD-snooping switches (hop limit 1).
            link_scope
                && ((p.hop_limit == 255 && (133..=137).contains(&t))
                    || (p.hop_limit == 1 && matches!(t, 131 | 132 | 143)))
        }
        // MLD reports carry a hop-by-hop header (router alert) first.
        IPPROTO_HOPOPTS => p.hop_limit == 1 && link_multicast6(&p.dst),
        IPPROTO_UDP => ports == (546, 547) && (dhcp6_servers(&p.dst) || link_local6(&p.dst)),
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
        Parsed::Arp => {
            count(Counter::NotIp, len);
            true
        }
        Parsed::NotIp => {
            count(Counter::NotIp, len);
            false
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
            let ok = allowed_v4(ctx, &p, mark, cfg.fwmark, cfg.listen_port);
            if !ok && cfg.flags & FLAG_LOG_DROPS != 0 {
                aya_log_ebpf::debug!(ctx, "leak guard dropped a packet to {:i}", p.dst);
            }
            ok
        }
        Parsed::V6(p) => {
            let ok = allowed_v6(ctx, &p, mark, cfg.fwmark, cfg.listen_port);
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
