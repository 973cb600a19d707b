//! Answers to control requests that only read: functions of a `View` of
//! the components. The two requests that change the exit-node client
//! (enable, disable) are the daemon's; their messages are here.

use std::time::Instant;

use super::{interface::HEALTHY_HANDSHAKE, view::View};
use crate::{
    control::protocol::{
        ClientPhase, CounterRow, ErrorCode, ExitInfo, ExitLoad, ExitNodeRow, PROTOCOL_VERSION,
        PeerRow, Reply, Response, Role, StatsInfo, StatusInfo, VersionInfo,
    },
    exit::{self, Phase, select::Load},
    wireguard::DeviceStatus,
};

/// The exact messages users know from Nexodus.
pub const ENABLED: &str = "Successfully enabled exit node client on this device";
pub const DISABLED: &str = "Successfully disabled exit node client on this device";

pub fn version() -> Response {
    Response::ok(Reply::Version(VersionInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
    }))
}

pub fn status(v: &View<'_>) -> Response {
    match live(v) {
        Ok(dev) => Response::ok(Reply::Status(Box::new(status_info(v, &dev)))),
        Err(e) => Response::error(ErrorCode::Internal, e),
    }
}

pub fn peers(v: &View<'_>) -> Response {
    match live(v) {
        Ok(dev) => Response::ok(Reply::Peers {
            peers: peer_rows(v, &dev),
        }),
        Err(e) => Response::error(ErrorCode::Internal, e),
    }
}

pub fn stats(v: &View<'_>) -> Response {
    let programs = &v.host.programs;
    Response::ok(Reply::Stats(StatsInfo {
        datapath: programs.info(v.split.exclusions().len()),
        counters: programs
            .counters()
            .into_iter()
            .map(|(name, total)| CounterRow {
                name: name.into(),
                total,
            })
            .collect(),
    }))
}

pub fn exit_nodes(v: &View<'_>, now: Instant) -> Response {
    Response::ok(Reply::ExitNodes {
        exit_nodes: exit_rows(v, now),
    })
}

pub fn exit_clients(v: &View<'_>) -> Response {
    if !v.exit_role.serving() {
        return Response::error(
            ErrorCode::Unavailable,
            v.exit_role.not_serving_reason(v.mesh),
        );
    }
    match v.exit_role.client_rows(v.host) {
        Ok(clients) => Response::ok(Reply::ExitClients { clients }),
        Err(e) => Response::error(
            ErrorCode::Internal,
            format!("reading the exit node's per-client counters: {e}"),
        ),
    }
}

fn live(v: &View<'_>) -> Result<DeviceStatus, String> {
    let iface = v
        .iface
        .ok_or_else(|| "the WireGuard interface is not up".to_owned())?;
    iface.status().map_err(|e| e.to_string())
}

fn status_info(v: &View<'_>, dev: &DeviceStatus) -> StatusInfo {
    let me = v.mesh.device(v.own);
    let healthy = dev
        .peers
        .iter()
        .filter(|p| p.last_handshake.is_some_and(|h| h < HEALTHY_HANDSHAKE))
        .count();
    let (backend, peers, interface) = match v.iface {
        Some(i) => (i.kind(), i.peer_count(), i.name().to_owned()),
        None => (crate::wireguard::BackendKind::Userspace, 0, String::new()),
    };
    StatusInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        device_name: v.membership.device_name(v.mesh, v.own),
        public_key: v.own.to_string(),
        interface,
        backend,
        listen_port: dev.listen_port.unwrap_or_default(),
        mesh_ipv4: me.map(|d| d.ipv4.to_string()).unwrap_or_default(),
        mesh_ipv6: me.map(|d| d.ipv6.to_string()).unwrap_or_default(),
        mesh_file: v
            .membership
            .mesh_file()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        peers,
        healthy_peers: healthy,
        uptime_seconds: v.started.elapsed().as_secs(),
        datapath: v.host.programs.info(v.split.exclusions().len()),
        exit_node: exit_info(v),
        registry: v.membership.info(),
    }
}

fn exit_info(v: &View<'_>) -> ExitInfo {
    let client = v.exit_client;
    let role = if v.exit_role.serving() {
        Role::ExitNode
    } else if client.wanted() || client.phase() != Phase::Off {
        Role::Client
    } else {
        Role::None
    };
    let uplinks = v.exit_role.uplinks();
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
            .and_then(|k| v.book().name(&k).map(str::to_owned)),
        uplink_ipv4: uplinks.and_then(|u| u.v4.clone()),
        uplink_ipv6: uplinks.and_then(|u| u.v6.clone()),
        withdrawn: v.exit_role.withdrawn(Instant::now()),
        conntrack: v.exit_role.conntrack(),
    }
}

fn peer_rows(v: &View<'_>, dev: &DeviceStatus) -> Vec<PeerRow> {
    v.mesh
        .peers_of(v.own)
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
                latest_handshake_seconds: live.and_then(|p| p.last_handshake).map(|h| h.as_secs()),
                transmitted_bytes: live.map_or(0, |p| p.tx_bytes),
                received_bytes: live.map_or(0, |p| p.rx_bytes),
                healthy: live
                    .and_then(|p| p.last_handshake)
                    .is_some_and(|h| h < HEALTHY_HANDSHAKE),
            }
        })
        .collect()
}

/// Every peer that announces itself (or last announced itself) as exit
/// node, sorted by name.
fn exit_rows(v: &View<'_>, now: Instant) -> Vec<ExitNodeRow> {
    let book = v.book();
    let active = v.exit_client.phase().exit_peer();
    let last_status = v.iface.and_then(|i| i.last_status());
    let mut rows: Vec<ExitNodeRow> = v
        .mesh
        .peers_of(v.own)
        .filter_map(|d| {
            let live = book.live(&d.public_key)?;
            let status = exit::status(live, now)?;
            let endpoint = last_status
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
                load: Load::believe(&live.load, d.exit_capacity).map(|l| ExitLoad {
                    forwarded_bps: l.forwarded_bps,
                    capacity_bps: l.capacity_bps,
                    headroom_bps: l.headroom_bps(),
                    clients: l.clients,
                }),
                chosen_because: (active == Some(d.public_key)).then(|| v.exit_client.reason_text()),
            })
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}

/// Why no exit node can be used now, for `enable`'s refusal.
pub fn unavailable(v: &View<'_>) -> String {
    let candidates = super::exit_client::Candidates {
        book: v.book(),
        mesh: v.mesh,
        own: v.own,
    };
    let known = exit_rows(v, Instant::now()).len();
    let detail = match v.exit_client.pinned(&candidates) {
        Err(()) => format!(
            "--exit-node {:?} names no device of the mesh",
            v.exit_client.pin().unwrap_or_default()
        ),
        Ok(Some(k)) => format!(
            "the pinned exit node {} is not available",
            v.heartbeats.name_of(&k)
        ),
        Ok(None) if known == 0 => "no device of the mesh announces itself as exit node (start one with `nexd router --exit-node`)".to_owned(),
        Ok(None) => format!(
            "{known} exit node(s) known, none available now; see `nexctl nexd exit-node list`"
        ),
    };
    format!(
        "cannot enable the exit node client: no exit node is available: {detail}. Nothing was changed."
    )
}
