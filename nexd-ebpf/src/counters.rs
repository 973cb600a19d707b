//! The per-CPU counters map and the one function that bumps it.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use nexd_common::counters::{Counter, CounterValue};

#[map(name = "NEXD_COUNTERS")]
static NEXD_COUNTERS: PerCpuArray<CounterValue> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Adds one packet of `len` bytes to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter, len: u32) {
    if let Some(slot) = NEXD_COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: the pointer comes from the map lookup and is valid for this
        // CPU's slot; per-CPU slots are never touched concurrently.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += u64::from(len);
        }
    }
}
