//! `cargo xtask vm-test --systemd`: the amd64 package installed with dpkg
//! in a minimal Debian booted with systemd as init, and the service's life
//! cycle checked there (systemd-test.sh beside this file says what).
//!
//! The system is built once by mmdebstrap (bookworm, Essential packages
//! plus systemd, udev, kmod and the package's dependencies; no man pages
//! or docs) into `target/vm-cache/systemd-rootfs-amd64`, cached like the
//! kernels. Each run packs it into an initramfs together with the kernel's
//! modules, the .deb, the test script and the unit that runs it, and boots
//! it with `rdinit=/sbin/init`: systemd runs from the initramfs as root
//! file system, which boots reliably under TCG and needs no disk image.

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    Args, boot,
    cpio::{Cpio, Owner},
    fetch, image,
};
use crate::{arch::Arch, progress::step};

/// The packages of the system besides the Essential ones: systemd as init,
/// udev and kmod as on any Debian machine, the package's dependencies (so
/// that dpkg -i needs no network), ping for the test's traffic. Not
/// wireguard-tools: it is only recommended, nexd must work without.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "nftables",
    "iproute2",
    "procps",
    "iputils-ping",
];

/// Bumped when the recipe below changes in a way PACKAGES does not show,
/// so a cached system is rebuilt.
const RECIPE: &str = "1";

const TEST_SCRIPT: &str = include_str!("systemd-test.sh");

const TEST_UNIT: &str = "[Unit]
Description=nexd package test (cargo xtask vm-test --systemd)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/root/systemd-test.sh /root/nexd.deb
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
";

pub fn run(cache: &Path, args: &Args) -> anyhow::Result<()> {
    if args.arch != Arch::Amd64 {
        bail!(
            "--systemd runs on amd64 only: building a foreign Debian system runs its \
             maintainer scripts under binfmt emulation, a setting of this machine's kernel"
        );
    }
    let started = Instant::now();
    let deb = crate::package::build(&[Arch::Amd64])?
        .pop()
        .context("no amd64 package was built")?;
    let qemu = fetch::qemu(cache, Arch::Amd64)?;
    let root = rootfs(cache)?;
    let kernels = super::kernels(args);
    let mut failures = Vec::new();
    for k in &kernels {
        let kernel = fetch::kernel(cache, k, Arch::Amd64)?;
        step(&format!("packing the systemd image for {}", kernel.version));
        let initrd = initramfs(cache, &root, &kernel, &deb)?;
        let booted = Instant::now();
        let mut attempt = 0;
        let status = loop {
            attempt += 1;
            step(&format!(
                "booting Debian with systemd on {} (attempt {attempt})",
                kernel.version
            ));
            match boot(
                &qemu,
                Arch::Amd64,
                &kernel.vmlinuz,
                &initrd,
                "rdinit=/sbin/init systemd.show_status=true",
                // systemd's first line (the name after it is in colour).
                "Welcome to",
                Duration::from_secs(args.timeout_minutes * 60),
            )? {
                Some(status) => break status,
                None if attempt < 2 => continue,
                None => bail!("the systemd VM never printed a result, twice"),
            }
        };
        let took = booted.elapsed().as_secs();
        if status == 0 {
            step(&format!(
                "the package under systemd ({}): all checks passed in {took} s",
                kernel.version
            ));
        } else {
            step(&format!(
                "the package under systemd ({}): {status} checks FAILED ({took} s)",
                kernel.version
            ));
            failures.push(kernel.version.clone());
        }
    }
    println!(
        "  (with the package build: {} s)",
        started.elapsed().as_secs()
    );
    if !failures.is_empty() {
        bail!("the systemd test failed with: {}", failures.join(", "));
    }
    Ok(())
}

/// The Debian system, built once (and again when the recipe changes).
pub(super) fn rootfs(cache: &Path) -> anyhow::Result<PathBuf> {
    let root = cache.join("systemd-rootfs-amd64");
    let stamp = root.join(".nexd-recipe");
    let want = format!("{RECIPE}:{}", PACKAGES.join(","));
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(root);
    }
    step("building a minimal Debian with systemd (mmdebstrap, once)");
    let scratch = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&scratch);
    fetch::mmdebstrap(
        &[
            "--variant=essential",
            &format!("--include={}", PACKAGES.join(",")),
            // Smaller: no documentation while bootstrapping. The setting is
            // removed at the end, so the package's own man pages and docs
            // install (and are purged) like on any machine.
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            "--customize-hook=rm \"$1\"/etc/dpkg/dpkg.cfg.d/99mmdebstrap",
            "--customize-hook=echo nexd-vm > \"$1\"/etc/hostname",
        ],
        &scratch,
    )?;
    std::fs::write(scratch.join(".nexd-recipe"), &want)?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&scratch, &root)
        .with_context(|| format!("moving {} into place", scratch.display()))?;
    Ok(root)
}

/// An entry of the image.
enum Entry {
    /// A file, directory or link of the system tree, as it is there.
    Tree(PathBuf),
    /// Contents of ours, with their mode (type and permission bits).
    Data(Vec<u8>, u32),
}

const FILE: u32 = 0o100000;
const LINK: u32 = 0o120000;
const DIR: u32 = 0o040000;

/// Every path of `root` (relative, no leading slash) to its entry; device
/// nodes, sockets and pipes are left out (systemd mounts devtmpfs).
fn walk(root: &Path) -> anyhow::Result<BTreeMap<String, Entry>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = e?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            let ft = meta.file_type();
            if !(ft.is_dir() || ft.is_file() || ft.is_symlink()) {
                continue;
            }
            let rel = path
                .strip_prefix(root)
                .context("a path outside the tree")?
                .to_string_lossy()
                .into_owned();
            if rel.starts_with(".nexd") {
                continue;
            }
            if ft.is_dir() {
                stack.push(path.clone());
            }
            out.insert(rel, Entry::Tree(path));
        }
    }
    Ok(out)
}

/// Writes one entry.
fn write_entry<W: std::io::Write>(c: &mut Cpio<W>, name: &str, e: &Entry) -> anyhow::Result<()> {
    match e {
        Entry::Data(data, mode) => c.entry(name, *mode, Owner::ROOT, data)?,
        Entry::Tree(path) => {
            let meta = std::fs::symlink_metadata(path)?;
            let owner = Owner {
                uid: meta.uid(),
                gid: meta.gid(),
            };
            let mode = meta.mode();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(path)?;
                c.entry(name, mode, owner, target.as_os_str().as_encoded_bytes())?;
            } else if meta.is_dir() {
                c.entry(name, mode, owner, &[])?;
            } else {
                let data =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                c.entry(name, mode, owner, &data)?;
            }
        }
    }
    Ok(())
}

/// The system, the kernel's modules, the package and the test, as one
/// initramfs.
fn initramfs(
    cache: &Path,
    root: &Path,
    kernel: &fetch::Kernel,
    deb: &Path,
) -> anyhow::Result<PathBuf> {
    let mut entries = walk(root)?;
    let mut add = |path: &str, data: Vec<u8>, mode: u32| {
        entries.insert(path.to_owned(), Entry::Data(data, mode));
    };
    // The modules the tests need, flat in one directory: the guest's depmod
    // indexes them, and the kernel's autoloading finds them as usual.
    // (/lib is a link to usr/lib on a merged-/usr system.)
    let lib = if root.join("lib").is_symlink() {
        "usr/lib"
    } else {
        "lib"
    };
    let modules_dir = format!("{lib}/modules/{}", kernel.version);
    for (name, data) in image::modules(kernel)? {
        add(
            &format!("{modules_dir}/kernel/nexd/{name}.ko"),
            data,
            FILE | 0o644,
        );
    }
    for index in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if let Ok(data) = std::fs::read(kernel.modules.join(index)) {
            add(&format!("{modules_dir}/{index}"), data, FILE | 0o644);
        }
    }
    add("root/nexd.deb", std::fs::read(deb)?, FILE | 0o644);
    add(
        "root/systemd-test.sh",
        TEST_SCRIPT.as_bytes().to_vec(),
        FILE | 0o755,
    );
    add(
        "etc/systemd/system/nexd-vm-test.service",
        TEST_UNIT.as_bytes().to_vec(),
        FILE | 0o644,
    );
    add(
        "etc/systemd/system/multi-user.target.wants/nexd-vm-test.service",
        b"/etc/systemd/system/nexd-vm-test.service".to_vec(),
        LINK | 0o777,
    );
    // No login prompts on the console the test writes to.
    for getty in ["serial-getty@ttyS0.service", "getty@tty1.service"] {
        add(
            &format!("etc/systemd/system/{getty}"),
            b"/dev/null".to_vec(),
            LINK | 0o777,
        );
    }
    // Directories ours go into that the system lacks.
    let missing: Vec<String> = entries
        .keys()
        .flat_map(|k| {
            let mut parents = Vec::new();
            let mut p = Path::new(k).parent();
            while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
                parents.push(d.to_string_lossy().into_owned());
                p = d.parent();
            }
            parents
        })
        .filter(|d| !entries.contains_key(d))
        .collect();
    for d in missing {
        entries.insert(d, Entry::Data(Vec::new(), DIR | 0o755));
    }
    let out = cache.join(format!("systemd-{}.cpio", kernel.version));
    let file = std::fs::File::create(&out)?;
    let mut c = Cpio::new(std::io::BufWriter::new(file));
    // BTreeMap order puts every directory before what it holds.
    for (name, e) in &entries {
        write_entry(&mut c, name, e)?;
    }
    c.finish()?.flush()?;
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!("  {} ({} MiB)", out.display(), size >> 20);
    Ok(out)
}
