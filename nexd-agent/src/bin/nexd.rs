//! The nexd agent. See `nexd --help`.

fn main() -> std::process::ExitCode {
    match nexd::cli::config::parse(std::env::args_os().collect()) {
        Ok(cli) => nexd::cli::nexd::run(cli),
        Err(e) => e.exit(),
    }
}
