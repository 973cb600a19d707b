//! nexd's eBPF programs: TC classifiers that classify a packet once, bump a
//! per-CPU counter for the verdict, and return a TC action.
//!
//! * `tunnel`: observers on the WireGuard interface;
//! * `steer`: the steering classifier for a gateway's LAN interfaces;
//! * `guard`: the leak guard on the uplink;
//! * `exit`: an exit node's enforcement and accounting on its WireGuard
//!   interface;
//! * `mss`: TCP MSS clamping (inside `exit`, and alone for a LAN gateway).
//!
//! Packets are never read past what the verifier has proven in bounds
//! (`parse`). Minimum kernel: 5.8 (LPM tries, bpf_skb_pull_data, BTF for
//! aya's loader, and the ring buffer aya-log uses); TCX attachment needs
//! 6.6 and falls back to clsact before that.
#![no_std]
#![no_main]
// The atomic add of the rate limiter (`exit::admit`): core's atomic types
// offer no read-modify-write on bpfel (it has no compare-and-swap), while
// the intrinsic lowers to BPF's atomic add, which every kernel has.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics, for atomic_xadd (see above)"
)]

mod bench;
mod exit;
mod guard;
mod maps;
mod mss;
mod parse;
mod steer;
mod tunnel;

/// TC_ACT_UNSPEC, which is also TCX_NEXT: "no opinion, carry on".
pub const TC_NEXT: i32 = -1;
/// TC_ACT_SHOT: drop the packet.
pub const TC_SHOT: i32 = 2;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF programs cannot panic at run time; the verifier rejects any path
    // that could reach here, so this loop is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
