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
use tracing::{info, warn};

use super::{
    nft::{self, NftError},
    sysctl::{FORWARD_V4, FORWARD_V6, SysctlError, Sysctls},
};

pub const NFT_FAMILY: &str = "inet";
pub const NFT_TABLE: &str = "nexd_gw";

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
    format!(
        "add table {NFT_FAMILY} {NFT_TABLE}\n\
         delete table {NFT_FAMILY} {NFT_TABLE}\n\
         table {NFT_FAMILY} {NFT_TABLE} {{\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter; policy accept;\n\
         \x20   iifname {{ {set} }} ip daddr 169.254.0.0/16 counter drop\n\
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
    pub fn install(wg: &str, lans: &[String], sysctls: &mut Sysctls) -> Result<Self, GatewayError> {
        nft::apply(&script(wg, lans))?;
        let sys = (|| {
            sysctls.set(FORWARD_V4, "1")?;
            sysctls.set(FORWARD_V6, "1")
        })();
        if let Err(e) = sys {
            Gateway.remove(sysctls);
            return Err(e.into());
        }
        info!(lans = ?lans, "LAN gateway installed (nftables table {NFT_FAMILY} {NFT_TABLE})");
        Ok(Gateway)
    }

    pub fn remove(&self, sysctls: &mut Sysctls) {
        remove_table();
        sysctls.restore(FORWARD_V4);
        sysctls.restore(FORWARD_V6);
    }
}

/// Deletes the gateway table (also one left by a crashed nexd).
pub fn remove_table() {
    if let Err(e) = nft::delete_table(NFT_FAMILY, NFT_TABLE) {
        warn!(error = %e, "cannot delete nftables table {NFT_FAMILY} {NFT_TABLE}");
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
        if let Err(e) = super::nft::check(&s) {
            panic!("{e}");
        }
    }
}
