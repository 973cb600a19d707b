//! The mesh's snapshot: how a device that has never seen the mesh tells
//! the current membership from a rolled-back one (issue 21).
//!
//! A running device keeps per-key marks (`verify`), so etcd cannot take it
//! back to anything older than what it verified. A device that starts
//! without a cache has no marks: anything the admin ever signed looks
//! current to it. So a mesh can keep a snapshot (TUF's snapshot and
//! timestamp roles in one record): the serial of every record in force,
//! signed by a separate, online *snapshot key* that may sign nothing else,
//! and valid only until `expires`. The settings (signed by the admin) name
//! that key and the longest validity it may give.
//!
//! A device without memory believes a membership only while a valid
//! snapshot covers it (`fresh`); the snapshot's serials are floors for
//! every record (`membership`). A device with memory (its cache, or a
//! membership it already accepted) keeps following etcd when the snapshot
//! expires and reports it stale: nothing older than what it verified can
//! reach it either way. The snapshot is refreshed by `nexctl mesh
//! refresh-snapshot` (`build` here, the transaction in `admin`), run
//! periodically where the snapshot key is kept.

use std::collections::BTreeMap;

use super::{
    location::{key_id, parse_key_id},
    membership,
    records::{Snapshot, SnapshotPolicy},
    verify::Store,
};

/// The longest validity a new policy allows by default: how long a change
/// (a revocation) can be hidden from a device that has never seen the
/// mesh. The refresher runs well within it (hourly, `dist/`).
pub const DEFAULT_MAX_VALIDITY: u64 = 6 * 3600;
/// How far a snapshot may claim to expire beyond its policy's validity
/// from this device's clock: the clocks of the refresher and the device
/// may disagree by this much.
pub const CLOCK_SKEW: u64 = 300;

/// Whether a device that has no memory of the mesh may believe what it
/// reads, at Unix time `now`; the error says why not.
pub fn fresh(
    policy: Option<&SnapshotPolicy>,
    snapshot: Option<&Snapshot>,
    now: u64,
) -> Result<(), String> {
    let Some(policy) = policy else {
        // The mesh keeps no snapshot: every device believes the newest it
        // can read, as before snapshots existed.
        return Ok(());
    };
    let Some(s) = snapshot else {
        return Err(
            "the mesh keeps a signed snapshot, and etcd holds no valid one (is `nexctl mesh refresh-snapshot` running?)"
                .into(),
        );
    };
    if s.expires <= now {
        return Err(format!(
            "the snapshot (version {}) expired at Unix time {}, {} s ago (is `nexctl mesh refresh-snapshot` running?)",
            s.version,
            s.expires,
            now - s.expires
        ));
    }
    let limit = now
        .saturating_add(policy.max_validity)
        .saturating_add(CLOCK_SKEW);
    if s.expires > limit {
        return Err(format!(
            "the snapshot (version {}) claims to be valid until Unix time {}, beyond the {} s the settings allow (or this device's clock is behind)",
            s.version, s.expires, policy.max_validity
        ));
    }
    Ok(())
}

/// A new snapshot of what `store` holds (with the previous snapshot's
/// floors learnt), valid for `validity` seconds from `now_ms`
/// (milliseconds), and the records it found rolled back (for the
/// refresher to warn about: they stay at the previous snapshot's serials).
pub fn build(store: &Store, now_ms: u64, validity: u64) -> Result<(Snapshot, Vec<String>), String> {
    let policy = store
        .snapshot_policy()
        .ok_or("the mesh settings name no snapshot key (`nexctl mesh snapshot-key` sets one)")?;
    if validity == 0 || validity > policy.max_validity {
        return Err(format!(
            "a validity of {validity} s is not within the 1 to {} s the settings allow",
            policy.max_validity
        ));
    }
    let m = membership::build(store).map_err(|e| e.to_string())?;
    let previous = store.snapshot().map(|k| &k.snapshot);
    let mut devices: BTreeMap<String, u64> = m
        .serials
        .iter()
        .map(|(k, serial)| (key_id(k), *serial))
        .collect();
    // A record in force at the previous snapshot that etcd no longer holds
    // validly stays at its serial, unless a revocation signed after it
    // took it out: deleting or rolling back a record in etcd must not
    // lower what the next snapshot says is in force.
    if let Some(p) = previous {
        for (id, serial) in &p.devices {
            let revoked = parse_key_id(id)
                .and_then(|k| store.revocation(&k))
                .is_some_and(|r| r.serial > *serial);
            if !revoked && !devices.contains_key(id) {
                devices.insert(id.clone(), *serial);
            }
        }
    }
    let settings = store
        .records()
        .find_map(|(_, r)| match r {
            super::verify::Record::Settings(s) => Some(s.serial),
            _ => None,
        })
        .unwrap_or(0);
    let now = now_ms / 1000;
    let snapshot = Snapshot {
        version: now_ms.max(previous.map_or(0, |p| p.version.saturating_add(1))),
        issued: now,
        expires: now.saturating_add(validity),
        serial: store.highest_serial().max(previous.map_or(0, |p| p.serial)),
        settings: settings.max(previous.map_or(0, |p| p.settings)),
        devices,
    };
    let rolled_back = m
        .ignored
        .iter()
        .filter(|i| i.reason.starts_with("rolled back"))
        .map(|i| format!("{}: {}", i.key, i.reason))
        .collect();
    Ok((snapshot, rolled_back))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{
        admin_key::AdminKey,
        fixtures::{device, settings},
        location::Layout,
        records::{DeviceRecord, Revocation, Settings},
        signed::seal,
    };

    struct Mesh {
        admin: AdminKey,
        snapshot_key: AdminKey,
        layout: Layout,
        /// What etcd holds.
        etcd: BTreeMap<String, Vec<u8>>,
    }

    impl Mesh {
        fn new() -> Self {
            let admin = AdminKey::generate();
            let snapshot_key = AdminKey::generate();
            let mut m = Mesh {
                layout: Layout::new("/m"),
                admin,
                snapshot_key,
                etcd: BTreeMap::new(),
            };
            let settings = Settings {
                snapshots: Some(SnapshotPolicy {
                    key: m.snapshot_key.public_key(),
                    max_validity: 3600,
                }),
                ..settings()
            };
            let k = m.layout.settings();
            m.etcd
                .insert(k.clone(), seal(&m.admin, &k, &settings).expect("seal"));
            m
        }

        fn put(&mut self, d: &DeviceRecord) {
            let k = self.layout.device(&d.public_key);
            self.etcd
                .insert(k.clone(), seal(&self.admin, &k, d).expect("seal"));
        }

        fn revoke(&mut self, d: &DeviceRecord, serial: u64) {
            self.etcd.remove(&self.layout.device(&d.public_key));
            let k = self.layout.revoked(&d.public_key);
            let r = Revocation {
                public_key: d.public_key,
                name: d.name.clone(),
                serial,
                every_serial: true,
            };
            self.etcd
                .insert(k.clone(), seal(&self.admin, &k, &r).expect("seal"));
        }

        /// A device's first read of etcd, with no memory.
        fn read(&self) -> Store {
            let mut s = Store::new(self.layout.clone(), self.admin.public_key());
            s.replace_all(self.etcd.clone(), 1);
            s
        }

        /// What the refresher does: read, build, sign, write.
        fn refresh(&mut self, now: u64, validity: u64) -> Snapshot {
            let store = self.read();
            let (snap, _) = build(&store, now * 1000, validity).expect("build");
            let k = self.layout.snapshot();
            self.etcd.insert(
                k.clone(),
                seal(&self.snapshot_key, &k, &snap).expect("seal"),
            );
            snap
        }

        fn names(store: &Store) -> Vec<String> {
            membership::build(store)
                .expect("m")
                .mesh
                .devices
                .into_iter()
                .map(|d| d.name)
                .collect()
        }
    }

    #[test]
    fn a_device_without_memory_does_not_believe_a_rolled_back_etcd() {
        let now = 1_000_000;
        let mut mesh = Mesh::new();
        let a = device("a", 1, 2);
        let mut ex = device("ex", 2, 3);
        ex.roles.exit_node = true;
        mesh.put(&a);
        mesh.put(&ex);
        let before = mesh.etcd.clone();
        // ex revoked (serial 4); the snapshot after it.
        mesh.revoke(&ex, 4);
        let snap = mesh.refresh(now, 600);
        assert!(!snap.devices.contains_key(&key_id(&ex.public_key)));
        assert_eq!(snap.serial, 4);
        // The writer puts etcd back as it was before the revocation,
        // keeping the newest snapshot (it cannot sign another).
        let current = mesh.etcd.clone();
        mesh.etcd = before;
        let k = mesh.layout.snapshot();
        mesh.etcd.insert(k.clone(), current[&k].clone());
        let store = mesh.read();
        let m = membership::build(&store).expect("m");
        assert_eq!(Mesh::names(&store), ["a"], "{:?}", m.ignored);
        let key = mesh.layout.device(&ex.public_key);
        assert!(
            m.ignored
                .iter()
                .any(|i| i.key == key && i.reason.contains("not in the snapshot")),
            "{:?}",
            m.ignored
        );
        assert_eq!(
            fresh(
                store.snapshot_policy(),
                store.snapshot().map(|k| &k.snapshot),
                now + 10
            ),
            Ok(())
        );
        // A device approved after the snapshot is believed.
        let late = device("late", 3, 5);
        mesh.put(&late);
        assert_eq!(Mesh::names(&mesh.read()), ["a", "late"]);
    }

    #[test]
    fn without_a_valid_snapshot_a_device_without_memory_believes_nothing() {
        let now = 1_000_000;
        let mut mesh = Mesh::new();
        mesh.put(&device("a", 1, 2));
        let store = mesh.read();
        let policy = store.snapshot_policy().cloned();
        assert!(policy.is_some());
        let no = fresh(policy.as_ref(), None, now).expect_err("no snapshot");
        assert!(no.contains("holds no valid one"), "{no}");
        let snap = mesh.refresh(now, 600);
        assert_eq!(fresh(policy.as_ref(), Some(&snap), now + 599), Ok(()));
        let old = fresh(policy.as_ref(), Some(&snap), now + 600).expect_err("expired");
        assert!(old.contains("expired"), "{old}");
        // Further ahead than the settings allow (a clock far behind, or
        // a key that overstepped): refused.
        let mut far = snap.clone();
        far.expires = now + 3600 + CLOCK_SKEW + 1;
        assert!(fresh(policy.as_ref(), Some(&far), now).is_err());
        // A mesh without a policy: as before snapshots.
        assert_eq!(fresh(None, None, now), Ok(()));
    }

    #[test]
    fn only_the_snapshot_key_signs_snapshots_and_an_older_one_is_rolled_back() {
        let now = 1_000_000;
        let mut mesh = Mesh::new();
        mesh.put(&device("a", 1, 2));
        let first = mesh.refresh(now, 600);
        let k = mesh.layout.snapshot();
        let first_raw = mesh.etcd[&k].clone();
        let second = mesh.refresh(now + 60, 600);
        assert!(second.version > first.version);
        let mut store = mesh.read();
        assert_eq!(
            store.snapshot().map(|k| k.snapshot.version),
            Some(second.version)
        );
        // The older snapshot written back: rolled back.
        store.put(k.clone(), first_raw);
        assert!(
            store
                .rejected()
                .iter()
                .any(|i| i.key == k && i.reason.starts_with("rolled back")),
            "{:?}",
            store.rejected()
        );
        assert_eq!(
            store.snapshot().map(|k| k.snapshot.version),
            Some(second.version)
        );
        // Signed by the admin key, or by another key: not a snapshot.
        for signer in [&mesh.admin, &AdminKey::generate()] {
            let mut s = mesh.read();
            let mut forged = second.clone();
            forged.version += 10;
            s.put(k.clone(), seal(signer, &k, &forged).expect("seal"));
            assert_eq!(
                s.snapshot().map(|k| k.snapshot.version),
                Some(second.version),
                "a snapshot signed by another key was taken"
            );
        }
        // Deleted from etcd: still the floor.
        store.delete(&k);
        assert_eq!(
            store.snapshot().map(|k| k.snapshot.version),
            Some(second.version)
        );
    }

    #[test]
    fn the_newest_snapshot_survives_a_restart_through_the_cache() {
        let now = 1_000_000;
        let mut mesh = Mesh::new();
        mesh.put(&device("a", 1, 2));
        let snap = mesh.refresh(now, 600);
        let store = mesh.read();
        let dir = std::env::temp_dir().join(format!("nexd-snapcache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        crate::registry::cache::save(&dir, &store, now).expect("save");
        // Restarted; etcd no longer holds any snapshot.
        mesh.etcd.remove(&mesh.layout.snapshot());
        let fresh = Store::new(mesh.layout.clone(), mesh.admin.public_key());
        let mut s = crate::registry::cache::load(&dir, fresh)
            .expect("load")
            .expect("present")
            .store;
        s.replace_all(mesh.etcd.clone(), 5);
        assert_eq!(s.snapshot().map(|k| k.snapshot.version), Some(snap.version));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_refresh_never_lowers_what_is_in_force() {
        let now = 1_000_000;
        let mut mesh = Mesh::new();
        let a = device("a", 1, 2);
        let mut a3 = a.clone();
        a3.serial = 3;
        mesh.put(&a);
        let a2_raw = mesh.etcd[&mesh.layout.device(&a.public_key)].clone();
        mesh.put(&a3);
        let first = mesh.refresh(now, 600);
        assert_eq!(first.devices[&key_id(&a.public_key)], 3);
        // a's serial-2 record written back before the next refresh: the
        // refresher (which learnt its last snapshot) keeps 3, and says so.
        mesh.etcd.insert(mesh.layout.device(&a.public_key), a2_raw);
        let store = mesh.read();
        let (next, rolled_back) = build(&store, (now + 60) * 1000, 600).expect("build");
        assert_eq!(next.devices[&key_id(&a.public_key)], 3);
        assert_eq!(rolled_back.len(), 1, "{rolled_back:?}");
        assert!(next.version > first.version && next.serial >= 3);
        // A revocation after it takes it out.
        mesh.revoke(&a3, 5);
        let (after, _) = build(&mesh.read(), (now + 120) * 1000, 600).expect("build");
        assert!(after.devices.is_empty(), "{after:?}");
        // The validity must be within the policy.
        assert!(build(&mesh.read(), now * 1000, 3601).is_err());
    }
}
