//! The load an exit node announces (issue 23), as a pure meter over its
//! counters: forwarded bits per second from the data path's per-client
//! byte counters, the clients that say they use it, and its capacity.
//! `ExitRole::load_report` reads the counters and the link speed and
//! feeds them here.

use std::time::{Duration, Instant};

use crate::announce::wire::{LOAD_PRESENT, LoadReport};

/// A rate over less than this is noise (two reads in one tick).
const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// Forwarded bytes so far, both directions, summed over the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Forwarded {
    /// From the clients (towards the internet).
    pub from_clients: u64,
    /// To the clients.
    pub to_clients: u64,
}

/// Turns successive totals into a rate: bits per second of the busier
/// direction (an uplink is full when either direction is).
#[derive(Debug, Default)]
pub struct ForwardMeter {
    last: Option<(Instant, Forwarded)>,
    bps: u64,
}

impl ForwardMeter {
    /// Takes the totals at `now`; returns the rate since the previous
    /// sample. Totals that went down (a client's counters went with it)
    /// start over: the previous rate stands until the next sample.
    pub fn sample(&mut self, totals: Forwarded, now: Instant) -> u64 {
        match self.last {
            Some((t, _)) if now.saturating_duration_since(t) < MIN_INTERVAL => return self.bps,
            Some((t, prev))
                if totals.from_clients >= prev.from_clients
                    && totals.to_clients >= prev.to_clients =>
            {
                let secs = now.saturating_duration_since(t).as_secs_f64();
                let bytes = (totals.from_clients - prev.from_clients)
                    .max(totals.to_clients - prev.to_clients);
                self.bps = (bytes as f64 * 8.0 / secs) as u64;
            }
            _ => {}
        }
        self.last = Some((now, totals));
        self.bps
    }
}

/// The wire report: `forwarded_bps`, `clients` (devices whose latest
/// announcement says they use this exit node), `link_bps` (the uplink's
/// speed, 0: unknown) lowered to `capacity_bps` (the mesh file's
/// `exit_capacity`) when that is given, and the conntrack table's fill.
pub fn report(
    forwarded_bps: u64,
    clients: usize,
    link_bps: u64,
    capacity_bps: Option<u64>,
    conntrack_percent: Option<u8>,
) -> LoadReport {
    let capacity = match (link_bps, capacity_bps) {
        (0, c) => c.unwrap_or(0),
        (l, Some(c)) => l.min(c),
        (l, None) => l,
    };
    LoadReport {
        flags: LOAD_PRESENT,
        conntrack_percent: conntrack_percent.unwrap_or(0),
        forwarded_kbps: u32::try_from(forwarded_bps / 1_000).unwrap_or(u32::MAX),
        link_mbps: u16::try_from(capacity / 1_000_000).unwrap_or(u16::MAX),
        clients: u16::try_from(clients).unwrap_or(u16::MAX),
        ..LoadReport::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(from_clients: u64, to_clients: u64) -> Forwarded {
        Forwarded {
            from_clients,
            to_clients,
        }
    }

    #[test]
    fn the_rate_is_the_busier_direction_and_survives_a_counter_reset() {
        let t0 = Instant::now();
        let mut m = ForwardMeter::default();
        assert_eq!(m.sample(f(0, 0), t0), 0);
        // 1 MB up, 12.5 MB down in one second: 100 Mbit/s.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(m.sample(f(1_000_000, 12_500_000), t1), 100_000_000);
        // Too soon: the same rate.
        assert_eq!(
            m.sample(f(9_000_000, 99_000_000), t1 + Duration::from_millis(10)),
            100_000_000
        );
        // A client left and took its counters: no negative rate; the
        // previous one stands, and the next sample measures from here.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(m.sample(f(10, 10), t2), 100_000_000);
        let t3 = t2 + Duration::from_secs(2);
        assert_eq!(m.sample(f(10, 2_500_010), t3), 10_000_000);
    }

    #[test]
    fn the_report_carries_the_capacity_bounded_by_the_mesh_file() {
        let r = report(
            1_500_000_000,
            3,
            10_000_000_000,
            Some(2_000_000_000),
            Some(4),
        );
        assert!(r.present());
        assert_eq!(
            (
                r.forwarded_kbps,
                r.link_mbps,
                r.clients,
                r.conntrack_percent
            ),
            (1_500_000, 2_000, 3, 4)
        );
        assert_eq!(report(0, 0, 0, Some(2_000_000_000), None).link_mbps, 2_000);
        assert_eq!(report(0, 0, 100_000_000, None, None).link_mbps, 100);
        assert_eq!(report(0, 0, 0, None, None).link_mbps, 0);
        // Nothing present is all zeros but the flag.
        assert!(report(0, 0, 0, None, None).present());
    }
}
