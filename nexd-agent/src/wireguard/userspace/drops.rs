//! What the data path dropped, and why: the reasons the cores (`rx`, `tx`)
//! and the I/O layer give, and the device's counters, which `wg-rx` logs
//! at debug level every 10 s when they moved.
//!
//! The reasons are finer than the counters (a replayed datagram and a
//! forged one are told apart for tests and traces); the seven counters
//! are what they always were.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use boringtun::noise::errors::WireGuardError;

/// Why a packet or datagram was dropped.
#[derive(Debug)]
pub enum DropReason {
    /// No peer's AllowedIPs hold the packet's destination.
    NoRoute,
    /// The peer has no endpoint yet.
    NoEndpoint,
    /// The peer's handshake queue is full.
    QueueFull,
    /// Larger than a datagram slot once encrypted (counted with
    /// `queue_full`, where it always was).
    TooLarge,
    /// Not an IP packet, or a TUN read that cannot be cut into packets
    /// (send side); not a WireGuard message, or larger than a slot
    /// (receive side).
    Malformed,
    /// A message for no peer of this device (its receiver index, or the
    /// static key in an initiation, is unknown).
    UnknownPeer,
    /// boringtun refused the message: a wrong MAC, a replayed or too old
    /// counter, a wrong tag, no session for it.
    Rejected(WireGuardError),
    /// Decrypted, but its inner source (this address) is not in the
    /// sending peer's AllowedIPs (cryptokey routing).
    Source(IpAddr),
    /// The underlay could not send it (or had no socket yet).
    Send,
    /// The TUN refused it.
    Tun,
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DropReason::NoRoute => f.write_str("no peer's AllowedIPs hold the destination"),
            DropReason::NoEndpoint => f.write_str("the peer has no endpoint"),
            DropReason::QueueFull => f.write_str("the peer's handshake queue is full"),
            DropReason::TooLarge => f.write_str("too large for a datagram"),
            DropReason::Malformed => f.write_str("malformed"),
            DropReason::UnknownPeer => f.write_str("for no known peer"),
            DropReason::Rejected(e) => write!(f, "refused by the noise protocol: {e:?}"),
            DropReason::Source(from) => {
                write!(f, "inner source {from} not in the peer's AllowedIPs")
            }
            DropReason::Send => f.write_str("the underlay could not send it"),
            DropReason::Tun => f.write_str("the TUN refused it"),
        }
    }
}

/// The device's drop counters.
#[derive(Default)]
pub struct Drops {
    no_route: AtomicU64,
    no_endpoint: AtomicU64,
    queue_full: AtomicU64,
    invalid: AtomicU64,
    source: AtomicU64,
    send: AtomicU64,
    tun: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounts {
    pub no_route: u64,
    pub no_endpoint: u64,
    pub queue_full: u64,
    pub invalid: u64,
    pub source: u64,
    pub send: u64,
    pub tun: u64,
}

impl Drops {
    /// Counts `n` drops for `reason` (nothing for 0: no atomic write).
    pub fn count(&self, reason: &DropReason, n: usize) {
        if n == 0 {
            return;
        }
        let counter = match reason {
            DropReason::NoRoute => &self.no_route,
            DropReason::NoEndpoint => &self.no_endpoint,
            DropReason::QueueFull | DropReason::TooLarge => &self.queue_full,
            DropReason::Malformed | DropReason::UnknownPeer | DropReason::Rejected(_) => {
                &self.invalid
            }
            DropReason::Source(_) => &self.source,
            DropReason::Send => &self.send,
            DropReason::Tun => &self.tun,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> DropCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DropCounts {
            no_route: get(&self.no_route),
            no_endpoint: get(&self.no_endpoint),
            queue_full: get(&self.queue_full),
            invalid: get(&self.invalid),
            source: get(&self.source),
            send: get(&self.send),
            tun: get(&self.tun),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_lands_in_its_counter() {
        let d = Drops::default();
        for r in [
            DropReason::NoRoute,
            DropReason::NoEndpoint,
            DropReason::QueueFull,
            DropReason::TooLarge,
            DropReason::Malformed,
            DropReason::UnknownPeer,
            DropReason::Rejected(WireGuardError::DuplicateCounter),
            DropReason::Source(IpAddr::from([10, 0, 0, 1])),
            DropReason::Send,
            DropReason::Tun,
        ] {
            d.count(&r, 1);
        }
        d.count(&DropReason::Send, 0);
        assert_eq!(
            d.snapshot(),
            DropCounts {
                no_route: 1,
                no_endpoint: 1,
                queue_full: 2,
                invalid: 3,
                source: 1,
                send: 1,
                tun: 1,
            }
        );
    }
}
