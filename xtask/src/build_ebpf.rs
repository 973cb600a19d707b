//! `cargo xtask build-ebpf`: builds the eBPF crate on its own, with the
//! compiler's messages shown, for people working on the programs. (A plain
//! `cargo build` builds and embeds the same object through nexd-agent's
//! build.rs; this task is the fast loop with readable errors.)

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{
    progress::step,
    setup::{self, Need},
    workspace,
};

#[derive(clap::Args)]
pub struct Args {
    /// Build without optimisations (the verifier may reject the result; the
    /// embedded object is always built with --release).
    #[arg(long)]
    pub debug: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    setup::ensure("building the eBPF programs", &[Need::Build])?;
    let root = workspace::root();
    let arch = std::env::consts::ARCH;
    step("building nexd-ebpf for bpfel-unknown-none");
    let toolchain = crate::workspace::nightly()?;
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        &toolchain,
        "cargo",
        "build",
        "--package",
        "nexd-ebpf",
        "--bins",
    ])
    .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
    .current_dir(root.join("nexd-ebpf"))
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            format!("--cfg=bpf_target_arch=\"{arch}\""),
            "-Cdebuginfo=2".into(),
            "-Clink-arg=--btf".into(),
        ]
        .join("\x1f"),
    );
    if !args.debug {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .context("cannot run rustup; run `cargo xtask setup`")?;
    if !status.success() {
        bail!(
            "the eBPF build failed ({status}); `cargo xtask setup` installs {toolchain} with rust-src, and bpf-linker"
        );
    }
    let profile = if args.debug { "debug" } else { "release" };
    let object = root.join(format!("target/bpfel-unknown-none/{profile}/nexd"));
    let size = std::fs::metadata(&object).map(|m| m.len()).unwrap_or(0);
    println!("eBPF object: {} ({size} bytes)", object.display());
    Ok(())
}

/// `cargo clippy -- -D warnings` on the eBPF crate, for its own target with
/// the pinned nightly: the code that runs in the kernel is linted like the
/// rest (the workspace's clippy cannot build it).
pub fn clippy() -> anyhow::Result<()> {
    let toolchain = crate::workspace::nightly()?;
    let status = Command::new("rustup")
        .args([
            "run",
            &toolchain,
            "cargo",
            "clippy",
            "--package",
            "nexd-ebpf",
            "--bins",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        .current_dir(workspace::root().join("nexd-ebpf"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .status()
        .context("cannot run rustup; run `cargo xtask setup`")?;
    if !status.success() {
        bail!("clippy found problems in nexd-ebpf ({status})");
    }
    Ok(())
}
