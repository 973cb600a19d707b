//! Toolkit for running real nexd agents in network namespaces: the
//! end-to-end tests in `tests/tests/` and `cargo xtask lab` both use it.
//!
//! Safety rules it enforces by construction: every link, address, route and
//! process lives in a namespace created here (veth pairs are created
//! directly inside their namespaces), every wait has a deadline, and every
//! namespace and process is removed when its guard drops, also on panic.

pub mod bins;
pub mod cmd;
pub mod delay;
pub mod netns;
pub mod node;
pub mod topology;
pub mod traffic;
pub mod world;

pub use netns::Netns;
pub use node::{Node, NodeSpec};

use std::time::{Duration, Instant};

/// `d` stretched by `$NEXD_TEST_TIME_SCALE` (default 1): the VM tests run
/// under software emulation, several times slower, and set it.
pub fn scaled(d: Duration) -> Duration {
    let factor = std::env::var("NEXD_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|f| *f >= 1.0)
        .unwrap_or(1.0);
    d.mul_f64(factor)
}

/// Whether the tests drive kernel WireGuard (`NEXD_TEST_WIREGUARD=kernel`).
pub fn kernel_wireguard() -> bool {
    std::env::var("NEXD_TEST_WIREGUARD").is_ok_and(|v| v == "kernel")
}

/// Whether this kernel has TCX (6.6 and later), as nexd decides: there
/// programs are links and the leak guard is a pin; before, they are tc
/// filters on clsact, which outlive nexd without a pin.
pub fn tcx_kernel() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (6, 6)
}

/// Polls `f` every `interval` until it returns `Some` or `timeout` (scaled)
/// passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let timeout = scaled(timeout);
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
