//! `cargo xtask setup`: installs what building and testing nexd needs on a
//! fresh Debian machine, and does nothing (quickly) when all is there.
//!
//! What is installed comes in parts ([`Need`]), each with the reason it is
//! there: every task asks for the parts it uses when it starts
//! ([`ensure`]), so `cargo xtask lab` on a bare machine installs what the
//! lab needs and not the arm64 cross compiler, and a later `cargo xtask
//! package --arch arm64` adds that, saying so. `cargo xtask setup`
//! installs every part.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::progress::step;

mod no_start;
pub use no_start::install_without_starting;

#[derive(clap::Args)]
pub struct Args {
    /// Only report what is missing; install nothing.
    #[arg(long)]
    pub check: bool,
    /// Only these parts (repeatable); default: all of them.
    #[arg(long = "for", value_enum, value_name = "PART")]
    pub parts: Vec<Need>,
}

/// A part of the setup: what one kind of work needs installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Need {
    /// Building nexd: the pinned nightly with rust-src and bpf-linker (the
    /// eBPF programs), protoc (etcd-client's gRPC code).
    Build,
    /// rustfmt and clippy (stable), clippy on the nightly (the eBPF crate).
    Lint,
    /// nexd in network namespaces (the lab, the tests, the benchmarks).
    Namespaces,
    /// The host test suite's tools: WireGuard's, etcd, openssl, iperf3.
    Tests,
    /// The exit group tests' daemons: keepalived (VRRP), conntrackd and
    /// conntrack (state sync), installed without starting their services.
    ExitGroups,
    /// The benchmarks' baseline: wireguard-go.
    Bench,
    /// cargo-fuzz.
    Fuzz,
    /// cargo-deb, which makes the packages.
    Package,
    /// Cross-building for arm64: Debian's cross toolchain, the Rust target.
    Arm64,
    /// Running arm64 binaries here: qemu-user.
    QemuUser,
    /// The VM tests' images: mmdebstrap.
    Vm,
    /// Looking at packets by hand in a kept lab: tcpdump, netsniff-ng
    /// (no task runs them).
    Explore,
}

impl Need {
    /// Every part, as `cargo xtask setup` installs them.
    pub const ALL: [Need; 12] = [
        Need::Build,
        Need::Lint,
        Need::Namespaces,
        Need::Tests,
        Need::ExitGroups,
        Need::Bench,
        Need::Fuzz,
        Need::Package,
        Need::Arm64,
        Need::QemuUser,
        Need::Vm,
        Need::Explore,
    ];

    /// Its name on the command line (`--for`).
    fn name(self) -> String {
        use clap::ValueEnum as _;
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    /// Its Debian packages, installed with --no-install-recommends.
    fn debs(self) -> &'static [&'static str] {
        match self {
            // llvm-22-dev and the libraries llvm-sys links build bpf-linker;
            // protoc and its well-known .proto files build etcd-client.
            Need::Build => &[
                "llvm-22-dev",
                "libpolly-22-dev",
                "zlib1g-dev",
                "libzstd-dev",
                "protobuf-compiler",
                "libprotobuf-dev",
            ],
            Need::Namespaces => &[
                "iproute2",
                "nftables",
                "iputils-ping",
                "procps",
                "util-linux",
            ],
            // etcd-server and etcd-client: the registry tests' etcd and
            // etcdctl; openssl: their TLS certificates; prometheus (with
            // promtool): the shipped alerting rules checked and fired.
            Need::Tests => &[
                "wireguard-tools",
                "iperf3",
                "etcd-server",
                "etcd-client",
                "openssl",
                "prometheus",
            ],
            // The independent userspace WireGuard the throughput benchmark
            // compares with.
            Need::Bench => &["wireguard-go"],
            Need::ExitGroups => &["keepalived", "conntrackd", "conntrack"],
            // The cross linker and libc (.cargo/config.toml names the linker).
            Need::Arm64 => &["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"],
            // No binfmt registration: cargo's runner calls it.
            Need::QemuUser => &["qemu-user"],
            Need::Vm => &["mmdebstrap"],
            Need::Explore => &["tcpdump", "netsniff-ng"],
            Need::Lint | Need::Fuzz | Need::Package => &[],
        }
    }

    /// Why, for the line that says what is installed.
    fn why(self) -> &'static str {
        match self {
            Need::Build => "to build nexd: bpf-linker against LLVM 22, protoc",
            Need::Lint => "to lint",
            Need::Namespaces => "to run nexd in network namespaces",
            Need::Tests => "for the tests: WireGuard's tools, etcd, openssl, iperf3, prometheus",
            Need::Bench => "for the benchmarks' userspace WireGuard baseline",
            Need::ExitGroups => "for the exit group tests: keepalived, conntrackd, conntrack",
            Need::Fuzz => "to fuzz",
            Need::Package => "to make the Debian packages",
            Need::Arm64 => "to cross-build for arm64",
            Need::QemuUser => "to run arm64 binaries under qemu-user",
            Need::Vm => "to build the VM tests' images",
            Need::Explore => "to look at packets by hand",
        }
    }

    /// The daemons its packages bring as services, which the tests start
    /// in their own namespaces and which must never run on the machine
    /// itself: checked for after [`install_without_starting`].
    fn daemons(self) -> &'static [&'static str] {
        match self {
            Need::Tests => &["prometheus"],
            Need::ExitGroups => &["keepalived", "conntrackd"],
            _ => &[],
        }
    }

    /// The pinned nightly's components it needs: rust-src for `-Z
    /// build-std=core`, clippy for linting the eBPF crate.
    fn nightly_components(self) -> &'static [&'static str] {
        match self {
            Need::Build => &["rust-src"],
            Need::Lint => &["clippy"],
            _ => &[],
        }
    }
}

/// The cross target for arm64 (`rustup target add`).
const ARM64_TARGET: &str = "aarch64-unknown-linux-gnu";

/// cargo-deb, pinned like bpf-linker: the packages are made by this one.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// The bpf-linker release known to work with aya-ebpf 0.2 and LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Whether `program args` runs and succeeds.
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether cargo-deb (any version) is installed.
fn cargo_deb_installed() -> bool {
    runs("cargo-deb", &["--version"])
}

/// Whether cargo-fuzz is installed.
fn cargo_fuzz_installed() -> bool {
    runs("cargo", &["fuzz", "--version"])
}

fn bpf_linker_ready() -> bool {
    runs("bpf-linker", &["--version"])
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

/// Which of `packages` dpkg does not have installed (one dpkg-query).
fn missing_debs<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    if packages.is_empty() {
        return Vec::new();
    }
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(packages)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    packages
        .iter()
        .copied()
        .filter(|p| {
            !out.lines().any(|l| {
                l.split_once(' ')
                    .is_some_and(|(name, status)| name == *p && status == "install ok installed")
            })
        })
        .collect()
}

/// The components of `toolchain` that are installed; `None` when the
/// toolchain is not.
fn toolchain_components(toolchain: Option<&str>) -> Option<Vec<String>> {
    let mut c = Command::new("rustup");
    c.args(["component", "list", "--installed"]);
    if let Some(t) = toolchain {
        c.args(["--toolchain", t]);
    }
    let out = c.output().ok().filter(|o| o.status.success())?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
    )
}

fn has_component(installed: &[String], component: &str) -> bool {
    installed.iter().any(|l| l.starts_with(component))
}

fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot run {desc}"))?;
    if !status.success() {
        bail!("{desc} failed ({status})");
    }
    Ok(())
}

/// What of `needs` is missing, each item with the part it is for.
#[derive(Default)]
struct Missing {
    debs: Vec<(Need, Vec<&'static str>)>,
    stable: Vec<&'static str>,
    /// The nightly itself (true) or only components of it.
    nightly: bool,
    nightly_components: Vec<&'static str>,
    bpf_linker: bool,
    cargo_fuzz: bool,
    arm64_target: bool,
    cargo_deb: bool,
}

impl Missing {
    fn of(needs: &[Need], toolchain: &str) -> Missing {
        let has = |n: Need| needs.contains(&n);
        let all_debs: Vec<&str> = needs.iter().flat_map(|n| n.debs()).copied().collect();
        let missing = missing_debs(&all_debs);
        let debs = needs
            .iter()
            .map(|&n| {
                let m: Vec<&str> = n
                    .debs()
                    .iter()
                    .copied()
                    .filter(|d| missing.contains(d))
                    .collect();
                (n, m)
            })
            .filter(|(_, m)| !m.is_empty())
            .collect();
        let stable = if has(Need::Lint) {
            let installed = toolchain_components(None).unwrap_or_default();
            ["rustfmt", "clippy"]
                .into_iter()
                .filter(|c| !has_component(&installed, c))
                .collect()
        } else {
            Vec::new()
        };
        let wanted: Vec<&str> = needs
            .iter()
            .flat_map(|n| n.nightly_components())
            .copied()
            .collect();
        let (nightly, nightly_components) = if wanted.is_empty() {
            (false, Vec::new())
        } else {
            match toolchain_components(Some(toolchain)) {
                None => (true, wanted),
                Some(installed) => (
                    false,
                    wanted
                        .into_iter()
                        .filter(|c| !has_component(&installed, c))
                        .collect(),
                ),
            }
        };
        Missing {
            debs,
            stable,
            nightly,
            nightly_components,
            bpf_linker: has(Need::Build) && !bpf_linker_ready(),
            cargo_fuzz: has(Need::Fuzz) && !cargo_fuzz_installed(),
            arm64_target: has(Need::Arm64) && !arm64_target_installed(),
            cargo_deb: has(Need::Package) && !cargo_deb_installed(),
        }
    }

    fn is_empty(&self) -> bool {
        self.debs.is_empty()
            && self.stable.is_empty()
            && !self.nightly
            && self.nightly_components.is_empty()
            && !self.bpf_linker
            && !self.cargo_fuzz
            && !self.arm64_target
            && !self.cargo_deb
    }

    /// One line per missing item, for `--check`.
    fn report(&self, toolchain: &str) -> Vec<String> {
        let mut lines: Vec<String> = self
            .debs
            .iter()
            .map(|(n, d)| format!("Debian packages {}: {}", n.why(), d.join(" ")))
            .collect();
        if !self.stable.is_empty() {
            lines.push(format!("stable toolchain: {}", self.stable.join(" ")));
        }
        if self.nightly {
            lines.push(format!("{toolchain} (the eBPF toolchain)"));
        }
        if !self.nightly_components.is_empty() {
            lines.push(format!(
                "{toolchain} components: {}",
                self.nightly_components.join(" ")
            ));
        }
        for (missing, what) in [
            (self.bpf_linker, "bpf-linker".to_owned()),
            (self.cargo_fuzz, "cargo-fuzz".to_owned()),
            (self.arm64_target, format!("Rust target {ARM64_TARGET}")),
            (self.cargo_deb, "cargo-deb".to_owned()),
        ] {
            if missing {
                lines.push(what);
            }
        }
        lines
    }
}

/// `cargo xtask setup`: every part (or those of `--for`).
pub fn run(args: &Args) -> anyhow::Result<()> {
    let parts = if args.parts.is_empty() {
        Need::ALL.to_vec()
    } else {
        args.parts.clone()
    };
    if args.check {
        let toolchain = crate::workspace::nightly()?;
        let missing = Missing::of(&parts, &toolchain);
        if missing.is_empty() {
            println!("nothing is missing");
            return Ok(());
        }
        for line in missing.report(&toolchain) {
            println!("missing: {line}");
        }
        bail!("setup is incomplete; run `cargo xtask setup`");
    }
    if !ensure("the whole setup", &parts)? {
        step("setup: everything is installed");
    }
    Ok(())
}

/// Installs what of `needs` is missing, with a line saying what and why,
/// for `task` (as in "for the lab"); returns whether it installed
/// anything. Quick when nothing is missing, so each task calls it.
pub fn ensure(task: &str, needs: &[Need]) -> anyhow::Result<bool> {
    let toolchain = crate::workspace::nightly()?;
    let m = Missing::of(needs, &toolchain);
    if m.is_empty() {
        return Ok(false);
    }
    if !m.debs.is_empty() {
        let all: Vec<&str> = m.debs.iter().flat_map(|(_, d)| d).copied().collect();
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "{task} needs {}, and installing them needs root; run `sudo cargo xtask setup`",
                all.join(" ")
            );
        }
        let what: Vec<String> = m
            .debs
            .iter()
            .map(|(n, d)| format!("{} ({})", d.join(" "), n.why()))
            .collect();
        step(&format!(
            "setup for {task}: installing Debian packages {}",
            what.join("; ")
        ));
        exec(Command::new("apt-get").args(["update", "-q"]))?;
        // Every package goes in without starting a service (etcd,
        // prometheus, keepalived...): the tests start their own inside
        // namespaces, and a machine must not gain daemons from a setup.
        let daemons: Vec<&str> = m
            .debs
            .iter()
            .flat_map(|(n, _)| n.daemons())
            .copied()
            .collect();
        install_without_starting(&all, &daemons)?;
    }
    if !m.stable.is_empty() {
        step(&format!(
            "setup for {task}: adding {} to the stable toolchain ({})",
            m.stable.join(" and "),
            Need::Lint.why()
        ));
        exec(
            Command::new("rustup")
                .args(["component", "add"])
                .args(&m.stable),
        )?;
    }
    if m.nightly {
        step(&format!(
            "setup for {task}: installing {toolchain} with {} (the eBPF build's toolchain, pinned in nexd-ebpf/rust-toolchain.toml)",
            m.nightly_components.join(" and ")
        ));
        let mut c = Command::new("rustup");
        c.args(["toolchain", "install", &toolchain, "--profile", "minimal"]);
        for comp in &m.nightly_components {
            c.args(["--component", comp]);
        }
        exec(&mut c)?;
    } else if !m.nightly_components.is_empty() {
        step(&format!(
            "setup for {task}: adding {} to {toolchain} (rust-src to build the eBPF programs, clippy to lint them)",
            m.nightly_components.join(" and ")
        ));
        exec(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", &toolchain])
                .args(&m.nightly_components),
        )?;
    }
    if m.bpf_linker {
        step(&format!(
            "setup for {task}: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22, to link the eBPF programs (about 1 to 4 minutes on 2 cores)"
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
    if m.cargo_fuzz {
        step(&format!(
            "setup for {task}: installing cargo-fuzz, to fuzz (about 2 minutes)"
        ));
        exec(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    if m.arm64_target {
        step(&format!(
            "setup for {task}: adding the Rust target {ARM64_TARGET}, to cross-build for arm64"
        ));
        exec(Command::new("rustup").args(["target", "add", ARM64_TARGET]))?;
    }
    if m.cargo_deb {
        step(&format!(
            "setup for {task}: installing cargo-deb {CARGO_DEB_VERSION}, to make the Debian packages (about 5 minutes on 2 cores)"
        ));
        exec(Command::new("cargo").args([
            "install",
            "--locked",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
        ]))?;
    }
    step(&format!(
        "setup for {task} complete ({})",
        needs
            .iter()
            .map(|n| n.name())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_debian_package_is_in_one_part_only() {
        let mut all: Vec<&str> = Need::ALL.iter().flat_map(|n| n.debs()).copied().collect();
        let count = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), count, "a package listed in two parts");
    }

    #[test]
    fn the_daemons_checked_for_come_with_their_parts_packages() {
        // keepalived and conntrackd would act on the machine's own network.
        assert_eq!(Need::ExitGroups.daemons(), ["keepalived", "conntrackd"]);
        assert_eq!(Need::Tests.daemons(), ["prometheus"]);
        for n in Need::ALL {
            for d in n.daemons() {
                assert!(
                    n.debs().iter().any(|p| p.starts_with(d)),
                    "{n:?}: {d} is no package of it"
                );
            }
        }
    }

    #[test]
    fn missing_packages_are_found_with_one_query() {
        // dpkg knows util-linux on every Debian machine, and no package
        // by this name.
        assert_eq!(
            missing_debs(&["util-linux", "nexd-no-such-package"]),
            ["nexd-no-such-package"]
        );
        assert!(missing_debs(&[]).is_empty());
    }

    #[test]
    fn the_lab_needs_no_cross_compiler_nor_etcd() {
        let lab: Vec<&str> = crate::lab::NEEDS
            .iter()
            .flat_map(|n| n.debs())
            .copied()
            .collect();
        for absent in [
            "gcc-aarch64-linux-gnu",
            "qemu-user",
            "mmdebstrap",
            "etcd-server",
        ] {
            assert!(!lab.contains(&absent), "{absent} in {lab:?}");
        }
        assert!(lab.contains(&"nftables") && lab.contains(&"llvm-22-dev"));
    }
}
