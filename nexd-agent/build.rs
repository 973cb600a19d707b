//! Builds the eBPF object from `nexd-ebpf` (nightly, bpfel-unknown-none,
//! `-Z build-std=core`, bpf-linker) into OUT_DIR, where `datapath` embeds
//! it, so a plain `cargo build` can never ship a stale object.
//!
//! This does what aya-build does, minus its habit of replaying the nested
//! cargo's whole output as warnings on every build: here the nested output
//! is shown only when the eBPF build fails.
use std::{
    env,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let root = manifest_dir
        .parent()
        .context("nexd-agent has no parent directory")?;
    let ebpf_dir = root.join("nexd-ebpf");
    let common_dir = root.join("nexd-common");
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rerun-if-env-changed=NEXD_EBPF_TOOLCHAIN");

    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let toolchain = env::var("NEXD_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let target_dir = out_dir.join("ebpf-target");
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");

    let mut cmd = Command::new("rustup");
    cmd.args(["run", &toolchain, "cargo", "build"])
        .args(["--package", "nexd-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // Whatever wraps this build (clippy, a host RUSTC) must not leak
        // into the nightly eBPF build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .stdin(Stdio::null());
    let output = cmd.output().with_context(|| {
        format!(
            "cannot run {cmd:?}; is rustup installed? `cargo xtask setup` installs what is needed"
        )
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        for line in stderr.lines() {
            println!("cargo:warning={line}");
        }
        bail!(
            "building the eBPF programs failed ({}).\n{stderr}\nHint: `cargo xtask setup` installs nightly, rust-src and bpf-linker.",
            output.status
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/nexd");
    std::fs::copy(&built, out_dir.join("nexd"))
        .with_context(|| format!("copying {} into OUT_DIR", built.display()))?;
    Ok(())
}
