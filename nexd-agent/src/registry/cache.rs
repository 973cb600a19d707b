//! The last verified membership, kept in the state directory so a device
//! that starts while etcd is unreachable comes up with the mesh it last
//! knew. The file holds the raw signed values, not the result: on load
//! they go through the same verification as values read from etcd, so a
//! changed cache file cannot change the mesh either.
//!
//! It also keeps what the device verified (issue 21): every revocation,
//! and per key the serial and digest of the newest signed value (`Mark`),
//! so after a restart an etcd writer still cannot make it believe an older
//! value. Marks are plain numbers, not signed values: an edited cache can
//! raise one (and so hide a record until the admin signs above it, as
//! deleting the record would) but never make anything believed.
//!
//! Written atomically (a temporary file, fsync, rename, fsync of the
//! directory) with mode 0600.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use serde::{Deserialize, Serialize};

use super::{
    location::Entry,
    verify::{Mark, Record, Store},
};

/// File name inside the state directory.
pub const CACHE_FILE: &str = "registry-cache.json";
/// Version 2 added `marks`; a version 1 file is still read (its marks are
/// those of the values it holds).
const VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    prefix: String,
    revision: i64,
    /// Unix seconds of the write.
    saved_at: u64,
    /// Settings, device records, revocations and endpoints, as stored.
    entries: Vec<(String, String)>,
    /// Every revocation remembered, also those deleted from etcd since
    /// (signed values, verified on load like the rest).
    revocations: Vec<(String, String)>,
    /// Per key, the newest signed value verified: key, serial, digest
    /// (base64).
    #[serde(default)]
    marks: Vec<(String, u64, String)>,
    /// The newest snapshot verified, also if etcd no longer holds it (a
    /// signed value, verified on load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
}

/// What a load found.
#[derive(Debug)]
pub struct Cached {
    pub store: Store,
    pub saved_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read the registry cache {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write the registry cache {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("the registry cache {path} is not readable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(CACHE_FILE)
}

/// Writes what `store` holds that a restart needs.
pub fn save(state_dir: &Path, store: &Store, now: u64) -> Result<(), CacheError> {
    let layout = store.layout();
    let entries = store
        .entries()
        .filter(|(k, _)| {
            matches!(
                layout.classify(k),
                Some(
                    Entry::Settings
                        | Entry::Snapshot
                        | Entry::Device(_)
                        | Entry::Revoked(_)
                        | Entry::Endpoint(_)
                )
            )
        })
        .map(|(k, s)| (k.clone(), String::from_utf8_lossy(&s.raw).into_owned()))
        .collect();
    let file = CacheFile {
        version: VERSION,
        prefix: layout.prefix().to_owned(),
        revision: store.revision,
        saved_at: now,
        entries,
        revocations: store
            .revocations()
            .map(|r| (r.key.clone(), String::from_utf8_lossy(&r.raw).into_owned()))
            .collect(),
        marks: store
            .marks()
            .map(|(k, m)| (k.clone(), m.serial, BASE64.encode(m.digest)))
            .collect(),
        snapshot: store
            .snapshot()
            .map(|k| String::from_utf8_lossy(&k.raw).into_owned()),
    };
    let target = path(state_dir);
    let werr = |source| CacheError::Write {
        path: target.clone(),
        source,
    };
    let text = serde_json::to_vec(&file).map_err(|e| werr(io::Error::other(e)))?;
    crate::state_file::replace(&target, &text).map_err(werr)
}

/// Reads the cache into a store verified against `store`'s admin key and
/// prefix (a cache of another mesh or another admin yields no records).
/// `Ok(None)` when there is no cache.
pub fn load(state_dir: &Path, mut store: Store) -> Result<Option<Cached>, CacheError> {
    let p = path(state_dir);
    let text = match fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CacheError::Read { path: p, source }),
    };
    let file: CacheFile = serde_json::from_slice(&text).map_err(|e| CacheError::Corrupt {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    if !(1..=VERSION).contains(&file.version) {
        return Err(CacheError::Corrupt {
            path: p,
            reason: format!("version {} (this nexd writes {VERSION})", file.version),
        });
    }
    if file.prefix != store.layout().prefix() {
        return Err(CacheError::Corrupt {
            path: p,
            reason: format!(
                "it is for prefix {}, not {}",
                file.prefix,
                store.layout().prefix()
            ),
        });
    }
    for (k, serial, digest) in &file.marks {
        // A mark that does not parse is not learnt (the values it was for
        // set their own marks below).
        let Some(digest) = BASE64
            .decode(digest)
            .ok()
            .and_then(|d| <[u8; 16]>::try_from(d.as_slice()).ok())
        else {
            continue;
        };
        store.learn_mark(
            k,
            Mark {
                serial: *serial,
                digest,
            },
        );
    }
    for (k, v) in &file.revocations {
        // A revocation that does not verify is simply not learnt.
        let _ = store.learn_revocation(k, v.as_bytes());
    }
    store.replace_all(
        file.entries.into_iter().map(|(k, v)| (k, v.into_bytes())),
        file.revision,
    );
    if let Some(raw) = &file.snapshot {
        // After the settings, which name the key it is verified with; one
        // that does not verify is simply not learnt.
        let _ = store.learn_snapshot(raw.as_bytes());
    }
    Ok(Some(Cached {
        store,
        saved_at: file.saved_at,
    }))
}

/// Whether `store` holds anything worth caching (a verified settings
/// record): an empty or forged registry must not overwrite a good cache.
pub fn worth_saving(store: &Store) -> bool {
    store
        .records()
        .any(|(_, r)| matches!(r, Record::Settings(_)))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::registry::{
        admin_key::AdminKey,
        fixtures::{device, settings},
        location::Layout,
        membership,
        signed::seal,
    };

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nexd-cache-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("dir");
        d
    }

    fn populated(admin: &AdminKey) -> Store {
        let mut s = Store::new(Layout::new("/m"), admin.public_key());
        let k = s.layout().settings();
        s.put(k.clone(), seal(admin, &k, &settings()).expect("seal"));
        let d = device("a", 1, 2);
        let k = s.layout().device(&d.public_key);
        s.put(k.clone(), seal(admin, &k, &d).expect("seal"));
        s.revision = 42;
        s
    }

    #[test]
    fn cache_round_trips_with_mode_0600() {
        let d = dir("rt");
        let admin = AdminKey::generate();
        let store = populated(&admin);
        save(&d, &store, 7).expect("save");
        let mode = fs::metadata(path(&d)).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let fresh = Store::new(Layout::new("/m"), admin.public_key());
        let cached = load(&d, fresh).expect("load").expect("present");
        assert_eq!(cached.saved_at, 7);
        assert_eq!(cached.store.revision, 42);
        assert_eq!(
            membership::build(&cached.store).expect("m"),
            membership::build(&store).expect("m")
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn what_a_device_verified_before_a_restart_cannot_be_rolled_back() {
        // Issue 21, item 2, across a restart: the device saw serial 3 of
        // a record, saved its cache, restarted; etcd then offers serial 2.
        let d = dir("hw");
        let admin = AdminKey::generate();
        let mut store = populated(&admin);
        let (key, mut rec) = store
            .records()
            .find_map(|(k, r)| match r {
                Record::Device(d) => Some((k.clone(), d.clone())),
                _ => None,
            })
            .expect("a device");
        let serial2 = store.raw(&key).expect("raw").to_vec();
        rec.serial = 3;
        rec.roles.exit_node = true;
        store.put(key.clone(), seal(&admin, &key, &rec).expect("seal"));
        save(&d, &store, 7).expect("save");
        let fresh = Store::new(Layout::new("/m"), admin.public_key());
        let mut cached = load(&d, fresh).expect("load").expect("present").store;
        // A full read that finds the older record.
        let settings = cached.layout().settings();
        let kvs = vec![
            (settings.clone(), cached.raw(&settings).expect("s").to_vec()),
            (key.clone(), serial2),
        ];
        cached.replace_all(kvs, 50);
        let m = membership::build(&cached).expect("m");
        assert!(
            m.mesh.devices.is_empty(),
            "the serial-2 record was believed"
        );
        assert!(
            m.ignored
                .iter()
                .any(|i| i.key == key && i.reason.contains("rolled back")),
            "{:?}",
            m.ignored
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn an_edited_cache_is_verified_again_and_the_edit_ignored() {
        let d = dir("edit");
        let admin = AdminKey::generate();
        save(&d, &populated(&admin), 7).expect("save");
        let text = fs::read_to_string(path(&d)).expect("read");
        fs::write(path(&d), text.replace("100.64.0.1", "100.64.0.9")).expect("write");
        let fresh = Store::new(Layout::new("/m"), admin.public_key());
        let cached = load(&d, fresh).expect("load").expect("present");
        let m = membership::build(&cached.store).expect("m");
        assert!(m.mesh.devices.is_empty());
        assert_eq!(m.ignored.len(), 1, "{:?}", m.ignored);
        // Another admin's key: nothing verifies, not even the settings.
        let other = Store::new(Layout::new("/m"), AdminKey::generate().public_key());
        let cached = load(&d, other).expect("load").expect("present");
        assert!(membership::build(&cached.store).is_err());
        assert!(!worth_saving(&cached.store));
        // Another prefix: refused outright.
        let elsewhere = Store::new(Layout::new("/n"), admin.public_key());
        assert!(matches!(
            load(&d, elsewhere),
            Err(CacheError::Corrupt { .. })
        ));
        assert!(
            load(
                &dir("none"),
                Store::new(Layout::new("/m"), admin.public_key())
            )
            .expect("no file")
            .is_none()
        );
        let _ = fs::remove_dir_all(&d);
    }
}
