//! The exit node's probe of operator-given targets
//! (`--exit-probe-target IP:PORT`): a default route through an interface
//! that is up says nothing about what lies beyond it (a dead modem, an
//! upstream outage, a captive portal). An exit node whose targets stop
//! answering withdraws its exit capability like one without a default
//! route, and its clients fail over from it.
//!
//! The check is a TCP connect with a bounded timeout: unprivileged (no raw
//! socket as ICMP echo needs, no capability beyond what nexd has anyway),
//! it proves a full round trip to a service the operator chose, and it
//! passes firewalls that drop ICMP. A refused connection counts as a
//! failure: the operator named a listening service, and a middlebox can
//! forge a reset as easily as anything else.
//!
//! Load: one connect per target per `PROBE_EVERY` (a SYN, a SYN-ACK, an
//! ACK and the close), at most `MAX_TARGETS` targets.
//!
//! The probing runs on a task of its own (a connect to a dead target waits
//! for its whole timeout, which the event loop must not), and hands each
//! round to the event loop as a message; the decision is `ProbeHealth`, a
//! pure state machine. The task ends when its handle is dropped: when the
//! exit role stops or nexd stops.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use tokio::{net::TcpSocket, sync::mpsc, task::JoinHandle};
use tracing::debug;

/// How often each target is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long one connect may take. Not longer than `PROBE_EVERY`, so the
/// rounds do not overlap; 1 s is far above any sane RTT to a target the
/// operator chose.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive rounds in which every target failed before the internet
/// counts as lost: one lost SYN (retransmitted by TCP only after 1 s,
/// i.e. after our timeout) must not withdraw the exit node, so a single
/// failed round is noise; three are an outage of ~3 s.
pub const LOST_AFTER: u32 = 3;
/// At most this many `--exit-probe-target`s: the probe's load stays small.
pub const MAX_TARGETS: usize = 8;

/// One round of probes: every target, with why it failed if it did.
#[derive(Debug, Clone)]
pub struct Round {
    /// The probe task that made it (a task replaced by a new one may
    /// still have a round queued).
    pub task: u64,
    pub results: Vec<(SocketAddr, Result<Duration, String>)>,
}

impl Round {
    /// The round succeeded: at least one target answered (a target may
    /// be down on its own; the internet is lost only when none answers).
    pub fn ok(&self) -> bool {
        self.results.iter().any(|(_, r)| r.is_ok())
    }

    /// The targets that failed, with their errors, as one text.
    pub fn failures(&self) -> String {
        self.results
            .iter()
            .filter_map(|(t, r)| r.as_ref().err().map(|e| format!("{t}: {e}")))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// What the probes say about the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verdict {
    /// No round succeeded yet (start-up): not announced until one does.
    #[default]
    Unknown,
    /// The last round succeeded.
    Reachable,
    /// `LOST_AFTER` rounds in a row failed, and none succeeded since.
    Lost,
}

/// A change of `Verdict` the daemon acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Reachable,
    Lost,
}

/// The decision: "lost" after `LOST_AFTER` consecutive failed rounds,
/// "reachable" after one successful round (the return is damped by the
/// exit server's `RESTORE_AFTER`, as for routes).
#[derive(Debug, Clone, Default)]
pub struct ProbeHealth {
    verdict: Verdict,
    failed_rounds: u32,
}

impl ProbeHealth {
    /// Takes one round's outcome; returns the change it makes, if any.
    pub fn observe(&mut self, round_ok: bool) -> Option<Change> {
        if round_ok {
            self.failed_rounds = 0;
            return (self.verdict != Verdict::Reachable).then(|| {
                self.verdict = Verdict::Reachable;
                Change::Reachable
            });
        }
        self.failed_rounds = self.failed_rounds.saturating_add(1);
        (self.verdict != Verdict::Lost && self.failed_rounds >= LOST_AFTER).then(|| {
            self.verdict = Verdict::Lost;
            Change::Lost
        })
    }

    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Whether the probes let the exit node announce itself.
    pub fn reachable(&self) -> bool {
        self.verdict == Verdict::Reachable
    }
}

/// A target inside the mesh's prefixes would be probed through the mesh,
/// not the uplink: refused, naming the option.
pub fn check_outside_mesh(targets: &[SocketAddr], mesh: &[IpNet]) -> Result<(), String> {
    for t in targets {
        if let Some(p) = mesh.iter().find(|p| p.contains(&t.ip())) {
            return Err(format!(
                "--exit-probe-target {t} is inside the mesh prefix {p}: the probe must test the uplink, not the mesh"
            ));
        }
    }
    Ok(())
}

/// The probe task's handle; dropping it stops the task.
pub struct ExitProbe {
    task: JoinHandle<()>,
}

impl ExitProbe {
    /// Starts probing `targets` every `PROBE_EVERY`, the first round at
    /// once; with `device` (`--uplink`) the probes are bound to it, else
    /// they follow the main routing table like the exit node's own
    /// traffic (an exit node has no route into the mesh but the mesh
    /// prefixes, which `check_outside_mesh` keeps out).
    pub fn start(
        id: u64,
        targets: Vec<SocketAddr>,
        device: Option<String>,
        results: mpsc::Sender<Round>,
    ) -> Self {
        ExitProbe {
            task: tokio::spawn(prober(id, targets, device, results)),
        }
    }
}

impl Drop for ExitProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn prober(
    id: u64,
    targets: Vec<SocketAddr>,
    device: Option<String>,
    results: mpsc::Sender<Round>,
) {
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let round = futures::future::join_all(
            targets
                .iter()
                .map(|t| async { (*t, connect(*t, device.as_deref()).await) }),
        )
        .await;
        debug!(?round, "exit probe round");
        if results
            .send(Round {
                task: id,
                results: round,
            })
            .await
            .is_err()
        {
            // The daemon is gone.
            return;
        }
    }
}

/// One TCP connect to `target`, closed at once; its time, or why not.
async fn connect(target: SocketAddr, device: Option<&str>) -> Result<Duration, String> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(d) = device {
        socket
            .bind_device(Some(d.as_bytes()))
            .map_err(|e| format!("binding to {d}: {e}"))?;
    }
    let t0 = Instant::now();
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target)).await {
        Ok(Ok(stream)) => {
            drop(stream);
            Ok(t0.elapsed())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_only_after_consecutive_failed_rounds() {
        let mut h = ProbeHealth::default();
        assert_eq!(h.observe(true), Some(Change::Reachable));
        assert!(h.reachable());
        for _ in 1..LOST_AFTER {
            assert_eq!(h.observe(false), None);
            assert!(h.reachable(), "one failed round is noise");
        }
        // A success in between starts the count again.
        assert_eq!(h.observe(true), None);
        for _ in 1..LOST_AFTER {
            assert_eq!(h.observe(false), None);
        }
        assert_eq!(h.observe(false), Some(Change::Lost));
        assert_eq!(h.verdict(), Verdict::Lost);
        // Further failures change nothing; one success is back.
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), Some(Change::Reachable));
        assert_eq!(h.observe(true), None);
    }

    #[test]
    fn not_reachable_before_the_first_successful_round() {
        let mut h = ProbeHealth::default();
        assert!(!h.reachable());
        assert_eq!(h.observe(false), None);
        assert_eq!(h.verdict(), Verdict::Unknown);
        assert!(!h.reachable());
        for _ in 1..LOST_AFTER {
            h.observe(false);
        }
        assert_eq!(h.verdict(), Verdict::Lost);
        assert_eq!(h.observe(true), Some(Change::Reachable));
    }

    #[test]
    fn a_round_succeeds_if_any_target_answers() {
        let a: SocketAddr = "203.0.113.1:443".parse().expect("a");
        let b: SocketAddr = "[2001:db8::1]:443".parse().expect("b");
        let round = |ra: Result<Duration, String>, rb: Result<Duration, String>| Round {
            task: 0,
            results: vec![(a, ra), (b, rb)],
        };
        let ok = Ok(Duration::from_millis(3));
        let fail = || Err("connection refused".to_owned());
        assert!(round(ok.clone(), fail()).ok());
        assert!(round(fail(), ok).ok());
        let r = round(fail(), fail());
        assert!(!r.ok());
        assert_eq!(
            r.failures(),
            "203.0.113.1:443: connection refused; [2001:db8::1]:443: connection refused"
        );
    }

    #[test]
    fn targets_inside_the_mesh_are_refused() {
        let mesh: Vec<IpNet> = vec![
            "100.64.0.0/10".parse().expect("v4"),
            "fd6e:6578:6400::/48".parse().expect("v6"),
        ];
        let out: SocketAddr = "203.0.113.1:443".parse().expect("out");
        let inside: SocketAddr = "100.64.0.7:80".parse().expect("in");
        assert!(check_outside_mesh(&[out], &mesh).is_ok());
        let e = check_outside_mesh(&[out, inside], &mesh).expect_err("inside");
        assert!(
            e.contains("--exit-probe-target 100.64.0.7:80") && e.contains("100.64.0.0/10"),
            "{e}"
        );
    }
}
