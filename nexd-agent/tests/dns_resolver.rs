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
    // One client: its own shares as large as everyone's, so the global
    // bounds are what this test meets.
    let limits = Limits {
        max_in_flight: 4,
        per_client_in_flight: 4,
        max_tcp_connections: 2,
        per_client_tcp_connections: 2,
        per_client_rate: 1000,
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

/// An upstream on `UPSTREAM:53` (UDP) in `inet` that answers every name
/// with `WWW_V4` (TTL 0, so nothing is cached in between) except names
/// starting with "never", which it never answers; until dropped.
struct SelectiveUpstream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SelectiveUpstream {
    fn start(inet: &nexd_testkit::Netns) -> anyhow::Result<Self> {
        use hickory_server::proto::rr::{RData, Record, rdata::A};
        let addr = SocketAddr::new(ip(UPSTREAM), 53);
        let sock = inet.run_in(move || UdpSocket::bind(addr).context("upstream bind"))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(query) = q.queries.first().cloned() else {
                    continue;
                };
                if query.name().to_ascii().starts_with("never") {
                    continue;
                }
                let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                r.metadata.recursion_desired = q.metadata.recursion_desired;
                r.metadata.recursion_available = true;
                r.add_query(query.clone());
                if query.query_type() == RecordType::A {
                    r.add_answer(Record::from_rdata(
                        query.name().clone(),
                        0,
                        RData::A(A(WWW_V4)),
                    ));
                }
                if let Ok(bytes) = r.to_vec() {
                    let _ = sock.send_to(&bytes, peer);
                }
            }
        });
        Ok(SelectiveUpstream {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for SelectiveUpstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Issue 21, finding 7: the resolver's bounds hold per client. One
/// served client (100.64.0.3) sends 300 queries a second for names that
/// never resolve, then holds 70 TCP connections; the other (100.64.0.2)
/// gets every one of its UDP queries answered meanwhile, and its TCP
/// query too. The first client's excess is counted.
#[test]
fn one_client_cannot_starve_another_of_answers() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let Lab { client, exit, inet } = Lab::new("dnsf", &["100.64.0.2/10", "100.64.0.3/10"])?;
    let _upstream = SelectiveUpstream::start(&inet)?;
    let resolv_conf = TempFile::new(
        "selective.conf",
        &format!("nameserver {UPSTREAM}\noptions timeout:2\n"),
    )?;
    let config = DnsConfig {
        bind: vec![ip("100.64.0.1")],
        port: dns::PORT,
        interface: Some("wg0".into()),
        resolv_conf: resolv_conf.0.clone(),
        limits: Limits::default(),
    };
    let resolver = Resolver::start(&exit, config, vec![ip("100.64.0.2"), ip("100.64.0.3")])?;
    // Control: both are answered.
    for src in ["100.64.0.2", "100.64.0.3"] {
        let a = udp_query(&client, src, "100.64.0.1", "ok.nexd.test.", RecordType::A)?;
        assert_eq!(answered(a, src)?, [IpAddr::V4(WWW_V4)]);
    }

    // The flood: 300 queries a second for 4 s, each for a new name.
    let flood = client.spawn_in(|| -> anyhow::Result<usize> {
        let s = UdpSocket::bind("100.64.0.3:0")?;
        let start = std::time::Instant::now();
        let mut sent = 0usize;
        while start.elapsed() < Duration::from_secs(4) {
            let due = (start.elapsed().as_secs_f64() * 300.0) as usize;
            while sent < due {
                let mut m = Message::new(sent as u16, MessageType::Query, OpCode::Query);
                m.metadata.recursion_desired = true;
                m.add_query(Query::query(
                    Name::from_str(&format!("never{sent}.nexd.test."))?,
                    RecordType::A,
                ));
                s.send_to(&m.to_vec()?, "100.64.0.1:53")?;
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(sent)
    })?;
    std::thread::sleep(Duration::from_millis(1500));
    let mut lost = Vec::new();
    for i in 0..10 {
        let name = format!("ok{i}.nexd.test.");
        let a = udp_query(&client, "100.64.0.2", "100.64.0.1", &name, RecordType::A)?;
        if answered(a, &name).is_err() {
            lost.push(i);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = flood
        .join()
        .map_err(|_| anyhow::anyhow!("the flood panicked"))??;
    let c = resolver.counters()?;
    eprintln!("flood: {sent} queries; counters {c:?}");
    assert!(
        lost.is_empty(),
        "the other client lost queries {lost:?} of 10 during the flood"
    );
    assert!(c.overloaded + c.rate_limited > 0, "{c:?}");

    // 70 TCP connections held by one client; the other's TCP query.
    let held = client.run_in(|| -> anyhow::Result<Vec<TcpStream>> {
        let server = SocketAddr::new(ip("100.64.0.1"), 53);
        let mut held = Vec::new();
        for _ in 0..70 {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(&SocketAddr::new(ip("100.64.0.3"), 0).into())?;
            s.connect_timeout(&server.into(), WAIT)?;
            held.push(TcpStream::from(s));
        }
        Ok(held)
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let tcp = tcp_query(&client, "100.64.0.1", "tcp.nexd.test.", RecordType::A)?;
    assert_eq!(
        answered(
            tcp,
            "the other client's TCP query while 70 connections are held"
        )?,
        [IpAddr::V4(WWW_V4)]
    );
    assert!(resolver.counters()?.overloaded_connections > 0);
    drop(held);
    Ok(())
}
