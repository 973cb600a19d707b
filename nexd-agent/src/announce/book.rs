//! What this agent knows about every peer from their announcements: who
//! said what and when, with replay protection and round-trip times. Pure
//! logic with an injected clock; the sockets live in `announce::Announcer`.
//!
//! What it believes, and what it does not:
//! * an announcement counts only from the mesh address of the peer whose
//!   key it names, with that pair's MAC, and a sequence number above the
//!   last one accepted (`seq` explains the numbers);
//! * once [`PeerBook::enforce_exit_authorization`] has been called, an
//!   exit capability counts only from a peer the mesh file lets serve
//!   this device (`Mesh::serves`); from any other peer the announcement
//!   is a heartbeat and nothing more, and [`PeerLive::exit_not_allowed`]
//!   says so;
//! * a round-trip sample counts only when the hold time the peer reports
//!   is smaller than the round trip measured here: a peer cannot make
//!   itself look faster than "no time at all" by inflating its hold time.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use serde::Serialize;

pub use super::live::PeerLive;
use super::{
    live,
    seq::SeqSource,
    wire::{self, Announcement, DecodeError, LoadReport, PairKey},
};
use crate::{
    keys::{PrivateKey, PublicKey},
    mesh::Mesh,
};

/// Sent announcements remembered per peer for RTT matching (a second of
/// probes and heartbeats to a watched exit node).
const SENT_MEMORY: usize = 16;

/// New peers in one [`PeerBook::sync`] from which their pair keys are
/// derived on a thread of their own: one X25519 operation each (about
/// 50 µs), which for a 1,000-device mesh file was a fifth of nexd's
/// start-up. Fewer are derived when first needed.
const BACKGROUND_DERIVE: usize = 32;

/// Why an incoming datagram was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("source {0} is not the mesh address of any peer")]
    UnknownSource(IpAddr),
    #[error("malformed: {0}")]
    Decode(#[from] DecodeError),
    #[error("claims key {claimed} but comes from the address of {actual}")]
    KeyMismatch { claimed: String, actual: String },
    #[error("sequence {got} is not newer than {last} (replayed or reordered)")]
    Replay { got: u64, last: u64 },
}

/// What the book did with announcements, by outcome: for status and
/// metrics. Every rejection counts under exactly one reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BookCounters {
    pub accepted: u64,
    /// From an address that is no peer's mesh address.
    pub unknown_source: u64,
    /// Not an announcement (length, magic, version).
    pub malformed: u64,
    /// Names another device than the one whose address it comes from.
    pub key_mismatch: u64,
    /// The MAC does not verify (forged or altered).
    pub bad_mac: u64,
    /// Sequence number not above the last accepted one.
    pub replayed: u64,
    /// Accepted, but its exit capability ignored: the mesh file does not
    /// let that peer serve this device.
    pub exit_not_allowed: u64,
    /// Accepted, but its round-trip sample discarded: the hold time it
    /// reports is not smaller than the measured round trip.
    pub rtt_discarded: u64,
}

impl BookCounters {
    fn count(&mut self, r: &Rejected) {
        let c = match r {
            Rejected::UnknownSource(_) => &mut self.unknown_source,
            Rejected::Decode(DecodeError::Mac) => &mut self.bad_mac,
            Rejected::Decode(_) => &mut self.malformed,
            Rejected::KeyMismatch { .. } => &mut self.key_mismatch,
            Rejected::Replay { .. } => &mut self.replayed,
        };
        *c += 1;
    }
}

struct PeerEntry {
    name: String,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    /// Derived when first needed, or by the background derivation.
    pair: Option<PairKey>,
    live: PeerLive,
}

/// Pair keys being derived on a thread of their own (see
/// [`BACKGROUND_DERIVE`]).
type PendingPairs = std::thread::JoinHandle<Vec<(PublicKey, PairKey)>>;

/// Every peer's identity and live announcement state.
pub struct PeerBook {
    own: PrivateKey,
    own_pub: PublicKey,
    peers: HashMap<PublicKey, PeerEntry>,
    by_addr: HashMap<IpAddr, PublicKey>,
    seq: SeqSource,
    /// Peers whose exit capability this device believes; `None` until
    /// the daemon enforces the mesh file's authorization (everyone).
    exit_allowed: Option<HashSet<PublicKey>>,
    counters: BookCounters,
    /// Start of the `sent_at_ms` clock in outgoing announcements.
    epoch: Instant,
    /// The pair keys of a large sync's new peers, derived while start-up
    /// goes on; collected at the first use of any pair key.
    pending: Option<PendingPairs>,
    /// This device's load, sent with the exit capability.
    load: LoadReport,
    /// The exit node this device uses: its announcements carry
    /// `FLAG_USES_EXIT`, so it can count its clients.
    uses: Option<PublicKey>,
}

impl PeerBook {
    /// A book whose sequence numbers come from the wall clock (the
    /// previous scheme): for callers without a state directory. The
    /// daemon uses [`PeerBook::with_epoch`].
    pub fn new(own: PrivateKey, now: Instant) -> Self {
        Self::with_seq(own, SeqSource::WallClock { last: 0 }, now)
    }

    /// A book whose sequence numbers are built on `epoch`, the start
    /// counter from `seq::next_epoch(state_dir)`, read once per start.
    pub fn with_epoch(own: PrivateKey, epoch: u32, now: Instant) -> Self {
        Self::with_seq(own, SeqSource::epoch(epoch), now)
    }

    fn with_seq(own: PrivateKey, seq: SeqSource, now: Instant) -> Self {
        let own_pub = own.public_key();
        PeerBook {
            own,
            own_pub,
            peers: HashMap::new(),
            by_addr: HashMap::new(),
            seq,
            exit_allowed: None,
            counters: BookCounters::default(),
            epoch: now,
            pending: None,
            load: LoadReport::default(),
            uses: None,
        }
    }

    /// From now on, believes exit capabilities only from the peers `mesh`
    /// lets serve this device (`Mesh::exit_nodes_for`), and keeps doing so
    /// on every later [`PeerBook::sync`]. A peer that loses the right
    /// stops counting as exit node at once (not at its next heartbeat);
    /// one that gains it counts at once if its last announcement said so.
    /// Returns the peers whose standing as exit node changed.
    pub fn enforce_exit_authorization(&mut self, mesh: &Mesh) -> Vec<PublicKey> {
        let allowed = mesh
            .exit_nodes_for(&self.own_pub)
            .map(|d| d.public_key)
            .collect();
        self.exit_allowed = Some(allowed);
        self.apply_exit_authorization()
    }

    /// Recomputes every peer's believed flags from what it announced.
    fn apply_exit_authorization(&mut self) -> Vec<PublicKey> {
        let mut changed = Vec::new();
        for (k, e) in &mut self.peers {
            let before = e.live.is_exit();
            e.live.flags = believed_flags(self.exit_allowed.as_ref(), k, e.live.announced_flags);
            if before != e.live.is_exit() {
                changed.push(*k);
            }
        }
        changed
    }

    /// What the book counted so far.
    pub fn counters(&self) -> BookCounters {
        self.counters
    }

    /// Every peer's mesh addresses: the sources the announcement sockets
    /// should admit (`Announcer::set_peers`).
    pub fn peer_addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.by_addr.keys().copied()
    }

    /// Follows the mesh file: new peers are added, removed ones dropped,
    /// and peers that stay keep their live state. Once exit authorization
    /// is enforced, it follows the file too.
    pub fn sync(&mut self, mesh: &Mesh) {
        // Whatever is still being derived belongs to the old peer set.
        self.collect_pending();
        let mut keep = HashMap::with_capacity(mesh.devices.len());
        let mut new = Vec::new();
        for d in mesh.peers_of(&self.own_pub) {
            // A peer that stays keeps its live state and its pair key (an
            // X25519 operation per peer is most of a 1,000-peer reload).
            let (live, pair) = match self.peers.remove(&d.public_key) {
                Some(e) => (e.live, e.pair),
                None => {
                    new.push(d.public_key);
                    (PeerLive::default(), None)
                }
            };
            keep.insert(
                d.public_key,
                PeerEntry {
                    name: d.name.clone(),
                    v4: d.ipv4,
                    v6: d.ipv6,
                    pair,
                    live,
                },
            );
        }
        self.peers = keep;
        if new.len() >= BACKGROUND_DERIVE {
            let own = self.own.clone();
            let derive = move || new.iter().map(|k| (*k, PairKey::derive(&own, k))).collect();
            // Without a thread, each key is derived when first needed.
            self.pending = std::thread::Builder::new()
                .name("nexd-pairkeys".into())
                .spawn(derive)
                .ok();
        }
        self.by_addr = self
            .peers
            .iter()
            .flat_map(|(k, e)| [(IpAddr::V4(e.v4), *k), (IpAddr::V6(e.v6), *k)])
            .collect();
        if self.exit_allowed.is_some() {
            self.enforce_exit_authorization(mesh);
        }
    }

    /// Takes the background derivation's keys, waiting for it if it is
    /// still running (it started with the sync, so little is left).
    fn collect_pending(&mut self) {
        let Some(handle) = self.pending.take() else {
            return;
        };
        // A panicked derivation leaves the keys to be derived on use.
        for (k, pair) in handle.join().unwrap_or_default() {
            if let Some(e) = self.peers.get_mut(&k) {
                e.pair.get_or_insert(pair);
            }
        }
    }

    /// The pair key of the peer with `key`, derived now if need be.
    fn pair_key(&mut self, key: &PublicKey) -> Option<PairKey> {
        self.collect_pending();
        let e = self.peers.get_mut(key)?;
        Some(
            e.pair
                .get_or_insert_with(|| PairKey::derive(&self.own, key))
                .clone(),
        )
    }

    /// Live state of the peer with `key`.
    pub fn live(&self, key: &PublicKey) -> Option<&PeerLive> {
        self.peers.get(key).map(|e| &e.live)
    }

    /// Name of the peer with `key`.
    pub fn name(&self, key: &PublicKey) -> Option<&str> {
        self.peers.get(key).map(|e| e.name.as_str())
    }

    /// Every peer key.
    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.peers.keys()
    }

    /// The load this device reports from now on, in the announcements
    /// that carry the exit capability (an exit node's, `exit_role`).
    pub fn set_load(&mut self, load: LoadReport) {
        self.load = load;
    }

    /// The exit node this device uses from now on (`None`: none); only
    /// the announcements to it say so.
    pub fn set_exit_in_use(&mut self, exit: Option<PublicKey>) {
        self.uses = exit;
    }

    /// Peers whose latest announcement, younger than `live::STALE_AFTER`,
    /// says they use this device as exit node: its clients now.
    pub fn clients_using(&self, now: Instant) -> usize {
        self.peers
            .values()
            .filter(|e| {
                e.live.announced_flags & wire::FLAG_USES_EXIT != 0
                    && e.live
                        .last_heard
                        .is_some_and(|t| now.saturating_duration_since(t) < live::STALE_AFTER)
            })
            .count()
    }

    /// One announcement per peer, to its mesh IPv4 address on `port`.
    pub fn outgoing(
        &mut self,
        flags: u8,
        port: u16,
        now: Instant,
    ) -> Vec<(SocketAddr, [u8; wire::LEN])> {
        let keys: Vec<PublicKey> = self.peers.keys().copied().collect();
        keys.iter()
            .filter_map(|k| self.outgoing_to(k, flags, port, now))
            .collect()
    }

    /// One announcement to the peer with `key` (a probe or the answer to
    /// one, with `FLAG_PROBE` in `flags` for a probe).
    pub fn outgoing_to(
        &mut self,
        key: &PublicKey,
        flags: u8,
        port: u16,
        now: Instant,
    ) -> Option<(SocketAddr, [u8; wire::LEN])> {
        let pair = self.pair_key(key)?;
        let e = self.peers.get_mut(key)?;
        let seq = self.seq.next_seq();
        let sent_at_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let (echo_seq, echo_hold_ms) = e.live.echo.map_or((0, 0), |(s, at)| {
            (s, now.saturating_duration_since(at).as_millis() as u32)
        });
        let flags = if self.uses == Some(*key) {
            flags | wire::FLAG_USES_EXIT
        } else {
            flags
        };
        let load = if flags & wire::FLAG_EXIT != 0 {
            self.load
        } else {
            LoadReport::default()
        };
        let a = Announcement {
            flags,
            seq,
            sender: self.own_pub,
            sent_at_ms,
            echo_seq,
            echo_hold_ms,
            load,
        };
        e.live
            .sent
            .push_back((seq, now, flags & wire::FLAG_PROBE != 0));
        while e.live.sent.len() > SENT_MEMORY {
            e.live.sent.pop_front();
        }
        Some((
            SocketAddr::new(IpAddr::V4(e.v4), port),
            wire::encode(&a, &pair),
        ))
    }

    /// The peers this device probes from now on (`watched` ones are
    /// judged by the probes' deadline). A peer that leaves the set while
    /// past that deadline stays lost until it is heard again, so dropping
    /// it from the probes never makes it look alive.
    pub fn set_probed(&mut self, probed: &[PublicKey], now: Instant) {
        for (k, e) in &mut self.peers {
            let live = &mut e.live;
            if probed.contains(k) {
                live.probed_since.get_or_insert(now);
            } else if live.probed_since.is_some() {
                if live.watched()
                    && live.last_heard.is_none_or(|h| {
                        now.saturating_duration_since(h) >= live::probe_deadline(live)
                    })
                {
                    live.lost = true;
                }
                live.probed_since = None;
                live.probe_answered = None;
            }
        }
    }

    /// Checks and records an incoming datagram from `from`. Returns the
    /// sender's key, and whether its standing as exit node (for this
    /// device) changed.
    pub fn receive(
        &mut self,
        from: IpAddr,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(PublicKey, bool), Rejected> {
        let r = self.check_and_record(from, bytes, now);
        match &r {
            Ok(_) => self.counters.accepted += 1,
            Err(e) => self.counters.count(e),
        }
        r
    }

    fn check_and_record(
        &mut self,
        from: IpAddr,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(PublicKey, bool), Rejected> {
        let from = from.to_canonical();
        let actual = *self
            .by_addr
            .get(&from)
            .ok_or(Rejected::UnknownSource(from))?;
        let claimed = wire::peek_sender(bytes)?;
        if claimed != actual {
            return Err(Rejected::KeyMismatch {
                claimed: claimed.to_string(),
                actual: actual.to_string(),
            });
        }
        let pair = self
            .pair_key(&actual)
            .ok_or(Rejected::UnknownSource(from))?;
        let e = self
            .peers
            .get_mut(&actual)
            .ok_or(Rejected::UnknownSource(from))?;
        let a = wire::decode(bytes, &pair)?;
        if a.seq <= e.live.last_seq {
            return Err(Rejected::Replay {
                got: a.seq,
                last: e.live.last_seq,
            });
        }
        let was_exit = e.live.is_exit();
        e.live.last_seq = a.seq;
        e.live.last_heard = Some(now);
        e.live.lost = false;
        e.live.announced_flags = a.flags;
        e.live.load = a.load;
        e.live.flags = believed_flags(self.exit_allowed.as_ref(), &actual, a.flags);
        if e.live.exit_not_allowed() {
            self.counters.exit_not_allowed += 1;
        }
        e.live.echo = Some((a.seq, now));
        if a.echo_seq != 0
            && let Some(&(_, sent, probe)) = e.live.sent.iter().find(|(s, ..)| *s == a.echo_seq)
        {
            if probe && e.live.probed_since.is_some() {
                e.live.probe_answered = Some(now);
            }
            let measured = now.saturating_duration_since(sent);
            let hold = Duration::from_millis(u64::from(a.echo_hold_ms));
            if hold < measured {
                let rtt = measured - hold;
                let (srtt, var) = match (e.live.rtt, e.live.rttvar) {
                    (Some(prev), var) => {
                        let dev = prev.abs_diff(rtt);
                        let var = var.map_or(dev, |v| (v * 3 + dev) / 4);
                        ((prev * 7 + rtt) / 8, var)
                    }
                    (None, _) => (rtt, rtt / 2),
                };
                e.live.rtt = Some(srtt);
                e.live.rttvar = Some(var);
            } else {
                // The peer claims to have held our announcement at least
                // as long as the whole round trip took: impossible, or a
                // lie to look faster. Not a sample.
                self.counters.rtt_discarded += 1;
            }
        }
        Ok((actual, was_exit != e.live.is_exit()))
    }

    /// Records the handshake age the backend reports for `key`.
    pub fn observe_handshake(&mut self, key: &PublicKey, age: Option<Duration>, now: Instant) {
        if let (Some(e), Some(age)) = (self.peers.get_mut(key), age)
            && let Some(at) = now.checked_sub(age)
            && e.live.last_handshake.is_none_or(|prev| at > prev)
        {
            e.live.last_handshake = Some(at);
        }
    }
}

/// The flags this device believes from `announced` by `peer`: the exit
/// bit only if `allowed` (when enforced) includes the peer.
fn believed_flags(allowed: Option<&HashSet<PublicKey>>, peer: &PublicKey, announced: u8) -> u8 {
    match allowed {
        Some(set) if !set.contains(peer) => announced & !wire::FLAG_EXIT,
        _ => announced,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use crate::testing::ip;

    /// A mesh of the devices with these keys, `d0`, `d1`...
    fn mesh_of(keys: &[&PrivateKey]) -> Mesh {
        testing::mesh(
            keys.iter()
                .enumerate()
                .map(|(i, k)| testing::device(i, k.public_key())),
        )
    }

    fn pair() -> (PrivateKey, PrivateKey, PeerBook, PeerBook, Instant) {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let m = mesh_of(&[&a, &b]);
        let now = Instant::now();
        let mut ba = PeerBook::new(a.clone(), now);
        let mut bb = PeerBook::new(b.clone(), now);
        ba.sync(&m);
        bb.sync(&m);
        (a, b, ba, bb, now)
    }

    #[test]
    fn pair_keys_derived_in_the_background_authenticate_both_ways() {
        // Enough peers for the background derivation, and a second sync
        // (a reload) while it may still run.
        let keys: Vec<PrivateKey> = (0..BACKGROUND_DERIVE + 3)
            .map(|_| PrivateKey::generate())
            .collect();
        let refs: Vec<&PrivateKey> = keys.iter().collect();
        let m = mesh_of(&refs);
        let now = Instant::now();
        let mut book = PeerBook::new(keys[0].clone(), now);
        book.sync(&m);
        book.sync(&m);
        let last = keys.len() - 1;
        let mut theirs = PeerBook::new(keys[last].clone(), now);
        theirs.sync(&m);
        let out = book.outgoing(0, 51829, now);
        assert_eq!(out.len(), last);
        let to_last: SocketAddr = format!("100.64.0.{}:51829", last + 1).parse().expect("sa");
        let (_, bytes) = out.iter().find(|(to, _)| *to == to_last).expect("sent");
        let from: IpAddr = "100.64.0.1".parse().expect("ip");
        assert!(theirs.receive(from, bytes, now).is_ok());
        let to_first: SocketAddr = "100.64.0.1:51829".parse().expect("sa");
        let back = theirs
            .outgoing(0, 51829, now)
            .into_iter()
            .find(|(to, _)| *to == to_first)
            .expect("answered")
            .1;
        let from_last: IpAddr = format!("100.64.0.{}", last + 1).parse().expect("ip");
        assert!(book.receive(from_last, &back, now).is_ok());
    }

    #[test]
    fn announcements_are_accepted_once_and_in_order() {
        let (a, _b, mut ba, mut bb, now) = pair();
        let out = ba.outgoing(wire::FLAG_EXIT, 51829, now);
        assert_eq!(out.len(), 1);
        let (to, bytes) = out[0];
        assert_eq!(to, "100.64.0.2:51829".parse().expect("sa"));
        let from: IpAddr = "100.64.0.1".parse().expect("ip");
        let (k, changed) = bb.receive(from, &bytes, now).expect("accepted");
        assert_eq!(k, a.public_key());
        assert!(changed);
        assert!(bb.live(&k).expect("live").is_exit());
        // The same datagram again is a replay.
        assert!(matches!(
            bb.receive(from, &bytes, now),
            Err(Rejected::Replay { .. })
        ));
    }

    #[test]
    fn wrong_source_or_claimed_key_is_rejected() {
        let (_a, _b, mut ba, mut bb, now) = pair();
        let (_, bytes) = ba.outgoing(0, 51829, now)[0];
        assert!(matches!(
            bb.receive("100.64.0.99".parse().expect("ip"), &bytes, now),
            Err(Rejected::UnknownSource(_))
        ));
        // From b's own address (e.g. reflected), claiming to be a.
        assert!(matches!(
            bb.receive("100.64.0.2".parse().expect("ip"), &bytes, now),
            Err(Rejected::UnknownSource(_)) | Err(Rejected::KeyMismatch { .. })
        ));
    }

    #[test]
    fn a_third_device_cannot_pose_as_an_exit_node() {
        // c sends, from its own address, an announcement claiming to be a.
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let c = PrivateKey::generate();
        let m = mesh_of(&[&a, &b, &c]);
        let now = Instant::now();
        let mut bb = PeerBook::new(b.clone(), now);
        bb.sync(&m);
        let forged = wire::encode(
            &Announcement {
                flags: wire::FLAG_EXIT,
                seq: u64::MAX,
                sender: a.public_key(),
                sent_at_ms: 0,
                echo_seq: 0,
                echo_hold_ms: 0,
                load: LoadReport::default(),
            },
            &PairKey::derive(&c, &b.public_key()),
        );
        // From c's address: the claimed key is not c's.
        assert!(matches!(
            bb.receive("100.64.0.3".parse().expect("ip"), &forged, now),
            Err(Rejected::KeyMismatch { .. })
        ));
        // Spoofing a's address (an exit peer with 0/0 could): the MAC fails.
        assert!(matches!(
            bb.receive("100.64.0.1".parse().expect("ip"), &forged, now),
            Err(Rejected::Decode(DecodeError::Mac))
        ));
        assert!(!bb.live(&a.public_key()).expect("a").is_exit());
    }

    #[test]
    fn rtt_comes_from_the_echo() {
        let (_a, _b, mut ba, mut bb, t0) = pair();
        let (_, m1) = ba.outgoing(0, 1, t0)[0];
        let t1 = t0 + Duration::from_millis(10);
        bb.receive("100.64.0.1".parse().expect("ip"), &m1, t1)
            .expect("ok");
        // b answers 5 ms later; its echo says it held a's seq for 5 ms.
        let (_, m2) = bb.outgoing(0, 1, t1 + Duration::from_millis(5))[0];
        let t2 = t1 + Duration::from_millis(15);
        let (k, _) = ba
            .receive("100.64.0.2".parse().expect("ip"), &m2, t2)
            .expect("ok");
        assert_eq!(
            ba.live(&k).and_then(|l| l.rtt),
            Some(Duration::from_millis(20))
        );
        // A second round trip of 100 ms (no hold) moves the smoothed RTT
        // by an eighth of the difference: 20 + (100 - 20) / 8 = 30 ms.
        let (_, m3) = ba.outgoing(0, 1, t2)[0];
        let t3 = t2 + Duration::from_millis(50);
        bb.receive("100.64.0.1".parse().expect("ip"), &m3, t3)
            .expect("ok");
        let (_, m4) = bb.outgoing(0, 1, t3)[0];
        ba.receive(
            "100.64.0.2".parse().expect("ip"),
            &m4,
            t3 + Duration::from_millis(50),
        )
        .expect("ok");
        assert_eq!(
            ba.live(&k).and_then(|l| l.rtt),
            Some(Duration::from_millis(30))
        );
    }

    #[test]
    fn an_answered_probe_makes_a_peer_watched_and_dropping_a_dead_one_keeps_it_lost() {
        let (a, b, mut ba, mut bb, t0) = pair();
        let kb = b.public_key();
        let ka = a.public_key();
        ba.set_probed(&[kb], t0);
        // A heartbeat answer is not a probe answer.
        let (_, hb) = ba.outgoing(0, 1, t0)[0];
        bb.receive(ip("100.64.0.1"), &hb, t0).expect("ok");
        let (_, back) = bb.outgoing(wire::FLAG_EXIT, 1, t0)[0];
        ba.receive(ip("100.64.0.2"), &back, t0).expect("ok");
        assert!(!ba.live(&kb).expect("b").watched());
        // A probe, seen by b as asking for an answer, answered at once.
        let t1 = t0 + Duration::from_millis(100);
        let (_, probe) = ba
            .outgoing_to(&kb, wire::FLAG_PROBE, 1, t1)
            .expect("b is a peer");
        bb.receive(ip("100.64.0.1"), &probe, t1).expect("ok");
        assert!(bb.live(&ka).expect("a").asks_for_answer());
        let (_, answer) = bb.outgoing_to(&ka, wire::FLAG_EXIT, 1, t1).expect("a");
        let t2 = t1 + Duration::from_millis(4);
        ba.receive(ip("100.64.0.2"), &answer, t2).expect("ok");
        let lb = ba.live(&kb).expect("b");
        assert!(lb.watched());
        assert_eq!(lb.rtt, Some(Duration::from_millis(4)));
        // b falls silent; past its deadline the probes stop (a failover
        // moved on): b stays lost, not "fresh for 3 s" again.
        let t3 = t2 + Duration::from_millis(400);
        ba.set_probed(&[], t3);
        let lb = ba.live(&kb).expect("b");
        assert!(lb.lost && !lb.watched());
        // Heard again: no longer lost.
        let (_, again) = bb.outgoing(wire::FLAG_EXIT, 1, t3)[0];
        ba.receive(ip("100.64.0.2"), &again, t3).expect("ok");
        assert!(!ba.live(&kb).expect("b").lost);
        // Dropped while alive: not lost.
        ba.set_probed(&[kb], t3);
        let (_, p2) = ba.outgoing_to(&kb, wire::FLAG_PROBE, 1, t3).expect("b");
        bb.receive(ip("100.64.0.1"), &p2, t3).expect("ok");
        let (_, a2) = bb.outgoing_to(&ka, wire::FLAG_EXIT, 1, t3).expect("a");
        ba.receive(ip("100.64.0.2"), &a2, t3).expect("ok");
        ba.set_probed(&[], t3 + Duration::from_millis(50));
        assert!(!ba.live(&kb).expect("b").lost);
    }

    /// The announcement `from` sends to its first peer, as bytes.
    fn first_to(from: &mut PeerBook, flags: u8, now: Instant) -> [u8; wire::LEN] {
        from.outgoing(flags, 51829, now)[0].1
    }

    #[test]
    fn exit_capability_counts_only_from_peers_allowed_to_serve_this_device() {
        // d0 announces itself as exit node to d1.
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let mut m = mesh_of(&[&a, &b]);
        let t0 = Instant::now();
        let mut ba = PeerBook::new(a.clone(), t0);
        let mut bb = PeerBook::new(b.clone(), t0);
        ba.sync(&m);
        bb.sync(&m);
        // Not enforced yet (the daemon has not asked): believed, as before.
        let (k, changed) = bb
            .receive(
                ip("100.64.0.1"),
                &first_to(&mut ba, wire::FLAG_EXIT, t0),
                t0,
            )
            .expect("accepted");
        assert!(changed && bb.live(&k).expect("a").is_exit());

        // Enforced with a file where d0 may not serve: it stops counting
        // at once, and its next announcement is a heartbeat only.
        assert_eq!(bb.enforce_exit_authorization(&m), vec![a.public_key()]);
        let live = bb.live(&k).expect("a");
        assert!(!live.is_exit() && live.exit_not_allowed());
        let (_, changed) = bb
            .receive(
                ip("100.64.0.1"),
                &first_to(&mut ba, wire::FLAG_EXIT, t0),
                t0,
            )
            .expect("accepted as a heartbeat");
        assert!(!changed);
        let live = bb.live(&k).expect("a");
        assert!(!live.is_exit() && live.last_heard == Some(t0));
        assert_eq!(bb.counters().exit_not_allowed, 1);

        // The file now lets d0 serve d1: on the next sync it counts again,
        // from its last announcement.
        m.devices[0].exit_node = true;
        bb.sync(&m);
        assert!(bb.live(&k).expect("a").is_exit());
        // ...but not when its exit_clients leave d1 out.
        m.devices[0].exit_clients = Some(["d0".to_owned()].into());
        bb.sync(&m);
        assert!(!bb.live(&k).expect("a").is_exit());
        m.devices[0].exit_clients = Some(["d1".to_owned()].into());
        bb.sync(&m);
        assert!(bb.live(&k).expect("a").is_exit());
    }

    #[test]
    fn a_hold_time_not_smaller_than_the_round_trip_is_no_sample() {
        let (a, b, mut ba, mut bb, t0) = pair();
        let (_, m1) = ba.outgoing(0, 1, t0)[0];
        let t1 = t0 + Duration::from_millis(10);
        bb.receive(ip("100.64.0.1"), &m1, t1).expect("ok");
        // b really holds a's announcement for 5 ms, but its echo claims
        // 500 ms (to look like a 0 ms exit node). Measured: 20 ms.
        let (_, m2) = bb.outgoing(0, 1, t1 + Duration::from_millis(5))[0];
        let inflated = {
            // The pair key is the same on both ends.
            let key = PairKey::derive(&b, &a.public_key());
            let mut ann = wire::decode(&m2, &key).expect("valid");
            ann.echo_hold_ms = 500;
            wire::encode(&ann, &key)
        };
        let t2 = t1 + Duration::from_millis(10);
        let (k, _) = ba
            .receive(ip("100.64.0.2"), &inflated, t2)
            .expect("accepted");
        assert_eq!(ba.live(&k).and_then(|l| l.rtt), None, "no sample");
        assert_eq!(ba.counters().rtt_discarded, 1);
        // A hold exactly as long as the round trip is not smaller either:
        // b gets a's next announcement at once and answers 10 ms later.
        let (_, m3) = ba.outgoing(0, 1, t2)[0];
        bb.receive(ip("100.64.0.1"), &m3, t2).expect("ok");
        let t3 = t2 + Duration::from_millis(10);
        let (_, m4) = bb.outgoing(0, 1, t3)[0];
        ba.receive(ip("100.64.0.2"), &m4, t3).expect("ok");
        assert_eq!(ba.live(&k).and_then(|l| l.rtt), None);
        assert_eq!(ba.counters().rtt_discarded, 2);
    }

    #[test]
    fn a_restarted_peer_is_heard_whatever_its_clock_did() {
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let m = mesh_of(&[&a, &b]);
        let t0 = Instant::now();
        let mut receiver = PeerBook::new(b.clone(), t0);
        receiver.sync(&m);
        // a runs the previous version (wall-clock numbers)...
        let mut old = PeerBook::new(a.clone(), t0);
        old.sync(&m);
        receiver
            .receive(ip("100.64.0.1"), &first_to(&mut old, 0, t0), t0)
            .expect("old scheme");
        // ...then is upgraded and starts twice with epochs 1 and 2; each
        // run's numbers are above everything before, with no clock at all.
        for epoch in [1, 2] {
            let mut run = PeerBook::with_epoch(a.clone(), epoch, t0);
            run.sync(&m);
            for _ in 0..3 {
                receiver
                    .receive(ip("100.64.0.1"), &first_to(&mut run, 0, t0), t0)
                    .unwrap_or_else(|e| panic!("epoch {epoch}: {e}"));
            }
        }
        // A run with an older epoch (a restored state directory) is a
        // replay: the rule that makes restarts safe.
        let mut stale = PeerBook::with_epoch(a.clone(), 1, t0);
        stale.sync(&m);
        assert!(matches!(
            receiver.receive(ip("100.64.0.1"), &first_to(&mut stale, 0, t0), t0),
            Err(Rejected::Replay { .. })
        ));
        assert_eq!(receiver.counters().accepted, 7);
        assert_eq!(receiver.counters().replayed, 1);
    }

    #[test]
    fn every_rejection_is_counted_under_its_reason() {
        let (a, b, mut ba, mut bb, now) = pair();
        let good = first_to(&mut ba, 0, now);
        let mut altered = first_to(&mut ba, 0, now);
        altered[70] ^= 1;
        let _ = bb.receive(ip("100.64.0.9"), &good, now);
        let _ = bb.receive(ip("100.64.0.1"), &good[..10], now);
        // From b's own address: b is not its own peer.
        let _ = bb.receive(ip("100.64.0.2"), &good, now);
        let _ = bb.receive(ip("100.64.0.1"), &altered, now);
        bb.receive(ip("100.64.0.1"), &good, now).expect("ok");
        let _ = bb.receive(ip("100.64.0.1"), &good, now);
        assert_eq!(
            bb.counters(),
            BookCounters {
                accepted: 1,
                unknown_source: 2,
                malformed: 1,
                key_mismatch: 0,
                bad_mac: 1,
                replayed: 1,
                exit_not_allowed: 0,
                rtt_discarded: 0,
            }
        );
        // c's address, a's key.
        let mut with_c = bb;
        let c = PrivateKey::generate();
        with_c.sync(&mesh_of(&[&a, &b, &c]));
        let _ = with_c.receive(ip("100.64.0.3"), &good, now);
        assert_eq!(with_c.counters().key_mismatch, 1);
        assert_eq!(
            with_c.peer_addrs().collect::<HashSet<_>>(),
            [
                ip("100.64.0.1"),
                ip("fd00::1"),
                ip("100.64.0.3"),
                ip("fd00::3")
            ]
            .into_iter()
            .collect()
        );
    }

    #[test]
    fn an_exit_node_counts_the_clients_that_say_they_use_it_and_reports_its_load() {
        let (_a, b, mut ba, mut bb, t0) = pair();
        let load = LoadReport {
            flags: wire::LOAD_PRESENT,
            cpu_percent: 20,
            forwarded_kbps: 8_000,
            clients: 1,
            ..LoadReport::default()
        };
        bb.set_load(load);
        // a uses b: its announcements to b say so; b counts it while
        // they keep coming.
        ba.set_exit_in_use(Some(b.public_key()));
        let (_, hb) = ba.outgoing(0, 1, t0)[0];
        assert_eq!(bb.clients_using(t0), 0);
        bb.receive(ip("100.64.0.1"), &hb, t0).expect("ok");
        assert_eq!(bb.clients_using(t0), 1);
        assert_eq!(bb.clients_using(t0 + live::STALE_AFTER), 0);
        ba.set_exit_in_use(None);
        let (_, hb) = ba.outgoing(0, 1, t0 + Duration::from_secs(1))[0];
        bb.receive(ip("100.64.0.1"), &hb, t0 + Duration::from_secs(1))
            .expect("ok");
        assert_eq!(bb.clients_using(t0 + Duration::from_secs(1)), 0);
        // The load goes out with the exit capability only.
        let (_, plain) = bb.outgoing(0, 1, t0)[0];
        ba.receive(ip("100.64.0.2"), &plain, t0).expect("ok");
        assert!(!ba.live(&b.public_key()).expect("b").load.present());
        let (_, exit) = bb.outgoing(wire::FLAG_EXIT, 1, t0)[0];
        ba.receive(ip("100.64.0.2"), &exit, t0).expect("ok");
        assert_eq!(ba.live(&b.public_key()).expect("b").load, load);
    }

    #[test]
    fn handshakes_are_remembered_across_resets() {
        let (_a, b, mut ba, _bb, now) = pair();
        let k = b.public_key();
        ba.observe_handshake(&k, Some(Duration::from_secs(5)), now);
        let first = ba.live(&k).and_then(|l| l.last_handshake);
        assert!(first.is_some());
        ba.observe_handshake(&k, None, now + Duration::from_secs(1));
        assert_eq!(ba.live(&k).and_then(|l| l.last_handshake), first);
    }
}
