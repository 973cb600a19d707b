//! End-to-end: what an exit node promises about trust (issue 13,
//! docs/SECURITY.md "The exit node"), with real nexd daemons in
//! namespaces. Every refusal below is shown next to a positive control,
//! so none of these tests can pass by everything being broken:
//!
//! * internet only: a client (and a LAN host behind it) reaches the
//!   internet through the exit node, but not the exit host's metadata
//!   address, a private subnet only the exit host reaches, a public
//!   subnet it routes there, nor its own uplink address; the drops are
//!   counted per client and reason, the neighbour sees nothing; with
//!   `--exit-allow` (command line, then configuration file) the shared
//!   subnet is reachable;
//! * a host on the exit node's network cannot open a connection (TCP,
//!   UDP, ICMP; IPv4 and IPv6) to a client through the exit node, and can
//!   once the exit node's nftables table is gone;
//! * authorization: a device the mesh file does not let serve neither
//!   serves (honest file) nor is believed by the client (lying file); a
//!   member that is not in `exit_clients` gets no packet through;
//! * a bounded flood of forged announcements from outside the tunnel
//!   (spoofing the exit node's mesh address) reaches the client's host but
//!   not its announcement sockets: the exit node stays available.
//!
//! The hold-time promise (a peer inflating its hold time is not
//! preferred) needs the announcement encoder of the nexd library and is in
//! `nexd-agent/tests/hold_time.rs`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nexd_testkit::{
    Netns, Node, NodeSpec, counter,
    netns::veth,
    proto::{ClientPhase, ExitClientRow, ExitStatus, Role},
    topology::{
        ExitRole, MESH_V6_PREFIX, lan_behind, local_service_address, mesh_toml_with_exits,
        nft_counter, nft_script,
    },
    traffic::{UdpOpts, ping_once, tcp_transfer, udp_exchange, udp_exchange_with},
    wait_for,
    world::World,
};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(10);
/// How long a probe that must fail is given. The same tunnel carried the
/// internet traffic just before (a control of every test), so a packet
/// that gets through does so in milliseconds.
const BLOCKED: Duration = Duration::from_millis(1500);
/// The cloud metadata address, given to the exit host itself.
const METADATA: &str = "169.254.169.254";
/// The exit host's private neighbour ("the VPC"), on a link only the exit
/// host has.
const VPC_HOST: &str = "10.1.0.2";
/// A public prefix the exit host routes via that neighbour.
const VPC_ROUTED: &str = "198.51.100.10";
/// The neighbour's IPv6 address, on the same link (a ULA subnet).
const VPC_HOST6: &str = "fd10:1::2";

fn spec(args: &[&str]) -> NodeSpec {
    NodeSpec {
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        ..NodeSpec::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// The source the internet server sees for a TCP connection from `from`.
fn tcp_source(w: &World, from: &Netns, v6: bool) -> anyhow::Result<IpAddr> {
    Ok(
        tcp_transfer(from, &w.inet.ns, World::server(v6), 16 * 1024, T)?
            .seen_from
            .ip(),
    )
}

fn nexctl_ok(node: &Node, args: &[&str]) -> anyhow::Result<String> {
    let out = node.nexctl(args)?;
    if !out.status.success() {
        bail!(
            "{}: nexctl {args:?} failed ({}): {}",
            node.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nexctl nexd exit-node clients` on `exit`.
fn exit_clients(exit: &Node) -> anyhow::Result<Vec<ExitClientRow>> {
    exit.nexctl_json(&["nexd", "exit-node", "clients"])
}

/// The row of `client` in `exit`'s `exit-node clients`.
fn client_row(exit: &Node, client: &str) -> anyhow::Result<ExitClientRow> {
    let rows = exit_clients(exit)?;
    rows.iter()
        .find(|r| r.client == client)
        .cloned()
        .with_context(|| format!("{}: no row for {client}: {rows:?}", exit.name))
}

/// Packets of `client` that `exit` denied, by reason.
fn denied(exit: &Node, client: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    Ok(client_row(exit, client)?.denied)
}

fn reason(map: &BTreeMap<String, u64>, reason: &str) -> u64 {
    map.get(reason).copied().unwrap_or(0)
}

/// The value of one series of `nexctl nexd metrics`, e.g.
/// `nexd_announcements_total{outcome="bad_mac"}`; fails if it is absent
/// (a renamed series must not read as zero).
fn metric(node: &Node, series: &str) -> anyhow::Result<u64> {
    let text = nexctl_ok(node, &["nexd", "metrics"])?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .with_context(|| format!("{}: no series {series} in:\n{text}", node.name))
}

fn announcements(node: &Node, outcome: &str) -> anyhow::Result<u64> {
    metric(
        node,
        &format!("nexd_announcements_total{{outcome=\"{outcome}\"}}"),
    )
}

/// A probe that must not get through: a TCP connection and a ping from
/// `from` to `to` (served by `server`) both fail.
fn assert_unreachable(from: &Netns, server: &Netns, to: IpAddr, what: &str) -> anyhow::Result<()> {
    if let Ok(t) = tcp_transfer(from, server, to, 1024, BLOCKED) {
        bail!(
            "{what}: {} reached {to} over TCP (seen from {})",
            from.label(),
            t.seen_from
        );
    }
    if ping_once(from, to, Duration::from_secs(1))? {
        bail!("{what}: {} got a ping reply from {to}", from.label());
    }
    Ok(())
}

/// Counts, in a test-owned table `inet probe` of `ns`, packets arriving
/// on any interface addressed to one of `to` (but IPv6 neighbour
/// discovery): under `seen` in prerouting, before anything of the host
/// can drop them.
fn count_arrivals(ns: &Netns, to: &[&str]) -> anyhow::Result<()> {
    let rules: String = to
        .iter()
        .map(|a| {
            if a.contains(':') {
                // Not the exit host's own neighbour discovery.
                format!(
                    "  ip6 daddr {a} meta l4proto != ipv6-icmp counter name seen\n\
                     \x20 ip6 daddr {a} icmpv6 type echo-request counter name seen\n"
                )
            } else {
                format!("  ip daddr {a} counter name seen\n")
            }
        })
        .collect();
    nft_script(
        ns,
        &format!(
            "table inet probe {{\n counter seen {{ }}\n\
             \x20chain pre {{ type filter hook prerouting priority -300; policy accept;\n\
             {rules} }}\n}}\n"
        ),
    )
}

/// Internet only, from a client and from a LAN host behind it; the
/// drops counted by reason at the exit node; a shared subnet with
/// `--exit-allow`, from the command line and from the configuration file.
#[test]
fn exit_node_forwards_to_the_internet_only() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let started = Instant::now();
    let mut w = World::new(&["exit1", "client"])?;
    let exit_v4 = w.underlay("exit1", false);
    let client_mesh = w.mesh_ip("client", false);

    // The exit host: a metadata service of its own, and a private link
    // to a neighbour ("the VPC", 10.1.0.2) through which it also routes a
    // public prefix. The neighbour routes the mesh back, as an operator
    // who shares it would set up.
    let exit_ns = &w.node("exit1").ns;
    local_service_address(exit_ns, "meta0", &format!("{METADATA}/32"))?;
    let vpc = Netns::new("vpc")?;
    veth(exit_ns, "vpc0", &vpc, "eth0")?;
    exit_ns.ip("addr add 10.1.0.1/24 dev vpc0")?;
    exit_ns.ip("addr add fd10:1::1/64 dev vpc0 nodad")?;
    vpc.ip(&format!("addr add {VPC_HOST}/24 dev eth0"))?;
    vpc.ip(&format!("addr add {VPC_HOST6}/64 dev eth0 nodad"))?;
    vpc.ip(&format!("addr add {VPC_ROUTED}/32 dev lo"))?;
    exit_ns.ip(&format!("route add 198.51.100.0/24 via {VPC_HOST}"))?;
    vpc.ip("route add 100.64.0.0/10 via 10.1.0.1")?;
    vpc.ip(&format!("-6 route add {MESH_V6_PREFIX} via fd10:1::1"))?;
    count_arrivals(&vpc, &[VPC_HOST, VPC_ROUTED, VPC_HOST6])?;
    let vpc_seen = || nft_counter(&vpc, "inet", "probe", "seen");

    // Controls: the services exist and the exit host reaches them.
    tcp_transfer(exit_ns, exit_ns, ip(METADATA), 1024, T).context("metadata service")?;
    tcp_transfer(exit_ns, &vpc, ip(VPC_HOST), 1024, T).context("the VPC host")?;
    tcp_transfer(exit_ns, &vpc, ip(VPC_ROUTED), 1024, T).context("the routed prefix")?;
    tcp_transfer(exit_ns, &vpc, ip(VPC_HOST6), 1024, T).context("the VPC host, IPv6")?;
    assert!(vpc_seen()? > 0, "the neighbour's counter does not count");

    let lan = Netns::new("lanhost")?;
    lan_behind(&w.node("client").ns, &lan)?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client")
        .start(&spec(&["--exit-node-client", "--lan-interface", "lan0"]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;

    // Control: the internet through the exit node, from the client and
    // from its LAN host.
    let client_ns = &w.node("client").ns;
    let exit_ns = &w.node("exit1").ns;
    assert_eq!(tcp_source(&w, client_ns, false)?, exit_v4);
    assert_eq!(tcp_source(&w, &lan, false)?, exit_v4);
    // ...also from a socket bound to the tunnel, the way the exit host's
    // own address is probed below (the client reaches the switch's
    // subnet directly otherwise).
    let bound = UdpOpts {
        bind_device: Some("wg0".into()),
        mark: None,
    };
    let seen = udp_exchange_with(client_ns, &w.inet.ns, World::server(false), T, &bound)?;
    assert_eq!(seen.ip(), exit_v4);

    let vpc_before = vpc_seen()?;
    let exit = w.node("exit1");
    // (a) the metadata address on the exit host: one of the host's own
    // addresses, still counted under its own name.
    // (b) the private subnet only the exit host is connected to (IPv4
    // and IPv6), (c) the public prefix it routes there: all the host's
    // networks, more specific than the private ranges around them.
    for (dest, server, why) in [
        (METADATA, exit_ns, "metadata"),
        (VPC_HOST, &vpc, "connected"),
        (VPC_ROUTED, &vpc, "connected"),
        (VPC_HOST6, &vpc, "connected"),
    ] {
        let before = denied(exit, "client")?;
        assert_unreachable(client_ns, server, ip(dest), dest)?;
        let after = denied(exit, "client")?;
        assert!(
            reason(&after, why) > reason(&before, why),
            "{dest}: not counted under {why}: {before:?} -> {after:?}"
        );
    }
    // (d) the exit host's own uplink address, through the tunnel.
    let before = denied(exit, "client")?;
    assert!(
        udp_exchange_with(client_ns, exit_ns, exit_v4, BLOCKED, &bound).is_err(),
        "the client reached the exit host's uplink address through the tunnel"
    );
    let after = denied(exit, "client")?;
    assert!(
        reason(&after, "host_address") > reason(&before, "host_address"),
        "{before:?} -> {after:?}"
    );
    // The LAN host behind the client. The private subnet: refused at the
    // exit node like the client's own traffic, counted for the client
    // (its gateway), whose mesh address it arrives with.
    let before = denied(exit, "client")?;
    assert_unreachable(&lan, &vpc, ip(VPC_HOST), VPC_HOST)?;
    let after = denied(exit, "client")?;
    assert!(
        reason(&after, "connected") > reason(&before, "connected"),
        "LAN host to {VPC_HOST}: not counted: {before:?} -> {after:?}"
    );
    // The metadata address: link-local, so the gateway never sends it
    // into the tunnel at all (its classifier's built-in bypass: it leaves
    // through the gateway's own uplink, where nothing answers it): the
    // LAN host does not reach the exit host's, and the exit node sees
    // nothing of it.
    // Nor does the gateway route it out of its uplink (RFC 3927: link-local
    // is never forwarded): the client's upstream router sees none of it.
    nft_script(
        &w.inet.ns,
        &format!(
            "table inet linklocal {{\n counter seen {{ }}\n chain pre {{ type filter hook prerouting priority -300; policy accept;\n  ip daddr {METADATA} counter name seen\n }}\n}}\n"
        ),
    )?;
    let bypassed = counter(&w.node("client").stats()?, "bypassed")?;
    let before = client_row(exit, "client")?.denied_total;
    assert_unreachable(&lan, exit_ns, ip(METADATA), METADATA)?;
    assert!(counter(&w.node("client").stats()?, "bypassed")? > bypassed);
    assert_eq!(client_row(exit, "client")?.denied_total, before);
    assert_eq!(
        nft_counter(&w.inet.ns, "inet", "linklocal", "seen")?,
        0,
        "the gateway forwarded the LAN host's link-local probe out of its uplink"
    );
    assert_eq!(
        vpc_seen()?,
        vpc_before,
        "the exit host's neighbour saw packets from the tunnel"
    );
    let text = nexctl_ok(exit, &["nexd", "exit-node", "clients"])?;
    eprintln!("exit-node clients after the refusals:\n{text}");
    let stats = exit.stats()?;
    assert!(counter(&stats, "exit_denied")? > 0, "{stats:?}");
    // The internet still works.
    assert_eq!(tcp_source(&w, client_ns, false)?, exit_v4);

    // --exit-allow shares the VPC and the prefix routed there: reachable
    // from the client and its LAN host (unmasqueraded: not the uplink);
    // the metadata address stays closed.
    let restart = |w: &mut World, args: &[&str]| -> anyhow::Result<()> {
        w.node_mut("exit1").stop()?;
        w.node_mut("exit1").start(&spec(args))?;
        w.node("client").wait_exit_node("exit1", T * 2)?;
        w.node("client").wait_phase(ClientPhase::Active, T * 2)
    };
    restart(
        &mut w,
        &[
            "router",
            "--exit-node",
            "--exit-allow",
            "10.1.0.0/24",
            "--exit-allow",
            "198.51.100.0/24",
            "--exit-allow",
            "fd10:1::/64",
        ],
    )?;
    let client_ns = &w.node("client").ns;
    let t = tcp_transfer(client_ns, &vpc, ip(VPC_HOST), 16 * 1024, T * 2)?;
    assert_eq!(t.seen_from.ip(), client_mesh);
    let t = tcp_transfer(client_ns, &vpc, ip(VPC_ROUTED), 16 * 1024, T)?;
    assert_eq!(t.seen_from.ip(), client_mesh);
    let t = tcp_transfer(client_ns, &vpc, ip(VPC_HOST6), 16 * 1024, T)?;
    assert_eq!(t.seen_from.ip(), w.mesh_ip("client", true));
    let t = tcp_transfer(&lan, &vpc, ip(VPC_HOST), 16 * 1024, T)?;
    assert_eq!(t.seen_from.ip(), client_mesh);
    assert!(vpc_seen()? > vpc_before);
    assert_unreachable(client_ns, &w.node("exit1").ns, ip(METADATA), METADATA)?;

    // The same from the configuration file: only 10.1.0.0/24 shared.
    let config = w.node("exit1").dir().join("exit.toml");
    std::fs::write(&config, "exit-allow = [\"10.1.0.0/24\"]\n")?;
    let config_arg = config.to_str().context("config path")?.to_owned();
    restart(&mut w, &["--config", &config_arg, "router", "--exit-node"])?;
    let client_ns = &w.node("client").ns;
    let t = tcp_transfer(client_ns, &vpc, ip(VPC_HOST), 16 * 1024, T * 2)?;
    assert_eq!(t.seen_from.ip(), client_mesh);
    let before = denied(w.node("exit1"), "client")?;
    assert_unreachable(client_ns, &vpc, ip(VPC_ROUTED), VPC_ROUTED)?;
    let after = denied(w.node("exit1"), "client")?;
    assert!(
        reason(&after, "connected") > reason(&before, "connected"),
        "{before:?} -> {after:?}"
    );
    eprintln!(
        "internet-only test: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A host on the exit node's network (the internet router, with a
/// route to the mesh via the exit node) cannot open a connection to a
/// client through the exit node; the control: it can once the exit
/// node's nftables table is gone.
#[test]
fn no_connection_into_a_client_through_the_exit_node() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let started = Instant::now();
    let mut w = World::new(&["exit1", "client"])?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&["--exit-node-client"]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    let exit_v4 = w.underlay("exit1", false);
    assert_eq!(tcp_source(&w, &w.node("client").ns, false)?, exit_v4);

    // The outside host sends to the mesh through the exit node, from its
    // server addresses (not on the client's own subnet, so the client's
    // answers go back through the tunnel, as on the internet).
    let inet = &w.inet.ns;
    inet.ip(&format!(
        "route add 100.64.0.0/10 via {exit_v4} src 203.0.113.10"
    ))?;
    inet.ip(&format!(
        "-6 route add fd6e:6578:6400::/48 via {} src 2001:db8:203::10",
        w.underlay("exit1", true)
    ))?;
    // What reaches the client from that host, through the tunnel.
    let client_ns = &w.node("client").ns;
    nft_script(
        client_ns,
        "table inet probe {\n counter outside { }\n\
         \x20chain pre { type filter hook prerouting priority -300; policy accept;\n\
         \x20 iifname \"wg0\" ip saddr 203.0.113.10 counter name outside\n\
         \x20 iifname \"wg0\" ip6 saddr 2001:db8:203::10 counter name outside\n }\n}\n",
    )?;
    let outside = || nft_counter(client_ns, "inet", "probe", "outside");
    let client4 = w.mesh_ip("client", false);
    let client6 = w.mesh_ip("client", true);

    // Control: without nexd's table on the exit node, the outside host
    // connects to the client (routes, WireGuard and listener all work).
    let exit_ns = &w.node("exit1").ns;
    exit_ns.exec(&["nft", "delete", "table", "inet", "nexd"])?;
    let t = tcp_transfer(inet, client_ns, client4, 4096, T)
        .context("control: a connection into the client without nexd's table")?;
    assert_eq!(t.seen_from.ip(), ip("203.0.113.10"));
    assert!(outside()? > 0, "the client's counter does not count");
    // nexd puts its table back on a reload.
    w.node("exit1").signal(Signal::SIGHUP)?;
    wait_for(
        "the exit node's table after SIGHUP",
        T,
        Duration::from_millis(100),
        || nft_counter(exit_ns, "inet", "nexd", "inbound_dropped").ok(),
    )?;

    let arrived = outside()?;
    let dropped = nft_counter(exit_ns, "inet", "nexd", "inbound_dropped")?;
    for to in [client4, client6] {
        assert!(
            tcp_transfer(inet, client_ns, to, 1024, BLOCKED).is_err(),
            "a TCP connection from outside reached {to}"
        );
        assert!(
            udp_exchange(inet, client_ns, to, BLOCKED).is_err(),
            "UDP from outside reached {to}"
        );
        assert!(
            !ping_once(inet, to, Duration::from_secs(1))?,
            "a ping from outside reached {to}"
        );
    }
    assert_eq!(
        outside()?,
        arrived,
        "packets from outside reached the client"
    );
    let now_dropped = nft_counter(exit_ns, "inet", "nexd", "inbound_dropped")?;
    assert!(
        now_dropped >= dropped + 6,
        "inbound_dropped {dropped} -> {now_dropped}"
    );
    // Replies still go back to the client: it is not everything that stops.
    assert_eq!(tcp_source(&w, client_ns, false)?, exit_v4);
    assert_eq!(tcp_source(&w, client_ns, true)?, w.underlay("exit1", true));
    eprintln!("inbound test: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Authorization from the mesh file: exit1 may serve, only "client".
/// "fake" runs `router --exit-node` without `exit_node = true`: it does
/// not serve; given a file that lies, it serves and announces, and the
/// client neither lists nor uses it. "rogue" lies that exit1 serves it:
/// it enables exit mode, and exit1 lets none of its packets out.
#[test]
fn only_the_exit_nodes_and_clients_the_mesh_file_names() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let started = Instant::now();
    let mut w = World::new(&["exit1", "client", "fake", "rogue"])?;
    let truth = mesh_toml_with_exits(
        &w.devices,
        Some(&[ExitRole {
            name: "exit1",
            clients: Some(&["client"]),
        }]),
    );
    for n in &w.nodes {
        n.write_mesh(&truth)?;
    }
    w.node("rogue").write_mesh(&mesh_toml_with_exits(
        &w.devices,
        Some(&[ExitRole {
            name: "exit1",
            clients: Some(&["client", "rogue"]),
        }]),
    ))?;
    let exit_v4 = w.underlay("exit1", false);
    w.inet.watch("exit1", &exit_v4.to_string())?;

    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("fake")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&["--exit-node-client"]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;

    let only_exit1 = |w: &World| -> anyhow::Result<()> {
        let list = w.node("client").exit_nodes()?;
        let names: Vec<&str> = list.iter().map(|r| r.name.as_str()).collect();
        if names != ["exit1"] {
            bail!("the client lists {names:?}: {list:?}");
        }
        Ok(())
    };
    only_exit1(&w)?;

    // fake, with the true file: it does not serve, and says so.
    let fake = w.node("fake");
    let out = fake.nexctl(&["nexd", "exit-node", "clients"])?;
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("may not serve as exit node"), "{why}");
    let role = fake.status()?.exit_node.role;
    assert_ne!(role, Role::ExitNode);
    assert!(fake.log().contains("not serving as exit node"));

    // fake, with a file that lies (exit_node = true for itself): it
    // serves and announces itself; the client does not believe it.
    let lie = mesh_toml_with_exits(
        &w.devices,
        Some(&[
            ExitRole {
                name: "exit1",
                clients: Some(&["client"]),
            },
            ExitRole {
                name: "fake",
                clients: None,
            },
        ]),
    );
    fake.write_mesh(&lie)?;
    let ignored = announcements(w.node("client"), "exit_not_allowed")?;
    fake.signal(Signal::SIGHUP)?;
    wait_for(
        "fake to serve with its lying file",
        T,
        Duration::from_millis(100),
        || (w.node("fake").status().ok()?.exit_node.role == Role::ExitNode).then_some(()),
    )?;
    // For 5 s of fake's announcements (one a second), the client lists
    // exit1 alone, and counts fake's claim as not allowed.
    let deadline = Instant::now() + nexd_testkit::scaled(Duration::from_secs(5));
    while Instant::now() < deadline {
        only_exit1(&w)?;
        std::thread::sleep(Duration::from_millis(200));
    }
    let now_ignored = announcements(w.node("client"), "exit_not_allowed")?;
    assert!(
        now_ignored >= ignored + 3,
        "exit_not_allowed {ignored} -> {now_ignored}: fake's claim did not reach the client"
    );
    // ...and never uses it: the internet through exit1 (which the
    // server's counter for exit1's address sees: the control for rogue
    // below), nothing of the client's through fake.
    let via_exit1 = w.inet.count("exit1")?;
    assert_eq!(tcp_source(&w, &w.node("client").ns, false)?, exit_v4);
    assert!(w.inet.count("exit1")? > via_exit1);
    let fake_row = client_row(w.node("fake"), "client")?;
    assert_eq!(
        (fake_row.rx_packets, fake_row.tx_packets),
        (0, 0),
        "{fake_row:?}"
    );
    let wg = w.node("client").wg_show()?;
    assert_eq!(wg.matches("0.0.0.0/0").count(), 1, "{wg}");
    let status = w.node("client").status()?;
    assert_eq!(
        status.exit_node.active_exit_node.as_deref(),
        Some("exit1"),
        "{status:?}"
    );

    // rogue believes its lie and uses exit1; exit1 forwards nothing of it.
    w.node_mut("rogue").start(&spec(&["--exit-node-client"]))?;
    w.node("rogue").wait_phase(ClientPhase::Active, T * 2)?;
    let exit1 = w.node("exit1");
    let unauthorized = counter(&exit1.stats()?, "exit_unauthorized")?;
    let out_before = w.inet.count("exit1")?;
    let rogue_ns = &w.node("rogue").ns;
    assert!(
        tcp_transfer(rogue_ns, &w.inet.ns, World::server(false), 1024, BLOCKED).is_err(),
        "rogue reached the internet over TCP"
    );
    assert!(udp_exchange(rogue_ns, &w.inet.ns, World::server(false), BLOCKED).is_err());
    assert!(!ping_once(
        rogue_ns,
        World::server(false),
        Duration::from_secs(1)
    )?);
    assert!(!ping_once(
        rogue_ns,
        World::server(true),
        Duration::from_secs(1)
    )?);
    assert_eq!(
        w.inet.count("exit1")?,
        out_before,
        "a packet of rogue's left through exit1"
    );
    let now_unauthorized = counter(&exit1.stats()?, "exit_unauthorized")?;
    assert!(
        now_unauthorized >= unauthorized + 4,
        "exit_unauthorized {unauthorized} -> {now_unauthorized}"
    );
    let rows = exit_clients(exit1)?;
    assert!(
        rows.iter().all(|r| r.client != "rogue"),
        "rogue has a row: {rows:?}"
    );
    eprintln!(
        "authorization test: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Decodes standard base64 (a WireGuard key), without a dependency for it.
fn base64_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim().bytes().filter(|c| *c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|a| *a == c)
            .with_context(|| format!("not base64: {s}"))?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// A datagram that looks like an announcement from `sender` saying "exit
/// node", with a MAC nobody can have computed.
fn forged_announcement(sender: &[u8], seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; 96];
    b[0..4].copy_from_slice(b"NXAN");
    b[4] = 1;
    b[5] = 1;
    b[8..16].copy_from_slice(&seq.to_be_bytes());
    b[16..16 + sender.len().min(32)].copy_from_slice(&sender[..sender.len().min(32)]);
    b[80..96].copy_from_slice(&[0xa5; 16]);
    b
}

/// Datagrams of the flood, and how they are paced: bursts every 100 ms.
const FLOOD: usize = 20_000;
const BURST: usize = 500;

/// A bounded flood of forged announcements from outside the tunnel,
/// from a neighbour on the switch that claims exit1's mesh address, does
/// not make exit1 stale at the client; the flood does reach the client's
/// host (its counter), just not nexd's sockets.
#[test]
fn a_flood_of_forged_announcements_does_not_make_the_exit_node_stale() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let started = Instant::now();
    let mut w = World::new(&["exit1", "client"])?;
    let forger = Netns::new("forger")?;
    w.sw.attach(&forger, "eth0", &["192.0.2.50/24"])?;
    let exit_mesh = w.mesh_ip("exit1", false);
    let client_mesh = w.mesh_ip("client", false);
    forger.ip(&format!("addr add {exit_mesh}/32 dev lo"))?;
    forger.ip(&format!(
        "route add 100.64.0.0/10 via {} src {exit_mesh}",
        w.underlay("client", false)
    ))?;
    let client_ns = &w.node("client").ns;
    // Nothing on the client's side filters by reverse path: whatever
    // keeps the flood out, it is not rp_filter.
    for scope in ["all", "default", "eth0"] {
        client_ns.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
    }
    // Counted when it arrives, and once routed to local delivery.
    nft_script(
        client_ns,
        &format!(
            "table inet probe {{\n counter arrived {{ }}\n counter delivered {{ }}\n\
             \x20chain pre {{ type filter hook prerouting priority -300; policy accept;\n\
             \x20 iifname \"eth0\" ip saddr {exit_mesh} udp dport 51829 counter name arrived\n }}\n\
             \x20chain input {{ type filter hook input priority -300; policy accept;\n\
             \x20 iifname \"eth0\" ip saddr {exit_mesh} udp dport 51829 counter name delivered\n }}\n}}\n"
        ),
    )?;

    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&[]))?;
    w.node("client").wait_exit_node("exit1", T * 2)?;
    let client_ns = &w.node("client").ns;
    let client = w.node("client");
    let before: Vec<u64> = ["accepted", "bad_mac", "not_a_peer", "rate_limited"]
        .iter()
        .map(|o| announcements(client, o))
        .collect::<anyhow::Result<_>>()?;

    let sender = base64_decode(&w.devices[0].public_key)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flood = stop.clone();
    let flood = forger.spawn_in(move || -> anyhow::Result<usize> {
        let s = UdpSocket::bind(SocketAddr::new(exit_mesh, 51829))?;
        let to = SocketAddr::new(client_mesh, 51829);
        let mut sent = 0usize;
        let deadline = Instant::now() + Duration::from_secs(30);
        while sent < FLOOD && !stop_flood.load(Ordering::Relaxed) && Instant::now() < deadline {
            for _ in 0..BURST {
                // Rising sequence numbers, as a replay-aware forger would.
                s.send_to(
                    &forged_announcement(&sender, u64::MAX / 2 + sent as u64),
                    to,
                )?;
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(sent)
    })?;
    // Poll the client's view while the flood runs (bounded by its end).
    let flood_started = Instant::now();
    let mut polls = 0u32;
    let poll_deadline = flood_started + nexd_testkit::scaled(Duration::from_secs(30));
    let mut result = Ok(());
    while !flood.is_finished() && Instant::now() < poll_deadline {
        let list = w.node("client").exit_nodes()?;
        let status = list.iter().find(|r| r.name == "exit1").map(|r| r.status);
        if status != Some(ExitStatus::Available) {
            result = Err(anyhow::anyhow!(
                "exit1 is {status:?} at the client {:.1} s into the flood: {list:?}",
                flood_started.elapsed().as_secs_f64()
            ));
            break;
        }
        polls += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flood
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    let flood_time = flood_started.elapsed();
    result?;
    let arrived = nft_counter(client_ns, "inet", "probe", "arrived")?;
    let delivered = nft_counter(client_ns, "inet", "probe", "delivered")?;
    eprintln!(
        "flood: {sent} datagrams in {:.1} s; {arrived} arrived at the client, {delivered} routed to local delivery; {polls} polls saw exit1 available",
        flood_time.as_secs_f64()
    );
    assert_eq!(sent, FLOOD);
    assert!(polls >= 10, "only {polls} polls during the flood");
    // The control: the forged datagrams did reach the client's host, to
    // its mesh address and announcement port.
    assert!(
        delivered >= (FLOOD / 2) as u64,
        "only {delivered} of {sent} forged datagrams reached the client's input"
    );
    // None of them reached nexd's announcement handling, and exit1's
    // heartbeats kept being accepted.
    let client = w.node("client");
    let after: Vec<u64> = ["accepted", "bad_mac", "not_a_peer", "rate_limited"]
        .iter()
        .map(|o| announcements(client, o))
        .collect::<anyhow::Result<_>>()?;
    assert!(after[0] > before[0], "{before:?} -> {after:?}");
    assert_eq!(after[1..], before[1..], "forged datagrams reached nexd");
    let row = w.node("client").wait_exit_node("exit1", T)?;
    assert!(row.last_heard_seconds.is_some_and(|s| s < 3.0), "{row:?}");
    eprintln!("flood test: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Issue 21, finding 6: the exit node forwards its clients out of its
/// uplinks only, whatever the routing tables say, and its policy follows
/// every route change at once. A partner link only the exit host has
/// ("partner0", to a namespace with 198.51.100.10 and .130 on lo): an
/// `ip rule` sends the lower half of 198.51.100.0/24 to table 100, whose
/// only route is a default route via the partner (no routed subnet for
/// the policy to see: only the uplink check can stop it, counted as
/// `not_uplink`); the upper half is routed there through main only after
/// the exit node started (the policy has it within a second, counted as
/// `connected`). Neither is reachable from the client or its LAN host,
/// and the partner sees nothing.
#[test]
fn client_traffic_leaves_through_the_uplinks_only_whatever_the_tables_say() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    const LOW: &str = "198.51.100.10";
    const HIGH: &str = "198.51.100.130";
    let started = Instant::now();
    let mut w = World::new(&["exit1", "client"])?;
    let exit_v4 = w.underlay("exit1", false);
    let exit_ns = &w.node("exit1").ns;
    let partner = Netns::new("partner")?;
    veth(exit_ns, "partner0", &partner, "eth0")?;
    exit_ns.ip("addr add 10.77.0.1/24 dev partner0")?;
    partner.ip("addr add 10.77.0.2/24 dev eth0")?;
    partner.ip(&format!("addr add {LOW}/32 dev lo"))?;
    partner.ip(&format!("addr add {HIGH}/32 dev lo"))?;
    // The partner routes the mesh back (as a partner that accepted the
    // mesh's addresses would): a leak would be answered.
    partner.ip("route add 100.64.0.0/10 via 10.77.0.1")?;
    partner.ip("route add 10.99.0.0/24 via 10.77.0.1")?;
    exit_ns.ip("route add default via 10.77.0.2 table 100")?;
    exit_ns.ip("rule add to 198.51.100.0/25 lookup 100 priority 100")?;
    count_arrivals(&partner, &[LOW, HIGH])?;
    let partner_seen = || nft_counter(&partner, "inet", "probe", "seen");
    // Control: the exit host reaches the partner through table 100.
    tcp_transfer(exit_ns, &partner, ip(LOW), 1024, T).context("the partner through table 100")?;

    let lan = Netns::new("lanhost")?;
    lan_behind(&w.node("client").ns, &lan)?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client")
        .start(&spec(&["--exit-node-client", "--lan-interface", "lan0"]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    let client_ns = &w.node("client").ns;
    let exit_ns = &w.node("exit1").ns;
    // Control: the internet through the exit node.
    assert_eq!(tcp_source(&w, client_ns, false)?, exit_v4);
    assert_eq!(tcp_source(&w, &lan, false)?, exit_v4);

    let before = partner_seen()?;
    assert_unreachable(client_ns, &partner, ip(LOW), "table 100, from the client")?;
    assert_unreachable(&lan, &partner, ip(LOW), "table 100, from the LAN host")?;
    assert_eq!(
        partner_seen()?,
        before,
        "the partner saw the client's packets through table 100"
    );
    assert!(
        nft_counter(exit_ns, "inet", "nexd", "not_uplink")? > 0,
        "leaving through partner0 was not counted"
    );

    // A route added to main while the exit node runs: the control first
    // (the exit host reaches it), then the policy has it within a second.
    exit_ns.ip("route add 198.51.100.128/25 via 10.77.0.2")?;
    tcp_transfer(exit_ns, &partner, ip(HIGH), 1024, T).context("the partner through main")?;
    let before = partner_seen()?;
    std::thread::sleep(Duration::from_secs(1));
    let denied_before = denied(w.node("exit1"), "client")?;
    assert_unreachable(client_ns, &partner, ip(HIGH), "a route added at runtime")?;
    let denied_after = denied(w.node("exit1"), "client")?;
    assert!(
        reason(&denied_after, "connected") > reason(&denied_before, "connected"),
        "the route added at runtime is not in the policy a second later: {denied_before:?} -> {denied_after:?}"
    );
    assert_eq!(
        partner_seen()?,
        before,
        "the partner saw the client's packets"
    );
    // The internet still works.
    assert_eq!(tcp_source(&w, client_ns, false)?, exit_v4);
    eprintln!(
        "uplinks-only test: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Issue 21, finding 11: an exit node that dies (SIGKILL) leaves its
/// nftables table and IP forwarding behind, and on kernel WireGuard the
/// link and its peers too; its programs go with it where they are TCX
/// links. What is left must forward nothing the programs did not pass:
/// the table drops whatever arrives from the tunnel without the mark the
/// exit programs set (counted as `unchecked`).
///
/// On kernel WireGuard (the VM suite) the client is killed first, so its
/// link and routes keep sending through the tunnel, then the exit node:
/// on a TCX kernel nothing of the client's reaches the internet or the
/// exit host's private neighbour; on a clsact kernel the programs outlive
/// nexd and keep enforcing (the neighbour stays unreachable). With the
/// userspace backend the tunnel dies with the process, so a stand-in
/// takes its place: a veth named like the tunnel, carrying the client's
/// mesh address, into the dead exit node's namespace.
#[test]
fn an_exit_node_that_dies_forwards_nothing_its_programs_did_not_pass() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let started = Instant::now();
    let kernel = nexd_testkit::kernel_wireguard();
    let mut w = World::new(&["exit1", "client"])?;
    let exit_v4 = w.underlay("exit1", false);
    let exit_ns = &w.node("exit1").ns;
    let vpc = Netns::new("vpc")?;
    veth(exit_ns, "vpc0", &vpc, "eth0")?;
    exit_ns.ip("addr add 10.1.0.1/24 dev vpc0")?;
    vpc.ip(&format!("addr add {VPC_HOST}/24 dev eth0"))?;
    vpc.ip("route add 100.64.0.0/10 via 10.1.0.1")?;
    count_arrivals(&vpc, &[VPC_HOST])?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&["--exit-node-client"]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    // Control: the internet through the exit node.
    assert_eq!(tcp_source(&w, &w.node("client").ns, false)?, exit_v4);

    if kernel {
        w.node_mut("client").kill()?;
    }
    w.node_mut("exit1").kill()?;
    let exit_ns = &w.node("exit1").ns;
    // What a crash leaves: the table and forwarding.
    let table = exit_ns.exec(&["nft", "list", "table", "inet", "nexd"])?;
    assert!(table.contains("chain forward"), "{table}");
    assert_eq!(
        exit_ns
            .exec(&["sysctl", "-n", "net.ipv4.ip_forward"])?
            .trim(),
        "1"
    );
    let standin;
    let from: &Netns = if kernel {
        &w.node("client").ns
    } else {
        standin = Netns::new("standin")?;
        veth(exit_ns, "wg0", &standin, "c0")?;
        exit_ns.ip("addr add 100.64.0.1/10 dev wg0")?;
        standin.ip(&format!(
            "addr add {}/10 dev c0",
            w.mesh_ip("client", false)
        ))?;
        standin.ip("route add default via 100.64.0.1")?;
        &standin
    };
    let programs_gone = !kernel || nexd_testkit::tcx_kernel();
    let unchecked = nft_counter(exit_ns, "inet", "nexd", "unchecked").unwrap_or(0);
    let vpc_before = nft_counter(&vpc, "inet", "probe", "seen")?;
    let internet = udp_exchange(from, &w.inet.ns, World::server(false), BLOCKED);
    assert_unreachable(
        from,
        &vpc,
        ip(VPC_HOST),
        "the exit host's neighbour after the crash",
    )?;
    assert_eq!(
        nft_counter(&vpc, "inet", "probe", "seen")?,
        vpc_before,
        "the neighbour saw packets through the dead exit node"
    );
    if programs_gone {
        assert!(
            internet.is_err(),
            "the dead exit node forwarded to the internet: {internet:?}"
        );
        let now = nft_counter(exit_ns, "inet", "nexd", "unchecked")?;
        assert!(now > unchecked, "unchecked {unchecked} -> {now}");
        // Control: without the table's forward rules the same packets are
        // forwarded (and masqueraded): the table is what stops them.
        exit_ns.exec(&["nft", "flush", "chain", "inet", "nexd", "forward"])?;
        udp_exchange(from, &w.inet.ns, World::server(false), T)
            .context("control: forwarded once the forward chain is flushed")?;
    } else {
        eprintln!("clsact: the programs outlived nexd; the internet: {internet:?}");
    }
    eprintln!("crash test: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
