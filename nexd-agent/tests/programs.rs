//! The eBPF programs, run by the kernel with BPF_PROG_TEST_RUN over crafted
//! packets: verdict, mark and counters for every class, IPv4 and IPv6,
//! malformed and non-IP input included. Needs root (loading BPF programs);
//! skipped with a message otherwise.
//!
//! The kernel's test-run refuses IP packets shorter than their fixed
//! header (EINVAL), so header truncation cannot be fed in here; it is
//! covered by the bounds checks the verifier enforces on every read, and
//! malformed headers of full length are tested instead.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Instant,
};

use ipnet::IpNet;
use nexd::datapath::{BypassSet, Datapath, guard_set};
use nexd_common::{
    config::{BypassReason, DatapathConfig, FLAG_GUARD, FLAG_STEER},
    names,
};

const MARK: u32 = 0x6e78;
/// WireGuard's listen port in these tests.
const WG_PORT: u16 = 51820;
const PASS: i32 = -1;
const DROP: i32 = 2;

// ---- packet building -------------------------------------------------------

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn ipv4(dst: Ipv4Addr, proto: u8, frag_offset: u16, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h.extend_from_slice(&frag_offset.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&Ipv4Addr::new(10, 99, 0, 5).octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(l4);
    eth(0x0800, &h)
}

fn ipv6(dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
    ipv6_hl(dst, next, 64, l4)
}

fn ipv6_hl(dst: Ipv6Addr, next: u8, hop_limit: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, hop_limit]);
    h.extend_from_slice(&"fd99::5".parse::<Ipv6Addr>().expect("ip").octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(l4);
    eth(0x86DD, &h)
}

fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut u = sport.to_be_bytes().to_vec();
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&[0, 16, 0, 0]);
    u.extend_from_slice(&[0xab; 8]);
    u
}

fn tcp() -> Vec<u8> {
    let mut t = vec![0xc0, 0x00, 0x01, 0xbb];
    t.extend_from_slice(&[0; 16]);
    t
}

fn icmp(kind: u8) -> Vec<u8> {
    vec![kind, 0, 0, 0, 0, 0, 0, 1]
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().expect("ipv4")
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("ipv6")
}

fn arp() -> Vec<u8> {
    eth(0x0806, &[0u8; 28])
}

fn vlan() -> Vec<u8> {
    // 802.1Q tag, then an IPv4 packet.
    let inner = ipv4(v4("203.0.113.10"), 6, 0, &tcp());
    let mut p = inner[..12].to_vec();
    p.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    p.extend_from_slice(&inner[12..]);
    p
}

// ---- harness ---------------------------------------------------------------

fn datapath() -> Option<Datapath> {
    match nexd_testkit::privileged() {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => panic!("{e}"),
    }
    let mut dp = Datapath::load().expect("the verifier accepts the programs loaded at start");
    dp.verify_all()
        .expect("the verifier accepts every program, those loaded on demand too");
    dp.set_config(DatapathConfig {
        flags: FLAG_STEER | FLAG_GUARD,
        fwmark: MARK,
        listen_port: WG_PORT,
        reserved: 0,
    })
    .expect("config");
    dp.set_mesh_prefixes(&[
        "100.64.0.0/10".parse().expect("net"),
        "fd6e:6578:6400::/48".parse().expect("net"),
    ])
    .expect("mesh");
    let mut bypass = BypassSet::new();
    for (net, why) in [
        ("10.99.0.0/24", BypassReason::Lan),
        ("198.51.100.0/24", BypassReason::Excluded),
        ("2001:db8:e::/48", BypassReason::Excluded),
        ("169.254.0.0/16", BypassReason::Builtin),
        ("224.0.0.0/4", BypassReason::Builtin),
        ("255.255.255.255/32", BypassReason::Builtin),
        ("fe80::/10", BypassReason::Builtin),
        ("ff00::/8", BypassReason::Builtin),
    ] {
        bypass.insert(net.parse().expect("net"), why as u8);
    }
    dp.sync_bypass(&bypass).expect("bypass");
    dp.set_endpoints(&[
        SocketAddr::new(IpAddr::V4(v4("192.0.2.1")), WG_PORT),
        SocketAddr::new(IpAddr::V6(v6("2001:db8:1::1")), WG_PORT),
    ])
    .expect("endpoints");
    // The guard lets out the excluded prefixes; 192.0.2.0/24 is the
    // uplink's subnet (a DHCP server may answer a unicast renewal there).
    dp.sync_guard_set(&guard_set(
        &[
            "198.51.100.0/24".parse().expect("net"),
            "2001:db8:e::/48".parse().expect("net"),
        ],
        &["192.0.2.0/24".parse().expect("net")],
    ))
    .expect("guard set");
    Some(dp)
}

fn counters(dp: &Datapath) -> BTreeMap<&'static str, u64> {
    dp.counters()
        .expect("counters")
        .into_iter()
        .map(|(k, v)| (k, v.packets))
        .collect()
}

/// What a run must produce.
struct Expect<'a> {
    action: i32,
    mark: u32,
    /// The counter that must move (`None`: none may).
    counter: Option<&'a str>,
}

/// Runs `prog` on `packet` and checks action, mark and which counter moved.
fn check(dp: &mut Datapath, prog: &str, packet: &[u8], mark_in: u32, want: Expect<'_>, what: &str) {
    let before = counters(dp);
    let out = dp.test_run(prog, packet, mark_in, 1).unwrap_or_else(|e| {
        panic!(
            "{what}: test run of {prog} over {} bytes: {e}",
            packet.len()
        )
    });
    assert_eq!(out.action, want.action, "{what}: action");
    assert_eq!(out.mark, want.mark, "{what}: mark");
    let after = counters(dp);
    let moved: Vec<&str> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .map(|(k, _)| *k)
        .collect();
    match want.counter {
        Some(c) => assert!(
            moved.contains(&c),
            "{what}: {c} did not move (moved: {moved:?})"
        ),
        None => assert!(moved.is_empty(), "{what}: counters moved: {moved:?}"),
    }
}

// ---- the steering classifier -------------------------------------------------

#[test]
fn steering_classifier_verdicts() {
    let Some(mut dp) = datapath() else { return };
    let s = names::STEER_PROG;
    let cases: Vec<(Vec<u8>, u32, Option<&str>, &str)> = vec![
        (
            ipv4(v4("203.0.113.10"), 6, 0, &tcp()),
            0,
            Some("steered_exit"),
            "v4 internet",
        ),
        (
            ipv4(v4("100.64.0.3"), 6, 0, &tcp()),
            0,
            Some("direct_mesh"),
            "v4 mesh",
        ),
        (
            ipv4(v4("198.51.100.7"), 17, 0, &udp(1, 2)),
            MARK,
            Some("bypassed"),
            "v4 excluded",
        ),
        (
            ipv4(v4("10.99.0.9"), 1, 0, &icmp(8)),
            MARK,
            Some("bypassed"),
            "v4 LAN",
        ),
        // A peer's endpoint is no way out for LAN hosts: only the
        // gateway's own WireGuard, by its fwmark, reaches it directly.
        (
            ipv4(v4("192.0.2.1"), 17, 0, &udp(1, 51820)),
            0,
            Some("steered_exit"),
            "v4 endpoint",
        ),
        (
            ipv4(v4("224.0.0.251"), 17, 0, &udp(5353, 5353)),
            MARK,
            Some("bypassed"),
            "v4 multicast",
        ),
        (
            ipv4(v4("198.51.100.7"), 17, 185, &[0xab; 8]),
            MARK,
            Some("bypassed"),
            "v4 later fragment, excluded",
        ),
        (
            ipv4(v4("203.0.113.10"), 17, 185, &[0xab; 8]),
            0,
            Some("steered_exit"),
            "v4 later fragment, internet",
        ),
        (
            ipv6(v6("2001:db8:203::10"), 6, &tcp()),
            0,
            Some("steered_exit"),
            "v6 internet",
        ),
        (
            ipv6(v6("fd6e:6578:6400::3"), 6, &tcp()),
            0,
            Some("direct_mesh"),
            "v6 mesh",
        ),
        (
            ipv6(v6("2001:db8:e::1"), 17, &udp(1, 2)),
            MARK,
            Some("bypassed"),
            "v6 excluded",
        ),
        (
            ipv6(v6("fe80::1"), 58, &icmp(135)),
            MARK,
            Some("bypassed"),
            "v6 link-local",
        ),
        (arp(), 0, Some("not_ip"), "ARP"),
        (vlan(), 0, Some("vlan"), "VLAN tag"),
        (
            eth(0x0800, &{
                let mut h = ipv4(v4("203.0.113.10"), 6, 0, &tcp())[14..].to_vec();
                h[2] = 0;
                h[3] = 10;
                h
            }),
            0,
            Some("malformed"),
            "IPv4 total length below its header",
        ),
        (
            eth(0x0800, &{
                let mut h = ipv4(v4("203.0.113.10"), 6, 0, &tcp())[14..].to_vec();
                h[0] = 0x44;
                h
            }),
            0,
            Some("malformed"),
            "IPv4 IHL 4",
        ),
        (
            eth(0x86DD, &{
                let mut h = ipv6(v6("2001:db8:203::10"), 6, &tcp())[14..].to_vec();
                h[0] = 0x40;
                h
            }),
            0,
            Some("malformed"),
            "IPv6 with version 4",
        ),
    ];
    for (packet, mark, counter, what) in &cases {
        let want = Expect {
            action: PASS,
            mark: *mark,
            counter: *counter,
        };
        check(&mut dp, s, packet, 0, want, what);
    }
    // Switched off: untouched, uncounted.
    dp.set_config(DatapathConfig {
        flags: FLAG_GUARD,
        fwmark: MARK,
        ..DatapathConfig::default()
    })
    .expect("config");
    let want = Expect {
        action: PASS,
        mark: 0,
        counter: None,
    };
    check(&mut dp, s, &cases[2].0, 0, want, "steering off");
}

// ---- the leak guard --------------------------------------------------------

#[test]
fn leak_guard_verdicts() {
    let Some(mut dp) = datapath() else { return };
    let g = names::GUARD_PROG;
    let pass = |p: Vec<u8>, mark: u32, counter: &'static str, what: &'static str| {
        (p, mark, PASS, counter, what)
    };
    let drop = |p: Vec<u8>, mark: u32, what: &'static str| (p, mark, DROP, "guard_dropped", what);
    let ep4 = v4("192.0.2.1");
    let ep6 = v6("2001:db8:1::1");
    #[allow(clippy::type_complexity)]
    let cases: Vec<(Vec<u8>, u32, i32, &str, &str)> = vec![
        // WireGuard's own packets: marked, from the listen port, to an
        // endpoint's address and port.
        pass(
            ipv4(ep4, 17, 0, &udp(WG_PORT, WG_PORT)),
            MARK,
            "guard_passed",
            "WireGuard to an endpoint",
        ),
        pass(
            ipv6(ep6, 17, &udp(WG_PORT, WG_PORT)),
            MARK,
            "guard_passed",
            "WireGuard to a v6 endpoint",
        ),
        pass(
            ipv4(ep4, 17, 185, &[0xab; 8]),
            MARK,
            "guard_passed",
            "WireGuard later fragment (marked)",
        ),
        drop(
            ipv4(ep4, 17, 185, &[0xab; 8]),
            0,
            "unmarked later fragment to an endpoint",
        ),
        drop(
            ipv4(ep4, 17, 0, &udp(WG_PORT, WG_PORT)),
            0,
            "unmarked UDP to an endpoint",
        ),
        drop(
            ipv6(ep6, 17, &udp(WG_PORT, WG_PORT)),
            0,
            "unmarked UDP to a v6 endpoint",
        ),
        drop(ipv4(ep4, 6, 0, &tcp()), 0, "TCP to an endpoint's address"),
        drop(
            ipv4(ep4, 17, 0, &udp(40000, WG_PORT)),
            MARK,
            "marked, not from the listen port",
        ),
        drop(
            ipv4(ep4, 17, 0, &udp(WG_PORT, 53)),
            MARK,
            "marked, to another port of an endpoint",
        ),
        drop(
            ipv4(v4("203.0.113.10"), 17, 0, &udp(WG_PORT, WG_PORT)),
            MARK,
            "marked, not to an endpoint",
        ),
        // The internet.
        drop(
            ipv4(v4("203.0.113.10"), 6, 0, &tcp()),
            0,
            "TCP to the internet",
        ),
        drop(
            ipv4(v4("203.0.113.10"), 1, 0, &icmp(8)),
            0,
            "ping to the internet",
        ),
        drop(
            ipv6(v6("2001:db8:203::10"), 58, &icmp(128)),
            0,
            "ping6 to the internet",
        ),
        drop(
            ipv4(v4("203.0.113.1"), 17, 185, &[0xab; 8]),
            0,
            "later fragment, no ports",
        ),
        // What the operator lets out: excluded routes; not the LAN unless
        // --kill-switch-allow names it.
        pass(
            ipv4(v4("198.51.100.7"), 6, 0, &tcp()),
            0,
            "guard_passed",
            "excluded prefix",
        ),
        pass(
            ipv6(v6("2001:db8:e::1"), 6, &tcp()),
            0,
            "guard_passed",
            "excluded v6 prefix",
        ),
        drop(ipv4(v4("10.99.0.9"), 6, 0, &tcp()), 0, "LAN, not allowed"),
        drop(ipv4(v4("169.254.169.254"), 6, 0, &tcp()), 0, "link-local"),
        drop(ipv4(v4("224.0.0.251"), 17, 0, &udp(5353, 5353)), 0, "mDNS"),
        // DHCPv4: only broadcast or to the uplink's subnet.
        pass(
            ipv4(v4("255.255.255.255"), 17, 0, &udp(68, 67)),
            0,
            "guard_passed",
            "DHCP broadcast",
        ),
        pass(
            ipv4(v4("192.0.2.254"), 17, 0, &udp(68, 67)),
            0,
            "guard_passed",
            "DHCP renewal to the uplink's server",
        ),
        drop(
            ipv4(v4("203.0.113.1"), 17, 0, &udp(68, 67)),
            0,
            "68->67 to an internet address",
        ),
        drop(
            ipv4(v4("255.255.255.255"), 17, 0, &udp(40000, 67)),
            0,
            "broadcast to 67 from another port",
        ),
        // DHCPv6: only to ff02::1:2 or link-local, from 546.
        pass(
            ipv6(v6("ff02::1:2"), 17, &udp(546, 547)),
            0,
            "guard_passed",
            "DHCPv6 solicit",
        ),
        pass(
            ipv6(v6("fe80::1"), 17, &udp(546, 547)),
            0,
            "guard_passed",
            "DHCPv6 to a link-local server",
        ),
        drop(
            ipv6(v6("2001:db8:99::1"), 17, &udp(546, 547)),
            0,
            "UDP 547 to a global address",
        ),
        drop(
            ipv6(v6("2001:db8:99::1"), 17, &udp(40000, 547)),
            0,
            "UDP 547 from any port",
        ),
        // Neighbour discovery: link-local or link-scope multicast, hop
        // limit 255.
        pass(
            ipv6_hl(v6("ff02::1:ff00:1"), 58, 255, &icmp(135)),
            0,
            "guard_passed",
            "neighbour solicitation",
        ),
        pass(
            ipv6_hl(v6("ff02::2"), 58, 255, &icmp(133)),
            0,
            "guard_passed",
            "router solicitation",
        ),
        pass(
            ipv6_hl(v6("fe80::1"), 58, 255, &icmp(136)),
            0,
            "guard_passed",
            "neighbour advertisement",
        ),
        drop(
            ipv6_hl(v6("2001:db8:1::fe"), 58, 255, &icmp(135)),
            0,
            "ND to a global address",
        ),
        drop(
            ipv6_hl(v6("2001:db8:1::fe"), 58, 255, &icmp(133)),
            0,
            "RS to a global address",
        ),
        drop(
            ipv6_hl(v6("2001:db8:99::1"), 58, 255, &icmp(137)),
            0,
            "redirect to a global address",
        ),
        drop(
            ipv6(v6("ff02::1:ff00:1"), 58, &icmp(135)),
            0,
            "ND with hop limit 64",
        ),
        drop(
            ipv6_hl(v6("ff05::2"), 58, 255, &icmp(133)),
            0,
            "ND to site-scope multicast",
        ),
        // MLD reports (hop limit 1, link-scope multicast), which keep the
        // solicited-node groups working on MLD-snooping switches.
        pass(
            ipv6_hl(v6("ff02::16"), 58, 1, &icmp(143)),
            0,
            "guard_passed",
            "MLDv2 report",
        ),
        pass(
            ipv6_hl(
                v6("ff02::16"),
                0,
                1,
                &[58, 0, 5, 2, 0, 0, 1, 0, 143, 0, 0, 0],
            ),
            0,
            "guard_passed",
            "MLDv2 report behind router alert",
        ),
        drop(
            ipv6_hl(v6("2001:db8:99::1"), 58, 1, &icmp(143)),
            0,
            "MLD to a global address",
        ),
        drop(
            ipv6_hl(v6("ff02::16"), 58, 64, &icmp(143)),
            0,
            "MLD with hop limit 64",
        ),
        drop(
            ipv6_hl(v6("ff02::16"), 0, 64, &[17, 0, 0, 0, 0, 0, 0, 0]),
            0,
            "hop-by-hop with hop limit 64",
        ),
        // Link layer: ARP only.
        pass(arp(), 0, "not_ip", "ARP"),
        drop(
            eth(0x8864, &[0x11, 0, 0, 1, 0, 2, 0, 0x21]),
            0,
            "PPPoE session",
        ),
        drop(eth(0x8863, &[0x11, 0x09, 0, 0, 0, 0]), 0, "PPPoE discovery"),
        drop(eth(0x8847, &[0, 0, 0x11, 0x40]), 0, "MPLS"),
        drop(
            eth(0x9100, &ipv4(v4("203.0.113.10"), 6, 0, &tcp())[12..]),
            0,
            "QinQ 0x9100",
        ),
        drop(vlan(), 0, "VLAN tag"),
        drop(
            eth(0x0800, &{
                let mut h = ipv4(v4("203.0.113.10"), 6, 0, &tcp())[14..].to_vec();
                h[0] = 0x44;
                h
            }),
            0,
            "IPv4 IHL 4",
        ),
        drop(
            eth(0x86DD, &{
                let mut h = ipv6(v6("2001:db8:203::10"), 6, &tcp())[14..].to_vec();
                h[0] = 0x40;
                h
            }),
            0,
            "IPv6 with version 4",
        ),
    ];
    for (packet, mark, action, counter, what) in &cases {
        let want = Expect {
            action: *action,
            mark: *mark,
            counter: Some(counter),
        };
        check(&mut dp, g, packet, *mark, want, what);
    }
    // Switched off: everything passes, uncounted.
    dp.set_config(DatapathConfig {
        flags: FLAG_STEER,
        fwmark: MARK,
        listen_port: WG_PORT,
        reserved: 0,
    })
    .expect("config");
    let want = Expect {
        action: PASS,
        mark: 0,
        counter: None,
    };
    check(&mut dp, g, &cases[10].0, 0, want, "guard off");
}

#[test]
fn tunnel_observers_count_both_ways() {
    let Some(mut dp) = datapath() else { return };
    let p = ipv4(v4("100.64.0.2"), 6, 0, &tcp());
    for (prog, packet, counter) in [
        (names::TUNNEL_INGRESS_PROG, &p, "tunnel_rx"),
        (names::TUNNEL_EGRESS_PROG, &p, "tunnel_tx"),
        (names::TUNNEL_EGRESS_PROG, &arp(), "not_ip"),
    ] {
        let want = Expect {
            action: PASS,
            mark: 0,
            counter: Some(counter),
        };
        check(&mut dp, prog, packet, 0, want, counter);
    }
}

// ---- 50,000 excluded prefixes ------------------------------------------------

/// A deterministic spread of prefixes: lengths 16 to 32 over the whole IPv4
/// space, plus IPv6 /32 to /64 prefixes.
fn many_prefixes(n: usize) -> Vec<IpNet> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let r = next();
            if i % 10 == 9 {
                let len = 32 + (r % 33) as u8;
                let addr = Ipv6Addr::from((0x2001_0db8u128 << 96) | (u128::from(r) << 32));
                IpNet::new(IpAddr::V6(addr), len).expect("net").trunc()
            } else {
                let len = 16 + (r % 17) as u8;
                let addr = Ipv4Addr::from((r >> 8) as u32);
                IpNet::new(IpAddr::V4(addr), len).expect("net").trunc()
            }
        })
        .collect()
}

#[test]
fn fifty_thousand_excluded_prefixes() {
    let Some(mut dp) = datapath() else { return };
    let mut prefixes = many_prefixes(52_000);
    prefixes.sort();
    prefixes.dedup();
    prefixes.truncate(50_000);
    assert_eq!(prefixes.len(), 50_000);
    let mut set: BypassSet = dp.bypass().clone();
    for p in &prefixes {
        set.insert(*p, BypassReason::Excluded as u8);
    }
    let start = Instant::now();
    let (added, removed) = dp.sync_bypass(&set).expect("50k prefixes");
    eprintln!(
        "loaded {added} prefixes into the bypass tries in {:.0} ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(added, 50_000);
    assert_eq!(removed, 0);
    // A sample of lookups, in the kernel's trie and through the program.
    for p in prefixes.iter().step_by(997) {
        let inside = match p {
            IpNet::V4(n) => IpAddr::V4(n.broadcast()),
            IpNet::V6(n) => IpAddr::V6(n.broadcast()),
        };
        assert!(
            dp.bypass_lookup(inside).expect("lookup").is_some(),
            "{inside} in {p}"
        );
        let packet = match inside {
            IpAddr::V4(a) => ipv4(a, 6, 0, &tcp()),
            IpAddr::V6(a) => ipv6(a, 6, &tcp()),
        };
        let out = dp.test_run(names::STEER_PROG, &packet, 0, 1).expect("run");
        // Mesh prefixes win over bypass; none of the random ones is mesh.
        assert_eq!(out.mark, MARK, "{inside} should bypass");
    }
    // Addresses outside every prefix stay steered.
    let outside = ipv4(v4("203.0.113.10"), 6, 0, &tcp());
    if dp
        .bypass_lookup(IpAddr::V4(v4("203.0.113.10")))
        .expect("lookup")
        .is_none()
    {
        assert_eq!(
            dp.test_run(names::STEER_PROG, &outside, 0, 1)
                .expect("run")
                .mark,
            0
        );
    }
    // Live update: removing them leaves the original set.
    let original = datapath_bypass_original();
    let (_, removed) = dp.sync_bypass(&original).expect("shrink");
    assert!(removed >= 49_000);
    assert_eq!(dp.bypass().len(), original.len());
}

fn datapath_bypass_original() -> BypassSet {
    let mut s = BypassSet::new();
    for net in [
        "10.99.0.0/24",
        "198.51.100.0/24",
        "2001:db8:e::/48",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "255.255.255.255/32",
        "fe80::/10",
        "ff00::/8",
        "192.0.2.1/32",
    ] {
        s.insert(net.parse().expect("net"), 0);
    }
    s
}
