//! The record formats stored in etcd. Signed records (settings, devices,
//! revocations) are sealed by `signed`; join requests and endpoints are
//! plain JSON, unsigned: a request only asks, and an endpoint only says
//! where to send packets that WireGuard authenticates anyway.
//!
//! Unknown fields are accepted, so an older agent still reads records
//! written by a newer admin: a signed body is authentic as a whole.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;

/// The mesh-wide settings (`PREFIX/settings`), signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub ipv4_prefix: Ipv4Net,
    pub ipv6_prefix: Ipv6Net,
    pub mtu: u32,
    pub persistent_keepalive: u16,
    pub agent_port: u16,
    /// Serial at which these settings were signed.
    pub serial: u64,
}

/// What a device may do besides being a member (issue 13's mesh-file
/// fields: `exit_node`, `exit_clients`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roles {
    /// The device may serve as exit node.
    #[serde(default)]
    pub exit_node: bool,
    /// The devices (by name) this exit node serves; `None`: every device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_clients: Option<Vec<String>>,
}

/// An approved device (`PREFIX/devices/<id>`), signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub name: String,
    pub public_key: PublicKey,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub listen_port: u16,
    /// An endpoint the admin fixed (imported mesh files have them); when
    /// absent, the endpoint the device publishes under its lease is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(flatten)]
    pub roles: Roles,
    /// Increases with every signed change; a revocation covers every record
    /// of that device up to its serial, so an old record written back into
    /// etcd does not bring a revoked device back.
    pub serial: u64,
}

/// A revocation (`PREFIX/revoked/<id>`), signed: the device's records with
/// a serial up to `serial` are void.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub public_key: PublicKey,
    pub name: String,
    pub serial: u64,
}

/// A device asking to join (`PREFIX/requests/<id>`), unsigned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub name: String,
    pub public_key: PublicKey,
    pub listen_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The role the device asks for; the admin decides.
    #[serde(default)]
    pub exit_node: bool,
    /// Unix seconds when the device started asking.
    #[serde(default)]
    pub requested_at: u64,
}

/// A device's published underlay endpoint (`PREFIX/endpoints/<id>`),
/// unsigned, under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// `host:port` or `[v6]:port`.
    pub endpoint: String,
}
