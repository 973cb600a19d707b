//! The exit node's programs, on its WireGuard interface.
//!
//! Ingress (packets out of the tunnel, from mesh members), in this order:
//!
//! 1. the destination's policy entry (one LPM lookup): the exit node's own
//!    mesh address passes at once (mesh services, for every member);
//! 2. the source must be a served client's mesh address (one hash
//!    lookup; WireGuard's cryptokey routing already guarantees the source
//!    belongs to the peer that sent it): otherwise dropped, counted as
//!    unauthorized;
//! 3. a denied destination (private, link-local, metadata, connected...)
//!    is dropped, counted per client and reason; an allow entry inside a
//!    denied prefix wins by being longer;
//! 4. the client's token bucket for this direction, if it has a limit;
//! 5. MSS clamping of SYNs;
//! 6. the mark bit `EXIT_PASSED_MARK`, which the nftables forward chain
//!    requires (so a table outliving the programs forwards nothing);
//! 7. the client's counters.
//!
//! Egress (packets into the tunnel): only packets the exit node forwards
//! (received on another interface) to a served client: the client's other
//! token bucket, MSS clamping of SYN-ACKs, the client's counters. The
//! exit node's own packets (announcements, DNS answers) and packets to
//! non-clients pass untouched: the stateful part ("only replies towards
//! the tunnel") is nftables' `ct state` in the forward chain, where the
//! connection tracking that masquerading needs already runs.
//!
//! Stated rules for odd input (`parse.rs`): on ingress, frames that are
//! not IP, VLAN-tagged or malformed are dropped (nothing else can be
//! forwarded, and what cannot be classified must not pass); IPv4 later
//! fragments are judged by their addresses like any packet (present in
//! every fragment), only the MSS clamp needs the first fragment. On egress
//! they pass (counted), as the kernel made them.
//!
//! Rate limits, and why they are atomic enough: a client's bucket is one
//! word shared by all CPUs (per-CPU buckets would split the rate by the
//! number of CPUs a client's packets happen to land on). Admission reads
//! it, and an admitted packet adds its cost with an atomic add, so under
//! load (the bucket busy) every admitted byte is accounted exactly and the
//! long-run rate holds; CPUs admitting at the same instant can overshoot
//! the burst by one packet each. When the bucket has been idle (its time
//! is in the past) it is restarted at "now" with a plain store; two CPUs
//! doing that at once can forget one packet's cost. Both errors are at
//! most a packet per CPU, only at the edges of a burst, and never drop
//! traffic below the limit. No lock, no compare-and-swap loop (which
//! would need kernel 5.12 and could spin).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::bpf_ktime_get_ns, macros::classifier, maps::lpm_trie::Key, programs::TcContext,
};
use nexd_common::{
    counters::Counter,
    exit::{
        BUCKET_FRAC_BITS, Bucket, DENIED_SLOTS, DenyReason, EXIT_PASSED_MARK, FLAG_EXIT_ENFORCE,
        POLICY_ALLOW, POLICY_LOCAL,
    },
};

use crate::{
    TC_NEXT, TC_SHOT,
    maps::{
        EXIT_CLIENT_COUNTERS, EXIT_CLIENTS_V4, EXIT_CLIENTS_V6, EXIT_LIMITS, EXIT_POLICY_V4,
        EXIT_POLICY_V6, count, exit_config,
    },
    mss::{IPPROTO_TCP, IPPROTO_UDP, clamp_parsed, tcp_header_len},
    parse::{Parsed, parse},
};

/// The skb's GSO fields, read once per packet: both `header_len` and
/// `on_wire` need them, and two reads of the same context field let LLVM
/// keep `ctx + offset` in a register and load through it, a "modified ctx
/// pointer" the verifier refuses.
#[derive(Clone, Copy)]
struct Gso {
    segs: u32,
    size: u32,
}

#[inline(always)]
fn gso(ctx: &TcContext) -> Gso {
    // SAFETY: the skb pointer is valid for the program's run.
    let (segs, size) = unsafe { ((*ctx.skb.skb).gso_segs, (*ctx.skb.skb).gso_size) };
    Gso { segs, size }
}

/// What one skb stands for on the wire: a GRO aggregate, or a GSO packet
/// the userspace backend wrote into its TUN with a virtio header, is one
/// skb carrying several segments, each of which goes out (or came in)
/// with its own copy of the headers. `gso_segs` is not always set:
/// packets from a TUN are marked untrusted (DODGY) and keep it at 0 until
/// the kernel segments them, so then the count comes from `gso_size`.
///
/// `hdr` is the length of the headers every segment repeats (IP and L4);
/// returns (segments, bytes).
#[inline(always)]
fn on_wire(gso: Gso, len: u32, hdr: u32) -> (u64, u64) {
    let segs = if gso.segs > 0 {
        gso.segs
    } else if gso.size > 0 && hdr < len {
        (len - hdr).div_ceil(gso.size).max(1)
    } else {
        1
    };
    if hdr >= len {
        return (u64::from(segs), u64::from(len));
    }
    (
        u64::from(segs),
        u64::from(len) + u64::from(segs - 1) * u64::from(hdr),
    )
}

/// The headers a segment of this packet repeats: everything up to the L4
/// payload. Read only for GSO packets (the only ones that need it).
#[inline(always)]
fn header_len(ctx: &TcContext, gso: Gso, proto: u8, l4: usize, later_fragment: bool) -> u32 {
    if (gso.size == 0 && gso.segs <= 1) || later_fragment {
        return l4 as u32;
    }
    let l4_len = match proto {
        IPPROTO_UDP => 8,
        IPPROTO_TCP => tcp_header_len(ctx, l4),
        _ => 0,
    };
    (l4 + l4_len) as u32
}

/// Whether the bucket admits `len` more bytes now (see the module's
/// comment on atomicity).
#[inline(always)]
fn admit(bucket: *mut Bucket, len: u64) -> bool {
    // SAFETY: `bucket` points into an array map value, valid for the
    // program's run; user space may rewrite it concurrently, which at
    // worst restarts the bucket.
    unsafe {
        let ns_per_byte = core::ptr::read_volatile(&raw const (*bucket).ns_per_byte);
        if ns_per_byte == 0 {
            return true;
        }
        let burst = core::ptr::read_volatile(&raw const (*bucket).burst_ns);
        let tat_ptr = &raw mut (*bucket).tat_ns;
        let now = bpf_ktime_get_ns();
        let cost = (len * ns_per_byte) >> BUCKET_FRAC_BITS;
        let mut tat = core::ptr::read_volatile(tat_ptr);
        if tat < now {
            core::ptr::write_volatile(tat_ptr, now);
            tat = now;
        }
        if tat + cost > now + burst {
            return false;
        }
        // An atomic add (BPF_XADD, every kernel): the one write that must
        // not be lost. `AtomicU64::fetch_add` is not offered on this target
        // (no compare-and-swap), the intrinsic is.
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(tat_ptr, cost);
        true
    }
}

/// Counts a dropped packet of client `slot` under `reason` (a reason
/// index). The mask keeps the index inside the array in a way the
/// verifier can see (a bounds check compiles to a compare on a copy of
/// the register, which it does not connect to the one used); an
/// impossible out-of-range reason lands in a spare slot.
#[inline(always)]
fn count_denied(slot: u32, reason: usize) {
    if let Some(c) = EXIT_CLIENT_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot of a per-CPU array value; the index is
        // below DENIED_SLOTS.
        unsafe {
            let d = (&raw mut (*c).denied)
                .cast::<u64>()
                .add(reason & (DENIED_SLOTS - 1));
            *d += 1;
        }
    }
}

/// Which way a packet crosses the WireGuard interface, and so which of
/// its addresses is the client's. Always a constant where it is used:
/// once inlined, each program keeps only its own direction's code.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Ingress, out of the tunnel: the client is the source.
    FromClient,
    /// Egress, into the tunnel: the client is the destination.
    ToClient,
}

/// What the exit programs need of a packet, whatever its family.
struct Seen {
    /// The client slot of the source (ingress) or destination (egress);
    /// not looked up for the exit node's own mesh address.
    slot: Option<u32>,
    /// The destination's policy entry (ingress only).
    policy: Option<u8>,
    /// Offset of the TCP header, if TCP with a header.
    tcp_l4: Option<usize>,
    v6: bool,
    /// The L4 protocol and header offset, for `header_len`.
    proto: u8,
    l4: usize,
    later_fragment: bool,
}

#[inline(always)]
fn policy4(dst: [u8; 4]) -> Option<u8> {
    EXIT_POLICY_V4.get(Key::new(32, dst)).copied()
}

#[inline(always)]
fn policy6(dst: [u8; 16]) -> Option<u8> {
    EXIT_POLICY_V6.get(Key::new(128, dst)).copied()
}

#[inline(always)]
fn client4(addr: [u8; 4]) -> Option<u32> {
    // SAFETY: a hash map value pointer, read once.
    EXIT_CLIENTS_V4.get_ptr(addr).map(|p| unsafe { *p })
}

#[inline(always)]
fn client6(addr: [u8; 16]) -> Option<u32> {
    // SAFETY: as above.
    EXIT_CLIENTS_V6.get_ptr(addr).map(|p| unsafe { *p })
}

/// The one parse of both programs: the client's slot and, from the
/// client (`way`), the destination's policy entry. A packet that is not
/// IP, is tagged or is malformed is `Err` with the counter it counts
/// under; what happens to it is the caller's rule.
#[inline(always)]
fn see(ctx: &TcContext, l2: bool, way: Way) -> Result<Seen, Counter> {
    let from_client = way == Way::FromClient;
    match parse(ctx, l2) {
        Parsed::Arp | Parsed::NotIp => Err(Counter::NotIp),
        Parsed::Vlan => Err(Counter::Vlan),
        Parsed::Malformed => Err(Counter::Malformed),
        Parsed::V4(p) => {
            let (client, policy) = if from_client {
                (p.src, policy4(p.dst))
            } else {
                (p.dst, None)
            };
            Ok(Seen {
                slot: if policy == Some(POLICY_LOCAL) {
                    None
                } else {
                    client4(client)
                },
                policy,
                tcp_l4: (p.proto == IPPROTO_TCP && !p.later_fragment).then_some(p.l4),
                v6: false,
                proto: p.proto,
                l4: p.l4,
                later_fragment: p.later_fragment,
            })
        }
        Parsed::V6(p) => {
            let (client, policy) = if from_client {
                (p.src, policy6(p.dst))
            } else {
                (p.dst, None)
            };
            Ok(Seen {
                slot: if policy == Some(POLICY_LOCAL) {
                    None
                } else {
                    client6(client)
                },
                policy,
                tcp_l4: (p.next == IPPROTO_TCP).then_some(p.l4),
                v6: true,
                proto: p.next,
                l4: p.l4,
                later_fragment: false,
            })
        }
    }
}

/// A served client's packet, either way: the token bucket of its
/// direction, MSS clamping, and the client's counters of that direction.
#[inline(always)]
fn serve(ctx: &TcContext, seen: &Seen, slot: u32, len: u32, way: Way) -> i32 {
    let gso = gso(ctx);
    let hdr = header_len(ctx, gso, seen.proto, seen.l4, seen.later_fragment);
    let (segs, bytes) = on_wire(gso, len, hdr);
    if let Some(limit) = EXIT_LIMITS.get_ptr_mut(slot) {
        // SAFETY: an array map value, valid for the program's run.
        let (bucket, reason) = match way {
            Way::FromClient => (
                unsafe { &raw mut (*limit).from_client },
                DenyReason::RateFromClient,
            ),
            Way::ToClient => (
                unsafe { &raw mut (*limit).to_client },
                DenyReason::RateToClient,
            ),
        };
        if !admit(bucket, bytes) {
            count_denied(slot, reason.index());
            count(Counter::ExitRateLimited, len);
            return TC_SHOT;
        }
    }
    clamp_parsed(ctx, seen.tcp_l4, seen.v6, len);
    if way == Way::FromClient {
        // Seen and let through: the nftables forward chain forwards only
        // what carries this bit (see EXIT_PASSED_MARK).
        // SAFETY: the skb pointer is valid for the program's run.
        let mark = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark(mark | EXIT_PASSED_MARK);
    }
    if let Some(c) = EXIT_CLIENT_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot of a per-CPU array value.
        unsafe {
            match way {
                Way::FromClient => {
                    (*c).rx_packets += segs;
                    (*c).rx_bytes += bytes;
                }
                Way::ToClient => {
                    (*c).tx_packets += segs;
                    (*c).tx_bytes += bytes;
                }
            }
        }
    }
    TC_NEXT
}

#[inline(always)]
fn exit_ingress(ctx: &TcContext, l2: bool) -> i32 {
    if exit_config().flags & FLAG_EXIT_ENFORCE == 0 {
        return TC_NEXT;
    }
    let len = ctx.len();
    let seen = match see(ctx, l2, Way::FromClient) {
        Ok(seen) => seen,
        Err(counter) => {
            count(counter, len);
            return TC_SHOT;
        }
    };
    if seen.policy == Some(POLICY_LOCAL) {
        count(Counter::ExitLocal, len);
        return TC_NEXT;
    }
    let Some(slot) = seen.slot else {
        count(Counter::ExitUnauthorized, len);
        return TC_SHOT;
    };
    if let Some(v) = seen.policy
        && v != POLICY_ALLOW
    {
        count_denied(slot, usize::from(v));
        count(Counter::ExitDenied, len);
        return TC_SHOT;
    }
    serve(ctx, &seen, slot, len, Way::FromClient)
}

#[inline(always)]
fn exit_egress(ctx: &TcContext, l2: bool) -> i32 {
    if exit_config().flags & FLAG_EXIT_ENFORCE == 0 {
        return TC_NEXT;
    }
    // Only forwarded packets are exit traffic; the exit node's own (its
    // announcements, its resolver's answers) were not received anywhere.
    // SAFETY: the skb pointer is valid for the program's run.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } == 0 {
        return TC_NEXT;
    }
    let len = ctx.len();
    let seen = match see(ctx, l2, Way::ToClient) {
        Ok(seen) => seen,
        Err(counter) => {
            count(counter, len);
            return TC_NEXT;
        }
    };
    let Some(slot) = seen.slot else {
        return TC_NEXT;
    };
    serve(ctx, &seen, slot, len, Way::ToClient)
}

/// Exit node, WireGuard ingress (no link-layer header).
#[classifier]
pub fn nexd_exit_ingress(ctx: TcContext) -> i32 {
    exit_ingress(&ctx, false)
}

/// Exit node ingress on an Ethernet link (tests, benchmarks, a TAP-based
/// tunnel).
#[classifier]
pub fn nexd_exit_ingress_l2(ctx: TcContext) -> i32 {
    exit_ingress(&ctx, true)
}

/// Exit node, WireGuard egress (no link-layer header).
#[classifier]
pub fn nexd_exit_egress(ctx: TcContext) -> i32 {
    exit_egress(&ctx, false)
}

/// Exit node egress on an Ethernet link.
#[classifier]
pub fn nexd_exit_egress_l2(ctx: TcContext) -> i32 {
    exit_egress(&ctx, true)
}
