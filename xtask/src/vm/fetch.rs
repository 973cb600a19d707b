//! Fetching (once, into the cache) what the VM tests boot: qemu, busybox,
//! Debian kernels.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::step;

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

/// qemu-system-x86_64: the machine's own if installed, else the packages
/// apt would install, extracted into the cache.
pub fn qemu(cache: &Path) -> anyhow::Result<Qemu> {
    if let Ok(path) = which("qemu-system-x86_64") {
        return Ok(Qemu {
            binary: path,
            library_path: None,
            data_dirs: Vec::new(),
        });
    }
    let root = cache.join("qemu");
    let binary = root.join("usr/bin/qemu-system-x86_64");
    if !binary.exists() {
        step("fetching qemu-system-x86 and the libraries this machine lacks (apt-get download)");
        let sim = run(Command::new("apt-get").args([
            "install",
            "-s",
            "--no-install-recommends",
            "qemu-system-x86",
        ]))?;
        let packages: Vec<String> = sim
            .lines()
            .filter_map(|l| l.strip_prefix("Inst "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        if packages.is_empty() {
            bail!(
                "apt lists nothing to install for qemu-system-x86, yet there is no qemu-system-x86_64"
            );
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

/// busybox, statically linked.
pub fn busybox(cache: &Path) -> anyhow::Result<PathBuf> {
    let root = cache.join("busybox");
    let bin = root.join("bin/busybox");
    if !bin.exists() {
        step("fetching busybox-static");
        let debs = cache.join("debs");
        apt_download(&debs, &["busybox-static".to_owned()])?;
        extract(&[deb_of(&debs, "busybox-static")?], &root)?;
    }
    Ok(bin)
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

/// A Debian kernel: "6.1" (bookworm's current), "6.12" (bookworm-backports'
/// newest), or the path of a linux-image .deb.
pub fn kernel(cache: &Path, spec: &str) -> anyhow::Result<Kernel> {
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    match spec {
        "6.1" => {
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
        "6.12" => {
            let (pkg, file, digest) = backports_kernel(cache, "6.12")?;
            let deb = debs.join(file.rsplit('/').next().unwrap_or("kernel.deb"));
            if !deb.exists() {
                step(&format!("kernel 6.12: downloading {pkg}"));
                download(&format!("{MIRROR}/{file}"), &deb, 900)?;
                check_sha256(&deb, &digest)?;
            }
            unpack_kernel(cache, &deb)
        }
        path => unpack_kernel(cache, Path::new(path)),
    }
}

const MIRROR: &str = "http://deb.debian.org/debian";
const BACKPORTS: &str = "dists/bookworm-backports";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The newest `linux-image-<series>.*-amd64` of bookworm-backports: its
/// package name, pool path and SHA256. The chain is checked as apt would:
/// InRelease's signature by Debian's archive keyring, Packages.xz's digest
/// from InRelease, and (by the caller) the package's digest from
/// Packages.xz. Plain HTTP is fine then.
fn backports_kernel(cache: &Path, series: &str) -> anyhow::Result<(String, String, String)> {
    let dir = cache.join("bookworm-backports");
    std::fs::create_dir_all(&dir)?;
    let release = dir.join("InRelease");
    let index = dir.join("Packages.xz");
    // Refreshed daily: backports replaces its kernels, and the pool drops
    // the old ones.
    let fresh = std::fs::metadata(&index)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|e| e.as_secs() < 86_400));
    if !fresh {
        step("fetching the bookworm-backports package index (signed)");
        download(&format!("{MIRROR}/{BACKPORTS}/InRelease"), &release, 120)?;
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
                    (f.len() == 3 && f[2] == "main/binary-amd64/Packages.xz")
                        .then(|| f[0].to_owned())
                })
            })
            .context("InRelease lists no main/binary-amd64/Packages.xz")?;
        download(
            &format!("{MIRROR}/{BACKPORTS}/main/binary-amd64/Packages.xz"),
            &index,
            120,
        )?;
        check_sha256(&index, &want)?;
    }
    let text = run(Command::new("xz").arg("-dc").arg(&index))?;
    let prefix = format!("linux-image-{series}.");
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
            && p.ends_with("-amd64")
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
    best.with_context(|| format!("no {series} kernel in bookworm-backports"))
}

/// Orders "linux-image-6.12.57+deb12-amd64" by its numeric parts.
fn version_key(p: &str) -> Vec<u64> {
    p.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}
