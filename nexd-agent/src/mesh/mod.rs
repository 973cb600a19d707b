//! Mesh membership: the validated model of the mesh file.
//!
//! The file is declarative: it lists every device, and each agent finds
//! itself in it by its own public key. Everything else (peers, addresses,
//! routes) is derived from this model by the reconcile loop.

mod file;
mod render;

pub use file::{MeshFileError, Problem, parse, read};
pub(crate) use file::{check_name, check_v4_host, check_v6_host, parse_endpoint};
pub use render::render;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;

use crate::keys::PublicKey;

/// Default mesh IPv4 prefix: the shared address space of RFC 6598.
pub const DEFAULT_IPV4_PREFIX: &str = "100.64.0.0/10";
/// Default mesh IPv6 prefix: a ULA /48 ("nex" in the global ID). Operators
/// running several meshes that can see each other should pick their own.
pub const DEFAULT_IPV6_PREFIX: &str = "fd6e:6578:6400::/48";
/// Default persistent keepalive, seconds: below common NAT UDP timeouts.
pub const DEFAULT_KEEPALIVE: u16 = 25;
/// Default tunnel MTU: 1500 minus the worst-case WireGuard overhead over an
/// IPv6 underlay (40 IPv6 + 8 UDP + 32 WireGuard).
pub const DEFAULT_MTU: u32 = 1420;
/// Listen port for a device whose entry gives neither endpoint nor port.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// UDP port agents use for announcements inside the tunnel, on their mesh
/// addresses only.
pub const DEFAULT_AGENT_PORT: u16 = 51829;

/// The whole mesh as the file describes it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    pub ipv4_prefix: Ipv4Net,
    pub ipv6_prefix: Ipv6Net,
    /// Seconds between keepalives to each peer; 0 turns them off.
    pub persistent_keepalive: u16,
    pub mtu: u32,
    /// UDP port of the in-tunnel announcements (same on every device).
    pub agent_port: u16,
    pub devices: Vec<Device>,
}

/// One device of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub public_key: PublicKey,
    /// Where peers send to reach it; `None` for a device that only dials out
    /// (its peers learn its address when it first talks to them).
    pub endpoint: Option<Endpoint>,
    /// The UDP port the device listens on.
    pub listen_port: u16,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// A device's underlay address as written in the file. Names are resolved
/// when the peer is configured, so a DNS change is picked up on reload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: Host,
    pub port: u16,
}

/// The host part of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Mesh {
    /// The device with this public key, if the file lists it.
    pub fn device(&self, key: &PublicKey) -> Option<&Device> {
        self.devices.iter().find(|d| &d.public_key == key)
    }

    /// Every device except the one with `own` key: the peers of that device.
    pub fn peers_of<'a>(&'a self, own: &'a PublicKey) -> impl Iterator<Item = &'a Device> + 'a {
        self.devices.iter().filter(move |d| &d.public_key != own)
    }
}
