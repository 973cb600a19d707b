//! nexd's eBPF programs.
//!
//! Every program here classifies a packet once, bumps a per-CPU counter for
//! the verdict it reached and returns a TC action. Packets are never read
//! past what the verifier has proven in bounds.
#![no_std]
#![no_main]

mod counters;
mod tunnel;

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
