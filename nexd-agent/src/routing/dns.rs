//! Private DNS for the exit-node client: the nftables table `inet nexd_dns`.
//!
//! While exit mode is active, every DNS query of the device and of the LAN
//! hosts it is the gateway for (UDP and TCP port 53, to any resolver: the
//! LAN's, the uplink's, one hard-coded in an application) is sent to the
//! exit node's resolver on its mesh address, through the tunnel, without
//! touching resolv.conf. A LAN resolver reached through the main table
//! (the client's rules keep the LAN reachable) would otherwise see every
//! name the device looks up. While traffic is held back, queries are
//! refused instead, so they fail at once and never go around the tunnel.
//!
//! Queries to loopback (a local stub such as systemd-resolved, whose own
//! upstream queries are redirected in turn) and to mesh addresses (already
//! inside the tunnel) are left alone. Locally sent queries leave with the
//! source address chosen for their original resolver, which the exit node's
//! WireGuard would not accept from this device, so they are masqueraded to
//! the mesh address on the way into the tunnel. With the kill switch,
//! DNS-over-TLS (TCP 853) that would leave outside the tunnel is dropped
//! too. The table is replaced atomically on every change.
//!
//! Each replacement also moves the queries to a new connection-tracking
//! zone (`ct original zone set`, before conntrack, in both hooks): NAT is
//! decided once per connection, so without it a stub that re-sends from
//! the same socket (glibc within one lookup) would keep reaching the
//! resolver of an exit node that died, each retry refreshing the stale
//! entry, and while traffic is held back such flows would skip the
//! refusal. In a new zone a retry is a new connection, redirected (or
//! refused) by the rules now in force; the old entries just time out. The
//! zone applies to the original direction only, so replies need no rule.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU32, Ordering},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tracing::info;

use super::nft::{self, NftError, Table};

pub const NFT_TABLE: Table = Table {
    family: "inet",
    name: "nexd_dns",
};

/// Where the client's queries go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// To this exit node's resolver (its mesh addresses, port 53).
    To(Ipv4Addr, Ipv6Addr),
    /// Refused (traffic is held back).
    Refused,
}

/// What the table needs to know besides the redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub wg: String,
    pub mesh_v4: Ipv4Net,
    pub mesh_v6: Ipv6Net,
    /// The members' addresses (aggregated, as routed into the tunnel):
    /// queries to them are left alone. Not the whole mesh prefix: an
    /// address of it that is no member's is routed to the uplink, and a
    /// resolver there (a carrier's network in 100.64.0.0/10) would get
    /// queries directly.
    pub members: Vec<IpNet>,
    pub kill_switch: bool,
}

/// The two hooks a query of the LAN (through `hook`, not from the tunnel)
/// and of the device itself (output) pass, with the match that keeps the
/// tunnel's own traffic out of the first.
fn from_lan_and_device(hook: &'static str, wg: &str) -> [(&'static str, String); 2] {
    [
        (hook, format!("iifname != \"{wg}\" ")),
        ("output", String::new()),
    ]
}

/// The nftables transaction for `redirect`, its queries in conntrack zone
/// `zone` (not 0: the default zone).
pub fn script(ctx: &Context, redirect: Redirect, zone: u16) -> String {
    let Context {
        wg,
        mesh_v4,
        mesh_v6,
        kill_switch,
        members: _,
    } = ctx;
    // Queries this table acts on: DNS to anything but loopback and the mesh.
    let of = |v6: bool| -> String {
        ctx.members
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)) == v6)
            .map(|n| format!(", {}", n.trunc()))
            .collect()
    };
    let (members4, members6) = (of(false), of(true));
    let v4 =
        format!("ip daddr != {{ 127.0.0.0/8{members4} }} meta l4proto {{ tcp, udp }} th dport 53");
    let v6 = format!("ip6 daddr != {{ ::1{members6} }} meta l4proto {{ tcp, udp }} th dport 53");
    let mut chains = String::new();
    for (hook, iif) in from_lan_and_device("prerouting", wg) {
        chains.push_str(&format!(
            "  chain zone_{hook} {{\n\
             \x20   type filter hook {hook} priority raw; policy accept;\n\
             \x20   {iif}{v4} ct original zone set {zone}\n\
             \x20   {iif}{v6} ct original zone set {zone}\n\
             \x20 }}\n"
        ));
    }
    match redirect {
        Redirect::To(a4, a6) => {
            for (hook, iif) in from_lan_and_device("prerouting", wg) {
                chains.push_str(&format!(
                    "  chain {hook} {{\n\
                     \x20   type nat hook {hook} priority -100; policy accept;\n\
                     \x20   {iif}{v4} counter name \"redirected\" dnat ip to {a4}:53\n\
                     \x20   {iif}{v6} counter name \"redirected\" dnat ip6 to [{a6}]:53\n\
                     \x20 }}\n"
                ));
            }
            chains.push_str(&format!(
                "  chain postrouting {{\n\
                 \x20   type nat hook postrouting priority srcnat; policy accept;\n\
                 \x20   oifname \"{wg}\" ip daddr {a4} ip saddr != {mesh_v4} meta l4proto {{ tcp, udp }} th dport 53 masquerade\n\
                 \x20   oifname \"{wg}\" ip6 daddr {a6} ip6 saddr != {mesh_v6} meta l4proto {{ tcp, udp }} th dport 53 masquerade\n\
                 \x20 }}\n"
            ));
        }
        Redirect::Refused => {
            for (hook, iif) in from_lan_and_device("forward", wg) {
                chains.push_str(&format!(
                    "  chain refuse_{hook} {{\n\
                     \x20   type filter hook {hook} priority filter; policy accept;\n\
                     \x20   {iif}{v4} counter name \"refused\" reject\n\
                     \x20   {iif}{v6} counter name \"refused\" reject\n\
                     \x20 }}\n"
                ));
            }
        }
    }
    if *kill_switch {
        for hook in ["forward", "output"] {
            chains.push_str(&format!(
                "  chain dot_{hook} {{\n\
                 \x20   type filter hook {hook} priority filter; policy accept;\n\
                 \x20   oifname != \"{wg}\" tcp dport 853 counter name \"dot_dropped\" drop\n\
                 \x20 }}\n"
            ));
        }
    }
    let clear = NFT_TABLE.clear_script();
    format!(
        "{clear}table {NFT_TABLE} {{\n\
         \x20 counter redirected {{ }}\n\
         \x20 counter refused {{ }}\n\
         \x20 counter dot_dropped {{ }}\n\
         {chains}\
         }}\n"
    )
}

/// The zone of the next replacement: a new one each time (1..=65535,
/// wrapping), starting from the process id so a restarted nexd does not
/// reuse the zones of the one before.
fn next_zone() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (((std::process::id().wrapping_mul(7919)).wrapping_add(n)) % 65535 + 1) as u16
}

/// Installs (or replaces) the table.
pub fn apply(ctx: &Context, redirect: Redirect) -> Result<(), NftError> {
    nft::apply(&script(ctx, redirect, next_zone()))?;
    match redirect {
        Redirect::To(a4, a6) => {
            info!(%a4, %a6, "DNS redirected to the exit node's resolver")
        }
        Redirect::Refused => info!("DNS refused while internet traffic is held back"),
    }
    Ok(())
}

/// Deletes the table (also one left by a crashed nexd).
pub fn remove() -> Result<(), NftError> {
    NFT_TABLE.delete()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(kill_switch: bool) -> Context {
        Context {
            wg: "wg0".into(),
            mesh_v4: "100.64.0.0/10".parse().expect("v4"),
            mesh_v6: "fd6e:6578:6400::/48".parse().expect("v6"),
            kill_switch,
            members: vec![
                "100.64.0.0/30".parse().expect("v4"),
                "fd6e:6578:6400::/126".parse().expect("v6"),
            ],
        }
    }

    #[test]
    fn redirects_every_query_but_loopback_and_mesh_into_the_tunnel() {
        let s = script(
            &ctx(false),
            Redirect::To(
                "100.64.0.1".parse().expect("ip"),
                "fd6e:6578:6400::1".parse().expect("ip"),
            ),
            7,
        );
        assert!(
            s.starts_with("add table inet nexd_dns\ndelete table inet nexd_dns\n"),
            "{s}"
        );
        assert!(
            s.contains("iifname != \"wg0\" ip daddr != { 127.0.0.0/8, 100.64.0.0/30 } meta l4proto { tcp, udp } th dport 53 counter name \"redirected\" dnat ip to 100.64.0.1:53"),
            "{s}"
        );
        assert!(s.contains("type nat hook output priority -100"), "{s}");
        assert!(s.contains("dnat ip6 to [fd6e:6578:6400::1]:53"), "{s}");
        assert!(
            s.contains(
                "ip saddr != 100.64.0.0/10 meta l4proto { tcp, udp } th dport 53 masquerade"
            ),
            "{s}"
        );
        assert!(
            !s.contains("853"),
            "no DoT rule without the kill switch: {s}"
        );
        // Before conntrack, in both hooks: each replacement's own zone.
        assert_eq!(s.matches("ct original zone set 7").count(), 4, "{s}");
        assert_eq!(s.matches("priority raw").count(), 2, "{s}");
    }

    #[test]
    fn every_replacement_gets_a_new_nonzero_zone() {
        let zones: Vec<u16> = (0..1000).map(|_| next_zone()).collect();
        assert!(zones.iter().all(|z| *z != 0));
        assert!(zones.windows(2).all(|w| w[0] != w[1]), "{zones:?}");
    }

    /// nft itself accepts every variant (checked, not applied, in a
    /// network namespace of its own).
    #[test]
    fn nft_accepts_every_variant() {
        let to = Redirect::To(
            "100.64.0.1".parse().expect("ip"),
            "fd6e:6578:6400::1".parse().expect("ip"),
        );
        for ks in [false, true] {
            for r in [to, Redirect::Refused] {
                if let Err(e) = nft::check(&script(&ctx(ks), r, 65535)) {
                    panic!("{r:?} (kill switch {ks}): {e}");
                }
            }
        }
    }

    #[test]
    fn held_refuses_and_the_kill_switch_drops_dot() {
        let s = script(&ctx(true), Redirect::Refused, 9);
        assert!(!s.contains("dnat"), "{s}");
        // Flows redirected before the hold start over in a new zone, so
        // they meet the refusal instead of their old redirect.
        assert_eq!(s.matches("ct original zone set 9").count(), 4, "{s}");
        assert!(s.contains("counter name \"refused\" reject"), "{s}");
        assert!(
            s.contains("oifname != \"wg0\" tcp dport 853 counter name \"dot_dropped\" drop"),
            "{s}"
        );
    }
}
