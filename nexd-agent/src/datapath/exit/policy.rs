//! Where an exit node's clients may go: the policy tries' content.
//!
//! "Internet only" is a deny list: everything is allowed except prefixes
//! that are not the internet (private, CGNAT, link-local and the cloud
//! metadata services, ULA, loopback, multicast, reserved), the exit host's
//! own connected and routed subnets, its own addresses, and the mesh (the
//! mesh is reached directly through WireGuard, never relayed). The
//! operator's allow list (`--exit-allow CIDR`) overrides the deny entries
//! it covers; the exit host's own addresses and the metadata services
//! stay denied unless allowed exactly. The exit node's own mesh addresses
//! are `Local`: its mesh services, open to every mesh member.
//!
//! All of it is computed here, as a pure function, into one map per
//! prefix whose longest match is the verdict: an allow entry inside a
//! denied prefix wins by being longer, so the programs need one lookup.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nexd_common::{
    exit::{DenyReason, PolicyValue},
    names,
};
use tracing::debug;

use crate::datapath::{Datapath, DatapathError, maps::TriePair};

/// The policy tries' content: prefix -> verdict (longest match wins; an
/// address without a match is the internet, allowed).
pub type ExitPolicy = BTreeMap<IpNet, PolicyValue>;

/// What the exit host has, as the daemon reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNetworks {
    /// Every address of the host with its prefix length (all interfaces,
    /// the WireGuard one included): the addresses themselves are denied,
    /// and their subnets are connected subnets.
    pub addresses: Vec<IpNet>,
    /// Destinations of the host's routes other than the default routes
    /// (the main table's connected and static routes, routes to a VPN...):
    /// subnets the exit node reaches but that are not the internet.
    /// Prefix length 0 is ignored. Leave out routes that merely split the
    /// default (0.0.0.0/1 and 128.0.0.0/1 via the uplink): they would
    /// deny the internet.
    pub routes: Vec<IpNet>,
    /// The mesh prefixes (IPv4 and IPv6).
    pub mesh_prefixes: Vec<IpNet>,
    /// This exit node's own mesh addresses.
    pub mesh_addresses: Vec<IpAddr>,
}

/// A constant prefix (`new_assert` panics on a length above 32, which
/// the unit tests would show).
fn v4(a: [u8; 4], len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::from(a), len))
}

fn v6(a: u128, len: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::from(a), len))
}

/// The prefixes denied on every exit node, with their reasons.
pub fn builtin_denies() -> Vec<(IpNet, DenyReason)> {
    use DenyReason::*;
    vec![
        (v4([0, 0, 0, 0], 8), Reserved),
        (v4([10, 0, 0, 0], 8), Private),
        (v4([100, 64, 0, 0], 10), Cgnat),
        (v4([127, 0, 0, 0], 8), Loopback),
        (v4([169, 254, 0, 0], 16), LinkLocal),
        // AWS, GCP, Azure, OpenStack, Oracle... (AWS ECS and the Amazon
        // time and DNS services are elsewhere in 169.254/16: link-local.)
        (v4([169, 254, 169, 254], 32), Metadata),
        // Azure's WireServer, a public address only the VM host answers.
        (v4([168, 63, 129, 16], 32), Metadata),
        (v4([172, 16, 0, 0], 12), Private),
        (v4([192, 168, 0, 0], 16), Private),
        (v4([224, 0, 0, 0], 4), Multicast),
        (v4([240, 0, 0, 0], 4), Reserved),
        (v6(0, 128), Reserved),
        (v6(1, 128), Loopback),
        (v6(0xffff_0000_0000, 96), Reserved),
        (v6(0x0100 << 112, 64), Reserved),
        (v6(0xfc00 << 112, 7), Ula),
        // AWS's IPv6 metadata endpoint, inside the ULA.
        (v6((0xfd00_0ec2u128 << 96) | 0x254, 128), Metadata),
        (v6(0xfe80 << 112, 10), LinkLocal),
        (v6(0xff00 << 112, 8), Multicast),
        // Local-use NAT64 (RFC 8215; its IPv4 may sit anywhere in the
        // address) and 6to4 (RFC 3056, deprecated by RFC 7526): through a
        // translator or relay in the exit host's network, IPv4 space.
        (v6(0x0064_ff9b_0001 << 80, 48), Translated),
        (v6(0x2002 << 112, 16), Translated),
    ]
}

/// The well-known NAT64 prefix (RFC 6052), 64:ff9b::/96: a NAT64
/// gateway in the exit host's network (a cloud's, or the operator's)
/// turns 64:ff9b::a.b.c.d into IPv4 a.b.c.d.
const NAT64: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96);

/// An IPv4 prefix as the NAT64 prefix carries it: 64:ff9b::a.b.c.d/(96+len).
fn nat64(net: Ipv4Net) -> IpNet {
    let bits = u128::from(NAT64.network()) | u128::from(u32::from(net.network()));
    v6(bits, 96 + net.prefix_len())
}

/// Deny reasons an allow entry only overrides when it is exactly the same
/// prefix: sharing a subnet must not open the host itself or the cloud's
/// metadata service inside it.
fn pinned(reason: DenyReason) -> bool {
    matches!(reason, DenyReason::HostAddress | DenyReason::Metadata)
}

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// The exit node's policy: built-in denies, the host's connected and
/// routed subnets and its addresses, the mesh; then the operator's allow
/// list; then the exit node's own mesh addresses as local.
pub fn exit_policy(host: &HostNetworks, allow: &[IpNet]) -> ExitPolicy {
    let mut deny: BTreeMap<IpNet, DenyReason> = BTreeMap::new();
    for (net, reason) in builtin_denies() {
        deny.insert(net, reason);
    }
    let connected = host
        .addresses
        .iter()
        .map(IpNet::trunc)
        .chain(host.routes.iter().map(IpNet::trunc))
        .filter(|n| n.prefix_len() > 0);
    for net in connected {
        // A built-in reason at the very same prefix says more.
        deny.entry(net).or_insert(DenyReason::Connected);
    }
    for net in &host.mesh_prefixes {
        deny.insert(net.trunc(), DenyReason::Mesh);
    }
    for addr in &host.addresses {
        // The metadata address assigned on the host (how a cloud serves
        // it) keeps its name: the operator reads "metadata", not a
        // generic host address.
        deny.entry(host_prefix(addr.addr()))
            .and_modify(|r| {
                if *r != DenyReason::Metadata {
                    *r = DenyReason::HostAddress;
                }
            })
            .or_insert(DenyReason::HostAddress);
    }
    // What is denied in IPv4 is denied through the NAT64 prefix too,
    // with the same reason; the rest of it (the IPv4 internet) stays
    // open. An IPv4 allow does not open its NAT64 form: that takes an
    // allow of the NAT64 prefix itself.
    let mirrored: Vec<(IpNet, DenyReason)> = deny
        .iter()
        .filter_map(|(net, reason)| match net {
            IpNet::V4(n) => Some((nat64(*n), *reason)),
            IpNet::V6(_) => None,
        })
        .collect();
    for (net, reason) in mirrored {
        deny.entry(net).or_insert(reason);
    }

    let allow: Vec<IpNet> = allow.iter().map(IpNet::trunc).collect();
    // An allow prefix removes the denies it covers (pinned ones only when
    // equal) ...
    deny.retain(|d, reason| {
        !allow.iter().any(|a| {
            if pinned(*reason) {
                a == d
            } else {
                a.contains(d)
            }
        })
    });
    let mut policy: ExitPolicy = deny
        .into_iter()
        .map(|(net, reason)| (net, PolicyValue::Deny(reason)))
        .collect();
    // ... and needs an entry of its own only inside a remaining deny.
    for a in &allow {
        let inside_deny = policy
            .iter()
            .any(|(d, v)| matches!(v, PolicyValue::Deny(_)) && d != a && d.contains(a));
        if inside_deny && !policy.contains_key(a) {
            policy.insert(*a, PolicyValue::Allow);
        }
    }
    for ip in &host.mesh_addresses {
        policy.insert(host_prefix(*ip), PolicyValue::Local);
    }
    policy
}

/// The verdict for `addr`: the longest matching entry, as the programs'
/// LPM lookup finds it (`None`: the internet).
pub fn policy_lookup(policy: &ExitPolicy, addr: IpAddr) -> Option<PolicyValue> {
    policy
        .iter()
        .filter(|(net, _)| net.contains(&addr))
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(_, v)| *v)
}

/// The policy tries, IPv4 and IPv6.
const POLICY_TRIES: TriePair = (names::EXIT_POLICY_V4_MAP, names::EXIT_POLICY_V6_MAP);

impl Datapath {
    fn policy_write(
        &mut self,
        net: &IpNet,
        value: Option<PolicyValue>,
    ) -> Result<(), DatapathError> {
        match value {
            Some(v) => self.trie_insert(POLICY_TRIES, net, v.encode()),
            None => self.trie_remove(POLICY_TRIES, net),
        }
    }

    /// Makes the policy tries hold exactly `wanted`, touching only what
    /// differs: new and changed entries first, then removals, so an
    /// address never falls through a gap to a shorter (or no) prefix
    /// while the update runs. Returns (added or changed, removed).
    pub fn sync_exit_policy(
        &mut self,
        wanted: &ExitPolicy,
    ) -> Result<(usize, usize), DatapathError> {
        let wanted: ExitPolicy = wanted.iter().map(|(n, v)| (n.trunc(), *v)).collect();
        let changes: Vec<(IpNet, PolicyValue)> = wanted
            .iter()
            .filter(|(n, v)| self.exit.policy.get(*n) != Some(*v))
            .map(|(n, v)| (*n, *v))
            .collect();
        for (net, v) in &changes {
            self.policy_write(net, Some(*v))?;
            self.exit.policy.insert(*net, *v);
        }
        let stale: Vec<IpNet> = self
            .exit
            .policy
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .copied()
            .collect();
        for net in &stale {
            self.policy_write(net, None)?;
            self.exit.policy.remove(net);
        }
        if !changes.is_empty() || !stale.is_empty() {
            debug!(
                changed = changes.len(),
                removed = stale.len(),
                total = self.exit.policy.len(),
                "exit policy tries updated"
            );
        }
        Ok((changes.len(), stale.len()))
    }

    /// The policy tries' content as nexd last wrote it.
    pub fn exit_policy(&self) -> &ExitPolicy {
        &self.exit.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ip, net};

    /// An exit node in a cloud VPC: 10.20.1.5/24 on its uplink, a route
    /// to a peered VPC, WireGuard with mesh addresses.
    fn cloud_host() -> HostNetworks {
        HostNetworks {
            addresses: vec![
                net("10.20.1.5/24"),
                net("2001:db8:5::5/64"),
                net("127.0.0.1/8"),
                net("::1/128"),
                net("100.64.0.1/10"),
                net("fd6e:6578:6400::1/48"),
            ],
            routes: vec![
                net("10.20.1.0/24"),
                net("198.51.100.0/24"),
                net("0.0.0.0/0"),
                net("100.64.0.0/10"),
            ],
            mesh_prefixes: vec![net("100.64.0.0/10"), net("fd6e:6578:6400::/48")],
            mesh_addresses: vec![ip("100.64.0.1"), ip("fd6e:6578:6400::1")],
        }
    }

    #[test]
    fn the_metadata_address_on_the_host_is_counted_as_metadata() {
        let mut host = cloud_host();
        host.addresses.push(net("169.254.169.254/32"));
        host.addresses.push(net("169.254.7.1/16"));
        let p = exit_policy(&host, &[]);
        assert_eq!(denied(&p, "169.254.169.254"), Some(DenyReason::Metadata));
        assert_eq!(denied(&p, "169.254.7.1"), Some(DenyReason::HostAddress));
    }

    fn verdict(p: &ExitPolicy, a: &str) -> Option<PolicyValue> {
        policy_lookup(p, ip(a))
    }

    fn denied(p: &ExitPolicy, a: &str) -> Option<DenyReason> {
        match verdict(p, a) {
            Some(PolicyValue::Deny(r)) => Some(r),
            _ => None,
        }
    }

    #[test]
    fn the_internet_is_allowed_and_nothing_else() {
        let p = exit_policy(&cloud_host(), &[]);
        for a in [
            "203.0.113.10",
            "8.8.8.8",
            "2001:db8:203::10",
            "2606:4700::1111",
        ] {
            assert_eq!(verdict(&p, a), None, "{a}");
        }
        use DenyReason::*;
        for (a, r) in [
            ("169.254.169.254", Metadata),
            ("169.254.170.2", LinkLocal),
            ("168.63.129.16", Metadata),
            ("fd00:ec2::254", Metadata),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("192.168.1.1", Private),
            ("10.20.1.7", Connected),
            ("198.51.100.9", Connected),
            ("10.20.1.5", HostAddress),
            ("2001:db8:5::5", HostAddress),
            ("2001:db8:5::77", Connected),
            ("100.100.100.200", Mesh),
            ("100.64.0.2", Mesh),
            ("fd6e:6578:6400::2", Mesh),
            ("fe80::1", LinkLocal),
            ("fd12:3456::1", Ula),
            ("127.0.0.1", HostAddress),
            ("127.0.0.53", Loopback),
            ("127.1.2.3", Loopback),
            ("::1", HostAddress),
            ("224.0.0.251", Multicast),
            ("ff02::1", Multicast),
            ("255.255.255.255", Reserved),
            ("0.1.2.3", Reserved),
            ("::ffff:10.0.0.1", Reserved),
        ] {
            assert_eq!(denied(&p, a), Some(r), "{a}");
        }
        assert_eq!(verdict(&p, "100.64.0.1"), Some(PolicyValue::Local));
        assert_eq!(verdict(&p, "fd6e:6578:6400::1"), Some(PolicyValue::Local));
    }

    #[test]
    fn cgnat_outside_the_mesh_is_cgnat() {
        let mut host = cloud_host();
        host.mesh_prefixes = vec![net("100.64.0.0/16")];
        host.addresses.retain(|a| a.addr() != ip("100.64.0.1"));
        host.routes.retain(|r| *r != net("100.64.0.0/10"));
        let p = exit_policy(&host, &[]);
        assert_eq!(denied(&p, "100.65.0.1"), Some(DenyReason::Cgnat));
        assert_eq!(denied(&p, "100.64.9.9"), Some(DenyReason::Mesh));
    }

    #[test]
    fn an_allowed_subnet_overrides_what_it_covers() {
        // Share 10.20.0.0/16 (covers the connected 10.20.1.0/24).
        let p = exit_policy(&cloud_host(), &[net("10.20.0.0/16")]);
        assert_eq!(verdict(&p, "10.20.1.7"), Some(PolicyValue::Allow));
        assert_eq!(verdict(&p, "10.20.9.9"), Some(PolicyValue::Allow));
        // Still denied around it, and the host itself inside it.
        assert_eq!(denied(&p, "10.21.0.1"), Some(DenyReason::Private));
        assert_eq!(denied(&p, "10.20.1.5"), Some(DenyReason::HostAddress));
        assert!(
            !p.contains_key(&net("10.20.1.0/24")),
            "covered deny left behind"
        );
    }

    #[test]
    fn allowing_exactly_a_pinned_prefix_opens_it() {
        let p = exit_policy(&cloud_host(), &[net("169.254.169.254/32")]);
        assert_eq!(verdict(&p, "169.254.169.254"), Some(PolicyValue::Allow));
        assert_eq!(denied(&p, "169.254.169.253"), Some(DenyReason::LinkLocal));
        // A wider allow does not open the metadata service.
        let p = exit_policy(&cloud_host(), &[net("169.254.0.0/16")]);
        assert_eq!(verdict(&p, "169.254.1.1"), None);
        assert_eq!(denied(&p, "169.254.169.254"), Some(DenyReason::Metadata));
    }

    #[test]
    fn an_allow_outside_every_deny_adds_nothing() {
        let base = exit_policy(&cloud_host(), &[]);
        let p = exit_policy(&cloud_host(), &[net("203.0.113.0/24")]);
        assert_eq!(base, p);
    }

    #[test]
    fn an_allow_equal_to_a_deny_removes_it() {
        let p = exit_policy(&cloud_host(), &[net("198.51.100.0/24")]);
        assert_eq!(verdict(&p, "198.51.100.9"), None);
        assert!(!p.contains_key(&net("198.51.100.0/24")));
    }

    #[test]
    fn the_exit_nodes_mesh_addresses_stay_local_whatever_is_allowed() {
        let p = exit_policy(&cloud_host(), &[net("100.64.0.0/10"), net("100.64.0.1/32")]);
        assert_eq!(verdict(&p, "100.64.0.1"), Some(PolicyValue::Local));
        // The rest of the mesh is opened by the allow: the operator's call.
        assert_eq!(verdict(&p, "100.64.0.2"), None);
    }

    #[test]
    fn default_routes_are_not_connected_subnets() {
        let p = exit_policy(&cloud_host(), &[]);
        assert!(!p.contains_key(&net("0.0.0.0/0")));
        assert_eq!(verdict(&p, "9.9.9.9"), None);
    }

    /// Issue 21, finding 12: a NAT64 gateway or a 6to4 router in the exit
    /// host's network turns these IPv6 destinations into IPv4 ones.
    #[test]
    fn nat64_and_6to4_do_not_reach_what_ipv4_denies() {
        let p = exit_policy(&cloud_host(), &[]);
        use DenyReason::*;
        for (a, r) in [
            // 64:ff9b::/96 carries the IPv4 address in its last 32 bits.
            ("64:ff9b::10.1.2.3", Private),
            ("64:ff9b::169.254.169.254", Metadata),
            ("64:ff9b::168.63.129.16", Metadata),
            ("64:ff9b::10.20.1.7", Connected),
            ("64:ff9b::198.51.100.9", Connected),
            ("64:ff9b::10.20.1.5", HostAddress),
            ("64:ff9b::100.64.0.2", Mesh),
            ("64:ff9b::127.0.0.1", HostAddress),
            ("64:ff9b::192.168.1.1", Private),
            // The local-use prefix and 6to4: whole.
            ("64:ff9b:1::a01:203", Translated),
            ("64:ff9b:1:ffff::1", Translated),
            ("2002:a01:203::1", Translated),
            ("2002:cb00:710a::1", Translated),
        ] {
            assert_eq!(denied(&p, a), Some(r), "{a}");
        }
        // The IPv4 internet through NAT64 stays open.
        assert_eq!(verdict(&p, "64:ff9b::8.8.8.8"), None);
        assert_eq!(verdict(&p, "64:ff9b::203.0.113.10"), None);
        // Sharing an IPv4 subnet does not share its NAT64 form; allowing
        // the NAT64 form does, but not the metadata service inside it.
        let p = exit_policy(&cloud_host(), &[net("10.20.0.0/16")]);
        assert_eq!(verdict(&p, "10.20.1.7"), Some(PolicyValue::Allow));
        assert_eq!(denied(&p, "64:ff9b::10.20.1.7"), Some(Connected));
        let p = exit_policy(&cloud_host(), &[net("64:ff9b::/96")]);
        assert_eq!(verdict(&p, "64:ff9b::10.1.2.3"), None);
        assert_eq!(denied(&p, "64:ff9b::169.254.169.254"), Some(Metadata));
    }

    #[test]
    fn every_builtin_prefix_is_in_canonical_form() {
        for (n, _) in builtin_denies() {
            assert_eq!(n, n.trunc(), "{n}");
        }
    }
}
