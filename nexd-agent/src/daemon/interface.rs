//! The mesh interface: the WireGuard device, its link, its addresses and
//! its peers, and the record of what was applied to each. The one owner of
//! all of them while nexd runs.
//!
//! Peers are diffed against what was last *applied* (not the live device,
//! whose endpoints follow roaming peers), so a reload or a failover touches
//! only the peers whose configuration really changed: a failover moves
//! the default routes from one peer to another and leaves every other
//! session alone.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::atomic::AtomicU64,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ipnet::IpNet;
use tracing::{debug, info, warn};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry as Metrics,
};

use super::reconcile;
use crate::{
    announce::book::PeerBook,
    keys::{PrivateKey, PublicKey},
    metrics::{Labels, label},
    netif,
    netlink::Netlink,
    routing,
    wireguard::{
        self, BackendChoice, BackendKind, DeviceConfig, DeviceStatus, PeerConfig, WgError,
    },
};

/// A handshake younger than this means the session is usable: WireGuard
/// rejects a session 180 s after its handshake unless it was renewed.
pub const HEALTHY_HANDSHAKE: Duration = Duration::from_secs(180);

/// How long a userspace device's TUN link may take to disappear on stop.
const LINK_GONE_TIMEOUT: Duration = Duration::from_secs(2);

/// The device settings nexd applies: the key and port from the mesh, the
/// fwmark from the exit-node client.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    listen_port: u16,
    fwmark: Option<u32>,
}

pub struct MeshInterface {
    wg: Box<dyn wireguard::WireGuard>,
    name: String,
    index: u32,
    key: PrivateKey,
    /// Settings as last applied; `None` before the first.
    settings: Option<Settings>,
    /// The fwmark wanted on WireGuard's own packets.
    fwmark: Option<u32>,
    /// Addresses nexd put on the interface.
    addresses: Vec<IpNet>,
    /// The routes into the tunnel nexd added (the members' addresses).
    member_routes: Vec<IpNet>,
    /// What the mesh wants of every peer, without the exit routes.
    peers: Vec<PeerConfig>,
    /// The peer that carries the default routes (exit-node client).
    exit_peer: Option<PublicKey>,
    /// Peer configs as last applied to the backend.
    applied: BTreeMap<PublicKey, PeerConfig>,
    /// The backend's view as last read (`refresh_status`).
    last_status: Option<DeviceStatus>,
}

impl MeshInterface {
    /// Creates the WireGuard device (or adopts a kernel link a crashed nexd
    /// left), and takes over what that link already carries as the applied
    /// state, so the first reconcile removes what is no longer wanted.
    pub async fn open(
        choice: BackendChoice,
        nl: &Netlink,
        name: &str,
        key: PrivateKey,
    ) -> anyhow::Result<Self> {
        let wg = wireguard::open(choice, nl, name).await?;
        let index = nl
            .link_index(name)
            .await?
            .with_context(|| format!("interface {name} vanished right after it was created"))?;
        let mut iface = MeshInterface {
            wg,
            name: name.to_owned(),
            index,
            key,
            settings: None,
            fwmark: None,
            addresses: Vec::new(),
            member_routes: Vec::new(),
            peers: Vec::new(),
            exit_peer: None,
            applied: BTreeMap::new(),
            last_status: None,
        };
        iface.adopt(nl).await?;
        Ok(iface)
    }

    /// Every live peer of an adopted link is recorded with a config no
    /// wanted one equals, so each is rewritten once (in place, on the
    /// kernel backend); its addresses become nexd's, so stale ones go.
    async fn adopt(&mut self, nl: &Netlink) -> anyhow::Result<()> {
        self.addresses = netif::addresses(nl, self.index).await?;
        for p in self.wg.status()?.peers {
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
                iface = %self.name,
                peers = self.applied.len(),
                addresses = self.addresses.len(),
                "adopting the existing interface's state; the reconcile replaces it"
            );
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn kind(&self) -> BackendKind {
        self.wg.kind()
    }

    /// The backend's live view (handshakes, counters, roaming endpoints).
    pub fn status(&self) -> Result<DeviceStatus, WgError> {
        self.wg.status()
    }

    /// Reads the backend's view (handshakes, counters, roaming endpoints)
    /// and keeps it for `last_status`.
    pub fn refresh_status(&mut self) -> Result<&DeviceStatus, WgError> {
        Ok(self.last_status.insert(self.wg.status()?))
    }

    /// The backend's view as last read.
    pub fn last_status(&self) -> Option<&DeviceStatus> {
        self.last_status.as_ref()
    }

    /// The peers' endpoints: as configured, and as WireGuard last saw
    /// them (a roaming peer, a peer that only dials in), sorted.
    pub fn endpoints_in_use(&self) -> Vec<SocketAddr> {
        let mut eps = self.endpoints();
        if let Some(st) = &self.last_status {
            eps.extend(st.peers.iter().filter_map(|p| p.endpoint));
        }
        eps.sort_unstable();
        eps.dedup();
        eps
    }

    /// How many peers are configured.
    pub fn peer_count(&self) -> usize {
        self.applied.len()
    }

    /// The endpoints peers were configured with (the leak guard and the
    /// classifier let WireGuard's packets to these through).
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.applied.values().filter_map(|p| p.endpoint).collect()
    }

    /// Listen port from the mesh; sent only when it (or the fwmark) changed.
    pub fn set_listen_port(&mut self, listen_port: u16) -> Result<(), WgError> {
        self.apply_settings(Settings {
            listen_port,
            fwmark: self.fwmark,
        })
    }

    /// The exit-node client's fwmark on WireGuard's own packets.
    pub fn set_fwmark(&mut self, fwmark: Option<u32>) -> Result<(), WgError> {
        self.fwmark = fwmark;
        let Some(current) = self.settings.clone() else {
            // Applied with the first listen port.
            return Ok(());
        };
        self.apply_settings(Settings { fwmark, ..current })
    }

    fn apply_settings(&mut self, wanted: Settings) -> Result<(), WgError> {
        if self.settings.as_ref() == Some(&wanted) {
            return Ok(());
        }
        self.wg.configure(&DeviceConfig {
            private_key: self.key.clone(),
            listen_port: wanted.listen_port,
            fwmark: wanted.fwmark,
        })?;
        debug!(iface = %self.name, listen_port = wanted.listen_port, fwmark = ?wanted.fwmark, "device configured");
        self.settings = Some(wanted);
        Ok(())
    }

    /// MTU (capped where the backend cannot do more) and link up.
    pub async fn set_link(&self, nl: &Netlink, mtu: u32) -> anyhow::Result<()> {
        let mtu = match self.wg.kind() {
            // boringtun reads at most the MTU it saw at creation (1500).
            BackendKind::Userspace if mtu > 1500 => {
                warn!(
                    mtu,
                    "the userspace backend supports an MTU of at most 1500; using 1500"
                );
                1500
            }
            _ => mtu,
        };
        netif::set_up(nl, self.index, &self.name, mtu).await?;
        Ok(())
    }

    /// Removes stale addresses and adds missing ones.
    pub async fn set_addresses(&mut self, nl: &Netlink, wanted: &[IpNet]) -> anyhow::Result<()> {
        for stale in self.addresses.clone() {
            if !wanted.contains(&stale) {
                netif::del_address(nl, self.index, &self.name, stale).await?;
                self.addresses.retain(|a| *a != stale);
            }
        }
        for addr in wanted {
            if !self.addresses.contains(addr) {
                netif::add_address(nl, self.index, &self.name, *addr).await?;
                self.addresses.push(*addr);
            }
        }
        Ok(())
    }

    /// Routes `wanted` (the members' addresses, aggregated) into the
    /// tunnel, in the main table, and nothing else of the mesh prefixes:
    /// a whole-prefix route a previous nexd's address left on an adopted
    /// link goes. Only differences are sent.
    pub async fn set_member_routes(
        &mut self,
        nl: &Netlink,
        wanted: &[IpNet],
        prefixes: &[IpNet],
    ) -> anyhow::Result<()> {
        if self.member_routes == wanted {
            return Ok(());
        }
        for net in prefixes {
            if !wanted.contains(net) {
                // The kernel's own route (proto kernel): any protocol.
                let mut msg = self.route(net);
                msg.header.protocol = netlink_packet_route::route::RouteProtocol::Unspec;
                routing::routes::delete(nl, msg, || {
                    format!(
                        "deleting the route of the whole prefix {net} from {}",
                        self.name
                    )
                })
                .await?;
            }
        }
        for stale in self.member_routes.clone() {
            if !wanted.contains(&stale) {
                routing::routes::delete(nl, self.route(&stale), || {
                    format!("deleting the route {stale} dev {}", self.name)
                })
                .await?;
                self.member_routes.retain(|r| *r != stale);
            }
        }
        for net in wanted {
            if !self.member_routes.contains(net) {
                routing::routes::replace(nl, self.route(net), || {
                    format!("adding the route {net} dev {}", self.name)
                })
                .await?;
                self.member_routes.push(*net);
            }
        }
        debug!(iface = %self.name, routes = ?self.member_routes, "member routes set");
        Ok(())
    }

    /// `net dev <wg>` in the main table.
    fn route(&self, net: &IpNet) -> netlink_packet_route::route::RouteMessage {
        use rtnetlink::RouteMessageBuilder;
        match net {
            IpNet::V4(n) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(self.index)
                .scope(netlink_packet_route::route::RouteScope::Link)
                .build(),
            IpNet::V6(n) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(self.index)
                .build(),
        }
    }

    /// The peers the mesh wants (without the exit routes); applies the
    /// difference. `names` labels the log lines.
    pub fn set_peers(
        &mut self,
        peers: Vec<PeerConfig>,
        names: &dyn Fn(&PublicKey) -> String,
    ) -> Result<(), WgError> {
        self.peers = peers;
        self.sync_peers(names)
    }

    /// Moves the default routes (0.0.0.0/0, ::/0) to `exit`, or takes them
    /// off every peer: one update of the old and the new exit peer.
    pub fn route_default_via(
        &mut self,
        exit: Option<PublicKey>,
        names: &dyn Fn(&PublicKey) -> String,
    ) -> Result<(), WgError> {
        self.exit_peer = exit;
        self.sync_peers(names)
    }

    fn sync_peers(&mut self, names: &dyn Fn(&PublicKey) -> String) -> Result<(), WgError> {
        let wanted = reconcile::with_default_routes(&self.peers, self.exit_peer.as_ref());
        let diff = reconcile::diff_peers(&self.applied, &wanted);
        if diff.is_empty() {
            debug!(iface = %self.name, "peers unchanged");
            return Ok(());
        }
        self.wg.apply_peers(&diff.upsert, &diff.remove)?;
        for k in &diff.remove {
            self.applied.remove(k);
            info!(peer = %names(k), public_key = %k, "peer removed");
        }
        for p in diff.upsert {
            info!(peer = %names(&p.public_key), public_key = %p.public_key, endpoint = ?p.endpoint, allowed_ips = ?p.allowed_ips, "peer configured");
            self.applied.insert(p.public_key, p);
        }
        Ok(())
    }

    /// Each peer's traffic and handshake age, live (not the last tick's
    /// snapshot: a scrape sees every byte).
    pub fn register_metrics(&self, reg: &mut Metrics, book: &PeerBook) {
        let sent = Family::<Labels, Counter>::default();
        let received = Family::<Labels, Counter>::default();
        let age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let healthy = Family::<Labels, Gauge>::default();
        let live = self.status().ok();
        if let Some(st) = live.as_ref().or(self.last_status.as_ref()) {
            for p in &st.peers {
                let l = label("peer", book.name(&p.public_key).unwrap_or("unknown"));
                sent.get_or_create(&l).inc_by(p.tx_bytes);
                received.get_or_create(&l).inc_by(p.rx_bytes);
                if let Some(h) = p.last_handshake {
                    age.get_or_create(&l).set(h.as_secs_f64());
                }
                healthy.get_or_create(&l).set(i64::from(
                    p.last_handshake.is_some_and(|h| h < HEALTHY_HANDSHAKE),
                ));
            }
        }
        reg.register(
            "nexd_peer_sent_bytes",
            "Bytes sent to each peer through WireGuard",
            sent,
        );
        reg.register(
            "nexd_peer_received_bytes",
            "Bytes received from each peer through WireGuard",
            received,
        );
        reg.register(
            "nexd_peer_handshake_age_seconds",
            "Seconds since the last WireGuard handshake with each peer",
            age,
        );
        reg.register(
            "nexd_peer_healthy",
            "1 if the peer completed a handshake within 180 s",
            healthy,
        );
    }

    /// Stops the device and removes the link with its addresses and routes.
    /// Never fails: problems are logged and the rest still runs.
    pub async fn remove(self, nl: &Netlink) {
        let MeshInterface { wg, name, .. } = self;
        wg.shutdown();
        drop(wg);
        // A userspace device's TUN link goes away once its threads have
        // closed it; a kernel link stays until deleted. Wait briefly, then
        // delete whatever is left.
        let deadline = Instant::now() + LINK_GONE_TIMEOUT;
        loop {
            match nl.link_index(&name).await {
                Ok(None) => break,
                Ok(Some(index)) if Instant::now() >= deadline => {
                    if let Err(e) = nl.delete_link(index, &name).await {
                        super::report::teardown_warning("deleting the interface", &e);
                    }
                    break;
                }
                Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => {
                    super::report::teardown_warning("looking up the interface", &e);
                    break;
                }
            }
        }
        info!(iface = %name, "interface removed");
    }
}
