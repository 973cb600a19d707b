//! `[[exit_group]]` tables and the members' `exit_group*` fields (issue 22):
//! read and checked here so the rest of the mesh file's checks stay as they
//! are. Every problem names the group or the device and the field.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    ops::Range,
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;
use toml::Spanned;

use super::{Problems, RawDevice, Settings, Unique, check_name};
use crate::mesh::{DEFAULT_ADVERT_CENTIS, ExitGroup};

/// The most members a group may have: VRRP priorities are given from the
/// member order, 254 down, and must stay above 0.
pub const MAX_MEMBERS: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    name: Spanned<String>,
    egress_ipv4: Spanned<String>,
    egress_ipv6: Option<Spanned<String>>,
    uplink: Spanned<String>,
    sync_interface: Spanned<String>,
    vrrp_id: Spanned<i64>,
    advert_interval: Option<Spanned<f64>>,
    unicast: Option<Spanned<bool>>,
}

/// The groups the file declares: the valid ones, and every declared name
/// (valid or not), so a member of a group with a problem is not also told
/// that its group does not exist.
pub(super) struct Groups {
    pub(super) valid: Vec<ExitGroup>,
    declared: HashMap<String, bool>,
}

impl Groups {
    /// Whether a group called `name` is declared, and if so whether it
    /// uses unicast VRRP.
    pub(super) fn unicast(&self, name: &str) -> Option<bool> {
        self.declared.get(name).copied()
    }
}

/// Checks every `[[exit_group]]` on its own and against the others.
pub(super) fn groups(
    raw: &[Spanned<RawGroup>],
    settings: &Settings,
    problems: &mut Problems,
) -> Groups {
    let mut names = Unique::default();
    let mut egress4 = Unique::default();
    let mut egress6 = Unique::default();
    let mut ids = Unique::default();
    let label_of = |i: usize| format!("exit group {:?}", raw[i].get_ref().name.get_ref());
    let mut valid = Vec::new();
    let mut declared = HashMap::new();
    for (index, g) in raw.iter().enumerate() {
        let g = g.get_ref();
        let label = label_of(index);
        let before = problems.found.len();
        let add = |problems: &mut Problems, span: Range<usize>, what: String| {
            problems.add(span, format!("{label}: {what}"));
        };
        let name = g.name.get_ref().clone();
        if let Err(m) = check_name(&name) {
            add(problems, g.name.span(), format!("name {m}"));
        } else if let Err(first) = names.claim(name.clone(), index) {
            problems.add(
                g.name.span(),
                format!(
                    "duplicate exit group name {name:?} (first used by exit group #{})",
                    first + 1
                ),
            );
        }
        let unicast = g.unicast.as_ref().is_some_and(|u| *u.get_ref());
        declared.entry(name.clone()).or_insert(unicast);

        let egress_ipv4 = match egress_v4(g.egress_ipv4.get_ref(), settings.ipv4_prefix) {
            Ok(net) => {
                if let Err(holder) = egress4.claim(net.addr(), index) {
                    let holder = label_of(holder);
                    add(
                        problems,
                        g.egress_ipv4.span(),
                        format!("egress_ipv4 {} is already used by {holder}", net.addr()),
                    );
                }
                Some(net)
            }
            Err(m) => {
                add(problems, g.egress_ipv4.span(), format!("egress_ipv4 {m}"));
                None
            }
        };
        let egress_ipv6 = g.egress_ipv6.as_ref().and_then(|raw6| {
            match egress_v6(raw6.get_ref(), settings.ipv6_prefix) {
                Ok(net) => {
                    if let Err(holder) = egress6.claim(net.addr(), index) {
                        let holder = label_of(holder);
                        add(
                            problems,
                            raw6.span(),
                            format!("egress_ipv6 {} is already used by {holder}", net.addr()),
                        );
                    }
                    Some(net)
                }
                Err(m) => {
                    add(problems, raw6.span(), format!("egress_ipv6 {m}"));
                    None
                }
            }
        });
        for (field, value) in [("uplink", &g.uplink), ("sync_interface", &g.sync_interface)] {
            if let Err(m) = check_interface(value.get_ref()) {
                add(problems, value.span(), format!("{field} {m}"));
            }
        }
        if g.uplink.get_ref() == g.sync_interface.get_ref() {
            add(
                problems,
                g.sync_interface.span(),
                "sync_interface must be a link of its own, not the uplink".to_owned(),
            );
        }
        let vrrp_id = match u8::try_from(*g.vrrp_id.get_ref()).ok().filter(|v| *v != 0) {
            Some(id) => {
                if let Err(holder) = ids.claim(id, index) {
                    let holder = label_of(holder);
                    add(
                        problems,
                        g.vrrp_id.span(),
                        format!("vrrp_id {id} is already used by {holder}"),
                    );
                }
                id
            }
            None => {
                add(
                    problems,
                    g.vrrp_id.span(),
                    format!("vrrp_id {} is out of range (1 to 255)", g.vrrp_id.get_ref()),
                );
                0
            }
        };
        let advert_centis = match &g.advert_interval {
            None => DEFAULT_ADVERT_CENTIS,
            Some(a) => advert_centis(*a.get_ref()).unwrap_or_else(|m| {
                add(problems, a.span(), format!("advert_interval {m}"));
                DEFAULT_ADVERT_CENTIS
            }),
        };
        if problems.found.len() != before {
            continue;
        }
        if let Some(egress_ipv4) = egress_ipv4 {
            valid.push(ExitGroup {
                name,
                egress_ipv4,
                egress_ipv6,
                uplink: g.uplink.get_ref().clone(),
                sync_interface: g.sync_interface.get_ref().clone(),
                vrrp_id,
                advert_centis,
                unicast,
            });
        }
    }
    Groups { valid, declared }
}

/// Checks what only the whole file can tell: every group has members, not
/// too many, and with unicast VRRP each member says its uplink address;
/// no member's own address is a group's egress address.
pub(super) fn members(
    raw: &[Spanned<RawGroup>],
    devices: &[Spanned<RawDevice>],
    problems: &mut Problems,
) {
    for g in raw {
        let g = g.get_ref();
        let name = g.name.get_ref();
        let label = format!("exit group {name:?}");
        let members: Vec<&RawDevice> = devices
            .iter()
            .map(Spanned::get_ref)
            .filter(|d| d.exit_group.as_ref().is_some_and(|n| n.get_ref() == name))
            .collect();
        if members.is_empty() {
            problems.add(
                g.name.span(),
                format!("{label} has no members (add exit_group = {name:?} to its exit nodes)"),
            );
        }
        if members.len() > MAX_MEMBERS {
            problems.add(
                g.name.span(),
                format!(
                    "{label} has {} members; at most {MAX_MEMBERS}",
                    members.len()
                ),
            );
        }
        let unicast = g.unicast.as_ref().filter(|u| *u.get_ref());
        let egress: Option<Ipv4Addr> = g
            .egress_ipv4
            .get_ref()
            .split('/')
            .next()
            .and_then(|a| a.parse().ok());
        for d in members {
            let device = d.name.get_ref();
            if let (Some(u), None) = (unicast, &d.exit_group_uplink_ipv4) {
                problems.add(
                    u.span(),
                    format!(
                        "{label}: unicast VRRP needs exit_group_uplink_ipv4 on device {device:?}"
                    ),
                );
            }
            for (field, value) in [
                ("exit_group_sync_ipv4", &d.exit_group_sync_ipv4),
                ("exit_group_uplink_ipv4", &d.exit_group_uplink_ipv4),
            ] {
                if let Some(value) = value
                    && value.get_ref().parse::<Ipv4Addr>().ok() == egress
                    && egress.is_some()
                {
                    problems.add(
                        value.span(),
                        format!(
                            "device {device:?}: {field} is {label}'s egress address; a member needs its own"
                        ),
                    );
                }
            }
        }
    }
}

/// A member's own address (sync link or uplink).
pub(super) fn member_addr(s: &str) -> Result<Ipv4Addr, String> {
    let ip: Ipv4Addr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address (write it without a prefix length)"))?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_loopback() {
        return Err(format!("{ip} is not a host address"));
    }
    Ok(ip)
}

/// `egress_ipv4`: an address with an optional prefix length (the one it
/// takes on the uplink; /32 without), a host address outside the mesh.
fn egress_v4(s: &str, mesh: Ipv4Net) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = match s.parse::<Ipv4Addr>() {
        Ok(ip) => Ipv4Net::from(ip),
        Err(_) => s
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address (optionally with /len)"))?,
    };
    let ip = net.addr();
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_loopback() {
        return Err(format!("{ip} is not a host address"));
    }
    if net.prefix_len() < 32 && (ip == net.network() || ip == net.broadcast()) {
        return Err(format!(
            "{ip} is the network or broadcast address of {}",
            net.trunc()
        ));
    }
    if mesh.contains(&ip) {
        return Err(format!(
            "{ip} is inside the mesh prefix {mesh}; the egress address is on the uplink"
        ));
    }
    Ok(net)
}

/// `egress_ipv6`: as [`egress_v4`], /128 without a length.
fn egress_v6(s: &str, mesh: Ipv6Net) -> Result<Ipv6Net, String> {
    let net: Ipv6Net = match s.parse::<Ipv6Addr>() {
        Ok(ip) => Ipv6Net::from(ip),
        Err(_) => s
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv6 address (optionally with /len)"))?,
    };
    let ip = net.addr();
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(format!("{ip} is not a host address"));
    }
    if mesh.contains(&ip) {
        return Err(format!(
            "{ip} is inside the mesh prefix {mesh}; the egress address is on the uplink"
        ));
    }
    Ok(net)
}

/// A Linux interface name: 1 to 15 bytes, no '/', ':' or white space.
fn check_interface(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || !c.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an interface name (1 to 15 characters, no '/', ':' or spaces)"
        ))
    }
}

/// `advert_interval` in seconds to VRRPv3's centiseconds (0.01 to 40.95 s).
fn advert_centis(seconds: f64) -> Result<u16, String> {
    let centis = seconds * 100.0;
    let rounded = centis.round();
    if !(1.0..=4095.0).contains(&rounded) || (centis - rounded).abs() > 1e-6 {
        return Err(format!(
            "{seconds} is not a VRRPv3 interval (0.01 to 40.95 seconds, in steps of 0.01)"
        ));
    }
    // In range by the check above.
    Ok(rounded as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advert_intervals_are_centiseconds() {
        assert_eq!(advert_centis(0.1), Ok(10));
        assert_eq!(advert_centis(1.0), Ok(100));
        assert_eq!(advert_centis(40.95), Ok(4095));
        assert!(advert_centis(0.005).is_err());
        assert!(advert_centis(0.0).is_err());
        assert!(advert_centis(41.0).is_err());
        assert!(advert_centis(0.123).is_err());
    }

    #[test]
    fn interface_names() {
        assert!(check_interface("eth0").is_ok());
        assert!(check_interface("a-very-long-na1").is_ok());
        assert!(check_interface("a-very-long-nam2").is_err());
        assert!(check_interface("").is_err());
        assert!(check_interface("eth 0").is_err());
        assert!(check_interface("eth0:1").is_err());
    }

    #[test]
    fn egress_addresses() {
        let mesh4 = crate::mesh::DEFAULT_IPV4_NET;
        assert_eq!(
            egress_v4("198.51.100.10", mesh4).map(|n| n.to_string()),
            Ok("198.51.100.10/32".to_owned())
        );
        assert_eq!(
            egress_v4("198.51.100.10/24", mesh4).map(|n| n.to_string()),
            Ok("198.51.100.10/24".to_owned())
        );
        assert!(egress_v4("198.51.100.0/24", mesh4).is_err());
        assert!(egress_v4("100.64.0.9", mesh4).is_err());
        assert!(egress_v4("224.0.0.18", mesh4).is_err());
        assert!(egress_v4("nope", mesh4).is_err());
        let mesh6 = crate::mesh::DEFAULT_IPV6_NET;
        assert!(egress_v6("2001:db8::10", mesh6).is_ok());
        assert!(egress_v6("fd6e:6578:6400::10", mesh6).is_err());
    }
}
