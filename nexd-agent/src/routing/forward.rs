//! Exit node forwarding: IP forwarding on (v4 and v6) while serving, and
//! one nftables table, `inet nexd`, that masquerades mesh traffic leaving
//! the uplink, lets only replies (`ct state established,related`) be
//! forwarded into the WireGuard interface (nobody outside opens a
//! connection to a client through the exit node), accepts forwarding
//! from the WireGuard interface (who may go where is the eBPF exit
//! programs' job, `datapath::exit`), and drops packets claiming a mesh
//! source address that arrive anywhere but the WireGuard interface
//! (spoofed from outside the mesh).
//!
//! The table is replaced atomically (one `nft -f` transaction) and deleted
//! on stop; forwarding sysctls go back to their original values.

use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{info, warn};

use super::{
    nft::{self, NftError},
    sysctl::{self, FORWARD_V4, FORWARD_V6, SysctlError, Sysctls},
};

/// nftables family and name of nexd's table.
pub const NFT_FAMILY: &str = "inet";
pub const NFT_TABLE: &str = "nexd";

/// Why the exit node could not start forwarding.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(
        "no uplink: the main table has no default route (IPv4 or IPv6); give one with --uplink"
    )]
    NoUplink,
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
}

/// Where mesh traffic leaves the exit node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplinks {
    pub v4: Option<String>,
    pub v6: Option<String>,
}

/// The nftables transaction for the exit node: replaces the table whole.
pub fn script(wg: &str, uplinks: &Uplinks, v4: Ipv4Net, v6: Ipv6Net) -> String {
    let mut nat = String::new();
    if let Some(up) = &uplinks.v4 {
        nat.push_str(&format!(
            "    oifname \"{up}\" ip saddr {v4} counter name \"masqueraded\" masquerade\n"
        ));
    }
    if let Some(up) = &uplinks.v6 {
        nat.push_str(&format!(
            "    oifname \"{up}\" ip6 saddr {v6} counter name \"masqueraded\" masquerade\n"
        ));
    }
    format!(
        "add table {NFT_FAMILY} {NFT_TABLE}\n\
         delete table {NFT_FAMILY} {NFT_TABLE}\n\
         table {NFT_FAMILY} {NFT_TABLE} {{\n\
         \x20 counter forwarded {{ }}\n\
         \x20 counter returned {{ }}\n\
         \x20 counter masqueraded {{ }}\n\
         \x20 counter spoofed {{ }}\n\
         \x20 counter inbound_dropped {{ }}\n\
         \x20 chain prerouting {{\n\
         \x20   type filter hook prerouting priority raw; policy accept;\n\
         \x20   iifname != \"{wg}\" ip saddr {v4} counter name \"spoofed\" drop\n\
         \x20   iifname != \"{wg}\" ip6 saddr {v6} counter name \"spoofed\" drop\n\
         \x20 }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter; policy accept;\n\
         \x20   oifname \"{wg}\" ct state established,related counter name \"returned\" accept\n\
         \x20   oifname \"{wg}\" counter name \"inbound_dropped\" drop\n\
         \x20   iifname \"{wg}\" counter name \"forwarded\" accept\n\
         \x20 }}\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         {nat}\
         \x20 }}\n\
         }}\n"
    )
}

/// The installed exit node forwarding.
pub struct ExitForwarding {
    pub uplinks: Uplinks,
}

impl ExitForwarding {
    /// Turns forwarding on and installs the nftables table.
    pub fn install(
        wg: &str,
        uplinks: Uplinks,
        v4: Ipv4Net,
        v6: Ipv6Net,
        sysctls: &mut Sysctls,
    ) -> Result<Self, ForwardError> {
        if uplinks.v4.is_none() && uplinks.v6.is_none() {
            return Err(ForwardError::NoUplink);
        }
        nft::apply(&script(wg, &uplinks, v4, v6))?;
        let fw = ExitForwarding { uplinks };
        let sys = (|| {
            sysctls.set(FORWARD_V4, "1")?;
            sysctls.set(FORWARD_V6, "1")
        })();
        if let Err(e) = sys {
            fw.remove(sysctls);
            return Err(e.into());
        }
        if let Some(up) = &fw.uplinks.v6
            && sysctl::read(&format!("net.ipv6.conf.{up}.accept_ra")).is_ok_and(|v| v == "1")
        {
            warn!(
                uplink = %up,
                "IPv6 forwarding is on, so {up} stops accepting router advertisements (accept_ra=1); set net.ipv6.conf.{up}.accept_ra=2 if it relies on them"
            );
        }
        info!(
            uplink_v4 = ?fw.uplinks.v4,
            uplink_v6 = ?fw.uplinks.v6,
            "exit node forwarding installed (nftables table {NFT_FAMILY} {NFT_TABLE})"
        );
        Ok(fw)
    }

    /// Deletes the table and restores the forwarding sysctls.
    pub fn remove(&self, sysctls: &mut Sysctls) {
        remove_table();
        sysctls.restore(FORWARD_V4);
        sysctls.restore(FORWARD_V6);
    }
}

/// Deletes nexd's nftables table (also one left by a crashed nexd).
pub fn remove_table() {
    if let Err(e) = nft::delete_table(NFT_FAMILY, NFT_TABLE) {
        warn!(error = %e, "cannot delete nftables table {NFT_FAMILY} {NFT_TABLE}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_masquerades_each_family_on_its_uplink() {
        let s = script(
            "wg0",
            &Uplinks {
                v4: Some("eth0".into()),
                v6: Some("eth1".into()),
            },
            "100.64.0.0/10".parse().expect("v4"),
            "fd6e:6578:6400::/48".parse().expect("v6"),
        );
        assert!(
            s.starts_with("add table inet nexd\ndelete table inet nexd\n"),
            "{s}"
        );
        assert!(
            s.contains(
                "oifname \"eth0\" ip saddr 100.64.0.0/10 counter name \"masqueraded\" masquerade"
            ),
            "{s}"
        );
        assert!(s.contains("oifname \"eth1\" ip6 saddr fd6e:6578:6400::/48 counter name \"masqueraded\" masquerade"), "{s}");
        assert!(
            s.contains("iifname \"wg0\" counter name \"forwarded\" accept"),
            "{s}"
        );
    }

    #[test]
    fn only_replies_are_forwarded_into_the_tunnel() {
        let s = script(
            "wg0",
            &Uplinks {
                v4: Some("eth0".into()),
                v6: None,
            },
            "100.64.0.0/10".parse().expect("v4"),
            "fd00::/48".parse().expect("v6"),
        );
        let returned = s
            .find("oifname \"wg0\" ct state established,related counter name \"returned\" accept")
            .expect("replies accepted");
        let dropped = s
            .find("oifname \"wg0\" counter name \"inbound_dropped\" drop")
            .expect("the rest dropped");
        let forwarded = s
            .find("iifname \"wg0\" counter name \"forwarded\" accept")
            .expect("forwarded");
        // In this order: replies first, then the drop, before anything
        // from the tunnel is accepted (a client relaying to another client
        // is a new connection into the tunnel too).
        assert!(returned < dropped && dropped < forwarded, "{s}");
    }

    #[test]
    fn a_family_without_uplink_is_not_masqueraded() {
        let s = script(
            "wg0",
            &Uplinks {
                v4: Some("eth0".into()),
                v6: None,
            },
            "100.64.0.0/10".parse().expect("v4"),
            "fd00::/48".parse().expect("v6"),
        );
        assert!(
            !s.contains("ip6 saddr fd00::/48 counter name \"masqueraded\""),
            "{s}"
        );
    }
}
