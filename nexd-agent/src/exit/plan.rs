//! The exit-node client's transitions as data: from what is installed now
//! to what a phase needs, the ordered list of steps that gets there
//! without a moment where internet traffic could leave directly.
//!
//! Why a plan and not imperative code: the order of these steps *is* the
//! safety of the client. Routes into the tunnel must exist before the rule
//! that sends traffic to them (a rule whose table has no route falls
//! through to the main table: a leak), WireGuard's fwmark must be set
//! before that rule (or its own UDP would be routed into itself), DNS must
//! be redirected before the rules exist (or a LAN resolver, reached through
//! the main table, would see the queries), and the leak guard must come
//! first and go last. Computing the steps as a value lets the unit tests
//! below walk every transition step by step and check those invariants
//! after each one; the daemon's executor (`daemon::exit_client`) only runs
//! them.

use crate::keys::PublicKey;

use super::Phase;

/// Where the client's DNS queries go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dns {
    /// Wherever the device's resolver configuration says (no redirect).
    #[default]
    Off,
    /// To this exit node's resolver on its mesh address, through the
    /// tunnel, whatever resolver the query was sent to.
    Via(PublicKey),
    /// Refused: while traffic is held back, queries fail instead of
    /// reaching a LAN resolver.
    Blocked,
}

/// How the client is configured: what the targets depend on besides the
/// phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// `--kill-switch`.
    pub kill_switch: bool,
    /// DNS through the exit node (off with `--exit-node-allow-lan-dns`).
    pub private_dns: bool,
}

/// What of the client's configuration is in the kernel. The executor keeps
/// this up to date after every step; at start-up it is what a crashed nexd
/// left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Installed {
    /// The leak guard on the uplinks' egress (`--kill-switch`).
    pub guard: bool,
    /// WireGuard's own packets carry the client's fwmark.
    pub fwmark: bool,
    /// Where DNS queries are redirected.
    pub dns: Dns,
    /// The unreachable default routes (v4 and v6) at the end of nexd's
    /// table: they need no device, so a lookup that reaches the table
    /// stops there whatever the kernel does to the interface.
    pub fallback: bool,
    /// `default dev <wg>` (v4 and v6) in nexd's table. The kernel deletes
    /// the IPv4 one with the interface's last IPv4 address (a device
    /// that leaves the mesh loses its mesh addresses): nexd watches for
    /// that and puts it back.
    pub routes: bool,
    /// The peer whose AllowedIPs carry 0.0.0.0/0 and ::/0.
    pub exit_peer: Option<PublicKey>,
    /// The policy rules that send unmarked traffic to nexd's table.
    pub rules: bool,
    /// The LAN classifier marks bypass traffic (it matters only while the
    /// rules exist).
    pub steering: bool,
}

/// One effect of the executor, in the order the plan lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    SetFwmark,
    AttachGuard,
    /// Point DNS at an exit node, block it, or stop redirecting it.
    Dns(Dns),
    AddFallback,
    AddRoutes,
    /// Move the default routes in WireGuard to this peer (or to none):
    /// one peer update, touching only the old and the new exit peer.
    RouteVia(Option<PublicKey>),
    AddRules,
    SteeringOn,
    SteeringOff,
    RemoveRules,
    RemoveRoutes,
    RemoveFallback,
    DetachGuard,
    ClearFwmark,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::SetFwmark => f.write_str("setting WireGuard's fwmark"),
            Step::AttachGuard => f.write_str("attaching the leak guard"),
            Step::Dns(Dns::Via(k)) => write!(f, "redirecting DNS to exit node {k}"),
            Step::Dns(Dns::Blocked) => f.write_str("blocking DNS while traffic is held back"),
            Step::Dns(Dns::Off) => f.write_str("removing the DNS redirect"),
            Step::AddFallback => f.write_str("adding the unreachable default routes"),
            Step::AddRoutes => f.write_str("adding the default routes into the tunnel"),
            Step::RouteVia(Some(k)) => write!(f, "moving the default routes to peer {k}"),
            Step::RouteVia(None) => f.write_str("taking the default routes off the exit peer"),
            Step::AddRules => f.write_str("adding the policy rules"),
            Step::SteeringOn => f.write_str("turning the LAN classifier's steering on"),
            Step::SteeringOff => f.write_str("turning the LAN classifier's steering off"),
            Step::RemoveRules => f.write_str("removing the policy rules"),
            Step::RemoveRoutes => f.write_str("removing the default routes into the tunnel"),
            Step::RemoveFallback => f.write_str("removing the unreachable default routes"),
            Step::DetachGuard => f.write_str("detaching the leak guard"),
            Step::ClearFwmark => f.write_str("clearing WireGuard's fwmark"),
        }
    }
}

impl Step {
    /// What `installed` becomes once this step succeeded.
    pub fn apply(self, mut s: Installed) -> Installed {
        match self {
            Step::SetFwmark => s.fwmark = true,
            Step::AttachGuard => s.guard = true,
            Step::Dns(d) => s.dns = d,
            Step::AddFallback => s.fallback = true,
            Step::AddRoutes => s.routes = true,
            Step::RouteVia(k) => s.exit_peer = k,
            Step::AddRules => s.rules = true,
            Step::SteeringOn => s.steering = true,
            Step::SteeringOff => s.steering = false,
            Step::RemoveRules => s.rules = false,
            Step::RemoveRoutes => s.routes = false,
            Step::RemoveFallback => s.fallback = false,
            Step::DetachGuard => s.guard = false,
            Step::ClearFwmark => s.fwmark = false,
        }
        s
    }

    /// Whether this step puts something in place (an addition, or a
    /// change of where something points) rather than removing it.
    fn puts(self) -> bool {
        match self {
            Step::AttachGuard
            | Step::SetFwmark
            | Step::AddFallback
            | Step::AddRoutes
            | Step::AddRules
            | Step::SteeringOn
            // A change of where something points: the nftables table is
            // replaced whole, a peer update is remove-then-add.
            | Step::RouteVia(_)
            | Step::Dns(Dns::Via(_) | Dns::Blocked) => true,
            Step::Dns(Dns::Off)
            | Step::SteeringOff
            | Step::RemoveRules
            | Step::RemoveRoutes
            | Step::RemoveFallback
            | Step::ClearFwmark
            | Step::DetachGuard => false,
        }
    }

    /// What `installed` may be after this step *failed* half-way: what it
    /// puts in place may be there (a half-done change of where something
    /// points claims the new target, so a rollback moves it back
    /// explicitly), what it removes may still be. The rollback starts from
    /// this view and removes (again) whatever might be there; every removal
    /// is idempotent.
    pub fn failed(self, s: Installed) -> Installed {
        if self.puts() { self.apply(s) } else { s }
    }

    /// What is *surely* installed after this step failed half-way: the
    /// other side of `failed`. What it puts in place may not be there (a
    /// change of where something points leaves the old target as the sure
    /// one); what it removes may be gone.
    pub fn surely_after_failure(self, s: Installed) -> Installed {
        if self.puts() { s } else { self.apply(s) }
    }
}

/// The state to plan from when what is installed is only known between
/// `surely` and `maybe` (after a failed step): each part of it is taken
/// from whichever bound differs from `to`, so the plan removes what may
/// be there and (re)adds what may be missing. Every step is idempotent,
/// so one that finds its work done changes nothing, and on the host the
/// plan passes through the same states as the plan from what really is
/// installed: the invariants hold as they do for that plan.
pub fn from_uncertain(maybe: Installed, surely: Installed, to: Installed) -> Installed {
    fn pick<T: PartialEq + Copy>(maybe: T, surely: T, to: T) -> T {
        if maybe != to { maybe } else { surely }
    }
    Installed {
        guard: pick(maybe.guard, surely.guard, to.guard),
        fwmark: pick(maybe.fwmark, surely.fwmark, to.fwmark),
        dns: pick(maybe.dns, surely.dns, to.dns),
        fallback: pick(maybe.fallback, surely.fallback, to.fallback),
        routes: pick(maybe.routes, surely.routes, to.routes),
        exit_peer: pick(maybe.exit_peer, surely.exit_peer, to.exit_peer),
        rules: pick(maybe.rules, surely.rules, to.rules),
        steering: pick(maybe.steering, surely.steering, to.steering),
    }
}

/// What a phase needs installed. With the kill switch the leak guard holds
/// from the moment exit mode is wanted (waiting too, not only once an exit
/// node answers), and WireGuard's fwmark with it: the guard recognises
/// WireGuard's own packets by it. With private DNS, queries go to the
/// exit node in use, and are refused while traffic is held back.
pub fn target(phase: Phase, policy: Policy) -> Installed {
    let routing = phase.routing_installed();
    let guarded = policy.kill_switch && phase != Phase::Off;
    let dns = match phase {
        _ if !policy.private_dns => Dns::Off,
        Phase::Active(k) => Dns::Via(k),
        Phase::Held => Dns::Blocked,
        Phase::Off | Phase::Waiting => Dns::Off,
    };
    Installed {
        guard: guarded,
        fwmark: routing || guarded,
        dns,
        fallback: routing,
        routes: routing,
        exit_peer: phase.exit_peer(),
        rules: routing,
        steering: routing,
    }
}

/// The ordered steps from `from` to `to`. Additions go fwmark and guard
/// first, then the DNS redirect and the tunnel side (routes, the exit
/// peer), then the rules that send traffic into it; removals go the other
/// way round, the rules first, then the DNS redirect, the tunnel side, the
/// guard and the fwmark last. A step is listed only if it changes
/// something, so a plan to the state already installed is empty.
pub fn plan(from: Installed, to: Installed) -> Vec<Step> {
    let mut steps = Vec::new();
    // Additions: the fwmark (harmless alone, and the guard needs it to let
    // WireGuard out), the guard...
    if to.fwmark && !from.fwmark {
        steps.push(Step::SetFwmark);
    }
    if to.guard && !from.guard {
        steps.push(Step::AttachGuard);
    }
    // ...DNS pointed into the tunnel before any rule could send a query
    // to a resolver through the main table...
    if to.dns != from.dns && to.dns != Dns::Off {
        steps.push(Step::Dns(to.dns));
    }
    if to.fallback && !from.fallback {
        steps.push(Step::AddFallback);
    }
    if to.routes && !from.routes {
        steps.push(Step::AddRoutes);
    }
    // ...the exit peer while routing is (or is about to be) in place,
    // before the rules so traffic flows the moment they exist...
    let moving_peer = to.exit_peer != from.exit_peer;
    if moving_peer && to.rules {
        steps.push(Step::RouteVia(to.exit_peer));
    }
    if to.rules && !from.rules {
        steps.push(Step::AddRules);
    }
    if to.steering && !from.steering {
        steps.push(Step::SteeringOn);
    }
    // ...removals, rules first and guard and fwmark last.
    if !to.steering && from.steering {
        steps.push(Step::SteeringOff);
    }
    if !to.rules && from.rules {
        steps.push(Step::RemoveRules);
    }
    if to.dns != from.dns && to.dns == Dns::Off {
        steps.push(Step::Dns(Dns::Off));
    }
    if moving_peer && !to.rules {
        steps.push(Step::RouteVia(to.exit_peer));
    }
    if !to.routes && from.routes {
        steps.push(Step::RemoveRoutes);
    }
    if !to.fallback && from.fallback {
        steps.push(Step::RemoveFallback);
    }
    if !to.guard && from.guard {
        steps.push(Step::DetachGuard);
    }
    if !to.fwmark && from.fwmark {
        steps.push(Step::ClearFwmark);
    }
    steps
}

/// Whether internet traffic of the device would leave directly in state
/// `s`: without both the rules and the routes of nexd's table, a lookup
/// falls through to the main table's default route, and only the guard
/// stands in the way.
pub fn leaks(s: &Installed) -> bool {
    // With the fallback, a lookup ends in nexd's table even when the
    // kernel took the tunnel's route: blocked, not leaked.
    let tunnelled = s.rules && (s.routes || s.fallback);
    !tunnelled && !s.guard
}

/// The invariants every state must keep, by name, and whether `s` breaks
/// each. A plan may start from a broken state (what a crash left) but no
/// step may break one that held before it.
pub fn broken(s: &Installed, policy: Policy) -> Vec<&'static str> {
    let mut out = Vec::new();
    // A rule whose table has no route falls through to the main table:
    // traffic the device believes tunnelled goes out directly.
    if s.rules && !s.routes {
        out.push("rules without routes");
    }
    // The kernel may take the tunnel's routes at any time (the last
    // address of the interface goes): only the fallback, which needs no
    // device, keeps the lookup from falling through to the main table.
    if s.rules && !s.fallback {
        out.push("rules without the unreachable fallback");
    }
    // The rules without WireGuard's fwmark send WireGuard's own UDP back
    // into the tunnel: nothing reaches any peer, the device is stranded.
    if s.rules && !s.fwmark {
        out.push("rules without fwmark");
    }
    // With the kill switch, any part of the client's routing in place
    // means a half-built tunnel; only the guard keeps that from leaking.
    if policy.kill_switch && (s.rules || s.routes) && !s.guard {
        out.push("routing without the leak guard");
    }
    // The guard lets WireGuard out only by its fwmark: without it the
    // tunnel cannot reach any peer.
    if s.guard && !s.fwmark {
        out.push("guard without fwmark");
    }
    // With the rules in place the main table still serves the LAN: a LAN
    // resolver would see the device's queries unless DNS is redirected.
    if policy.private_dns && s.rules && s.dns == Dns::Off {
        out.push("rules without the DNS redirect");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        keys::PrivateKey,
        testing::{phases, policies},
    };

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    const PLAIN: Policy = Policy {
        kill_switch: false,
        private_dns: false,
    };
    const GUARDED: Policy = Policy {
        kill_switch: true,
        private_dns: false,
    };
    const FULL: Policy = Policy {
        kill_switch: true,
        private_dns: true,
    };

    /// Runs `steps` from `from` and checks the invariants after every
    /// step; returns the final state. `protect` is whether internet
    /// traffic must never go direct during the run (the client is wanted
    /// and both ends of the transition have routing installed).
    fn walk(
        from: Installed,
        steps: &[Step],
        policy: Policy,
        protect: bool,
        what: &str,
    ) -> Installed {
        let mut s = from;
        for (i, step) in steps.iter().enumerate() {
            let before = broken(&s, policy);
            s = step.apply(s);
            for b in broken(&s, policy) {
                assert!(
                    before.contains(&b),
                    "{what}: step {i} ({step:?}) breaks \"{b}\": {s:?}; plan {steps:?}"
                );
            }
            if protect {
                assert!(
                    !leaks(&s),
                    "{what}: after step {i} ({step:?}) internet traffic would leave directly: {s:?}; plan {steps:?}"
                );
            }
        }
        s
    }

    #[test]
    fn every_transition_between_phases_keeps_the_invariants() {
        let (a, b) = (key(), key());
        for policy in policies() {
            for from in phases(a, b) {
                for to in phases(a, b) {
                    let what = format!("{from:?} -> {to:?} ({policy:?})");
                    let start = target(from, policy);
                    let end = target(to, policy);
                    let steps = plan(start, end);
                    let protect = from.routing_installed() && to.routing_installed();
                    let reached = walk(start, &steps, policy, protect, &what);
                    assert!(broken(&reached, policy).is_empty(), "{what}");
                    assert_eq!(reached, end, "{what}: plan {steps:?}");
                    if to.routing_installed() {
                        assert!(!leaks(&reached), "{what}");
                    }
                    if to == Phase::Off || (to == Phase::Waiting && !policy.kill_switch) {
                        assert_eq!(reached, Installed::default(), "{what}: direct path");
                    }
                    // The kill switch holds from the moment exit mode is
                    // wanted: waiting included.
                    if policy.kill_switch && to != Phase::Off {
                        assert!(reached.guard, "{what}: no guard");
                    }
                    if policy.private_dns && to.routing_installed() {
                        assert_ne!(reached.dns, Dns::Off, "{what}: DNS not redirected");
                    }
                    if from == to {
                        assert!(steps.is_empty(), "{what}: {steps:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn off_waiting_active_installs_the_tunnel_before_the_rules() {
        let a = key();
        assert!(plan(target(Phase::Off, PLAIN), target(Phase::Waiting, PLAIN)).is_empty());
        assert_eq!(
            plan(
                target(Phase::Waiting, PLAIN),
                target(Phase::Active(a), PLAIN)
            ),
            [
                Step::SetFwmark,
                Step::AddFallback,
                Step::AddRoutes,
                Step::RouteVia(Some(a)),
                Step::AddRules,
                Step::SteeringOn,
            ]
        );
        // With the kill switch the guard comes with wanting exit mode.
        assert_eq!(
            plan(target(Phase::Off, GUARDED), target(Phase::Waiting, GUARDED)),
            [Step::SetFwmark, Step::AttachGuard]
        );
        // DNS is redirected before the rules exist.
        assert_eq!(
            plan(target(Phase::Waiting, FULL), target(Phase::Active(a), FULL)),
            [
                Step::Dns(Dns::Via(a)),
                Step::AddFallback,
                Step::AddRoutes,
                Step::RouteVia(Some(a)),
                Step::AddRules,
                Step::SteeringOn,
            ]
        );
    }

    #[test]
    fn a_failover_only_moves_the_default_routes_and_dns() {
        let (a, b) = (key(), key());
        for p in [PLAIN, GUARDED] {
            assert_eq!(
                plan(target(Phase::Active(a), p), target(Phase::Active(b), p)),
                [Step::RouteVia(Some(b))]
            );
            assert_eq!(
                plan(target(Phase::Active(a), p), target(Phase::Held, p)),
                [Step::RouteVia(None)]
            );
        }
        assert_eq!(
            plan(
                target(Phase::Active(a), FULL),
                target(Phase::Active(b), FULL)
            ),
            [Step::Dns(Dns::Via(b)), Step::RouteVia(Some(b))]
        );
        // Held: queries are refused, not sent to a LAN resolver.
        assert_eq!(
            plan(target(Phase::Active(a), FULL), target(Phase::Held, FULL)),
            [Step::Dns(Dns::Blocked), Step::RouteVia(None)]
        );
        assert_eq!(
            plan(target(Phase::Held, FULL), target(Phase::Active(b), FULL)),
            [Step::Dns(Dns::Via(b)), Step::RouteVia(Some(b))]
        );
    }

    #[test]
    fn disabling_removes_the_rules_first_and_the_guard_last() {
        let a = key();
        assert_eq!(
            plan(target(Phase::Active(a), FULL), target(Phase::Off, FULL)),
            [
                Step::SteeringOff,
                Step::RemoveRules,
                Step::Dns(Dns::Off),
                Step::RouteVia(None),
                Step::RemoveRoutes,
                Step::RemoveFallback,
                Step::DetachGuard,
                Step::ClearFwmark,
            ]
        );
    }

    /// A restarted nexd finds any combination of what a crashed one left
    /// (rules without routes when the userspace link died with it, a pinned
    /// guard, a kernel link still carrying fwmark and 0/0, a DNS redirect)
    /// and must reach its wanted phase without breaking an invariant that
    /// held.
    #[test]
    fn crash_restart_adoption_from_any_leftover_state() {
        let (a, b) = (key(), key());
        for bits in 0u8..=255 {
            let found = Installed {
                guard: bits & 1 != 0,
                fwmark: bits & 2 != 0,
                fallback: bits & 128 != 0,
                routes: bits & 4 != 0,
                exit_peer: (bits & 8 != 0).then_some(a),
                rules: bits & 16 != 0,
                steering: bits & 32 != 0,
                dns: if bits & 64 != 0 {
                    Dns::Via(a)
                } else {
                    Dns::Off
                },
            };
            for policy in policies() {
                for to in phases(a, b) {
                    let what = format!("leftover {found:?} -> {to:?} ({policy:?})");
                    let end = target(to, policy);
                    let steps = plan(found, end);
                    let reached = walk(found, &steps, policy, false, &what);
                    // A guard found in place is never dropped while the
                    // wanted phase still needs it.
                    if found.guard && end.guard {
                        let mut s = found;
                        for step in &steps {
                            s = step.apply(s);
                            assert!(s.guard, "{what}: the guard went away at {step:?}");
                        }
                    }
                    assert_eq!(reached, end, "{what}: plan {steps:?}");
                }
            }
        }
    }

    #[test]
    fn a_plan_from_an_uncertain_state_readds_what_may_be_missing_and_removes_what_may_be_there() {
        let a = key();
        for policy in policies() {
            for (from, to) in [
                (target(Phase::Off, policy), target(Phase::Active(a), policy)),
                (target(Phase::Active(a), policy), target(Phase::Off, policy)),
            ] {
                let steps = plan(from, to);
                for fail_at in 0..steps.len() {
                    let (mut maybe, mut surely) = (from, from);
                    for step in &steps[..fail_at] {
                        (maybe, surely) = (step.apply(maybe), step.apply(surely));
                    }
                    let failed = steps[fail_at];
                    (maybe, surely) = (failed.failed(maybe), failed.surely_after_failure(surely));
                    // Whatever the failed step really did, the plan from
                    // the uncertain state reaches `to`, and from either
                    // real state never breaks an invariant.
                    for goal in [from, to] {
                        let p = plan(from_uncertain(maybe, surely, goal), goal);
                        for real in [maybe, surely] {
                            let what = format!(
                                "{failed:?} failed ({policy:?}), really {real:?}, to {goal:?}"
                            );
                            let reached = walk(real, &p, policy, false, &what);
                            assert_eq!(reached, goal, "{what}");
                        }
                    }
                }
            }
        }
    }

    /// The objects the kernel removes behind nexd's back, each with the
    /// state it leaves: the tunnel's routes go with the interface's last
    /// address (or the link going down). Nothing else of the client's
    /// routing depends on a device: the fallback, the rules, the DNS
    /// table and the fwmark stay; the guard goes only with its uplink.
    fn kernel_removals(s: Installed) -> Vec<(&'static str, Installed)> {
        vec![("the tunnel's routes", Installed { routes: false, ..s })]
    }

    #[test]
    fn what_the_kernel_removes_never_leaks_and_the_plan_puts_it_back() {
        let (a, b) = (key(), key());
        for policy in policies() {
            for phase in phases(a, b) {
                let wanted = target(phase, policy);
                for (what, left) in kernel_removals(wanted) {
                    let what = format!("the kernel removed {what} in {phase:?} ({policy:?})");
                    // Installed routing stays routing: blocked, not leaked.
                    if phase.routing_installed() {
                        assert!(!leaks(&left), "{what}: {left:?}");
                    }
                    let repair = plan(left, wanted);
                    let reached = walk(left, &repair, policy, phase.routing_installed(), &what);
                    assert_eq!(reached, wanted, "{what}");
                    if left != wanted {
                        assert_eq!(
                            repair,
                            [Step::AddRoutes],
                            "{what}: only what went is redone"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_failed_addition_is_rolled_back_by_a_plan_back() {
        let a = key();
        for policy in policies() {
            let from = target(Phase::Off, policy);
            let to = target(Phase::Active(a), policy);
            let steps = plan(from, to);
            // Fail at each step in turn: the rollback from the
            // conservative view of what may be installed reaches the start
            // exactly and never breaks an invariant on the way.
            for fail_at in 0..steps.len() {
                let mut s = from;
                for step in &steps[..fail_at] {
                    s = step.apply(s);
                }
                s = steps[fail_at].failed(s);
                let back = plan(s, from);
                let what = format!("rollback after {:?} ({policy:?})", steps[fail_at]);
                let reached = walk(s, &back, policy, false, &what);
                assert_eq!(reached, from, "{what}");
            }
        }
    }
}
