//! The WireGuard backend: one trait, two implementations.
//!
//! * `kernel`: the kernel module, link created over rtnetlink, configured
//!   with wireguard-control's netlink backend.
//! * `userspace`: in-process on a TUN device: boringtun's noise core with
//!   nexd's own batched, offloaded I/O, configured through typed calls;
//!   `uapi` serves the read-only UAPI socket `wg show` reads.
//!
//! The rest of nexd only sees [`WireGuard`], so exit-node and routing code
//! cannot depend on which one runs.

mod kernel;
mod uapi;
mod userspace;

use std::{net::SocketAddr, time::Duration};

use ipnet::IpNet;
use tracing::{info, warn};

use crate::{
    keys::{PrivateKey, PublicKey},
    netif,
    netlink::{Netlink, NetlinkError},
};

/// Which backend the operator asked for (`--wireguard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum BackendChoice {
    /// Kernel WireGuard when the kernel has it, userspace otherwise.
    #[default]
    Auto,
    /// Kernel WireGuard only; fail when the kernel has none.
    Kernel,
    /// The in-process userspace implementation (boringtun's noise core).
    Userspace,
}

pub use nexd_proto::BackendKind;

/// Device-wide settings.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub private_key: PrivateKey,
    pub listen_port: u16,
    /// Mark on WireGuard's own UDP packets, so policy routing can send them
    /// out of the main table while everything else goes into the tunnel.
    pub fwmark: Option<u32>,
}

/// The wanted configuration of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: u16,
}

/// What the backend reports about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Time since the last completed handshake; `None` if there was none.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What the backend reports about the device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceStatus {
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub peers: Vec<PeerStatus>,
}

/// A backend failure, naming the interface and the operation.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error(
        "kernel WireGuard is not available ({0}); use `--wireguard userspace` or load the wireguard module"
    )]
    KernelUnavailable(NetlinkError),
    #[error("{iface}: starting the userspace WireGuard device failed: {reason}")]
    UserspaceStart { iface: String, reason: String },
    #[error("{iface}: userspace WireGuard: {op} failed: {source}")]
    Userspace {
        iface: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{iface}: kernel WireGuard {op} failed: {source}")]
    Kernel {
        iface: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// A running WireGuard device. Implementations are cheap to call from the
/// reconcile loop: every call is a netlink request or an in-process update.
pub trait WireGuard: Send + Sync {
    /// Which implementation this is.
    fn kind(&self) -> BackendKind;

    /// The interface name.
    fn interface(&self) -> &str;

    /// Applies the device-wide settings. Only values that differ from the
    /// running device are sent, so calling it again does not disturb peers.
    fn configure(&self, config: &DeviceConfig) -> Result<(), WgError>;

    /// Adds or updates `upsert` peers and removes `remove` peers. Peers not
    /// named are left untouched, sessions included.
    fn apply_peers(&self, upsert: &[PeerConfig], remove: &[PublicKey]) -> Result<(), WgError>;

    /// The device and its peers as the backend sees them now.
    fn status(&self) -> Result<DeviceStatus, WgError>;

    /// Stops the device. The interface is gone (or going) when this returns;
    /// the caller deletes whatever link is left.
    fn shutdown(&self);
}

/// Creates the interface `iface` with the backend `choice` allows. With
/// `Auto`, kernel WireGuard is tried first and the log says which was chosen
/// and why.
pub async fn open(
    choice: BackendChoice,
    nl: &Netlink,
    iface: &str,
) -> Result<Box<dyn WireGuard>, WgError> {
    if nl.link_index(iface).await?.is_some() {
        if netif::is_kernel_wireguard(nl, iface).await? && choice != BackendChoice::Userspace {
            // A kernel link left by an earlier nexd (crash) or created by the
            // operator: adopt it; configure() replaces its whole config.
            info!(iface, "adopting existing kernel WireGuard interface");
            return Ok(Box::new(kernel::KernelWireGuard::new(iface)));
        }
        return Err(WgError::UserspaceStart {
            iface: iface.to_owned(),
            reason: format!(
                "a network interface called {iface} already exists and is not one nexd can use; remove it or choose another name with --interface"
            ),
        });
    }
    match choice {
        BackendChoice::Kernel => {
            netif::create_wireguard_link(nl, iface)
                .await
                .map_err(WgError::KernelUnavailable)?;
            info!(
                iface,
                "WireGuard backend: kernel (requested with --wireguard kernel)"
            );
            Ok(Box::new(kernel::KernelWireGuard::new(iface)))
        }
        BackendChoice::Userspace => {
            let dev = userspace::UserspaceWireGuard::start(iface)?;
            info!(
                iface,
                "WireGuard backend: userspace (requested with --wireguard userspace)"
            );
            Ok(Box::new(dev))
        }
        BackendChoice::Auto => match netif::create_wireguard_link(nl, iface).await {
            Ok(()) => {
                info!(
                    iface,
                    "WireGuard backend: kernel (auto: the kernel supports WireGuard)"
                );
                Ok(Box::new(kernel::KernelWireGuard::new(iface)))
            }
            Err(e) => {
                let dev = userspace::UserspaceWireGuard::start(iface)?;
                warn!(
                    iface,
                    reason = %e,
                    "WireGuard backend: userspace (auto: kernel WireGuard is not available)"
                );
                Ok(Box::new(dev))
            }
        },
    }
}
