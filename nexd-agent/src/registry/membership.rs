//! From verified records to the `Mesh` the mesh file would give, so the
//! daemon applies registry membership through the same diff-and-apply path
//! as a SIGHUP. Pure: unit-tested without etcd.
//!
//! Signed records can still disagree (an old record written back after a
//! revocation, two records claiming one address after an admin's mistake).
//! The rules, in order: a record a revocation voids is void (every record
//! signed before it, `records::Revocation::voids`); among the rest, the
//! higher serial (the newer signature) wins a name or an address, and the
//! loser is ignored with the reason. (An older value of a key than one
//! already verified never gets here: `verify::Store` rejects it.)
//!
//! The newest snapshot the store verified (`records::Snapshot`) adds
//! floors: settings or a device record older than the serial it lists is
//! rolled back, and a device record it does not list whose serial it
//! covers is no longer in force (replaced or revoked before it). That is
//! what lets a device that never saw the mesh before tell a rolled-back
//! etcd from the current one (`snapshot::fresh`).

use std::collections::{BTreeMap, HashMap};

use super::{
    location::key_id,
    records::{DeviceRecord, Revocation, Roles, Settings, Snapshot},
    signed::Rejection,
    verify::{Ignored, Record, Store},
};
use crate::{
    keys::PublicKey,
    mesh::{self, Device, Mesh},
};

/// The verified membership: the mesh, each device's roles, and what was
/// left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub mesh: Mesh,
    /// Roles of every device of `mesh` (issue 13 moves them into `Device`).
    pub roles: BTreeMap<PublicKey, Roles>,
    /// Serial of every device's record.
    pub serials: BTreeMap<PublicKey, u64>,
    /// Records not used, with their reasons (signature, revocation,
    /// conflict...).
    pub ignored: Vec<Ignored>,
}

impl Membership {
    /// Whether `other` configures the same mesh (ignored records aside).
    pub fn same_mesh(&self, other: &Membership) -> bool {
        self.mesh == other.mesh && self.roles == other.roles
    }
}

/// Why there is no membership at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("the registry has no mesh settings yet (run `nexctl mesh init`)")]
    NoSettings,
    #[error("the registry's mesh settings are not usable: {0}")]
    SettingsRejected(String),
}

/// Builds the membership from everything `store` holds.
pub fn build(store: &Store) -> Result<Membership, MembershipError> {
    let settings_key = store.layout().settings();
    let mut settings: Option<&Settings> = None;
    let mut devices: Vec<(&String, &DeviceRecord)> = Vec::new();
    let mut endpoints: HashMap<PublicKey, &str> = HashMap::new();
    for (key, record) in store.records() {
        match record {
            Record::Settings(s) => settings = Some(s),
            Record::Device(d) => devices.push((key, d)),
            Record::Endpoint(k, e) => {
                endpoints.insert(*k, e.endpoint.as_str());
            }
            Record::Revocation(_)
            | Record::Request(_)
            | Record::Snapshot(_)
            | Record::Bookkeeping => {}
        }
    }
    let mut ignored = store.rejected();
    let Some(settings) = settings else {
        return Err(match ignored.iter().find(|i| i.key == settings_key) {
            Some(i) => MembershipError::SettingsRejected(i.reason.clone()),
            None => MembershipError::NoSettings,
        });
    };
    let snapshot = store.snapshot().map(|k| &k.snapshot);
    if let Some(s) = snapshot
        && settings.serial < s.settings
    {
        return Err(MembershipError::SettingsRejected(
            Rejection::RolledBack(format!(
                "the settings' serial {} is older than serial {} in the snapshot of version {}",
                settings.serial, s.settings, s.version
            ))
            .to_string(),
        ));
    }
    Ok(assemble(
        settings,
        devices,
        &endpoints,
        Floors {
            revocation: &|k| store.revocation(k),
            snapshot,
        },
        std::mem::take(&mut ignored),
    ))
}

/// What voids a validly signed device record besides its key's own mark.
struct Floors<'a> {
    revocation: &'a dyn Fn(&PublicKey) -> Option<&'a Revocation>,
    snapshot: Option<&'a Snapshot>,
}

/// Why `d` is older than what `s` says is in force, if it is.
fn stale(s: &Snapshot, d: &DeviceRecord) -> Option<String> {
    match s.devices.get(&key_id(&d.public_key)) {
        Some(&floor) if d.serial < floor => Some(format!(
            "serial {} is older than serial {floor} in the snapshot of version {}",
            d.serial, s.version
        )),
        None if d.serial <= s.serial => Some(format!(
            "serial {} is not in the snapshot of version {}, which covers every serial up to {}: the record was replaced or revoked before it",
            d.serial, s.version, s.serial
        )),
        _ => None,
    }
}

fn assemble(
    settings: &Settings,
    mut devices: Vec<(&String, &DeviceRecord)>,
    endpoints: &HashMap<PublicKey, &str>,
    floors: Floors<'_>,
    mut ignored: Vec<Ignored>,
) -> Membership {
    // Newest first, so the newest signature claims names and addresses.
    devices.sort_by(|a, b| b.1.serial.cmp(&a.1.serial).then(a.0.cmp(b.0)));
    let mut names: HashMap<&str, &str> = HashMap::new();
    let mut v4s: HashMap<std::net::Ipv4Addr, &str> = HashMap::new();
    let mut v6s: HashMap<std::net::Ipv6Addr, &str> = HashMap::new();
    let mut out: Vec<Device> = Vec::new();
    let mut roles = BTreeMap::new();
    let mut serials = BTreeMap::new();
    for (key, d) in devices {
        let mut reject = |r: Rejection| {
            ignored.push(Ignored {
                key: key.clone(),
                reason: r.to_string(),
            })
        };
        if let Some(why) = floors.snapshot.and_then(|s| stale(s, d)) {
            reject(Rejection::RolledBack(why));
            continue;
        }
        if let Some(rev) = (floors.revocation)(&d.public_key)
            && rev.voids(d)
        {
            reject(Rejection::Revoked(format!(
                "device {:?} was revoked at serial {} (this record has serial {}{})",
                d.name,
                rev.serial,
                d.serial,
                match d.after_revocation {
                    Some(a) => format!(", signed after the revocation at serial {a}"),
                    None => String::new(),
                }
            )));
            continue;
        }
        if let Err(m) = mesh::check_v4_host(d.ipv4, settings.ipv4_prefix) {
            reject(Rejection::Invalid(format!("ipv4 {} {m}", d.ipv4)));
            continue;
        }
        if let Err(m) = mesh::check_v6_host(d.ipv6, settings.ipv6_prefix) {
            reject(Rejection::Invalid(format!("ipv6 {} {m}", d.ipv6)));
            continue;
        }
        let clash = names
            .get(d.name.as_str())
            .map(|o| format!("name {:?} is already used by a newer record ({o})", d.name))
            .or_else(|| {
                v4s.get(&d.ipv4)
                    .map(|o| format!("ipv4 {} is already used by {o}", d.ipv4))
            })
            .or_else(|| {
                v6s.get(&d.ipv6)
                    .map(|o| format!("ipv6 {} is already used by {o}", d.ipv6))
            });
        if let Some(c) = clash {
            reject(Rejection::Conflict(c));
            continue;
        }
        names.insert(&d.name, key);
        v4s.insert(d.ipv4, key);
        v6s.insert(d.ipv6, key);
        // The admin's endpoint wins; else the one the device publishes.
        let endpoint = d
            .endpoint
            .as_deref()
            .or_else(|| endpoints.get(&d.public_key).copied())
            .and_then(|e| mesh::parse_endpoint(e).ok());
        roles.insert(d.public_key, d.roles.clone());
        serials.insert(d.public_key, d.serial);
        out.push(Device {
            name: d.name.clone(),
            public_key: d.public_key,
            endpoint,
            listen_port: d.listen_port,
            ipv4: d.ipv4,
            ipv6: d.ipv6,
            exit_node: d.roles.exit_node,
            exit_clients: d
                .roles
                .exit_clients
                .as_ref()
                .map(|c| c.iter().cloned().collect()),
            exit_rate_limit: None,
            exit_flow_limit: None,
            exit_new_flow_rate: None,
            // Out of range (only a hand-made record): no capacity.
            exit_capacity: d
                .roles
                .exit_capacity
                .and_then(crate::mesh::Rate::from_bits_per_second),
            exit_group: None,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    ignored.sort_by(|a, b| a.key.cmp(&b.key));
    Membership {
        mesh: Mesh {
            ipv4_prefix: settings.ipv4_prefix,
            ipv6_prefix: settings.ipv6_prefix,
            persistent_keepalive: settings.persistent_keepalive,
            mtu: settings.mtu,
            agent_port: settings.agent_port,
            devices: out,
            exit_groups: Vec::new(),
        },
        roles,
        serials,
        ignored,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        keys::PrivateKey,
        registry::{
            admin_key::AdminKey,
            fixtures::{device, settings},
            location::Layout,
            records::{EndpointRecord, Revocation},
            signed::seal,
        },
    };

    struct Fixture {
        admin: AdminKey,
        store: Store,
    }

    impl Fixture {
        /// Whether the membership built now lists `k`.
        fn in_mesh(&self, k: &PublicKey) -> bool {
            build(&self.store)
                .expect("membership")
                .mesh
                .device(k)
                .is_some()
        }

        fn new() -> Self {
            let admin = AdminKey::generate();
            let mut store = Store::new(Layout::new("/m"), admin.public_key());
            let key = store.layout().settings();
            store.put(key.clone(), seal(&admin, &key, &settings()).expect("seal"));
            Fixture { admin, store }
        }

        fn add(&mut self, d: &DeviceRecord) -> String {
            let key = self.store.layout().device(&d.public_key);
            self.store
                .put(key.clone(), seal(&self.admin, &key, d).expect("seal"));
            key
        }
    }

    #[test]
    fn signed_records_become_the_mesh_the_file_would_give() {
        let mut f = Fixture::new();
        let a = device("a", 1, 2);
        let mut b = device("b", 2, 3);
        b.endpoint = Some("192.0.2.2:51820".into());
        b.roles.exit_node = true;
        b.roles.exit_capacity = Some(2_000_000_000);
        f.add(&a);
        f.add(&b);
        // a publishes its endpoint under its lease.
        let ep = f.store.layout().endpoint(&a.public_key);
        f.store.put(
            ep,
            serde_json::to_vec(&EndpointRecord {
                endpoint: "198.51.100.7:4000".into(),
            })
            .expect("json"),
        );
        let m = build(&f.store).expect("membership");
        assert!(m.ignored.is_empty(), "{:?}", m.ignored);
        let text = format!(
            "[mesh]\nipv4_prefix = \"100.64.0.0/10\"\nipv6_prefix = \"fd6e:6578:6400::/48\"\n\
             [[device]]\nname = \"a\"\npublic_key = \"{}\"\nendpoint = \"198.51.100.7:4000\"\nlisten_port = 51820\nipv4 = \"100.64.0.1\"\nipv6 = \"fd6e:6578:6400::1\"\n\
             [[device]]\nname = \"b\"\npublic_key = \"{}\"\nendpoint = \"192.0.2.2:51820\"\nipv4 = \"100.64.0.2\"\nipv6 = \"fd6e:6578:6400::2\"\nexit_node = true\nexit_capacity = \"2gbit\"\n",
            a.public_key, b.public_key
        );
        assert_eq!(m.mesh, mesh::parse(&text).expect("file"));
        assert!(m.roles[&b.public_key].exit_node);
        assert!(!m.roles[&a.public_key].exit_node);
    }

    #[test]
    fn forged_moved_and_tampered_records_are_ignored_with_reasons() {
        let mut f = Fixture::new();
        let a = device("a", 1, 2);
        f.add(&a);
        // Unsigned device record.
        let x = device("x", 9, 9);
        let kx = f.store.layout().device(&x.public_key);
        f.store
            .put(kx.clone(), serde_json::to_vec(&x).expect("json"));
        // Signed by someone else.
        let y = device("y", 10, 10);
        let ky = f.store.layout().device(&y.public_key);
        let other = AdminKey::generate();
        f.store
            .put(ky.clone(), seal(&other, &ky, &y).expect("seal"));
        // A's valid record copied under another key's path.
        let z = PrivateKey::generate().public_key();
        let kz = f.store.layout().device(&z);
        let raw = f
            .store
            .raw(&f.store.layout().device(&a.public_key))
            .expect("a")
            .to_vec();
        f.store.put(kz.clone(), raw);
        let m = build(&f.store).expect("membership");
        assert_eq!(m.mesh.devices.len(), 1);
        let reason = |k: &str| {
            m.ignored
                .iter()
                .find(|i| i.key == k)
                .map(|i| i.reason.clone())
                .unwrap_or_default()
        };
        assert_eq!(reason(&kx), "missing signature");
        assert!(reason(&ky).contains("does not verify"), "{}", reason(&ky));
        assert!(reason(&kz).contains("does not verify"), "{}", reason(&kz));
        assert_eq!(m.ignored.len(), 3);
    }

    #[test]
    fn conflicts_go_to_the_newer_record_and_revocations_void_older_serials() {
        let mut f = Fixture::new();
        let old = device("a", 1, 2);
        let new = device("b", 1, 5);
        let k_old = f.add(&old);
        f.add(&new);
        let m = build(&f.store).expect("membership");
        assert_eq!(m.mesh.devices.len(), 1);
        assert_eq!(m.mesh.devices[0].name, "b");
        assert!(
            m.ignored[0]
                .reason
                .contains("ipv4 100.64.0.1 is already used")
        );
        assert_eq!(m.ignored[0].key, k_old);

        // Revoke `b` at serial 5; its record written back is void, a newer
        // approval (serial 6) is not.
        let kr = f.store.layout().revoked(&new.public_key);
        let rev = Revocation {
            public_key: new.public_key,
            name: "b".into(),
            serial: 5,
            every_serial: false,
        };
        f.store
            .put(kr.clone(), seal(&f.admin, &kr, &rev).expect("seal"));
        f.store.delete(&kr); // deleting the revocation does not undo it
        let m = build(&f.store).expect("membership");
        assert_eq!(
            m.mesh
                .devices
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert!(m.ignored.iter().any(|i| i.reason.starts_with("revoked")));
        let mut again = new.clone();
        again.serial = 6;
        again.ipv4 = std::net::Ipv4Addr::new(100, 64, 0, 3);
        again.ipv6 = "fd6e:6578:6400::3".parse().expect("v6");
        f.add(&again);
        let m = build(&f.store).expect("membership");
        assert_eq!(m.mesh.devices.len(), 2);
    }

    /// The signed value `add` wrote for `d`, as an etcd writer saves it.
    fn raw_of(f: &Fixture, d: &DeviceRecord) -> Vec<u8> {
        f.store
            .raw(&f.store.layout().device(&d.public_key))
            .expect("stored")
            .to_vec()
    }

    fn ignored_reason(m: &Membership, key: &str) -> String {
        m.ignored
            .iter()
            .find(|i| i.key == key)
            .map(|i| i.reason.clone())
            .unwrap_or_default()
    }

    #[test]
    fn a_role_change_rolled_back_by_an_etcd_writer_is_not_believed() {
        // Issue 21, item 2: ex as exit node (serial 2), then without the
        // role (serial 3); the serial-2 record written back.
        let mut f = Fixture::new();
        let mut ex = device("ex", 1, 2);
        ex.roles.exit_node = true;
        let key = f.add(&ex);
        let as_exit_node = raw_of(&f, &ex);
        let mut without = ex.clone();
        without.roles.exit_node = false;
        without.serial = 3;
        f.add(&without);
        assert!(!build(&f.store).expect("m").roles[&ex.public_key].exit_node);
        f.store.put(key.clone(), as_exit_node);
        let m = build(&f.store).expect("membership");
        assert!(
            !m.roles.get(&ex.public_key).is_some_and(|r| r.exit_node),
            "the rolled-back exit-node record was believed: {:?}",
            m.roles
        );
        let reason = ignored_reason(&m, &key);
        assert!(reason.contains("rolled back"), "{reason:?}");
        assert!(
            reason.contains("serial 2") && reason.contains("serial 3"),
            "{reason}"
        );

        // The same for exit_clients: serving only `a` (4), then every
        // device (5); the serial-4 record written back.
        let mut only_a = without.clone();
        only_a.roles = Roles {
            exit_node: true,
            exit_clients: Some(vec!["a".into()]),
            ..Roles::default()
        };
        only_a.serial = 4;
        f.add(&only_a);
        let narrow = raw_of(&f, &only_a);
        let mut everyone = only_a.clone();
        everyone.roles.exit_clients = None;
        everyone.serial = 5;
        f.add(&everyone);
        f.store.put(key.clone(), narrow);
        let m = build(&f.store).expect("membership");
        assert!(m.mesh.device(&ex.public_key).is_none(), "{:?}", m.mesh);
        assert!(ignored_reason(&m, &key).contains("rolled back"));
        // The newest record written back is believed again.
        f.add(&everyone);
        let m = build(&f.store).expect("membership");
        assert_eq!(m.roles[&ex.public_key], everyone.roles);
    }

    #[test]
    fn rolled_back_settings_are_not_believed() {
        let mut f = Fixture::new();
        let key = f.store.layout().settings();
        let first = f.store.raw(&key).expect("settings").to_vec();
        let mut newer = settings();
        newer.mtu = 1380;
        newer.serial = 4;
        f.store
            .put(key.clone(), seal(&f.admin, &key, &newer).expect("seal"));
        assert_eq!(build(&f.store).expect("m").mesh.mtu, 1380);
        f.store.put(key.clone(), first);
        match build(&f.store) {
            Err(MembershipError::SettingsRejected(r)) => assert!(r.contains("rolled back"), "{r}"),
            other => panic!("the serial-1 settings were believed again: {other:?}"),
        }
    }

    #[test]
    fn a_different_record_with_a_serial_already_verified_is_not_believed() {
        // Two records of one key with one serial can only come from an
        // admin misled about the serial; the first verified stays.
        let mut f = Fixture::new();
        let a = device("a", 1, 3);
        let key = f.add(&a);
        let mut other = a.clone();
        other.roles.exit_node = true;
        f.add(&other);
        let m = build(&f.store).expect("membership");
        assert!(!m.roles.get(&a.public_key).is_some_and(|r| r.exit_node));
        assert!(ignored_reason(&m, &key).contains("rolled back"), "{m:?}");
        // The first one written again is fine.
        f.add(&a);
        assert!(f.in_mesh(&a.public_key));
    }

    #[test]
    fn a_revocation_voids_every_record_of_the_device_whatever_its_serial() {
        // Issue 21, item 3: the admin, misled by a counter set back,
        // revoked ex at serial 2; ex's serial-5 record is written back.
        let mut f = Fixture::new();
        let mut ex = device("ex", 1, 5);
        ex.roles.exit_node = true;
        let kr = f.store.layout().revoked(&ex.public_key);
        let revoke = |f: &mut Fixture, serial: u64| {
            let r = Revocation {
                public_key: ex.public_key,
                name: "ex".into(),
                serial,
                every_serial: true,
            };
            f.store
                .put(kr.clone(), seal(&f.admin, &kr, &r).expect("seal"));
        };
        revoke(&mut f, 2);
        f.store.delete(&kr);
        let key = f.add(&ex);
        let m = build(&f.store).expect("membership");
        assert!(
            m.mesh.device(&ex.public_key).is_none(),
            "the serial-5 record brought ex back after its revocation at 2"
        );
        assert!(ignored_reason(&m, &key).starts_with("revoked"), "{m:?}");

        // Approved again after the revocation: the new record names it.
        let mut again = ex.clone();
        again.serial = 6;
        again.after_revocation = Some(2);
        f.add(&again);
        assert!(f.in_mesh(&ex.public_key));
        // Revoked again: that record is void too, whatever its serial; only
        // one naming the new revocation counts.
        revoke(&mut f, 7);
        let mut higher = again.clone();
        higher.serial = 9;
        f.add(&higher);
        assert!(!f.in_mesh(&ex.public_key));
        let mut third = higher.clone();
        third.serial = 10;
        third.after_revocation = Some(7);
        f.add(&third);
        assert!(f.in_mesh(&ex.public_key));
    }

    #[test]
    fn records_outside_the_prefixes_and_missing_settings_are_reported() {
        let mut f = Fixture::new();
        let mut d = device("a", 1, 2);
        d.ipv4 = std::net::Ipv4Addr::new(10, 0, 0, 1);
        f.add(&d);
        let m = build(&f.store).expect("membership");
        assert!(m.mesh.devices.is_empty());
        assert!(m.ignored[0].reason.contains("not inside the mesh prefix"));

        let empty = Store::new(Layout::new("/m"), f.admin.public_key());
        assert_eq!(build(&empty), Err(MembershipError::NoSettings));
        let mut forged = Store::new(Layout::new("/m"), f.admin.public_key());
        let key = forged.layout().settings();
        forged.put(key.clone(), serde_json::to_vec(&settings()).expect("json"));
        assert!(matches!(
            build(&forged),
            Err(MembershipError::SettingsRejected(_))
        ));
    }
}
