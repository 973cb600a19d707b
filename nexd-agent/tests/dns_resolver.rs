//! The exit node's DNS resolver (`nexd::dns`) for real, in network
//! namespaces, against a real upstream: an authoritative hickory-server
//! for `nexd.test.` in an "internet" namespace, named in the exit node's
//! resolv.conf. No WireGuard: a veth named `wg0` stands for the tunnel,
//! and the resolver's sockets are bound to it as the daemon binds them.
//!
//! ```text
//!  client (100.64.0.2 served,   c0 ──── wg0  exit (100.64.0.1)   up0 ──── eth0  inet (192.0.2.254)
//!          100.64.0.3 not)                     (192.0.2.1)                      upstream DNS 203.0.113.53
//! ```
//!
//! Proven: a served client gets answers (UDP and TCP, IPv4 and IPv6,
//! NXDOMAIN passed on), an address the exit node does not serve gets
//! REFUSED until the allowed set includes it, a host on the exit node's
//! network gets nothing, the upstream sees only the exit node's address,
//! a stopped resolver frees its port; and the bounds hold.

#[path = "support/dns_lab.rs"]
mod dns_lab;

use std::{
    io::Read as _,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    str::FromStr as _,
    time::Duration,
};

use anyhow::Context as _;
use dns_lab::*;
use hickory_server::proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RecordType},
};
use nexd::dns::{self, DnsConfig, Limits};

#[test]
fn exit_node_resolver_answers_its_clients_only_and_asks_from_the_exit_node() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let Lab { client, exit, inet } = Lab::new(
        "dns",
        &["100.64.0.2/10", "100.64.0.3/10", "fd6e:6578:6400::2/48"],
    )?;
    // A host on the exit node's network that knows where the mesh is.
    inet.ip("route add 100.64.0.0/10 via 192.0.2.1")?;

    let upstream = upstream(&inet)?;
    let resolv_conf = TempFile::new(
        "resolv.conf",
        &format!("nameserver {UPSTREAM}\noptions timeout:1\n"),
    )?;
    let config = DnsConfig {
        bind: vec![ip("100.64.0.1"), ip("fd6e:6578:6400::1")],
        port: dns::PORT,
        interface: Some("wg0".into()),
        resolv_conf: resolv_conf.0.clone(),
        limits: Limits::default(),
    };
    let served = vec![ip("100.64.0.2"), ip("fd6e:6578:6400::2")];
    let resolver = Resolver::start(&exit, config, served)?;

    // A served client: answers over UDP and TCP, IPv4 and IPv6.
    let www = "www.nexd.test.";
    let a = udp_query(&client, "100.64.0.2", "100.64.0.1", www, RecordType::A)?;
    assert_eq!(answered(a, "A over UDP")?, [IpAddr::V4(WWW_V4)]);
    let aaaa = udp_query(
        &client,
        "fd6e:6578:6400::2",
        "fd6e:6578:6400::1",
        www,
        RecordType::AAAA,
    )?;
    assert_eq!(answered(aaaa, "AAAA over UDP/IPv6")?, [IpAddr::V6(WWW_V6)]);
    let tcp = tcp_query(&client, "100.64.0.1", www, RecordType::A)?;
    assert_eq!(answered(tcp, "A over TCP")?, [IpAddr::V4(WWW_V4)]);
    let nx = udp_query(
        &client,
        "100.64.0.2",
        "100.64.0.1",
        "nx.nexd.test.",
        RecordType::A,
    )?
    .context("NXDOMAIN query: no response")?;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);

    // An address the exit node does not serve: REFUSED, until it does.
    let refused = udp_query(&client, "100.64.0.3", "100.64.0.1", www, RecordType::A)?
        .context("unserved source: no response")?;
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    assert!(refused.answers.is_empty());
    resolver.allow(&["100.64.0.2", "100.64.0.3", "fd6e:6578:6400::2"])?;
    let now_served = udp_query(&client, "100.64.0.3", "100.64.0.1", www, RecordType::A)?;
    assert_eq!(
        answered(now_served, "after update_allowed")?,
        [IpAddr::V4(WWW_V4)]
    );
    resolver.allow(&["100.64.0.3"])?;
    let dropped = udp_query(&client, "100.64.0.2", "100.64.0.1", www, RecordType::A)?
        .context("removed source: no response")?;
    assert_eq!(dropped.metadata.response_code, ResponseCode::Refused);
    // Over TCP, an unserved source's connection is closed unread.
    let unserved = tcp_query(&client, "100.64.0.1", www, RecordType::A)?;
    assert!(
        unserved.is_none(),
        "TCP from an unserved source must get no answer: {unserved:?}"
    );
    resolver.allow(&["100.64.0.2", "fd6e:6578:6400::2"])?;

    // A host on the exit node's network, sending to the mesh address
    // through the uplink: the sockets are bound to the tunnel interface,
    // so nothing answers.
    let neighbour = udp_query(&inet, "192.0.2.254", "100.64.0.1", www, RecordType::A)?;
    assert!(
        neighbour.is_none(),
        "answered a host outside the tunnel: {neighbour:?}"
    );

    // The upstream saw the exit node's uplink address, and only that.
    let seen = upstream.seen();
    assert!(!seen.is_empty(), "the upstream was never asked");
    assert!(
        seen.iter().all(|s| s.ip() == ip("192.0.2.1")),
        "upstream saw {seen:?}"
    );

    let c = resolver.counters()?;
    assert!(c.answered >= 5, "{c:?}");
    assert!(c.refused >= 2, "{c:?}");
    assert!(c.refused_connections >= 1, "{c:?}");
    assert_eq!(c.timed_out, 0, "{c:?}");

    // Stopping frees the port: starting again on it works, and answers.
    resolver.restart()?;
    let again = udp_query(&client, "100.64.0.2", "100.64.0.1", www, RecordType::A)?;
    assert_eq!(answered(again, "after restart")?, [IpAddr::V4(WWW_V4)]);
    Ok(())
}

/// The bounds, against an upstream that never answers: queries in flight
/// capped (the rest dropped and counted), each answered SERVFAIL at its
/// deadline; TCP connections capped; idle connections closed; oversized
/// datagrams and responses dropped unanswered.
#[test]
fn exit_node_resolver_bounds_what_clients_can_make_it_hold() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let Lab { client, exit, inet } = Lab::new("dnsb", &["100.64.0.2/10"])?;
    // The black hole: sockets that exist (no ICMP refusal) and never read.
    let addr = SocketAddr::new(ip(UPSTREAM), 53);
    let _hole_udp = inet.run_in(move || UdpSocket::bind(addr).context("hole udp"))?;
    let _hole_tcp = inet.run_in(move || std::net::TcpListener::bind(addr).context("hole tcp"))?;

    let resolv_conf = TempFile::new(
        "hole.conf",
        &format!("nameserver {UPSTREAM}\noptions timeout:2\n"),
    )?;
    let limits = Limits {
        max_in_flight: 4,
        max_tcp_connections: 2,
        query_timeout: Duration::from_millis(500),
        tcp_idle_timeout: Duration::from_millis(800),
        max_query_len: 512,
        cache_entries: 16,
    };
    let config = DnsConfig {
        bind: vec![ip("100.64.0.1")],
        port: dns::PORT,
        interface: Some("wg0".into()),
        resolv_conf: resolv_conf.0.clone(),
        limits,
    };
    let resolver = Resolver::start(&exit, config, vec![ip("100.64.0.2")])?;

    // Ten queries at once: four are worked on and get SERVFAIL at the
    // deadline, six are dropped.
    let replies = client.run_in(|| -> anyhow::Result<Vec<ResponseCode>> {
        let s = UdpSocket::bind("100.64.0.2:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        for i in 0..10u16 {
            let mut m = Message::new(i, MessageType::Query, OpCode::Query);
            m.metadata.recursion_desired = true;
            m.add_query(Query::query(
                Name::from_str(&format!("q{i}.nexd.test."))?,
                RecordType::A,
            ));
            s.send_to(&m.to_vec()?, "100.64.0.1:53")?;
        }
        let mut codes = Vec::new();
        let mut buf = [0u8; 1500];
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            codes.push(Message::from_vec(&buf[..n])?.metadata.response_code);
        }
        Ok(codes)
    })?;
    assert_eq!(replies, vec![ResponseCode::ServFail; 4], "{replies:?}");
    let c = resolver.counters()?;
    assert_eq!((c.overloaded, c.timed_out), (6, 4), "{c:?}");

    // Oversized, and a response instead of a query: dropped unanswered.
    let unanswered = client.run_in(|| -> anyhow::Result<usize> {
        let s = UdpSocket::bind("100.64.0.2:0")?;
        s.set_read_timeout(Some(Duration::from_millis(700)))?;
        s.send_to(&[0u8; 600], "100.64.0.1:53")?;
        let mut response = Message::new(7, MessageType::Response, OpCode::Query);
        response.add_query(Query::query(
            Name::from_str("www.nexd.test.")?,
            RecordType::A,
        ));
        s.send_to(&response.to_vec()?, "100.64.0.1:53")?;
        let mut buf = [0u8; 1500];
        let mut got = 0;
        while s.recv_from(&mut buf).is_ok() {
            got += 1;
        }
        Ok(got)
    })?;
    assert_eq!(unanswered, 0);
    assert_eq!(resolver.counters()?.malformed, 2);

    // Two TCP connections are held (idle); a third is closed at once;
    // the idle ones are closed after the idle deadline.
    let tcp = client.run_in(|| -> anyhow::Result<(bool, bool)> {
        let server = SocketAddr::new(ip("100.64.0.1"), 53);
        let a = TcpStream::connect_timeout(&server, WAIT)?;
        let _b = TcpStream::connect_timeout(&server, WAIT)?;
        std::thread::sleep(Duration::from_millis(100));
        let mut third = TcpStream::connect_timeout(&server, WAIT)?;
        third.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 1];
        let third_closed = match third.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        let mut a = a;
        a.set_read_timeout(Some(Duration::from_secs(3)))?;
        let idle_closed = matches!(a.read(&mut buf), Ok(0));
        Ok((third_closed, idle_closed))
    })?;
    assert_eq!(tcp, (true, true), "(third closed at once, idle closed)");
    assert_eq!(resolver.counters()?.overloaded_connections, 1);
    Ok(())
}
