//! A synthetic exit node for benchmarks: N clients with one IPv4 and one
//! IPv6 mesh address each, and a cloud exit node's policy topped up to a
//! given number of denied prefixes. Shared (`#[path]`) by the exit
//! program benchmark and the `exit_datapath` example that the namespace
//! benchmark attaches.
#![allow(dead_code, reason = "each includer uses a different subset")]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use nexd::datapath::exit::{
    ClientLimits, ExitPolicy, HostNetworks, RateLimit, ServedClient, exit_policy,
};
use nexd_common::exit::{DenyReason, PolicyValue};

/// Client `i`'s IPv4 mesh address: 100.64.1.0 on (room for 4 million).
pub fn client_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x6440_0100u32 + i as u32)
}

/// Client `i`'s IPv6 mesh address.
pub fn client_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::from((0xfd6e_6578_6400u128 << 80) | (0x1_0000 + i as u128))
}

/// The exit node's own mesh addresses.
pub const EXIT_V4: &str = "100.64.0.1";
pub const EXIT_V6: &str = "fd6e:6578:6400::1";

/// `n` clients, optionally each rate-limited (far above what a benchmark
/// sends, to measure the bucket's cost without drops).
pub fn clients(n: usize, limited: bool) -> Vec<ServedClient> {
    (0..n)
        .map(|i| ServedClient {
            name: format!("client{i}"),
            addresses: vec![IpAddr::V4(client_v4(i)), IpAddr::V6(client_v6(i))],
            limits: if limited {
                ClientLimits::both(RateLimit::new(1_000_000_000_000))
            } else {
                ClientLimits::default()
            },
        })
        .collect()
}

/// A cloud exit node's policy (uplink 10.20.1.5/24), topped up with
/// operator-like routes to exactly `n` denied prefixes: IPv4 /16 to /28
/// in 11.0.0.0/8 and IPv6 /48 to /64 in 2001:db8:8000::/33, clear of the
/// benchmarks' destinations (203.0.113.0/24, 2001:db8:203::/48).
pub fn policy(n: usize) -> anyhow::Result<ExitPolicy> {
    let host = HostNetworks {
        addresses: vec![
            "10.20.1.5/24".parse()?,
            "2001:db8:5::5/64".parse()?,
            "100.64.0.1/10".parse()?,
            "fd6e:6578:6400::1/48".parse()?,
        ],
        routes: vec!["10.20.1.0/24".parse()?],
        mesh_prefixes: vec!["100.64.0.0/10".parse()?, "fd6e:6578:6400::/48".parse()?],
        mesh_addresses: vec![EXIT_V4.parse()?, EXIT_V6.parse()?],
    };
    let mut p = exit_policy(&host, &[]);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let denied = |p: &ExitPolicy| {
        p.values()
            .filter(|v| matches!(v, PolicyValue::Deny(_)))
            .count()
    };
    while denied(&p) < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let net = if x.is_multiple_of(5) {
            let len = 48 + (x % 17) as u8;
            let a = (0x2001_0db8_8000u128 << 80) | (u128::from(x) << 16);
            IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), len)?
        } else {
            let len = 16 + (x % 13) as u8;
            let a = 0x0b00_0000 | ((x >> 8) as u32 & 0x00ff_ffff);
            IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), len)?
        };
        p.insert(net.trunc(), PolicyValue::Deny(DenyReason::Connected));
    }
    Ok(p)
}

/// The denied prefixes of a policy (for expressing the same policy in
/// nftables), with their reasons.
pub fn denied(p: &ExitPolicy) -> Vec<(IpNet, DenyReason)> {
    p.iter()
        .filter_map(|(n, v)| match v {
            PolicyValue::Deny(r) => Some((*n, *r)),
            _ => None,
        })
        .collect()
}
