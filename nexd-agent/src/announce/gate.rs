//! Which received datagrams may enter the queue to the daemon loop:
//! only from a mesh peer's address, and from each address at most a
//! sustained [`RATE_PER_SECOND`] with bursts of [`BURST`]. Decided in the
//! receive task, before the datagram is queued, so a flood from one
//! source (a misbehaving peer; or, through a client's exit peer whose
//! AllowedIPs cover everything, a spoofed peer address) costs a hash
//! lookup and never takes queue slots from the others' heartbeats.
//!
//! Memory is bounded by the mesh: one bucket per peer address, made when
//! the daemon says which addresses are peers, never for a stranger.
//!
//! Pure logic with an injected clock.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

/// Sustained datagrams per second accepted from one address. A peer sends
/// one heartbeat per second, and a client watching its exit node ten
/// probes a second (an exit node as many answers); sixteen leave room for
/// a restart and jitter.
pub const RATE_PER_SECOND: u32 = 16;
/// Datagrams accepted back to back from one address.
pub const BURST: u32 = 24;

/// Tokens are counted in thousandths, so refills need no floats.
const MILLI: u64 = 1000;

/// Why a datagram was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source is not the mesh address of a peer.
    NotAPeer,
    /// Its source sent more than its share.
    RateLimited,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    milli_tokens: u64,
    at: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Self {
        Bucket {
            milli_tokens: u64::from(BURST) * MILLI,
            at: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at);
        // Whole milliseconds only; the remainder stays for the next refill.
        let ms = elapsed.as_millis().min(u128::from(u32::MAX)) as u64;
        self.at += Duration::from_millis(ms);
        self.milli_tokens =
            (self.milli_tokens + ms * u64::from(RATE_PER_SECOND)).min(u64::from(BURST) * MILLI);
        if self.milli_tokens >= MILLI {
            self.milli_tokens -= MILLI;
            true
        } else {
            false
        }
    }
}

/// The admission state: `None` admits everything (an announcer bound
/// without a peer list, as the daemon did before; see
/// `Announcer::bind`), `Some` only the listed addresses, rate-capped.
#[derive(Debug, Default)]
pub struct Gate {
    peers: Option<HashMap<IpAddr, Bucket>>,
}

impl Gate {
    /// A gate that admits only `peers`.
    pub fn for_peers(peers: impl IntoIterator<Item = IpAddr>, now: Instant) -> Self {
        let mut g = Gate::default();
        g.set_peers(peers, now);
        g
    }

    /// A gate that admits everything (no peer list known).
    pub fn open() -> Self {
        Gate::default()
    }

    /// Replaces the peer addresses. Addresses that stay keep their bucket
    /// (a reload does not refill a flooder's); new ones start full.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = IpAddr>, now: Instant) {
        let mut old = self.peers.take().unwrap_or_default();
        self.peers = Some(
            peers
                .into_iter()
                .map(|ip| ip.to_canonical())
                .map(|ip| (ip, old.remove(&ip).unwrap_or_else(|| Bucket::full(now))))
                .collect(),
        );
    }

    /// Whether a datagram from `src` may be queued now.
    pub fn admit(&mut self, src: IpAddr, now: Instant) -> Result<(), Refused> {
        let Some(peers) = &mut self.peers else {
            return Ok(());
        };
        let bucket = peers
            .get_mut(&src.to_canonical())
            .ok_or(Refused::NotAPeer)?;
        if bucket.take(now) {
            Ok(())
        } else {
            Err(Refused::RateLimited)
        }
    }

    /// How many addresses have a bucket (bounded by the mesh).
    pub fn len(&self) -> usize {
        self.peers.as_ref().map_or(0, HashMap::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::ip;

    #[test]
    fn strangers_are_refused_and_get_no_state() {
        let t0 = Instant::now();
        let mut g = Gate::for_peers([ip("100.64.0.2"), ip("fd00::2")], t0);
        assert_eq!(g.admit(ip("100.64.0.2"), t0), Ok(()));
        assert_eq!(g.admit(ip("fd00::2"), t0), Ok(()));
        assert_eq!(g.admit(ip("::ffff:100.64.0.2"), t0), Ok(()));
        for i in 0..10_000u32 {
            let stranger = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            assert_eq!(g.admit(stranger, t0), Err(Refused::NotAPeer));
        }
        assert_eq!(g.len(), 2, "a flood of strangers allocates nothing");
    }

    #[test]
    fn a_flooding_peer_is_capped_and_others_are_not_affected() {
        let t0 = Instant::now();
        let (flooder, honest) = (ip("100.64.0.2"), ip("100.64.0.3"));
        let mut g = Gate::for_peers([flooder, honest], t0);
        // A burst of BURST passes, then nothing until tokens refill.
        let passed = (0..1000).filter(|_| g.admit(flooder, t0).is_ok()).count();
        assert_eq!(passed, BURST as usize);
        // Over ten seconds of flooding (1,000 per second), the flooder gets
        // RATE_PER_SECOND a second; the honest peer's heartbeat (one a
        // second) always passes.
        let mut flood_passed = 0;
        for ms in 1..=10_000u64 {
            let now = t0 + Duration::from_millis(ms);
            if g.admit(flooder, now).is_ok() {
                flood_passed += 1;
            }
            if ms % 1000 == 0 {
                assert_eq!(g.admit(honest, now), Ok(()), "heartbeat at {ms} ms");
            }
        }
        assert_eq!(flood_passed, 10 * RATE_PER_SECOND as usize);
    }

    #[test]
    fn a_quiet_peer_refills_up_to_the_burst_only() {
        let t0 = Instant::now();
        let p = ip("100.64.0.2");
        let mut g = Gate::for_peers([p], t0);
        let later = t0 + Duration::from_secs(3600);
        let passed = (0..100).filter(|_| g.admit(p, later).is_ok()).count();
        assert_eq!(passed, BURST as usize);
    }

    #[test]
    fn a_reload_keeps_buckets_and_drops_removed_peers() {
        let t0 = Instant::now();
        let (a, b) = (ip("100.64.0.2"), ip("100.64.0.3"));
        let mut g = Gate::for_peers([a, b], t0);
        while g.admit(a, t0).is_ok() {}
        g.set_peers([a], t0);
        assert_eq!(g.admit(a, t0), Err(Refused::RateLimited), "not refilled");
        assert_eq!(g.admit(b, t0), Err(Refused::NotAPeer));
        g.set_peers([a, b], t0);
        assert_eq!(g.admit(b, t0), Ok(()), "a new peer starts full");
    }

    #[test]
    fn an_open_gate_admits_everything() {
        let mut g = Gate::open();
        assert_eq!(g.admit(ip("192.0.2.1"), Instant::now()), Ok(()));
        assert!(g.is_empty());
    }
}
