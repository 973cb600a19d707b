//! The record formats stored in etcd. Signed records (settings, devices,
//! revocations) are sealed by `signed`; join requests and endpoints are
//! plain JSON, unsigned: a request only asks, and an endpoint only says
//! where to send packets that WireGuard authenticates anyway.
//!
//! Unknown fields are accepted, so an older agent still reads records
//! written by a newer admin: a signed body is authentic as a whole.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::admin_key::AdminPublicKey;
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
    /// Set when the mesh keeps a signed, expiring snapshot (`snapshot`):
    /// a device that starts without a cache then believes a membership
    /// only with a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<SnapshotPolicy>,
}

/// Who may sign the mesh's snapshot, and for how long at most.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPolicy {
    /// The online snapshot key: it signs `PREFIX/snapshot` and nothing
    /// else (a device verifies every other key with the admin key only).
    pub key: AdminPublicKey,
    /// The longest a snapshot may stay valid, seconds: how long a rolled
    /// back etcd can fool a device that has never seen the mesh.
    pub max_validity: u64,
}

/// The mesh's snapshot (`PREFIX/snapshot`), signed by the snapshot key:
/// the serial of every record in force when it was made, and until when
/// it may be believed. Modelled on TUF's snapshot and timestamp roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Rises with every snapshot (milliseconds since the epoch when it was
    /// made, or one above the previous one).
    pub version: u64,
    /// Unix seconds when it was made and when it stops being believed.
    pub issued: u64,
    pub expires: u64,
    /// Every serial up to this one was signed before the snapshot: a
    /// device record with such a serial that `devices` does not list is
    /// no longer in force.
    pub serial: u64,
    /// The serial of the settings in force.
    pub settings: u64,
    /// The serial of every device record in force, by device id.
    pub devices: BTreeMap<String, u64>,
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
    /// The exit node's capacity in bits per second (the mesh file's
    /// `exit_capacity`): signed with the rest, so an exit node cannot
    /// raise it. Absent in records signed before issue 23.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_capacity: Option<u64>,
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
    /// Increases with every signed change, mesh-wide: the admin signs each
    /// change above every serial it can read.
    pub serial: u64,
    /// For a device approved again after a revocation: the serial of that
    /// revocation. A revocation voids every record of the device that does
    /// not name it (or a later one), whatever their serials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_revocation: Option<u64>,
}

/// A revocation (`PREFIX/revoked/<id>`), signed.
///
/// Signed since issue 21 with `every_serial`: it voids every record of the
/// device that does not name it in `after_revocation`, so no record the
/// admin ever signed for it (however high its serial: the unsigned serial
/// counter can be set back under the admin) brings it back. Without
/// `every_serial` (revocations signed before), it voids the records with a
/// serial up to `serial`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub public_key: PublicKey,
    pub name: String,
    pub serial: u64,
    #[serde(default)]
    pub every_serial: bool,
}

impl Revocation {
    /// Whether this revocation voids `record` (of the same device).
    pub fn voids(&self, record: &DeviceRecord) -> bool {
        if self.every_serial {
            record.after_revocation.is_none_or(|a| a < self.serial)
        } else {
            record.serial <= self.serial
        }
    }
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
