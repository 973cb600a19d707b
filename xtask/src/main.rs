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
mod progress;
mod setup;
mod test;
mod vm;
mod workspace;

use std::process::ExitCode;

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
    progress::started();
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
