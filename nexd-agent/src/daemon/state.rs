//! The daemon's state and the reconcile step that moves the kernel to it.
//!
//! Each kernel object nexd creates is recorded here when installed and
//! removed by `teardown`, which copes with a partial start-up.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ipnet::IpNet;
use tokio::sync::mpsc;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{Options, log_error_lines, reconcile, teardown_warning};
use crate::{
    announce::{Announcer, Incoming, book::PeerBook, wire},
    datapath::Datapath,
    exit::Phase,
    keys::{PrivateKey, PublicKey},
    mesh::{self, Endpoint, Host, Mesh},
    netif,
    netlink::Netlink,
    routing::{
        exclusions::ExcludedRoutes,
        forward::{self, ExitForwarding, Uplinks},
        gateway::Gateway,
        policy::ClientRouting,
        sysctl::Sysctls,
        uplink::{self, DefaultRoute},
    },
    wireguard::{self, DeviceConfig, DeviceStatus, PeerConfig, WireGuard},
};

/// How long a DNS lookup of a peer endpoint may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a userspace device's TUN link may take to disappear on stop.
const LINK_GONE_TIMEOUT: Duration = Duration::from_secs(2);
/// Interval of the heartbeats to every peer.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the default routes are checked for the excluded routes.
const ROUTE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Everything the daemon owns.
pub struct Daemon {
    pub(super) opts: Options,
    pub(super) key: PrivateKey,
    pub(super) own: PublicKey,
    pub(super) nl: Netlink,
    pub(super) mesh: Mesh,
    pub(super) wg: Option<Box<dyn WireGuard>>,
    pub(super) link_index: Option<u32>,
    /// Addresses nexd put on the interface.
    pub(super) addresses: Vec<IpNet>,
    /// Peer configs as last applied to the backend.
    pub(super) applied: BTreeMap<PublicKey, PeerConfig>,
    pub(super) datapath: Result<Datapath, String>,
    pub(super) started: Instant,
    /// What nexd knows from its peers' announcements.
    pub(super) book: PeerBook,
    pub(super) announcer: Option<Announcer>,
    /// A receiver for a freshly bound announcer, for the event loop to pick up.
    pub(super) new_incoming: Option<mpsc::Receiver<Incoming>>,
    last_announce: Option<Instant>,
    /// The backend's view, refreshed every tick.
    pub(super) last_status: Option<DeviceStatus>,
    pub(super) sysctls: Sysctls,
    /// Exit-node client: wanted (flag or nexctl), its phase, its routing.
    pub(super) exit_wanted: bool,
    pub(super) phase: Phase,
    pub(super) client: ClientRouting,
    /// Exit node: the forwarding it installed.
    pub(super) forwarding: Option<ExitForwarding>,
    /// LAN gateway: the masquerade into the tunnel it installed.
    pub(super) gateway: Option<Gateway>,
    /// Excluded prefixes (split tunnelling), merged from flags and file.
    pub(super) exclusions: Vec<IpNet>,
    /// The excluded-routes table (device's own traffic).
    pub(super) excluded_routes: ExcludedRoutes,
    /// The default routes the excluded routes were installed via.
    pub(super) default_routes: (Option<DefaultRoute>, Option<DefaultRoute>),
    last_route_check: Option<Instant>,
    /// Times the client moved to another exit node: the one in use went
    /// away, or another was clearly faster for long enough.
    pub(super) failovers: u64,
    /// When the active exit node became active: a faster one may replace
    /// it only after `exit::SWITCH_DWELL`.
    pub(super) exit_since: std::time::Instant,
}

impl Daemon {
    pub fn new(
        opts: Options,
        key: PrivateKey,
        nl: Netlink,
        mesh: Mesh,
        exclusions: Vec<IpNet>,
    ) -> Self {
        let own = key.public_key();
        let now = Instant::now();
        let mut book = PeerBook::new(key.clone(), now);
        book.sync(&mesh);
        let sysctls = Sysctls::open(&opts.state_dir);
        let client = ClientRouting::new(opts.policy);
        let excluded_routes = ExcludedRoutes::new(opts.policy.exclusion_table());
        let exit_wanted = opts.exit_node_client;
        Daemon {
            opts,
            key,
            own,
            nl,
            mesh,
            wg: None,
            link_index: None,
            addresses: Vec::new(),
            applied: BTreeMap::new(),
            datapath: Err("not attached yet".into()),
            started: now,
            book,
            announcer: None,
            new_incoming: None,
            last_announce: None,
            last_status: None,
            sysctls,
            exit_wanted,
            phase: Phase::Off,
            client,
            forwarding: None,
            gateway: None,
            exclusions,
            excluded_routes,
            default_routes: (None, None),
            last_route_check: None,
            failovers: 0,
            exit_since: std::time::Instant::now(),
        }
    }

    /// Creates the interface, applies the mesh, sets up the exit node role,
    /// attaches the data path.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let iface = self.opts.interface.clone();
        let span = info_span!("start", iface = %iface);
        async {
            // Whatever a crashed nexd left at nexd's fixed numbers goes first.
            if let Err(e) = self.client.remove(&self.nl, &mut self.sysctls).await {
                warn!(error = %e, "removing leftover exit-node client routing failed");
            }
            forward::remove_table();
            self.remove_datapath_leftovers().await;

            let wg = wireguard::open(self.opts.wireguard, &self.nl, &iface).await?;
            self.wg = Some(wg);
            self.link_index = Some(
                self.nl
                    .link_index(&iface)
                    .await?
                    .with_context(|| format!("interface {iface} vanished right after it was created"))?,
            );
            self.adopt_existing().await?;
            let mesh = self.mesh.clone();
            self.apply(&mesh).await?;
            if self.opts.exit_server.is_some() {
                let uplink = self.opts.uplink.clone();
                self.start_exit_node(uplink.as_deref()).await?;
            }
            self.start_datapath().await?;
            self.sync_datapath().await?;
            self.sync_excluded_routes().await?;
            if self.exit_wanted {
                info!("exit-node client requested (--exit-node-client): it applies as soon as an exit node is available");
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Takes what an adopted interface already has (a kernel link left by a
    /// crashed nexd) as the applied state, so the first reconcile removes
    /// what is no longer wanted instead of leaving it: stale addresses and
    /// peers. Every live peer is recorded with a config no wanted one
    /// equals, so each is rewritten once (in place, on the kernel backend).
    async fn adopt_existing(&mut self) -> anyhow::Result<()> {
        let (Some(wg), Some(index)) = (self.wg.as_ref(), self.link_index) else {
            return Ok(());
        };
        self.addresses = netif::addresses(&self.nl, index).await?;
        let live = wg.status()?;
        for p in live.peers {
            self.applied.insert(
                p.public_key,
                PeerConfig {
                    public_key: p.public_key,
                    endpoint: p.endpoint,
                    allowed_ips: p.allowed_ips,
                    // No wanted config has this: forces one rewrite.
                    persistent_keepalive: u16::MAX,
                },
            );
        }
        if !self.applied.is_empty() || !self.addresses.is_empty() {
            info!(
                peers = self.applied.len(),
                addresses = self.addresses.len(),
                "adopting the existing interface's state; the reconcile replaces it"
            );
        }
        Ok(())
    }

    async fn start_exit_node(&mut self, uplink_override: Option<&str>) -> anyhow::Result<()> {
        let uplinks = match uplink_override {
            Some(u) => {
                if self.nl.link_index(u).await?.is_none() {
                    anyhow::bail!("--uplink {u}: no such interface");
                }
                Uplinks {
                    v4: Some(u.to_owned()),
                    v6: Some(u.to_owned()),
                }
            }
            None => {
                let (v4, v6) = uplink::default_route_interfaces(&self.nl).await?;
                if v4.is_none() {
                    warn!("no IPv4 default route: this exit node will not forward IPv4");
                }
                if v6.is_none() {
                    warn!("no IPv6 default route: this exit node will not forward IPv6");
                }
                Uplinks { v4, v6 }
            }
        };
        let fw = ExitForwarding::install(
            &self.opts.interface,
            uplinks,
            self.mesh.ipv4_prefix,
            self.mesh.ipv6_prefix,
            &mut self.sysctls,
        )
        .context("setting up the exit node")?;
        self.forwarding = Some(fw);
        info!("serving as exit node: advertising 0.0.0.0/0 and ::/0 to the mesh");
        Ok(())
    }

    /// Re-reads the mesh file and applies the difference. A file with errors
    /// (or without this device) is rejected and the running config stays.
    pub async fn reload(&mut self) {
        let mesh = match mesh::read(&self.opts.mesh_file) {
            Ok(m) => m,
            Err(e) => {
                log_error_lines("mesh file rejected, keeping the running config", &e);
                return;
            }
        };
        if mesh.device(&self.own).is_none() {
            warn!(
                public_key = %self.own,
                "mesh file rejected, keeping the running config: it no longer lists this device"
            );
            return;
        }
        self.book.sync(&mesh);
        self.reload_exclusions().await;
        if let Err(e) = self.apply(&mesh).await {
            log_error_lines("applying the reloaded mesh file failed", &e);
        }
        if let Err(e) = self.sync_excluded_routes().await {
            log_error_lines("updating the excluded routes failed", &e);
        }
        if let Some(fw) = &self.forwarding {
            let uplinks = fw.uplinks.clone();
            match ExitForwarding::install(
                &self.opts.interface,
                uplinks,
                mesh.ipv4_prefix,
                mesh.ipv6_prefix,
                &mut self.sysctls,
            ) {
                Ok(fw) => self.forwarding = Some(fw),
                Err(e) => warn!(error = %e, "updating exit node forwarding failed"),
            }
        }
        // An exit node that left the mesh must not stay in use.
        self.evaluate_exit().await;
    }

    /// Periodic work: refresh the backend's view, send heartbeats, and
    /// re-evaluate the exit node.
    pub async fn tick(&mut self) {
        let now = Instant::now();
        if let Some(wg) = &self.wg {
            match wg.status() {
                Ok(st) => {
                    for p in &st.peers {
                        self.book
                            .observe_handshake(&p.public_key, p.last_handshake, now);
                    }
                    self.last_status = Some(st);
                }
                Err(e) => debug!(error = %e, "reading WireGuard status failed"),
            }
        }
        if self
            .last_announce
            .is_none_or(|t| now.saturating_duration_since(t) >= ANNOUNCE_INTERVAL)
        {
            self.announce(now);
        }
        self.evaluate_exit().await;
        // Follow default route changes (DHCP, roaming) for the excluded
        // routes, every few seconds.
        if self
            .last_route_check
            .is_none_or(|t| now.saturating_duration_since(t) >= ROUTE_CHECK_INTERVAL)
        {
            self.last_route_check = Some(now);
            if let Err(e) = self.sync_excluded_routes().await {
                debug!(error = %e, "excluded routes not updated");
            }
        }
    }

    fn announce(&mut self, now: Instant) {
        let Some(ann) = &self.announcer else { return };
        let flags = if self.forwarding.is_some() {
            wire::FLAG_EXIT
        } else {
            0
        };
        for (to, bytes) in self.book.outgoing(flags, self.mesh.agent_port, now) {
            ann.send(to, &bytes);
        }
        self.last_announce = Some(now);
    }

    /// Handles one datagram from the announcement sockets.
    pub async fn on_announcement(&mut self, inc: Incoming) {
        match self.book.receive(inc.from.ip(), &inc.bytes, Instant::now()) {
            Ok((key, exit_changed)) => {
                if exit_changed {
                    let name = self.book.name(&key).unwrap_or("?").to_owned();
                    let is_exit = self.book.live(&key).is_some_and(|l| l.is_exit());
                    info!(peer = %name, exit_node = is_exit, "peer announces a new exit-node capability");
                    self.evaluate_exit().await;
                }
            }
            Err(e) => debug!(from = %inc.from, reason = %e, "announcement ignored"),
        }
    }

    /// The reconcile step: moves interface, addresses and peers to what
    /// `mesh` and the exit-node phase want, touching only what differs.
    pub(super) async fn apply(&mut self, mesh: &Mesh) -> anyhow::Result<()> {
        let (Some(wg), Some(index)) = (self.wg.as_ref(), self.link_index) else {
            anyhow::bail!("the WireGuard interface is not up");
        };
        let iface = wg.interface().to_owned();
        let me = mesh
            .device(&self.own)
            .context("this device is not in the mesh file")?;

        wg.configure(&DeviceConfig {
            private_key: self.key.clone(),
            listen_port: me.listen_port,
            fwmark: self
                .phase
                .routing_installed()
                .then_some(self.opts.policy.fwmark),
        })?;
        let mtu = match wg.kind() {
            // boringtun reads at most the MTU it saw at creation (1500).
            wireguard::BackendKind::Userspace if mesh.mtu > 1500 => {
                warn!(
                    mtu = mesh.mtu,
                    "the userspace backend supports an MTU of at most 1500; using 1500"
                );
                1500
            }
            _ => mesh.mtu,
        };
        netif::set_up(&self.nl, index, &iface, mtu).await?;

        let wanted_addrs = reconcile::interface_addresses(mesh, &self.own)
            .context("this device is not in the mesh file")?;
        for stale in self.addresses.clone() {
            if !wanted_addrs.contains(&stale) {
                netif::del_address(&self.nl, index, &iface, stale).await?;
                self.addresses.retain(|a| *a != stale);
            }
        }
        for addr in wanted_addrs {
            if !self.addresses.contains(&addr) {
                netif::add_address(&self.nl, index, &iface, addr).await?;
                self.addresses.push(addr);
            }
        }

        let resolved = resolve_endpoints(mesh).await;
        let wanted =
            reconcile::wanted_peers(mesh, &self.own, &resolved, self.phase.exit_peer().as_ref());
        let diff = reconcile::diff_peers(&self.applied, &wanted);
        if !diff.is_empty() {
            wg.apply_peers(&diff.upsert, &diff.remove)?;
            for k in &diff.remove {
                self.applied.remove(k);
                info!(peer = %k, "peer removed");
            }
            for p in &diff.upsert {
                let name = mesh
                    .devices
                    .iter()
                    .find(|d| d.public_key == p.public_key)
                    .map_or("?", |d| d.name.as_str());
                info!(peer = %name, public_key = %p.public_key, endpoint = ?p.endpoint, allowed_ips = ?p.allowed_ips, "peer configured");
                self.applied.insert(p.public_key, p.clone());
            }
        } else {
            debug!("peers unchanged");
        }
        self.mesh = mesh.clone();
        self.bind_announcer(me.ipv4.into(), me.ipv6.into(), mesh.agent_port);
        if self.datapath.is_ok() {
            self.sync_datapath().await?;
        }
        Ok(())
    }

    /// (Re)binds the announcement sockets when this device's mesh
    /// addresses or the agent port changed.
    fn bind_announcer(&mut self, v4: IpAddr, v6: IpAddr, port: u16) {
        if self
            .announcer
            .as_ref()
            .is_some_and(|a| a.bound() == (v4, v6, port))
        {
            return;
        }
        self.announcer = None;
        match Announcer::bind(v4, v6, port) {
            Ok((a, rx)) => {
                self.announcer = Some(a);
                self.new_incoming = Some(rx);
                debug!(%v4, %v6, port, "announcement sockets bound");
            }
            Err(e) => {
                warn!(error = %e, "cannot bind the announcement sockets; exit nodes and peer health will not be seen")
            }
        }
    }

    /// Removes everything nexd installed, in reverse order. Never fails:
    /// each step logs its own problem and the next step still runs.
    pub async fn teardown(&mut self) {
        if self.phase.routing_installed() {
            if let Err(e) = self.client.remove(&self.nl, &mut self.sysctls).await {
                teardown_warning("removing the exit-node client routing", &e);
            }
            self.phase = Phase::Off;
        }
        if let Some(fw) = self.forwarding.take() {
            fw.remove(&mut self.sysctls);
        }
        self.announcer = None;
        if let Ok(dp) = std::mem::replace(&mut self.datapath, Err("stopped".into())) {
            drop(dp);
            debug!("eBPF programs detached");
        }
        if let Err(e) = self.excluded_routes.clear(&self.nl).await {
            teardown_warning("removing the excluded routes", &e);
        }
        if let Some(gw) = self.gateway.take() {
            gw.remove(&mut self.sysctls);
        }
        self.sysctls.restore_all();
        let Some(wg) = self.wg.take() else {
            return;
        };
        let iface = wg.interface().to_owned();
        wg.shutdown();
        drop(wg);
        // A userspace device's TUN link goes away once its threads have
        // closed it; a kernel link stays until deleted. Wait briefly, then
        // delete whatever is left.
        let deadline = Instant::now() + LINK_GONE_TIMEOUT;
        loop {
            match self.nl.link_index(&iface).await {
                Ok(None) => break,
                Ok(Some(index)) if Instant::now() >= deadline => {
                    if let Err(e) = self.nl.delete_link(index, &iface).await {
                        teardown_warning("deleting the interface", &e);
                    }
                    break;
                }
                Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => {
                    teardown_warning("looking up the interface", &e);
                    break;
                }
            }
        }
        self.addresses.clear();
        self.applied.clear();
        self.link_index = None;
        info!(iface = %iface, "interface removed");
    }
}

/// Resolves host-name endpoints; literal addresses need no lookup. A name
/// that does not resolve leaves that peer without an endpoint (it can still
/// reach us) and is logged.
async fn resolve_endpoints(mesh: &Mesh) -> HashMap<Endpoint, SocketAddr> {
    let mut out = HashMap::new();
    for d in &mesh.devices {
        let Some(ep) = &d.endpoint else { continue };
        let Host::Name(name) = &ep.host else { continue };
        let lookup = tokio::net::lookup_host((name.as_str(), ep.port));
        match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
            Ok(Ok(mut addrs)) => {
                if let Some(a) = addrs.next() {
                    out.insert(ep.clone(), a);
                }
            }
            Ok(Err(e)) => {
                warn!(peer = %d.name, endpoint = %ep, error = %e, "cannot resolve peer endpoint")
            }
            Err(_) => warn!(peer = %d.name, endpoint = %ep, "resolving peer endpoint timed out"),
        }
    }
    out
}
