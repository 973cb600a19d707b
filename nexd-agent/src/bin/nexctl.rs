//! The nexd control CLI. See `nexctl --help`.
use clap::Parser as _;

fn main() -> std::process::ExitCode {
    nexd::cli::nexctl::run(nexd::cli::nexctl::Cli::parse())
}
