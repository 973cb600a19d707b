//! The announcement sockets (`nexd::announce::Announcer`) in network
//! namespaces: what reaches the queue to the daemon loop. No WireGuard: a
//! veth named `wg0` stands for the tunnel.
//!
//! ```text
//!  peers (100.64.0.2, .3 mesh peers; .4 not)  c0 ──── wg0  node (100.64.0.1)  up0 ──── eth0  outside (192.0.2.254)
//! ```
//!
//! Proven: a peer's datagram is queued; from outside the tunnel nothing
//! is, not even with a peer's mesh address as source (shown first to get
//! through to a socket bound the old way); a mesh address that is no
//! peer's is dropped and counted; a flood from one peer is capped and
//! counted while another peer's heartbeat still gets through.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use nexd::announce::{Announcer, SocketCounters, gate};
use nexd_testkit::{Netns, netns::veth};

const PORT: u16 = 51829;
const LEGACY_PORT: u16 = 51830;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

enum Command {
    /// Everything queued within the duration, by source, on (gated,
    /// legacy) announcers.
    Collect(
        Duration,
        mpsc::Sender<(HashMap<IpAddr, usize>, HashMap<IpAddr, usize>)>,
    ),
    Counters(mpsc::Sender<SocketCounters>),
}

/// Both announcers, on a runtime thread inside `node`.
fn start(node: &Netns) -> anyhow::Result<tokio::sync::mpsc::Sender<Command>> {
    let (commands, mut rx) = tokio::sync::mpsc::channel::<Command>(4);
    let (ready_tx, ready) = mpsc::channel();
    let _thread = node.spawn_in(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let peers = [ip("100.64.0.2"), ip("100.64.0.3"), ip("fd6e:6578:6400::2")];
            let (v4, v6) = (ip("100.64.0.1"), ip("fd6e:6578:6400::1"));
            let (tx, mut queue) = tokio::sync::mpsc::channel(nexd::announce::QUEUE);
            let (legacy_tx, mut legacy_queue) = tokio::sync::mpsc::channel(nexd::announce::QUEUE);
            let started = Announcer::start("wg0", v4, v6, PORT, peers, tx).and_then(|gated| {
                Ok((gated, Announcer::ungated(v4, v6, LEGACY_PORT, legacy_tx)?))
            });
            let (gated, _legacy) = match started {
                Ok(a) => a,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Ok(());
                }
            };
            let _ = ready_tx.send(Ok(()));
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    Command::Collect(d, reply) => {
                        let mut got = (HashMap::new(), HashMap::new());
                        let deadline = tokio::time::Instant::now() + d;
                        loop {
                            tokio::select! {
                                Some(inc) = queue.recv() => *got.0.entry(inc.from.ip()).or_default() += 1,
                                Some(inc) = legacy_queue.recv() => *got.1.entry(inc.from.ip()).or_default() += 1,
                                () = tokio::time::sleep_until(deadline) => break,
                            }
                        }
                        let _ = reply.send(got);
                    }
                    Command::Counters(reply) => {
                        let _ = reply.send(gated.counters());
                    }
                }
            }
            Ok(())
        })
    })?;
    match ready.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(commands),
        Ok(Err(e)) => bail!("announcers did not start: {e}"),
        Err(e) => bail!("announcers did not start: {e}"),
    }
}

/// Sends `count` datagrams from `src` (an address of `ns`) to `to`, 100
/// at a time with a 2 ms pause (50,000 a second): a flood the receive
/// task keeps up with, so the kernel's socket buffer drops none and every
/// datagram meets the gate.
fn send(ns: &Netns, src: &str, to: &str, port: u16, count: usize) -> anyhow::Result<()> {
    let (src, to) = (ip(src), ip(to));
    ns.run_in(move || -> anyhow::Result<()> {
        let s = UdpSocket::bind(SocketAddr::new(src, 0)).context("bind")?;
        for i in 0..count {
            s.send_to(&[0u8; 96], SocketAddr::new(to, port))?;
            if i % 100 == 99 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    })
}

#[test]
fn only_peers_through_the_tunnel_reach_the_queue_and_no_one_floods_it() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let peers = Netns::new("annpeers")?;
    let node = Netns::new("annnode")?;
    let outside = Netns::new("annout")?;
    veth(&peers, "c0", &node, "wg0")?;
    veth(&node, "up0", &outside, "eth0")?;
    for a in [
        "100.64.0.2/10",
        "100.64.0.3/10",
        "100.64.0.4/10",
        "fd6e:6578:6400::2/48",
    ] {
        peers.ip(&format!("addr add {a} dev c0"))?;
    }
    for a in ["100.64.0.1/10", "fd6e:6578:6400::1/48"] {
        node.ip(&format!("addr add {a} dev wg0"))?;
    }
    node.ip("addr add 192.0.2.1/24 dev up0")?;
    outside.ip("addr add 192.0.2.254/24 dev eth0")?;
    outside.ip("route add 100.64.0.0/10 via 192.0.2.1")?;
    // The outsider also forges a peer's mesh source (no rp_filter on the
    // node stops it: the node has no route back to it but the tunnel).
    outside.ip("addr add 100.64.0.2/32 dev lo")?;
    node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    node.sysctl("net.ipv4.conf.up0.rp_filter", "0")?;

    let cmd = start(&node)?;
    let collect =
        |d: Duration| -> anyhow::Result<(HashMap<IpAddr, usize>, HashMap<IpAddr, usize>)> {
            let (tx, rx) = mpsc::channel();
            cmd.blocking_send(Command::Collect(d, tx))
                .map_err(|_| anyhow::anyhow!("announcer thread gone"))?;
            Ok(rx.recv_timeout(d + Duration::from_secs(5))?)
        };
    let counters = || -> anyhow::Result<SocketCounters> {
        let (tx, rx) = mpsc::channel();
        cmd.blocking_send(Command::Counters(tx))
            .map_err(|_| anyhow::anyhow!("announcer thread gone"))?;
        Ok(rx.recv_timeout(Duration::from_secs(5))?)
    };
    let settle = Duration::from_millis(300);

    // A peer, through the tunnel, v4 and v6: queued.
    send(&peers, "100.64.0.2", "100.64.0.1", PORT, 1)?;
    send(&peers, "fd6e:6578:6400::2", "fd6e:6578:6400::1", PORT, 1)?;
    let (got, _) = collect(settle)?;
    assert_eq!(got.get(&ip("100.64.0.2")), Some(&1), "{got:?}");
    assert_eq!(got.get(&ip("fd6e:6578:6400::2")), Some(&1), "{got:?}");

    // From outside the tunnel, with its own address and with a peer's:
    // the socket bound the old way gets both (the control), the gated one
    // neither, and nothing is even counted (never delivered to it).
    for port in [PORT, LEGACY_PORT] {
        send(&outside, "192.0.2.254", "100.64.0.1", port, 1)?;
        send(&outside, "100.64.0.2", "100.64.0.1", port, 1)?;
    }
    let (got, legacy) = collect(settle)?;
    assert!(got.is_empty(), "outside reached the queue: {got:?}");
    assert_eq!(
        legacy.get(&ip("192.0.2.254")),
        Some(&1),
        "control: {legacy:?}"
    );
    assert_eq!(
        legacy.get(&ip("100.64.0.2")),
        Some(&1),
        "control: {legacy:?}"
    );
    assert_eq!(counters()?, SocketCounters::default());

    // A mesh address that is no peer's: dropped and counted.
    send(&peers, "100.64.0.4", "100.64.0.1", PORT, 5)?;
    let (got, _) = collect(settle)?;
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(counters()?.not_a_peer, 5);

    // The control: one peer floods a socket without the gate (3,000
    // datagrams, while the daemon loop is busy elsewhere), and the other's
    // heartbeat right after it finds the queue full: the issue this fixes.
    send(&peers, "100.64.0.2", "100.64.0.1", LEGACY_PORT, 3000)?;
    send(&peers, "100.64.0.3", "100.64.0.1", LEGACY_PORT, 1)?;
    let (_, legacy) = collect(Duration::from_millis(500))?;
    assert_eq!(legacy.get(&ip("100.64.0.3")), None, "control: {legacy:?}");
    assert_eq!(
        legacy.get(&ip("100.64.0.2")),
        Some(&1024),
        "control: {legacy:?}"
    );

    // The same flood on the gated socket: the other peer's heartbeat gets
    // through, and the flood is capped at the burst (plus what the rate
    // refills while it lasts).
    send(&peers, "100.64.0.2", "100.64.0.1", PORT, 3000)?;
    send(&peers, "100.64.0.3", "100.64.0.1", PORT, 1)?;
    let (got, _) = collect(Duration::from_millis(500))?;
    assert_eq!(
        got.get(&ip("100.64.0.3")),
        Some(&1),
        "heartbeat crowded out: {got:?}"
    );
    let flood_queued = got.get(&ip("100.64.0.2")).copied().unwrap_or(0);
    let c = counters()?;
    assert!(
        flood_queued >= gate::BURST as usize && flood_queued <= gate::BURST as usize + 20,
        "{flood_queued} of the flood queued ({c:?})"
    );
    assert!(c.rate_limited >= 2000, "{c:?}");
    assert_eq!(c.queue_full, 0, "{c:?}");
    Ok(())
}
