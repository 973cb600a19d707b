//! The daemon's side of the eBPF data path: the one owner of the loaded
//! programs, their maps and attachments (through `datapath::Datapath`).
//!
//! What the maps hold is derived from inputs other components own (the
//! mesh prefixes, the excluded prefixes, the peers' endpoints) and from two
//! switches the exit-node client's plan flips: steering (the classifier
//! marks bypass traffic) and the leak guard. Every sync is a diff, so
//! calling it when nothing changed costs a few netlink reads.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use ipnet::IpNet;
use netlink_packet_route::link::LinkLayerType;
use nexd_common::config::{BypassReason, DatapathConfig, FLAG_GUARD, FLAG_LOG_DROPS, FLAG_STEER};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry as Metrics,
};
use tracing::{debug, warn};

use crate::{
    control::protocol::DatapathInfo,
    datapath::{
        self, BypassSet, CounterTotal, Datapath, EXIT_CLIENTS_MAX, LoadOptions, MssConfig, exit,
    },
    metrics::{Labels, label},
    netif,
    netlink::Netlink,
    routing::uplink,
};

/// Prefixes that never go through the exit node: link-local, multicast,
/// limited broadcast.
pub const BUILTIN_BYPASS: [&str; 5] = [
    "169.254.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "fe80::/10",
    "ff00::/8",
];

/// The wanted content of the bypass tries: what a LAN host's traffic may
/// reach beside the tunnel. Not the peers' endpoints: anyone who can move
/// an endpoint (an unsigned endpoint record, a resolver, an on-path host
/// that makes WireGuard roam) would choose an internet address that
/// escapes the exit node; WireGuard's own UDP goes direct by its fwmark.
pub fn bypass_set(lan: &[IpNet], excluded: &[IpNet]) -> BypassSet {
    let mut set = BypassSet::new();
    for b in BUILTIN_BYPASS {
        if let Ok(n) = b.parse::<IpNet>() {
            set.insert(n, BypassReason::Builtin as u8);
        }
    }
    for n in excluded {
        set.insert(n.trunc(), BypassReason::Excluded as u8);
    }
    for n in lan {
        set.insert(n.trunc(), BypassReason::Lan as u8);
    }
    set
}

/// Fixed settings of the programs, from the command line.
#[derive(Debug, Clone)]
pub struct ProgramSettings {
    pub wg_iface: String,
    pub lan_interfaces: Vec<String>,
    /// `--uplink`; default: the interfaces of the default routes.
    pub uplink: Option<String>,
    pub kill_switch: bool,
    /// `--kill-switch-allow`: what the guard lets out directly besides
    /// the excluded routes (a LAN, a printer).
    pub kill_switch_allow: Vec<IpNet>,
    pub log_guard_drops: bool,
    pub no_ebpf: bool,
    /// `--no-mss-clamp` turns it off.
    pub mss_clamp: bool,
    pub fwmark: u32,
    pub bpffs: PathBuf,
    /// This node serves as exit node: the client maps get their full size
    /// (other nodes save their memory).
    pub exit_node: bool,
}

/// What other components own and the maps mirror.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inputs {
    pub mesh_prefixes: Vec<IpNet>,
    pub exclusions: Vec<IpNet>,
    /// Peers' endpoints, as configured and as WireGuard last saw them
    /// (roaming): where the guard lets WireGuard send.
    pub endpoints: Vec<SocketAddr>,
    /// WireGuard's listen port (the source of its own packets).
    pub listen_port: u16,
}

pub struct Programs {
    settings: ProgramSettings,
    datapath: Result<Datapath, String>,
    inputs: Inputs,
    steering: bool,
    guard: bool,
    /// The kill switch's nftables table may be in place (written with the
    /// guard, or a previous nexd's taken over with it).
    kill_switch_table: bool,
    /// The links the table lets out through, as last written by this nexd.
    kill_switch_links: Option<crate::routing::kill_switch::Allowed>,
    /// The clsact qdiscs a previous nexd's record says it added.
    inherited_clsact: Vec<String>,
}

impl Programs {
    /// Before anything is loaded (start-up failures tear down from here).
    pub fn new(settings: ProgramSettings) -> Self {
        Programs {
            settings,
            datapath: Err("not attached yet".into()),
            inputs: Inputs::default(),
            steering: false,
            guard: false,
            kill_switch_table: false,
            kill_switch_links: None,
            inherited_clsact: Vec::new(),
        }
    }

    /// Removes what a crashed nexd may have left of the data path: pinned
    /// guards (unless `keep_guard`: the kill switch still holds, and the
    /// guard is taken over in place, with the kill switch's table), nexd's
    /// tc filters (clsact).
    pub async fn remove_leftovers(&mut self, nl: &Netlink, keep_guard: bool) {
        self.kill_switch_table = keep_guard;
        let clsact = &self.inherited_clsact;
        let mut ifaces = self.settings.lan_interfaces.clone();
        ifaces.extend(self.uplink_names(nl).await);
        ifaces.push(self.settings.wg_iface.clone());
        datapath::remove_leftovers(
            &self.settings.bpffs,
            &self.settings.wg_iface,
            &ifaces,
            keep_guard,
            clsact,
        );
    }

    /// TCP's MSS clamped to what fits the tunnel, both directions on the
    /// WireGuard interface (a LAN gateway's hosts' SYNs and the answers),
    /// so a path that filters ICMP cannot stall large transfers. Nothing
    /// without the programs or with `--no-mss-clamp`.
    pub fn clamp_tunnel_mss(&mut self, mtu: u32) -> anyhow::Result<()> {
        if let Ok(dp) = self.datapath.as_mut()
            && self.settings.mss_clamp
        {
            dp.set_mss(exit::mss_for_mtu(mtu))?;
            dp.attach_mss_clamp(&self.settings.wg_iface, false)
                .context("attaching the MSS clamp to the tunnel")?;
        }
        Ok(())
    }

    /// The exit node's policy and clients into the maps, the MSS for the
    /// tunnel; the exit programs attached the first time.
    pub fn sync_exit(
        &mut self,
        policy: &exit::ExitPolicy,
        clients: &[exit::ServedClient],
        mss: MssConfig,
    ) -> anyhow::Result<()> {
        let dp = self
            .datapath
            .as_mut()
            .map_err(|e| anyhow::anyhow!("the eBPF data path is not available: {e}"))?;
        dp.sync_exit_policy(policy)?;
        let sync = dp.sync_exit_clients(clients)?;
        debug!(?sync, "exit node clients synced");
        // An MSS of 0 is "leave it alone" to the programs.
        dp.set_mss(if self.settings.mss_clamp {
            mss
        } else {
            MssConfig::default()
        })?;
        if dp.exit_interface().is_none() {
            dp.attach_exit(&self.settings.wg_iface, false)?;
        }
        Ok(())
    }

    /// Detaches the exit programs (the node stops serving).
    pub fn detach_exit(&mut self) {
        if let Ok(dp) = self.datapath.as_mut()
            && let Err(e) = dp.detach_exit()
        {
            warn!(error = %e, "detaching the exit programs failed");
        }
    }

    /// Per-client accounting of the exit node.
    pub fn exit_clients(&self) -> Result<Vec<exit::ExitClientRow>, String> {
        match &self.datapath {
            Ok(dp) if dp.exit_interface().is_some() => dp.exit_clients().map_err(|e| e.to_string()),
            Ok(_) => Err("the exit programs are not attached".into()),
            Err(e) => Err(format!("the eBPF data path is not loaded: {e}")),
        }
    }

    /// Loads the programs, attaches the tunnel observers and the steering
    /// classifier. Failing to get the data path is fatal only where it
    /// carries a promise: `--kill-switch`.
    pub async fn start(&mut self, nl: &Netlink) -> anyhow::Result<()> {
        if self.settings.no_ebpf {
            self.datapath = Err("disabled with --no-ebpf".into());
            return Ok(());
        }
        // The guard's pin must survive nexd (a crash, a SIGKILL): refuse
        // now rather than promise a kill switch that goes with nexd.
        if self.settings.kill_switch {
            datapath::check_bpffs_persistent(&self.settings.bpffs)
                .map_err(|why| anyhow::anyhow!("--kill-switch: {why}"))?;
        }
        let opts = LoadOptions {
            exit_clients: if self.settings.exit_node {
                EXIT_CLIENTS_MAX
            } else {
                1
            },
        };
        let mut dp = match Datapath::start_with(&self.settings.wg_iface, opts) {
            Ok(dp) => dp,
            Err(e) if self.settings.kill_switch => {
                return Err(
                    anyhow::Error::from(e).context("--kill-switch needs the eBPF leak guard")
                );
            }
            // An exit node without its programs would forward anyone
            // anywhere: it does not serve at all.
            Err(e) if self.settings.exit_node => {
                return Err(anyhow::Error::from(e).context(
                    "an exit node needs its eBPF programs (who it serves, and only to the internet)",
                ));
            }
            Err(e) => {
                warn!(error = %e, "eBPF data path not attached: no counters, no steering classifier");
                self.datapath = Err(e.to_string());
                return Ok(());
            }
        };
        for lan in &self.settings.lan_interfaces {
            let l2 = is_l2(nl, lan).await?;
            dp.attach_steer(lan, l2)
                .with_context(|| format!("attaching the steering classifier to {lan}"))?;
        }
        // What a kept guard kept of a previous nexd's clsact qdiscs is
        // this nexd's to remove.
        dp.adopt_clsact(&self.inherited_clsact);
        self.datapath = Ok(dp);
        Ok(())
    }

    /// The clsact qdiscs a previous nexd added (from its record).
    pub fn inherit_clsact(&mut self, ifaces: Vec<String>) {
        self.inherited_clsact = ifaces;
    }

    /// Interfaces whose clsact qdisc nexd added, for the record.
    pub fn clsact_interfaces(&self) -> Vec<String> {
        match &self.datapath {
            Ok(dp) => dp.clsact_interfaces(),
            Err(_) => Vec::new(),
        }
    }

    /// The endpoints the maps hold now.
    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.inputs.endpoints
    }

    /// New inputs from the mesh, the split tunnel or the interface.
    pub async fn set_inputs(&mut self, nl: &Netlink, inputs: Inputs) -> anyhow::Result<()> {
        self.inputs = inputs;
        self.sync(nl).await
    }

    /// The classifier marks bypass traffic (exit-node client routing is in
    /// place) or passes everything unmarked.
    pub async fn set_steering(&mut self, nl: &Netlink, on: bool) -> anyhow::Result<()> {
        self.steering = on;
        self.sync(nl).await
    }

    /// Attaches the leak guard to every uplink, or removes it.
    pub async fn set_guard(&mut self, nl: &Netlink, on: bool) -> anyhow::Result<()> {
        if on && self.datapath.is_err() {
            anyhow::bail!("--kill-switch: the eBPF data path is not available");
        }
        self.guard = on;
        self.sync(nl).await
    }

    /// Brings maps, config and guard attachments in line with the inputs
    /// and switches. Also follows uplinks and their subnets: every
    /// interface a default route leaves through gets the guard.
    pub async fn sync(&mut self, nl: &Netlink) -> anyhow::Result<()> {
        let Ok(dp) = self.datapath.as_mut() else {
            return Ok(());
        };
        let uplinks = uplink_names(nl, self.settings.uplink.as_deref()).await;
        let mut local_ifaces = self.settings.lan_interfaces.clone();
        local_ifaces.extend(uplinks.iter().cloned());
        let local = local_prefixes(nl, &local_ifaces).await;
        let uplink_nets = local_prefixes(nl, &uplinks).await;
        let bypass = bypass_set(&local, &self.inputs.exclusions);
        let mut allow = self.inputs.exclusions.clone();
        allow.extend(self.settings.kill_switch_allow.iter().copied());
        let guard_set = datapath::guard_set(&allow, &uplink_nets);
        let mut flags = 0;
        if self.steering {
            flags |= FLAG_STEER;
        }
        if self.guard {
            flags |= FLAG_GUARD;
        }
        if self.settings.log_guard_drops {
            flags |= FLAG_LOG_DROPS;
        }
        let cfg = DatapathConfig {
            flags,
            fwmark: self.settings.fwmark,
            listen_port: self.inputs.listen_port,
            reserved: 0,
        };
        dp.set_mesh_prefixes(&self.inputs.mesh_prefixes)?;
        dp.sync_bypass(&bypass)?;
        dp.sync_guard_set(&guard_set)?;
        dp.set_endpoints(&self.inputs.endpoints)?;
        // The config before any guard attachment: a guard attached (or
        // swapped in over an adopted one) must drop from its first packet;
        // when the guard goes, it stops dropping before it is detached.
        dp.set_config(cfg)?;
        if self.guard {
            // The rule that outlives nexd first, so a link that appears
            // from here on is held shut until nexd has looked at it.
            let mut open = Vec::new();
            for name in uplinks
                .iter()
                .map(String::as_str)
                .chain(["lo", self.settings.wg_iface.as_str()])
            {
                if let Some(i) = nl
                    .link_index(name)
                    .await
                    .with_context(|| format!("finding {name} for the kill switch's table"))?
                {
                    open.push(i);
                }
            }
            let allowed = crate::routing::kill_switch::Allowed::read(nl, open)
                .await
                .context("reading links and routes for the kill switch's table")?;
            if self.kill_switch_links.as_ref() != Some(&allowed) {
                crate::routing::kill_switch::apply(self.settings.fwmark, &allowed)
                    .context("the kill switch's nftables table")?;
                self.kill_switch_links = Some(allowed);
            }
            for u in &uplinks {
                let l2 = is_l2(nl, u).await?;
                dp.attach_guard(
                    u,
                    l2,
                    Some((
                        self.settings.bpffs.as_path(),
                        self.settings.wg_iface.as_str(),
                    )),
                )
                .with_context(|| format!("attaching the leak guard to {u}"))?;
            }
        } else {
            if dp.guards().next().is_some() {
                dp.detach_guards()?;
            }
            // After the guards: the kill switch goes last.
            if self.kill_switch_table {
                crate::routing::kill_switch::NFT_TABLE.delete()?;
            }
            self.kill_switch_links = None;
        }
        self.kill_switch_table = self.guard;
        Ok(())
    }

    /// The uplinks: `--uplink`, or the default routes' interfaces.
    pub async fn uplink_names(&self, nl: &Netlink) -> Vec<String> {
        uplink_names(nl, self.settings.uplink.as_deref()).await
    }

    /// Every counter, summed over CPUs; empty without a data path.
    pub fn counters(&self) -> Vec<(&'static str, CounterTotal)> {
        match &self.datapath {
            Ok(dp) => match dp.counters() {
                Ok(c) => c.into_iter().collect(),
                Err(e) => {
                    debug!(error = %e, "reading the data path counters failed");
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        }
    }

    /// Packets and bytes per verdict of the programs.
    pub fn register_metrics(&self, reg: &mut Metrics) {
        let packets = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        for (name, total) in self.counters() {
            packets
                .get_or_create(&label("verdict", name))
                .inc_by(total.packets);
            bytes
                .get_or_create(&label("verdict", name))
                .inc_by(total.bytes);
        }
        reg.register(
            "nexd_datapath_packets",
            "Packets per eBPF data path verdict",
            packets,
        );
        reg.register(
            "nexd_datapath_bytes",
            "Bytes per eBPF data path verdict",
            bytes,
        );
    }

    /// The nftables tables the programs have in place (for the record).
    pub fn nft_tables(&self) -> Vec<String> {
        if self.kill_switch_table {
            vec![crate::routing::kill_switch::NFT_TABLE.to_string()]
        } else {
            Vec::new()
        }
    }

    /// For `status` and `stats`.
    pub fn info(&self, excluded_routes: usize) -> DatapathInfo {
        match &self.datapath {
            Ok(dp) => DatapathInfo {
                attached: true,
                mode: Some(dp.mode()),
                error: None,
                steering_interfaces: dp.steered_interfaces(),
                guard_interfaces: dp.guards().map(|g| g.iface().to_owned()).collect(),
                guard_pinned: dp.guards().any(|g| g.pinned()),
                bypass_prefixes: dp.bypass().len(),
                excluded_routes,
            },
            Err(e) => DatapathInfo {
                attached: false,
                mode: None,
                error: Some(e.clone()),
                steering_interfaces: Vec::new(),
                guard_interfaces: Vec::new(),
                guard_pinned: false,
                bypass_prefixes: 0,
                excluded_routes,
            },
        }
    }

    /// Detaches the programs (a pinned guard is unpinned by the exit-node
    /// client's plan before this).
    pub fn remove(&mut self) {
        if let Ok(dp) = std::mem::replace(&mut self.datapath, Err("stopped".into())) {
            drop(dp);
            debug!("eBPF programs detached");
        }
    }
}

/// Whether the link is an Ethernet-like device (programs then parse an
/// Ethernet header) rather than an L3 one (tun, PPP, WireGuard).
async fn is_l2(nl: &Netlink, iface: &str) -> anyhow::Result<bool> {
    let link = nl
        .link(iface)
        .await?
        .with_context(|| format!("no interface called {iface}"))?;
    Ok(link.header.link_layer_type == LinkLayerType::Ether)
}

/// `--uplink`, or the interfaces of the IPv4 and IPv6 default routes.
async fn uplink_names(nl: &Netlink, fixed: Option<&str>) -> Vec<String> {
    if let Some(u) = fixed {
        return vec![u.to_owned()];
    }
    match uplink::all_default_route_interfaces(nl).await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "cannot read the default routes to find the uplinks");
            Vec::new()
        }
    }
}

/// The subnets of `ifaces` (connected prefixes).
async fn local_prefixes(nl: &Netlink, ifaces: &[String]) -> Vec<IpNet> {
    let mut out = Vec::new();
    for name in ifaces {
        if let Ok(Some(idx)) = nl.link_index(name).await
            && let Ok(addrs) = netif::addresses(nl, idx).await
        {
            out.extend(addrs.into_iter().map(|a| a.trunc()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bypass_set_has_builtins_lan_and_exclusions_and_no_endpoint() {
        let set = bypass_set(
            &["10.99.0.0/24".parse().expect("net")],
            &["198.51.100.0/24".parse().expect("net")],
        );
        assert_eq!(set.len(), 5 + 1 + 1);
        assert_eq!(
            set[&"10.99.0.0/24".parse::<IpNet>().expect("net")],
            BypassReason::Lan as u8
        );
        assert_eq!(
            set[&"fe80::/10".parse::<IpNet>().expect("net")],
            BypassReason::Builtin as u8
        );
        assert_eq!(
            set[&"198.51.100.0/24".parse::<IpNet>().expect("net")],
            BypassReason::Excluded as u8
        );
    }
}
