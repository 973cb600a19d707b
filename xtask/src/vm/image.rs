//! The VM's initramfs: busybox and the tools the tests drive with their
//! shared libraries (from a Debian tree of the VM's architecture), the
//! kernel modules, nexd, nexctl, the test binaries, and an /init that loads
//! modules, runs the suite and reports.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{Case, cpio::Cpio, elf, fetch::Kernel};
use crate::{arch::Arch, progress::step};

/// The Debian packages the VM's userland comes from.
pub const USERLAND: &[&str] = &[
    "busybox-static",
    "iproute2",
    "nftables",
    "iputils-ping",
    "wireguard-tools",
    "util-linux",
    "libc6",
    "libgcc-s1",
];

/// Tools the tests run, found by name where Debian puts them (bookworm's
/// iproute2 still has /bin/ip) and put at the same path in the image.
const TOOLS: [&str; 6] = ["ip", "tc", "nft", "ping", "wg", "nsenter"];

/// Kernel modules the suite needs (their dependencies are added; a name
/// this kernel does not have is skipped: built in, or another arch's).
const MODULES: [&str; 21] = [
    "wireguard",
    "veth",
    "bridge",
    "sch_ingress",
    "cls_bpf",
    "nf_tables",
    "nf_conntrack",
    "nf_nat",
    "nft_chain_nat",
    "nft_masq",
    // The exit client's DNS redirect to the exit node's resolver: dnat
    // (nft_nat) and its reject of what it cannot redirect.
    "nft_nat",
    "nft_reject_inet",
    "nft_ct",
    "nft_objref",
    // An exit node's per-client limits: `limit rate over` (nft_limit) and
    // `ct count over` (nft_connlimit); built in on some kernels, modules on
    // Debian's.
    "nft_limit",
    "nft_connlimit",
    // The accelerated WireGuard ciphers of each architecture.
    "chacha_x86_64",
    "poly1305_x86_64",
    "curve25519_x86_64",
    "chacha_neon",
    "poly1305_neon",
];

/// nexd, nexctl and the suite's test binaries, built on this machine for
/// the VM's architecture.
pub struct Binaries {
    pub nexd: PathBuf,
    pub nexctl: PathBuf,
    pub tests: BTreeMap<String, PathBuf>,
}

/// Builds nexd, nexctl and the test binaries of `cases` for `arch`: debug
/// for the host's architecture (as `cargo test` builds them), release when
/// cross-building (shared with the package and the qemu-user unit tests).
/// `release_agent` makes nexd and nexctl release builds on the host's
/// architecture too: a measurement must see the nexd that ships, not a
/// debug build's background CPU (the test binaries stay as they are: the
/// traffic they drive is the kernel's work).
pub fn build_binaries(arch: Arch, cases: &[Case], release_agent: bool) -> anyhow::Result<Binaries> {
    let release = !arch.is_host();
    let dir = if release {
        crate::arch::build_release(arch)?
    } else {
        crate::workspace::build_agent(release_agent)?;
        arch.output_dir(release_agent)
    };
    step(&format!("building the end-to-end test binaries for {arch}"));
    // One cargo call for every package, nexd-agent always among them: its
    // tests depend on nexd-tests, so features resolve as for `cargo test`
    // and nexd-agent's unit tests, and the binaries reuse the crates those
    // built (nexd-tests alone resolved narrower features and rebuilt 38
    // crates for arm64, 17 for amd64).
    let mut packages: BTreeSet<&str> = cases.iter().map(|c| c.package).collect();
    packages.insert("nexd-agent");
    let mut cmd = crate::workspace::cargo_command();
    cmd.arg("test").args(arch.cargo_target_args());
    if release {
        cmd.arg("--release");
    }
    for package in packages {
        cmd.args(["--package", package]);
    }
    cmd.args(["--no-run", "--message-format=json-diagnostic-rendered-ansi"]);
    for c in cases {
        cmd.args(["--test", c.binary]);
    }
    // cargo's progress (stderr) shows; the JSON (stdout) names the binaries.
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let messages = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    let mut tests = BTreeMap::new();
    let mut diagnostics = String::new();
    for v in messages {
        if let Some(rendered) = v["message"]["rendered"].as_str() {
            diagnostics.push_str(rendered);
        }
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
            && cases.iter().any(|c| c.binary == name)
        {
            tests.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    if !out.status.success() {
        bail!("building the tests failed ({}):\n{diagnostics}", out.status);
    }
    for c in cases {
        if !tests.contains_key(c.binary) {
            bail!("no test binary {} was built", c.binary);
        }
    }
    Ok(Binaries {
        nexd: dir.join("nexd"),
        nexctl: dir.join("nexctl"),
        tests,
    })
}

/// Files of the image: path inside -> contents and mode.
#[derive(Default)]
struct Tree {
    files: BTreeMap<String, (Vec<u8>, u32)>,
    links: BTreeMap<String, String>,
}

impl Tree {
    fn add(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.files
            .insert(path.trim_start_matches('/').to_owned(), (data, mode));
    }

    /// A file of the Debian tree at `root`, at the same path in the image
    /// (its links resolved inside the tree).
    fn copy_from_tree(&mut self, root: &Path, path: &str) -> anyhow::Result<()> {
        let real = elf::resolve(root, path)?;
        let data = std::fs::read(&real).with_context(|| format!("reading {}", real.display()))?;
        self.add(path, data, 0o755);
        Ok(())
    }

    /// The dynamic loader and shared libraries `file` needs, from the tree.
    fn runtime_of(&mut self, root: &Path, arch: Arch, file: &Path) -> anyhow::Result<()> {
        for lib in elf::runtime_needs(root, arch.gnu_triple(), file)? {
            self.copy_from_tree(root, &lib)?;
        }
        Ok(())
    }

    /// One of our binaries, without its debug info (they are large), and
    /// what it needs from the tree.
    fn stripped(&mut self, root: &Path, arch: Arch, src: &Path, dest: &str) -> anyhow::Result<()> {
        let tmp = std::env::temp_dir().join(format!("nexd-vm-strip-{}", std::process::id()));
        let objcopy = match arch {
            Arch::Amd64 => "objcopy",
            Arch::Arm64 => "aarch64-linux-gnu-objcopy",
        };
        let ok = Command::new(objcopy)
            .arg("--strip-debug")
            .arg(src)
            .arg(&tmp)
            .status()
            .is_ok_and(|s| s.success());
        let data = if ok {
            std::fs::read(&tmp)?
        } else {
            std::fs::read(src).with_context(|| format!("reading {}", src.display()))?
        };
        let _ = std::fs::remove_file(&tmp);
        self.add(dest, data, 0o755);
        self.runtime_of(root, arch, src)
    }

    fn write(&self, out: &Path) -> anyhow::Result<()> {
        let mut dirs = BTreeSet::new();
        for p in self.files.keys().chain(self.links.keys()) {
            let mut d = Path::new(p).parent();
            while let Some(dir) = d.filter(|d| !d.as_os_str().is_empty()) {
                dirs.insert(dir.to_string_lossy().into_owned());
                d = dir.parent();
            }
        }
        for d in ["proc", "sys", "dev", "run", "tmp", "var", "root", "mnt"] {
            dirs.insert(d.to_owned());
        }
        let file = std::fs::File::create(out)?;
        let mut c = Cpio::new(std::io::BufWriter::new(file));
        for d in &dirs {
            c.dir(d)?;
        }
        for (p, (data, mode)) in &self.files {
            c.file(p, *mode, data)?;
        }
        for (p, target) in &self.links {
            if !self.files.contains_key(p) {
                c.symlink(p, target)?;
            }
        }
        c.finish()?;
        Ok(())
    }
}

fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

/// A `key=` string of the module's .modinfo section.
fn modinfo<'a>(ko: &'a [u8], key: &str) -> Option<std::borrow::Cow<'a, str>> {
    let needle = format!("{key}=");
    let at = ko
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?;
    let rest = &ko[at + needle.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    Some(String::from_utf8_lossy(&rest[..end]))
}

/// The module's dependencies: `depends=`, and `softdep=pre:` (e.g.
/// libcrc32c needs a crc32c implementation loaded first).
fn depends(ko: &[u8]) -> Vec<String> {
    let mut out: Vec<String> = modinfo(ko, "depends")
        .map(|d| {
            d.split(',')
                .filter(|s| !s.is_empty())
                .map(module_key)
                .collect()
        })
        .unwrap_or_default();
    if let Some(soft) = modinfo(ko, "softdep") {
        let pre = soft
            .split("post:")
            .next()
            .unwrap_or("")
            .trim_start_matches("pre:");
        for name in pre.split_whitespace() {
            // "crc32c" is an algorithm name; its generic module provides it.
            let name = if name == "crc32c" {
                "crc32c_generic"
            } else {
                name
            };
            out.push(module_key(name));
        }
    }
    out
}

fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => Ok(std::fs::read(path)?),
        Some(t) => {
            let out = Command::new(t).arg("-dc").arg(path).output()?;
            if !out.status.success() {
                bail!("decompressing {name} failed");
            }
            Ok(out.stdout)
        }
    }
}

/// Modules (with dependencies first) and their contents.
pub fn modules(kernel: &Kernel) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut index: HashMap<String, PathBuf> = HashMap::new();
    let mut stack = vec![kernel.modules.join("kernel")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)?.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().map(|n| n.to_string_lossy().into_owned())
                && let Some(base) = n.split(".ko").next().filter(|_| n.contains(".ko"))
            {
                index.insert(module_key(base), p);
            }
        }
    }
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        index: &HashMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> anyhow::Result<()> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        // Not a file: built into this kernel.
        let Some(path) = index.get(name) else {
            return Ok(());
        };
        let data = read_module(path)?;
        for dep in depends(&data) {
            visit(&dep, index, seen, order)?;
        }
        order.push((name.to_owned(), data));
        Ok(())
    }
    for m in MODULES {
        visit(&module_key(m), &index, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// How much longer than on the host the tests may take: TCG emulates
/// arm64 on x86_64 more slowly than x86_64 on itself.
fn time_scale(arch: Arch) -> u32 {
    match arch {
        Arch::Amd64 => 4,
        Arch::Arm64 => 8,
    }
}

/// `env`: more variables for the tests (e.g. the measurement's rounds).
fn init_script(arch: Arch, modules: &[String], cases: &[Case], env: &[(String, String)]) -> String {
    let mut runs = String::new();
    for c in cases {
        let filter = if c.test.is_empty() {
            String::new()
        } else {
            format!(" {} --exact", c.test)
        };
        let ignored = if c.ignored { " --ignored" } else { "" };
        runs.push_str(&format!(
            "run /tests/{}{filter}{ignored} --nocapture --test-threads=1\n",
            c.binary
        ));
    }
    let mut exports = String::new();
    for (k, v) in env {
        exports.push_str(&format!("export {k}='{v}'\n"));
    }
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mount -t bpf bpf /sys/fs/bpf
mkdir -p /var /dev/net
ln -s /run /var/run
for m in {mods}; do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
echo "modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
ip link set lo up
echo "{booted} $(uname -r) ({arch}), $(nproc) CPUs"
export HOME=/root NEXD_BIN_DIR=/usr/bin NEXD_TEST_WIREGUARD=kernel NEXD_TEST_TIME_SCALE={scale} RUST_BACKTRACE=1
{exports}status=0
run() {{
  echo "=== $*"
  start=$(cut -d. -f1 /proc/uptime)
  "$@" || {{ status=1; echo "=== FAILED: $*"; }}
  echo "=== took $(( $(cut -d. -f1 /proc/uptime) - start )) s: $1"
}}
{runs}echo "NEXD-VM-RESULT: $status"
poweroff -f
"#,
        mods = modules.join(" "),
        booted = super::BOOTED,
        scale = time_scale(arch),
    )
}

/// Builds the initramfs for `kernel` and returns its path.
pub fn initramfs(
    cache: &Path,
    arch: Arch,
    kernel: &Kernel,
    userland: &Path,
    bins: &Binaries,
    cases: &[Case],
    env: &[(String, String)],
) -> anyhow::Result<PathBuf> {
    let mut tree = Tree::default();
    tree.add(
        "bin/busybox",
        std::fs::read(elf::resolve(userland, "/bin/busybox")?)?,
        0o755,
    );
    for t in TOOLS {
        let path = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .map(|d| format!("{d}/{t}"))
            .find(|p| elf::resolve(userland, p).is_ok_and(|r| r.is_file()))
            .with_context(|| format!("no {t} in {}", userland.display()))?;
        tree.copy_from_tree(userland, &path)?;
        tree.runtime_of(userland, arch, &elf::resolve(userland, &path)?)?;
    }
    tree.stripped(userland, arch, &bins.nexd, "usr/bin/nexd")?;
    tree.stripped(userland, arch, &bins.nexctl, "usr/bin/nexctl")?;
    for (name, path) in &bins.tests {
        tree.stripped(userland, arch, path, &format!("tests/{name}"))?;
    }
    let mods = modules(kernel)?;
    let names: Vec<String> = mods.iter().map(|(n, _)| n.clone()).collect();
    for (name, data) in mods {
        tree.add(&format!("lib/modules/{name}.ko"), data, 0o644);
    }
    tree.add(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n".to_vec(),
        0o644,
    );
    tree.add(
        "etc/group",
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        0o644,
    );
    tree.add(
        "init",
        init_script(arch, &names, cases, env).into_bytes(),
        0o755,
    );
    let out = cache.join(format!("initramfs-{}.cpio", kernel.version));
    tree.write(&out)?;
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "  {} ({} MiB, {} modules)",
        out.display(),
        size >> 20,
        names.len()
    );
    Ok(out)
}
