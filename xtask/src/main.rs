//! `cargo xtask <task>`: the one entry point for chores around nexd.
//!
//! * `setup`      install what a fresh Debian machine needs (idempotent)
//! * `build-ebpf` build the eBPF programs and show the compiler's output
//! * `test`       the whole test suite (what CI runs)
//! * `lab`        a local mesh of namespaced devices, narrated
//! * `bench`      benchmarks, each against a baseline measured in the same run
//! * `fuzz`       the cargo-fuzz targets, each for a bounded time
//! * `man`        man pages from the clap definitions
//! * `vm-test`    the e2e suite in VMs with stock kernels and kernel WireGuard
//! * `package`    Debian packages for amd64 and arm64 (cargo-deb)

mod arch;
mod bench;
mod build_ebpf;
mod fuzz;
mod lab;
mod man;
mod package;
mod setup;
mod test;
mod vm;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Chores for the nexd workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything building and testing nexd needs: Debian packages
    /// (--no-install-recommends), nightly with rust-src, bpf-linker built
    /// against Debian's LLVM 22. Quick when everything is there.
    Setup(setup::Args),
    /// Build the eBPF programs for bpfel-unknown-none (nightly, build-std).
    BuildEbpf(build_ebpf::Args),
    /// Run the whole test suite: setup, formatting, clippy, unit tests and
    /// the end-to-end tests in network namespaces (needs root).
    Test(test::Args),
    /// Start a local mesh of nexd agents in network namespaces and show it
    /// working (needs root).
    Lab(lab::Args),
    /// Benchmarks: classifier cost, split tunnelling at scale, throughput,
    /// control-plane timings; each a ratio against a baseline (needs root).
    Bench(bench::Args),
    /// Run the cargo-fuzz targets (control protocol, mesh file,
    /// announcements) for a bounded time each.
    Fuzz(fuzz::Args),
    /// Generate man pages for nexd and nexctl from their definitions.
    Man(man::Args),
    /// Run the end-to-end suite in VMs booting stock Debian kernels, with
    /// kernel WireGuard (qemu, software emulation; needs root).
    VmTest(vm::Args),
    /// Build the Debian packages (.deb) of nexd for amd64 and/or arm64
    /// (cargo-deb; arm64 cross-built).
    Package(package::Args),
}

fn main() -> ExitCode {
    started();
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup(a) => setup::run(&a),
        Task::BuildEbpf(a) => build_ebpf::run(&a),
        Task::Test(a) => test::run(&a),
        Task::Lab(a) => lab::run(a),
        Task::Bench(a) => bench::run(&a),
        Task::Fuzz(a) => fuzz::run(&a),
        Task::Man(a) => man::run(&a),
        Task::VmTest(a) => vm::run(&a),
        Task::Package(a) => package::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
    let path = workspace_root().join("nexd-ebpf/rust-toolchain.toml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let file: File =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(file.toolchain.channel)
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
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
    let dir = workspace_root().join(if release {
        "target/release"
    } else {
        "target/debug"
    });
    // SAFETY: set while this process has no other threads reading the
    // environment.
    unsafe { std::env::set_var("NEXD_BIN_DIR", dir) };
    Ok(())
}

/// A `cargo` command in the workspace root without the `CARGO_*`
/// variables the outer `cargo run` set for xtask: inherited, they change
/// build-script fingerprints and make the inner build recompile crates
/// every time.
pub fn cargo_command() -> std::process::Command {
    let mut c =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
            c.env_remove(k);
        }
    }
    c.current_dir(workspace_root());
    c
}

/// Prints a step header, so long runs show where they are.
/// When xtask started.
fn started() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

/// Prints a step with the time since xtask started, so a CI log shows
/// where its minutes go (the budget is tight).
pub fn step(msg: &str) {
    let t = started().elapsed().as_secs();
    println!("\x1b[1m==> [{:02}:{:02}] {msg}\x1b[0m", t / 60, t % 60);
}
