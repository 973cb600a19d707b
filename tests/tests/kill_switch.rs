//! End-to-end: the kill switch keeps its promise from boot, across a crash
//! and a restart, and on an uplink that changes under it.
//!
//! What leaves the client is counted where an attacker on its network
//! would see it: on the switch port the client is plugged into (nftables,
//! bridge family), every frame except ARP, WireGuard's UDP to the mesh
//! endpoints, neighbour/router discovery and DHCP. Each test also proves
//! its counter can count (it moves once the client goes direct).

use std::{
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use nexd_testkit::{
    Netns, Node, NodeSpec, counter,
    netns::veth,
    proto::ClientPhase,
    topology::{LeakWatch, lan_behind, nft_counter, nft_script},
    traffic::{UdpOpts, ping_once, tcp_transfer, udp_exchange, udp_exchange_with},
    wait_for,
    world::World,
};

const T: Duration = Duration::from_secs(10);
const PIN: &str = "/sys/fs/bpf/nexd/wg0/guard-eth0";

fn spec(args: &[&str]) -> NodeSpec {
    NodeSpec {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..NodeSpec::default()
    }
}

/// Tries every way out the device and its LAN host have (TCP, UDP, ICMP,
/// v4 and v6, and a socket bound to the uplink that skips policy
/// routing); each must fail.
fn try_to_leak(w: &World, lan: &Netns) -> anyhow::Result<()> {
    let short = Duration::from_secs(1);
    let client = &w.node("client").ns;
    for from in [client, lan] {
        for v6 in [false, true] {
            let to = World::server(v6);
            assert!(
                tcp_transfer(from, &w.inet.ns, to, 1024, short).is_err(),
                "TCP from {} to {to} got through",
                from.name()
            );
            assert!(
                udp_exchange(from, &w.inet.ns, to, short).is_err(),
                "UDP from {} to {to} got through",
                from.name()
            );
            assert!(
                !ping_once(from, to, short)?,
                "ping from {} to {to} got through",
                from.name()
            );
        }
    }
    let bound = UdpOpts {
        bind_device: Some("eth0".into()),
        mark: None,
    };
    assert!(
        udp_exchange_with(client, &w.inet.ns, World::server(false), short, &bound).is_err(),
        "a socket bound to the uplink got through"
    );
    Ok(())
}

/// The guard's pin, as the node's mount namespace sees it (its inode
/// tells whether it is the same pin), on TCX kernels.
fn pin_inode(node: &mut Node) -> anyhow::Result<Option<u64>> {
    if !nexd_testkit::tcx_kernel() {
        return Ok(None);
    }
    let pid = node.holder_pid()?;
    Ok(std::fs::metadata(format!("/proc/{pid}/root{PIN}"))
        .ok()
        .map(|m| m.ino()))
}

/// From boot, with no exit node anywhere: the kill switch holds while the
/// client waits (it used to install nothing until an exit node answered).
#[test]
fn kill_switch_holds_from_boot_without_an_exit_node() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client"])?;
    let lan = Netns::new("lanhost")?;
    lan_behind(&w.node("client").ns, &lan)?;
    let watch = LeakWatch::start(&w.sw, w.port("client")?, 51820)?;
    w.node_mut("client").start(&spec(&[
        "--exit-node-client",
        "--kill-switch",
        "--lan-interface",
        "lan0",
    ]))?;
    w.node("client").wait_phase(ClientPhase::Waiting, T)?;
    let status = w.node("client").status()?;
    assert_eq!(status.datapath.guard_interfaces, ["eth0"], "{status:?}");
    try_to_leak(&w, &lan)?;
    let leaked = watch.leaked()?;
    println!("boot, waiting for an exit node: {leaked} frames leaked");
    assert_eq!(leaked, 0, "frames left the client while it waited");
    let stats = w.node("client").stats()?;
    assert!(counter(&stats, "guard_dropped")? > 0, "{stats:?}");

    // Disable: the guard goes and the same counter sees direct traffic.
    let out = w.node("client").nexctl(&["exit-node", "disable"])?;
    assert!(out.status.success(), "{out:?}");
    udp_exchange(&w.node("client").ns, &w.inet.ns, World::server(false), T)?;
    assert!(watch.leaked()? > 0, "the leak counter cannot count");
    Ok(())
}

/// Exit mode active (enabled with nexctl, not by flag), then nexd is
/// SIGKILLed and the exit node stopped, then nexd restarts: the guard the
/// crashed nexd pinned is taken over in place (the same pin), exit mode
/// resumes waiting, and nothing leaks at any point; once an exit node is
/// back, traffic flows through it.
#[test]
fn kill_switch_holds_across_sigkill_and_restart() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client"])?;
    let lan = Netns::new("lanhost")?;
    lan_behind(&w.node("client").ns, &lan)?;
    let args = ["--kill-switch", "--lan-interface", "lan0"];
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&args))?;
    w.node("client").wait_exit_node("exit1", T * 2)?;
    let out = w.node("client").nexctl(&["exit-node", "enable"])?;
    assert!(out.status.success(), "{out:?}");
    w.node("client").wait_phase(ClientPhase::Active, T)?;
    let pin_before = pin_inode(w.node_mut("client"))?;
    assert!(pin_before.is_some() || !nexd_testkit::tcx_kernel());

    let watch = LeakWatch::start(&w.sw, w.port("client")?, 51820)?;
    w.node_mut("client").kill()?;
    w.node_mut("exit1").kill()?;
    try_to_leak(&w, &lan)?;
    assert_eq!(watch.leaked()?, 0, "leaked with nexd dead");

    w.node_mut("client").start(&spec(&args))?;
    w.node("client").wait_phase(ClientPhase::Waiting, T)?;
    let log = w.node("client").log();
    assert!(
        log.contains("resuming exit mode, the kill switch holds"),
        "{log}"
    );
    assert!(log.contains("took over the leak guard"), "{log}");
    assert_eq!(
        pin_inode(w.node_mut("client"))?,
        pin_before,
        "the guard was replaced, not taken over"
    );
    try_to_leak(&w, &lan)?;
    let leaked = watch.leaked()?;
    println!("SIGKILL, exit node gone, restart: {leaked} frames leaked");
    assert_eq!(leaked, 0, "leaked after the restart");

    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    let via = udp_exchange(&lan, &w.inet.ns, World::server(false), T)?;
    assert_eq!(via.ip(), w.underlay("exit1", false));
    assert_eq!(watch.leaked()?, 0);
    Ok(())
}

/// The default route moves to a second uplink while exit mode is active:
/// the guard follows (the time it took is printed), and after a SIGKILL
/// nothing leaves through either uplink.
#[test]
fn kill_switch_follows_a_new_uplink() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client"])?;
    let lan = Netns::new("lanhost")?;
    lan_behind(&w.node("client").ns, &lan)?;
    // A second way out: client eth1 -- internet cl1 (10.77.0.0/24, fd77::/64).
    veth(&w.node("client").ns, "eth1", &w.inet.ns, "cl1")?;
    let client_ns = &w.node("client").ns;
    client_ns.ip("addr add 10.77.0.1/24 dev eth1")?;
    client_ns.ip("addr add fd77::1/64 dev eth1 nodad")?;
    w.inet.ns.ip("addr add 10.77.0.254/24 dev cl1")?;
    w.inet.ns.ip("addr add fd77::fe/64 dev cl1 nodad")?;
    nft_script(
        &w.inet.ns,
        "table inet leak_cl1 {\n counter leaked { }\n chain pre {\n  type filter hook prerouting priority -300; policy accept;\n  iifname != \"cl1\" return\n  icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report } return\n  ip6 daddr ff02::/16 ip6 hoplimit 1 return\n  counter name leaked\n }\n}\n",
    )?;

    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&[
        "--exit-node-client",
        "--kill-switch",
        "--lan-interface",
        "lan0",
    ]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    let watch = LeakWatch::start(&w.sw, w.port("client")?, 51820)?;

    // The uplink changes: both default routes now leave through eth1.
    let client_ns = &w.node("client").ns;
    let moved = Instant::now();
    client_ns.ip("route replace default via 10.77.0.254 dev eth1")?;
    client_ns.ip("-6 route replace default via fd77::fe dev eth1")?;
    let guarded = wait_for(
        "the guard on the new uplink",
        T,
        Duration::from_millis(2),
        || {
            let on = if nexd_testkit::tcx_kernel() {
                let pid = w.node("client").pid()?;
                // nexd's own mount namespace holds the pins.
                std::path::Path::new(&format!("/proc/{pid}/root/sys/fs/bpf/nexd/wg0/guard-eth1"))
                    .exists()
            } else {
                w.node("client")
                    .status()
                    .ok()?
                    .datapath
                    .guard_interfaces
                    .iter()
                    .any(|i| i == "eth1")
            };
            on.then(|| moved.elapsed())
        },
    )?;
    println!(
        "uplink change to guard on the new uplink: {:.1} ms",
        guarded.as_secs_f64() * 1000.0
    );
    // Exit traffic still flows (through the tunnel, the endpoint reached
    // over eth0's connected subnet).
    let via = udp_exchange(&lan, &w.inet.ns, World::server(false), T)?;
    assert_eq!(via.ip(), w.underlay("exit1", false));

    w.node_mut("client").kill()?;
    try_to_leak(&w, &lan)?;
    let (on_eth0, on_eth1) = (
        watch.leaked()?,
        nft_counter(&w.inet.ns, "inet", "leak_cl1", "leaked")?,
    );
    println!("after SIGKILL: {on_eth0} frames leaked on eth0, {on_eth1} on eth1");
    assert_eq!(on_eth0, 0, "leaked on the old uplink");
    assert_eq!(on_eth1, 0, "leaked on the new uplink");

    // The eth1 counter can count: remove the guard and go direct.
    let out = w
        .node_mut("client")
        .nexctl_on_device(&["exit-node", "disable"])?;
    assert!(out.status.success(), "{out:?}");
    let direct: IpAddr = "10.77.0.1".parse()?;
    let seen = udp_exchange(&w.node("client").ns, &w.inet.ns, World::server(false), T)?;
    assert_eq!(seen.ip(), direct);
    assert!(
        nft_counter(&w.inet.ns, "inet", "leak_cl1", "leaked")? > 0,
        "the eth1 counter cannot count"
    );
    Ok(())
}

/// Issue 21, finding 9: after a SIGKILL, a new interface appears and
/// takes the default routes while nexd is down. The guard was attached
/// to the uplinks nexd saw; what must hold the new one shut is what
/// outlives nexd without depending on any interface: the rules and the
/// unreachable end of nexd's table.
#[test]
fn kill_switch_covers_an_uplink_that_appears_while_nexd_is_down() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client"])?;
    let lan = Netns::new("lanhost")?;
    lan_behind(&w.node("client").ns, &lan)?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&[
        "--exit-node-client",
        "--kill-switch",
        "--lan-interface",
        "lan0",
    ]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    let watch = LeakWatch::start(&w.sw, w.port("client")?, 51820)?;
    w.node_mut("client").kill()?;

    // nexd is down; a new uplink comes: client eth1 -- internet cl1.
    veth(&w.node("client").ns, "eth1", &w.inet.ns, "cl1")?;
    let client_ns = &w.node("client").ns;
    client_ns.ip("addr add 10.77.0.1/24 dev eth1")?;
    client_ns.ip("addr add fd77::1/64 dev eth1 nodad")?;
    w.inet.ns.ip("addr add 10.77.0.254/24 dev cl1")?;
    w.inet.ns.ip("addr add fd77::fe/64 dev cl1 nodad")?;
    nft_script(
        &w.inet.ns,
        "table inet leak_cl1 {\n counter leaked { }\n chain pre {\n  type filter hook prerouting priority -300; policy accept;\n  iifname != \"cl1\" return\n  icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report } return\n  ip6 daddr ff02::/16 ip6 hoplimit 1 return\n  counter name leaked\n }\n}\n",
    )?;
    client_ns.ip("route replace default via 10.77.0.254 dev eth1")?;
    client_ns.ip("-6 route replace default via fd77::fe dev eth1")?;

    try_to_leak(&w, &lan)?;
    let bound = UdpOpts {
        bind_device: Some("eth1".into()),
        mark: None,
    };
    assert!(
        udp_exchange_with(
            client_ns,
            &w.inet.ns,
            World::server(false),
            Duration::from_secs(1),
            &bound
        )
        .is_err(),
        "a socket bound to the new uplink got through"
    );
    let (on_eth0, on_eth1) = (
        watch.leaked()?,
        nft_counter(&w.inet.ns, "inet", "leak_cl1", "leaked")?,
    );
    println!("nexd down, new uplink: {on_eth0} frames leaked on eth0, {on_eth1} on eth1");
    assert_eq!(on_eth0, 0, "leaked on the old uplink");
    assert_eq!(on_eth1, 0, "leaked on the new uplink");

    // The eth1 counter can count: nexctl's offline disable removes what
    // the dead nexd left, and the device goes direct.
    let out = w
        .node_mut("client")
        .nexctl_on_device(&["exit-node", "disable"])?;
    assert!(out.status.success(), "{out:?}");
    let seen = udp_exchange(&w.node("client").ns, &w.inet.ns, World::server(false), T)?;
    assert_eq!(seen.ip(), "10.77.0.1".parse::<IpAddr>()?);
    assert!(
        nft_counter(&w.inet.ns, "inet", "leak_cl1", "leaked")? > 0,
        "the eth1 counter cannot count"
    );
    Ok(())
}

/// Issue 21, finding 10: a bpffs that nexd mounts itself in a mount
/// namespace of its own (`ip netns exec` makes one per command) dies with
/// nexd, and the pinned guard with it: `--kill-switch` refuses such a
/// place, and says what to do, instead of promising a guard that a
/// SIGKILL takes away.
#[test]
fn kill_switch_refuses_a_bpffs_that_would_die_with_nexd() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["client"])?;
    // A plain directory of the node's, no bpffs: nexd would mount one
    // there, in a mount namespace that is not the init one.
    let dir = w.node("client").dir().join("no-bpffs");
    std::fs::create_dir_all(&dir)?;
    let dir = dir.to_str().map(str::to_owned).unwrap_or_default();
    w.node_mut("client").spawn(&spec(&[
        "--exit-node-client",
        "--kill-switch",
        "--bpffs",
        &dir,
    ]))?;
    let status = w.node_mut("client").wait_exit(T)?;
    assert!(
        !status.success(),
        "nexd started: {}",
        w.node("client").log()
    );
    let log = w.node("client").log();
    assert!(
        log.contains("--kill-switch:") && log.contains("is not a mounted bpffs"),
        "{log}"
    );
    // Nothing of the client's routing stays behind the refusal.
    let rules = w.node("client").ns.ip("rule show")?;
    assert!(!rules.contains("28280"), "{rules}");
    Ok(())
}

/// Attack on issue 21, finding 9: an interface that nexd knew but that
/// was no uplink when nexd died (a laptop's Wi-Fi, present but without a
/// default route) becomes the uplink while nexd is down. `inet nexd_ks`
/// lets out through every link nexd knew, and the guard is only on the
/// links that were uplinks: nothing holds the new uplink shut.
#[test]
fn kill_switch_covers_a_known_link_that_becomes_the_uplink_while_nexd_is_down() -> anyhow::Result<()>
{
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client"])?;
    let lan = Netns::new("lanhost")?;
    lan_behind(&w.node("client").ns, &lan)?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&[
        "--exit-node-client",
        "--kill-switch",
        "--lan-interface",
        "lan0",
    ]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    // A second link, up and addressed, with no default route: not an
    // uplink while nexd runs.
    veth(&w.node("client").ns, "eth1", &w.inet.ns, "cl1")?;
    let client_ns = &w.node("client").ns;
    client_ns.ip("addr add 10.77.0.1/24 dev eth1")?;
    client_ns.ip("addr add fd77::1/64 dev eth1 nodad")?;
    w.inet.ns.ip("addr add 10.77.0.254/24 dev cl1")?;
    w.inet.ns.ip("addr add fd77::fe/64 dev cl1 nodad")?;
    std::thread::sleep(Duration::from_secs(2));
    let ks = client_ns.exec(&["nft", "list", "table", "inet", "nexd_ks"])?;
    assert!(ks.contains("\"eth1\""), "nexd did not learn eth1: {ks}");
    let watch = LeakWatch::start(&w.sw, w.port("client")?, 51820)?;
    w.node_mut("client").kill()?;

    // nexd is down; the known link takes the default route.
    let client_ns = &w.node("client").ns;
    nft_script(
        &w.inet.ns,
        "table inet leak_cl1 {\n counter leaked { }\n chain pre {\n  type filter hook prerouting priority -300; policy accept;\n  iifname != \"cl1\" return\n  icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report } return\n  ip6 daddr ff02::/16 ip6 hoplimit 1 return\n  counter name leaked\n }\n}\n",
    )?;
    client_ns.ip("route replace default via 10.77.0.254 dev eth1")?;
    client_ns.ip("-6 route replace default via fd77::fe dev eth1")?;

    try_to_leak(&w, &lan)?;
    let bound = UdpOpts {
        bind_device: Some("eth1".into()),
        mark: None,
    };
    let through = udp_exchange_with(
        client_ns,
        &w.inet.ns,
        World::server(false),
        Duration::from_secs(1),
        &bound,
    );
    let (on_eth0, on_eth1) = (
        watch.leaked()?,
        nft_counter(&w.inet.ns, "inet", "leak_cl1", "leaked")?,
    );
    println!(
        "nexd down, known link became the uplink: {on_eth0} frames leaked on eth0, {on_eth1} on eth1; bound socket: {through:?}"
    );
    assert!(
        through.is_err(),
        "a socket bound to the link that became the uplink got through: {through:?}"
    );
    assert_eq!(on_eth0, 0, "leaked on the old uplink");
    assert_eq!(on_eth1, 0, "leaked on the new uplink");
    Ok(())
}
