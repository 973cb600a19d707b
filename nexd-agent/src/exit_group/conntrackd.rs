//! conntrackd's configuration for one member: FTFW (reliable) sync of the
//! conntrack table with the other members over the group's sync link.
//!
//! Choices, and why (docs/ARCHITECTURE.md, exit groups; gotchas measured in
//! the notes the issue cites):
//! * the external cache stays on: with `DisableExternalCache On` the
//!   synced entries go straight into the kernel, and a backup's purge
//!   (`-t`) then empties them after `PurgeTimeout`, losing every
//!   long-lived flow; with the cache, the new holder commits (`-c`) it on
//!   takeover;
//! * its own lock file, control socket and log under the instance's
//!   directory: two conntrackd on one host share /var/lock otherwise;
//! * two members talk point to point (UDP); more use multicast on the sync
//!   link (one sender, every receiver);
//! * only TCP, UDP and ICMP flows are synced, and none of the members' own
//!   (their sync, uplink and mesh addresses): what is worth keeping is the
//!   clients' NAT state.

use std::fmt::Write as _;

use super::{Files, Membership};

/// The UDP port of the sync messages; the multicast group's port adds the
/// VRRP id, so two groups on one link do not mix.
pub const SYNC_PORT: u16 = 3780;
/// The multicast address of the sync messages (conntrackd's default).
pub const MULTICAST_GROUP: &str = "225.0.0.50";

/// The configuration text for `m`, with `files`' paths.
pub fn render(m: &Membership, files: &Files) -> String {
    let g = &m.group;
    let me = m.me();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Written by nexd for exit group {:?} (member {:?}); nexd rewrites it.",
        g.name, me.name
    );
    s.push_str(
        "Sync {\n    Mode FTFW {\n        ResendQueueSize 131072\n        PurgeTimeout 60\n        ACKWindowSize 300\n        DisableExternalCache Off\n    }\n",
    );
    let others: Vec<_> = m.others().collect();
    if let [peer] = others[..] {
        let _ = write!(
            s,
            "    UDP {{\n        IPv4_address {}\n        IPv4_Destination_Address {}\n        Port {}\n        Interface {}\n        SndSocketBuffer 1249280\n        RcvSocketBuffer 1249280\n        Checksum on\n    }}\n",
            me.sync_ipv4,
            peer.sync_ipv4,
            SYNC_PORT + u16::from(g.vrrp_id),
            g.sync_interface
        );
    } else {
        let _ = write!(
            s,
            "    Multicast {{\n        IPv4_address {MULTICAST_GROUP}\n        Group {}\n        IPv4_interface {}\n        Interface {}\n        SndSocketBuffer 1249280\n        RcvSocketBuffer 1249280\n        Checksum on\n    }}\n",
            SYNC_PORT + u16::from(g.vrrp_id),
            me.sync_ipv4,
            g.sync_interface
        );
    }
    s.push_str("}\n\n");
    let _ = write!(
        s,
        "General {{\n    HashSize 32768\n    HashLimit 131072\n    LogFile {}\n    Syslog off\n    LockFile {}\n    UNIX {{\n        Path {}\n    }}\n    NetlinkBufferSize 2097152\n    NetlinkBufferSizeMaxGrowth 8388608\n",
        files.conntrackd_log().display(),
        files.conntrackd_lock().display(),
        files.conntrackd_socket().display()
    );
    s.push_str("    Filter From Userspace {\n        Protocol Accept {\n            TCP\n            UDP\n            ICMP\n            IPv6-ICMP\n        }\n        Address Ignore {\n            IPv4_address 127.0.0.1\n            IPv6_address ::1\n");
    for member in &m.members {
        let _ = writeln!(s, "            IPv4_address {}", member.sync_ipv4);
        if let Some(u) = member.uplink_ipv4 {
            let _ = writeln!(s, "            IPv4_address {u}");
        }
        let _ = writeln!(s, "            IPv4_address {}", member.mesh_ipv4);
        let _ = writeln!(s, "            IPv6_address {}", member.mesh_ipv6);
    }
    s.push_str("        }\n    }\n}\n");
    s
}

/// conntrackd's command line for the daemon and for a control command
/// (`extra`, e.g. `-c`): the configuration names the control socket.
pub fn args(files: &Files, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "-C".to_owned(),
        files.conntrackd_conf().display().to_string(),
    ];
    a.extend(extra.iter().map(|s| (*s).to_owned()));
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit_group::fixtures;

    #[test]
    fn two_members_sync_point_to_point_with_their_own_files() {
        let (mesh, keys) = fixtures::mesh(false, false);
        let m = Membership::of(&mesh, &keys[0]).expect("member");
        let files = Files::new("/var/lib/nexd/exit-group".as_ref());
        assert_eq!(
            render(&m, &files),
            "# Written by nexd for exit group \"eu\" (member \"x\"); nexd rewrites it.
Sync {
    Mode FTFW {
        ResendQueueSize 131072
        PurgeTimeout 60
        ACKWindowSize 300
        DisableExternalCache Off
    }
    UDP {
        IPv4_address 10.9.0.1
        IPv4_Destination_Address 10.9.0.2
        Port 3790
        Interface sync0
        SndSocketBuffer 1249280
        RcvSocketBuffer 1249280
        Checksum on
    }
}

General {
    HashSize 32768
    HashLimit 131072
    LogFile /var/lib/nexd/exit-group/conntrackd.log
    Syslog off
    LockFile /var/lib/nexd/exit-group/conntrackd.lock
    UNIX {
        Path /var/lib/nexd/exit-group/conntrackd.ctl
    }
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 8388608
    Filter From Userspace {
        Protocol Accept {
            TCP
            UDP
            ICMP
            IPv6-ICMP
        }
        Address Ignore {
            IPv4_address 127.0.0.1
            IPv6_address ::1
            IPv4_address 10.9.0.1
            IPv4_address 198.51.100.1
            IPv4_address 100.64.0.1
            IPv6_address fd6e:6578:6400::1
            IPv4_address 10.9.0.2
            IPv4_address 198.51.100.2
            IPv4_address 100.64.0.2
            IPv6_address fd6e:6578:6400::2
        }
    }
}
"
        );
    }

    #[test]
    fn three_members_use_multicast_and_the_cache_stays_on() {
        let (mesh, keys) = fixtures::mesh(true, false);
        let m = Membership::of(&mesh, &keys[2]).expect("member");
        let text = render(&m, &Files::new("/x".as_ref()));
        assert!(
            text.contains("    Multicast {\n        IPv4_address 225.0.0.50\n        Group 3790\n        IPv4_interface 10.9.0.3\n        Interface sync0\n"),
            "{text}"
        );
        assert!(!text.contains("UDP {"), "{text}");
        assert!(text.contains("DisableExternalCache Off"), "{text}");
        assert_eq!(
            args(&Files::new("/x".as_ref()), &["-c"]),
            ["-C", "/x/conntrackd.conf", "-c"]
        );
    }
}
