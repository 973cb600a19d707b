//! The exit node's DNS resolver in namespaces, shared by its test
//! (`tests/dns_resolver.rs`) and its benchmark (`benches/dns_resolver.rs`):
//! an authoritative upstream for `nexd.test.` that notes who asked, the
//! resolver under test on a runtime inside the exit namespace, and
//! clients.
#![allow(dead_code, reason = "the test and the benchmark each use part of it")]

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
use nexd::dns::{self, DnsConfig, DnsCounters};
use nexd_testkit::{Netns, netns::veth};

/// The three namespaces: a client on the exit node's `wg0` (a veth), the
/// exit node, and the internet behind its uplink (192.0.2.0/24) with the
/// upstream's address on lo. `client_addrs` go on the client's `c0`.
pub struct Lab {
    pub client: Netns,
    pub exit: Netns,
    pub inet: Netns,
}

impl Lab {
    pub fn new(tag: &str, client_addrs: &[&str]) -> anyhow::Result<Self> {
        let client = Netns::new(&format!("{tag}client"))?;
        let exit = Netns::new(&format!("{tag}exit"))?;
        let inet = Netns::new(&format!("{tag}inet"))?;
        veth(&client, "c0", &exit, "wg0")?;
        veth(&exit, "up0", &inet, "eth0")?;
        for a in client_addrs {
            client.ip(&format!("addr add {a} dev c0"))?;
        }
        for a in ["100.64.0.1/10", "fd6e:6578:6400::1/48"] {
            exit.ip(&format!("addr add {a} dev wg0"))?;
        }
        exit.ip("addr add 192.0.2.1/24 dev up0")?;
        exit.ip("route add default via 192.0.2.254")?;
        inet.ip("addr add 192.0.2.254/24 dev eth0")?;
        inet.ip(&format!("addr add {UPSTREAM}/32 dev lo"))?;
        Ok(Lab { client, exit, inet })
    }
}

pub const UPSTREAM: &str = "203.0.113.53";
pub const WWW_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const WWW_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
/// How long a query waits for its answer.
pub const WAIT: Duration = Duration::from_secs(3);

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

// ---- the upstream: an authoritative server that notes who asked -------------

pub struct Recording {
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

pub fn zone() -> anyhow::Result<Catalog> {
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
pub fn upstream(inet: &Netns) -> anyhow::Result<Arc<Mutex<Vec<SocketAddr>>>> {
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

pub enum Command {
    /// Replace the allowed sources; the reply says it is done, so the
    /// next query meets the new set (not a race with the resolver task).
    Allow(Vec<IpAddr>, mpsc::Sender<()>),
    Counters(mpsc::Sender<DnsCounters>),
    /// Stop, then start again on the same port.
    Restart(mpsc::Sender<Result<(), String>>),
}

pub struct Resolver {
    commands: tokio::sync::mpsc::Sender<Command>,
}

impl Resolver {
    /// Starts `nexd::dns` in `exit` (its sockets, and hickory's upstream
    /// sockets, belong to the exit namespace: the runtime is a current-
    /// thread one on a thread inside it).
    pub fn start(exit: &Netns, config: DnsConfig, allowed: Vec<IpAddr>) -> anyhow::Result<Self> {
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
                        Command::Allow(a, done) => {
                            handle.update_allowed(a);
                            let _ = done.send(());
                        }
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

    pub fn send(&self, cmd: Command) -> anyhow::Result<()> {
        self.commands
            .blocking_send(cmd)
            .map_err(|_| anyhow::anyhow!("resolver thread gone"))
    }

    pub fn allow(&self, addrs: &[&str]) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Allow(addrs.iter().map(|a| ip(a)).collect(), tx))?;
        Ok(rx.recv_timeout(WAIT)?)
    }

    pub fn counters(&self) -> anyhow::Result<DnsCounters> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Counters(tx))?;
        Ok(rx.recv_timeout(WAIT)?)
    }

    pub fn restart(&self) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Restart(tx))?;
        rx.recv_timeout(Duration::from_secs(10))?
            .map_err(|e| anyhow::anyhow!("restart: {e}"))
    }
}

// ---- clients ------------------------------------------------------------------

pub fn query(name: &str, rtype: RecordType) -> anyhow::Result<Vec<u8>> {
    let mut m = Message::new(0x4e58, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name)?, rtype));
    Ok(m.to_vec()?)
}

/// One UDP query from `src` (an address of `ns`) to `server:53`; `None`
/// if nothing came back within `WAIT` (two tries).
pub fn udp_query(
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
pub fn tcp_query(
    ns: &Netns,
    server: &str,
    name: &str,
    rtype: RecordType,
) -> anyhow::Result<Message> {
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

pub fn answer_ips(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(v4)) => Some(IpAddr::V4(*v4)),
            RData::AAAA(AAAA(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        })
        .collect()
}

pub fn answered(m: Option<Message>, what: &str) -> anyhow::Result<Vec<IpAddr>> {
    let m = m.with_context(|| format!("{what}: no response"))?;
    if m.metadata.response_code != ResponseCode::NoError {
        bail!("{what}: {}", m.metadata.response_code);
    }
    Ok(answer_ips(&m))
}

/// A file removed when the test ends, however it ends.
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub fn new(name: &str, content: &str) -> anyhow::Result<Self> {
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
