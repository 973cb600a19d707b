//! Mesh membership: the validated model of the mesh file.
//!
//! The file is declarative: it lists every device, and each agent finds
//! itself in it by its own public key. Everything else (peers, addresses,
//! routes) is derived from this model by the reconcile loop.

mod file;
pub mod rate;
mod render;

pub use file::{MeshFileError, Problem, parse, read};
pub(crate) use file::{check_name, check_v4_host, check_v6_host, parse_endpoint};
pub use rate::Rate;
pub use render::render;

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;

use crate::keys::PublicKey;

/// Default mesh IPv4 prefix: the shared address space of RFC 6598.
pub const DEFAULT_IPV4_PREFIX: &str = "100.64.0.0/10";
/// Default mesh IPv6 prefix: a ULA /48 ("nex" in the global ID). Operators
/// running several meshes that can see each other should pick their own.
pub const DEFAULT_IPV6_PREFIX: &str = "fd6e:6578:6400::/48";
/// [`DEFAULT_IPV4_PREFIX`] as a prefix, checked at compile time.
pub const DEFAULT_IPV4_NET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10);
/// [`DEFAULT_IPV6_PREFIX`] as a prefix, checked at compile time.
pub const DEFAULT_IPV6_NET: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0xfd6e, 0x6578, 0x6400, 0, 0, 0, 0, 0), 48);
/// Default persistent keepalive, seconds: below common NAT UDP timeouts.
pub const DEFAULT_KEEPALIVE: u16 = 25;
/// Default tunnel MTU: 1500 minus the worst-case WireGuard overhead over an
/// IPv6 underlay (40 IPv6 + 8 UDP + 32 WireGuard).
pub const DEFAULT_MTU: u32 = 1420;
/// Listen port for a device whose entry gives neither endpoint nor port.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// UDP port agents use for announcements inside the tunnel, on their mesh
/// addresses only.
pub const DEFAULT_AGENT_PORT: u16 = 51829;

/// The whole mesh as the file describes it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    pub ipv4_prefix: Ipv4Net,
    pub ipv6_prefix: Ipv6Net,
    /// Seconds between keepalives to each peer; 0 turns them off.
    pub persistent_keepalive: u16,
    pub mtu: u32,
    /// UDP port of the in-tunnel announcements (same on every device).
    pub agent_port: u16,
    pub devices: Vec<Device>,
    /// The `[[exit_group]]` tables, in file order.
    pub exit_groups: Vec<ExitGroup>,
}

/// One device of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub public_key: PublicKey,
    /// Where peers send to reach it; `None` for a device that only dials out
    /// (its peers learn its address when it first talks to them).
    pub endpoint: Option<Endpoint>,
    /// The UDP port the device listens on.
    pub listen_port: u16,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// `exit_node = true`: the device may serve as an exit node. Clients
    /// ignore exit announcements from devices without it.
    pub exit_node: bool,
    /// `exit_clients = [...]` on an exit node: the names of the devices it
    /// serves; `None` (the key absent) serves every device. Validated: every
    /// name is a device of the file.
    pub exit_clients: Option<BTreeSet<String>>,
    /// `exit_rate_limit`: the most this device may send, and receive,
    /// through an exit node (each direction on its own).
    pub exit_rate_limit: Option<Rate>,
    /// `exit_flow_limit`: flows (connection-tracking entries) this device
    /// may hold at once at an exit node; `None`: the exit node's default.
    pub exit_flow_limit: Option<u32>,
    /// `exit_new_flow_rate`: new flows per second this device may open
    /// through an exit node (bursts of twice as many); `None`: the
    /// default.
    pub exit_new_flow_rate: Option<u32>,
    /// `exit_capacity` on an exit node: how much it can forward (the
    /// operator's word). Clients spread over exit nodes in proportion to
    /// it and judge an exit node's load against it; what an exit node
    /// announces of its own capacity is believed only up to this
    /// (`exit::select::Load::believe`). `None`: its link speed, up to
    /// 1 Gbit/s.
    pub exit_capacity: Option<Rate>,
    /// `exit_group = "NAME"` (with `exit_group_sync_ipv4` and, for
    /// unicast VRRP, `exit_group_uplink_ipv4`): the exit group this exit
    /// node is a member of (issue 22). Validated: the group exists and the
    /// device is an exit node.
    pub exit_group: Option<GroupMember>,
}

/// A device's membership in an exit group, and its own addresses there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// The group's name (a `[[exit_group]]` of the same file).
    pub group: String,
    /// This member's address on the group's sync link, where conntrackd
    /// sends and receives the connection state.
    pub sync_ipv4: Ipv4Addr,
    /// This member's own address on the uplink segment: the source of its
    /// unicast VRRP adverts and where the other members send theirs. Required
    /// when the group uses unicast VRRP, unused otherwise.
    pub uplink_ipv4: Option<Ipv4Addr>,
}

/// `[[exit_group]]`: exit nodes that share one egress address on a shared
/// uplink segment, held by one of them at a time (VRRP, keepalived), with
/// their connection state synchronised (conntrackd), so a failover keeps
/// every flow's egress address and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitGroup {
    pub name: String,
    /// The shared egress address (and the prefix length it takes on the
    /// uplink; /32 when the file gives none): what the members SNAT their
    /// clients to, and what the VRRP master holds.
    pub egress_ipv4: Ipv4Net,
    /// The shared IPv6 egress address, if the group has one.
    pub egress_ipv6: Option<Ipv6Net>,
    /// The interface of the shared uplink segment, the same name on every
    /// member: where the egress address lives and VRRP speaks.
    pub uplink: String,
    /// The interface of the dedicated sync link.
    pub sync_interface: String,
    /// The VRRP virtual router id (1 to 255), unique among the groups.
    pub vrrp_id: u8,
    /// VRRPv3 advert interval in centiseconds (the protocol's unit);
    /// 10 (0.1 s) unless the file says otherwise.
    pub advert_centis: u16,
    /// Adverts to the other members' `uplink_ipv4` instead of multicast.
    pub unicast: bool,
}

/// The VRRP advert interval when the file gives none: 0.1 s, the interval
/// at which takeover took 0.33-0.40 s (docs/ARCHITECTURE.md, exit groups).
pub const DEFAULT_ADVERT_CENTIS: u16 = 10;

/// The range `exit_flow_limit` accepts: below 16 a device cannot browse;
/// above a million it is no bound (conntrack tables are smaller).
pub const FLOW_LIMIT_RANGE: std::ops::RangeInclusive<u32> = 16..=1_000_000;
/// The range `exit_new_flow_rate` accepts (new flows per second).
pub const NEW_FLOW_RATE_RANGE: std::ops::RangeInclusive<u32> = 1..=100_000;

/// A device's underlay address as written in the file. Names are resolved
/// when the peer is configured, so a DNS change is picked up on reload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: Host,
    pub port: u16,
}

/// The host part of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Device {
    /// The device's mesh addresses, IPv4 then IPv6: what a source check
    /// (announcements, the exit node's DNS) admits for it.
    pub fn mesh_addrs(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.ipv4), IpAddr::V6(self.ipv6)]
    }

    /// Whether this device, as exit node, serves the device named `name`
    /// (the caller rules out the device itself).
    fn serves_name(&self, name: &str) -> bool {
        self.exit_node
            && self
                .exit_clients
                .as_ref()
                .is_none_or(|clients| clients.contains(name))
    }
}

impl Mesh {
    /// The device with this public key, if the file lists it.
    pub fn device(&self, key: &PublicKey) -> Option<&Device> {
        self.devices.iter().find(|d| &d.public_key == key)
    }

    /// Whether the device with `key` may serve as an exit node at all.
    pub fn may_serve_exit(&self, key: &PublicKey) -> bool {
        self.device(key).is_some_and(|d| d.exit_node)
    }

    /// Whether `exit` serves `client` as exit node: both are devices of the
    /// mesh, they differ, `exit` may serve, and its `exit_clients` (if
    /// given) names `client`. What both sides check: a client before it
    /// believes an exit announcement, an exit node before it forwards.
    pub fn serves(&self, exit: &PublicKey, client: &PublicKey) -> bool {
        if exit == client {
            return false;
        }
        let (Some(e), Some(c)) = (self.device(exit), self.device(client)) else {
            return false;
        };
        e.serves_name(&c.name)
    }

    /// The exit nodes that serve `client`, in file order.
    pub fn exit_nodes_for<'a>(
        &'a self,
        client: &'a PublicKey,
    ) -> impl Iterator<Item = &'a Device> + 'a {
        let name = self.device(client).map(|d| d.name.as_str());
        self.devices
            .iter()
            .filter(move |e| &e.public_key != client && name.is_some_and(|n| e.serves_name(n)))
    }

    /// The devices `exit` serves, in file order (none if it may not serve):
    /// what the exit node's data path lets through.
    pub fn exit_clients_of<'a>(
        &'a self,
        exit: &'a PublicKey,
    ) -> impl Iterator<Item = &'a Device> + 'a {
        let e = self.device(exit);
        self.devices
            .iter()
            .filter(move |c| &c.public_key != exit && e.is_some_and(|e| e.serves_name(&c.name)))
    }

    /// The exit group of the device with `key`, if it is a member of one.
    pub fn group_of(&self, key: &PublicKey) -> Option<&ExitGroup> {
        let member = self.device(key)?.exit_group.as_ref()?;
        self.exit_group(&member.group)
    }

    /// The exit group called `name`.
    pub fn exit_group(&self, name: &str) -> Option<&ExitGroup> {
        self.exit_groups.iter().find(|g| g.name == name)
    }

    /// The members of the group called `name`, in file order: the first is
    /// the preferred holder of the egress address (highest VRRP priority).
    pub fn group_members<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Device> + 'a {
        self.devices
            .iter()
            .filter(move |d| d.exit_group.as_ref().is_some_and(|m| m.group == name))
    }

    /// Every device except the one with `own` key: the peers of that device.
    pub fn peers_of<'a>(&'a self, own: &'a PublicKey) -> impl Iterator<Item = &'a Device> + 'a {
        self.devices.iter().filter(move |d| &d.public_key != own)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    /// Devices e1 (exit for everyone), e2 (exit for "c1" only), e3 (exit
    /// serving nobody), n (not an exit node, even with clients that would
    /// want it), c1, c2.
    fn mesh() -> (Mesh, [PublicKey; 6]) {
        let keys: Vec<PublicKey> = (0..6)
            .map(|_| PrivateKey::generate().public_key())
            .collect();
        let extra = [
            "exit_node = true\n",
            "exit_node = true\nexit_clients = [\"c1\"]\n",
            "exit_node = true\nexit_clients = []\n",
            "exit_node = false\n",
            "",
            "",
        ];
        let names = ["e1", "e2", "e3", "n", "c1", "c2"];
        let text: String = (0..6)
            .map(|i| {
                format!(
                    "[[device]]\nname = \"{}\"\npublic_key = \"{}\"\nipv4 = \"100.64.0.{}\"\nipv6 = \"fd6e:6578:6400::{}\"\n{}\n",
                    names[i],
                    keys[i],
                    i + 1,
                    i + 1,
                    extra[i]
                )
            })
            .collect();
        let mesh = parse(&text).unwrap_or_else(|p| panic!("{p:?}"));
        (mesh, [keys[0], keys[1], keys[2], keys[3], keys[4], keys[5]])
    }

    fn names<'a>(it: impl Iterator<Item = &'a Device>) -> Vec<&'a str> {
        it.map(|d| d.name.as_str()).collect()
    }

    #[test]
    fn who_may_serve_whom() {
        let (m, [e1, e2, e3, n, c1, c2]) = mesh();
        let stranger = PrivateKey::generate().public_key();
        assert!(m.may_serve_exit(&e1) && m.may_serve_exit(&e2) && m.may_serve_exit(&e3));
        assert!(!m.may_serve_exit(&n) && !m.may_serve_exit(&c1));
        assert!(!m.may_serve_exit(&stranger));

        assert!(m.serves(&e1, &c1) && m.serves(&e1, &c2) && m.serves(&e1, &e2));
        assert!(m.serves(&e2, &c1) && !m.serves(&e2, &c2));
        assert!(!m.serves(&e3, &c1) && !m.serves(&e3, &c2));
        assert!(!m.serves(&n, &c1), "not an exit node");
        assert!(!m.serves(&e1, &e1), "nobody is its own exit node");
        assert!(!m.serves(&e1, &stranger) && !m.serves(&stranger, &c1));
    }

    #[test]
    fn exit_nodes_for_and_clients_of_agree_with_serves() {
        let (m, keys) = mesh();
        let [e1, e2, e3, n, c1, c2] = keys;
        assert_eq!(names(m.exit_nodes_for(&c1)), ["e1", "e2"]);
        assert_eq!(names(m.exit_nodes_for(&c2)), ["e1"]);
        assert_eq!(names(m.exit_nodes_for(&e1)), Vec::<&str>::new());
        assert_eq!(names(m.exit_nodes_for(&e2)), ["e1"]);
        assert_eq!(names(m.exit_clients_of(&e2)), ["c1"]);
        let dns_allowed: Vec<IpAddr> = m
            .exit_clients_of(&e2)
            .flat_map(Device::mesh_addrs)
            .collect();
        assert_eq!(
            dns_allowed,
            [
                "100.64.0.5".parse::<IpAddr>().expect("ip"),
                "fd6e:6578:6400::5".parse().expect("ip")
            ]
        );
        assert_eq!(names(m.exit_clients_of(&e3)), Vec::<&str>::new());
        assert_eq!(names(m.exit_clients_of(&n)), Vec::<&str>::new());
        assert_eq!(names(m.exit_clients_of(&e1)), ["e2", "e3", "n", "c1", "c2"]);
        for x in &keys {
            for y in &keys {
                assert_eq!(
                    m.exit_nodes_for(y).any(|d| d.public_key == *x),
                    m.serves(x, y)
                );
                assert_eq!(
                    m.exit_clients_of(x).any(|d| d.public_key == *y),
                    m.serves(x, y)
                );
            }
        }
    }
}
