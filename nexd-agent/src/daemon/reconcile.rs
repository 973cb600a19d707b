//! The decisions of the reconcile loop as pure functions: from the mesh and
//! local settings to the wanted peers, and from wanted vs. applied to the
//! smallest change. No I/O here, so every rule is unit-tested.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    keys::PublicKey,
    mesh::{Endpoint, Host, Mesh},
    wireguard::PeerConfig,
};

/// 0.0.0.0/0 and ::/0, checked when compiling.
const DEFAULT_V4: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0);
const DEFAULT_V6: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0);

/// The default routes an exit peer carries in addition to its own addresses.
pub fn default_routes() -> [IpNet; 2] {
    [IpNet::V4(DEFAULT_V4), IpNet::V6(DEFAULT_V6)]
}

/// The mesh addresses of this device with the mesh prefix lengths, as they
/// go on the interface (which also routes the whole mesh prefix into it).
pub fn interface_addresses(mesh: &Mesh, own: &PublicKey) -> Option<[IpNet; 2]> {
    let me = mesh.device(own)?;
    Some([
        IpNet::new(IpAddr::V4(me.ipv4), mesh.ipv4_prefix.prefix_len()).ok()?,
        IpNet::new(IpAddr::V6(me.ipv6), mesh.ipv6_prefix.prefix_len()).ok()?,
    ])
}

/// The routes into the tunnel: every member's addresses, aggregated
/// (members numbered in order make a few short prefixes), not the whole
/// mesh prefix, which holds addresses that are no member's (a cloud's
/// metadata service at 100.100.100.200 is in 100.64.0.0/10).
pub fn member_routes(mesh: &Mesh) -> Vec<IpNet> {
    let v4: Vec<IpNet> = mesh
        .devices
        .iter()
        .map(|d| IpNet::from(IpAddr::V4(d.ipv4)))
        .collect();
    let v6: Vec<IpNet> = mesh
        .devices
        .iter()
        .map(|d| IpNet::from(IpAddr::V6(d.ipv6)))
        .collect();
    let mut out = IpNet::aggregate(&v4);
    out.extend(IpNet::aggregate(&v6));
    out
}

/// Turns endpoints into socket addresses: literal addresses directly, names
/// through `resolved` (filled by the caller's DNS lookups).
pub fn endpoint_addr(
    ep: &Endpoint,
    resolved: &HashMap<Endpoint, SocketAddr>,
) -> Option<SocketAddr> {
    match &ep.host {
        Host::Ip(ip) => Some(SocketAddr::new(*ip, ep.port)),
        Host::Name(_) => resolved.get(ep).copied(),
    }
}

/// The peer config every other device should have on this one: its /32 and
/// /128 (host routes, built from the address itself so no conversion can
/// fail into something wider), its endpoint, the mesh keepalive.
pub fn wanted_peers(
    mesh: &Mesh,
    own: &PublicKey,
    resolved: &HashMap<Endpoint, SocketAddr>,
) -> Vec<PeerConfig> {
    mesh.peers_of(own)
        .map(|d| PeerConfig {
            public_key: d.public_key,
            endpoint: d.endpoint.as_ref().and_then(|e| endpoint_addr(e, resolved)),
            allowed_ips: vec![
                IpNet::V4(Ipv4Net::from(d.ipv4)),
                IpNet::V6(Ipv6Net::from(d.ipv6)),
            ],
            persistent_keepalive: mesh.persistent_keepalive,
        })
        .collect()
}

/// `peers` with the default routes added to `exit_peer`'s AllowedIPs
/// (exit-node client mode): the only peer that accepts internet traffic.
pub fn with_default_routes(peers: &[PeerConfig], exit_peer: Option<&PublicKey>) -> Vec<PeerConfig> {
    peers
        .iter()
        .map(|p| {
            let mut p = p.clone();
            if exit_peer == Some(&p.public_key) {
                p.allowed_ips.extend(default_routes());
            }
            p
        })
        .collect()
}

/// The change that turns `applied` into `wanted`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerDiff {
    /// New peers and peers whose config changed.
    pub upsert: Vec<PeerConfig>,
    /// Peers that are no longer wanted.
    pub remove: Vec<PublicKey>,
}

impl PeerDiff {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// Compares against what nexd last applied (not the live device, whose
/// endpoints follow roaming peers), so an unchanged peer is never touched
/// and its session survives the reload.
pub fn diff_peers(applied: &BTreeMap<PublicKey, PeerConfig>, wanted: &[PeerConfig]) -> PeerDiff {
    let mut diff = PeerDiff::default();
    let mut wanted_keys = std::collections::HashSet::with_capacity(wanted.len());
    for w in wanted {
        wanted_keys.insert(w.public_key);
        if applied.get(&w.public_key) != Some(w) {
            diff.upsert.push(w.clone());
        }
    }
    diff.remove = applied
        .keys()
        .filter(|k| !wanted_keys.contains(*k))
        .copied()
        .collect();
    diff
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn mesh(n: u8) -> Mesh {
        crate::testing::mesh(
            (0..usize::from(n))
                .map(|i| crate::testing::device(i, PrivateKey::generate().public_key())),
        )
    }

    fn applied(peers: &[PeerConfig]) -> BTreeMap<PublicKey, PeerConfig> {
        peers.iter().map(|p| (p.public_key, p.clone())).collect()
    }

    #[test]
    fn every_other_device_is_a_peer_with_host_routes() {
        let m = mesh(3);
        let own = m.devices[0].public_key;
        let peers = wanted_peers(&m, &own, &HashMap::new());
        assert_eq!(peers.len(), 2);
        assert!(peers.iter().all(|p| p.public_key != own));
        assert_eq!(peers[0].allowed_ips[0].to_string(), "100.64.0.2/32");
        assert_eq!(peers[0].allowed_ips[1].to_string(), "fd00::2/128");
        assert_eq!(
            peers[0].endpoint,
            Some("192.0.2.2:51820".parse().expect("sa"))
        );
        assert_eq!(peers[0].persistent_keepalive, 25);
        let addrs = interface_addresses(&m, &own).expect("own");
        assert_eq!(addrs[0].to_string(), "100.64.0.1/10");
        assert_eq!(addrs[1].to_string(), "fd00::1/64");
    }

    #[test]
    fn only_the_exit_peer_gets_default_routes() {
        let m = mesh(3);
        let own = m.devices[0].public_key;
        let exit = m.devices[2].public_key;
        let peers = with_default_routes(&wanted_peers(&m, &own, &HashMap::new()), Some(&exit));
        let by_key: HashMap<_, _> = peers.iter().map(|p| (p.public_key, p)).collect();
        assert_eq!(by_key[&exit].allowed_ips.len(), 4);
        assert!(
            by_key[&exit]
                .allowed_ips
                .contains(&"0.0.0.0/0".parse().expect("net"))
        );
        assert!(
            by_key[&exit]
                .allowed_ips
                .contains(&"::/0".parse().expect("net"))
        );
        assert_eq!(by_key[&m.devices[1].public_key].allowed_ips.len(), 2);
        assert_eq!(
            default_routes().map(|n| n.to_string()),
            ["0.0.0.0/0".to_owned(), "::/0".to_owned()]
        );
    }

    #[test]
    fn unresolved_names_leave_the_endpoint_empty() {
        let mut m = mesh(2);
        let ep = Endpoint {
            host: Host::Name("peer.example".into()),
            port: 1,
        };
        m.devices[1].endpoint = Some(ep.clone());
        let own = m.devices[0].public_key;
        assert_eq!(wanted_peers(&m, &own, &HashMap::new())[0].endpoint, None);
        let resolved = HashMap::from([(ep, "198.51.100.7:1".parse().expect("sa"))]);
        assert_eq!(
            wanted_peers(&m, &own, &resolved)[0].endpoint,
            Some("198.51.100.7:1".parse().expect("sa"))
        );
    }

    #[test]
    fn diff_touches_only_changed_peers() {
        let m = mesh(4);
        let own = m.devices[0].public_key;
        let before = wanted_peers(&m, &own, &HashMap::new());
        let applied = applied(&before);
        assert!(diff_peers(&applied, &before).is_empty());

        // Remove d3, change d4's endpoint, keep d2.
        let mut m2 = m.clone();
        let removed = m2.devices.remove(2).public_key;
        m2.devices[2].endpoint = Some(Endpoint {
            host: Host::Ip("203.0.113.9".parse().expect("ip")),
            port: 4000,
        });
        let after = wanted_peers(&m2, &own, &HashMap::new());
        let diff = diff_peers(&applied, &after);
        assert_eq!(diff.remove, vec![removed]);
        assert_eq!(diff.upsert.len(), 1);
        assert_eq!(diff.upsert[0].public_key, m2.devices[2].public_key);
    }

    #[test]
    fn diff_from_nothing_adds_everyone() {
        let m = mesh(3);
        let own = m.devices[0].public_key;
        let wanted = wanted_peers(&m, &own, &HashMap::new());
        let diff = diff_peers(&BTreeMap::new(), &wanted);
        assert_eq!(diff.upsert.len(), 2);
        assert!(diff.remove.is_empty());
    }

    #[test]
    fn members_are_routed_in_few_prefixes_and_nothing_else_of_the_mesh_prefix() {
        // d0..d5 at 100.64.0.1-6 and fd00::1-6.
        let m = mesh(6);
        let routes = member_routes(&m);
        let s: Vec<String> = routes.iter().map(ToString::to_string).collect();
        assert_eq!(
            s,
            [
                "100.64.0.1/32",
                "100.64.0.2/31",
                "100.64.0.4/31",
                "100.64.0.6/32",
                "fd00::1/128",
                "fd00::2/127",
                "fd00::4/127",
                "fd00::6/128"
            ]
        );
        let metadata: IpAddr = "100.100.100.200".parse().expect("ip");
        assert!(!routes.iter().any(|r| r.contains(&metadata)));
        for d in &m.devices {
            assert!(routes.iter().any(|r| r.contains(&IpAddr::V4(d.ipv4))));
            assert!(routes.iter().any(|r| r.contains(&IpAddr::V6(d.ipv6))));
        }
    }
}
