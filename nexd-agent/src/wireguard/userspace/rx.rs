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
        let r = match self.addressee(src, d, replies) {
            Ok(to) => self.open(to, src, d, plain, replies),
            Err(r) => r,
        };
        if let Received::Dropped(reason) = &r {
            trace!(%src, %reason, "datagram dropped");
            self.drops.count(reason, 1);
        }
        r
    }

    /// Passes the datagram (of type `kind`, for peer `pi`) through the
    /// peer's `Tunn`, which decrypts, answers or refuses it; once it is
    /// authenticated, the peer's endpoint follows it and the packets that
    /// waited for the handshake go out.
    fn open(
        &mut self,
        (kind, pi): (MessageType, usize),
        src: SocketAddr,
        d: &[u8],
        plain: &mut PlainBatch,
        replies: &mut SendBatch,
    ) -> Received {
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
        Received::Dropped(DropReason::Source(from))
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

#[cfg(test)]
mod tests {
    use boringtun::noise::{TunnResult, errors::WireGuardError};

    use super::*;
    use crate::wireguard::userspace::{
        drops::DropCounts,
        testing::{Device, addr, connected, ip, pair, udp4},
        tx::Sent,
    };

    fn types(out: &[(SocketAddr, Vec<u8>)]) -> Vec<Option<MessageType>> {
        out.iter().map(|(_, d)| MessageType::of(d)).collect()
    }

    #[test]
    fn a_handshake_through_the_cores_then_data_both_ways() {
        let (mut a, mut b) = pair();
        let hello = udp4(a.tun_ip, b.tun_ip, b"hello");
        // No session: the packet waits, an initiation goes out.
        assert_eq!(a.send(&hello).expect("a route"), Sent::Queued);
        let init = a.take_out();
        assert_eq!(types(&init), [Some(MessageType::HandshakeInitiation)]);
        assert_eq!(init[0].0, b.addr);
        // b answers and has a session (as responder).
        assert!(matches!(b.receive(a.addr, &init[0].1), Received::Handshake));
        assert!(b.peer(&a.public).lock().last_handshake.is_some());
        let resp = b.take_out();
        assert_eq!(types(&resp), [Some(MessageType::HandshakeResponse)]);
        // a completes it: the first keepalive and the waiting packet.
        assert!(matches!(a.receive(b.addr, &resp[0].1), Received::Handshake));
        assert!(a.peer(&b.public).lock().last_handshake.is_some());
        let data = a.take_out();
        assert_eq!(
            types(&data),
            [Some(MessageType::Data), Some(MessageType::Data)]
        );
        let got = b.receive_batch(&[(a.addr, data[0].1.clone()), (a.addr, data[1].1.clone())]);
        assert!(
            matches!(got[..], [Received::Keepalive, Received::ToTun]),
            "{got:?}"
        );
        assert_eq!(b.take_tun(), vec![hello]);
        // And back, encrypted at once.
        let world = udp4(b.tun_ip, a.tun_ip, b"world");
        assert_eq!(b.send(&world).expect("a route"), Sent::Encrypted);
        let got = b.deliver(&mut a);
        assert!(matches!(got[..], [Received::ToTun]), "{got:?}");
        assert_eq!(a.take_tun(), vec![world]);
        for d in [&a, &b] {
            assert_eq!(d.drops.snapshot(), DropCounts::default());
        }
        let (pa, pb) = (a.peer(&b.public), b.peer(&a.public));
        // Every datagram counted once on each side.
        let a_sent = [&init[0].1, &data[0].1, &data[1].1]
            .map(Vec::len)
            .iter()
            .sum::<usize>();
        assert_eq!(pa.tx_bytes.load(Ordering::Relaxed), a_sent as u64);
        assert_eq!(pb.rx_bytes.load(Ordering::Relaxed), a_sent as u64);
        assert_eq!(
            pa.rx_bytes.load(Ordering::Relaxed),
            pb.tx_bytes.load(Ordering::Relaxed)
        );
    }

    #[test]
    fn under_load_an_initiation_gets_a_cookie_and_the_retry_with_it_passes() {
        let mut a = Device::new("192.0.2.1:51820", "100.64.0.1");
        // b is under load from its first handshake message on.
        let mut b = Device::with_handshake_limit("192.0.2.2:51820", "100.64.0.2", Some(0));
        a.knows(&b);
        b.knows(&a);
        let hello = udp4(a.tun_ip, b.tun_ip, b"hello");
        a.send(&hello).expect("a route");
        let init = a.take_out();
        assert!(matches!(
            b.receive(a.addr, &init[0].1),
            Received::CookieSent
        ));
        // Answered before any DH: b did not even build its Tunn for a.
        assert!(b.peer(&a.public).lock().built_tunn().is_none());
        let cookie = b.take_out();
        assert_eq!(types(&cookie), [Some(MessageType::CookieReply)]);
        assert_eq!(cookie[0].0, a.addr);
        // The same initiation again: still no cookie MAC, still a cookie.
        assert!(matches!(
            b.receive(a.addr, &init[0].1),
            Received::CookieSent
        ));
        b.take_out();
        assert!(matches!(
            a.receive(b.addr, &cookie[0].1),
            Received::CookieStored
        ));
        // The retry (Tunn's timer sends it after 5 s) carries the cookie.
        let mut slot = [0u8; 256];
        let retry = match a
            .peer(&b.public)
            .lock()
            .tunn()
            .format_handshake_initiation(&mut slot, true)
        {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("no initiation: {other:?}"),
        };
        assert!(matches!(b.receive(a.addr, &retry), Received::Handshake));
        b.deliver(&mut a);
        a.deliver(&mut b);
        assert_eq!(b.take_tun(), vec![hello]);
        assert_eq!(b.drops.snapshot(), DropCounts::default());
    }

    #[test]
    fn an_authenticated_datagram_from_a_new_address_moves_the_endpoint() {
        let (mut a, mut b) = connected();
        let moved = addr("198.51.100.9:40000");
        let pkt = udp4(a.tun_ip, b.tun_ip, b"from a new network");
        a.send(&pkt).expect("a route");
        let out = a.take_out();
        assert!(matches!(b.receive(moved, &out[0].1), Received::ToTun));
        assert_eq!(b.peer(&a.public).lock().endpoint, Some(moved));
        // b's next datagram goes there.
        b.send(&udp4(b.tun_ip, a.tun_ip, b"reply"))
            .expect("a route");
        assert_eq!(b.take_out()[0].0, moved);
        // A keepalive is authenticated too.
        b.send(&udp4(b.tun_ip, a.tun_ip, b"x")).expect("a route");
        b.take_out();
        let back = a.addr;
        let mut s = a.peer(&b.public).lock();
        let mut slot = [0u8; 64];
        let keepalive = match s.tunn().encapsulate(&[], &mut slot) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("no keepalive: {other:?}"),
        };
        drop(s);
        assert!(matches!(b.receive(back, &keepalive), Received::Keepalive));
        assert_eq!(b.peer(&a.public).lock().endpoint, Some(back));
    }

    #[test]
    fn a_replayed_datagram_is_dropped_and_counted() {
        let (mut a, mut b) = connected();
        let pkt = udp4(a.tun_ip, b.tun_ip, b"once");
        a.send(&pkt).expect("a route");
        let d = a.take_out().remove(0).1;
        assert!(matches!(b.receive(a.addr, &d), Received::ToTun));
        let rx = b.peer(&a.public).rx_bytes.load(Ordering::Relaxed);
        // The same datagram again, from elsewhere.
        let replayer = addr("203.0.113.66:9999");
        let r = b.receive(replayer, &d);
        assert!(
            matches!(
                r,
                Received::Dropped(DropReason::Rejected(WireGuardError::DuplicateCounter))
            ),
            "{r:?}"
        );
        assert_eq!(b.take_tun(), vec![pkt]);
        assert_eq!(b.drops.snapshot().invalid, 1);
        let p = b.peer(&a.public);
        assert_eq!(p.rx_bytes.load(Ordering::Relaxed), rx);
        assert_eq!(p.lock().endpoint, Some(a.addr));
    }

    #[test]
    fn forged_datagrams_are_dropped_counted_and_move_nothing() {
        let (mut a, mut b) = connected();
        let forger = addr("203.0.113.66:9999");
        a.send(&udp4(a.tun_ip, b.tun_ip, b"genuine"))
            .expect("a route");
        let genuine = a.take_out().remove(0).1;
        // A flipped bit in the ciphertext.
        let mut forged = genuine.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let r = b.receive(forger, &forged);
        assert!(
            matches!(
                r,
                Received::Dropped(DropReason::Rejected(WireGuardError::InvalidAeadTag))
            ),
            "{r:?}"
        );
        // For a receiver index nobody has.
        let mut stray = genuine.clone();
        stray[4..8].copy_from_slice(&0x00ff_ff00u32.to_le_bytes());
        assert!(matches!(
            b.receive(forger, &stray),
            Received::Dropped(DropReason::UnknownPeer)
        ));
        // An initiation with a wrong MAC, and no WireGuard message at all.
        let (mut c, _) = pair();
        c.knows(&b);
        c.send(&udp4(c.tun_ip, b.tun_ip, b"x")).expect("a route");
        let mut init = c.take_out().remove(0).1;
        init[20] ^= 1;
        assert!(matches!(
            b.receive(forger, &init),
            Received::Dropped(DropReason::Rejected(WireGuardError::InvalidMac))
        ));
        assert!(matches!(
            b.receive(forger, &[1, 2, 3, 4, 5]),
            Received::Dropped(DropReason::Malformed)
        ));
        assert!(b.take_tun().is_empty());
        assert!(b.take_out().is_empty(), "a forged datagram was answered");
        assert_eq!(
            b.drops.snapshot(),
            DropCounts {
                invalid: 4,
                ..DropCounts::default()
            }
        );
        assert_eq!(b.peer(&a.public).lock().endpoint, Some(a.addr));
        // The genuine one still passes.
        assert!(matches!(b.receive(a.addr, &genuine), Received::ToTun));
    }

    #[test]
    fn a_packet_from_outside_the_peers_allowed_ips_is_dropped_and_counted() {
        let (mut a, mut b) = connected();
        let foreign = ip("10.9.9.9");
        let spoofed = udp4(foreign, b.tun_ip, b"not a's address");
        a.send(&spoofed).expect("a route");
        let got = a.deliver(&mut b);
        assert!(
            matches!(got[..], [Received::Dropped(DropReason::Source(from))] if from == foreign),
            "{got:?}"
        );
        assert!(b.take_tun().is_empty());
        assert_eq!(b.drops.snapshot().source, 1);
        // a's own address still passes, in the same batch as another
        // spoofed one.
        let own = udp4(a.tun_ip, b.tun_ip, b"mine");
        a.send(&spoofed).expect("a route");
        a.send(&own).expect("a route");
        let got = a.deliver(&mut b);
        assert!(
            matches!(
                got[..],
                [Received::Dropped(DropReason::Source(_)), Received::ToTun]
            ),
            "{got:?}"
        );
        assert_eq!(b.take_tun(), vec![own]);
    }
}
