//! Fetching (once, into the cache) what the VM tests boot: qemu, a Debian
//! userland (busybox and the tools the tests drive, with their libraries),
//! Debian kernels; for amd64 and arm64.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{arch::Arch, progress::step};

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("cannot run {desc}"))?;
    if !out.status.success() {
        bail!(
            "{desc} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `apt-get download` of `packages` into `dir` (skipping ones already there).
fn apt_download(dir: &Path, packages: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let missing: Vec<&String> = packages
        .iter()
        .filter(|p| {
            !std::fs::read_dir(dir)
                .map(|mut d| {
                    d.any(|e| {
                        e.is_ok_and(|e| {
                            e.file_name()
                                .to_string_lossy()
                                .starts_with(&format!("{p}_"))
                        })
                    })
                })
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get")
        .arg("download")
        .args(&missing)
        .current_dir(dir))?;
    Ok(())
}

/// The newest `.deb` of `package` in `dir`.
fn deb_of(dir: &Path, package: &str) -> anyhow::Result<PathBuf> {
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .collect();
    debs.sort();
    debs.pop()
        .with_context(|| format!("no .deb of {package} in {}", dir.display()))
}

/// Unpacks `debs` into `into`, all or nothing: they go to a scratch
/// directory renamed into place at the end, so an interrupted run never
/// leaves a half-unpacked tree that a later run would take as complete.
fn extract(debs: &[PathBuf], into: &Path) -> anyhow::Result<()> {
    let scratch = into.with_extension("partial");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    for deb in debs {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&scratch))?;
    }
    let _ = std::fs::remove_dir_all(into);
    std::fs::rename(&scratch, into)
        .with_context(|| format!("moving {} into place", scratch.display()))
}

/// Downloads `url` to `dest` (through a `.part` file, so a cut download is
/// never taken for a whole one).
fn download(url: &str, dest: &Path, max_seconds: u32) -> anyhow::Result<()> {
    let part = dest.with_extension("part");
    run(Command::new("curl")
        .args([
            "-fsSL",
            "--retry",
            "2",
            "--max-time",
            &max_seconds.to_string(),
            "-o",
        ])
        .arg(&part)
        .arg(url))?;
    std::fs::rename(&part, dest).with_context(|| format!("moving {} into place", part.display()))
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = run(Command::new("sha256sum").arg(path))?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("no digest of {}", path.display()))
}

/// Fails (and removes `path`) unless its SHA256 is `want`.
fn check_sha256(path: &Path, want: &str) -> anyhow::Result<()> {
    let got = sha256(path)?;
    if !got.eq_ignore_ascii_case(want) {
        let _ = std::fs::remove_file(path);
        bail!(
            "{}: SHA256 {got}, expected {want}; removed it",
            path.display()
        );
    }
    Ok(())
}

/// How to run qemu.
pub struct Qemu {
    pub binary: PathBuf,
    pub library_path: Option<String>,
    pub data_dirs: Vec<PathBuf>,
}

/// qemu-system for `arch`: the machine's own if installed, else the
/// packages apt would install, extracted into the cache (installing them
/// would replace the machine's newer qemu-utils).
pub fn qemu(cache: &Path, arch: Arch) -> anyhow::Result<Qemu> {
    let (package, name, dir) = match arch {
        Arch::Amd64 => ("qemu-system-x86", "qemu-system-x86_64", "qemu"),
        Arch::Arm64 => ("qemu-system-arm", "qemu-system-aarch64", "qemu-arm"),
    };
    if let Ok(path) = which(name) {
        return Ok(Qemu {
            binary: path,
            library_path: None,
            data_dirs: Vec::new(),
        });
    }
    let root = cache.join(dir);
    let binary = root.join("usr/bin").join(name);
    if !binary.exists() {
        step(&format!(
            "fetching {package} and the libraries this machine lacks (apt-get download)"
        ));
        let sim = run(Command::new("apt-get").args([
            "install",
            "-s",
            "--no-install-recommends",
            package,
        ]))?;
        let packages: Vec<String> = sim
            .lines()
            .filter_map(|l| l.strip_prefix("Inst "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        if packages.is_empty() {
            bail!("apt lists nothing to install for {package}, yet there is no {name}");
        }
        let debs = cache.join("debs");
        apt_download(&debs, &packages)?;
        let files = packages
            .iter()
            .map(|p| deb_of(&debs, p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        extract(&files, &root)?;
    }
    let lib = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"]
        .iter()
        .map(|d| root.join(d).display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    Ok(Qemu {
        binary,
        library_path: Some(lib),
        data_dirs: vec![root.join("usr/share/qemu"), root.join("usr/share/seabios")],
    })
}

fn which(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} not on PATH"))
}

/// Debian packages unpacked into a tree for `arch` by mmdebstrap's
/// `extract` variant: apt resolves the dependencies and checks the
/// archive's signatures, nothing is configured or run, so a foreign
/// architecture needs no emulation. Cached until `packages` change.
pub fn debian_tree(
    cache: &Path,
    name: &str,
    arch: Arch,
    packages: &[&str],
) -> anyhow::Result<PathBuf> {
    let root = cache.join(format!("{name}-{arch}"));
    let stamp = root.join(".nexd-packages");
    let want = packages.join(",");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(root);
    }
    step(&format!(
        "unpacking Debian packages for {arch} into {} (mmdebstrap)",
        root.display()
    ));
    let scratch = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&scratch);
    mmdebstrap(
        &[
            &format!("--architectures={}", arch.debian()),
            "--variant=extract",
            &format!("--include={want}"),
        ],
        &scratch,
    )?;
    std::fs::write(scratch.join(".nexd-packages"), &want)?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&scratch, &root)
        .with_context(|| format!("moving {} into place", scratch.display()))?;
    Ok(root)
}

/// Runs mmdebstrap (bookworm, from Debian's mirror) into `target` with
/// `args`, in a private mount namespace: whatever it mounts into the tree
/// while it works never shows on the host, even if it dies.
pub fn mmdebstrap(args: &[&str], target: &Path) -> anyhow::Result<()> {
    let status = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "mmdebstrap",
            "--mode=root",
            "--quiet",
        ])
        .args(args)
        .arg("bookworm")
        .arg(target)
        .arg(MIRROR)
        .status()
        .context("cannot run mmdebstrap (`cargo xtask setup` installs it)")?;
    if !status.success() {
        bail!("mmdebstrap into {} failed ({status})", target.display());
    }
    Ok(())
}

/// An unpacked kernel package.
pub struct Kernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

fn unpack_kernel(cache: &Path, deb: &Path) -> anyhow::Result<Kernel> {
    let name = deb
        .file_stem()
        .context("kernel package name")?
        .to_string_lossy()
        .into_owned();
    let root = cache.join("kernels").join(&name);
    if !root.join("boot").exists() {
        extract(&[deb.to_owned()], &root)?;
    }
    let vmlinuz = std::fs::read_dir(root.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;
    let version = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_owned()
        })
        .unwrap_or_default();
    let modules = root.join("lib/modules").join(&version);
    if !modules.exists() {
        bail!("{} has no modules for {version}", deb.display());
    }
    Ok(Kernel {
        version,
        vmlinuz,
        modules,
    })
}

/// A Debian kernel for `arch`: "6.1" (bookworm's), "6.12" (bookworm-backports'
/// newest), or the path of a linux-image .deb.
pub fn kernel(cache: &Path, spec: &str, arch: Arch) -> anyhow::Result<Kernel> {
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    match (spec, arch) {
        // This machine's apt (with bookworm-security) knows amd64 kernels.
        ("6.1", Arch::Amd64) => {
            let deps = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
            let pkg = deps
                .lines()
                .find_map(|l| l.trim().strip_prefix("Depends: "))
                .filter(|p| p.starts_with("linux-image-6.1"))
                .context("bookworm's linux-image-amd64 does not depend on a 6.1 kernel")?
                .to_owned();
            step(&format!("kernel 6.1: {pkg}"));
            apt_download(&debs, std::slice::from_ref(&pkg))?;
            unpack_kernel(cache, &deb_of(&debs, &pkg)?)
        }
        ("6.1" | "6.12", _) => {
            let suite = if spec == "6.1" {
                "bookworm"
            } else {
                "bookworm-backports"
            };
            let (pkg, file, digest) = index_kernel(cache, suite, arch, spec)?;
            let deb = debs.join(file.rsplit('/').next().unwrap_or("kernel.deb"));
            if !deb.exists() {
                step(&format!("kernel {spec} for {arch}: downloading {pkg}"));
                download(&format!("{MIRROR}/{file}"), &deb, 900)?;
                check_sha256(&deb, &digest)?;
            }
            unpack_kernel(cache, &deb)
        }
        (path, _) => unpack_kernel(cache, Path::new(path)),
    }
}

const MIRROR: &str = "http://deb.debian.org/debian";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The newest `linux-image-<series>.*-<arch>` of `suite`: its package name,
/// pool path and SHA256. The chain is checked as apt would: InRelease's
/// signature by Debian's archive keyring, Packages.xz's digest from
/// InRelease, and (by the caller) the package's digest from Packages.xz.
/// Plain HTTP is fine then.
fn index_kernel(
    cache: &Path,
    suite: &str,
    arch: Arch,
    series: &str,
) -> anyhow::Result<(String, String, String)> {
    let dir = cache.join("index").join(format!("{suite}-{arch}"));
    std::fs::create_dir_all(&dir)?;
    let release = dir.join("InRelease");
    let index = dir.join("Packages.xz");
    let component = format!("main/binary-{}/Packages.xz", arch.debian());
    // Refreshed daily: the archive replaces its kernels, and the pool drops
    // the old ones.
    let fresh = std::fs::metadata(&index)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|e| e.as_secs() < 86_400));
    if !fresh {
        step(&format!(
            "fetching the {suite} package index for {arch} (signed)"
        ));
        download(&format!("{MIRROR}/dists/{suite}/InRelease"), &release, 120)?;
        run(Command::new("gpgv")
            .args(["--keyring", KEYRING])
            .arg(&release))
        .context("InRelease is not signed by a Debian archive key")?;
        let text = std::fs::read_to_string(&release)?;
        let want = text
            .split("SHA256:")
            .nth(1)
            .and_then(|sums| {
                sums.lines().find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() == 3 && f[2] == component).then(|| f[0].to_owned())
                })
            })
            .with_context(|| format!("InRelease lists no {component}"))?;
        download(&format!("{MIRROR}/dists/{suite}/{component}"), &index, 300)?;
        check_sha256(&index, &want)?;
    }
    let text = run(Command::new("xz").arg("-dc").arg(&index))?;
    let prefix = format!("linux-image-{series}.");
    let suffix = format!("-{}", arch.debian());
    let mut best: Option<(String, String, String)> = None;
    for stanza in text.split("\n\n") {
        let field = |k: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}: ")))
                .map(str::to_owned)
        };
        if let (Some(p), Some(f), Some(d)) = (field("Package"), field("Filename"), field("SHA256"))
            && p.starts_with(&prefix)
            && p.ends_with(&suffix)
            && !p.contains("cloud")
            && !p.contains("-rt-")
            && !p.contains("dbg")
            && !p.contains("unsigned")
            && best
                .as_ref()
                .is_none_or(|(bp, _, _)| version_key(&p) > version_key(bp))
        {
            best = Some((p, f, d));
        }
    }
    best.with_context(|| format!("no {series} kernel for {arch} in {suite}"))
}

/// Orders "linux-image-6.12.57+deb12-amd64" by its numeric parts.
fn version_key(p: &str) -> Vec<u64> {
    p.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}
