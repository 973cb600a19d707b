//! nexd: a WireGuard mesh agent with an eBPF exit-node data path.
//!
//! One module per concern, each the single owner of the kernel objects it
//! creates; see docs/ARCHITECTURE.md for the map.

pub mod announce;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod exclude;
pub mod exit;
pub mod keys;
pub mod mesh;
pub mod netif;
pub mod netlink;
pub mod offline;
pub mod routing;
pub mod wireguard;
