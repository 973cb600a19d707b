//! A real etcd (Debian's `etcd-server`) for the registry tests: one member
//! or a cluster, each member in a network namespace of its own plugged
//! into a test switch, with its data directory in a temporary directory.
//! Every wait is bounded; dropping the cluster kills the members and
//! removes the data (their namespaces go with their `Netns` guards).
//!
//! `Pki` makes a throw-away CA, member certificates (with their IP in the
//! subject alternative name) and a client certificate with `openssl`, for
//! clusters that speak TLS and check client certificates.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{cmd, netns::Netns, topology::Switch, wait_for};

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// etcd's client port.
pub const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

/// Certificates for a TLS cluster, in a directory of their own.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA, one server/peer certificate per member IP, and a client
    /// certificate (CN `nexd`), all ECDSA P-256, valid for two days.
    pub fn new(dir: &Path, member_ips: &[&str]) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=nexd-test-ca"];
        ca.extend(ec);
        let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
        ca.extend([
            "-keyout",
            &ca_key,
            "-out",
            &ca_crt,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        cmd::run("openssl", &ca)?;
        let leaf = |name: &str, cn: &str, san: Option<&str>| -> anyhow::Result<()> {
            let (key, csr, crt, ext) = (
                p(&format!("{name}.key")),
                p(&format!("{name}.csr")),
                p(&format!("{name}.crt")),
                p(&format!("{name}.ext")),
            );
            let mut ext_text = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n".to_owned();
            if let Some(s) = san {
                ext_text.push_str(&format!("subjectAltName={s}\n"));
            }
            fs::write(&ext, ext_text)?;
            let subj = format!("/CN={cn}");
            let mut req = vec!["req", "-new", "-subj", &subj, "-keyout", &key, "-out", &csr];
            req.extend(ec);
            cmd::run("openssl", &req)?;
            cmd::run(
                "openssl",
                [
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    &ca_crt,
                    "-CAkey",
                    &ca_key,
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    &crt,
                    "-extfile",
                    &ext,
                ],
            )?;
            Ok(())
        };
        for (i, ip) in member_ips.iter().enumerate() {
            let ip = ip.split('/').next().unwrap_or(ip);
            leaf(
                &format!("member{i}"),
                &format!("etcd{i}"),
                Some(&format!("IP:{ip}")),
            )?;
        }
        leaf("client", "nexd", None)?;
        Ok(Pki {
            dir: dir.to_owned(),
        })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.crt")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    fn member(&self, i: usize) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("member{i}.crt")),
            self.dir.join(format!("member{i}.key")),
        )
    }
}

struct Member {
    name: String,
    ns: Netns,
    ip: String,
    child: Option<Child>,
    runs: u32,
}

/// One etcd member or a cluster of them.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
    token: String,
    tls: bool,
    pki: Option<Pki>,
    /// `user:password` for etcdctl once authentication is on.
    auth: Option<String>,
}

impl EtcdCluster {
    /// Starts one member per address in `cidrs` (e.g. "198.51.100.11/24"),
    /// each in its own namespace on `sw`, and waits until every member is
    /// healthy.
    pub fn start(sw: &mut Switch, cidrs: &[&str]) -> anyhow::Result<Self> {
        Self::start_inner(sw, cidrs, false)
    }

    /// The same with TLS everywhere: members present certificates of a
    /// fresh `Pki`, and require client certificates from it.
    pub fn start_tls(sw: &mut Switch, cidrs: &[&str]) -> anyhow::Result<Self> {
        Self::start_inner(sw, cidrs, true)
    }

    fn start_inner(sw: &mut Switch, cidrs: &[&str], tls: bool) -> anyhow::Result<Self> {
        which_etcd()?;
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nexd-etcd-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = if tls {
            Some(Pki::new(&dir.join("pki"), cidrs)?)
        } else {
            None
        };
        let mut members = Vec::new();
        for (i, cidr) in cidrs.iter().enumerate() {
            let ns = Netns::new(&format!("etcd{i}"))?;
            sw.attach(&ns, "eth0", &[cidr])?;
            members.push(Member {
                name: format!("m{i}"),
                ns,
                ip: cidr.split('/').next().unwrap_or(cidr).to_owned(),
                child: None,
                runs: 0,
            });
        }
        let mut c = EtcdCluster {
            members,
            dir,
            token: format!("nexd-test-{}-{n}", std::process::id()),
            tls,
            pki,
            auth: None,
        };
        // All members at once: a new cluster needs a quorum to start.
        for i in 0..c.members.len() {
            c.spawn(i)?;
        }
        for i in 0..c.members.len() {
            c.wait_healthy(i)?;
        }
        Ok(c)
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&self.members[i].name)
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!(
            "{}.{}.log",
            self.members[i].name, self.members[i].runs
        ))
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let s = self.scheme();
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={s}://{}:{PEER_PORT}", m.name, m.ip))
            .collect();
        let data = self.data_dir(i);
        self.members[i].runs += 1;
        let log = fs::File::create(self.log_path(i)).context("creating the etcd log")?;
        let m = &self.members[i];
        let mut c = Command::new("ip");
        c.args(["netns", "exec", m.ns.name(), "etcd"])
            .arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={s}://{}:{CLIENT_PORT}", m.ip))
            .arg(format!(
                "--advertise-client-urls={s}://{}:{CLIENT_PORT}",
                m.ip
            ))
            .arg(format!("--listen-peer-urls={s}://{}:{PEER_PORT}", m.ip))
            .arg(format!(
                "--initial-advertise-peer-urls={s}://{}:{PEER_PORT}",
                m.ip
            ))
            .arg(format!("--initial-cluster={}", cluster.join(",")))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg("--initial-cluster-state=new")
            // Quick elections: a killed leader is replaced in about a second.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr");
        if let Some(pki) = &self.pki {
            let (crt, key) = pki.member(i);
            for flag in ["", "peer-"] {
                c.arg(format!("--{flag}cert-file={}", crt.display()))
                    .arg(format!("--{flag}key-file={}", key.display()))
                    .arg(format!("--{flag}trusted-ca-file={}", pki.ca().display()))
                    .arg(format!("--{flag}client-cert-auth"));
            }
        }
        c.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = c.spawn().context("starting etcd")?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Waits (bounded) until member `i` answers `endpoint health`.
    pub fn wait_healthy(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + crate::scaled(Duration::from_secs(30));
        loop {
            if let Some(c) = self.members[i].child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "etcd member {} exited ({status}) before it was healthy; log:\n{}",
                    self.members[i].name,
                    self.log(i)
                );
            }
            let ep = format!("{}://{}:{CLIENT_PORT}", self.scheme(), self.members[i].ip);
            if let Ok(out) = self.etcdctl_via(i, &ep, &["endpoint", "health"])
                && out.status.success()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd member {} not healthy in time; log:\n{}",
                    self.members[i].name,
                    self.log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `host:port` of every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}:{CLIENT_PORT}", m.ip))
            .collect()
    }

    /// `etcd://m1,m2,m3/PREFIX` for `--registry`.
    pub fn url(&self, prefix: &str) -> String {
        format!(
            "etcd://{}/{}",
            self.endpoints().join(","),
            prefix.trim_start_matches('/')
        )
    }

    /// The certificates, when the cluster speaks TLS.
    pub fn pki(&self) -> Option<&Pki> {
        self.pki.as_ref()
    }

    /// The namespace of member `i`.
    pub fn member_ns(&self, i: usize) -> &Netns {
        &self.members[i].ns
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// SIGKILLs member `i` and waits until it is gone. Its data stays.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let mut child = self.members[i]
            .child
            .take()
            .with_context(|| format!("etcd member {i} is not running"))?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).context("kill etcd")?;
        wait_for(
            "etcd to exit",
            Duration::from_secs(10),
            Duration::from_millis(10),
            || child.try_wait().ok().flatten(),
        )?;
        Ok(())
    }

    /// Starts member `i` again on its data and waits until it is healthy.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        if self.members[i].child.is_some() {
            bail!("etcd member {i} is still running");
        }
        self.spawn(i)?;
        self.wait_healthy(i)
    }

    /// Starts every stopped member again, all at once (a cluster that lost
    /// its quorum needs more than one back before any is healthy), and
    /// waits until each is healthy.
    pub fn restart_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i)?;
            }
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i)?;
        }
        Ok(())
    }

    /// Runs etcdctl (v3 API) from the namespace of the first running
    /// member against every member; fails unless it exits 0.
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let i = self
            .members
            .iter()
            .position(|m| m.child.is_some())
            .context("no etcd member is running")?;
        let eps: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}://{}:{CLIENT_PORT}", self.scheme(), m.ip))
            .collect();
        let out = self.etcdctl_via(i, &eps.join(","), args)?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes `value` at `key` as is (an attacker with write access).
    pub fn put(&self, key: &str, value: &str) -> anyhow::Result<()> {
        // `--` so a value starting with '-' is not an option.
        self.etcdctl(&["put", "--", key, value]).map(|_| ())
    }

    /// The value at `key`, if any.
    pub fn get(&self, key: &str) -> anyhow::Result<Option<String>> {
        let out = self.etcdctl(&["get", "--print-value-only", "--", key])?;
        let v = out.strip_suffix('\n').unwrap_or(&out);
        Ok((!out.is_empty()).then(|| v.to_owned()))
    }

    /// Turns etcd authentication on with a `root` user whose password is
    /// `password`; etcdctl uses it from then on.
    pub fn enable_auth(&mut self, password: &str) -> anyhow::Result<()> {
        self.etcdctl(&[
            "user",
            "add",
            "root",
            &format!("--new-user-password={password}"),
        ])?;
        self.etcdctl(&["user", "grant-role", "root", "root"])?;
        self.etcdctl(&["auth", "enable"])?;
        self.auth = Some(format!("root:{password}"));
        Ok(())
    }

    /// The current revision of the store.
    pub fn revision(&self) -> anyhow::Result<i64> {
        let out = self.etcdctl(&["get", "--write-out=json", "--", "/"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["header"]["revision"]
            .as_i64()
            .with_context(|| format!("no revision in {out}"))
    }

    /// Compacts the history up to the current revision (physically, so a
    /// watch from before fails at once).
    pub fn compact(&self) -> anyhow::Result<i64> {
        let rev = self.revision()?;
        self.etcdctl(&["compact", "--physical", &rev.to_string()])?;
        Ok(rev)
    }

    fn etcdctl_via(
        &self,
        i: usize,
        endpoints: &str,
        args: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        let mut full: Vec<String> = vec![
            "env".into(),
            "ETCDCTL_API=3".into(),
            "etcdctl".into(),
            format!("--endpoints={endpoints}"),
            "--dial-timeout=2s".into(),
            "--command-timeout=5s".into(),
        ];
        if let Some(a) = &self.auth {
            full.push(format!("--user={a}"));
        }
        if let Some(pki) = &self.pki {
            full.push(format!("--cacert={}", pki.ca().display()));
            full.push(format!("--cert={}", pki.client_cert().display()));
            full.push(format!("--key={}", pki.client_key().display()));
        }
        full.extend(args.iter().map(|a| (*a).to_owned()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.members[i]
            .ns
            .exec_output(&refs, Duration::from_secs(15))
    }

    /// The log of member `i`'s current (or last) run.
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }
}

/// The mesh admin: `nexctl mesh` against a registry, run in a namespace
/// of its own that reaches etcd, with the admin key pair in a directory
/// of its own (removed on drop).
pub struct MeshAdmin {
    ns: Netns,
    url: String,
    dir: PathBuf,
    public: String,
}

impl MeshAdmin {
    /// `nexctl mesh init` at `url` (with `extra` options such as
    /// `--mtu`): a new admin key pair, the mesh settings written.
    pub fn init(ns: Netns, url: String, extra: &[&str]) -> anyhow::Result<Self> {
        Self::create(ns, url, &["init"], extra)
    }

    /// `nexctl mesh import FILE --new-admin-key` at `url`: a new admin key
    /// pair, the file's settings and devices written, signed.
    pub fn import(ns: Netns, url: String, file: &Path) -> anyhow::Result<Self> {
        let f = file.to_str().context("path")?;
        Self::create(ns, url, &["import", f], &["--new-admin-key"])
    }

    fn create(ns: Netns, url: String, command: &[&str], extra: &[&str]) -> anyhow::Result<Self> {
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nexd-admin-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut admin = MeshAdmin {
            ns,
            url,
            dir,
            public: String::new(),
        };
        let key = admin.key_path();
        let k = key.to_str().context("path")?.to_owned();
        let mut args = command.to_vec();
        args.extend(["--admin-key", k.as_str()]);
        args.extend_from_slice(extra);
        admin.ok(&args)?;
        admin.public = fs::read_to_string(admin.dir.join("admin.key.pub"))
            .context("reading the admin public key")?
            .trim()
            .to_owned();
        Ok(admin)
    }

    /// The admin's private key file.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("admin.key")
    }

    /// The admin's public key, for `--registry-admin-key`.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// The namespace the admin works from.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// `nexctl mesh --registry URL ARGS`; the raw output.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let nexctl = crate::bins::nexctl()?;
        let mut full = vec![
            nexctl.to_str().context("path")?,
            "mesh",
            "--registry",
            &self.url,
        ];
        full.extend_from_slice(args);
        self.ns.exec_output(&full, Duration::from_secs(30))
    }

    /// Like `run`, failing unless nexctl exits 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "nexctl mesh {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `nexctl mesh approve DEVICE --admin-key KEY EXTRA...`.
    pub fn approve(&self, device: &str, extra: &[&str]) -> anyhow::Result<String> {
        let key = self.key_path();
        let mut args = vec![
            "approve",
            device,
            "--admin-key",
            key.to_str().context("path")?,
        ];
        args.extend_from_slice(extra);
        self.ok(&args)
    }

    /// `nexctl mesh revoke DEVICE --admin-key KEY`.
    pub fn revoke(&self, device: &str) -> anyhow::Result<String> {
        let key = self.key_path();
        self.ok(&[
            "revoke",
            device,
            "--admin-key",
            key.to_str().context("path")?,
        ])
    }

    /// `nexctl mesh list -o json`, verified with the admin's public key:
    /// what the admin sees.
    pub fn list(&self) -> anyhow::Result<serde_json::Value> {
        let text = self.ok(&["list", "--registry-admin-key", &self.public, "-o", "json"])?;
        serde_json::from_str(&text).with_context(|| format!("list is not JSON: {text}"))
    }

    /// The serial `nexctl mesh list` shows for device `name`, if listed.
    pub fn serial_of(&self, name: &str) -> anyhow::Result<Option<u64>> {
        let l = self.list()?;
        Ok(l["devices"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d["name"] == name))
            .and_then(|d| d["serial"].as_u64()))
    }

    /// nexd's options to join this mesh as `name`, publishing `endpoint`
    /// (`HOST:PORT`) if given.
    pub fn device_args(&self, name: &str, endpoint: Option<&str>) -> Vec<String> {
        let mut a: Vec<String> = [
            "--registry",
            &self.url,
            "--registry-admin-key",
            &self.public,
            "--registry-name",
            name,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(e) = endpoint {
            a.push("--registry-endpoint".into());
            a.push(e.to_owned());
        }
        a
    }
}

impl Drop for MeshAdmin {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The etcd key id of a WireGuard public key (URL-safe base64 without
/// padding), as the registry's paths use it.
pub fn key_id(public_key: &str) -> String {
    public_key
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

fn which_etcd() -> anyhow::Result<()> {
    if which("etcd") && which("etcdctl") {
        return Ok(());
    }
    bail!(
        "etcd or etcdctl not found; install Debian's etcd-server and etcd-client (`cargo xtask setup` does)"
    )
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            if let Some(mut c) = self.members[i].child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            for i in 0..self.members.len() {
                let log = self.log(i);
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!(
                    "---- etcd {} log (last lines) ----\n{}",
                    self.members[i].name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
