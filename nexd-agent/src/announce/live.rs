//! What this agent knows of one peer's liveness from its announcements
//! and probes ([`PeerLive`]), and how long a peer may stay silent before
//! it counts as gone ([`probe_deadline`]). Both the book, which keeps this
//! state up to date, and the exit-node decisions, which judge exit nodes
//! by it, build on this module; it needs neither.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use super::wire;

/// A peer (an exit node) whose last announcement is older than this is
/// stale. Three
/// missed one-second heartbeats.
pub const STALE_AFTER: Duration = Duration::from_secs(3);
/// How often the client probes the exit node in use and the next one.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// The shortest probe deadline: three probe intervals. A lost probe or
/// two (1% loss makes three in a row a once-a-day event at 10 probes a
/// second) never moves the client.
pub const PROBE_DEADLINE_MIN: Duration = Duration::from_millis(300);

/// How long a probed exit node that answers probes may stay silent before
/// it counts as gone: three probe intervals, plus its smoothed round trip
/// and four times its deviation (TCP's retransmission timeout, in
/// spirit), between [`PROBE_DEADLINE_MIN`] and [`STALE_AFTER`]. A peer
/// not watched this way gets [`STALE_AFTER`].
pub fn probe_deadline(live: &PeerLive) -> Duration {
    if !live.watched() {
        return STALE_AFTER;
    }
    let rtt = live.rtt.unwrap_or_default();
    let var = live.rttvar.unwrap_or_default();
    (PROBE_INTERVAL * 3 + rtt + var * 4).clamp(PROBE_DEADLINE_MIN, STALE_AFTER)
}

/// Live state of one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerLive {
    /// Highest sequence accepted from the peer.
    pub last_seq: u64,
    /// When the last valid announcement arrived.
    pub last_heard: Option<Instant>,
    /// Flags of the last valid announcement as this device believes them:
    /// without the exit bit when the peer may not serve this device.
    pub flags: u8,
    /// Flags of the last valid announcement as the peer sent them.
    pub announced_flags: u8,
    /// The load of its last valid announcement, as reported (zeros: it
    /// reported none); `exit::select::Load::believe` decides what to believe of it.
    pub load: wire::LoadReport,
    /// Smoothed round-trip time through the tunnel (EWMA with weight 1/8
    /// per sample, as TCP's SRTT): exit-node selection compares these, so
    /// one delayed heartbeat does not make an exit node look slow.
    pub rtt: Option<Duration>,
    /// Smoothed mean deviation of the round trip (weight 1/4 per sample,
    /// as TCP's RTTVAR): how much later than `rtt` an answer may come
    /// before it is late.
    pub rttvar: Option<Duration>,
    /// Since when this device probes the peer (`FLAG_PROBE`), if it does.
    pub probed_since: Option<Instant>,
    /// When the peer last answered a probe (an announcement echoing one).
    pub probe_answered: Option<Instant>,
    /// Declared lost by its probes' deadline and not heard since: stays
    /// stale when probing stops, until it is heard again.
    pub lost: bool,
    /// Latest WireGuard handshake known for the peer. Kept across backend
    /// resets (a userspace peer update restarts its session), so a peer
    /// does not look unhealthy just because nexd reconfigured it.
    pub last_handshake: Option<Instant>,
    /// The peer's last seq and when it arrived, echoed back for its RTT.
    pub(super) echo: Option<(u64, Instant)>,
    /// Sent sequence numbers, when, and whether each was a probe.
    pub(super) sent: VecDeque<(u64, Instant, bool)>,
}

impl PeerLive {
    /// Whether the peer is an exit node *for this device*: it says so,
    /// and (once enforced) the mesh file lets it serve this device.
    pub fn is_exit(&self) -> bool {
        self.flags & wire::FLAG_EXIT != 0
    }

    /// The peer announces itself as exit node, but the mesh file does not
    /// let it serve this device: worth a warning in status, never used.
    pub fn exit_not_allowed(&self) -> bool {
        self.announced_flags & wire::FLAG_EXIT != 0 && !self.is_exit()
    }

    /// Its last announcement was a probe: it wants one back now.
    pub fn asks_for_answer(&self) -> bool {
        self.announced_flags & wire::FLAG_PROBE != 0
    }

    /// This device probes it, and it has answered since probing began:
    /// its liveness can be judged by the probes' deadline.
    pub fn watched(&self) -> bool {
        matches!((self.probed_since, self.probe_answered), (Some(p), Some(a)) if a >= p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer probed for 5 s that answered 10 ms ago, with this round
    /// trip and deviation.
    fn watched(rtt_ms: u64, var_ms: u64) -> PeerLive {
        let now = Instant::now() + Duration::from_secs(1000);
        PeerLive {
            rtt: Some(Duration::from_millis(rtt_ms)),
            rttvar: Some(Duration::from_millis(var_ms)),
            probed_since: now.checked_sub(Duration::from_secs(5)),
            probe_answered: now.checked_sub(Duration::from_millis(10)),
            ..PeerLive::default()
        }
    }

    #[test]
    fn the_probe_deadline_follows_round_trip_and_jitter_within_bounds() {
        assert_eq!(probe_deadline(&watched(0, 0)), PROBE_DEADLINE_MIN);
        assert_eq!(probe_deadline(&watched(80, 20)), Duration::from_millis(460));
        assert_eq!(probe_deadline(&watched(2000, 500)), STALE_AFTER);
    }

    #[test]
    fn a_peer_not_answering_its_probes_gets_the_heartbeat_deadline() {
        let mut l = watched(5, 1);
        l.probe_answered = l
            .probed_since
            .and_then(|p| p.checked_sub(Duration::from_millis(1)));
        assert!(!l.watched());
        assert_eq!(probe_deadline(&l), STALE_AFTER);
        l.probed_since = None;
        assert_eq!(probe_deadline(&l), STALE_AFTER);
    }
}
