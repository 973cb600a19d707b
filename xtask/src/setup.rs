//! `cargo xtask setup`: installs what building and testing nexd needs on a
//! fresh Debian machine, and does nothing (quickly) when all is there.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::step;

#[derive(clap::Args)]
pub struct Args {
    /// Only report what is missing; install nothing.
    #[arg(long)]
    pub check: bool,
}

/// Debian packages, installed with --no-install-recommends.
/// llvm-22-dev (+ the libraries llvm-sys links) builds bpf-linker; the rest
/// are tools the tests and the lab drive.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "nftables",
    "wireguard-tools",
    // The independent userspace WireGuard the throughput benchmark
    // compares with.
    "wireguard-go",
    "iputils-ping",
    "procps",
    "util-linux",
    "tcpdump",
    "iperf3",
    "netsniff-ng",
];

/// The bpf-linker release known to work with aya-ebpf 0.2 and LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot run {desc}"))?;
    if !status.success() {
        bail!("{desc} failed ({status})");
    }
    Ok(())
}

/// What the pinned nightly needs: rust-src for `-Z build-std=core`, clippy
/// for linting the eBPF crate.
const NIGHTLY_COMPONENTS: [&str; 2] = ["rust-src", "clippy"];

/// Whether the pinned nightly is installed, and which of its components
/// are missing.
fn nightly_ready(toolchain: &str) -> (bool, Vec<&'static str>) {
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let has_nightly = toolchains.lines().any(|l| {
        let name = l.split_whitespace().next().unwrap_or_default();
        name == toolchain || name.starts_with(&format!("{toolchain}-"))
    });
    if !has_nightly {
        return (false, NIGHTLY_COMPONENTS.to_vec());
    }
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", toolchain, "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let missing = NIGHTLY_COMPONENTS
        .into_iter()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect();
    (true, missing)
}

fn bpf_linker_ready() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    let toolchain = crate::nightly()?;
    let (has_nightly, missing_components) = nightly_ready(&toolchain);
    let has_linker = bpf_linker_ready();
    if args.check {
        println!(
            "missing Debian packages: {}",
            if missing.is_empty() {
                "none".into()
            } else {
                missing.join(" ")
            }
        );
        println!(
            "{toolchain} (eBPF toolchain): {}",
            if has_nightly { "yes" } else { "missing" }
        );
        println!(
            "{toolchain} components missing: {}",
            if missing_components.is_empty() {
                "none".into()
            } else {
                missing_components.join(" ")
            }
        );
        println!("bpf-linker: {}", if has_linker { "yes" } else { "missing" });
        println!(
            "cargo-fuzz: {}",
            if crate::fuzz::installed() {
                "yes"
            } else {
                "missing"
            }
        );
        if !missing.is_empty() || !missing_components.is_empty() || !has_linker {
            bail!("setup is incomplete; run `cargo xtask setup`");
        }
        return Ok(());
    }
    if !missing.is_empty() {
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "installing {} needs root; run `sudo cargo xtask setup`",
                missing.join(" ")
            );
        }
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        exec(Command::new("apt-get").args(["update", "-q"]))?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let lint_missing: Vec<&str> = ["rustfmt", "clippy"]
        .into_iter()
        .filter(|c| !components.lines().any(|l| l.starts_with(c)))
        .collect();
    if !lint_missing.is_empty() {
        step(&format!(
            "adding {} to the stable toolchain",
            lint_missing.join(" and ")
        ));
        exec(
            Command::new("rustup")
                .args(["component", "add"])
                .args(&lint_missing),
        )?;
    }
    if !has_nightly {
        step(&format!(
            "installing {toolchain} with rust-src and clippy (the eBPF build's toolchain, pinned in nexd-ebpf/rust-toolchain.toml)"
        ));
        let mut c = Command::new("rustup");
        c.args(["toolchain", "install", &toolchain, "--profile", "minimal"]);
        for comp in NIGHTLY_COMPONENTS {
            c.args(["--component", comp]);
        }
        exec(&mut c)?;
    } else if !missing_components.is_empty() {
        step(&format!(
            "adding {} to {toolchain}",
            missing_components.join(" and ")
        ));
        exec(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", &toolchain])
                .args(&missing_components),
        )?;
    }
    if !has_linker {
        step(&format!(
            "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 1 to 4 minutes on 2 cores)"
        ));
        exec(
            Command::new("cargo")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                // llvm-sys reads the first, bpf-linker's build script the second;
                // without them it finds an older llvm-config on PATH.
                .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
        if !bpf_linker_ready() {
            bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
        }
    }
    if !crate::fuzz::installed() {
        step("installing cargo-fuzz (about 2 minutes)");
        exec(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    step("setup complete: Debian packages, nightly + rust-src + clippy, bpf-linker, cargo-fuzz");
    Ok(())
}
