//! Fixtures the unit tests of several modules share: a small mesh as a
//! mesh file would describe it, and every phase and configuration of the
//! exit-node client. Test builds only.

use crate::{
    exit::{Phase, plan::Policy},
    keys::PublicKey,
    mesh::{Device, Endpoint, Host, Mesh},
};

/// Device `i` (from 0) of a test mesh: called `d{i}`, at 100.64.0.{i+1}
/// and fd00::{i+1}, listening on and reachable at 192.0.2.{i+1}:51820,
/// and no exit node. Change what a test needs with struct update syntax.
pub fn device(i: usize, public_key: PublicKey) -> Device {
    let n = i + 1;
    Device {
        name: format!("d{i}"),
        public_key,
        endpoint: Some(Endpoint {
            host: Host::Ip(format!("192.0.2.{n}").parse().expect("ip")),
            port: 51820,
        }),
        listen_port: 51820,
        ipv4: format!("100.64.0.{n}").parse().expect("ip"),
        ipv6: format!("fd00::{n}").parse().expect("ip"),
        exit_node: false,
        exit_clients: None,
        exit_rate_limit: None,
        exit_flow_limit: None,
        exit_new_flow_rate: None,
        exit_capacity: None,
        exit_group: None,
    }
}

/// A mesh of `devices` in the prefixes of [`device`]'s addresses
/// (100.64.0.0/10, fd00::/64), with MTU 1420, keepalive 25 and agent
/// port 51829.
pub fn mesh(devices: impl IntoIterator<Item = Device>) -> Mesh {
    Mesh {
        ipv4_prefix: "100.64.0.0/10".parse().expect("v4"),
        ipv6_prefix: "fd00::/64".parse().expect("v6"),
        persistent_keepalive: 25,
        mtu: 1420,
        agent_port: 51829,
        devices: devices.into_iter().collect(),
        exit_groups: Vec::new(),
    }
}

/// Every phase an exit-node client's transition can start or end in,
/// with two exit nodes to move between.
pub fn phases(a: PublicKey, b: PublicKey) -> [Phase; 5] {
    [
        Phase::Off,
        Phase::Waiting,
        Phase::Active(a),
        Phase::Active(b),
        Phase::Held,
    ]
}

/// Every configuration an exit-node client can have.
pub fn policies() -> Vec<Policy> {
    let mut v = Vec::new();
    for kill_switch in [false, true] {
        for private_dns in [false, true] {
            v.push(Policy {
                kill_switch,
                private_dns,
            });
        }
    }
    v
}

/// An address in a test; a typo is the test's bug, so it panics.
pub fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("ip")
}

/// A prefix in a test.
pub fn net(s: &str) -> ipnet::IpNet {
    s.parse().expect("net")
}

/// An address and port in a test.
pub fn sock(s: &str) -> std::net::SocketAddr {
    s.parse().expect("address")
}
