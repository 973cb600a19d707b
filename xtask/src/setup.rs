//! `cargo xtask setup`: installs what building and testing nexd needs on a
//! fresh Debian machine, and does nothing (quickly) when all is there.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::progress::step;

#[derive(clap::Args)]
pub struct Args {
    /// Only report what is missing; install nothing.
    #[arg(long)]
    pub check: bool,
}

/// Debian packages, installed with --no-install-recommends.
/// llvm-22-dev (+ the libraries llvm-sys links) builds bpf-linker;
/// protobuf-compiler and libprotobuf-dev (protoc and its well-known
/// .proto files) build etcd-client's gRPC code; the rest are tools the
/// tests and the lab drive (etcd-server and etcd-client: the registry
/// tests' etcd and etcdctl; openssl: their TLS certificates).
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
    "protobuf-compiler",
    "libprotobuf-dev",
    "etcd-server",
    "etcd-client",
    "openssl",
    // Packaging and arm64 (`cargo xtask package`, `vm-test --arch arm64`,
    // `vm-test --systemd`): the cross linker and libc, qemu-user for the
    // arm64 unit tests (no binfmt registration: cargo's runner calls it),
    // and mmdebstrap for the VM images.
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user",
    "mmdebstrap",
];

/// The cross target for arm64 (`rustup target add`).
const ARM64_TARGET: &str = "aarch64-unknown-linux-gnu";

/// cargo-deb, pinned like bpf-linker: the packages are made by this one.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Whether cargo-deb (any version) is installed.
pub fn cargo_deb_installed() -> bool {
    Command::new("cargo-deb")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn arm64_target_installed() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == ARM64_TARGET)
        })
}

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
    let toolchain = crate::workspace::nightly()?;
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
        println!(
            "cargo-deb: {}",
            if cargo_deb_installed() {
                "yes"
            } else {
                "missing"
            }
        );
        println!(
            "Rust target {ARM64_TARGET}: {}",
            if arm64_target_installed() {
                "yes"
            } else {
                "missing"
            }
        );
        if !missing.is_empty()
            || !missing_components.is_empty()
            || !has_linker
            || !cargo_deb_installed()
            || !arm64_target_installed()
        {
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
    if !arm64_target_installed() {
        step(&format!(
            "adding the Rust target {ARM64_TARGET} (arm64 cross builds)"
        ));
        exec(Command::new("rustup").args(["target", "add", ARM64_TARGET]))?;
    }
    if !cargo_deb_installed() {
        step(&format!(
            "installing cargo-deb {CARGO_DEB_VERSION} (about 5 minutes on 2 cores)"
        ));
        exec(Command::new("cargo").args([
            "install",
            "--locked",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
        ]))?;
    }
    step(
        "setup complete: Debian packages, nightly + rust-src + clippy, bpf-linker, cargo-fuzz, cargo-deb, the arm64 target",
    );
    Ok(())
}
