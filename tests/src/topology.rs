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
    /// gives it the addresses `addrs` (CIDR notation). Returns the switch's
    /// port name (for watching what that device sends).
    pub fn attach(&mut self, ns: &Netns, ifname: &str, addrs: &[&str]) -> anyhow::Result<String> {
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
        Ok(port)
    }
}

/// The LAN behind a gateway, as the tests, the lab and the benchmarks
/// build it: `lan` plugged into `gateway` (its `lan0`, 10.99.0.1/24 and
/// fd99::1/64) as host 10.99.0.2 / fd99::2 with the gateway as its router,
/// and the gateway's own NAT of its LAN to its uplink `eth0` (a home
/// router's usual setup, not nexd's business).
pub fn lan_behind(gateway: &Netns, lan: &Netns) -> anyhow::Result<()> {
    veth(gateway, "lan0", lan, "eth0")?;
    gateway.ip("addr add 10.99.0.1/24 dev lan0")?;
    gateway.ip("addr add fd99::1/64 dev lan0 nodad")?;
    lan.ip("addr add 10.99.0.2/24 dev eth0")?;
    lan.ip("addr add fd99::2/64 dev eth0 nodad")?;
    lan.ip("route add default via 10.99.0.1")?;
    lan.ip("-6 route add default via fd99::1")?;
    nft_script(
        gateway,
        "table inet homenat {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n  iifname \"lan0\" oifname \"eth0\" masquerade\n }\n}\n",
    )
}

/// The LAN host's IPv4 address in `lan_behind`.
pub const LAN_HOST_V4: &str = "10.99.0.2";

/// Counts every frame a device sends into the switch on `port` that is not
/// allowed out of a guarded uplink: what the kill switch promises to
/// stop. Let through uncounted: ARP, WireGuard's UDP (port `wg_port`, to
/// the endpoints on the switch), neighbour and router discovery, multicast
/// listener reports, DHCP.
pub struct LeakWatch {
    /// The switch's namespace (not owned: the switch removes it).
    ns: Netns,
    table: String,
}

impl LeakWatch {
    /// Starts counting now, in the switch's namespace.
    pub fn start(sw: &Switch, port: &str, wg_port: u16) -> anyhow::Result<Self> {
        let table = format!("leak_{port}");
        let script = format!(
            "table bridge {table} {{\n\
             \x20 counter leaked {{ }}\n\
             \x20 chain watch {{\n\
             \x20   type filter hook forward priority 0; policy accept;\n\
             \x20   iifname != \"{port}\" return\n\
             \x20   ether type arp return\n\
             \x20   meta l4proto udp th dport {wg_port} return\n\
             \x20   icmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report }} return\n\
             \x20   ip6 daddr ff02::/16 ip6 hoplimit 1 return\n\
             \x20   meta l4proto udp th dport {{ 67, 547 }} return\n\
             \x20   counter name leaked\n\
             \x20 }}\n\
             }}\n"
        );
        nft_script(&sw.ns, &script)?;
        Ok(LeakWatch {
            ns: Netns::attach(sw.ns.name())?,
            table,
        })
    }

    /// Frames counted as leaked so far.
    pub fn leaked(&self) -> anyhow::Result<u64> {
        nft_counter(&self.ns, "bridge", &self.table, "leaked")
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

/// Gives `ns` an address of its own on an interface `ifname`: a service
/// only that host answers, like a cloud VM's metadata service at
/// 169.254.169.254 (`addr` with its prefix, e.g. "169.254.169.254/32").
/// An exit node must not let its clients reach it.
///
/// The interface is one end of a veth pair whose other end (`<ifname>p`)
/// stays in `ns` too: not every kernel the tests run on has the `dummy`
/// driver, and an unconnected veth end behaves the same for a local
/// address (the other end is up, so the link is up).
pub fn local_service_address(ns: &Netns, ifname: &str, addr: &str) -> anyhow::Result<()> {
    let peer = format!("{ifname}p");
    if peer.len() > 15 {
        anyhow::bail!("interface names are limited to 15 characters: {peer}");
    }
    ns.ip(&format!("link add {ifname} type veth peer name {peer}"))?;
    ns.ip(&format!("link set {peer} up"))?;
    ns.ip(&format!("addr add {addr} dev {ifname}"))?;
    ns.ip(&format!("link set {ifname} up")).map(|_| ())
}

/// Makes the router `ns` drop, and count under `pmtu_dropped` in table
/// `inet pmtu`, every ICMP "fragmentation needed" and ICMPv6 "packet too
/// big" it would send or forward, as networks that filter ICMP do: path
/// MTU discovery then fails across a smaller link, and only MSS clamping
/// lets large TCP transfers through.
pub fn drop_pmtu_signals(ns: &Netns) -> anyhow::Result<()> {
    let rules = "  icmp type destination-unreachable icmp code frag-needed counter name \"pmtu_dropped\" drop\n\
                 \x20 icmpv6 type packet-too-big counter name \"pmtu_dropped\" drop\n";
    nft_script(
        ns,
        &format!(
            "table inet pmtu {{\n counter pmtu_dropped {{ }}\n\
             \x20chain output {{ type filter hook output priority filter; policy accept;\n{rules} }}\n\
             \x20chain forward {{ type filter hook forward priority filter; policy accept;\n{rules} }}\n}}\n"
        ),
    )
}

/// ICMP path-MTU signals [`drop_pmtu_signals`] dropped in `ns`.
pub fn pmtu_signals_dropped(ns: &Netns) -> anyhow::Result<u64> {
    nft_counter(ns, "inet", "pmtu", "pmtu_dropped")
}
