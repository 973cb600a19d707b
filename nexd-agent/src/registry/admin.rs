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
    records::{DeviceRecord, JoinRequest, Revocation, Roles, Settings, Snapshot, SnapshotPolicy},
    requests,
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
    /// `Some(None)`: no capacity (the link speed); `Some(Some(bps))`.
    pub exit_capacity: Option<Option<u64>>,
}

impl RoleChange {
    fn apply(&self, mut r: Roles) -> Roles {
        if let Some(e) = self.exit_node {
            r.exit_node = e;
        }
        if let Some(c) = &self.exit_clients {
            r.exit_clients = c.clone();
        }
        if let Some(c) = self.exit_capacity {
            r.exit_capacity = c;
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

/// What `refresh_snapshot` wrote.
#[derive(Debug, Clone)]
pub struct Refreshed {
    pub snapshot: Snapshot,
    /// The signed value, for the refresher to keep as its memory.
    pub raw: Vec<u8>,
    /// Records etcd holds older than the previous snapshot says are in
    /// force (kept at their previous serials): someone rolled them back.
    pub rolled_back: Vec<String>,
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

    /// The serial the next signed change takes: above the counter and
    /// above every validly signed serial this view read. The counter is
    /// unsigned (an etcd writer can set it back), and a serial at or below
    /// one already signed would let the older record win (issue 21).
    pub fn next_serial(&self) -> u64 {
        self.serial.max(self.store.highest_serial()) + 1
    }

    /// The settings and every device record in force, unchanged but for
    /// fresh serials above `above` and above everything this view reads.
    fn resigned(&self, above: u64) -> Result<(Settings, Vec<DeviceRecord>), AdminError> {
        let m = self.membership()?;
        let mut serial = self.next_serial().max(above.saturating_add(1));
        let mut settings = self
            .settings()
            .cloned()
            .ok_or_else(|| AdminError::Refused("the registry has no settings".into()))?;
        settings.serial = serial;
        let mut devices = Vec::with_capacity(m.mesh.devices.len());
        for (_, r) in self.store.records() {
            if let Record::Device(d) = r
                && m.serials.get(&d.public_key) == Some(&d.serial)
            {
                serial += 1;
                devices.push(DeviceRecord {
                    serial,
                    ..d.clone()
                });
            }
        }
        Ok((settings, devices))
    }

    /// The record of a new member approved from `req`.
    fn new_member(
        &self,
        req: &JoinRequest,
        (ipv4, ipv6): (Ipv4Addr, Ipv6Addr),
        roles: Roles,
    ) -> DeviceRecord {
        DeviceRecord {
            name: req.name.clone(),
            public_key: req.public_key,
            ipv4,
            ipv6,
            listen_port: req.listen_port,
            endpoint: None,
            roles,
            serial: self.next_serial(),
            // Approved again after a revocation: this record names it, or
            // it would be void like the records before it.
            after_revocation: self.store.revocation(&req.public_key).map(|r| r.serial),
        }
    }

    /// The revocation of `record`'s device: a fresh serial, voiding every
    /// record of the device signed before it, whatever their serials
    /// (some may be hidden from this view).
    fn revocation_of(&self, record: &DeviceRecord) -> Revocation {
        Revocation {
            public_key: record.public_key,
            name: record.name.clone(),
            serial: self.next_serial(),
            every_serial: true,
        }
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
            new.serial = view.next_serial();
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
        self.approve_expecting(key, who, None, roles).await
    }

    /// `approve`, only if the device's key has `fingerprint` (as the device
    /// shows it, `requests::fingerprint`): a join request replaced under
    /// the same name is refused instead of approved.
    pub async fn approve_expecting(
        &mut self,
        key: &AdminKey,
        who: &str,
        fingerprint: Option<&str>,
        roles: &RoleChange,
    ) -> Result<Approved, AdminError> {
        for attempt in 0..MAX_ATTEMPTS {
            let view = self.read(key.public_key()).await?;
            let m = view.membership()?;
            let settings = view
                .settings()
                .cloned()
                .ok_or_else(|| AdminError::Refused("the registry has no settings".into()))?;
            let serial = view.next_serial();
            let txn = if let Some(dev) = find_device(&m, who) {
                if let Some(f) = fingerprint
                    && !requests::matches(&dev.public_key, f)
                {
                    return Err(AdminError::Refused(format!(
                        "member {} has key {} (fingerprint {}), not fingerprint {f}",
                        dev.name,
                        dev.public_key,
                        requests::fingerprint(&dev.public_key)
                    )));
                }
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
                let req =
                    requests::find(&view.store, who, fingerprint).map_err(AdminError::Refused)?;
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
                let record = view.new_member(req, (ipv4, ipv6), roles.apply(Roles::default()));
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
            let revocation = view.revocation_of(&record);
            let txn = Txn::new()
                .when([
                    view.serial_unchanged(&self.layout),
                    Compare::value(dk.clone(), CompareOp::Equal, raw),
                ])
                .and_then([
                    TxnOp::delete(dk, None),
                    TxnOp::delete(self.layout.alloc_v4(record.ipv4), None),
                    TxnOp::delete(self.layout.alloc_v6(record.ipv6), None),
                    TxnOp::put(rk.clone(), encode(key, &rk, &revocation)?, None),
                    TxnOp::put(self.layout.serial(), revocation.serial.to_string(), None),
                ]);
            if self.commit("the revocation", txn).await? {
                return Ok(record);
            }
            back_off(attempt).await;
        }
        Err(contention())
    }

    /// Signs the settings and every device record in force again, as they
    /// are, with serials above `above` and above every serial this view
    /// reads. After etcd was restored from an older backup, devices that
    /// verified newer records ignore the restored ones as rolled back;
    /// this makes what etcd holds now the newest. Returns the first and
    /// last serial used. Each transaction is guarded by the counter, so a
    /// concurrent change stops it with an error.
    pub async fn resign(&mut self, key: &AdminKey, above: u64) -> Result<(u64, u64), AdminError> {
        let view = self.read(key.public_key()).await?;
        let (settings, devices) = view.resigned(above)?;
        let first = settings.serial;
        let sk = self.layout.settings();
        let mut before = view.serial_raw.clone();
        let mut batches: Vec<(Vec<TxnOp>, u64)> = vec![(
            vec![TxnOp::put(sk.clone(), encode(key, &sk, &settings)?, None)],
            settings.serial,
        )];
        for chunk in devices.chunks(DEVICES_PER_TXN) {
            let mut ops = Vec::with_capacity(chunk.len());
            for d in chunk {
                let dk = self.layout.device(&d.public_key);
                ops.push(TxnOp::put(dk.clone(), encode(key, &dk, d)?, None));
            }
            batches.push((ops, chunk.last().map_or(first, |d| d.serial)));
        }
        let mut last = first;
        for (mut ops, serial) in batches {
            ops.push(TxnOp::put(self.layout.serial(), serial.to_string(), None));
            let guard = match &before {
                Some(raw) => Compare::value(self.layout.serial(), CompareOp::Equal, raw.clone()),
                None => Compare::version(self.layout.serial(), CompareOp::Equal, 0),
            };
            if !self
                .commit("signing again", Txn::new().when([guard]).and_then(ops))
                .await?
            {
                return Err(AdminError::Unavailable(format!(
                    "another admin changed {} meanwhile; records up to serial {last} were signed again, run it again",
                    self.cfg.url
                )));
            }
            before = Some(serial.to_string().into_bytes());
            last = serial;
        }
        Ok((first, last))
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
            snapshots: None,
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
                    // exit_clients, exit_capacity); check_importable
                    // refused rate limits.
                    roles: Roles {
                        exit_node: d.exit_node,
                        exit_clients: d.exit_clients.as_ref().map(|c| c.iter().cloned().collect()),
                        exit_capacity: d.exit_capacity.map(crate::mesh::Rate::bits_per_second),
                    },
                    serial,
                    after_revocation: None,
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

    /// Names `snapshot_key` in the settings as the key that signs the
    /// mesh's snapshots, valid for at most `max_validity` seconds (turns
    /// snapshots on, or rotates the key). Write a snapshot right after
    /// (`refresh_snapshot`): devices without memory believe nothing until
    /// one is there.
    pub async fn set_snapshot_key(
        &mut self,
        key: &AdminKey,
        snapshot_key: AdminPublicKey,
        max_validity: u64,
    ) -> Result<Settings, AdminError> {
        if max_validity == 0 {
            return Err(AdminError::Refused(
                "a snapshot valid for 0 s would never be believed".into(),
            ));
        }
        self.set(key, |s| {
            s.snapshots = Some(SnapshotPolicy {
                key: snapshot_key,
                max_validity,
            });
        })
        .await
    }

    /// Signs and writes a new snapshot of the registry with the snapshot
    /// key, valid for `validity` seconds (the settings' most when `None`)
    /// from `now_ms`. `previous` is the last snapshot this refresher
    /// wrote (its memory: etcd cannot make it sign anything older). The
    /// write is guarded by the serial counter, so a concurrent change
    /// makes it read again.
    pub async fn refresh_snapshot(
        &mut self,
        admin: AdminPublicKey,
        snapshot_key: &AdminKey,
        validity: Option<u64>,
        previous: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<Refreshed, AdminError> {
        for attempt in 0..MAX_ATTEMPTS {
            let mut view = self.read(admin).await?;
            let policy = view.store.snapshot_policy().cloned().ok_or_else(|| {
                AdminError::Refused(
                    "the mesh settings name no snapshot key (`nexctl mesh snapshot-key` sets one)"
                        .into(),
                )
            })?;
            if policy.key != snapshot_key.public_key() {
                return Err(AdminError::Refused(format!(
                    "the mesh settings name snapshot key {}, not this one ({})",
                    policy.key,
                    snapshot_key.public_key()
                )));
            }
            if let Some(p) = previous {
                // A previous snapshot of another key (before a rotation)
                // does not verify and is simply not learnt.
                let _ = view.store.learn_snapshot(p);
            }
            let (snapshot, rolled_back) = super::snapshot::build(
                &view.store,
                now_ms,
                validity.unwrap_or(policy.max_validity),
            )
            .map_err(AdminError::Refused)?;
            let sk = self.layout.snapshot();
            let raw = encode(snapshot_key, &sk, &snapshot)?;
            let txn = Txn::new()
                .when([view.serial_unchanged(&self.layout)])
                .and_then([TxnOp::put(sk, raw.clone(), None)]);
            if self.commit("writing the snapshot", txn).await? {
                return Ok(Refreshed {
                    snapshot,
                    raw,
                    rolled_back,
                });
            }
            back_off(attempt).await;
        }
        Err(contention())
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

/// Whether the registry can hold everything `mesh` says: device records
/// have no `exit_rate_limit`, `exit_flow_limit` or `exit_new_flow_rate`
/// yet, and an import must not drop one silently.
pub fn check_importable(mesh: &Mesh) -> Result<(), AdminError> {
    // Dropped silently, a group's members would each serve on their own,
    // masquerading to their own addresses: say so instead.
    if !mesh.exit_groups.is_empty() {
        let names: Vec<&str> = mesh.exit_groups.iter().map(|g| g.name.as_str()).collect();
        return Err(AdminError::Refused(format!(
            "the file has exit groups ({}): the registry's signed records cannot carry exit groups yet; remove them (the [[exit_group]] tables and the members' exit_group fields) to import it (nothing was written)",
            names.join(", ")
        )));
    }
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
    use crate::{
        keys::PrivateKey,
        registry::{
            fixtures::{device, settings},
            signed::seal,
        },
    };

    /// A view as the admin reads it: `values` signed at their keys, the
    /// unsigned counter at `counter`.
    fn view(admin: &AdminKey, counter: u64, values: Vec<(String, Vec<u8>)>) -> View {
        let layout = Layout::new("/m");
        let mut store = Store::new(layout.clone(), admin.public_key());
        let sk = layout.settings();
        let mut all = vec![(sk.clone(), seal(admin, &sk, &settings()).expect("seal"))];
        all.extend(values);
        store.replace_all(all, 9);
        View {
            store,
            serial_raw: Some(counter.to_string().into_bytes()),
            serial: counter,
        }
    }

    fn signed_device(admin: &AdminKey, d: &DeviceRecord) -> (String, Vec<u8>) {
        let k = Layout::new("/m").device(&d.public_key);
        let v = seal(admin, &k, d).expect("seal");
        (k, v)
    }

    #[test]
    fn a_role_change_sets_keeps_or_clears_the_exit_capacity() {
        let sized = Roles {
            exit_node: true,
            exit_capacity: Some(2_000_000_000),
            ..Roles::default()
        };
        // Not named: kept, whatever else changes.
        let other = RoleChange {
            exit_clients: Some(Some(vec!["a".into()])),
            ..RoleChange::default()
        };
        assert_eq!(
            other.apply(sized.clone()).exit_capacity,
            Some(2_000_000_000)
        );
        let set = RoleChange {
            exit_capacity: Some(Some(500_000_000)),
            ..RoleChange::default()
        };
        assert_eq!(set.apply(sized.clone()).exit_capacity, Some(500_000_000));
        let clear = RoleChange {
            exit_capacity: Some(None),
            ..RoleChange::default()
        };
        assert_eq!(clear.apply(sized).exit_capacity, None);
    }

    #[test]
    fn the_admin_signs_above_every_serial_it_can_read_not_the_counter() {
        // Issue 21, item 3: the counter at 5 and ex's record at serial 5;
        // an etcd writer sets the counter to 1.
        let admin = AdminKey::generate();
        let ex = device("ex", 1, 5);
        let v = view(&admin, 1, vec![signed_device(&admin, &ex)]);
        assert!(
            v.next_serial() > 5,
            "the next change would be signed with serial {}, at or below ex's 5",
            v.next_serial()
        );
        // A revocation the admin can read counts as well.
        let gone = PrivateKey::generate().public_key();
        let rk = Layout::new("/m").revoked(&gone);
        let r = Revocation {
            public_key: gone,
            name: "gone".into(),
            serial: 9,
            every_serial: true,
        };
        let v = view(
            &admin,
            1,
            vec![(rk.clone(), seal(&admin, &rk, &r).expect("seal"))],
        );
        assert_eq!(v.next_serial(), 10);
        // The counter still counts when it is the highest.
        let v = view(&admin, 12, vec![signed_device(&admin, &ex)]);
        assert_eq!(v.next_serial(), 13);
    }

    #[test]
    fn signing_again_keeps_every_record_and_goes_above_what_devices_saw() {
        // etcd restored from a backup: ex's record at serial 3, the counter
        // at 3; devices verified serials up to 9 meanwhile.
        let admin = AdminKey::generate();
        let mut ex = device("ex", 1, 3);
        ex.roles.exit_node = true;
        let b = device("b", 2, 2);
        let v = view(
            &admin,
            3,
            vec![signed_device(&admin, &ex), signed_device(&admin, &b)],
        );
        let (settings, devices) = v.resigned(9).expect("resigned");
        assert_eq!(settings.serial, 10);
        assert_eq!(devices.len(), 2);
        let mut serials: Vec<u64> = devices.iter().map(|d| d.serial).collect();
        serials.sort_unstable();
        assert_eq!(serials, [11, 12]);
        let again = devices
            .iter()
            .find(|d| d.public_key == ex.public_key)
            .expect("ex");
        assert_eq!(
            DeviceRecord {
                serial: ex.serial,
                ..again.clone()
            },
            ex
        );
        // Without a floor: above what the view reads.
        let (settings, _) = v.resigned(0).expect("resigned");
        assert_eq!(settings.serial, 4);
    }

    #[test]
    fn a_revocation_voids_every_serial_the_device_ever_had() {
        // The admin revokes ex when its newest readable record is the
        // serial-2 one (the serial-5 record was hidden from it).
        let admin = AdminKey::generate();
        let mut ex = device("ex", 1, 2);
        let v = view(&admin, 2, vec![signed_device(&admin, &ex)]);
        let r = v.revocation_of(&ex);
        assert!(r.serial > 2, "{r:?}");
        ex.serial = 5;
        assert!(r.voids(&ex), "the serial-5 record survives {r:?}");
    }

    #[test]
    fn a_device_approved_again_after_a_revocation_names_it() {
        let admin = AdminKey::generate();
        let old = device("ex", 1, 4);
        let rk = Layout::new("/m").revoked(&old.public_key);
        let r = Revocation {
            public_key: old.public_key,
            name: "ex".into(),
            serial: 7,
            every_serial: true,
        };
        let v = view(
            &admin,
            7,
            vec![(rk.clone(), seal(&admin, &rk, &r).expect("seal"))],
        );
        let req = JoinRequest {
            name: "ex".into(),
            public_key: old.public_key,
            listen_port: 51820,
            endpoint: None,
            exit_node: false,
            requested_at: 0,
        };
        let again = v.new_member(&req, (old.ipv4, old.ipv6), Roles::default());
        assert_eq!(again.after_revocation, Some(7), "{again:?}");
        assert!(again.serial > 7);
        assert!(!r.voids(&again));
        assert!(r.voids(&old));
    }

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

    #[test]
    fn a_mesh_with_exit_groups_is_refused_naming_them() {
        let (mesh, _) = crate::exit_group::fixtures::mesh(false, false);
        match check_importable(&mesh) {
            Err(AdminError::Refused(m)) => {
                assert!(m.contains("exit groups (eu)"), "{m}");
            }
            other => panic!("{other:?}"),
        }
    }
}
