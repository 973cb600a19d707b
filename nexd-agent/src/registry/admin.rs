//! The admin side: everything `nexctl mesh` does, talking to etcd
//! directly. Every write is one etcd transaction guarded by comparisons,
//! so two admins working at once never both succeed on a stale view:
//! the loser re-reads and tries again (bounded).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

use super::{
    admin_key::{AdminKey, AdminPublicKey},
    allocate::{self, Taken},
    connection::{EtcdConfig, RegistryError},
    location::{Entry, Layout},
    membership::{self, Membership},
    records::{DeviceRecord, JoinRequest, Revocation, Roles, Settings},
    signed::seal,
    verify::{Record, Store},
};
use crate::{keys::PublicKey, mesh::Mesh};

/// How often a transaction that lost a race is retried before giving up.
const MAX_ATTEMPTS: u32 = 40;
/// etcd's default limit of operations in one transaction is 128.
const DEVICES_PER_TXN: usize = 40;

/// Why an admin operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The request cannot be carried out as asked (unknown device,
    /// already initialised...). Nothing changed.
    #[error("{0}")]
    Refused(String),
    /// The request is fine but cannot be done now (addresses exhausted,
    /// too much contention). Nothing changed.
    #[error("{0}")]
    Unavailable(String),
    #[error("cannot encode a record: {0}")]
    Encode(String),
}

/// A change of a device's roles on `approve`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleChange {
    pub exit_node: Option<bool>,
    /// `Some(None)`: serve every device; `Some(Some(names))`: only these.
    pub exit_clients: Option<Option<Vec<String>>>,
}

impl RoleChange {
    fn apply(&self, mut r: Roles) -> Roles {
        if let Some(e) = self.exit_node {
            r.exit_node = e;
        }
        if let Some(c) = &self.exit_clients {
            r.exit_clients = c.clone();
        }
        r
    }
}

/// What `approve` did.
#[derive(Debug, Clone)]
pub struct Approved {
    pub record: DeviceRecord,
    /// False when the device was already approved with these roles.
    pub changed: bool,
    /// True for a new member, false for a role change.
    pub new_member: bool,
}

/// A connection to one mesh's registry.
pub struct Admin {
    cfg: EtcdConfig,
    client: Client,
    layout: Layout,
}

/// The registry as read by an admin: verified content, the serial counter.
pub struct View {
    pub store: Store,
    /// The serial counter's raw value (`None`: not initialised).
    serial_raw: Option<Vec<u8>>,
    pub serial: u64,
}

impl View {
    /// The membership, or why there is none.
    pub fn membership(&self) -> Result<Membership, AdminError> {
        membership::build(&self.store).map_err(|e| AdminError::Refused(e.to_string()))
    }

    fn settings(&self) -> Option<&Settings> {
        self.store.records().find_map(|(_, r)| match r {
            Record::Settings(s) => Some(s),
            _ => None,
        })
    }

    /// Compare: the serial counter is still what this view saw.
    fn serial_unchanged(&self, layout: &Layout) -> Compare {
        match &self.serial_raw {
            Some(raw) => Compare::value(layout.serial(), CompareOp::Equal, raw.clone()),
            None => Compare::version(layout.serial(), CompareOp::Equal, 0),
        }
    }

    /// Addresses taken: by allocation keys and by verified records.
    fn taken(&self, m: &Membership) -> Taken {
        let layout = self.store.layout();
        let mut t = Taken::default();
        for (k, _) in self.store.entries() {
            if let Some(ip) = k.strip_prefix(&format!("{}/alloc/v4/", layout.prefix())) {
                if let Ok(ip) = ip.parse::<Ipv4Addr>() {
                    t.v4.insert(ip);
                }
            } else if let Some(ip) = k.strip_prefix(&format!("{}/alloc/v6/", layout.prefix()))
                && let Ok(ip) = ip.parse::<Ipv6Addr>()
            {
                t.v6.insert(ip);
            }
        }
        for d in &m.mesh.devices {
            t.v4.insert(d.ipv4);
            t.v6.insert(d.ipv6);
        }
        t
    }
}

fn encode<T: serde::Serialize>(
    key: &AdminKey,
    path: &str,
    body: &T,
) -> Result<Vec<u8>, AdminError> {
    seal(key, path, body).map_err(|e| AdminError::Encode(e.to_string()))
}

/// A short random pause so two admins that collided do not collide again.
async fn back_off(attempt: u32) {
    let mut b = [0u8; 2];
    let _ = rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut b);
    let ms = u64::from(u16::from_le_bytes(b)) % (5 + 5 * u64::from(attempt.min(10)));
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

impl Admin {
    pub async fn connect(cfg: EtcdConfig) -> Result<Self, AdminError> {
        let client = cfg.connect().await?;
        let layout = Layout::new(&cfg.url.prefix);
        Ok(Admin {
            cfg,
            client,
            layout,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Reads and verifies everything under the prefix.
    pub async fn read(&mut self, admin: AdminPublicKey) -> Result<View, AdminError> {
        let all = self.layout.all();
        let mut kv = self.client.kv_client();
        let resp = self
            .cfg
            .call(
                "a read of the registry",
                kv.get(all, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        // A response without a header (never seen) only costs a full read.
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut store = Store::new(self.layout.clone(), admin);
        let mut serial_raw = None;
        let serial_key = self.layout.serial();
        store.replace_all(
            resp.kvs().iter().map(|kv| {
                let k = String::from_utf8_lossy(kv.key()).into_owned();
                if k == serial_key {
                    serial_raw = Some(kv.value().to_vec());
                }
                (k, kv.value().to_vec())
            }),
            revision,
        );
        let serial = match &serial_raw {
            None => 0,
            Some(raw) => std::str::from_utf8(raw)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    AdminError::Refused(format!(
                        "{serial_key} holds {:?}, not a number; fix it by hand (it must be above every device's serial)",
                        String::from_utf8_lossy(raw)
                    ))
                })?,
        };
        Ok(View {
            store,
            serial_raw,
            serial,
        })
    }

    async fn commit(&mut self, what: &str, txn: Txn) -> Result<bool, AdminError> {
        let mut kv = self.client.kv_client();
        let resp = self.cfg.call(what, kv.txn(txn)).await?;
        Ok(resp.succeeded())
    }

    /// Writes the first settings. Refused when the prefix already has some.
    pub async fn init(
        &mut self,
        key: &AdminKey,
        mut settings: Settings,
    ) -> Result<Settings, AdminError> {
        super::verify::check_settings(&settings).map_err(AdminError::Refused)?;
        settings.serial = 1;
        let sk = self.layout.settings();
        let txn = Txn::new()
            .when([
                Compare::version(sk.clone(), CompareOp::Equal, 0),
                Compare::version(self.layout.serial(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(sk, encode(key, &self.layout.settings(), &settings)?, None),
                TxnOp::put(self.layout.serial(), "1", None),
            ]);
        if !self.commit("writing the mesh settings", txn).await? {
            return Err(AdminError::Refused(format!(
                "{} already holds a mesh (settings or serial exist); `nexctl mesh set` changes its settings",
                self.cfg.url
            )));
        }
        Ok(settings)
    }

    /// Changes MTU, keepalive or agent port (the prefixes only while the
    /// mesh has no device).
    pub async fn set(
        &mut self,
        key: &AdminKey,
        change: impl Fn(&mut Settings),
    ) -> Result<Settings, AdminError> {
        for attempt in 0..MAX_ATTEMPTS {
            let view = self.read(key.public_key()).await?;
            let m = view.membership()?;
            let old = view
                .settings()
                .cloned()
                .ok_or_else(|| AdminError::Refused("the registry has no settings".into()))?;
            let mut new = old.clone();
            change(&mut new);
            super::verify::check_settings(&new).map_err(AdminError::Refused)?;
            if (new.ipv4_prefix != old.ipv4_prefix || new.ipv6_prefix != old.ipv6_prefix)
                && !m.mesh.devices.is_empty()
            {
                return Err(AdminError::Refused(
                    "the prefixes cannot change while the mesh has devices (their addresses are inside them)".into(),
                ));
            }
            new.serial = view.serial + 1;
            let sk = self.layout.settings();
            let txn = Txn::new()
                .when([view.serial_unchanged(&self.layout)])
                .and_then([
                    TxnOp::put(sk.clone(), encode(key, &sk, &new)?, None),
                    TxnOp::put(self.layout.serial(), new.serial.to_string(), None),
                ]);
            if self.commit("writing the mesh settings", txn).await? {
                return Ok(new);
            }
            back_off(attempt).await;
        }
        Err(contention())
    }

    /// Approves a device that asked to join (by name or key), or changes
    /// the roles of an approved one.
    pub async fn approve(
        &mut self,
        key: &AdminKey,
        who: &str,
        roles: &RoleChange,
    ) -> Result<Approved, AdminError> {
        for attempt in 0..MAX_ATTEMPTS {
            let view = self.read(key.public_key()).await?;
            let m = view.membership()?;
            let settings = view
                .settings()
                .cloned()
                .ok_or_else(|| AdminError::Refused("the registry has no settings".into()))?;
            let serial = view.serial + 1;
            let txn = if let Some(dev) = find_device(&m, who) {
                let current = view
                    .store
                    .records()
                    .find_map(|(_, r)| match r {
                        Record::Device(d) if d.public_key == dev.public_key => Some(d.clone()),
                        _ => None,
                    })
                    .ok_or_else(|| AdminError::Refused(format!("device {who} vanished")))?;
                let new_roles = roles.apply(current.roles.clone());
                if new_roles == current.roles {
                    return Ok(Approved {
                        record: current,
                        changed: false,
                        new_member: false,
                    });
                }
                let record = DeviceRecord {
                    roles: new_roles,
                    serial,
                    ..current
                };
                let dk = self.layout.device(&record.public_key);
                let raw = view
                    .store
                    .raw(&dk)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| AdminError::Refused(format!("device {who} vanished")))?;
                let txn = Txn::new()
                    .when([
                        view.serial_unchanged(&self.layout),
                        Compare::value(dk.clone(), CompareOp::Equal, raw),
                    ])
                    .and_then([
                        TxnOp::put(dk.clone(), encode(key, &dk, &record)?, None),
                        TxnOp::put(self.layout.serial(), serial.to_string(), None),
                    ]);
                (txn, record, false)
            } else {
                let req = find_request(&view.store, who)?;
                if let Some(other) = m.mesh.devices.iter().find(|d| d.name == req.name) {
                    return Err(AdminError::Refused(format!(
                        "the name {:?} is already used by device {}; revoke that one first, or have the new device ask under another name",
                        req.name, other.public_key
                    )));
                }
                let (ipv4, ipv6) = allocate::next_pair(
                    settings.ipv4_prefix,
                    settings.ipv6_prefix,
                    &view.taken(&m),
                )
                .ok_or_else(|| {
                    AdminError::Unavailable(format!(
                        "no free address left in {} / {}",
                        settings.ipv4_prefix, settings.ipv6_prefix
                    ))
                })?;
                let record = DeviceRecord {
                    name: req.name.clone(),
                    public_key: req.public_key,
                    ipv4,
                    ipv6,
                    listen_port: req.listen_port,
                    endpoint: None,
                    roles: roles.apply(Roles::default()),
                    serial,
                };
                let dk = self.layout.device(&record.public_key);
                let (a4, a6) = (self.layout.alloc_v4(ipv4), self.layout.alloc_v6(ipv6));
                let id = super::location::key_id(&record.public_key);
                let txn = Txn::new()
                    .when([
                        view.serial_unchanged(&self.layout),
                        Compare::version(a4.clone(), CompareOp::Equal, 0),
                        Compare::version(a6.clone(), CompareOp::Equal, 0),
                        Compare::version(dk.clone(), CompareOp::Equal, 0),
                    ])
                    .and_then([
                        TxnOp::put(dk.clone(), encode(key, &dk, &record)?, None),
                        TxnOp::put(a4, id.clone(), None),
                        TxnOp::put(a6, id, None),
                        TxnOp::put(self.layout.serial(), serial.to_string(), None),
                        TxnOp::delete(self.layout.request(&record.public_key), None),
                    ]);
                (txn, record, true)
            };
            let (txn, record, new_member) = txn;
            if self.commit("the approval", txn).await? {
                return Ok(Approved {
                    record,
                    changed: true,
                    new_member,
                });
            }
            tracing::debug!(
                attempt,
                "approval lost a race with another change; retrying"
            );
            back_off(attempt).await;
        }
        Err(contention())
    }

    /// Removes a device and records a signed revocation of its records.
    pub async fn revoke(&mut self, key: &AdminKey, who: &str) -> Result<DeviceRecord, AdminError> {
        for attempt in 0..MAX_ATTEMPTS {
            let view = self.read(key.public_key()).await?;
            let m = view.membership()?;
            let dev = find_device(&m, who).ok_or_else(|| {
                AdminError::Refused(format!(
                    "no approved device is named or has the key {who:?} (see `nexctl mesh list`)"
                ))
            })?;
            let dk = self.layout.device(&dev.public_key);
            let record = view
                .store
                .records()
                .find_map(|(k, r)| match r {
                    Record::Device(d) if *k == dk => Some(d.clone()),
                    _ => None,
                })
                .ok_or_else(|| AdminError::Refused(format!("device {who} vanished")))?;
            let raw = view
                .store
                .raw(&dk)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| AdminError::Refused(format!("device {who} vanished")))?;
            let rk = self.layout.revoked(&record.public_key);
            let revocation = Revocation {
                public_key: record.public_key,
                name: record.name.clone(),
                serial: record.serial,
            };
            let txn = Txn::new()
                .when([Compare::value(dk.clone(), CompareOp::Equal, raw)])
                .and_then([
                    TxnOp::delete(dk, None),
                    TxnOp::delete(self.layout.alloc_v4(record.ipv4), None),
                    TxnOp::delete(self.layout.alloc_v6(record.ipv6), None),
                    TxnOp::put(rk.clone(), encode(key, &rk, &revocation)?, None),
                ]);
            if self.commit("the revocation", txn).await? {
                return Ok(record);
            }
            back_off(attempt).await;
        }
        Err(contention())
    }

    /// Writes a mesh file's settings and devices (with their exit roles)
    /// into an empty prefix.
    /// Devices go in transactions of `DEVICES_PER_TXN`, each guarded by the
    /// serial counter, so a concurrent approval stops the import with an
    /// error rather than interleaving.
    pub async fn import(&mut self, key: &AdminKey, mesh: &Mesh) -> Result<usize, AdminError> {
        check_importable(mesh)?;
        let view = self.read(key.public_key()).await?;
        let existing = view
            .store
            .entries()
            .filter(|(k, _)| {
                matches!(
                    self.layout.classify(k),
                    Some(Entry::Settings | Entry::Device(_) | Entry::Bookkeeping)
                )
            })
            .count();
        if existing > 0 {
            return Err(AdminError::Refused(format!(
                "{} is not empty ({existing} settings, device or allocation keys); import only into a new prefix",
                self.cfg.url
            )));
        }
        let settings = Settings {
            ipv4_prefix: mesh.ipv4_prefix,
            ipv6_prefix: mesh.ipv6_prefix,
            mtu: mesh.mtu,
            persistent_keepalive: mesh.persistent_keepalive,
            agent_port: mesh.agent_port,
            serial: 1,
        };
        self.init(key, settings).await?;
        let mut serial = 1u64;
        for chunk in mesh.devices.chunks(DEVICES_PER_TXN) {
            let before = serial;
            let mut ops = Vec::with_capacity(chunk.len() * 3 + 1);
            for d in chunk {
                serial += 1;
                let record = DeviceRecord {
                    name: d.name.clone(),
                    public_key: d.public_key,
                    ipv4: d.ipv4,
                    ipv6: d.ipv6,
                    listen_port: d.listen_port,
                    endpoint: d.endpoint.as_ref().map(ToString::to_string),
                    // The exit roles come along (the file's exit_node and
                    // exit_clients); check_importable refused rate limits.
                    roles: Roles {
                        exit_node: d.exit_node,
                        exit_clients: d.exit_clients.as_ref().map(|c| c.iter().cloned().collect()),
                    },
                    serial,
                };
                let dk = self.layout.device(&d.public_key);
                let id = super::location::key_id(&d.public_key);
                ops.push(TxnOp::put(dk.clone(), encode(key, &dk, &record)?, None));
                ops.push(TxnOp::put(self.layout.alloc_v4(d.ipv4), id.clone(), None));
                ops.push(TxnOp::put(self.layout.alloc_v6(d.ipv6), id, None));
            }
            ops.push(TxnOp::put(self.layout.serial(), serial.to_string(), None));
            let txn = Txn::new()
                .when([Compare::value(
                    self.layout.serial(),
                    CompareOp::Equal,
                    before.to_string(),
                )])
                .and_then(ops);
            if !self.commit("the import", txn).await? {
                return Err(AdminError::Unavailable(format!(
                    "another admin changed {} during the import; {} of {} devices were written (see `nexctl mesh list`)",
                    self.cfg.url,
                    before - 1,
                    mesh.devices.len()
                )));
            }
        }
        Ok(mesh.devices.len())
    }

    /// Writes a value as is, bypassing every check (tests and benches use
    /// it to play an attacker with write access to etcd).
    pub async fn put_raw(&mut self, key: &str, value: Vec<u8>) -> Result<(), AdminError> {
        let mut kv = self.client.kv_client();
        self.cfg.call("a write", kv.put(key, value, None)).await?;
        Ok(())
    }

    /// The etcd client, for what this module does not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

fn contention() -> AdminError {
    AdminError::Unavailable(format!(
        "gave up after {MAX_ATTEMPTS} attempts: other changes kept winning the race; nothing was changed, try again"
    ))
}

fn find_device<'a>(m: &'a Membership, who: &str) -> Option<&'a crate::mesh::Device> {
    let key = who.parse::<PublicKey>().ok();
    m.mesh
        .devices
        .iter()
        .find(|d| Some(d.public_key) == key || d.name == who)
}

fn find_request<'a>(store: &'a Store, who: &str) -> Result<&'a JoinRequest, AdminError> {
    if let Ok(k) = who.parse::<PublicKey>() {
        return store.requests().find(|r| r.public_key == k).ok_or_else(|| {
            AdminError::Refused(format!(
                "no device with key {k} is approved or asking to join (see `nexctl mesh requests`)"
            ))
        });
    }
    let matches: Vec<&JoinRequest> = store.requests().filter(|r| r.name == who).collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(AdminError::Refused(format!(
            "no device named {who:?} is approved or asking to join (see `nexctl mesh requests`)"
        ))),
        many => Err(AdminError::Refused(format!(
            "{} devices ask to join as {who:?}; approve one by its key: {}",
            many.len(),
            many.iter()
                .map(|r| r.public_key.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Whether the registry can hold everything `mesh` says: device records
/// have no `exit_rate_limit`, `exit_flow_limit` or `exit_new_flow_rate`
/// yet, and an import must not drop one silently.
pub fn check_importable(mesh: &Mesh) -> Result<(), AdminError> {
    let limited: Vec<&str> = mesh
        .devices
        .iter()
        .filter(|d| {
            d.exit_rate_limit.is_some()
                || d.exit_flow_limit.is_some()
                || d.exit_new_flow_rate.is_some()
        })
        .map(|d| d.name.as_str())
        .collect();
    if limited.is_empty() {
        return Ok(());
    }
    Err(AdminError::Refused(format!(
        "exit_rate_limit, exit_flow_limit or exit_new_flow_rate is set for {}: the registry's device records cannot carry per-client limits yet; remove them from the file to import it (nothing was written)",
        limited.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mesh_with_rate_limits_is_refused_naming_the_devices() {
        let text = format!(
            "[mesh]\n[[device]]\nname = \"a\"\npublic_key = \"{}\"\nipv4 = \"100.64.0.1\"\nipv6 = \"fd6e:6578:6400::1\"\nexit_node = true\n\
             [[device]]\nname = \"b\"\npublic_key = \"{}\"\nipv4 = \"100.64.0.2\"\nipv6 = \"fd6e:6578:6400::2\"\n",
            crate::keys::PrivateKey::generate().public_key(),
            crate::keys::PrivateKey::generate().public_key(),
        );
        let mut mesh = crate::mesh::parse(&text).expect("valid");
        assert!(check_importable(&mesh).is_ok(), "exit roles are importable");
        mesh.devices[1].exit_rate_limit = crate::mesh::Rate::from_bits_per_second(200_000_000);
        match check_importable(&mesh) {
            Err(AdminError::Refused(m)) => assert!(m.contains("for b:"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
