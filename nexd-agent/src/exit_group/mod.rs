//! Exit groups (issue 22), the pure half: what this member of a group is
//! (`Membership`), the configuration of the two daemons nexd runs for it
//! (`keepalived`: VRRP decides which member holds the egress address;
//! `conntrackd`: the members' connection state, so the new holder keeps
//! every flow's NAT mapping), and the conntrackd commands a change of
//! holder needs (`takeover`). No I/O: the daemon's `exit_group` component
//! writes the files, runs the daemons and the commands.
//!
//! Why Linux's own engines: VRRP is a protocol with decades of corner
//! cases (split brain, gratuitous ARP, preemption) that keepalived handles
//! and a home-made election would rediscover; conntrackd's FTFW mode is the
//! kernel community's answer to moving conntrack entries between hosts.

pub mod conntrackd;
pub mod keepalived;
pub mod takeover;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use crate::{
    keys::PublicKey,
    mesh::{ExitGroup, Mesh},
};

/// One member as the others see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub sync_ipv4: Ipv4Addr,
    pub uplink_ipv4: Option<Ipv4Addr>,
    pub mesh_ipv4: Ipv4Addr,
    pub mesh_ipv6: Ipv6Addr,
}

/// This device's place in its exit group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub group: ExitGroup,
    /// Every member in file order (this one included).
    pub members: Vec<Member>,
    /// This device's index in `members`.
    pub own: usize,
}

/// VRRP priority of the first member; each later one is [`PRIORITY_STEP`]
/// lower. 255 is reserved for an address's owner, which no member is.
pub const FIRST_PRIORITY: u8 = 250;
pub const PRIORITY_STEP: u8 = 10;

impl Membership {
    /// The group of the device with key `own` in `mesh`, if it is in one.
    pub fn of(mesh: &Mesh, own: &PublicKey) -> Option<Membership> {
        let group = mesh.group_of(own)?.clone();
        let device = mesh.device(own)?;
        let mut members = Vec::new();
        let mut own_index = 0;
        for d in mesh.group_members(&group.name) {
            let m = d.exit_group.as_ref()?;
            if d.public_key == device.public_key {
                own_index = members.len();
            }
            members.push(Member {
                name: d.name.clone(),
                sync_ipv4: m.sync_ipv4,
                uplink_ipv4: m.uplink_ipv4,
                mesh_ipv4: d.ipv4,
                mesh_ipv6: d.ipv6,
            });
        }
        Some(Membership {
            group,
            members,
            own: own_index,
        })
    }

    pub fn me(&self) -> &Member {
        &self.members[self.own]
    }

    /// The other members, in file order.
    pub fn others(&self) -> impl Iterator<Item = &Member> {
        let own = self.own;
        self.members
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i != own)
            .map(|(_, m)| m)
    }

    /// This member's VRRP priority: the member order of the file, first
    /// highest (the mesh file allows at most 16 members, so it stays
    /// above 0).
    pub fn priority(&self) -> u8 {
        let step = u8::try_from(self.own)
            .unwrap_or(u8::MAX)
            .saturating_mul(PRIORITY_STEP);
        FIRST_PRIORITY.saturating_sub(step).max(1)
    }
}

/// The files of one nexd's group daemons, all under one directory of its
/// own: keepalived and conntrackd default to shared paths in /run and
/// /var/lock, which two instances on one host (or in two namespaces of
/// one host) would fight over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub dir: PathBuf,
}

impl Files {
    pub fn new(dir: &Path) -> Files {
        Files {
            dir: dir.to_owned(),
        }
    }
    pub fn keepalived_conf(&self) -> PathBuf {
        self.dir.join("keepalived.conf")
    }
    pub fn keepalived_pid(&self) -> PathBuf {
        self.dir.join("keepalived.pid")
    }
    pub fn vrrp_pid(&self) -> PathBuf {
        self.dir.join("vrrp.pid")
    }
    pub fn conntrackd_conf(&self) -> PathBuf {
        self.dir.join("conntrackd.conf")
    }
    pub fn conntrackd_lock(&self) -> PathBuf {
        self.dir.join("conntrackd.lock")
    }
    pub fn conntrackd_socket(&self) -> PathBuf {
        self.dir.join("conntrackd.ctl")
    }
    pub fn conntrackd_log(&self) -> PathBuf {
        self.dir.join("conntrackd.log")
    }
    /// conntrackd writes none of its own; nexd writes its child's pid here
    /// so a later nexd can end one a crash left.
    pub fn conntrackd_pid(&self) -> PathBuf {
        self.dir.join("conntrackd.pid")
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::keys::PrivateKey;

    /// A mesh with group "eu" of members "x", "y" (and "z" when `three`)
    /// and a client "c"; `unicast` sets VRRP unicast with uplink addresses.
    pub fn mesh(three: bool, unicast: bool) -> (Mesh, Vec<PublicKey>) {
        let names: &[&str] = if three {
            &["x", "y", "z", "c"]
        } else {
            &["x", "y", "c"]
        };
        let keys: Vec<PublicKey> = names
            .iter()
            .map(|_| PrivateKey::generate().public_key())
            .collect();
        let mut text = format!(
            "[[exit_group]]\nname = \"eu\"\negress_ipv4 = \"198.51.100.10/24\"\negress_ipv6 = \"2001:db8::10\"\nuplink = \"up0\"\nsync_interface = \"sync0\"\nvrrp_id = 10\nunicast = {unicast}\n"
        );
        for (i, (name, key)) in names.iter().zip(&keys).enumerate() {
            let n = i + 1;
            text.push_str(&format!(
                "[[device]]\nname = \"{name}\"\npublic_key = \"{key}\"\nipv4 = \"100.64.0.{n}\"\nipv6 = \"fd6e:6578:6400::{n}\"\n"
            ));
            if *name != "c" {
                text.push_str(&format!(
                    "exit_node = true\nexit_group = \"eu\"\nexit_group_sync_ipv4 = \"10.9.0.{n}\"\nexit_group_uplink_ipv4 = \"198.51.100.{n}\"\n"
                ));
            }
        }
        let mesh = crate::mesh::parse(&text).unwrap_or_else(|p| panic!("{p:?}"));
        (mesh, keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_follows_the_file_order() {
        let (mesh, keys) = fixtures::mesh(true, false);
        let y = Membership::of(&mesh, &keys[1]).expect("y is a member");
        assert_eq!(y.me().name, "y");
        assert_eq!(y.own, 1);
        let others: Vec<&str> = y.others().map(|m| m.name.as_str()).collect();
        assert_eq!(others, ["x", "z"]);
        let priorities: Vec<u8> = (0..3)
            .map(|i| Membership::of(&mesh, &keys[i]).expect("member").priority())
            .collect();
        assert_eq!(priorities, [250, 240, 230]);
        assert_eq!(Membership::of(&mesh, &keys[3]), None, "the client is none");
    }
}
