//! The control protocol between `nexctl` and `nexd`: one JSON object per
//! line over a unix stream socket, one request and one reply per
//! connection. Documented in docs/CONTROL-PROTOCOL.md.
//!
//! Every message carries `protocol`, the protocol version. The envelope
//! (`protocol`, `method`, `ok`/`error`) never changes shape, so a nexctl and
//! a nexd of different versions can always tell each other so plainly.
//!
//! A crate of its own, apart from the agent: the wire types are all that
//! the end-to-end tests, the lab and the benchmarks need to read nexctl's
//! JSON *typed* (a renamed field fails to deserialize instead of showing
//! up as a timeout), and they must not pull in the agent and its eBPF
//! build to get them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Version of the request/reply formats. Bump it on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest request nexd reads; anything longer is refused unread.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Largest reply nexctl reads (a 1,000-peer list is about 400 KiB).
pub const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;

/// A request as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub protocol: u32,
    #[serde(flatten)]
    pub method: Method,
}

/// What nexctl asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Method {
    /// nexd's version and protocol.
    Version,
    /// Device, interface, backend and mesh summary.
    Status,
    /// Every configured peer with its live WireGuard state.
    PeersList,
    /// Data path counters.
    Stats,
    /// Exit nodes announced in the mesh.
    ExitNodeList,
    /// The exit node's clients with their traffic, denials and limits.
    ExitNodeClients,
    /// Send this device's internet traffic through an exit node.
    ExitNodeEnable,
    /// Restore the direct path.
    ExitNodeDisable,
    /// Prometheus text of nexd's metrics (what `--metrics-listen` serves).
    Metrics,
}

impl Method {
    /// Whether the request changes state (and so needs a privileged caller).
    pub fn is_mutating(&self) -> bool {
        match self {
            Method::Version
            | Method::Status
            | Method::PeersList
            | Method::Stats
            | Method::ExitNodeList
            | Method::ExitNodeClients
            | Method::Metrics => false,
            Method::ExitNodeEnable | Method::ExitNodeDisable => true,
        }
    }
}

/// A reply as sent on the wire: exactly one of `ok` and `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub protocol: u32,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Success or failure of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok(Reply),
    Error(ErrorReply),
}

/// A failure, with a stable machine-readable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// Stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request was not valid JSON, too large, or named an unknown method.
    BadRequest,
    /// nexctl and nexd speak different protocol versions.
    ProtocolMismatch,
    /// The caller may not make this request.
    PermissionDenied,
    /// The request is valid but cannot be done now (and nothing changed).
    Unavailable,
    /// nexd failed while doing it.
    Internal,
}

/// The successful result of each method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Version(VersionInfo),
    Status(Box<StatusInfo>),
    Peers {
        peers: Vec<PeerRow>,
    },
    Stats(StatsInfo),
    ExitNodes {
        exit_nodes: Vec<ExitNodeRow>,
    },
    ExitClients {
        clients: Vec<ExitClientRow>,
    },
    /// A change was made (or was already in place); `message` says what.
    Done {
        message: String,
    },
    /// Prometheus text exposition format.
    Metrics {
        text: String,
    },
}

/// How an exit node looks to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// A fresh announcement and a recent handshake: usable now.
    Available,
    /// It announced itself as exit node, but not recently enough.
    Stale,
}

/// The WireGuard implementation nexd runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// The kernel module, configured over netlink.
    Kernel,
    /// In-process userspace WireGuard.
    Userspace,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace (boringtun)",
        })
    }
}

/// How the eBPF programs are attached on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    /// TCX links (kernel 6.6 and later).
    Tcx,
    /// Direct-action filters on a clsact qdisc (older kernels).
    Clsact,
}

/// Packets and bytes of one counter, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterTotal {
    pub packets: u64,
    pub bytes: u64,
}

/// The exit-node role of this device, in `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `nexd router --exit-node`.
    ExitNode,
    /// An exit-node client (wanted, or still installed).
    Client,
    /// Neither.
    None,
}

/// The exit-node client's phase, in `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientPhase {
    /// Not wanted; nothing installed.
    Off,
    /// Wanted, no exit node available yet; the direct path is kept.
    Waiting,
    /// Internet traffic goes through `active_exit_node`.
    Active,
    /// The exit node went away and none is available: internet traffic
    /// is held back, not leaked.
    Held,
}

impl Role {
    /// The wire name, for tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ExitNode => "exit_node",
            Role::Client => "client",
            Role::None => "none",
        }
    }
}

impl ClientPhase {
    /// The wire name, for tables.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientPhase::Off => "off",
            ClientPhase::Waiting => "waiting",
            ClientPhase::Active => "active",
            ClientPhase::Held => "held",
        }
    }
}

/// One row of `exit-node list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitNodeRow {
    /// The exit node's underlay endpoint as WireGuard sees it.
    pub endpoint_address: Option<String>,
    pub public_key: String,
    pub name: String,
    pub mesh_ipv4: String,
    pub mesh_ipv6: String,
    /// `available`: fresh announcement and recent handshake; else `stale`.
    pub status: ExitStatus,
    /// This client sends its internet traffic through it now.
    pub active: bool,
    /// Round-trip time through the tunnel, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Seconds since its last announcement.
    pub last_heard_seconds: Option<f64>,
    /// Its load as this client believes it (issue 23); absent when it
    /// reports none (an agent before load-aware selection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<ExitLoad>,
    /// On the row of the exit node in use: why this client chose it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_because: Option<String>,
}

/// An exit node's load in `exit-node list`: what it reports, its capacity
/// bounded by the mesh file's `exit_capacity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitLoad {
    /// Forwarded through its uplinks, bits per second (the busier
    /// direction).
    pub forwarded_bps: u64,
    /// What this client believes it can forward, bits per second.
    pub capacity_bps: u64,
    /// Capacity minus forwarded, bits per second.
    pub headroom_bps: u64,
    /// Devices using it now, as it reports.
    pub clients: u16,
}

/// One client of the exit node, as `nexctl nexd exit-node clients` shows
/// it (CLIENT, MESH IP, RX, TX, DENIED, RATE LIMIT): the CPUs summed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitClientRow {
    /// The device's name in the mesh file.
    pub client: String,
    /// Its mesh addresses.
    pub addresses: Vec<std::net::IpAddr>,
    /// Received from the client and forwarded (the exit node's WireGuard
    /// ingress): packets (GSO segments) and bytes (IP packet bytes; a
    /// GRO/GSO aggregate counts as its segments, each with its headers).
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Forwarded to the client (the exit node's WireGuard egress).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Dropped packets by reason (stable snake_case names such as
    /// `private`, `metadata`, `connected`, `host_address`,
    /// `rate_limit_from_client`), only reasons that occurred.
    pub denied: std::collections::BTreeMap<String, u64>,
    /// All dropped packets.
    pub denied_total: u64,
    /// Rate limits in bits per second (`None`: unlimited).
    pub rate_limit_from_client: Option<u64>,
    pub rate_limit_to_client: Option<u64>,
}

/// The exit-node side of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub role: Role,
    /// Client: whether the client is wanted (flag or nexctl).
    pub client_wanted: bool,
    pub client_phase: ClientPhase,
    /// Client: name of the exit node in use.
    pub active_exit_node: Option<String>,
    /// Exit node: uplink interfaces.
    pub uplink_ipv4: Option<String>,
    pub uplink_ipv6: Option<String>,
    /// Exit node: why it does not announce itself to the mesh now (no
    /// default route, probe targets not answering, damping after a
    /// loss); absent while it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdrawn: Option<String>,
    /// Exit node: what its connection tracking holds (absent when not
    /// serving, or without conntrack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<ConntrackInfo>,
}

/// An exit node's connection tracking and masquerade port use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackInfo {
    /// Tracked flows now (`nf_conntrack_count`).
    pub entries: u64,
    /// The table's size (`nf_conntrack_max`).
    pub max: Option<u64>,
    /// Flows masqueraded now (absent where the kernel does not list its
    /// flows: no `/proc/net/nf_conntrack`).
    pub masqueraded: Option<u64>,
    /// The destination with the most masqueraded flows, e.g.
    /// `udp 203.0.113.10:53 as 192.0.2.1`...
    pub busiest_destination: Option<String>,
    /// ...and how many ports of the masquerade address it uses...
    pub busiest_destination_ports: Option<u64>,
    /// ...of this many (TCP and UDP get ports 1024-65535).
    pub ports_per_destination: u64,
}

/// Reply to `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    pub protocol: u32,
}

/// Reply to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub version: String,
    pub device_name: String,
    pub public_key: String,
    pub interface: String,
    pub backend: BackendKind,
    pub listen_port: u16,
    pub mesh_ipv4: String,
    pub mesh_ipv6: String,
    pub mesh_file: String,
    pub peers: usize,
    pub healthy_peers: usize,
    pub uptime_seconds: u64,
    pub datapath: DatapathInfo,
    pub exit_node: ExitInfo,
    /// Membership through etcd (`--registry`); absent with a mesh file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryInfo>,
}

/// State of the eBPF data path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathInfo {
    pub attached: bool,
    pub mode: Option<AttachMode>,
    /// Why it is not attached, when it is not.
    pub error: Option<String>,
    /// LAN interfaces with the steering classifier.
    pub steering_interfaces: Vec<String>,
    /// Uplinks with the leak guard attached.
    pub guard_interfaces: Vec<String>,
    /// The guards are pinned (`--kill-switch`): they survive a crash.
    pub guard_pinned: bool,
    /// Prefixes in the bypass tries (built-ins, LAN, exclusions, endpoints).
    pub bypass_prefixes: usize,
    /// Excluded prefixes (split tunnelling).
    pub excluded_routes: usize,
}

/// One row of `peers list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    pub name: String,
    pub public_key: String,
    /// Current endpoint as WireGuard sees it (it follows roaming peers).
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    pub mesh_ipv4: String,
    pub mesh_ipv6: String,
    /// Seconds since the last handshake; `None` if there was none.
    pub latest_handshake_seconds: Option<u64>,
    pub transmitted_bytes: u64,
    pub received_bytes: u64,
    /// A handshake completed within the last 180 seconds (WireGuard's
    /// reject-after time), so the session is usable.
    pub healthy: bool,
}

/// Reply to `stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsInfo {
    pub datapath: DatapathInfo,
    pub counters: Vec<CounterRow>,
}

/// One data path counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRow {
    pub name: String,
    #[serde(flatten)]
    pub total: CounterTotal,
}

// ---- Membership through etcd (issue 14): the registry side of `status` ----

/// Where this device stands with the registry (`nexd --registry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryInfo {
    /// `etcd://HOST:PORT[,...]/PREFIX`.
    pub url: String,
    /// A session with an etcd member is up.
    pub connected: bool,
    pub membership: MembershipState,
    /// Where the membership in force came from; `None` before the first.
    pub source: Option<MembershipSource>,
    /// The etcd revision last read.
    pub revision: i64,
    /// Devices in the membership in force (this one included).
    pub devices: usize,
    /// Records not used right now, with the reason (bad or missing
    /// signature, revoked, conflicting...).
    pub ignored: Vec<IgnoredRecord>,
    /// Rejected values seen since start (each bad write counts).
    pub rejected_total: u64,
    /// Full reads after a watch fell behind a compaction.
    pub resyncs: u64,
    /// etcd sessions that ended with an error.
    pub disconnects: u64,
    /// Why the last session ended, while it is not back.
    pub last_error: Option<String>,
}

/// This device's membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipState {
    /// Nothing heard yet (etcd not reached, no cache).
    Starting,
    /// Not a member: the join request is published, no peers are
    /// configured until the admin approves it.
    WaitingForApproval,
    /// Was a member and was revoked: every peer was removed; the join
    /// request is published again.
    Revoked,
    /// Approved: peers are configured from the signed records.
    Member,
}

impl MembershipState {
    /// For tables: what an operator reads.
    pub fn as_str(self) -> &'static str {
        match self {
            MembershipState::Starting => "starting",
            MembershipState::WaitingForApproval => "waiting for approval",
            MembershipState::Revoked => "revoked (waiting for approval)",
            MembershipState::Member => "member",
        }
    }
}

/// Where the membership in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipSource {
    /// Read from etcd at this revision.
    Registry { revision: i64 },
    /// From the cache in the state directory (etcd was unreachable at
    /// start), saved at this Unix time.
    Cache { saved_at: u64 },
}

/// A registry record that is not used, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IgnoredRecord {
    /// Its etcd key.
    pub key: String,
    pub reason: String,
}

impl Response {
    pub fn ok(reply: Reply) -> Self {
        Response {
            protocol: PROTOCOL_VERSION,
            outcome: Outcome::Ok(reply),
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response {
            protocol: PROTOCOL_VERSION,
            outcome: Outcome::Error(ErrorReply {
                code,
                message: message.into(),
            }),
        }
    }
}

/// Decodes one request line, checking the protocol version before the
/// method so a version mismatch is reported as such, not as a bad method.
pub fn decode_request(line: &[u8]) -> Result<Request, ErrorReply> {
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| ErrorReply {
        code: ErrorCode::BadRequest,
        message: format!("request is not valid JSON: {e}"),
    })?;
    let protocol = value
        .get("protocol")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| ErrorReply {
            code: ErrorCode::BadRequest,
            message: "request has no numeric \"protocol\" field".into(),
        })?;
    if protocol != u64::from(PROTOCOL_VERSION) {
        return Err(ErrorReply {
            code: ErrorCode::ProtocolMismatch,
            message: format!(
                "this nexd (version {}) speaks control protocol {PROTOCOL_VERSION}, the client speaks {protocol}; use the nexctl that came with this nexd",
                env!("CARGO_PKG_VERSION")
            ),
        });
    }
    serde_json::from_value(value).map_err(|e| ErrorReply {
        code: ErrorCode::BadRequest,
        message: format!("invalid request: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_stable() {
        let req = Request {
            protocol: PROTOCOL_VERSION,
            method: Method::PeersList,
        };
        let json = serde_json::to_string(&req).expect("encode");
        assert_eq!(json, r#"{"protocol":1,"method":"peers_list"}"#);
        assert_eq!(decode_request(json.as_bytes()), Ok(req));
    }

    #[test]
    fn error_reply_wire_format_is_stable() {
        let resp = Response::error(ErrorCode::Unavailable, "no exit node");
        let json = serde_json::to_string(&resp).expect("encode");
        assert_eq!(
            json,
            r#"{"protocol":1,"error":{"code":"unavailable","message":"no exit node"}}"#
        );
        let back: Response = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, resp);
    }

    #[test]
    fn bad_requests_are_named() {
        let e = decode_request(b"{nope").expect_err("bad json");
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = decode_request(br#"{"method":"status"}"#).expect_err("no protocol");
        assert!(e.message.contains("protocol"), "{e:?}");
        let e = decode_request(br#"{"protocol":1,"method":"reboot"}"#).expect_err("unknown");
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("reboot"), "{e:?}");
        let e = decode_request(br#"{"protocol":99,"method":"reboot"}"#).expect_err("version");
        assert_eq!(e.code, ErrorCode::ProtocolMismatch);
        assert!(e.message.contains("99"), "{e:?}");
    }
}
