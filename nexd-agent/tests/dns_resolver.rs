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
//! and a stopped resolver frees its port.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    str::FromStr as _,
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use anyhow::{Context as _, bail};
use hickory_server::{
    Server,
    net::runtime::{Time, TokioRuntimeProvider},
    proto::{
        op::{Message, MessageType, OpCode, Query, ResponseCode},
        rr::{
            LowerName, Name, RData, Record, RecordType,
            rdata::{A, AAAA},
        },
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    store::in_memory::InMemoryZoneHandler,
    zone_handler::{AxfrPolicy, Catalog, ZoneType},
};
use nexd::dns::{self, DnsConfig, DnsCounters, Limits};
use nexd_testkit::{Netns, netns::veth};

const UPSTREAM: &str = "203.0.113.53";
const WWW_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const WWW_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
/// How long a query waits for its answer.
const WAIT: Duration = Duration::from_secs(3);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

// ---- the upstream: an authoritative server that notes who asked -------------

struct Recording {
    catalog: Catalog,
    seen: Arc<Mutex<Vec<SocketAddr>>>,
}

#[async_trait::async_trait]
impl RequestHandler for Recording {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(request.src());
        self.catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

fn zone() -> anyhow::Result<Catalog> {
    let origin = Name::from_str("nexd.test.")?;
    let www = Name::from_str("www.nexd.test.")?;
    let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
        origin.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
    );
    zone.upsert_mut(Record::from_rdata(www.clone(), 300, RData::A(A(WWW_V4))), 1);
    zone.upsert_mut(Record::from_rdata(www, 300, RData::AAAA(AAAA(WWW_V6))), 1);
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::from(origin), vec![Arc::new(zone)]);
    Ok(catalog)
}

/// Starts the upstream on `UPSTREAM:53` in `inet`; returns who asked.
fn upstream(inet: &Netns) -> anyhow::Result<Arc<Mutex<Vec<SocketAddr>>>> {
    let addr = SocketAddr::new(ip(UPSTREAM), 53);
    let udp = inet.run_in(move || UdpSocket::bind(addr).context("upstream udp"))?;
    let tcp = inet.run_in(move || std::net::TcpListener::bind(addr).context("upstream tcp"))?;
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Recording {
        catalog: zone()?,
        seen: Arc::clone(&seen),
    };
    // The runtime ends with the test process; the namespace (and with it
    // the sockets' network) is removed when the test ends.
    std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut server = Server::new(handler);
            server.register_socket(tokio::net::UdpSocket::from_std(udp)?);
            server.register_listener(
                tokio::net::TcpListener::from_std(tcp)?,
                Duration::from_secs(5),
                4096,
            );
            server.block_until_done().await?;
            Ok(())
        })
    });
    Ok(seen)
}

// ---- the resolver under test, on its own runtime inside the exit node ------

enum Command {
    Allow(Vec<IpAddr>),
    Counters(mpsc::Sender<DnsCounters>),
    /// Stop, then start again on the same port.
    Restart(mpsc::Sender<Result<(), String>>),
}

struct Resolver {
    commands: tokio::sync::mpsc::Sender<Command>,
}

impl Resolver {
    /// Starts `nexd::dns` in `exit` (its sockets, and hickory's upstream
    /// sockets, belong to the exit namespace: the runtime is a current-
    /// thread one on a thread inside it).
    fn start(exit: &Netns, config: DnsConfig, allowed: Vec<IpAddr>) -> anyhow::Result<Self> {
        let (commands, mut rx) = tokio::sync::mpsc::channel(8);
        let (ready_tx, ready) = mpsc::channel();
        let _thread = exit.spawn_in(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut handle = match dns::start(config.clone(), allowed.clone()) {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return Ok(());
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Some(cmd) = rx.recv().await {
                    match cmd {
                        Command::Allow(a) => handle.update_allowed(a),
                        Command::Counters(reply) => {
                            let _ = reply.send(handle.counters());
                        }
                        Command::Restart(reply) => {
                            handle.shutdown().await;
                            match dns::start(config.clone(), allowed.clone()) {
                                Ok(h) => {
                                    handle = h;
                                    let _ = reply.send(Ok(()));
                                }
                                Err(e) => {
                                    let _ = reply.send(Err(e.to_string()));
                                    return Ok(());
                                }
                            }
                        }
                    }
                }
                handle.shutdown().await;
                Ok(())
            })
        })?;
        match ready.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Resolver { commands }),
            Ok(Err(e)) => bail!("resolver did not start: {e}"),
            Err(e) => bail!("resolver did not start: {e}"),
        }
    }

    fn send(&self, cmd: Command) -> anyhow::Result<()> {
        self.commands
            .blocking_send(cmd)
            .map_err(|_| anyhow::anyhow!("resolver thread gone"))
    }

    fn allow(&self, addrs: &[&str]) -> anyhow::Result<()> {
        self.send(Command::Allow(addrs.iter().map(|a| ip(a)).collect()))
    }

    fn counters(&self) -> anyhow::Result<DnsCounters> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Counters(tx))?;
        Ok(rx.recv_timeout(WAIT)?)
    }

    fn restart(&self) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Restart(tx))?;
        rx.recv_timeout(Duration::from_secs(10))?
            .map_err(|e| anyhow::anyhow!("restart: {e}"))
    }
}

// ---- clients ------------------------------------------------------------------

fn query(name: &str, rtype: RecordType) -> anyhow::Result<Vec<u8>> {
    let mut m = Message::new(0x4e58, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name)?, rtype));
    Ok(m.to_vec()?)
}

/// One UDP query from `src` (an address of `ns`) to `server:53`; `None`
/// if nothing came back within `WAIT` (two tries).
fn udp_query(
    ns: &Netns,
    src: &str,
    server: &str,
    name: &str,
    rtype: RecordType,
) -> anyhow::Result<Option<Message>> {
    let (src, server, q) = (ip(src), ip(server), query(name, rtype)?);
    ns.run_in(move || -> anyhow::Result<Option<Message>> {
        let s = UdpSocket::bind(SocketAddr::new(src, 0))?;
        s.set_read_timeout(Some(WAIT / 2))?;
        let mut buf = [0u8; 4096];
        for _ in 0..2 {
            s.send_to(&q, SocketAddr::new(server, 53))?;
            match s.recv_from(&mut buf) {
                Ok((n, _)) => return Ok(Some(Message::from_vec(&buf[..n])?)),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    })
}

/// One query over TCP from `ns` to `server:53`.
fn tcp_query(ns: &Netns, server: &str, name: &str, rtype: RecordType) -> anyhow::Result<Message> {
    let (server, q) = (ip(server), query(name, rtype)?);
    ns.run_in(move || -> anyhow::Result<Message> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(server, 53), WAIT)?;
        s.set_read_timeout(Some(WAIT))?;
        s.set_write_timeout(Some(WAIT))?;
        let len = u16::try_from(q.len())?;
        s.write_all(&len.to_be_bytes())?;
        s.write_all(&q)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut body)?;
        Ok(Message::from_vec(&body)?)
    })
}

fn answer_ips(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(v4)) => Some(IpAddr::V4(*v4)),
            RData::AAAA(AAAA(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        })
        .collect()
}

fn answered(m: Option<Message>, what: &str) -> anyhow::Result<Vec<IpAddr>> {
    let m = m.with_context(|| format!("{what}: no response"))?;
    if m.metadata.response_code != ResponseCode::NoError {
        bail!("{what}: {}", m.metadata.response_code);
    }
    Ok(answer_ips(&m))
}

// ---- the test -------------------------------------------------------------------

/// A file removed when the test ends, however it ends.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str, content: &str) -> anyhow::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("nexd-dns-test-{}-{name}", std::process::id()));
        std::fs::write(&path, content)?;
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn exit_node_resolver_answers_its_clients_only_and_asks_from_the_exit_node() -> anyhow::Result<()> {
    if !nexd_testkit::can_run_network_tests() {
        eprintln!("skipped: needs root to create network namespaces");
        return Ok(());
    }
    let client = Netns::new("dnsclient")?;
    let exit = Netns::new("dnsexit")?;
    let inet = Netns::new("dnsinet")?;
    veth(&client, "c0", &exit, "wg0")?;
    veth(&exit, "up0", &inet, "eth0")?;
    for a in ["100.64.0.2/10", "100.64.0.3/10", "fd6e:6578:6400::2/48"] {
        client.ip(&format!("addr add {a} dev c0"))?;
    }
    for a in ["100.64.0.1/10", "fd6e:6578:6400::1/48"] {
        exit.ip(&format!("addr add {a} dev wg0"))?;
    }
    exit.ip("addr add 192.0.2.1/24 dev up0")?;
    exit.ip("route add default via 192.0.2.254")?;
    inet.ip("addr add 192.0.2.254/24 dev eth0")?;
    inet.ip(&format!("addr add {UPSTREAM}/32 dev lo"))?;
    // A host on the exit node's network that knows where the mesh is.
    inet.ip("route add 100.64.0.0/10 via 192.0.2.1")?;

    let seen = upstream(&inet)?;
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
    assert_eq!(answered(Some(tcp), "A over TCP")?, [IpAddr::V4(WWW_V4)]);
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
    assert!(
        tcp_query(&client, "100.64.0.1", www, RecordType::A).is_err(),
        "TCP from an unserved source must get no answer"
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
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
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
    if !nexd_testkit::can_run_network_tests() {
        eprintln!("skipped: needs root to create network namespaces");
        return Ok(());
    }
    let client = Netns::new("dnsbclient")?;
    let exit = Netns::new("dnsbexit")?;
    let inet = Netns::new("dnsbinet")?;
    veth(&client, "c0", &exit, "wg0")?;
    veth(&exit, "up0", &inet, "eth0")?;
    client.ip("addr add 100.64.0.2/10 dev c0")?;
    exit.ip("addr add 100.64.0.1/10 dev wg0")?;
    exit.ip("addr add 192.0.2.1/24 dev up0")?;
    exit.ip("route add default via 192.0.2.254")?;
    inet.ip("addr add 192.0.2.254/24 dev eth0")?;
    inet.ip(&format!("addr add {UPSTREAM}/32 dev lo"))?;
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
