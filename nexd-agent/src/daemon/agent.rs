//! The daemon: the components, each the owner of its state and its kernel
//! objects, and the wiring between them. Nothing here reaches into a
//! component's fields; every change goes through the owner's methods, and
//! the inputs one component needs from another are passed as arguments.
//!
//! | component | owns |
//! |---|---|
//! | `MeshInterface` | the WireGuard device, link, addresses, applied peers |
//! | `Endpoints` | the resolver task and the cache of resolved names |
//! | `Heartbeats` | the announcement sockets and the peer book |
//! | `ExitClient` | wanted, phase, failovers, the client's routing |
//! | `ExitServer` | the exit node's forwarding |
//! | `SplitTunnel` | the exclusions and the excluded-routes table |
//! | `DataPlane` | the eBPF programs, maps, guard, the gateway's table |
//! | `Sysctls` | every sysctl changed, with its original value |
//! | `Membership` | where the mesh comes from: the file, or the registry |

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use ipnet::IpNet;
use tokio::sync::mpsc;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{
    Options,
    dataplane::{DataPlane, DataPlaneSettings, Inputs},
    endpoints::{Endpoints, Resolved},
    exit_client::{Candidates, Effects, ExitClient},
    exit_probe,
    exit_server::{self, ExitServer, ExitSettings, ProbeWiring},
    heartbeats::Heartbeats,
    interface::MeshInterface,
    log_error_lines,
    membership::Membership,
    reconcile,
    split_tunnel::SplitTunnel,
    teardown_warning,
};
use crate::{
    announce::Incoming,
    exit::plan::Policy,
    keys::{PrivateKey, PublicKey},
    ledger::{self, Ledger},
    mesh::Mesh,
    netlink::Netlink,
    routing::sysctl::Sysctls,
    wireguard::DeviceStatus,
};

/// How often the default routes are checked for the excluded routes.
const ROUTE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

pub struct Daemon {
    pub(super) opts: Options,
    pub(super) own: PublicKey,
    key: PrivateKey,
    pub(super) nl: Netlink,
    /// The membership in force.
    pub(super) mesh: Mesh,
    pub(super) started: Instant,
    /// `None` until start-up created it (teardown copes with either).
    pub(super) iface: Option<MeshInterface>,
    endpoints: Endpoints,
    pub(super) heartbeats: Heartbeats,
    pub(super) exit_client: ExitClient,
    pub(super) exit_server: Option<ExitServer>,
    pub(super) split: SplitTunnel,
    pub(super) dataplane: DataPlane,
    sysctls: Sysctls,
    /// The backend's view, refreshed every tick.
    pub(super) last_status: Option<DeviceStatus>,
    last_route_check: Option<Instant>,
    /// The record of what is installed, as last written to the state dir.
    recorded: Option<Ledger>,
    /// A previous nexd's kill switch holds: its guard is taken over, not
    /// removed.
    adopt_guard: bool,
    /// Where the mesh comes from (file or registry), and the registry's
    /// device side.
    pub(super) membership: Membership,
    /// Where the exit node's probe task sends its rounds.
    exit_probes: mpsc::Sender<exit_probe::Round>,
    /// Tasks started so far: a round of an earlier task is ignored.
    exit_probe_tasks: u64,
}

/// Where the event loop's asynchronous inputs are delivered.
pub struct Channels {
    pub announcements: mpsc::Sender<Incoming>,
    pub resolved: mpsc::Sender<Resolved>,
    /// The exit node's probe rounds (`--exit-probe-target`).
    pub exit_probes: mpsc::Sender<exit_probe::Round>,
}

impl Daemon {
    pub fn new(
        opts: Options,
        key: PrivateKey,
        nl: Netlink,
        mut membership: Membership,
        split: SplitTunnel,
        channels: Channels,
        epoch: u32,
    ) -> Self {
        let mesh = membership.first();
        let own = key.public_key();
        let sysctls = Sysctls::open(&opts.state_dir);
        // What a previous nexd left: if it wanted exit mode (by flag or by
        // nexctl) and the kill switch still holds, exit mode resumes and
        // the guard it pinned stays in force, taken over in place.
        let previous = match ledger::read(&opts.state_dir) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "ignoring the record of a previous nexd");
                None
            }
        };
        let resume = opts.kill_switch && previous.as_ref().is_some_and(|l| l.exit_wanted);
        if resume && !opts.exit_node_client {
            warn!(
                pid = previous.as_ref().map_or(0, |l| l.pid),
                "a previous nexd stopped without cleaning up while exit mode was enabled: resuming exit mode, the kill switch holds"
            );
        }
        let wanted = opts.exit_node_client || resume;
        let exit_client = ExitClient::new(
            wanted,
            opts.policy,
            Policy {
                kill_switch: opts.kill_switch,
                private_dns: !opts.exit_node_allow_lan_dns,
            },
            opts.exit_node_pin.clone(),
        );
        let mut dataplane = DataPlane::new(DataPlaneSettings {
            wg_iface: opts.interface.clone(),
            lan_interfaces: opts.lan_interfaces.clone(),
            uplink: opts.uplink.clone(),
            kill_switch: opts.kill_switch,
            kill_switch_allow: opts.kill_switch_allow.clone(),
            log_guard_drops: opts.log_guard_drops,
            no_ebpf: opts.no_ebpf,
            mss_clamp: opts.mss_clamp,
            fwmark: opts.policy.fwmark,
            bpffs: opts.bpffs.clone(),
            exit_node: opts.exit_server.is_some(),
        });
        if let Some(p) = &previous {
            dataplane.inherit_clsact(p.clsact_interfaces.clone());
        }
        let heartbeats = Heartbeats::new(key.clone(), epoch, &mesh, channels.announcements);
        Daemon {
            own,
            key,
            nl,
            mesh,
            started: Instant::now(),
            iface: None,
            endpoints: Endpoints::start(channels.resolved),
            heartbeats,
            exit_client,
            exit_server: None,
            split,
            dataplane,
            sysctls,
            last_status: None,
            last_route_check: None,
            recorded: None,
            adopt_guard: wanted && opts.kill_switch,
            membership,
            exit_probes: channels.exit_probes,
            exit_probe_tasks: 0,
            opts,
        }
    }

    /// Rewrites the record of what is installed in the state directory
    /// when it changed. Called after every event.
    pub fn record(&mut self) {
        let installed = self.exit_client.installed();
        let mut nft_tables = Vec::new();
        if self.exit_server.is_some() {
            nft_tables.push(crate::routing::forward::NFT_TABLE.to_string());
        }
        if !self.opts.lan_interfaces.is_empty() {
            nft_tables.push(crate::routing::gateway::NFT_TABLE.to_string());
        }
        if installed.dns != crate::exit::plan::Dns::Off {
            nft_tables.push(crate::routing::dns::NFT_TABLE.to_string());
        }
        let now = Ledger {
            pid: std::process::id(),
            interface: self.opts.interface.clone(),
            bpffs: self.opts.bpffs.clone(),
            exit_table: self.opts.policy.table,
            exit_fwmark: self.opts.policy.fwmark,
            exit_rule_priority: self.opts.policy.priority,
            exit_wanted: self.exit_client.wanted(),
            kill_switch: self.opts.kill_switch,
            guard_interfaces: self.dataplane.info(0).guard_interfaces,
            clsact_interfaces: self.dataplane.clsact_interfaces(),
            lan_interfaces: self.opts.lan_interfaces.clone(),
            nft_tables,
        };
        if self.recorded.as_ref() == Some(&now) {
            return;
        }
        match ledger::write(&self.opts.state_dir, &now) {
            Ok(()) => self.recorded = Some(now),
            Err(e) => warn!(error = %e, "cannot record what nexd installed in its state directory"),
        }
    }

    /// Removes what a crashed nexd left, creates the interface, applies the
    /// mesh, sets up the exit node role and the data path.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let span = info_span!("start", iface = %self.opts.interface);
        async {
            // Whatever a crashed nexd left at nexd's fixed numbers goes first.
            self.exit_client
                .remove_leftovers(&self.nl, &mut self.sysctls)
                .await;
            crate::routing::remove_leftover_tables();
            self.dataplane
                .remove_leftovers(&self.nl, self.adopt_guard)
                .await;
            if let Err(e) = self.split.clear(&self.nl).await {
                teardown_warning("removing leftover excluded routes", &e);
            }

            self.iface = Some(
                MeshInterface::open(
                    self.opts.wireguard,
                    &self.nl,
                    &self.opts.interface,
                    self.key.clone(),
                )
                .await?,
            );
            // The programs first: loading them is the peak of nexd's memory,
            // and it is lower before a thousand peers are configured.
            self.dataplane.start(&self.nl).await?;
            super::release_freed_memory();
            self.endpoints.refresh(&self.mesh, Instant::now());
            let mesh = self.mesh.clone();
            self.apply_mesh(mesh).await?;
            if let Some(why) = self
                .opts
                .exit_server
                .as_ref()
                .and_then(|_| exit_server::not_allowed(&self.mesh, &self.own))
            {
                // Serving follows the membership: it starts when an
                // update lets this device serve.
                warn!("{why}: not serving as exit node until the membership allows it");
            } else if let Some(role) = &self.opts.exit_server {
                let settings = ExitSettings {
                    uplink: self.opts.uplink.clone(),
                    allow: role.allow.clone(),
                    rate_limit: role.rate_limit,
                    probe_targets: role.probe_targets.clone(),
                };
                let probe = self.probe_wiring();
                self.exit_server = Some(
                    ExitServer::start(
                        &self.nl,
                        &self.opts.interface,
                        settings,
                        &self.mesh,
                        &self.own,
                        &mut self.sysctls,
                        &mut self.dataplane,
                        probe,
                    )
                    .await?,
                );
            }
            self.sync_dataplane().await?;
            self.split.sync(&self.nl).await?;
            if self.exit_client.wanted() {
                info!("exit-node client requested (--exit-node-client): it applies as soon as an exit node is available");
                // The kill switch holds before anything else of nexd's can
                // send: the guard goes on now, not at the first tick.
                self.evaluate_exit().await;
            }
            self.dataplane
                .install_gateway(&mut self.sysctls, self.mesh.mtu)?;
            super::release_freed_memory();
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Moves interface, addresses, peers and announcement sockets to what
    /// `mesh` wants, touching only what differs.
    async fn apply_mesh(&mut self, mesh: Mesh) -> anyhow::Result<()> {
        let iface = self
            .iface
            .as_mut()
            .ok_or_else(|| anyhow!("the WireGuard interface is not up"))?;
        let Some(me) = mesh.device(&self.own) else {
            // Not a member (waiting for approval, or revoked): no peers,
            // no mesh addresses, no announcements.
            let book = self.heartbeats.book();
            iface.set_peers(Vec::new(), &|k| book.name(k).unwrap_or("?").to_owned())?;
            iface.set_addresses(&self.nl, &[]).await?;
            self.heartbeats.leave(&mesh);
            self.mesh = mesh;
            return Ok(());
        };
        let (v4, v6): (IpAddr, IpAddr) = (me.ipv4.into(), me.ipv6.into());
        iface.set_listen_port(me.listen_port)?;
        iface.set_link(&self.nl, mesh.mtu).await?;
        let addrs = reconcile::interface_addresses(&mesh, &self.own)
            .context("this device is not in the mesh file")?;
        iface.set_addresses(&self.nl, &addrs).await?;
        self.heartbeats.sync(&mesh, iface.name(), v4, v6);
        let book = self.heartbeats.book();
        iface.set_peers(
            reconcile::wanted_peers(&mesh, &self.own, self.endpoints.cache()),
            &|k| book.name(k).unwrap_or("?").to_owned(),
        )?;
        self.mesh = mesh;
        Ok(())
    }

    /// The peers' endpoints: as configured, and as WireGuard last saw
    /// them (a roaming peer, a peer that only dials in), sorted.
    fn endpoints(&self) -> Vec<SocketAddr> {
        let mut eps: Vec<SocketAddr> = self
            .iface
            .as_ref()
            .map(MeshInterface::endpoints)
            .unwrap_or_default();
        if let Some(st) = &self.last_status {
            eps.extend(st.peers.iter().filter_map(|p| p.endpoint));
        }
        eps.sort_unstable();
        eps.dedup();
        eps
    }

    /// The data plane mirrors the mesh prefixes, the exclusions, the
    /// peers' endpoints and WireGuard's listen port.
    async fn sync_dataplane(&mut self) -> anyhow::Result<()> {
        let inputs = Inputs {
            mesh_prefixes: vec![
                IpNet::V4(self.mesh.ipv4_prefix),
                IpNet::V6(self.mesh.ipv6_prefix),
            ],
            exclusions: self.split.exclusions().to_vec(),
            endpoints: self.endpoints(),
            listen_port: self.mesh.device(&self.own).map_or(0, |d| d.listen_port),
        };
        self.dataplane.set_inputs(&self.nl, inputs).await
    }

    /// SIGHUP: re-reads the mesh file (not in registry mode) and applies
    /// the difference. A file with errors (or without this device) is
    /// rejected and the running config stays.
    pub async fn reload(&mut self) {
        let Some(mesh) = self.membership.reread(&self.own, &self.mesh) else {
            return;
        };
        self.split.reload();
        self.apply_membership(mesh).await;
    }

    /// Applies a new membership (a reloaded file, the registry's) and what
    /// follows from it: only differences are touched.
    pub(super) async fn apply_membership(&mut self, mesh: Mesh) {
        if let Err(e) = self.apply_mesh(mesh).await {
            log_error_lines("applying the membership failed", &e);
        }
        if let Err(e) = self.sync_dataplane().await {
            log_error_lines("updating the data path failed", &e);
        }
        if let Err(e) = self.split.sync(&self.nl).await {
            log_error_lines("updating the excluded routes failed", &e);
        }
        self.follow_exit_role().await;
        self.endpoints.refresh(&self.mesh, Instant::now());
        // An exit node that left the mesh must not stay in use.
        self.evaluate_exit().await;
    }

    /// Periodic work: refresh the backend's view, send heartbeats,
    /// re-evaluate the exit node, follow the default routes.
    pub async fn tick(&mut self) {
        let now = Instant::now();
        if let Some(iface) = &self.iface {
            match iface.status() {
                Ok(st) => {
                    self.heartbeats.observe(&st, now);
                    self.last_status = Some(st);
                    // A peer roamed: the guard must let WireGuard reach
                    // it where it is now.
                    if self.endpoints() != self.dataplane.endpoints()
                        && let Err(e) = self.sync_dataplane().await
                    {
                        log_error_lines("updating the data path failed", &e);
                    }
                }
                Err(e) => debug!(error = %e, "reading WireGuard status failed"),
            }
        }
        let exit = self.announces_exit();
        self.heartbeats.send_due(exit, self.mesh.agent_port, now);
        self.evaluate_exit().await;
        if self
            .last_route_check
            .is_none_or(|t| now.saturating_duration_since(t) >= ROUTE_CHECK_INTERVAL)
        {
            self.last_route_check = Some(now);
            if let Err(e) = self.split.sync(&self.nl).await {
                debug!(error = %e, "excluded routes not updated");
            }
        }
        if self.endpoints.due(now) {
            self.endpoints.refresh(&self.mesh, now);
        }
    }

    /// The exit node role after a membership change: the clients, their
    /// limits and the table follow; a device the membership no longer lets
    /// serve stops serving (and announcing itself) at once, and starts
    /// again if it is allowed again.
    async fn follow_exit_role(&mut self) {
        let Some(role) = self.opts.exit_server.clone() else {
            return;
        };
        let allowed = exit_server::not_allowed(&self.mesh, &self.own);
        match (self.exit_server.as_mut(), allowed) {
            (Some(server), None) => {
                server
                    .reload(
                        &self.nl,
                        &self.mesh,
                        &self.own,
                        &mut self.sysctls,
                        &mut self.dataplane,
                    )
                    .await;
            }
            (Some(_), Some(why)) => {
                warn!("{why}: no longer serving as exit node");
                if let Some(server) = self.exit_server.take() {
                    server.remove(&mut self.sysctls, &mut self.dataplane).await;
                }
            }
            (None, None) => {
                let settings = ExitSettings {
                    uplink: self.opts.uplink.clone(),
                    allow: role.allow,
                    rate_limit: role.rate_limit,
                    probe_targets: role.probe_targets,
                };
                let probe = self.probe_wiring();
                match ExitServer::start(
                    &self.nl,
                    &self.opts.interface,
                    settings,
                    &self.mesh,
                    &self.own,
                    &mut self.sysctls,
                    &mut self.dataplane,
                    probe,
                )
                .await
                {
                    Ok(s) => self.exit_server = Some(s),
                    Err(e) => log_error_lines("starting to serve as exit node failed", &e),
                }
            }
            (None, Some(_)) => {}
        }
    }

    /// Routes, addresses or links changed: the leak guard goes onto every
    /// interface a default route now leaves through, the uplinks' subnets
    /// in the maps follow, and the excluded routes follow the new gateway;
    /// an exit node's idea of "the internet" follows the host's networks.
    pub async fn on_uplinks_changed(&mut self) {
        let t0 = Instant::now();
        if let Err(e) = self.dataplane.sync(&self.nl).await {
            log_error_lines("following the uplinks failed", &e);
        }
        if let Some(server) = &mut self.exit_server
            && server
                .refresh_host(
                    &self.nl,
                    &self.mesh,
                    &self.own,
                    &mut self.sysctls,
                    &mut self.dataplane,
                )
                .await
        {
            self.tell_peers_now();
        }
        if let Err(e) = self.split.sync(&self.nl).await {
            debug!(error = %e, "excluded routes not updated");
        }
        debug!(elapsed = ?t0.elapsed(), "uplinks re-evaluated");
    }

    /// The exit capability was just withdrawn: every peer hears it now,
    /// not at its next heartbeat (clients that do not probe this exit
    /// node learn it at once too).
    fn tell_peers_now(&mut self) {
        self.heartbeats.send_now();
        let now = Instant::now();
        self.heartbeats
            .send_due(self.announces_exit(), self.mesh.agent_port, now);
    }

    /// The wiring of a new exit probe task.
    fn probe_wiring(&mut self) -> ProbeWiring {
        self.exit_probe_tasks += 1;
        ProbeWiring {
            results: self.exit_probes.clone(),
            id: self.exit_probe_tasks,
        }
    }

    /// A round of the exit node's probes (`--exit-probe-target`): the
    /// same withdrawal as a lost default route.
    pub fn on_exit_probe(&mut self, round: exit_probe::Round) {
        if let Some(server) = &mut self.exit_server
            && server.on_probe_round(round)
        {
            self.tell_peers_now();
        }
    }

    /// One datagram from the announcement sockets.
    pub async fn on_announcement(&mut self, inc: Incoming) {
        let now = Instant::now();
        let heard = self.heartbeats.receive(&inc, now);
        if let Some(prober) = heard.wants_answer {
            self.heartbeats
                .answer(&prober, self.announces_exit(), self.mesh.agent_port, now);
        }
        if heard.exit_changed {
            self.evaluate_exit().await;
        }
    }

    /// Whether this device tells its peers it serves as exit node now.
    fn announces_exit(&self) -> bool {
        self.exit_server
            .as_ref()
            .is_some_and(|s| s.announces(Instant::now()))
    }

    /// Whether this device probes exit nodes: an exit-node client with
    /// probes on (an exit node uses none).
    fn probes_wanted(&self) -> bool {
        self.exit_server.is_none() && self.opts.exit_probes && self.exit_client.wanted()
    }

    /// Whether the loop should run `probe_tick`: while probes are wanted,
    /// and once more after, to stop watching the targets. Every other
    /// device (exit nodes, plain peers: most of a mesh) skips the 100 ms
    /// wake-ups altogether.
    pub fn probe_tick_due(&self) -> bool {
        self.probes_wanted() || self.heartbeats.probing()
    }

    /// Every `exit::PROBE_INTERVAL`: the exit-node client probes the exit
    /// node in use and the next one, and re-evaluates, so a dead exit node
    /// is left within its probe deadline rather than at the next tick.
    pub async fn probe_tick(&mut self) {
        let now = Instant::now();
        let targets = if self.probes_wanted() {
            self.exit_client.probe_targets(
                &Candidates {
                    book: self.heartbeats.book(),
                    mesh: &self.mesh,
                    own: &self.own,
                },
                now,
            )
        } else {
            Vec::new()
        };
        self.heartbeats.probe(&targets, self.mesh.agent_port, now);
        if !targets.is_empty() {
            self.evaluate_exit().await;
        }
    }

    /// When the exit node in use goes stale unless heard from again (see
    /// `ExitClient::stale_at`): the loop re-evaluates then.
    pub fn exit_stale_at(&self) -> Option<Instant> {
        if self.exit_server.is_some() {
            return None;
        }
        self.exit_client.stale_at(
            &Candidates {
                book: self.heartbeats.book(),
                mesh: &self.mesh,
                own: &self.own,
            },
            Instant::now(),
        )
    }

    /// A round of endpoint lookups: only peers whose address changed are
    /// reconfigured.
    pub async fn on_resolved(&mut self, resolved: Resolved) {
        if !self.endpoints.absorb(&self.mesh, resolved) {
            return;
        }
        let Some(iface) = self.iface.as_mut() else {
            return;
        };
        let book = self.heartbeats.book();
        if let Err(e) = iface.set_peers(
            reconcile::wanted_peers(&self.mesh, &self.own, self.endpoints.cache()),
            &|k| book.name(k).unwrap_or("?").to_owned(),
        ) {
            log_error_lines("updating peer endpoints failed", &e);
        }
        if let Err(e) = self.sync_dataplane().await {
            log_error_lines("updating the data path failed", &e);
        }
    }

    /// The exit-node client follows the announcements (an exit node does
    /// not use another one).
    pub(super) async fn evaluate_exit(&mut self) {
        if self.exit_server.is_some() {
            return;
        }
        if let Some((client, candidates, mut fx)) = self.exit_parts() {
            client.evaluate(&candidates, &mut fx).await;
        }
    }

    /// The exit client with what it chooses from and what its plans act
    /// on, or `None` before the interface exists.
    pub(super) fn exit_parts(&mut self) -> Option<(&mut ExitClient, Candidates<'_>, Effects<'_>)> {
        let iface = self.iface.as_mut()?;
        let book = self.heartbeats.book();
        Some((
            &mut self.exit_client,
            Candidates {
                book,
                mesh: &self.mesh,
                own: &self.own,
            },
            Effects {
                nl: &self.nl,
                iface,
                dataplane: &mut self.dataplane,
                sysctls: &mut self.sysctls,
                book,
                mesh: &self.mesh,
            },
        ))
    }

    /// Removes everything nexd installed, in reverse order. Never fails:
    /// each step logs its own problem and the next step still runs.
    pub async fn teardown(&mut self) {
        self.membership.shutdown().await;
        if let Some((client, _, mut fx)) = self.exit_parts() {
            client.teardown(&mut fx).await;
        }
        if let Some(server) = self.exit_server.take() {
            server.remove(&mut self.sysctls, &mut self.dataplane).await;
        }
        self.heartbeats.close();
        self.dataplane.remove(&mut self.sysctls);
        if let Err(e) = self.split.clear(&self.nl).await {
            teardown_warning("removing the excluded routes", &e);
        }
        self.sysctls.restore_all();
        if let Some(iface) = self.iface.take() {
            iface.remove(&self.nl).await;
        }
        // Everything is gone: nothing is left for a successor to adopt.
        ledger::remove(&self.opts.state_dir);
    }
}
