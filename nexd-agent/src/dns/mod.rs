//! DNS on the exit node: a forwarding resolver on the exit node's mesh
//! addresses (UDP and TCP, port 53), for the clients it serves only, that
//! asks the exit node's own system resolvers (`/etc/resolv.conf` of its
//! namespace). A client that sends its internet traffic through the exit
//! node sends its DNS there too (the client side is the leak-proof client
//! issue's), so its queries leave from where its traffic does and its
//! LAN's resolver learns nothing.
//!
//! The protocol is hickory-dns's (see docs/ARCHITECTURE.md, "DNS on the
//! exit node"): hickory-proto parses and writes messages, hickory-server's
//! `Catalog` with a `ForwardZoneHandler` answers them, hickory-resolver
//! (under it) talks to the upstream resolvers with retries, TCP fallback
//! on truncation and a bounded cache. This module owns what nexd must
//! decide itself: the sockets (bound to the mesh addresses and to the
//! WireGuard interface), who is answered (a source address set the daemon
//! keeps current), and the bounds: queries in flight, TCP connections,
//! per-query and idle deadlines, message sizes, each of queries in flight,
//! rate and TCP connections also per client address (one client's flood
//! of names that never resolve must not cost another its answers).
//! hickory-server's own
//! `Server` is not used because it accepts TCP connections and spawns a
//! task per UDP datagram without a limit, and checks the source only after
//! reading a query.
//!
//! Lifecycle for the daemon: [`start`] when the exit node starts serving
//! (inside the Tokio runtime), [`DnsHandle::update_allowed`] on every mesh
//! reload with the mesh addresses of the clients the exit node serves,
//! [`DnsHandle::reload_upstreams`] on SIGHUP, [`DnsHandle::shutdown`] when
//! it stops serving.

mod serve;
mod upstream;

mod per_client;

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hickory_server::zone_handler::Catalog;
use serde::Serialize;
use tokio::{
    sync::{Semaphore, watch},
    task::JoinHandle,
};

/// The DNS port.
pub const PORT: u16 = 53;
/// Where the exit node's own resolvers are listed.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// What the resolver serves on, and where it forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// The exit node's mesh addresses (one UDP socket and one TCP listener
    /// each).
    pub bind: Vec<IpAddr>,
    /// Normally [`PORT`]; tests use others.
    pub port: u16,
    /// The WireGuard interface: the sockets receive only what came out of
    /// the tunnel (`SO_BINDTODEVICE`). `None` binds the addresses alone.
    pub interface: Option<String>,
    /// The resolv.conf naming the upstream resolvers (normally
    /// [`RESOLV_CONF`]). Only its `nameserver` lines and its `timeout`,
    /// `attempts` and `edns0` options are used: search domains are the
    /// clients' business, and the exit node's /etc/hosts is not served.
    pub resolv_conf: PathBuf,
    pub limits: Limits,
}

impl DnsConfig {
    /// Port 53 on `bind`, on `interface`, forwarding to the system's
    /// resolvers, with the default limits.
    pub fn new(bind: Vec<IpAddr>, interface: Option<String>) -> Self {
        DnsConfig {
            bind,
            port: PORT,
            interface,
            resolv_conf: PathBuf::from(RESOLV_CONF),
            limits: Limits::default(),
        }
    }
}

/// Bounds on what clients can make the resolver hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Queries being answered at once (UDP and TCP together). Beyond it a
    /// UDP query is dropped (the client retries) and a TCP query waits
    /// for a slot up to `query_timeout`, then gets SERVFAIL.
    pub max_in_flight: usize,
    /// The same for each client address: one client holding queries that
    /// never resolve leaves the others room.
    pub per_client_in_flight: usize,
    /// Open TCP connections; beyond it new ones are closed at once.
    pub max_tcp_connections: usize,
    /// The same for each client address.
    pub per_client_tcp_connections: usize,
    /// Queries a second from each client address (bursts of twice as
    /// many); beyond it a UDP query is dropped and a TCP connection
    /// closed, counted as `rate_limited`. Names that miss the cache go
    /// upstream: the bound is also what one client can make the exit node
    /// send to its resolvers.
    pub per_client_rate: u32,
    /// A query not answered within this gets SERVFAIL.
    pub query_timeout: Duration,
    /// A TCP connection with no complete query for this long is closed
    /// (RFC 7766 suggests seconds, not minutes).
    pub tcp_idle_timeout: Duration,
    /// The largest query accepted, in bytes (a query is a name and a few
    /// EDNS options: 512 bytes in practice; larger is refused as
    /// malformed without being parsed).
    pub max_query_len: usize,
    /// Answers cached (entries), shared by all clients.
    pub cache_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_in_flight: 256,
            per_client_in_flight: 32,
            max_tcp_connections: 64,
            per_client_tcp_connections: 8,
            per_client_rate: 100,
            query_timeout: Duration::from_secs(5),
            tcp_idle_timeout: Duration::from_secs(10),
            max_query_len: 4096,
            cache_entries: 4096,
        }
    }
}

/// Why the resolver could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("the DNS resolver must be started inside the Tokio runtime")]
    NoRuntime,
    #[error("no address to serve DNS on")]
    NoAddress,
    #[error("cannot read {path}: {source}")]
    ResolvConf { path: PathBuf, source: io::Error },
    #[error("{path} names no upstream resolver nexd can use ({reason})")]
    NoUpstream { path: PathBuf, reason: String },
    #[error("setting up the forwarder: {0}")]
    Forwarder(String),
    #[error("DNS socket: {0}")]
    Bind(#[source] io::Error),
}

/// What the resolver did, by outcome: for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DnsCounters {
    /// Queries answered (any response code from upstream, NXDOMAIN
    /// included).
    pub answered: u64,
    /// UDP queries from a source the exit node does not serve: answered
    /// REFUSED.
    pub refused: u64,
    /// TCP connections from a source the exit node does not serve: closed
    /// before anything was read.
    pub refused_connections: u64,
    /// UDP queries dropped because `max_in_flight` (or the client's
    /// `per_client_in_flight`) were being answered.
    pub overloaded: u64,
    /// TCP connections closed at once because `max_tcp_connections` (or
    /// the client's `per_client_tcp_connections`) were open.
    pub overloaded_connections: u64,
    /// Queries over their client's `per_client_rate`: dropped (UDP), or
    /// the connection closed (TCP).
    pub rate_limited: u64,
    /// Queries not answered within `query_timeout`: answered SERVFAIL.
    pub timed_out: u64,
    /// Datagrams or TCP messages that are not a query (unparsable, too
    /// long, a response): dropped.
    pub malformed: u64,
}

#[derive(Default)]
struct Counters {
    answered: AtomicU64,
    refused: AtomicU64,
    refused_connections: AtomicU64,
    overloaded: AtomicU64,
    overloaded_connections: AtomicU64,
    rate_limited: AtomicU64,
    timed_out: AtomicU64,
    malformed: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> DnsCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsCounters {
            answered: get(&self.answered),
            refused: get(&self.refused),
            refused_connections: get(&self.refused_connections),
            overloaded: get(&self.overloaded),
            overloaded_connections: get(&self.overloaded_connections),
            rate_limited: get(&self.rate_limited),
            timed_out: get(&self.timed_out),
            malformed: get(&self.malformed),
        }
    }
}

/// The source addresses answered: the mesh addresses of the clients the
/// exit node serves.
#[derive(Debug, Default)]
struct Allowed(RwLock<HashSet<IpAddr>>);

impl Allowed {
    fn set(&self, addrs: impl IntoIterator<Item = IpAddr>) {
        let new: HashSet<IpAddr> = addrs.into_iter().map(|ip| ip.to_canonical()).collect();
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = new;
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&ip.to_canonical())
    }
}

/// What the serving tasks share with the handle.
struct Shared {
    config: DnsConfig,
    allowed: Allowed,
    catalog: RwLock<Arc<Catalog>>,
    in_flight: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    /// Each client address's share of the bounds.
    clients: per_client::Clients,
    counters: Counters,
}

impl Shared {
    fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.catalog.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The running resolver. Dropping it stops it too (without waiting).
pub struct DnsHandle {
    shared: Arc<Shared>,
    bound: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Starts the resolver: reads the upstream resolvers, binds UDP and TCP on
/// every address of `config.bind` (all or nothing), and answers sources in
/// `allowed` only. Must be called inside the Tokio runtime; the sockets
/// belong to the network namespace of the calling thread.
pub fn start(
    config: DnsConfig,
    allowed: impl IntoIterator<Item = IpAddr>,
) -> Result<DnsHandle, DnsError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| DnsError::NoRuntime)?;
    if config.bind.is_empty() {
        return Err(DnsError::NoAddress);
    }
    let catalog = upstream::catalog(&config)?;
    let shared = Arc::new(Shared {
        allowed: Allowed::default(),
        catalog: RwLock::new(Arc::new(catalog)),
        in_flight: Arc::new(Semaphore::new(config.limits.max_in_flight)),
        connections: Arc::new(Semaphore::new(config.limits.max_tcp_connections)),
        clients: per_client::Clients::new(config.limits),
        counters: Counters::default(),
        config,
    });
    shared.allowed.set(allowed);
    let mut sockets = Vec::new();
    for ip in &shared.config.bind {
        let addr = SocketAddr::new(*ip, shared.config.port);
        let device = shared.config.interface.as_deref();
        let udp = crate::devsock::udp(addr, device).map_err(DnsError::Bind)?;
        let tcp = crate::devsock::tcp_listener(addr, device, 128).map_err(DnsError::Bind)?;
        sockets.push((udp, tcp));
    }
    let _enter = runtime.enter();
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut bound = Vec::new();
    for (udp, tcp) in sockets {
        bound.push(udp.local_addr().map_err(DnsError::Bind)?);
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(DnsError::Bind)?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(DnsError::Bind)?;
        tasks.push(tokio::spawn(serve::udp(
            udp,
            Arc::clone(&shared),
            stopped.clone(),
        )));
        tasks.push(tokio::spawn(serve::tcp(
            tcp,
            Arc::clone(&shared),
            stopped.clone(),
        )));
    }
    tracing::info!(
        addresses = ?bound,
        interface = ?shared.config.interface,
        upstream = %shared.config.resolv_conf.display(),
        "DNS resolver for exit-node clients started"
    );
    Ok(DnsHandle {
        shared,
        bound,
        stop,
        tasks,
    })
}

impl DnsHandle {
    /// Replaces the source addresses answered (the mesh addresses of the
    /// clients this exit node serves). Takes effect for the next query,
    /// on open TCP connections too.
    pub fn update_allowed(&self, allowed: impl IntoIterator<Item = IpAddr>) {
        self.shared.allowed.set(allowed);
        self.shared
            .clients
            .retain(|ip| self.shared.allowed.contains(ip));
    }

    /// Reads the upstream resolvers again (the resolv.conf may have
    /// changed, e.g. by DHCP). On error the previous ones stay.
    pub fn reload_upstreams(&self) -> Result<(), DnsError> {
        let catalog = upstream::catalog(&self.shared.config)?;
        *self
            .shared
            .catalog
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(catalog);
        Ok(())
    }

    /// The UDP addresses served (with the port actually bound).
    pub fn bound(&self) -> &[SocketAddr] {
        &self.bound
    }

    /// What the resolver did so far.
    pub fn counters(&self) -> DnsCounters {
        self.shared.counters.snapshot()
    }

    /// Stops serving: ends the queries in flight and the TCP connections,
    /// and returns once every socket is closed (so the port can be bound
    /// again at once).
    pub async fn shutdown(mut self) {
        // Receivers gone means the tasks are gone already.
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            // A task that panicked is gone as well; nothing else comes back.
            let _ = t.await;
        }
        tracing::info!("DNS resolver stopped");
    }
}

impl Drop for DnsHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_sources_are_replaced_whole_and_mapped_v4_counts_as_v4() {
        let a = Allowed::default();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(!a.contains(ip("100.64.0.2")));
        a.set([ip("100.64.0.2"), ip("fd00::2")]);
        assert!(a.contains(ip("100.64.0.2")));
        assert!(a.contains(ip("::ffff:100.64.0.2")));
        assert!(a.contains(ip("fd00::2")));
        assert!(!a.contains(ip("100.64.0.3")));
        a.set([ip("100.64.0.3")]);
        assert!(!a.contains(ip("100.64.0.2")) && a.contains(ip("100.64.0.3")));
    }

    #[test]
    fn start_outside_a_runtime_or_without_addresses_is_an_error() {
        let cfg = DnsConfig::new(vec![], None);
        assert!(matches!(start(cfg.clone(), []), Err(DnsError::NoRuntime)));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            assert!(matches!(start(cfg, []), Err(DnsError::NoAddress)));
        });
    }
}
