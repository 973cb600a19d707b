//! Builds the eBPF object from `nexd-ebpf` (nightly, bpfel-unknown-none,
//! `-Z build-std=core`, bpf-linker) into OUT_DIR, where `datapath` embeds
//! it, so a plain `cargo build` can never ship a stale object.
//!
//! This does what aya-build does, minus its habit of replaying the nested
//! cargo's whole output as warnings on every build: here the nested output
//! is shown only when the eBPF build fails. Without the eBPF toolchain the
//! build fails with the fix in the message; nothing that installs the
//! toolchain (`cargo xtask setup`) depends on this crate.
use std::{
    env,
    path::{Path, PathBuf},
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
    // The nightly pinned in nexd-ebpf/rust-toolchain.toml (bpf-linker's
    // LLVM must be able to read this rustc's bitcode), as rustup resolves
    // it there; NEXD_EBPF_TOOLCHAIN overrides. A missing toolchain is an
    // error naming the fix: a build without its programs would be a nexd
    // that cannot keep its promises (no kill switch, no steering).
    let toolchain = ebpf_toolchain(&ebpf_dir)?;
    if let Some(missing) = missing_toolchain(&toolchain) {
        bail!(
            "cannot build nexd's eBPF programs: {missing}. Run `cargo xtask setup` (it installs \
             the pinned nightly with rust-src, and bpf-linker), then build again."
        );
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

/// `$NEXD_EBPF_TOOLCHAIN`, else the toolchain rustup picks in
/// `ebpf_dir` (its rust-toolchain.toml), by name.
fn ebpf_toolchain(ebpf_dir: &Path) -> anyhow::Result<String> {
    if let Ok(t) = env::var("NEXD_EBPF_TOOLCHAIN")
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_owned());
    }
    let out = Command::new("rustup")
        .args(["show", "active-toolchain"])
        .current_dir(ebpf_dir)
        // The toolchain running this build must not decide for the eBPF one.
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdin(Stdio::null())
        .output()
        .context("cannot run rustup; `cargo xtask setup` installs what nexd needs")?;
    if !out.status.success() {
        bail!(
            "the eBPF toolchain pinned in {}/rust-toolchain.toml is not installed ({}); run `cargo xtask setup`",
            ebpf_dir.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or_default()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .map(str::to_owned)
        .context("rustup named no toolchain for nexd-ebpf")
}

/// What of the eBPF toolchain is missing, if anything.
fn missing_toolchain(toolchain: &str) -> Option<String> {
    let Some(sysroot) = sysroot(toolchain) else {
        return Some(format!("the {toolchain} Rust toolchain is not installed"));
    };
    if !rust_src_lock(&sysroot).exists() {
        return Some(format!("{toolchain} has no rust-src component"));
    }
    if find_in_path("bpf-linker").is_none() {
        return Some("bpf-linker is not on PATH".into());
    }
    None
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
