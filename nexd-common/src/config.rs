//! The data path's runtime configuration: one array slot that user space
//! rewrites whenever the exit-node phase changes, so programs never need
//! reloading.

/// Flag: exit-node client routing is installed (steering is live).
pub const FLAG_STEER: u32 = 1 << 0;
/// Flag: the leak guard drops what it does not recognise.
pub const FLAG_GUARD: u32 = 1 << 1;
/// Flag: log the leak guard's drops through aya-log (off by default: the
/// hot path never formats a message unless asked).
pub const FLAG_LOG_DROPS: u32 = 1 << 2;

/// Slot 0 of the config map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// `FLAG_*` bits.
    pub flags: u32,
    /// WireGuard's fwmark: set on bypassed LAN traffic (so policy routing
    /// treats it like WireGuard's own packets: main table), and checked by
    /// the leak guard to recognise WireGuard's UDP.
    pub fwmark: u32,
    /// WireGuard's listen port: the leak guard lets out only UDP from it
    /// (with the fwmark) to a peer's endpoint.
    pub listen_port: u16,
    /// Zero; keeps the struct free of implicit padding.
    pub reserved: u16,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, two u32 and two u16, no padding.
unsafe impl aya::Pod for DatapathConfig {}

/// Guard trie value bit: the operator lets this destination out directly
/// (`--exclude-route`, `--kill-switch-allow`).
pub const GUARD_ALLOW: u8 = 1 << 0;
/// Guard trie value bit: a subnet of an uplink (where a DHCPv4 server
/// answering unicast renewals lives).
pub const GUARD_UPLINK_NET: u8 = 1 << 1;

/// Why a prefix is in a bypass trie (the map value), for `nexctl` and
/// debugging; programs only test presence.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BypassReason {
    /// Link-local, multicast, broadcast.
    Builtin = 1,
    /// A prefix of a LAN or uplink interface.
    Lan = 2,
    /// `--exclude-route` / `--exclude-routes-file`.
    Excluded = 3,
}
