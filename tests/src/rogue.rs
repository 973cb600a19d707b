//! A mesh member turned attacker: its nexd stopped, its own key used by a
//! stock wireguard-go configured by hand, as a malicious member would. It
//! can claim any AllowedIPs for its peers on its own side and route
//! anything into its tunnel; what the peers do with that is the test.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{Netns, cmd::output_with_timeout, world::World};

/// The rogue tunnel's interface.
pub const IFACE: &str = "rogue0";
/// Every node's WireGuard port in a [`World`]'s mesh file.
const PORT: u16 = 51820;

pub struct RogueMember {
    ns: Netns,
    holder: u32,
    child: Child,
}

impl RogueMember {
    /// Stops `name`'s nexd, if it runs, and brings up its key, port and mesh addresses
    /// on wireguard-go, with one peer, `peer`, whose AllowedIPs on this
    /// side are `allowed` (prefixes); each of them is also routed into
    /// the tunnel. wireguard-go logs to `dir`.
    pub fn start(
        w: &mut World,
        name: &str,
        peer: &str,
        allowed: &[String],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        if w.node(name).pid().is_some() {
            w.node_mut(name).stop()?;
        }
        let holder = w.node_mut(name).holder_pid()?;
        let key = w.node(name).state_dir().join("private.key");
        let peer_key = w
            .devices
            .iter()
            .find(|d| d.name == peer)
            .map(|d| d.public_key.clone())
            .with_context(|| format!("no device {peer}"))?;
        let log = std::fs::File::create(dir.join("wireguard-go-rogue.log"))?;
        let h = holder.to_string();
        let child = Command::new("nsenter")
            .args(["-t", &h, "-m", "-n", "--", "wireguard-go", "-f", IFACE])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting wireguard-go")?;
        let me = RogueMember {
            ns: Netns::attach(w.node(name).ns.name())?,
            holder,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while me.ns.ip(&format!("link show {IFACE}")).is_err() {
            if Instant::now() >= deadline {
                bail!("wireguard-go did not create {IFACE}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let endpoint = format!("{}:{PORT}", w.underlay(peer, false));
        me.wg(&[
            "set",
            IFACE,
            "private-key",
            key.to_str().context("key path")?,
            "listen-port",
            &PORT.to_string(),
            "peer",
            &peer_key,
            "endpoint",
            &endpoint,
            "persistent-keepalive",
            "1",
            "allowed-ips",
            &allowed.join(","),
        ])?;
        me.ns.ip(&format!(
            "addr add {}/32 dev {IFACE}",
            w.mesh_ip(name, false)
        ))?;
        me.ns.ip(&format!(
            "addr add {}/128 dev {IFACE} nodad",
            w.mesh_ip(name, true)
        ))?;
        me.ns.ip(&format!("link set {IFACE} mtu 1420 up"))?;
        for prefix in allowed {
            me.ns.ip(&format!("route replace {prefix} dev {IFACE}"))?;
        }
        Ok(me)
    }

    /// `wg show` of the rogue tunnel.
    pub fn show(&self) -> anyhow::Result<String> {
        self.wg(&["show", IFACE])
    }

    /// Runs `wg` on the rogue side (a malicious member does what it
    /// likes with its own WireGuard: forget sessions, re-handshake).
    pub fn wg(&self, args: &[&str]) -> anyhow::Result<String> {
        let p = self.holder.to_string();
        let mut c = Command::new("nsenter");
        c.args(["-t", &p, "-m", "-n", "--", "wg"]).args(args);
        let out = output_with_timeout(&mut c, Duration::from_secs(20))?;
        if !out.status.success() {
            bail!(
                "wg {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for RogueMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.ns.ip(&format!("link del {IFACE}"));
    }
}
