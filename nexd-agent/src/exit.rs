//! Exit-node client decisions, as pure functions of (state, announcements,
//! time): which exit nodes are available, which one to use, and what the
//! client should have installed. No I/O, so every rule has a unit test.
//!
//! The rules:
//! * an exit node is *available* when its latest announcement says so, is
//!   fresh (younger than [`STALE_AFTER`]), and WireGuard completed a
//!   handshake with it within [`HANDSHAKE_RECENT`];
//! * the active exit node is kept while it is available (no flapping when
//!   another one looks better); otherwise the pinned one, else the
//!   available one with the lowest RTT (then name) is chosen: exactly one;
//! * the client config is applied only once an exit node is available (a
//!   device is never stranded), and once applied, losing every exit node
//!   holds internet traffic back (fail-closed) instead of leaking it.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{announce::book::PeerLive, keys::PublicKey};

/// An exit node whose last announcement is older than this is stale. Three
/// missed one-second heartbeats.
pub const STALE_AFTER: Duration = Duration::from_secs(3);
/// A handshake older than this means the tunnel is down (WireGuard's
/// reject-after time).
pub const HANDSHAKE_RECENT: Duration = Duration::from_secs(180);

/// How an exit node looks to this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Available,
    Stale,
}

/// The exit status of a peer, or `None` if it does not act as exit node.
pub fn status(live: &PeerLive, now: Instant) -> Option<ExitStatus> {
    if !live.is_exit() {
        return None;
    }
    let fresh = live
        .last_heard
        .is_some_and(|t| now.saturating_duration_since(t) < STALE_AFTER);
    let tunnel = live
        .last_handshake
        .is_some_and(|t| now.saturating_duration_since(t) < HANDSHAKE_RECENT);
    Some(if fresh && tunnel {
        ExitStatus::Available
    } else {
        ExitStatus::Stale
    })
}

/// One peer as a candidate exit node.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub key: PublicKey,
    pub name: &'a str,
    pub live: &'a PeerLive,
}

/// The exit node to use now, if any.
pub fn choose<'a>(
    current: Option<PublicKey>,
    pinned: Option<PublicKey>,
    candidates: impl IntoIterator<Item = Candidate<'a>>,
    now: Instant,
) -> Option<PublicKey> {
    let available: Vec<Candidate<'a>> = candidates
        .into_iter()
        .filter(|c| status(c.live, now) == Some(ExitStatus::Available))
        .collect();
    if let Some(p) = pinned {
        return available.iter().any(|c| c.key == p).then_some(p);
    }
    if let Some(cur) = current
        && available.iter().any(|c| c.key == cur)
    {
        return Some(cur);
    }
    available
        .into_iter()
        .min_by(|a, b| {
            let rtt = |c: &Candidate<'_>| c.live.rtt.unwrap_or(Duration::MAX);
            rtt(a).cmp(&rtt(b)).then_with(|| a.name.cmp(b.name))
        })
        .map(|c| c.key)
}

/// Where the exit-node client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", content = "exit", rename_all = "snake_case")]
pub enum Phase {
    /// Not wanted; nothing installed.
    Off,
    /// Wanted, but no exit node has been available yet; nothing installed,
    /// the device keeps its direct path.
    Waiting,
    /// Installed, with this exit node carrying the default routes.
    Active(PublicKey),
    /// Installed, but the exit node went away and none is available:
    /// internet traffic is held back (routed into the tunnel, where no peer
    /// accepts it) until one comes back or the client is disabled.
    Held,
}

impl Phase {
    /// Whether policy routing into the tunnel is installed.
    pub fn routing_installed(self) -> bool {
        matches!(self, Phase::Active(_) | Phase::Held)
    }

    /// The peer that carries 0.0.0.0/0 and ::/0.
    pub fn exit_peer(self) -> Option<PublicKey> {
        match self {
            Phase::Active(k) => Some(k),
            _ => None,
        }
    }
}

/// The next phase from whether the client is wanted and which exit node
/// `choose` picked.
pub fn next_phase(wanted: bool, phase: Phase, chosen: Option<PublicKey>) -> Phase {
    match (wanted, chosen) {
        (false, _) => Phase::Off,
        (true, Some(k)) => Phase::Active(k),
        (true, None) if phase.routing_installed() => Phase::Held,
        (true, None) => Phase::Waiting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{announce::wire::FLAG_EXIT, keys::PrivateKey};

    fn live(now: Instant, heard_ago: u64, rtt_ms: u64) -> PeerLive {
        let mut l = PeerLive::default();
        l.flags = FLAG_EXIT;
        l.last_heard = now.checked_sub(Duration::from_secs(heard_ago));
        l.last_handshake = now.checked_sub(Duration::from_secs(10));
        l.rtt = Some(Duration::from_millis(rtt_ms));
        l
    }

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    #[test]
    fn availability_needs_exit_flag_fresh_heartbeat_and_handshake() {
        let now = Instant::now() + Duration::from_secs(1000);
        assert_eq!(status(&live(now, 1, 5), now), Some(ExitStatus::Available));
        assert_eq!(status(&live(now, 4, 5), now), Some(ExitStatus::Stale));
        let mut no_hs = live(now, 1, 5);
        no_hs.last_handshake = None;
        assert_eq!(status(&no_hs, now), Some(ExitStatus::Stale));
        let mut old_hs = live(now, 1, 5);
        old_hs.last_handshake = now.checked_sub(Duration::from_secs(200));
        assert_eq!(status(&old_hs, now), Some(ExitStatus::Stale));
        let mut not_exit = live(now, 1, 5);
        not_exit.flags = 0;
        assert_eq!(status(&not_exit, now), None);
    }

    #[test]
    fn exactly_one_is_chosen_and_kept_while_available() {
        let now = Instant::now() + Duration::from_secs(1000);
        let (ka, kb) = (key(), key());
        let (la, lb) = (live(now, 1, 30), live(now, 1, 5));
        fn two<'a>(
            ka: PublicKey,
            la: &'a PeerLive,
            kb: PublicKey,
            lb: &'a PeerLive,
        ) -> Vec<Candidate<'a>> {
            vec![
                Candidate {
                    key: ka,
                    name: "a",
                    live: la,
                },
                Candidate {
                    key: kb,
                    name: "b",
                    live: lb,
                },
            ]
        }
        let cands = |la, lb| two(ka, la, kb, lb);
        // Lowest RTT first.
        assert_eq!(choose(None, None, cands(&la, &lb), now), Some(kb));
        // The current one stays while available, even if slower.
        assert_eq!(choose(Some(ka), None, cands(&la, &lb), now), Some(ka));
        // When it goes stale, the other takes over.
        let la_stale = live(now, 10, 30);
        assert_eq!(choose(Some(ka), None, cands(&la_stale, &lb), now), Some(kb));
        // Pinned: that one or none.
        assert_eq!(choose(None, Some(ka), cands(&la, &lb), now), Some(ka));
        assert_eq!(choose(None, Some(ka), cands(&la_stale, &lb), now), None);
        // Nothing available: none.
        let lb_stale = live(now, 10, 5);
        assert_eq!(
            choose(Some(kb), None, cands(&la_stale, &lb_stale), now),
            None
        );
    }

    #[test]
    fn phases_never_strand_and_fail_closed() {
        let k = key();
        assert_eq!(next_phase(true, Phase::Off, None), Phase::Waiting);
        assert_eq!(next_phase(true, Phase::Waiting, Some(k)), Phase::Active(k));
        assert_eq!(next_phase(true, Phase::Active(k), None), Phase::Held);
        assert_eq!(next_phase(true, Phase::Held, None), Phase::Held);
        assert_eq!(next_phase(true, Phase::Held, Some(k)), Phase::Active(k));
        assert_eq!(next_phase(false, Phase::Held, Some(k)), Phase::Off);
        assert!(!Phase::Waiting.routing_installed());
        assert!(Phase::Held.routing_installed());
        assert_eq!(Phase::Held.exit_peer(), None);
    }
}
