//! The steering classifier, on the ingress of LAN-facing interfaces of a
//! gateway in exit-node client mode. One lookup per packet decides:
//!
//! * destination in a mesh prefix: direct to the peer (left alone; the main
//!   table routes the mesh prefix into the tunnel, where cryptokey routing
//!   picks the peer);
//! * destination in a bypass prefix (LAN, excluded routes, link-local,
//!   multicast; not the peers' endpoints, which whoever moves an endpoint
//!   would choose): marked with WireGuard's fwmark, which policy
//!   routing treats like WireGuard's own traffic: main table, out directly;
//! * anything else: left unmarked, so policy routing sends it into the
//!   tunnel, to the exit node.
//!
//! Marking (not redirecting) keeps the kernel's forwarding semantics: TTL,
//! netfilter (the gateway masquerades LAN traffic into the tunnel), PMTU.
//! Nothing is dropped here.

use aya_ebpf::{macros::classifier, programs::TcContext};
use nexd_common::{config::FLAG_STEER, counters::Counter};

use crate::{
    TC_NEXT,
    maps::{BYPASS_V4, BYPASS_V6, MESH_V4, MESH_V6, config, count, in_trie4, in_trie6},
    parse::{Parsed, parse},
};

#[inline(always)]
fn steer(ctx: &TcContext, l2: bool) -> i32 {
    let cfg = config();
    if cfg.flags & FLAG_STEER == 0 {
        return TC_NEXT;
    }
    let len = ctx.len();
    let (mesh, bypass) = match parse(ctx, l2) {
        Parsed::Arp | Parsed::NotIp => {
            count(Counter::NotIp, len);
            return TC_NEXT;
        }
        Parsed::Vlan => {
            count(Counter::Vlan, len);
            return TC_NEXT;
        }
        Parsed::Malformed => {
            count(Counter::Malformed, len);
            return TC_NEXT;
        }
        Parsed::V4(p) => (in_trie4(&MESH_V4, p.dst), in_trie4(&BYPASS_V4, p.dst)),
        Parsed::V6(p) => (in_trie6(&MESH_V6, p.dst), in_trie6(&BYPASS_V6, p.dst)),
    };
    if mesh {
        count(Counter::DirectMesh, len);
    } else if bypass {
        ctx.set_mark(cfg.fwmark);
        count(Counter::Bypassed, len);
    } else {
        count(Counter::SteeredExit, len);
    }
    TC_NEXT
}

#[classifier]
pub fn nexd_steer(ctx: TcContext) -> i32 {
    steer(&ctx, true)
}

#[classifier]
pub fn nexd_steer_l3(ctx: TcContext) -> i32 {
    steer(&ctx, false)
}
