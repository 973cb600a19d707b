//! Building blocks of test networks: a switch (a bridge in a namespace of
//! its own) that nodes plug into, and the mesh file that describes them.

use std::fmt::Write as _;

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

/// Renders a mesh file for `devices` with the default prefixes.
pub fn mesh_toml(devices: &[MeshDevice]) -> String {
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
    }
    s
}
