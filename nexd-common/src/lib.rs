//! Types shared by the eBPF programs in `nexd-ebpf` and the loader in
//! `nexd-agent`.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of padding so the byte
//! layout the kernel sees is exactly the layout user space reads. No `bool`
//! or `Option` lives inside a map value: the verifier and the other side of
//! the map must agree on every bit.
#![no_std]

pub mod config;
pub mod counters;
pub mod exit;

/// Names of the programs and maps in the eBPF object. User space looks them
/// up by these names, so both sides use the same constants.
pub mod names {
    /// Per-CPU packet and byte counters, indexed by [`crate::counters::Counter`].
    pub const COUNTERS_MAP: &str = "NEXD_COUNTERS";
    /// One-slot array of [`crate::config::DatapathConfig`].
    pub const CONFIG_MAP: &str = "NEXD_CONFIG";
    /// LPM tries of the mesh prefixes (IPv4, IPv6).
    pub const MESH_V4_MAP: &str = "NEXD_MESH_V4";
    pub const MESH_V6_MAP: &str = "NEXD_MESH_V6";
    /// LPM tries of the bypass prefixes (IPv4, IPv6), value a
    /// [`crate::config::BypassReason`].
    pub const BYPASS_V4_MAP: &str = "NEXD_BYPASS_V4";
    pub const BYPASS_V6_MAP: &str = "NEXD_BYPASS_V6";
    /// Hash sets of mesh peers' endpoints, address and port (IPv4: 6
    /// bytes, IPv6: 18 bytes, the port big-endian at the end).
    pub const ENDPOINTS_V4_MAP: &str = "NEXD_ENDPOINTS_V4";
    pub const ENDPOINTS_V6_MAP: &str = "NEXD_ENDPOINTS_V6";
    /// LPM tries of what the leak guard lets out directly, value a set of
    /// [`crate::config::GUARD_ALLOW`] / [`crate::config::GUARD_UPLINK_NET`].
    pub const GUARD_V4_MAP: &str = "NEXD_GUARD_V4";
    pub const GUARD_V6_MAP: &str = "NEXD_GUARD_V6";

    /// Classifier on the mesh interface's ingress (traffic out of the tunnel).
    pub const TUNNEL_INGRESS_PROG: &str = "nexd_tunnel_ingress";
    /// Classifier on the mesh interface's egress (traffic into the tunnel).
    pub const TUNNEL_EGRESS_PROG: &str = "nexd_tunnel_egress";
    /// Steering classifier for LAN interfaces' ingress: Ethernet and L3
    /// (no link-layer header) variants.
    pub const STEER_PROG: &str = "nexd_steer";
    pub const STEER_L3_PROG: &str = "nexd_steer_l3";
    /// Leak guard for the uplink's egress: Ethernet and L3 variants.
    pub const GUARD_PROG: &str = "nexd_guard";
    pub const GUARD_L3_PROG: &str = "nexd_guard_l3";
    /// A classifier that does nothing (benchmark floor).
    pub const NOOP_PROG: &str = "nexd_noop";

    /// Exit node: one-slot array of [`crate::exit::ExitConfig`].
    pub const EXIT_CONFIG_MAP: &str = "NEXD_EXIT_CONFIG";
    /// One-slot array of [`crate::exit::MssConfig`] (exit node and LAN
    /// gateway clamps).
    pub const MSS_CONFIG_MAP: &str = "NEXD_MSS_CONFIG";
    /// Exit node: LPM tries of destination policy (IPv4, IPv6), value a
    /// [`crate::exit::PolicyValue`] encoded as u8.
    pub const EXIT_POLICY_V4_MAP: &str = "NEXD_EXIT_POLICY_V4";
    pub const EXIT_POLICY_V6_MAP: &str = "NEXD_EXIT_POLICY_V6";
    /// Exit node: hash maps of served clients' mesh addresses (IPv4,
    /// IPv6) to their slot (u32).
    pub const EXIT_CLIENTS_V4_MAP: &str = "NEXD_EXIT_CLIENTS_V4";
    pub const EXIT_CLIENTS_V6_MAP: &str = "NEXD_EXIT_CLIENTS_V6";
    /// Exit node: array of [`crate::exit::ClientLimit`] by slot.
    pub const EXIT_LIMITS_MAP: &str = "NEXD_EXIT_LIMITS";
    /// Exit node: per-CPU array of [`crate::exit::ClientCounters`] by slot.
    pub const EXIT_CLIENT_COUNTERS_MAP: &str = "NEXD_EXIT_CLIENT_COUNTERS";

    /// Exit node, WireGuard ingress (from clients): authorization, policy,
    /// rate limit, MSS clamp, counters. L3 (WireGuard, TUN) and Ethernet
    /// variants.
    pub const EXIT_INGRESS_PROG: &str = "nexd_exit_ingress";
    pub const EXIT_INGRESS_L2_PROG: &str = "nexd_exit_ingress_l2";
    /// Exit node, WireGuard egress (to clients): rate limit, MSS clamp,
    /// counters. L3 and Ethernet variants.
    pub const EXIT_EGRESS_PROG: &str = "nexd_exit_egress";
    pub const EXIT_EGRESS_L2_PROG: &str = "nexd_exit_egress_l2";
    /// MSS clamp alone (a LAN gateway's tunnel or LAN interfaces, either
    /// direction). L3 and Ethernet variants.
    pub const MSS_CLAMP_PROG: &str = "nexd_mss_clamp";
    pub const MSS_CLAMP_L2_PROG: &str = "nexd_mss_clamp_l2";
}

/// Capacity of each bypass trie. LPM tries allocate on demand, so a large
/// bound costs nothing until used.
pub const BYPASS_MAX_ENTRIES: u32 = 1 << 20;
/// Capacity of each mesh-prefix trie.
pub const MESH_MAX_ENTRIES: u32 = 64;
/// Capacity of each endpoint set.
pub const ENDPOINTS_MAX_ENTRIES: u32 = 1 << 16;
/// Capacity of each guard trie (excluded routes can be tens of thousands).
pub const GUARD_MAX_ENTRIES: u32 = 1 << 20;
