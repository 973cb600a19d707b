//! Where the membership comes from: the mesh file, or the registry
//! (membership through etcd, `--registry`). This component owns that
//! choice and, in registry mode, the device side of the registry
//! (`registry::Registry`: its etcd session, its lease with the endpoint
//! and join request under it, the cache in the state directory).
//!
//! Either way the daemon gets a `Mesh` and applies it through
//! the daemon's `apply_membership`, the path of a SIGHUP reload: a diff against
//! what is applied, so unchanged peers keep their sessions. The file is
//! read at start and on SIGHUP; the registry pushes changes as events,
//! and a SIGHUP then reads no file. A device that is not (or no longer) a
//! member gets a mesh without devices: no peers, no mesh addresses, no
//! announcements, until the admin approves it.
//!
//! The decisions (`decide`, `registry_info`) are pure and tested without
//! etcd; the effects are the daemon's.

use std::path::PathBuf;

use anyhow::anyhow;
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry as Metrics,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{report::log_error_lines, settings::MembershipSettings};
use crate::{
    control::protocol::{IgnoredRecord, MembershipSource, MembershipState, RegistryInfo},
    keys::PublicKey,
    mesh::{self, Mesh},
    registry::{self, MembershipEvent, Registry, RegistryStatus},
};

/// The events of the registry; closed at once (never ready) with a mesh
/// file.
pub type Events = mpsc::Receiver<MembershipEvent>;

/// The source of the membership and what it said last.
pub struct Membership {
    kind: Kind,
    /// The mesh to start with, until the daemon takes it.
    first: Option<Mesh>,
}

enum Kind {
    File {
        path: PathBuf,
    },
    Registry {
        /// `None` once shut down.
        registry: Option<Registry>,
        /// The name this device asked to join under.
        name: String,
        state: MembershipState,
    },
}

/// What an event does to the mesh in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Apply this mesh (the SIGHUP path: only differences are touched).
    Apply(Mesh),
    /// Nothing changes in the data path.
    Keep,
}

impl Membership {
    /// Opens the source: reads the mesh file (which must list this
    /// device), or starts the registry's device side. The mesh to start
    /// with (`first`) is, in registry mode, one without devices, until the
    /// registry (or its cache) says more.
    pub async fn open(
        settings: &MembershipSettings,
        own: &PublicKey,
    ) -> anyhow::Result<(Self, Events)> {
        let Some(cfg) = &settings.registry else {
            let mesh = mesh::read(&settings.mesh_file)?;
            if mesh.device(own).is_none() {
                return Err(anyhow!(
                    "this device's public key {own} is not in the mesh file {}; add a [[device]] entry with public_key = \"{own}\"",
                    settings.mesh_file.display()
                ));
            }
            // No sender: the loop's branch for registry events never fires.
            let (_, events) = mpsc::channel(1);
            let kind = Kind::File {
                path: settings.mesh_file.clone(),
            };
            let first = Some(mesh);
            return Ok((Membership { kind, first }, events));
        };
        let (registry, events) = Registry::connect(cfg.clone(), *own, settings.state_dir.clone())
            .await
            .map_err(|e| anyhow!("--registry {}: {e}", cfg.etcd.url))?;
        info!(
            registry = %cfg.etcd.url,
            name = %cfg.name,
            "membership from the registry: the device starts with no peers and joins (or resumes) through etcd"
        );
        let kind = Kind::Registry {
            registry: Some(registry),
            name: cfg.name.clone(),
            state: MembershipState::Starting,
        };
        let first = Some(no_devices(None));
        Ok((Membership { kind, first }, events))
    }

    /// The mesh to start with (once; later calls get one without devices).
    pub fn first(&mut self) -> Mesh {
        self.first.take().unwrap_or_else(|| no_devices(None))
    }

    /// This device's name in the mesh to start with, or as it asks to join.
    pub fn starting_name(&self, own: &PublicKey) -> String {
        match &self.first {
            Some(m) => self.device_name(m, own),
            None => String::new(),
        }
    }

    /// This device's name: as the mesh has it, else as it asked to join.
    pub fn device_name(&self, mesh: &Mesh, own: &PublicKey) -> String {
        match (mesh.device(own), &self.kind) {
            (Some(d), _) => d.name.clone(),
            (None, Kind::Registry { name, .. }) => name.clone(),
            (None, Kind::File { .. }) => String::new(),
        }
    }

    /// The mesh file, when the membership comes from one.
    pub fn mesh_file(&self) -> Option<&std::path::Path> {
        match &self.kind {
            Kind::File { path } => Some(path),
            Kind::Registry { .. } => None,
        }
    }

    /// SIGHUP: the mesh to apply, or `None` to keep the running config (a
    /// file with errors, or one that no longer lists this device). In
    /// registry mode no file is read: the current mesh is applied again
    /// (nothing changes; endpoints are resolved again, the excluded routes
    /// file is re-read by the caller).
    pub fn reread(&self, own: &PublicKey, current: &Mesh) -> Option<Mesh> {
        let path = match &self.kind {
            Kind::File { path } => path,
            Kind::Registry { .. } => {
                info!(
                    "SIGHUP: the membership comes from the registry, no mesh file is read; re-reading the excluded routes and re-resolving endpoints"
                );
                return Some(current.clone());
            }
        };
        info!(mesh_file = %path.display(), "SIGHUP: reloading the mesh file");
        let mesh = match mesh::read(path) {
            Ok(m) => m,
            Err(e) => {
                log_error_lines("mesh file rejected, keeping the running config", &e);
                return None;
            }
        };
        if mesh.device(own).is_none() {
            warn!(
                public_key = %own,
                "mesh file rejected, keeping the running config: it no longer lists this device"
            );
            return None;
        }
        Some(mesh)
    }

    /// Takes in a registry event: the new state, and what to apply (a
    /// membership is applied like a SIGHUP reload; losing the membership
    /// removes every peer; a lost or restored connection is logged and
    /// changes nothing).
    pub fn take(&mut self, event: MembershipEvent, own: &PublicKey, current: &Mesh) -> Change {
        let Kind::Registry { state, .. } = &mut self.kind else {
            return Change::Keep;
        };
        log_event(&event);
        let before = *state;
        let (next, step) = decide(before, event, own, current);
        *state = next;
        if before != next {
            log_state(next);
        }
        step
    }

    /// The registry side of `status`, in registry mode.
    pub fn info(&self) -> Option<RegistryInfo> {
        match &self.kind {
            Kind::Registry {
                registry: Some(r),
                state,
                ..
            } => Some(registry_info(&r.status(), *state)),
            _ => None,
        }
    }

    /// The registry's series for the metrics endpoint (none with a file).
    pub fn register_metrics(&self, reg: &mut Metrics) {
        let Some(info) = self.info() else { return };
        let gauge = |v: i64| {
            let g: Gauge = Gauge::default();
            g.set(v);
            g
        };
        let counter = |v: u64| {
            let c: Counter = Counter::default();
            c.inc_by(v);
            c
        };
        reg.register(
            "nexd_registry_connected",
            "1 while a session with an etcd member is up",
            gauge(i64::from(info.connected)),
        );
        reg.register(
            "nexd_registry_member",
            "1 while this device is an approved member of the mesh",
            gauge(i64::from(info.membership == MembershipState::Member)),
        );
        reg.register(
            "nexd_registry_revision",
            "The etcd revision last read",
            gauge(info.revision),
        );
        reg.register(
            "nexd_registry_ignored_records",
            "Registry records not used now (bad or missing signature, revoked, conflicting)",
            gauge(i64::try_from(info.ignored.len()).unwrap_or(i64::MAX)),
        );
        reg.register(
            "nexd_registry_rejected_records",
            "Registry values rejected since start (each bad write counts)",
            counter(info.rejected_total),
        );
        reg.register(
            "nexd_registry_resyncs",
            "Full reads of the registry after a watch fell behind a compaction",
            counter(info.resyncs),
        );
        reg.register(
            "nexd_registry_disconnects",
            "etcd sessions that ended with an error",
            counter(info.disconnects),
        );
    }

    /// Stops the registry's task and revokes its lease, so this device's
    /// endpoint and join request vanish at once (bounded).
    pub async fn shutdown(&mut self) {
        if let Kind::Registry { registry, .. } = &mut self.kind
            && let Some(r) = registry.take()
        {
            r.shutdown().await;
        }
    }
}

fn log_event(event: &MembershipEvent) {
    match event {
        MembershipEvent::Membership { membership, source } => info!(
            devices = membership.mesh.devices.len(),
            ignored = membership.ignored.len(),
            source = %describe(*source),
            "registry membership received: applying the difference"
        ),
        MembershipEvent::WaitingForApproval => {}
        MembershipEvent::ConnectionLost { error } => warn!(
            error = %error,
            "registry unreachable: the mesh stays as it is (nothing changes in the data path); reconnecting with backoff"
        ),
        MembershipEvent::ConnectionRestored => {
            info!("registry reachable again: changes made meanwhile follow")
        }
    }
}

fn log_state(state: MembershipState) {
    match state {
        MembershipState::Revoked => warn!(
            "this device is no longer a member of the mesh (revoked): removing every peer; the join request is published again"
        ),
        MembershipState::WaitingForApproval => info!(
            "not a member of the mesh yet: waiting for approval (`nexctl mesh approve` on the admin's machine)"
        ),
        MembershipState::Member => info!("approved: a member of the mesh"),
        MembershipState::Starting => {}
    }
}

/// The pure decision: the state after `event`, and what to apply.
pub fn decide(
    state: MembershipState,
    event: MembershipEvent,
    own: &PublicKey,
    current: &Mesh,
) -> (MembershipState, Change) {
    let not_member = match state {
        MembershipState::Member | MembershipState::Revoked => MembershipState::Revoked,
        MembershipState::Starting | MembershipState::WaitingForApproval => {
            MembershipState::WaitingForApproval
        }
    };
    // Leaving keeps the mesh settings (prefixes, MTU) and drops the devices.
    let leave = |mesh: &Mesh| {
        if mesh.devices.is_empty() {
            Change::Keep
        } else {
            Change::Apply(no_devices(Some(mesh)))
        }
    };
    match event {
        MembershipEvent::Membership { membership, .. } => {
            if membership.mesh.device(own).is_some() {
                (MembershipState::Member, Change::Apply(membership.mesh))
            } else {
                // The registry never sends this; should it, it is not a
                // membership of this device.
                (not_member, leave(current))
            }
        }
        MembershipEvent::WaitingForApproval => (not_member, leave(current)),
        MembershipEvent::ConnectionLost { .. } | MembershipEvent::ConnectionRestored => {
            (state, Change::Keep)
        }
    }
}

/// A mesh without devices: `settings`' prefixes, MTU, keepalive and
/// agent port, or the defaults.
pub fn no_devices(settings: Option<&Mesh>) -> Mesh {
    match settings {
        Some(m) => Mesh {
            devices: Vec::new(),
            exit_groups: Vec::new(),
            ..m.clone()
        },
        None => Mesh {
            ipv4_prefix: mesh::DEFAULT_IPV4_NET,
            ipv6_prefix: mesh::DEFAULT_IPV6_NET,
            persistent_keepalive: mesh::DEFAULT_KEEPALIVE,
            mtu: mesh::DEFAULT_MTU,
            agent_port: mesh::DEFAULT_AGENT_PORT,
            devices: Vec::new(),
            exit_groups: Vec::new(),
        },
    }
}

fn describe(source: registry::Source) -> String {
    match source {
        registry::Source::Registry { revision } => format!("etcd at revision {revision}"),
        registry::Source::Cache { saved_at } => {
            format!("the cache saved at Unix time {saved_at} (etcd unreachable)")
        }
    }
}

/// `status`'s registry section from the registry's own status and the
/// daemon's view of the membership.
pub fn registry_info(status: &RegistryStatus, state: MembershipState) -> RegistryInfo {
    RegistryInfo {
        url: status.url.clone(),
        connected: status.connected,
        membership: state,
        source: match state {
            MembershipState::Member => status.source.map(|s| match s {
                registry::Source::Registry { revision } => MembershipSource::Registry { revision },
                registry::Source::Cache { saved_at } => MembershipSource::Cache { saved_at },
            }),
            _ => None,
        },
        revision: status.revision,
        devices: match state {
            MembershipState::Member => status.devices,
            _ => 0,
        },
        ignored: status
            .ignored
            .iter()
            .map(|i| IgnoredRecord {
                key: i.key.clone(),
                reason: i.reason.clone(),
            })
            .collect(),
        rejected_total: status.rejected_total,
        resyncs: status.resyncs,
        disconnects: status.disconnects,
        last_error: if status.connected {
            None
        } else {
            status.last_error.clone()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        keys::PrivateKey,
        mesh::Device,
        registry::{Membership as Verified, verify::Ignored},
    };

    fn device(name: &str, key: PublicKey, n: u8) -> Device {
        Device {
            name: name.into(),
            endpoint: None,
            ipv4: std::net::Ipv4Addr::new(100, 64, 0, n),
            ipv6: format!("fd6e:6578:6400::{n}").parse().expect("v6"),
            ..crate::testing::device(usize::from(n), key)
        }
    }

    fn membership(devices: Vec<Device>) -> MembershipEvent {
        let mut mesh = no_devices(None);
        mesh.mtu = 1380;
        mesh.devices = devices;
        MembershipEvent::Membership {
            membership: Box::new(Verified {
                mesh,
                roles: Default::default(),
                serials: Default::default(),
                ignored: Vec::new(),
            }),
            source: registry::Source::Registry { revision: 7 },
        }
    }

    #[test]
    fn a_membership_with_this_device_is_applied_whole() {
        let own = PrivateKey::generate().public_key();
        let other = PrivateKey::generate().public_key();
        let ev = membership(vec![device("a", own, 1), device("b", other, 2)]);
        let (state, step) = decide(MembershipState::Starting, ev, &own, &no_devices(None));
        assert_eq!(state, MembershipState::Member);
        match step {
            Change::Apply(m) => {
                assert_eq!(m.devices.len(), 2);
                assert_eq!(m.mtu, 1380);
            }
            Change::Keep => panic!("must apply"),
        }
    }

    #[test]
    fn waiting_before_membership_changes_nothing_and_after_it_removes_every_peer() {
        let own = PrivateKey::generate().public_key();
        let other = PrivateKey::generate().public_key();
        // Never a member: waiting, nothing to remove.
        let (state, step) = decide(
            MembershipState::Starting,
            MembershipEvent::WaitingForApproval,
            &own,
            &no_devices(None),
        );
        assert_eq!(state, MembershipState::WaitingForApproval);
        assert_eq!(step, Change::Keep);
        // A member that gets WaitingForApproval was revoked: the mesh
        // keeps its settings and loses every device.
        let mut current = no_devices(None);
        current.mtu = 1380;
        current.devices = vec![device("a", own, 1), device("b", other, 2)];
        let (state, step) = decide(
            MembershipState::Member,
            MembershipEvent::WaitingForApproval,
            &own,
            &current,
        );
        assert_eq!(state, MembershipState::Revoked);
        match step {
            Change::Apply(m) => {
                assert!(m.devices.is_empty());
                assert_eq!(m.mtu, 1380);
                assert_eq!(m.ipv4_prefix, current.ipv4_prefix);
            }
            Change::Keep => panic!("a revoked device must drop its peers"),
        }
        // Approved again: member.
        let (state, _) = decide(
            MembershipState::Revoked,
            membership(vec![device("a", own, 1)]),
            &own,
            &no_devices(None),
        );
        assert_eq!(state, MembershipState::Member);
    }

    #[test]
    fn a_membership_without_this_device_is_not_applied_as_one() {
        let own = PrivateKey::generate().public_key();
        let other = PrivateKey::generate().public_key();
        let mut current = no_devices(None);
        current.devices = vec![device("a", own, 1), device("b", other, 2)];
        let (state, step) = decide(
            MembershipState::Member,
            membership(vec![device("b", other, 2)]),
            &own,
            &current,
        );
        assert_eq!(state, MembershipState::Revoked);
        assert!(matches!(step, Change::Apply(m) if m.devices.is_empty()));
    }

    #[test]
    fn connection_events_never_touch_the_data_path() {
        let own = PrivateKey::generate().public_key();
        let mut current = no_devices(None);
        current.devices = vec![device("a", own, 1)];
        for ev in [
            MembershipEvent::ConnectionLost {
                error: "gone".into(),
            },
            MembershipEvent::ConnectionRestored,
        ] {
            for state in [
                MembershipState::Starting,
                MembershipState::Member,
                MembershipState::Revoked,
            ] {
                let (next, step) = decide(state, ev.clone(), &own, &current);
                assert_eq!(next, state);
                assert_eq!(step, Change::Keep);
            }
        }
    }

    #[test]
    fn status_shows_the_source_only_for_a_member_and_the_error_only_while_disconnected() {
        let status = RegistryStatus {
            url: "etcd://192.0.2.1:2379/m".into(),
            connected: false,
            waiting_for_approval: false,
            source: Some(registry::Source::Cache { saved_at: 5 }),
            revision: 9,
            devices: 3,
            ignored: vec![Ignored {
                key: "/m/devices/x".into(),
                reason: "missing signature".into(),
            }],
            rejected_total: 4,
            resyncs: 1,
            disconnects: 2,
            last_error: Some("unreachable".into()),
        };
        let i = registry_info(&status, MembershipState::Member);
        assert_eq!(i.source, Some(MembershipSource::Cache { saved_at: 5 }));
        assert_eq!(i.devices, 3);
        assert_eq!(i.last_error.as_deref(), Some("unreachable"));
        assert_eq!(i.ignored.len(), 1);
        assert_eq!(i.rejected_total, 4);
        let i = registry_info(&status, MembershipState::Revoked);
        assert_eq!(i.source, None);
        assert_eq!(i.devices, 0);
        let connected = RegistryStatus {
            connected: true,
            ..status
        };
        assert_eq!(
            registry_info(&connected, MembershipState::Member).last_error,
            None
        );
    }
}
