//! A small internet for exit-node tests and the lab: one switch, one
//! "internet" namespace that routes for everyone and hosts the server, and
//! mesh devices whose underlays can all reach the server directly (so a
//! wrong path is visible in the source address the server sees).
//!
//! Device `i` (0-based) gets underlay 192.0.2.(i+1) / 2001:db8:1::(i+1)
//! and mesh 100.64.0.(i+1) / fd6e:6578:6400::(i+1).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::{
    Netns, Node,
    topology::{
        Internet, MeshDevice, ROUTER_V4, ROUTER_V6, SERVER_V4, SERVER_V6, Switch, mesh_toml,
    },
};

pub struct World {
    pub nodes: Vec<Node>,
    pub devices: Vec<MeshDevice>,
    pub inet: Internet,
    pub sw: Switch,
    /// Each node's port on the switch, in node order.
    pub ports: Vec<String>,
}

/// Where namespaces and files go: unique names for tests, fixed ones
/// (with a prefix and a base directory) for the lab.
pub enum Naming<'a> {
    Unique,
    Fixed { prefix: &'a str, dir: &'a Path },
}

impl World {
    /// Builds the switch, the internet and one node per name, with keys and
    /// the mesh file written to every node (nothing started yet).
    pub fn new(names: &[&str]) -> anyhow::Result<Self> {
        Self::build(names, &Naming::Unique)
    }

    pub fn build(names: &[&str], naming: &Naming<'_>) -> anyhow::Result<Self> {
        let (mut sw, inet_ns) = match naming {
            Naming::Unique => (Switch::new("sw")?, Netns::new("inet")?),
            Naming::Fixed { prefix, .. } => (
                Switch::in_netns(Netns::named(&format!("{prefix}switch"), "switch")?)?,
                Netns::named(&format!("{prefix}internet"), "internet")?,
            ),
        };
        let inet = Internet::in_netns(&mut sw, inet_ns)?;
        let mut nodes = Vec::new();
        let mut devices = Vec::new();
        let mut ports = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let n = i + 1;
            let node = match naming {
                Naming::Unique => Node::new(name)?,
                Naming::Fixed { prefix, dir } => {
                    Node::named(name, &format!("{prefix}{name}"), &dir.join(name))?
                }
            };
            ports.push(sw.attach(
                &node.ns,
                "eth0",
                &[&format!("192.0.2.{n}/24"), &format!("2001:db8:1::{n}/64")],
            )?);
            node.ns.ip(&format!("route add default via {ROUTER_V4}"))?;
            node.ns
                .ip(&format!("-6 route add default via {ROUTER_V6}"))?;
            devices.push(MeshDevice {
                name: (*name).to_owned(),
                public_key: node.keygen()?,
                endpoint: Some(format!("192.0.2.{n}:51820")),
                ipv4: format!("100.64.0.{n}"),
                ipv6: format!("fd6e:6578:6400::{n}"),
            });
            nodes.push(node);
        }
        let w = World {
            nodes,
            devices,
            inet,
            sw,
            ports,
        };
        w.write_mesh()?;
        Ok(w)
    }

    /// Writes the mesh file (all devices) to every node.
    pub fn write_mesh(&self) -> anyhow::Result<()> {
        let text = mesh_toml(&self.devices);
        for n in &self.nodes {
            n.write_mesh(&text)?;
        }
        Ok(())
    }

    fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// The switch port `name` is plugged into.
    pub fn port(&self, name: &str) -> anyhow::Result<&str> {
        Ok(&self.ports[self.index(name)?])
    }

    pub fn node(&self, name: &str) -> &Node {
        let i = self.index(name).unwrap_or_else(|e| panic!("{e}"));
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        let i = self.index(name).unwrap_or_else(|e| panic!("{e}"));
        &mut self.nodes[i]
    }

    /// The underlay address of `name`, IPv4 or IPv6.
    pub fn underlay(&self, name: &str, v6: bool) -> IpAddr {
        let n = self.index(name).map(|i| i + 1).unwrap_or_default();
        let s = if v6 {
            format!("2001:db8:1::{n}")
        } else {
            format!("192.0.2.{n}")
        };
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    /// The mesh address of `name`, IPv4 or IPv6.
    pub fn mesh_ip(&self, name: &str, v6: bool) -> IpAddr {
        let n = self.index(name).map(|i| i + 1).unwrap_or_default();
        let s = if v6 {
            format!("fd6e:6578:6400::{n}")
        } else {
            format!("100.64.0.{n}")
        };
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    /// The server address, IPv4 or IPv6.
    pub fn server(v6: bool) -> IpAddr {
        let s = if v6 { SERVER_V6 } else { SERVER_V4 };
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    /// Directory of node `name` (for the lab's printed commands).
    pub fn dir_of(&self, name: &str) -> PathBuf {
        self.node(name).dir().to_owned()
    }
}
