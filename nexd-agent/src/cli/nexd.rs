//! `nexd`'s command line: run the agent (optionally as a router), or manage
//! the device key.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use super::registry_args::RegistryArgs;
use crate::{
    daemon, exclude, instance, keys, registry::DeviceConfig, routing, wireguard::BackendChoice,
};

#[derive(Debug, Parser)]
#[command(
    name = "nexd",
    version,
    about = "WireGuard mesh agent with an eBPF exit-node data path",
    long_about = "Joins this device to the WireGuard mesh described by the mesh file, or with --registry by the \
                  admin-signed membership in etcd, and keeps it there. \
                  Stop it with SIGTERM or SIGINT: it removes everything it installed. SIGHUP reloads the mesh file."
)]
pub struct Cli {
    #[command(flatten)]
    pub agent: AgentArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Options of the running agent (also accepted after `router`).
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Configuration file: any option below under its long name (TOML).
    /// The command line and NEXD_* variables override it.
    #[arg(long, global = true, env = "NEXD_CONFIG", default_value = instance::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The mesh file: prefixes and devices (TOML, see README); not read
    /// with --registry.
    #[arg(
        long,
        global = true,
        env = "NEXD_MESH_FILE",
        default_value = instance::DEFAULT_MESH_FILE
    )]
    pub mesh_file: PathBuf,
    /// Where the private key and the instance lock live.
    #[arg(
        long,
        global = true,
        env = "NEXD_STATE_DIR",
        default_value = instance::DEFAULT_STATE_DIR
    )]
    pub state_dir: PathBuf,
    /// nexctl's control socket.
    #[arg(
        long,
        global = true,
        env = "NEXD_SOCKET",
        default_value = instance::DEFAULT_SOCKET
    )]
    pub socket: PathBuf,
    /// A group whose members may use read-only nexctl commands (the socket
    /// becomes 0660 with this group); changes still need root.
    #[arg(long, global = true, env = "NEXD_SOCKET_GROUP", value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Name of the WireGuard interface.
    #[arg(long, global = true, env = "NEXD_INTERFACE", default_value = instance::DEFAULT_INTERFACE)]
    pub interface: String,
    /// WireGuard implementation: kernel, userspace (boringtun) or auto
    /// (kernel when available).
    #[arg(long, global = true, env = "NEXD_WIREGUARD", value_enum, default_value_t = BackendChoice::Auto)]
    pub wireguard: BackendChoice,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing
    /// directives such as "info,nexd::wireguard=debug".
    #[arg(long, global = true, env = "NEXD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Send this device's internet traffic through an exit node of the mesh
    /// as soon as one is available (mesh traffic still goes direct).
    #[arg(long, global = true, env = "NEXD_EXIT_NODE_CLIENT", value_parser = clap::builder::BoolishValueParser::new())]
    pub exit_node_client: bool,
    /// Use only this exit node (mesh name or public key); without it nexd
    /// spreads over the available ones by headroom, among those with a
    /// round trip comparable to the fastest's.
    #[arg(
        long = "exit-node",
        env = "NEXD_EXIT_NODE",
        value_name = "NAME|PUBLIC_KEY"
    )]
    pub exit_node_pin: Option<String>,
    /// Keep sending DNS queries to the configured resolvers while exit mode
    /// is active (by default they go to the exit node's resolver, through
    /// the tunnel: a LAN resolver would otherwise see every name looked up).
    #[arg(long, global = true, env = "NEXD_EXIT_NODE_ALLOW_LAN_DNS", value_parser = clap::builder::BoolishValueParser::new())]
    pub exit_node_allow_lan_dns: bool,
    /// Routing table for the exit-node client's default routes.
    #[arg(long, global = true, env = "NEXD_EXIT_TABLE", value_parser = parse_table, default_value_t = routing::DEFAULT_TABLE)]
    pub exit_table: u32,
    /// fwmark on WireGuard's own packets in exit-node client mode.
    #[arg(long, global = true, env = "NEXD_EXIT_FWMARK", value_parser = parse_fwmark, default_value_t = routing::DEFAULT_FWMARK)]
    pub exit_fwmark: u32,
    /// Priority of the main-table rule of the exit-node client; the rule
    /// into the tunnel is this + 1, the excluded routes' rule this - 1.
    #[arg(long, global = true, env = "NEXD_EXIT_RULE_PRIORITY", value_parser = parse_priority, default_value_t = routing::DEFAULT_PRIORITY)]
    pub exit_rule_priority: u32,
    /// A LAN interface this device is the gateway for: its traffic is
    /// steered by the eBPF classifier like the device's own (repeatable).
    #[arg(long = "lan-interface", global = true, value_name = "IFACE")]
    pub lan_interfaces: Vec<String>,
    /// A destination (CIDR or address) that bypasses the exit node
    /// (repeatable).
    #[arg(long = "exclude-route", global = true, value_name = "CIDR", value_parser = exclude::parse_cidr)]
    pub exclude_routes: Vec<ipnet::IpNet>,
    /// A file of destinations that bypass the exit node, one CIDR a line
    /// (`#` comments); re-read on SIGHUP.
    #[arg(
        long,
        global = true,
        env = "NEXD_EXCLUDE_ROUTES_FILE",
        value_name = "FILE"
    )]
    pub exclude_routes_file: Option<PathBuf>,
    /// While exit mode is active, drop everything on the uplink that is not
    /// WireGuard to a mesh endpoint or to a bypass prefix; the guard stays
    /// in force if nexd dies, until nexd starts again or exit mode is
    /// disabled.
    #[arg(long, global = true, env = "NEXD_KILL_SWITCH", value_parser = clap::builder::BoolishValueParser::new())]
    pub kill_switch: bool,
    /// A destination (CIDR or address) the kill switch lets out directly,
    /// outside the tunnel: the LAN, a printer (repeatable; none by default,
    /// so with the kill switch even the LAN is unreachable).
    #[arg(long = "kill-switch-allow", global = true, value_name = "CIDR", value_parser = exclude::parse_cidr)]
    pub kill_switch_allow: Vec<ipnet::IpNet>,
    /// Exit node: a subnet its clients may reach besides the internet (one
    /// it routes to, a service on its network); by default they reach the
    /// internet only (repeatable).
    #[arg(long = "exit-allow", global = true, value_name = "CIDR", value_parser = exclude::parse_cidr)]
    pub exit_allow: Vec<ipnet::IpNet>,
    /// Exit node: each client's rate limit, each direction, where its mesh
    /// entry gives none (e.g. "200mbit"; units bit, kbit, mbit, gbit).
    #[arg(long, global = true, env = "NEXD_EXIT_RATE_LIMIT", value_name = "RATE", value_parser = crate::mesh::rate::parse)]
    pub exit_rate_limit: Option<crate::mesh::Rate>,
    /// Exit node: an IP:PORT on the internet to check with a TCP connect
    /// every second (repeatable, up to 8; NEXD_EXIT_PROBE_TARGET takes a
    /// comma-separated list). When none has answered for 3 rounds the
    /// exit node withdraws its exit capability and its clients move to
    /// another; it is announced again 2 s after one answers.
    #[arg(
        long = "exit-probe-target",
        global = true,
        env = "NEXD_EXIT_PROBE_TARGET",
        value_delimiter = ',',
        value_name = "IP:PORT",
        value_parser = parse_probe_target
    )]
    pub exit_probe_targets: Vec<std::net::SocketAddr>,
    /// Log each packet the leak guard drops (debug level).
    #[arg(long, global = true)]
    pub log_guard_drops: bool,
    /// The uplink interface (exit node masquerade, leak guard). Default:
    /// the interface of the default route, per address family.
    #[arg(long, global = true, env = "NEXD_UPLINK", value_name = "IFACE")]
    pub uplink: Option<String>,
    /// Run without the eBPF data path (no counters, no steering
    /// classifier, no leak guard): the benchmarks' "wg-quick way" baseline.
    #[arg(long, global = true, hide = true, conflicts_with = "kill_switch")]
    pub no_ebpf: bool,
    /// Do not clamp TCP's MSS to what fits the tunnel (exit node and LAN
    /// gateway). Clamping is what keeps large transfers going where the
    /// path filters ICMP "fragmentation needed"; turn it off only to
    /// diagnose path MTU problems.
    #[arg(long, global = true, env = "NEXD_NO_MSS_CLAMP", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_mss_clamp: bool,
    /// Watch the exit node in use through heartbeats only (3 s to notice
    /// it is gone) instead of probes: the benchmark's baseline.
    #[arg(long, global = true, hide = true)]
    pub no_exit_probes: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default;
    /// keep it on a loopback or management address).
    #[arg(long, global = true, env = "NEXD_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where bpffs is mounted (nexd mounts it there if needed).
    #[arg(long, global = true, env = "NEXD_BPFFS", default_value = instance::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Membership through etcd (issue 14): where and how.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// With --registry: the name this device asks to join under (default:
    /// the host name).
    #[arg(long, global = true, env = "NEXD_REGISTRY_NAME", value_name = "NAME")]
    pub registry_name: Option<String>,
    /// With --registry: HOST:PORT other devices send to, published in etcd
    /// under this device's lease (without it, peers learn this device's
    /// address when it first talks to them).
    #[arg(
        long,
        global = true,
        env = "NEXD_REGISTRY_ENDPOINT",
        value_name = "HOST:PORT"
    )]
    pub registry_endpoint: Option<String>,
}

impl AgentArgs {
    /// The policy routing numbers these options give.
    pub fn policy(&self) -> routing::PolicyNumbers {
        routing::PolicyNumbers {
            table: self.exit_table,
            fwmark: self.exit_fwmark,
            priority: self.exit_rule_priority,
        }
    }

    /// What identifies the instance these options run.
    pub fn instance(&self) -> instance::Instance {
        instance::Instance {
            socket: self.socket.clone(),
            state_dir: self.state_dir.clone(),
            interface: self.interface.clone(),
            bpffs: self.bpffs.clone(),
            policy: self.policy(),
        }
    }

    /// The device side's registry configuration; `None` without
    /// `--registry` (the mesh file is used). `request_exit_node` is true
    /// for `nexd router --exit-node`.
    pub fn device_config(&self, request_exit_node: bool) -> Result<Option<DeviceConfig>, String> {
        let Some(etcd) = self.registry.etcd_config()? else {
            return Ok(None);
        };
        let admin = self.registry.registry_admin_key.ok_or_else(|| {
            "--registry needs --registry-admin-key (the public key `nexctl mesh init` printed)"
                .to_owned()
        })?;
        let name = match &self.registry_name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .map_err(|e| format!("cannot read the host name for --registry-name: {e}"))?,
        };
        let listen_port = match &self.registry_endpoint {
            Some(e) => {
                crate::mesh::parse_endpoint(e)
                    .map_err(|m| format!("--registry-endpoint {m}"))?
                    .port
            }
            None => crate::mesh::DEFAULT_LISTEN_PORT,
        };
        let mut cfg = DeviceConfig::new(etcd, admin, name, listen_port);
        cfg.advertise = self.registry_endpoint.clone();
        cfg.request_exit_node = request_exit_node;
        Ok(Some(cfg))
    }
}

/// Accepts decimal or 0x-prefixed hex (marks are usually written in hex).
fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal or 0x hex)"))
}

fn parse_table(s: &str) -> Result<u32, String> {
    routing::check_table(parse_u32(s)?)
}

fn parse_fwmark(s: &str) -> Result<u32, String> {
    routing::check_fwmark(parse_u32(s)?)
}

fn parse_priority(s: &str) -> Result<u32, String> {
    routing::check_priority(parse_u32(s)?)
}

/// An `--exit-probe-target`: an address (no name: resolving it would need
/// the DNS the probe is meant to check, and a name could resolve into the
/// mesh) and a port, somewhere a probe proves the uplink works.
fn parse_probe_target(s: &str) -> Result<std::net::SocketAddr, String> {
    let t: std::net::SocketAddr = s.trim().parse().map_err(|_| {
        format!("{s:?} is not IP:PORT (an address, not a name; IPv6 as [2001:db8::1]:443)")
    })?;
    let ip = t.ip().to_canonical();
    if t.port() == 0 {
        return Err(format!("{s:?}: port 0 cannot be connected to"));
    }
    let why = if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_loopback() {
        Some("a loopback address (it proves nothing about the uplink)")
    } else if ip.is_multicast() || ip == std::net::IpAddr::from([255, 255, 255, 255]) {
        Some("not a unicast address")
    } else {
        None
    };
    match why {
        Some(w) => Err(format!("{s:?} is {w}")),
        None => Ok(t),
    }
}

/// Checks `--exit-probe-target` against the rest of the command line.
fn check_probe_targets(targets: &[std::net::SocketAddr], exit_node: bool) -> Result<(), String> {
    if !targets.is_empty() && !exit_node {
        return Err(
            "--exit-probe-target is an exit node option: it needs `nexd router --exit-node`"
                .to_owned(),
        );
    }
    let max = daemon::MAX_EXIT_PROBE_TARGETS;
    if targets.len() > max {
        return Err(format!(
            "--exit-probe-target given {} times: at most {max} (each is probed every second)",
            targets.len()
        ));
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent as a router: with --exit-node, forward the mesh's
    /// internet traffic.
    Router(RouterArgs),
    /// Create this device's private key if there is none, and print its
    /// public key for the mesh file.
    Keygen,
    /// Print this device's public key.
    Pubkey,
}

/// Options of `nexd router`.
#[derive(Debug, Clone, Args)]
pub struct RouterArgs {
    /// Serve as exit node: advertise 0.0.0.0/0 and ::/0 to the mesh and
    /// masquerade mesh traffic out of the uplink (`--uplink`, default: the
    /// interface of the default route, per address family).
    #[arg(long)]
    pub exit_node: bool,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::Keygen) => key_command(&cli.agent, true),
        Some(Command::Pubkey) => key_command(&cli.agent, false),
        Some(Command::Router(r)) => run_agent(cli.agent, Some(r)),
        None => run_agent(cli.agent, None),
    }
}

fn key_command(args: &AgentArgs, create: bool) -> ExitCode {
    let result = if create {
        keys::load_or_create(&args.state_dir).map(|(k, created)| {
            if created {
                eprintln!("created {}", keys::key_path(&args.state_dir).display());
            }
            k
        })
    } else {
        keys::load(&args.state_dir)
    };
    match result {
        Ok(k) => {
            println!("{}", k.public_key());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_agent(args: AgentArgs, router: Option<RouterArgs>) -> ExitCode {
    // `--registry`: membership through etcd instead of the mesh file; the
    // options are checked before anything starts.
    let exit_node = router.as_ref().is_some_and(|r| r.exit_node);
    if let Err(e) = check_probe_targets(&args.exit_probe_targets, exit_node) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let registry = match args.device_config(exit_node) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Everything nexd creates is private: its sockets (the UAPI relay
    // answers with the private key's public half and the peers, the
    // control socket takes requests) exist from bind() on, before any
    // chmod could narrow them, so they are born 0600 instead.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // boringtun logs every peer change at info, and hickory's DNS catalog
    // some client queries (a client could fill the log): keep them to
    // warnings unless the operator asks for them by name.
    let mut directives = args.log_level.clone();
    for quiet in ["boringtun", "hickory_server"] {
        if !args.log_level.contains(quiet) {
            directives.push_str(&format!(",{quiet}=warn"));
        }
    }
    let filter = match EnvFilter::try_new(&directives) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "error: --log-level {:?} is not a valid filter: {e}",
                args.log_level
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let policy = args.policy();
    let opts = daemon::Options {
        mesh_file: args.mesh_file,
        state_dir: args.state_dir,
        socket: args.socket,
        interface: args.interface,
        wireguard: args.wireguard,
        exit_server: router
            .filter(|r| r.exit_node)
            .map(|_| daemon::ExitServerOptions {
                allow: args.exit_allow.clone(),
                rate_limit: args.exit_rate_limit,
                probe_targets: args.exit_probe_targets.clone(),
            }),
        exit_node_client: args.exit_node_client,
        policy,
        lan_interfaces: args.lan_interfaces,
        exclude_routes: args.exclude_routes,
        exclude_routes_file: args.exclude_routes_file,
        kill_switch: args.kill_switch,
        kill_switch_allow: args.kill_switch_allow,
        exit_node_allow_lan_dns: args.exit_node_allow_lan_dns,
        log_guard_drops: args.log_guard_drops,
        bpffs: args.bpffs,
        uplink: args.uplink,
        no_ebpf: args.no_ebpf,
        mss_clamp: !args.no_mss_clamp,
        exit_probes: !args.no_exit_probes,
        exit_node_pin: args.exit_node_pin,
        socket_group: args.socket_group,
        metrics_listen: args.metrics_listen,
        registry,
    };
    match runtime.block_on(daemon::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = crate::error_text(&e);
            for line in text.lines() {
                tracing::error!("{line}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_and_client_flags_parse() {
        let c = Cli::try_parse_from(["nexd", "router", "--exit-node", "--uplink", "eth1"])
            .expect("router");
        assert_eq!(c.agent.uplink.as_deref(), Some("eth1"));
        match c.command {
            Some(Command::Router(r)) => assert!(r.exit_node),
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from(["nexd", "--exit-node-client", "--exit-fwmark", "0x10"])
            .expect("client");
        assert!(c.agent.exit_node_client);
        assert_eq!(c.agent.exit_fwmark, 16);
        // The client's pin and the router's flag share a name at two levels.
        let c = Cli::try_parse_from(["nexd", "--exit-node-client", "--exit-node", "exit1"])
            .expect("pin");
        assert_eq!(c.agent.exit_node_pin.as_deref(), Some("exit1"));
        // Global options also work after the subcommand.
        let c = Cli::try_parse_from(["nexd", "router", "--exit-node", "--interface", "wg9"])
            .expect("global");
        assert_eq!(c.agent.interface, "wg9");
        let c = Cli::try_parse_from([
            "nexd",
            "--exit-node-client",
            "--lan-interface",
            "lan0",
            "--lan-interface",
            "lan1",
            "--exclude-route",
            "198.51.100.0/24",
            "--exclude-route",
            "2001:db8::1",
            "--kill-switch",
        ])
        .expect("gateway");
        assert_eq!(c.agent.lan_interfaces, ["lan0", "lan1"]);
        assert_eq!(c.agent.exclude_routes.len(), 2);
        assert!(c.agent.kill_switch);
        let e = Cli::try_parse_from(["nexd", "--exclude-route", "198.51.100.1/24"])
            .expect_err("host bits");
        assert!(e.to_string().contains("host bits"), "{e}");
    }

    #[test]
    fn invalid_routing_numbers_are_rejected_naming_the_option() {
        for (flag, value) in [
            ("--exit-fwmark", "0"),
            ("--exit-table", "253"),
            ("--exit-table", "254"),
            ("--exit-table", "255"),
            ("--exit-table", "0"),
            ("--exit-rule-priority", "0"),
            ("--exit-rule-priority", "32765"),
            ("--exit-rule-priority", "32766"),
            ("--exit-rule-priority", "32767"),
        ] {
            let e = Cli::try_parse_from(["nexd", flag, value]).expect_err(value);
            let text = e.to_string();
            assert!(
                text.contains(flag) && text.contains(value),
                "{flag} {value}: {text}"
            );
        }
    }

    #[test]
    fn exit_probe_targets_parse_and_bad_ones_name_the_option() {
        let c = Cli::try_parse_from([
            "nexd",
            "router",
            "--exit-node",
            "--exit-probe-target",
            "203.0.113.10:443",
            "--exit-probe-target",
            "[2001:db8::1]:80,198.51.100.7:53",
        ])
        .expect("targets");
        let want: Vec<std::net::SocketAddr> =
            ["203.0.113.10:443", "[2001:db8::1]:80", "198.51.100.7:53"]
                .iter()
                .map(|s| s.parse().expect("addr"))
                .collect();
        assert_eq!(c.agent.exit_probe_targets, want);
        assert!(check_probe_targets(&want, true).is_ok());
        for (bad, says) in [
            ("example.com:443", "not IP:PORT"),
            ("203.0.113.10", "not IP:PORT"),
            ("2001:db8::1:443", "not IP:PORT"),
            ("203.0.113.10:0", "port 0"),
            ("127.0.0.1:80", "loopback"),
            ("[::1]:80", "loopback"),
            ("[::ffff:127.0.0.1]:80", "loopback"),
            ("0.0.0.0:80", "unspecified"),
            ("224.0.0.1:80", "not a unicast"),
            ("255.255.255.255:80", "not a unicast"),
        ] {
            let e = Cli::try_parse_from(["nexd", "--exit-probe-target", bad]).expect_err(bad);
            let text = e.to_string();
            assert!(
                text.contains("--exit-probe-target") && text.contains(says),
                "{bad}: {text}"
            );
        }
        let e = check_probe_targets(&want[..1], false).expect_err("client");
        assert!(
            e.contains("--exit-probe-target") && e.contains("router --exit-node"),
            "{e}"
        );
        let many = vec![want[0]; daemon::MAX_EXIT_PROBE_TARGETS + 1];
        let e = check_probe_targets(&many, true).expect_err("too many");
        assert!(e.contains("--exit-probe-target given 9 times"), "{e}");
    }

    #[test]
    fn backend_choice_parses() {
        let c = Cli::try_parse_from(["nexd", "--wireguard", "userspace"]).expect("parse");
        assert_eq!(c.agent.wireguard, BackendChoice::Userspace);
        assert!(Cli::try_parse_from(["nexd", "--wireguard", "magic"]).is_err());
    }

    #[test]
    fn registry_options_parse_and_check_each_other() {
        let admin = crate::registry::AdminKey::generate()
            .public_key()
            .to_string();
        let c = Cli::try_parse_from([
            "nexd",
            "--registry",
            "etcd://198.51.100.1:2379,198.51.100.2:2379/nexd",
            "--registry-admin-key",
            &admin,
            "--registry-name",
            "gw1",
            "--registry-endpoint",
            "192.0.2.1:4000",
        ])
        .expect("parse");
        let cfg = c.agent.device_config(true).expect("valid").expect("some");
        assert_eq!(cfg.etcd.url.endpoints.len(), 2);
        assert_eq!(cfg.name, "gw1");
        assert_eq!(cfg.listen_port, 4000);
        assert!(cfg.request_exit_node);
        assert!(cfg.etcd.tls.is_none());

        let c = Cli::try_parse_from(["nexd"]).expect("none");
        assert!(c.agent.device_config(false).expect("ok").is_none());

        let c = Cli::try_parse_from(["nexd", "--registry", "etcd://h:1/p"]).expect("no key");
        let e = c
            .agent
            .device_config(false)
            .expect_err("needs the admin key");
        assert!(e.contains("--registry-admin-key"), "{e}");
    }
}
