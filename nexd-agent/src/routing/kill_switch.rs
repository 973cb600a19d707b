//! The kill switch's rule that outlives nexd: the nftables table `inet
//! nexd_ks`, in place whenever the leak guard is. The guard (eBPF, on
//! each uplink) decides precisely what may leave an uplink, but it is
//! attached to the links nexd saw as uplinks; an interface that appears
//! while nexd is down (killed, crashed, stopped by hand), or one nexd knew
//! that takes the default route meanwhile (a laptop's idle Wi-Fi), has
//! none. This table lets out everything only through the uplinks (whose
//! guard filters them), loopback and nexd's WireGuard interface; through
//! any other link nexd knew only what the main table routed there when
//! nexd last looked (its subnets, never a route that covers the
//! internet) and link-local and multicast destinations; everywhere only
//! WireGuard's own marked packets, DHCP and IPv6 neighbour and router
//! discovery besides. Links are named by index (a link deleted and created
//! again gets a new one). nexd rewrites the table as links and routes
//! change; only a disable, a clean stop or nexctl's offline disable
//! removes it.

use ipnet::IpNet;

use super::{
    nft::{self, NftError, Table},
    policy::{SUPPRESS_V4, SUPPRESS_V6},
    routes::{self, MAIN_TABLE},
};
use crate::netlink::{Netlink, NetlinkError};

pub const NFT_TABLE: Table = Table {
    family: "inet",
    name: "nexd_ks",
};

/// The counter of what the table dropped.
pub const DROPPED: &str = "unknown_interface";

/// What the table lets out, from the links and routes nexd sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowed {
    /// Every link that existed when nexd last looked.
    pub known: Vec<u32>,
    /// Links everything may leave through: the uplinks (their guard
    /// decides), loopback, nexd's WireGuard interface.
    pub open: Vec<u32>,
    /// The other known links, each with what the main table routes
    /// through it (prefixes longer than the suppressed ones).
    pub routed: Vec<(u32, IpNet)>,
}

impl Allowed {
    /// Reads the links and the main table's routes; `open` are the
    /// links everything may leave through.
    pub async fn read(nl: &Netlink, mut open: Vec<u32>) -> Result<Self, NetlinkError> {
        let mut known = nl.link_indices().await?;
        known.sort_unstable();
        open.sort_unstable();
        open.dedup();
        let mut routed: Vec<(u32, IpNet)> = routes::of_table(nl, MAIN_TABLE)
            .await?
            .iter()
            .filter_map(|(_, r)| {
                let oif = routes::oif(r)?;
                let net = routes::destination(r)?;
                routed_through(oif, net, &known, &open).then_some((oif, net))
            })
            .collect();
        routed.sort_unstable();
        routed.dedup();
        Ok(Allowed {
            known,
            open,
            routed,
        })
    }
}

/// Whether a main-table route to `net` through link `oif` lets that link
/// reach `net` under the table: a known link that is not open, and a
/// route that does not cover the internet (those are suppressed as the
/// exit-node client's rules suppress them).
fn routed_through(oif: u32, net: IpNet, known: &[u32], open: &[u32]) -> bool {
    let suppressed = match net {
        IpNet::V4(n) => u32::from(n.prefix_len()) <= SUPPRESS_V4,
        IpNet::V6(n) => u32::from(n.prefix_len()) <= SUPPRESS_V6,
    };
    known.contains(&oif) && !open.contains(&oif) && !suppressed
}

fn set(name: &str, kind: &str, elements: &[String]) -> String {
    let flags = if kind.contains('.') {
        " flags interval;"
    } else {
        ""
    };
    let elements = if elements.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }};", elements.join(", "))
    };
    format!("\x20 set {name} {{ type {kind};{flags}{elements} }}\n")
}

/// The table for `allowed`; packets marked with `fwmark` pass through any
/// link (only WireGuard's own carry it: setting a mark takes
/// CAP_NET_ADMIN).
pub fn script(fwmark: u32, allowed: &Allowed) -> String {
    let indices = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>();
    let routed = |v6: bool| {
        allowed
            .routed
            .iter()
            .filter(|(_, n)| matches!(n, IpNet::V6(_)) == v6)
            .map(|(i, n)| format!("{i} . {n}"))
            .collect::<Vec<_>>()
    };
    let sets = [
        set("known", "iface_index", &indices(&allowed.known)),
        set("open", "iface_index", &indices(&allowed.open)),
        set("routed4", "iface_index . ipv4_addr", &routed(false)),
        set("routed6", "iface_index . ipv6_addr", &routed(true)),
    ]
    .concat();
    let clear = NFT_TABLE.clear_script();
    let rules = |chain: &str, hook: &str, local: &str| {
        format!(
            "\x20 chain {chain} {{\n\
             \x20   type filter hook {hook} priority filter; policy accept;\n\
             \x20   meta mark {fwmark:#x} accept\n\
             \x20   oif @open accept\n\
             \x20   oif . ip daddr @routed4 accept\n\
             \x20   oif . ip6 daddr @routed6 accept\n\
             \x20   oif @known ip daddr {{ 169.254.0.0/16, 224.0.0.0/4, 255.255.255.255 }} accept\n\
             \x20   oif @known ip6 daddr {{ fe80::/10, ff00::/8 }} accept\n\
             {local}\
             \x20   counter name {DROPPED} drop\n\
             \x20 }}\n"
        )
    };
    let local = "\x20   udp sport 68 udp dport 67 accept\n\
                 \x20   icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept\n";
    format!(
        "{clear}table {NFT_TABLE} {{\n\
         \x20 counter {DROPPED} {{ }}\n\
         {sets}\
         {}{}\
         }}\n",
        rules("output", "output", local),
        rules("forward", "forward", ""),
    )
}

/// Writes the table (replacing it whole, in one transaction: never a
/// moment without it).
pub fn apply(fwmark: u32, allowed: &Allowed) -> Result<(), NftError> {
    nft::apply(&script(fwmark, allowed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::net;

    fn allowed() -> Allowed {
        Allowed {
            known: vec![1, 2, 4, 7],
            open: vec![1, 2, 4],
            routed: vec![(7, net("10.77.0.0/24")), (7, net("fd77::/64"))],
        }
    }

    #[test]
    fn lets_out_open_links_what_others_route_and_wireguard_and_drops_the_rest() {
        let s = script(0x6e78, &allowed());
        assert!(
            s.contains("set known { type iface_index; elements = { 1, 2, 4, 7 }; }"),
            "{s}"
        );
        assert!(
            s.contains("set open { type iface_index; elements = { 1, 2, 4 }; }"),
            "{s}"
        );
        assert!(
            s.contains("set routed4 { type iface_index . ipv4_addr; flags interval; elements = { 7 . 10.77.0.0/24 }; }"),
            "{s}"
        );
        assert!(
            s.contains("set routed6 { type iface_index . ipv6_addr; flags interval; elements = { 7 . fd77::/64 }; }"),
            "{s}"
        );
        for chain in ["output", "forward"] {
            assert!(s.contains(&format!("chain {chain} {{")), "{s}");
        }
        let at = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle}: {s}"));
        let drop = at("counter name unknown_interface drop");
        for accept in [
            "meta mark 0x6e78 accept",
            "oif @open accept",
            "oif . ip daddr @routed4 accept",
            "oif . ip6 daddr @routed6 accept",
        ] {
            assert!(at(accept) < drop, "{accept}: {s}");
        }
        assert!(s.starts_with("add table inet nexd_ks\ndelete table inet nexd_ks\n"));
        if let Err(e) = nft::check(&s) {
            panic!("{e}");
        }
        // No link known yet: empty sets, still valid.
        if let Err(e) = nft::check(&script(0x6e78, &Allowed::default())) {
            panic!("{e}");
        }
    }

    #[test]
    fn a_known_link_gets_its_routes_but_never_one_that_covers_the_internet() {
        let (known, open) = ([1, 2, 7], [1, 2]);
        assert!(routed_through(7, net("10.0.0.0/8"), &known, &open));
        assert!(routed_through(7, net("2001:db8::/32"), &known, &open));
        assert!(!routed_through(7, net("0.0.0.0/1"), &known, &open));
        assert!(!routed_through(7, net("2000::/7"), &known, &open));
        // Open links need no entries; unknown ones get none.
        assert!(!routed_through(2, net("10.0.0.0/8"), &known, &open));
        assert!(!routed_through(9, net("10.0.0.0/8"), &known, &open));
    }
}
