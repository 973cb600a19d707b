//! The exit-node role (`nexd router --exit-node`): the one owner of what an
//! exit node installs besides its eBPF programs (which `DataPlane` owns and
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
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ipnet::IpNet;
use tracing::{info, warn};

use super::dataplane::DataPlane;
use crate::{
    datapath::exit::{ClientLimits, ExitClient, HostNetworks, RateLimit, exit_policy, mss_for_mtu},
    dns::{self, DnsConfig, DnsHandle},
    keys::PublicKey,
    mesh::{Mesh, Rate},
    netlink::Netlink,
    routing::{
        forward::{ExitForwarding, ExitRules, Uplinks},
        host,
        sysctl::Sysctls,
        uplink,
    },
};

/// The exit node's settings from the command line.
#[derive(Debug, Clone, Default)]
pub struct ExitSettings {
    /// `--uplink`; default: the default routes' interfaces.
    pub uplink: Option<String>,
    /// `--exit-allow`: subnets shared with the clients besides the internet.
    pub allow: Vec<IpNet>,
    /// `--exit-rate-limit`: each client's limit (each direction) where its
    /// entry has none.
    pub rate_limit: Option<Rate>,
}

pub struct ExitServer {
    wg_iface: String,
    settings: ExitSettings,
    forwarding: ExitForwarding,
    dns: Option<DnsHandle>,
    /// Since when the internet is reachable (`None`: it is not).
    internet_since: Option<Instant>,
    /// The internet was lost since serving began: its return is announced
    /// only after `RESTORE_AFTER`, so a flapping uplink does not make the
    /// clients flap with it.
    damped: bool,
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

/// The clients `mesh` lets this exit node serve, with their limits.
fn clients(mesh: &Mesh, own: &PublicKey, default: Option<Rate>) -> Vec<ExitClient> {
    mesh.exit_clients_of(own)
        .map(|d| {
            let limits = d
                .exit_rate_limit
                .or(default)
                .map(|r| ClientLimits::both(RateLimit::new(r.bits_per_second())))
                .unwrap_or_default();
            ExitClient {
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
        nl: &Netlink,
        wg_iface: &str,
        settings: ExitSettings,
        mesh: &Mesh,
        own: &PublicKey,
        sysctls: &mut Sysctls,
        dataplane: &mut DataPlane,
    ) -> anyhow::Result<Self> {
        if let Some(why) = not_allowed(mesh, own) {
            anyhow::bail!("{why}");
        }
        let me = mesh.device(own).context("this device is not in the mesh")?;
        let uplinks = uplinks(nl, settings.uplink.as_deref(), true).await?;
        // The data path first: from the first forwarded packet, only
        // served clients, and only to the internet.
        let internet = uplink::internet_reachable(nl, settings.uplink.as_deref()).await?;
        if !internet {
            warn!(
                "no default route through an interface that is up: not announcing this exit node until there is one"
            );
        }
        let mut server = ExitServer {
            wg_iface: wg_iface.to_owned(),
            forwarding: ExitForwarding { uplinks },
            dns: None,
            settings,
            internet_since: internet.then(Instant::now),
            damped: false,
        };
        server
            .sync_datapath(nl, mesh, own, dataplane)
            .await
            .context("the exit node's data path")?;
        server.forwarding = ExitForwarding::apply(&server.rules(mesh, me.ipv4, me.ipv6), sysctls)
            .context("setting up the exit node")?;
        let allowed: Vec<IpAddr> = mesh
            .exit_clients_of(own)
            .flat_map(|d| d.mesh_addrs())
            .collect();
        match dns::start(
            DnsConfig::new(
                vec![IpAddr::V4(me.ipv4), IpAddr::V6(me.ipv6)],
                Some(wg_iface.to_owned()),
            ),
            allowed,
        ) {
            Ok(h) => server.dns = Some(h),
            // The clients' DNS goes nowhere then, which they see; routing
            // still works.
            Err(e) => warn!(error = %e, "the DNS resolver for the clients did not start"),
        }
        info!(
            clients = mesh.exit_clients_of(own).count(),
            "serving as exit node: advertising 0.0.0.0/0 and ::/0 to the mesh"
        );
        Ok(server)
    }

    fn rules(&self, mesh: &Mesh, v4: std::net::Ipv4Addr, v6: std::net::Ipv6Addr) -> ExitRules {
        ExitRules {
            wg: self.wg_iface.clone(),
            uplinks: self.forwarding.uplinks.clone(),
            mesh_v4: mesh.ipv4_prefix,
            mesh_v6: mesh.ipv6_prefix,
            own: Some((v4, v6)),
        }
    }

    /// The policy (from the host's networks now) and the clients into the
    /// eBPF maps; attaches the programs the first time.
    async fn sync_datapath(
        &self,
        nl: &Netlink,
        mesh: &Mesh,
        own: &PublicKey,
        dataplane: &mut DataPlane,
    ) -> anyhow::Result<()> {
        let me = mesh.device(own).context("this device is not in the mesh")?;
        let host = HostNetworks {
            addresses: host::addresses(nl).await?,
            routes: host::routed_subnets(nl).await?,
            mesh_prefixes: vec![IpNet::V4(mesh.ipv4_prefix), IpNet::V6(mesh.ipv6_prefix)],
            mesh_addresses: me.mesh_addrs().to_vec(),
        };
        let policy = exit_policy(&host, &self.settings.allow);
        let clients = clients(mesh, own, self.settings.rate_limit);
        dataplane.sync_exit(&policy, &clients, mss_for_mtu(mesh.mtu))
    }

    pub fn uplinks(&self) -> &Uplinks {
        &self.forwarding.uplinks
    }

    /// Whether to announce this exit node now: the internet is reachable
    /// (and, after a loss, has been for `RESTORE_AFTER`).
    pub fn announces(&self, now: Instant) -> bool {
        self.internet_since
            .is_some_and(|t| !self.damped || now.saturating_duration_since(t) >= RESTORE_AFTER)
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
        match (self.internet_since.is_some(), up) {
            (true, false) => {
                warn!(
                    "the exit node lost its way to the internet (no default route through an interface that is up): withdrawing its exit capability"
                );
                self.internet_since = None;
                self.damped = true;
                true
            }
            (false, true) => {
                info!(after = ?RESTORE_AFTER, "the exit node's way to the internet is back: announcing it again once it has held");
                self.internet_since = Some(Instant::now());
                false
            }
            _ => false,
        }
    }

    /// The DNS resolver's counters, if it runs.
    pub fn dns_counters(&self) -> Option<dns::DnsCounters> {
        self.dns.as_ref().map(DnsHandle::counters)
    }

    /// The membership changed: the table (prefixes), the clients and their
    /// limits, the resolver's allowed sources and upstreams.
    pub async fn reload(
        &mut self,
        nl: &Netlink,
        mesh: &Mesh,
        own: &PublicKey,
        sysctls: &mut Sysctls,
        dataplane: &mut DataPlane,
    ) {
        let Some(me) = mesh.device(own) else { return };
        if let Err(e) = self.sync_datapath(nl, mesh, own, dataplane).await {
            warn!(error = %crate::error_text(&e), "updating the exit node's data path failed");
        }
        match ExitForwarding::apply(&self.rules(mesh, me.ipv4, me.ipv6), sysctls) {
            Ok(fw) => self.forwarding = fw,
            Err(e) => warn!(error = %e, "updating exit node forwarding failed"),
        }
        if let Some(dns) = &self.dns {
            dns.update_allowed(mesh.exit_clients_of(own).flat_map(|d| d.mesh_addrs()));
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
    pub async fn refresh_host(
        &mut self,
        nl: &Netlink,
        mesh: &Mesh,
        own: &PublicKey,
        sysctls: &mut Sysctls,
        dataplane: &mut DataPlane,
    ) -> bool {
        let withdrawn = self.follow_internet(nl).await;
        self.refresh_forwarding(nl, mesh, own, sysctls, dataplane)
            .await;
        withdrawn
    }

    async fn refresh_forwarding(
        &mut self,
        nl: &Netlink,
        mesh: &Mesh,
        own: &PublicKey,
        sysctls: &mut Sysctls,
        dataplane: &mut DataPlane,
    ) {
        if let Err(e) = self.sync_datapath(nl, mesh, own, dataplane).await {
            warn!(error = %crate::error_text(&e), "updating the exit node's policy failed");
        }
        let now = match uplinks(nl, self.settings.uplink.as_deref(), false).await {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %crate::error_text(&e), "reading the exit node's uplinks failed");
                return;
            }
        };
        if now == self.forwarding.uplinks {
            return;
        }
        let Some(me) = mesh.device(own) else { return };
        info!(v4 = ?now.v4, v6 = ?now.v6, "the exit node's uplinks changed");
        let rules = ExitRules {
            uplinks: now,
            ..self.rules(mesh, me.ipv4, me.ipv6)
        };
        match ExitForwarding::apply(&rules, sysctls) {
            Ok(fw) => self.forwarding = fw,
            Err(e) => warn!(error = %e, "following the exit node's new uplinks failed"),
        }
    }

    /// Stops serving: the resolver, the exit programs, the table and the
    /// forwarding sysctls.
    pub async fn remove(mut self, sysctls: &mut Sysctls, dataplane: &mut DataPlane) {
        if let Some(dns) = self.dns.take() {
            dns.shutdown().await;
        }
        dataplane.detach_exit();
        self.forwarding.remove(sysctls);
    }
}
