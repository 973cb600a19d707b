//! The LAN gateway role (`--lan-interface`): forwarding on, LAN traffic
//! into the tunnel masqueraded (the nftables table `routing::gateway`
//! owns), and TCP's MSS clamped on the tunnel by the programs. Installed
//! after the leak guard: with the kill switch, forwarded LAN traffic must
//! meet the guard from its first packet.
//!
//! The table itself is written before the tunnel has a peer and removed
//! after the tunnel is gone: on a host that forwards of its own (a
//! router, a Docker host) forwarding is on before nexd starts and after
//! it stops, and without the table a member could reach the LAN through
//! the tunnel in between.

use super::host::Host;
use crate::routing::{gateway::Gateway, sysctl::Sysctls};

/// The gateway's settings from the command line.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub wg_iface: String,
    /// `--lan-interface`: none, no gateway.
    pub lan_interfaces: Vec<String>,
}

pub struct LanGateway {
    settings: GatewaySettings,
    /// `Some` once installed.
    installed: Option<Gateway>,
    /// The table is in place (from before the tunnel has peers).
    closed: bool,
}

impl LanGateway {
    pub fn new(settings: GatewaySettings) -> Self {
        LanGateway {
            settings,
            installed: None,
            closed: false,
        }
    }

    /// Whether this device is a gateway (`--lan-interface` given).
    pub fn configured(&self) -> bool {
        !self.settings.lan_interfaces.is_empty()
    }

    /// Writes the table before the tunnel has a peer, so nothing from
    /// the tunnel is forwarded into the LAN whatever the host's
    /// forwarding says; nothing without LAN interfaces.
    pub fn close_tunnel(&mut self) -> anyhow::Result<()> {
        if !self.configured() {
            return Ok(());
        }
        Gateway::close_tunnel(&self.settings.wg_iface, &self.settings.lan_interfaces)?;
        self.closed = true;
        Ok(())
    }

    /// Installs the gateway, once; nothing without LAN interfaces.
    pub fn install(&mut self, host: &mut Host, mtu: u32) -> anyhow::Result<()> {
        if self.settings.lan_interfaces.is_empty() || self.installed.is_some() {
            return Ok(());
        }
        self.installed = Some(Gateway::install(
            &self.settings.wg_iface,
            &self.settings.lan_interfaces,
            &mut host.sysctls,
        )?);
        host.programs.clamp_tunnel_mss(mtu)
    }

    /// The nftables tables in place (for the record).
    pub fn nft_tables(&self) -> Vec<String> {
        if self.installed.is_some() || self.closed {
            vec![crate::routing::gateway::NFT_TABLE.to_string()]
        } else {
            Vec::new()
        }
    }

    /// Removes the table and restores the forwarding sysctls. (A table a
    /// crashed nexd left goes with the others, in
    /// `routing::remove_leftover_tables`.) After the tunnel is gone.
    pub fn remove(&mut self, sysctls: &mut Sysctls) {
        if let Some(gw) = self.installed.take() {
            gw.remove(sysctls);
        } else if self.closed {
            crate::routing::gateway::NFT_TABLE.remove();
        }
        self.closed = false;
    }
}
