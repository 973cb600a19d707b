//! `nexctl`: the command line for a running nexd. Argument definitions and
//! one function per verb; all talking goes through `control::client`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory as _, Parser, Subcommand};
use serde::Serialize;

use super::{
    exit,
    output::{self, OutputFormat, Table, human_age, human_bytes},
    watch::{self, WatchArgs},
};
use crate::control::{
    client::{self, ClientError},
    protocol::{
        ErrorCode, ExitClientRow, ExitNodeRow, MembershipSource, MembershipState, Method,
        PROTOCOL_VERSION, PeerRow, RegistryInfo, Reply, StatsInfo, StatusInfo, VersionInfo,
    },
};
use crate::instance::Instance;

#[derive(Debug, Parser)]
#[command(
    name = "nexctl",
    version,
    about = "Inspect and control the nexd mesh agent",
    after_help = "Exit status: 0 ok, 1 failure, 2 bad usage, 3 nexd unreachable, 4 permission denied, 5 version mismatch, 6 unavailable (nothing changed).\n\nShell completion: nexctl completion bash > /etc/bash_completion.d/nexctl"
)]
pub struct Cli {
    /// nexd's control socket. Default: the one nexd's configuration names
    /// (`--config`, NEXD_SOCKET), else /run/nexd.sock.
    #[arg(long, global = true, env = "NEXCTL_SOCKET")]
    pub socket: Option<PathBuf>,
    /// nexd's configuration file, read as nexd reads it (with the NEXD_*
    /// variables): where its socket is, and, when nexd is dead, what it
    /// installed. Default: NEXD_CONFIG, else /etc/nexd/nexd.toml if present.
    #[arg(long, global = true, env = "NEXD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output format of listings: column, no-header, json, yaml.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Column)]
    pub output: OutputFormat,
    /// Seconds to wait for nexd's answer.
    #[arg(long, global = true, default_value_t = 10)]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Commands for the nexd agent.
    #[command(subcommand)]
    Nexd(NexdCommand),
    /// Same as `nexctl nexd exit-node`.
    #[command(subcommand)]
    ExitNode(ExitNodeCommand),
    /// The mesh admin's commands: membership in etcd, signed with the
    /// admin key (talks to etcd, not to nexd).
    Mesh(Box<super::mesh::MeshArgs>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages of nexd and nexctl into DIR (for packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum NexdCommand {
    /// nexctl's and nexd's versions.
    Version,
    /// This device, its interface and the mesh at a glance.
    Status,
    /// Mesh peers.
    #[command(subcommand)]
    Peers(PeersCommand),
    /// eBPF data path counters.
    Stats,
    /// nexd's metrics in Prometheus text format.
    Metrics,
    /// Exit nodes: list them, send this device's internet traffic through
    /// one, or go back to the direct path.
    #[command(subcommand)]
    ExitNode(ExitNodeCommand),
}

#[derive(Debug, Subcommand)]
pub enum ExitNodeCommand {
    /// Exit nodes of the mesh: ENDPOINT ADDRESS, PUBLIC KEY, NAME, MESH IP,
    /// STATUS, ACTIVE, RTT. With --watch, redrawn in place.
    List(WatchArgs),
    /// On an exit node: the devices it serves, with what they sent (RX)
    /// and received (TX) through it, what it refused (DENIED, by reason in
    /// json/yaml) and their RATE LIMIT (to the client / from the client).
    /// With --watch, redrawn in place, with each client's rates (RX/S,
    /// TX/S) since the last refresh.
    Clients(WatchArgs),
    /// Send this device's non-mesh traffic through an exit node. Fails (and
    /// changes nothing) when none is available.
    Enable,
    /// Remove the exit-node client config and restore the direct path.
    /// When nexd is not running, nexctl removes what nexd left itself.
    Disable(DisableArgs),
}

/// Where a stopped nexd's state is, used only when nexd is not running.
/// Each overrides what nexd's configuration (`--config`, NEXD_*) says.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DisableArgs {
    /// nexd's WireGuard interface.
    #[arg(long)]
    pub interface: Option<String>,
    /// nexd's state directory (original sysctl values).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Where nexd pins its leak guard.
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// nexd's `--exit-table`.
    #[arg(long)]
    pub exit_table: Option<u32>,
    /// nexd's `--exit-rule-priority`.
    #[arg(long)]
    pub exit_rule_priority: Option<u32>,
}

impl DisableArgs {
    /// `inst` with the overrides given on the command line.
    fn apply(&self, mut inst: Instance) -> Instance {
        if let Some(i) = &self.interface {
            inst.interface.clone_from(i);
        }
        if let Some(d) = &self.state_dir {
            inst.state_dir.clone_from(d);
        }
        if let Some(b) = &self.bpffs {
            inst.bpffs.clone_from(b);
        }
        if let Some(t) = self.exit_table {
            inst.policy.table = t;
        }
        if let Some(p) = self.exit_rule_priority {
            inst.policy.priority = p;
        }
        inst
    }
}

#[derive(Debug, Subcommand)]
pub enum PeersCommand {
    /// Every peer with its endpoint, handshake and traffic.
    List,
}

/// Runs the parsed command line and returns the process exit status.
pub fn run(cli: Cli) -> ExitCode {
    let cli = match cli.command {
        Command::Mesh(m) => return super::mesh::run(cli.output, *m),
        _ => cli,
    };
    match &cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "nexctl",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            let commands = [super::nexd::Cli::command(), Cli::command()];
            return match super::man::write_all(dir, &commands) {
                Ok(pages) => {
                    for p in pages {
                        println!("{}", p.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}", crate::error_text(&e));
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    // nexd's instance as its configuration describes it: needed for the
    // socket (unless given) and for cleaning up after a dead nexd.
    let needs_instance = cli.socket.is_none()
        || matches!(
            cli.command,
            Command::ExitNode(ExitNodeCommand::Disable(_))
                | Command::Nexd(NexdCommand::ExitNode(ExitNodeCommand::Disable(_)))
        );
    let instance = if needs_instance {
        match super::config::instance(cli.config.as_deref()) {
            Ok(i) => Some(i),
            Err(e) => {
                eprintln!("error: reading nexd's configuration: {e}");
                return ExitCode::from(exit::USAGE);
            }
        }
    } else {
        None
    };
    let socket = match (&cli.socket, &instance) {
        (Some(s), _) => s.clone(),
        (None, Some(i)) => i.socket.clone(),
        (None, None) => PathBuf::from(crate::instance::DEFAULT_SOCKET),
    };
    let ctx = Ctx {
        socket,
        output: cli.output,
        timeout: Duration::from_secs(cli.timeout.max(1)),
        instance,
    };
    let result = match cli.command {
        Command::Nexd(NexdCommand::Version) => version(&ctx),
        Command::Nexd(NexdCommand::Status) => status(&ctx),
        Command::Nexd(NexdCommand::Peers(PeersCommand::List)) => peers_list(&ctx),
        Command::Nexd(NexdCommand::Stats) => stats(&ctx),
        Command::Nexd(NexdCommand::Metrics) => match ctx.call(Method::Metrics) {
            Ok(Reply::Metrics { text }) => {
                print!("{text}");
                Ok(())
            }
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e),
        },
        Command::Nexd(NexdCommand::ExitNode(c)) | Command::ExitNode(c) => exit_node(&ctx, c),
        Command::Completion { .. } | Command::Man { .. } | Command::Mesh(_) => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit_status(&e))
        }
    }
}

/// The exit status for a failed call.
pub fn exit_status(e: &ClientError) -> u8 {
    match e {
        ClientError::NotRunning(_)
        | ClientError::Stale(_)
        | ClientError::Timeout { .. }
        | ClientError::Silent(_) => exit::UNREACHABLE,
        ClientError::PermissionDenied(_) => exit::PERMISSION,
        ClientError::ProtocolMismatch(_) => exit::VERSION_MISMATCH,
        ClientError::Remote(r) => match r.code {
            ErrorCode::PermissionDenied => exit::PERMISSION,
            ErrorCode::ProtocolMismatch => exit::VERSION_MISMATCH,
            ErrorCode::Unavailable => exit::UNAVAILABLE,
            ErrorCode::BadRequest | ErrorCode::Internal => exit::FAILURE,
        },
        ClientError::Io { .. } | ClientError::BadReply(_) | ClientError::Offline(_) => {
            exit::FAILURE
        }
    }
}

struct Ctx {
    socket: PathBuf,
    output: OutputFormat,
    timeout: Duration,
    /// nexd's instance from its configuration, when it was needed.
    instance: Option<Instance>,
}

impl Ctx {
    fn call(&self, method: Method) -> Result<Reply, ClientError> {
        client::call(&self.socket, method, self.timeout)
    }
}

fn unexpected(reply: &Reply) -> ClientError {
    ClientError::BadReply(format!("unexpected reply {reply:?}"))
}

fn version(ctx: &Ctx) -> Result<(), ClientError> {
    #[derive(Serialize)]
    struct Versions {
        nexctl: VersionInfo,
        nexd: Option<VersionInfo>,
    }
    let mine = VersionInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
    };
    let theirs = match ctx.call(Method::Version) {
        Ok(Reply::Version(v)) => Ok(v),
        Ok(other) => Err(unexpected(&other)),
        Err(e) => Err(e),
    };
    let both = Versions {
        nexctl: mine.clone(),
        nexd: theirs.as_ref().ok().cloned(),
    };
    output::print(ctx.output, &both, || {
        let mut t = Table::new(&["COMPONENT", "VERSION", "PROTOCOL"]);
        t.row(vec![
            "nexctl".into(),
            mine.version.clone(),
            mine.protocol.to_string(),
        ]);
        if let Ok(v) = &theirs {
            t.row(vec![
                "nexd".into(),
                v.version.clone(),
                v.protocol.to_string(),
            ]);
        }
        t
    });
    theirs.map(|_| ())
}

fn status(ctx: &Ctx) -> Result<(), ClientError> {
    let info: StatusInfo = match ctx.call(Method::Status)? {
        Reply::Status(s) => *s,
        other => return Err(unexpected(&other)),
    };
    output::print(ctx.output, &info, || {
        let mut t = Table::new(&["FIELD", "VALUE"]);
        let datapath = if info.datapath.attached {
            format!(
                "attached ({})",
                info.datapath
                    .mode
                    .map(|m| format!("{m:?}").to_lowercase())
                    .unwrap_or_default()
            )
        } else {
            format!(
                "not attached: {}",
                info.datapath.error.clone().unwrap_or_default()
            )
        };
        for (k, v) in [
            ("DEVICE", info.device_name.clone()),
            ("PUBLIC KEY", info.public_key.clone()),
            ("INTERFACE", info.interface.clone()),
            ("BACKEND", info.backend.to_string()),
            ("LISTEN PORT", info.listen_port.to_string()),
            ("MESH IPV4", info.mesh_ipv4.clone()),
            ("MESH IPV6", info.mesh_ipv6.clone()),
            (
                "PEERS",
                format!("{} ({} healthy)", info.peers, info.healthy_peers),
            ),
            ("DATA PATH", datapath),
            (
                "STEERING",
                if info.datapath.steering_interfaces.is_empty() {
                    "-".into()
                } else {
                    info.datapath.steering_interfaces.join(",")
                },
            ),
            (
                "LEAK GUARD",
                if info.datapath.guard_interfaces.is_empty() {
                    "off".into()
                } else {
                    format!(
                        "on {}{}",
                        info.datapath.guard_interfaces.join(","),
                        if info.datapath.guard_pinned {
                            " (pinned)"
                        } else {
                            ""
                        }
                    )
                },
            ),
            ("EXCLUDED ROUTES", info.datapath.excluded_routes.to_string()),
            (
                "EXIT NODE ROLE",
                match &info.exit_node.withdrawn {
                    Some(why) => format!("{} (withdrawn: {why})", info.exit_node.role.as_str()),
                    None => info.exit_node.role.as_str().to_owned(),
                },
            ),
            (
                "EXIT NODE CLIENT",
                match &info.exit_node.active_exit_node {
                    Some(name) => format!("{} via {name}", info.exit_node.client_phase.as_str()),
                    None => info.exit_node.client_phase.as_str().to_owned(),
                },
            ),
        ] {
            t.row(vec![k.into(), v]);
        }
        if let Some(ct) = &info.exit_node.conntrack {
            t.row(vec!["EXIT CONNTRACK".into(), conntrack_text(ct)]);
        }
        match &info.registry {
            None => t.row(vec!["MESH FILE".into(), info.mesh_file.clone()]),
            Some(r) => {
                for (k, v) in registry_rows(r) {
                    t.row(vec![k.into(), v]);
                }
            }
        }
        t.row(vec!["UPTIME".into(), format!("{}s", info.uptime_seconds)]);
        t.row(vec!["VERSION".into(), info.version.clone()]);
        t
    });
    Ok(())
}

/// The EXIT CONNTRACK row of `status`: an exit node's tracked flows, and
/// the masquerade ports its busiest destination uses.
fn conntrack_text(ct: &nexd_proto::ConntrackInfo) -> String {
    let mut s = match ct.max {
        Some(max) => format!("{} of {max} flows", ct.entries),
        None => format!("{} flows", ct.entries),
    };
    if let Some(m) = ct.masqueraded {
        s.push_str(&format!(", {m} masqueraded"));
    }
    if let (Some(d), Some(p)) = (&ct.busiest_destination, ct.busiest_destination_ports) {
        s.push_str(&format!(
            "; busiest {d}: {p} of {} ports",
            ct.ports_per_destination
        ));
    }
    s
}

/// The REGISTRY, MEMBERSHIP and IGNORED RECORDS rows of `status` (nexd
/// runs with `--registry`).
fn registry_rows(r: &RegistryInfo) -> [(&'static str, String); 3] {
    let connection = if r.connected {
        format!("{} (connected, revision {})", r.url, r.revision)
    } else {
        format!(
            "{} (unreachable: {})",
            r.url,
            r.last_error.as_deref().unwrap_or("not connected yet")
        )
    };
    let membership = match (r.membership, r.source) {
        (MembershipState::Member, Some(MembershipSource::Registry { revision })) => format!(
            "member ({} devices, from etcd at revision {revision})",
            r.devices
        ),
        (MembershipState::Member, Some(MembershipSource::Cache { saved_at })) => format!(
            "member ({} devices, from the cache saved at Unix time {saved_at}: etcd unreachable)",
            r.devices
        ),
        (state, _) => state.as_str().to_owned(),
    };
    let ignored = if r.ignored.is_empty() {
        format!("0 ({} rejected since start)", r.rejected_total)
    } else {
        let list: Vec<String> = r
            .ignored
            .iter()
            .map(|i| format!("{}: {}", i.key, i.reason))
            .collect();
        format!(
            "{} ({} rejected since start): {}",
            r.ignored.len(),
            r.rejected_total,
            list.join("; ")
        )
    };
    [
        ("REGISTRY", connection),
        ("MEMBERSHIP", membership),
        ("IGNORED RECORDS", ignored),
    ]
}

fn peers_list(ctx: &Ctx) -> Result<(), ClientError> {
    let peers: Vec<PeerRow> = match ctx.call(Method::PeersList)? {
        Reply::Peers { peers } => peers,
        other => return Err(unexpected(&other)),
    };
    output::print(ctx.output, &peers, || {
        let mut t = Table::new(&[
            "PUBLIC KEY",
            "ENDPOINT",
            "ALLOWED IPS",
            "LATEST HANDSHAKE",
            "TRANSMITTED",
            "RECEIVED",
            "HEALTHY",
            "NAME",
            "MESH IP",
        ]);
        for p in &peers {
            t.row(vec![
                p.public_key.clone(),
                p.endpoint.clone().unwrap_or_else(|| "-".into()),
                if p.allowed_ips.is_empty() {
                    "-".into()
                } else {
                    p.allowed_ips.join(",")
                },
                human_age(p.latest_handshake_seconds),
                human_bytes(p.transmitted_bytes),
                human_bytes(p.received_bytes),
                p.healthy.to_string(),
                p.name.clone(),
                format!("{},{}", p.mesh_ipv4, p.mesh_ipv6),
            ]);
        }
        t
    });
    Ok(())
}

fn exit_node(ctx: &Ctx, cmd: ExitNodeCommand) -> Result<(), ClientError> {
    if let ExitNodeCommand::List(w) | ExitNodeCommand::Clients(w) = &cmd
        && let Some(interval) = w
            .interval()
            .map_err(|e| ClientError::BadReply(e.to_string()))?
    {
        watch_exit(ctx, &cmd, interval, w.count);
        return Ok(());
    }
    let method = match &cmd {
        ExitNodeCommand::List(_) => Method::ExitNodeList,
        ExitNodeCommand::Clients(_) => Method::ExitNodeClients,
        ExitNodeCommand::Enable => Method::ExitNodeEnable,
        ExitNodeCommand::Disable(_) => Method::ExitNodeDisable,
    };
    let reply = match (ctx.call(method), &cmd) {
        (Err(ClientError::NotRunning(_) | ClientError::Stale(_)), ExitNodeCommand::Disable(a)) => {
            let Some(inst) = ctx.instance.clone() else {
                return Err(ClientError::BadReply(
                    "nexd's configuration was not read".into(),
                ));
            };
            return disable_offline(&a.apply(inst));
        }
        (r, _) => r?,
    };
    match reply {
        Reply::Done { message } => {
            println!("{message}");
            Ok(())
        }
        Reply::ExitNodes { exit_nodes } => {
            print!("{}", render_exit_nodes(ctx.output, &exit_nodes));
            Ok(())
        }
        Reply::ExitClients { clients } => {
            print!("{}", render_exit_clients(ctx.output, &clients, None));
            Ok(())
        }
        other => Err(unexpected(&other)),
    }
}

/// `exit-node list --watch` and `exit-node clients --watch`.
fn watch_exit(ctx: &Ctx, cmd: &ExitNodeCommand, interval: Duration, count: Option<u64>) {
    let mut last: Option<(std::time::Instant, Vec<ExitClientRow>)> = None;
    watch::run(ctx.output, interval, count, || match cmd {
        ExitNodeCommand::Clients(_) => match ctx.call(Method::ExitNodeClients)? {
            Reply::ExitClients { clients } => {
                let now = std::time::Instant::now();
                let rates = last
                    .as_ref()
                    .map(|(t, before)| watch::client_rates(before, &clients, now - *t));
                let text = render_exit_clients(ctx.output, &clients, rates.as_ref());
                last = Some((now, clients));
                Ok(text)
            }
            other => Err(unexpected(&other)),
        },
        _ => match ctx.call(Method::ExitNodeList)? {
            Reply::ExitNodes { exit_nodes } => Ok(render_exit_nodes(ctx.output, &exit_nodes)),
            other => Err(unexpected(&other)),
        },
    });
}

/// The clients' table; with `rates` (a watch), each client's RX/S and
/// TX/S since the last refresh as well.
fn render_exit_clients(
    format: OutputFormat,
    rows: &[ExitClientRow],
    rates: Option<&std::collections::BTreeMap<String, (f64, f64)>>,
) -> String {
    let rate = |bps: Option<u64>| {
        bps.map_or_else(
            || "-".to_owned(),
            |b| {
                crate::mesh::Rate::from_bits_per_second(b)
                    .map_or_else(|| format!("{b}bit"), |r| r.to_string())
            },
        )
    };
    let mut out = String::new();
    output::render(&mut out, format, &rows, || {
        let mut headers = vec!["CLIENT", "MESH IP", "RX", "TX", "DENIED", "RATE LIMIT"];
        if rates.is_some() {
            headers.extend(["RX/S", "TX/S"]);
        }
        let mut t = Table::new(&headers);
        for r in rows {
            let limit = match (r.rate_limit_to_client, r.rate_limit_from_client) {
                (None, None) => "-".to_owned(),
                (to, from) if to == from => rate(to),
                (to, from) => format!("{}/{}", rate(to), rate(from)),
            };
            let mut cells = vec![
                r.client.clone(),
                r.addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                human_bytes(r.rx_bytes),
                human_bytes(r.tx_bytes),
                r.denied_total.to_string(),
                limit,
            ];
            if let Some(rates) = rates {
                let (rx, tx) = rates.get(&r.client).copied().unzip();
                cells.extend([watch::rate_cell(rx), watch::rate_cell(tx)]);
            }
            t.row(cells);
        }
        t
    });
    out
}

/// nexd is not running: remove what it left (its record and its fixed
/// names), then say exactly what was removed and whether the direct path is
/// really back; a non-zero status when it is not.
fn disable_offline(inst: &Instance) -> Result<(), ClientError> {
    match crate::offline::restore_direct_path(inst) {
        Ok(report) => {
            if report.removed.is_empty() {
                println!("nexd is not running, and it left nothing behind.");
            } else {
                println!("nexd is not running; removed what it left:");
                for r in &report.removed {
                    println!("  - {r}");
                }
            }
            if report.restored() {
                println!(
                    "The direct path is restored: no policy rule, route, leak guard or DNS redirect of nexd is left."
                );
                Ok(())
            } else {
                let left = report.remaining.join("; ");
                Err(ClientError::Offline(format!(
                    "the direct path is NOT restored, still in place: {left}"
                )))
            }
        }
        Err(e @ crate::offline::OfflineError::Running { .. }) => {
            Err(ClientError::Silent(e.to_string()))
        }
        Err(e) => Err(ClientError::Offline(format!(
            "nexd is not running, and removing what it left failed: {}",
            crate::error_text(&anyhow::Error::from(e))
        ))),
    }
}

fn render_exit_nodes(format: OutputFormat, rows: &[ExitNodeRow]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    output::render(&mut out, format, &rows, || {
        let mut t = Table::new(&[
            "ENDPOINT ADDRESS",
            "PUBLIC KEY",
            "NAME",
            "MESH IP",
            "STATUS",
            "ACTIVE",
            "RTT",
            "LOAD",
            "HEADROOM",
            "CLIENTS",
        ]);
        for r in rows {
            let load = r.load.map_or_else(
                || ["-".to_owned(), "-".to_owned(), "-".to_owned()],
                |l| {
                    [
                        format!(
                            "{}/{} ({}%)",
                            bits(l.forwarded_bps),
                            bits(l.capacity_bps),
                            (l.forwarded_bps as f64 * 100.0 / l.capacity_bps.max(1) as f64).round()
                        ),
                        bits(l.headroom_bps),
                        l.clients.to_string(),
                    ]
                },
            );
            let mut row = vec![
                r.endpoint_address.clone().unwrap_or_else(|| "-".into()),
                r.public_key.clone(),
                r.name.clone(),
                format!("{},{}", r.mesh_ipv4, r.mesh_ipv6),
                format!("{:?}", r.status).to_lowercase(),
                if r.active { "yes".into() } else { "no".into() },
                r.rtt_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms")),
            ];
            row.extend(load);
            t.row(row);
        }
        t
    });
    if matches!(format, OutputFormat::Column | OutputFormat::NoHeader)
        && let Some(r) = rows.iter().find(|r| r.active)
        && let Some(why) = &r.chosen_because
    {
        let _ = writeln!(out, "using {}: {why}", r.name);
    }
    out
}

/// Bits per second in the largest unit that keeps it readable: `250mbit`,
/// `1.5gbit`, `0`.
fn bits(bps: u64) -> String {
    match bps {
        0 => "0".into(),
        b if b >= 1_000_000_000 => format!("{:.1}gbit", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.0}mbit", b as f64 / 1e6),
        b => format!("{:.0}kbit", b as f64 / 1e3),
    }
}

fn stats(ctx: &Ctx) -> Result<(), ClientError> {
    let info: StatsInfo = match ctx.call(Method::Stats)? {
        Reply::Stats(s) => s,
        other => return Err(unexpected(&other)),
    };
    output::print(ctx.output, &info, || {
        let mut t = Table::new(&["COUNTER", "PACKETS", "BYTES"]);
        for c in &info.counters {
            t.row(vec![
                c.name.clone(),
                c.total.packets.to_string(),
                c.total.bytes.to_string(),
            ]);
        }
        t
    });
    if !info.datapath.attached {
        eprintln!(
            "note: the eBPF data path is not attached: {}",
            info.datapath.error.unwrap_or_default()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_nodes_conntrack_reads_as_one_line() {
        let mut ct = nexd_proto::ConntrackInfo {
            entries: 640,
            max: Some(262_144),
            masqueraded: Some(632),
            busiest_destination: Some("udp 203.0.113.10:7777 as 192.0.2.1".into()),
            busiest_destination_ports: Some(628),
            ports_per_destination: 64_512,
        };
        assert_eq!(
            conntrack_text(&ct),
            "640 of 262144 flows, 632 masqueraded; busiest udp 203.0.113.10:7777 as 192.0.2.1: 628 of 64512 ports"
        );
        ct.max = None;
        ct.masqueraded = None;
        ct.busiest_destination = None;
        assert_eq!(conntrack_text(&ct), "640 flows");
    }

    #[test]
    fn exit_node_list_shows_load_headroom_and_why() {
        let row = |name: &str, active: bool, load: Option<nexd_proto::ExitLoad>| ExitNodeRow {
            endpoint_address: None,
            public_key: "k".into(),
            name: name.into(),
            mesh_ipv4: "100.64.0.1".into(),
            mesh_ipv6: "fd00::1".into(),
            status: nexd_proto::ExitStatus::Available,
            active,
            rtt_ms: Some(1.0),
            last_heard_seconds: Some(0.2),
            load,
            chosen_because: active
                .then(|| "weighted by headroom among 2 comparable exit nodes".into()),
        };
        let rows = [
            row(
                "x1",
                true,
                Some(nexd_proto::ExitLoad {
                    forwarded_bps: 150_000_000,
                    capacity_bps: 200_000_000,
                    headroom_bps: 50_000_000,
                    clients: 3,
                }),
            ),
            row("x2", false, None),
        ];
        let text = render_exit_nodes(OutputFormat::Column, &rows);
        assert!(text.contains("LOAD") && text.contains("HEADROOM"), "{text}");
        assert!(
            text.contains("150mbit/200mbit (75%)") && text.contains("50mbit"),
            "{text}"
        );
        assert!(
            text.ends_with("using x1: weighted by headroom among 2 comparable exit nodes\n"),
            "{text}"
        );
        // JSON carries the same, and no line after the document.
        let json = render_exit_nodes(OutputFormat::Json, &rows);
        assert!(json.contains("\"headroom_bps\": 50000000"), "{json}");
        assert!(!json.contains("using x1"), "{json}");
        assert_eq!(bits(1_500_000_000), "1.5gbit");
    }

    #[test]
    fn exit_node_alias_parses_like_the_long_form() {
        let a = Cli::try_parse_from(["nexctl", "exit-node", "disable"]).expect("alias");
        let b = Cli::try_parse_from(["nexctl", "nexd", "exit-node", "disable"]).expect("long");
        assert!(matches!(
            a.command,
            Command::ExitNode(ExitNodeCommand::Disable(_))
        ));
        assert!(matches!(
            b.command,
            Command::Nexd(NexdCommand::ExitNode(ExitNodeCommand::Disable(_)))
        ));
    }

    #[test]
    fn output_flag_accepts_both_forms_and_any_position() {
        let a =
            Cli::try_parse_from(["nexctl", "--output=json", "nexd", "peers", "list"]).expect("a");
        assert_eq!(a.output, OutputFormat::Json);
        let b =
            Cli::try_parse_from(["nexctl", "nexd", "peers", "list", "-o", "no-header"]).expect("b");
        assert_eq!(b.output, OutputFormat::NoHeader);
        assert!(Cli::try_parse_from(["nexctl", "--output=xml", "nexd", "status"]).is_err());
    }
}
