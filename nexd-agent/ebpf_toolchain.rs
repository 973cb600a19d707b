//! Which Rust toolchain builds the eBPF programs: shared by nexd-agent's
//! build.rs and xtask (each includes this file with `#[path]`), so the pin
//! in `nexd-ebpf/rust-toolchain.toml` is read in one way everywhere.

use std::path::Path;

/// `$NEXD_EBPF_TOOLCHAIN`, else the `channel` of
/// `<workspace>/nexd-ebpf/rust-toolchain.toml`, else plain `nightly`.
pub fn ebpf_toolchain(workspace: &Path) -> String {
    if let Ok(t) = std::env::var("NEXD_EBPF_TOOLCHAIN")
        && !t.trim().is_empty()
    {
        return t.trim().to_owned();
    }
    std::fs::read_to_string(workspace.join("nexd-ebpf/rust-toolchain.toml"))
        .ok()
        .and_then(|text| channel_of(&text))
        .unwrap_or_else(|| "nightly".to_owned())
}

/// The value of `channel = "..."` in a rust-toolchain.toml.
fn channel_of(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "channel").then(|| value.trim().trim_matches('"').to_owned())
    })
}
