//! Reading and validating the mesh file (TOML).
//!
//! Every problem is reported with `file:line:column` and what is wrong, and
//! all problems of a file are reported at once so an operator fixes them in
//! one pass. The raw structs keep the span of every value for that purpose.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
    path::{Path, PathBuf},
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;
use toml::Spanned;

use super::{
    DEFAULT_AGENT_PORT, DEFAULT_IPV4_NET, DEFAULT_IPV6_NET, DEFAULT_KEEPALIVE, DEFAULT_LISTEN_PORT,
    DEFAULT_MTU, Device, Endpoint, Host, Mesh, rate,
};
use crate::keys::PublicKey;

/// One problem in the file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Why a mesh file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum MeshFileError {
    #[error("cannot read mesh file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", format_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn format_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = String::new();
    if problems.len() > 1 {
        out.push_str(&format!(
            "mesh file {} has {} problems:",
            path.display(),
            problems.len()
        ));
    }
    for (i, p) in problems.iter().enumerate() {
        if problems.len() > 1 {
            out.push_str("\n  ");
        } else if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "{}:{}:{}: {}",
            path.display(),
            p.line,
            p.column,
            p.message
        ));
    }
    out
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// Reads and validates the mesh file at `path`.
pub fn read(path: &Path) -> Result<Mesh, MeshFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| MeshFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|problems| MeshFileError::Invalid {
        path: path.to_owned(),
        problems,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    mesh: Option<RawMesh>,
    #[serde(default, rename = "device")]
    devices: Vec<Spanned<RawDevice>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMesh {
    ipv4_prefix: Option<Spanned<String>>,
    ipv6_prefix: Option<Spanned<String>>,
    persistent_keepalive: Option<Spanned<i64>>,
    mtu: Option<Spanned<i64>>,
    agent_port: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: Spanned<String>,
    public_key: Spanned<String>,
    endpoint: Option<Spanned<String>>,
    listen_port: Option<Spanned<i64>>,
    ipv4: Spanned<String>,
    ipv6: Spanned<String>,
    exit_node: Option<Spanned<bool>>,
    exit_clients: Option<Spanned<Vec<Spanned<String>>>>,
    exit_rate_limit: Option<Spanned<String>>,
}

/// Turns byte offsets into 1-based line and column.
struct Locator<'a> {
    text: &'a str,
}

impl Locator<'_> {
    fn at(&self, offset: usize, message: impl Into<String>) -> Problem {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(before.chars().count(), |nl| {
            before[nl + 1..].chars().count()
        }) + 1;
        Problem {
            line,
            column,
            message: message.into(),
        }
    }

    fn span(&self, span: Range<usize>, message: impl Into<String>) -> Problem {
        self.at(span.start, message)
    }
}

/// Parses and validates mesh file text. On error returns every problem found.
pub fn parse(text: &str) -> Result<Mesh, Vec<Problem>> {
    let loc = Locator { text };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let start = e.span().map_or(0, |s| s.start);
        vec![loc.at(start, e.message().trim().to_owned())]
    })?;
    let mut problems = Vec::new();

    let raw_mesh = raw.mesh.unwrap_or(RawMesh {
        ipv4_prefix: None,
        ipv6_prefix: None,
        persistent_keepalive: None,
        mtu: None,
        agent_port: None,
    });
    // On a bad prefix the default stands in, only so that the devices can
    // still be checked (and their problems reported in the same pass); the
    // file is rejected either way.
    let ipv4_prefix = match &raw_mesh.ipv4_prefix {
        None => DEFAULT_IPV4_NET,
        Some(s) => parse_v4_prefix(s.get_ref()).unwrap_or_else(|m| {
            problems.push(loc.span(s.span(), format!("mesh.ipv4_prefix: {m}")));
            DEFAULT_IPV4_NET
        }),
    };
    let ipv6_prefix = match &raw_mesh.ipv6_prefix {
        None => DEFAULT_IPV6_NET,
        Some(s) => parse_v6_prefix(s.get_ref()).unwrap_or_else(|m| {
            problems.push(loc.span(s.span(), format!("mesh.ipv6_prefix: {m}")));
            DEFAULT_IPV6_NET
        }),
    };
    let persistent_keepalive = match &raw_mesh.persistent_keepalive {
        None => DEFAULT_KEEPALIVE,
        Some(v) => u16::try_from(*v.get_ref()).unwrap_or_else(|_| {
            problems.push(loc.span(
                v.span(),
                format!(
                    "mesh.persistent_keepalive: {} is out of range (0 to 65535 seconds; 0 turns keepalives off)",
                    v.get_ref()
                ),
            ));
            DEFAULT_KEEPALIVE
        }),
    };
    let mtu = match &raw_mesh.mtu {
        None => DEFAULT_MTU,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(m) if (1280..=65535).contains(&m) => m,
            _ => {
                problems.push(loc.span(
                    v.span(),
                    format!(
                        "mesh.mtu: {} is out of range (1280, the IPv6 minimum, to 65535)",
                        v.get_ref()
                    ),
                ));
                DEFAULT_MTU
            }
        },
    };

    let agent_port = match &raw_mesh.agent_port {
        None => DEFAULT_AGENT_PORT,
        Some(v) => match u16::try_from(*v.get_ref()) {
            Ok(p) if p != 0 => p,
            _ => {
                problems.push(loc.span(
                    v.span(),
                    format!(
                        "mesh.agent_port: {} is not a port (1 to 65535)",
                        v.get_ref()
                    ),
                ));
                DEFAULT_AGENT_PORT
            }
        },
    };

    let mut devices = Vec::with_capacity(raw.devices.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut keys: HashMap<PublicKey, usize> = HashMap::new();
    let mut v4s: HashMap<Ipv4Addr, usize> = HashMap::new();
    let mut v6s: HashMap<Ipv6Addr, usize> = HashMap::new();
    let mut endpoints: HashMap<Endpoint, usize> = HashMap::new();
    // Every name in the file, for `exit_clients` (which may name a device
    // listed after the exit node).
    let all_names: HashSet<&str> = raw
        .devices
        .iter()
        .map(|d| d.get_ref().name.get_ref().as_str())
        .collect();

    for (index, spanned) in raw.devices.iter().enumerate() {
        let d = spanned.get_ref();
        let label = format!("device {:?}", d.name.get_ref());
        let before = problems.len();

        let name = d.name.get_ref().clone();
        if let Err(m) = check_name(&name) {
            problems.push(loc.span(d.name.span(), format!("{label}: name {m}")));
        } else if let Some(first) = names.insert(name.clone(), index) {
            problems.push(loc.span(
                d.name.span(),
                format!(
                    "duplicate device name {name:?} (first used by device #{})",
                    first + 1
                ),
            ));
        }

        let public_key = match d.public_key.get_ref().parse::<PublicKey>() {
            Ok(k) => {
                if let Some(first) = keys.insert(k, index) {
                    problems.push(loc.span(
                        d.public_key.span(),
                        format!(
                            "{label}: public_key is already used by device {:?}",
                            raw.devices[first].get_ref().name.get_ref()
                        ),
                    ));
                }
                Some(k)
            }
            Err(e) => {
                problems.push(loc.span(
                    d.public_key.span(),
                    format!("{label}: public_key is not a WireGuard public key ({e})"),
                ));
                None
            }
        };

        let endpoint = match &d.endpoint {
            None => None,
            Some(e) => match parse_endpoint(e.get_ref()) {
                Ok(ep) => {
                    if let Some(first) = endpoints.insert(ep.clone(), index) {
                        problems.push(loc.span(
                            e.span(),
                            format!(
                                "{label}: endpoint {ep} is already used by device {:?}",
                                raw.devices[first].get_ref().name.get_ref()
                            ),
                        ));
                    }
                    Some(ep)
                }
                Err(m) => {
                    problems.push(loc.span(e.span(), format!("{label}: endpoint {m}")));
                    None
                }
            },
        };

        let listen_port = match &d.listen_port {
            Some(p) => match u16::try_from(*p.get_ref()) {
                Ok(port) if port != 0 => port,
                _ => {
                    problems.push(loc.span(
                        p.span(),
                        format!(
                            "{label}: listen_port {} is not a port (1 to 65535)",
                            p.get_ref()
                        ),
                    ));
                    DEFAULT_LISTEN_PORT
                }
            },
            None => endpoint.as_ref().map_or(DEFAULT_LISTEN_PORT, |e| e.port),
        };

        let ipv4 = match d.ipv4.get_ref().parse::<Ipv4Addr>() {
            Ok(ip) => {
                if let Err(m) = check_v4_host(ip, ipv4_prefix) {
                    problems.push(loc.span(d.ipv4.span(), format!("{label}: ipv4 {ip} {m}")));
                } else if let Some(first) = v4s.insert(ip, index) {
                    problems.push(loc.span(
                        d.ipv4.span(),
                        format!(
                            "{label}: ipv4 {ip} is already used by device {:?}",
                            raw.devices[first].get_ref().name.get_ref()
                        ),
                    ));
                }
                ip
            }
            Err(_) => {
                problems.push(loc.span(
                    d.ipv4.span(),
                    format!(
                        "{label}: ipv4 {:?} is not an IPv4 address (write it without a prefix length)",
                        d.ipv4.get_ref()
                    ),
                ));
                Ipv4Addr::UNSPECIFIED
            }
        };

        let ipv6 = match d.ipv6.get_ref().parse::<Ipv6Addr>() {
            Ok(ip) => {
                if let Err(m) = check_v6_host(ip, ipv6_prefix) {
                    problems.push(loc.span(d.ipv6.span(), format!("{label}: ipv6 {ip} {m}")));
                } else if let Some(first) = v6s.insert(ip, index) {
                    problems.push(loc.span(
                        d.ipv6.span(),
                        format!(
                            "{label}: ipv6 {ip} is already used by device {:?}",
                            raw.devices[first].get_ref().name.get_ref()
                        ),
                    ));
                }
                ip
            }
            Err(_) => {
                problems.push(loc.span(
                    d.ipv6.span(),
                    format!(
                        "{label}: ipv6 {:?} is not an IPv6 address (write it without a prefix length)",
                        d.ipv6.get_ref()
                    ),
                ));
                Ipv6Addr::UNSPECIFIED
            }
        };

        let exit_node = d.exit_node.as_ref().is_some_and(|v| *v.get_ref());
        let exit_clients = d.exit_clients.as_ref().map(|list| {
            if !exit_node {
                problems.push(loc.span(
                    list.span(),
                    format!("{label}: exit_clients is only for exit nodes (add exit_node = true, or remove it)"),
                ));
            }
            let mut set = BTreeSet::new();
            for client in list.get_ref() {
                let n = client.get_ref();
                if !all_names.contains(n.as_str()) {
                    problems.push(loc.span(
                        client.span(),
                        format!("{label}: exit_clients names {n:?}, which is not a device of this file"),
                    ));
                } else if !set.insert(n.clone()) {
                    problems.push(loc.span(
                        client.span(),
                        format!("{label}: exit_clients lists {n:?} twice"),
                    ));
                }
            }
            set
        });

        let exit_rate_limit = d.exit_rate_limit.as_ref().and_then(|r| {
            rate::parse(r.get_ref())
                .map_err(|m| {
                    problems.push(loc.span(r.span(), format!("{label}: exit_rate_limit {m}")));
                })
                .ok()
        });

        if problems.len() == before
            && let Some(public_key) = public_key
        {
            devices.push(Device {
                name,
                public_key,
                endpoint,
                listen_port,
                ipv4,
                ipv6,
                exit_node,
                exit_clients,
                exit_rate_limit,
            });
        }
    }

    if problems.is_empty() {
        Ok(Mesh {
            ipv4_prefix,
            ipv6_prefix,
            persistent_keepalive,
            mtu,
            agent_port,
            devices,
        })
    } else {
        Err(problems)
    }
}

fn parse_v4_prefix(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 prefix like 100.64.0.0/10"))?;
    if net.trunc() != net {
        return Err(format!(
            "{s} has host bits set; the prefix is {}",
            net.trunc()
        ));
    }
    if net.prefix_len() > 30 {
        return Err(format!("{s} is too small for a mesh (at most /30)"));
    }
    Ok(net)
}

fn parse_v6_prefix(s: &str) -> Result<Ipv6Net, String> {
    let net: Ipv6Net = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv6 prefix like fd6e:6578:6400::/48"))?;
    if net.trunc() != net {
        return Err(format!(
            "{s} has host bits set; the prefix is {}",
            net.trunc()
        ));
    }
    const ULA: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7);
    if !ULA.contains(&net) {
        return Err(format!(
            "{s} is not a unique local (ULA, fc00::/7) prefix; mesh addresses must not be routable on the internet"
        ));
    }
    if net.prefix_len() > 126 {
        return Err(format!("{s} is too small for a mesh (at most /126)"));
    }
    Ok(net)
}

pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("{name:?} must be 1 to 63 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "{name:?} may only contain letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

pub(crate) fn check_v4_host(ip: Ipv4Addr, prefix: Ipv4Net) -> Result<(), String> {
    if !prefix.contains(&ip) {
        return Err(format!("is not inside the mesh prefix {prefix}"));
    }
    if ip == prefix.network() || ip == prefix.broadcast() {
        return Err(format!("is the network or broadcast address of {prefix}"));
    }
    Ok(())
}

pub(crate) fn check_v6_host(ip: Ipv6Addr, prefix: Ipv6Net) -> Result<(), String> {
    if !prefix.contains(&ip) {
        return Err(format!("is not inside the mesh prefix {prefix}"));
    }
    if ip == prefix.network() {
        return Err(format!("is the subnet-router anycast address of {prefix}"));
    }
    Ok(())
}

/// Parses `host:port`, `[v6]:port` or `name:port`.
pub(crate) fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        if sa.port() == 0 {
            return Err(format!("{s:?} has port 0"));
        }
        return Ok(Endpoint {
            host: Host::Ip(sa.ip()),
            port: sa.port(),
        });
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port (IPv6 as [addr]:port)"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?} has no valid port (1 to 65535)"))?;
    if host.contains(':') || host.starts_with('[') {
        return Err(format!(
            "{s:?} is not host:port (IPv6 addresses go in brackets: [2001:db8::1]:51820)"
        ));
    }
    if host.parse::<IpAddr>().is_ok() {
        return Err(format!("{s:?} is not a valid address"));
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid_name {
        return Err(format!(
            "{s:?}: {host:?} is neither an IP address nor a host name"
        ));
    }
    Ok(Endpoint {
        host: Host::Name(host.to_owned()),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn key() -> String {
        PrivateKey::generate().public_key().to_string()
    }

    fn device(name: &str, n: u8, key: &str) -> String {
        format!(
            "[[device]]\nname = \"{name}\"\npublic_key = \"{key}\"\nendpoint = \"192.0.2.{n}:51820\"\nipv4 = \"100.64.0.{n}\"\nipv6 = \"fd6e:6578:6400::{n}\"\n\n"
        )
    }

    #[test]
    fn minimal_file_uses_defaults() {
        let k = key();
        let mesh = parse(&device("a", 1, &k)).expect("valid");
        assert_eq!(
            mesh.ipv4_prefix.to_string(),
            super::super::DEFAULT_IPV4_PREFIX
        );
        assert_eq!(
            mesh.ipv6_prefix.to_string(),
            super::super::DEFAULT_IPV6_PREFIX
        );
        assert_eq!(mesh.mtu, DEFAULT_MTU);
        assert_eq!(mesh.persistent_keepalive, DEFAULT_KEEPALIVE);
        assert_eq!(mesh.devices.len(), 1);
        assert_eq!(mesh.devices[0].listen_port, 51820);
        assert_eq!(mesh.devices[0].public_key.to_string(), k);
    }

    #[test]
    fn full_file_is_read() {
        let text = format!(
            "[mesh]\nipv4_prefix = \"100.100.0.0/16\"\nipv6_prefix = \"fd00:1::/64\"\npersistent_keepalive = 10\nmtu = 1380\n\n\
             [[device]]\nname = \"a\"\npublic_key = \"{}\"\nendpoint = \"[2001:db8::1]:4000\"\nipv4 = \"100.100.0.1\"\nipv6 = \"fd00:1::1\"\n\n\
             [[device]]\nname = \"b\"\npublic_key = \"{}\"\nlisten_port = 5000\nipv4 = \"100.100.0.2\"\nipv6 = \"fd00:1::2\"\n",
            key(),
            key()
        );
        let mesh = parse(&text).expect("valid");
        assert_eq!(mesh.mtu, 1380);
        assert_eq!(mesh.persistent_keepalive, 10);
        assert_eq!(mesh.devices[0].listen_port, 4000);
        assert_eq!(
            mesh.devices[0].endpoint.as_ref().map(ToString::to_string),
            Some("[2001:db8::1]:4000".to_owned())
        );
        assert_eq!(mesh.devices[1].endpoint, None);
        assert_eq!(mesh.devices[1].listen_port, 5000);
    }

    #[test]
    fn host_names_are_allowed_as_endpoints() {
        let ep = parse_endpoint("exit-1.example.net:51820").expect("valid");
        assert_eq!(ep.host, Host::Name("exit-1.example.net".into()));
        assert!(parse_endpoint("2001:db8::1:51820").is_err());
        assert!(parse_endpoint("host:0").is_err());
        assert!(parse_endpoint("bad_name:1").is_err());
        assert!(parse_endpoint("nohost").is_err());
    }

    fn problems(text: &str) -> Vec<Problem> {
        parse(text).expect_err("must be rejected")
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let p = problems("[mesh]\nmtu = = 3\n");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line, 2);
    }

    #[test]
    fn unknown_key_is_rejected_where_it_is() {
        let text = format!("{}colour = \"red\"\n", device("a", 1, &key()));
        let p = problems(&text);
        assert_eq!(p.len(), 1);
        assert!(p[0].message.contains("colour"), "{:?}", p[0]);
        assert_eq!(p[0].line, 8, "{:?}", p[0]);
    }

    #[test]
    fn duplicate_toml_key_is_rejected() {
        let p = problems("[mesh]\nmtu = 1400\nmtu = 1300\n");
        assert_eq!(p[0].line, 3, "{:?}", p);
    }

    #[test]
    fn duplicates_and_ranges_are_each_reported_with_their_line() {
        let k = key();
        let text = format!(
            "{}{}{}",
            device("a", 1, &k),
            device("a", 2, &k),
            "[[device]]\nname = \"c\"\npublic_key = \"AAAA\"\nendpoint = \"192.0.2.1:51820\"\nipv4 = \"10.0.0.1\"\nipv6 = \"fd6e:6578:6400::1\"\n"
        );
        let p = problems(&text);
        let msgs: Vec<String> = p.iter().map(ToString::to_string).collect();
        let joined = msgs.join("\n");
        assert!(
            joined.contains("9:8: duplicate device name \"a\""),
            "{joined}"
        );
        assert!(
            joined.contains("10:14: device \"a\": public_key is already used by device \"a\""),
            "{joined}"
        );
        assert!(
            joined.contains("17:14: device \"c\": public_key is not a WireGuard public key"),
            "{joined}"
        );
        assert!(
            joined.contains("18:12: device \"c\": endpoint 192.0.2.1:51820 is already used"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "19:8: device \"c\": ipv4 10.0.0.1 is not inside the mesh prefix 100.64.0.0/10"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("20:8: device \"c\": ipv6 fd6e:6578:6400::1 is already used"),
            "{joined}"
        );
        assert_eq!(p.len(), 6, "{joined}");
    }

    #[test]
    fn bad_prefixes_are_rejected() {
        let p = problems(
            "[mesh]\nipv4_prefix = \"100.64.0.1/10\"\nipv6_prefix = \"2001:db8::/48\"\nmtu = 100\n",
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].message.contains("host bits"), "{p:?}");
        assert!(p[1].message.contains("ULA"), "{p:?}");
        assert!(p[2].message.contains("1280"), "{p:?}");
    }

    #[test]
    fn missing_field_is_reported() {
        let p = problems("[[device]]\nname = \"a\"\n");
        assert!(p[0].message.contains("missing field"), "{p:?}");
    }

    /// Devices "exit" (1), "a" (2) and "b" (3), with `extra` lines appended
    /// to the exit node's entry, and `b_extra` to b's.
    fn exit_file(extra: &str, b_extra: &str) -> String {
        format!(
            "{}{extra}\n{}{}{b_extra}\n",
            device("exit", 1, &key()),
            device("a", 2, &key()),
            device("b", 3, &key())
        )
    }

    #[test]
    fn exit_node_fields_are_read() {
        let mesh = parse(&exit_file(
            "exit_node = true\nexit_clients = [\"a\"]\n",
            "exit_rate_limit = \"200mbit\"\n",
        ))
        .expect("valid");
        let [exit, a, b] = &mesh.devices[..] else {
            panic!("three devices: {:?}", mesh.devices);
        };
        assert!(exit.exit_node);
        assert_eq!(exit.exit_clients, Some(BTreeSet::from(["a".to_owned()])));
        assert_eq!(exit.exit_rate_limit, None);
        assert!(!a.exit_node && a.exit_clients.is_none());
        assert_eq!(
            b.exit_rate_limit.map(|r| r.bits_per_second()),
            Some(200_000_000)
        );
        // Absent keys: not an exit node, no limit.
        let plain = parse(&exit_file("", "")).expect("valid");
        assert!(
            plain
                .devices
                .iter()
                .all(|d| !d.exit_node && d.exit_clients.is_none() && d.exit_rate_limit.is_none())
        );
        // An empty list serves nobody (and is not the same as absent).
        let none = parse(&exit_file("exit_node = true\nexit_clients = []\n", "")).expect("valid");
        assert_eq!(none.devices[0].exit_clients, Some(BTreeSet::new()));
    }

    #[test]
    fn exit_clients_may_name_a_later_device_and_itself() {
        let mesh = parse(&exit_file(
            "exit_node = true\nexit_clients = [\"b\", \"exit\"]\n",
            "",
        ))
        .expect("valid");
        assert_eq!(
            mesh.devices[0].exit_clients.as_ref().map(BTreeSet::len),
            Some(2)
        );
    }

    #[test]
    fn exit_problems_are_located() {
        // Line 8 is the exit node's first extra line, 25 b's.
        let p = problems(&exit_file(
            "exit_node = true\nexit_clients = [\"a\", \"nobody\", \"a\"]\n",
            "exit_rate_limit = \"200mbps\"\n",
        ));
        let joined = p
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            joined.contains("9:22: device \"exit\": exit_clients names \"nobody\", which is not a device of this file"),
            "{joined}"
        );
        assert!(
            joined.contains("9:32: device \"exit\": exit_clients lists \"a\" twice"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "25:19: device \"b\": exit_rate_limit \"200mbps\": unit \"mbps\" is ambiguous"
            ),
            "{joined}"
        );
        assert_eq!(p.len(), 3, "{joined}");

        let p = problems(&exit_file("exit_clients = [\"a\"]\n", ""));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].line, p[0].column), (8, 16), "{p:?}");
        assert!(p[0].message.contains("only for exit nodes"), "{p:?}");

        let p = problems(&exit_file("exit_node = \"yes\"\n", ""));
        assert_eq!(p[0].line, 8, "{p:?}");
        assert!(p[0].message.contains("bool"), "{p:?}");
    }

    #[test]
    fn default_prefixes_match_their_text() {
        assert_eq!(
            DEFAULT_IPV4_NET.to_string(),
            super::super::DEFAULT_IPV4_PREFIX
        );
        assert_eq!(
            DEFAULT_IPV6_NET.to_string(),
            super::super::DEFAULT_IPV6_PREFIX
        );
    }

    #[test]
    fn error_display_names_file_line_and_reason() {
        let err = MeshFileError::Invalid {
            path: PathBuf::from("/etc/nexd/mesh.toml"),
            problems: vec![Problem {
                line: 3,
                column: 9,
                message: "bad".into(),
            }],
        };
        assert_eq!(err.to_string(), "/etc/nexd/mesh.toml:3:9: bad");
    }
}
