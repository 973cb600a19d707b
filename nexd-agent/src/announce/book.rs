//! What this agent knows about every peer from their announcements: who
//! said what and when, with replay protection and round-trip times. Pure
//! logic with an injected clock; the sockets live in `announce::Announcer`.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use super::wire::{self, Announcement, DecodeError, PairKey};
use crate::{
    keys::{PrivateKey, PublicKey},
    mesh::Mesh,
};

/// Sent announcements remembered per peer for RTT matching.
const SENT_MEMORY: usize = 8;

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

/// Live state of one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerLive {
    /// Highest sequence accepted from the peer.
    pub last_seq: u64,
    /// When the last valid announcement arrived.
    pub last_heard: Option<Instant>,
    /// Flags of the last valid announcement.
    pub flags: u8,
    /// Smoothed round-trip time through the tunnel (EWMA with weight 1/8
    /// per sample, as TCP's SRTT): exit-node selection compares these, so
    /// one delayed heartbeat does not make an exit node look slow.
    pub rtt: Option<Duration>,
    /// Latest WireGuard handshake known for the peer. Kept across backend
    /// resets (a userspace peer update restarts its session), so a peer
    /// does not look unhealthy just because nexd reconfigured it.
    pub last_handshake: Option<Instant>,
    /// The peer's last seq and when it arrived, echoed back for its RTT.
    echo: Option<(u64, Instant)>,
    sent: VecDeque<(u64, Instant)>,
}

impl PeerLive {
    pub fn is_exit(&self) -> bool {
        self.flags & wire::FLAG_EXIT != 0
    }
}

struct PeerEntry {
    name: String,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    pair: PairKey,
    live: PeerLive,
}

/// Every peer's identity and live announcement state.
pub struct PeerBook {
    own: PrivateKey,
    own_pub: PublicKey,
    peers: HashMap<PublicKey, PeerEntry>,
    by_addr: HashMap<IpAddr, PublicKey>,
    next_seq: u64,
    epoch: Instant,
}

impl PeerBook {
    pub fn new(own: PrivateKey, now: Instant) -> Self {
        let own_pub = own.public_key();
        PeerBook {
            own,
            own_pub,
            peers: HashMap::new(),
            by_addr: HashMap::new(),
            next_seq: 0,
            epoch: now,
        }
    }

    /// Follows the mesh file: new peers are added, removed ones dropped,
    /// and peers that stay keep their live state.
    pub fn sync(&mut self, mesh: &Mesh) {
        let mut keep = HashMap::with_capacity(mesh.devices.len());
        for d in mesh.peers_of(&self.own_pub) {
            // A peer that stays keeps its live state and its pair key (an
            // X25519 operation per peer is most of a 1,000-peer reload).
            let (live, pair) = match self.peers.remove(&d.public_key) {
                Some(e) => (e.live, e.pair),
                None => (
                    PeerLive::default(),
                    PairKey::derive(&self.own, &d.public_key),
                ),
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
        self.by_addr = self
            .peers
            .iter()
            .flat_map(|(k, e)| [(IpAddr::V4(e.v4), *k), (IpAddr::V6(e.v6), *k)])
            .collect();
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

    fn seq(&mut self) -> u64 {
        // Wall-clock microseconds keep sequences increasing across restarts
        // of this agent; the counter keeps them strictly increasing within one.
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.next_seq = (self.next_seq + 1).max(wall);
        self.next_seq
    }

    /// One announcement per peer, to its mesh IPv4 address on `port`.
    pub fn outgoing(
        &mut self,
        flags: u8,
        port: u16,
        now: Instant,
    ) -> Vec<(SocketAddr, [u8; wire::LEN])> {
        let keys: Vec<PublicKey> = self.peers.keys().copied().collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let seq = self.seq();
            let sent_at_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
            let Some(e) = self.peers.get_mut(&k) else {
                continue;
            };
            let (echo_seq, echo_hold_ms) = e.live.echo.map_or((0, 0), |(s, at)| {
                (s, now.saturating_duration_since(at).as_millis() as u32)
            });
            let a = Announcement {
                flags,
                seq,
                sender: self.own_pub,
                sent_at_ms,
                echo_seq,
                echo_hold_ms,
            };
            e.live.sent.push_back((seq, now));
            while e.live.sent.len() > SENT_MEMORY {
                e.live.sent.pop_front();
            }
            out.push((
                SocketAddr::new(IpAddr::V4(e.v4), port),
                wire::encode(&a, &e.pair),
            ));
        }
        out
    }

    /// Checks and records an incoming datagram from `from`. Returns the
    /// sender's key, and whether its exit flag changed.
    pub fn receive(
        &mut self,
        from: IpAddr,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(PublicKey, bool), Rejected> {
        let from = canonical(from);
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
        let e = self
            .peers
            .get_mut(&actual)
            .ok_or(Rejected::UnknownSource(from))?;
        let a = wire::decode(bytes, &e.pair)?;
        if a.seq <= e.live.last_seq {
            return Err(Rejected::Replay {
                got: a.seq,
                last: e.live.last_seq,
            });
        }
        let was_exit = e.live.is_exit();
        e.live.last_seq = a.seq;
        e.live.last_heard = Some(now);
        e.live.flags = a.flags;
        e.live.echo = Some((a.seq, now));
        if a.echo_seq != 0
            && let Some(&(_, sent)) = e.live.sent.iter().find(|(s, _)| *s == a.echo_seq)
        {
            let rtt = now
                .saturating_duration_since(sent)
                .saturating_sub(Duration::from_millis(u64::from(a.echo_hold_ms)));
            e.live.rtt = Some(match e.live.rtt {
                Some(prev) => (prev * 7 + rtt) / 8,
                None => rtt,
            });
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

/// IPv4-mapped IPv6 addresses (from a dual-stack socket) as plain IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{Device, Endpoint, Host};

    fn mesh_of(keys: &[&PrivateKey]) -> Mesh {
        Mesh {
            ipv4_prefix: "100.64.0.0/10".parse().expect("v4"),
            ipv6_prefix: "fd00::/64".parse().expect("v6"),
            persistent_keepalive: 25,
            mtu: 1420,
            agent_port: 51829,
            devices: keys
                .iter()
                .enumerate()
                .map(|(i, k)| Device {
                    name: format!("d{i}"),
                    public_key: k.public_key(),
                    endpoint: Some(Endpoint {
                        host: Host::Ip(format!("192.0.2.{}", i + 1).parse().expect("ip")),
                        port: 51820,
                    }),
                    listen_port: 51820,
                    ipv4: format!("100.64.0.{}", i + 1).parse().expect("ip"),
                    ipv6: format!("fd00::{}", i + 1).parse().expect("ip"),
                })
                .collect(),
        }
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
