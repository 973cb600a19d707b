//! The peers of the userspace backend: each one's noise state
//! (`boringtun::noise::Tunn`: handshake, sessions, replay windows, rekey
//! timers), endpoint, counters and a small queue; and the table the data
//! path reads (by destination, by receiver index, by public key).
//!
//! Updates happen in place: a peer whose endpoint, AllowedIPs or keepalive
//! change keeps its `Tunn`, so its session survives. That is what makes an
//! exit-node failover (moving 0.0.0.0/0 and ::/0 from one peer to another)
//! cost no handshake. The `PeerRegistry` is the control side's record; every
//! change builds a new immutable `Table` that the data path picks up
//! whole.
//!
//! Memory per peer is bounded: the `Tunn` (under 1 KB, plus about 1.3 KB
//! per live session: upstream boringtun keeps eight session slots inline,
//! 11 KB whether used or not, and nexd's copy boxes them, see
//! vendor/boringtun/NEXD-PATCH.md; built on the peer's first packet, see
//! `TunnSeed`), and at most
//! `QUEUE_PACKETS` packets waiting for a handshake (a peer that never
//! answers costs no more; boringtun's own queue of 256 is never used,
//! because nothing is handed to `encapsulate` without a session).
//! Persistent keepalive is nexd's own timer, not `Tunn`'s, because `Tunn`
//! cannot change it in place.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use boringtun::{
    noise::{Tunn, rate_limiter::RateLimiter},
    x25519,
};
use ipnet::IpNet;

use super::allowed_ips::AllowedIps;
use crate::{
    keys::{PrivateKey, PublicKey},
    wireguard::{PeerConfig, PeerStatus},
};

/// Packets kept per peer while its handshake is under way. The kernel keeps
/// 128; a handful covers a TCP SYN, a ping and a heartbeat, and a peer that
/// never answers (an offline device) must not grow nexd.
pub const QUEUE_PACKETS: usize = 16;

/// Handshake messages accepted per second across all peers before the
/// device demands cookies. boringtun's device uses 100; incoming
/// initiations are checked twice (once to find the peer, once inside
/// `Tunn`), hence twice that.
const HANDSHAKE_RATE_LIMIT: u64 = 200;

/// Receiver indices are 24 bits; `Tunn` uses the low 8 for its sessions.
const INDEX_MASK: u32 = (1 << 24) - 1;

/// The device's own keys and the rate limiter that belongs to them.
pub struct Keys {
    pub secret: x25519::StaticSecret,
    pub public: x25519::PublicKey,
    pub limiter: Arc<RateLimiter>,
}

impl Keys {
    pub fn new(key: &PrivateKey) -> Self {
        Keys::with_handshake_limit(key, HANDSHAKE_RATE_LIMIT)
    }

    /// With another limit of handshake messages per second (the tests'
    /// device under load).
    pub fn with_handshake_limit(key: &PrivateKey, limit: u64) -> Self {
        let secret = x25519::StaticSecret::from(key.to_bytes());
        let public = x25519::PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, limit));
        Keys {
            secret,
            public,
            limiter,
        }
    }
}

/// One peer as the data path sees it.
pub struct Peer {
    pub key: PublicKey,
    pub state: Mutex<PeerState>,
    /// Bytes of WireGuard datagrams sent to and accepted from the peer
    /// (handshakes and keepalives included, as the kernel counts).
    pub tx_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
}

impl Peer {
    /// Locks the peer's state. A panic while it was held leaves nothing
    /// half-done that matters more than stopping the data path would.
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What builds a peer's `Tunn` when it is first needed.
///
/// `Tunn::new` costs two X25519 operations (the static shared secret, and
/// this device's public key again), about 0.1 ms; building a thousand of
/// them was a fifth of a 1,000-device start-up, all before nexd was ready.
/// Built on first use instead, they cost the data path's threads that
/// time spread over the first packets, and a peer that never exchanges a
/// packet costs no `Tunn` at all.
pub struct TunnSeed {
    secret: x25519::StaticSecret,
    peer: x25519::PublicKey,
    index: u32,
    limiter: Arc<RateLimiter>,
}

impl TunnSeed {
    fn new(keys: &Keys, peer: &PublicKey, index: u32) -> Self {
        TunnSeed {
            secret: keys.secret.clone(),
            peer: x25519::PublicKey::from(peer.0),
            index,
            limiter: Arc::clone(&keys.limiter),
        }
    }

    fn build(&self) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            self.peer,
            None,
            // Keepalive is nexd's timer (see the module doc).
            None,
            self.index,
            Some(Arc::clone(&self.limiter)),
        )
    }
}

/// What changes under the peer's lock.
pub struct PeerState {
    /// Built on first use (see [`TunnSeed`]); `None` until a packet is
    /// sent to or received from the peer. Boxed: inline, the `Tunn` would
    /// be allocated (and written by the move into the `Arc`) with every
    /// peer, used or not.
    tunn: Option<Box<Tunn>>,
    seed: TunnSeed,
    /// Configured, then wherever the peer's authenticated packets come from
    /// (roaming).
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive interval in seconds, 0 = off.
    pub keepalive: u16,
    /// When anything was last sent to the peer.
    pub last_sent: Option<Instant>,
    /// When the last handshake completed.
    pub last_handshake: Option<Instant>,
    queue: VecDeque<Vec<u8>>,
}

impl PeerState {
    /// The peer's noise state, built now if this is its first use.
    pub fn tunn(&mut self) -> &mut Tunn {
        let seed = &self.seed;
        self.tunn.get_or_insert_with(|| Box::new(seed.build()))
    }

    /// The noise state if it was ever needed (timers have nothing to do
    /// for a peer that never exchanged a packet).
    pub fn built_tunn(&mut self) -> Option<&mut Tunn> {
        self.tunn.as_deref_mut()
    }

    /// Whether data can be encrypted now (`Tunn` has a current session;
    /// without one, `encapsulate` would queue the packet itself).
    pub fn has_session(&self) -> bool {
        self.tunn
            .as_ref()
            .is_some_and(|t| t.time_since_last_handshake().is_some())
    }

    /// Keeps `pkt` until the handshake completes; false (dropped) when the
    /// queue is full.
    pub fn enqueue(&mut self, pkt: &[u8]) -> bool {
        if self.queue.len() >= QUEUE_PACKETS {
            return false;
        }
        self.queue.push_back(pkt.to_vec());
        true
    }

    /// The queued packets, oldest first, leaving the queue empty.
    pub fn take_queue(&mut self) -> VecDeque<Vec<u8>> {
        std::mem::take(&mut self.queue)
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Forgets what was waiting (the handshake gave up).
    pub fn clear_queue(&mut self) {
        self.queue.clear();
    }
}

/// Whether a persistent keepalive is due: enabled, and nothing was sent for
/// a whole interval (or ever).
pub fn keepalive_due(interval: u16, last_sent: Option<Instant>, now: Instant) -> bool {
    interval > 0
        && last_sent.is_none_or(|t| {
            now.saturating_duration_since(t) >= Duration::from_secs(u64::from(interval))
        })
}

/// The data path's view: immutable, swapped whole on every change.
#[derive(Default)]
pub struct Table {
    pub peers: Vec<Arc<Peer>>,
    by_key: HashMap<PublicKey, usize>,
    by_index: HashMap<u32, usize>,
    routes: AllowedIps<usize>,
}

impl Table {
    /// The peer a packet to `dst` goes to (cryptokey routing).
    pub fn route(&self, dst: IpAddr) -> Option<usize> {
        self.routes.lookup(dst)
    }

    /// The peer a message with this receiver index is for.
    pub fn by_receiver(&self, receiver_index: u32) -> Option<usize> {
        self.by_index.get(&(receiver_index >> 8)).copied()
    }

    pub fn by_key(&self, key: &PublicKey) -> Option<usize> {
        self.by_key.get(key).copied()
    }
}

struct Entry {
    peer: Arc<Peer>,
    index: u32,
    allowed_ips: Vec<IpNet>,
    /// When its AllowedIPs were last set: a prefix claimed by two peers
    /// belongs to the later one, as in the kernel.
    generation: u64,
}

/// The control side's record of the peers.
#[derive(Default)]
pub struct PeerRegistry {
    entries: BTreeMap<PublicKey, Entry>,
    next_index: u32,
    generation: u64,
}

impl PeerRegistry {
    /// Applies `remove`, then `upsert` (in place for known keys), and
    /// returns the table to swap in (the tests' view of `apply_changes`).
    #[cfg(test)]
    pub fn apply(&mut self, keys: &Keys, upsert: &[PeerConfig], remove: &[PublicKey]) -> Table {
        self.apply_changes(keys, upsert, remove)
            .unwrap_or_else(|| self.table())
    }

    /// `apply`, returning a new table only when the table changed (a peer
    /// added or removed, AllowedIPs changed). An endpoint or keepalive
    /// change is made in place under the peer's lock, where the data path
    /// reads it: rebuilding the table of a thousand peers for it was most
    /// of what a one-peer reload cost beyond a reload changing nothing.
    pub fn apply_changes(
        &mut self,
        keys: &Keys,
        upsert: &[PeerConfig],
        remove: &[PublicKey],
    ) -> Option<Table> {
        let mut changed = false;
        for k in remove {
            changed |= self.entries.remove(k).is_some();
        }
        let mut used: HashSet<u32> = self.entries.values().map(|e| e.index).collect();
        let mut new: Vec<(&PeerConfig, u32, u64)> = Vec::new();
        let mut new_at: HashMap<PublicKey, usize> = HashMap::new();
        for p in upsert {
            self.generation += 1;
            let generation = self.generation;
            if let Some(e) = self.entries.get_mut(&p.public_key) {
                let mut s = e.peer.lock();
                if let Some(ep) = p.endpoint {
                    s.endpoint = Some(ep);
                }
                s.keepalive = p.persistent_keepalive;
                drop(s);
                if e.allowed_ips != p.allowed_ips {
                    e.allowed_ips.clone_from(&p.allowed_ips);
                    e.generation = generation;
                    changed = true;
                }
                continue;
            }
            if let Some(&i) = new_at.get(&p.public_key) {
                // The same new key twice in one request: the later wins.
                new[i] = (p, new[i].1, generation);
                continue;
            }
            let index = self.allocate_index(&used);
            used.insert(index);
            new_at.insert(p.public_key, new.len());
            new.push((p, index, generation));
        }
        changed |= !new.is_empty();
        for (p, index, generation) in new {
            let peer = Arc::new(Peer {
                key: p.public_key,
                state: Mutex::new(PeerState {
                    tunn: None,
                    seed: TunnSeed::new(keys, &p.public_key, index),
                    endpoint: p.endpoint,
                    keepalive: p.persistent_keepalive,
                    last_sent: None,
                    last_handshake: None,
                    queue: VecDeque::new(),
                }),
                tx_bytes: AtomicU64::new(0),
                rx_bytes: AtomicU64::new(0),
            });
            self.entries.insert(
                p.public_key,
                Entry {
                    peer,
                    index,
                    allowed_ips: p.allowed_ips.clone(),
                    generation,
                },
            );
        }
        changed.then(|| self.table())
    }

    /// A new private key: every session ends (as on any WireGuard key
    /// change); peers, endpoints and counters stay.
    pub fn rekey(&self, keys: &Keys) {
        for e in self.entries.values() {
            let mut s = e.peer.lock();
            s.seed.secret = keys.secret.clone();
            s.seed.limiter = Arc::clone(&keys.limiter);
            if let Some(t) = s.built_tunn() {
                t.set_static_private(
                    keys.secret.clone(),
                    keys.public,
                    Some(Arc::clone(&keys.limiter)),
                );
            }
            s.clear_queue();
        }
    }

    /// The next receiver index not in `used` (a set, so that adding a
    /// thousand peers is not a thousand scans of the record).
    fn allocate_index(&mut self, used: &HashSet<u32>) -> u32 {
        loop {
            self.next_index = (self.next_index + 1) & INDEX_MASK;
            let candidate = self.next_index;
            if candidate != 0 && !used.contains(&candidate) {
                return candidate;
            }
        }
    }

    /// Builds the data path's table from the record.
    pub fn table(&self) -> Table {
        let mut t = Table::default();
        let mut by_generation: Vec<(u64, usize)> = Vec::with_capacity(self.entries.len());
        for (i, e) in self.entries.values().enumerate() {
            t.peers.push(Arc::clone(&e.peer));
            t.by_key.insert(e.peer.key, i);
            t.by_index.insert(e.index, i);
            by_generation.push((e.generation, i));
        }
        by_generation.sort_unstable();
        let entries: Vec<&Entry> = self.entries.values().collect();
        for (_, i) in by_generation {
            for net in &entries[i].allowed_ips {
                t.routes.insert(*net, i);
            }
        }
        t
    }

    /// Every peer's status and keepalive interval.
    pub fn status(&self, now: Instant) -> Vec<(PeerStatus, u16)> {
        self.entries
            .values()
            .map(|e| {
                let s = e.peer.lock();
                (
                    PeerStatus {
                        public_key: e.peer.key,
                        endpoint: s.endpoint,
                        allowed_ips: e.allowed_ips.clone(),
                        last_handshake: s.last_handshake.map(|t| now.saturating_duration_since(t)),
                        rx_bytes: e.peer.rx_bytes.load(Ordering::Relaxed),
                        tx_bytes: e.peer.tx_bytes.load(Ordering::Relaxed),
                    },
                    s.keepalive,
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use boringtun::noise::TunnResult;

    use super::*;
    use crate::wireguard::userspace::{
        message::MessageType,
        testing::{ip, net},
    };

    /// The patched boringtun is in use (vendor/boringtun/NEXD-PATCH.md):
    /// upstream's `Tunn` is 11,040 bytes with its session slots inline,
    /// which with heartbeats to every peer was most of nexd's memory per
    /// peer. Fails if the `[patch.crates-io]` entry is lost in an upgrade.
    #[test]
    fn a_tunn_without_sessions_is_small() {
        let size = std::mem::size_of::<Tunn>();
        assert!(
            size < 2048,
            "boringtun's Tunn is {size} bytes: the session slots are inline again"
        );
    }

    fn peer(key: PublicKey, allowed: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: key,
            endpoint: Some("192.0.2.2:51820".parse().expect("addr")),
            allowed_ips: allowed.iter().map(|s| net(s)).collect(),
            persistent_keepalive: 25,
        }
    }

    /// A device's keys, two peers' public keys and an empty registry.
    fn two_keys() -> (Keys, PublicKey, PublicKey, PeerRegistry) {
        let keys = Keys::new(&PrivateKey::generate());
        let a = PrivateKey::generate().public_key();
        let b = PrivateKey::generate().public_key();
        (keys, a, b, PeerRegistry::default())
    }

    #[test]
    fn keepalive_is_due_after_an_idle_interval() {
        let now = Instant::now();
        assert!(!keepalive_due(0, None, now));
        assert!(keepalive_due(25, None, now));
        assert!(!keepalive_due(25, Some(now), now + Duration::from_secs(24)));
        assert!(keepalive_due(25, Some(now), now + Duration::from_secs(25)));
    }

    #[test]
    fn failover_moves_the_default_route_and_keeps_both_peers() {
        let (keys, a, b, mut r) = two_keys();
        let t = r.apply(
            &keys,
            &[
                peer(a, &["100.64.0.2/32", "0.0.0.0/0"]),
                peer(b, &["100.64.0.3/32"]),
            ],
            &[],
        );
        let pa = t.by_key(&a).expect("a");
        let pb = t.by_key(&b).expect("b");
        assert_eq!(t.route(ip("203.0.113.10")), Some(pa));
        let a_before = Arc::clone(&t.peers[pa]);
        // Failover: b gets 0/0, a loses it, in one update.
        let t = r.apply(
            &keys,
            &[
                peer(a, &["100.64.0.2/32"]),
                peer(b, &["100.64.0.3/32", "0.0.0.0/0"]),
            ],
            &[],
        );
        assert_eq!(t.route(ip("203.0.113.10")), t.by_key(&b));
        assert_eq!(t.route(ip("100.64.0.2")), t.by_key(&a));
        // The same peer object: its Tunn, sessions and counters live on.
        assert!(Arc::ptr_eq(&a_before, &t.peers[t.by_key(&a).expect("a")]));
        let _ = pb;
    }

    /// Completes a handshake between the registry's peer (initiator) and
    /// `responder`.
    fn handshake(p: &Peer, responder: &mut Tunn) {
        let mut a = [0u8; 256];
        let mut b = [0u8; 256];
        let mut s = p.lock();
        let TunnResult::WriteToNetwork(init) = s.tunn().format_handshake_initiation(&mut a, false)
        else {
            panic!("no initiation");
        };
        let TunnResult::WriteToNetwork(resp) = responder.decapsulate(None, init, &mut b) else {
            panic!("no response");
        };
        let TunnResult::WriteToNetwork(keepalive) = s.tunn().decapsulate(None, resp, &mut a) else {
            panic!("no keepalive");
        };
        let mut c = [0u8; 256];
        assert!(matches!(
            responder.decapsulate(None, keepalive, &mut c),
            TunnResult::Done
        ));
    }

    #[test]
    fn an_allowed_ips_change_keeps_the_session() {
        let mine = PrivateKey::generate();
        let keys = Keys::new(&mine);
        let theirs = PrivateKey::generate();
        let mut responder = Tunn::new(
            x25519::StaticSecret::from(theirs.to_bytes()),
            keys.public,
            None,
            None,
            7,
            None,
        );
        let mut r = PeerRegistry::default();
        let t = r.apply(&keys, &[peer(theirs.public_key(), &["100.64.0.2/32"])], &[]);
        handshake(&t.peers[0], &mut responder);
        assert!(t.peers[0].lock().has_session());
        // The exit node is enabled on it: 0.0.0.0/0 and ::/0 added.
        let t2 = r.apply(
            &keys,
            &[peer(
                theirs.public_key(),
                &["100.64.0.2/32", "0.0.0.0/0", "::/0"],
            )],
            &[],
        );
        assert!(Arc::ptr_eq(&t.peers[0], &t2.peers[0]));
        let mut s = t2.peers[0].lock();
        assert!(s.has_session(), "the update restarted the session");
        // And data flows on it without a new handshake.
        let mut out = [0u8; 256];
        let pkt = [0x45u8; 40];
        assert!(
            matches!(s.tunn().encapsulate(&pkt, &mut out), TunnResult::WriteToNetwork(d) if MessageType::of(d) == Some(MessageType::Data))
        );
        // A new device key ends it, as on any WireGuard key change.
        drop(s);
        r.rekey(&Keys::new(&PrivateKey::generate()));
        assert!(!t2.peers[0].lock().has_session());
    }

    #[test]
    fn a_prefix_claimed_twice_belongs_to_the_later_claim() {
        let (keys, a, b, mut r) = two_keys();
        r.apply(&keys, &[peer(a, &["0.0.0.0/0"])], &[]);
        let t = r.apply(&keys, &[peer(b, &["0.0.0.0/0"])], &[]);
        assert_eq!(t.route(ip("198.51.100.1")), t.by_key(&b));
        // Re-sending a's unchanged config does not take it back.
        let t = r.apply(&keys, &[peer(a, &["0.0.0.0/0"])], &[]);
        assert_eq!(t.route(ip("198.51.100.1")), t.by_key(&b));
    }

    #[test]
    fn removal_and_missing_endpoint_keep_what_is_known() {
        let keys = Keys::new(&PrivateKey::generate());
        let a = PrivateKey::generate().public_key();
        let mut r = PeerRegistry::default();
        let t = r.apply(&keys, &[peer(a, &["100.64.0.2/32"])], &[]);
        let p = Arc::clone(&t.peers[0]);
        p.lock().endpoint = Some("198.51.100.7:4000".parse().expect("addr"));
        // An update without an endpoint keeps the roamed one.
        let mut update = peer(a, &["100.64.0.2/32"]);
        update.endpoint = None;
        update.persistent_keepalive = 0;
        // Nothing the table holds changed: no new table to swap in.
        assert!(r.apply_changes(&keys, &[update], &[]).is_none());
        assert_eq!(
            p.lock().endpoint,
            Some("198.51.100.7:4000".parse().expect("addr"))
        );
        assert_eq!(p.lock().keepalive, 0);
        // A new endpoint is set in place on the live peer, too.
        let mut moved = peer(a, &["100.64.0.2/32"]);
        moved.endpoint = Some("198.51.100.8:4001".parse().expect("addr"));
        assert!(r.apply_changes(&keys, &[moved.clone()], &[]).is_none());
        assert_eq!(p.lock().endpoint, moved.endpoint);
        // New AllowedIPs do change the table.
        let wider = peer(a, &["100.64.0.2/32", "10.9.0.0/16"]);
        let t = r.apply_changes(&keys, &[wider], &[]).expect("a new table");
        assert_eq!(t.route(ip("10.9.1.1")), Some(0));
        let t = r.apply(&keys, &[], &[a]);
        assert!(t.peers.is_empty());
        assert_eq!(t.route(ip("100.64.0.2")), None);
    }

    #[test]
    fn the_tunn_is_built_on_first_use_with_the_current_key() {
        let keys = Keys::new(&PrivateKey::generate());
        let responder_key = PrivateKey::generate();
        let mut r = PeerRegistry::default();
        let t = r.apply(
            &keys,
            &[peer(responder_key.public_key(), &["100.64.0.2/32"])],
            &[],
        );
        {
            let mut s = t.peers[0].lock();
            assert!(s.built_tunn().is_none(), "built before any packet");
            assert!(!s.has_session());
        }
        // An unused peer does not carry a Tunn inline.
        assert!(std::mem::size_of::<PeerState>() < 1024);
        // A key change before the first packet: the Tunn built later
        // speaks for the new key (the responder knows only that one).
        let new = PrivateKey::generate();
        let new_keys = Keys::new(&new);
        r.rekey(&new_keys);
        let mut responder = Tunn::new(
            x25519::StaticSecret::from(responder_key.to_bytes()),
            x25519::PublicKey::from(new.public_key().0),
            None,
            None,
            7,
            None,
        );
        handshake(&t.peers[0], &mut responder);
        assert!(t.peers[0].lock().has_session());
    }

    #[test]
    fn receiver_indices_find_their_peer() {
        let keys = Keys::new(&PrivateKey::generate());
        let other = PrivateKey::generate();
        let a = other.public_key();
        let mut r = PeerRegistry::default();
        let t = r.apply(&keys, &[peer(a, &["100.64.0.2/32"])], &[]);
        let mut dst = [0u8; 256];
        let init = match t.peers[0]
            .lock()
            .tunn()
            .format_handshake_initiation(&mut dst, false)
        {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no initiation: {other:?}"),
        };
        // The sender index of our initiation is what the response names as
        // its receiver.
        let sender = u32::from_le_bytes([init[4], init[5], init[6], init[7]]);
        assert_eq!(t.by_receiver(sender), Some(0));
        assert_eq!(t.by_receiver(sender ^ (1 << 20)), None);
    }

    #[test]
    fn the_queue_is_bounded() {
        let keys = Keys::new(&PrivateKey::generate());
        let mut r = PeerRegistry::default();
        let t = r.apply(
            &keys,
            &[peer(PrivateKey::generate().public_key(), &[])],
            &[],
        );
        let mut s = t.peers[0].lock();
        assert!(!s.has_session());
        for _ in 0..QUEUE_PACKETS {
            assert!(s.enqueue(&[0x45; 100]));
        }
        assert!(!s.enqueue(&[0x45; 100]));
        assert_eq!(s.take_queue().len(), QUEUE_PACKETS);
        assert_eq!(s.queued(), 0);
    }
}
