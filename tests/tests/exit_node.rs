//! End-to-end: exit nodes. An "internet" namespace hosts the server and
//! routes for everyone; every device's underlay can reach it directly, so
//! the source address the server sees tells which path a packet took.
//!
//! Covered: the direct path before, the exit node's address after enable
//! (TCP, UDP, ICMP; IPv4 and IPv6), no packet from the client's underlay to
//! the server while exit mode is on, mesh traffic staying direct (the exit
//! node's forwarding counter does not move), enable refused without an
//! exit node, `--exit-node-client` waiting and then applying, disable and
//! SIGTERM restoring the exact original state, no rule pile-up over five
//! enable/disable rounds, fail-closed when the exit node dies, and failover
//! to a second exit node with the switch-over time measured, and a switch
//! to a clearly faster exit node only after the dwell time.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nexd_testkit::{
    Netns, Node, NodeSpec,
    delay::DelayRelay,
    proto::{ClientPhase, ExitClientRow, ExitNodeRow, ExitStatus},
    scaled,
    topology::{
        ROUTER_V4, ROUTER_V6, count_forwarded_to, forwarded_to, mesh_toml, nft_counter, nft_script,
        remove_forward_probes,
    },
    traffic::{ping_once, ping_until, tcp_transfer, udp_exchange},
    wait_for,
    world::World,
};

const T: Duration = Duration::from_secs(10);
const ENABLED: &str = "Successfully enabled exit node client on this device";
const DISABLED: &str = "Successfully disabled exit node client on this device";

fn spec(args: &[&str]) -> NodeSpec {
    NodeSpec {
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        ..NodeSpec::default()
    }
}

/// The name of the exit node the client uses now, if any.
fn active_exit(list: &[ExitNodeRow]) -> Option<&str> {
    list.iter().find(|r| r.active).map(|r| r.name.as_str())
}

/// Source the server sees for TCP from `from`.
fn tcp_source(w: &World, from: &str, v6: bool) -> anyhow::Result<IpAddr> {
    Ok(tcp_transfer(
        &w.node(from).ns,
        &w.inet.ns,
        World::server(v6),
        32 * 1024,
        T,
    )?
    .seen_from
    .ip())
}

fn udp_source(w: &World, from: &str, v6: bool, timeout: Duration) -> anyhow::Result<IpAddr> {
    Ok(udp_exchange(&w.node(from).ns, &w.inet.ns, World::server(v6), timeout)?.ip())
}

/// `exit-node enable` once exit1 is listed as available: under emulation
/// (the arm64 VM) a heartbeat or a probe answer can be late enough for the
/// client to list it stale for a moment, and `enable` then rightly
/// refuses; what this test checks is what enable does, not that timing.
fn enable_when_available(w: &World, args: &[&str]) -> anyhow::Result<String> {
    w.node("client").wait_exit_node("exit1", T * 2)?;
    nexctl_ok(w.node("client"), args)
}

fn nexctl_ok(node: &Node, args: &[&str]) -> anyhow::Result<String> {
    let out = node.nexctl(args)?;
    if !out.status.success() {
        bail!(
            "nexctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The routing state a client's exit mode touches.
fn routing_state(ns: &Netns) -> anyhow::Result<String> {
    let mut s = String::new();
    for args in [
        "-4 rule show",
        "-6 rule show",
        "-4 route show table all",
        "-6 route show table all",
    ] {
        s.push_str(&ns.ip(args)?);
    }
    s.push_str(&ns.exec(&["nft", "list", "ruleset"])?);
    Ok(s)
}

fn sysctls(ns: &Netns) -> anyhow::Result<String> {
    ns.exec(&[
        "sysctl",
        "net.ipv4.ip_forward",
        "net.ipv6.conf.all.forwarding",
        "net.ipv4.conf.all.src_valid_mark",
    ])
}

/// `wg show` without the lines that change by themselves.
fn wg_config(node: &Node) -> anyhow::Result<String> {
    Ok(node
        .wg_show()?
        .lines()
        .filter(|l| !l.contains("latest handshake") && !l.contains("transfer:"))
        .collect::<Vec<_>>()
        .join("\n"))
}

#[test]
fn exit_node_client_end_to_end() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client", "peer"])?;
    let before_client = (
        w.node("client").ns.snapshot()?,
        sysctls(&w.node("client").ns)?,
    );
    let before_exit = (
        w.node("exit1").ns.snapshot()?,
        sysctls(&w.node("exit1").ns)?,
    );
    w.node_mut("client").start(&spec(&[]))?;
    w.node_mut("peer").start(&spec(&[]))?;
    let client_v4 = w.underlay("client", false);
    let client_v6 = w.underlay("client", true);
    let exit_v4 = w.underlay("exit1", false);
    let exit_v6 = w.underlay("exit1", true);

    // 1. Exit mode off: the server sees the client's own underlay address.
    assert_eq!(tcp_source(&w, "client", false)?, client_v4);
    assert_eq!(tcp_source(&w, "client", true)?, client_v6);

    // No exit node yet: the JSON list is an empty array, not null.
    let empty: serde_json::Value = w
        .node("client")
        .nexctl_json(&["nexd", "exit-node", "list"])?;
    assert_eq!(empty, serde_json::json!([]));

    // 4a. Enable with no exit node: refused, non-zero, nothing changed.
    let started_state = routing_state(&w.node("client").ns)?;
    let out = w.node("client").nexctl(&["nexd", "exit-node", "enable"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "stderr: {stderr}");
    assert!(stderr.contains("no exit node is available"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Successfully"));
    assert_eq!(routing_state(&w.node("client").ns)?, started_state);
    assert_eq!(tcp_source(&w, "client", false)?, client_v4);

    // The exit node comes up and announces itself.
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node("client").wait_exit_node("exit1", T * 2)?;
    let list = w.node("client").exit_nodes()?;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].endpoint_address.as_deref(), Some("192.0.2.1:51820"));
    assert_eq!(list[0].public_key, w.devices[0].public_key);
    assert!(!list[0].active);
    let table = nexctl_ok(w.node("client"), &["nexd", "exit-node", "list"])?;
    let header = table.lines().next().unwrap_or_default();
    assert!(header.starts_with("ENDPOINT ADDRESS"), "{table}");
    assert!(
        header.contains("PUBLIC KEY") && header.contains("STATUS") && header.contains("ACTIVE"),
        "{table}"
    );
    // The peer (not a client) ignores the advertisement: /32 and /128 only.
    let peer_cfg = wg_config(w.node("peer"))?;
    assert!(!peer_cfg.contains("0.0.0.0/0"), "{peer_cfg}");

    let pre_enable = routing_state(&w.node("client").ns)?;
    let pre_enable_wg = wg_config(w.node("client"))?;
    w.inet.watch("client4", &client_v4.to_string())?;
    w.inet.watch("client6", &client_v6.to_string())?;
    w.inet.watch("exit4", &exit_v4.to_string())?;
    w.inet.watch("exit6", &exit_v6.to_string())?;

    // 2. Enable: exactly the promised message; the server sees the exit
    // node's uplink address for TCP, UDP and ICMP, IPv4 and IPv6.
    assert_eq!(
        enable_when_available(&w, &["nexd", "exit-node", "enable"])?,
        format!("{ENABLED}\n")
    );
    assert_eq!(tcp_source(&w, "client", false)?, exit_v4);
    assert_eq!(tcp_source(&w, "client", true)?, exit_v6);
    assert_eq!(udp_source(&w, "client", false, T)?, exit_v4);
    assert_eq!(udp_source(&w, "client", true, T)?, exit_v6);
    let (icmp4, icmp6) = (w.inet.count("exit4_icmp")?, w.inet.count("exit6_icmp")?);
    ping_until(&w.node("client").ns, World::server(false), T)?;
    ping_until(&w.node("client").ns, World::server(true), T)?;
    assert!(
        w.inet.count("exit4_icmp")? > icmp4,
        "ping did not come from the exit node"
    );
    assert!(
        w.inet.count("exit6_icmp")? > icmp6,
        "ping6 did not come from the exit node"
    );
    let list = w.node("client").exit_nodes()?;
    assert!(list[0].active, "{list:?}");
    // The exit node accounts for the client by name; the peer, which
    // sent nothing through it, has a row at zero.
    let clients: Vec<ExitClientRow> =
        w.node("exit1")
            .nexctl_json(&["nexd", "exit-node", "clients"])?;
    let row = clients
        .iter()
        .find(|c| c.client == "client")
        .with_context(|| format!("no row for the client: {clients:?}"))?;
    assert!(row.rx_bytes > 0 && row.tx_bytes > 0, "{row:?}");
    assert!(
        row.addresses.contains(&w.mesh_ip("client", false)),
        "{row:?}"
    );
    let peer_row = clients.iter().find(|c| c.client == "peer");
    assert_eq!(peer_row.map(|r| r.rx_bytes), Some(0), "{clients:?}");
    // A device that serves no one says so, with "unavailable".
    let out = w.node("client").nexctl(&["nexd", "exit-node", "clients"])?;
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let wg = wg_config(w.node("client"))?;
    assert!(wg.contains("0.0.0.0/0") && wg.contains("::/0"), "{wg}");
    // The device marks its own packets (28280 = 0x6e78) so they bypass
    // the exit route: set on the kernel device, or on the userspace one.
    assert!(wg.contains("fwmark: 0x6e78"), "{wg}");

    // 3. Mesh traffic goes direct: the peer sees the client's mesh address
    // and the exit node's forwarding counter does not move.
    let exit_ns = &w.node("exit1").ns;
    for v6 in [false, true] {
        count_forwarded_to(exit_ns, &format!("peer{v6}"), w.mesh_ip("peer", v6))?;
    }
    for v6 in [false, true] {
        let t = tcp_transfer(
            &w.node("client").ns,
            &w.node("peer").ns,
            w.mesh_ip("peer", v6),
            256 * 1024,
            T,
        )?;
        assert_eq!(t.seen_from.ip(), w.mesh_ip("client", v6));
        ping_until(&w.node("client").ns, w.mesh_ip("peer", v6), T)?;
    }
    for v6 in [false, true] {
        assert_eq!(
            forwarded_to(exit_ns, &format!("peer{v6}"))?,
            0,
            "mesh traffic (v6={v6}) went through the exit node"
        );
    }
    remove_forward_probes(exit_ns)?;

    // 2 (cont.). Not one packet from the client's underlay reached the server.
    assert_eq!(
        w.inet.count("client4")?,
        0,
        "IPv4 leaked past the exit node"
    );
    assert_eq!(
        w.inet.count("client6")?,
        0,
        "IPv6 leaked past the exit node"
    );

    // Packets claiming a mesh source from outside the tunnel are dropped
    // at the exit node's door.
    let spoofed = nft_counter(&w.node("exit1").ns, "inet", "nexd", "spoofed")?;
    w.inet.ns.ip("addr add 100.64.0.99/32 dev lo")?;
    let inet_name = w.inet.ns.name().to_owned();
    let _ = w.inet.ns.exec_output(
        &[
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            "-I",
            "100.64.0.99",
            "192.0.2.1",
        ],
        Duration::from_secs(5),
    );
    assert!(
        nft_counter(&w.node("exit1").ns, "inet", "nexd", "spoofed")? > spoofed,
        "spoofed mesh source from {inet_name} not dropped"
    );

    // 5. Disable restores exactly the state before enable.
    assert_eq!(
        nexctl_ok(w.node("client"), &["nexd", "exit-node", "disable"])?,
        format!("{DISABLED}\n")
    );
    assert_eq!(routing_state(&w.node("client").ns)?, pre_enable);
    assert_eq!(wg_config(w.node("client"))?, pre_enable_wg);
    assert_eq!(tcp_source(&w, "client", false)?, client_v4);
    assert_eq!(tcp_source(&w, "client", true)?, client_v6);
    // ...and the leak counters do see direct traffic (they can fail).
    assert!(w.inet.count("client4")? > 0 && w.inet.count("client6")? > 0);

    // 7. Five rounds through the short alias: no rule piles up.
    let base_rules = w.node("client").ns.ip("-4 rule show")?.lines().count();
    let base_rules6 = w.node("client").ns.ip("-6 rule show")?.lines().count();
    for round in 0..5 {
        assert_eq!(
            enable_when_available(&w, &["exit-node", "enable"])?,
            format!("{ENABLED}\n")
        );
        assert_eq!(
            w.node("client").ns.ip("-4 rule show")?.lines().count(),
            base_rules + 3,
            "round {round}"
        );
        assert_eq!(
            w.node("client").ns.ip("-6 rule show")?.lines().count(),
            base_rules6 + 3,
            "round {round}"
        );
        // Enabling twice is fine and adds nothing.
        assert_eq!(
            enable_when_available(&w, &["exit-node", "enable"])?,
            format!("{ENABLED}\n")
        );
        assert_eq!(
            w.node("client").ns.ip("-4 rule show")?.lines().count(),
            base_rules + 3
        );
        assert_eq!(
            nexctl_ok(w.node("client"), &["exit-node", "disable"])?,
            format!("{DISABLED}\n")
        );
        assert_eq!(
            routing_state(&w.node("client").ns)?,
            pre_enable,
            "round {round}"
        );
    }

    // 5. SIGTERM with exit mode on: everything goes, on both sides.
    assert_eq!(
        enable_when_available(&w, &["exit-node", "enable"])?,
        format!("{ENABLED}\n")
    );
    for name in ["client", "exit1", "peer"] {
        let status = w.node_mut(name).stop()?;
        assert!(status.success(), "{name}: {status}");
    }
    assert_eq!(
        (
            w.node("client").ns.snapshot()?,
            sysctls(&w.node("client").ns)?
        ),
        before_client
    );
    assert_eq!(
        (
            w.node("exit1").ns.snapshot()?,
            sysctls(&w.node("exit1").ns)?
        ),
        before_exit
    );
    Ok(())
}

#[test]
fn exit_node_client_waits_then_fails_closed() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client"])?;
    let client_v4 = w.underlay("client", false);
    // Strict reverse-path filtering, as many distributions ship it: the
    // tunnel's replies must still get through (nexd sets src_valid_mark).
    w.node("client")
        .ns
        .sysctl("net.ipv4.conf.all.rp_filter", "1")?;
    w.node("client")
        .ns
        .sysctl("net.ipv4.conf.default.rp_filter", "1")?;
    // 4b. Started with --exit-node-client before any exit node: it waits,
    // and the device keeps its direct path meanwhile.
    w.node_mut("client").start(&spec(&["--exit-node-client"]))?;
    assert_eq!(w.node("client").client_phase()?, ClientPhase::Waiting);
    assert_eq!(tcp_source(&w, "client", false)?, client_v4);
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    assert!(
        w.node("client").log().contains("exit-node client enabled"),
        "{}",
        w.node("client").log()
    );
    assert_eq!(tcp_source(&w, "client", false)?, w.underlay("exit1", false));

    // 6. The exit node dies: traffic is held back, nothing leaks.
    w.inet.watch("client4", &client_v4.to_string())?;
    w.inet
        .watch("client6", &w.underlay("client", true).to_string())?;
    w.node_mut("exit1").kill()?;
    w.node("client").wait_phase(ClientPhase::Held, T * 2)?;
    assert!(udp_source(&w, "client", false, Duration::from_secs(2)).is_err());
    assert!(!ping_once(
        &w.node("client").ns,
        World::server(true),
        Duration::from_secs(1)
    )?);
    assert_eq!(
        w.inet.count("client4")?,
        0,
        "IPv4 leaked after the exit node died"
    );
    assert_eq!(
        w.inet.count("client6")?,
        0,
        "IPv6 leaked after the exit node died"
    );
    assert!(
        w.node("client").log().contains("held back"),
        "{}",
        w.node("client").log()
    );

    // Disable gives the direct path back (and the counter sees it).
    assert_eq!(
        nexctl_ok(w.node("client"), &["exit-node", "disable"])?,
        format!("{DISABLED}\n")
    );
    assert_eq!(tcp_source(&w, "client", false)?, client_v4);
    assert!(w.inet.count("client4")? > 0);
    Ok(())
}

/// Starts exit1 and exit2 as exit nodes and the client with
/// `--exit-node-client` (and `extra`), and waits until the client uses
/// one of them.
fn start_two_exits_and_client_with(w: &mut World, extra: &[&str]) -> anyhow::Result<()> {
    for exit in ["exit1", "exit2"] {
        w.node_mut(exit).start(&spec(&["router", "--exit-node"]))?;
    }
    let mut args = vec!["--exit-node-client"];
    args.extend_from_slice(extra);
    w.node_mut("client").start(&spec(&args))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)
}

/// The exit node the client uses (checked by the source address the
/// internet sees) and the other one; from here on the internet counts any
/// packet arriving straight from the client's underlay (a leak).
fn active_exit_watched(w: &World) -> anyhow::Result<(String, &'static str)> {
    let list = w.node("client").exit_nodes()?;
    let first = active_exit(&list)
        .context("no active exit node")?
        .to_owned();
    let second = if first == "exit1" { "exit2" } else { "exit1" };
    assert_eq!(tcp_source(w, "client", false)?, w.underlay(&first, false));
    w.inet
        .watch("client4", &w.underlay("client", false).to_string())?;
    w.inet
        .watch("client6", &w.underlay("client", true).to_string())?;
    Ok((first, second))
}

/// Waits (up to `timeout`, scaled) until the client uses `to`; returns
/// how long that took from now.
fn client_moves_to(w: &World, to: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let since = Instant::now();
    wait_for(
        "the client to move to the other exit node",
        scaled(timeout),
        Duration::from_millis(10),
        || {
            let list = w.node("client").exit_nodes().ok()?;
            (active_exit(&list) == Some(to)).then(|| since.elapsed())
        },
    )
}

/// Waits until the client lists `exit` as available again; returns how
/// long that took from now.
fn available_again(w: &World, exit: &str) -> anyhow::Result<Duration> {
    let since = Instant::now();
    wait_for(
        "the exit node to be announced again",
        scaled(Duration::from_secs(15)),
        Duration::from_millis(50),
        || {
            w.node("client")
                .exit_nodes()
                .ok()?
                .iter()
                .any(|r| r.name == exit && r.status == ExitStatus::Available)
                .then(|| since.elapsed())
        },
    )
}

fn start_two_exits_and_client(w: &mut World) -> anyhow::Result<()> {
    start_two_exits_and_client_with(w, &[])
}

#[test]
fn exit_node_failover() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "exit2", "client"])?;
    start_two_exits_and_client(&mut w)?;
    // Exactly one exit node is active, and it carries the traffic.
    let list = w.node("client").exit_nodes()?;
    assert_eq!(list.iter().filter(|r| r.active).count(), 1, "{list:?}");
    let first = active_exit(&list)
        .context("no active exit node")?
        .to_owned();
    let second = if first == "exit1" { "exit2" } else { "exit1" };
    assert_eq!(tcp_source(&w, "client", false)?, w.underlay(&first, false));
    let wg = wg_config(w.node("client"))?;
    assert_eq!(
        wg.matches("0.0.0.0/0").count(),
        1,
        "two exit nodes fight over 0/0: {wg}"
    );

    let client_v4 = w.underlay("client", false);
    w.inet.watch("client4", &client_v4.to_string())?;
    w.inet
        .watch("client6", &w.underlay("client", true).to_string())?;

    // 6. Kill the active exit node; traffic resumes through the other.
    w.node_mut(&first).kill()?;
    let killed = Instant::now();
    let resumed = wait_for(
        "traffic through the second exit node",
        Duration::from_secs(30),
        Duration::from_millis(1),
        || match udp_source(&w, "client", false, Duration::from_millis(300)) {
            Ok(src) if src == w.underlay(second, false) => Some(killed.elapsed()),
            _ => None,
        },
    )?;
    eprintln!(
        "exit node switch-over: {:.2} s from SIGKILL to the first UDP echo through {second}",
        resumed.as_secs_f64()
    );
    assert_eq!(tcp_source(&w, "client", true)?, w.underlay(second, true));
    assert_eq!(w.inet.count("client4")?, 0, "IPv4 leaked during failover");
    assert_eq!(w.inet.count("client6")?, 0, "IPv6 leaked during failover");
    let log = w.node("client").log();
    assert!(log.contains("switching to"), "{log}");
    let list = w.node("client").exit_nodes()?;
    assert_eq!(list.iter().filter(|r| r.active).count(), 1, "{list:?}");
    Ok(())
}

/// An exit node that loses its way to the internet (its default routes
/// go, as when its uplink drops) withdraws its exit capability at once:
/// the client moves to the other exit node well within a second, with no
/// packet leaving its underlay; when the routes come back, the exit node
/// announces itself again only after they have held for 2 s, and the
/// client stays where it is (no flapping back).
#[test]
fn an_exit_node_without_internet_withdraws_and_its_clients_move() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "exit2", "client"])?;
    start_two_exits_and_client(&mut w)?;
    let (first, second) = active_exit_watched(&w)?;

    // The active exit node's default routes go (nexd keeps running).
    let exit_ns = &w.node(&first).ns;
    exit_ns.ip("route del default")?;
    exit_ns.ip("-6 route del default")?;
    let moved = client_moves_to(&w, second, Duration::from_secs(10))?;
    eprintln!(
        "{first} lost its default routes; the client moved to {second} after {:.2} s",
        moved.as_secs_f64()
    );
    assert_eq!(tcp_source(&w, "client", false)?, w.underlay(second, false));
    assert!(
        w.node(&first)
            .log()
            .contains("withdrawing its exit capability"),
        "{}",
        w.node(&first).log()
    );
    let list = w.node("client").exit_nodes()?;
    assert!(
        !list
            .iter()
            .any(|r| r.name == first && r.status == ExitStatus::Available),
        "{first} still listed as available: {list:?}"
    );

    // The routes come back: not announced for 2 s, then available again,
    // and the client stays with the exit node it moved to.
    exit_ns.ip(&format!("route add default via {ROUTER_V4}"))?;
    exit_ns.ip(&format!("-6 route add default via {ROUTER_V6}"))?;
    let available = available_again(&w, &first)?;
    assert!(
        available >= Duration::from_millis(1900),
        "announced again after only {available:?}"
    );
    let list = w.node("client").exit_nodes()?;
    assert_eq!(active_exit(&list), Some(second), "{list:?}");
    assert_eq!(w.inet.count("client4")?, 0, "IPv4 leaked");
    assert_eq!(w.inet.count("client6")?, 0, "IPv6 leaked");
    Ok(())
}

/// A TCP service in the "internet" namespace for `--exit-probe-target`
/// (IPv4 and IPv6, one port): accepts and closes every connection, so the
/// probes never fill its accept queue. Stops when dropped.
struct ProbeService {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl ProbeService {
    fn start(inet: &Netns) -> anyhow::Result<Self> {
        use std::net::{SocketAddr, TcpListener};
        let v4 = inet.run_in(|| {
            TcpListener::bind(SocketAddr::new(World::server(false), 0)).context("bind v4")
        })?;
        let port = v4.local_addr()?.port();
        let v6 = inet.run_in(move || {
            TcpListener::bind(SocketAddr::new(World::server(true), port)).context("bind v6")
        })?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            v4.set_nonblocking(true)?;
            v6.set_nonblocking(true)?;
            // Bounded: the test stops it, and it ends on its own anyway.
            let until = Instant::now() + Duration::from_secs(600);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                for l in [&v4, &v6] {
                    while let Ok((conn, _)) = l.accept() {
                        drop(conn);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        });
        Ok(ProbeService {
            port,
            stop,
            thread: Some(thread),
        })
    }

    /// The `--exit-probe-target` arguments for it.
    fn targets(&self) -> [String; 2] {
        [
            format!("{}:{}", World::server(false), self.port),
            format!("[{}]:{}", World::server(true), self.port),
        ]
    }
}

impl Drop for ProbeService {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The operator-given probe: two exit nodes check a TCP service in the
/// "internet" with `--exit-probe-target`. The "internet" drops the active
/// exit node's probes (its routes stay, so only the probe can tell): it
/// withdraws its exit capability and says why, the client moves to the
/// other exit node with no packet leaving its underlay; when the probes
/// pass again, the exit node is announced again only after 2 s.
#[test]
fn an_exit_node_whose_probe_targets_do_not_answer_withdraws() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "exit2", "client"])?;
    let service = ProbeService::start(&w.inet.ns)?;
    let [t4, t6] = service.targets();
    let exit_args = [
        "router",
        "--exit-node",
        "--exit-probe-target",
        t4.as_str(),
        "--exit-probe-target",
        t6.as_str(),
    ];
    for exit in ["exit1", "exit2"] {
        w.node_mut(exit).start(&spec(&exit_args))?;
    }
    w.node_mut("client").start(&spec(&["--exit-node-client"]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    let (first, second) = active_exit_watched(&w)?;
    assert_eq!(w.node(&first).status()?.exit_node.withdrawn, None);

    // The internet drops the active exit node's probes, nothing else.
    let block = format!(
        "add table inet probe_block\n\
         add chain inet probe_block input {{ type filter hook input priority -20; policy accept; }}\n\
         add rule inet probe_block input ip saddr {} tcp dport {port} drop\n\
         add rule inet probe_block input ip6 saddr {} tcp dport {port} drop\n",
        w.underlay(&first, false),
        w.underlay(&first, true),
        port = service.port,
    );
    nft_script(&w.inet.ns, &block)?;
    let moved = client_moves_to(&w, second, Duration::from_secs(15))?;
    eprintln!(
        "{first}'s probes were dropped; the client moved to {second} after {:.2} s",
        moved.as_secs_f64()
    );
    assert_eq!(tcp_source(&w, "client", false)?, w.underlay(second, false));
    let log = w.node(&first).log();
    assert!(
        log.contains("withdrawing its exit capability")
            && log.contains("no probe target answered")
            && log.contains(&t4)
            && log.contains(&t6),
        "{log}"
    );
    let why = w.node(&first).status()?.exit_node.withdrawn;
    assert!(
        why.as_deref()
            .is_some_and(|y| y.contains("no probe target answers") && y.contains(&t4)),
        "{why:?}"
    );
    // Its routes never went: only the probe withdrew it.
    assert!(
        w.node(&first)
            .ns
            .ip("route show default")?
            .contains(ROUTER_V4)
    );
    let list = w.node("client").exit_nodes()?;
    assert!(
        !list
            .iter()
            .any(|r| r.name == first && r.status == ExitStatus::Available),
        "{first} still listed as available: {list:?}"
    );
    assert!(
        list.iter()
            .any(|r| r.name == second && r.status == ExitStatus::Available),
        "{second}, whose probes pass, is not available: {list:?}"
    );

    // The probes pass again: not announced for 2 s, then available, and
    // the client stays with the exit node it moved to.
    w.inet
        .ns
        .exec(&["nft", "delete", "table", "inet", "probe_block"])?;
    let available = available_again(&w, &first)?;
    eprintln!(
        "{first}'s probes pass again; announced again after {:.2} s",
        available.as_secs_f64()
    );
    assert!(
        available >= Duration::from_millis(1900),
        "announced again after only {available:?}"
    );
    assert_eq!(w.node(&first).status()?.exit_node.withdrawn, None);
    let list = w.node("client").exit_nodes()?;
    assert_eq!(active_exit(&list), Some(second), "{list:?}");
    assert_eq!(w.inet.count("client4")?, 0, "IPv4 leaked");
    assert_eq!(w.inet.count("client6")?, 0, "IPv6 leaked");
    drop(w);
    drop(service);
    Ok(())
}

/// Issue 6's selection with hysteresis, end to end: the client reaches
/// both exit nodes through delay relays (the kernel here has no netem);
/// making the active one 200 ms slower moves the client to the other, but
/// only once the active one has been in use for the dwell time, and with
/// no packet leaving the client's underlay for the internet meanwhile.
/// nexd's `exit::SWITCH_DWELL` (the tests drive nexd as a black box).
const SWITCH_DWELL: Duration = Duration::from_secs(30);

#[test]
fn exit_node_switches_to_a_clearly_faster_one_after_the_dwell_time() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "exit2", "client"])?;
    let client_ns = &w.node("client").ns;
    let mut relays = std::collections::BTreeMap::new();
    let mut devices = w.devices.clone();
    for d in devices.iter_mut().filter(|d| d.name.starts_with("exit")) {
        let target = format!("{}:51820", w.underlay(&d.name, false)).parse()?;
        let relay = DelayRelay::start(client_ns, target)?;
        d.endpoint = Some(relay.listen.to_string());
        relays.insert(d.name.clone(), relay);
    }
    w.node("client").write_mesh(&mesh_toml(&devices))?;
    // The speed rule is the subject here, so the client watches its exit
    // node by heartbeats only: with probes, the 100 ms step plus a stall
    // of this loaded machine (the relays are user-space threads) can pass
    // the 300 ms probe deadline and make it a failover instead, which is
    // another rule (exit_node_failover).
    start_two_exits_and_client_with(&mut w, &["--no-exit-probes"])?;
    let activated = Instant::now();
    let active = |w: &World| -> Option<String> {
        active_exit(&w.node("client").exit_nodes().ok()?).map(str::to_owned)
    };
    let first = active(&w).context("no active exit node")?;
    let second = if first == "exit1" { "exit2" } else { "exit1" };
    assert_eq!(tcp_source(&w, "client", false)?, w.underlay(&first, false));

    w.inet
        .watch("client4", &w.underlay("client", false).to_string())?;
    w.inet
        .watch("client6", &w.underlay("client", true).to_string())?;
    relays[&first].set_delay(Duration::from_millis(100));
    let switched = wait_for(
        "the client to move to the faster exit node",
        SWITCH_DWELL + Duration::from_secs(30),
        Duration::from_millis(100),
        || (active(&w)? == second).then(|| activated.elapsed()),
    )?;
    eprintln!(
        "switched to the faster exit node {:.1} s after activation (dwell {} s)",
        switched.as_secs_f64(),
        SWITCH_DWELL.as_secs()
    );
    // Not before the dwell time (the phase was seen active within 50 ms
    // of becoming so; allow for that and the list's polling).
    assert!(
        switched + Duration::from_millis(500) >= SWITCH_DWELL,
        "switched after only {switched:?}"
    );
    let list = w.node("client").exit_nodes()?;
    let rtt = |name: &str| list.iter().find(|r| r.name == name).and_then(|r| r.rtt_ms);
    // The 100 ms the relay adds shows as a difference; absolute figures
    // grow with the machine's load.
    let (slow, fast) = (
        rtt(&first).context("no RTT for the slowed exit node")?,
        rtt(second).context("no RTT for the faster exit node")?,
    );
    assert!(slow > fast + 50.0, "{list:?}");
    assert_eq!(tcp_source(&w, "client", false)?, w.underlay(second, false));
    assert_eq!(tcp_source(&w, "client", true)?, w.underlay(second, true));
    assert_eq!(w.inet.count("client4")?, 0, "IPv4 leaked during the switch");
    assert_eq!(w.inet.count("client6")?, 0, "IPv6 leaked during the switch");
    let log = w.node("client").log();
    assert!(log.contains("is clearly faster than"), "{log}");
    // Exactly one exit node carries 0/0 after the switch.
    let wg = wg_config(w.node("client"))?;
    assert_eq!(wg.matches("0.0.0.0/0").count(), 1, "{wg}");
    drop(w);
    drop(relays);
    Ok(())
}

/// A client in exit mode through exit1, the internet server counting
/// what arrives from the client's own addresses (`leak4`, `leak6`), and a
/// thread sending a UDP datagram per family to the server every `gap`
/// for `for_`.
fn active_client_flooding(
    for_: Duration,
    gap: Duration,
) -> anyhow::Result<(World, std::thread::JoinHandle<anyhow::Result<()>>)> {
    let mut w = World::new(&["exit1", "client"])?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&["--exit-node-client"]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    for v6 in [false, true] {
        let name = if v6 { "leak6" } else { "leak4" };
        w.inet.watch(name, &w.underlay("client", v6).to_string())?;
    }
    let client = Netns::attach(w.node("client").ns.name())?;
    let flood = client.spawn_in(move || {
        let s4 = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let s6 = std::net::UdpSocket::bind("[::]:0")?;
        let until = Instant::now() + for_;
        while Instant::now() < until {
            let _ = s4.send_to(b"x", (World::server(false), 9));
            let _ = s6.send_to(b"x", (World::server(true), 9));
            std::thread::sleep(gap);
        }
        Ok(())
    })?;
    Ok((w, flood))
}

/// Attack on issue 21, finding 0: what nexd's client routing relies on
/// is removed while exit mode is active (the whole of nexd's table, v4
/// and v6; the rule that sends unmarked traffic there), while the client
/// sends to the internet every millisecond. nexd puts it back; how many
/// datagrams left directly meanwhile? Measured: flushing the v4 table
/// leaked 4 v4 datagrams (the unreachable fallback goes with the table);
/// deleting the v4 rule leaked 8 v4 and 1 v6, the v6 rule 7 v6 and 1 v4.
/// The cross-family part was the repair (fixed, see
/// `repairing_one_familys_rule_leaks_nothing_of_the_other`); what is left
/// is the time until nexd notices, which only a second line that does
/// not depend on these objects (a rule-level `unreachable` after the
/// table lookup, say) would close.
#[test]
#[ignore = "finding C (rest): removing nexd's table or its rule by hand leaks that family for milliseconds, until the repair"]
fn removing_the_clients_routing_while_active_leaks_nothing() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let (w, flood) = active_client_flooding(Duration::from_secs(5), Duration::from_millis(1))?;
    let ns = &w.node("client").ns;
    std::thread::sleep(Duration::from_millis(500));
    let mut seen = Vec::new();
    for (what, cmd) in [
        ("table 28280 flushed (v4)", "route flush table 28280"),
        ("table 28280 flushed (v6)", "-6 route flush table 28280"),
        ("rule 28279 deleted (v4)", "rule del priority 28279"),
        ("rule 28279 deleted (v6)", "-6 rule del priority 28279"),
    ] {
        let before = (w.inet.count("leak4")?, w.inet.count("leak6")?);
        ns.ip(cmd)?;
        std::thread::sleep(Duration::from_millis(800));
        let after = (w.inet.count("leak4")?, w.inet.count("leak6")?);
        seen.push(format!(
            "{what}: {} v4, {} v6 leaked",
            after.0 - before.0,
            after.1 - before.1
        ));
    }
    flood
        .join()
        .map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
    println!("{}", seen.join("; "));
    println!("{}", ns.ip("rule show")?);
    println!("{}", ns.ip("route show table 28280")?);
    let leaked = (w.inet.count("leak4")?, w.inet.count("leak6")?);
    assert_eq!(leaked, (0, 0), "{}", seen.join("; "));
    Ok(())
}

/// Attack on issue 21, finding 0, the repair itself: one family's rule
/// is deleted by hand; nexd puts it back. The other family's traffic
/// must not notice: the repair used to delete every rule of both
/// families before adding them again, and the client's IPv6 (IPv4)
/// left directly in between.
#[test]
fn repairing_one_familys_rule_leaks_nothing_of_the_other() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let (w, flood) = active_client_flooding(Duration::from_secs(8), Duration::from_micros(100))?;
    let ns = &w.node("client").ns;
    std::thread::sleep(Duration::from_millis(300));
    // (v4 leaked while v6 was repaired, v6 leaked while v4 was)
    let mut cross = (0, 0);
    for _ in 0..5 {
        for v6 in [false, true] {
            let before = (w.inet.count("leak4")?, w.inet.count("leak6")?);
            if let Err(e) = ns.ip(if v6 {
                "-6 rule del priority 28279"
            } else {
                "rule del priority 28279"
            }) {
                bail!(
                    "{e}\n{}\n{}\n{}",
                    ns.ip("rule show")?,
                    ns.ip("-6 rule show")?,
                    w.node("client").log()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
            let after = (w.inet.count("leak4")?, w.inet.count("leak6")?);
            if v6 {
                cross.0 += after.0 - before.0;
            } else {
                cross.1 += after.1 - before.1;
            }
        }
    }
    flood
        .join()
        .map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
    println!(
        "repairs of the other family's rule leaked {} v4 and {} v6 datagrams",
        cross.0, cross.1
    );
    assert_eq!(
        cross,
        (0, 0),
        "(v4, v6) leaked by the other family's repair"
    );
    Ok(())
}
