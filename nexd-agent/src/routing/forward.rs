//! Exit node forwarding: IP forwarding on (v4 and v6) while serving, and
//! one nftables table, `inet nexd`, with what stays in netfilter once the
//! exit node's eBPF program (TC on the WireGuard interface) decides which
//! clients may use the exit node and where they may go:
//!
//! * prerouting: packets claiming a mesh source address that arrive
//!   anywhere but the WireGuard interface are dropped (spoofed from
//!   outside the mesh);
//! * forward: towards the WireGuard interface only replies
//!   (`ct state established,related`, which includes ICMP errors such as
//!   "fragmentation needed"); a new connection into a client is dropped
//!   and counted, from outside and from another client alike. The chain's policy stays `accept` (nexd does
//!   not decide for the host's other traffic), so the refusal is an
//!   explicit `drop`: an accept-only rule for replies, as before, changed
//!   nothing under `policy accept`. Traffic from the tunnel is accepted
//!   here: by the time it reaches netfilter, the eBPF program on the
//!   WireGuard ingress has let it through;
//! * input: from the WireGuard interface, only this exit node's own mesh
//!   addresses (its mesh services: announcements, DNS) are reachable, not
//!   the host's other addresses (its uplink address, a metadata address
//!   on lo...). No address list to maintain: "not my mesh address";
//! * postrouting: masquerade of the mesh prefixes out of the uplink.
//!
//! Connection tracking stays in netfilter rather than in eBPF: nexd runs
//! on kernels from 5.8, the conntrack kfuncs need much newer ones, and
//! masquerade needs the same flows tracked anyway.
//!
//! The table is replaced atomically (one `nft -f` transaction) and deleted
//! on stop; forwarding sysctls go back to their original values.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{info, warn};

use super::{
    nft::{self, NftError, Table},
    sysctl::{self, SysctlError, Sysctls},
};

/// nftables family and name of nexd's table.
pub const NFT_TABLE: Table = Table {
    family: "inet",
    name: "nexd",
};

/// The named counters of the table (packets and bytes each), for status
/// and metrics: `nft list counter inet nexd <name>`.
pub const COUNTERS: [&str; 6] = [
    // From the tunnel, forwarded (after the eBPF program let it through).
    "forwarded",
    // Replies and related ICMP towards the tunnel.
    "returned",
    // New connections towards a client (from outside, or relayed from
    // another client): dropped.
    "inbound_dropped",
    // From the tunnel to one of the host's addresses that is not its mesh
    // address: dropped.
    "local_dropped",
    // Masqueraded out of the uplink.
    "masqueraded",
    // A mesh source address arriving outside the tunnel: dropped.
    "spoofed",
];

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

/// Everything the exit node's table is written from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitRules {
    /// The WireGuard interface.
    pub wg: String,
    pub uplinks: Uplinks,
    /// The mesh prefixes (masqueraded; never a source from outside).
    pub mesh_v4: Ipv4Net,
    pub mesh_v6: Ipv6Net,
    /// This exit node's own mesh addresses: the only local addresses the
    /// tunnel may reach. `None` leaves the input path alone (what
    /// [`ExitForwarding::install`] does until the daemon passes them).
    pub own: Option<(Ipv4Addr, Ipv6Addr)>,
}

/// The nftables transaction for the exit node, without the input guard
/// (kept for the daemon's current call; see [`ExitRules::script`]).
pub fn script(wg: &str, uplinks: &Uplinks, v4: Ipv4Net, v6: Ipv6Net) -> String {
    ExitRules {
        wg: wg.to_owned(),
        uplinks: uplinks.clone(),
        mesh_v4: v4,
        mesh_v6: v6,
        own: None,
    }
    .script()
}

impl ExitRules {
    /// The nftables transaction: replaces the table whole.
    pub fn script(&self) -> String {
        let ExitRules {
            wg,
            uplinks,
            mesh_v4: v4,
            mesh_v6: v6,
            own,
        } = self;
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
        let input = match own {
            None => String::new(),
            Some((own4, own6)) => format!(
                "  chain input {{\n\
                 \x20   type filter hook input priority filter; policy accept;\n\
                 \x20   iifname \"{wg}\" ip daddr != {own4} counter name \"local_dropped\" drop\n\
                 \x20   iifname \"{wg}\" ip6 daddr != {own6} counter name \"local_dropped\" drop\n\
                 \x20 }}\n"
            ),
        };
        let counters: String = COUNTERS
            .iter()
            .map(|c| format!("  counter {c} {{ }}\n"))
            .collect();
        let clear = NFT_TABLE.clear_script();
        format!(
            "{clear}table {NFT_TABLE} {{\n\
             {counters}\
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
             {input}\
             \x20 chain postrouting {{\n\
             \x20   type nat hook postrouting priority srcnat; policy accept;\n\
             {nat}\
             \x20 }}\n\
             }}\n"
        )
    }
}

/// The installed exit node forwarding.
pub struct ExitForwarding {
    pub uplinks: Uplinks,
}

impl ExitForwarding {
    /// Turns forwarding on and installs the nftables table without the
    /// input guard: [`ExitForwarding::apply`] with `own: None`, for the
    /// daemon's current call.
    pub fn install(
        wg: &str,
        uplinks: Uplinks,
        v4: Ipv4Net,
        v6: Ipv6Net,
        sysctls: &mut Sysctls,
    ) -> Result<Self, ForwardError> {
        Self::apply(
            &ExitRules {
                wg: wg.to_owned(),
                uplinks,
                mesh_v4: v4,
                mesh_v6: v6,
                own: None,
            },
            sysctls,
        )
    }

    /// Installs (or replaces, atomically) the nftables table, then turns
    /// forwarding on. Call it again with new rules on a mesh reload or an
    /// uplink change; the table is swapped in one transaction.
    pub fn apply(rules: &ExitRules, sysctls: &mut Sysctls) -> Result<Self, ForwardError> {
        let uplinks = rules.uplinks.clone();
        if uplinks.v4.is_none() && uplinks.v6.is_none() {
            return Err(ForwardError::NoUplink);
        }
        nft::apply(&rules.script())?;
        let fw = ExitForwarding { uplinks };
        if let Err(e) = sysctls.enable_forwarding() {
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
            "exit node forwarding installed (nftables table {NFT_TABLE})"
        );
        Ok(fw)
    }

    /// Deletes the table and restores the forwarding sysctls.
    pub fn remove(&self, sysctls: &mut Sysctls) {
        NFT_TABLE.remove();
        sysctls.restore_forwarding();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> ExitRules {
        ExitRules {
            wg: "wg0".into(),
            uplinks: Uplinks {
                v4: Some("eth0".into()),
                v6: Some("eth1".into()),
            },
            mesh_v4: "100.64.0.0/10".parse().expect("v4"),
            mesh_v6: "fd6e:6578:6400::/48".parse().expect("v6"),
            own: Some((
                "100.64.0.1".parse().expect("ip"),
                "fd6e:6578:6400::1".parse().expect("ip"),
            )),
        }
    }

    /// The whole table, as nft reads it. Any change here is a change of
    /// the exit node's security policy: review it as such.
    #[test]
    fn the_exit_table_is_exactly_this() {
        let expected = r#"add table inet nexd
delete table inet nexd
table inet nexd {
  counter forwarded { }
  counter returned { }
  counter inbound_dropped { }
  counter local_dropped { }
  counter masqueraded { }
  counter spoofed { }
  chain prerouting {
    type filter hook prerouting priority raw; policy accept;
    iifname != "wg0" ip saddr 100.64.0.0/10 counter name "spoofed" drop
    iifname != "wg0" ip6 saddr fd6e:6578:6400::/48 counter name "spoofed" drop
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    oifname "wg0" ct state established,related counter name "returned" accept
    oifname "wg0" counter name "inbound_dropped" drop
    iifname "wg0" counter name "forwarded" accept
  }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "wg0" ip daddr != 100.64.0.1 counter name "local_dropped" drop
    iifname "wg0" ip6 daddr != fd6e:6578:6400::1 counter name "local_dropped" drop
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "eth0" ip saddr 100.64.0.0/10 counter name "masqueraded" masquerade
    oifname "eth1" ip6 saddr fd6e:6578:6400::/48 counter name "masqueraded" masquerade
  }
}
"#;
        assert_eq!(rules().script(), expected);
    }

    #[test]
    fn towards_the_tunnel_replies_pass_before_anything_new_is_dropped() {
        let s = rules().script();
        let at = |needle: &str| {
            s.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} missing from\n{s}"))
        };
        // Under `policy accept` only an explicit drop refuses anything:
        // the reply rule must come first, then the drop of everything else
        // towards the tunnel (from outside, and from the tunnel itself: a
        // client relaying to another client is a new connection into the
        // tunnel too), and only then the accept from the tunnel.
        assert!(at("ct state established,related") < at("\"inbound_dropped\" drop"));
        assert!(at("\"inbound_dropped\" drop") < at("iifname \"wg0\" counter name \"forwarded\""));
        assert!(
            s.contains("oifname \"wg0\" counter name \"inbound_dropped\" drop"),
            "{s}"
        );
    }

    #[test]
    fn without_own_addresses_there_is_no_input_chain() {
        let mut r = rules();
        r.own = None;
        let s = r.script();
        assert!(!s.contains("chain input"), "{s}");
        assert!(s.contains("\"inbound_dropped\" drop"), "{s}");
        assert_eq!(
            script("wg0", &r.uplinks, r.mesh_v4, r.mesh_v6),
            s,
            "the daemon's current call writes the same table"
        );
    }

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
