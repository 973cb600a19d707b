//! The daemon's state and the reconcile step that moves the kernel to it.
//!
//! Each kernel object nexd creates is recorded here when installed and
//! removed by `teardown`, which copes with a partial start-up.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ipnet::IpNet;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{Options, log_error_lines, reconcile, teardown_warning};
use crate::{
    datapath::Datapath,
    keys::{PrivateKey, PublicKey},
    mesh::{self, Endpoint, Host, Mesh},
    netif,
    netlink::Netlink,
    wireguard::{self, DeviceConfig, PeerConfig, WireGuard},
};

/// How long a DNS lookup of a peer endpoint may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a userspace device's TUN link may take to disappear on stop.
const LINK_GONE_TIMEOUT: Duration = Duration::from_secs(2);

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
}

impl Daemon {
    pub fn new(opts: Options, key: PrivateKey, nl: Netlink, mesh: Mesh) -> Self {
        let own = key.public_key();
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
            started: Instant::now(),
        }
    }

    /// Creates the interface, attaches the data path, applies the mesh.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let iface = self.opts.interface.clone();
        let span = info_span!("start", iface = %iface);
        async {
            let wg = wireguard::open(self.opts.wireguard, &self.nl, &iface).await?;
            self.wg = Some(wg);
            self.link_index = Some(
                self.nl
                    .link_index(&iface)
                    .await?
                    .with_context(|| format!("interface {iface} vanished right after it was created"))?,
            );
            let mesh = self.mesh.clone();
            self.apply(&mesh).await?;
            self.datapath = Datapath::attach(&iface).map_err(|e| {
                warn!(error = %e, "eBPF data path not attached; the mesh works without its counters");
                e.to_string()
            });
            Ok(())
        }
        .instrument(span)
        .await
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
        if let Err(e) = self.apply(&mesh).await {
            log_error_lines("applying the reloaded mesh file failed", &e);
        }
    }

    /// Periodic work: nothing yet beyond keeping the loop honest.
    pub async fn tick(&mut self) {}

    /// The reconcile step: moves interface, addresses and peers to what
    /// `mesh` wants, touching only what differs.
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
            fwmark: None,
        })?;
        netif::set_up(&self.nl, index, &iface, mesh.mtu).await?;

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
        let wanted = reconcile::wanted_peers(mesh, &self.own, &resolved, None);
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
                info!(peer = %name, public_key = %p.public_key, endpoint = ?p.endpoint, "peer configured");
                self.applied.insert(p.public_key, p.clone());
            }
        } else {
            debug!("peers unchanged");
        }
        self.mesh = mesh.clone();
        Ok(())
    }

    /// Removes everything nexd installed, in reverse order. Never fails:
    /// each step logs its own problem and the next step still runs.
    pub async fn teardown(&mut self) {
        if let Ok(dp) = std::mem::replace(&mut self.datapath, Err("stopped".into())) {
            drop(dp);
            debug!("eBPF programs detached");
        }
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
