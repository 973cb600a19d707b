//! Observers on the mesh interface: count what goes into and comes out of
//! the tunnel. They never change a verdict, so they hand the packet on to
//! whatever runs next (TCX_NEXT / TC_ACT_UNSPEC).

use aya_ebpf::{macros::classifier, programs::TcContext};
use nexd_common::counters::Counter;

use crate::{TC_NEXT, maps::count};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

/// The mesh interface is an L3 device (WireGuard or TUN): no Ethernet header,
/// the family comes from skb->protocol.
#[inline(always)]
fn observe(ctx: &TcContext, ip_counter: Counter) -> i32 {
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    let len = ctx.len();
    if proto == ETH_P_IP || proto == ETH_P_IPV6 {
        count(ip_counter, len);
    } else {
        count(Counter::NotIp, len);
    }
    TC_NEXT
}

#[classifier]
pub fn nexd_tunnel_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, Counter::TunnelRx)
}

#[classifier]
pub fn nexd_tunnel_egress(ctx: TcContext) -> i32 {
    observe(&ctx, Counter::TunnelTx)
}
