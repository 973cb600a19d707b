//! The send side's decisions, without I/O: which peer a packet from the
//! TUN goes to, whether it is encrypted into the send batch or kept until
//! the handshake completes, and each peer's timers (boringtun's, and
//! nexd's persistent keepalive). Datagrams land in a [`SendBatch`];
//! `engine` reads the TUN, cuts super-packets and sends the batch, making
//! room before each call (one slot per packet, [`TICK_ROOM`] per tick).

use std::{
    net::SocketAddr,
    sync::{MutexGuard, atomic::Ordering},
    time::Instant,
};

use boringtun::noise::{TunnResult, errors::WireGuardError};
use tracing::trace;

use super::{
    batch::{SLOT, SendBatch},
    drops::{DropReason, Drops},
    offload,
    peers::{Peer, PeerState, QUEUE_PACKETS, Table, keepalive_due},
};

/// WireGuard's data message overhead (header 16 + tag 16).
const OVERHEAD: usize = 32;

/// Free slots one [`tick`] may fill: a timer's message, a keepalive (or
/// initiation), and the peer's queue.
pub const TICK_ROOM: usize = 2 + QUEUE_PACKETS;

/// What became of one packet handed to [`Transmit::packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Encrypted into the batch.
    Encrypted,
    /// Kept in the peer's queue until the handshake completes.
    Queued,
    /// Dropped: the queue was full (counted as `DropReason::QueueFull`).
    QueueFull,
    /// Dropped: too large for a slot (counted as `DropReason::TooLarge`).
    TooLarge,
}

/// One TUN read on its way to its peer, whose lock is held for the whole
/// read (a super-packet is one flow: one lookup, one lock).
pub struct Transmit<'t> {
    peer: &'t Peer,
    state: MutexGuard<'t, PeerState>,
    to: SocketAddr,
    /// Whether a session was up when the read began.
    session: bool,
    sent: usize,
    dropped_full: usize,
    dropped_large: usize,
    drops: &'t Drops,
}

impl<'t> Transmit<'t> {
    /// The peer the read whose (first) IP packet is `packet` goes to,
    /// locked; a read nobody takes is counted in `drops` and its reason
    /// returned.
    pub fn begin(table: &'t Table, packet: &[u8], drops: &'t Drops) -> Result<Self, DropReason> {
        let refuse = |reason: DropReason| {
            drops.count(&reason, 1);
            reason
        };
        let dst = offload::destination(packet).ok_or_else(|| refuse(DropReason::Malformed))?;
        let pi = table
            .route(dst)
            .ok_or_else(|| refuse(DropReason::NoRoute))?;
        let peer = &table.peers[pi];
        let state = peer.lock();
        let to = state
            .endpoint
            .ok_or_else(|| refuse(DropReason::NoEndpoint))?;
        let session = state.has_session();
        Ok(Transmit {
            peer,
            state,
            to,
            session,
            sent: 0,
            dropped_full: 0,
            dropped_large: 0,
            drops,
        })
    }

    /// One IP packet of the read: encrypted into `batch` when a session is
    /// up (the batch needs a free slot), kept for the handshake otherwise.
    pub fn packet(&mut self, pkt: &[u8], batch: &mut SendBatch) -> Sent {
        if !self.session {
            if self.state.enqueue(pkt) {
                return Sent::Queued;
            }
            self.dropped_full += 1;
            return Sent::QueueFull;
        }
        let n = seal(&mut self.state, pkt, batch, self.to);
        if n == 0 {
            self.dropped_large += 1;
            return Sent::TooLarge;
        }
        self.sent += n;
        Sent::Encrypted
    }

    /// Ends the read: counts its drops (one counter write per read) and,
    /// without a session, starts a handshake (the batch needs a free
    /// slot).
    pub fn finish(mut self, batch: &mut SendBatch, now: Instant) {
        self.drops.count(&DropReason::QueueFull, self.dropped_full);
        self.drops.count(&DropReason::TooLarge, self.dropped_large);
        if !self.session {
            self.sent += initiate(&mut self.state, batch, self.to);
        }
        note_sent(self.peer, &mut self.state, self.sent, now);
    }
}

/// One peer's timers, run every 250 ms by `wg-rx`: `Tunn`'s (handshake
/// retries, rekeying, session expiry), nexd's persistent keepalive (an
/// initiation instead when there is no session), and the queue once a
/// session is up. `batch` needs [`TICK_ROOM`] free slots.
pub fn tick(peer: &Peer, now: Instant, batch: &mut SendBatch) {
    let mut s = peer.lock();
    let Some(to) = s.endpoint else {
        return;
    };
    let mut sent = 0;
    let timer = match s.built_tunn() {
        Some(t) => t.update_timers(batch.slot()),
        None => TunnResult::Done,
    };
    match timer {
        TunnResult::WriteToNetwork(out) => {
            let n = out.len();
            batch.commit(n, to);
            sent += n;
        }
        TunnResult::Err(WireGuardError::ConnectionExpired) => s.clear_queue(),
        TunnResult::Err(e) => trace!(peer = %peer.key, error = ?e, "timer"),
        _ => {}
    }
    if keepalive_due(s.keepalive, s.last_sent, now) {
        sent += if s.has_session() {
            seal(&mut s, &[], batch, to)
        } else {
            initiate(&mut s, batch, to)
        };
    }
    sent += send_queue(&mut s, batch, to);
    note_sent(peer, &mut s, sent, now);
}

/// Encrypts `pkt` for the peer into the next slot of `batch` and returns
/// the datagram's length (0: nothing sent: too large, or no room).
pub(super) fn seal(s: &mut PeerState, pkt: &[u8], batch: &mut SendBatch, to: SocketAddr) -> usize {
    if pkt.len() + OVERHEAD > SLOT || batch.is_full() {
        return 0;
    }
    match s.tunn().encapsulate(pkt, batch.slot()) {
        TunnResult::WriteToNetwork(out) => {
            let n = out.len();
            batch.commit(n, to);
            n
        }
        _ => 0,
    }
}

/// Starts a handshake unless one is under way; returns the bytes queued.
fn initiate(s: &mut PeerState, batch: &mut SendBatch, to: SocketAddr) -> usize {
    if batch.is_full() {
        return 0;
    }
    match s.tunn().format_handshake_initiation(batch.slot(), false) {
        TunnResult::WriteToNetwork(out) => {
            let n = out.len();
            batch.commit(n, to);
            n
        }
        _ => 0,
    }
}

/// The packets kept while the handshake ran, encrypted now that a session
/// is up (at most `QUEUE_PACKETS` slots); returns the bytes.
pub(super) fn send_queue(s: &mut PeerState, batch: &mut SendBatch, to: SocketAddr) -> usize {
    if s.queued() == 0 || !s.has_session() {
        return 0;
    }
    let mut sent = 0;
    for q in s.take_queue() {
        sent += seal(s, &q, batch, to);
    }
    sent
}

/// Records that `sent` bytes went to the peer (for keepalives and `wg
/// show`).
pub(super) fn note_sent(peer: &Peer, s: &mut PeerState, sent: usize, now: Instant) {
    if sent > 0 {
        s.last_sent = Some(now);
        peer.tx_bytes.fetch_add(sent as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        keys::PrivateKey,
        wireguard::{
            PeerConfig,
            userspace::{
                drops::DropCounts,
                message::MessageType,
                rx::Received,
                testing::{connected, ip, net, pair, udp4},
            },
        },
    };

    #[test]
    fn a_packet_without_a_route_or_an_endpoint_is_dropped_and_counted() {
        let (mut a, _) = pair();
        let r = a.send(&udp4(a.tun_ip, ip("100.64.0.9"), b"nobody"));
        assert!(matches!(r, Err(DropReason::NoRoute)), "{r:?}");
        // A peer known by its key and prefix, not yet by its address.
        a.add_peer(PeerConfig {
            public_key: PrivateKey::generate().public_key(),
            endpoint: None,
            allowed_ips: vec![net("100.64.0.9/32")],
            persistent_keepalive: 0,
        });
        let r = a.send(&udp4(a.tun_ip, ip("100.64.0.9"), b"where"));
        assert!(matches!(r, Err(DropReason::NoEndpoint)), "{r:?}");
        let r = a.send(&[0x10, 0, 0]);
        assert!(matches!(r, Err(DropReason::Malformed)), "{r:?}");
        assert!(a.take_out().is_empty());
        assert_eq!(
            a.drops.snapshot(),
            DropCounts {
                no_route: 1,
                no_endpoint: 1,
                invalid: 1,
                ..DropCounts::default()
            }
        );
    }

    #[test]
    fn packets_wait_for_the_handshake_sixteen_at_most_in_order() {
        let (mut a, mut b) = pair();
        let pkts: Vec<Vec<u8>> = (0..=QUEUE_PACKETS)
            .map(|i| udp4(a.tun_ip, b.tun_ip, &[i as u8; 10]))
            .collect();
        let sent: Vec<Sent> = pkts.iter().map(|p| a.send(p).expect("a route")).collect();
        assert!(sent[..QUEUE_PACKETS].iter().all(|s| *s == Sent::Queued));
        assert_eq!(sent[QUEUE_PACKETS], Sent::QueueFull);
        assert_eq!(a.drops.snapshot().queue_full, 1);
        // One initiation, however many reads wanted one.
        let out = a.take_out();
        assert_eq!(out.len(), 1);
        assert_eq!(
            MessageType::of(&out[0].1),
            Some(MessageType::HandshakeInitiation)
        );
        b.receive(a.addr, &out[0].1);
        b.deliver(&mut a);
        // The first keepalive, then the queue in order.
        let got = a.deliver(&mut b);
        assert_eq!(got.len(), 1 + QUEUE_PACKETS);
        assert_eq!(b.take_tun(), pkts[..QUEUE_PACKETS].to_vec());
    }

    #[test]
    fn a_packet_too_large_for_a_slot_is_dropped_and_counted() {
        let (mut a, _) = connected();
        let big = udp4(a.tun_ip, ip("100.64.0.2"), &[7; SLOT]);
        assert_eq!(a.send(&big).expect("a route"), Sent::TooLarge);
        assert!(a.take_out().is_empty());
        assert_eq!(a.drops.snapshot().queue_full, 1);
    }

    #[test]
    fn the_persistent_keepalive_goes_out_after_an_idle_interval() {
        let (mut a, mut b) = connected();
        a.add_peer(b.as_peer(25));
        let peer = std::sync::Arc::clone(a.peer(&b.public));
        // Just sent: nothing due.
        tick(&peer, a.now + Duration::from_secs(24), &mut a.out);
        assert!(a.take_out().is_empty());
        let later = a.now + Duration::from_secs(25);
        tick(&peer, later, &mut a.out);
        let got = a.deliver(&mut b);
        assert!(matches!(got[..], [Received::Keepalive]), "{got:?}");
        assert_eq!(peer.lock().last_sent, Some(later));
        // Without a session, the keepalive is an initiation.
        let (mut c, d) = pair();
        c.add_peer(d.as_peer(25));
        let peer = std::sync::Arc::clone(c.peer(&d.public));
        tick(&peer, c.now, &mut c.out);
        let out = c.take_out();
        assert_eq!(out.len(), 1);
        assert_eq!(
            MessageType::of(&out[0].1),
            Some(MessageType::HandshakeInitiation)
        );
    }
}
