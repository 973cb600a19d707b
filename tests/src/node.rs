//! A mesh device under test: a network namespace, a state directory and,
//! while started, a real nexd process.
//!
//! nexd runs in a private mount namespace with its own tmpfs on
//! /run/wireguard and its own bpffs on /sys/fs/bpf: userspace WireGuard
//! UAPI sockets and BPF pins are files, not per network namespace, and
//! would otherwise clash between nodes (see NOTES-userspace-wireguard.md).
//! A small holder process (`sleep infinity`) owns that mount namespace for
//! the node's whole life, and every nexd run joins it with nsenter: so,
//! like on a real machine, pins (the kill switch's leak guard) survive a
//! SIGKILLed nexd and the next nexd finds them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nexd_proto::{ClientPhase, ExitNodeRow, PeerRow, StatsInfo, StatusInfo};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde::de::DeserializeOwned;

use crate::{bins, cmd, netns::Netns, wait_for};

static DIRS: AtomicU32 = AtomicU32::new(0);

/// How a node's nexd is started.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Extra arguments placed before nexd's own (`router --exit-node`...).
    pub args: Vec<String>,
    /// `--wireguard` value.
    pub wireguard: String,
    /// `--log-level` value.
    pub log_level: String,
    /// Start nexd from this configuration file alone (`NEXD_CONFIG`): the
    /// file must name the state directory, mesh file and socket (the
    /// node's own, for the testkit to reach it); nothing else is given on
    /// the command line but `--wireguard` and `--log-level`.
    pub config: Option<PathBuf>,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            args: Vec::new(),
            wireguard: std::env::var("NEXD_TEST_WIREGUARD").unwrap_or_else(|_| "userspace".into()),
            log_level: "info,nexd=debug".into(),
            config: None,
        }
    }
}

/// One device: its namespace, files and (maybe) running nexd.
pub struct Node {
    pub name: String,
    pub ns: Netns,
    dir: PathBuf,
    child: Option<Child>,
    /// Owner of the node's mount namespace.
    holder: Option<Child>,
    runs: u32,
    /// Set by `keep`: leave process and files when dropped.
    kept: bool,
}

impl Node {
    /// Creates the node's namespace and directory (nothing runs yet).
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let ns = Netns::new(name)?;
        let n = DIRS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nexd-test-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Node {
            name: name.to_owned(),
            ns,
            dir,
            child: None,
            holder: None,
            runs: 0,
            kept: false,
        })
    }

    /// The node's working directory (state dir, mesh file, socket, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("nexd.sock")
    }

    pub fn mesh_file(&self) -> PathBuf {
        self.dir.join("mesh.toml")
    }

    /// Path of the log of the current (or last) run.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("nexd.{}.log", self.runs))
    }

    /// Creates the node's key (if needed) and returns its public key.
    pub fn keygen(&self) -> anyhow::Result<String> {
        let nexd = bins::nexd()?;
        let out = cmd::run(
            nexd.to_str().context("path")?,
            [
                "--state-dir",
                self.state_dir().to_str().context("path")?,
                "keygen",
            ],
        )?;
        Ok(out.trim().to_owned())
    }

    /// Writes the node's mesh file.
    pub fn write_mesh(&self, text: &str) -> anyhow::Result<()> {
        fs::write(self.mesh_file(), text).context("writing mesh file")
    }

    /// Starts nexd and waits until its control socket answers.
    pub fn start(&mut self, spec: &NodeSpec) -> anyhow::Result<()> {
        self.spawn(spec)?;
        self.wait_ready(crate::scaled(Duration::from_secs(20)))
    }

    /// The pid of the process owning the node's mount namespace, started
    /// on first use: it mounts the private tmpfs and bpffs, then sleeps.
    pub fn holder_pid(&mut self) -> anyhow::Result<u32> {
        if let Some(h) = &self.holder {
            return Ok(h.id());
        }
        fs::create_dir_all("/run/wireguard").context("creating /run/wireguard mount point")?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns.name(), "sh", "-c"])
            // A long sleep rather than `sleep infinity`, which busybox (in
            // the VM tests) does not know.
            .arg("mount -t tmpfs nexd-wg /run/wireguard && mount -t bpf bpf /sys/fs/bpf && exec sleep 2147483647")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = c.spawn().context("starting the mount namespace holder")?;
        let pid = child.id();
        self.holder = Some(child);
        // Ready once the holder is `sleep` (the mounts happened before exec).
        wait_for(
            "the mount namespace holder",
            Duration::from_secs(10),
            Duration::from_millis(10),
            || {
                fs::read_to_string(format!("/proc/{pid}/comm"))
                    .ok()
                    .filter(|c| c.trim() == "sleep")
            },
        )?;
        Ok(pid)
    }

    /// Whether a file exists at `path` inside the node's mount namespace
    /// (e.g. a pin in its bpffs).
    pub fn file_exists(&mut self, path: &str) -> anyhow::Result<bool> {
        let pid = self.holder_pid()?;
        Ok(Path::new(&format!("/proc/{pid}/root{path}")).exists())
    }

    /// Makes `/etc/resolv.conf` read `text` inside the node's mount
    /// namespace only: a file in the node's directory bind-mounted over it
    /// there, seen by nexd (an exit node's resolver forwards to the
    /// `nameserver`s it names) and by commands run on the device with
    /// [`Node::on_device`], and by nothing outside. Call it before nexd
    /// starts (its resolver reads the file when it starts serving, and on
    /// SIGHUP); calling it again rewrites the same file.
    pub fn use_resolv_conf(&mut self, text: &str) -> anyhow::Result<()> {
        let file = self.dir.join("resolv.conf");
        let mounted = file.exists();
        fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        let pid = self.holder_pid()?;
        if !mounted {
            cmd::run(
                "nsenter",
                [
                    "-t",
                    &pid.to_string(),
                    "-m",
                    "--",
                    "mount",
                    "--bind",
                    file.to_str().context("path")?,
                    "/etc/resolv.conf",
                ],
            )
            .context("bind-mounting the node's resolv.conf")?;
        }
        let seen = fs::read_to_string(format!("/proc/{pid}/root/etc/resolv.conf"))
            .context("reading the node's resolv.conf back")?;
        if seen != text {
            bail!(
                "{}: /etc/resolv.conf in its mount namespace reads {seen:?}, not the test's",
                self.name
            );
        }
        Ok(())
    }

    /// A command to run on the device: inside the node's network and mount
    /// namespaces (its resolv.conf, its bpffs), like a program on it.
    pub fn on_device(&mut self, program: &str) -> anyhow::Result<Command> {
        let holder = self.holder_pid()?.to_string();
        let mut c = Command::new("nsenter");
        c.args(["-t", &holder, "-m", "-n", "--", program]);
        Ok(c)
    }

    /// Starts nexd without waiting for it to be ready.
    pub fn spawn(&mut self, spec: &NodeSpec) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{}: nexd is already running", self.name);
        }
        let holder = self.holder_pid()?.to_string();
        self.runs += 1;
        let log = fs::File::create(self.log_path()).context("creating log file")?;
        let nexd = bins::nexd()?;
        let mut c = Command::new("nsenter");
        c.args(["-t", &holder, "-m", "-n", "--"])
            .arg(&nexd)
            .args(&spec.args);
        match &spec.config {
            Some(file) => {
                c.env("NEXD_CONFIG", file);
            }
            None => {
                c.arg("--state-dir")
                    .arg(self.state_dir())
                    .arg("--mesh-file")
                    .arg(self.mesh_file())
                    .arg("--socket")
                    .arg(self.socket());
            }
        }
        c.args([
            "--wireguard",
            &spec.wireguard,
            "--log-level",
            &spec.log_level,
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        self.child = Some(c.spawn().context("starting nexd")?);
        Ok(())
    }

    /// Waits until `nexctl nexd version` succeeds.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                bail!(
                    "{}: nexd exited ({status}) before it was ready; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            if self.nexctl(&["nexd", "version"])?.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: nexd not ready after {timeout:?}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// nexd's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn try_exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            None => Ok(None),
            Some(c) => Ok(c.try_wait()?),
        }
    }

    /// Sends `sig` to nexd.
    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("nexd is not running")?;
        kill(Pid::from_raw(pid as i32), sig).context("kill")?;
        Ok(())
    }

    /// SIGTERM, then waits (bounded) for nexd to exit; returns its status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        self.wait_exit(crate::scaled(Duration::from_secs(15)))
    }

    /// SIGKILL, then waits for the process to be gone.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGKILL)?;
        self.wait_exit(crate::scaled(Duration::from_secs(5)))
            .map(|_| ())
    }

    /// Waits for nexd to exit; SIGKILLs it after `timeout` and fails.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("nexd is not running")?;
        let status = wait_for("nexd to exit", timeout, Duration::from_millis(20), || {
            child.try_wait().ok().flatten()
        });
        match status {
            Ok(s) => Ok(s),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context(format!("{}: log:\n{}", self.name, self.log())))
            }
        }
    }

    /// Runs nexctl against this node's socket; returns the raw output.
    pub fn nexctl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let nexctl = bins::nexctl()?;
        let mut c = Command::new(nexctl);
        c.arg("--socket").arg(self.socket()).args(args);
        cmd::output_with_timeout(&mut c, Duration::from_secs(20))
    }

    /// Runs nexctl inside the node's network and mount namespaces (as on
    /// the device itself: needed when nexctl acts without nexd).
    pub fn nexctl_on_device(&mut self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let holder = self.holder_pid()?.to_string();
        let nexctl = bins::nexctl()?;
        let mut c = Command::new("nsenter");
        c.args(["-t", &holder, "-m", "-n", "--"])
            .arg(nexctl)
            .arg("--socket")
            .arg(self.socket())
            .args(args);
        cmd::output_with_timeout(&mut c, Duration::from_secs(30))
    }

    /// Runs nexctl on the device with only `env` to go by (no `--socket`):
    /// as an operator would, from the environment nexd was started from.
    pub fn nexctl_in_env(
        &mut self,
        env: &[(&str, &Path)],
        args: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        let holder = self.holder_pid()?.to_string();
        let nexctl = bins::nexctl()?;
        let mut c = Command::new("nsenter");
        c.args(["-t", &holder, "-m", "-n", "--"])
            .arg(nexctl)
            .args(args)
            .env_remove("NEXCTL_SOCKET");
        for (k, v) in env {
            c.env(k, v);
        }
        cmd::output_with_timeout(&mut c, Duration::from_secs(30))
    }

    /// Runs nexctl as another user (`setpriv`), e.g. nobody.
    pub fn nexctl_as(
        &self,
        uid: u32,
        gid: u32,
        args: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        let nexctl = bins::nexctl()?;
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg("--")
            .arg(nexctl)
            .arg("--socket")
            .arg(self.socket())
            .args(args);
        cmd::output_with_timeout(&mut c, Duration::from_secs(20))
    }

    /// Runs nexctl with `--output json` and deserializes the result into
    /// `T` (the protocol's own types: a renamed field fails here, loudly,
    /// instead of showing up later as a timeout); fails unless nexctl
    /// exits 0.
    pub fn nexctl_json<T: DeserializeOwned>(&self, args: &[&str]) -> anyhow::Result<T> {
        let mut full = vec!["--output=json"];
        full.extend_from_slice(args);
        let out = self.nexctl(&full)?;
        if !out.status.success() {
            bail!(
                "{}: nexctl {args:?} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "{}: nexctl {args:?} printed something that is not a {}: {}",
                self.name,
                std::any::type_name::<T>(),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `nexctl nexd status`.
    pub fn status(&self) -> anyhow::Result<StatusInfo> {
        self.nexctl_json(&["nexd", "status"])
    }

    /// `nexctl nexd peers list`.
    pub fn peers(&self) -> anyhow::Result<Vec<PeerRow>> {
        self.nexctl_json(&["nexd", "peers", "list"])
    }

    /// `nexctl nexd exit-node list`.
    pub fn exit_nodes(&self) -> anyhow::Result<Vec<ExitNodeRow>> {
        self.nexctl_json(&["nexd", "exit-node", "list"])
    }

    /// `nexctl nexd stats`.
    pub fn stats(&self) -> anyhow::Result<StatsInfo> {
        self.nexctl_json(&["nexd", "stats"])
    }

    /// The exit-node client's phase.
    pub fn client_phase(&self) -> anyhow::Result<ClientPhase> {
        Ok(self.status()?.exit_node.client_phase)
    }

    /// Waits (bounded, scaled) until the exit-node client is in `want`.
    pub fn wait_phase(&self, want: ClientPhase, timeout: Duration) -> anyhow::Result<()> {
        wait_for(
            &format!("{} to be {}", self.name, want.as_str()),
            timeout,
            Duration::from_millis(100),
            || (self.client_phase().ok() == Some(want)).then_some(()),
        )
    }

    /// Waits (bounded, scaled) until this node lists exit node `name` as
    /// available; returns its row.
    pub fn wait_exit_node(&self, name: &str, timeout: Duration) -> anyhow::Result<ExitNodeRow> {
        wait_for(
            &format!("{} to list exit node {name} as available", self.name),
            timeout,
            Duration::from_millis(100),
            || {
                self.exit_nodes()
                    .ok()?
                    .into_iter()
                    .find(|r| r.name == name && r.status == nexd_proto::ExitStatus::Available)
            },
        )
    }

    /// `wg show` as seen from inside nexd's mount namespace (where its
    /// UAPI socket lives).
    pub fn wg_show(&self) -> anyhow::Result<String> {
        let pid = self
            .holder
            .as_ref()
            .map(Child::id)
            .context("the node has no mount namespace yet")?
            .to_string();
        cmd::run("nsenter", ["-t", &pid, "-m", "-n", "wg", "show"])
    }

    /// The log of the current (or last) run.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

/// What is left of a node whose namespace and nexd were kept running.
#[derive(Debug, Clone)]
pub struct KeptNode {
    pub name: String,
    pub netns: String,
    pub pid: Option<u32>,
    pub dir: PathBuf,
}

impl Node {
    /// Creates a node whose namespace has exactly the name `netns`.
    pub fn named(name: &str, netns: &str, dir: &Path) -> anyhow::Result<Self> {
        let ns = Netns::named(netns, name)?;
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Node {
            name: name.to_owned(),
            ns,
            dir: dir.to_owned(),
            child: None,
            holder: None,
            runs: 0,
            kept: false,
        })
    }

    /// Leaves the namespace, nexd and files in place when this value goes
    /// away (`cargo xtask lab --keep`).
    pub fn keep(mut self) -> KeptNode {
        self.kept = true;
        // The holder goes with the namespace when the lab is taken down.
        let _ = self.holder.take().map(|h| h.id());
        KeptNode {
            name: self.name.clone(),
            netns: self.ns.keep(),
            pid: self.child.take().map(|c| c.id()),
            dir: self.dir.clone(),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut holder) = self.holder.take() {
            let _ = holder.kill();
            let _ = holder.wait();
        }
        if std::thread::panicking() || std::env::var_os("NEXD_TEST_SHOW_LOGS").is_some() {
            eprintln!(
                "---- {} nexd log ({}) ----\n{}",
                self.name,
                self.log_path().display(),
                self.log()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
