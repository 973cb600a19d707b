//! Reading and validating the mesh file (TOML).
//!
//! Every problem is reported with `file:line:column` and what is wrong, and
//! all problems of a file are reported at once so an operator fixes them in
//! one pass. The raw structs keep the span of every value for that purpose.

use std::{
    collections::{BTreeSet, HashMap, HashSet, hash_map::Entry},
    fmt,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;
use toml::Spanned;

use super::{
    DEFAULT_AGENT_PORT, DEFAULT_IPV4_NET, DEFAULT_IPV6_NET, DEFAULT_KEEPALIVE, DEFAULT_LISTEN_PORT,
    DEFAULT_MTU, Device, Endpoint, GroupMember, Host, Mesh, rate,
};
use crate::keys::PublicKey;

mod group;

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
    #[serde(default, rename = "exit_group")]
    exit_groups: Vec<Spanned<group::RawGroup>>,
}

#[derive(Deserialize, Default)]
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
    exit_flow_limit: Option<Spanned<i64>>,
    exit_new_flow_rate: Option<Spanned<i64>>,
    exit_capacity: Option<Spanned<String>>,
    exit_group: Option<Spanned<String>>,
    exit_group_sync_ipv4: Option<Spanned<String>>,
    exit_group_uplink_ipv4: Option<Spanned<String>>,
}

/// The problems of one file so far, each located by turning its byte offset
/// into a 1-based line and column.
struct Problems<'a> {
    text: &'a str,
    found: Vec<Problem>,
}

impl Problems<'_> {
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

    fn add(&mut self, span: Range<usize>, message: impl Into<String>) {
        let problem = self.at(span.start, message);
        self.found.push(problem);
    }
}

/// Parses and validates mesh file text. On error returns every problem found.
pub fn parse(text: &str) -> Result<Mesh, Vec<Problem>> {
    let mut problems = Problems {
        text,
        found: Vec::new(),
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let start = e.span().map_or(0, |s| s.start);
        vec![problems.at(start, e.message().trim().to_owned())]
    })?;

    // No `[mesh]` section: every setting takes its default.
    let settings = mesh_section(&raw.mesh.unwrap_or_default(), &mut problems);
    let roster = Roster::of(&raw.devices);
    let groups = group::groups(&raw.exit_groups, &settings, &mut problems);
    let mut claims = Claims::default();
    let devices: Vec<Device> = raw
        .devices
        .iter()
        .enumerate()
        .filter_map(|(index, d)| {
            let mut check = DeviceCheck {
                index,
                label: format!("device {:?}", d.get_ref().name.get_ref()),
                roster: &roster,
                groups: &groups,
                problems: &mut problems,
            };
            check.device(d.get_ref(), &settings, &mut claims)
        })
        .collect();
    group::members(&raw.exit_groups, &raw.devices, &mut problems);

    if problems.found.is_empty() {
        Ok(Mesh {
            ipv4_prefix: settings.ipv4_prefix,
            ipv6_prefix: settings.ipv6_prefix,
            persistent_keepalive: settings.persistent_keepalive,
            mtu: settings.mtu,
            agent_port: settings.agent_port,
            devices,
            exit_groups: groups.valid,
        })
    } else {
        Err(problems.found)
    }
}

/// The `[mesh]` section, validated.
struct Settings {
    ipv4_prefix: Ipv4Net,
    ipv6_prefix: Ipv6Net,
    persistent_keepalive: u16,
    mtu: u32,
    agent_port: u16,
}

fn mesh_section(raw: &RawMesh, problems: &mut Problems) -> Settings {
    Settings {
        ipv4_prefix: mesh_field(
            problems,
            "ipv4_prefix",
            &raw.ipv4_prefix,
            DEFAULT_IPV4_NET,
            |s| parse_v4_prefix(s),
        ),
        ipv6_prefix: mesh_field(
            problems,
            "ipv6_prefix",
            &raw.ipv6_prefix,
            DEFAULT_IPV6_NET,
            |s| parse_v6_prefix(s),
        ),
        persistent_keepalive: mesh_field(
            problems,
            "persistent_keepalive",
            &raw.persistent_keepalive,
            DEFAULT_KEEPALIVE,
            keepalive,
        ),
        mtu: mesh_field(problems, "mtu", &raw.mtu, DEFAULT_MTU, mtu),
        agent_port: mesh_field(
            problems,
            "agent_port",
            &raw.agent_port,
            DEFAULT_AGENT_PORT,
            port,
        ),
    }
}

/// One setting of `[mesh]`: `default` if absent; if bad, the problem is
/// reported and the default stands in all the same, only so that the
/// devices can still be checked (and their problems reported in the same
/// pass); the file is rejected either way.
fn mesh_field<R, T>(
    problems: &mut Problems,
    name: &str,
    value: &Option<Spanned<R>>,
    default: T,
    check: impl FnOnce(&R) -> Result<T, String>,
) -> T {
    let Some(value) = value else {
        return default;
    };
    check(value.get_ref()).unwrap_or_else(|m| {
        problems.add(value.span(), format!("mesh.{name}: {m}"));
        default
    })
}

fn keepalive(seconds: &i64) -> Result<u16, String> {
    u16::try_from(*seconds).map_err(|_| {
        format!("{seconds} is out of range (0 to 65535 seconds; 0 turns keepalives off)")
    })
}

fn mtu(mtu: &i64) -> Result<u32, String> {
    u32::try_from(*mtu)
        .ok()
        .filter(|m| (1280..=65535).contains(m))
        .ok_or_else(|| format!("{mtu} is out of range (1280, the IPv6 minimum, to 65535)"))
}

/// A whole number inside `range`; `what` says what it counts.
fn count_in(value: &i64, range: &std::ops::RangeInclusive<u32>, what: &str) -> Result<u32, String> {
    u32::try_from(*value)
        .ok()
        .filter(|v| range.contains(v))
        .ok_or_else(|| {
            format!(
                "{value} is out of range ({} to {} {what})",
                range.start(),
                range.end()
            )
        })
}

/// A UDP port nexd listens on: 0 (any port) is not one.
fn port(port: &i64) -> Result<u16, String> {
    u16::try_from(*port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port} is not a port (1 to 65535)"))
}

/// The devices' names in file order: for `exit_clients` (which may name a
/// device listed after the exit node) and to name the device that first
/// used a value.
struct Roster<'f> {
    names: Vec<&'f str>,
    known: HashSet<&'f str>,
}

impl<'f> Roster<'f> {
    fn of(devices: &'f [Spanned<RawDevice>]) -> Self {
        let names: Vec<&str> = devices
            .iter()
            .map(|d| d.get_ref().name.get_ref().as_str())
            .collect();
        let known = names.iter().copied().collect();
        Roster { names, known }
    }
}

/// Values no two devices may share, and which device (its index in the
/// file) holds each, so a second use can say whose it is.
struct Unique<T> {
    holders: HashMap<T, usize>,
}

impl<T> Default for Unique<T> {
    fn default() -> Self {
        Unique {
            holders: HashMap::new(),
        }
    }
}

impl<T: Eq + Hash> Unique<T> {
    /// Records that device `index` uses `value`; if another device used it
    /// before, returns the first device that did (a third use names the
    /// first, as "first used by device #1" promises, not the second).
    fn claim(&mut self, value: T, index: usize) -> Result<(), usize> {
        match self.holders.entry(value) {
            Entry::Vacant(v) => {
                v.insert(index);
                Ok(())
            }
            Entry::Occupied(o) => Err(*o.get()),
        }
    }
}

/// Everything one device may not share with another.
#[derive(Default)]
struct Claims {
    names: Unique<String>,
    keys: Unique<PublicKey>,
    endpoints: Unique<Endpoint>,
    ipv4: Unique<Ipv4Addr>,
    ipv6: Unique<Ipv6Addr>,
    group_sync: Unique<Ipv4Addr>,
    group_uplink: Unique<Ipv4Addr>,
}

/// A device's mesh address of one family, as its field checks it.
trait MeshAddr: FromStr + Copy + Eq + Hash + fmt::Display {
    type Prefix: Copy;
    /// The field in the file: `ipv4` or `ipv6`.
    const FIELD: &'static str;
    /// The family in messages: `IPv4` or `IPv6`.
    const FAMILY: &'static str;
    /// Whether the address may be a host's address inside `prefix`.
    fn check_host(self, prefix: Self::Prefix) -> Result<(), String>;
}

impl MeshAddr for Ipv4Addr {
    type Prefix = Ipv4Net;
    const FIELD: &'static str = "ipv4";
    const FAMILY: &'static str = "IPv4";
    fn check_host(self, prefix: Ipv4Net) -> Result<(), String> {
        check_v4_host(self, prefix)
    }
}

impl MeshAddr for Ipv6Addr {
    type Prefix = Ipv6Net;
    const FIELD: &'static str = "ipv6";
    const FAMILY: &'static str = "IPv6";
    fn check_host(self, prefix: Ipv6Net) -> Result<(), String> {
        check_v6_host(self, prefix)
    }
}

/// Checks one `[[device]]` entry, field by field, reporting every problem
/// under the device's label.
struct DeviceCheck<'f, 'p> {
    index: usize,
    label: String,
    roster: &'f Roster<'f>,
    groups: &'f group::Groups,
    problems: &'p mut Problems<'f>,
}

impl DeviceCheck<'_, '_> {
    /// The device, if none of its fields has a problem.
    fn device(
        &mut self,
        d: &RawDevice,
        settings: &Settings,
        claims: &mut Claims,
    ) -> Option<Device> {
        let before = self.problems.found.len();
        let name = self.name(&d.name, &mut claims.names);
        let public_key = self.public_key(&d.public_key, &mut claims.keys);
        let endpoint = self.endpoint(d.endpoint.as_ref(), &mut claims.endpoints);
        let listen_port = match &d.listen_port {
            Some(p) => port(p.get_ref()).unwrap_or_else(|m| {
                self.add(p.span(), format!("listen_port {m}"));
                DEFAULT_LISTEN_PORT
            }),
            None => endpoint.as_ref().map_or(DEFAULT_LISTEN_PORT, |e| e.port),
        };
        let ipv4 = self.address(&d.ipv4, settings.ipv4_prefix, &mut claims.ipv4);
        let ipv6 = self.address(&d.ipv6, settings.ipv6_prefix, &mut claims.ipv6);
        let exit_node = d.exit_node.as_ref().is_some_and(|v| *v.get_ref());
        let exit_clients = d
            .exit_clients
            .as_ref()
            .map(|list| self.exit_clients(list, exit_node));
        let exit_rate_limit = d.exit_rate_limit.as_ref().and_then(|r| {
            rate::parse(r.get_ref())
                .map_err(|m| self.add(r.span(), format!("exit_rate_limit {m}")))
                .ok()
        });
        let exit_flow_limit = d.exit_flow_limit.as_ref().and_then(|v| {
            count_in(v.get_ref(), &super::FLOW_LIMIT_RANGE, "flows")
                .map_err(|m| self.add(v.span(), format!("exit_flow_limit: {m}")))
                .ok()
        });
        let exit_new_flow_rate = d.exit_new_flow_rate.as_ref().and_then(|v| {
            count_in(
                v.get_ref(),
                &super::NEW_FLOW_RATE_RANGE,
                "new flows a second",
            )
            .map_err(|m| self.add(v.span(), format!("exit_new_flow_rate: {m}")))
            .ok()
        });

        let exit_capacity = d.exit_capacity.as_ref().and_then(|r| {
            if !exit_node {
                self.add(
                    r.span(),
                    "exit_capacity is only for exit nodes (add exit_node = true, or remove it)",
                );
                return None;
            }
            rate::parse(r.get_ref())
                .map_err(|m| self.add(r.span(), format!("exit_capacity {m}")))
                .ok()
        });
        let exit_group = self.exit_group(d, exit_node, claims);

        if self.problems.found.len() != before {
            return None;
        }
        Some(Device {
            name,
            public_key: public_key?,
            endpoint,
            listen_port,
            ipv4: ipv4?,
            ipv6: ipv6?,
            exit_node,
            exit_clients,
            exit_rate_limit,
            exit_flow_limit,
            exit_new_flow_rate,
            exit_capacity,
            exit_group,
        })
    }

    /// A member's own address in its group (`field`), claimed in `used`.
    fn group_addr(
        &mut self,
        field: &str,
        raw: Option<&Spanned<String>>,
        used: &mut Unique<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let raw = raw?;
        match group::member_addr(raw.get_ref()) {
            Ok(ip) => {
                self.claim(used, ip, raw.span(), format!("{field} {ip}"));
                Some(ip)
            }
            Err(m) => {
                self.add(raw.span(), format!("{field} {m}"));
                None
            }
        }
    }

    /// `exit_group` and the member's own addresses in it.
    fn exit_group(
        &mut self,
        d: &RawDevice,
        exit_node: bool,
        claims: &mut Claims,
    ) -> Option<GroupMember> {
        let sync_ipv4 = self.group_addr(
            "exit_group_sync_ipv4",
            d.exit_group_sync_ipv4.as_ref(),
            &mut claims.group_sync,
        );
        let uplink_ipv4 = self.group_addr(
            "exit_group_uplink_ipv4",
            d.exit_group_uplink_ipv4.as_ref(),
            &mut claims.group_uplink,
        );
        let Some(name) = &d.exit_group else {
            for raw in [&d.exit_group_sync_ipv4, &d.exit_group_uplink_ipv4]
                .into_iter()
                .flatten()
            {
                self.add(
                    raw.span(),
                    "exit_group_sync_ipv4 and exit_group_uplink_ipv4 are only for members of an exit group (add exit_group, or remove them)",
                );
            }
            return None;
        };
        let group = name.get_ref();
        if !exit_node {
            self.add(
                name.span(),
                "exit_group is only for exit nodes (add exit_node = true, or remove it)",
            );
        }
        if self.groups.unicast(group).is_none() {
            self.add(
                name.span(),
                format!("exit_group names {group:?}, which is not an [[exit_group]] of this file"),
            );
        }
        if d.exit_group_sync_ipv4.is_none() {
            self.add(
                name.span(),
                "exit_group needs exit_group_sync_ipv4 (this member's address on the group's sync link)",
            );
        }
        Some(GroupMember {
            group: group.clone(),
            sync_ipv4: sync_ipv4?,
            uplink_ipv4,
        })
    }

    fn add(&mut self, span: Range<usize>, what: impl fmt::Display) {
        self.problems.add(span, format!("{}: {what}", self.label));
    }

    /// Claims `value` for this device in `used`; `what` names the value in
    /// the problem if another device has it.
    fn claim<T: Eq + Hash>(
        &mut self,
        used: &mut Unique<T>,
        value: T,
        span: Range<usize>,
        what: impl fmt::Display,
    ) {
        if let Err(holder) = used.claim(value, self.index) {
            let holder = self.roster.names[holder];
            self.add(span, format!("{what} is already used by device {holder:?}"));
        }
    }

    fn name(&mut self, raw: &Spanned<String>, used: &mut Unique<String>) -> String {
        let name = raw.get_ref().clone();
        if let Err(m) = check_name(&name) {
            self.add(raw.span(), format!("name {m}"));
        } else if let Err(first) = used.claim(name.clone(), self.index) {
            self.problems.add(
                raw.span(),
                format!(
                    "duplicate device name {name:?} (first used by device #{})",
                    first + 1
                ),
            );
        }
        name
    }

    fn public_key(
        &mut self,
        raw: &Spanned<String>,
        used: &mut Unique<PublicKey>,
    ) -> Option<PublicKey> {
        match raw.get_ref().parse::<PublicKey>() {
            Ok(key) => {
                self.claim(used, key, raw.span(), "public_key");
                Some(key)
            }
            Err(e) => {
                self.add(
                    raw.span(),
                    format!("public_key is not a WireGuard public key ({e})"),
                );
                None
            }
        }
    }

    fn endpoint(
        &mut self,
        raw: Option<&Spanned<String>>,
        used: &mut Unique<Endpoint>,
    ) -> Option<Endpoint> {
        let raw = raw?;
        match parse_endpoint(raw.get_ref()) {
            Ok(endpoint) => {
                let what = format!("endpoint {endpoint}");
                self.claim(used, endpoint.clone(), raw.span(), what);
                Some(endpoint)
            }
            Err(m) => {
                self.add(raw.span(), format!("endpoint {m}"));
                None
            }
        }
    }

    fn address<A: MeshAddr>(
        &mut self,
        raw: &Spanned<String>,
        prefix: A::Prefix,
        used: &mut Unique<A>,
    ) -> Option<A> {
        let field = A::FIELD;
        let Ok(ip) = raw.get_ref().parse::<A>() else {
            self.add(
                raw.span(),
                format!(
                    "{field} {:?} is not an {} address (write it without a prefix length)",
                    raw.get_ref(),
                    A::FAMILY
                ),
            );
            return None;
        };
        match ip.check_host(prefix) {
            Err(m) => self.add(raw.span(), format!("{field} {ip} {m}")),
            Ok(()) => self.claim(used, ip, raw.span(), format!("{field} {ip}")),
        }
        Some(ip)
    }

    fn exit_clients(
        &mut self,
        list: &Spanned<Vec<Spanned<String>>>,
        exit_node: bool,
    ) -> BTreeSet<String> {
        if !exit_node {
            self.add(
                list.span(),
                "exit_clients is only for exit nodes (add exit_node = true, or remove it)",
            );
        }
        let mut set = BTreeSet::new();
        for client in list.get_ref() {
            let n = client.get_ref();
            if !self.roster.known.contains(n.as_str()) {
                self.add(
                    client.span(),
                    format!("exit_clients names {n:?}, which is not a device of this file"),
                );
            } else if !set.insert(n.clone()) {
                self.add(client.span(), format!("exit_clients lists {n:?} twice"));
            }
        }
        set
    }
}

/// `s` as a prefix of the family `N` (`example` shows one), without host
/// bits.
fn whole_prefix<N>(s: &str, example: &str) -> Result<N, String>
where
    N: std::str::FromStr + Copy + Into<IpNet>,
{
    let net: N = s
        .parse()
        .map_err(|_| format!("{s:?} is not an {example}"))?;
    let as_ip: IpNet = net.into();
    if as_ip.trunc() != as_ip {
        return Err(format!(
            "{s} has host bits set; the prefix is {}",
            as_ip.trunc()
        ));
    }
    Ok(net)
}

fn parse_v4_prefix(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = whole_prefix(s, "IPv4 prefix like 100.64.0.0/10")?;
    if net.prefix_len() > 30 {
        return Err(format!("{s} is too small for a mesh (at most /30)"));
    }
    Ok(net)
}

fn parse_v6_prefix(s: &str) -> Result<Ipv6Net, String> {
    let net: Ipv6Net = whole_prefix(s, "IPv6 prefix like fd6e:6578:6400::/48")?;
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

    /// Asserts the problems are exactly `expected` in number, each one
    /// found (as a part of a `line:column: message`).
    fn reports(p: &[Problem], expected: &[&str]) {
        let joined = p
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        for e in expected {
            assert!(joined.contains(e), "{e:?} not in:\n{joined}");
        }
        assert_eq!(p.len(), expected.len(), "{joined}");
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
        reports(
            &problems(&text),
            &[
                "9:8: duplicate device name \"a\"",
                "10:14: device \"a\": public_key is already used by device \"a\"",
                "17:14: device \"c\": public_key is not a WireGuard public key",
                "18:12: device \"c\": endpoint 192.0.2.1:51820 is already used",
                "19:8: device \"c\": ipv4 10.0.0.1 is not inside the mesh prefix 100.64.0.0/10",
                "20:8: device \"c\": ipv6 fd6e:6578:6400::1 is already used",
            ],
        );
    }

    /// Every problem of `text`, as `line:column: message`.
    fn located(text: &str) -> Vec<String> {
        problems(text).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn every_mesh_setting_says_what_is_wrong() {
        assert_eq!(
            located(
                "[mesh]\nipv4_prefix = \"100.64.0.0\"\nipv6_prefix = \"fd00::/127\"\n\
                 persistent_keepalive = 70000\nmtu = 65536\nagent_port = 0\n"
            ),
            [
                "2:15: mesh.ipv4_prefix: \"100.64.0.0\" is not an IPv4 prefix like 100.64.0.0/10",
                "3:15: mesh.ipv6_prefix: fd00::/127 is too small for a mesh (at most /126)",
                "4:24: mesh.persistent_keepalive: 70000 is out of range (0 to 65535 seconds; 0 turns keepalives off)",
                "5:7: mesh.mtu: 65536 is out of range (1280, the IPv6 minimum, to 65535)",
                "6:14: mesh.agent_port: 0 is not a port (1 to 65535)",
            ]
        );
        assert_eq!(
            located(
                "[mesh]\nipv4_prefix = \"100.64.0.0/31\"\nipv6_prefix = \"fd00::\"\npersistent_keepalive = -1\n"
            ),
            [
                "2:15: mesh.ipv4_prefix: 100.64.0.0/31 is too small for a mesh (at most /30)",
                "3:15: mesh.ipv6_prefix: \"fd00::\" is not an IPv6 prefix like fd6e:6578:6400::/48",
                "4:24: mesh.persistent_keepalive: -1 is out of range (0 to 65535 seconds; 0 turns keepalives off)",
            ]
        );
    }

    /// One device entry from its fields, as TOML lines in this order.
    fn entry(fields: &[(&str, &str)]) -> String {
        let mut out = String::from("[[device]]\n");
        for (k, v) in fields {
            out.push_str(&format!("{k} = {v}\n"));
        }
        out
    }

    #[test]
    fn every_device_field_says_what_is_wrong() {
        let k = format!("\"{}\"", key());
        let text = entry(&[
            ("name", "\"bad name\""),
            ("public_key", &k),
            ("endpoint", "\"nohost\""),
            ("listen_port", "70000"),
            ("ipv4", "\"100.64.0.1/10\""),
            ("ipv6", "\"fd6e:6578:6400::1/64\""),
        ]);
        assert_eq!(
            located(&text),
            [
                "2:8: device \"bad name\": name \"bad name\" may only contain letters, digits, '-', '_' and '.'",
                "4:12: device \"bad name\": endpoint \"nohost\" is not host:port (IPv6 as [addr]:port)",
                "5:15: device \"bad name\": listen_port 70000 is not a port (1 to 65535)",
                "6:8: device \"bad name\": ipv4 \"100.64.0.1/10\" is not an IPv4 address (write it without a prefix length)",
                "7:8: device \"bad name\": ipv6 \"fd6e:6578:6400::1/64\" is not an IPv6 address (write it without a prefix length)",
            ]
        );

        let text = entry(&[
            ("name", "\"x\""),
            ("public_key", &k),
            ("ipv4", "\"100.127.255.255\""),
            ("ipv6", "\"fd6e:6578:6400::\""),
        ]);
        assert_eq!(
            located(&text),
            [
                "4:8: device \"x\": ipv4 100.127.255.255 is the network or broadcast address of 100.64.0.0/10",
                "5:8: device \"x\": ipv6 fd6e:6578:6400:: is the subnet-router anycast address of fd6e:6578:6400::/48",
            ]
        );

        let text = entry(&[
            ("name", "\"x\""),
            ("public_key", &k),
            ("ipv4", "\"100.64.0.0\""),
            ("ipv6", "\"fd00::1\""),
        ]);
        assert_eq!(
            located(&text),
            [
                "4:8: device \"x\": ipv4 100.64.0.0 is the network or broadcast address of 100.64.0.0/10",
                "5:8: device \"x\": ipv6 fd00::1 is not inside the mesh prefix fd6e:6578:6400::/48",
            ]
        );
    }

    #[test]
    fn a_shared_address_or_endpoint_names_the_device_that_has_it() {
        let text = format!(
            "{}{}",
            device("a", 1, &key()),
            entry(&[
                ("name", "\"b\""),
                ("public_key", &format!("\"{}\"", key())),
                ("endpoint", "\"192.0.2.1:51820\""),
                ("ipv4", "\"100.64.0.1\""),
                ("ipv6", "\"fd6e:6578:6400::1\""),
            ])
        );
        assert_eq!(
            located(&text),
            [
                "11:12: device \"b\": endpoint 192.0.2.1:51820 is already used by device \"a\"",
                "12:8: device \"b\": ipv4 100.64.0.1 is already used by device \"a\"",
                "13:8: device \"b\": ipv6 fd6e:6578:6400::1 is already used by device \"a\"",
            ]
        );
    }

    #[test]
    fn a_third_use_names_the_first_device() {
        let k = key();
        let text = format!(
            "{}{}{}",
            device("a", 1, &k),
            device("a", 2, &k),
            device("a", 3, &k)
        );
        let p = located(&text);
        assert!(
            p.contains(&"16:8: duplicate device name \"a\" (first used by device #1)".to_owned()),
            "{p:#?}"
        );
        assert!(
            p.contains(
                &"17:14: device \"a\": public_key is already used by device \"a\"".to_owned()
            ),
            "{p:#?}"
        );
        let mut names = Unique::default();
        assert_eq!(names.claim("x", 0), Ok(()));
        assert_eq!(names.claim("x", 1), Err(0));
        assert_eq!(names.claim("x", 2), Err(0));
        assert_eq!(names.claim("y", 2), Ok(()));
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
    fn exit_capacity_is_read_in_bits_per_second() {
        for (text, bps) in [
            ("2gbit", 2_000_000_000),
            ("500mbit", 500_000_000),
            ("1.5gbit", 1_500_000_000),
            ("100mbyte", 800_000_000),
        ] {
            let mesh = parse(&exit_file(
                &format!("exit_node = true\nexit_capacity = \"{text}\"\n"),
                "",
            ))
            .expect("valid");
            assert_eq!(
                mesh.devices[0]
                    .exit_capacity
                    .map(crate::mesh::Rate::bits_per_second),
                Some(bps),
                "{text}"
            );
        }
        let absent = parse(&exit_file("exit_node = true\n", "")).expect("valid");
        assert_eq!(absent.devices[0].exit_capacity, None);
    }

    #[test]
    fn a_bad_exit_capacity_names_the_device_and_the_field() {
        for (value, says) in [
            ("\"2gbps\"", "ambiguous"),
            ("\"fast\"", "unknown unit"),
            ("\"1.2.3gbit\"", "not a number"),
            ("\"500\"", "no unit"),
            ("\"10kbit\"", "out of range"),
        ] {
            let Err(p) = parse(&exit_file(
                &format!("exit_node = true\nexit_capacity = {value}\n"),
                "",
            )) else {
                panic!("{value} is refused");
            };
            let joined = p
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            assert!(
                joined.contains("device \"exit\": exit_capacity") && joined.contains(says),
                "{value}: {joined}"
            );
        }
        // A number is not a rate (TOML's type error, located).
        assert!(parse(&exit_file("exit_node = true\nexit_capacity = 2\n", "")).is_err());
        // Only an exit node has a capacity.
        let Err(p) = parse(&exit_file("", "exit_capacity = \"1gbit\"\n")) else {
            panic!("a capacity without exit_node is refused");
        };
        assert!(
            p[0].to_string()
                .contains("device \"b\": exit_capacity is only for exit nodes"),
            "{p:?}"
        );
    }

    #[test]
    fn exit_node_fields_are_read() {
        let mesh = parse(&exit_file(
            "exit_node = true\nexit_clients = [\"a\"]\n",
            "exit_rate_limit = \"200mbit\"\nexit_flow_limit = 100\nexit_new_flow_rate = 20\n",
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
        assert_eq!(
            (b.exit_flow_limit, b.exit_new_flow_rate),
            (Some(100), Some(20))
        );
        assert_eq!((a.exit_flow_limit, a.exit_new_flow_rate), (None, None));
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
        reports(
            &p,
            &[
                "9:22: device \"exit\": exit_clients names \"nobody\", which is not a device of this file",
                "9:32: device \"exit\": exit_clients lists \"a\" twice",
                "25:19: device \"b\": exit_rate_limit \"200mbps\": unit \"mbps\" is ambiguous",
            ],
        );

        let p = problems(&exit_file(
            "",
            "exit_flow_limit = 15\nexit_new_flow_rate = 0\n",
        ));
        reports(
            &p,
            &[
                "device \"b\": exit_flow_limit: 15 is out of range (16 to 1000000 flows)",
                "device \"b\": exit_new_flow_rate: 0 is out of range (1 to 100000 new flows a second)",
            ],
        );

        let p = problems(&exit_file("exit_clients = [\"a\"]\n", ""));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].line, p[0].column), (8, 16), "{p:?}");
        assert!(p[0].message.contains("only for exit nodes"), "{p:?}");

        let p = problems(&exit_file("exit_node = \"yes\"\n", ""));
        assert_eq!(p[0].line, 8, "{p:?}");
        assert!(p[0].message.contains("bool"), "{p:?}");
    }

    /// A group "eu" (lines 1-7, `group_extra` appended) and exit nodes
    /// "x" (1) and "y" (2) with `x_extra` / `y_extra` appended.
    fn group_file(group_extra: &str, x_extra: &str, y_extra: &str) -> String {
        format!(
            "[[exit_group]]\nname = \"eu\"\negress_ipv4 = \"198.51.100.10\"\nuplink = \"up0\"\nsync_interface = \"sync0\"\nvrrp_id = 10\n{group_extra}\n{}{x_extra}\n{}{y_extra}\n",
            device("x", 1, &key()),
            device("y", 2, &key()),
        )
    }

    const MEMBER_X: &str =
        "exit_node = true\nexit_group = \"eu\"\nexit_group_sync_ipv4 = \"10.9.0.1\"\n";
    const MEMBER_Y: &str =
        "exit_node = true\nexit_group = \"eu\"\nexit_group_sync_ipv4 = \"10.9.0.2\"\n";

    #[test]
    fn exit_groups_are_read_with_their_defaults_and_member_order() {
        let mesh = parse(&group_file("", MEMBER_X, MEMBER_Y)).expect("valid");
        let [g] = &mesh.exit_groups[..] else {
            panic!("one group: {:?}", mesh.exit_groups);
        };
        assert_eq!(g.name, "eu");
        assert_eq!(g.egress_ipv4.to_string(), "198.51.100.10/32");
        assert_eq!(g.egress_ipv6, None);
        assert_eq!(
            (g.uplink.as_str(), g.sync_interface.as_str()),
            ("up0", "sync0")
        );
        assert_eq!((g.vrrp_id, g.advert_centis, g.unicast), (10, 10, false));
        let members: Vec<&str> = mesh.group_members("eu").map(|d| d.name.as_str()).collect();
        assert_eq!(members, ["x", "y"]);
        let x = &mesh.devices[0];
        assert_eq!(mesh.group_of(&x.public_key), Some(g));
        assert_eq!(
            x.exit_group
                .as_ref()
                .map(|m| (m.sync_ipv4.to_string(), m.uplink_ipv4)),
            Some(("10.9.0.1".to_owned(), None))
        );
        // A group of one is allowed.
        let one = parse(&group_file("", MEMBER_X, "")).expect("valid");
        assert_eq!(one.group_members("eu").count(), 1);
        assert_eq!(one.group_of(&one.devices[1].public_key), None);
    }

    #[test]
    fn exit_group_problems_name_the_group_or_device_and_field() {
        // Group fields, each wrong.
        assert_eq!(
            located(&group_file(
                "egress_ipv6 = \"fd6e:6578:6400::9\"\nadvert_interval = 0.005\n",
                MEMBER_X,
                ""
            )),
            [
                "7:15: exit group \"eu\": egress_ipv6 fd6e:6578:6400::9 is inside the mesh prefix fd6e:6578:6400::/48; the egress address is on the uplink",
                "8:19: exit group \"eu\": advert_interval 0.005 is not a VRRPv3 interval (0.01 to 40.95 seconds, in steps of 0.01)",
            ]
        );
        let bad = "[[exit_group]]\nname = \"b\"\negress_ipv4 = \"100.64.0.9\"\nuplink = \"up 0\"\nsync_interface = \"up 0\"\nvrrp_id = 0\n";
        assert_eq!(
            located(&format!(
                "{bad}{}exit_node = true\nexit_group = \"b\"\nexit_group_sync_ipv4 = \"10.9.0.1\"\n",
                device("x", 1, &key())
            )),
            [
                "3:15: exit group \"b\": egress_ipv4 100.64.0.9 is inside the mesh prefix 100.64.0.0/10; the egress address is on the uplink",
                "4:10: exit group \"b\": uplink \"up 0\" is not an interface name (1 to 15 characters, no '/', ':' or spaces)",
                "5:18: exit group \"b\": sync_interface \"up 0\" is not an interface name (1 to 15 characters, no '/', ':' or spaces)",
                "5:18: exit group \"b\": sync_interface must be a link of its own, not the uplink",
                "6:11: exit group \"b\": vrrp_id 0 is out of range (1 to 255)",
            ]
        );
        // Two groups sharing an egress address and a VRRP id.
        let second = "[[exit_group]]\nname = \"us\"\negress_ipv4 = \"198.51.100.10/24\"\nuplink = \"up0\"\nsync_interface = \"sync0\"\nvrrp_id = 10\n";
        let text = format!(
            "{second}{}",
            group_file(
                "",
                MEMBER_X,
                "exit_node = true\nexit_group = \"us\"\nexit_group_sync_ipv4 = \"10.9.0.2\"\n"
            )
        );
        assert_eq!(
            located(&text),
            [
                "9:15: exit group \"eu\": egress_ipv4 198.51.100.10 is already used by exit group \"us\"",
                "12:11: exit group \"eu\": vrrp_id 10 is already used by exit group \"us\"",
            ]
        );
        // Members: unknown group, not an exit node, no sync address, a
        // shared sync address, the fields without a group.
        let p = located(&group_file(
            "",
            "exit_group = \"eu\"\nexit_group_sync_ipv4 = \"10.9.0.1\"\n",
            "exit_node = true\nexit_group = \"asia\"\nexit_group_sync_ipv4 = \"10.9.0.1\"\n",
        ));
        assert_eq!(
            p,
            [
                "15:14: device \"x\": exit_group is only for exit nodes (add exit_node = true, or remove it)",
                "27:24: device \"y\": exit_group_sync_ipv4 10.9.0.1 is already used by device \"x\"",
                "26:14: device \"y\": exit_group names \"asia\", which is not an [[exit_group]] of this file",
            ]
        );
        assert_eq!(
            located(&group_file(
                "",
                "exit_node = true\nexit_group = \"eu\"\n",
                "exit_group_uplink_ipv4 = \"198.51.100.3\"\n"
            )),
            [
                "16:14: device \"x\": exit_group needs exit_group_sync_ipv4 (this member's address on the group's sync link)",
                "25:26: device \"y\": exit_group_sync_ipv4 and exit_group_uplink_ipv4 are only for members of an exit group (add exit_group, or remove them)",
            ]
        );
        // A group nobody names; unicast without the members' uplink
        // addresses; a member address that is the egress address.
        assert_eq!(
            located(&group_file("", "", "")),
            ["2:8: exit group \"eu\" has no members (add exit_group = \"eu\" to its exit nodes)"]
        );
        assert_eq!(
            located(&group_file(
                "unicast = true\n",
                MEMBER_X,
                "exit_node = true\nexit_group = \"eu\"\nexit_group_sync_ipv4 = \"10.9.0.2\"\nexit_group_uplink_ipv4 = \"198.51.100.10\"\n"
            )),
            [
                "7:11: exit group \"eu\": unicast VRRP needs exit_group_uplink_ipv4 on device \"x\"",
                "30:26: device \"y\": exit_group_uplink_ipv4 is exit group \"eu\"'s egress address; a member needs its own",
            ]
        );
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
