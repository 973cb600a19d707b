//! Announcements between agents, inside the tunnel.
//!
//! Every agent sends each peer a small authenticated datagram every second
//! (`wire`): a heartbeat that also carries capabilities (exit node) and an
//! echo for round-trip times. `book::PeerBook` decides what to believe;
//! this module owns the two UDP sockets, bound to this device's mesh
//! addresses and (with [`Announcer::start`]) to the WireGuard interface,
//! so nothing from outside the tunnel reaches them. Before a datagram is
//! queued for the daemon loop, `gate` checks that its source is a peer's
//! mesh address and caps each source's rate, so a flood from one source
//! cannot crowd the others' heartbeats out of the queue. `seq` makes the
//! sequence numbers that keep replays out.

pub mod book;
pub mod gate;
pub mod live;
pub mod seq;
pub mod wire;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use serde::Serialize;
use tokio::{
    net::UdpSocket,
    sync::mpsc::{self, error::TrySendError},
    task::JoinHandle,
};
use tracing::debug;

use self::gate::{Gate, Refused};
use crate::devsock;

/// A datagram received on an announcement socket.
pub struct Incoming {
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Datagrams dropped by the receive tasks, before the queue, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SocketCounters {
    /// The source is not a peer's mesh address.
    pub not_a_peer: u64,
    /// The source sent more than its share (`gate::RATE_PER_SECOND`).
    pub rate_limited: u64,
    /// The queue to the daemon loop was full.
    pub queue_full: u64,
}

/// What the receive tasks and the daemon share.
#[derive(Default)]
struct Shared {
    gate: Mutex<Gate>,
    not_a_peer: AtomicU64,
    rate_limited: AtomicU64,
    queue_full: AtomicU64,
}

impl Shared {
    fn admit(&self, src: IpAddr) -> bool {
        let verdict = self
            .gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(src, Instant::now());
        match verdict {
            Ok(()) => true,
            Err(Refused::NotAPeer) => {
                self.not_a_peer.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(Refused::RateLimited) => {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// The announcement sockets and their receive tasks.
pub struct Announcer {
    v4: Arc<UdpSocket>,
    v6: Arc<UdpSocket>,
    addrs: (IpAddr, IpAddr),
    port: u16,
    device: Option<String>,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

/// How many received datagrams may wait for the daemon loop; beyond that
/// they are dropped, so a flood cannot grow memory. The daemon creates the
/// queue once (so rebinding the sockets keeps it).
pub const QUEUE: usize = 1024;

impl Announcer {
    /// Binds `v4:port` and `v6:port` (this device's mesh addresses) on the
    /// WireGuard interface `interface` only, and queues datagrams into
    /// `tx` only from `peers` (the peers' mesh addresses, e.g.
    /// `PeerBook::peer_addrs`), each source rate-capped. Must be called
    /// again if the interface is recreated (the binding is to its index).
    /// The daemon owns the queue, so a rebind keeps it.
    pub fn start(
        interface: &str,
        v4: IpAddr,
        v6: IpAddr,
        port: u16,
        peers: impl IntoIterator<Item = IpAddr>,
        tx: mpsc::Sender<Incoming>,
    ) -> io::Result<Self> {
        Self::open(
            Some(interface),
            v4,
            v6,
            port,
            Gate::for_peers(peers, Instant::now()),
            tx,
        )
    }

    /// Binds on any interface and admits every source, each datagram
    /// queued as it comes: how the sockets worked before they were gated.
    /// Kept as the control of the flood test, which shows what the gate
    /// prevents; the daemon uses [`Announcer::start`].
    pub fn ungated(
        v4: IpAddr,
        v6: IpAddr,
        port: u16,
        tx: mpsc::Sender<Incoming>,
    ) -> io::Result<Self> {
        Self::open(None, v4, v6, port, Gate::open(), tx)
    }

    fn open(
        device: Option<&str>,
        v4: IpAddr,
        v6: IpAddr,
        port: u16,
        gate: Gate,
        tx: mpsc::Sender<Incoming>,
    ) -> io::Result<Self> {
        let bind = |ip: IpAddr| -> io::Result<UdpSocket> {
            let std = devsock::udp(SocketAddr::new(ip, port), device)
                .map_err(|e| io::Error::new(e.kind(), format!("announcement socket: {e}")))?;
            UdpSocket::from_std(std)
        };
        let s4 = Arc::new(bind(v4)?);
        let s6 = Arc::new(bind(v6)?);
        let shared = Arc::new(Shared {
            gate: Mutex::new(gate),
            ..Shared::default()
        });
        let tasks = [Arc::clone(&s4), Arc::clone(&s6)]
            .into_iter()
            .map(|s| tokio::spawn(receive_loop(s, tx.clone(), Arc::clone(&shared))))
            .collect();
        Ok(Announcer {
            v4: s4,
            v6: s6,
            addrs: (v4, v6),
            port,
            device: device.map(str::to_owned),
            shared,
            tasks,
        })
    }

    /// The addresses and port the sockets are bound to.
    pub fn bound(&self) -> (IpAddr, IpAddr, u16) {
        (self.addrs.0, self.addrs.1, self.port)
    }

    /// The interface the sockets are bound to, if any.
    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// Replaces the sources admitted (call on every mesh reload). Sources
    /// that stay keep their rate state.
    pub fn set_peers(&self, peers: impl IntoIterator<Item = IpAddr>) {
        self.shared
            .gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_peers(peers, Instant::now());
    }

    /// What the receive tasks dropped so far.
    pub fn counters(&self) -> SocketCounters {
        SocketCounters {
            not_a_peer: self.shared.not_a_peer.load(Ordering::Relaxed),
            rate_limited: self.shared.rate_limited.load(Ordering::Relaxed),
            queue_full: self.shared.queue_full.load(Ordering::Relaxed),
        }
    }

    /// Sends one datagram without waiting; a full socket buffer or a peer
    /// without a route just loses this heartbeat.
    pub fn send(&self, to: SocketAddr, bytes: &[u8]) {
        let sock = if to.is_ipv4() { &self.v4 } else { &self.v6 };
        if let Err(e) = sock.try_send_to(bytes, to) {
            debug!(%to, error = %e, "announcement not sent");
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn receive_loop(sock: Arc<UdpSocket>, tx: mpsc::Sender<Incoming>, shared: Arc<Shared>) {
    let mut buf = [0u8; 512];
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, from)) => {
                if !shared.admit(from.ip()) {
                    continue;
                }
                match tx.try_send(Incoming {
                    from,
                    bytes: buf[..n].to_vec(),
                }) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        shared.queue_full.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Closed(_)) => return,
                }
            }
            Err(e) => {
                debug!(error = %e, "announcement receive failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
