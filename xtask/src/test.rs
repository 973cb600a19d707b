//! `cargo xtask test`: the whole suite, as CI runs it.

use anyhow::{Context as _, bail};

use crate::{
    arch::Arch,
    progress::step,
    setup::{self, Need},
};

#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo xtask setup` (when you know everything is installed).
    #[arg(long)]
    pub no_setup: bool,
    /// Skip the formatting and clippy checks.
    #[arg(long)]
    pub no_lint: bool,
    /// Skip `cargo xtask bench --quick` at the end.
    #[arg(long)]
    pub no_bench: bool,
    /// Skip `cargo xtask fuzz --dev` (15 s per target).
    #[arg(long)]
    pub no_fuzz: bool,
    /// Skip `cargo xtask vm-test` (the e2e suite in VMs with kernel
    /// WireGuard, about 3 minutes per kernel under emulation).
    #[arg(long)]
    pub no_vm: bool,
    /// Kernels for the VM tests (as `cargo xtask vm-test --kernel`);
    /// default: 6.1 and 6.12.
    #[arg(long = "vm-kernel", value_name = "6.1|6.12|PATH")]
    pub vm_kernels: Vec<String>,
    /// Skip the packages and arm64: `cargo xtask package` for amd64 and
    /// arm64, the arm64 unit tests under qemu-user, and (unless --no-vm)
    /// the arm64 VM suite and the package under systemd.
    #[arg(long)]
    pub no_package: bool,
    /// Extra arguments for `cargo test` (a test name filter, `--nocapture`...).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = crate::workspace::cargo_command();
    cmd.args(args);
    let status = cmd
        .status()
        .with_context(|| format!("cannot run cargo {args:?}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !args.no_setup {
        setup::ensure("the test suite", &needs(args))?;
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the end-to-end tests create network namespaces and need root; run `sudo cargo xtask test`"
        );
    }
    // Under CI a test that lacks its privileges fails, never skips.
    // SAFETY: set before this process starts threads that read the
    // environment (the fetching below is the first); the test processes
    // inherit it.
    unsafe { std::env::set_var(nexd_testkit::REQUIRE_PRIVILEGES, "1") };
    let vms = VmRuns::of(args);
    let fetching = vms.fetch_ahead();
    if !args.no_lint {
        step("cargo fmt --check");
        cargo(&["fmt", "--all", "--", "--check"])?;
        step("cargo clippy --all-targets -- -D warnings");
        cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
        step("cargo clippy on nexd-ebpf (bpfel-unknown-none, the pinned nightly) -- -D warnings");
        crate::build_ebpf::clippy()?;
    }
    step("building nexd and nexctl (with the embedded eBPF object)");
    cargo(&["build", "--package", "nexd-agent", "--bins"])?;
    step("running unit and end-to-end tests");
    // Default members: the eBPF crate only builds for the BPF target.
    let mut test_args = vec!["test"];
    if !args.cargo_test_args.is_empty() {
        test_args.push("--");
        test_args.extend(args.cargo_test_args.iter().map(String::as_str));
    }
    cargo(&test_args)?;
    // Before the lab: its build sets the environment, which no other
    // thread may be reading then.
    fetched(fetching);
    step("the lab, non-interactive: every narrated check must hold");
    crate::lab::run(crate::lab::Args {
        action: None,
        keep: false,
        no_setup: true,
    })?;
    if let Some(amd64) = &vms.amd64 {
        step("the e2e suite in VMs booting stock kernels, with kernel WireGuard");
        crate::vm::run(amd64)?;
    }
    if !args.no_package {
        packages_and_arm64(&vms)?;
    }
    if !args.no_fuzz {
        step("fuzzing each target for 15 s");
        crate::fuzz::run(&crate::fuzz::Args {
            seconds: 15,
            target: None,
            // A smoke run, so built unoptimised: 630 s of CPU instead of
            // 1195 s, and without the optimised build's serial tail (nexd
            // at opt-level 3 in one codegen unit: over 260 s of CPU on one
            // core). Each target still runs 15 s, at 4 to 18 times fewer
            // runs a second; `cargo xtask fuzz` keeps the optimised build.
            dev: true,
        })?;
    }
    if !args.no_bench {
        step(
            "benchmarks, once on tiny sizes (no timing is asserted; this keeps the bench code working)",
        );
        crate::bench::run(&crate::bench::Args {
            quick: true,
            json: None,
            only: Vec::new(),
            rounds: 1,
            no_setup: true,
        })?;
    }
    step("all tests passed");
    Ok(())
}

/// What the run needs installed, as its flags say.
fn needs(args: &Args) -> Vec<Need> {
    let mut needs = vec![Need::Build, Need::Namespaces, Need::Tests, Need::ExitGroups];
    for (skipped, what) in [
        (args.no_lint, &[Need::Lint][..]),
        (args.no_vm, &[Need::Vm]),
        (
            args.no_package,
            &[Need::Package, Need::Arm64, Need::QemuUser],
        ),
        (args.no_fuzz, &[Need::Fuzz]),
        (args.no_bench, &[Need::Bench]),
    ] {
        if !skipped {
            needs.extend_from_slice(what);
        }
    }
    needs
}

/// The VM runs of CI, each `None` when its flags skip it.
struct VmRuns {
    /// The whole suite on amd64, on the default kernels (or --vm-kernel).
    amd64: Option<crate::vm::Args>,
    /// CI's part of the arm64 suite.
    arm64: Option<crate::vm::Args>,
    /// The amd64 package under systemd.
    systemd: Option<crate::vm::Args>,
}

impl VmRuns {
    fn of(args: &Args) -> Self {
        let vms = !args.no_vm;
        let packages = vms && !args.no_package;
        VmRuns {
            amd64: vms.then(|| crate::vm::Args {
                kernels: args.vm_kernels.clone(),
                ..ci_vm(Arch::Amd64)
            }),
            arm64: packages.then(|| crate::vm::Args {
                kernels: vec![CI_ARM64_KERNEL.to_owned()],
                tests: CI_ARM64_TESTS.iter().map(|t| (*t).to_owned()).collect(),
                ..ci_vm(Arch::Arm64)
            }),
            systemd: packages.then(|| crate::vm::Args {
                systemd: true,
                ..ci_vm(Arch::Amd64)
            }),
        }
    }

    /// Starts fetching what the runs boot in the background (mostly
    /// waiting on the network and the disk, so it costs the compiling
    /// next to it little); `None` when there are no runs.
    fn fetch_ahead(&self) -> Option<Fetching> {
        let runs: Vec<crate::vm::Args> = [&self.amd64, &self.arm64, &self.systemd]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        if runs.is_empty() {
            return None;
        }
        step("fetching what the VMs boot, in the background (qemu, Debian userlands, kernels)");
        Some(std::thread::spawn(move || {
            // The lowest priority for this thread and what it starts (Linux
            // keeps a nice value per thread, and children inherit it): its
            // bit of CPU (dpkg unpacking) goes in the gaps of the builds and
            // never slows the tests that may overlap it.
            // SAFETY: setpriority takes no pointers; on Linux, 0 with
            // PRIO_PROCESS is the calling thread. A failure leaves it as is.
            let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            let t = std::time::Instant::now();
            crate::vm::fetch_ahead(&runs).map(|()| t.elapsed().as_secs())
        }))
    }
}

type Fetching = std::thread::JoinHandle<anyhow::Result<u64>>;

/// Waits for the background fetching and says how it went. A failure is
/// not the run's: each VM step fetches what is missing itself, and fails
/// there with the reason if it still cannot.
fn fetched(fetching: Option<Fetching>) {
    let Some(handle) = fetching else { return };
    let waited = std::time::Instant::now();
    match handle.join() {
        Ok(Ok(secs)) => step(&format!(
            "the VMs' downloads took {secs} s in the background (waited {} s for them here)",
            waited.elapsed().as_secs()
        )),
        Ok(Err(e)) => step(&format!(
            "fetching ahead for the VMs failed ({e:#}); each VM step fetches what it lacks"
        )),
        Err(_) => step("fetching ahead for the VMs panicked; each VM step fetches what it lacks"),
    }
}

/// A VM run of CI on `arch`: the whole suite on the default kernels. A run
/// takes about 3 minutes; the timeout bounds a hang (retried once) well
/// inside the CI budget.
fn ci_vm(arch: Arch) -> crate::vm::Args {
    crate::vm::Args {
        kernels: Vec::new(),
        timeout_minutes: 12,
        arch,
        tests: Vec::new(),
        systemd: false,
        bench: false,
        rounds: None,
    }
}

/// What `cargo xtask test` runs for the packages and arm64, each step
/// timed (the CI budget is tight; the README has the figures): both
/// packages, the arm64 unit tests under qemu-user and the VM runs of
/// `vms` for them: part of the arm64 VM suite and the package under
/// systemd.
fn packages_and_arm64(vms: &VmRuns) -> anyhow::Result<()> {
    let timed = |name: &str, f: &dyn Fn() -> anyhow::Result<()>| {
        let t = std::time::Instant::now();
        let r = f();
        step(&format!(
            "{name}: {} in {} s",
            if r.is_ok() { "done" } else { "FAILED" },
            t.elapsed().as_secs()
        ));
        r
    };
    timed("packages for amd64 and arm64", &|| {
        crate::package::run(&crate::package::Args {
            arches: vec![Arch::Amd64, Arch::Arm64],
        })
    })?;
    timed("arm64 unit tests under qemu-user", &|| {
        crate::arch::unit_tests_under_qemu(Arch::Arm64)
    })?;
    if let Some(arm64) = &vms.arm64 {
        timed("the arm64 VM suite (CI's part)", &|| crate::vm::run(arm64))?;
    }
    if let Some(systemd) = &vms.systemd {
        timed("the package under systemd", &|| crate::vm::run(systemd))?;
    }
    Ok(())
}

/// The part of the arm64 VM suite CI runs: Debian 12's own kernel, the
/// mesh, the exit node with the source-address proof, and the eBPF
/// programs under the arm64 JIT (about 100 s). The gateway test and 6.12
/// (another 7 minutes) run with `cargo xtask vm-test --arch arm64`.
const CI_ARM64_KERNEL: &str = "6.1";
const CI_ARM64_TESTS: &[&str] = &["mesh", "exit_node", "programs"];
