//! Routing state nexd installs for exit nodes, one owner per object:
//!
//! * `policy::ClientRouting` (exit-node client): the policy rules at nexd's
//!   two priorities, the default routes in nexd's table, and
//!   `src_valid_mark`;
//! * `forward::ExitForwarding` (exit node): IP forwarding and the nftables
//!   table `inet nexd` (masquerade, forward accept);
//! * `gateway::Gateway` (client that is a LAN gateway): forwarding and the
//!   nftables table `inet nexd_gw` (LAN traffic into the tunnel takes the
//!   gateway's mesh address);
//! * `exclusions::ExcludedRoutes`: the routes of the excluded-routes table;
//! * `sysctl::Sysctls`: every sysctl nexd changes, with the original value
//!   kept on disk so a crashed nexd's successor can restore it;
//! * `uplink`: finding the interface of the default route.

pub mod exclusions;
pub mod forward;
pub mod gateway;
pub mod nft;
pub mod policy;
pub mod sysctl;
pub mod uplink;

/// Numbers of the client's policy routing, all configurable. Fixed numbers
/// (not "the next free one") are what lets nexd find and remove exactly
/// what it installed, also after a crash, and never pile rules up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyNumbers {
    /// Routing table holding the default routes into the tunnel.
    pub table: u32,
    /// Mark on WireGuard's own UDP packets.
    pub fwmark: u32,
    /// Priority of `lookup main suppress_prefixlength 0`; the
    /// `not fwmark lookup <table>` rule sits at `priority + 1`, and the
    /// excluded routes' `lookup <table + 1>` at `priority - 1`.
    pub priority: u32,
}

impl PolicyNumbers {
    /// The table of excluded routes (device's own traffic).
    pub fn exclusion_table(&self) -> u32 {
        self.table + 1
    }
}

/// Defaults: table and mark 0x6e78 ("nx", 28280), priorities 28278/28279,
/// well before the main table's 32766 and clear of wg-quick's 51820.
pub const DEFAULT_TABLE: u32 = 0x6e78;
pub const DEFAULT_FWMARK: u32 = 0x6e78;
pub const DEFAULT_PRIORITY: u32 = 28278;

impl Default for PolicyNumbers {
    fn default() -> Self {
        PolicyNumbers {
            table: DEFAULT_TABLE,
            fwmark: DEFAULT_FWMARK,
            priority: DEFAULT_PRIORITY,
        }
    }
}
