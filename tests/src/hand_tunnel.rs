//! A WireGuard tunnel configured by hand between two nodes of a [`World`],
//! as wg-quick configures a full tunnel: the baseline the benchmarks hold
//! nexd against, over kernel WireGuard (`kernel_wg_bench`, in the VM) or
//! Debian's wireguard-go (`cargo xtask bench`, throughput).
//!
//! On the exit node: its end of the tunnel, the route back to the client,
//! ip_forward and one nftables masquerade out of its uplink. On the
//! client, what wg-quick does for `AllowedIPs = 0.0.0.0/0`: the tunnel's
//! own packets carry the fwmark and use the main table; everything else
//! goes to a table holding the default route into the tunnel, except what
//! main routes more specifically (`suppress_prefixlength 0`). wg-quick's
//! own anti-spoofing nftables table is left out: a leaner baseline than
//! wg-quick itself.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{Netns, cmd::output_with_timeout, topology::nft_script, world::World};

/// The fwmark of the client's tunnel packets, and the table of its default
/// route into the tunnel: wg-quick's defaults.
pub const MARK: u32 = 51820;
/// The tunnel addresses of the exit node and of the client.
pub const EXIT_IP: &str = "100.64.99.1";
pub const CLIENT_IP: &str = "100.64.99.2";
/// The client's two rules (`suppress_prefixlength 0` into main, then `not
/// fwmark` into the tunnel's table), explicit so they can be removed.
pub const RULE_PRIORITIES: [u32; 2] = [30000, 30001];
/// The tunnel's MTU, as nexd's default.
const MTU: u32 = 1420;
/// How long wireguard-go may take to create its interface.
const WIREGUARD_GO_UP: Duration = Duration::from_secs(10);

/// The WireGuard implementation the tunnel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The kernel's (`ip link add type wireguard`).
    Kernel,
    /// wireguard-go, one process per node, started in the node's mount
    /// namespace: its UAPI socket goes in the node's private
    /// /run/wireguard, where `wg` then finds it.
    WireguardGo,
}

/// What differs between the tunnels the benchmarks configure.
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    pub backend: Backend,
    /// The exit node and the client: names of nodes of the [`World`].
    pub exit: &'a str,
    pub client: &'a str,
    /// The tunnel interface, on both nodes.
    pub iface: &'a str,
    /// The exit node's listen port.
    pub port: u16,
    /// The exit node's nftables table holding the masquerade.
    pub nft_table: &'a str,
}

/// The tunnel's two key pairs: each private key's file (for `wg set`) and
/// the public key.
pub struct Keys {
    exit: (PathBuf, String),
    client: (PathBuf, String),
}

impl Keys {
    /// New key pairs, their private keys in `dir` as `<prefix>-exit.key`
    /// and `<prefix>-client.key`.
    pub fn generate(dir: &Path, prefix: &str) -> anyhow::Result<Self> {
        Ok(Keys {
            exit: wg_key(dir, &format!("{prefix}-exit"))?,
            client: wg_key(dir, &format!("{prefix}-client"))?,
        })
    }
}

/// A new WireGuard key pair: the private key's file and the public key.
fn wg_key(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, String)> {
    let out = Command::new("wg")
        .arg("genkey")
        .output()
        .context("wg genkey")?;
    if !out.status.success() {
        bail!("wg genkey failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let private = String::from_utf8(out.stdout)?.trim().to_owned();
    let path = dir.join(format!("{name}.key"));
    fs::write(&path, format!("{private}\n"))?;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("wg pubkey")?;
    child
        .stdin
        .take()
        .context("no stdin for wg pubkey")?
        .write_all(private.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("wg pubkey failed");
    }
    Ok((path, String::from_utf8(out.stdout)?.trim().to_owned()))
}

/// One node's end of the tunnel.
struct End {
    ns: Netns,
    /// With wireguard-go: the node's mount namespace holder, where its
    /// process and `wg` run.
    holder: Option<u32>,
}

impl End {
    /// Runs `wg <args>` where it reaches this end's interface.
    fn wg(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut v = vec!["wg"];
        v.extend_from_slice(args);
        match self.holder {
            None => self.ns.exec(&v),
            Some(holder) => nsenter(holder, &v),
        }
    }
}

/// Runs `args` in the network and mount namespaces of process `pid`; fails
/// unless it exits 0.
fn nsenter(pid: u32, args: &[&str]) -> anyhow::Result<String> {
    let p = pid.to_string();
    let mut c = Command::new("nsenter");
    c.args(["-t", &p, "-m", "-n", "--"]).args(args);
    let out = output_with_timeout(&mut c, Duration::from_secs(20))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The tunnel while it lives; dropping it stops wireguard-go, removes what
/// was configured and restores the sysctls, so a nexd round after it starts
/// from the state nexd's own rounds start from. (The namespaces, and so all
/// of this, also go when the test's World drops, on failure too.)
pub struct HandTunnel {
    iface: String,
    nft_table: String,
    exit: End,
    client: End,
    /// wireguard-go's processes (none on kernel WireGuard).
    procs: Vec<Child>,
    forwarding_was: String,
    valid_mark_was: String,
}

impl HandTunnel {
    /// Configures the tunnel between `spec.exit` and `spec.client`, logs of
    /// wireguard-go going to `dir`. Nothing waits for traffic to pass.
    pub fn start(w: &mut World, spec: &Spec, keys: &Keys, dir: &Path) -> anyhow::Result<Self> {
        let holder = |w: &mut World, name: &str| -> anyhow::Result<Option<u32>> {
            match spec.backend {
                Backend::Kernel => Ok(None),
                Backend::WireguardGo => w.node_mut(name).holder_pid().map(Some),
            }
        };
        let exit = End {
            holder: holder(w, spec.exit)?,
            ns: Netns::attach(w.node(spec.exit).ns.name())?,
        };
        let client = End {
            holder: holder(w, spec.client)?,
            ns: Netns::attach(w.node(spec.client).ns.name())?,
        };
        let forwarding_was = exit.ns.exec(&["sysctl", "-n", "net.ipv4.ip_forward"])?;
        let valid_mark_was =
            client
                .ns
                .exec(&["sysctl", "-n", "net.ipv4.conf.all.src_valid_mark"])?;
        let mut me = HandTunnel {
            iface: spec.iface.to_owned(),
            nft_table: spec.nft_table.to_owned(),
            exit,
            client,
            procs: Vec::new(),
            forwarding_was: forwarding_was.trim().to_owned(),
            valid_mark_was: valid_mark_was.trim().to_owned(),
        };
        let endpoint = format!("{}:{}", w.underlay(spec.exit, false), spec.port);
        me.configure_exit(spec, keys, dir)?;
        me.configure_client(spec, keys, dir, &endpoint)?;
        Ok(me)
    }

    /// The wireguard-go processes (client and exit node), for their CPU
    /// time; none on kernel WireGuard.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Child::id).collect()
    }

    /// Creates the WireGuard interface of one end.
    fn create(&mut self, spec: &Spec, client: bool, dir: &Path) -> anyhow::Result<()> {
        let (end, name) = if client {
            (&self.client, "client")
        } else {
            (&self.exit, "exit")
        };
        let iface = spec.iface;
        let Some(holder) = end.holder else {
            end.ns.ip(&format!("link add {iface} type wireguard"))?;
            return Ok(());
        };
        let log = fs::File::create(dir.join(format!("wireguard-go-{name}.log")))?;
        let h = holder.to_string();
        let child = Command::new("nsenter")
            .args(["-t", &h, "-m", "-n", "--", "wireguard-go", "-f", iface])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting wireguard-go")?;
        self.procs.push(child);
        let deadline = Instant::now() + WIREGUARD_GO_UP;
        while nsenter(holder, &["wg", "show", iface]).is_err() {
            if Instant::now() > deadline {
                bail!("wireguard-go did not come up in the {name} namespace");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The exit node: its end of the tunnel, the route back to the client,
    /// forwarding and a masquerade out of its uplink.
    fn configure_exit(&mut self, spec: &Spec, keys: &Keys, dir: &Path) -> anyhow::Result<()> {
        self.create(spec, false, dir)?;
        let iface = spec.iface;
        let ex = &self.exit;
        ex.wg(&[
            "set",
            iface,
            "private-key",
            &keys.exit.0.to_string_lossy(),
            "listen-port",
            &spec.port.to_string(),
            "peer",
            &keys.client.1,
            "allowed-ips",
            &format!("{CLIENT_IP}/32"),
        ])?;
        ex.ns.ip(&format!("addr add {EXIT_IP}/32 dev {iface}"))?;
        ex.ns.ip(&format!("link set {iface} mtu {MTU} up"))?;
        ex.ns.ip(&format!("route add {CLIENT_IP}/32 dev {iface}"))?;
        ex.ns.sysctl("net.ipv4.ip_forward", "1")?;
        nft_script(
            &ex.ns,
            &format!(
                "table ip {} {{\n chain post {{\n  type nat hook postrouting priority srcnat; policy accept;\n  ip saddr 100.64.99.0/24 oifname \"eth0\" masquerade\n }}\n}}\n",
                spec.nft_table
            ),
        )
    }

    /// The client, as wg-quick sets up a full tunnel (see the module doc).
    fn configure_client(
        &mut self,
        spec: &Spec,
        keys: &Keys,
        dir: &Path,
        endpoint: &str,
    ) -> anyhow::Result<()> {
        self.create(spec, true, dir)?;
        let iface = spec.iface;
        let cl = &self.client;
        cl.wg(&[
            "set",
            iface,
            "private-key",
            &keys.client.0.to_string_lossy(),
            "fwmark",
            &MARK.to_string(),
            "peer",
            &keys.exit.1,
            "endpoint",
            endpoint,
            "allowed-ips",
            "0.0.0.0/0",
        ])?;
        cl.ns.ip(&format!("addr add {CLIENT_IP}/32 dev {iface}"))?;
        cl.ns.ip(&format!("link set {iface} mtu {MTU} up"))?;
        cl.ns
            .ip(&format!("route add default dev {iface} table {MARK}"))?;
        cl.ns.ip(&format!(
            "rule add not fwmark {MARK} table {MARK} pref {}",
            RULE_PRIORITIES[1]
        ))?;
        cl.ns.ip(&format!(
            "rule add table main suppress_prefixlength 0 pref {}",
            RULE_PRIORITIES[0]
        ))?;
        cl.ns.sysctl("net.ipv4.conf.all.src_valid_mark", "1")
    }
}

impl Drop for HandTunnel {
    fn drop(&mut self) {
        for p in &self.procs {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for p in &mut self.procs {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(p.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.kill();
            let _ = p.wait();
        }
        let client = &self.client.ns;
        let exit = &self.exit.ns;
        for pref in RULE_PRIORITIES {
            let _ = client.ip(&format!("rule del pref {pref}"));
        }
        let _ = client.ip(&format!("route flush table {MARK}"));
        let _ = client.sysctl("net.ipv4.conf.all.src_valid_mark", &self.valid_mark_was);
        let _ = exit.exec(&["nft", "delete", "table", "ip", &self.nft_table]);
        let _ = exit.sysctl("net.ipv4.ip_forward", &self.forwarding_was);
        for ns in [client, exit] {
            let _ = ns.ip(&format!("link del {}", self.iface));
        }
    }
}
