//! Types shared by the eBPF programs in `nexd-ebpf` and the loader in
//! `nexd-agent`.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of padding so the byte
//! layout the kernel sees is exactly the layout user space reads. No `bool`
//! or `Option` lives inside a map value: the verifier and the other side of
//! the map must agree on every bit.
#![no_std]

pub mod counters;

/// Names of the programs and maps in the eBPF object. User space looks them
/// up by these names, so both sides use the same constants.
pub mod names {
    /// Per-CPU packet and byte counters, indexed by [`crate::counters::Counter`].
    pub const COUNTERS_MAP: &str = "NEXD_COUNTERS";
    /// Classifier on the mesh interface's ingress (traffic out of the tunnel).
    pub const TUNNEL_INGRESS_PROG: &str = "nexd_tunnel_ingress";
    /// Classifier on the mesh interface's egress (traffic into the tunnel).
    pub const TUNNEL_EGRESS_PROG: &str = "nexd_tunnel_egress";
}
