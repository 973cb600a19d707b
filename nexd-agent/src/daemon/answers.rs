//! Answers to control requests, built from the daemon's state and the
//! backend's live view.

use std::time::Duration;

use super::state::Daemon;
use crate::{
    control::protocol::{
        CounterRow, DatapathInfo, ErrorCode, ExitInfo, Method, PROTOCOL_VERSION, PeerRow, Reply,
        Response, StatsInfo, StatusInfo, VersionInfo,
    },
    exit::Phase,
    wireguard::DeviceStatus,
};

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
                exit_nodes: self.exit_rows(std::time::Instant::now()),
            }),
            Method::ExitNodeEnable => self.exit_enable().await,
            Method::ExitNodeDisable => self.exit_disable().await,
            Method::Metrics => Response::ok(Reply::Metrics {
                text: self.metrics_text(),
            }),
        }
    }

    fn live(&self) -> Result<DeviceStatus, String> {
        let wg = self
            .wg
            .as_ref()
            .ok_or_else(|| "the WireGuard interface is not up".to_owned())?;
        wg.status().map_err(|e| e.to_string())
    }

    fn datapath_info(&self) -> DatapathInfo {
        match &self.datapath {
            Ok(dp) => DatapathInfo {
                attached: true,
                mode: Some(dp.mode()),
                error: None,
                steering_interfaces: dp.steered_interfaces(),
                guard_interfaces: dp.guards().map(|g| g.iface().to_owned()).collect(),
                guard_pinned: dp.guards().any(|g| g.pinned()),
                bypass_prefixes: dp.bypass().len(),
                excluded_routes: self.exclusions.len(),
            },
            Err(e) => DatapathInfo {
                attached: false,
                mode: None,
                error: Some(e.clone()),
                steering_interfaces: Vec::new(),
                guard_interfaces: Vec::new(),
                guard_pinned: false,
                bypass_prefixes: 0,
                excluded_routes: self.exclusions.len(),
            },
        }
    }

    fn status_info(&self, dev: &DeviceStatus) -> StatusInfo {
        let me = self.mesh.device(&self.own);
        let healthy = dev
            .peers
            .iter()
            .filter(|p| p.last_handshake.is_some_and(|h| h < HEALTHY_HANDSHAKE))
            .count();
        StatusInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            device_name: me.map(|d| d.name.clone()).unwrap_or_default(),
            public_key: self.own.to_string(),
            interface: self.opts.interface.clone(),
            backend: self
                .wg
                .as_ref()
                .map_or(crate::wireguard::BackendKind::Userspace, |w| w.kind()),
            listen_port: dev.listen_port.unwrap_or_default(),
            mesh_ipv4: me.map(|d| d.ipv4.to_string()).unwrap_or_default(),
            mesh_ipv6: me.map(|d| d.ipv6.to_string()).unwrap_or_default(),
            mesh_file: self.opts.mesh_file.display().to_string(),
            peers: self.applied.len(),
            healthy_peers: healthy,
            uptime_seconds: self.started.elapsed().as_secs(),
            datapath: self.datapath_info(),
            exit_node: self.exit_info(),
        }
    }

    fn exit_info(&self) -> ExitInfo {
        let role = if self.forwarding.is_some() {
            "exit_node"
        } else if self.exit_wanted || self.phase != Phase::Off {
            "client"
        } else {
            "none"
        };
        ExitInfo {
            role: role.into(),
            client_wanted: self.exit_wanted,
            client_phase: match self.phase {
                Phase::Off => "off",
                Phase::Waiting => "waiting",
                Phase::Active(_) => "active",
                Phase::Held => "held",
            }
            .into(),
            active_exit_node: self
                .phase
                .exit_peer()
                .and_then(|k| self.book.name(&k).map(str::to_owned)),
            uplink_ipv4: self.forwarding.as_ref().and_then(|f| f.uplinks.v4.clone()),
            uplink_ipv6: self.forwarding.as_ref().and_then(|f| f.uplinks.v6.clone()),
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
        let counters = match &self.datapath {
            Ok(dp) => dp
                .counters()
                .map(|m| {
                    m.into_iter()
                        .map(|(name, total)| CounterRow {
                            name: name.into(),
                            total,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        StatsInfo {
            datapath: self.datapath_info(),
            counters,
        }
    }
}
