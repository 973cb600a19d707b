//! `cargo xtask vm-test`: the end-to-end tests inside a VM booting a stock
//! Debian kernel, with kernel WireGuard, under qemu (TCG: no usable KVM on
//! these machines), for amd64 and arm64; and (`--systemd`) the package
//! under a real systemd.
//!
//! Everything is fetched into `target/vm-cache` once: the kernel package
//! (amd64 6.1 through this machine's apt; 6.12, and arm64's, by HTTP from
//! Debian's signed indexes; or a `.deb` given by path), a Debian userland
//! of the VM's architecture (busybox-static, iproute2, nftables, ...,
//! unpacked by mmdebstrap without running anything), and qemu with the
//! libraries this machine lacks (`apt-get download` + `dpkg-deb -x`:
//! installing qemu-system-* would replace the machine's newer qemu-utils).
//! Each run builds an initramfs with busybox, the tools the tests drive
//! (ip, nft, tc, ping, wg, nsenter) and their libraries, the kernel modules
//! they need, nexd, nexctl and the test binaries; boots it; streams the
//! serial console; and returns the suite's status, which the guest prints
//! as `NEXD-VM-RESULT: <n>` before powering off.

mod cpio;
mod elf;
mod fetch;
mod image;
mod systemd;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    arch::Arch,
    progress::step,
    setup::{self, Need},
    workspace,
};

#[derive(Clone, clap::Args)]
pub struct Args {
    /// Kernels: 6.1 (bookworm), 6.12 (bookworm-backports) or a path to a
    /// Debian linux-image .deb. Repeatable; default: 6.1 and 6.12 (with
    /// --systemd: 6.1).
    #[arg(long = "kernel", value_name = "6.1|6.12|PATH")]
    pub kernels: Vec<String>,
    /// Minutes one VM run may take before it is killed (and retried once
    /// if it never printed a result).
    #[arg(long, default_value_t = 30)]
    pub timeout_minutes: u64,
    /// The VM's architecture: amd64 (qemu-system-x86_64) or arm64
    /// (qemu-system-aarch64, -M virt; nexd and the tests cross-built).
    #[arg(long, value_enum, default_value_t = Arch::Amd64)]
    pub arch: Arch,
    /// Only these test binaries of the suite (repeatable): mesh,
    /// exit_node, gateway, exit_trust (and programs on arm64). Default: all.
    #[arg(long = "test", value_name = "BINARY")]
    pub tests: Vec<String>,
    /// Instead of the suite: install the amd64 .deb in a Debian system
    /// booted with systemd as init, and check the service's life cycle
    /// (see xtask/src/vm/systemd-test.sh).
    #[arg(long)]
    pub systemd: bool,
    /// Instead of the suite: the kernel WireGuard measurement (TCP through
    /// the exit node, nexd against the same kernel WireGuard configured by
    /// hand, alternating; tests/tests/kernel_wg_bench.rs, an ignored test
    /// elsewhere). Prints `KWG-BENCH` lines with the ratio of the medians.
    #[arg(long, conflicts_with_all = ["systemd", "tests"])]
    pub bench: bool,
    /// With --bench: rounds of each configuration (default: the test's, 3).
    #[arg(long, requires = "bench", value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: Option<u32>,
}

/// One test binary of the suite and the test in it to run (every test of
/// the binary when `test` is empty).
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub package: &'static str,
    pub binary: &'static str,
    pub test: &'static str,
    /// Run it although it is `#[ignore]`d (`--ignored`): measurements
    /// that only mean something inside the VM.
    pub ignored: bool,
}

/// The tests run inside: mesh up over kernel WireGuard; exit node
/// enable/disable with the source-address proof and direct mesh traffic;
/// the steering classifier and the leak guard; clean stops throughout;
/// an exit node killed on kernel WireGuard (its link, peers, forwarding
/// and table left behind) forwarding nothing its programs did not see.
pub const SUITE: [Case; 4] = [
    Case {
        package: "nexd-tests",
        binary: "mesh",
        test: "three_node_mesh",
        ignored: false,
    },
    Case {
        package: "nexd-tests",
        binary: "exit_node",
        test: "exit_node_client_end_to_end",
        ignored: false,
    },
    Case {
        package: "nexd-tests",
        binary: "gateway",
        test: "lan_gateway_split_tunnel_and_kill_switch",
        ignored: false,
    },
    Case {
        package: "nexd-tests",
        binary: "exit_trust",
        test: "an_exit_node_that_dies_forwards_nothing_its_programs_did_not_pass",
        ignored: false,
    },
];

/// On arm64 also the eBPF programs' verdicts (BPF_PROG_TEST_RUN) under that
/// kernel's JIT; on amd64 `cargo test` runs them on the host.
pub const ARM64_PROGRAMS: Case = Case {
    package: "nexd-agent",
    binary: "programs",
    test: "",
    ignored: false,
};

/// `--bench`: kernel WireGuard through the exit node, nexd against the
/// same kernel WireGuard configured by hand (issue 15). Not in the suite:
/// it takes minutes under emulation and proves nothing the suite needs.
pub const BENCH: Case = Case {
    package: "nexd-tests",
    binary: "kernel_wg_bench",
    test: "kernel_wireguard_exit_throughput",
    ignored: true,
};

/// The cases for `arch`, narrowed to `only` (binary names) if given.
fn cases(arch: Arch, only: &[String]) -> anyhow::Result<Vec<Case>> {
    let mut all = SUITE.to_vec();
    if arch == Arch::Arm64 {
        all.push(ARM64_PROGRAMS);
    }
    if only.is_empty() {
        return Ok(all);
    }
    for o in only {
        if !all.iter().any(|c| c.binary == o) {
            bail!("no test binary {o} in the {arch} suite");
        }
    }
    Ok(all
        .into_iter()
        .filter(|c| only.iter().any(|o| o == c.binary))
        .collect())
}

/// Where everything the VMs boot is fetched to, once.
fn cache() -> anyhow::Result<PathBuf> {
    let cache = workspace::root().join("target/vm-cache");
    std::fs::create_dir_all(&cache)?;
    Ok(cache)
}

/// The kernels a run boots: those asked for, else the suite's two (the
/// systemd test's one).
fn kernels(args: &Args) -> Vec<String> {
    match (args.kernels.is_empty(), args.systemd) {
        (false, _) => args.kernels.clone(),
        (true, false) => vec!["6.1".to_owned(), "6.12".to_owned()],
        (true, true) => vec!["6.1".to_owned()],
    }
}

/// Fetches into the cache what the runs `runs` will boot (qemu, the
/// userland or the systemd system, the kernels), leaving what is there, so
/// that the runs find it. `cargo xtask test` calls this in the background
/// while it compiles: from nothing it takes about 4 minutes, nearly all
/// of it waiting on the mirror and the disk (about 40 s of CPU), which the
/// VM steps would otherwise wait through one after the other.
pub fn fetch_ahead(runs: &[Args]) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("fetching packages needs root; run `sudo cargo xtask vm-test`");
    }
    let cache = cache()?;
    for args in runs {
        let arch = if args.systemd { Arch::Amd64 } else { args.arch };
        fetch::qemu(&cache, arch)?;
        if args.systemd {
            systemd::rootfs(&cache)?;
        } else {
            fetch::debian_tree(&cache, "userland", arch, image::USERLAND)?;
        }
        for k in kernels(args) {
            fetch::kernel(&cache, &k, arch)?;
        }
    }
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("fetching packages needs root; run `sudo cargo xtask vm-test`");
    }
    let mut needs = vec![Need::Build, Need::Vm];
    if !args.arch.is_host() {
        needs.push(Need::Arm64);
    }
    setup::ensure("the VM tests", &needs)?;
    let cache = cache()?;
    if args.systemd {
        return systemd::run(&cache, args);
    }
    let kernels = kernels(args);
    let cases = if args.bench {
        vec![BENCH]
    } else {
        cases(args.arch, &args.tests)?
    };
    let what = if args.bench { "measurement" } else { "suite" };
    let qemu = fetch::qemu(&cache, args.arch)?;
    let userland = fetch::debian_tree(&cache, "userland", args.arch, image::USERLAND)?;
    let binaries = image::build_binaries(args.arch, &cases, args.bench)?;
    let env: Vec<(String, String)> = args
        .rounds
        .map(|r| ("NEXD_KWG_BENCH_ROUNDS".to_owned(), r.to_string()))
        .into_iter()
        .collect();
    let mut failures = Vec::new();
    for k in &kernels {
        let kernel = fetch::kernel(&cache, k, args.arch)?;
        step(&format!("building the initramfs for {}", kernel.version));
        let initrd = image::initramfs(
            &cache, args.arch, &kernel, &userland, &binaries, &cases, &env,
        )?;
        let started = Instant::now();
        let mut attempt = 0;
        let status = loop {
            attempt += 1;
            step(&format!("booting {} (attempt {attempt})", kernel.version));
            match boot(
                &qemu,
                args.arch,
                &kernel.vmlinuz,
                &initrd,
                "rdinit=/init",
                BOOTED,
                Duration::from_secs(args.timeout_minutes * 60),
            )? {
                Some(status) => break status,
                None if attempt < 2 => continue,
                None => bail!(
                    "the VM with {} never printed a result, twice",
                    kernel.version
                ),
            }
        };
        let took = started.elapsed().as_secs();
        if status == 0 {
            step(&format!(
                "kernel {}: the {what} passed in {took} s",
                kernel.version
            ));
        } else {
            step(&format!(
                "kernel {}: the {what} FAILED in {took} s",
                kernel.version
            ));
            failures.push(kernel.version.clone());
        }
    }
    if !failures.is_empty() {
        bail!("the {what} failed in the VM with: {}", failures.join(", "));
    }
    Ok(())
}

/// What /init prints once the kernel is up and the modules are loaded.
pub const BOOTED: &str = "nexd VM: kernel";

/// Boots and streams the console; `Some(status)` when the guest reported
/// one, `None` when it hung or died first.
/// `init` goes on the kernel command line; `marker` is what the guest
/// prints once it is up (a boot that has not printed it in two minutes has
/// hung).
fn boot(
    qemu: &fetch::Qemu,
    arch: Arch,
    vmlinuz: &Path,
    initrd: &Path,
    init: &str,
    marker: &str,
    timeout: Duration,
) -> anyhow::Result<Option<i32>> {
    // arm64: the generic virt board; pointer authentication with QEMU's
    // own cheap algorithm (the architected one costs a lot under TCG).
    let (machine, cpu, console) = match arch {
        Arch::Amd64 => ("q35", "max", "ttyS0"),
        Arch::Arm64 => ("virt", "max,pauth-impdef=on", "ttyAMA0"),
    };
    let mut cmd = Command::new(&qemu.binary);
    cmd.args([
        "-M",
        machine,
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        cpu,
        "-smp",
        "2",
        "-m",
        "2048",
    ])
    .args([
        "-nodefaults",
        "-display",
        "none",
        "-nic",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg(format!(
        "console={console} {init} panic=-1 quiet loglevel=3"
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for dir in &qemu.data_dirs {
        cmd.arg("-L").arg(dir);
    }
    if let Some(lib) = &qemu.library_path {
        cmd.env("LD_LIBRARY_PATH", lib);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", qemu.binary.display()))?;
    let stdout = child.stdout.take().context("no qemu stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let start = Instant::now();
    let mut result = None;
    let mut reported: Option<Instant> = None;
    let mut booted = false;
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                println!("vm| {line}");
                booted |= line.contains(marker);
                if let Some(r) = line.trim().strip_prefix("NEXD-VM-RESULT: ") {
                    result = r.trim().parse::<i32>().ok();
                    reported = Some(Instant::now());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // A boot that has not reached /init in two minutes has hung (seen
        // about once in 30 boots under TCG; a good boot takes seconds).
        // Once booted, tests may be quiet for minutes: only `timeout` holds.
        let hung = !booted && start.elapsed() > Duration::from_secs(120);
        // The result is in: a minute for the guest to power off.
        let done = reported.is_some_and(|t| t.elapsed() > Duration::from_secs(60));
        if start.elapsed() > timeout || hung || done {
            if done {
                eprintln!("vm: reported, but did not power off in a minute; killing qemu");
            } else {
                eprintln!("vm: no progress; killing qemu");
            }
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suites_per_architecture() {
        let names = |c: Vec<Case>| c.iter().map(|c| c.binary).collect::<Vec<_>>();
        let amd64 = cases(Arch::Amd64, &[]).expect("amd64");
        assert_eq!(names(amd64), ["mesh", "exit_node", "gateway", "exit_trust"]);
        let arm64 = cases(Arch::Arm64, &[]).expect("arm64");
        assert_eq!(
            names(arm64),
            ["mesh", "exit_node", "gateway", "exit_trust", "programs"]
        );
        let some = cases(Arch::Arm64, &["exit_node".into(), "mesh".into()]).expect("subset");
        assert_eq!(names(some), ["mesh", "exit_node"]);
        assert!(cases(Arch::Amd64, &["programs".into()]).is_err());
        // The measurement is never part of the suite (CI's duration).
        assert!(
            cases(Arch::Amd64, &[])
                .expect("amd64")
                .iter()
                .all(|c| !c.ignored)
        );
        assert!(cases(Arch::Amd64, &[BENCH.binary.into()]).is_err());
    }
}
