//! The architectures nexd is built, packaged and tested for, and how to
//! build for each from this x86_64 machine: amd64 natively, arm64 with
//! Debian's cross toolchain (gcc-aarch64-linux-gnu as the linker, set in
//! .cargo/config.toml) and its binaries run by qemu-user.
//!
//! The eBPF object needs nothing per architecture: it is bpfel-unknown-none
//! either way, built by nexd-agent's build script for whichever target
//! nexd-agent is compiled for.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

use crate::{
    progress::step,
    setup::{self, Need},
    workspace,
};

/// A Debian architecture nexd supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// Debian's name for it.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Rust's target triple.
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// The GNU triple of Debian's library directories (`lib/<triple>`).
    pub fn gnu_triple(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-linux-gnu",
            Arch::Arm64 => "aarch64-linux-gnu",
        }
    }

    /// ELF's e_machine of its executables.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::Amd64 => 0x3e,
            Arch::Arm64 => 0xb7,
        }
    }

    /// Whether this machine runs its binaries natively.
    pub fn is_host(self) -> bool {
        match self {
            Arch::Amd64 => cfg!(target_arch = "x86_64"),
            Arch::Arm64 => cfg!(target_arch = "aarch64"),
        }
    }

    /// `--target <triple>` for a cross build, nothing for the host (so host
    /// builds share target/debug and target/release with everything else).
    pub fn cargo_target_args(self) -> Vec<&'static str> {
        if self.is_host() {
            Vec::new()
        } else {
            vec!["--target", self.rust_target()]
        }
    }

    /// The directory cargo writes this architecture's binaries to.
    pub fn output_dir(self, release: bool) -> PathBuf {
        let profile = if release { "release" } else { "debug" };
        let target = workspace::root().join("target");
        if self.is_host() {
            target.join(profile)
        } else {
            target.join(self.rust_target()).join(profile)
        }
    }

    /// qemu-user's binary for it, and where Debian's cross libc
    /// (libc6-<arch>-cross) puts the dynamic loader and libraries it needs.
    fn qemu_user(self) -> (&'static str, &'static str) {
        match self {
            Arch::Amd64 => ("qemu-x86_64", "/usr/x86_64-linux-gnu"),
            Arch::Arm64 => ("qemu-aarch64", "/usr/aarch64-linux-gnu"),
        }
    }

    /// The environment variable naming cargo's runner for this target.
    fn runner_var(self) -> String {
        format!(
            "CARGO_TARGET_{}_RUNNER",
            self.rust_target().replace('-', "_").to_uppercase()
        )
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.debian())
    }
}

/// Runs `cargo <args>` for `arch` (with `--target` when cross-building).
pub fn cargo(arch: Arch, args: &[&str]) -> anyhow::Result<()> {
    let mut c = crate::workspace::cargo_command();
    let (verb, rest) = args.split_first().context("no cargo verb")?;
    c.arg(verb).args(arch.cargo_target_args()).args(rest);
    let status = c
        .status()
        .with_context(|| format!("cannot run cargo {args:?}"))?;
    if !status.success() {
        bail!("cargo {} for {arch} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Release builds of nexd and nexctl for `arch`; returns their directory.
/// Release for every architecture: the packages ship these, and the arm64
/// VM tests and unit tests reuse the same compiled dependencies.
pub fn build_release(arch: Arch) -> anyhow::Result<PathBuf> {
    step(&format!("building nexd and nexctl for {arch} (release)"));
    cargo(
        arch,
        &["build", "--release", "--package", "nexd-agent", "--bins"],
    )?;
    Ok(arch.output_dir(true))
}

/// nexd-agent's unit tests for a foreign `arch`, run by qemu-user (cargo's
/// runner, set through the environment). Only the library's unit tests:
/// they are pure (parsing, wire formats, decisions); the eBPF program
/// tests and the end-to-end tests need the target's kernel and run in the
/// VM (`cargo xtask vm-test --arch arm64`).
pub fn unit_tests_under_qemu(arch: Arch) -> anyhow::Result<()> {
    if arch.is_host() {
        bail!("{arch} is this machine's architecture: run `cargo test` instead");
    }
    setup::ensure(
        "the unit tests under qemu-user",
        &[Need::Build, Need::Arm64, Need::QemuUser],
    )?;
    let (qemu, sysroot) = arch.qemu_user();
    step(&format!(
        "nexd-agent's unit tests for {arch} under {qemu} (release build)"
    ));
    let mut c = crate::workspace::cargo_command();
    c.args(["test", "--release", "--target", arch.rust_target()])
        .args(["--package", "nexd-agent", "--lib"])
        .env(arch.runner_var(), format!("{qemu} -L {sysroot}"));
    let status = c.status().context("cannot run cargo test")?;
    if !status.success() {
        bail!("nexd-agent's unit tests failed on {arch} under {qemu} ({status})");
    }
    Ok(())
}
