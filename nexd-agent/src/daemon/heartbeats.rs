//! The daemon's side of the in-tunnel announcements: the sockets (bound to
//! this device's mesh addresses, rebound when they change), the heartbeat
//! schedule, and the peer book that decides what to believe.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    announce::{
        Announcer, Incoming,
        book::{PeerBook, PeerLive},
        wire,
    },
    keys::{PrivateKey, PublicKey},
    mesh::Mesh,
    wireguard::DeviceStatus,
};

/// Interval of the heartbeats to every peer.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Heartbeats {
    book: PeerBook,
    announcer: Option<Announcer>,
    /// Where the sockets deliver; kept so a rebind feeds the same queue.
    incoming: mpsc::Sender<Incoming>,
    last_sent: Option<Instant>,
}

impl Heartbeats {
    /// `epoch`: this start's number (`announce::seq::next_epoch`), so the
    /// sequence numbers of every run are above the last run's whatever the
    /// clock says. Exit capabilities are believed only from the peers the
    /// membership lets serve this device.
    pub fn new(key: PrivateKey, epoch: u32, mesh: &Mesh, incoming: mpsc::Sender<Incoming>) -> Self {
        let mut book = PeerBook::with_epoch(key, epoch, Instant::now());
        book.sync(mesh);
        book.enforce_exit_authorization(mesh);
        Heartbeats {
            book,
            announcer: None,
            incoming,
            last_sent: None,
        }
    }

    /// What the announcements say about the peers.
    pub fn book(&self) -> &PeerBook {
        &self.book
    }

    /// A peer's name, or "?" for a key the mesh does not have.
    pub fn name_of(&self, key: &PublicKey) -> String {
        self.book.name(key).unwrap_or("?").to_owned()
    }

    /// The membership changed: peers are added and dropped (staying ones
    /// keep what is known of them, exit capabilities are re-checked), and
    /// the sockets follow this device's mesh addresses, the agent port and
    /// the WireGuard interface, admitting only the peers' addresses.
    pub fn sync(&mut self, mesh: &Mesh, iface: &str, v4: IpAddr, v6: IpAddr) {
        self.book.sync(mesh);
        let port = mesh.agent_port;
        if let Some(a) = &self.announcer
            && a.bound() == (v4, v6, port)
            && a.device() == Some(iface)
        {
            a.set_peers(self.book.peer_addrs());
            return;
        }
        self.announcer = None;
        match Announcer::start(
            iface,
            v4,
            v6,
            port,
            self.book.peer_addrs(),
            self.incoming.clone(),
        ) {
            Ok(a) => {
                self.announcer = Some(a);
                debug!(%v4, %v6, port, "announcement sockets bound");
            }
            Err(e) => {
                warn!(error = %e, "cannot bind the announcement sockets; exit nodes and peer health will not be seen")
            }
        }
    }

    /// This device is not a member (waiting for approval, or revoked): no
    /// sockets, and no peers in the book (`mesh` has no devices).
    pub fn leave(&mut self, mesh: &Mesh) {
        self.announcer = None;
        self.book.sync(mesh);
    }

    /// Records the handshakes WireGuard reports (availability needs them).
    pub fn observe(&mut self, status: &DeviceStatus, now: Instant) {
        for p in &status.peers {
            self.book
                .observe_handshake(&p.public_key, p.last_handshake, now);
        }
    }

    /// Sends every peer a heartbeat when one is due.
    pub fn send_due(&mut self, exit_node: bool, agent_port: u16, now: Instant) {
        if self
            .last_sent
            .is_some_and(|t| now.saturating_duration_since(t) < ANNOUNCE_INTERVAL)
        {
            return;
        }
        self.last_sent = Some(now);
        let Some(ann) = &self.announcer else { return };
        let flags = if exit_node { wire::FLAG_EXIT } else { 0 };
        for (to, bytes) in self.book.outgoing(flags, agent_port, now) {
            ann.send(to, &bytes);
        }
    }

    /// One received datagram. Returns whether a peer's exit capability
    /// changed (the exit-node client then re-evaluates).
    pub fn receive(&mut self, inc: &Incoming, now: Instant) -> bool {
        match self.book.receive(inc.from.ip(), &inc.bytes, now) {
            Ok((key, exit_changed)) => {
                if exit_changed {
                    let is_exit = self.book.live(&key).is_some_and(PeerLive::is_exit);
                    info!(peer = %self.name_of(&key), exit_node = is_exit, "peer announces a new exit-node capability");
                }
                exit_changed
            }
            Err(e) => {
                debug!(from = %inc.from, reason = %e, "announcement ignored");
                false
            }
        }
    }

    /// Stops sending and receiving.
    pub fn close(&mut self) {
        self.announcer = None;
    }
}
