//! `cargo xtask package`: the Debian package of nexd (`nexd_<version>_<arch>.deb`)
//! for amd64 and arm64, made by cargo-deb from `[package.metadata.deb]` in
//! nexd-agent/Cargo.toml (a maintained tool: control file, conffiles,
//! md5sums, stripping, man page compression, shared-library dependencies
//! and the systemd maintainer-script snippets are its job, not ours).
//!
//! This task builds what cargo-deb packages: the release binaries (cross
//! for arm64), the man pages (`cargo xtask man`) and the shell completions
//! (from the host's nexctl, identical for every architecture); then runs
//! `cargo deb --no-build` and checks the result's control fields and file
//! list.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    arch::Arch,
    progress::step,
    setup::{self, Need},
    workspace,
};

#[derive(clap::Args)]
pub struct Args {
    /// Architectures to package (repeatable); default: amd64.
    #[arg(long = "arch", value_enum)]
    pub arches: Vec<Arch>,
}

/// Where the generated assets go (named in nexd-agent/Cargo.toml).
const ASSETS: &str = "target/package-assets";
/// Where the packages go.
pub const OUT: &str = "target/debian";

/// Files every package must hold (the check after cargo-deb).
const EXPECTED: &[&str] = &[
    "usr/bin/nexd",
    "usr/bin/nexctl",
    "usr/lib/systemd/system/nexd.service",
    "etc/default/nexd",
    "etc/nexd/nexd.toml",
    "etc/nexd/mesh.toml",
    "usr/share/man/man8/nexd.8.gz",
    "usr/share/man/man8/nexctl.8.gz",
    "usr/share/bash-completion/completions/nexctl",
    "usr/share/zsh/vendor-completions/_nexctl",
    "usr/share/fish/vendor_completions.d/nexctl.fish",
    "usr/share/doc/nexd/copyright",
    "usr/share/doc/nexd/README.md",
];

/// The conffiles every package must declare.
const CONFFILES: &[&str] = &[
    "/etc/default/nexd",
    "/etc/nexd/nexd.toml",
    "/etc/nexd/mesh.toml",
];

pub fn run(args: &Args) -> anyhow::Result<()> {
    let arches = if args.arches.is_empty() {
        vec![Arch::Amd64]
    } else {
        args.arches.clone()
    };
    for deb in build(&arches)? {
        let size = std::fs::metadata(&deb).map(|m| m.len()).unwrap_or(0);
        println!("  {} ({} KiB)", deb.display(), size / 1024);
    }
    Ok(())
}

/// Builds and checks the packages of `arches`; returns their paths.
pub fn build(arches: &[Arch]) -> anyhow::Result<Vec<PathBuf>> {
    let mut needs = vec![Need::Build, Need::Package];
    if arches.iter().any(|a| !a.is_host()) {
        needs.push(Need::Arm64);
    }
    setup::ensure("the packages", &needs)?;
    // The host's binaries first: the completions come from its nexctl.
    let host = arches
        .iter()
        .copied()
        .find(|a| a.is_host())
        .unwrap_or(Arch::Amd64);
    let host_bins = if arches.contains(&host) {
        crate::arch::build_release(host)?
    } else {
        crate::workspace::build_agent(false)?;
        workspace::root().join("target/debug")
    };
    generate_assets(&host_bins.join("nexctl"))?;
    let mut debs = Vec::new();
    for &arch in arches {
        if arch != host {
            crate::arch::build_release(arch)?;
        }
        debs.push(cargo_deb(arch)?);
    }
    Ok(debs)
}

/// Man pages and completions into target/package-assets.
fn generate_assets(nexctl: &Path) -> anyhow::Result<()> {
    let root = workspace::root().join(ASSETS);
    let man = root.join("man");
    // Stale pages of a removed subcommand must not be packaged.
    let _ = std::fs::remove_dir_all(&man);
    crate::man::run(&crate::man::Args { out: man })?;
    let completions = root.join("completions");
    std::fs::create_dir_all(&completions)?;
    step("writing shell completions (nexctl completion bash|zsh|fish)");
    for (shell, file) in [
        ("bash", "nexctl.bash"),
        ("zsh", "_nexctl"),
        ("fish", "nexctl.fish"),
    ] {
        let out = Command::new(nexctl)
            .args(["completion", shell])
            .output()
            .with_context(|| format!("running {}", nexctl.display()))?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!(
                "nexctl completion {shell} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::write(completions.join(file), &out.stdout)?;
    }
    Ok(())
}

/// `cargo deb --no-build` for `arch`, then the checks; returns the .deb.
fn cargo_deb(arch: Arch) -> anyhow::Result<PathBuf> {
    step(&format!("cargo deb for {arch}"));
    let out_dir = workspace::root().join(OUT);
    std::fs::create_dir_all(&out_dir)?;
    let mut c = crate::workspace::cargo_command();
    c.args(["deb", "--package", "nexd-agent", "--no-build", "--output"])
        .arg(&out_dir)
        .args(arch.cargo_target_args());
    let out = c.output().context("cannot run cargo deb")?;
    if !out.status.success() {
        bail!(
            "cargo deb for {arch} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // cargo-deb prints the package's path as its last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb printed no package path: {stdout}"))?;
    check(&deb, arch)?;
    Ok(deb)
}

/// Unpacks `deb` (files and DEBIAN/) into a scratch directory and checks
/// that it is what we mean to ship: its control fields, conffiles, files,
/// and binaries for the right machine.
fn check(deb: &Path, arch: Arch) -> anyhow::Result<()> {
    let dir = workspace::root().join(ASSETS).join(format!("check-{arch}"));
    let _ = std::fs::remove_dir_all(&dir);
    let status = Command::new("dpkg-deb")
        .arg("--raw-extract")
        .arg(deb)
        .arg(&dir)
        .status()
        .context("cannot run dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb --raw-extract {} failed", deb.display());
    }
    let control = std::fs::read_to_string(dir.join("DEBIAN/control"))?;
    let conffiles = std::fs::read_to_string(dir.join("DEBIAN/conffiles")).unwrap_or_default();
    let mut problems = check_control(&control, &conffiles, arch);
    for want in EXPECTED {
        if !dir.join(want).exists() {
            problems.push(format!("/{want} is missing"));
        }
    }
    for bin in ["usr/bin/nexd", "usr/bin/nexctl"] {
        let data = std::fs::read(dir.join(bin)).unwrap_or_default();
        if elf_machine(&data) != Some(arch.elf_machine()) {
            problems.push(format!("/{bin} is not an {arch} executable"));
        }
        let out = Command::new("readelf")
            .args(["--wide", "--dynamic", "--version-info"])
            .arg(dir.join(bin))
            .output()
            .context("cannot run readelf")?;
        problems.extend(check_linkage(bin, &String::from_utf8_lossy(&out.stdout)));
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !problems.is_empty() {
        bail!(
            "{} is not right:\n  {}",
            deb.display(),
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// The value of `name` in a control file (single-line fields only).
fn field<'a>(control: &'a str, name: &str) -> Option<&'a str> {
    control.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// What is wrong with the control fields and conffiles, if anything.
fn check_control(control: &str, conffiles: &str, arch: Arch) -> Vec<String> {
    let mut problems = Vec::new();
    if field(control, "Package") != Some("nexd") {
        problems.push(format!(
            "Package is {:?}, not nexd",
            field(control, "Package")
        ));
    }
    if field(control, "Architecture") != Some(arch.debian()) {
        problems.push(format!(
            "Architecture is {:?}, not {arch}",
            field(control, "Architecture")
        ));
    }
    let names = |f: &str| -> Vec<String> {
        field(control, f)
            .unwrap_or("")
            .split([',', '|'])
            .filter_map(|d| d.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    };
    let depends = names("Depends");
    for want in ["libc6", "nftables", "iproute2", "procps"] {
        if !depends.iter().any(|d| d == want) {
            problems.push(format!("Depends lacks {want}: {depends:?}"));
        }
    }
    // A dependency on a cross-toolchain package would make it uninstallable.
    for d in &depends {
        if d.contains("-cross") {
            problems.push(format!("Depends names a cross-toolchain package: {d}"));
        }
    }
    if !names("Recommends").iter().any(|d| d == "wireguard-tools") {
        problems.push("Recommends lacks wireguard-tools".into());
    }
    for want in CONFFILES {
        if !conffiles.lines().any(|c| c.trim() == *want) {
            problems.push(format!("{want} is not a conffile"));
        }
    }
    problems
}

/// The newest glibc symbol version the Depends line allows
/// (`libc6 (>= 2.34)` in nexd-agent/Cargo.toml).
const GLIBC: (u32, u32) = (2, 34);

/// Libraries the declared dependencies provide (libc6, libgcc-s1).
const PROVIDED: &[&str] = &["libc.so.6", "libm.so.6", "libgcc_s.so.1", "ld-linux"];

/// What in `readelf --dynamic --version-info` of `bin` the declared
/// dependencies do not cover: another library, or a newer glibc.
fn check_linkage(bin: &str, readelf: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for line in readelf.lines().filter(|l| l.contains("(NEEDED)")) {
        let lib = line
            .split('[')
            .nth(1)
            .and_then(|r| r.split(']').next())
            .unwrap_or(line);
        if !PROVIDED.iter().any(|p| lib.starts_with(p)) {
            problems.push(format!(
                "/{bin} needs {lib}, which no declared dependency provides"
            ));
        }
    }
    let newest = readelf
        .split("GLIBC_")
        .skip(1)
        .filter_map(|v| {
            let v: String = v
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max();
    match newest {
        Some(v) if v > GLIBC => problems.push(format!(
            "/{bin} needs GLIBC_{}.{}; Depends says libc6 (>= {}.{})",
            v.0, v.1, GLIBC.0, GLIBC.1
        )),
        Some(_) => {}
        None => problems.push(format!("/{bin}: no glibc symbol versions found")),
    }
    problems
}

/// e_machine of an ELF file.
fn elf_machine(data: &[u8]) -> Option<u16> {
    if data.len() < 20 || &data[..4] != b"\x7fELF" {
        return None;
    }
    Some(u16::from_le_bytes([data[18], data[19]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTROL: &str = "Package: nexd\nVersion: 0.1.0-1\nArchitecture: arm64\n\
        Depends: libc6 (>= 2.34), libgcc-s1 (>= 4.2), nftables, iproute2, procps\n\
        Recommends: wireguard-tools\nDescription: x\n";
    const CONFFILES_OK: &str = "/etc/default/nexd\n/etc/nexd/mesh.toml\n/etc/nexd/nexd.toml\n";

    #[test]
    fn a_right_control_file_passes() {
        assert_eq!(
            check_control(CONTROL, CONFFILES_OK, Arch::Arm64),
            Vec::<String>::new()
        );
    }

    #[test]
    fn wrong_fields_are_each_named() {
        let p = check_control(CONTROL, CONFFILES_OK, Arch::Amd64);
        assert!(p.iter().any(|p| p.contains("Architecture")), "{p:?}");
        let cross = CONTROL.replace("libc6 (>= 2.34)", "libc6-arm64-cross");
        let p = check_control(&cross, "/etc/default/nexd\n", Arch::Arm64);
        assert!(p.iter().any(|p| p.contains("lacks libc6")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("cross-toolchain")), "{p:?}");
        assert!(
            p.iter().any(|p| p.contains("mesh.toml is not a conffile")),
            "{p:?}"
        );
    }

    #[test]
    fn linkage_beyond_the_dependencies_is_caught() {
        let ok = " 0x1 (NEEDED) Shared library: [libgcc_s.so.1]\n 0x1 (NEEDED) Shared library: [libc.so.6]\n\
            0x0010: Name: GLIBC_2.34  Flags: none\n 0x0020: Name: GLIBC_2.17 Flags: none\n";
        assert_eq!(check_linkage("usr/bin/nexd", ok), Vec::<String>::new());
        let bad =
            format!("{ok} 0x1 (NEEDED) Shared library: [libssl.so.3]\n 0x30: Name: GLIBC_2.38\n");
        let p = check_linkage("usr/bin/nexd", &bad);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].contains("libssl.so.3") && p[1].contains("GLIBC_2.38"),
            "{p:?}"
        );
    }

    #[test]
    fn elf_machines() {
        let mut h = vec![0x7f, b'E', b'L', b'F'];
        h.resize(20, 0);
        h[18] = 0xb7;
        assert_eq!(elf_machine(&h), Some(Arch::Arm64.elf_machine()));
        assert_eq!(elf_machine(b"#!/bin/sh\n"), None);
    }
}
