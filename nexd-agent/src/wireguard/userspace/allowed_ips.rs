//! Cryptokey routing: one device-wide table from prefixes to peers, where the
//! longest matching prefix wins. The send side asks it which peer a packet
//! goes to; the receive side asks it whether a decrypted packet's source
//! belongs to the peer that sent it (anything else is dropped: that check is
//! what makes AllowedIPs a security boundary).
//!
//! A prefix belongs to one peer at a time, as in the kernel: inserting it
//! for another peer moves it. The table is rebuilt on every peer change
//! and swapped in whole, so the data path reads it without locks beyond one
//! `Arc` clone per batch.
//!
//! Layout: per family, one hash map per prefix length in use, longest
//! first. A mesh uses a handful of lengths (/32, /128, a few subnets, /0),
//! so a lookup is a few masked hash probes whatever the number of peers.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

/// Prefix -> value, longest prefix match.
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Family<u32, T>,
    v6: Family<u128, T>,
}

#[derive(Debug, Clone)]
struct Family<K, T> {
    /// (prefix length, masked address -> value), longest first.
    by_len: Vec<(u8, HashMap<K, T>)>,
}

impl<K, T> Default for Family<K, T> {
    fn default() -> Self {
        Family { by_len: Vec::new() }
    }
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            v4: Family::default(),
            v6: Family::default(),
        }
    }
}

fn mask4(a: Ipv4Addr, len: u8) -> u32 {
    let a = u32::from(a);
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(a: Ipv6Addr, len: u8) -> u128 {
    let a = u128::from(a);
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(len)))
    }
}

impl<K: std::hash::Hash + Eq + Copy, T: Copy> Family<K, T> {
    fn insert(&mut self, len: u8, key: K, value: T) {
        let i = match self.by_len.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(i) => i,
            Err(i) => {
                self.by_len.insert(i, (len, HashMap::new()));
                i
            }
        };
        self.by_len[i].1.insert(key, value);
    }

    fn lookup(&self, masked: impl Fn(u8) -> K) -> Option<T> {
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&masked(*len)).copied())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_len.iter().map(|(_, m)| m.len()).sum()
    }
}

impl<T: Copy> AllowedIps<T> {
    /// Adds `net` for `value`; a prefix already in the table moves to it.
    /// Host bits of `net` are ignored.
    pub fn insert(&mut self, net: IpNet, value: T) {
        match net {
            IpNet::V4(n) => self
                .v4
                .insert(n.prefix_len(), mask4(n.addr(), n.prefix_len()), value),
            IpNet::V6(n) => self
                .v6
                .insert(n.prefix_len(), mask6(n.addr(), n.prefix_len()), value),
        }
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<T> {
        match addr {
            IpAddr::V4(a) => self.v4.lookup(|len| mask4(a, len)),
            IpAddr::V6(a) => self.v6.lookup(|len| mask6(a, len)),
        }
    }

    /// How many prefixes the table holds.
    #[cfg(test)]
    pub fn prefix_count(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wireguard::userspace::testing::{ip, net};

    #[test]
    fn longest_prefix_wins_in_both_families() {
        let mut t = AllowedIps::default();
        t.insert(net("0.0.0.0/0"), 'x');
        t.insert(net("100.64.0.0/10"), 'm');
        t.insert(net("100.64.0.2/32"), 'b');
        t.insert(net("::/0"), 'x');
        t.insert(net("fd6e:6578:6400::/48"), 'm');
        t.insert(net("fd6e:6578:6400::2/128"), 'b');
        assert_eq!(t.lookup(ip("100.64.0.2")), Some('b'));
        assert_eq!(t.lookup(ip("100.64.0.3")), Some('m'));
        assert_eq!(t.lookup(ip("203.0.113.10")), Some('x'));
        assert_eq!(t.lookup(ip("fd6e:6578:6400::2")), Some('b'));
        assert_eq!(t.lookup(ip("fd6e:6578:6400::9")), Some('m'));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some('x'));
        assert_eq!(t.prefix_count(), 6);
    }

    #[test]
    fn no_default_route_means_no_peer() {
        let mut t = AllowedIps::default();
        t.insert(net("100.64.0.2/32"), 1u32);
        assert_eq!(t.lookup(ip("100.64.0.3")), None);
        assert_eq!(t.lookup(ip("fd00::1")), None);
        // An IPv4 prefix never matches an IPv6 address.
        t.insert(net("0.0.0.0/0"), 2);
        assert_eq!(t.lookup(ip("::ffff:1.2.3.4")), None);
    }

    #[test]
    fn a_prefix_moves_to_the_last_peer_that_claims_it() {
        let mut t = AllowedIps::default();
        t.insert(net("0.0.0.0/0"), 1u32);
        t.insert(net("0.0.0.0/0"), 2);
        assert_eq!(t.lookup(ip("198.51.100.1")), Some(2));
        assert_eq!(t.prefix_count(), 1);
    }

    #[test]
    fn host_bits_are_ignored() {
        let mut t = AllowedIps::default();
        t.insert(net("10.1.2.3/16"), 1u32);
        t.insert(net("fd00::1:2:3/64"), 2);
        assert_eq!(t.lookup(ip("10.1.200.200")), Some(1));
        assert_eq!(t.lookup(ip("10.2.0.0")), None);
        assert_eq!(t.lookup(ip("fd00::ffff")), Some(2));
    }
}
