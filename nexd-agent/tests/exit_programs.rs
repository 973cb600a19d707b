//! The exit node's programs and the MSS clamp, run by the kernel with
//! BPF_PROG_TEST_RUN over crafted packets: every verdict, the counters it
//! must move (per client and global), MSS rewriting with the TCP checksum
//! verified afterwards, and rate limiting with a tiny bucket. Needs root
//! (loading BPF programs); skipped with a message otherwise.
//!
//! The kernel hands a classifier under test an Ethernet frame, so the
//! `_l2` variants run here; the L3 variants attached to WireGuard differ
//! only in where the IP header starts (`parse.rs`).

#[path = "support/packets.rs"]
mod packets;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::IpNet;
use nexd::datapath::{
    Datapath, TestContext, TestRunOutput,
    exit::{
        ClientLimits, ExitClientRow, HostNetworks, RateLimit, ServedClient, exit_policy,
        mss_for_mtu,
    },
};
use nexd_common::names;
use packets::*;

const PASS: i32 = -1;
const DROP: i32 = 2;

const INGRESS: &str = names::EXIT_INGRESS_L2_PROG;
const EGRESS: &str = names::EXIT_EGRESS_L2_PROG;
/// Egress packets that were received on another interface (forwarded).
const FORWARDED: TestContext = TestContext {
    mark: 0,
    ingress_ifindex: 7,
    gso_segs: 0,
    gso_size: 0,
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("net")
}

const ALICE: &str = "100.64.0.2";
const ALICE6: &str = "fd6e:6578:6400::2";
const BOB: &str = "100.64.0.3";
const CAROL: &str = "100.64.0.4";
const STRANGER: &str = "100.64.0.99";
const EXIT: &str = "100.64.0.1";
const INTERNET: &str = "203.0.113.10";
const INTERNET6: &str = "2001:db8:203::10";

/// An exit node on 10.20.1.5/24 that also routes 198.51.100.0/24, with
/// 10.30.0.0/16 shared by the operator; clients alice (v4 and v6), bob,
/// and carol (rate-limited from the client: 1000 bytes/s, 300-byte burst).
fn datapath() -> Option<Datapath> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: loading eBPF programs needs root");
        return None;
    }
    let mut dp = Datapath::load().expect("the verifier accepts the programs loaded at start");
    dp.verify_all()
        .expect("the verifier accepts every program, those loaded on demand too");
    let host = HostNetworks {
        addresses: vec![
            net("10.20.1.5/24"),
            net("100.64.0.1/10"),
            net("fd6e:6578:6400::1/48"),
        ],
        routes: vec![net("10.20.1.0/24"), net("198.51.100.0/24")],
        mesh_prefixes: vec![net("100.64.0.0/10"), net("fd6e:6578:6400::/48")],
        mesh_addresses: vec![ip(EXIT), ip("fd6e:6578:6400::1")],
    };
    let policy = exit_policy(&host, &[net("10.30.0.0/16")]);
    dp.sync_exit_policy(&policy).expect("policy");
    dp.sync_exit_clients(&clients(ClientLimits::default()))
        .expect("clients");
    dp.set_mss(mss_for_mtu(1420)).expect("mss");
    dp.set_exit_enforcing(true).expect("enforce");
    Some(dp)
}

fn clients(carol: ClientLimits) -> Vec<ServedClient> {
    vec![
        ServedClient {
            name: "alice".into(),
            addresses: vec![ip(ALICE), ip(ALICE6)],
            limits: ClientLimits::default(),
        },
        ServedClient {
            name: "bob".into(),
            addresses: vec![ip(BOB)],
            limits: ClientLimits::default(),
        },
        ServedClient {
            name: "carol".into(),
            addresses: vec![ip(CAROL)],
            limits: carol,
        },
    ]
}

/// A 1000 byte/s limit with a 300-byte burst.
fn tiny() -> RateLimit {
    RateLimit {
        bits_per_second: 8_000,
        burst_bytes: 300,
    }
}

fn global(dp: &Datapath) -> BTreeMap<&'static str, u64> {
    dp.counters()
        .expect("counters")
        .into_iter()
        .map(|(k, v)| (k, v.packets))
        .collect()
}

fn rows(dp: &Datapath) -> BTreeMap<String, ExitClientRow> {
    dp.exit_clients()
        .expect("client counters")
        .into_iter()
        .map(|r| (r.client.clone(), r))
        .collect()
}

fn run(dp: &mut Datapath, prog: &str, packet: &[u8], ctx: TestContext) -> TestRunOutput {
    dp.test_run_with(prog, packet, ctx, 1)
        .unwrap_or_else(|e| panic!("test run of {prog}: {e}"))
}

/// What moved between two snapshots.
struct Moved {
    global: Vec<&'static str>,
    clients: BTreeMap<String, ExitClientRow>,
}

fn diff(
    before: &(BTreeMap<&'static str, u64>, BTreeMap<String, ExitClientRow>),
    dp: &Datapath,
) -> Moved {
    let g = global(dp);
    let global = g
        .iter()
        .filter(|(k, v)| before.0.get(*k) != Some(v))
        .map(|(k, _)| *k)
        .collect();
    let clients = rows(dp)
        .into_iter()
        .filter(|(k, v)| before.1.get(k) != Some(v))
        .map(|(k, now)| {
            let was = &before.1[&k];
            let mut denied = BTreeMap::new();
            for (r, n) in &now.denied {
                let d = n - was.denied.get(r).copied().unwrap_or(0);
                if d > 0 {
                    denied.insert(r.clone(), d);
                }
            }
            let row = ExitClientRow {
                rx_packets: now.rx_packets - was.rx_packets,
                rx_bytes: now.rx_bytes - was.rx_bytes,
                tx_packets: now.tx_packets - was.tx_packets,
                tx_bytes: now.tx_bytes - was.tx_bytes,
                denied_total: now.denied_total - was.denied_total,
                denied,
                ..now
            };
            (k, row)
        })
        .collect();
    Moved { global, clients }
}

/// Runs one packet and returns the action and what moved.
fn step(dp: &mut Datapath, prog: &str, packet: &[u8], ctx: TestContext) -> (TestRunOutput, Moved) {
    let before = (global(dp), rows(dp));
    let out = run(dp, prog, packet, ctx);
    (out, diff(&before, dp))
}

// ---- ingress: authorization and policy -----------------------------------

#[test]
fn a_served_client_reaches_the_internet_and_is_counted() {
    let Some(mut dp) = datapath() else { return };
    for (src, dst) in [(ALICE, INTERNET), (ALICE6, INTERNET6)] {
        let p = udp_packet(ip(src), ip(dst), 100);
        let (out, moved) = step(&mut dp, INGRESS, &p, TestContext::default());
        assert_eq!(out.outcome.action, PASS, "{src} -> {dst}");
        assert_eq!(out.packet, p, "the packet was changed");
        let alice = &moved.clients["alice"];
        assert_eq!((alice.rx_packets, alice.rx_bytes), (1, p.len() as u64));
        assert_eq!((alice.tx_packets, alice.denied_total), (0, 0));
        assert_eq!(moved.clients.len(), 1, "{:?}", moved.clients.keys());
        assert!(moved.global.is_empty(), "{:?}", moved.global);
    }
    // A GRO aggregate counts its segments, each with its own headers
    // (everything before the 100 bytes of payload).
    let p = udp_packet(ip(ALICE), ip(INTERNET), 100);
    let hdr = p.len() as u64 - 100;
    let ctx = TestContext {
        gso_segs: 5,
        gso_size: 20,
        ..Default::default()
    };
    let (_, moved) = step(&mut dp, INGRESS, &p, ctx);
    let alice = &moved.clients["alice"];
    assert_eq!(
        (alice.rx_packets, alice.rx_bytes),
        (5, p.len() as u64 + 4 * hdr)
    );
    // A GSO packet from a TUN (the userspace backend) has a segment size
    // but no count yet: 100 bytes of payload in 30-byte segments are 4.
    let ctx = TestContext {
        gso_size: 30,
        ..Default::default()
    };
    let (_, moved) = step(&mut dp, INGRESS, &p, ctx);
    let alice = &moved.clients["alice"];
    assert_eq!(
        (alice.rx_packets, alice.rx_bytes),
        (4, p.len() as u64 + 3 * hdr)
    );
}

#[test]
fn an_unknown_source_is_dropped_and_counted() {
    let Some(mut dp) = datapath() else { return };
    for dst in [INTERNET, "169.254.169.254"] {
        let p = udp_packet(ip(STRANGER), ip(dst), 100);
        let (out, moved) = step(&mut dp, INGRESS, &p, TestContext::default());
        assert_eq!(out.outcome.action, DROP, "stranger -> {dst}");
        assert_eq!(moved.global, vec!["exit_unauthorized"], "stranger -> {dst}");
        assert!(moved.clients.is_empty());
    }
}

#[test]
fn denied_destinations_are_dropped_with_their_reason() {
    let Some(mut dp) = datapath() else { return };
    for (dst, reason) in [
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "link_local"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("10.20.1.7", "connected"),
        ("198.51.100.9", "connected"),
        ("10.20.1.5", "host_address"),
        ("100.64.0.3", "mesh"),
        ("100.127.0.1", "mesh"),
        ("127.0.0.1", "loopback"),
        ("224.0.0.251", "multicast"),
        ("255.255.255.255", "reserved"),
        ("fe80::1", "link_local"),
        ("fd12:3456::1", "ula"),
        ("fd00:ec2::254", "metadata"),
        ("ff02::1", "multicast"),
    ] {
        let src = if dst.contains(':') { ALICE6 } else { ALICE };
        let p = tcp_packet(ip(src), ip(dst), SYN, &mss_option(1460));
        let (out, moved) = step(&mut dp, INGRESS, &p, TestContext::default());
        assert_eq!(out.outcome.action, DROP, "{dst}");
        assert_eq!(out.packet, p, "{dst}: a dropped SYN was clamped");
        assert_eq!(moved.global, vec!["exit_denied"], "{dst}");
        let alice = &moved.clients["alice"];
        assert_eq!(
            alice.denied.get(reason),
            Some(&1),
            "{dst}: {:?}",
            alice.denied
        );
        assert_eq!((alice.denied_total, alice.rx_packets), (1, 0), "{dst}");
    }
}

#[test]
fn later_fragments_are_judged_by_their_addresses() {
    let Some(mut dp) = datapath() else { return };
    let frag = ipv4(
        Ipv4Addr::new(100, 64, 0, 2),
        Ipv4Addr::new(169, 254, 169, 254),
        TCP,
        185,
        &[0xab; 16],
    );
    let (out, moved) = step(&mut dp, INGRESS, &frag, TestContext::default());
    assert_eq!(out.outcome.action, DROP);
    assert_eq!(moved.clients["alice"].denied.get("metadata"), Some(&1));
    let frag = ipv4(
        Ipv4Addr::new(100, 64, 0, 2),
        Ipv4Addr::new(203, 0, 113, 10),
        TCP,
        185,
        &[0xab; 16],
    );
    let (out, moved) = step(&mut dp, INGRESS, &frag, TestContext::default());
    assert_eq!(out.outcome.action, PASS);
    assert_eq!(moved.clients["alice"].rx_packets, 1);
}

#[test]
fn an_allow_listed_private_subnet_passes() {
    let Some(mut dp) = datapath() else { return };
    let p = udp_packet(ip(ALICE), ip("10.30.5.5"), 64);
    let (out, moved) = step(&mut dp, INGRESS, &p, TestContext::default());
    assert_eq!(out.outcome.action, PASS);
    assert_eq!(moved.clients["alice"].rx_packets, 1);
    // Next to it, private space stays denied.
    let p = udp_packet(ip(ALICE), ip("10.31.5.5"), 64);
    assert_eq!(
        run(&mut dp, INGRESS, &p, TestContext::default())
            .outcome
            .action,
        DROP
    );
}

#[test]
fn the_exit_nodes_mesh_services_are_open_to_every_member() {
    let Some(mut dp) = datapath() else { return };
    for src in [STRANGER, ALICE] {
        let p = udp_packet(ip(src), ip(EXIT), 64);
        let (out, moved) = step(&mut dp, INGRESS, &p, TestContext::default());
        assert_eq!(out.outcome.action, PASS, "{src}");
        assert_eq!(moved.global, vec!["exit_local"], "{src}");
        assert!(
            moved.clients.is_empty(),
            "{src}: mesh services counted as exit traffic"
        );
    }
    let p = udp_packet(ip(ALICE6), ip("fd6e:6578:6400::1"), 64);
    assert_eq!(
        run(&mut dp, INGRESS, &p, TestContext::default())
            .outcome
            .action,
        PASS
    );
}

#[test]
fn odd_frames_are_dropped_on_ingress() {
    let Some(mut dp) = datapath() else { return };
    let arp = eth(0x0806, &[0u8; 28]);
    let inner = udp_packet(ip(ALICE), ip(INTERNET), 32);
    let mut vlan = inner[..12].to_vec();
    vlan.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    vlan.extend_from_slice(&inner[12..]);
    let mut ihl4 = inner.clone();
    ihl4[ETH_HLEN] = 0x44;
    for (p, counter) in [(arp, "not_ip"), (vlan, "vlan"), (ihl4, "malformed")] {
        let (out, moved) = step(&mut dp, INGRESS, &p, TestContext::default());
        assert_eq!(out.outcome.action, DROP, "{counter}");
        assert_eq!(moved.global, vec![counter]);
        assert!(moved.clients.is_empty());
    }
}

#[test]
fn switched_off_everything_passes_uncounted() {
    let Some(mut dp) = datapath() else { return };
    dp.set_exit_enforcing(false).expect("off");
    for (prog, p, ctx) in [
        (
            INGRESS,
            udp_packet(ip(STRANGER), ip("169.254.169.254"), 8),
            TestContext::default(),
        ),
        (EGRESS, udp_packet(ip(INTERNET), ip(ALICE), 8), FORWARDED),
    ] {
        let (out, moved) = step(&mut dp, prog, &p, ctx);
        assert_eq!(out.outcome.action, PASS);
        assert!(moved.global.is_empty() && moved.clients.is_empty());
    }
}

// ---- egress ------------------------------------------------------------------

#[test]
fn forwarded_replies_to_a_client_are_counted() {
    let Some(mut dp) = datapath() else { return };
    let p = udp_packet(ip(INTERNET6), ip(ALICE6), 200);
    let (out, moved) = step(&mut dp, EGRESS, &p, FORWARDED);
    assert_eq!(out.outcome.action, PASS);
    let alice = &moved.clients["alice"];
    assert_eq!(
        (alice.tx_packets, alice.tx_bytes, alice.rx_packets),
        (1, p.len() as u64, 0)
    );
    // The exit node's own packets (not received anywhere) are not exit
    // traffic; nor is anything to a non-client.
    for (p, ctx) in [
        (udp_packet(ip(EXIT), ip(ALICE), 8), TestContext::default()),
        (udp_packet(ip(INTERNET), ip(STRANGER), 8), FORWARDED),
    ] {
        let (out, moved) = step(&mut dp, EGRESS, &p, ctx);
        assert_eq!(out.outcome.action, PASS);
        assert!(moved.global.is_empty() && moved.clients.is_empty());
    }
}

// ---- MSS clamping --------------------------------------------------------------

/// Runs a SYN through `prog` and returns the packet after and what moved.
fn clamp(dp: &mut Datapath, prog: &str, p: &[u8], ctx: TestContext) -> (Vec<u8>, Moved) {
    assert!(tcp_checksum_ok(p), "the test built a bad checksum");
    let (out, moved) = step(dp, prog, p, ctx);
    assert_eq!(out.outcome.action, PASS);
    assert_eq!(out.packet.len(), p.len());
    assert!(
        tcp_checksum_ok(&out.packet),
        "TCP checksum wrong after {prog}"
    );
    (out.packet, moved)
}

#[test]
fn syns_are_clamped_to_the_tunnel_mss_with_a_valid_checksum() {
    let Some(mut dp) = datapath() else { return };
    let ts = [8, 10, 1, 2, 3, 4, 5, 6, 7, 8];
    let cases: Vec<(&str, Vec<u8>, TestContext, u16)> = vec![
        // Client SYN, MSS first (an even offset).
        (
            "v4 SYN",
            tcp_packet(ip(ALICE), ip(INTERNET), SYN, &mss_option(1460)),
            TestContext::default(),
            1380,
        ),
        // MSS after a NOP: the value sits at an odd offset.
        (
            "v4 SYN, MSS at an odd offset",
            tcp_packet(
                ip(ALICE),
                ip(INTERNET),
                SYN,
                &[[1].as_slice(), &mss_option(1460), &[1, 3, 3, 7]].concat(),
            ),
            TestContext::default(),
            1380,
        ),
        // After a timestamp option and NOPs.
        (
            "v4 SYN, MSS last",
            tcp_packet(
                ip(ALICE),
                ip(INTERNET),
                SYN,
                &[[1, 1].as_slice(), &ts, &mss_option(8960)].concat(),
            ),
            TestContext::default(),
            1380,
        ),
        (
            "v6 SYN",
            tcp_packet(ip(ALICE6), ip(INTERNET6), SYN, &mss_option(1440)),
            TestContext::default(),
            1360,
        ),
    ];
    for (what, p, ctx, want) in cases {
        let (after, moved) = clamp(&mut dp, INGRESS, &p, ctx);
        assert_eq!(mss_of(&after), Some(want), "{what}");
        assert_eq!(moved.global, vec!["mss_clamped"], "{what}");
        assert_eq!(moved.clients["alice"].rx_packets, 1, "{what}");
        // Only the MSS bytes and the checksum changed.
        let changed = p.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert!(changed <= 4, "{what}: {changed} bytes changed");
    }
    // The server's SYN-ACK on its way to the client, on egress.
    let p = tcp_packet(ip(INTERNET), ip(ALICE), SYN | ACK, &mss_option(1460));
    let (after, moved) = clamp(&mut dp, EGRESS, &p, FORWARDED);
    assert_eq!(mss_of(&after), Some(1380));
    assert_eq!(moved.global, vec!["mss_clamped"]);
    assert_eq!(moved.clients["alice"].tx_packets, 1);
}

#[test]
fn what_needs_no_clamping_is_left_alone() {
    let Some(mut dp) = datapath() else { return };
    let cases = [
        (
            "small MSS",
            tcp_packet(ip(ALICE), ip(INTERNET), SYN, &mss_option(1200)),
        ),
        (
            "equal MSS",
            tcp_packet(ip(ALICE), ip(INTERNET), SYN, &mss_option(1380)),
        ),
        (
            "not a SYN",
            tcp_packet(ip(ALICE), ip(INTERNET), ACK, &mss_option(1460)),
        ),
        (
            "SYN without options",
            tcp_packet(ip(ALICE), ip(INTERNET), SYN, &[]),
        ),
        (
            "SYN without MSS",
            tcp_packet(ip(ALICE), ip(INTERNET), SYN, &[1, 1, 4, 2]),
        ),
        (
            "option after EOL",
            tcp_packet(ip(ALICE), ip(INTERNET), SYN, &[0, 0, 0, 0, 2, 4, 5, 0xb4]),
        ),
        (
            "bad MSS length",
            tcp_packet(ip(ALICE), ip(INTERNET), SYN, &[2, 3, 5, 0xb4]),
        ),
        (
            "zero option length",
            tcp_packet(ip(ALICE), ip(INTERNET), SYN, &[9, 0, 2, 4, 5, 0xb4, 0, 0]),
        ),
    ];
    for (what, p) in cases {
        let (out, moved) = step(&mut dp, INGRESS, &p, TestContext::default());
        assert_eq!(out.outcome.action, PASS, "{what}");
        assert_eq!(out.packet, p, "{what}: changed");
        assert!(moved.global.is_empty(), "{what}: {:?}", moved.global);
    }
    // No clamping configured: nothing changes.
    dp.set_mss(Default::default()).expect("mss");
    let p = tcp_packet(ip(ALICE), ip(INTERNET), SYN, &mss_option(1460));
    assert_eq!(run(&mut dp, INGRESS, &p, TestContext::default()).packet, p);
}

#[test]
fn the_gateways_mss_clamp_works_alone() {
    let Some(mut dp) = datapath() else { return };
    let prog = names::MSS_CLAMP_L2_PROG;
    // A LAN host's SYN, any addresses: the clamp needs no client.
    let lan = ip("192.168.1.20");
    let p = tcp_packet(lan, ip(INTERNET), SYN, &mss_option(1460));
    let (after, moved) = clamp(&mut dp, prog, &p, TestContext::default());
    assert_eq!(mss_of(&after), Some(1380));
    assert_eq!(moved.global, vec!["mss_clamped"]);
    assert!(moved.clients.is_empty());
    let p = tcp_packet(
        ip("2001:db8:1::20"),
        ip(INTERNET6),
        SYN | ACK,
        &mss_option(1440),
    );
    let (after, _) = clamp(&mut dp, prog, &p, TestContext::default());
    assert_eq!(mss_of(&after), Some(1360));
    let p = udp_packet(lan, ip(INTERNET), 40);
    let (out, moved) = step(&mut dp, prog, &p, TestContext::default());
    assert_eq!((out.outcome.action, out.packet == p), (PASS, true));
    assert!(moved.global.is_empty());
}

// ---- rate limits ---------------------------------------------------------------

#[test]
fn a_tiny_bucket_drops_beyond_its_burst_and_only_for_that_client() {
    let Some(mut dp) = datapath() else { return };
    dp.sync_exit_clients(&clients(ClientLimits {
        from_client: Some(tiny()),
        to_client: None,
    }))
    .expect("limit carol");
    // 100-byte frames: a 300-byte burst admits three; at 1000 bytes/s the
    // bucket refills a byte per millisecond, far slower than this loop.
    let p = udp_packet(ip(CAROL), ip(INTERNET), 100 - 42);
    assert_eq!(p.len(), 100);
    let before = (global(&dp), rows(&dp));
    let mut actions = Vec::new();
    for _ in 0..10 {
        actions.push(
            run(&mut dp, INGRESS, &p, TestContext::default())
                .outcome
                .action,
        );
    }
    assert_eq!(actions, [[PASS; 3].as_slice(), &[DROP; 7]].concat());
    let moved = diff(&before, &dp);
    let carol = &moved.clients["carol"];
    assert_eq!(carol.rx_packets, 3);
    assert_eq!(carol.denied.get("rate_limit_from_client"), Some(&7));
    assert!(moved.global.contains(&"exit_rate_limited"));
    // Others are not limited, nor is carol's other direction.
    for _ in 0..10 {
        let p = udp_packet(ip(ALICE), ip(INTERNET), 58);
        assert_eq!(
            run(&mut dp, INGRESS, &p, TestContext::default())
                .outcome
                .action,
            PASS
        );
        let p = udp_packet(ip(INTERNET), ip(CAROL), 58);
        assert_eq!(run(&mut dp, EGRESS, &p, FORWARDED).outcome.action, PASS);
    }
    // The other direction, limited now: changing limits does not reset
    // counters.
    dp.sync_exit_clients(&clients(ClientLimits {
        from_client: Some(tiny()),
        to_client: Some(tiny()),
    }))
    .expect("limit carol both ways");
    let before = (global(&dp), rows(&dp));
    assert_eq!(before.1["carol"].rx_packets, 3);
    let back = udp_packet(ip(INTERNET), ip(CAROL), 58);
    let mut passed = 0;
    for _ in 0..10 {
        if run(&mut dp, EGRESS, &back, FORWARDED).outcome.action == PASS {
            passed += 1;
        }
    }
    assert_eq!(passed, 3);
    let moved = diff(&before, &dp);
    assert_eq!(
        moved.clients["carol"].denied.get("rate_limit_to_client"),
        Some(&7)
    );
    assert_eq!(moved.clients["carol"].tx_packets, 3);
}

#[test]
fn the_rows_say_who_is_limited() {
    let Some(mut dp) = datapath() else { return };
    dp.sync_exit_clients(&clients(ClientLimits::both(RateLimit::new(200_000_000))))
        .expect("limit carol");
    let r = rows(&dp);
    assert_eq!(r.len(), 3);
    assert_eq!(r["carol"].rate_limit_from_client, Some(200_000_000));
    assert_eq!(r["carol"].rate_limit_to_client, Some(200_000_000));
    assert_eq!(r["alice"].rate_limit_to_client, None);
    assert_eq!(r["alice"].addresses, vec![ip(ALICE), ip(ALICE6)]);
}

#[test]
fn removing_a_client_cuts_it_off_and_a_new_one_starts_at_zero() {
    let Some(mut dp) = datapath() else { return };
    let p = udp_packet(ip(BOB), ip(INTERNET), 58);
    assert_eq!(
        run(&mut dp, INGRESS, &p, TestContext::default())
            .outcome
            .action,
        PASS
    );
    let mut list = clients(ClientLimits::default());
    list.retain(|c| c.name != "bob");
    dp.sync_exit_clients(&list).expect("remove bob");
    let (out, moved) = step(&mut dp, INGRESS, &p, TestContext::default());
    assert_eq!(out.outcome.action, DROP);
    assert_eq!(moved.global, vec!["exit_unauthorized"]);
    // dave takes bob's address later, and perhaps his slot: from zero.
    list.push(ServedClient {
        name: "dave".into(),
        addresses: vec![ip(BOB)],
        limits: ClientLimits::default(),
    });
    dp.sync_exit_clients(&list).expect("add dave");
    dp.sync_exit_clients(&list).expect("again: nothing to do");
    let dave = &rows(&dp)["dave"];
    assert_eq!((dave.rx_packets, dave.denied_total), (0, 0));
    assert_eq!(
        run(&mut dp, INGRESS, &p, TestContext::default())
            .outcome
            .action,
        PASS
    );
    assert_eq!(rows(&dp)["dave"].rx_packets, 1);
}

/// Issue 21, finding 11: the ingress program marks what it lets through
/// for forwarding (`EXIT_PASSED_MARK`, which the exit node's nftables
/// forward chain requires), keeping the mark's other bits; nothing it
/// drops, nothing addressed to the exit node itself and nothing on
/// egress gets the bit.
#[test]
fn what_the_ingress_program_passes_carries_the_mark_and_nothing_else_does() {
    use nexd_common::exit::EXIT_PASSED_MARK;
    let Some(mut dp) = datapath() else { return };
    let marked = TestContext {
        mark: 0x6e78,
        ..TestContext::default()
    };
    for (src, dst) in [(ALICE, INTERNET), (ALICE6, INTERNET6), (ALICE, "10.30.1.1")] {
        let out = run(&mut dp, INGRESS, &udp_packet(ip(src), ip(dst), 100), marked);
        assert_eq!(out.outcome.action, PASS, "{src} -> {dst}");
        assert_eq!(
            out.outcome.mark,
            0x6e78 | EXIT_PASSED_MARK,
            "{src} -> {dst}: {:#x}",
            out.outcome.mark
        );
    }
    for (src, dst, action) in [
        (ALICE, "10.20.1.7", DROP),
        (STRANGER, INTERNET, DROP),
        (ALICE, EXIT, PASS),
    ] {
        let out = run(&mut dp, INGRESS, &udp_packet(ip(src), ip(dst), 100), marked);
        assert_eq!(out.outcome.action, action, "{src} -> {dst}");
        assert_eq!(out.outcome.mark, 0x6e78, "{src} -> {dst}");
    }
    let out = run(
        &mut dp,
        EGRESS,
        &udp_packet(ip(INTERNET), ip(ALICE), 100),
        FORWARDED,
    );
    assert_eq!(out.outcome.action, PASS);
    assert_eq!(out.outcome.mark, 0, "egress marked a packet");
}
