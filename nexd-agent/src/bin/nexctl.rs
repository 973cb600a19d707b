//! The nexd control CLI. See `nexctl --help`.
use clap::Parser as _;

fn main() -> std::process::ExitCode {
    // Like any Unix tool: `nexctl ... | head` ends quietly when the reader
    // goes away (Rust ignores SIGPIPE by default, which turns it into a
    // panic on the next write).
    // SAFETY: resetting a signal disposition before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    nexd::cli::nexctl::run(nexd::cli::nexctl::Cli::parse())
}
