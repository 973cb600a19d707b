//! The exit-node client: whether it is wanted, its phase, since when, how
//! often it failed over, what of its configuration is installed, and the
//! executor of the transition plans `exit::plan` computes.
//!
//! The fields change together here and nowhere else: a transition runs
//! the plan from what is installed to what the next phase needs, records
//! every step that succeeded, and on a failure runs the plan back to the
//! previous phase, reporting both errors when that fails too.

use std::time::Instant;

use tracing::{error, info, warn};

use super::{dataplane::DataPlane, interface::MeshInterface};
use crate::{
    announce::book::PeerBook,
    exit::{
        self, Candidate, Phase,
        plan::{self, Dns, Installed, Policy, Step},
    },
    keys::PublicKey,
    mesh::Mesh,
    netlink::Netlink,
    routing::{PolicyNumbers, dns, policy::ClientRouting, sysctl::Sysctls},
};

/// The kernel objects a plan's steps act on, each through its owner.
pub struct Effects<'a> {
    pub nl: &'a Netlink,
    pub iface: &'a mut MeshInterface,
    pub dataplane: &'a mut DataPlane,
    pub sysctls: &'a mut Sysctls,
    /// For peer names in log lines.
    pub book: &'a PeerBook,
    /// For an exit node's mesh addresses (its DNS resolver) and prefixes.
    pub mesh: &'a Mesh,
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

pub struct ExitClient {
    wanted: bool,
    phase: Phase,
    /// When the active exit node became active: a faster one may replace
    /// it only after `exit::SWITCH_DWELL`.
    since: Instant,
    failovers: u64,
    installed: Installed,
    routing: ClientRouting,
    policy: Policy,
    /// `--exit-node NAME|KEY`.
    pin: Option<String>,
    /// After a failed transition: no automatic retry before this, and how
    /// many failed in a row (the delay doubles, up to `RETRY_MAX`).
    retry_at: Option<Instant>,
    failures: u32,
}

/// The longest wait between automatic retries of a failed transition.
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

impl ExitClient {
    pub fn new(wanted: bool, numbers: PolicyNumbers, policy: Policy, pin: Option<String>) -> Self {
        ExitClient {
            wanted,
            phase: Phase::Off,
            since: Instant::now(),
            failovers: 0,
            installed: Installed::default(),
            routing: ClientRouting::new(numbers),
            policy,
            pin,
            retry_at: None,
            failures: 0,
        }
    }

    /// What is installed now (the record nexd keeps in its state directory).
    pub fn installed(&self) -> Installed {
        self.installed
    }

    pub fn wanted(&self) -> bool {
        self.wanted
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Times the client moved to another exit node.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    pub fn pin(&self) -> Option<&str> {
        self.pin.as_deref()
    }

    /// Removes whatever a crashed nexd left at nexd's fixed numbers (rules,
    /// routes, `src_valid_mark`) before anything else starts. (A leftover
    /// DNS redirect goes with the other nftables tables, in
    /// `routing::remove_leftover_tables`.)
    pub async fn remove_leftovers(&self, nl: &Netlink, sysctls: &mut Sysctls) {
        if let Err(e) = self.routing.remove(nl, sysctls).await {
            warn!(error = %e, "removing leftover exit-node client routing failed");
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

    /// The exit node `exit::choose` picks now.
    fn choose(&self, c: &Candidates<'_>, now: Instant) -> Option<PublicKey> {
        let pinned = self.pinned(c).ok()?;
        let candidates = c.book.keys().filter_map(|k| {
            Some(Candidate {
                key: *k,
                name: c.book.name(k)?,
                live: c.book.live(k)?,
            })
        });
        let current = self.phase.exit_peer().map(|key| exit::Current {
            key,
            since: self.since,
        });
        exit::choose(current, pinned, candidates, now)
    }

    /// The exit nodes to probe: the one in use and the next one.
    pub fn probe_targets(&self, c: &Candidates<'_>, now: Instant) -> Vec<PublicKey> {
        let Ok(pinned) = self.pinned(c) else {
            return Vec::new();
        };
        let candidates = c.book.keys().filter_map(|k| {
            Some(Candidate {
                key: *k,
                name: c.book.name(k)?,
                live: c.book.live(k)?,
            })
        });
        exit::probe_targets(self.phase.exit_peer(), pinned, candidates, now)
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
    pub async fn evaluate(&mut self, c: &Candidates<'_>, fx: &mut Effects<'_>) {
        let now = Instant::now();
        if self.retry_at.is_some_and(|t| now < t) {
            return;
        }
        let chosen = if self.wanted {
            self.choose(c, Instant::now())
        } else {
            None
        };
        let next = exit::next_phase(self.wanted, self.phase, chosen);
        // Also when the phase stays but what is installed is not what it
        // needs (a failed rollback): the plan from the record repairs it.
        let repair = self.installed != plan::target(self.phase, self.policy);
        if !(next != self.phase || repair) {
            return;
        }
        match self.transition(next, fx).await {
            Ok(()) => {
                self.retry_at = None;
                self.failures = 0;
            }
            Err(e) => {
                let wait = RETRY_MAX.min(std::time::Duration::from_secs(1 << self.failures.min(5)));
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
        fx: &mut Effects<'_>,
    ) -> Result<(), EnableError> {
        if let Phase::Active(_) = self.phase {
            self.wanted = true;
            return Ok(());
        }
        let Some(chosen) = self.choose(c, Instant::now()) else {
            return Err(EnableError::Unavailable);
        };
        self.transition(Phase::Active(chosen), fx).await?;
        self.wanted = true;
        Ok(())
    }

    /// `nexctl nexd exit-node disable`: back to the direct path.
    pub async fn disable(&mut self, fx: &mut Effects<'_>) -> Result<(), TransitionError> {
        self.wanted = false;
        if self.phase == Phase::Off {
            return Ok(());
        }
        self.transition(Phase::Off, fx).await
    }

    /// Runs the plan to `next`; on a failure, the plan back.
    pub async fn transition(
        &mut self,
        next: Phase,
        fx: &mut Effects<'_>,
    ) -> Result<(), TransitionError> {
        let prev = self.phase;
        let steps = plan::plan(self.installed, plan::target(next, self.policy));
        if let Err(failed) = self.execute(&steps, fx).await {
            let back = plan::plan(self.installed, plan::target(prev, self.policy));
            // The phase stays `prev`. If the rollback failed too, what is
            // installed differs from what `prev` needs, and the next
            // evaluation repairs it from the record (see `evaluate`).
            let rollback = self.execute(&back, fx).await;
            return Err(TransitionError { failed, rollback });
        }
        if next != prev {
            self.log_transition(prev, next, fx.book);
        }
        if let (Phase::Active(a), Phase::Active(b)) = (prev, next)
            && a != b
        {
            self.failovers += 1;
        }
        if next.exit_peer().is_some() && next.exit_peer() != prev.exit_peer() {
            self.since = Instant::now();
        }
        self.phase = next;
        Ok(())
    }

    /// Runs `steps` in order, recording each success; stops at the first
    /// failure with a conservative record of what may be installed.
    async fn execute(&mut self, steps: &[Step], fx: &mut Effects<'_>) -> Result<(), StepError> {
        for &step in steps {
            match self.run(step, fx).await {
                Ok(()) => self.installed = step.apply(self.installed),
                Err(source) => {
                    self.installed = step.failed(self.installed);
                    return Err(StepError { step, source });
                }
            }
        }
        Ok(())
    }

    async fn run(&self, step: Step, fx: &mut Effects<'_>) -> anyhow::Result<()> {
        let book = fx.book;
        let names = |k: &PublicKey| book.name(k).unwrap_or("?").to_owned();
        match step {
            Step::AttachGuard => fx.dataplane.set_guard(fx.nl, true).await,
            Step::DetachGuard => fx.dataplane.set_guard(fx.nl, false).await,
            Step::SetFwmark => Ok(fx.iface.set_fwmark(Some(self.routing.numbers().fwmark))?),
            Step::ClearFwmark => Ok(fx.iface.set_fwmark(None)?),
            Step::AddRoutes => Ok(self
                .routing
                .add_routes(fx.nl, fx.iface.index(), fx.iface.name())
                .await?),
            Step::RemoveRoutes => Ok(self.routing.remove_routes(fx.nl).await?),
            Step::RouteVia(k) => Ok(fx.iface.route_default_via(k, &names)?),
            Step::AddRules => Ok(self.routing.add_rules(fx.nl, fx.sysctls).await?),
            Step::RemoveRules => Ok(self
                .routing
                .remove_rules_and_mark(fx.nl, fx.sysctls)
                .await?),
            Step::SteeringOn => fx.dataplane.set_steering(fx.nl, true).await,
            Step::SteeringOff => fx.dataplane.set_steering(fx.nl, false).await,
            Step::Dns(d) => {
                let ctx = dns::Context {
                    wg: fx.iface.name().to_owned(),
                    mesh_v4: fx.mesh.ipv4_prefix,
                    mesh_v6: fx.mesh.ipv6_prefix,
                    kill_switch: self.policy.kill_switch,
                };
                let redirect = match d {
                    Dns::Off => return Ok(dns::remove()?),
                    Dns::Blocked => dns::Redirect::Refused,
                    Dns::Via(k) => {
                        let exit = fx
                            .mesh
                            .device(&k)
                            .ok_or_else(|| anyhow::anyhow!("exit node {k} is not in the mesh"))?;
                        dns::Redirect::To(exit.ipv4, exit.ipv6)
                    }
                };
                Ok(dns::apply(&ctx, redirect)?)
            }
        }
    }

    /// Removes everything the client installed (stop). Never gives up half
    /// way: the plan to Off is run step by step, each failure logged.
    pub async fn teardown(&mut self, fx: &mut Effects<'_>) {
        self.wanted = false;
        let steps = plan::plan(self.installed, Installed::default());
        for step in steps {
            if let Err(e) = self.run(step, fx).await {
                super::teardown_warning(&step.to_string(), &crate::error_text(&e));
            }
            self.installed = step.apply(self.installed);
        }
        if self.phase.routing_installed() {
            info!("exit-node client disabled: the direct path is restored");
        }
        self.phase = Phase::Off;
    }

    fn log_transition(&self, prev: Phase, next: Phase, book: &PeerBook) {
        let name = |k: &PublicKey| book.name(k).unwrap_or("?").to_owned();
        let available = |k: &PublicKey| {
            book.live(k).and_then(|l| exit::status(l, Instant::now()))
                == Some(exit::ExitStatus::Available)
        };
        match (prev, next) {
            (_, Phase::Off) if prev.routing_installed() => {
                info!("exit-node client disabled: the direct path is restored")
            }
            (_, Phase::Off) => info!("exit-node client off"),
            (_, Phase::Waiting) => info!(
                "exit-node client wanted, but no exit node is available yet: waiting (the device keeps its direct path)"
            ),
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
}
