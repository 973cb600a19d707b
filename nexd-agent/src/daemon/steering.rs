//! The daemon's side of the eBPF data path and split tunnelling: what the
//! maps must hold, which programs must be attached, and the excluded-routes
//! table, derived from (mesh, peers' endpoints, exclusions, interfaces,
//! exit-node phase) and synced as differences.

use std::net::IpAddr;

use anyhow::Context as _;
use ipnet::IpNet;
use netlink_packet_route::link::LinkLayerType;
use nexd_common::config::{BypassReason, DatapathConfig, FLAG_GUARD, FLAG_LOG_DROPS, FLAG_STEER};
use tracing::{info, warn};

use super::state::Daemon;
use crate::{
    datapath::{self, BypassSet, Datapath},
    netif,
    routing::{gateway::Gateway, uplink},
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

/// The wanted content of the bypass tries.
pub fn bypass_set(lan: &[IpNet], excluded: &[IpNet], endpoints: &[IpAddr]) -> BypassSet {
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
    for ip in endpoints {
        set.insert(IpNet::from(*ip), BypassReason::Endpoint as u8);
    }
    set
}

impl Daemon {
    /// Whether the link is an Ethernet-like device (programs then parse an
    /// Ethernet header) rather than an L3 one (tun, PPP, WireGuard).
    async fn is_l2(&self, iface: &str) -> anyhow::Result<bool> {
        let link = self
            .nl
            .link(iface)
            .await?
            .with_context(|| format!("no interface called {iface}"))?;
        Ok(link.header.link_layer_type == LinkLayerType::Ether)
    }

    /// Loads the programs, attaches the tunnel observers and the steering
    /// classifier, installs the LAN gateway role. Failing to get the data
    /// path is fatal only where it carries a promise: `--kill-switch`.
    pub(super) async fn start_datapath(&mut self) -> anyhow::Result<()> {
        if !self.opts.lan_interfaces.is_empty() {
            self.gateway = Some(Gateway::install(
                &self.opts.interface,
                &self.opts.lan_interfaces,
                &mut self.sysctls,
            )?);
        }
        if self.opts.no_ebpf {
            self.datapath = Err("disabled with --no-ebpf".into());
            return Ok(());
        }
        let iface = self.opts.interface.clone();
        let mut dp = match Datapath::start(&iface) {
            Ok(dp) => dp,
            Err(e) if self.opts.kill_switch => {
                return Err(
                    anyhow::Error::from(e).context("--kill-switch needs the eBPF leak guard")
                );
            }
            Err(e) => {
                warn!(error = %e, "eBPF data path not attached: no counters, no steering classifier");
                self.datapath = Err(e.to_string());
                return Ok(());
            }
        };
        for lan in self.opts.lan_interfaces.clone() {
            let l2 = self.is_l2(&lan).await?;
            dp.attach_steer(&lan, l2)
                .with_context(|| format!("attaching the steering classifier to {lan}"))?;
        }
        self.datapath = Ok(dp);
        Ok(())
    }

    /// The prefixes of the LAN interfaces and uplinks (connected subnets).
    async fn local_prefixes(&self) -> Vec<IpNet> {
        let mut out = Vec::new();
        let mut ifaces = self.opts.lan_interfaces.clone();
        ifaces.extend(self.uplink_names().await);
        for name in ifaces {
            if let Ok(Some(idx)) = self.nl.link_index(&name).await
                && let Ok(addrs) = netif::addresses(&self.nl, idx).await
            {
                out.extend(addrs.into_iter().map(|a| a.trunc()));
            }
        }
        out
    }

    /// The uplinks: `--uplink`, or the default routes' interfaces.
    pub(super) async fn uplink_names(&self) -> Vec<String> {
        if let Some(u) = &self.opts.uplink {
            return vec![u.clone()];
        }
        let mut v = Vec::new();
        if let Ok((a, b)) = uplink::default_route_interfaces(&self.nl).await {
            v.extend(a);
            if let Some(b) = b
                && !v.contains(&b)
            {
                v.push(b);
            }
        }
        v
    }

    /// Brings maps, config, guard and excluded routes in line with the
    /// current state. Cheap when nothing changed (every step is a diff).
    pub(super) async fn sync_datapath(&mut self) -> anyhow::Result<()> {
        let installed = self.phase.routing_installed();
        let endpoints: Vec<IpAddr> = self
            .applied
            .values()
            .filter_map(|p| p.endpoint.map(|e| e.ip()))
            .collect();
        let local = self.local_prefixes().await;
        let bypass = bypass_set(&local, &self.exclusions, &endpoints);
        let uplinks = if installed && self.opts.kill_switch {
            self.uplink_names().await
        } else {
            Vec::new()
        };
        let mut uplink_l2 = Vec::new();
        for u in &uplinks {
            uplink_l2.push((u.clone(), self.is_l2(u).await?));
        }
        let mesh = [
            IpNet::V4(self.mesh.ipv4_prefix),
            IpNet::V6(self.mesh.ipv6_prefix),
        ];
        let mut flags = 0;
        if installed {
            flags |= FLAG_STEER;
            if self.opts.kill_switch {
                flags |= FLAG_GUARD;
            }
        }
        if self.opts.log_guard_drops {
            flags |= FLAG_LOG_DROPS;
        }
        let cfg = DatapathConfig {
            flags,
            fwmark: self.opts.policy.fwmark,
        };
        let bpffs = self.opts.bpffs.clone();
        let wg = self.opts.interface.clone();
        if let Ok(dp) = self.datapath.as_mut() {
            dp.set_mesh_prefixes(&mesh)?;
            dp.sync_bypass(&bypass)?;
            dp.set_endpoints(&endpoints)?;
            if uplink_l2.is_empty() {
                if dp.guards().next().is_some() {
                    // Config first: the guard stops dropping before it goes.
                    dp.set_config(cfg)?;
                    dp.detach_guards()?;
                }
            } else {
                for (u, l2) in &uplink_l2 {
                    dp.attach_guard(u, *l2, Some((bpffs.as_path(), wg.as_str())))
                        .with_context(|| format!("attaching the leak guard to {u}"))?;
                }
            }
            dp.set_config(cfg)?;
        } else if self.opts.kill_switch && installed {
            anyhow::bail!("--kill-switch: the eBPF data path is not available");
        }
        Ok(())
    }

    /// Re-mirrors the excluded prefixes into the excluded-routes table via
    /// the current default routes.
    pub(super) async fn sync_excluded_routes(&mut self) -> anyhow::Result<()> {
        let (v4, v6) = uplink::default_routes(&self.nl).await?;
        if (v4, v6) != self.default_routes || self.excluded_routes.len() != self.exclusions.len() {
            self.excluded_routes
                .sync(&self.nl, &self.exclusions, v4, v6)
                .await?;
            self.default_routes = (v4, v6);
        }
        Ok(())
    }

    /// Re-reads `--exclude-routes-file` (SIGHUP). A bad file is rejected
    /// with its line numbers and the running list stays.
    pub(super) async fn reload_exclusions(&mut self) {
        let Some(file) = self.opts.exclude_routes_file.clone() else {
            return;
        };
        match crate::exclude::load(&self.opts.exclude_routes, Some(&file)) {
            Ok(list) => {
                if list != self.exclusions {
                    info!(count = list.len(), "excluded routes reloaded");
                    self.exclusions = list;
                    // Force a resync of the routes.
                    self.default_routes = (None, None);
                }
            }
            Err(e) => super::log_error_lines(
                "excluded routes file rejected, keeping the running list",
                &e,
            ),
        }
    }

    /// Removes what a crashed nexd may have left of the data path.
    pub(super) async fn remove_datapath_leftovers(&mut self) {
        let mut ifaces = self.opts.lan_interfaces.clone();
        ifaces.extend(self.uplink_names().await);
        ifaces.push(self.opts.interface.clone());
        datapath::remove_leftovers(&self.opts.bpffs, &self.opts.interface, &ifaces);
        crate::routing::gateway::remove_table();
        if let Err(e) = self.excluded_routes.clear(&self.nl).await {
            warn!(error = %e, "removing leftover excluded routes failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bypass_set_has_builtins_lan_exclusions_and_endpoints() {
        let set = bypass_set(
            &["10.99.0.0/24".parse().expect("net")],
            &["198.51.100.0/24".parse().expect("net")],
            &[
                "192.0.2.1".parse().expect("ip"),
                "2001:db8::1".parse().expect("ip"),
            ],
        );
        assert_eq!(set.len(), 5 + 1 + 1 + 2);
        assert_eq!(
            set[&"192.0.2.1/32".parse::<IpNet>().expect("net")],
            BypassReason::Endpoint as u8
        );
        assert_eq!(
            set[&"2001:db8::1/128".parse::<IpNet>().expect("net")],
            BypassReason::Endpoint as u8
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
