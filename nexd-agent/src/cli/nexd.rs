//! `nexd`'s command line: run the agent (optionally as a router), or manage
//! the device key.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::{daemon, keys, routing, wireguard::BackendChoice};

#[derive(Debug, Parser)]
#[command(
    name = "nexd",
    version,
    about = "WireGuard mesh agent with an eBPF exit-node data path",
    long_about = "Joins this device to the WireGuard mesh described by the mesh file and keeps it there. \
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
    /// The mesh file: prefixes and devices (TOML, see README).
    #[arg(
        long,
        global = true,
        env = "NEXD_MESH_FILE",
        default_value = "/etc/nexd/mesh.toml"
    )]
    pub mesh_file: PathBuf,
    /// Where the private key and the instance lock live.
    #[arg(
        long,
        global = true,
        env = "NEXD_STATE_DIR",
        default_value = "/var/lib/nexd"
    )]
    pub state_dir: PathBuf,
    /// nexctl's control socket.
    #[arg(
        long,
        global = true,
        env = "NEXD_SOCKET",
        default_value = "/run/nexd.sock"
    )]
    pub socket: PathBuf,
    /// Name of the WireGuard interface.
    #[arg(long, global = true, env = "NEXD_INTERFACE", default_value = "wg0")]
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
    #[arg(long, global = true, env = "NEXD_EXIT_NODE_CLIENT")]
    pub exit_node_client: bool,
    /// Routing table for the exit-node client's default routes.
    #[arg(long, global = true, env = "NEXD_EXIT_TABLE", default_value_t = routing::DEFAULT_TABLE)]
    pub exit_table: u32,
    /// fwmark on WireGuard's own packets in exit-node client mode.
    #[arg(long, global = true, env = "NEXD_EXIT_FWMARK", value_parser = parse_u32, default_value_t = routing::DEFAULT_FWMARK)]
    pub exit_fwmark: u32,
    /// Priority of the first of the two exit-node client rules (the second
    /// is this + 1).
    #[arg(long, global = true, env = "NEXD_EXIT_RULE_PRIORITY", default_value_t = routing::DEFAULT_PRIORITY)]
    pub exit_rule_priority: u32,
}

/// Accepts decimal or 0x-prefixed hex (marks are usually written in hex).
fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal or 0x hex)"))
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
    /// masquerade mesh traffic out of the uplink.
    #[arg(long)]
    pub exit_node: bool,
    /// The interface mesh traffic leaves through (default: the interface
    /// of the default route, per address family).
    #[arg(long, requires = "exit_node")]
    pub uplink: Option<String>,
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
    // boringtun logs every peer change at info; keep it to warnings unless
    // the operator asks for it by name.
    let directives = if args.log_level.contains("boringtun") {
        args.log_level.clone()
    } else {
        format!("{},boringtun=warn", args.log_level)
    };
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
    let opts = daemon::Options {
        mesh_file: args.mesh_file,
        state_dir: args.state_dir,
        socket: args.socket,
        interface: args.interface,
        wireguard: args.wireguard,
        exit_server: router
            .filter(|r| r.exit_node)
            .map(|r| daemon::ExitServerOptions { uplink: r.uplink }),
        exit_node_client: args.exit_node_client,
        policy: routing::PolicyNumbers {
            table: args.exit_table,
            fwmark: args.exit_fwmark,
            priority: args.exit_rule_priority,
        },
    };
    match runtime.block_on(daemon::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("{e:#}");
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
    use clap::CommandFactory as _;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn router_and_client_flags_parse() {
        let c = Cli::try_parse_from(["nexd", "router", "--exit-node", "--uplink", "eth1"])
            .expect("router");
        match c.command {
            Some(Command::Router(r)) => {
                assert!(r.exit_node);
                assert_eq!(r.uplink.as_deref(), Some("eth1"));
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from(["nexd", "--exit-node-client", "--exit-fwmark", "0x10"])
            .expect("client");
        assert!(c.agent.exit_node_client);
        assert_eq!(c.agent.exit_fwmark, 16);
        // Global options also work after the subcommand.
        let c = Cli::try_parse_from(["nexd", "router", "--exit-node", "--interface", "wg9"])
            .expect("global");
        assert_eq!(c.agent.interface, "wg9");
        assert!(Cli::try_parse_from(["nexd", "router", "--uplink", "eth1"]).is_err());
    }

    #[test]
    fn backend_choice_parses() {
        let c = Cli::try_parse_from(["nexd", "--wireguard", "userspace"]).expect("parse");
        assert_eq!(c.agent.wireguard, BackendChoice::Userspace);
        assert!(Cli::try_parse_from(["nexd", "--wireguard", "magic"]).is_err());
    }
}
