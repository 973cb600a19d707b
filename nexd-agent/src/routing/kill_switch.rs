//! The kill switch's rule that outlives nexd: the nftables table `inet
//! nexd_ks`, in place whenever the leak guard is. The guard (eBPF, on
//! each uplink) decides precisely what may leave an uplink, but it is
//! attached to the links nexd saw; an interface that appears while nexd
//! is down (killed, crashed, stopped by hand) has none. This table lets
//! out only through the interfaces nexd knew when it last wrote it (by
//! index: a link that is deleted and created again gets a new one), and
//! everywhere only WireGuard's own marked packets, DHCP and IPv6 neighbour
//! and router discovery besides. nexd rewrites it as links come and go;
//! only a disable, a clean stop or nexctl's offline disable removes it.

use super::nft::{self, NftError, Table};

pub const NFT_TABLE: Table = Table {
    family: "inet",
    name: "nexd_ks",
};

/// The counter of what the table dropped.
pub const DROPPED: &str = "unknown_interface";

/// The table, letting out through the links `known` (their indices: the
/// uplinks, whose guard filters them, and every other link that existed
/// when nexd last looked) and, through any link, packets marked with
/// `fwmark` (only WireGuard's own carry it: setting a mark takes
/// CAP_NET_ADMIN).
pub fn script(fwmark: u32, known: &[u32]) -> String {
    let elements = known
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let set = if known.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {elements} }};")
    };
    let clear = NFT_TABLE.clear_script();
    let rules = |chain: &str, hook: &str, local: &str| {
        format!(
            "\x20 chain {chain} {{\n\
             \x20   type filter hook {hook} priority filter; policy accept;\n\
             \x20   meta mark {fwmark:#x} accept\n\
             \x20   oif @known accept\n\
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
         \x20 set known {{ type iface_index;{set} }}\n\
         {}{}\
         }}\n",
        rules("output", "output", local),
        rules("forward", "forward", ""),
    )
}

/// Writes the table (replacing it whole, in one transaction: never a
/// moment without it).
pub fn apply(fwmark: u32, known: &[u32]) -> Result<(), NftError> {
    nft::apply(&script(fwmark, known))
}

#[cfg(test)]
mod tests {
    #[test]
    fn lets_out_known_links_and_wireguard_and_drops_the_rest() {
        let s = super::script(0x6e78, &[1, 4, 7]);
        assert!(
            s.contains("set known { type iface_index; elements = { 1, 4, 7 }; }"),
            "{s}"
        );
        for chain in ["output", "forward"] {
            assert!(s.contains(&format!("chain {chain} {{")), "{s}");
        }
        let mark = s.find("meta mark 0x6e78 accept").expect("mark");
        let known = s.find("oif @known accept").expect("known");
        let drop = s.find("counter name unknown_interface drop").expect("drop");
        assert!(mark < drop && known < drop, "{s}");
        assert!(s.starts_with("add table inet nexd_ks\ndelete table inet nexd_ks\n"));
        if let Err(e) = super::nft::check(&s) {
            panic!("{e}");
        }
        // No link known yet: an empty set, still valid.
        if let Err(e) = super::nft::check(&super::script(0x6e78, &[])) {
            panic!("{e}");
        }
    }
}
