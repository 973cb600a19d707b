//! DNS for the tests in namespaces (the end-to-end tests here, and
//! nexd-agent's test and benchmark of the exit node's resolver): a small
//! authoritative server that answers A and AAAA for one name and notes the
//! source address of every query it gets (an upstream resolver on the
//! internet, a resolver on a client's LAN), and a stub client that asks a
//! server over UDP or TCP from inside a namespace, like an application's
//! resolver library does.
//!
//! The protocol is hickory-dns's (the same library nexd's resolver uses):
//! hickory-server's `Catalog` over an in-memory zone answers, hickory-proto
//! writes and parses the messages. Each server runs on a current-thread
//! Tokio runtime on its own thread; its sockets are opened inside the
//! server's namespace, and dropping the server stops it.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    str::FromStr as _,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU16, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use hickory_server::{
    Server,
    net::runtime::{Time, TokioRuntimeProvider},
    proto::{
        op::{MessageType, OpCode, Query},
        rr::{
            LowerName, Name, RData, Record,
            rdata::{A, AAAA},
        },
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    store::in_memory::InMemoryZoneHandler,
    zone_handler::{AxfrPolicy, Catalog, ZoneType},
};

use crate::netns::Netns;

/// A response as [`exchange`] returns it, and its code.
pub use hickory_server::proto::op::{Message, ResponseCode};
/// The record types a lookup asks for (`RecordType::A`, `RecordType::AAAA`).
pub use hickory_server::proto::rr::RecordType;

/// Query ids, distinct within a test process.
static NEXT_ID: AtomicU16 = AtomicU16::new(0x4e58);

/// The zone every test server is authoritative for.
pub const ZONE: &str = "nexd.test.";

/// Who asked, in arrival order.
type Seen = Arc<Mutex<Vec<SocketAddr>>>;

/// Answers from the catalog, after noting the query's source.
struct Recording {
    catalog: Catalog,
    seen: Seen,
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
            .unwrap_or_else(PoisonError::into_inner)
            .push(request.src());
        self.catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// The zone: `name` (inside [`ZONE`]) with one A and one AAAA record, each
/// with a TTL of `ttl` seconds.
fn catalog(name: &str, v4: Ipv4Addr, v6: Ipv6Addr, ttl: u32) -> anyhow::Result<Catalog> {
    let origin = Name::from_str(ZONE)?;
    let owner = Name::from_str(name)?;
    if !origin.zone_of(&owner) {
        bail!("{name} is not inside {ZONE}");
    }
    let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
        origin.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
    );
    zone.upsert_mut(Record::from_rdata(owner.clone(), ttl, RData::A(A(v4))), 1);
    zone.upsert_mut(Record::from_rdata(owner, ttl, RData::AAAA(AAAA(v6))), 1);
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::from(origin), vec![Arc::new(zone)]);
    Ok(catalog)
}

/// An authoritative server on port 53 (UDP and TCP) of some addresses
/// inside a namespace, recording the source of every query.
pub struct DnsServer {
    pub addrs: Vec<IpAddr>,
    seen: Seen,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl DnsServer {
    /// Starts the server on `addrs` (addresses of `ns`), answering `name`
    /// with `v4` (A) and `v6` (AAAA), with a TTL of 0 so that resolvers in
    /// between do not cache them: every lookup through them reaches this
    /// server.
    pub fn start(
        ns: &Netns,
        addrs: &[IpAddr],
        name: &str,
        v4: Ipv4Addr,
        v6: Ipv6Addr,
    ) -> anyhow::Result<Self> {
        Self::start_with_ttl(ns, addrs, name, v4, v6, 0)
    }

    /// [`DnsServer::start`] with answers that resolvers in between may
    /// keep for `ttl` seconds (the exit node's resolver's benchmark
    /// measures its cache).
    pub fn start_with_ttl(
        ns: &Netns,
        addrs: &[IpAddr],
        name: &str,
        v4: Ipv4Addr,
        v6: Ipv6Addr,
        ttl: u32,
    ) -> anyhow::Result<Self> {
        let mut sockets = Vec::new();
        for addr in addrs {
            let sa = SocketAddr::new(*addr, 53);
            let udp =
                ns.run_in(move || UdpSocket::bind(sa).with_context(|| format!("udp {sa}")))?;
            let tcp = ns.run_in(move || {
                std::net::TcpListener::bind(sa).with_context(|| format!("tcp {sa}"))
            })?;
            udp.set_nonblocking(true)?;
            tcp.set_nonblocking(true)?;
            sockets.push((udp, tcp));
        }
        let seen: Seen = Arc::default();
        let handler = Recording {
            catalog: catalog(name, v4, v6, ttl)?,
            seen: Arc::clone(&seen),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut server = Server::new(handler);
                for (udp, tcp) in sockets {
                    let registered = tokio::net::UdpSocket::from_std(udp)
                        .and_then(|udp| Ok((udp, tokio::net::TcpListener::from_std(tcp)?)));
                    let (udp, tcp) = match registered {
                        Ok(pair) => pair,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return Ok(());
                        }
                    };
                    server.register_socket(udp);
                    server.register_listener(tcp, Duration::from_secs(5), 4096);
                }
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    r = server.block_until_done() => r?,
                    _ = stopped => {
                        // Bounded: a connection stuck mid-query must not hang
                        // the test's teardown.
                        let _ = tokio::time::timeout(
                            Duration::from_secs(5),
                            server.shutdown_gracefully(),
                        )
                        .await;
                    }
                }
                Ok(())
            })
        });
        let server = DnsServer {
            addrs: addrs.to_vec(),
            seen,
            stop: Some(stop),
            thread: Some(thread),
        };
        match ready.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => bail!("DNS server on {addrs:?} did not start: {e}"),
            Err(e) => bail!("DNS server on {addrs:?} did not start: {e}"),
        }
    }

    /// The sources of every query so far, in arrival order.
    pub fn seen(&self) -> Vec<SocketAddr> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The source addresses (without ports) of every query so far.
    pub fn seen_ips(&self) -> Vec<IpAddr> {
        self.seen().iter().map(SocketAddr::ip).collect()
    }

    /// Forgets the queries seen so far.
    pub fn clear(&self) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// What a lookup got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// NOERROR with these A/AAAA addresses.
    Answer(Vec<IpAddr>),
    /// A response with another code (REFUSED, SERVFAIL...).
    Rcode(String),
    /// Nothing came back in time, or the server's port was closed.
    NoResponse,
}

impl Outcome {
    /// What an [`exchange`] got: its response, if any.
    pub fn of(response: Option<&Message>) -> Self {
        match response {
            None => Outcome::NoResponse,
            Some(m) if m.metadata.response_code != ResponseCode::NoError => {
                Outcome::Rcode(m.metadata.response_code.to_string())
            }
            Some(m) => Outcome::Answer(answer_ips(m)),
        }
    }

    /// The answer's addresses, or an error saying what came instead.
    pub fn addresses(self) -> anyhow::Result<Vec<IpAddr>> {
        match self {
            Outcome::Answer(a) => Ok(a),
            other => bail!("no answer: {other:?}"),
        }
    }
}

/// The A and AAAA addresses of a response's answers.
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

/// A query for `name`'s `rtype` records, recursion desired, with an id of
/// its own.
pub fn query(name: &str, rtype: RecordType) -> anyhow::Result<Vec<u8>> {
    query_with_id(name, rtype, NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

fn query_with_id(name: &str, rtype: RecordType, id: u16) -> anyhow::Result<Vec<u8>> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name)?, rtype));
    Ok(m.to_vec()?)
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::HostUnreachable
            | std::io::ErrorKind::NetworkUnreachable
    )
}

/// How a stub asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// How a stub resolver makes one lookup: over UDP, one socket (bound to
/// `source` if given, else to any address) sending the query up to
/// `tries` times, `wait` apart, and taking the first response with the
/// query's id; over TCP, one connection with `wait` for the connect and
/// the answer (`tries` and `source` are ignored).
#[derive(Debug, Clone, Copy)]
pub struct Stub {
    pub transport: Transport,
    pub source: Option<IpAddr>,
    pub wait: Duration,
    pub tries: u32,
}

/// One lookup of `name`'s `rtype` records from inside `ns` to `server` port
/// 53, as `stub` makes it: the response, or `None` if nothing came back
/// (or the server's port was closed). Fails if the query could never be
/// sent at all.
pub fn exchange(
    ns: &Netns,
    server: IpAddr,
    name: &str,
    rtype: RecordType,
    stub: Stub,
) -> anyhow::Result<Option<Message>> {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let q = query_with_id(name, rtype, id)?;
    let to = SocketAddr::new(server, 53);
    let Stub {
        transport,
        source,
        wait,
        tries,
    } = stub;
    let source = source.unwrap_or(if server.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    });
    ns.run_in(move || -> anyhow::Result<Option<Message>> {
        match transport {
            Transport::Udp => {
                let s = UdpSocket::bind(SocketAddr::new(source, 0))?;
                let mut buf = [0u8; 4096];
                let mut sent = false;
                let mut send_error = None;
                for _ in 0..tries.max(1) {
                    // A send can fail while routes change (a failover):
                    // that try is lost, as for any stub.
                    match s.send_to(&q, to) {
                        Ok(_) => sent = true,
                        Err(e) => send_error = Some(e),
                    }
                    let until = Instant::now() + wait;
                    loop {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        s.set_read_timeout(Some(left))?;
                        match s.recv_from(&mut buf) {
                            Ok((n, _)) => {
                                if let Ok(m) = Message::from_vec(&buf[..n])
                                    && m.metadata.id == id
                                {
                                    return Ok(Some(m));
                                }
                            }
                            Err(e) if timed_out(&e) => {
                                // Without a response a stub waits out the
                                // try's time, whatever the error said.
                                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                                break;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                match send_error {
                    Some(e) if !sent => Err(anyhow::Error::from(e)
                        .context(format!("no try of the query to {to} could be sent"))),
                    _ => Ok(None),
                }
            }
            Transport::Tcp => {
                let mut s = match TcpStream::connect_timeout(&to, wait) {
                    Ok(s) => s,
                    Err(e) if timed_out(&e) => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                s.set_read_timeout(Some(wait))?;
                s.set_write_timeout(Some(wait))?;
                let len = u16::try_from(q.len())?;
                let mut framed = len.to_be_bytes().to_vec();
                framed.extend_from_slice(&q);
                let exchange = (|| -> std::io::Result<Vec<u8>> {
                    s.write_all(&framed)?;
                    let mut len = [0u8; 2];
                    s.read_exact(&mut len)?;
                    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    s.read_exact(&mut body)?;
                    Ok(body)
                })();
                match exchange {
                    Ok(body) => Ok(Some(Message::from_vec(&body)?)),
                    Err(e) if timed_out(&e) || e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        Ok(None)
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    })
}

/// One lookup of `name`'s `rtype` records from inside `ns` to `server`
/// port 53, from any address, as [`Stub`] describes.
pub fn lookup(
    ns: &Netns,
    server: IpAddr,
    name: &str,
    rtype: RecordType,
    transport: Transport,
    wait: Duration,
    tries: u32,
) -> anyhow::Result<Outcome> {
    let stub = Stub {
        transport,
        source: None,
        wait,
        tries,
    };
    Ok(Outcome::of(
        exchange(ns, server, name, rtype, stub)?.as_ref(),
    ))
}
