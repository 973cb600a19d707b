//! Where the registry is: `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`, and the
//! etcd key layout under the prefix.
//!
//! ```text
//! PREFIX/settings            signed mesh settings (prefixes, MTU, keepalive, agent port)
//! PREFIX/devices/<id>        signed device record (name, key, addresses, roles, serial)
//! PREFIX/revoked/<id>        signed revocation (the serial it revokes and all below)
//! PREFIX/requests/<id>       join request, unsigned, under the device's lease
//! PREFIX/endpoints/<id>      the device's underlay endpoint, unsigned, under its lease
//! PREFIX/alloc/v4/<address>  address taken (value: <id>), for compare-and-swap allocation
//! PREFIX/alloc/v6/<address>
//! PREFIX/serial              the last serial handed out (a decimal number)
//! PREFIX/snapshot            signed by the snapshot key: the serials in force, until when
//! ```
//!
//! `<id>` is the device's WireGuard public key in URL-safe base64 without
//! padding (standard base64 has `/`, which would read as a path level).

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::keys::PublicKey;

/// A parsed `--registry` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    /// `host:port` of each etcd member (IPv6 in brackets).
    pub endpoints: Vec<String>,
    /// Key prefix: starts with `/`, no trailing `/`.
    pub prefix: String,
}

impl FromStr for RegistryUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("etcd://").ok_or_else(|| {
            format!(
                "{s:?} is not etcd://HOST:PORT[,HOST:PORT...]/PREFIX (it must start with etcd://)"
            )
        })?;
        let (hosts, prefix) = rest.split_once('/').ok_or_else(|| {
            format!("{s:?} has no key prefix; write it after the members: etcd://HOST:PORT/nexd")
        })?;
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(format!(
                "{s:?} has an empty key prefix; name one, e.g. etcd://HOST:PORT/nexd"
            ));
        }
        if prefix.split('/').any(str::is_empty) {
            return Err(format!(
                "{s:?}: the key prefix {prefix:?} has an empty path level"
            ));
        }
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            endpoints.push(check_member(h).map_err(|m| format!("{s:?}: member {h:?} {m}"))?);
        }
        Ok(RegistryUrl {
            endpoints,
            prefix: format!("/{prefix}"),
        })
    }
}

fn check_member(h: &str) -> Result<String, &'static str> {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        let (v6, port) = rest.split_once("]:").ok_or("is not [IPV6]:PORT")?;
        v6.parse::<Ipv6Addr>()
            .map_err(|_| "has an invalid IPv6 address")?;
        (v6, port)
    } else {
        h.rsplit_once(':').ok_or("is not HOST:PORT")?
    };
    if host.is_empty() || host.contains(':') && !h.starts_with('[') {
        return Err("is not HOST:PORT (IPv6 addresses go in brackets)");
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(h.to_owned()),
        _ => Err("has no valid port (1 to 65535)"),
    }
}

impl fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd://{}{}", self.endpoints.join(","), self.prefix)
    }
}

/// The etcd keys of one mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

/// What an etcd key under the prefix is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Settings,
    Snapshot,
    Device(PublicKey),
    Revoked(PublicKey),
    Request(PublicKey),
    Endpoint(PublicKey),
    /// Allocation and serial bookkeeping: read by admins only.
    Bookkeeping,
    /// Anything else under the prefix (a device id that is not a key, an
    /// unknown folder): ignored and counted.
    Unknown,
}

impl Layout {
    /// `prefix` as `RegistryUrl` holds it (leading `/`, no trailing `/`).
    pub fn new(prefix: &str) -> Self {
        Layout {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every key of this mesh starts with this (the trailing `/` keeps
    /// `/nexd2` out of `/nexd`).
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn settings(&self) -> String {
        format!("{}/settings", self.prefix)
    }

    pub fn device(&self, k: &PublicKey) -> String {
        format!("{}/devices/{}", self.prefix, key_id(k))
    }

    pub fn devices(&self) -> String {
        format!("{}/devices/", self.prefix)
    }

    pub fn revoked(&self, k: &PublicKey) -> String {
        format!("{}/revoked/{}", self.prefix, key_id(k))
    }

    pub fn request(&self, k: &PublicKey) -> String {
        format!("{}/requests/{}", self.prefix, key_id(k))
    }

    pub fn endpoint(&self, k: &PublicKey) -> String {
        format!("{}/endpoints/{}", self.prefix, key_id(k))
    }

    pub fn alloc_v4(&self, ip: Ipv4Addr) -> String {
        format!("{}/alloc/v4/{ip}", self.prefix)
    }

    pub fn alloc_v6(&self, ip: Ipv6Addr) -> String {
        format!("{}/alloc/v6/{ip}", self.prefix)
    }

    pub fn serial(&self) -> String {
        format!("{}/serial", self.prefix)
    }

    pub fn snapshot(&self) -> String {
        format!("{}/snapshot", self.prefix)
    }

    /// What `key` is; `None` when it is not under this prefix at all.
    pub fn classify(&self, key: &str) -> Option<Entry> {
        let rest = key.strip_prefix(&self.all())?;
        let keyed = |id: &str, f: fn(PublicKey) -> Entry| match parse_key_id(id) {
            Some(k) => f(k),
            None => Entry::Unknown,
        };
        Some(match rest.split_once('/') {
            None if rest == "settings" => Entry::Settings,
            None if rest == "snapshot" => Entry::Snapshot,
            None if rest == "serial" => Entry::Bookkeeping,
            Some(("devices", id)) => keyed(id, Entry::Device),
            Some(("revoked", id)) => keyed(id, Entry::Revoked),
            Some(("requests", id)) => keyed(id, Entry::Request),
            Some(("endpoints", id)) => keyed(id, Entry::Endpoint),
            Some(("alloc", a)) => match a.split_once('/') {
                Some(("v4", ip)) if ip.parse::<Ipv4Addr>().is_ok() => Entry::Bookkeeping,
                Some(("v6", ip)) if ip.parse::<Ipv6Addr>().is_ok() => Entry::Bookkeeping,
                _ => Entry::Unknown,
            },
            _ => Entry::Unknown,
        })
    }
}

/// A device's id in etcd keys.
pub fn key_id(k: &PublicKey) -> String {
    URL_SAFE_NO_PAD.encode(k.0)
}

/// Whether `id` is a device id (the canonical spelling of a key).
pub fn is_key_id(id: &str) -> bool {
    parse_key_id(id).is_some()
}

pub fn parse_key_id(id: &str) -> Option<PublicKey> {
    let bytes = URL_SAFE_NO_PAD.decode(id).ok()?;
    let arr: [u8; 32] = bytes.as_slice().try_into().ok()?;
    // Only the canonical spelling: two ids must never name one key.
    (URL_SAFE_NO_PAD.encode(arr) == id).then_some(PublicKey(arr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    #[test]
    fn urls_parse_with_one_or_many_members() {
        let u: RegistryUrl = "etcd://198.51.100.1:2379/nexd".parse().expect("one");
        assert_eq!(u.endpoints, ["198.51.100.1:2379"]);
        assert_eq!(u.prefix, "/nexd");
        let u: RegistryUrl = "etcd://a.example:2379,[2001:db8::1]:2379,c:1/meshes/prod/"
            .parse()
            .expect("many");
        assert_eq!(u.endpoints.len(), 3);
        assert_eq!(u.prefix, "/meshes/prod");
        assert_eq!(
            u.to_string(),
            "etcd://a.example:2379,[2001:db8::1]:2379,c:1/meshes/prod"
        );
        for bad in [
            "http://a:1/x",
            "etcd://a:1",
            "etcd://a:1/",
            "etcd://a/x",
            "etcd://a:0/x",
            "etcd://2001:db8::1:2379/x",
            "etcd://a:1,/x",
            "etcd://a:1/x//y",
        ] {
            assert!(bad.parse::<RegistryUrl>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn keys_classify_back_to_what_they_are() {
        let l = Layout::new("/nexd");
        let k = PrivateKey::generate().public_key();
        assert_eq!(l.classify(&l.settings()), Some(Entry::Settings));
        assert_eq!(l.classify(&l.device(&k)), Some(Entry::Device(k)));
        assert_eq!(l.classify(&l.revoked(&k)), Some(Entry::Revoked(k)));
        assert_eq!(l.classify(&l.request(&k)), Some(Entry::Request(k)));
        assert_eq!(l.classify(&l.endpoint(&k)), Some(Entry::Endpoint(k)));
        assert_eq!(
            l.classify(&l.alloc_v4(Ipv4Addr::new(100, 64, 0, 1))),
            Some(Entry::Bookkeeping)
        );
        assert_eq!(l.classify(&l.serial()), Some(Entry::Bookkeeping));
        assert_eq!(l.classify(&l.snapshot()), Some(Entry::Snapshot));
        assert_eq!(l.classify("/nexd/devices/notakey"), Some(Entry::Unknown));
        assert_eq!(l.classify("/nexd/other"), Some(Entry::Unknown));
        assert_eq!(l.classify("/nexd/alloc/v4/junk"), Some(Entry::Unknown));
        assert_eq!(l.classify("/nexd2/settings"), None);
        assert!(!key_id(&k).contains('/'));
    }
}
