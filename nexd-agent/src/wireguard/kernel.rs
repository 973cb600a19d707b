//! Kernel WireGuard, configured with wireguard-control's generic netlink
//! backend. The link itself is created and deleted over rtnetlink by the
//! caller (see `wireguard::open` and the daemon's shutdown).

use std::time::SystemTime;

use ipnet::IpNet;
use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use super::{BackendKind, DeviceConfig, DeviceStatus, PeerConfig, PeerStatus, WgError, WireGuard};
use crate::keys::PublicKey;

pub struct KernelWireGuard {
    iface: String,
}

impl KernelWireGuard {
    pub fn new(iface: &str) -> Self {
        KernelWireGuard {
            iface: iface.to_owned(),
        }
    }

    fn name(&self) -> Result<InterfaceName, WgError> {
        self.iface.parse().map_err(|e| WgError::Kernel {
            iface: self.iface.clone(),
            op: "naming the interface",
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e:?}")),
        })
    }

    /// The device as the kernel has it now.
    fn device(&self) -> Result<Device, WgError> {
        Device::get(&self.name()?, Backend::Kernel).map_err(|source| WgError::Kernel {
            iface: self.iface.clone(),
            op: "get",
            source,
        })
    }

    fn apply(&self, update: DeviceUpdate, op: &'static str) -> Result<(), WgError> {
        update
            .apply(&self.name()?, Backend::Kernel)
            .map_err(|source| WgError::Kernel {
                iface: self.iface.clone(),
                op,
                source,
            })
    }
}

fn builder(p: &PeerConfig) -> PeerConfigBuilder {
    let mut b = PeerConfigBuilder::new(&Key(p.public_key.0))
        .replace_allowed_ips()
        .set_persistent_keepalive_interval(p.persistent_keepalive);
    if let Some(ep) = p.endpoint {
        b = b.set_endpoint(ep);
    }
    for ip in &p.allowed_ips {
        b = b.add_allowed_ip(ip.addr(), ip.prefix_len());
    }
    b
}

impl WireGuard for KernelWireGuard {
    fn kind(&self) -> BackendKind {
        BackendKind::Kernel
    }

    fn interface(&self) -> &str {
        &self.iface
    }

    fn configure(&self, config: &DeviceConfig) -> Result<(), WgError> {
        let current = self.device()?;
        let mut update = DeviceUpdate::new();
        let mut changed = false;
        let want_public = Key(config.private_key.public_key().0);
        if current.public_key.as_ref() != Some(&want_public) {
            update = update.set_private_key(Key(config.private_key.to_bytes()));
            changed = true;
        }
        if current.listen_port != Some(config.listen_port) {
            update = update.set_listen_port(config.listen_port);
            changed = true;
        }
        if current.fwmark.filter(|m| *m != 0) != config.fwmark {
            update = update.set_fwmark(config.fwmark.unwrap_or(0));
            changed = true;
        }
        if changed {
            self.apply(update, "configure device")?;
        }
        Ok(())
    }

    fn apply_peers(&self, upsert: &[PeerConfig], remove: &[PublicKey]) -> Result<(), WgError> {
        if upsert.is_empty() && remove.is_empty() {
            return Ok(());
        }
        let mut update = DeviceUpdate::new();
        for k in remove {
            update = update.remove_peer_by_key(&Key(k.0));
        }
        for p in upsert {
            update = update.add_peer(builder(p));
        }
        self.apply(update, "apply peers")
    }

    fn status(&self) -> Result<DeviceStatus, WgError> {
        let dev = self.device()?;
        let now = SystemTime::now();
        Ok(DeviceStatus {
            listen_port: dev.listen_port,
            fwmark: dev.fwmark.filter(|m| *m != 0),
            peers: dev
                .peers
                .into_iter()
                .map(|p| PeerStatus {
                    public_key: PublicKey(p.config.public_key.0),
                    endpoint: p.config.endpoint,
                    allowed_ips: p
                        .config
                        .allowed_ips
                        .iter()
                        .filter_map(|a| IpNet::new(a.address, a.cidr).ok())
                        .collect(),
                    last_handshake: p
                        .stats
                        .last_handshake_time
                        .filter(|t| *t > SystemTime::UNIX_EPOCH)
                        .map(|t| now.duration_since(t).unwrap_or_default()),
                    rx_bytes: p.stats.rx_bytes,
                    tx_bytes: p.stats.tx_bytes,
                })
                .collect(),
        })
    }

    fn shutdown(&self) {
        // The caller deletes the link over rtnetlink, which removes the device.
    }
}
