//! Answers to control requests: read-only views built from the components
//! and the backend's live view, and the two requests that change the
//! exit-node client.

use std::time::{Duration, Instant};

use super::{agent::Daemon, exit_client::EnableError};
use crate::{
    control::protocol::{
        ClientPhase, CounterRow, ErrorCode, ExitInfo, ExitNodeRow, Method, PROTOCOL_VERSION,
        PeerRow, Reply, Response, Role, StatsInfo, StatusInfo, VersionInfo,
    },
    exit::{self, Phase},
    wireguard::DeviceStatus,
};

/// The exact messages users know from Nexodus.
pub const ENABLED: &str = "Successfully enabled exit node client on this device";
pub const DISABLED: &str = "Successfully disabled exit node client on this device";

/// A handshake younger than this means the session is usable: WireGuard
/// rejects a session 180 s after its handshake unless it was renewed.
pub const HEALTHY_HANDSHAKE: Duration = Duration::from_secs(180);

impl Daemon {
    /// Answers one control request.
    pub async fn answer(&mut self, method: Method) -> Response {
        match method {
            Method::Version => Response::ok(Reply::Version(VersionInfo {
                version: env!("CARGO_PKG_VERSION").into(),
                protocol: PROTOCOL_VERSION,
            })),
            Method::Status => match self.live() {
                Ok(dev) => Response::ok(Reply::Status(Box::new(self.status_info(&dev)))),
                Err(e) => Response::error(ErrorCode::Internal, e),
            },
            Method::PeersList => match self.live() {
                Ok(dev) => Response::ok(Reply::Peers {
                    peers: self.peer_rows(&dev),
                }),
                Err(e) => Response::error(ErrorCode::Internal, e),
            },
            Method::Stats => Response::ok(Reply::Stats(self.stats_info())),
            Method::ExitNodeList => Response::ok(Reply::ExitNodes {
                exit_nodes: self.exit_rows(Instant::now()),
            }),
            Method::ExitNodeClients => self.exit_clients(),
            Method::ExitNodeEnable => self.exit_enable().await,
            Method::ExitNodeDisable => self.exit_disable().await,
            Method::Metrics => Response::ok(Reply::Metrics {
                text: self.metrics_text(),
            }),
        }
    }

    fn exit_clients(&self) -> Response {
        if self.exit_server.is_none() {
            let why = match &self.opts.exit_server {
                None => "this device does not serve as exit node (nexd runs without `router --exit-node`)"
                    .to_owned(),
                Some(_) => super::exit_server::not_allowed(&self.mesh, &self.own)
                    .unwrap_or_else(|| "this device does not serve as exit node now".into()),
            };
            return Response::error(ErrorCode::Unavailable, why);
        }
        match self.dataplane.exit_clients() {
            Ok(clients) => Response::ok(Reply::ExitClients { clients }),
            Err(e) => Response::error(
                ErrorCode::Internal,
                format!("reading the exit node's per-client counters: {e}"),
            ),
        }
    }

    fn live(&self) -> Result<DeviceStatus, String> {
        let iface = self
            .iface
            .as_ref()
            .ok_or_else(|| "the WireGuard interface is not up".to_owned())?;
        iface.status().map_err(|e| e.to_string())
    }

    fn status_info(&self, dev: &DeviceStatus) -> StatusInfo {
        let me = self.mesh.device(&self.own);
        let healthy = dev
            .peers
            .iter()
            .filter(|p| p.last_handshake.is_some_and(|h| h < HEALTHY_HANDSHAKE))
            .count();
        let (backend, peers) = match &self.iface {
            Some(i) => (i.kind(), i.peer_count()),
            None => (crate::wireguard::BackendKind::Userspace, 0),
        };
        StatusInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            device_name: self.membership.device_name(&self.mesh, &self.own),
            public_key: self.own.to_string(),
            interface: self.opts.interface.clone(),
            backend,
            listen_port: dev.listen_port.unwrap_or_default(),
            mesh_ipv4: me.map(|d| d.ipv4.to_string()).unwrap_or_default(),
            mesh_ipv6: me.map(|d| d.ipv6.to_string()).unwrap_or_default(),
            mesh_file: self
                .membership
                .mesh_file()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            peers,
            healthy_peers: healthy,
            uptime_seconds: self.started.elapsed().as_secs(),
            datapath: self.dataplane.info(self.split.exclusions().len()),
            exit_node: self.exit_info(),
            registry: self.membership.info(),
        }
    }

    fn exit_info(&self) -> ExitInfo {
        let client = &self.exit_client;
        let role = if self.exit_server.is_some() {
            Role::ExitNode
        } else if client.wanted() || client.phase() != Phase::Off {
            Role::Client
        } else {
            Role::None
        };
        let uplinks = self.exit_server.as_ref().map(|s| s.uplinks());
        ExitInfo {
            role,
            client_wanted: client.wanted(),
            client_phase: match client.phase() {
                Phase::Off => ClientPhase::Off,
                Phase::Waiting => ClientPhase::Waiting,
                Phase::Active(_) => ClientPhase::Active,
                Phase::Held => ClientPhase::Held,
            },
            active_exit_node: client
                .phase()
                .exit_peer()
                .and_then(|k| self.heartbeats.book().name(&k).map(str::to_owned)),
            uplink_ipv4: uplinks.and_then(|u| u.v4.clone()),
            uplink_ipv6: uplinks.and_then(|u| u.v6.clone()),
            withdrawn: self
                .exit_server
                .as_ref()
                .and_then(|s| s.withdrawn(std::time::Instant::now())),
        }
    }

    fn peer_rows(&self, dev: &DeviceStatus) -> Vec<PeerRow> {
        self.mesh
            .peers_of(&self.own)
            .map(|d| {
                let live = dev.peers.iter().find(|p| p.public_key == d.public_key);
                PeerRow {
                    name: d.name.clone(),
                    public_key: d.public_key.to_string(),
                    endpoint: live
                        .and_then(|p| p.endpoint)
                        .map(|e| e.to_string())
                        .or_else(|| d.endpoint.as_ref().map(ToString::to_string)),
                    allowed_ips: live
                        .map(|p| p.allowed_ips.iter().map(ToString::to_string).collect())
                        .unwrap_or_default(),
                    mesh_ipv4: d.ipv4.to_string(),
                    mesh_ipv6: d.ipv6.to_string(),
                    latest_handshake_seconds: live
                        .and_then(|p| p.last_handshake)
                        .map(|h| h.as_secs()),
                    transmitted_bytes: live.map_or(0, |p| p.tx_bytes),
                    received_bytes: live.map_or(0, |p| p.rx_bytes),
                    healthy: live
                        .and_then(|p| p.last_handshake)
                        .is_some_and(|h| h < HEALTHY_HANDSHAKE),
                }
            })
            .collect()
    }

    fn stats_info(&self) -> StatsInfo {
        StatsInfo {
            datapath: self.dataplane.info(self.split.exclusions().len()),
            counters: self
                .dataplane
                .counters()
                .into_iter()
                .map(|(name, total)| CounterRow {
                    name: name.into(),
                    total,
                })
                .collect(),
        }
    }

    /// Every peer that announces itself (or last announced itself) as exit
    /// node, sorted by name.
    pub(super) fn exit_rows(&self, now: Instant) -> Vec<ExitNodeRow> {
        let book = self.heartbeats.book();
        let active = self.exit_client.phase().exit_peer();
        let mut rows: Vec<ExitNodeRow> = self
            .mesh
            .peers_of(&self.own)
            .filter_map(|d| {
                let live = book.live(&d.public_key)?;
                let status = exit::status(live, now)?;
                let endpoint = self
                    .last_status
                    .as_ref()
                    .and_then(|s| s.peers.iter().find(|p| p.public_key == d.public_key))
                    .and_then(|p| p.endpoint)
                    .map(|e| e.to_string())
                    .or_else(|| d.endpoint.as_ref().map(ToString::to_string));
                Some(ExitNodeRow {
                    endpoint_address: endpoint,
                    public_key: d.public_key.to_string(),
                    name: d.name.clone(),
                    mesh_ipv4: d.ipv4.to_string(),
                    mesh_ipv6: d.ipv6.to_string(),
                    status,
                    active: active == Some(d.public_key),
                    rtt_ms: live.rtt.map(|r| r.as_secs_f64() * 1000.0),
                    last_heard_seconds: live
                        .last_heard
                        .map(|t| now.saturating_duration_since(t).as_secs_f64()),
                })
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    /// Why no exit node can be used now, for `enable`'s refusal.
    fn unavailable_detail(&self, pinned: Result<Option<String>, ()>) -> String {
        let known = self.exit_rows(Instant::now()).len();
        match pinned {
            Err(()) => format!(
                "--exit-node {:?} names no device of the mesh",
                self.exit_client.pin().unwrap_or_default()
            ),
            Ok(Some(name)) => format!("the pinned exit node {name} is not available"),
            Ok(None) if known == 0 => "no device of the mesh announces itself as exit node (start one with `nexd router --exit-node`)".to_owned(),
            Ok(None) => format!(
                "{known} exit node(s) known, none available now; see `nexctl nexd exit-node list`"
            ),
        }
    }

    /// `nexctl nexd exit-node enable`.
    async fn exit_enable(&mut self) -> Response {
        if self.exit_server.is_some() {
            return Response::error(
                ErrorCode::Unavailable,
                "this device is an exit node (nexd router --exit-node); it cannot also be an exit-node client",
            );
        }
        let detail = {
            let pinned = self
                .exit_client
                .pinned(&super::exit_client::Candidates {
                    book: self.heartbeats.book(),
                    mesh: &self.mesh,
                    own: &self.own,
                })
                .map(|k| k.map(|k| self.heartbeats.name_of(&k)));
            self.unavailable_detail(pinned)
        };
        let Some((client, candidates, mut fx)) = self.exit_parts() else {
            return Response::error(ErrorCode::Internal, "the WireGuard interface is not up");
        };
        match client.enable(&candidates, &mut fx).await {
            Ok(()) => Response::ok(Reply::Done {
                message: ENABLED.into(),
            }),
            Err(EnableError::Unavailable) => Response::error(
                ErrorCode::Unavailable,
                format!(
                    "cannot enable the exit node client: no exit node is available: {detail}. Nothing was changed."
                ),
            ),
            Err(EnableError::Failed(e)) => Response::error(
                ErrorCode::Internal,
                format!("enabling the exit node client failed: {e}"),
            ),
        }
    }

    /// `nexctl nexd exit-node disable`.
    async fn exit_disable(&mut self) -> Response {
        let Some((client, _, mut fx)) = self.exit_parts() else {
            return Response::error(ErrorCode::Internal, "the WireGuard interface is not up");
        };
        match client.disable(&mut fx).await {
            Ok(()) => Response::ok(Reply::Done {
                message: DISABLED.into(),
            }),
            Err(e) => Response::error(
                ErrorCode::Internal,
                format!("disabling the exit node client failed: {e}"),
            ),
        }
    }
}
