//! Load-aware choice of the exit node (issue 23), pure: from the
//! candidates (their announcements: availability, smoothed RTT, load),
//! the capacities the signed mesh file gives them, this client's key, the
//! exit node in use and the time, a choice and the reason for it.
//!
//! Why it looks like this:
//! * *Comparable first, then headroom.* Round trip decides which exit
//!   nodes are worth using at all: one is comparable when the fastest is
//!   not clearly faster than it (the margin of `exit::choose`'s speed
//!   rule: [`SWITCH_MIN_GAIN`] and [`SWITCH_MIN_RATIO`]). Among the
//!   comparable ones, headroom (capacity minus what it forwards) decides,
//!   so a well-placed exit node no longer gets everyone.
//! * *Weighted rendezvous hashing* ([`spread`]): each client ranks the
//!   exit nodes by a hash of (its key, the exit node's key) scaled by the
//!   headroom, and takes the top one. No coordination and no shared
//!   state, yet the clients divide themselves in proportion to headroom;
//!   adding an exit node moves only the clients it wins, and when one
//!   fails only its clients move, spread over the others by weight (no
//!   herd onto the next best).
//! * *Sticky.* Moving breaks the client's connections, so the exit node
//!   in use is kept until it has been overloaded (forwarding at least
//!   [`OVERLOADED_AT`] of its capacity) for [`OVERLOAD_DWELL`] without a
//!   break, and at most once per [`SWITCH_DWELL`]; and never to an exit
//!   node that this client's share of traffic would overload. Load that
//!   oscillates faster than the dwell moves nobody.
//! * *The operator bounds the capacity* ([`Load::believe`]): an exit node
//!   reports its link speed, but what a client believes is at most the
//!   signed `exit_capacity` (or [`UNSIGNED_CAPACITY_MAX`] without one), so
//!   an exit node that lies attracts no more than its signed share.
//! * *Older exit nodes*: when any available exit node reports no load
//!   (all-zero bytes), the choice is today's RTT rule (`exit::choose`)
//!   for all of them: a mesh in the middle of an upgrade behaves as before.
//! * `--exit-node NAME` pinning wins over all of this.

use std::{
    fmt,
    time::{Duration, Instant},
};

use blake2::{Blake2s256, Digest as _};

use super::{Candidate, Current, ExitStatus, SWITCH_DWELL, SWITCH_MIN_GAIN, SWITCH_MIN_RATIO};
use crate::{announce::wire::LoadReport, keys::PublicKey, mesh::Rate};

/// An exit node forwarding at least this fraction of its capacity is
/// overloaded: its clients' flows queue behind each other.
pub const OVERLOADED_AT: f64 = 0.9;
/// When an exit node is overloaded, only the share of its clients that
/// brings it back to this fraction of its capacity leaves it
/// ([`Load::leaving_share`]): all of them at once would overload the
/// next one (a herd moving every dwell).
pub const RELIEVED_AT: f64 = 0.8;
/// How long the exit node in use must be overloaded, without a break,
/// before the client leaves it.
pub const OVERLOAD_DWELL: Duration = SWITCH_DWELL;
/// The capacity believed of an exit node the mesh file gives none: its
/// reported link speed, but no more than this (1 Gbit/s), so an exit node
/// cannot claim a large share by reporting a fast link.
pub const UNSIGNED_CAPACITY_MAX: u64 = 1_000_000_000;

/// An exit node's load as this client believes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// What it forwards through its uplinks, bits per second.
    pub forwarded_bps: u64,
    /// What it can forward: its link speed bounded by the signed
    /// capacity.
    pub capacity_bps: u64,
    /// Devices using it now, as it reports.
    pub clients: u16,
}

impl Load {
    /// What to believe of `report` given the mesh file's `signed`
    /// capacity; `None` when the exit node reported no load (an older
    /// agent). The capacity is the signed one (or
    /// [`UNSIGNED_CAPACITY_MAX`]), lowered to the reported link speed when
    /// that is known and slower: an exit node can only claim less.
    pub fn believe(report: &LoadReport, signed: Option<Rate>) -> Option<Load> {
        if !report.present() {
            return None;
        }
        let bound = signed.map_or(UNSIGNED_CAPACITY_MAX, Rate::bits_per_second);
        let link = u64::from(report.link_mbps) * 1_000_000;
        let capacity = if link == 0 { bound } else { link.min(bound) };
        Some(Load {
            forwarded_bps: u64::from(report.forwarded_kbps) * 1_000,
            capacity_bps: capacity,
            clients: report.clients,
        })
    }

    /// Capacity not in use, bits per second.
    pub fn headroom_bps(&self) -> u64 {
        self.capacity_bps.saturating_sub(self.forwarded_bps)
    }

    /// Forwarded over capacity (0 when the capacity is 0: nothing known).
    pub fn utilisation(&self) -> f64 {
        if self.capacity_bps == 0 {
            return 0.0;
        }
        self.forwarded_bps as f64 / self.capacity_bps as f64
    }

    pub fn overloaded(&self) -> bool {
        self.overloaded_with(0)
    }

    /// Whether it would be overloaded with `extra` bits per second more.
    fn overloaded_with(&self, extra: u64) -> bool {
        self.capacity_bps > 0
            && self.forwarded_bps.saturating_add(extra) as f64
                >= OVERLOADED_AT * self.capacity_bps as f64
    }

    /// The share of its clients that should leave it to bring it down to
    /// [`RELIEVED_AT`], assuming they forward alike: 0 when it is not
    /// above that.
    pub fn leaving_share(&self) -> f64 {
        if self.forwarded_bps == 0 {
            return 0.0;
        }
        let keep = RELIEVED_AT * self.capacity_bps as f64;
        ((self.forwarded_bps as f64 - keep) / self.forwarded_bps as f64).clamp(0.0, 1.0)
    }

    /// What one of its clients forwards on average: the estimate of what
    /// a client moving off it takes along.
    fn per_client_bps(&self) -> u64 {
        self.forwarded_bps / u64::from(self.clients.max(1))
    }
}

/// One candidate exit node with the capacity the signed mesh file gives
/// it.
#[derive(Debug, Clone, Copy)]
pub struct Offer<'a> {
    pub candidate: Candidate<'a>,
    pub signed_capacity: Option<Rate>,
}

impl Offer<'_> {
    fn key(&self) -> PublicKey {
        self.candidate.key
    }

    fn rtt(&self) -> Option<Duration> {
        self.candidate.live.rtt
    }

    fn load(&self) -> Option<Load> {
        Load::believe(&self.candidate.live.load, self.signed_capacity)
    }
}

/// The exit node in use, since when, and since when it has been
/// overloaded (the state `select` carries from one call to the next).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub key: PublicKey,
    pub since: Instant,
    pub overloaded_since: Option<Instant>,
}

/// Why the client uses the exit node it uses (or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No exit node is available.
    NoneAvailable,
    /// `--exit-node` names it.
    Pinned,
    /// `--exit-node` names one that is not available.
    PinnedUnavailable,
    /// An available exit node reports no load (an older agent): the
    /// lowest round trip, as before load-aware selection.
    RttOnly,
    /// A first choice: weighted by headroom among this many comparable
    /// exit nodes.
    Spread { among: usize },
    /// The one in use went away: weighted by headroom among this many.
    Failover { among: usize },
    /// The one in use is not overloaded.
    Kept,
    /// The one in use is overloaded, not yet for the dwell (or the client
    /// moved less than a dwell ago).
    KeptOverloaded { for_secs: u64 },
    /// The one in use is overloaded, but every other comparable exit node
    /// would be overloaded with this client too.
    KeptNowhereBetter,
    /// The one in use is overloaded; the share of its clients that leaves
    /// it does not include this one (its hash).
    KeptOthersLeave,
    /// The one in use was overloaded for the dwell: moved, weighted by
    /// headroom among this many.
    Overloaded { among: usize },
    /// The one in use was clearly slower than the fastest for the dwell:
    /// moved, weighted by headroom among this many.
    Faster { among: usize },
}

impl Reason {
    /// A short stable name, for metrics labels and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Reason::NoneAvailable => "none_available",
            Reason::Pinned => "pinned",
            Reason::PinnedUnavailable => "pinned_unavailable",
            Reason::RttOnly => "rtt_only",
            Reason::Spread { .. } => "spread",
            Reason::Failover { .. } => "failover",
            Reason::Kept => "kept",
            Reason::KeptOverloaded { .. } => "kept_overloaded",
            Reason::KeptNowhereBetter => "kept_nowhere_better",
            Reason::KeptOthersLeave => "kept_others_leave",
            Reason::Overloaded { .. } => "overloaded",
            Reason::Faster { .. } => "faster",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |x: f64| (x * 100.0).round();
        match *self {
            Reason::NoneAvailable => write!(f, "no exit node is available"),
            Reason::Pinned => write!(f, "pinned with --exit-node"),
            Reason::PinnedUnavailable => {
                write!(f, "the exit node pinned with --exit-node is not available")
            }
            Reason::RttOnly => write!(
                f,
                "lowest round trip (an available exit node reports no load: an older agent)"
            ),
            Reason::Spread { among } => {
                write!(
                    f,
                    "weighted by headroom among {among} comparable exit nodes"
                )
            }
            Reason::Failover { among } => write!(
                f,
                "the one in use went away; weighted by headroom among {among}"
            ),
            Reason::Kept => write!(f, "in use and not overloaded"),
            Reason::KeptOverloaded { for_secs } => write!(
                f,
                "in use; overloaded (at least {}% of its capacity) for {for_secs} s, moves after {} s",
                pct(OVERLOADED_AT),
                OVERLOAD_DWELL.as_secs()
            ),
            Reason::KeptOthersLeave => write!(
                f,
                "in use; overloaded, but only a share of its clients leaves it, and not this one"
            ),
            Reason::KeptNowhereBetter => write!(
                f,
                "in use; overloaded, but every other exit node would be overloaded with this client too"
            ),
            Reason::Overloaded { among } => write!(
                f,
                "moved: the previous one was overloaded for {} s; weighted by headroom among {among}",
                OVERLOAD_DWELL.as_secs()
            ),
            Reason::Faster { among } => write!(
                f,
                "moved: the previous one was clearly slower; weighted by headroom among {among}"
            ),
        }
    }
}

/// The outcome of [`select`]: the exit node to use, why, and since when
/// the chosen one has been overloaded (to hand back in [`Held`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub exit: Option<PublicKey>,
    pub reason: Reason,
    pub overloaded_since: Option<Instant>,
}

impl Choice {
    fn new(exit: Option<PublicKey>, reason: Reason) -> Self {
        Choice {
            exit,
            reason,
            overloaded_since: None,
        }
    }
}

/// Whether `fast` is clearly faster than `slow` (`exit::choose`'s margin).
fn clearly_faster(fast: Duration, slow: Duration) -> bool {
    let margin = SWITCH_MIN_GAIN.max(slow.mul_f64(SWITCH_MIN_RATIO));
    fast.saturating_add(margin) < slow
}

/// The exit node to use now; see the module's rules.
pub fn select(
    me: &PublicKey,
    pinned: Option<PublicKey>,
    held: Option<Held>,
    offers: &[Offer<'_>],
    now: Instant,
) -> Choice {
    let available: Vec<Offer<'_>> = offers
        .iter()
        .filter(|o| super::status(o.candidate.live, now) == Some(ExitStatus::Available))
        .copied()
        .collect();
    let current = held.map(|h| Current {
        key: h.key,
        since: h.since,
    });
    if pinned.is_some() {
        let exit = super::choose(current, pinned, available.iter().map(|o| o.candidate), now);
        let reason = if exit.is_some() {
            Reason::Pinned
        } else {
            Reason::PinnedUnavailable
        };
        return Choice::new(exit, reason);
    }
    if available.is_empty() {
        return Choice::new(None, Reason::NoneAvailable);
    }
    let Some(loaded) = available
        .iter()
        .map(|o| o.load().map(|l| (*o, l)))
        .collect::<Option<Vec<_>>>()
    else {
        let exit = super::choose(current, None, available.iter().map(|o| o.candidate), now);
        return Choice::new(exit, Reason::RttOnly);
    };
    let fastest = loaded.iter().filter_map(|(o, _)| o.rtt()).min();
    // Comparable: the fastest is not clearly faster. An unknown RTT is
    // comparable only while no RTT is known at all.
    let comparable = |o: &Offer<'_>| match (fastest, o.rtt()) {
        (Some(f), Some(r)) => !clearly_faster(f, r),
        (Some(_), None) => false,
        (None, _) => true,
    };
    let active = held.and_then(|h| {
        loaded
            .iter()
            .find(|(o, _)| o.key() == h.key)
            .map(|(o, l)| (h, *o, *l))
    });
    let Some((h, active, load)) = active else {
        // A first choice, or the one in use went away: headroom among the
        // comparable ones that are not overloaded (all comparable ones by
        // capacity when every one is).
        let pool: Vec<(PublicKey, u64)> = loaded
            .iter()
            .filter(|(o, l)| comparable(o) && !l.overloaded())
            .map(|(o, l)| (o.key(), l.headroom_bps()))
            .collect();
        let pool = if pool.is_empty() {
            loaded
                .iter()
                .filter(|(o, _)| comparable(o))
                .map(|(o, l)| (o.key(), l.capacity_bps))
                .collect()
        } else {
            pool
        };
        let among = pool.len();
        let reason = if held.is_some() {
            Reason::Failover { among }
        } else {
            Reason::Spread { among }
        };
        return Choice::new(spread(me, &pool), reason);
    };
    let overloaded_since = load.overloaded().then(|| h.overloaded_since.unwrap_or(now));
    let kept = |reason| Choice {
        exit: Some(active.key()),
        reason,
        overloaded_since,
    };
    let dwelt = now.saturating_duration_since(h.since) >= SWITCH_DWELL;
    // Where this client could go: comparable, not the one in use, and not
    // overloaded once this client's share of traffic arrives.
    let share = load.per_client_bps();
    let elsewhere: Vec<(PublicKey, u64)> = loaded
        .iter()
        .filter(|(o, l)| o.key() != active.key() && comparable(o) && !l.overloaded_with(share))
        .map(|(o, l)| (o.key(), l.headroom_bps()))
        .collect();
    let among = elsewhere.len();
    if dwelt
        && active.rtt().is_some()
        && !comparable(&active)
        && let Some(k) = spread(me, &elsewhere)
    {
        return Choice::new(Some(k), Reason::Faster { among });
    }
    let Some(since) = overloaded_since else {
        return kept(Reason::Kept);
    };
    let overloaded_for = now.saturating_duration_since(since);
    if overloaded_for < OVERLOAD_DWELL || !dwelt {
        return kept(Reason::KeptOverloaded {
            for_secs: overloaded_for.as_secs(),
        });
    }
    if !leaves(me, &active.key(), &load) {
        return kept(Reason::KeptOthersLeave);
    }
    match spread(me, &elsewhere) {
        Some(k) => Choice::new(Some(k), Reason::Overloaded { among }),
        None => kept(Reason::KeptNowhereBetter),
    }
}

/// Whether `me` is in the share of an overloaded exit node's clients that
/// leaves it: its hash of the exit node below `load.leaving_share()`. The
/// same clients for the same exit node every time, so a share stays a
/// share however often the clients look.
pub fn leaves(me: &PublicKey, exit: &PublicKey, load: &Load) -> bool {
    unit_hash(b"nexd exit leave v1", me, exit) < load.leaving_share()
}

/// Weighted rendezvous hashing: the key in `pool` (key, weight) with the
/// highest `weight / -ln(h)`, `h` this client's hash of it in (0, 1).
/// Each key wins with probability proportional to its weight, the same
/// key for the same inputs every time, and taking a key out or adding
/// one changes the winner only for the clients it wins or had won.
/// Weights of zero count only when all are zero (then equally).
pub fn spread(me: &PublicKey, pool: &[(PublicKey, u64)]) -> Option<PublicKey> {
    let all_zero = pool.iter().all(|(_, w)| *w == 0);
    pool.iter()
        .filter(|(_, w)| all_zero || *w > 0)
        .map(|(k, w)| {
            let w = if all_zero { 1.0 } else { *w as f64 };
            (k, w / -unit_hash(b"nexd exit rendezvous v1", me, k).ln())
        })
        .max_by(|(ka, a), (kb, b)| a.total_cmp(b).then_with(|| ka.cmp(kb)))
        .map(|(k, _)| *k)
}

/// A hash of (client, exit node) in the open interval (0, 1); `purpose`
/// keeps the rendezvous and the leaving decisions independent.
fn unit_hash(purpose: &[u8], me: &PublicKey, exit: &PublicKey) -> f64 {
    let mut h = Blake2s256::new();
    h.update(purpose);
    h.update(me.0);
    h.update(exit.0);
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    // 53 bits, centred in their interval: never 0, never 1.
    ((u64::from_be_bytes(b) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        announce::{
            live::PeerLive,
            wire::{FLAG_EXIT, LOAD_PRESENT},
        },
        keys::PrivateKey,
    };

    const MBIT: u64 = 1_000_000;

    /// A client's key, the same for the same `i` in every run.
    fn client(i: u32) -> PublicKey {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        b[31] = 0xc1;
        PublicKey(b)
    }

    fn exit_key(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    /// An available exit node's live state: RTT, forwarded Mbit/s,
    /// clients; link speed unknown.
    fn live(now: Instant, rtt_ms: u64, forwarded_mbit: u64, clients: u16) -> PeerLive {
        let mut l = PeerLive::default();
        l.flags = FLAG_EXIT;
        l.last_heard = Some(now);
        l.last_handshake = now.checked_sub(Duration::from_secs(10));
        l.rtt = Some(Duration::from_millis(rtt_ms));
        l.load = LoadReport {
            flags: LOAD_PRESENT,
            forwarded_kbps: (forwarded_mbit * 1_000) as u32,
            clients,
            ..LoadReport::default()
        };
        l
    }

    struct Exit {
        key: PublicKey,
        name: String,
        live: PeerLive,
        capacity_mbit: u64,
    }

    fn exits(now: Instant, capacities_mbit: &[u64]) -> Vec<Exit> {
        capacities_mbit
            .iter()
            .enumerate()
            .map(|(i, c)| Exit {
                key: exit_key(i as u8 + 1),
                name: format!("x{i}"),
                live: live(now, 5, 0, 0),
                capacity_mbit: *c,
            })
            .collect()
    }

    fn offers(exits: &[Exit]) -> Vec<Offer<'_>> {
        exits
            .iter()
            .map(|e| Offer {
                candidate: Candidate {
                    key: e.key,
                    name: &e.name,
                    live: &e.live,
                },
                signed_capacity: Rate::from_bits_per_second(e.capacity_mbit * MBIT),
            })
            .collect()
    }

    /// Which exit node each of `n` clients picks first.
    fn first_choices(n: u32, exits: &[Exit], now: Instant) -> BTreeMap<u32, PublicKey> {
        let o = offers(exits);
        (0..n)
            .map(|i| {
                let c = select(&client(i), None, None, &o, now);
                assert!(matches!(c.reason, Reason::Spread { .. }), "{c:?}");
                (i, c.exit.expect("one"))
            })
            .collect()
    }

    fn counts(choices: &BTreeMap<u32, PublicKey>, exits: &[Exit]) -> Vec<usize> {
        exits
            .iter()
            .map(|e| choices.values().filter(|k| **k == e.key).count())
            .collect()
    }

    #[test]
    fn clients_divide_themselves_in_proportion_to_capacity() {
        let now = Instant::now();
        let x = exits(now, &[100, 200, 100]);
        // Many clients: within 2 points of 25/50/25 %.
        let many = counts(&first_choices(4_800, &x, now), &x);
        for (got, want) in many.iter().zip([1_200, 2_400, 1_200]) {
            assert!(got.abs_diff(want) <= 96, "{many:?}");
        }
        // Blocks of 24 clients: about 6/12/6 on average (a hash, not a
        // count: one block can be off by a few).
        let blocks: Vec<Vec<usize>> = (0..200u32)
            .map(|b| {
                let o = offers(&x);
                let mut n = vec![0; 3];
                for i in 0..24 {
                    let k = select(&client(b * 24 + i), None, None, &o, now).exit;
                    n[x.iter().position(|e| Some(e.key) == k).expect("one")] += 1;
                }
                n
            })
            .collect();
        for (e, want) in [6.0, 12.0, 6.0].iter().enumerate() {
            let mean = blocks.iter().map(|n| n[e] as f64).sum::<f64>() / 200.0;
            assert!((mean - want).abs() < 0.5, "exit {e}: mean {mean}");
        }
        let within_one = blocks
            .iter()
            .filter(|n| n.iter().zip([6, 12, 6]).all(|(g, w)| g.abs_diff(w) <= 1))
            .count();
        eprintln!(
            "blocks of 24 within +-1 of 6/12/6: {within_one} of 200; first: {:?}",
            blocks[0]
        );
        // Equal capacities, one busy: headroom, not capacity, divides.
        let mut y = exits(now, &[100, 100]);
        y[0].live.load.forwarded_kbps = 50_000;
        let busy = counts(&first_choices(3_000, &y, now), &y);
        assert!(busy[0].abs_diff(1_000) <= 90, "{busy:?}");
    }

    #[test]
    fn adding_an_exit_node_moves_only_the_clients_it_wins() {
        let now = Instant::now();
        let three = exits(now, &[100, 200, 100]);
        let four = exits(now, &[100, 200, 100, 200]);
        let before = first_choices(3_000, &three, now);
        let after = first_choices(3_000, &four, now);
        let new = four[3].key;
        let moved: Vec<u32> = (0..3_000).filter(|i| before[i] != after[i]).collect();
        assert!(moved.iter().all(|i| after[i] == new));
        // Its share: 200 of 600 Mbit/s, a third.
        assert!(moved.len().abs_diff(1_000) <= 90, "{}", moved.len());
    }

    #[test]
    fn when_an_exit_node_fails_only_its_clients_move_and_they_spread() {
        let now = Instant::now();
        let mut x = exits(now, &[100, 200, 100, 100]);
        let before = first_choices(2_000, &x, now);
        let failed = x[1].key;
        x[1].live.last_heard = None;
        let o = offers(&x);
        let since = now - Duration::from_secs(5);
        let mut landed = BTreeMap::<PublicKey, usize>::new();
        for (i, k) in &before {
            let held = Held {
                key: *k,
                since,
                overloaded_since: None,
            };
            let c = select(&client(*i), None, Some(held), &o, now);
            let got = c.exit.expect("one");
            if *k == failed {
                assert_eq!(c.reason, Reason::Failover { among: 3 });
                *landed.entry(got).or_default() += 1;
            } else {
                assert_eq!((got, c.reason), (*k, Reason::Kept), "client {i} stays");
            }
        }
        // No herd: the failed one's ~1,000 clients over three equal exit
        // nodes, about a third each.
        let total: usize = landed.values().sum();
        assert_eq!(landed.len(), 3, "{landed:?}");
        for n in landed.values() {
            assert!(n.abs_diff(total / 3) <= total / 10, "{landed:?}");
        }
    }

    /// Runs one client for `secs` seconds, a step a second, with the load
    /// of each exit node from `load(t, exit)` (Mbit/s forwarded); returns
    /// the exit node it used each second.
    fn run(
        me: &PublicKey,
        x: &mut [Exit],
        secs: u64,
        load: impl Fn(u64, usize) -> u64,
    ) -> Vec<PublicKey> {
        let t0 = Instant::now();
        let mut held: Option<Held> = None;
        let mut used = Vec::new();
        for t in 0..secs {
            let now = t0 + Duration::from_secs(t);
            for (i, e) in x.iter_mut().enumerate() {
                e.live.last_heard = Some(now);
                e.live.last_handshake = now.checked_sub(Duration::from_secs(10));
                e.live.load.forwarded_kbps = (load(t, i) * 1_000) as u32;
                e.live.load.clients = 10;
            }
            let c = select(me, None, held, &offers(x), now);
            let k = c.exit.expect("one");
            held = Some(Held {
                key: k,
                since: match held {
                    Some(h) if h.key == k => h.since,
                    _ => now,
                },
                overloaded_since: c.overloaded_since,
            });
            used.push(k);
        }
        used
    }

    /// Where `me` goes first with every exit node equally loaded, and its
    /// index in `x`.
    fn first_choice(me: &PublicKey, x: &mut [Exit]) -> (PublicKey, usize) {
        let first = run(me, x, 1, |_, _| 0)[0];
        let i = x.iter().position(|e| e.key == first).expect("one");
        (first, i)
    }

    fn moves(used: &[PublicKey]) -> usize {
        used.windows(2).filter(|w| w[0] != w[1]).count()
    }

    #[test]
    fn load_oscillating_faster_than_the_dwell_moves_nobody() {
        for i in 0..50 {
            let me = client(i);
            let mut x = exits(Instant::now(), &[100, 100]);
            // Each exit node overloaded 12 s of every 30, in turns.
            let used = run(&me, &mut x, 300, |t, e| {
                if (t / 15 + e as u64).is_multiple_of(2) && t % 15 < 12 {
                    95
                } else {
                    40
                }
            });
            assert_eq!(moves(&used), 0, "client {i}");
        }
    }

    #[test]
    fn a_sustained_overload_moves_once_after_the_dwell_and_not_back() {
        // A client in the share that leaves an exit node at 95% (a sixth:
        // 95 -> 80).
        let at_95 = Load {
            forwarded_bps: 95 * MBIT,
            capacity_bps: 100 * MBIT,
            clients: 10,
        };
        let mut x = exits(Instant::now(), &[100, 100]);
        let (me, (first, first_i)) = (0..)
            .map(|i| (client(i), first_choice(&client(i), &mut x)))
            .find(|(me, (first, _))| leaves(me, first, &at_95))
            .expect("a client that leaves");
        // Overload where this client goes first from second 10 to second
        // 100; the other stays at 50%.
        let used = run(&me, &mut x, 200, |t, e| {
            if e == first_i && (10..100).contains(&t) {
                95
            } else {
                50
            }
        });
        assert_eq!(moves(&used), 1, "{used:?}");
        let moved_at = used.iter().position(|k| *k != first).expect("moved");
        // Overloaded from 10; the dwell is 30 s.
        assert_eq!(moved_at, 10 + OVERLOAD_DWELL.as_secs() as usize);
    }

    #[test]
    fn only_a_share_of_an_overloaded_exit_nodes_clients_leave_it() {
        // 1,000 clients on a full 100 Mbit/s exit node for 40 s, an idle
        // one beside it: a fifth leave (100 -> 80), not all of them (who
        // would fill the other one and come back a dwell later).
        let now = Instant::now();
        let mut x = exits(now, &[100, 100]);
        x[0].live.load.forwarded_kbps = 100_000;
        x[0].live.load.clients = 1_000;
        let o = offers(&x);
        let held = Some(Held {
            key: x[0].key,
            since: now - Duration::from_secs(40),
            overloaded_since: Some(now - Duration::from_secs(40)),
        });
        let mut left = 0usize;
        for i in 0..1_000 {
            let c = select(&client(i), None, held, &o, now);
            match c.reason {
                Reason::Overloaded { among: 1 } => left += 1,
                Reason::KeptOthersLeave => {}
                r => panic!("client {i}: {r:?}"),
            }
        }
        assert!(left.abs_diff(200) <= 40, "{left} left");
    }

    #[test]
    fn never_to_an_exit_node_this_client_would_overload() {
        let mut x = exits(Instant::now(), &[100, 100]);
        let at_95 = Load {
            forwarded_bps: 95 * MBIT,
            capacity_bps: 100 * MBIT,
            clients: 10,
        };
        // A client that would leave, were there room elsewhere.
        let (me, (first, first_i)) = (0..)
            .map(|i| (client(i), first_choice(&client(i), &mut x)))
            .find(|(me, (first, _))| leaves(me, first, &at_95))
            .expect("a client that leaves");
        // From second 10 the first one is overloaded and the other at 85%:
        // one client's share of the first one (95 Mbit/s over 10 clients)
        // would take it past 90%.
        let used = run(&me, &mut x, 120, |t, e| match (t < 10, e == first_i) {
            (true, _) => 50,
            (false, true) => 95,
            (false, false) => 85,
        });
        assert_eq!(used[0], first);
        assert_eq!(moves(&used), 0);
        let now = Instant::now();
        for e in x.iter_mut() {
            e.live.last_heard = Some(now);
        }
        let held = Held {
            key: first,
            since: now - Duration::from_secs(100),
            overloaded_since: Some(now - Duration::from_secs(100)),
        };
        assert_eq!(
            select(&me, None, Some(held), &offers(&x), now).reason,
            Reason::KeptNowhereBetter
        );
    }

    #[test]
    fn a_clearly_faster_exit_node_still_wins_after_the_dwell() {
        let now = Instant::now();
        let mut x = exits(now, &[100, 100]);
        x[0].live.rtt = Some(Duration::from_millis(80));
        let held = |secs| {
            Some(Held {
                key: x[0].key,
                since: now - Duration::from_secs(secs),
                overloaded_since: None,
            })
        };
        let o = offers(&x);
        assert_eq!(
            select(&client(1), None, held(10), &o, now).reason,
            Reason::Kept
        );
        let c = select(&client(1), None, held(40), &o, now);
        assert_eq!(
            (c.exit, c.reason),
            (Some(x[1].key), Reason::Faster { among: 1 })
        );
        // A far exit node is not a first choice at all.
        assert!(first_choices(200, &x, now).values().all(|k| *k == x[1].key));
    }

    #[test]
    fn pinning_wins_over_load() {
        let now = Instant::now();
        let mut x = exits(now, &[100, 100]);
        x[0].live.load.forwarded_kbps = 99_000;
        let o = offers(&x);
        let c = select(&client(1), Some(x[0].key), None, &o, now);
        assert_eq!((c.exit, c.reason), (Some(x[0].key), Reason::Pinned));
        x[0].live.last_heard = None;
        let o = offers(&x);
        let c = select(&client(1), Some(x[0].key), None, &o, now);
        assert_eq!((c.exit, c.reason), (None, Reason::PinnedUnavailable));
    }

    #[test]
    fn without_load_information_the_choice_is_the_round_trip_rule() {
        let now = Instant::now();
        let mut x = exits(now, &[100, 200, 100]);
        x[2].live.rtt = Some(Duration::from_millis(1));
        // One older exit node (all-zero load bytes) among them.
        x[0].live.load = LoadReport::default();
        let o = offers(&x);
        for i in 0..50 {
            let c = select(&client(i), None, None, &o, now);
            assert_eq!((c.exit, c.reason), (Some(x[2].key), Reason::RttOnly));
            let candidates = o.iter().map(|o| o.candidate);
            assert_eq!(c.exit, super::super::choose(None, None, candidates, now));
        }
    }

    #[test]
    fn a_lying_exit_node_gets_no_more_than_its_signed_capacity() {
        let report = LoadReport {
            flags: LOAD_PRESENT,
            link_mbps: u16::MAX,
            ..LoadReport::default()
        };
        let signed = Rate::from_bits_per_second(100 * MBIT);
        let l = Load::believe(&report, signed).expect("present");
        assert_eq!(l.capacity_bps, 100 * MBIT);
        let unsigned = Load::believe(&report, None).expect("present");
        assert_eq!(unsigned.capacity_bps, UNSIGNED_CAPACITY_MAX);
        // A slower link lowers it: an exit node can only claim less.
        let slow = LoadReport {
            link_mbps: 40,
            ..report
        };
        assert_eq!(
            Load::believe(&slow, signed).expect("present").capacity_bps,
            40 * MBIT
        );
        assert_eq!(Load::believe(&LoadReport::default(), signed), None);
        // In the spread: claiming a huge link and no traffic, it still
        // gets only its signed share (100 of 400 Mbit/s).
        let now = Instant::now();
        let mut x = exits(now, &[100, 200, 100]);
        x[0].live.load.link_mbps = u16::MAX;
        let got = counts(&first_choices(4_000, &x, now), &x);
        assert!(got[0].abs_diff(1_000) <= 90, "{got:?}");
    }

    #[test]
    fn the_same_client_gets_the_same_answer_and_reasons_print() {
        let a = PrivateKey::generate().public_key();
        let x = exit_key(1);
        let h = |p: &[u8]| unit_hash(p, &a, &x);
        assert_eq!(h(b"p"), h(b"p"));
        assert!(h(b"p") > 0.0 && h(b"p") < 1.0);
        assert_ne!(h(b"p"), h(b"q"));
        assert_eq!(spread(&a, &[]), None);
        assert_eq!(spread(&a, &[(x, 0)]), Some(x));
        assert_eq!(spread(&a, &[(x, 0), (exit_key(2), 1)]), Some(exit_key(2)));
        let text = Reason::KeptOverloaded { for_secs: 12 }.to_string();
        assert!(text.contains("12 s") && text.contains("90%"), "{text}");
    }
}
