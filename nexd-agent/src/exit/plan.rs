//! The exit-node client's transitions as data: from what is installed now
//! to what a phase needs, the ordered list of steps that gets there
//! without a moment where internet traffic could leave directly.
//!
//! Why a plan and not imperative code: the order of these steps *is* the
//! safety of the client. Routes into the tunnel must exist before the rule
//! that sends traffic to them (a rule whose table has no route falls
//! through to the main table: a leak), WireGuard's fwmark must be set
//! before that rule (or its own UDP would be routed into itself), and the
//! leak guard must come first and go last. Computing the steps as a value
//! lets the unit tests below walk every transition step by step and check
//! those invariants after each one; the daemon's executor
//! (`daemon::exit_client`) only runs them.

use crate::keys::PublicKey;

use super::Phase;

/// What of the client's configuration is in the kernel. The executor keeps
/// this up to date after every step; at start-up it is what a crashed nexd
/// left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Installed {
    /// The leak guard on the uplinks' egress (`--kill-switch`).
    pub guard: bool,
    /// WireGuard's own packets carry the client's fwmark.
    pub fwmark: bool,
    /// `default dev <wg>` (v4 and v6) in nexd's table.
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
    AttachGuard,
    SetFwmark,
    AddRoutes,
    /// Move the default routes in WireGuard to this peer (or to none):
    /// one peer update, touching only the old and the new exit peer.
    RouteVia(Option<PublicKey>),
    AddRules,
    SteeringOn,
    SteeringOff,
    RemoveRules,
    RemoveRoutes,
    ClearFwmark,
    DetachGuard,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::AttachGuard => f.write_str("attaching the leak guard"),
            Step::SetFwmark => f.write_str("setting WireGuard's fwmark"),
            Step::AddRoutes => f.write_str("adding the default routes into the tunnel"),
            Step::RouteVia(Some(k)) => write!(f, "moving the default routes to peer {k}"),
            Step::RouteVia(None) => f.write_str("taking the default routes off the exit peer"),
            Step::AddRules => f.write_str("adding the policy rules"),
            Step::SteeringOn => f.write_str("turning the LAN classifier's steering on"),
            Step::SteeringOff => f.write_str("turning the LAN classifier's steering off"),
            Step::RemoveRules => f.write_str("removing the policy rules"),
            Step::RemoveRoutes => f.write_str("removing the default routes into the tunnel"),
            Step::ClearFwmark => f.write_str("clearing WireGuard's fwmark"),
            Step::DetachGuard => f.write_str("detaching the leak guard"),
        }
    }
}

impl Step {
    /// What `installed` becomes once this step succeeded.
    pub fn apply(self, mut s: Installed) -> Installed {
        match self {
            Step::AttachGuard => s.guard = true,
            Step::SetFwmark => s.fwmark = true,
            Step::AddRoutes => s.routes = true,
            Step::RouteVia(k) => s.exit_peer = k,
            Step::AddRules => s.rules = true,
            Step::SteeringOn => s.steering = true,
            Step::SteeringOff => s.steering = false,
            Step::RemoveRules => s.rules = false,
            Step::RemoveRoutes => s.routes = false,
            Step::ClearFwmark => s.fwmark = false,
            Step::DetachGuard => s.guard = false,
        }
        s
    }

    /// What `installed` may be after this step *failed* half-way: an
    /// addition may or may not have happened, a removal may not have. The
    /// rollback starts from this conservative view and removes (again)
    /// whatever might be there; every removal is idempotent.
    pub fn failed(self, s: Installed) -> Installed {
        match self {
            Step::AttachGuard
            | Step::SetFwmark
            | Step::AddRoutes
            | Step::AddRules
            | Step::SteeringOn => self.apply(s),
            // A half-done peer update: the old exit peer may have lost its
            // routes, the new one may not have them. Claim the new one, so
            // a rollback moves them back explicitly.
            Step::RouteVia(_) => self.apply(s),
            Step::SteeringOff
            | Step::RemoveRules
            | Step::RemoveRoutes
            | Step::ClearFwmark
            | Step::DetachGuard => s,
        }
    }
}

/// What a phase needs installed. `kill_switch` adds the leak guard while
/// the client's routing is in place.
pub fn target(phase: Phase, kill_switch: bool) -> Installed {
    let routing = phase.routing_installed();
    Installed {
        guard: kill_switch && routing,
        fwmark: routing,
        routes: routing,
        exit_peer: phase.exit_peer(),
        rules: routing,
        steering: routing,
    }
}

/// The ordered steps from `from` to `to`. Additions go guard first, then
/// the tunnel side (fwmark, routes, the exit peer), then the rules that
/// send traffic into it; removals go the other way round, the rules
/// first and the guard last. A step is listed only if it changes
/// something, so a plan to the state already installed is empty.
pub fn plan(from: Installed, to: Installed) -> Vec<Step> {
    let mut steps = Vec::new();
    // Additions, guard first...
    if to.guard && !from.guard {
        steps.push(Step::AttachGuard);
    }
    if to.fwmark && !from.fwmark {
        steps.push(Step::SetFwmark);
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
    // ...removals, rules first and guard last.
    if !to.steering && from.steering {
        steps.push(Step::SteeringOff);
    }
    if !to.rules && from.rules {
        steps.push(Step::RemoveRules);
    }
    if moving_peer && !to.rules {
        steps.push(Step::RouteVia(to.exit_peer));
    }
    if !to.routes && from.routes {
        steps.push(Step::RemoveRoutes);
    }
    if !to.fwmark && from.fwmark {
        steps.push(Step::ClearFwmark);
    }
    if !to.guard && from.guard {
        steps.push(Step::DetachGuard);
    }
    steps
}

/// Whether internet traffic of the device would leave directly in state
/// `s`: without both the rules and the routes of nexd's table, a lookup
/// falls through to the main table's default route, and only the guard
/// stands in the way.
pub fn leaks(s: &Installed) -> bool {
    let tunnelled = s.rules && s.routes;
    !tunnelled && !s.guard
}

/// The invariants every state must keep, by name, and whether `s` breaks
/// each. A plan may start from a broken state (what a crash left) but no
/// step may break one that held before it.
pub fn broken(s: &Installed, kill_switch: bool) -> Vec<&'static str> {
    let mut out = Vec::new();
    // A rule whose table has no route falls through to the main table:
    // traffic the device believes tunnelled goes out directly.
    if s.rules && !s.routes {
        out.push("rules without routes");
    }
    // The rules without WireGuard's fwmark send WireGuard's own UDP back
    // into the tunnel: nothing reaches any peer, the device is stranded.
    if s.rules && !s.fwmark {
        out.push("rules without fwmark");
    }
    // With the kill switch, any part of the client's routing in place
    // means a half-built tunnel; only the guard keeps that from leaking.
    if kill_switch && (s.rules || s.routes) && !s.guard {
        out.push("routing without the leak guard");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    /// Every phase a transition can start or end in.
    fn phases(a: PublicKey, b: PublicKey) -> [Phase; 5] {
        [
            Phase::Off,
            Phase::Waiting,
            Phase::Active(a),
            Phase::Active(b),
            Phase::Held,
        ]
    }

    /// Runs `steps` from `from` and checks the invariants after every
    /// step; returns the final state. `protect` is whether internet
    /// traffic must never go direct during the run (the client is wanted
    /// and both ends of the transition have routing installed).
    fn walk(
        from: Installed,
        steps: &[Step],
        kill_switch: bool,
        protect: bool,
        what: &str,
    ) -> Installed {
        let mut s = from;
        for (i, step) in steps.iter().enumerate() {
            let before = broken(&s, kill_switch);
            s = step.apply(s);
            for b in broken(&s, kill_switch) {
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
        for kill_switch in [false, true] {
            for from in phases(a, b) {
                for to in phases(a, b) {
                    let what = format!("{from:?} -> {to:?} (kill switch {kill_switch})");
                    let start = target(from, kill_switch);
                    let end = target(to, kill_switch);
                    let steps = plan(start, end);
                    let protect = from.routing_installed() && to.routing_installed();
                    let reached = walk(start, &steps, kill_switch, protect, &what);
                    assert!(broken(&reached, kill_switch).is_empty(), "{what}");
                    assert_eq!(reached, end, "{what}: plan {steps:?}");
                    if to.routing_installed() {
                        assert!(!leaks(&reached), "{what}");
                    }
                    if matches!(to, Phase::Off | Phase::Waiting) {
                        assert_eq!(reached, Installed::default(), "{what}: direct path");
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
        assert!(plan(target(Phase::Off, true), target(Phase::Waiting, true)).is_empty());
        assert_eq!(
            plan(target(Phase::Waiting, true), target(Phase::Active(a), true)),
            [
                Step::AttachGuard,
                Step::SetFwmark,
                Step::AddRoutes,
                Step::RouteVia(Some(a)),
                Step::AddRules,
                Step::SteeringOn,
            ]
        );
    }

    #[test]
    fn a_failover_only_moves_the_default_routes() {
        let (a, b) = (key(), key());
        for ks in [false, true] {
            assert_eq!(
                plan(target(Phase::Active(a), ks), target(Phase::Active(b), ks)),
                [Step::RouteVia(Some(b))]
            );
            assert_eq!(
                plan(target(Phase::Active(a), ks), target(Phase::Held, ks)),
                [Step::RouteVia(None)]
            );
            assert_eq!(
                plan(target(Phase::Held, ks), target(Phase::Active(b), ks)),
                [Step::RouteVia(Some(b))]
            );
        }
    }

    #[test]
    fn disabling_removes_the_rules_first_and_the_guard_last() {
        let a = key();
        assert_eq!(
            plan(target(Phase::Active(a), true), target(Phase::Off, true)),
            [
                Step::SteeringOff,
                Step::RemoveRules,
                Step::RouteVia(None),
                Step::RemoveRoutes,
                Step::ClearFwmark,
                Step::DetachGuard,
            ]
        );
    }

    /// A restarted nexd finds any combination of what a crashed one left
    /// (rules without routes when the userspace link died with it, a pinned
    /// guard, a kernel link still carrying fwmark and 0/0) and must reach
    /// its wanted phase without ever stranding the device.
    #[test]
    fn crash_restart_adoption_from_any_leftover_state() {
        let (a, b) = (key(), key());
        for bits in 0u8..64 {
            let found = Installed {
                guard: bits & 1 != 0,
                fwmark: bits & 2 != 0,
                routes: bits & 4 != 0,
                exit_peer: (bits & 8 != 0).then_some(a),
                rules: bits & 16 != 0,
                steering: bits & 32 != 0,
            };
            for ks in [false, true] {
                for to in phases(a, b) {
                    let what = format!("leftover {found:?} -> {to:?} (kill switch {ks})");
                    let end = target(to, ks);
                    let steps = plan(found, end);
                    // Whatever was left may already break an invariant; the
                    // plan must never break one that held.
                    let reached = walk(found, &steps, ks, false, &what);
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
    fn a_failed_addition_is_rolled_back_by_a_plan_back() {
        let a = key();
        let from = target(Phase::Waiting, true);
        let to = target(Phase::Active(a), true);
        let steps = plan(from, to);
        // Fail at each step in turn: the rollback from the conservative
        // view of what may be installed reaches the start exactly and
        // never strands on the way.
        for fail_at in 0..steps.len() {
            let mut s = from;
            for step in &steps[..fail_at] {
                s = step.apply(s);
            }
            s = steps[fail_at].failed(s);
            let back = plan(s, from);
            let what = format!("rollback after {:?}", steps[fail_at]);
            let reached = walk(s, &back, true, false, &what);
            assert_eq!(reached, from);
        }
    }
}
