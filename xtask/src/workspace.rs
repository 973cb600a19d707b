//! The workspace every task works in: where it is, cargo commands run in
//! it, the pinned nightly, and the debug or release build of nexd that the
//! lab, the benchmarks, the packages and the VM tests share. Tasks use
//! this; it uses no task.

use std::{path::PathBuf, process::Command};

use crate::progress::step;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// A `cargo` command in the workspace root without the `CARGO_*`
/// variables the outer `cargo run` set for xtask: inherited, they change
/// build-script fingerprints and make the inner build recompile crates
/// every time.
pub fn cargo_command() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
            c.env_remove(k);
        }
    }
    c.current_dir(root());
    c
}

/// The Rust toolchain for the eBPF programs and the fuzz targets, pinned
/// in nexd-ebpf/rust-toolchain.toml (see there why); `NEXD_EBPF_TOOLCHAIN`
/// overrides it. nexd-agent's build.rs lets rustup read the same file.
pub fn nightly() -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("NEXD_EBPF_TOOLCHAIN")
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_owned());
    }
    #[derive(serde::Deserialize)]
    struct File {
        toolchain: Toolchain,
    }
    #[derive(serde::Deserialize)]
    struct Toolchain {
        channel: String,
    }
    let path = root().join("nexd-ebpf/rust-toolchain.toml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let file: File =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(file.toolchain.channel)
}

/// Builds nexd and nexctl (debug, or release for measurements) and points
/// the test toolkit at them.
pub fn build_agent(release: bool) -> anyhow::Result<()> {
    step(&format!(
        "building nexd and nexctl ({})",
        if release { "release" } else { "debug" }
    ));
    let mut c = cargo_command();
    c.args(["build", "--package", "nexd-agent", "--bins"]);
    if release {
        c.arg("--release");
    }
    if !c.status()?.success() {
        anyhow::bail!("building nexd failed");
    }
    let dir = root().join(if release {
        "target/release"
    } else {
        "target/debug"
    });
    // SAFETY: set while this process has no other threads reading the
    // environment.
    unsafe { std::env::set_var("NEXD_BIN_DIR", dir) };
    Ok(())
}
