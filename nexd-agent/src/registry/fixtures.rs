//! Records for the registry's unit tests: one mesh's settings, and a
//! device at offset `n` of its prefixes.

use super::records::{DeviceRecord, Roles, Settings};
use crate::keys::PrivateKey;

/// The default prefixes, MTU 1420, keepalive 25, agent port 51829,
/// serial 1, no snapshot key.
pub fn settings() -> Settings {
    Settings {
        ipv4_prefix: "100.64.0.0/10".parse().expect("v4"),
        ipv6_prefix: "fd6e:6578:6400::/48".parse().expect("v6"),
        mtu: 1420,
        persistent_keepalive: 25,
        agent_port: 51829,
        serial: 1,
        snapshots: None,
    }
}

/// A member named `name` with a fresh key, at 100.64.0.`n` and
/// fd6e:6578:6400::`n`, signed at `serial`.
pub fn device(name: &str, n: u8, serial: u64) -> DeviceRecord {
    DeviceRecord {
        name: name.into(),
        public_key: PrivateKey::generate().public_key(),
        ipv4: std::net::Ipv4Addr::new(100, 64, 0, n),
        ipv6: format!("fd6e:6578:6400::{n}").parse().expect("v6"),
        listen_port: 51820,
        endpoint: None,
        roles: Roles::default(),
        serial,
        after_revocation: None,
    }
}
