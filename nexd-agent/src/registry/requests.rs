//! Join requests: who asks under which name, and the key fingerprint that
//! ties a request to a device (issue 21, item 13).
//!
//! Requests are unsigned and every device can write them (the shared
//! device credential), so a name in a request proves nothing: anyone can
//! delete a device's request and post one of its own under that name. The
//! device's WireGuard key is what counts. Its fingerprint is short enough
//! to read out loud: the device logs it while it waits, `nexctl mesh
//! requests` shows it, and `nexctl mesh approve NAME --fingerprint F`
//! approves only the request with that key. A replaced request is visible
//! on both sides: the admin's listing notes a name asked by several keys
//! or held by a member with another key, and the waiting device lists the
//! requests and members that claim its name among its ignored records.

use std::collections::BTreeMap;

use blake2::{Blake2s256, Digest as _};

use super::{
    membership::Membership,
    records::JoinRequest,
    verify::{Ignored, Store},
};
use crate::keys::PublicKey;

/// Domain of the fingerprint hash, so it is not a hash used elsewhere.
const DOMAIN: &[u8] = b"nexd-device-fingerprint-v1\0";
/// Bytes of the hash shown: 80 bits, five groups of four hex digits. Making
/// a key whose fingerprint matches a given one costs about 2^80 tries.
const BYTES: usize = 10;

/// The fingerprint of a device's WireGuard public key:
/// `xxxx-xxxx-xxxx-xxxx-xxxx` (lower-case hex).
pub fn fingerprint(k: &PublicKey) -> String {
    let mut h = Blake2s256::new();
    h.update(DOMAIN);
    h.update(k.0);
    let digest = h.finalize();
    let hex: Vec<String> = digest[..BYTES]
        .chunks(2)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    hex.join("-")
}

/// Whether `given` (as typed: any case, with or without dashes or spaces)
/// is `k`'s fingerprint.
pub fn matches(k: &PublicKey, given: &str) -> bool {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| !matches!(c, '-' | ' ' | ':'))
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    norm(given) == norm(&fingerprint(k))
}

/// The request `who` (a name or a WireGuard key) names, checked against
/// `expect` (a fingerprint) when given. The error says what is wrong in
/// words, for `nexctl mesh approve`.
pub fn find<'a>(
    store: &'a Store,
    who: &str,
    expect: Option<&str>,
) -> Result<&'a JoinRequest, String> {
    let by_key = who.parse::<PublicKey>().ok();
    let candidates: Vec<&JoinRequest> = store
        .requests()
        .filter(|r| match by_key {
            Some(k) => r.public_key == k,
            None => r.name == who,
        })
        .collect();
    let asking = || match by_key {
        Some(k) => format!(
            "no device with key {k} is approved or asking to join (see `nexctl mesh requests`)"
        ),
        None => format!(
            "no device named {who:?} is approved or asking to join (see `nexctl mesh requests`)"
        ),
    };
    if let Some(f) = expect {
        if candidates.is_empty() {
            return Err(asking());
        }
        // One key has one request path, so at most one can match.
        return candidates
            .iter()
            .find(|r| matches(&r.public_key, f))
            .copied()
            .ok_or_else(|| {
                let found: Vec<String> = candidates
                    .iter()
                    .map(|r| {
                        format!(
                            "key {} (fingerprint {})",
                            r.public_key,
                            fingerprint(&r.public_key)
                        )
                    })
                    .collect();
                format!(
                    "the request as {who:?} has {}, not fingerprint {f}: it may have been replaced (anyone who can write to etcd can post a request under any name); ask the device for its fingerprint (its log shows it) and approve the request that has it",
                    found.join(" and ")
                )
            });
    }
    match candidates.as_slice() {
        [one] => Ok(one),
        [] => Err(asking()),
        many => Err(format!(
            "{} devices ask to join as {who:?}; approve one by its key or with --fingerprint: {}",
            many.len(),
            many.iter()
                .map(|r| format!(
                    "{} (fingerprint {})",
                    r.public_key,
                    fingerprint(&r.public_key)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// For the admin's listing: what is odd about each request's name (asked
/// by several keys, or held by a member with another key).
pub fn notes(store: &Store, members: Option<&Membership>) -> BTreeMap<PublicKey, String> {
    let mut by_name: BTreeMap<&str, usize> = BTreeMap::new();
    for q in store.requests() {
        *by_name.entry(q.name.as_str()).or_default() += 1;
    }
    let mut out = BTreeMap::new();
    for q in store.requests() {
        let mut parts = Vec::new();
        let n = by_name.get(q.name.as_str()).copied().unwrap_or(0);
        if n > 1 {
            parts.push(format!("{n} keys ask as {:?}", q.name));
        }
        if let Some(d) = members.and_then(|m| {
            m.mesh
                .devices
                .iter()
                .find(|d| d.name == q.name && d.public_key != q.public_key)
        }) {
            parts.push(format!(
                "the name is held by member {} (fingerprint {})",
                d.public_key,
                fingerprint(&d.public_key)
            ));
        }
        if !parts.is_empty() {
            out.insert(q.public_key, parts.join("; "));
        }
    }
    out
}

/// For a device waiting under `name`: the requests of other keys under its
/// name, and a member holding its name with another key, as ignored
/// records with the reason (so `nexctl nexd status` shows them).
pub fn claims(
    store: &Store,
    members: Option<&Membership>,
    own: &PublicKey,
    name: &str,
) -> Vec<Ignored> {
    let mine = fingerprint(own);
    let layout = store.layout();
    let mut out: Vec<Ignored> = store
        .requests()
        .filter(|q| q.name == name && q.public_key != *own)
        .map(|q| Ignored {
            key: layout.request(&q.public_key),
            reason: format!(
                "another key (fingerprint {}) asks to join under this device's name {name:?}; the admin should approve this device only by its fingerprint {mine}",
                fingerprint(&q.public_key)
            ),
        })
        .collect();
    if let Some(m) = members {
        out.extend(
            m.mesh
                .devices
                .iter()
                .filter(|d| d.name == name && d.public_key != *own)
                .map(|d| Ignored {
                    key: layout.device(&d.public_key),
                    reason: format!(
                        "the name {name:?} was approved for another key (fingerprint {}), not this device (fingerprint {mine}): its join request may have been replaced",
                        fingerprint(&d.public_key)
                    ),
                }),
        );
    }
    out
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
            membership,
            records::DeviceRecord,
            signed::seal,
        },
    };

    fn request(name: &str) -> JoinRequest {
        JoinRequest {
            name: name.into(),
            public_key: PrivateKey::generate().public_key(),
            listen_port: 51820,
            endpoint: None,
            exit_node: false,
            requested_at: 1,
        }
    }

    fn put(store: &mut Store, q: &JoinRequest) -> String {
        let k = store.layout().request(&q.public_key);
        store.put(k.clone(), serde_json::to_vec(q).expect("json"));
        k
    }

    fn store() -> (AdminKey, Store) {
        let admin = AdminKey::generate();
        let mut s = Store::new(Layout::new("/m"), admin.public_key());
        let k = s.layout().settings();
        s.put(k.clone(), seal(&admin, &k, &settings()).expect("seal"));
        (admin, s)
    }

    fn approve(admin: &AdminKey, store: &mut Store, q: &JoinRequest) {
        let d = DeviceRecord {
            name: q.name.clone(),
            public_key: q.public_key,
            ..device("", 1, 2)
        };
        let k = store.layout().device(&d.public_key);
        store.put(k.clone(), seal(admin, &k, &d).expect("seal"));
    }

    #[test]
    fn fingerprints_are_short_stable_and_typed_loosely() {
        let k = PrivateKey::generate().public_key();
        let f = fingerprint(&k);
        assert_eq!(f.len(), 24, "{f}");
        assert_eq!(f.split('-').count(), 5, "{f}");
        assert_eq!(f, fingerprint(&k));
        assert_ne!(f, fingerprint(&PrivateKey::generate().public_key()));
        assert!(matches(&k, &f.to_uppercase()));
        assert!(matches(&k, &f.replace('-', "")));
        assert!(!matches(&k, &f[..20]));
    }

    #[test]
    fn a_replaced_join_request_is_not_approved_by_its_fingerprint() {
        // Issue 21, item 13: laptop asks; a holder of the shared device
        // credential deletes its request and posts its own as "laptop".
        let (_, mut s) = store();
        let genuine = request("laptop");
        let k = put(&mut s, &genuine);
        let f = fingerprint(&genuine.public_key);
        assert_eq!(
            find(&s, "laptop", Some(&f)).map(|r| r.public_key),
            Ok(genuine.public_key)
        );
        s.delete(&k);
        let impostor = request("laptop");
        put(&mut s, &impostor);
        match find(&s, "laptop", Some(&f)) {
            Ok(r) => panic!(
                "approved the replacement {} with laptop's fingerprint {f}",
                r.public_key
            ),
            Err(e) => {
                assert!(e.contains(&f), "{e}");
                assert!(e.contains(&fingerprint(&impostor.public_key)), "{e}");
                assert!(e.contains("replaced"), "{e}");
            }
        }
        // By the impostor's own fingerprint it is found (the admin then
        // approves what it asked for, knowingly).
        assert!(find(&s, "laptop", Some(&fingerprint(&impostor.public_key))).is_ok());
        // A key and a fingerprint that disagree are refused too.
        assert!(find(&s, &impostor.public_key.to_string(), Some(&f)).is_err());
    }

    #[test]
    fn the_admin_sees_names_asked_twice_or_held_by_another_key() {
        let (admin, mut s) = store();
        let a = request("laptop");
        let b = request("laptop");
        let c = request("phone");
        for q in [&a, &b, &c] {
            put(&mut s, q);
        }
        let m = membership::build(&s).expect("m");
        let n = notes(&s, Some(&m));
        for q in [&a, &b] {
            let note = n.get(&q.public_key).cloned().unwrap_or_default();
            assert!(note.contains("2 keys ask as \"laptop\""), "{note:?}");
        }
        assert!(!n.contains_key(&c.public_key), "{n:?}");
        // "phone" approved; another key then asks as "phone".
        approve(&admin, &mut s, &c);
        let s_key = s.layout().request(&c.public_key);
        s.delete(&s_key);
        let d = request("phone");
        put(&mut s, &d);
        let m = membership::build(&s).expect("m");
        let note = notes(&s, Some(&m))
            .remove(&d.public_key)
            .unwrap_or_default();
        assert!(
            note.contains("held by member") && note.contains(&fingerprint(&c.public_key)),
            "{note:?}"
        );
    }

    #[test]
    fn a_waiting_device_sees_who_else_claims_its_name() {
        let (admin, mut s) = store();
        let me = request("laptop");
        put(&mut s, &me);
        assert!(claims(&s, None, &me.public_key, "laptop").is_empty());
        // Another key asks under its name: listed with its fingerprint.
        let other = request("laptop");
        let ko = put(&mut s, &other);
        let c = claims(&s, None, &me.public_key, "laptop");
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].key, ko);
        assert!(
            c[0].reason.contains(&fingerprint(&other.public_key)),
            "{c:?}"
        );
        assert!(c[0].reason.contains(&fingerprint(&me.public_key)), "{c:?}");
        // ...and approved under it: the device says so.
        approve(&admin, &mut s, &other);
        let m = membership::build(&s).expect("m");
        let c = claims(&s, Some(&m), &me.public_key, "laptop");
        assert!(
            c.iter()
                .any(|i| i.key == s.layout().device(&other.public_key)
                    && i.reason.contains("approved")),
            "{c:?}"
        );
    }
}
