//! The exit-node client: whether it is wanted, its phase, since when, how
//! often it failed over, what of its configuration is installed, and the
//! executor of the transition plans `exit::plan` computes.
//!
//! The fields change together here and nowhere else: a transition runs
//! the plan from what is installed to what the next phase needs, records
//! every step that succeeded, and on a failure runs the plan back to the
//! previous phase, reporting both errors when that fails too.
//!
//! The executor touches the host only through `StepRunner` and takes the
//! time as an argument, so "step k failed", its rollback, the reported
//! error and the retry time are unit tests (below) rather than root
//! end-to-end runs; `client_steps` is the runner over the kernel.

use std::time::{Duration, Instant};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry as Metrics,
};
use tracing::{error, info, warn};

use super::settings::ClientSettings;
use crate::{
    announce::book::PeerBook,
    exit::{
        self, Candidate, Phase,
        plan::{self, Dns, Installed, Policy, Step},
        select::{self, Choice, Held, Offer, Reason},
    },
    keys::PublicKey,
    mesh::Mesh,
    metrics::{Labels, label},
    routing::{PolicyNumbers, policy::Present},
};

/// What a step does to the host: the executor's only way to touch it.
pub trait StepRunner {
    async fn run(&mut self, step: Step) -> anyhow::Result<()>;
}

/// What the announcements and the membership say, for choosing.
pub struct Candidates<'a> {
    pub book: &'a PeerBook,
    pub mesh: &'a Mesh,
    pub own: &'a PublicKey,
}

/// A step that failed, and why.
#[derive(Debug, thiserror::Error)]
#[error("{step} failed: {}", crate::error_text(source))]
pub struct StepError {
    pub step: Step,
    pub source: anyhow::Error,
}

/// A transition that failed: the step, and how the rollback went.
#[derive(Debug, thiserror::Error)]
#[error("{failed}; {}", match rollback {
    Ok(()) => "rolled back, nothing changed".to_owned(),
    Err(e) => format!("rolling back also failed: {e}"),
})]
pub struct TransitionError {
    pub failed: StepError,
    pub rollback: Result<(), StepError>,
}

/// Why `enable` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum EnableError {
    /// No exit node can be used now; nothing was changed.
    #[error("no exit node is available")]
    Unavailable,
    #[error(transparent)]
    Failed(#[from] TransitionError),
}

#[derive(Debug, Clone)]
pub struct ExitClient {
    wanted: bool,
    phase: Phase,
    /// When the active exit node became active: a faster one may replace
    /// it only after `exit::SWITCH_DWELL`.
    since: Instant,
    /// Since when the active exit node has been overloaded
    /// (`exit::select`: the client leaves it after `OVERLOAD_DWELL`).
    overloaded_since: Option<Instant>,
    /// What the last evaluation said (kept, overloaded for so long, ...).
    reason: Reason,
    /// Why the exit node in use was chosen when the client moved to it
    /// (`exit-node list`: a later "kept" does not hide it).
    chosen: Reason,
    failovers: u64,
    /// What may be installed: every step that succeeded, and what a
    /// failed one may have done. Rollbacks and the record go by this.
    installed: Installed,
    /// What surely is installed: differs from `installed` only after a
    /// failed step. The next plan re-adds what may be missing.
    surely: Installed,
    numbers: PolicyNumbers,
    policy: Policy,
    /// `--exit-node NAME|KEY`.
    pin: Option<String>,
    /// Probe the exit node in use (fast failover).
    probes: bool,
    /// After a failed transition: no automatic retry before this, and how
    /// many failed in a row (the delay doubles, up to `RETRY_MAX`).
    retry_at: Option<Instant>,
    failures: u32,
}

/// The longest wait between automatic retries of a failed transition.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The wait before the next automatic retry after `failures` failures in
/// a row (the first retry after 1 s).
fn retry_delay(failures: u32) -> Duration {
    RETRY_MAX.min(Duration::from_secs(1 << failures.min(5)))
}

impl ExitClient {
    /// `wanted`: by flag, or resumed from a previous nexd's record.
    pub fn new(settings: &ClientSettings, wanted: bool, now: Instant) -> Self {
        ExitClient {
            wanted,
            phase: Phase::Off,
            since: now,
            overloaded_since: None,
            reason: Reason::NoneAvailable,
            chosen: Reason::NoneAvailable,
            failovers: 0,
            installed: Installed::default(),
            surely: Installed::default(),
            numbers: settings.numbers,
            policy: settings.policy,
            pin: settings.pin.clone(),
            probes: settings.probes,
            retry_at: None,
            failures: 0,
        }
    }

    pub fn wanted(&self) -> bool {
        self.wanted
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Table, mark and priorities of the client's routing.
    pub fn numbers(&self) -> PolicyNumbers {
        self.numbers
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn pin(&self) -> Option<&str> {
        self.pin.as_deref()
    }

    /// Why the client uses the exit node it uses: why it was chosen, and
    /// what the last evaluation said of it when that differs.
    pub fn reason_text(&self) -> String {
        if self.reason == self.chosen {
            self.chosen.to_string()
        } else {
            format!("{} (now: {})", self.chosen, self.reason)
        }
    }

    /// Whether this client probes exit nodes now (wanted, probes on).
    pub fn probes_wanted(&self) -> bool {
        self.probes && self.wanted
    }

    /// Whether any of the client's routing is (or may be) installed.
    pub fn routing_installed(&self) -> bool {
        let i = self.installed;
        i.rules || i.routes || i.fallback
    }

    /// What the kernel holds of the client's routing now. A part the
    /// record has but the kernel no longer does (the kernel took the
    /// tunnel's IPv4 route with the interface's last IPv4 address, a rule
    /// was flushed by hand) is recorded as gone, so the next evaluation
    /// puts it back. Returns whether anything was missing.
    pub fn observe(&mut self, present: Present) -> bool {
        let parts = [
            (
                self.installed.fallback && !present.fallback,
                "the unreachable default routes",
            ),
            (
                self.installed.routes && !present.routes,
                "the default routes into the tunnel",
            ),
            (self.installed.rules && !present.rules, "the policy rules"),
        ];
        let missing: Vec<&str> = parts.iter().filter(|(m, _)| *m).map(|(_, w)| *w).collect();
        if missing.is_empty() {
            return false;
        }
        for record in [&mut self.installed, &mut self.surely] {
            record.fallback &= present.fallback;
            record.routes &= present.routes;
            record.rules &= present.rules;
        }
        warn!(
            missing = %missing.join(", "),
            "part of the exit-node client's routing is gone from the kernel (an address or link went, or it was removed by hand): putting it back"
        );
        true
    }

    /// The DNS redirect in place (`Off` when none is).
    pub fn installed_dns(&self) -> Dns {
        self.installed.dns
    }

    /// The nftables tables the client has in place (for the record).
    pub fn nft_tables(&self) -> Vec<String> {
        if self.installed.dns == Dns::Off {
            Vec::new()
        } else {
            vec![crate::routing::dns::NFT_TABLE.to_string()]
        }
    }

    /// The pinned exit node's key, found by name or key in the mesh. `Err`
    /// when the pin names no device: then no exit node may be used at all.
    pub fn pinned(&self, c: &Candidates<'_>) -> Result<Option<PublicKey>, ()> {
        let Some(pin) = self.pin.as_deref() else {
            return Ok(None);
        };
        c.mesh
            .peers_of(c.own)
            .find(|d| d.name == pin || d.public_key.to_string() == pin)
            .map(|d| Some(d.public_key))
            .ok_or(())
    }

    /// The exit node `exit::select` picks now, and why.
    fn choose(&self, c: &Candidates<'_>, now: Instant) -> Choice {
        let Ok(pinned) = self.pinned(c) else {
            return Choice {
                exit: None,
                reason: Reason::PinnedUnavailable,
                overloaded_since: None,
            };
        };
        let held = self.phase.exit_peer().map(|key| Held {
            key,
            since: self.since,
            overloaded_since: self.overloaded_since,
        });
        select::select(c.own, pinned, held, &offers(c), now)
    }

    /// Takes a choice in: its reason and the overload clock go with it.
    fn take(&mut self, choice: &Choice) {
        if choice.exit != self.phase.exit_peer() {
            self.chosen = choice.reason;
        }
        self.reason = choice.reason;
        self.overloaded_since = choice.overloaded_since;
    }

    /// The exit nodes to probe: the one in use and the one `select` would
    /// move to if it went away.
    pub fn probe_targets(&self, c: &Candidates<'_>, now: Instant) -> Vec<PublicKey> {
        let Ok(pinned) = self.pinned(c) else {
            return Vec::new();
        };
        let active = self.phase.exit_peer();
        let others: Vec<Offer<'_>> = offers(c)
            .into_iter()
            .filter(|o| Some(o.candidate.key) != active)
            .collect();
        let standby = select::select(c.own, pinned, None, &others, now).exit;
        active.into_iter().chain(standby).collect()
    }

    /// When the exit node in use goes stale unless it is heard from again:
    /// the moment to re-evaluate. `None` when there is none, or when that
    /// moment has passed (the ticks then carry on, so a failed transition
    /// never turns this into a busy loop).
    pub fn stale_at(&self, c: &Candidates<'_>, now: Instant) -> Option<Instant> {
        let live = c.book.live(&self.phase.exit_peer()?)?;
        exit::fresh_until(live).filter(|t| *t > now)
    }

    /// Moves to the phase the announcements call for.
    pub async fn evaluate(&mut self, c: &Candidates<'_>, host: &mut impl StepRunner, now: Instant) {
        let chosen = if self.wanted {
            let choice = self.choose(c, now);
            self.take(&choice);
            choice.exit
        } else {
            None
        };
        let next = exit::next_phase(self.wanted, self.phase, chosen);
        self.follow(next, host, c.book, now).await;
    }

    /// Moves to `next` unless a failed transition's retry time has not
    /// come; also when the phase stays but what is installed is not what
    /// it needs (a failed rollback): the plan from the record repairs it.
    /// A failure doubles the wait before the next try, up to `RETRY_MAX`.
    async fn follow(
        &mut self,
        next: Phase,
        host: &mut impl StepRunner,
        book: &PeerBook,
        now: Instant,
    ) {
        if self.retry_at.is_some_and(|t| now < t) {
            return;
        }
        let needed = plan::target(self.phase, self.policy);
        let repair = self.installed != needed || self.surely != needed;
        if next == self.phase && !repair {
            return;
        }
        match self.transition(next, host, book, now).await {
            Ok(()) => {
                self.retry_at = None;
                self.failures = 0;
            }
            Err(e) => {
                let wait = retry_delay(self.failures);
                self.failures += 1;
                self.retry_at = Some(now + wait);
                error!(error = %e, retry_in = ?wait, failures = self.failures, "changing the exit-node client failed");
            }
        }
    }

    /// `nexctl nexd exit-node enable`: only with an exit node available
    /// now; otherwise nothing changes (not even `wanted`).
    pub async fn enable(
        &mut self,
        c: &Candidates<'_>,
        host: &mut impl StepRunner,
        now: Instant,
    ) -> Result<(), EnableError> {
        if let Phase::Active(_) = self.phase {
            self.wanted = true;
            return Ok(());
        }
        let choice = self.choose(c, now);
        let Some(chosen) = choice.exit else {
            return Err(EnableError::Unavailable);
        };
        self.take(&choice);
        self.transition(Phase::Active(chosen), host, c.book, now)
            .await?;
        self.wanted = true;
        Ok(())
    }

    /// `nexctl nexd exit-node disable`: back to the direct path.
    pub async fn disable(
        &mut self,
        host: &mut impl StepRunner,
        book: &PeerBook,
        now: Instant,
    ) -> Result<(), TransitionError> {
        self.wanted = false;
        if self.phase == Phase::Off {
            return Ok(());
        }
        self.transition(Phase::Off, host, book, now).await
    }

    /// Runs the plan to `next`; on a failure, the plan back.
    async fn transition(
        &mut self,
        next: Phase,
        host: &mut impl StepRunner,
        book: &PeerBook,
        now: Instant,
    ) -> Result<(), TransitionError> {
        let prev = self.phase;
        let steps = self.plan_to(plan::target(next, self.policy));
        if let Err(failed) = self.execute(&steps, host).await {
            let back = self.plan_to(plan::target(prev, self.policy));
            // The phase stays `prev`. If the rollback failed too, what is
            // installed differs from what `prev` needs, and the next
            // evaluation repairs it from the record (see `follow`).
            let rollback = self.execute(&back, host).await;
            return Err(TransitionError { failed, rollback });
        }
        if next != prev {
            log_transition(prev, next, self.reason, book, now);
        }
        if let (Phase::Active(a), Phase::Active(b)) = (prev, next)
            && a != b
        {
            self.failovers += 1;
        }
        if next.exit_peer().is_some() && next.exit_peer() != prev.exit_peer() {
            self.since = now;
        }
        self.phase = next;
        Ok(())
    }

    /// The steps to `to` from what is installed, as far as it is known.
    fn plan_to(&self, to: Installed) -> Vec<Step> {
        plan::plan(plan::from_uncertain(self.installed, self.surely, to), to)
    }

    /// Runs `steps` in order, recording each success; stops at the first
    /// failure with a conservative record of what may be installed.
    async fn execute(
        &mut self,
        steps: &[Step],
        host: &mut impl StepRunner,
    ) -> Result<(), StepError> {
        for &step in steps {
            match host.run(step).await {
                Ok(()) => {
                    self.installed = step.apply(self.installed);
                    self.surely = step.apply(self.surely);
                }
                Err(source) => {
                    self.installed = step.failed(self.installed);
                    self.surely = step.surely_after_failure(self.surely);
                    return Err(StepError { step, source });
                }
            }
        }
        Ok(())
    }

    /// Removes everything the client installed (stop). Never gives up half
    /// way: the plan to Off is run step by step, each failure logged.
    pub async fn teardown(&mut self, host: &mut impl StepRunner) {
        self.wanted = false;
        for step in self.plan_to(Installed::default()) {
            if let Err(e) = host.run(step).await {
                super::report::teardown_warning(&step.to_string(), &crate::error_text(&e));
            }
            self.installed = step.apply(self.installed);
            self.surely = step.apply(self.surely);
        }
        if self.phase.routing_installed() {
            info!("exit-node client disabled: the direct path is restored");
        }
        self.phase = Phase::Off;
    }

    /// The client's side of the metrics: the exit node in use, the phase,
    /// the failovers.
    pub fn register_metrics(&self, reg: &mut Metrics, book: &PeerBook, mesh: &Mesh) {
        let active = Family::<Labels, Gauge>::default();
        if let Some(k) = self.phase.exit_peer() {
            active
                .get_or_create(&label("exit_node", book.name(&k).unwrap_or("unknown")))
                .set(1);
        }
        reg.register(
            "nexd_exit_node_active",
            "1 for the exit node this client uses",
            active,
        );
        let phase = Family::<Labels, Gauge>::default();
        for p in ["off", "waiting", "active", "held"] {
            let on = matches!(
                (p, self.phase),
                ("off", Phase::Off)
                    | ("waiting", Phase::Waiting)
                    | ("active", Phase::Active(_))
                    | ("held", Phase::Held)
            );
            phase.get_or_create(&label("phase", p)).set(i64::from(on));
        }
        reg.register(
            "nexd_exit_node_client_phase",
            "The exit-node client's phase (1 for the current one)",
            phase,
        );
        // Issue 23: each exit node's load as this client believes it, and
        // why it uses the one it uses.
        let forwarded = Family::<Labels, Gauge>::default();
        let capacity = Family::<Labels, Gauge>::default();
        let clients = Family::<Labels, Gauge>::default();
        for k in book.keys() {
            let (Some(name), Some(live)) = (book.name(k), book.live(k)) else {
                continue;
            };
            if !live.is_exit() {
                continue;
            }
            let signed = mesh.device(k).and_then(|d| d.exit_capacity);
            let Some(load) = select::Load::believe(&live.load, signed) else {
                continue;
            };
            let l = label("exit_node", name);
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            forwarded.get_or_create(&l).set(gauge(load.forwarded_bps));
            capacity.get_or_create(&l).set(gauge(load.capacity_bps));
            clients.get_or_create(&l).set(i64::from(load.clients));
        }
        reg.register(
            "nexd_exit_node_forwarded_bits_per_second",
            "What each exit node reports forwarding through its uplinks (the busier direction)",
            forwarded,
        );
        reg.register(
            "nexd_exit_node_capacity_bits_per_second",
            "Each exit node's capacity as this client believes it (bounded by the mesh file's exit_capacity)",
            capacity,
        );
        reg.register(
            "nexd_exit_node_clients",
            "Devices using each exit node, as it reports",
            clients,
        );
        let reason = Family::<Labels, Gauge>::default();
        if self.wanted {
            reason
                .get_or_create(&label("reason", self.chosen.label()))
                .set(1);
        }
        reg.register(
            "nexd_exit_node_choice_reason",
            "1 for why this client chose the exit node it uses (spread, failover, overloaded, faster, rtt_only, pinned, ...)",
            reason,
        );
        let failovers: Counter = Counter::default();
        failovers.inc_by(self.failovers);
        reg.register(
            "nexd_exit_node_failovers",
            "Times the client moved to another exit node (the one in use went away, or another was clearly faster)",
            failovers,
        );
    }
}

/// Every peer the book knows, as a candidate for `exit::select`, with the
/// capacity the mesh file gives it.
fn offers<'a>(c: &Candidates<'a>) -> Vec<Offer<'a>> {
    let book = c.book;
    book.keys()
        .filter_map(|k| {
            Some(Offer {
                candidate: Candidate {
                    key: *k,
                    name: book.name(k)?,
                    live: book.live(k)?,
                },
                signed_capacity: c.mesh.device(k).and_then(|d| d.exit_capacity),
            })
        })
        .collect()
}

fn log_transition(prev: Phase, next: Phase, reason: Reason, book: &PeerBook, now: Instant) {
    let name = |k: &PublicKey| book.name(k).unwrap_or("?").to_owned();
    let available = |k: &PublicKey| {
        book.live(k).and_then(|l| exit::status(l, now)) == Some(exit::ExitStatus::Available)
    };
    match (prev, next) {
        (_, Phase::Off) if prev.routing_installed() => {
            info!("exit-node client disabled: the direct path is restored")
        }
        (_, Phase::Off) => info!("exit-node client off"),
        (_, Phase::Waiting) => info!(
            "exit-node client wanted, but no exit node is available yet: waiting (the device keeps its direct path)"
        ),
        (Phase::Active(old), Phase::Active(new))
            if available(&old) && matches!(reason, Reason::Overloaded { .. }) =>
        {
            info!(
                from = %name(&old),
                to = %name(&new),
                "exit node {} is overloaded: switching to {} ({reason})",
                name(&old),
                name(&new)
            )
        }
        (Phase::Active(old), Phase::Active(new)) if available(&old) => info!(
            from = %name(&old),
            to = %name(&new),
            "exit node {} is clearly faster than {}: switching to it",
            name(&new),
            name(&old)
        ),
        (Phase::Active(old), Phase::Active(new)) => warn!(
            from = %name(&old),
            to = %name(&new),
            "exit node {} is no longer available: switching to {}",
            name(&old),
            name(&new)
        ),
        (Phase::Held, Phase::Active(new)) => info!(
            exit = %name(&new),
            "exit node {} is available: internet traffic flows through it again",
            name(&new)
        ),
        (_, Phase::Active(new)) => info!(
            exit = %name(&new),
            "exit-node client enabled: internet traffic goes through {}",
            name(&new)
        ),
        (Phase::Active(old), Phase::Held) => warn!(
            exit = %name(&old),
            "exit node {} is no longer available and no other is: internet traffic is held back (not leaked) until one returns",
            name(&old)
        ),
        (_, Phase::Held) => warn!("exit-node client holding internet traffic back"),
    }
}

#[cfg(test)]
mod tests {
    //! The executor against a host that fails on demand: every plan, a
    //! failure at every step, the rollback, the error and the retry time.

    use std::collections::BTreeSet;

    use super::*;
    use crate::{
        keys::PrivateKey,
        testing::{phases, policies},
    };

    /// A host whose kernel is an `Installed` model: a step that succeeds
    /// applies to it; the calls listed in `fail` fail, having done half
    /// their work (`Step::failed`: the worst case) or none of it.
    struct FakeHost {
        model: Installed,
        calls: usize,
        fail: BTreeSet<usize>,
        half_done: bool,
        ran: Vec<Step>,
        /// Invariants a step broke (from a state where they held).
        broke: Vec<String>,
        policy: Policy,
    }

    impl FakeHost {
        fn new(model: Installed, policy: Policy) -> Self {
            FakeHost {
                model,
                calls: 0,
                fail: BTreeSet::new(),
                half_done: false,
                ran: Vec::new(),
                broke: Vec::new(),
                policy,
            }
        }

        fn failing(mut self, calls: impl IntoIterator<Item = usize>, half_done: bool) -> Self {
            self.fail = calls.into_iter().collect();
            self.half_done = half_done;
            self
        }
    }

    impl StepRunner for FakeHost {
        async fn run(&mut self, step: Step) -> anyhow::Result<()> {
            let call = self.calls;
            self.calls += 1;
            self.ran.push(step);
            let before = plan::broken(&self.model, self.policy);
            let result = if self.fail.contains(&call) {
                if self.half_done {
                    self.model = step.failed(self.model);
                }
                Err(anyhow::anyhow!("injected failure of call {call}"))
            } else {
                self.model = step.apply(self.model);
                Ok(())
            };
            for b in plan::broken(&self.model, self.policy) {
                if !before.contains(&b) {
                    self.broke.push(format!("{step}: {b}"));
                }
            }
            result
        }
    }

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    fn book() -> PeerBook {
        PeerBook::with_epoch(PrivateKey::generate(), 1, Instant::now())
    }

    fn client(policy: Policy, now: Instant) -> ExitClient {
        let settings = ClientSettings {
            wanted: true,
            numbers: PolicyNumbers {
                table: 28280,
                fwmark: 0x6e78,
                priority: 28280,
            },
            policy,
            pin: None,
            probes: true,
        };
        ExitClient::new(&settings, true, now)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    /// A client in `phase`, with exactly what it needs installed.
    fn client_in(phase: Phase, policy: Policy, now: Instant) -> ExitClient {
        let mut c = client(policy, now);
        let mut host = FakeHost::new(Installed::default(), policy);
        block_on(c.transition(phase, &mut host, &book(), now)).expect("the way there succeeds");
        assert_eq!(c.phase, phase);
        c
    }

    #[test]
    fn a_failure_at_any_step_of_any_plan_is_rolled_back_to_the_previous_phase() {
        let (a, b) = (key(), key());
        let now = Instant::now();
        let mut cases = 0;
        for policy in policies() {
            for prev in phases(a, b) {
                for next in phases(a, b) {
                    let start = client_in(prev, policy, now);
                    let steps = plan::plan(start.installed, plan::target(next, policy));
                    for (k, &step) in steps.iter().enumerate() {
                        for half_done in [false, true] {
                            let mut c = start.clone();
                            let mut host =
                                FakeHost::new(c.installed, policy).failing([k], half_done);
                            let err = block_on(c.transition(next, &mut host, &book(), now))
                                .expect_err("step k fails");
                            let what = format!(
                                "{prev:?} -> {next:?}, step {k} ({step}) fails, half done: {half_done}"
                            );
                            assert_eq!(err.failed.step, step, "{what}: the error names the step");
                            assert!(err.rollback.is_ok(), "{what}: the rollback succeeds");
                            let text = err.to_string();
                            assert!(
                                text.contains(&format!(
                                    "{step} failed: injected failure of call {k}"
                                )) && text.ends_with("rolled back, nothing changed"),
                                "{what}: {text}"
                            );
                            assert_eq!(c.phase, prev, "{what}: the phase stays");
                            assert_eq!(c.installed, plan::target(prev, policy), "{what}: record");
                            assert_eq!(
                                host.model, c.installed,
                                "{what}: the host is what the record says"
                            );
                            assert_eq!(
                                &host.ran[..k + 1],
                                &steps[..k + 1],
                                "{what}: steps in plan order"
                            );
                            assert!(host.broke.is_empty(), "{what}: {:?}", host.broke);
                            assert_eq!(c.failovers, 0, "{what}");
                            cases += 1;
                        }
                    }
                }
            }
        }
        // Every policy, every pair of phases, every step (both kinds of
        // failure): a plan got lost if this count drops.
        assert!(cases > 400, "only {cases} cases");
    }

    #[test]
    fn a_failed_rollback_is_reported_and_repaired_from_the_record() {
        let now = Instant::now();
        let policy = Policy {
            kill_switch: true,
            private_dns: true,
        };
        let exit = key();
        let mut c = client_in(Phase::Off, policy, now);
        // Off -> Active: fwmark, guard, DNS, routes, peer, rules, steering.
        // The 4th step fails (half done), and so does the rollback's first.
        let steps = c.plan_to(plan::target(Phase::Active(exit), policy));
        assert!(steps.len() > 4);
        let mut host = FakeHost::new(c.installed, policy).failing([3, 4], true);
        block_on(c.follow(Phase::Active(exit), &mut host, &book(), now));
        assert_eq!(c.phase, Phase::Off);
        assert_ne!(
            c.installed,
            plan::target(Phase::Off, policy),
            "half installed"
        );
        assert_eq!(
            host.model, c.installed,
            "half done: what may be there is there"
        );
        assert!(
            !plan::leaks(&c.installed),
            "the guard still holds: nothing leaks"
        );
        assert_eq!(c.retry_at, Some(now + Duration::from_secs(1)));
        // Before the retry time nothing runs, whatever is asked for.
        let calls = host.calls;
        block_on(c.follow(
            Phase::Off,
            &mut host,
            &book(),
            now + Duration::from_millis(999),
        ));
        assert_eq!(host.calls, calls);
        // At the retry time the phase (Off) stays, and what is installed
        // is repaired to what it needs, from the record.
        block_on(c.follow(Phase::Off, &mut host, &book(), now + Duration::from_secs(1)));
        assert!(host.calls > calls);
        assert_eq!(c.phase, Phase::Off);
        assert_eq!(c.installed, Installed::default());
        assert_eq!(host.model, Installed::default());
        assert_eq!((c.retry_at, c.failures), (None, 0));
    }

    #[test]
    fn failed_transitions_are_retried_after_1_2_4_8_16_and_then_30_seconds() {
        let t0 = Instant::now();
        let policy = Policy::default();
        let exit = key();
        let mut c = client_in(Phase::Waiting, policy, t0);
        let mut host = FakeHost::new(c.installed, policy).failing(0..1000, false);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            block_on(c.follow(Phase::Active(exit), &mut host, &book(), now));
            let at = c.retry_at.expect("a retry time");
            waits.push(at.duration_since(now).as_secs());
            now = at;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(c.phase, Phase::Waiting);
        // The next success resets the backoff.
        host.fail.clear();
        block_on(c.follow(Phase::Active(exit), &mut host, &book(), now));
        assert_eq!(c.phase, Phase::Active(exit));
        assert_eq!((c.retry_at, c.failures), (None, 0));
        assert_eq!(host.model, plan::target(Phase::Active(exit), policy));
        assert!(host.broke.is_empty(), "{:?}", host.broke);
    }

    #[test]
    fn a_move_to_another_exit_node_counts_as_a_failover_and_restarts_the_dwell() {
        let t0 = Instant::now();
        let (a, b) = (key(), key());
        let policy = Policy::default();
        let mut c = client_in(Phase::Active(a), policy, t0);
        assert_eq!(c.since, t0);
        let later = t0 + Duration::from_secs(5);
        let mut host = FakeHost::new(c.installed, policy);
        block_on(c.transition(Phase::Active(b), &mut host, &book(), later)).expect("moves");
        assert_eq!(
            (c.phase, c.failovers, c.since),
            (Phase::Active(b), 1, later)
        );
        // Only the default routes (and nothing else) moved.
        assert_eq!(host.ran, [Step::RouteVia(Some(b))]);
        // Held and back to the same exit node is not a failover.
        block_on(c.transition(Phase::Held, &mut host, &book(), later)).expect("holds");
        block_on(c.transition(Phase::Active(b), &mut host, &book(), later)).expect("back");
        assert_eq!(c.failovers, 1);
    }

    #[test]
    fn what_the_kernel_removed_is_put_back_at_the_next_evaluation() {
        let now = Instant::now();
        let policy = Policy {
            kill_switch: false,
            private_dns: true,
        };
        let exit = key();
        for phase in [Phase::Active(exit), Phase::Held] {
            let mut c = client_in(phase, policy, now);
            let all = Present {
                routes: true,
                fallback: true,
                rules: true,
            };
            assert!(!c.observe(all), "nothing missing");
            // The interface lost its last IPv4 address: the kernel took
            // the tunnel's route.
            assert!(c.observe(Present {
                routes: false,
                ..all
            }));
            let mut host = FakeHost::new(c.installed, policy);
            block_on(c.follow(phase, &mut host, &book(), now));
            assert_eq!(host.ran, [Step::AddRoutes], "{phase:?}");
            assert_eq!(c.installed, plan::target(phase, policy));
            // Rules flushed by hand: put back, in order.
            c.observe(Present {
                rules: false,
                ..all
            });
            let mut host = FakeHost::new(c.installed, policy);
            block_on(c.follow(phase, &mut host, &book(), now));
            assert_eq!(host.ran, [Step::AddRules], "{phase:?}");
            assert!(host.broke.is_empty(), "{:?}", host.broke);
        }
    }

    #[test]
    fn enable_without_an_exit_node_changes_nothing() {
        let now = Instant::now();
        let mut c = client_in(Phase::Off, Policy::default(), now);
        c.wanted = false;
        let own = key();
        let mesh = super::super::membership::no_devices(None);
        let book = book();
        let candidates = Candidates {
            book: &book,
            mesh: &mesh,
            own: &own,
        };
        let mut host = FakeHost::new(c.installed, c.policy);
        let r = block_on(c.enable(&candidates, &mut host, now));
        assert!(matches!(r, Err(EnableError::Unavailable)), "{r:?}");
        assert_eq!((c.wanted, c.phase, host.calls), (false, Phase::Off, 0));
    }

    #[test]
    fn teardown_runs_every_step_even_when_each_fails() {
        let now = Instant::now();
        let policy = Policy {
            kill_switch: true,
            private_dns: true,
        };
        let exit = key();
        let mut c = client_in(Phase::Active(exit), policy, now);
        let steps = c.plan_to(Installed::default());
        let mut host = FakeHost::new(c.installed, policy).failing(0..100, false);
        block_on(c.teardown(&mut host));
        assert_eq!(host.ran, steps, "every removal was tried, in order");
        assert_eq!((c.phase, c.wanted), (Phase::Off, false));
        assert_eq!(c.installed, Installed::default());
    }
}
