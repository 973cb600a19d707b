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
//!   nothing under `policy accept`. From the tunnel, in this order:
//!   - only what the exit program on the WireGuard ingress let through:
//!     it sets [`EXIT_PASSED_MARK`] on every packet it passes, and a
//!     packet without it is dropped (`unchecked`). With the programs
//!     gone (a nexd killed on a TCX kernel, whose program links die with
//!     it; programs detached by anyone) the table left behind forwards
//!     nothing instead of everything. The bit is cleared again here, so
//!     nothing after this chain sees it;
//!   - out of the uplinks only (per family), or to a subnet the operator
//!     shares with `--exit-allow` (through whatever interface routes it):
//!     a route in another table, a policy rule, a route added at runtime
//!     before the policy caught up cannot take a client elsewhere
//!     (`not_uplink`);
//!   - a new flow of a client passes its limits: new flows per second
//!     and flows tracked at once, per client (one chain per client with
//!     its own `limit` and `ct count`, reached through one verdict-map
//!     lookup of the source; both families of a client count together),
//!     refused and counted per client (`new_flow_rate_<k>`,
//!     `flow_limit_<k>`) beyond them;
//! * input: from the WireGuard interface, only this exit node's own mesh
//!   addresses (its mesh services: announcements, DNS) are reachable, not
//!   the host's other addresses (its uplink address, a metadata address
//!   on lo...). No address list to maintain: "not my mesh address";
//! * postrouting: masquerade of the mesh prefixes out of the uplink, TCP
//!   and UDP to ports 1024-65535 whatever the source port: without a
//!   range the kernel keeps a port below 512 below 512, so 511 flows of
//!   one client to one server took every port another client's flow
//!   from a low port could get.
//!
//! Connection tracking stays in netfilter rather than in eBPF: nexd runs
//! on kernels from 5.8, the conntrack kfuncs need much newer ones, and
//! masquerade needs the same flows tracked anyway. For the same reason the
//! flow limits are nftables': a flow is a conntrack entry, which the TC
//! program (before conntrack) cannot see for UDP, and `ct count` counts
//! exactly the entries alive (it forgets closed ones as it goes).
//!
//! The table is replaced atomically (one `nft -f` transaction) and deleted
//! on stop; forwarding sysctls go back to their original values. A
//! replacement starts the flow counts afresh: flows open before it are
//! not counted until they end.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
pub use nexd_common::exit::EXIT_PASSED_MARK;
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
pub const COUNTERS: [&str; 8] = [
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
    // From the tunnel without the exit program's mark: dropped.
    "unchecked",
    // From the tunnel towards an interface that is not an uplink (and
    // not to an `--exit-allow` subnet): dropped.
    "not_uplink",
];

/// A served client's bounds on connection tracking at the exit node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// Flows (conntrack entries) of the client at once.
    pub max_flows: u32,
    /// New flows per second; bursts of twice as many pass.
    pub new_per_second: u32,
}

impl FlowLimits {
    /// Far above what a device (or a small LAN behind a gateway) opens,
    /// far below what fills a conntrack table (65,536 entries on a small
    /// machine) or one destination's masquerade ports (64,512) alone.
    pub const DEFAULT: FlowLimits = FlowLimits {
        max_flows: 4096,
        new_per_second: 200,
    };
}

impl Default for FlowLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A client the exit node serves, as its table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowClient {
    pub name: String,
    /// Its mesh addresses.
    pub addresses: Vec<IpAddr>,
    pub limits: FlowLimits,
}

/// Per-client counter names in the table, by the client's position.
fn client_counter(what: &str, k: usize) -> String {
    format!("{what}_{k}")
}

/// What the table refused of each client, by reason (`flow_limit`,
/// `new_flow_rate`), from the table's named counters (packets): refusals
/// of clients without any are left out.
pub fn client_refusals(
    clients: &[FlowClient],
    counters: &BTreeMap<String, u64>,
) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (k, c) in clients.iter().enumerate() {
        for what in ["flow_limit", "new_flow_rate"] {
            if let Some(n) = counters.get(&client_counter(what, k)).filter(|n| **n > 0) {
                *out.entry(c.name.clone())
                    .or_default()
                    .entry(what.to_owned())
                    .or_default() += n;
            }
        }
    }
    out
}

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
    /// `--exit-allow`: subnets shared with the clients, reached through
    /// whatever interface routes them (everything else leaves through the
    /// uplinks only).
    pub allow: Vec<IpNet>,
    /// The clients served, with their flow limits.
    pub clients: Vec<FlowClient>,
    /// A member of an exit group (issue 22) SNATs its clients to the
    /// group's egress address instead of masquerading to its own, and
    /// drops whatever reaches the egress address as local traffic.
    pub egress: Option<Egress>,
}

/// An exit group's shared egress addresses, as a member's table uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Egress {
    pub v4: Ipv4Addr,
    /// Without one, IPv6 is masqueraded to the member's own address (and
    /// its flows do not survive a failover).
    pub v6: Option<Ipv6Addr>,
}

/// The nftables transaction for the exit node, without the input guard
/// (kept for the daemon's current call; see [`ExitRules::script`]).
pub fn script(wg: &str, uplinks: &Uplinks, v4: Ipv4Net, v6: Ipv6Net) -> String {
    ExitRules::basic(wg, uplinks.clone(), v4, v6).script()
}

/// A set's elements, as nft writes them.
fn elements<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl ExitRules {
    /// The rules without the input guard, shared subnets, clients' limits
    /// or a group: what the table is before the daemon knows more.
    pub fn basic(wg: &str, uplinks: Uplinks, mesh_v4: Ipv4Net, mesh_v6: Ipv6Net) -> Self {
        ExitRules {
            wg: wg.to_owned(),
            uplinks,
            mesh_v4,
            mesh_v6,
            own: None,
            allow: Vec::new(),
            clients: Vec::new(),
            egress: None,
        }
    }

    /// The nftables transaction: replaces the table whole.
    pub fn script(&self) -> String {
        let ExitRules {
            wg,
            uplinks,
            mesh_v4: v4,
            mesh_v6: v6,
            own,
            allow,
            clients,
            egress,
        } = self;
        let mut nat = String::new();
        let egress4 = egress.map(|e| e.v4.to_string());
        let egress6 = egress.and_then(|e| e.v6).map(|a| format!("[{a}]"));
        for (up, fam, mesh, to) in [
            (&uplinks.v4, "ip", v4.to_string(), egress4.as_deref()),
            (&uplinks.v6, "ip6", v6.to_string(), egress6.as_deref()),
        ] {
            let Some(up) = up else { continue };
            match to {
                None => nat.push_str(&format!(
                    "    oifname \"{up}\" {fam} saddr {mesh} meta l4proto {{ tcp, udp }} counter name \"masqueraded\" masquerade to :1024-65535\n\
                     \x20   oifname \"{up}\" {fam} saddr {mesh} counter name \"masqueraded\" masquerade\n"
                )),
                // The bare address for the second rule: nft takes `[v6]`
                // only with a port.
                Some(to) => nat.push_str(&format!(
                    "    oifname \"{up}\" {fam} saddr {mesh} meta l4proto {{ tcp, udp }} counter name \"masqueraded\" snat {fam} to {to}:1024-65535\n\
                     \x20   oifname \"{up}\" {fam} saddr {mesh} counter name \"masqueraded\" snat {fam} to {}\n",
                    to.trim_start_matches('[').trim_end_matches(']')
                )),
            }
        }
        // The egress address exists for the clients' NAT only: a packet of
        // a flow this member has no state for (the holder before a commit,
        // a flow never synced) must not reach its own TCP stack, which
        // would answer with a reset and end the flow for every member.
        let group_input = match egress {
            None => String::new(),
            Some(e) => {
                let mut rules = format!("    ip daddr {} counter drop\n", e.v4);
                if let Some(v6) = e.v6 {
                    rules.push_str(&format!("    ip6 daddr {v6} counter drop\n"));
                }
                format!(
                    "  chain egress_input {{\n\
                     \x20   type filter hook input priority filter; policy accept;\n\
                     {rules}\
                     \x20 }}\n"
                )
            }
        };
        let mut input = match own {
            None => String::new(),
            Some((own4, own6)) => format!(
                "  chain input {{\n\
                 \x20   type filter hook input priority filter; policy accept;\n\
                 \x20   iifname \"{wg}\" ip daddr != {own4} counter name \"local_dropped\" drop\n\
                 \x20   iifname \"{wg}\" ip6 daddr != {own6} counter name \"local_dropped\" drop\n"
            ),
        };
        let mut counters: String = COUNTERS
            .iter()
            .map(|c| format!("  counter {c} {{ }}\n"))
            .collect();
        let mut sets = String::new();
        let mut uplink_only = String::new();
        for (up, nfproto, fam, addr_type, tag, v6) in [
            (&uplinks.v4, "ipv4", "ip", "ipv4_addr", "4", false),
            (&uplinks.v6, "ipv6", "ip6", "ipv6_addr", "6", true),
        ] {
            let shared: Vec<String> = allow
                .iter()
                .filter(|n| matches!(n, IpNet::V6(_)) == v6)
                .map(|n| n.trunc().to_string())
                .collect();
            let mut rule = format!("    iifname \"{wg}\" meta nfproto {nfproto}");
            if let Some(up) = up {
                rule.push_str(&format!(" oifname != \"{up}\""));
            }
            if !shared.is_empty() {
                sets.push_str(&format!(
                    "  set allow{tag} {{ type {addr_type}; flags interval; elements = {{ {} }} }}\n",
                    shared.join(", ")
                ));
                rule.push_str(&format!(" {fam} daddr != @allow{tag}"));
            }
            rule.push_str(" counter name \"not_uplink\" drop\n");
            uplink_only.push_str(&rule);
        }
        let mut limits = String::new();
        let mut per_client = String::new();
        for (k, c) in clients.iter().enumerate() {
            let (rate, flows) = (
                client_counter("new_flow_rate", k),
                client_counter("flow_limit", k),
            );
            counters.push_str(&format!(
                "  counter {rate} {{ }}\n  counter {flows} {{ }}\n"
            ));
            let FlowLimits {
                max_flows,
                new_per_second,
            } = c.limits;
            let burst = new_per_second.saturating_mul(2);
            per_client.push_str(&format!(
                "  chain client_{k} {{\n\
                 \x20   limit rate over {new_per_second}/second burst {burst} packets counter name \"{rate}\" drop\n\
                 \x20   ct count over {max_flows} counter name \"{flows}\" drop\n\
                 \x20 }}\n"
            ));
        }
        for (addr_type, fam, tag, v6) in [
            ("ipv4_addr", "ip", "4", false),
            ("ipv6_addr", "ip6", "6", true),
        ] {
            let members: Vec<String> = clients
                .iter()
                .enumerate()
                .flat_map(|(k, c)| {
                    c.addresses
                        .iter()
                        .filter(move |a| a.is_ipv6() == v6)
                        .map(move |a| format!("{a} : jump client_{k}"))
                })
                .collect();
            if !members.is_empty() {
                sets.push_str(&format!(
                    "  map clients{tag} {{ type {addr_type} : verdict; elements = {{ {} }} }}\n",
                    elements(members)
                ));
                // Only a flow's first packet: until the first reply every
                // packet of a flow is `ct state new`, and a one-way flow's
                // datagrams would each spend the client's new-flow rate.
                // Its entry is confirmed once that packet leaves the hooks.
                limits.push_str(&format!(
                    "    iifname \"{wg}\" ct state new ct status & confirmed == 0 {fam} saddr vmap @clients{tag}\n"
                ));
            }
        }
        if !input.is_empty() {
            // What a client sends to the exit node's own mesh address (any
            // port of it: DNS, announcements, the rest refused) is tracked
            // too: it counts against the same per-client bounds as its
            // forwarded flows, or one client could fill the table with it.
            input.push_str(&limits);
            input.push_str("  }\n");
        }
        let mark = EXIT_PASSED_MARK;
        let keep = !EXIT_PASSED_MARK;
        let clear = NFT_TABLE.clear_script();
        format!(
            "{clear}table {NFT_TABLE} {{\n\
             {counters}\
             {sets}\
             \x20 chain prerouting {{\n\
             \x20   type filter hook prerouting priority raw; policy accept;\n\
             \x20   iifname != \"{wg}\" ip saddr {v4} counter name \"spoofed\" drop\n\
             \x20   iifname != \"{wg}\" ip6 saddr {v6} counter name \"spoofed\" drop\n\
             \x20 }}\n\
             {per_client}\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority filter; policy accept;\n\
             \x20   oifname \"{wg}\" ct state established,related counter name \"returned\" accept\n\
             \x20   oifname \"{wg}\" counter name \"inbound_dropped\" drop\n\
             \x20   iifname \"{wg}\" meta mark & {mark:#010x} == 0 counter name \"unchecked\" drop\n\
             \x20   iifname \"{wg}\" meta mark set meta mark & {keep:#010x}\n\
             {uplink_only}\
             {limits}\
             \x20   iifname \"{wg}\" counter name \"forwarded\" accept\n\
             \x20 }}\n\
             {input}\
             {group_input}\
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
    /// The clients as the table numbers them (its per-client counters).
    pub clients: Vec<FlowClient>,
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
        Self::apply(&ExitRules::basic(wg, uplinks, v4, v6), sysctls)
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
        let fw = ExitForwarding {
            uplinks,
            clients: rules.clients.clone(),
        };
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

    /// What the table refused of each client (by client name, then
    /// reason), from its counters.
    pub fn refusals(&self) -> Result<BTreeMap<String, BTreeMap<String, u64>>, NftError> {
        Ok(client_refusals(&self.clients, &NFT_TABLE.counters()?))
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
            allow: vec!["10.1.0.7/24".parse().expect("net")],
            clients: vec![
                FlowClient {
                    name: "a".into(),
                    addresses: vec![
                        "100.64.0.2".parse().expect("ip"),
                        "fd6e:6578:6400::2".parse().expect("ip"),
                    ],
                    limits: FlowLimits::DEFAULT,
                },
                FlowClient {
                    name: "b".into(),
                    addresses: vec!["100.64.0.3".parse().expect("ip")],
                    limits: FlowLimits {
                        max_flows: 100,
                        new_per_second: 20,
                    },
                },
            ],
            egress: None,
        }
    }

    /// A member of an exit group: SNAT to the group's egress addresses, and
    /// nothing of them reaches the host's own stack. The rest of the table
    /// is the one without a group.
    #[test]
    fn a_group_member_snats_to_the_egress_address_and_drops_it_as_local() {
        let plain = rules().script();
        let group = ExitRules {
            egress: Some(Egress {
                v4: "198.51.100.10".parse().expect("ip"),
                v6: Some("2001:db8::10".parse().expect("ip")),
            }),
            ..rules()
        }
        .script();
        let nat = r#"    oifname "eth0" ip saddr 100.64.0.0/10 meta l4proto { tcp, udp } counter name "masqueraded" snat ip to 198.51.100.10:1024-65535
    oifname "eth0" ip saddr 100.64.0.0/10 counter name "masqueraded" snat ip to 198.51.100.10
    oifname "eth1" ip6 saddr fd6e:6578:6400::/48 meta l4proto { tcp, udp } counter name "masqueraded" snat ip6 to [2001:db8::10]:1024-65535
    oifname "eth1" ip6 saddr fd6e:6578:6400::/48 counter name "masqueraded" snat ip6 to 2001:db8::10
"#;
        let input = r#"  chain egress_input {
    type filter hook input priority filter; policy accept;
    ip daddr 198.51.100.10 counter drop
    ip6 daddr 2001:db8::10 counter drop
  }
"#;
        assert!(group.contains(nat), "{group}");
        assert!(group.contains(input), "{group}");
        assert!(
            !group.contains(" masquerade to") && !group.contains("\" masquerade\n"),
            "{group}"
        );
        assert!(!plain.contains("snat") && !plain.contains("egress_input"));
        // Without an IPv6 egress address, IPv6 is masqueraded as before.
        let v4_only = ExitRules {
            egress: Some(Egress {
                v4: "198.51.100.10".parse().expect("ip"),
                v6: None,
            }),
            ..rules()
        }
        .script();
        assert!(v4_only.contains("snat ip to 198.51.100.10:1024-65535"));
        assert!(v4_only.contains(
            r#"oifname "eth1" ip6 saddr fd6e:6578:6400::/48 counter name "masqueraded" masquerade"#
        ));
        assert!(v4_only.contains(
            "  chain egress_input {\n    type filter hook input priority filter; policy accept;\n    ip daddr 198.51.100.10 counter drop\n  }\n"
        ));
    }

    /// Where `needle` is in the script `s` (it must be there).
    fn position(s: &str, needle: &str) -> usize {
        s.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing from\n{s}"))
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
  counter unchecked { }
  counter not_uplink { }
  counter new_flow_rate_0 { }
  counter flow_limit_0 { }
  counter new_flow_rate_1 { }
  counter flow_limit_1 { }
  set allow4 { type ipv4_addr; flags interval; elements = { 10.1.0.0/24 } }
  map clients4 { type ipv4_addr : verdict; elements = { 100.64.0.2 : jump client_0, 100.64.0.3 : jump client_1 } }
  map clients6 { type ipv6_addr : verdict; elements = { fd6e:6578:6400::2 : jump client_0 } }
  chain prerouting {
    type filter hook prerouting priority raw; policy accept;
    iifname != "wg0" ip saddr 100.64.0.0/10 counter name "spoofed" drop
    iifname != "wg0" ip6 saddr fd6e:6578:6400::/48 counter name "spoofed" drop
  }
  chain client_0 {
    limit rate over 200/second burst 400 packets counter name "new_flow_rate_0" drop
    ct count over 4096 counter name "flow_limit_0" drop
  }
  chain client_1 {
    limit rate over 20/second burst 40 packets counter name "new_flow_rate_1" drop
    ct count over 100 counter name "flow_limit_1" drop
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    oifname "wg0" ct state established,related counter name "returned" accept
    oifname "wg0" counter name "inbound_dropped" drop
    iifname "wg0" meta mark & 0x01000000 == 0 counter name "unchecked" drop
    iifname "wg0" meta mark set meta mark & 0xfeffffff
    iifname "wg0" meta nfproto ipv4 oifname != "eth0" ip daddr != @allow4 counter name "not_uplink" drop
    iifname "wg0" meta nfproto ipv6 oifname != "eth1" counter name "not_uplink" drop
    iifname "wg0" ct state new ct status & confirmed == 0 ip saddr vmap @clients4
    iifname "wg0" ct state new ct status & confirmed == 0 ip6 saddr vmap @clients6
    iifname "wg0" counter name "forwarded" accept
  }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "wg0" ip daddr != 100.64.0.1 counter name "local_dropped" drop
    iifname "wg0" ip6 daddr != fd6e:6578:6400::1 counter name "local_dropped" drop
    iifname "wg0" ct state new ct status & confirmed == 0 ip saddr vmap @clients4
    iifname "wg0" ct state new ct status & confirmed == 0 ip6 saddr vmap @clients6
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "eth0" ip saddr 100.64.0.0/10 meta l4proto { tcp, udp } counter name "masqueraded" masquerade to :1024-65535
    oifname "eth0" ip saddr 100.64.0.0/10 counter name "masqueraded" masquerade
    oifname "eth1" ip6 saddr fd6e:6578:6400::/48 meta l4proto { tcp, udp } counter name "masqueraded" masquerade to :1024-65535
    oifname "eth1" ip6 saddr fd6e:6578:6400::/48 counter name "masqueraded" masquerade
  }
}
"#;
        assert_eq!(rules().script(), expected);
        if let Err(e) = nft::check(expected) {
            panic!("{e}");
        }
    }

    #[test]
    fn from_the_tunnel_the_mark_is_checked_first_then_the_uplinks_then_the_limits() {
        let s = rules().script();
        let at = |needle: &str| position(&s, needle);
        assert!(at("\"inbound_dropped\" drop") < at("\"unchecked\" drop"));
        assert!(at("\"unchecked\" drop") < at("meta mark set"));
        assert!(at("meta mark set") < at("\"not_uplink\" drop"));
        assert!(at("\"not_uplink\" drop") < at("vmap @clients4"));
        assert!(at("vmap @clients4") < at("\"forwarded\" accept"));
    }

    #[test]
    fn a_family_without_uplink_forwards_only_to_shared_subnets() {
        let mut r = rules();
        r.uplinks.v6 = None;
        r.allow.push("fd10:1::/64".parse().expect("net"));
        let s = r.script();
        assert!(
            s.contains("iifname \"wg0\" meta nfproto ipv6 ip6 daddr != @allow6 counter name \"not_uplink\" drop"),
            "{s}"
        );
        r.allow.clear();
        let s = r.script();
        assert!(
            s.contains("iifname \"wg0\" meta nfproto ipv6 counter name \"not_uplink\" drop"),
            "{s}"
        );
        assert!(!s.contains("allow4"), "{s}");
        if let Err(e) = nft::check(&s) {
            panic!("{e}");
        }
    }

    #[test]
    fn refusals_are_read_back_per_client_by_name() {
        let r = rules();
        let counters: BTreeMap<String, u64> = [
            ("flow_limit_0", 0),
            ("new_flow_rate_0", 0),
            ("flow_limit_1", 7),
            ("new_flow_rate_1", 3),
            ("forwarded", 99),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let by = client_refusals(&r.clients, &counters);
        assert_eq!(by.len(), 1, "{by:?}");
        assert_eq!(by["b"]["flow_limit"], 7);
        assert_eq!(by["b"]["new_flow_rate"], 3);
    }

    #[test]
    fn towards_the_tunnel_replies_pass_before_anything_new_is_dropped() {
        let s = rules().script();
        let at = |needle: &str| position(&s, needle);
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
        r.allow.clear();
        r.clients.clear();
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
