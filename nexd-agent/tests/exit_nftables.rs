//! The exit node's nftables table (`routing::forward::ExitRules`), loaded
//! by `nft` into a namespace that stands for the exit node, without nexd
//! and without WireGuard: a veth named `wg0` stands for the tunnel (the
//! rules only match on interface names), so each rule is proven alone.
//!
//! ```text
//!  client (100.64.0.2)  c0 ──── wg0  exit (100.64.0.1, 192.0.2.1)  up0 ──── eth0  inet (192.0.2.254)
//!                                                                                  server 203.0.113.10 on lo
//! ```
//!
//! `inet` also routes the mesh prefixes to the exit node: it is the host
//! on the exit node's network that tries to open connections into the
//! clients. Every refusal is first shown to succeed without the table, so
//! the test can fail.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::Context as _;
use nexd::routing::forward::{EXIT_PASSED_MARK, ExitRules, FlowClient, FlowLimits, Uplinks};
use nexd_testkit::{
    Netns,
    netns::veth,
    topology::{nft_counter, nft_script},
    traffic::tcp_transfer,
};

const T: Duration = Duration::from_secs(5);
/// How long a connection that must not happen is given.
const REFUSED_WITHIN: Duration = Duration::from_secs(2);

struct Lab {
    client: Netns,
    exit: Netns,
    inet: Netns,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn lab() -> anyhow::Result<Lab> {
    let client = Netns::new("client")?;
    let exit = Netns::new("exit")?;
    let inet = Netns::new("inet")?;
    veth(&client, "c0", &exit, "wg0")?;
    veth(&exit, "up0", &inet, "eth0")?;
    for a in ["100.64.0.2/10", "fd6e:6578:6400::2/48"] {
        client.ip(&format!("addr add {a} dev c0"))?;
    }
    client.ip("route add default via 100.64.0.1")?;
    client.ip("-6 route add default via fd6e:6578:6400::1")?;
    for a in ["100.64.0.1/10", "fd6e:6578:6400::1/48"] {
        exit.ip(&format!("addr add {a} dev wg0"))?;
    }
    for a in ["192.0.2.1/24", "2001:db8:1::1/64"] {
        exit.ip(&format!("addr add {a} dev up0"))?;
    }
    exit.ip("route add default via 192.0.2.254")?;
    exit.ip("-6 route add default via 2001:db8:1::fe")?;
    exit.sysctl("net.ipv4.ip_forward", "1")?;
    exit.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    for a in ["192.0.2.254/24", "2001:db8:1::fe/64"] {
        inet.ip(&format!("addr add {a} dev eth0"))?;
    }
    inet.ip("addr add 203.0.113.10/32 dev lo")?;
    inet.ip("addr add 2001:db8:203::10/128 dev lo")?;
    // The neighbour that would like to reach the clients.
    inet.ip("route add 100.64.0.0/10 via 192.0.2.1")?;
    inet.ip("-6 route add fd6e:6578:6400::/48 via 2001:db8:1::1")?;
    Ok(Lab { client, exit, inet })
}

fn rules() -> ExitRules {
    ExitRules {
        wg: "wg0".into(),
        uplinks: Uplinks {
            v4: Some("up0".into()),
            v6: Some("up0".into()),
        },
        mesh_v4: "100.64.0.0/10".parse().expect("v4"),
        mesh_v6: "fd6e:6578:6400::/48".parse().expect("v6"),
        own: Some((
            "100.64.0.1".parse().expect("ip"),
            "fd6e:6578:6400::1".parse().expect("ip"),
        )),
        allow: Vec::new(),
        clients: vec![FlowClient {
            name: "client".into(),
            addresses: vec![ip("100.64.0.2"), ip("fd6e:6578:6400::2")],
            limits: FlowLimits::DEFAULT,
        }],
        egress: None,
    }
}

/// Stands in for the exit programs on the tunnel's ingress: they mark
/// every packet they let through, and the table forwards nothing else.
fn programs_pass_everything(exit: &Netns) -> anyhow::Result<()> {
    nft_script(
        exit,
        &format!(
            "table inet programs {{\n chain pre {{ type filter hook prerouting priority -300; policy accept;\n\
             \x20 iifname \"wg0\" meta mark set meta mark | {EXIT_PASSED_MARK:#x}\n }}\n}}\n"
        ),
    )
}

fn counter(ns: &Netns, name: &str) -> anyhow::Result<u64> {
    nft_counter(ns, "inet", "nexd", name)
}

/// A TCP connection from `from` to `to_addr` in `to` (a listener there),
/// which must fail.
fn refused(from: &Netns, to: &Netns, to_addr: &str) -> anyhow::Result<()> {
    match tcp_transfer(from, to, ip(to_addr), 1024, REFUSED_WITHIN) {
        Ok(t) => anyhow::bail!(
            "{} reached {to_addr} in {} (seen from {}), but the exit node's table must refuse it",
            from.label(),
            to.label(),
            t.seen_from
        ),
        Err(_) => Ok(()),
    }
}

fn seen_from(from: &Netns, to: &Netns, to_addr: &str) -> anyhow::Result<IpAddr> {
    Ok(tcp_transfer(from, to, ip(to_addr), 16 * 1024, T)
        .with_context(|| format!("TCP from {} to {to_addr}", from.label()))?
        .seen_from
        .ip())
}

#[test]
fn exit_table_forwards_out_refuses_in_and_guards_the_host() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let l = lab()?;

    // Without the table, the kernel forwards both ways and delivers
    // anything to the exit host: what the rules below must stop.
    seen_from(&l.inet, &l.client, "100.64.0.2").context("control: inbound before the table")?;
    seen_from(&l.inet, &l.client, "fd6e:6578:6400::2")
        .context("control: inbound v6 before the table")?;
    seen_from(&l.client, &l.exit, "192.0.2.1").context("control: host address before the table")?;

    nft_script(&l.exit, &rules().script())?;

    // Without the exit programs' mark nothing from the tunnel is
    // forwarded (the table a killed nexd leaves behind), counted.
    refused(&l.client, &l.inet, "203.0.113.10")?;
    refused(&l.client, &l.inet, "2001:db8:203::10")?;
    assert!(counter(&l.exit, "unchecked")? > 0);
    assert_eq!(counter(&l.exit, "forwarded")?, 0);
    programs_pass_everything(&l.exit)?;

    // Out through the exit node: masqueraded to its uplink address.
    assert_eq!(
        seen_from(&l.client, &l.inet, "203.0.113.10")?,
        ip("192.0.2.1")
    );
    assert_eq!(
        seen_from(&l.client, &l.inet, "2001:db8:203::10")?,
        ip("2001:db8:1::1")
    );
    assert!(counter(&l.exit, "forwarded")? > 0);
    assert!(counter(&l.exit, "returned")? > 0, "replies are counted");
    assert!(counter(&l.exit, "masqueraded")? > 0);

    // Related ICMP comes back too: a UDP datagram to a closed port on the
    // server gets its "port unreachable" to the client.
    l.client.run_in(|| -> anyhow::Result<()> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect("203.0.113.10:9")?;
        s.set_read_timeout(Some(T))?;
        s.send(b"anyone?")?;
        let mut buf = [0u8; 16];
        match s.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            other => anyhow::bail!("expected ICMP port unreachable, got {other:?}"),
        }
    })?;

    // In from the exit node's network: refused, counted.
    let before = counter(&l.exit, "inbound_dropped")?;
    refused(&l.inet, &l.client, "100.64.0.2")?;
    refused(&l.inet, &l.client, "fd6e:6578:6400::2")?;
    assert!(counter(&l.exit, "inbound_dropped")? > before);

    // The exit host itself: its mesh address answers, its uplink address
    // (v4 and v6) does not.
    assert_eq!(
        seen_from(&l.client, &l.exit, "100.64.0.1")?,
        ip("100.64.0.2")
    );
    assert_eq!(
        seen_from(&l.client, &l.exit, "fd6e:6578:6400::1")?,
        ip("fd6e:6578:6400::2")
    );
    let before = counter(&l.exit, "local_dropped")?;
    refused(&l.client, &l.exit, "192.0.2.1")?;
    refused(&l.client, &l.exit, "2001:db8:1::1")?;
    assert!(counter(&l.exit, "local_dropped")? > before);

    // A mesh source from outside the tunnel: dropped before routing.
    l.inet.ip("addr add 100.64.0.99/32 dev lo")?;
    let before = counter(&l.exit, "spoofed")?;
    l.inet.run_in(|| -> anyhow::Result<()> {
        let s = UdpSocket::bind("100.64.0.99:0")?;
        for _ in 0..3 {
            s.send_to(b"spoofed", SocketAddr::new(ip("192.0.2.1"), 9))?;
        }
        Ok(())
    })?;
    nexd_testkit::wait_for(
        "the spoofed datagrams to be counted",
        T,
        Duration::from_millis(50),
        || (counter(&l.exit, "spoofed").ok()? >= before + 3).then_some(()),
    )?;
    Ok(())
}
