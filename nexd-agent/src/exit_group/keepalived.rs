//! keepalived's configuration for one member: one VRRPv3 instance whose
//! virtual address is the group's egress address on the uplink.
//!
//! Choices, and why:
//! * VRRPv3, because only v3 takes advert intervals below a second (0.1 s
//!   by default: takeover 0.33-0.40 s after a crash, measured);
//! * every member starts as BACKUP with `nopreempt`: a member that comes
//!   back does not take the address from a healthy holder, because its
//!   conntrackd has not yet received the group's state, and every move
//!   costs the flows a gap; the member order only decides a tie at start;
//! * no notify scripts: nexd learns who holds the address by watching the
//!   address on the uplink (netlink), the one fact the data path depends
//!   on, and runs the conntrackd commands itself, one transition at a time
//!   (two notify scripts can run at once at start with fast adverts);
//! * the IPv6 egress address is `virtual_ipaddress_excluded`: a VRRPv3
//!   instance carries one family in its adverts, and the IPv6 address must
//!   follow the IPv4 one, not be elected on its own.

use std::fmt::Write as _;

use super::{Files, Membership};

/// The name of the VRRP instance (keepalived's, in its logs).
pub fn instance_name(m: &Membership) -> String {
    format!("nexd_{}", m.group.name.replace(['-', '.'], "_"))
}

/// The configuration text for `m`.
pub fn render(m: &Membership) -> String {
    let g = &m.group;
    let me = m.me();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Written by nexd for exit group {:?} (member {:?}); nexd rewrites it.",
        g.name, me.name
    );
    let _ = write!(
        s,
        "global_defs {{\n    router_id nexd_{}\n    vrrp_version 3\n    vrrp_garp_master_delay 1\n    vrrp_garp_master_repeat 3\n}}\n\n",
        me.name.replace(['-', '.'], "_")
    );
    let _ = writeln!(s, "vrrp_instance {} {{", instance_name(m));
    let _ = writeln!(s, "    state BACKUP\n    nopreempt");
    let _ = writeln!(s, "    interface {}", g.uplink);
    let _ = writeln!(s, "    virtual_router_id {}", g.vrrp_id);
    let _ = writeln!(s, "    priority {}", m.priority());
    let _ = writeln!(
        s,
        "    advert_int {}.{:02}",
        g.advert_centis / 100,
        g.advert_centis % 100
    );
    if g.unicast {
        if let Some(own) = me.uplink_ipv4 {
            let _ = writeln!(s, "    unicast_src_ip {own}");
        }
        let _ = writeln!(s, "    unicast_peer {{");
        for peer in m.others().filter_map(|o| o.uplink_ipv4) {
            let _ = writeln!(s, "        {peer}");
        }
        let _ = writeln!(s, "    }}");
    }
    let _ = writeln!(
        s,
        "    virtual_ipaddress {{\n        {} dev {}\n    }}",
        g.egress_ipv4, g.uplink
    );
    if let Some(v6) = g.egress_ipv6 {
        let _ = writeln!(
            s,
            "    virtual_ipaddress_excluded {{\n        {v6} dev {}\n    }}",
            g.uplink
        );
    }
    s.push_str("}\n");
    s
}

/// keepalived's command line: VRRP only, in the foreground, logging to
/// stderr (nexd keeps it), with this instance's own pid files.
pub fn args(files: &Files) -> Vec<String> {
    vec![
        "--vrrp".into(),
        "--dont-fork".into(),
        "--log-console".into(),
        "--log-detail".into(),
        "--use-file".into(),
        files.keepalived_conf().display().to_string(),
        "--pid".into(),
        files.keepalived_pid().display().to_string(),
        "--vrrp_pid".into(),
        files.vrrp_pid().display().to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit_group::fixtures;

    #[test]
    fn the_multicast_config_is_exact() {
        let (mesh, keys) = fixtures::mesh(false, false);
        let m = Membership::of(&mesh, &keys[1]).expect("member");
        assert_eq!(
            render(&m),
            "# Written by nexd for exit group \"eu\" (member \"y\"); nexd rewrites it.
global_defs {
    router_id nexd_y
    vrrp_version 3
    vrrp_garp_master_delay 1
    vrrp_garp_master_repeat 3
}

vrrp_instance nexd_eu {
    state BACKUP
    nopreempt
    interface up0
    virtual_router_id 10
    priority 240
    advert_int 0.10
    virtual_ipaddress {
        198.51.100.10/24 dev up0
    }
    virtual_ipaddress_excluded {
        2001:db8::10/128 dev up0
    }
}
"
        );
    }

    #[test]
    fn unicast_names_every_other_member() {
        let (mesh, keys) = fixtures::mesh(true, true);
        let m = Membership::of(&mesh, &keys[0]).expect("member");
        let text = render(&m);
        assert!(
            text.contains(
                "    unicast_src_ip 198.51.100.1\n    unicast_peer {\n        198.51.100.2\n        198.51.100.3\n    }\n"
            ),
            "{text}"
        );
        assert!(text.contains("priority 250\n"), "{text}");
    }

    #[test]
    fn every_file_is_the_instances_own() {
        let files = Files::new("/srv/nexd/exit-group".as_ref());
        let args = args(&files).join(" ");
        assert_eq!(
            args,
            "--vrrp --dont-fork --log-console --log-detail --use-file /srv/nexd/exit-group/keepalived.conf --pid /srv/nexd/exit-group/keepalived.pid --vrrp_pid /srv/nexd/exit-group/vrrp.pid"
        );
    }
}
