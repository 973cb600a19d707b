//! The daemon: the components, each the owner of its state and its kernel
//! objects, and the wiring between them. Nothing here reaches into a
//! component's fields; every change goes through the owner's methods, and
//! the inputs one component needs from another are passed as arguments.
//! This file is the only `impl Daemon`.
//!
//! | component | owns |
//! |---|---|
//! | `Host` | the netlink handle, the sysctls changed, the programs (below) |
//! | `Programs` | the eBPF programs, their maps and attachments (guard included) |
//! | `LanGateway` | the LAN gateway's nftables table and forwarding |
//! | `MeshInterface` | the WireGuard device, link, addresses, applied peers |
//! | `Endpoints` | the resolver task and the cache of resolved names |
//! | `Heartbeats` | the announcement sockets and the peer book |
//! | `ExitClient` | wanted, phase, failovers; runs its plans through `ClientSteps` |
//! | `ExitRole` | the exit node role: its settings and, while serving, `ExitServer` |
//! | `SplitTunnel` | the exclusions and the excluded-routes table |
//! | `Membership` | where the mesh comes from: the file, or the registry |
//! | `Record` | the record of what is installed, in the state directory |

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use ipnet::IpNet;
use tokio::sync::mpsc;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{
    answers, client_steps,
    client_steps::ClientSteps,
    endpoints::{Endpoints, Resolved},
    exit_client::{Candidates, EnableError, ExitClient},
    exit_probe,
    exit_role::ExitRole,
    heartbeats::Heartbeats,
    host::Host,
    interface::MeshInterface,
    lan_gateway::LanGateway,
    ledger_record::{self, Record},
    membership::{Change, Membership},
    metrics,
    programs::{Inputs, Programs},
    reconcile,
    report::{log_error_lines, teardown_warning},
    settings::{InterfaceSettings, Settings},
    split_tunnel::SplitTunnel,
    view::View,
};
use crate::{
    announce::Incoming,
    control::protocol::{ErrorCode, Method, Reply, Response},
    exit::plan::Dns,
    keys::{PrivateKey, PublicKey},
    mesh::Mesh,
    netlink::Netlink,
    registry::MembershipEvent,
    routing::{policy::ClientRouting, sysctl::Sysctls},
};

/// How often the default routes are checked for the excluded routes.
const ROUTE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

pub struct Daemon {
    own: PublicKey,
    key: PrivateKey,
    /// The membership in force.
    mesh: Mesh,
    started: Instant,
    host: Host,
    interface: InterfaceSettings,
    /// `None` until start-up created it (teardown copes with either).
    iface: Option<MeshInterface>,
    endpoints: Endpoints,
    heartbeats: Heartbeats,
    exit_client: ExitClient,
    exit_role: ExitRole,
    lan_gateway: LanGateway,
    split: SplitTunnel,
    last_route_check: Option<Instant>,
    /// Where the mesh comes from (file or registry), and the registry's
    /// device side.
    membership: Membership,
    record: Record,
    /// A previous nexd's kill switch holds: its guard is taken over, not
    /// removed.
    adopt_guard: bool,
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
        settings: Settings,
        key: PrivateKey,
        nl: Netlink,
        mut membership: Membership,
        split: SplitTunnel,
        channels: Channels,
        epoch: u32,
    ) -> Self {
        let mesh = membership.first();
        let own = key.public_key();
        let now = Instant::now();
        let record = Record::new(settings.record);
        // What a previous nexd left: if it wanted exit mode (by flag or by
        // nexctl) and the kill switch still holds, exit mode resumes and
        // the guard it pinned stays in force, taken over in place.
        let previous = record.previous();
        if previous.resume_exit && !settings.client.wanted {
            warn!(
                pid = previous.pid,
                "a previous nexd stopped without cleaning up while exit mode was enabled: resuming exit mode, the kill switch holds"
            );
        }
        let wanted = settings.client.wanted || previous.resume_exit;
        let exit_client = ExitClient::new(&settings.client, wanted, now);
        let mut programs = Programs::new(settings.programs);
        programs.inherit_clsact(previous.clsact_interfaces);
        let heartbeats = Heartbeats::new(key.clone(), epoch, &mesh, channels.announcements);
        Daemon {
            own,
            key,
            mesh,
            started: now,
            host: Host {
                nl,
                sysctls: Sysctls::open(&settings.state_dir),
                programs,
            },
            interface: settings.interface,
            iface: None,
            endpoints: Endpoints::start(channels.resolved),
            heartbeats,
            adopt_guard: wanted && exit_client.policy().kill_switch,
            exit_client,
            exit_role: ExitRole::new(settings.exit, own, channels.exit_probes),
            lan_gateway: LanGateway::new(settings.gateway),
            split,
            last_route_check: None,
            membership,
            record,
        }
    }

    /// Rewrites the record of what is installed in the state directory
    /// when it changed. Called after every event.
    pub fn record(&mut self) {
        let programs = &self.host.programs;
        let mut nft_tables = self.exit_role.nft_tables();
        nft_tables.extend(self.lan_gateway.nft_tables());
        nft_tables.extend(programs.nft_tables());
        nft_tables.extend(self.exit_client.nft_tables());
        self.record.write(ledger_record::Installed {
            exit_wanted: self.exit_client.wanted(),
            guard_interfaces: programs.info(0).guard_interfaces,
            clsact_interfaces: programs.clsact_interfaces(),
            nft_tables,
        });
    }

    /// Removes what a crashed nexd left, creates the interface, applies the
    /// mesh, sets up the exit node role and the data path.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let span = info_span!("start", iface = %self.interface.name);
        async {
            // Whatever a crashed nexd left at nexd's fixed numbers goes first.
            client_steps::remove_leftovers(self.exit_client.numbers(), &mut self.host).await;
            // A previous nexd's kill switch that still holds keeps its
            // table until this nexd's guard replaces it; a gateway's table
            // stays until it is rewritten (in one transaction) just below:
            // a tunnel a crashed nexd left (kernel WireGuard keeps its
            // peers) never forwards into the LAN in between.
            let mut keep = Vec::new();
            if self.adopt_guard {
                keep.push(crate::routing::kill_switch::NFT_TABLE);
            }
            if self.lan_gateway.configured() {
                keep.push(crate::routing::gateway::NFT_TABLE);
            }
            crate::routing::remove_leftover_tables(&keep);
            // Before the tunnel has a peer: a host that forwards of its
            // own would otherwise forward a member into the LAN.
            self.lan_gateway.close_tunnel()?;
            let host = &mut self.host;
            host.programs
                .remove_leftovers(&host.nl, self.adopt_guard)
                .await;
            if let Err(e) = self.split.clear(&host.nl).await {
                teardown_warning("removing leftover excluded routes", &e);
            }

            self.iface = Some(
                MeshInterface::open(
                    self.interface.backend,
                    &host.nl,
                    &self.interface.name,
                    self.key.clone(),
                )
                .await?,
            );
            // The programs first: loading them is the peak of nexd's memory,
            // and it is lower before a thousand peers are configured.
            host.programs.start(&host.nl).await?;
            release_freed_memory();
            self.endpoints.refresh(&self.mesh, Instant::now());
            let mesh = self.mesh.clone();
            self.apply_mesh(mesh).await?;
            self.exit_role.follow(&mut self.host, &self.mesh).await?;
            self.sync_programs().await?;
            self.split.sync(&self.host.nl).await?;
            if self.exit_client.wanted() {
                info!("exit-node client requested (--exit-node-client): it applies as soon as an exit node is available");
                // The kill switch holds before anything else of nexd's can
                // send: the guard goes on now, not at the first tick.
                self.evaluate_exit().await;
            }
            self.lan_gateway.install(&mut self.host, self.mesh.mtu)?;
            release_freed_memory();
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
        let nl = &self.host.nl;
        let Some(me) = mesh.device(&self.own) else {
            // Not a member (waiting for approval, or revoked): no peers,
            // no mesh addresses, no announcements.
            let book = self.heartbeats.book();
            iface.set_peers(Vec::new(), &|k| book.name(k).unwrap_or("?").to_owned())?;
            iface.set_member_routes(nl, &[], &[]).await?;
            iface.set_addresses(nl, &[]).await?;
            self.heartbeats.leave(&mesh);
            self.mesh = mesh;
            return Ok(());
        };
        let (v4, v6): (IpAddr, IpAddr) = (me.ipv4.into(), me.ipv6.into());
        iface.set_listen_port(me.listen_port)?;
        iface.set_link(nl, mesh.mtu).await?;
        let addrs = reconcile::interface_addresses(&mesh, &self.own)
            .context("this device is not in the mesh file")?;
        iface.set_addresses(nl, &addrs).await?;
        iface
            .set_member_routes(
                nl,
                &reconcile::member_routes(&mesh),
                &[IpNet::V4(mesh.ipv4_prefix), IpNet::V6(mesh.ipv6_prefix)],
            )
            .await?;
        self.heartbeats.sync(&mesh, iface.name(), v4, v6);
        let book = self.heartbeats.book();
        iface.set_peers(
            reconcile::wanted_peers(&mesh, &self.own, self.endpoints.cache()),
            &|k| book.name(k).unwrap_or("?").to_owned(),
        )?;
        self.mesh = mesh;
        Ok(())
    }

    /// The programs' maps mirror the mesh prefixes, the exclusions, the
    /// peers' endpoints and WireGuard's listen port.
    async fn sync_programs(&mut self) -> anyhow::Result<()> {
        let inputs = Inputs {
            mesh_prefixes: vec![
                IpNet::V4(self.mesh.ipv4_prefix),
                IpNet::V6(self.mesh.ipv6_prefix),
            ],
            exclusions: self.split.exclusions().to_vec(),
            endpoints: self
                .iface
                .as_ref()
                .map(MeshInterface::endpoints_in_use)
                .unwrap_or_default(),
            listen_port: self.mesh.device(&self.own).map_or(0, |d| d.listen_port),
        };
        let host = &mut self.host;
        host.programs.set_inputs(&host.nl, inputs).await
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
        release_freed_memory();
    }

    /// One event of the registry.
    pub async fn on_membership(&mut self, event: MembershipEvent) {
        if let Change::Apply(mesh) = self.membership.take(event, &self.own, &self.mesh) {
            self.apply_membership(mesh).await;
            release_freed_memory();
        }
    }

    /// Applies a new membership (a reloaded file, the registry's) and what
    /// follows from it: only differences are touched.
    async fn apply_membership(&mut self, mesh: Mesh) {
        if let Err(e) = self.apply_mesh(mesh).await {
            log_error_lines("applying the membership failed", &e);
        }
        self.refresh_dns_redirect();
        if let Err(e) = self.sync_programs().await {
            log_error_lines("updating the data path failed", &e);
        }
        if let Err(e) = self.split.sync(&self.host.nl).await {
            log_error_lines("updating the excluded routes failed", &e);
        }
        if let Err(e) = self.exit_role.follow(&mut self.host, &self.mesh).await {
            log_error_lines("starting to serve as exit node failed", &e);
        }
        self.endpoints.refresh(&self.mesh, Instant::now());
        // An exit node that left the mesh must not stay in use.
        self.evaluate_exit().await;
    }

    /// Periodic work: refresh the backend's view, send heartbeats,
    /// re-evaluate the exit node, follow the default routes.
    pub async fn tick(&mut self) {
        let now = Instant::now();
        if let Some(iface) = &mut self.iface {
            match iface.refresh_status() {
                Ok(st) => {
                    self.heartbeats.observe(st, now);
                    // A peer roamed: the guard must let WireGuard reach
                    // it where it is now.
                    if iface.endpoints_in_use() != self.host.programs.endpoints()
                        && let Err(e) = self.sync_programs().await
                    {
                        log_error_lines("updating the data path failed", &e);
                    }
                }
                Err(e) => debug!(error = %e, "reading WireGuard status failed"),
            }
        }
        let clients = self.heartbeats.book().clients_using(now);
        if let Some(load) = self
            .exit_role
            .load_report(&self.host, &self.mesh, clients, now)
        {
            self.heartbeats.set_load(load);
        }
        let exit = self.exit_role.announces(now);
        self.heartbeats.send_due(exit, self.mesh.agent_port, now);
        self.evaluate_exit().await;
        if self
            .last_route_check
            .is_none_or(|t| now.saturating_duration_since(t) >= ROUTE_CHECK_INTERVAL)
        {
            self.last_route_check = Some(now);
            if let Err(e) = self.split.sync(&self.host.nl).await {
                debug!(error = %e, "excluded routes not updated");
            }
        }
        if self.endpoints.due(now) {
            self.endpoints.refresh(&self.mesh, now);
        }
    }

    /// Routes, addresses or links changed: the leak guard goes onto every
    /// interface a default route now leaves through, the uplinks' subnets
    /// in the maps follow, and the excluded routes follow the new gateway;
    /// an exit node's idea of "the internet" follows the host's networks.
    pub async fn on_uplinks_changed(&mut self) {
        let t0 = Instant::now();
        let host = &mut self.host;
        if let Err(e) = host.programs.sync(&host.nl).await {
            log_error_lines("following the uplinks failed", &e);
        }
        if self.exit_role.on_host_changed(host, &self.mesh).await {
            self.tell_peers_now();
        }
        self.verify_exit_client().await;
        if let Err(e) = self.split.sync(&self.host.nl).await {
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
            .send_due(self.exit_role.announces(now), self.mesh.agent_port, now);
    }

    /// A round of the exit node's probes (`--exit-probe-target`): the
    /// same withdrawal as a lost default route.
    pub fn on_exit_probe(&mut self, round: exit_probe::Round) {
        if self.exit_role.on_probe_round(round) {
            self.tell_peers_now();
        }
    }

    /// One datagram from the announcement sockets.
    pub async fn on_announcement(&mut self, inc: Incoming) {
        let now = Instant::now();
        let heard = self.heartbeats.receive(&inc, now);
        if let Some(prober) = heard.wants_answer {
            self.heartbeats.answer(
                &prober,
                self.exit_role.announces(now),
                self.mesh.agent_port,
                now,
            );
        }
        if heard.exit_changed {
            self.evaluate_exit().await;
        }
    }

    /// Whether this device probes exit nodes: an exit-node client with
    /// probes on (an exit node uses none).
    fn probes_wanted(&self) -> bool {
        !self.exit_role.serving() && self.exit_client.probes_wanted()
    }

    /// Whether the loop should run `probe_tick`: while probes are wanted,
    /// and once more after, to stop watching the targets. Every other
    /// device (exit nodes, plain peers: most of a mesh) skips the 100 ms
    /// wake-ups altogether.
    pub fn probe_tick_due(&self) -> bool {
        self.probes_wanted() || self.heartbeats.probing()
    }

    fn candidates(&self) -> Candidates<'_> {
        Candidates {
            book: self.heartbeats.book(),
            mesh: &self.mesh,
            own: &self.own,
        }
    }

    /// Every `exit::PROBE_INTERVAL`: the exit-node client probes the exit
    /// node in use and the next one, and re-evaluates, so a dead exit node
    /// is left within its probe deadline rather than at the next tick.
    pub async fn probe_tick(&mut self) {
        let now = Instant::now();
        let targets = if self.probes_wanted() {
            self.exit_client.probe_targets(&self.candidates(), now)
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
        if self.exit_role.serving() {
            return None;
        }
        self.exit_client
            .stale_at(&self.candidates(), Instant::now())
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
        if let Err(e) = self.sync_programs().await {
            log_error_lines("updating the data path failed", &e);
        }
    }

    /// The exit client with what it chooses from and the steps its plans
    /// run on, or `None` before the interface exists.
    fn exit_parts(&mut self) -> Option<(&mut ExitClient, Candidates<'_>, ClientSteps<'_>)> {
        let iface = self.iface.as_mut()?;
        let book = self.heartbeats.book();
        let client = &mut self.exit_client;
        let steps = ClientSteps {
            host: &mut self.host,
            iface,
            routing: ClientRouting::new(client.numbers()),
            mesh: &self.mesh,
            book,
            kill_switch: client.policy().kill_switch,
        };
        let candidates = Candidates {
            book,
            mesh: &self.mesh,
            own: &self.own,
        };
        Some((client, candidates, steps))
    }

    /// The kernel changed routes, rules, addresses or links: what it
    /// removed of the exit client's routing (the interface's last address
    /// takes the tunnel's route with it) is put back now.
    async fn verify_exit_client(&mut self) {
        let Some((client, _, steps)) = self.exit_parts() else {
            return;
        };
        if !client.routing_installed() {
            return;
        }
        let missing = match steps.present().await {
            Ok(present) => client.observe(present),
            Err(e) => {
                debug!(error = %crate::error_text(&e), "reading the exit-node client's routing failed");
                false
            }
        };
        if missing {
            self.evaluate_exit().await;
        }
    }

    /// The DNS redirect leaves queries to the members' addresses alone,
    /// so it follows the members: one that left must not keep an address
    /// the redirect skips (routed to the uplink now, its queries would go
    /// direct).
    fn refresh_dns_redirect(&mut self) {
        let dns = self.exit_client.installed_dns();
        if dns == Dns::Off {
            return;
        }
        if let Some((_, _, steps)) = self.exit_parts()
            && let Err(e) = steps.refresh_dns(dns)
        {
            log_error_lines("updating the DNS redirect for the members failed", &e);
        }
    }

    /// The exit-node client follows the announcements (an exit node does
    /// not use another one).
    pub async fn evaluate_exit(&mut self) {
        if self.exit_role.serving() {
            return;
        }
        if let Some((client, candidates, mut steps)) = self.exit_parts() {
            client
                .evaluate(&candidates, &mut steps, Instant::now())
                .await;
        }
        self.announce_exit_in_use();
    }

    /// The announcements to the exit node in use say so, so it counts
    /// this device among its clients.
    fn announce_exit_in_use(&mut self) {
        let exit = self.exit_client.phase().exit_peer();
        self.heartbeats.set_exit_in_use(exit);
    }

    fn view(&self) -> View<'_> {
        View {
            own: &self.own,
            mesh: &self.mesh,
            iface: self.iface.as_ref(),
            heartbeats: &self.heartbeats,
            exit_client: &self.exit_client,
            exit_role: &self.exit_role,
            split: &self.split,
            host: &self.host,
            membership: &self.membership,
            started: self.started,
        }
    }

    /// Answers one control request.
    pub async fn answer(&mut self, method: Method) -> Response {
        match method {
            Method::Version => answers::version(),
            Method::Status => answers::status(&self.view()),
            Method::PeersList => answers::peers(&self.view()),
            Method::Stats => answers::stats(&self.view()),
            Method::ExitNodeList => answers::exit_nodes(&self.view(), Instant::now()),
            Method::ExitNodeClients => answers::exit_clients(&self.view()),
            Method::ExitNodeEnable => self.exit_enable().await,
            Method::ExitNodeDisable => self.exit_disable().await,
            Method::Metrics => Response::ok(Reply::Metrics {
                text: metrics::text(&self.view()),
            }),
        }
    }

    /// `nexctl nexd exit-node enable`.
    async fn exit_enable(&mut self) -> Response {
        if self.exit_role.serving() {
            return Response::error(
                ErrorCode::Unavailable,
                "this device is an exit node (nexd router --exit-node); it cannot also be an exit-node client",
            );
        }
        let unavailable = answers::unavailable(&self.view());
        let Some((client, candidates, mut steps)) = self.exit_parts() else {
            return Response::error(ErrorCode::Internal, "the WireGuard interface is not up");
        };
        match client.enable(&candidates, &mut steps, Instant::now()).await {
            Ok(()) => Response::ok(Reply::Done {
                message: answers::ENABLED.into(),
            }),
            Err(EnableError::Unavailable) => Response::error(ErrorCode::Unavailable, unavailable),
            Err(EnableError::Failed(e)) => Response::error(
                ErrorCode::Internal,
                format!("enabling the exit node client failed: {e}"),
            ),
        }
    }

    /// `nexctl nexd exit-node disable`.
    async fn exit_disable(&mut self) -> Response {
        let Some((client, candidates, mut steps)) = self.exit_parts() else {
            return Response::error(ErrorCode::Internal, "the WireGuard interface is not up");
        };
        match client
            .disable(&mut steps, candidates.book, Instant::now())
            .await
        {
            Ok(()) => Response::ok(Reply::Done {
                message: answers::DISABLED.into(),
            }),
            Err(e) => Response::error(
                ErrorCode::Internal,
                format!("disabling the exit node client failed: {e}"),
            ),
        }
    }

    /// Removes everything nexd installed, in reverse order. Never fails:
    /// each step logs its own problem and the next step still runs.
    pub async fn teardown(&mut self) {
        self.membership.shutdown().await;
        if let Some((client, _, mut steps)) = self.exit_parts() {
            client.teardown(&mut steps).await;
        }
        self.exit_role.remove(&mut self.host).await;
        self.heartbeats.close();
        let host = &mut self.host;
        host.programs.remove();
        if let Err(e) = self.split.clear(&host.nl).await {
            teardown_warning("removing the excluded routes", &e);
        }
        host.sysctls.restore_all();
        if let Some(iface) = self.iface.take() {
            iface.remove(&host.nl).await;
        }
        // After the tunnel: a host that forwards of its own would
        // otherwise forward a member into the LAN until it is gone.
        self.lan_gateway.remove(&mut host.sysctls);
        // Everything is gone: nothing is left for a successor to adopt.
        self.record.remove();
    }
}

/// Hands memory freed after a burst (loading the eBPF object, a large
/// mesh) back to the system: glibc keeps freed heap for reuse, which made
/// nexd's steady RSS most of its peak.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; it takes no
    // pointer and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
