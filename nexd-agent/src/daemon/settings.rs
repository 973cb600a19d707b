//! The command line's `Options`, split once into what each component
//! needs. Nothing after the split reads the whole set: a component gets
//! its own settings at construction, so what it depends on is visible in
//! its type, and a new option touches the CLI, this split and one owner.

use std::{net::SocketAddr, path::PathBuf};

use ipnet::IpNet;

use super::{
    exit_server::ExitSettings, lan_gateway::GatewaySettings, ledger_record::RecordSettings,
    programs::ProgramSettings,
};
use crate::{exit::plan::Policy, routing::PolicyNumbers, wireguard::BackendChoice};

/// Everything the daemon needs to know from its command line, as the CLI
/// fills it; `run` splits it once into each component's settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub mesh_file: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub interface: String,
    pub wireguard: BackendChoice,
    /// `nexd router --exit-node`: serve as exit node.
    pub exit_server: Option<ExitServerOptions>,
    /// `--exit-node-client`: send internet traffic through an exit node
    /// as soon as one is available.
    pub exit_node_client: bool,
    /// Table, mark and rule priorities of the client's policy routing.
    pub policy: PolicyNumbers,
    /// LAN interfaces this device is a gateway for (steering classifier).
    pub lan_interfaces: Vec<String>,
    /// `--exclude-route` prefixes.
    pub exclude_routes: Vec<ipnet::IpNet>,
    /// `--exclude-routes-file`, re-read on SIGHUP.
    pub exclude_routes_file: Option<PathBuf>,
    /// `--kill-switch`: the leak guard, pinned so it survives a crash.
    pub kill_switch: bool,
    /// `--exit-node-allow-lan-dns`: DNS keeps going to the configured
    /// resolvers (a LAN resolver sees the queries) instead of the exit node.
    pub exit_node_allow_lan_dns: bool,
    /// `--kill-switch-allow`: prefixes the guard lets out directly.
    pub kill_switch_allow: Vec<ipnet::IpNet>,
    /// Log every packet the leak guard drops (debug level).
    pub log_guard_drops: bool,
    /// Where bpffs is (pins).
    pub bpffs: PathBuf,
    /// The uplink (exit node masquerade, leak guard); default: the
    /// interfaces of the default routes.
    pub uplink: Option<String>,
    /// Run without the eBPF data path (benchmark baseline).
    pub no_ebpf: bool,
    /// Clamp TCP's MSS on the exit node's and the gateway's tunnel.
    pub mss_clamp: bool,
    /// Probe the exit node in use (fast failover); off only for the
    /// benchmark's baseline (`--no-exit-probes`).
    pub exit_probes: bool,
    /// `--exit-node NAME|PUBLIC_KEY`: use only this exit node.
    pub exit_node_pin: Option<String>,
    /// Group allowed read-only access to the control socket.
    pub socket_group: Option<String>,
    /// Address of the Prometheus endpoint, if any.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `--registry`: membership through etcd instead of the mesh file.
    pub registry: Option<crate::registry::DeviceConfig>,
}

/// Options of the exit node role.
#[derive(Debug, Clone, Default)]
pub struct ExitServerOptions {
    /// `--exit-allow`: subnets shared with the clients besides the internet.
    pub allow: Vec<ipnet::IpNet>,
    /// `--exit-rate-limit`: each client's limit where its entry has none.
    pub rate_limit: Option<crate::mesh::Rate>,
    /// `--exit-probe-target`: withdraw the exit capability when none of
    /// these answers a TCP connect.
    pub probe_targets: Vec<std::net::SocketAddr>,
}

/// Every component's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub control: ControlSettings,
    pub membership: MembershipSettings,
    pub interface: InterfaceSettings,
    pub split: SplitSettings,
    pub client: ClientSettings,
    /// `None` without `router --exit-node`.
    pub exit: Option<ExitSettings>,
    pub programs: ProgramSettings,
    pub gateway: GatewaySettings,
    pub record: RecordSettings,
}

/// The control socket and the metrics endpoint.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    pub socket: PathBuf,
    /// Group allowed read-only access to the socket.
    pub socket_group: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
}

/// Where the membership comes from.
#[derive(Debug, Clone)]
pub struct MembershipSettings {
    pub mesh_file: PathBuf,
    /// `--registry`: etcd instead of the mesh file.
    pub registry: Option<crate::registry::DeviceConfig>,
    /// The registry's cache lives here.
    pub state_dir: PathBuf,
}

/// The WireGuard interface.
#[derive(Debug, Clone)]
pub struct InterfaceSettings {
    pub name: String,
    pub backend: BackendChoice,
}

/// `--exclude-route` and the excluded-routes file.
#[derive(Debug, Clone)]
pub struct SplitSettings {
    pub routes: Vec<IpNet>,
    pub file: Option<PathBuf>,
    /// The excluded-routes table (nexd's table + 1).
    pub table: u32,
}

/// The exit-node client.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// `--exit-node-client`: wanted from the start.
    pub wanted: bool,
    /// Table, mark and rule priorities of its policy routing.
    pub numbers: PolicyNumbers,
    /// Kill switch and private DNS.
    pub policy: Policy,
    /// `--exit-node NAME|PUBLIC_KEY`: only this exit node.
    pub pin: Option<String>,
    /// Probe the exit node in use (off only for a benchmark baseline).
    pub probes: bool,
}

impl Settings {
    /// Splits `opts`, refusing combinations no component could serve.
    pub fn split(opts: Options) -> anyhow::Result<Self> {
        if opts.exit_server.is_some() && opts.exit_node_client {
            anyhow::bail!(
                "--exit-node-client cannot be combined with `router --exit-node`: an exit node sends its own traffic out directly"
            );
        }
        if opts.exit_server.is_some() && (opts.kill_switch || !opts.lan_interfaces.is_empty()) {
            anyhow::bail!(
                "--kill-switch and --lan-interface are exit-node client options; they cannot be used with `router --exit-node`"
            );
        }
        let exit = opts.exit_server.map(|role| ExitSettings {
            wg_iface: opts.interface.clone(),
            uplink: opts.uplink.clone(),
            allow: role.allow,
            rate_limit: role.rate_limit,
            probe_targets: role.probe_targets,
            state_dir: opts.state_dir.clone(),
        });
        Ok(Settings {
            control: ControlSettings {
                socket: opts.socket,
                socket_group: opts.socket_group,
                metrics_listen: opts.metrics_listen,
            },
            membership: MembershipSettings {
                mesh_file: opts.mesh_file,
                registry: opts.registry,
                state_dir: opts.state_dir.clone(),
            },
            interface: InterfaceSettings {
                name: opts.interface.clone(),
                backend: opts.wireguard,
            },
            split: SplitSettings {
                routes: opts.exclude_routes,
                file: opts.exclude_routes_file,
                table: opts.policy.exclusion_table(),
            },
            client: ClientSettings {
                wanted: opts.exit_node_client,
                numbers: opts.policy,
                policy: Policy {
                    kill_switch: opts.kill_switch,
                    private_dns: !opts.exit_node_allow_lan_dns,
                },
                pin: opts.exit_node_pin,
                probes: opts.exit_probes,
            },
            gateway: GatewaySettings {
                wg_iface: opts.interface.clone(),
                lan_interfaces: opts.lan_interfaces.clone(),
            },
            programs: ProgramSettings {
                wg_iface: opts.interface.clone(),
                lan_interfaces: opts.lan_interfaces.clone(),
                uplink: opts.uplink,
                kill_switch: opts.kill_switch,
                kill_switch_allow: opts.kill_switch_allow,
                log_guard_drops: opts.log_guard_drops,
                no_ebpf: opts.no_ebpf,
                mss_clamp: opts.mss_clamp,
                fwmark: opts.policy.fwmark,
                bpffs: opts.bpffs.clone(),
                exit_node: exit.is_some(),
            },
            record: RecordSettings {
                state_dir: opts.state_dir.clone(),
                interface: opts.interface,
                bpffs: opts.bpffs,
                numbers: opts.policy,
                kill_switch: opts.kill_switch,
                lan_interfaces: opts.lan_interfaces,
            },
            exit,
            state_dir: opts.state_dir,
        })
    }
}
