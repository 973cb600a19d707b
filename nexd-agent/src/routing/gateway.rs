//! A client that is a gateway for a LAN (`--lan-interface`): forwarding on
//! while nexd runs, and the nftables table `inet nexd_gw`, which gives LAN
//! traffic entering the tunnel the gateway's mesh address. Without it the
//! peers (exit node included) would drop it: WireGuard accepts from this
//! device only source addresses in its AllowedIPs, its /32 and /128.
//!
//! The table also keeps the gateway from routing link-local destinations
//! from the LAN (RFC 3927: routers must not forward 169.254/16): the data
//! path leaves them out of the tunnel, and without the rule a LAN host's
//! probe of a metadata address would leave through the gateway's own
//! uplink, beside the tunnel.
//!
//! And it keeps the mesh out of the LAN and the uplink's networks:
//! WireGuard checks only that a peer's packets come from that peer's own
//! addresses, so a member that routes the gateway's LAN into its tunnel
//! (AllowedIPs are each side's own choice) would otherwise be forwarded
//! into it. Nothing from the tunnel is forwarded anywhere but replies to
//! connections the LAN started; the rest is dropped and counted
//! (`nft list counter inet nexd_gw from_tunnel`).
use tracing::info;

use super::{
    nft::{self, NftError, Table},
    sysctl::{SysctlError, Sysctls},
};

pub const NFT_TABLE: Table = Table {
    family: "inet",
    name: "nexd_gw",
};

/// The counter of what the mesh sent that the gateway did not forward.
pub const FROM_TUNNEL: &str = "from_tunnel";

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
}

/// The nftables transaction for the gateway table.
pub fn script(wg: &str, lans: &[String]) -> String {
    let set = lans
        .iter()
        .map(|l| format!("\"{l}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let clear = NFT_TABLE.clear_script();
    format!(
        "{clear}table {NFT_TABLE} {{\n\
         \x20 counter {FROM_TUNNEL} {{ }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter; policy accept;\n\
         \x20   iifname {{ {set} }} ip daddr 169.254.0.0/16 counter drop\n\
         \x20   iifname \"{wg}\" ct state established,related accept\n\
         \x20   iifname \"{wg}\" counter name {FROM_TUNNEL} drop\n\
         \x20 }}\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   iifname {{ {set} }} oifname \"{wg}\" counter masquerade\n\
         \x20 }}\n\
         }}\n"
    )
}

/// The installed gateway role.
pub struct Gateway;

impl Gateway {
    /// Writes the table alone, forwarding untouched: before the tunnel has
    /// a peer (`install` rewrites it in one transaction).
    pub fn close_tunnel(wg: &str, lans: &[String]) -> Result<(), GatewayError> {
        Ok(nft::apply(&script(wg, lans))?)
    }

    pub fn install(wg: &str, lans: &[String], sysctls: &mut Sysctls) -> Result<Self, GatewayError> {
        nft::apply(&script(wg, lans))?;
        if let Err(e) = sysctls.enable_forwarding() {
            Gateway.remove(sysctls);
            return Err(e.into());
        }
        info!(lans = ?lans, "LAN gateway installed (nftables table {NFT_TABLE})");
        Ok(Gateway)
    }

    pub fn remove(&self, sysctls: &mut Sysctls) {
        NFT_TABLE.remove();
        sysctls.restore_forwarding();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn masquerades_lan_traffic_into_the_tunnel_only() {
        let s = super::script("wg0", &["lan0".into(), "lan1".into()]);
        assert!(
            s.contains("iifname { \"lan0\", \"lan1\" } oifname \"wg0\" counter masquerade"),
            "{s}"
        );
        assert!(
            s.contains("iifname { \"lan0\", \"lan1\" } ip daddr 169.254.0.0/16 counter drop"),
            "{s}"
        );
        assert!(
            s.starts_with("add table inet nexd_gw\ndelete table inet nexd_gw\n"),
            "{s}"
        );
        // From the tunnel: replies only, the rest dropped and counted.
        let replies = s
            .find("iifname \"wg0\" ct state established,related accept")
            .expect("replies accepted");
        let drop = s
            .find("iifname \"wg0\" counter name from_tunnel drop")
            .expect("the rest dropped");
        assert!(replies < drop, "{s}");
        if let Err(e) = super::nft::check(&s) {
            panic!("{e}");
        }
    }
}
