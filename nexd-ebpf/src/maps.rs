//! Every map of the object. User space finds them by these names
//! (`nexd_common::names`) and keeps them in sync from its reconcile loop;
//! programs only read them (and bump counters).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use nexd_common::{
    BYPASS_MAX_ENTRIES, ENDPOINTS_MAX_ENTRIES, GUARD_MAX_ENTRIES, MESH_MAX_ENTRIES,
    config::DatapathConfig,
    counters::{Counter, CounterValue},
    exit::{
        ClientCounters, ClientLimit, EXIT_CLIENTS_MAX, EXIT_POLICY_MAX_ENTRIES, ExitConfig,
        MssConfig,
    },
};

#[map(name = "NEXD_COUNTERS")]
static NEXD_COUNTERS: PerCpuArray<CounterValue> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map(name = "NEXD_CONFIG")]
static NEXD_CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

#[map(name = "NEXD_MESH_V4")]
pub static MESH_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MESH_MAX_ENTRIES, 0);
#[map(name = "NEXD_MESH_V6")]
pub static MESH_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MESH_MAX_ENTRIES, 0);

#[map(name = "NEXD_BYPASS_V4")]
pub static BYPASS_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(BYPASS_MAX_ENTRIES, 0);
#[map(name = "NEXD_BYPASS_V6")]
pub static BYPASS_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(BYPASS_MAX_ENTRIES, 0);

#[map(name = "NEXD_ENDPOINTS_V4")]
pub static ENDPOINTS_V4: HashMap<[u8; 6], u8> = HashMap::with_max_entries(ENDPOINTS_MAX_ENTRIES, 0);
#[map(name = "NEXD_ENDPOINTS_V6")]
pub static ENDPOINTS_V6: HashMap<[u8; 18], u8> =
    HashMap::with_max_entries(ENDPOINTS_MAX_ENTRIES, 0);

#[map(name = "NEXD_GUARD_V4")]
pub static GUARD_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(GUARD_MAX_ENTRIES, 0);
#[map(name = "NEXD_GUARD_V6")]
pub static GUARD_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(GUARD_MAX_ENTRIES, 0);

#[map(name = "NEXD_EXIT_CONFIG")]
static NEXD_EXIT_CONFIG: Array<ExitConfig> = Array::with_max_entries(1, 0);
#[map(name = "NEXD_MSS_CONFIG")]
static NEXD_MSS_CONFIG: Array<MssConfig> = Array::with_max_entries(1, 0);

#[map(name = "NEXD_EXIT_POLICY_V4")]
pub static EXIT_POLICY_V4: LpmTrie<[u8; 4], u8> =
    LpmTrie::with_max_entries(EXIT_POLICY_MAX_ENTRIES, 0);
#[map(name = "NEXD_EXIT_POLICY_V6")]
pub static EXIT_POLICY_V6: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(EXIT_POLICY_MAX_ENTRIES, 0);

#[map(name = "NEXD_EXIT_CLIENTS_V4")]
pub static EXIT_CLIENTS_V4: HashMap<[u8; 4], u32> = HashMap::with_max_entries(EXIT_CLIENTS_MAX, 0);
#[map(name = "NEXD_EXIT_CLIENTS_V6")]
pub static EXIT_CLIENTS_V6: HashMap<[u8; 16], u32> = HashMap::with_max_entries(EXIT_CLIENTS_MAX, 0);

#[map(name = "NEXD_EXIT_LIMITS")]
pub static EXIT_LIMITS: Array<ClientLimit> = Array::with_max_entries(EXIT_CLIENTS_MAX, 0);
#[map(name = "NEXD_EXIT_CLIENT_COUNTERS")]
pub static EXIT_CLIENT_COUNTERS: PerCpuArray<ClientCounters> =
    PerCpuArray::with_max_entries(EXIT_CLIENTS_MAX, 0);

/// The exit node's configuration (all zero, i.e. not enforcing, until user
/// space writes it).
#[inline(always)]
pub fn exit_config() -> ExitConfig {
    NEXD_EXIT_CONFIG.get(0).copied().unwrap_or_default()
}

/// The MSS clamp's configuration (zero: no clamping).
#[inline(always)]
pub fn mss_config() -> MssConfig {
    NEXD_MSS_CONFIG.get(0).copied().unwrap_or_default()
}

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

/// The current configuration (all zero, i.e. everything off, until user
/// space writes it).
#[inline(always)]
pub fn config() -> DatapathConfig {
    NEXD_CONFIG.get(0).copied().unwrap_or_default()
}

/// Longest-prefix match of an IPv4 address.
#[inline(always)]
pub fn in_trie4(trie: &LpmTrie<[u8; 4], u8>, addr: [u8; 4]) -> bool {
    trie.get(Key::new(32, addr)).is_some()
}

/// Longest-prefix match of an IPv6 address.
#[inline(always)]
pub fn in_trie6(trie: &LpmTrie<[u8; 16], u8>, addr: [u8; 16]) -> bool {
    trie.get(Key::new(128, addr)).is_some()
}

/// The guard trie's flags for an IPv4 address (0: not listed).
#[inline(always)]
pub fn guard_flags4(addr: [u8; 4]) -> u8 {
    GUARD_V4.get(Key::new(32, addr)).copied().unwrap_or(0)
}

/// The guard trie's flags for an IPv6 address (0: not listed).
#[inline(always)]
pub fn guard_flags6(addr: [u8; 16]) -> u8 {
    GUARD_V6.get(Key::new(128, addr)).copied().unwrap_or(0)
}

/// Whether `addr:port` is a mesh peer's endpoint.
#[inline(always)]
pub fn is_endpoint4(addr: [u8; 4], port: u16) -> bool {
    let p = port.to_be_bytes();
    let key = [addr[0], addr[1], addr[2], addr[3], p[0], p[1]];
    ENDPOINTS_V4.get_ptr(key).is_some()
}

/// Whether `[addr]:port` is a mesh peer's endpoint.
#[inline(always)]
pub fn is_endpoint6(addr: [u8; 16], port: u16) -> bool {
    let mut key = [0u8; 18];
    key[..16].copy_from_slice(&addr);
    key[16..].copy_from_slice(&port.to_be_bytes());
    ENDPOINTS_V6.get_ptr(key).is_some()
}
