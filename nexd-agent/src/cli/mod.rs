//! The two command lines: `nexd` (the agent) and `nexctl` (its CLI). The
//! binaries in src/bin only parse arguments and call into here.

pub mod config;
pub mod exit;
pub mod man;
pub mod mesh;
pub mod nexctl;
pub mod nexd;
pub mod output;
pub mod registry_args;
pub mod watch;

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// clap's own checks of both definitions (conflicting names, bad
    /// defaults), which it otherwise makes only when an option is used.
    #[test]
    fn both_command_lines_are_consistent() {
        super::nexd::Cli::command().debug_assert();
        super::nexctl::Cli::command().debug_assert();
    }
}
