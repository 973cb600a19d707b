//! Keeping the maps in step with the reconcile loop: mesh prefixes, bypass
//! prefixes (with their reason), and the endpoints of mesh peers. Updates
//! are diffs, applied live: programs are never reloaded, and a packet sees
//! either the old or the new entry for a prefix, never a gap.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use aya::maps::{
    HashMap as BpfHashMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::IpNet;
use nexd_common::names;
use tracing::debug;

use super::{Datapath, DatapathError};

/// The content of the bypass tries: prefix and why it is there
/// (`nexd_common::config::BypassReason` as u8).
pub type BypassSet = HashMap<IpNet, u8>;

fn v4_key(net: &ipnet::Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

fn v6_key(net: &ipnet::Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

impl Datapath {
    fn trie4(
        &mut self,
        name: &'static str,
    ) -> Result<LpmTrie<&mut MapData, [u8; 4], u8>, DatapathError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| DatapathError::Missing {
                kind: "map",
                name: name.to_owned(),
            })?;
        LpmTrie::try_from(map).map_err(|e| DatapathError::map(name, e))
    }

    fn trie6(
        &mut self,
        name: &'static str,
    ) -> Result<LpmTrie<&mut MapData, [u8; 16], u8>, DatapathError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| DatapathError::Missing {
                kind: "map",
                name: name.to_owned(),
            })?;
        LpmTrie::try_from(map).map_err(|e| DatapathError::map(name, e))
    }

    fn insert(
        &mut self,
        v4: &'static str,
        v6: &'static str,
        net: &IpNet,
        value: u8,
    ) -> Result<(), DatapathError> {
        match net.trunc() {
            IpNet::V4(n) => self
                .trie4(v4)?
                .insert(&v4_key(&n), value, 0)
                .map_err(|e| DatapathError::map(v4, e)),
            IpNet::V6(n) => self
                .trie6(v6)?
                .insert(&v6_key(&n), value, 0)
                .map_err(|e| DatapathError::map(v6, e)),
        }
    }

    fn remove(
        &mut self,
        v4: &'static str,
        v6: &'static str,
        net: &IpNet,
    ) -> Result<(), DatapathError> {
        let r = match net.trunc() {
            IpNet::V4(n) => self
                .trie4(v4)?
                .remove(&v4_key(&n))
                .map_err(|e| DatapathError::map(v4, e)),
            IpNet::V6(n) => self
                .trie6(v6)?
                .remove(&v6_key(&n))
                .map_err(|e| DatapathError::map(v6, e)),
        };
        match r {
            // Already gone is what we wanted.
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
        let mut added = 0;
        let changes: Vec<(IpNet, u8)> = wanted
            .iter()
            .filter(|(net, v)| self.bypass.get(*net) != Some(*v))
            .map(|(n, v)| (n.trunc(), *v))
            .collect();
        for (net, v) in changes {
            self.insert(names::BYPASS_V4_MAP, names::BYPASS_V6_MAP, &net, v)?;
            self.bypass.insert(net, v);
            added += 1;
        }
        let stale: Vec<IpNet> = self
            .bypass
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .copied()
            .collect();
        for net in &stale {
            self.remove(names::BYPASS_V4_MAP, names::BYPASS_V6_MAP, net)?;
            self.bypass.remove(net);
        }
        if added > 0 || !stale.is_empty() {
            debug!(
                added,
                removed = stale.len(),
                total = self.bypass.len(),
                "bypass tries updated"
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
            self.remove(names::MESH_V4_MAP, names::MESH_V6_MAP, net)?;
        }
        for net in wanted.difference(&current) {
            self.insert(names::MESH_V4_MAP, names::MESH_V6_MAP, net, 1)?;
        }
        self.mesh_prefixes = wanted;
        Ok(())
    }

    /// Makes the endpoint sets hold exactly `addrs` (peers' underlay IPs).
    pub fn set_endpoints(&mut self, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        let wanted: HashSet<IpAddr> = addrs.iter().copied().collect();
        let current = std::mem::take(&mut self.endpoints);
        for ip in current.difference(&wanted) {
            self.endpoint_op(*ip, false)?;
        }
        for ip in wanted.difference(&current) {
            self.endpoint_op(*ip, true)?;
        }
        self.endpoints = wanted;
        Ok(())
    }

    fn endpoint_op(&mut self, ip: IpAddr, insert: bool) -> Result<(), DatapathError> {
        let name = match ip {
            IpAddr::V4(_) => names::ENDPOINTS_V4_MAP,
            IpAddr::V6(_) => names::ENDPOINTS_V6_MAP,
        };
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| DatapathError::Missing {
                kind: "map",
                name: name.to_owned(),
            })?;
        let r = match ip {
            IpAddr::V4(a) => {
                let mut m: BpfHashMap<&mut MapData, [u8; 4], u8> =
                    BpfHashMap::try_from(map).map_err(|e| DatapathError::map(name, e))?;
                if insert {
                    m.insert(a.octets(), 1, 0)
                } else {
                    m.remove(&a.octets())
                }
            }
            IpAddr::V6(a) => {
                let mut m: BpfHashMap<&mut MapData, [u8; 16], u8> =
                    BpfHashMap::try_from(map).map_err(|e| DatapathError::map(name, e))?;
                if insert {
                    m.insert(a.octets(), 1, 0)
                } else {
                    m.remove(&a.octets())
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
                .trie4(names::BYPASS_V4_MAP)?
                .get(&Key::new(32, a.octets()), 0),
            IpAddr::V6(a) => self
                .trie6(names::BYPASS_V6_MAP)?
                .get(&Key::new(128, a.octets()), 0),
        };
        match r {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(DatapathError::map(names::BYPASS_V4_MAP, e)),
        }
    }
}
