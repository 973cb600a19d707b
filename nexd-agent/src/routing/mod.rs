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
//! * `uplink`: finding the interface of the default route;
//! * `routes` and `nft`: how routes and nftables tables are read and
//!   written, the same way for every owner above.

pub mod conntrack;
pub mod dns;
pub mod exclusions;
pub mod forward;
pub mod gateway;
pub mod host;
pub mod kill_switch;
pub mod nft;
pub mod policy;
pub mod routes;
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
    /// Priority of `lookup main suppress_prefixlength 7` (31 for IPv6); the
    /// `not fwmark lookup <table>` rule sits at `priority + 1`, and the
    /// excluded routes' `lookup <table + 1>` at `priority - 1`.
    pub priority: u32,
}

/// Routing tables the kernel reserves: unspec, default, main, local.
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];
/// The kernel's own rules: `local` at 0, `main` at 32766, `default` at
/// 32767. nexd's three rules must sit strictly between.
const MAIN_RULE: u32 = 32766;

/// `--exit-table`: nexd uses this table and the next one (excluded
/// routes); neither may be one the kernel reserves.
pub fn check_table(table: u32) -> Result<u32, String> {
    let next = table.checked_add(1).ok_or_else(|| {
        format!("{table} leaves no room for the excluded-routes table (table + 1)")
    })?;
    for t in [table, next] {
        if RESERVED_TABLES.contains(&t) {
            return Err(format!(
                "{table} would make nexd use table {t}, which the kernel reserves (0 unspec, 253 default, 254 main, 255 local): nexd would flush its routes; pick e.g. 28280"
            ));
        }
    }
    Ok(table)
}

/// `--exit-fwmark`: zero means "no mark", which would route WireGuard's
/// own packets into the tunnel.
pub fn check_fwmark(mark: u32) -> Result<u32, String> {
    if mark == 0 {
        return Err("0 is no mark: WireGuard's own packets would be routed into the tunnel; pick e.g. 0x6e78".into());
    }
    Ok(mark)
}

/// `--exit-rule-priority`: nexd's rules sit at priority - 1, priority and
/// priority + 1, all after the local rule (0) and before main (32766).
pub fn check_priority(priority: u32) -> Result<u32, String> {
    if priority < 2 || priority + 1 >= MAIN_RULE {
        return Err(format!(
            "{priority} puts nexd's rules (priority - 1 to priority + 1) outside 1..32765, between the kernel's local rule (0) and its main rule (32766); pick e.g. 28278"
        ));
    }
    Ok(priority)
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

/// Every nftables table nexd may create, each named by its owner: the
/// exit node's forwarding, the LAN gateway, the DNS redirect. The record
/// of what nexd installed may name no other (`ledger`).
pub const NFT_TABLES: [nft::Table; 4] = [
    forward::NFT_TABLE,
    gateway::NFT_TABLE,
    dns::NFT_TABLE,
    kill_switch::NFT_TABLE,
];

/// Deletes the nftables tables a crashed nexd may have left
/// ([`NFT_TABLES`]) in one `nft` run (at start-up, three runs of `nft`
/// were a third of a 10-device start), but those in `keep` (the kill
/// switch's, while a previous nexd's guard is taken over).
pub fn remove_leftover_tables(keep: &[nft::Table]) {
    let gone: Vec<nft::Table> = NFT_TABLES
        .into_iter()
        .filter(|t| !keep.contains(t))
        .collect();
    if let Err(e) = nft::delete_tables(&gone) {
        tracing::warn!(error = %e, "cannot delete leftover nftables tables");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_numbers_that_break_routing_are_refused_with_the_reason() {
        for t in [0, 252, 253, 254, 255, u32::MAX] {
            assert!(check_table(t).is_err(), "table {t}");
        }
        assert_eq!(check_table(DEFAULT_TABLE), Ok(DEFAULT_TABLE));
        assert!(check_table(254).expect_err("main").contains("main"));
        assert!(check_fwmark(0).is_err());
        assert_eq!(check_fwmark(DEFAULT_FWMARK), Ok(DEFAULT_FWMARK));
        for p in [0, 1, 32765, 32766, 32767, u32::MAX - 1] {
            assert!(check_priority(p).is_err(), "priority {p}");
        }
        assert_eq!(check_priority(2), Ok(2));
        assert_eq!(check_priority(32764), Ok(32764));
        assert_eq!(check_priority(DEFAULT_PRIORITY), Ok(DEFAULT_PRIORITY));
    }
}
