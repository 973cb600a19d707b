//! The verifying reader: every value under the prefix, each checked once
//! when it arrives (signature, key path, shape), so a watch event costs one
//! verification and not a pass over the whole mesh.
//!
//! Nothing that fails a check is used; it stays here with its reason, so
//! `nexctl mesh list` and the device's status can show and count it.
//!
//! A signature proves who wrote a value, not that it is the newest: an
//! etcd writer can put back any value the admin ever signed. So the store
//! keeps, per key, the newest signed value it verified (a `Mark`: its
//! serial and a digest), also across full reads and, through the cache,
//! restarts; an older value of that key is rejected as rolled back
//! (issue 21).
//!
//! Anyone with the shared device credential can also write junk under the
//! prefix. What a store keeps of it is bounded: keys of no known kind are
//! counted and the first `MAX_UNKNOWN_LISTED` named, never kept; unsigned
//! values (requests, endpoints, bookkeeping) over `MAX_UNSIGNED_VALUE`
//! bytes and rejected values over `MAX_REJECTED_RAW` are judged and not
//! kept; and a device's store (`Store::for_device`) keeps no bookkeeping
//! and no join request but its own and those under its name.

use std::collections::{BTreeMap, BTreeSet};

use blake2::{Blake2s256, Digest as _};
use serde::Serialize;

use super::{
    admin_key::AdminPublicKey,
    location::{Entry, Layout},
    records::{
        DeviceRecord, EndpointRecord, JoinRequest, Revocation, Settings, Snapshot, SnapshotPolicy,
    },
    signed::{self, Rejection},
};
use crate::{keys::PublicKey, mesh};

/// Keys of no known kind named in `rejected` (the rest only counted).
pub const MAX_UNKNOWN_LISTED: usize = 32;
/// The largest unsigned value (join request, endpoint, bookkeeping) taken:
/// each is a short JSON object or an id.
pub const MAX_UNSIGNED_VALUE: usize = 1024;
/// The largest rejected value kept as it was written (for change
/// detection and the cache); a larger one is judged, then dropped.
pub const MAX_REJECTED_RAW: usize = 4096;
/// The longest key text kept for a key of no known kind.
const MAX_UNKNOWN_KEY: usize = 200;

/// Whose view a store is: the admin keeps everything it needs to decide;
/// a device only what it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    Admin,
    Device { own: PublicKey, name: String },
}

/// A value that passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Settings(Settings),
    Snapshot(Snapshot),
    Device(DeviceRecord),
    Revocation(Revocation),
    Request(JoinRequest),
    Endpoint(PublicKey, EndpointRecord),
    Bookkeeping,
}

impl Record {
    /// The serial a signed record carries, for its key's mark (a
    /// snapshot's version; `None` for unsigned records).
    pub fn serial(&self) -> Option<u64> {
        match self {
            Record::Settings(s) => Some(s.serial),
            Record::Snapshot(s) => Some(s.version),
            Record::Device(d) => Some(d.serial),
            Record::Revocation(r) => Some(r.serial),
            Record::Request(_) | Record::Endpoint(..) | Record::Bookkeeping => None,
        }
    }
}

/// The newest signed value verified at one key: its serial, and a digest
/// of the value as stored, so a second value with the same serial (which
/// only an admin misled about the serials can sign) is told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub serial: u64,
    pub digest: [u8; 16],
}

impl Mark {
    pub fn of(serial: u64, raw: &[u8]) -> Mark {
        let full = Blake2s256::digest(raw);
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&full[..16]);
        Mark { serial, digest }
    }
}

/// One etcd value and what the checks made of it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub raw: Vec<u8>,
    pub checked: Result<Record, Rejection>,
}

/// A record that is not used, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub key: String,
    pub reason: String,
}

/// The newest valid snapshot seen, with the signed value it came in, so
/// the cache can keep it signed; kept also after its key was deleted.
#[derive(Debug, Clone)]
pub struct KeptSnapshot {
    pub snapshot: Snapshot,
    pub raw: Vec<u8>,
}

/// A valid revocation with the signed value it came in, so the cache can
/// keep it signed.
#[derive(Debug, Clone)]
pub struct Remembered {
    pub revocation: Revocation,
    pub key: String,
    pub raw: Vec<u8>,
}

/// Every value under one mesh prefix, verified against the admin key.
#[derive(Debug, Clone)]
pub struct Store {
    layout: Layout,
    admin: AdminPublicKey,
    entries: BTreeMap<String, Stored>,
    /// Every valid revocation ever seen, also after its key was deleted:
    /// deleting a revocation and writing an old record back must not
    /// bring a revoked device back for a device that saw the revocation.
    remembered: BTreeMap<PublicKey, Remembered>,
    /// The newest valid snapshot seen: its serials are floors for every
    /// record (`membership`), also once etcd no longer holds it.
    snapshot: Option<KeptSnapshot>,
    /// The newest signed value verified per key, also after the key was
    /// deleted or overwritten: never below it again.
    marks: BTreeMap<String, Mark>,
    /// The highest serial of any validly signed value seen (also of
    /// values rejected as rolled back): the admin signs above it.
    highest_serial: u64,
    /// Bumped whenever a mark moves, so the device knows its cache is
    /// behind.
    marks_generation: u64,
    /// Keys of no known kind (the first few) and how many were written.
    unknown: BTreeSet<String>,
    unknown_seen: u64,
    scope: Scope,
    /// The etcd revision this content is at (0: never read).
    pub revision: i64,
}

impl Store {
    pub fn new(layout: Layout, admin: AdminPublicKey) -> Self {
        Store {
            layout,
            admin,
            entries: BTreeMap::new(),
            remembered: BTreeMap::new(),
            snapshot: None,
            marks: BTreeMap::new(),
            highest_serial: 0,
            marks_generation: 0,
            unknown: BTreeSet::new(),
            unknown_seen: 0,
            scope: Scope::Admin,
            revision: 0,
        }
    }

    /// A device's store: no bookkeeping, and no join request but `own`'s
    /// and those under `name` (`requests::claims` shows those).
    pub fn for_device(layout: Layout, admin: AdminPublicKey, own: PublicKey, name: &str) -> Self {
        Store {
            scope: Scope::Device {
                own,
                name: name.to_owned(),
            },
            ..Store::new(layout, admin)
        }
    }

    /// Whether this store keeps `record` (found valid) at all.
    fn wanted(&self, record: &Record) -> bool {
        match (&self.scope, record) {
            (Scope::Admin, _) => true,
            (Scope::Device { .. }, Record::Bookkeeping) => false,
            (Scope::Device { own, name }, Record::Request(q)) => {
                q.public_key == *own || q.name == *name
            }
            (Scope::Device { .. }, _) => true,
        }
    }

    /// A key of no known kind was written: counted, named while there is
    /// room, never kept.
    fn note_unknown(&mut self, key: &str) {
        self.unknown_seen += 1;
        if self.unknown.len() < MAX_UNKNOWN_LISTED {
            let mut end = key.len().min(MAX_UNKNOWN_KEY);
            while !key.is_char_boundary(end) {
                end -= 1;
            }
            self.unknown.insert(key[..end].to_owned());
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn admin(&self) -> &AdminPublicKey {
        &self.admin
    }

    /// Replaces the whole content (a full read).
    ///
    /// The signature checks of a large read (a thousand devices at
    /// start-up) are spread over the machine's cores: they are most of its
    /// cost, and each is independent.
    pub fn replace_all(&mut self, kvs: impl IntoIterator<Item = (String, Vec<u8>)>, revision: i64) {
        self.entries.clear();
        self.unknown.clear();
        self.unknown_seen = 0;
        let mut known = Vec::new();
        for (k, v) in kvs {
            match self.layout.classify(&k) {
                None => {}
                Some(Entry::Unknown) => self.note_unknown(&k),
                Some(_) => known.push((k, v)),
            }
        }
        // The settings first: they name the key the snapshot is checked with.
        let settings = self.layout.settings();
        if let Some(i) = known.iter().position(|(k, _)| *k == settings) {
            let (k, v) = known.swap_remove(i);
            let checked = self.check_one(&k, &v);
            self.insert_checked(k, v, checked);
        }
        let kvs = known;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let this: &Store = self;
        let checked: Vec<Result<Record, Rejection>> = if kvs.len() < 64 || threads < 2 {
            kvs.iter().map(|(k, v)| this.check_one(k, v)).collect()
        } else {
            let per = kvs.len().div_ceil(threads);
            std::thread::scope(|scope| {
                let parts: Vec<_> = kvs
                    .chunks(per)
                    .map(|chunk| {
                        let handle = scope.spawn(move || {
                            chunk
                                .iter()
                                .map(|(k, v)| this.check_one(k, v))
                                .collect::<Vec<_>>()
                        });
                        (chunk.len(), handle)
                    })
                    .collect();
                parts
                    .into_iter()
                    .flat_map(|(len, handle)| {
                        handle.join().unwrap_or_else(|_| {
                            // A check never panics; if one did, its chunk
                            // counts as unverifiable rather than trusted.
                            vec![Err(Rejection::Malformed("verification failed".into())); len]
                        })
                    })
                    .collect()
            })
        };
        for ((key, raw), checked) in kvs.into_iter().zip(checked) {
            self.insert_checked(key, raw, checked);
        }
        self.revision = revision;
    }

    fn check_one(&self, key: &str, raw: &[u8]) -> Result<Record, Rejection> {
        match self.layout.classify(key) {
            Some(Entry::Request(_) | Entry::Endpoint(_) | Entry::Bookkeeping)
                if raw.len() > MAX_UNSIGNED_VALUE =>
            {
                Err(Rejection::TooLarge(raw.len()))
            }
            Some(entry) => check(&self.admin, self.snapshot_key(), key, &entry, raw),
            None => Err(Rejection::UnknownKey),
        }
    }

    /// The key the settings in force name for the snapshot.
    fn snapshot_key(&self) -> Option<&AdminPublicKey> {
        self.snapshot_policy().map(|p| &p.key)
    }

    /// A key was written. Returns false when the value did not change (or
    /// is not this store's to keep).
    pub fn put(&mut self, key: String, raw: Vec<u8>) -> bool {
        if self.entries.get(&key).is_some_and(|s| s.raw == raw) {
            return false;
        }
        match self.layout.classify(&key) {
            None => return false,
            Some(Entry::Unknown) => {
                self.note_unknown(&key);
                return true;
            }
            Some(_) => {}
        }
        let settings = key == self.layout.settings();
        let checked = self.check_one(&key, &raw);
        self.insert_checked(key, raw, checked);
        if settings {
            // The snapshot key may have changed with them.
            let sk = self.layout.snapshot();
            if let Some(raw) = self.entries.get(&sk).map(|s| s.raw.clone()) {
                let checked = self.check_one(&sk, &raw);
                self.insert_checked(sk, raw, checked);
            }
        }
        true
    }

    fn insert_checked(&mut self, key: String, raw: Vec<u8>, checked: Result<Record, Rejection>) {
        let checked = checked.and_then(|record| match record.serial() {
            Some(serial) => self.advance(&key, serial, &raw).map(|()| record),
            None => Ok(record),
        });
        if let Ok(Record::Snapshot(snap)) = &checked {
            self.keep_snapshot(snap, &raw);
        }
        if let Ok(record) = &checked
            && !self.wanted(record)
        {
            self.entries.remove(&key);
            return;
        }
        let raw = if checked.is_err() && raw.len() > MAX_REJECTED_RAW {
            Vec::new()
        } else {
            raw
        };
        if let Ok(Record::Revocation(r)) = &checked {
            self.remember(Remembered {
                revocation: r.clone(),
                key: key.clone(),
                raw: raw.clone(),
            });
        }
        self.entries.insert(key, Stored { raw, checked });
    }

    /// Moves `key`'s mark to a validly signed value with `serial`, or says
    /// why the value is older than what was verified there before.
    fn advance(&mut self, key: &str, serial: u64, raw: &[u8]) -> Result<(), Rejection> {
        // A snapshot's version is no serial (its `serial` counts, below).
        if key != self.layout.snapshot() {
            self.highest_serial = self.highest_serial.max(serial);
        }
        let mark = Mark::of(serial, raw);
        match self.marks.get(key) {
            Some(m) if serial < m.serial => Err(Rejection::RolledBack(format!(
                "serial {serial} is older than serial {} already verified for this key",
                m.serial
            ))),
            Some(m) if serial == m.serial && m.digest != mark.digest => Err(Rejection::RolledBack(
                format!("another record with serial {serial} was verified for this key first"),
            )),
            Some(m) if *m == mark => Ok(()),
            _ => {
                self.marks.insert(key.to_owned(), mark);
                self.marks_generation += 1;
                Ok(())
            }
        }
    }

    /// The newest signed value verified per key.
    pub fn marks(&self) -> impl Iterator<Item = (&String, &Mark)> {
        self.marks.iter()
    }

    /// Takes a mark kept elsewhere (the cache): values of `key` older
    /// than it are rejected from now on. A mark only ever rises.
    pub fn learn_mark(&mut self, key: &str, mark: Mark) {
        if self.layout.classify(key).is_none() {
            return;
        }
        self.highest_serial = self.highest_serial.max(mark.serial);
        match self.marks.get(key) {
            Some(m) if m.serial >= mark.serial => {}
            _ => {
                self.marks.insert(key.to_owned(), mark);
                self.marks_generation += 1;
            }
        }
    }

    /// Takes what `other` verified (marks, revocations) without its
    /// content: a device's memory from its cache, while the content comes
    /// from etcd.
    pub fn recall(&mut self, other: &Store) {
        for (k, m) in other.marks() {
            self.learn_mark(k, *m);
        }
        for r in other.revocations() {
            self.remember(r.clone());
        }
        if let Some(k) = other.snapshot() {
            self.keep_snapshot(&k.snapshot, &k.raw);
        }
        self.highest_serial = self.highest_serial.max(other.highest_serial);
    }

    /// Keeps `snap` if it is the newest snapshot seen.
    fn keep_snapshot(&mut self, snap: &Snapshot, raw: &[u8]) {
        self.highest_serial = self.highest_serial.max(snap.serial);
        if self
            .snapshot
            .as_ref()
            .is_none_or(|k| k.snapshot.version < snap.version)
        {
            self.snapshot = Some(KeptSnapshot {
                snapshot: snap.clone(),
                raw: raw.to_vec(),
            });
        }
    }

    /// The newest valid snapshot seen (also if etcd no longer holds it).
    pub fn snapshot(&self) -> Option<&KeptSnapshot> {
        self.snapshot.as_ref()
    }

    /// The snapshot policy of the settings in force, if any.
    pub fn snapshot_policy(&self) -> Option<&SnapshotPolicy> {
        match self.entries.get(&self.layout.settings()) {
            Some(Stored {
                checked: Ok(Record::Settings(s)),
                ..
            }) => s.snapshots.as_ref(),
            _ => None,
        }
    }

    /// Learns a signed snapshot kept elsewhere (the cache, the refresher's
    /// last one), verified with the snapshot key the settings in force
    /// name, without making it part of the content.
    pub fn learn_snapshot(&mut self, raw: &[u8]) -> Result<(), Rejection> {
        let key = self.layout.snapshot();
        match check(
            &self.admin,
            self.snapshot_key(),
            &key,
            &Entry::Snapshot,
            raw,
        )? {
            Record::Snapshot(snap) => {
                let _ = self.advance(&key, snap.version, raw);
                self.keep_snapshot(&snap, raw);
                Ok(())
            }
            _ => Err(Rejection::Invalid("not a snapshot".into())),
        }
    }

    /// The highest serial of any validly signed value seen.
    pub fn highest_serial(&self) -> u64 {
        self.highest_serial
    }

    /// Changes whenever a mark moves.
    pub fn marks_generation(&self) -> u64 {
        self.marks_generation
    }

    /// A key was deleted. Returns whether it was there.
    pub fn delete(&mut self, key: &str) -> bool {
        self.entries.remove(key).is_some() || self.unknown.remove(key)
    }

    fn remember(&mut self, r: Remembered) {
        match self.remembered.get(&r.revocation.public_key) {
            Some(known) if known.revocation.serial >= r.revocation.serial => {}
            _ => {
                self.remembered.insert(r.revocation.public_key, r);
            }
        }
    }

    /// Learns a signed revocation kept elsewhere (the cache) without
    /// making it part of the content; it is verified like any value.
    pub fn learn_revocation(&mut self, key: &str, raw: &[u8]) -> Result<(), Rejection> {
        let entry = self.layout.classify(key).ok_or(Rejection::UnknownKey)?;
        match check(&self.admin, None, key, &entry, raw)? {
            Record::Revocation(r) => {
                // An older revocation than one verified at this key still
                // voids what it voids; the mark only rises.
                let _ = self.advance(key, r.serial, raw);
                self.remember(Remembered {
                    revocation: r,
                    key: key.to_owned(),
                    raw: raw.to_vec(),
                });
                Ok(())
            }
            _ => Err(Rejection::Invalid("not a revocation".into())),
        }
    }

    /// The latest revocation of every revoked device, including those
    /// whose key has since been deleted.
    pub fn revocations(&self) -> impl Iterator<Item = &Remembered> {
        self.remembered.values()
    }

    /// The latest revocation of `k`, if it was ever revoked.
    pub fn revocation(&self, k: &PublicKey) -> Option<&Revocation> {
        self.remembered.get(k).map(|r| &r.revocation)
    }

    pub fn entries(&self) -> impl Iterator<Item = (&String, &Stored)> {
        self.entries.iter()
    }

    /// The records that passed their checks, with their keys.
    pub fn records(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.entries
            .iter()
            .filter_map(|(k, s)| s.checked.as_ref().ok().map(|r| (k, r)))
    }

    /// The values that failed their checks.
    pub fn rejected(&self) -> Vec<Ignored> {
        let mut out: Vec<Ignored> = self
            .entries
            .iter()
            .filter_map(|(k, s)| {
                s.checked.as_ref().err().map(|e| Ignored {
                    key: k.clone(),
                    reason: e.to_string(),
                })
            })
            .collect();
        out.extend(self.unknown.iter().map(|k| Ignored {
            key: k.clone(),
            reason: Rejection::UnknownKey.to_string(),
        }));
        let listed = self.unknown.len() as u64;
        if self.unknown_seen > listed {
            out.push(Ignored {
                key: format!("{}/…", self.layout.prefix()),
                reason: format!(
                    "{} unexpected keys under the registry prefix written; the first {listed} are listed, none is kept",
                    self.unknown_seen
                ),
            });
        }
        out
    }

    /// Pending join requests.
    pub fn requests(&self) -> impl Iterator<Item = &JoinRequest> {
        self.records().filter_map(|(_, r)| match r {
            Record::Request(q) => Some(q),
            _ => None,
        })
    }

    /// Raw value of `key`, if present.
    pub fn raw(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).map(|s| s.raw.as_slice())
    }
}

/// Checks one value found at `key`: every record signed by `admin`, but
/// the snapshot, signed by `snapshot_key` (the key the settings name).
pub fn check(
    admin: &AdminPublicKey,
    snapshot_key: Option<&AdminPublicKey>,
    key: &str,
    entry: &Entry,
    raw: &[u8],
) -> Result<Record, Rejection> {
    let must_match = |path_key: &PublicKey, body_key: &PublicKey| {
        if path_key == body_key {
            Ok(())
        } else {
            Err(Rejection::Invalid(format!(
                "the record is for key {body_key}, but stored under the path of {path_key}"
            )))
        }
    };
    match entry {
        Entry::Settings => {
            let s: Settings = signed::open(admin, key, raw)?;
            check_settings(&s).map_err(Rejection::Invalid)?;
            Ok(Record::Settings(s))
        }
        Entry::Snapshot => {
            let sk = snapshot_key.ok_or_else(|| {
                Rejection::Invalid("the mesh settings name no snapshot key".into())
            })?;
            let s: Snapshot = signed::open(sk, key, raw)?;
            if s.expires <= s.issued {
                return Err(Rejection::Invalid(format!(
                    "expires ({}) before it was issued ({})",
                    s.expires, s.issued
                )));
            }
            if let Some(id) = s.devices.keys().find(|id| !super::location::is_key_id(id)) {
                return Err(Rejection::Invalid(format!("{id:?} is not a device id")));
            }
            Ok(Record::Snapshot(s))
        }
        Entry::Device(k) => {
            let d: DeviceRecord = signed::open(admin, key, raw)?;
            must_match(k, &d.public_key)?;
            mesh::check_name(&d.name).map_err(|m| Rejection::Invalid(format!("name {m}")))?;
            if d.listen_port == 0 {
                return Err(Rejection::Invalid("listen_port 0 is not a port".into()));
            }
            if let Some(ep) = &d.endpoint {
                mesh::parse_endpoint(ep)
                    .map_err(|m| Rejection::Invalid(format!("endpoint {m}")))?;
            }
            Ok(Record::Device(d))
        }
        Entry::Revoked(k) => {
            let r: Revocation = signed::open(admin, key, raw)?;
            must_match(k, &r.public_key)?;
            Ok(Record::Revocation(r))
        }
        Entry::Request(k) => {
            let q: JoinRequest = serde_json::from_slice(raw)
                .map_err(|e| Rejection::Malformed(format!("join request: {e}")))?;
            must_match(k, &q.public_key)?;
            mesh::check_name(&q.name).map_err(|m| Rejection::Invalid(format!("name {m}")))?;
            Ok(Record::Request(q))
        }
        Entry::Endpoint(k) => {
            let e: EndpointRecord = serde_json::from_slice(raw)
                .map_err(|e| Rejection::Malformed(format!("endpoint record: {e}")))?;
            mesh::parse_endpoint(&e.endpoint)
                .map_err(|m| Rejection::Invalid(format!("endpoint {m}")))?;
            Ok(Record::Endpoint(*k, e))
        }
        Entry::Bookkeeping => Ok(Record::Bookkeeping),
        Entry::Unknown => Err(Rejection::UnknownKey),
    }
}

/// The same limits as the mesh file's `[mesh]` table.
pub fn check_settings(s: &Settings) -> Result<(), String> {
    if !(1280..=65535).contains(&s.mtu) {
        return Err(format!("mtu {} is out of range (1280 to 65535)", s.mtu));
    }
    if s.agent_port == 0 {
        return Err("agent_port 0 is not a port".into());
    }
    if s.ipv4_prefix.trunc() != s.ipv4_prefix || s.ipv4_prefix.prefix_len() > 30 {
        return Err(format!(
            "ipv4_prefix {} is not a usable mesh prefix",
            s.ipv4_prefix
        ));
    }
    let ula = ipnet::Ipv6Net::new(std::net::Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7)
        .map_err(|e| e.to_string())?;
    if s.ipv6_prefix.trunc() != s.ipv6_prefix
        || s.ipv6_prefix.prefix_len() > 126
        || !ula.contains(&s.ipv6_prefix)
    {
        return Err(format!(
            "ipv6_prefix {} is not a usable mesh prefix (a ULA, at most /126)",
            s.ipv6_prefix
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        keys::PrivateKey,
        registry::{admin_key::AdminKey, records::Roles, signed::seal},
    };

    #[test]
    fn junk_under_the_prefix_is_counted_not_kept() {
        // Issue 21, item 13: anyone with the shared device credential can
        // write under the prefix; a device keeps none of it raw.
        let admin = AdminKey::generate();
        let mut s = Store::new(Layout::new("/m"), admin.public_key());
        let kilobyte = vec![b'x'; 1024];
        for i in 0..10_000 {
            s.put(format!("/m/junk/{i}"), kilobyte.clone());
        }
        // Oversized values where unsigned records live.
        let k = PrivateKey::generate().public_key();
        let megabyte = vec![b' '; 1 << 20];
        s.put(s.layout().request(&k), megabyte.clone());
        s.put(s.layout().endpoint(&k), megabyte);
        let kept: usize = s.entries().map(|(k, v)| k.len() + v.raw.len()).sum();
        assert!(kept < 64 * 1024, "{kept} bytes kept");
        let rejected = s.rejected();
        assert!(rejected.len() <= 40, "{} listed", rejected.len());
        assert!(
            rejected
                .iter()
                .any(|i| i.reason.contains("10000 unexpected keys")),
            "{:?}",
            &rejected[..3.min(rejected.len())]
        );
        assert!(
            rejected
                .iter()
                .any(|i| i.key == s.layout().request(&k) && i.reason.contains("too large")),
            "{rejected:?}"
        );
        // A full read of the same junk: the same bounds.
        let kvs: Vec<(String, Vec<u8>)> = (0..10_000)
            .map(|i| (format!("/m/junk/{i}"), kilobyte.clone()))
            .collect();
        s.replace_all(kvs, 3);
        let kept: usize = s.entries().map(|(k, v)| k.len() + v.raw.len()).sum();
        assert!(kept < 64 * 1024, "{kept} bytes kept after a full read");
        // Deleting junk that was never kept is harmless.
        assert!(!s.delete("/m/junk/9999"));
    }

    #[test]
    fn a_device_keeps_no_bookkeeping_and_only_the_requests_it_reads() {
        let admin = AdminKey::generate();
        let layout = Layout::new("/m");
        let own = PrivateKey::generate().public_key();
        let mut s = Store::for_device(layout.clone(), admin.public_key(), own, "laptop");
        let request = |k: PublicKey, name: &str| {
            serde_json::to_vec(&JoinRequest {
                name: name.into(),
                public_key: k,
                listen_port: 51820,
                endpoint: None,
                exit_node: false,
                requested_at: 0,
            })
            .expect("json")
        };
        let (twin, stranger) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        s.put(layout.request(&own), request(own, "laptop"));
        s.put(layout.request(&twin), request(twin, "laptop"));
        s.put(layout.request(&stranger), request(stranger, "phone"));
        s.put(layout.serial(), b"7".to_vec());
        s.put(
            layout.alloc_v4(std::net::Ipv4Addr::new(100, 64, 0, 1)),
            b"x".to_vec(),
        );
        let keys: Vec<&String> = s.entries().map(|(k, _)| k).collect();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(s.raw(&layout.request(&own)).is_some());
        assert!(s.raw(&layout.request(&twin)).is_some());
        // The admin's store keeps them all.
        let mut a = Store::new(layout.clone(), admin.public_key());
        a.put(layout.request(&stranger), request(stranger, "phone"));
        a.put(layout.serial(), b"7".to_vec());
        assert_eq!(a.entries().count(), 2);
    }

    #[test]
    fn a_large_read_checked_in_parallel_keeps_every_verdict_with_its_key() {
        let admin = AdminKey::generate();
        let other = AdminKey::generate();
        let layout = Layout::new("/m");
        let mut kvs = Vec::new();
        let mut forged = Vec::new();
        for i in 0..301u32 {
            let d = DeviceRecord {
                name: format!("d{i}"),
                public_key: PrivateKey::generate().public_key(),
                ipv4: std::net::Ipv4Addr::from(0x6440_0000 + i + 1),
                ipv6: std::net::Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i + 1)),
                listen_port: 51820,
                endpoint: None,
                roles: Roles::default(),
                serial: u64::from(i) + 2,
                after_revocation: None,
            };
            let key = layout.device(&d.public_key);
            // Every 37th is signed by someone else, wherever it falls.
            let signer = if i % 37 == 5 { &other } else { &admin };
            if i % 37 == 5 {
                forged.push(key.clone());
            }
            kvs.push((key.clone(), seal(signer, &key, &d).expect("seal")));
        }
        let mut parallel = Store::new(layout.clone(), admin.public_key());
        parallel.replace_all(kvs.clone(), 7);
        let mut one_by_one = Store::new(layout, admin.public_key());
        for (k, v) in kvs {
            one_by_one.put(k, v);
        }
        let mut rejected: Vec<String> = parallel.rejected().into_iter().map(|i| i.key).collect();
        rejected.sort();
        forged.sort();
        assert_eq!(rejected, forged);
        assert_eq!(parallel.records().count(), 301 - forged.len());
        assert_eq!(
            parallel
                .records()
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>(),
            one_by_one
                .records()
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>()
        );
        assert_eq!(parallel.revision, 7);
    }
}
