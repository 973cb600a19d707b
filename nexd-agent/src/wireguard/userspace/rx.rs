//! The receive side's decisions, without I/O: one datagram from the
//! underlay in, its outcome out. The peer is found by receiver index (or,
//! for an initiation, by the MACs, the cookie under load, then the static
//! key), the datagram goes through its `Tunn`, a decrypted packet's inner
//! source is checked against the peer's AllowedIPs and the packet kept for
//! the TUN, answers (handshake responses, keepalives, cookie replies, the
//! packets that waited for the handshake) land in the reply batch, and an
//! authenticated datagram moves the peer's endpoint to where it came from
//! (roaming).
//!
//! `engine` receives the datagrams and empties the batches; before each
//! datagram it makes room (a free TUN slot, [`REPLY_ROOM`] reply slots).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{MutexGuard, atomic::Ordering},
    time::Instant,
};

use boringtun::noise::{Packet, Tunn, TunnResult, handshake::parse_handshake_anon};
use tracing::trace;

use super::{
    batch::{PlainBatch, SLOT, SendBatch},
    drops::{DropReason, Drops},
    message::{MessageType, completes_handshake},
    peers::{Keys, PeerState, QUEUE_PACKETS, Table},
    tx,
};
use crate::keys::PublicKey;

/// Free reply slots one datagram may fill: its answer and the packets
/// that waited for the handshake.
pub const REPLY_ROOM: usize = 1 + QUEUE_PACKETS;

/// What became of one datagram. Roaming is not an outcome of its own:
/// any authenticated datagram (data, keepalive, handshake) moves the
/// peer's endpoint to its source, as in the kernel.
#[derive(Debug)]
pub enum Received {
    /// Decrypted; the packet is in the TUN batch.
    ToTun,
    /// A keepalive (an empty data message).
    Keepalive,
    /// A handshake message answered, which completes the handshake: an
    /// initiation with a response (as responder), a response with the
    /// first keepalive (as initiator).
    Handshake,
    /// Answered with a cookie reply: the device is under load and the
    /// initiation did not carry a valid cookie MAC.
    CookieSent,
    /// The peer's cookie reply, kept by `Tunn` for the next initiation.
    CookieStored,
    /// Dropped (and counted).
    Dropped(DropReason),
}

/// The peer whose lock is held across consecutive datagrams.
struct Locked<'t> {
    index: usize,
    state: MutexGuard<'t, PeerState>,
    /// The last inner source address found to belong to this peer.
    allowed_src: Option<IpAddr>,
}

/// The receive side for one batch of datagrams: the table, keys and clock
/// of the batch, and the lock of the peer the last datagram was for
/// (released when the receiver is dropped).
pub struct Receiver<'t> {
    table: &'t Table,
    keys: &'t Keys,
    drops: &'t Drops,
    /// One clock read per batch.
    now: Instant,
    locked: Option<Locked<'t>>,
}

impl<'t> Receiver<'t> {
    pub fn new(table: &'t Table, keys: &'t Keys, drops: &'t Drops, now: Instant) -> Self {
        Receiver {
            table,
            keys,
            drops,
            now,
            locked: None,
        }
    }

    /// Takes datagram `d` from `src`: a packet for the TUN into `plain`
    /// (which needs a free slot), answers into `replies` (which needs
    /// [`REPLY_ROOM`] free slots), drops counted.
    pub fn datagram(
        &mut self,
        src: SocketAddr,
        d: &[u8],
        plain: &mut PlainBatch,
        replies: &mut SendBatch,
    ) -> Received {
        debug_assert!(!plain.is_full() && replies.room() >= REPLY_ROOM);
        let r = self.decide(src, d, plain, replies);
        if let Received::Dropped(reason) = &r {
            trace!(%src, %reason, "datagram dropped");
            self.drops.count(reason, 1);
        }
        r
    }

    fn decide(
        &mut self,
        src: SocketAddr,
        d: &[u8],
        plain: &mut PlainBatch,
        replies: &mut SendBatch,
    ) -> Received {
        let (kind, pi) = match self.addressee(src, d, replies) {
            Ok(found) => found,
            Err(r) => return r,
        };
        let table = self.table;
        let l = lock(&mut self.locked, table, pi);
        let now = self.now;
        let mut sent = 0;
        let received = match l.state.tunn().decapsulate(Some(src.ip()), d, plain.slot()) {
            TunnResult::WriteToTunnelV4(pkt, from) => {
                let len = pkt.len();
                accept(table, l, pi, IpAddr::V4(from), len, plain)
            }
            TunnResult::WriteToTunnelV6(pkt, from) => {
                let len = pkt.len();
                accept(table, l, pi, IpAddr::V6(from), len, plain)
            }
            TunnResult::WriteToNetwork(out) => {
                let sent_kind = MessageType::of(out);
                sent += out.len();
                replies.push(out, src);
                if sent_kind.is_some_and(|s| completes_handshake(kind, s)) {
                    l.state.last_handshake = Some(now);
                }
                sent += drain_tunn_queue(&mut l.state, replies, src);
                if sent_kind == Some(MessageType::CookieReply) {
                    // Under load, answered by `Tunn`'s own check: nothing
                    // authenticated.
                    return Received::CookieSent;
                }
                Received::Handshake
            }
            TunnResult::Done if kind == MessageType::Data => Received::Keepalive,
            TunnResult::Done => return Received::CookieStored,
            TunnResult::Err(e) => return Received::Dropped(DropReason::Rejected(e)),
        };
        // Authenticated from here on (a packet with a foreign inner source
        // too: its peer sent it).
        let peer = &table.peers[pi];
        peer.rx_bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
        // Roaming: the peer is wherever its authenticated packets come from.
        if l.state.endpoint != Some(src) {
            l.state.endpoint = Some(src);
        }
        sent += tx::send_queue(&mut l.state, replies, src);
        tx::note_sent(peer, &mut l.state, sent, now);
        received
    }

    /// The datagram's type and the peer it is for; or its outcome when it
    /// is for none (dropped, or answered with a cookie).
    fn addressee(
        &self,
        src: SocketAddr,
        d: &[u8],
        replies: &mut SendBatch,
    ) -> Result<(MessageType, usize), Received> {
        let Ok(packet) = Tunn::parse_incoming_packet(d) else {
            return Err(Received::Dropped(DropReason::Malformed));
        };
        let kind = MessageType::of_packet(&packet);
        let table = self.table;
        let pi = match packet {
            Packet::HandshakeInit(p) => {
                // MACs (and under load the cookie) before the expensive DH.
                match self
                    .keys
                    .limiter
                    .verify_packet(Some(src.ip()), d, replies.slot())
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        let n = cookie.len();
                        replies.commit(n, src);
                        return Err(Received::CookieSent);
                    }
                    Err(TunnResult::Err(e)) => {
                        return Err(Received::Dropped(DropReason::Rejected(e)));
                    }
                    Err(_) => return Err(Received::Dropped(DropReason::Malformed)),
                }
                parse_handshake_anon(&self.keys.secret, &self.keys.public, &p)
                    .ok()
                    .and_then(|h| table.by_key(&PublicKey(h.peer_static_public)))
            }
            Packet::HandshakeResponse(p) => table.by_receiver(p.receiver_idx),
            Packet::PacketCookieReply(p) => table.by_receiver(p.receiver_idx),
            Packet::PacketData(p) => table.by_receiver(p.receiver_idx),
        };
        let Some(pi) = pi else {
            return Err(Received::Dropped(DropReason::UnknownPeer));
        };
        // The decrypted packet must fit a slot (Tunn panics otherwise).
        if d.len() > SLOT {
            return Err(Received::Dropped(DropReason::Malformed));
        }
        Ok((kind, pi))
    }
}

/// The lock of peer `pi`, kept from the previous datagram or taken now
/// (the previous peer's released first).
fn lock<'a, 't>(
    locked: &'a mut Option<Locked<'t>>,
    table: &'t Table,
    pi: usize,
) -> &'a mut Locked<'t> {
    if locked.as_ref().is_some_and(|l| l.index != pi) {
        *locked = None;
    }
    locked.get_or_insert_with(|| Locked {
        index: pi,
        state: table.peers[pi].lock(),
        allowed_src: None,
    })
}

/// Keeps a decrypted packet if its source belongs to the peer that sent
/// it (cryptokey routing), drops it otherwise.
fn accept(
    table: &Table,
    l: &mut Locked<'_>,
    pi: usize,
    from: IpAddr,
    len: usize,
    plain: &mut PlainBatch,
) -> Received {
    if l.allowed_src == Some(from) || table.route(from) == Some(pi) {
        l.allowed_src = Some(from);
        plain.commit(len);
        Received::ToTun
    } else {
        trace!(%from, "inner source not in the peer's AllowedIPs; dropped");
        Received::Dropped(DropReason::Source)
    }
}

/// What `Tunn` queued itself. Nothing reaches `encapsulate` without a
/// session, so its queue stays empty; drained anyway as boringtun asks,
/// while that leaves room for the peer's own queue.
fn drain_tunn_queue(s: &mut PeerState, replies: &mut SendBatch, to: SocketAddr) -> usize {
    let mut sent = 0;
    while replies.room() > QUEUE_PACKETS {
        match s.tunn().decapsulate(None, &[], replies.slot()) {
            TunnResult::WriteToNetwork(q) => {
                let n = q.len();
                replies.commit(n, to);
                sent += n;
            }
            _ => break,
        }
    }
    sent
}

