//! Building blocks of test networks: a switch (a bridge in a namespace of
//! its own) that nodes plug into, and the mesh file that describes them.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::netns::{Netns, veth};

/// An L2 segment: a bridge inside its own namespace.
pub struct Switch {
    pub ns: Netns,
    ports: u32,
}

impl Switch {
    pub fn new(label: &str) -> anyhow::Result<Self> {
        Self::in_netns(Netns::new(label)?)
    }

    /// A switch inside the given (fresh) namespace.
    pub fn in_netns(ns: Netns) -> anyhow::Result<Self> {
        ns.ip("link add br0 type bridge")?;
        ns.ip("link set br0 up")?;
        Ok(Switch { ns, ports: 0 })
    }

    /// Plugs `ns` into the switch through a veth called `ifname` there, and
    /// gives it the addresses `addrs` (CIDR notation).
    pub fn attach(&mut self, ns: &Netns, ifname: &str, addrs: &[&str]) -> anyhow::Result<()> {
        self.ports += 1;
        let port = format!("p{}", self.ports);
        veth(&self.ns, &port, ns, ifname)?;
        self.ns.ip(&format!("link set {port} master br0"))?;
        for a in addrs {
            if a.contains(':') {
                ns.ip(&format!("addr add {a} dev {ifname} nodad"))?;
            } else {
                ns.ip(&format!("addr add {a} dev {ifname}"))?;
            }
        }
        Ok(())
    }
}

/// One `[[device]]` of a mesh file.
#[derive(Debug, Clone)]
pub struct MeshDevice {
    pub name: String,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub ipv4: String,
    pub ipv6: String,
}

/// Mesh IPv6 prefix used by the tests and the lab.
pub const MESH_V6_PREFIX: &str = "fd6e:6578:6400::/48";

/// Renders a mesh file for `devices` with the default prefixes, in which
/// every device may serve as exit node (`exit_node = true`): most tests
/// choose the roles by how they start nexd. Tests of the authorization
/// itself use [`mesh_toml_with_exits`].
pub fn mesh_toml(devices: &[MeshDevice]) -> String {
    mesh_toml_with_exits(devices, None)
}

/// An exit node as the mesh file names it: `exit_node = true` and, if
/// `clients` is given, `exit_clients = [...]`.
#[derive(Debug, Clone, Copy)]
pub struct ExitRole<'a> {
    pub name: &'a str,
    pub clients: Option<&'a [&'a str]>,
}

/// Renders a mesh file for `devices` where only `exits` may serve as exit
/// node (with their `exit_clients`), or every device if `exits` is `None`.
pub fn mesh_toml_with_exits(devices: &[MeshDevice], exits: Option<&[ExitRole<'_>]>) -> String {
    let mut s = format!(
        "# written by nexd's test toolkit\n[mesh]\nipv4_prefix = \"100.64.0.0/10\"\nipv6_prefix = \"{MESH_V6_PREFIX}\"\n"
    );
    for d in devices {
        let _ = write!(
            s,
            "\n[[device]]\nname = \"{}\"\npublic_key = \"{}\"\n",
            d.name, d.public_key
        );
        if let Some(ep) = &d.endpoint {
            let _ = writeln!(s, "endpoint = \"{ep}\"");
        }
        let _ = write!(s, "ipv4 = \"{}\"\nipv6 = \"{}\"\n", d.ipv4, d.ipv6);
        let role = exits.map(|roles| roles.iter().find(|r| r.name == d.name));
        match role {
            None => s.push_str("exit_node = true\n"),
            Some(None) => {}
            Some(Some(r)) => {
                s.push_str("exit_node = true\n");
                if let Some(clients) = r.clients {
                    let list: Vec<String> = clients.iter().map(|c| format!("\"{c}\"")).collect();
                    let _ = writeln!(s, "exit_clients = [{}]", list.join(", "));
                }
            }
        }
    }
    s
}

/// The "internet": a namespace on the switch that is every node's default
/// router and hosts the server addresses (TCP/UDP/ICMP all answered
/// there). Per-source nftables counters show who reached it.
pub struct Internet {
    pub ns: Netns,
}

/// Server addresses in the documentation ranges.
pub const SERVER_V4: &str = "203.0.113.10";
pub const SERVER_V6: &str = "2001:db8:203::10";
/// The router's addresses on the switch.
pub const ROUTER_V4: &str = "192.0.2.254";
pub const ROUTER_V6: &str = "2001:db8:1::fe";

impl Internet {
    /// Creates the namespace and plugs it into `sw`.
    pub fn new(sw: &mut Switch, label: &str) -> anyhow::Result<Self> {
        Self::in_netns(sw, Netns::new(label)?)
    }

    /// The same, in a namespace the caller made.
    pub fn in_netns(sw: &mut Switch, ns: Netns) -> anyhow::Result<Self> {
        sw.attach(
            &ns,
            "eth0",
            &[&format!("{ROUTER_V4}/24"), &format!("{ROUTER_V6}/64")],
        )?;
        ns.ip(&format!("addr add {SERVER_V4}/32 dev lo"))?;
        ns.ip(&format!("addr add {SERVER_V6}/128 dev lo nodad"))?;
        crate::cmd::run(
            "ip",
            ["netns", "exec", ns.name(), "nft", "add table inet watch"],
        )?;
        Ok(Internet { ns })
    }

    /// Counts, from now on, packets from `src` (an underlay address) to the
    /// server, under counter `name`; ICMP echo requests also under
    /// `<name>_icmp`.
    pub fn watch(&self, name: &str, src: &str) -> anyhow::Result<()> {
        let (fam, server, icmp) = if src.contains(':') {
            ("ip6", SERVER_V6, "icmpv6 type echo-request")
        } else {
            ("ip", SERVER_V4, "icmp type echo-request")
        };
        let script = format!(
            "add counter inet watch {name}\n\
             add counter inet watch {name}_icmp\n\
             add chain inet watch input {{ type filter hook input priority -10; policy accept; }}\n\
             add rule inet watch input {fam} saddr {src} {fam} daddr {server} counter name {name}\n\
             add rule inet watch input {fam} saddr {src} {fam} daddr {server} {icmp} counter name {name}_icmp\n"
        );
        nft_script(&self.ns, &script)
    }

    /// Packets counted under `name`.
    pub fn count(&self, name: &str) -> anyhow::Result<u64> {
        nft_counter(&self.ns, "inet", "watch", name)
    }
}

/// Runs an nft script inside `ns`.
pub fn nft_script(ns: &Netns, script: &str) -> anyhow::Result<()> {
    let path =
        std::env::temp_dir().join(format!("nexd-nft-{}-{}.nft", std::process::id(), ns.name()));
    std::fs::write(&path, script)?;
    let r = ns.exec(&["nft", "-f", path.to_str().unwrap_or_default()]);
    let _ = std::fs::remove_file(&path);
    r.map(|_| ())
}

/// Reads the packet count of a named nftables counter inside `ns`.
pub fn nft_counter(ns: &Netns, family: &str, table: &str, name: &str) -> anyhow::Result<u64> {
    let out = ns.exec(&["nft", "-j", "list", "counter", family, table, name])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|e| e["counter"]["packets"].as_u64()))
        .ok_or_else(|| anyhow::anyhow!("no counter {name} in {out}"))
}

/// Counts, from now on, packets that `ns` forwards to `to` (v4 or v6) under
/// counter `name` in a test-owned table `inet probe`.
///
/// Used to prove a router forwarded nothing *for a given destination*: the
/// router's own catch-all counters also see stragglers of earlier flows (a
/// late FIN or ACK of a closed connection), which made "counter unchanged"
/// assertions flaky on slow machines.
pub fn count_forwarded_to(ns: &Netns, name: &str, to: IpAddr) -> anyhow::Result<()> {
    let fam = if to.is_ipv6() { "ip6" } else { "ip" };
    let script = format!(
        "add table inet probe\n\
         add counter inet probe {name}\n\
         add chain inet probe forward {{ type filter hook forward priority -10; policy accept; }}\n\
         add rule inet probe forward {fam} daddr {to} counter name {name}\n"
    );
    nft_script(ns, &script)
}

/// Packets counted by [`count_forwarded_to`] under `name`.
pub fn forwarded_to(ns: &Netns, name: &str) -> anyhow::Result<u64> {
    nft_counter(ns, "inet", "probe", name)
}

/// Removes the table [`count_forwarded_to`] created, so snapshots of the
/// namespace compare equal again.
pub fn remove_forward_probes(ns: &Netns) -> anyhow::Result<()> {
    ns.exec(&["nft", "delete", "table", "inet", "probe"])
        .map(|_| ())
}
