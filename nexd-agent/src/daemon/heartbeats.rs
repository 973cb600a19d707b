//! The daemon's side of the in-tunnel announcements: the sockets (bound to
//! this device's mesh addresses, rebound when they change), the heartbeat
//! schedule, and the peer book that decides what to believe.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry as Metrics,
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
    metrics::{Labels, label, outcomes},
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
    last_probe: Option<Instant>,
    /// The last `probe` had targets: one more call (with none) is needed
    /// to stop watching them.
    probing: bool,
}

/// What one received datagram changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Heard {
    /// A peer's standing as exit node changed.
    pub exit_changed: bool,
    /// The peer probes this device and wants an announcement back now.
    pub wants_answer: Option<PublicKey>,
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
            last_probe: None,
            probing: false,
        }
    }

    /// What the announcements say about the peers.
    pub fn book(&self) -> &PeerBook {
        &self.book
    }

    /// Datagrams the receive tasks dropped before the book saw them.
    pub fn socket_counters(&self) -> crate::announce::SocketCounters {
        self.announcer
            .as_ref()
            .map(crate::announce::Announcer::counters)
            .unwrap_or_default()
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

    /// The load this exit node announces from now on (issue 23).
    pub fn set_load(&mut self, load: wire::LoadReport) {
        self.book.set_load(load);
    }

    /// The exit node this device uses (its announcements to it say so,
    /// and it counts this device among its clients).
    pub fn set_exit_in_use(&mut self, exit: Option<PublicKey>) {
        self.book.set_exit_in_use(exit);
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

    /// One received datagram: whether a peer's exit capability changed
    /// (the exit-node client then re-evaluates), and whether it asks for
    /// an answer.
    pub fn receive(&mut self, inc: &Incoming, now: Instant) -> Heard {
        match self.book.receive(inc.from.ip(), &inc.bytes, now) {
            Ok((key, exit_changed)) => {
                let live = self.book.live(&key);
                if exit_changed {
                    let is_exit = live.is_some_and(PeerLive::is_exit);
                    info!(peer = %self.name_of(&key), exit_node = is_exit, "peer announces a new exit-node capability");
                }
                Heard {
                    exit_changed,
                    wants_answer: live.is_some_and(PeerLive::asks_for_answer).then_some(key),
                }
            }
            Err(e) => {
                debug!(from = %inc.from, reason = %e, "announcement ignored");
                Heard::default()
            }
        }
    }

    /// Watches `targets` closely: a probe to each every
    /// `exit::PROBE_INTERVAL` (the rest of the mesh keeps its one
    /// heartbeat a second). An empty list stops probing.
    pub fn probe(&mut self, targets: &[PublicKey], agent_port: u16, now: Instant) {
        self.book.set_probed(targets, now);
        self.probing = !targets.is_empty();
        if targets.is_empty()
            || self
                .last_probe
                .is_some_and(|t| now.saturating_duration_since(t) < crate::exit::PROBE_INTERVAL)
        {
            return;
        }
        self.last_probe = Some(now);
        let Some(ann) = &self.announcer else { return };
        for k in targets {
            if let Some((to, bytes)) = self.book.outgoing_to(k, wire::FLAG_PROBE, agent_port, now) {
                ann.send(to, &bytes);
            }
        }
    }

    /// Whether peers are being probed (see `probe`).
    pub fn probing(&self) -> bool {
        self.probing
    }

    /// Answers a probe at once: an announcement whose echo gives the
    /// prober its round trip.
    pub fn answer(&mut self, to: &PublicKey, exit_node: bool, agent_port: u16, now: Instant) {
        let Some(ann) = &self.announcer else { return };
        let flags = if exit_node { wire::FLAG_EXIT } else { 0 };
        if let Some((addr, bytes)) = self.book.outgoing_to(to, flags, agent_port, now) {
            ann.send(addr, &bytes);
        }
    }

    /// Sends the next heartbeats now instead of at their time (this
    /// device's exit capability changed: peers should know at once).
    pub fn send_now(&mut self) {
        self.last_sent = None;
    }

    /// Stops sending and receiving.
    pub fn close(&mut self) {
        self.announcer = None;
    }

    /// What the announcements say: which exit nodes are available, and
    /// what became of the datagrams received.
    pub fn register_metrics(&self, reg: &mut Metrics, now: Instant) {
        let available = Family::<Labels, Gauge>::default();
        let book = &self.book;
        for k in book.keys() {
            if let (Some(name), Some(live)) = (book.name(k), book.live(k))
                && let Some(status) = crate::exit::status(live, now)
            {
                available
                    .get_or_create(&label("exit_node", name))
                    .set(i64::from(status == crate::exit::ExitStatus::Available));
            }
        }
        reg.register(
            "nexd_exit_node_available",
            "1 for each exit node that is available now, 0 if stale",
            available,
        );
        let announcements = Family::<Labels, Counter>::default();
        outcomes(&announcements, &book.counters());
        outcomes(&announcements, &self.socket_counters());
        reg.register(
            "nexd_announcements",
            "Announcements received from peers, by outcome (accepted, or why they were dropped or partly ignored)",
            announcements,
        );
    }
}
