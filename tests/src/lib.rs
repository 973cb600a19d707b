//! Toolkit for running real nexd agents in network namespaces: the
//! end-to-end tests in `tests/tests/` and `cargo xtask lab` both use it.
//!
//! Safety rules it enforces by construction: every link, address, route and
//! process lives in a namespace created here (veth pairs are created
//! directly inside their namespaces), every wait has a deadline, and every
//! namespace and process is removed when its guard drops, also on panic.

pub mod bins;
pub mod cmd;
pub mod netns;
pub mod node;
pub mod topology;
pub mod traffic;
pub mod world;

pub use netns::Netns;
pub use node::{Node, NodeSpec};

use std::time::{Duration, Instant};

/// Polls `f` every `interval` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(interval);
    }
}

/// Whether this process may create namespaces (root with CAP_SYS_ADMIN).
/// Network tests skip with a message when it may not, rather than fail
/// for a reason unrelated to nexd.
pub fn can_run_network_tests() -> bool {
    nix::unistd::geteuid().is_root() && std::path::Path::new("/proc/self/ns/net").exists()
}
