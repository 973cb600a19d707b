//! Test support: addresses and prefixes from strings, IP packets, and
//! in-memory devices that talk to each other through the cores (`tx`,
//! `rx`) with the state the data path threads hold, but no TUN, no
//! sockets and no root.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use ipnet::IpNet;

use super::{
    batch::{PlainBatch, SendBatch},
    drops::{DropReason, Drops},
    peers::{Keys, Peer, PeerRegistry, Table},
    rx::{Received, Receiver},
    tx::{Sent, Transmit},
};
use crate::{
    keys::{PrivateKey, PublicKey},
    wireguard::PeerConfig,
};

pub fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// An IPv4 UDP packet from `src` to `dst` carrying `payload` (checksums
/// left zero: nothing on this path checks them).
pub fn udp4(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 addresses only");
    };
    let total = 28 + payload.len();
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(total).expect("small").to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&4001u16.to_be_bytes());
    p[24..26].copy_from_slice(
        &u16::try_from(8 + payload.len())
            .expect("small")
            .to_be_bytes(),
    );
    p.extend_from_slice(payload);
    p
}

/// One device: what `wg-tx` and `wg-rx` hold, with one outgoing batch for
/// both (the engine keeps one per thread).
pub struct Device {
    pub public: PublicKey,
    pub keys: Keys,
    pub peers: PeerRegistry,
    pub table: Table,
    pub drops: Drops,
    /// Its underlay address.
    pub addr: SocketAddr,
    /// Its tunnel address.
    pub tun_ip: IpAddr,
    /// The clock the cores are given.
    pub now: Instant,
    pub plain: PlainBatch,
    pub out: SendBatch,
}

impl Device {
    pub fn new(addr: &str, tun_ip: &str) -> Self {
        Device::with_handshake_limit(addr, tun_ip, None)
    }

    /// A device whose rate limiter demands cookies after `limit`
    /// handshake messages (`None`: the product's limit).
    pub fn with_handshake_limit(addr: &str, tun_ip: &str, limit: Option<u64>) -> Self {
        let key = PrivateKey::generate();
        let keys = match limit {
            Some(l) => Keys::with_handshake_limit(&key, l),
            None => Keys::new(&key),
        };
        Device {
            public: key.public_key(),
            keys,
            peers: PeerRegistry::default(),
            table: Table::default(),
            drops: Drops::default(),
            addr: self::addr(addr),
            tun_ip: ip(tun_ip),
            now: Instant::now(),
            plain: PlainBatch::new(256),
            out: SendBatch::new(256),
        }
    }

    /// Adds (or updates) a peer.
    pub fn add_peer(&mut self, config: PeerConfig) {
        if let Some(t) = self.peers.apply_changes(&self.keys, &[config], &[]) {
            self.table = t;
        }
    }

    /// This device as another's peer: its tunnel address routed to it,
    /// its underlay address as the endpoint.
    pub fn as_peer(&self, persistent_keepalive: u16) -> PeerConfig {
        PeerConfig {
            public_key: self.public,
            endpoint: Some(self.addr),
            allowed_ips: vec![IpNet::from(self.tun_ip)],
            persistent_keepalive,
        }
    }

    /// Adds `other` as a peer, without persistent keepalive.
    pub fn knows(&mut self, other: &Device) {
        self.add_peer(other.as_peer(0));
    }

    pub fn peer(&self, key: &PublicKey) -> &Arc<Peer> {
        &self.table.peers[self.table.by_key(key).expect("a known peer")]
    }

    /// One TUN read of one packet through `tx::Transmit`.
    pub fn send(&mut self, pkt: &[u8]) -> Result<Sent, DropReason> {
        let mut t = Transmit::begin(&self.table, pkt, &self.drops)?;
        let sent = t.packet(pkt, &mut self.out);
        t.finish(&mut self.out, self.now);
        Ok(sent)
    }

    /// One batch of datagrams through one `rx::Receiver`.
    pub fn receive_batch(&mut self, datagrams: &[(SocketAddr, Vec<u8>)]) -> Vec<Received> {
        let mut r = Receiver::new(&self.table, &self.keys, &self.drops, self.now);
        datagrams
            .iter()
            .map(|(src, d)| r.datagram(*src, d, &mut self.plain, &mut self.out))
            .collect()
    }

    pub fn receive(&mut self, src: SocketAddr, d: &[u8]) -> Received {
        let mut r = self.receive_batch(&[(src, d.to_vec())]);
        r.pop().expect("one outcome")
    }

    /// The datagrams sent since the last call: (destination, datagram).
    pub fn take_out(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        let out = (0..self.out.len())
            .map(|i| (self.out.dest(i), self.out.datagram(i).to_vec()))
            .collect();
        self.out.clear();
        out
    }

    /// The packets for the TUN since the last call.
    pub fn take_tun(&mut self) -> Vec<Vec<u8>> {
        let out = (0..self.plain.len())
            .map(|i| self.plain.packet(i).to_vec())
            .collect();
        self.plain.clear();
        out
    }

    /// Delivers what this device sent to `to` (all of it must be for
    /// `to`'s address), as arriving from this device's address.
    pub fn deliver(&mut self, to: &mut Device) -> Vec<Received> {
        let out = self.take_out();
        assert!(out.iter().all(|(dst, _)| *dst == to.addr), "{out:?}");
        let from = self.addr;
        let batch: Vec<(SocketAddr, Vec<u8>)> = out.into_iter().map(|(_, d)| (from, d)).collect();
        to.receive_batch(&batch)
    }
}

/// Two devices that know each other, no packet exchanged yet.
pub fn pair() -> (Device, Device) {
    let mut a = Device::new("192.0.2.1:51820", "100.64.0.1");
    let mut b = Device::new("192.0.2.2:51820", "100.64.0.2");
    a.knows(&b);
    b.knows(&a);
    (a, b)
}

/// Two devices with a session: `a` sent a first packet, which `b`
/// received after the handshake.
pub fn connected() -> (Device, Device) {
    let (mut a, mut b) = pair();
    let first = udp4(a.tun_ip, b.tun_ip, b"first");
    a.send(&first).expect("a route");
    a.deliver(&mut b);
    b.deliver(&mut a);
    a.deliver(&mut b);
    assert_eq!(b.take_tun(), vec![first], "no session");
    (a, b)
}
