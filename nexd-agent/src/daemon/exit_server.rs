//! The exit-node role (`nexd router --exit-node`): the one owner of the
//! exit node's forwarding (nftables table and forwarding sysctls, through
//! `routing::forward`) and of the uplinks it serves through.

use anyhow::Context as _;
use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{info, warn};

use crate::{
    netlink::Netlink,
    routing::{
        forward::{ExitForwarding, Uplinks},
        sysctl::Sysctls,
        uplink,
    },
};

pub struct ExitServer {
    wg_iface: String,
    forwarding: ExitForwarding,
}

impl ExitServer {
    /// Finds the uplinks (`--uplink`, or the default routes' interfaces)
    /// and installs forwarding for the mesh prefixes.
    pub async fn start(
        nl: &Netlink,
        wg_iface: &str,
        uplink_override: Option<&str>,
        prefixes: (Ipv4Net, Ipv6Net),
        sysctls: &mut Sysctls,
    ) -> anyhow::Result<Self> {
        let uplinks = match uplink_override {
            Some(u) => {
                if nl.link_index(u).await?.is_none() {
                    anyhow::bail!("--uplink {u}: no such interface");
                }
                Uplinks {
                    v4: Some(u.to_owned()),
                    v6: Some(u.to_owned()),
                }
            }
            None => {
                let (v4, v6) = uplink::default_route_interfaces(nl).await?;
                if v4.is_none() {
                    warn!("no IPv4 default route: this exit node will not forward IPv4");
                }
                if v6.is_none() {
                    warn!("no IPv6 default route: this exit node will not forward IPv6");
                }
                Uplinks { v4, v6 }
            }
        };
        let forwarding =
            ExitForwarding::install(wg_iface, uplinks, prefixes.0, prefixes.1, sysctls)
                .context("setting up the exit node")?;
        info!("serving as exit node: advertising 0.0.0.0/0 and ::/0 to the mesh");
        Ok(ExitServer {
            wg_iface: wg_iface.to_owned(),
            forwarding,
        })
    }

    pub fn uplinks(&self) -> &Uplinks {
        &self.forwarding.uplinks
    }

    /// The mesh prefixes changed (reload): the table is replaced whole.
    pub fn reload(&mut self, prefixes: (Ipv4Net, Ipv6Net), sysctls: &mut Sysctls) {
        match ExitForwarding::install(
            &self.wg_iface,
            self.forwarding.uplinks.clone(),
            prefixes.0,
            prefixes.1,
            sysctls,
        ) {
            Ok(fw) => self.forwarding = fw,
            Err(e) => warn!(error = %e, "updating exit node forwarding failed"),
        }
    }

    /// Deletes the table and restores the forwarding sysctls.
    pub fn remove(self, sysctls: &mut Sysctls) {
        self.forwarding.remove(sysctls);
    }
}
