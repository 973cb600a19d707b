//! Toolkit for running real nexd agents in network namespaces: the
//! end-to-end tests in `tests/tests/` and `cargo xtask lab` both use it.
//!
//! Safety rules it enforces by construction: every link, address, route and
//! process lives in a namespace created here (veth pairs are created
//! directly inside their namespaces), every wait has a deadline, and every
//! namespace and process is removed when its guard drops, also on panic.

pub mod bins;
pub mod cmd;
pub mod cpu;
pub mod delay;
pub mod dns;
pub mod etcd;
pub mod hand_tunnel;
pub mod netns;
pub mod node;
pub mod rogue;
pub mod topology;
pub mod traffic;
pub mod world;

pub use netns::Netns;
/// The control protocol's types, for reading nexctl's JSON typed.
pub use nexd_proto as proto;
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

/// The packets of data path counter `name` in a `stats` reply.
pub fn counter(stats: &proto::StatsInfo, name: &str) -> anyhow::Result<u64> {
    stats
        .counters
        .iter()
        .find(|c| c.name == name)
        .map(|c| c.total.packets)
        .ok_or_else(|| anyhow::anyhow!("no counter {name} in {stats:?}"))
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

/// Set by `cargo xtask test` (and so CI): a test that needs privileges it
/// does not have fails instead of skipping.
pub const REQUIRE_PRIVILEGES: &str = "NEXD_TEST_REQUIRE_PRIVILEGES";

/// The gate of every test that needs root (namespaces, eBPF). `Ok(true)`:
/// go on. Without root, under `cargo xtask test` (`$NEXD_TEST_REQUIRE_PRIVILEGES`
/// set) it is an error, so CI can never pass by skipping; in a plain
/// `cargo test` by a developer without root it says so and returns
/// `Ok(false)`, and the test returns early.
pub fn privileged() -> anyhow::Result<bool> {
    let able =
        nix::unistd::geteuid().is_root() && std::path::Path::new("/proc/self/ns/net").exists();
    if able {
        return Ok(true);
    }
    if std::env::var_os(REQUIRE_PRIVILEGES).is_some() {
        anyhow::bail!(
            "this test needs root (network namespaces, eBPF) and {REQUIRE_PRIVILEGES} is set: it must run, not skip"
        );
    }
    eprintln!(
        "skipped: needs root to create network namespaces (run as root, or `sudo cargo xtask test`)"
    );
    Ok(false)
}
