//! `cargo xtask vm-test`: the end-to-end tests inside a VM booting a stock
//! Debian kernel, with kernel WireGuard, under qemu (TCG: no usable KVM on
//! these machines).
//!
//! Everything is fetched into `target/vm-cache` once: the kernel package
//! (6.1 from bookworm through apt, 6.12 from bookworm-backports by HTTP, or
//! a `.deb` given by path), busybox-static, and qemu with the libraries
//! this machine lacks (`apt-get download` + `dpkg-deb -x`: installing
//! qemu-system-x86 would replace the machine's newer qemu-utils). Each run
//! builds an initramfs with busybox, the tools the tests drive (ip, nft,
//! tc, ping, wg, nsenter) and their libraries, the kernel modules they
//! need, nexd, nexctl and the test binaries; boots it; streams the serial
//! console; and returns the suite's status, which the guest prints as
//! `NEXD-VM-RESULT: <n>` before powering off.

mod cpio;
mod fetch;
mod image;

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{step, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Kernels: 6.1 (bookworm), 6.12 (bookworm-backports) or a path to a
    /// Debian linux-image .deb. Repeatable; default: 6.1 and 6.12.
    #[arg(long = "kernel", value_name = "6.1|6.12|PATH")]
    pub kernels: Vec<String>,
    /// Minutes one VM run may take before it is killed (and retried once
    /// if it never printed a result).
    #[arg(long, default_value_t = 30)]
    pub timeout_minutes: u64,
}

/// The tests run inside (binary, exact test name): mesh up over kernel
/// WireGuard; exit node enable/disable with the source-address proof and
/// direct mesh traffic; the steering classifier and the leak guard; clean
/// stops throughout.
pub const SUITE: [(&str, &str); 3] = [
    ("mesh", "three_node_mesh"),
    ("exit_node", "exit_node_client_end_to_end"),
    ("gateway", "lan_gateway_split_tunnel_and_kill_switch"),
];

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("fetching packages needs root; run `sudo cargo xtask vm-test`");
    }
    let kernels = if args.kernels.is_empty() {
        vec!["6.1".to_owned(), "6.12".to_owned()]
    } else {
        args.kernels.clone()
    };
    let cache = workspace_root().join("target/vm-cache");
    std::fs::create_dir_all(&cache)?;
    let qemu = fetch::qemu(&cache)?;
    let busybox = fetch::busybox(&cache)?;
    let binaries = image::build_binaries()?;
    let mut failures = Vec::new();
    for k in &kernels {
        let kernel = fetch::kernel(&cache, k)?;
        step(&format!("building the initramfs for {}", kernel.version));
        let initrd = image::initramfs(&cache, &kernel, &busybox, &binaries)?;
        let mut attempt = 0;
        let status = loop {
            attempt += 1;
            step(&format!("booting {} (attempt {attempt})", kernel.version));
            match boot(
                &qemu,
                &kernel.vmlinuz,
                &initrd,
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
        if status == 0 {
            step(&format!("kernel {}: the suite passed", kernel.version));
        } else {
            failures.push(kernel.version.clone());
        }
    }
    if !failures.is_empty() {
        bail!("the suite failed in the VM with: {}", failures.join(", "));
    }
    Ok(())
}

/// What /init prints once the kernel is up and the modules are loaded.
pub const BOOTED: &str = "nexd VM: kernel";

/// Boots and streams the console; `Some(status)` when the guest reported
/// one, `None` when it hung or died first.
fn boot(
    qemu: &fetch::Qemu,
    vmlinuz: &PathBuf,
    initrd: &PathBuf,
    timeout: Duration,
) -> anyhow::Result<Option<i32>> {
    let mut cmd = Command::new(&qemu.binary);
    cmd.args([
        "-M",
        "q35",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
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
    .args([
        "-append",
        "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3",
    ])
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
    let mut booted = false;
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                println!("vm| {line}");
                booted |= line.contains(BOOTED);
                if let Some(r) = line.trim().strip_prefix("NEXD-VM-RESULT: ") {
                    result = r.trim().parse::<i32>().ok();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // A boot that has not reached /init in two minutes has hung (seen
        // about once in 30 boots under TCG; a good boot takes seconds).
        // Once booted, tests may be quiet for minutes: only `timeout` holds.
        let hung = !booted && start.elapsed() > Duration::from_secs(120);
        if start.elapsed() > timeout || hung {
            eprintln!("vm: no progress; killing qemu");
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    Ok(result)
}
