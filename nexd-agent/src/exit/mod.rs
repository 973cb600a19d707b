//! Exit-node client decisions, as pure functions of (state, announcements,
//! time): which exit nodes are available, which one to use, and what the
//! client should have installed. No I/O, so every rule has a unit test.
//!
//! The rules:
//! * an exit node is *available* when its latest announcement says so, is
//!   fresh, and WireGuard completed a handshake with it within
//!   [`HANDSHAKE_RECENT`]. Fresh means younger than [`STALE_AFTER`] (three
//!   missed one-second heartbeats), except for the exit node in use and
//!   the next one: the client probes those every [`PROBE_INTERVAL`] and,
//!   once they answer, holds them to [`probe_deadline`] (three missed
//!   probes plus the round trip and four times its deviation, at least
//!   [`PROBE_DEADLINE_MIN`]): a dead exit node is noticed in about
//!   300 ms, without more heartbeats for the rest of the mesh;
//! * the pinned exit node (`--exit-node`) is used when available, and no
//!   other; without a pin, the available one with the lowest smoothed RTT
//!   (then name) is chosen: exactly one;
//! * the active exit node is kept while it is available, unless another
//!   one has been clearly faster for a while: the active one has been in
//!   use for [`SWITCH_DWELL`] and the other's smoothed RTT beats it by
//!   both [`SWITCH_MIN_GAIN`] and [`SWITCH_MIN_RATIO`]. Smoothing, margin
//!   and dwell together are the hysteresis: two exit nodes with similar
//!   RTTs never swap, a sustained big difference moves the client once;
//! * the client config is applied only once an exit node is available (a
//!   device is never stranded), and once applied, losing every exit node
//!   holds internet traffic back (fail-closed) instead of leaking it.

pub mod plan;
pub mod select;

use std::time::{Duration, Instant};

// How long a peer may stay silent is the announcements' rule (a watched
// exit node's probe deadline); the rules above are stated in its terms.
pub use crate::announce::live::{PROBE_DEADLINE_MIN, PROBE_INTERVAL, STALE_AFTER, probe_deadline};
use crate::{announce::live::PeerLive, keys::PublicKey};

/// A handshake older than this means the tunnel is down (WireGuard's
/// reject-after time).
pub const HANDSHAKE_RECENT: Duration = Duration::from_secs(180);

/// An active exit node is kept at least this long before a faster one
/// may replace it (failover when it becomes unavailable is immediate).
pub const SWITCH_DWELL: Duration = Duration::from_secs(30);
/// A faster exit node must beat the active one's smoothed RTT by at least
/// this much...
pub const SWITCH_MIN_GAIN: Duration = Duration::from_millis(10);
/// ...and by at least this fraction of it (0.3: 30% faster).
pub const SWITCH_MIN_RATIO: f64 = 0.3;

pub use nexd_proto::ExitStatus;

/// The exit status of a peer, or `None` if it does not act as exit node.
pub fn status(live: &PeerLive, now: Instant) -> Option<ExitStatus> {
    if !live.is_exit() {
        return None;
    }
    let fresh = !live.lost
        && live
            .last_heard
            .is_some_and(|t| now.saturating_duration_since(t) < probe_deadline(live));
    let tunnel = live
        .last_handshake
        .is_some_and(|t| now.saturating_duration_since(t) < HANDSHAKE_RECENT);
    Some(if fresh && tunnel {
        ExitStatus::Available
    } else {
        ExitStatus::Stale
    })
}

/// Until when an exit node's announcements keep it fresh (its last one
/// plus its deadline), or `None` when it is already lost or never
/// announced itself. The client re-evaluates at that instant, so a dead
/// exit node is left at its deadline rather than at the next probe tick.
pub fn fresh_until(live: &PeerLive) -> Option<Instant> {
    if live.lost || !live.is_exit() {
        return None;
    }
    live.last_heard.map(|t| t + probe_deadline(live))
}

/// One peer as a candidate exit node.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub key: PublicKey,
    pub name: &'a str,
    pub live: &'a PeerLive,
}

/// The exit node in use and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current {
    pub key: PublicKey,
    pub since: Instant,
}

/// The exit node to use now, if any.
pub fn choose<'a>(
    current: Option<Current>,
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
    let rtt = |c: &Candidate<'_>| c.live.rtt.unwrap_or(Duration::MAX);
    let fastest = available
        .iter()
        .min_by(|a, b| rtt(a).cmp(&rtt(b)).then_with(|| a.name.cmp(b.name)))?;
    let Some(cur) = current else {
        return Some(fastest.key);
    };
    let Some(active) = available.iter().find(|c| c.key == cur.key) else {
        return Some(fastest.key);
    };
    let dwelt = now.saturating_duration_since(cur.since) >= SWITCH_DWELL;
    let clearly_faster = match (active.live.rtt, fastest.live.rtt) {
        (Some(a), Some(f)) => {
            let margin = SWITCH_MIN_GAIN.max(a.mul_f64(SWITCH_MIN_RATIO));
            f.saturating_add(margin) < a
        }
        // Without both measurements there is nothing to compare.
        _ => false,
    };
    Some(if dwelt && clearly_faster {
        fastest.key
    } else {
        active.key
    })
}

/// The exit nodes worth probing: the one in use and the one `choose`
/// would move to if it went away (the fastest other available one, or the
/// pinned one), so a failover finds its target already watched.
pub fn probe_targets<'a>(
    active: Option<PublicKey>,
    pinned: Option<PublicKey>,
    candidates: impl IntoIterator<Item = Candidate<'a>>,
    now: Instant,
) -> Vec<PublicKey> {
    let others: Vec<Candidate<'a>> = candidates
        .into_iter()
        .filter(|c| Some(c.key) != active)
        .collect();
    let standby = choose(None, pinned, others, now);
    active.into_iter().chain(standby).collect()
}

/// Where the exit-node client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    /// Candidates "a" and "b", in that order.
    fn pair<'a>(
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

    /// `key` in use since `secs` seconds before `now`.
    fn current(key: PublicKey, now: Instant, secs: u64) -> Option<Current> {
        Some(Current {
            key,
            since: now - Duration::from_secs(secs),
        })
    }

    /// `l` probed since `probed_ago_ms` and last answering
    /// `answered_ago_ms` before `now`, heard then too.
    fn watched(
        mut l: PeerLive,
        now: Instant,
        probed_ago_ms: u64,
        answered_ago_ms: u64,
    ) -> PeerLive {
        l.probed_since = now.checked_sub(Duration::from_millis(probed_ago_ms));
        l.probe_answered = now.checked_sub(Duration::from_millis(answered_ago_ms));
        l.last_heard = l.probe_answered;
        l
    }

    #[test]
    fn a_watched_exit_node_is_stale_after_its_probe_deadline() {
        let now = Instant::now() + Duration::from_secs(1000);
        // 5 ms round trip, 1 ms deviation: 300 + 5 + 4 = 309 ms.
        let mut l = live(now, 0, 5);
        l.rttvar = Some(Duration::from_millis(1));
        let ok = watched(l.clone(), now, 5000, 200);
        assert_eq!(probe_deadline(&ok), Duration::from_millis(309));
        assert_eq!(status(&ok, now), Some(ExitStatus::Available));
        let late = watched(l.clone(), now, 5000, 320);
        assert_eq!(status(&late, now), Some(ExitStatus::Stale));
        // Not yet answered since probing began: heartbeats' 3 s rule.
        let unanswered = watched(l.clone(), now, 100, 900);
        assert_eq!(probe_deadline(&unanswered), STALE_AFTER);
        assert_eq!(status(&unanswered, now), Some(ExitStatus::Available));
        // Not probed at all: 3 s.
        let mut quiet = l.clone();
        quiet.last_heard = now.checked_sub(Duration::from_millis(2500));
        assert_eq!(status(&quiet, now), Some(ExitStatus::Available));
    }

    #[test]
    fn an_exit_node_is_fresh_until_its_last_announcement_plus_its_deadline() {
        let now = Instant::now() + Duration::from_secs(1000);
        let mut l = live(now, 0, 5);
        l.rttvar = Some(Duration::from_millis(1));
        let ok = watched(l.clone(), now, 5000, 200);
        let until = fresh_until(&ok).expect("fresh");
        assert_eq!(
            until,
            now - Duration::from_millis(200) + Duration::from_millis(309)
        );
        // The status turns at exactly that instant.
        assert_eq!(
            status(&ok, until - Duration::from_millis(1)),
            Some(ExitStatus::Available)
        );
        assert_eq!(status(&ok, until), Some(ExitStatus::Stale));
        let mut lost = ok.clone();
        lost.lost = true;
        assert_eq!(fresh_until(&lost), None);
        let mut plain = ok;
        plain.flags = 0;
        assert_eq!(fresh_until(&plain), None);
    }

    #[test]
    fn a_lost_exit_node_stays_stale_until_heard_again() {
        let now = Instant::now() + Duration::from_secs(1000);
        let mut l = live(now, 0, 5);
        l.last_heard = now.checked_sub(Duration::from_millis(500));
        l.lost = true;
        assert_eq!(status(&l, now), Some(ExitStatus::Stale));
    }

    #[test]
    fn probes_go_to_the_exit_node_in_use_and_the_next_one() {
        let now = Instant::now() + Duration::from_secs(1000);
        let (ka, kb, kc) = (key(), key(), key());
        let (la, lb, lc) = (live(now, 1, 30), live(now, 1, 10), live(now, 1, 20));
        let mut all = pair(ka, &la, kb, &lb);
        all.push(Candidate {
            key: kc,
            name: "c",
            live: &lc,
        });
        // In use: a; next: b, the fastest of the others.
        assert_eq!(probe_targets(Some(ka), None, all.clone(), now), [ka, kb]);
        // Nothing in use: the one choose would pick.
        assert_eq!(probe_targets(None, None, all.clone(), now), [kb]);
        // Pinned: only the pinned one is ever a target besides the active.
        assert_eq!(
            probe_targets(Some(ka), Some(kc), all.clone(), now),
            [ka, kc]
        );
        // A stale one is nobody's next.
        let stale = live(now, 10, 1);
        let two = pair(ka, &la, kb, &stale);
        assert_eq!(probe_targets(Some(ka), None, two, now), [ka]);
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
        let cands = |la, lb| pair(ka, la, kb, lb);
        // Just switched to a (well inside the dwell time).
        let a_new = current(ka, now, 1);
        // Lowest RTT first.
        assert_eq!(choose(None, None, cands(&la, &lb), now), Some(kb));
        // The current one stays while available, even if slower, until it
        // has been used for the dwell time.
        assert_eq!(choose(a_new, None, cands(&la, &lb), now), Some(ka));
        // When it goes stale, the other takes over at once.
        let la_stale = live(now, 10, 30);
        assert_eq!(choose(a_new, None, cands(&la_stale, &lb), now), Some(kb));
        // Pinned: that one or none.
        assert_eq!(choose(None, Some(ka), cands(&la, &lb), now), Some(ka));
        assert_eq!(choose(None, Some(ka), cands(&la_stale, &lb), now), None);
        // Nothing available: none.
        let lb_stale = live(now, 10, 5);
        assert_eq!(
            choose(current(kb, now, 1), None, cands(&la_stale, &lb_stale), now),
            None
        );
    }

    #[test]
    fn a_clearly_faster_exit_node_wins_after_the_dwell_time_only() {
        let now = Instant::now() + Duration::from_secs(1000);
        let (ka, kb) = (key(), key());
        let cands = |la, lb| pair(ka, la, kb, lb);
        let a_since = |secs| current(ka, now, secs);
        let long = SWITCH_DWELL.as_secs() + 1;
        let short = SWITCH_DWELL.as_secs() - 1;
        // a: 60 ms, b: 20 ms. Clearly faster (40 ms > max(10, 18) ms).
        let (a60, b20) = (&live(now, 1, 60), &live(now, 1, 20));
        assert_eq!(choose(a_since(long), None, cands(a60, b20), now), Some(kb));
        assert_eq!(choose(a_since(short), None, cands(a60, b20), now), Some(ka));
        // a: 60 ms, b: 45 ms: 15 ms better but not 30% (18 ms): stay.
        let b45 = &live(now, 1, 45);
        assert_eq!(choose(a_since(long), None, cands(a60, b45), now), Some(ka));
        // a: 12 ms, b: 4 ms: 67% better but under 10 ms: stay (LAN-scale
        // jitter must not move the client).
        let (a12, b4) = (&live(now, 1, 12), &live(now, 1, 4));
        assert_eq!(choose(a_since(long), None, cands(a12, b4), now), Some(ka));
        // Once switched to b, a (now slower) never pulls the client back.
        assert_eq!(
            choose(current(kb, now, long), None, cands(a60, b20), now),
            Some(kb)
        );
        // No RTT for the active one yet: nothing to compare, stay.
        let mut a_unknown = live(now, 1, 0);
        a_unknown.rtt = None;
        assert_eq!(
            choose(a_since(long), None, cands(&a_unknown, b20), now),
            Some(ka)
        );
        // A pin overrides speed.
        assert_eq!(
            choose(a_since(long), Some(ka), cands(a60, b20), now),
            Some(ka)
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
