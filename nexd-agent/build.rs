//! Builds the eBPF object from `nexd-ebpf` (nightly, bpfel-unknown-none,
//! `-Z build-std=core`, bpf-linker) into OUT_DIR, where `datapath` embeds
//! it, so a plain `cargo build` can never ship a stale object.
//!
//! This does what aya-build does, minus its habit of replaying the nested
//! cargo's whole output as warnings on every build: here the nested output
//! is shown only when the eBPF build fails.
use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

#[path = "ebpf_toolchain.rs"]
mod ebpf_toolchain;

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

    println!("cargo::rustc-check-cfg=cfg(nexd_ebpf_missing)");

    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    // Pinned in nexd-ebpf/rust-toolchain.toml (bpf-linker's LLVM must be
    // able to read this rustc's bitcode).
    let toolchain = ebpf_toolchain::ebpf_toolchain(root);

    // On a bare machine the eBPF toolchain is missing, and `cargo xtask
    // setup` (which installs it) is itself a build of this crate: failing
    // here would make the documented first command impossible. So when the
    // toolchain is *missing* (not when the eBPF code fails to build), embed
    // an empty object and say so loudly; the data path then refuses to
    // load with an error naming the fix, and the watched paths below make
    // the first build after `cargo xtask setup` embed the real object.
    let sysroot = sysroot(&toolchain);
    if let Some(missing) = missing_toolchain(&toolchain, sysroot.as_deref()) {
        println!(
            "cargo:warning=nexd is built WITHOUT its eBPF programs: {missing}. \
             Run `cargo xtask setup`, then build again."
        );
        println!("cargo:rustc-cfg=nexd_ebpf_missing");
        for watched in toolchain_paths(sysroot.as_deref()) {
            println!("cargo:rerun-if-changed={}", watched.display());
        }
        std::fs::write(out_dir.join("nexd"), b"").context("writing the empty eBPF object")?;
        return Ok(());
    }
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
            "building the eBPF programs failed ({}).\n{stderr}\nHint: `cargo xtask setup` installs {toolchain} with rust-src, and bpf-linker.",
            output.status
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/nexd");
    std::fs::copy(&built, out_dir.join("nexd"))
        .with_context(|| format!("copying {} into OUT_DIR", built.display()))?;
    Ok(())
}

/// What of the eBPF toolchain is missing, if anything.
fn missing_toolchain(toolchain: &str, sysroot: Option<&Path>) -> Option<String> {
    let Some(sysroot) = sysroot else {
        return Some(format!("the {toolchain} Rust toolchain is not installed"));
    };
    if !rust_src_lock(sysroot).exists() {
        return Some(format!("{toolchain} has no rust-src component"));
    }
    if find_in_path("bpf-linker").is_none() {
        return Some("bpf-linker is not on PATH".into());
    }
    None
}

/// Files whose appearance means the toolchain may now be complete. A path
/// that does not exist makes cargo rerun this script on every build, which
/// is what we want while something is missing.
fn toolchain_paths(sysroot: Option<&Path>) -> Vec<PathBuf> {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let mut paths: Vec<PathBuf> = cargo_home
        .map(|h| h.join("bin/bpf-linker"))
        .into_iter()
        .collect();
    match sysroot {
        Some(s) => paths.push(rust_src_lock(s)),
        // No toolchain yet: a path that cannot exist reruns every time.
        None => paths.push(PathBuf::from("/nonexistent/nexd-ebpf-toolchain")),
    }
    paths
}

fn sysroot(toolchain: &str) -> Option<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(s.trim()))
}

fn rust_src_lock(sysroot: &Path) -> PathBuf {
    sysroot.join("lib/rustlib/src/rust/library/Cargo.lock")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
