//! `nexd`'s command line: run the agent (optionally as a router), or manage
//! the device key.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::{daemon, keys, wireguard::BackendChoice};

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
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create this device's private key if there is none, and print its
    /// public key for the mesh file.
    Keygen,
    /// Print this device's public key.
    Pubkey,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::Keygen) => key_command(&cli.agent, true),
        Some(Command::Pubkey) => key_command(&cli.agent, false),
        None => run_agent(cli.agent),
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

fn run_agent(args: AgentArgs) -> ExitCode {
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
    fn backend_choice_parses() {
        let c = Cli::try_parse_from(["nexd", "--wireguard", "userspace"]).expect("parse");
        assert_eq!(c.agent.wireguard, BackendChoice::Userspace);
        assert!(Cli::try_parse_from(["nexd", "--wireguard", "magic"]).is_err());
    }
}
