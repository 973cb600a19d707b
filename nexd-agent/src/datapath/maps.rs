//! Keeping the maps in step with the reconcile loop: mesh prefixes, bypass
//! prefixes (with their reason), and the endpoints of mesh peers. Updates
//! are diffs, applied live: programs are never reloaded, and a packet sees
//! either the old or the new entry for a prefix, never a gap.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use aya::{
    Pod,
    maps::{
        HashMap as BpfHashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
};
use ipnet::IpNet;
use nexd_common::names;
use tracing::debug;

use super::{Datapath, DatapathError};

/// The content of the bypass tries: prefix and why it is there
/// (`nexd_common::config::BypassReason` as u8).
pub type BypassSet = HashMap<IpNet, u8>;

/// The content of the guard tries: prefix and its `GUARD_*` flags.
pub type GuardSet = HashMap<IpNet, u8>;

/// The guard tries for `allow` (excluded routes, `--kill-switch-allow`)
/// and `uplink_nets` (DHCP servers). A lookup finds only the longest
/// match, so each prefix carries the flags of every listed prefix that
/// contains it: an uplink subnet inside an allowed range stays allowed.
pub fn guard_set(allow: &[IpNet], uplink_nets: &[IpNet]) -> GuardSet {
    use nexd_common::config::{GUARD_ALLOW, GUARD_UPLINK_NET};
    // Within one list containment changes nothing (same flag), so only
    // the other list is searched: allow x uplinks, which stays linear in
    // the tens of thousands of excluded routes (a host has few uplink
    // subnets).
    let mut set = GuardSet::with_capacity(allow.len() + uplink_nets.len());
    for a in allow.iter().map(IpNet::trunc) {
        let in_uplink = uplink_nets.iter().any(|u| u.contains(&a));
        *set.entry(a).or_default() |= GUARD_ALLOW | if in_uplink { GUARD_UPLINK_NET } else { 0 };
    }
    for u in uplink_nets.iter().map(IpNet::trunc) {
        let in_allow = allow.iter().any(|a| a.contains(&u));
        *set.entry(u).or_default() |= GUARD_UPLINK_NET | if in_allow { GUARD_ALLOW } else { 0 };
    }
    set
}

/// The key of `net` in an IPv4 LPM trie.
pub(super) fn v4_key(net: &ipnet::Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

/// The key of `net` in an IPv6 LPM trie.
pub(super) fn v6_key(net: &ipnet::Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

/// A trie's names, IPv4 and IPv6: every trie nexd writes comes as a pair,
/// one per family, with the same values.
pub(super) type TriePair = (&'static str, &'static str);

impl Datapath {
    /// The LPM trie `name` with keys `K` (`[u8; 4]` or `[u8; 16]`).
    fn trie<K: Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<LpmTrie<&mut MapData, K, u8>, DatapathError> {
        self.typed_map_mut(name)
    }

    /// Writes `value` for `net` into the trie of its family.
    pub(super) fn trie_insert(
        &mut self,
        (v4, v6): TriePair,
        net: &IpNet,
        value: u8,
    ) -> Result<(), DatapathError> {
        match net.trunc() {
            IpNet::V4(n) => self
                .trie(v4)?
                .insert(&v4_key(&n), value, 0)
                .map_err(|e| DatapathError::map(v4, e)),
            IpNet::V6(n) => self
                .trie(v6)?
                .insert(&v6_key(&n), value, 0)
                .map_err(|e| DatapathError::map(v6, e)),
        }
    }

    /// Removes `net` from the trie of its family; a prefix that is not
    /// there is what was wanted.
    pub(super) fn trie_remove(
        &mut self,
        (v4, v6): TriePair,
        net: &IpNet,
    ) -> Result<(), DatapathError> {
        let r = match net.trunc() {
            IpNet::V4(n) => self
                .trie(v4)?
                .remove(&v4_key(&n))
                .map_err(|e| DatapathError::map(v4, e)),
            IpNet::V6(n) => self
                .trie(v6)?
                .remove(&v6_key(&n))
                .map_err(|e| DatapathError::map(v6, e)),
        };
        match r {
            Err(DatapathError::Map { source, .. })
                if matches!(*source, aya::maps::MapError::KeyNotFound) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Makes the bypass tries hold exactly `wanted`, touching only what
    /// differs. Returns (added or changed, removed).
    pub fn sync_bypass(&mut self, wanted: &BypassSet) -> Result<(usize, usize), DatapathError> {
        let maps = (names::BYPASS_V4_MAP, names::BYPASS_V6_MAP);
        self.sync_kept(maps, |m| &mut m.bypass, wanted)
    }

    /// Makes the leak guard's tries hold exactly `wanted` (see
    /// [`guard_set`]). Returns (added or changed, removed).
    pub fn sync_guard_set(&mut self, wanted: &GuardSet) -> Result<(usize, usize), DatapathError> {
        let maps = (names::GUARD_V4_MAP, names::GUARD_V6_MAP);
        self.sync_kept(maps, |m| &mut m.guard_set, wanted)
    }

    /// [`Self::sync_tries`] for the pair whose written state `kept` holds
    /// (taken out for the sync, so the tries can be borrowed meanwhile).
    fn sync_kept(
        &mut self,
        tries: TriePair,
        kept: fn(&mut Self) -> &mut HashMap<IpNet, u8>,
        wanted: &HashMap<IpNet, u8>,
    ) -> Result<(usize, usize), DatapathError> {
        let mut current = std::mem::take(kept(self));
        let r = self.sync_tries(tries, &mut current, wanted);
        *kept(self) = current;
        r
    }

    /// Brings a pair of tries from `current` (what was written, updated
    /// here) to `wanted`: changes first, then removals, so a prefix never
    /// has a gap.
    fn sync_tries(
        &mut self,
        tries: TriePair,
        current: &mut HashMap<IpNet, u8>,
        wanted: &HashMap<IpNet, u8>,
    ) -> Result<(usize, usize), DatapathError> {
        let mut added = 0;
        let changes: Vec<(IpNet, u8)> = wanted
            .iter()
            .filter(|(net, v)| current.get(*net) != Some(*v))
            .map(|(n, v)| (n.trunc(), *v))
            .collect();
        for (net, v) in changes {
            self.trie_insert(tries, &net, v)?;
            current.insert(net, v);
            added += 1;
        }
        let stale: Vec<IpNet> = current
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .copied()
            .collect();
        for net in &stale {
            self.trie_remove(tries, net)?;
            current.remove(net);
        }
        if added > 0 || !stale.is_empty() {
            debug!(
                map = tries.0,
                added,
                removed = stale.len(),
                total = current.len(),
                "tries updated"
            );
        }
        Ok((added, stale.len()))
    }

    /// The bypass tries' content as nexd last wrote it.
    pub fn bypass(&self) -> &BypassSet {
        &self.bypass
    }

    /// Makes the mesh-prefix tries hold exactly `prefixes`.
    pub fn set_mesh_prefixes(&mut self, prefixes: &[IpNet]) -> Result<(), DatapathError> {
        let wanted: HashSet<IpNet> = prefixes.iter().map(IpNet::trunc).collect();
        let current = std::mem::take(&mut self.mesh_prefixes);
        for net in current.difference(&wanted) {
            self.trie_remove((names::MESH_V4_MAP, names::MESH_V6_MAP), net)?;
        }
        for net in wanted.difference(&current) {
            self.trie_insert((names::MESH_V4_MAP, names::MESH_V6_MAP), net, 1)?;
        }
        self.mesh_prefixes = wanted;
        Ok(())
    }

    /// Makes the endpoint sets hold exactly `endpoints` (peers' underlay
    /// addresses and ports: what the leak guard lets WireGuard send to).
    pub fn set_endpoints(&mut self, endpoints: &[SocketAddr]) -> Result<(), DatapathError> {
        let wanted: HashSet<SocketAddr> = endpoints.iter().copied().collect();
        let current = std::mem::take(&mut self.endpoints);
        for ep in wanted.difference(&current) {
            self.endpoint_op(*ep, true)?;
        }
        for ep in current.difference(&wanted) {
            self.endpoint_op(*ep, false)?;
        }
        self.endpoints = wanted;
        Ok(())
    }

    fn endpoint_op(&mut self, ep: SocketAddr, insert: bool) -> Result<(), DatapathError> {
        let name = match ep.ip() {
            IpAddr::V4(_) => names::ENDPOINTS_V4_MAP,
            IpAddr::V6(_) => names::ENDPOINTS_V6_MAP,
        };
        let port = ep.port().to_be_bytes();
        let r = match ep.ip() {
            IpAddr::V4(a) => {
                let mut m: BpfHashMap<&mut MapData, [u8; 6], u8> = self.typed_map_mut(name)?;
                let o = a.octets();
                let key = [o[0], o[1], o[2], o[3], port[0], port[1]];
                if insert {
                    m.insert(key, 1, 0)
                } else {
                    m.remove(&key)
                }
            }
            IpAddr::V6(a) => {
                let mut m: BpfHashMap<&mut MapData, [u8; 18], u8> = self.typed_map_mut(name)?;
                let mut key = [0u8; 18];
                key[..16].copy_from_slice(&a.octets());
                key[16..].copy_from_slice(&port);
                if insert {
                    m.insert(key, 1, 0)
                } else {
                    m.remove(&key)
                }
            }
        };
        match r {
            Err(aya::maps::MapError::KeyNotFound) if !insert => Ok(()),
            other => other.map_err(|e| DatapathError::map(name, e)),
        }
    }

    /// Looks `addr` up in the bypass tries the way the programs do.
    pub fn bypass_lookup(&mut self, addr: IpAddr) -> Result<Option<u8>, DatapathError> {
        let r = match addr {
            IpAddr::V4(a) => self
                .trie(names::BYPASS_V4_MAP)?
                .get(&Key::new(32, a.octets()), 0),
            IpAddr::V6(a) => self
                .trie(names::BYPASS_V6_MAP)?
                .get(&Key::new(128, a.octets()), 0),
        };
        match r {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(DatapathError::map(names::BYPASS_V4_MAP, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::net;
    use nexd_common::config::{GUARD_ALLOW, GUARD_UPLINK_NET};

    #[test]
    fn guard_set_carries_the_flags_of_every_containing_prefix() {
        let set = guard_set(
            &[net("10.0.0.0/8"), net("198.51.100.0/24")],
            &[net("10.1.0.0/16"), net("192.0.2.0/24")],
        );
        assert_eq!(set[&net("10.0.0.0/8")], GUARD_ALLOW);
        // The uplink subnet inside the allowed range stays allowed.
        assert_eq!(set[&net("10.1.0.0/16")], GUARD_ALLOW | GUARD_UPLINK_NET);
        assert_eq!(set[&net("192.0.2.0/24")], GUARD_UPLINK_NET);
        assert_eq!(set[&net("198.51.100.0/24")], GUARD_ALLOW);
        assert_eq!(set.len(), 4);
        // The same prefix in both lists: one entry with both flags.
        let both = guard_set(&[net("192.0.2.0/24")], &[net("192.0.2.0/24")]);
        assert_eq!(both[&net("192.0.2.0/24")], GUARD_ALLOW | GUARD_UPLINK_NET);
        assert_eq!(both.len(), 1);
    }

    #[test]
    fn guard_set_keeps_every_one_of_fifty_thousand_exclusions() {
        let allow: Vec<IpNet> = (0..50_000u32)
            .map(|i| {
                let a = std::net::Ipv4Addr::from(0x0b00_0000 + (i << 8));
                IpNet::V4(ipnet::Ipv4Net::new(a, 24).expect("len"))
            })
            .collect();
        let set = guard_set(&allow, &[net("192.0.2.0/24")]);
        assert_eq!(set.len(), 50_001);
        assert_eq!(set[&allow[49_999]], GUARD_ALLOW);
    }
}
