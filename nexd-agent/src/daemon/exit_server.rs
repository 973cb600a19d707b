//! The exit-node role (`nexd router --exit-node`): the one owner of what an
//! exit node installs besides its eBPF programs (which `Programs` owns and
//! this component feeds): the nftables table and forwarding sysctls
//! (`routing::forward`), the DNS resolver on its mesh addresses (`dns`),
//! and the decisions of whom it serves and where they may go.
//!
//! Whom: the devices the membership names (`exit_node = true` on this
//! device's entry, `exit_clients` if given), with their rate limits. Where:
//! the internet only, so everything the host itself has (its addresses,
//! its connected and routed subnets, link-local and the metadata service,
//! private ranges) is denied unless `--exit-allow` shares it. Both are
//! recomputed on every membership change and every change of the host's
//! links, addresses and routes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ipnet::IpNet;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    exit_group::GroupMember,
    exit_probe::{self, Change, ExitProbe, ProbeHealth, Round},
    host::Host,
    programs::Programs,
};
use crate::{
    datapath::exit::{
        ClientLimits, HostNetworks, RateLimit, ServedClient, exit_policy, mss_for_mtu,
    },
    dns::{self, DnsConfig, DnsHandle},
    exit_group::Membership,
    keys::PublicKey,
    mesh::{Mesh, Rate},
    netlink::Netlink,
    routing::{
        forward::{ExitForwarding, ExitRules, FlowClient, FlowLimits, Uplinks},
        host, uplink,
    },
};

/// The exit node's settings from the command line.
#[derive(Debug, Clone, Default)]
pub struct ExitSettings {
    /// The WireGuard interface the clients come in through.
    pub wg_iface: String,
    /// `--uplink`; default: the default routes' interfaces.
    pub uplink: Option<String>,
    /// `--exit-allow`: subnets shared with the clients besides the internet.
    pub allow: Vec<IpNet>,
    /// `--exit-rate-limit`: each client's limit (each direction) where its
    /// entry has none.
    pub rate_limit: Option<Rate>,
    /// `--exit-probe-target`: the internet counts as lost when none of
    /// these answers (see `exit_probe`); empty: routes only.
    pub probe_targets: Vec<SocketAddr>,
    /// The state directory: an exit group member keeps its daemons'
    /// files under it (`exit-group/`).
    pub state_dir: std::path::PathBuf,
}

/// Where the exit probe's rounds go, and the id of the next probe task.
pub struct ProbeWiring {
    pub results: mpsc::Sender<Round>,
    pub id: u64,
}

pub struct ExitServer {
    own: PublicKey,
    settings: ExitSettings,
    forwarding: ExitForwarding,
    dns: Option<DnsHandle>,
    /// A default route through an interface that is up exists.
    routes_ok: bool,
    /// The probe targets' verdict, with `--exit-probe-target`.
    probes: Option<ProbeHealth>,
    /// The probe task (stops when dropped) and its id.
    probe: Option<(ExitProbe, u64)>,
    /// Why the last failed probe round failed, for the log and `status`.
    probe_errors: String,
    /// Failed probes per target, for the metrics.
    probe_failures: BTreeMap<SocketAddr, u64>,
    /// Whether to announce the exit capability, from the internet's
    /// state over time (routes and, with targets, probes).
    announcement: Announcement,
    /// A member of an exit group: its daemons, and whether it holds the
    /// group's egress address (only the holder announces itself).
    group: Option<GroupMember>,
}

/// The internet's ups and downs as the mesh sees them: the pure part of
/// the withdrawal.
#[derive(Debug, Clone, Default)]
struct Announcement {
    /// Since when the internet is reachable (`None`: it is not).
    internet_since: Option<Instant>,
    /// The internet was lost since serving began: its return is announced
    /// only after `RESTORE_AFTER`, so a flapping uplink does not make the
    /// clients flap with it.
    damped: bool,
}

/// A change of the internet `Announcement::follow` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge {
    /// Lost: withdraw at once.
    Lost,
    /// Reachable (again): announced at once the first time, after
    /// `RESTORE_AFTER` after a loss.
    Back { damped: bool },
}

impl Announcement {
    fn new(internet: bool, now: Instant) -> Self {
        Announcement {
            internet_since: internet.then_some(now),
            damped: false,
        }
    }

    /// Takes whether the internet is reachable now.
    fn follow(&mut self, internet: bool, now: Instant) -> Option<Edge> {
        match (self.internet_since.is_some(), internet) {
            (true, false) => {
                self.internet_since = None;
                self.damped = true;
                Some(Edge::Lost)
            }
            (false, true) => {
                self.internet_since = Some(now);
                Some(Edge::Back {
                    damped: self.damped,
                })
            }
            _ => None,
        }
    }

    fn announces(&self, now: Instant) -> bool {
        self.internet_since
            .is_some_and(|t| !self.damped || now.saturating_duration_since(t) >= RESTORE_AFTER)
    }
}

/// How long the internet must be back before the exit node announces
/// itself again after losing it.
pub const RESTORE_AFTER: Duration = Duration::from_secs(2);

/// Why this device may not serve. A device that is not a member yet (a
/// registry device waiting for approval) may not either: it starts
/// serving when the membership that approves it says so.
pub fn not_allowed(mesh: &Mesh, own: &PublicKey) -> Option<String> {
    let Some(me) = mesh.device(own) else {
        return Some("this device is not a member of the mesh (yet)".to_owned());
    };
    (!me.exit_node).then(|| {
        format!(
            "device {} may not serve as exit node: its [[device]] entry has no `exit_node = true`",
            me.name
        )
    })
}

/// The interfaces the exit node forwards out of: `--uplink`, else the
/// default routes' interfaces now (which follow the host's routes).
async fn uplinks(nl: &Netlink, fixed: Option<&str>, warn_missing: bool) -> anyhow::Result<Uplinks> {
    if let Some(u) = fixed {
        if nl.link_index(u).await?.is_none() {
            anyhow::bail!("--uplink {u}: no such interface");
        }
        return Ok(Uplinks {
            v4: Some(u.to_owned()),
            v6: Some(u.to_owned()),
        });
    }
    let (v4, v6) = uplink::default_route_interfaces(nl).await?;
    if warn_missing && v4.is_none() {
        warn!("no IPv4 default route: this exit node will not forward IPv4");
    }
    if warn_missing && v6.is_none() {
        warn!("no IPv6 default route: this exit node will not forward IPv6");
    }
    Ok(Uplinks { v4, v6 })
}

/// The clients `mesh` lets this exit node serve, with their flow limits
/// (the mesh file's, else the defaults), for the nftables table.
fn flow_clients(mesh: &Mesh, own: &PublicKey) -> Vec<FlowClient> {
    mesh.exit_clients_of(own)
        .map(|d| FlowClient {
            name: d.name.clone(),
            addresses: d.mesh_addrs().to_vec(),
            limits: FlowLimits {
                max_flows: d.exit_flow_limit.unwrap_or(FlowLimits::DEFAULT.max_flows),
                new_per_second: d
                    .exit_new_flow_rate
                    .unwrap_or(FlowLimits::DEFAULT.new_per_second),
            },
        })
        .collect()
}

/// The clients `mesh` lets this exit node serve, with their limits.
fn clients(mesh: &Mesh, own: &PublicKey, default: Option<Rate>) -> Vec<ServedClient> {
    mesh.exit_clients_of(own)
        .map(|d| {
            let limits = d
                .exit_rate_limit
                .or(default)
                .map(|r| ClientLimits::both(RateLimit::new(r.bits_per_second())))
                .unwrap_or_default();
            ServedClient {
                name: d.name.clone(),
                addresses: d.mesh_addrs().to_vec(),
                limits,
            }
        })
        .collect()
}

impl ExitServer {
    /// Starts serving: the nftables table and forwarding, the eBPF exit
    /// programs with the policy and the clients, the DNS resolver. Fails
    /// (and installs nothing) when the membership does not let this
    /// device serve.
    pub async fn start(
        host: &mut Host,
        settings: ExitSettings,
        mesh: &Mesh,
        own: &PublicKey,
        probe: ProbeWiring,
    ) -> anyhow::Result<Self> {
        if let Some(why) = not_allowed(mesh, own) {
            anyhow::bail!("{why}");
        }
        exit_probe::check_outside_mesh(
            &settings.probe_targets,
            &[IpNet::V4(mesh.ipv4_prefix), IpNet::V6(mesh.ipv6_prefix)],
        )
        .map_err(anyhow::Error::msg)?;
        let me = mesh.device(own).context("this device is not in the mesh")?;
        let uplinks = uplinks(&host.nl, settings.uplink.as_deref(), true).await?;
        // The data path first: from the first forwarded packet, only
        // served clients, and only to the internet.
        let internet = uplink::internet_reachable(&host.nl, settings.uplink.as_deref()).await?;
        if !internet {
            warn!(
                "no default route through an interface that is up: not announcing this exit node until there is one"
            );
        }
        let probes = (!settings.probe_targets.is_empty()).then(ProbeHealth::default);
        let mut server = ExitServer {
            own: *own,
            forwarding: ExitForwarding {
                uplinks,
                clients: Vec::new(),
            },
            dns: None,
            routes_ok: internet,
            // Not announced before the first round answers (at once, a
            // few milliseconds, when the targets are reachable).
            announcement: Announcement::new(internet && probes.is_none(), Instant::now()),
            probes,
            probe: None,
            probe_errors: String::new(),
            probe_failures: BTreeMap::new(),
            group: None,
            settings,
        };
        if let Some(membership) = Membership::of(mesh, own) {
            let uplink = &membership.group.uplink;
            if server.forwarding.uplinks.v4.as_deref() != Some(uplink.as_str()) {
                warn!(
                    group = %membership.group.name,
                    group_uplink = %uplink,
                    ipv4_uplink = ?server.forwarding.uplinks.v4,
                    "the clients' IPv4 traffic does not leave through the exit group's uplink, where the egress address lives: replies to it arrive elsewhere; give --uplink {uplink}"
                );
            }
            let mut group = GroupMember::start(&host.nl, membership, &server.settings.state_dir)
                .await
                .context("joining the exit group")?;
            group.follow(&host.nl).await;
            server.group = Some(group);
        }
        server
            .sync_datapath(&host.nl, mesh, &mut host.programs)
            .await
            .context("the exit node's data path")?;
        server.forwarding =
            ExitForwarding::apply(&server.rules(mesh, me.ipv4, me.ipv6), &mut host.sysctls)
                .context("setting up the exit node")?;
        let allowed: Vec<IpAddr> = mesh
            .exit_clients_of(own)
            .flat_map(|d| d.mesh_addrs())
            .collect();
        match dns::start(
            DnsConfig::new(
                vec![IpAddr::V4(me.ipv4), IpAddr::V6(me.ipv6)],
                Some(server.settings.wg_iface.clone()),
            ),
            allowed,
        ) {
            Ok(h) => server.dns = Some(h),
            // The clients' DNS goes nowhere then, which they see; routing
            // still works.
            Err(e) => warn!(error = %e, "the DNS resolver for the clients did not start"),
        }
        if !server.settings.probe_targets.is_empty() {
            info!(
                targets = ?server.settings.probe_targets,
                every = ?exit_probe::PROBE_EVERY,
                "probing the internet: announced while at least one target answers a TCP connect"
            );
            server.probe = Some((
                ExitProbe::start(
                    probe.id,
                    server.settings.probe_targets.clone(),
                    server.settings.uplink.clone(),
                    probe.results,
                ),
                probe.id,
            ));
        }
        info!(
            clients = mesh.exit_clients_of(own).count(),
            "serving as exit node: advertising 0.0.0.0/0 and ::/0 to the mesh"
        );
        Ok(server)
    }

    fn rules(&self, mesh: &Mesh, v4: std::net::Ipv4Addr, v6: std::net::Ipv6Addr) -> ExitRules {
        ExitRules {
            wg: self.settings.wg_iface.clone(),
            uplinks: self.forwarding.uplinks.clone(),
            mesh_v4: mesh.ipv4_prefix,
            mesh_v6: mesh.ipv6_prefix,
            own: Some((v4, v6)),
            allow: self.settings.allow.clone(),
            clients: flow_clients(mesh, &self.own),
            egress: self.group.as_ref().map(GroupMember::egress),
        }
    }

    /// The policy (from the host's networks now) and the clients into the
    /// eBPF maps; attaches the programs the first time.
    async fn sync_datapath(
        &self,
        nl: &Netlink,
        mesh: &Mesh,
        programs: &mut Programs,
    ) -> anyhow::Result<()> {
        let me = mesh
            .device(&self.own)
            .context("this device is not in the mesh")?;
        let host = HostNetworks {
            addresses: host::addresses(nl).await?,
            routes: host::routed_subnets(nl).await?,
            mesh_prefixes: vec![IpNet::V4(mesh.ipv4_prefix), IpNet::V6(mesh.ipv6_prefix)],
            mesh_addresses: me.mesh_addrs().to_vec(),
        };
        let policy = exit_policy(&host, &self.settings.allow);
        let clients = clients(mesh, &self.own, self.settings.rate_limit);
        programs.sync_exit(&policy, &clients, mss_for_mtu(mesh.mtu))
    }

    pub fn uplinks(&self) -> &Uplinks {
        &self.forwarding.uplinks
    }

    /// What the nftables table refused of each client (flow limits), by
    /// client name and reason.
    pub fn flow_refusals(
        &self,
    ) -> Result<BTreeMap<String, BTreeMap<String, u64>>, crate::routing::nft::NftError> {
        self.forwarding.refusals()
    }

    /// Whether to announce this exit node now: the internet is reachable
    /// (and, after a loss, has been for `RESTORE_AFTER`).
    pub fn announces(&self, now: Instant) -> bool {
        self.announcement.announces(now) && self.group.as_ref().is_none_or(GroupMember::holds)
    }

    /// Why this exit node does not announce itself now, if it does not
    /// (for `status`).
    pub fn withdrawn(&self, now: Instant) -> Option<String> {
        if self.announces(now) {
            return None;
        }
        if let Some(g) = self.group.as_ref().filter(|g| !g.holds()) {
            return Some(format!(
                "standing by in exit group {}: another member holds its egress address",
                g.membership().group.name
            ));
        }
        Some(match (self.routes_ok, &self.probes) {
            (false, _) => "no default route through an interface that is up".to_owned(),
            (true, Some(p)) if !p.reachable() => self.probe_reason(p),
            _ => format!(
                "the internet is back; announced again once it has held for {RESTORE_AFTER:?}"
            ),
        })
    }

    fn probe_reason(&self, p: &ProbeHealth) -> String {
        match p.verdict() {
            exit_probe::Verdict::Unknown if self.probe_errors.is_empty() => {
                "waiting for the first answer of a probe target".to_owned()
            }
            _ => format!("no probe target answers ({})", self.probe_errors),
        }
    }

    /// Whether the internet is reachable now: a default route through an
    /// interface that is up, and, with probe targets, one that answers.
    fn internet(&self) -> bool {
        self.routes_ok && self.probes.as_ref().is_none_or(ProbeHealth::reachable)
    }

    /// Follows a change of `internet()`; returns whether the exit
    /// capability was just withdrawn (peers told at once). `why`: the
    /// reason for the log.
    fn follow(&mut self, why: &str) -> bool {
        match self.announcement.follow(self.internet(), Instant::now()) {
            Some(Edge::Lost) => {
                warn!(
                    "the exit node lost its way to the internet ({why}): withdrawing its exit capability"
                );
                true
            }
            Some(Edge::Back { damped: true }) => {
                info!(after = ?RESTORE_AFTER, "the exit node's way to the internet is back: announcing it again once it has held");
                false
            }
            Some(Edge::Back { damped: false }) => {
                info!("the exit node reaches the internet: announcing it");
                false
            }
            None => false,
        }
    }

    /// Re-reads whether the internet is reachable; returns whether the
    /// exit capability should be withdrawn at once (peers told now).
    async fn follow_internet(&mut self, nl: &Netlink) -> bool {
        let up = match uplink::internet_reachable(nl, self.settings.uplink.as_deref()).await {
            Ok(up) => up,
            Err(e) => {
                warn!(error = %e, "checking the exit node's way to the internet failed");
                return false;
            }
        };
        self.routes_ok = up;
        self.follow("no default route through an interface that is up")
    }

    /// A round of the probe task; returns whether the exit capability was
    /// just withdrawn (peers told now).
    pub fn on_probe_round(&mut self, round: Round) -> bool {
        if self.probe.as_ref().is_none_or(|(_, id)| *id != round.task) {
            return false;
        }
        let Some(mut health) = self.probes.take() else {
            return false;
        };
        let ok = round.ok();
        for (target, r) in &round.results {
            if r.is_err() {
                *self.probe_failures.entry(*target).or_default() += 1;
            }
        }
        if !ok {
            self.probe_errors = round.failures();
        }
        let change = health.observe(ok);
        self.probes = Some(health);
        match change {
            Some(Change::Lost) => {
                let why = format!(
                    "no probe target answered in {} rounds: {}",
                    exit_probe::LOST_AFTER,
                    self.probe_errors
                );
                let withdrawn = self.follow(&why);
                if !withdrawn && self.routes_ok {
                    // Never announced (start-up).
                    warn!("the exit node's probe targets do not answer ({why}): not announcing it");
                } else if !withdrawn {
                    // Withdrawn already for its routes: expected.
                    debug!("{why}");
                }
                withdrawn
            }
            Some(Change::Reachable) => {
                debug!("a probe target answers");
                self.follow("")
            }
            None => {
                if !ok {
                    debug!(errors = %self.probe_errors, "a probe round failed");
                }
                false
            }
        }
    }

    /// Failed probes per target (`--exit-probe-target`), for the metrics.
    pub fn probe_failures(&self) -> &BTreeMap<SocketAddr, u64> {
        &self.probe_failures
    }

    /// The DNS resolver's counters, if it runs.
    pub fn dns_counters(&self) -> Option<dns::DnsCounters> {
        self.dns.as_ref().map(DnsHandle::counters)
    }

    /// The membership changed: the table (prefixes), the clients and their
    /// limits, the resolver's allowed sources and upstreams.
    pub async fn reload(&mut self, host: &mut Host, mesh: &Mesh) {
        let Some(me) = mesh.device(&self.own) else {
            return;
        };
        self.follow_group(host, mesh).await;
        if let Err(e) = self.sync_datapath(&host.nl, mesh, &mut host.programs).await {
            warn!(error = %crate::error_text(&e), "updating the exit node's data path failed");
        }
        match ExitForwarding::apply(&self.rules(mesh, me.ipv4, me.ipv6), &mut host.sysctls) {
            Ok(fw) => self.forwarding = fw,
            Err(e) => warn!(error = %e, "updating exit node forwarding failed"),
        }
        if let Some(dns) = &self.dns {
            dns.update_allowed(mesh.exit_clients_of(&self.own).flat_map(|d| d.mesh_addrs()));
            if let Err(e) = dns.reload_upstreams() {
                warn!(error = %e, "re-reading the upstream resolvers failed; keeping the previous ones");
            }
        }
    }

    /// The host's links, addresses or routes changed: what is "the
    /// internet" changed with them, and without `--uplink` the interfaces
    /// the clients' traffic leaves through (masquerading follows them).
    /// Returns whether the exit capability was just withdrawn (no way to
    /// the internet left): the peers are then told at once.
    pub async fn refresh_host(&mut self, host: &mut Host, mesh: &Mesh) -> bool {
        let withdrawn = self.follow_internet(&host.nl).await;
        // The egress address came or went: the peers hear at once whether
        // this member is the group's exit node now.
        let moved = match &mut self.group {
            Some(g) => g.follow(&host.nl).await,
            None => false,
        };
        self.refresh_forwarding(host, mesh).await;
        withdrawn || moved
    }

    /// The group this device is a member of changed (joined, left, or its
    /// settings or members): its daemons restart with the new
    /// configuration.
    async fn follow_group(&mut self, host: &mut Host, mesh: &Mesh) {
        let wanted = Membership::of(mesh, &self.own);
        if wanted.as_ref() == self.group.as_ref().map(GroupMember::membership) {
            return;
        }
        if let Some(old) = self.group.take() {
            old.stop(&host.nl).await;
        }
        if let Some(membership) = wanted {
            match GroupMember::start(&host.nl, membership, &self.settings.state_dir).await {
                Ok(mut g) => {
                    g.follow(&host.nl).await;
                    self.group = Some(g);
                }
                Err(e) => warn!(error = %crate::error_text(&e), "joining the exit group failed"),
            }
        }
    }

    async fn refresh_forwarding(&mut self, host: &mut Host, mesh: &Mesh) {
        if let Err(e) = self.sync_datapath(&host.nl, mesh, &mut host.programs).await {
            warn!(error = %crate::error_text(&e), "updating the exit node's policy failed");
        }
        let now = match uplinks(&host.nl, self.settings.uplink.as_deref(), false).await {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %crate::error_text(&e), "reading the exit node's uplinks failed");
                return;
            }
        };
        if now == self.forwarding.uplinks {
            return;
        }
        let Some(me) = mesh.device(&self.own) else {
            return;
        };
        info!(v4 = ?now.v4, v6 = ?now.v6, "the exit node's uplinks changed");
        let rules = ExitRules {
            uplinks: now,
            ..self.rules(mesh, me.ipv4, me.ipv6)
        };
        match ExitForwarding::apply(&rules, &mut host.sysctls) {
            Ok(fw) => self.forwarding = fw,
            Err(e) => warn!(error = %e, "following the exit node's new uplinks failed"),
        }
    }

    /// Stops serving: the resolver, the exit programs, the table and the
    /// forwarding sysctls.
    pub async fn remove(mut self, host: &mut Host) {
        // keepalived first: it hands the egress address over at once.
        if let Some(g) = self.group.take() {
            g.stop(&host.nl).await;
        }
        // Stops the probe task.
        self.probe = None;
        if let Some(dns) = self.dns.take() {
            dns.shutdown().await;
        }
        host.programs.detach_exit();
        self.forwarding.remove(&mut host.sysctls);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_withdraws_at_once_and_the_return_is_damped() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut a = Announcement::new(true, t0);
        assert!(a.announces(t0), "announced at once when serving begins");
        assert_eq!(a.follow(true, at(100)), None);
        assert_eq!(a.follow(false, at(200)), Some(Edge::Lost));
        assert!(!a.announces(at(200)));
        assert_eq!(a.follow(false, at(300)), None);
        assert_eq!(a.follow(true, at(1000)), Some(Edge::Back { damped: true }));
        assert!(!a.announces(at(1000)));
        assert!(!a.announces(at(2999)));
        assert!(a.announces(at(3000)), "announced again after RESTORE_AFTER");
        // A flap inside the damping restarts it.
        assert_eq!(a.follow(false, at(3100)), Some(Edge::Lost));
        assert_eq!(a.follow(true, at(3200)), Some(Edge::Back { damped: true }));
        assert!(!a.announces(at(5199)));
        assert!(a.announces(at(5200)));
    }

    #[test]
    fn without_internet_at_start_the_first_return_is_not_damped() {
        let t0 = Instant::now();
        let mut a = Announcement::new(false, t0);
        assert!(!a.announces(t0));
        let t1 = t0 + Duration::from_millis(5);
        assert_eq!(a.follow(true, t1), Some(Edge::Back { damped: false }));
        assert!(a.announces(t1));
    }
}
