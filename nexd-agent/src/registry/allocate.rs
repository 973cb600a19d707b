//! Address allocation decisions for `approve`, pure. The etcd transaction
//! in `admin` makes them safe under concurrency: it only succeeds if the
//! chosen addresses are still free there (see `admin::approve`).
//!
//! A device gets the lowest free offset `i` in both prefixes
//! (100.64.0.i and fd..::i), so its two addresses read alike; when the
//! same offset is not free in both, each family takes its own lowest.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};

/// Addresses already handed out.
#[derive(Debug, Default, Clone)]
pub struct Taken {
    pub v4: BTreeSet<Ipv4Addr>,
    pub v6: BTreeSet<Ipv6Addr>,
}

/// The address `offset` hosts into `prefix`, if it is a usable host there
/// (neither the network nor the broadcast address).
fn v4_at(prefix: Ipv4Net, offset: u64) -> Option<Ipv4Addr> {
    let size = 1u64 << (32 - u32::from(prefix.prefix_len()));
    if offset == 0 || offset >= size - 1 {
        return None;
    }
    let base = u64::from(u32::from(prefix.network()));
    u32::try_from(base + offset).ok().map(Ipv4Addr::from)
}

/// Likewise for IPv6 (only the subnet-router anycast address, offset 0,
/// is excluded).
fn v6_at(prefix: Ipv6Net, offset: u64) -> Option<Ipv6Addr> {
    let bits = 128 - u32::from(prefix.prefix_len());
    if offset == 0 || (bits < 64 && offset >= 1u64 << bits) {
        return None;
    }
    Some(Ipv6Addr::from(
        u128::from(prefix.network()) + u128::from(offset),
    ))
}

/// The addresses for the next device, or `None` when a prefix is full.
pub fn next_pair(v4: Ipv4Net, v6: Ipv6Net, taken: &Taken) -> Option<(Ipv4Addr, Ipv6Addr)> {
    // Among the first `taken + 1` offsets at least one is free in each
    // family (if the prefix is that big), so the scans are bounded by the
    // mesh size.
    let bound = (taken.v4.len().max(taken.v6.len()) as u64) + 2;
    for i in 1..=bound {
        match (v4_at(v4, i), v6_at(v6, i)) {
            (Some(a), Some(b)) if !taken.v4.contains(&a) && !taken.v6.contains(&b) => {
                return Some((a, b));
            }
            (None, _) | (_, None) => break,
            _ => {}
        }
    }
    let a = (1..=bound)
        .map_while(|i| v4_at(v4, i))
        .find(|a| !taken.v4.contains(a))?;
    let b = (1..=bound)
        .map_while(|i| v6_at(v6, i))
        .find(|b| !taken.v6.contains(b))?;
    Some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v4: &str, v6: &str) -> (Ipv4Net, Ipv6Net) {
        (v4.parse().expect("v4"), v6.parse().expect("v6"))
    }

    #[test]
    fn first_device_gets_offset_one_in_both_prefixes() {
        let (a, b) = nets("100.64.0.0/10", "fd6e:6578:6400::/48");
        assert_eq!(
            next_pair(a, b, &Taken::default()),
            Some((
                "100.64.0.1".parse().expect("v4"),
                "fd6e:6578:6400::1".parse().expect("v6")
            ))
        );
    }

    #[test]
    fn holes_are_reused_and_offsets_stay_paired_when_they_can() {
        let (a, b) = nets("100.64.0.0/10", "fd6e:6578:6400::/48");
        let mut t = Taken::default();
        for i in [1u8, 2, 4] {
            t.v4.insert(Ipv4Addr::new(100, 64, 0, i));
            t.v6.insert(format!("fd6e:6578:6400::{i}").parse().expect("v6"));
        }
        let (v4, v6) = next_pair(a, b, &t).expect("free");
        assert_eq!(v4, Ipv4Addr::new(100, 64, 0, 3));
        assert_eq!(v6, "fd6e:6578:6400::3".parse::<Ipv6Addr>().expect("v6"));
        // Offsets 3 and 5 taken only in v6 (an imported mesh numbered
        // differently): the lowest offset free in both is 6.
        t.v6.insert("fd6e:6578:6400::3".parse().expect("v6"));
        t.v6.insert("fd6e:6578:6400::5".parse().expect("v6"));
        let (v4, v6) = next_pair(a, b, &t).expect("free");
        assert_eq!(v4, Ipv4Addr::new(100, 64, 0, 6));
        assert_eq!(v6, "fd6e:6578:6400::6".parse::<Ipv6Addr>().expect("v6"));
        // No offset free in both within the scan: each family its own lowest.
        let mut t = Taken::default();
        t.v4.extend([Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2)]);
        t.v6.extend(
            ["fd6e:6578:6400::3", "fd6e:6578:6400::4"].map(|s| s.parse::<Ipv6Addr>().expect("v6")),
        );
        let (v4, v6) = next_pair(a, b, &t).expect("free");
        assert_eq!(v4, Ipv4Addr::new(100, 64, 0, 3));
        assert_eq!(v6, "fd6e:6578:6400::1".parse::<Ipv6Addr>().expect("v6"));
    }

    #[test]
    fn a_full_prefix_gives_none_and_never_the_broadcast() {
        let (a, b) = nets("100.64.0.0/30", "fd00::/64");
        let mut t = Taken::default();
        let (v4, _) = next_pair(a, b, &t).expect("first");
        t.v4.insert(v4);
        let (v4b, _) = next_pair(a, b, &t).expect("second");
        assert_eq!(v4b, Ipv4Addr::new(100, 64, 0, 2));
        t.v4.insert(v4b);
        assert_eq!(next_pair(a, b, &t), None, ".3 is the broadcast address");
    }

    #[test]
    fn allocation_over_a_thousand_devices_never_repeats() {
        let (a, b) = nets("100.64.0.0/10", "fd6e:6578:6400::/48");
        let mut t = Taken::default();
        for _ in 0..1000 {
            let (v4, v6) = next_pair(a, b, &t).expect("free");
            assert!(t.v4.insert(v4) && t.v6.insert(v6));
        }
        assert_eq!(t.v4.last(), Some(&Ipv4Addr::new(100, 64, 3, 232)));
    }
}
