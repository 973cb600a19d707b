//! The announcement decoder and the peer book on arbitrary datagrams from
//! a peer's address: rejected or accepted, never a panic, never accepted
//! without the right MAC, and never believed as an exit node when the
//! mesh file does not let that peer serve this device (the fixture's
//! peer may not). Every datagram is counted under exactly one outcome.
#![no_main]

use std::{
    sync::{Mutex, OnceLock},
    time::Instant,
};

use libfuzzer_sys::fuzz_target;
use nexd::{
    announce::{
        book::PeerBook,
        wire::{self, PairKey},
    },
    keys::PrivateKey,
    mesh,
};

struct Fixture {
    /// The pair key as the receiver derives it, and as the sender does.
    receiver_key: PairKey,
    sender_key: PairKey,
    /// The peer's key (not allowed to serve as exit node).
    peer: nexd::keys::PublicKey,
    /// One book for the whole run (deriving keys per input would make the
    /// target 10x slower); its replay state only sharpens the checks.
    book: Mutex<PeerBook>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let own = PrivateKey::from_bytes([7; 32]);
        let peer = PrivateKey::from_bytes([9; 32]);
        let text = format!(
            "[[device]]\nname = \"own\"\npublic_key = \"{}\"\nipv4 = \"100.64.0.1\"\nipv6 = \"fd6e:6578:6400::1\"\n\n[[device]]\nname = \"peer\"\npublic_key = \"{}\"\nipv4 = \"100.64.0.2\"\nipv6 = \"fd6e:6578:6400::2\"\n",
            own.public_key(),
            peer.public_key()
        );
        let mesh = mesh::parse(&text).unwrap_or_else(|p| panic!("fixture mesh: {p:?}"));
        let mut book = PeerBook::with_epoch(own.clone(), 1, Instant::now());
        book.sync(&mesh);
        book.enforce_exit_authorization(&mesh);
        Fixture {
            receiver_key: PairKey::derive(&own, &peer.public_key()),
            sender_key: PairKey::derive(&peer, &own.public_key()),
            peer: peer.public_key(),
            book: Mutex::new(book),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    if let Ok(a) = wire::decode(data, &f.receiver_key) {
        // Accepted only with the MAC the peer's key produces.
        assert_eq!(&wire::encode(&a, &f.sender_key)[..], data);
    }
    let mut book = f.book.lock().unwrap_or_else(|p| p.into_inner());
    let before = book.counters();
    let _ = book.receive("100.64.0.2".parse().expect("ip"), data, Instant::now());
    let _ = book.receive("fd6e:6578:6400::2".parse().expect("ip"), data, Instant::now());
    let after = book.counters();
    let outcomes = |c: &nexd::announce::book::BookCounters| {
        c.accepted + c.unknown_source + c.malformed + c.key_mismatch + c.bad_mac + c.replayed
    };
    assert_eq!(outcomes(&after), outcomes(&before) + 2);
    let peer = f.peer;
    assert!(!book.live(&peer).is_some_and(|l| l.is_exit()));
});
