//! A read-only view of the daemon's components: what status answers and
//! metrics are computed from. Borrowing every component immutably, it
//! cannot change anything, so those answers are functions of state alone.

use std::time::Instant;

use super::{
    exit_client::ExitClient, exit_role::ExitRole, heartbeats::Heartbeats, host::Host,
    interface::MeshInterface, membership::Membership, split_tunnel::SplitTunnel,
};
use crate::{announce::book::PeerBook, keys::PublicKey, mesh::Mesh};

pub struct View<'a> {
    pub own: &'a PublicKey,
    pub mesh: &'a Mesh,
    /// `None` before start-up created it.
    pub iface: Option<&'a MeshInterface>,
    pub heartbeats: &'a Heartbeats,
    pub exit_client: &'a ExitClient,
    pub exit_role: &'a ExitRole,
    pub split: &'a SplitTunnel,
    pub host: &'a Host,
    pub membership: &'a Membership,
    /// When nexd started.
    pub started: Instant,
}

impl View<'_> {
    /// What the announcements say about the peers.
    pub fn book(&self) -> &PeerBook {
        self.heartbeats.book()
    }
}
