//! Benchmark 1, classifier cost per packet: the steering classifier run by the kernel
//! with BPF_PROG_TEST_RUN (many repeats, the kernel's own timing) over
//! 10, 1,000 and 100,000 excluded prefixes, IPv4 and IPv6; the baseline is
//! the same harness running a program that returns at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use nexd::datapath::{BypassSet, Datapath};
use nexd_common::{
    config::{DatapathConfig, FLAG_STEER},
    names,
};

use super::{Plan, Samples};

fn packet_v4(dst: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    p.extend_from_slice(&[0x45, 0, 0, 46, 0, 1, 0, 0, 64, 17, 0, 0, 10, 99, 0, 2]);
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, 26, 0, 0]);
    p.extend_from_slice(&[0u8; 18]);
    p
}

fn packet_v6(dst: Ipv6Addr) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
    p.extend_from_slice(&[0x60, 0, 0, 0, 0, 26, 17, 64]);
    p.extend_from_slice(
        &"fd99::2"
            .parse::<Ipv6Addr>()
            .unwrap_or(Ipv6Addr::LOCALHOST)
            .octets(),
    );
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, 26, 0, 0]);
    p.extend_from_slice(&[0u8; 18]);
    p
}

/// `n` distinct prefixes, 90% IPv4 (/16 to /32), 10% IPv6 (/32 to /64),
/// none covering the probe destinations.
pub fn prefixes(n: usize) -> Vec<IpNet> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut out = std::collections::BTreeSet::new();
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let net = if out.len() % 10 == 9 {
            let len = 32 + (x % 33) as u8;
            // 2001:db8:8000::/33 and up: clear of the probes' 2001:db8:203::.
            let addr = Ipv6Addr::from((0x2001_0db8_8000u128 << 80) | (u128::from(x) << 16));
            IpNet::new(IpAddr::V6(addr), len).map(|n| n.trunc())
        } else {
            let len = 16 + (x % 17) as u8;
            // 11.0.0.0 to 99.255.255.255: clear of 203.0.113.0/24.
            let a = 0x0b00_0000u32 + ((x >> 8) as u32 % 0x5800_0000);
            IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), len).map(|n| n.trunc())
        };
        if let Ok(net) = net {
            out.insert(net);
        }
    }
    out.into_iter().collect()
}

pub fn run(plan: &Plan) -> anyhow::Result<Vec<Samples>> {
    let mut dp = Datapath::load()?;
    dp.set_config(DatapathConfig {
        flags: FLAG_STEER,
        fwmark: 0x6e78,
        ..DatapathConfig::default()
    })?;
    dp.set_mesh_prefixes(&["100.64.0.0/10".parse()?, "fd6e:6578:6400::/48".parse()?])?;
    let sizes: &[usize] = if plan.quick {
        &[10]
    } else {
        &[10, 1_000, 100_000]
    };
    let repeat = if plan.quick { 10_000 } else { 1_000_000 };
    let v4 = packet_v4("203.0.113.10".parse()?);
    let v6 = packet_v6("2001:db8:203::10".parse()?);
    let mut rows = Vec::new();
    for &n in sizes {
        let set: BypassSet = prefixes(n).into_iter().map(|p| (p, 3u8)).collect();
        dp.sync_bypass(&set)?;
        for (family, packet) in [("IPv4", &v4), ("IPv6", &v6)] {
            // Warm-up, then alternate floor and classifier.
            dp.test_run(names::NOOP_PROG, packet, 0, repeat)?;
            dp.test_run(names::STEER_PROG, packet, 0, repeat)?;
            let (mut floor, mut steer) = (Vec::new(), Vec::new());
            for _ in 0..plan.rounds() {
                floor.push(
                    dp.test_run(names::NOOP_PROG, packet, 0, repeat)?
                        .nanos_per_run as f64,
                );
                steer.push(
                    dp.test_run(names::STEER_PROG, packet, 0, repeat)?
                        .nanos_per_run as f64,
                );
            }
            rows.push(Samples::new(
                "classifier",
                &format!("steer {family}, {n} prefixes"),
                "ns/pkt",
                "no-op program",
                &floor,
                &steer,
                false,
            ));
        }
    }
    Ok(rows)
}
