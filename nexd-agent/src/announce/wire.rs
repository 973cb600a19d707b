//! The announcement wire format, version 1: a fixed 96-byte datagram sent
//! between agents inside the tunnel. Pure encode/decode, so it can be fuzzed.
//!
//! ```text
//!  0  magic "NXAN"            4
//!  4  version = 1             1
//!  5  flags                   1   bit 0: exit node, bit 1: probe,
//!                                 bit 2: the sender uses the recipient as exit node
//!  6  reserved                2
//!  8  seq                     8   strictly increasing per sender
//! 16  sender public key      32
//! 48  sent_at_ms              8   sender's monotonic clock, for RTT
//! 56  echo_seq                8   last seq received from the recipient (0: none)
//! 64  echo_hold_ms            4   how long the sender held that echo
//! 68  load                   12   an exit node's load (all zeros: none), below
//! 80  mac                    16   BLAKE2s-128 over bytes 0..80
//! ```
//!
//! The load (issue 23) went into what were 12 reserved bytes, so the
//! version stays 1: an agent that predates it checks the MAC over them
//! and ignores them, and an exit node that predates it sends zeros,
//! which mean "no load information" (its clients then choose by round
//! trip alone):
//!
//! ```text
//! 68  load flags              1   bit 0: the load below is present
//! 69  cpu busy                1   percent
//! 70  conntrack fill          1   percent of the table
//! 71  masquerade port use     1   percent, the busiest destination's
//! 72  forwarded               4   kbit/s through the uplinks, the busier direction
//! 76  link speed              2   Mbit/s of the uplinks (0: unknown)
//! 78  clients                 2   devices using it as exit node now
//! ```
//!
//! The MAC key is derived from the X25519 shared secret of sender and
//! recipient (their WireGuard keys), so only the holder of the sender's
//! private key can produce a valid announcement for this recipient: an exit
//! peer whose AllowedIPs cover the whole internet still cannot speak for
//! another device. All integers are big-endian.

use blake2::{
    Blake2sMac, Blake2sMac256,
    digest::{Mac as _, consts::U16},
};

use crate::keys::{PrivateKey, PublicKey};

/// Size of every announcement.
pub const LEN: usize = 96;
const MAGIC: &[u8; 4] = b"NXAN";
/// The only version this build speaks.
pub const VERSION: u8 = 1;
const MAC_AT: usize = 80;

/// Flag: the sender is an exit node that forwards to the internet now.
pub const FLAG_EXIT: u8 = 0x01;
/// Flag: a probe. The sender watches this peer closely (it is the exit
/// node in use, or the next one) and asks for an announcement back at
/// once, whose echo gives a round trip and proves the peer alive. Agents
/// that do not know the bit ignore it, and are then watched through their
/// heartbeats only.
pub const FLAG_PROBE: u8 = 0x02;
/// Flag: the sender routes its internet traffic through the recipient
/// (its exit node in use), so the exit node can count its clients.
pub const FLAG_USES_EXIT: u8 = 0x04;

/// Load flag: the load fields are present.
pub const LOAD_PRESENT: u8 = 0x01;
const LOAD_AT: usize = 68;

/// An exit node's load as it reports it: the raw wire fields, kept
/// exactly (a decoded announcement encodes to the same bytes). All zeros
/// (the default) is what an exit node that predates them sends: no load
/// information. What a client believes of it is `exit::select::Load::believe`'s business.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// `LOAD_PRESENT`, and bits for later use.
    pub flags: u8,
    pub cpu_percent: u8,
    pub conntrack_percent: u8,
    pub snat_percent: u8,
    /// Bits per second forwarded through the uplinks, in kbit/s: the
    /// busier direction, everything the uplinks carry (not only the
    /// clients': other traffic takes the same capacity).
    pub forwarded_kbps: u32,
    /// The uplinks' link speed in Mbit/s (0: unknown), the capacity when
    /// the mesh file names none.
    pub link_mbps: u16,
    /// Devices whose latest announcement says they use this exit node.
    pub clients: u16,
}

impl LoadReport {
    /// Whether the sender reported its load (not an older exit node's
    /// zeros).
    pub fn present(&self) -> bool {
        self.flags & LOAD_PRESENT != 0
    }

    fn write(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.cpu_percent;
        b[2] = self.conntrack_percent;
        b[3] = self.snat_percent;
        b[4..8].copy_from_slice(&self.forwarded_kbps.to_be_bytes());
        b[8..10].copy_from_slice(&self.link_mbps.to_be_bytes());
        b[10..12].copy_from_slice(&self.clients.to_be_bytes());
    }

    fn read(b: &[u8]) -> Self {
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        LoadReport {
            flags: b[0],
            cpu_percent: b[1],
            conntrack_percent: b[2],
            snat_percent: b[3],
            forwarded_kbps: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            link_mbps: u16_at(8),
            clients: u16_at(10),
        }
    }
}

/// The content of an announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announcement {
    pub flags: u8,
    pub seq: u64,
    pub sender: PublicKey,
    pub sent_at_ms: u64,
    pub echo_seq: u64,
    pub echo_hold_ms: u32,
    /// The sender's load, when it is an exit node (zeros otherwise).
    pub load: LoadReport,
}

impl Announcement {
    pub fn is_exit(&self) -> bool {
        self.flags & FLAG_EXIT != 0
    }
}

/// Why a datagram is not a valid announcement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0} bytes, an announcement has {LEN}")]
    Length(usize),
    #[error("bad magic")]
    Magic,
    #[error("version {0}, this nexd speaks {VERSION}")]
    Version(u8),
    #[error("bad MAC (not from the key it claims, or altered)")]
    Mac,
}

/// The pairwise MAC key between `own` and `peer`; the same on both sides.
#[derive(Clone)]
pub struct PairKey([u8; 32]);

impl PairKey {
    pub fn derive(own: &PrivateKey, peer: &PublicKey) -> Self {
        let shared = own.shared_secret(peer);
        let mut kdf = <Blake2sMac256 as blake2::digest::KeyInit>::new_from_slice(&shared)
            .unwrap_or_else(|_| unreachable_key());
        kdf.update(b"nexd announce v1");
        PairKey(kdf.finalize().into_bytes().into())
    }

    fn mac(&self, body: &[u8]) -> [u8; 16] {
        let mut m = <Blake2sMac<U16> as blake2::digest::KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable_key());
        m.update(body);
        m.finalize().into_bytes().into()
    }
}

/// BLAKE2s accepts keys of 1 to 32 bytes; ours are always 32.
fn unreachable_key<T>() -> T {
    unreachable!("a 32-byte key is always a valid BLAKE2s key")
}

/// Encodes and authenticates `a` for the recipient whose pair key is `key`.
pub fn encode(a: &Announcement, key: &PairKey) -> [u8; LEN] {
    let mut b = [0u8; LEN];
    b[0..4].copy_from_slice(MAGIC);
    b[4] = VERSION;
    b[5] = a.flags;
    b[8..16].copy_from_slice(&a.seq.to_be_bytes());
    b[16..48].copy_from_slice(&a.sender.0);
    b[48..56].copy_from_slice(&a.sent_at_ms.to_be_bytes());
    b[56..64].copy_from_slice(&a.echo_seq.to_be_bytes());
    b[64..68].copy_from_slice(&a.echo_hold_ms.to_be_bytes());
    a.load.write(&mut b[LOAD_AT..MAC_AT]);
    let mac = key.mac(&b[..MAC_AT]);
    b[MAC_AT..].copy_from_slice(&mac);
    b
}

/// Reads the sender's key without authenticating anything, so the caller
/// can find the pair key to verify with.
pub fn peek_sender(b: &[u8]) -> Result<PublicKey, DecodeError> {
    if b.len() != LEN {
        return Err(DecodeError::Length(b.len()));
    }
    if &b[0..4] != MAGIC {
        return Err(DecodeError::Magic);
    }
    if b[4] != VERSION {
        return Err(DecodeError::Version(b[4]));
    }
    let mut k = [0u8; 32];
    k.copy_from_slice(&b[16..48]);
    Ok(PublicKey(k))
}

/// Decodes and verifies an announcement with the sender's pair key.
pub fn decode(b: &[u8], key: &PairKey) -> Result<Announcement, DecodeError> {
    let sender = peek_sender(b)?;
    let mac = key.mac(&b[..MAC_AT]);
    // Constant time is not needed for a 16-byte tag checked once per
    // datagram from inside the tunnel, but costs nothing.
    if !constant_eq(&mac, &b[MAC_AT..]) {
        return Err(DecodeError::Mac);
    }
    let u64_at = |i: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[i..i + 8]);
        u64::from_be_bytes(x)
    };
    let mut hold = [0u8; 4];
    hold.copy_from_slice(&b[64..68]);
    Ok(Announcement {
        flags: b[5],
        seq: u64_at(8),
        sender,
        sent_at_ms: u64_at(48),
        echo_seq: u64_at(56),
        echo_hold_ms: u32::from_be_bytes(hold),
        load: LoadReport::read(&b[LOAD_AT..MAC_AT]),
    })
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sender: PublicKey) -> Announcement {
        Announcement {
            flags: FLAG_EXIT,
            seq: 42,
            sender,
            sent_at_ms: 1234,
            echo_seq: 41,
            echo_hold_ms: 7,
            load: LoadReport::default(),
        }
    }

    fn loaded() -> LoadReport {
        LoadReport {
            flags: LOAD_PRESENT,
            cpu_percent: 37,
            conntrack_percent: 4,
            snat_percent: 1,
            forwarded_kbps: 1_500_000,
            link_mbps: 10_000,
            clients: 12,
        }
    }

    #[test]
    fn the_load_round_trips_and_leaves_every_older_field_where_it_was() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let to_b = PairKey::derive(&a, &b.public_key());
        let plain = sample(a.public_key());
        let with_load = Announcement {
            load: loaded(),
            ..plain
        };
        let old = encode(&plain, &to_b);
        let new = encode(&with_load, &to_b);
        // Same version, and every byte an agent before the load reads is
        // unchanged: it decodes the new announcement as before (its MAC
        // covers the load bytes, which it hashes without reading).
        assert_eq!(old[..LOAD_AT], new[..LOAD_AT]);
        assert_eq!(new[4], VERSION);
        assert_eq!(old[LOAD_AT..MAC_AT], [0u8; 12]);
        let got = decode(&new, &PairKey::derive(&b, &a.public_key())).expect("valid");
        assert_eq!(got, with_load);
        assert!(got.load.present());
        // An older exit node's zeros: no load information.
        let got = decode(&old, &PairKey::derive(&b, &a.public_key())).expect("valid");
        assert!(!got.load.present());
        // The load is authenticated like the rest.
        let mut altered = new;
        altered[72] ^= 0x80;
        assert_eq!(
            decode(&altered, &PairKey::derive(&b, &a.public_key())),
            Err(DecodeError::Mac)
        );
    }

    #[test]
    fn round_trip_between_the_two_ends() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let msg = sample(a.public_key());
        let bytes = encode(&msg, &PairKey::derive(&a, &b.public_key()));
        assert_eq!(peek_sender(&bytes), Ok(a.public_key()));
        let got = decode(&bytes, &PairKey::derive(&b, &a.public_key())).expect("valid");
        assert_eq!(got, msg);
        assert!(got.is_exit());
    }

    #[test]
    fn a_third_party_cannot_forge_or_alter() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        let mallory = PrivateKey::generate();
        // Mallory claims to be `a` but can only key the MAC with her own secret.
        let forged = encode(
            &sample(a.public_key()),
            &PairKey::derive(&mallory, &b.public_key()),
        );
        assert_eq!(
            decode(&forged, &PairKey::derive(&b, &a.public_key())),
            Err(DecodeError::Mac)
        );
        // A flipped flag bit breaks the MAC.
        let mut bytes = encode(
            &sample(a.public_key()),
            &PairKey::derive(&a, &b.public_key()),
        );
        bytes[5] ^= FLAG_EXIT;
        assert_eq!(
            decode(&bytes, &PairKey::derive(&b, &a.public_key())),
            Err(DecodeError::Mac)
        );
    }

    #[test]
    fn garbage_is_rejected_without_panic() {
        let k = PairKey::derive(
            &PrivateKey::generate(),
            &PrivateKey::generate().public_key(),
        );
        assert_eq!(decode(&[], &k), Err(DecodeError::Length(0)));
        assert_eq!(decode(&[0u8; LEN], &k), Err(DecodeError::Magic));
        let mut v2 = [0u8; LEN];
        v2[..4].copy_from_slice(MAGIC);
        v2[4] = 2;
        assert_eq!(decode(&v2, &k), Err(DecodeError::Version(2)));
        assert_eq!(
            decode(&[0u8; LEN + 1], &k),
            Err(DecodeError::Length(LEN + 1))
        );
    }
}
