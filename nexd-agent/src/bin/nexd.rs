//! The nexd agent. See `nexd --help`.
use clap::Parser as _;

fn main() -> std::process::ExitCode {
    nexd::cli::nexd::run(nexd::cli::nexd::Cli::parse())
}
