//! The device side: a self-contained task that keeps this device's join
//! request and endpoint in etcd, follows the prefix, and tells the daemon
//! what the verified membership is.
//!
//! The daemon calls [`Registry::connect`] once and then only reads events
//! (and [`Registry::status`] for `nexctl nexd status`); [`Registry::shutdown`]
//! on stop. Nothing here touches the kernel: a lost etcd changes nothing
//! in the data path, it only stops updates until etcd is back.
//!
//! Per session (one etcd connection): a lease (TTL `lease_ttl`, kept alive
//! at a third of it) under which the endpoint and, while the device is not
//! a member, its join request are written; a full read, or after a
//! reconnect a watch resumed from the last revision seen (missed changes
//! are replayed); then the watch. A watch etcd cancels because its start
//! was compacted away triggers a full read and a new watch. Any error ends
//! the session: reconnect after a bounded, jittered exponential backoff.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    admin_key::AdminPublicKey,
    cache,
    connection::{EtcdConfig, RegistryError},
    location::Layout,
    membership::{self, Membership},
    records::{EndpointRecord, JoinRequest},
    requests, snapshot,
    verify::{Ignored, Store},
};
use crate::{keys::PublicKey, mesh};

/// What the device side needs to know.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub etcd: EtcdConfig,
    /// The mesh admin's public key: only what it signed is believed.
    pub admin: AdminPublicKey,
    /// The name this device asks to join under.
    pub name: String,
    /// The WireGuard port this device listens on (put in the request).
    pub listen_port: u16,
    /// `host:port` peers should send to, published under the lease; `None`
    /// publishes nothing (a device that only dials out).
    pub advertise: Option<String>,
    /// Ask to be an exit node (the admin decides).
    pub request_exit_node: bool,
    /// Lease TTL of the endpoint and the join request: how long they stay
    /// after the device vanished without a goodbye.
    pub lease_ttl: Duration,
    /// First and longest pause between reconnection attempts.
    pub backoff: (Duration, Duration),
}

impl DeviceConfig {
    /// Defaults for everything but what only the caller knows.
    pub fn new(etcd: EtcdConfig, admin: AdminPublicKey, name: String, listen_port: u16) -> Self {
        DeviceConfig {
            etcd,
            admin,
            name,
            listen_port,
            advertise: None,
            request_exit_node: false,
            lease_ttl: Duration::from_secs(10),
            backoff: (Duration::from_millis(200), Duration::from_secs(5)),
        }
    }
}

/// Where a membership came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Read from etcd at this revision.
    Registry { revision: i64 },
    /// From the cache in the state directory (etcd was unreachable), saved
    /// at this Unix time.
    Cache { saved_at: u64 },
}

/// What the daemon is told.
#[derive(Debug, Clone)]
pub enum MembershipEvent {
    /// This device is not (or no longer) a member: its join request is
    /// published. The daemon configures no peers until a `Membership`.
    WaitingForApproval,
    /// The verified membership changed (or is known for the first time).
    /// Apply it like a reloaded mesh file; `membership.roles` has the
    /// roles of every device.
    Membership {
        membership: Box<Membership>,
        source: Source,
    },
    /// etcd stopped answering. Keep the current configuration.
    ConnectionLost { error: String },
    /// etcd answers again (a `Membership` follows if anything changed).
    ConnectionRestored,
}

/// The registry as `nexctl nexd status` would show it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegistryStatus {
    pub url: String,
    pub connected: bool,
    pub waiting_for_approval: bool,
    pub source: Option<Source>,
    pub revision: i64,
    pub devices: usize,
    /// Records not used right now, with the reason.
    pub ignored: Vec<Ignored>,
    /// Rejected values seen since start (each write of a bad value counts).
    pub rejected_total: u64,
    /// Full reads after a compacted watch.
    pub resyncs: u64,
    /// Sessions that ended with an error.
    pub disconnects: u64,
    pub last_error: Option<String>,
}

/// The running device side. Dropping it stops the task (without revoking
/// the lease; [`Registry::shutdown`] does that).
pub struct Registry {
    status: watch::Receiver<RegistryStatus>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Registry {
    /// Checks the configuration and starts the task. Fails only for what
    /// retrying cannot fix (a bad name or endpoint, unreadable TLS files);
    /// an unreachable etcd is reported as events.
    pub async fn connect(
        config: DeviceConfig,
        own: PublicKey,
        state_dir: PathBuf,
    ) -> Result<(Registry, mpsc::Receiver<MembershipEvent>), RegistryError> {
        mesh::check_name(&config.name)
            .map_err(|m| RegistryError::Config(format!("device name {m}")))?;
        if let Some(a) = &config.advertise {
            mesh::parse_endpoint(a)
                .map_err(|m| RegistryError::Config(format!("advertised endpoint {m}")))?;
        }
        config.etcd.validate()?;
        let layout = Layout::new(&config.etcd.url.prefix);
        let requested_at = unix_now();
        let request = serde_json::to_vec(&JoinRequest {
            name: config.name.clone(),
            public_key: own,
            listen_port: config.listen_port,
            endpoint: config.advertise.clone(),
            exit_node: config.request_exit_node,
            requested_at,
        })
        .map_err(|e| RegistryError::Config(e.to_string()))?;
        let endpoint = match &config.advertise {
            Some(a) => Some(
                serde_json::to_vec(&EndpointRecord {
                    endpoint: a.clone(),
                })
                .map_err(|e| RegistryError::Config(e.to_string()))?,
            ),
            None => None,
        };
        let (events, rx) = mpsc::channel(64);
        let (status_tx, status) = watch::channel(RegistryStatus {
            url: config.etcd.url.to_string(),
            ..RegistryStatus::default()
        });
        let (stop, stop_rx) = oneshot::channel();
        let worker = Worker {
            store: Store::for_device(layout.clone(), config.admin, own, &config.name),
            layout,
            cfg: config,
            own,
            state_dir,
            request,
            endpoint,
            events,
            status: status_tx,
            last: None,
            waiting: false,
            connected: false,
            lost_reported: false,
            from_etcd: false,
            current: None,
            stale_lease: None,
            endpoint_lease: None,
            request_lease: None,
            saved_marks: 0,
            claims_logged: BTreeSet::new(),
            memory: false,
            stale_logged: false,
        };
        let task = tokio::spawn(worker.run(stop_rx));
        Ok((
            Registry {
                status,
                stop: Some(stop),
                task: Some(task),
            },
            rx,
        ))
    }

    /// The current status.
    pub fn status(&self) -> RegistryStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn status_watch(&self) -> watch::Receiver<RegistryStatus> {
        self.status.clone()
    }

    /// Stops the task and revokes the lease, so the endpoint and any join
    /// request disappear at once (bounded: 2 s).
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A pause of `d` scaled into [d/2, d).
fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 1];
    let _ = rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut b);
    d / 2 + d.mul_f64(f64::from(b[0]) / 512.0)
}

struct Worker {
    cfg: DeviceConfig,
    own: PublicKey,
    state_dir: PathBuf,
    layout: Layout,
    store: Store,
    /// This device's join request and endpoint values, as written.
    request: Vec<u8>,
    endpoint: Option<Vec<u8>>,
    events: mpsc::Sender<MembershipEvent>,
    status: watch::Sender<RegistryStatus>,
    /// The last membership sent (`None` after a `WaitingForApproval`).
    last: Option<Membership>,
    waiting: bool,
    connected: bool,
    lost_reported: bool,
    /// Whether `store` was read from etcd (and not from the cache).
    from_etcd: bool,
    /// The session's client and lease, for the goodbye.
    current: Option<(Client, i64)>,
    /// The lease of the session before, revoked once this session has
    /// written its keys again (so they never vanish in between).
    stale_lease: Option<i64>,
    /// The leases the endpoint and the join request were last written
    /// under: a new session writes them again under its own.
    endpoint_lease: Option<i64>,
    request_lease: Option<i64>,
    /// The store's marks generation the cache was last written at.
    saved_marks: u64,
    /// Claims on this device's name already logged.
    claims_logged: BTreeSet<String>,
    /// Whether this device remembers the mesh (a cache with settings, or
    /// a membership it accepted): then it follows etcd without a valid
    /// snapshot, its marks keeping anything older out.
    memory: bool,
    /// A stale snapshot was logged (once per run).
    stale_logged: bool,
}

/// Why a session ended.
enum End {
    Error(RegistryError),
}

impl From<RegistryError> for End {
    fn from(e: RegistryError) -> Self {
        End::Error(e)
    }
}

impl Worker {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        self.recall();
        let mut delay = self.cfg.backoff.0;
        loop {
            let ended = tokio::select! {
                e = self.session() => e,
                _ = &mut stop => {
                    self.goodbye().await;
                    return;
                }
            };
            let End::Error(e) = ended;
            if self.connected {
                delay = self.cfg.backoff.0;
            }
            self.lost(e).await;
            tokio::select! {
                _ = tokio::time::sleep(jittered(delay)) => {}
                _ = &mut stop => {
                    self.goodbye().await;
                    return;
                }
            }
            delay = (delay * 2).min(self.cfg.backoff.1);
        }
    }

    async fn emit(&self, e: MembershipEvent) {
        // A daemon that stopped listening is shutting down: nothing to do.
        let _ = self.events.send(e).await;
    }

    fn update_status(&self, f: impl FnOnce(&mut RegistryStatus)) {
        self.status.send_modify(f);
    }

    async fn goodbye(&mut self) {
        if let Some((client, lease)) = self.current.take() {
            let mut lc = client.lease_client();
            match tokio::time::timeout(Duration::from_secs(2), lc.revoke(lease)).await {
                Ok(Ok(_)) => tracing::debug!(lease, "registry lease revoked"),
                Ok(Err(e)) => tracing::debug!(lease, error = %e, "registry lease not revoked"),
                Err(_) => tracing::debug!(lease, "registry lease revocation timed out"),
            }
        }
    }

    async fn lost(&mut self, e: RegistryError) {
        let text = e.to_string();
        tracing::warn!(registry = %self.cfg.etcd.url, error = %text, "registry connection lost; retrying");
        self.connected = false;
        if let Some((_, lease)) = self.current.take() {
            self.stale_lease = Some(lease);
        }
        self.update_status(|s| {
            s.connected = false;
            s.disconnects += 1;
            s.last_error = Some(text.clone());
        });
        if !self.lost_reported {
            self.lost_reported = true;
            self.emit(MembershipEvent::ConnectionLost {
                error: text.clone(),
            })
            .await;
        }
        // Unreachable before anything was known: start from the cache.
        if self.last.is_none() && !self.waiting && !self.from_etcd {
            self.use_cache().await;
        }
    }

    fn empty_store(&self) -> Store {
        Store::for_device(
            self.layout.clone(),
            self.cfg.admin,
            self.own,
            &self.cfg.name,
        )
    }

    /// Tells the daemon about a membership believed: from now on this
    /// device remembers the mesh.
    async fn accept(&mut self, m: Membership, source: Source) {
        self.last = Some(m.clone());
        self.memory = true;
        self.emit(MembershipEvent::Membership {
            membership: Box::new(m),
            source,
        })
        .await;
    }

    /// What this device verified before it restarted (the cache's marks
    /// and revocations), so etcd cannot take it back to anything older;
    /// the content itself comes from etcd, or from the cache only while
    /// etcd is unreachable (`use_cache`).
    fn recall(&mut self) {
        let fresh = self.empty_store();
        match cache::load(&self.state_dir, fresh) {
            Ok(Some(cached)) => {
                self.store.recall(&cached.store);
                self.saved_marks = self.store.marks_generation();
                self.memory = cache::worth_saving(&cached.store);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "the registry cache is not usable"),
        }
    }

    async fn use_cache(&mut self) {
        let fresh = self.empty_store();
        match cache::load(&self.state_dir, fresh) {
            Ok(Some(cached)) => match membership::build(&cached.store) {
                Ok(m) if m.mesh.device(&self.own).is_some() => {
                    tracing::warn!(
                        devices = m.mesh.devices.len(),
                        saved_at = cached.saved_at,
                        "etcd is unreachable: using the last verified membership from the cache"
                    );
                    let mut store = cached.store;
                    store.recall(&self.store);
                    self.store = store;
                    let source = Source::Cache {
                        saved_at: cached.saved_at,
                    };
                    self.set_membership_status(&m, Some(source));
                    self.accept(m, source).await;
                }
                Ok(_) => tracing::info!("the registry cache does not list this device; not used"),
                Err(e) => {
                    tracing::warn!(error = %e, "the registry cache holds no usable membership")
                }
            },
            Ok(None) => tracing::info!("no registry cache to start from"),
            Err(e) => tracing::warn!(error = %e, "the registry cache is not usable"),
        }
    }

    /// Whether what the store holds may be believed by a device with no
    /// memory of the mesh (`snapshot::fresh`, against this clock).
    fn freshness(&self) -> Result<(), String> {
        snapshot::fresh(
            self.store.snapshot_policy(),
            self.store.snapshot().map(|k| &k.snapshot),
            unix_now(),
        )
    }

    /// The snapshot's state for the status's ignored records, when it is
    /// not valid.
    fn snapshot_note(&self) -> Option<Ignored> {
        let why = self.freshness().err()?;
        Some(Ignored {
            key: self.layout.snapshot(),
            reason: if self.memory {
                format!(
                    "stale: {why}; this device keeps following etcd, believing nothing older than what it verified"
                )
            } else {
                format!("no membership believed yet: {why}")
            },
        })
    }

    fn set_membership_status(&self, m: &Membership, source: Option<Source>) {
        let note = self.snapshot_note();
        self.update_status(|s| {
            s.devices = m.mesh.devices.len();
            s.ignored = m.ignored.clone();
            s.ignored.extend(note);
            if source.is_some() {
                s.source = source;
            }
        });
    }

    async fn session(&mut self) -> End {
        match self.session_inner().await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn session_inner(&mut self) -> Result<std::convert::Infallible, End> {
        let cfg = self.cfg.etcd.clone();
        let client = cfg.connect().await?;
        let mut leases = client.lease_client();
        let ttl = i64::try_from(self.cfg.lease_ttl.as_secs().max(2)).unwrap_or(10);
        let lease = cfg
            .call("a lease grant", leases.grant(ttl, None))
            .await?
            .id();
        self.current = Some((client.clone(), lease));
        let (mut keeper, mut keepalive) = cfg
            .call("the lease keep-alive", leases.keep_alive(lease))
            .await?;
        let mut kv = client.kv_client();
        let mut watcher = client.watch_client();

        // Resume where the last session stopped, unless the cluster went
        // back in time (restored from a backup) or we never read it.
        let mut full = !self.from_etcd;
        if !full {
            let r = cfg
                .call("a read", kv.get(self.layout.settings(), None))
                .await?;
            let now = r.header().map_or(0, |h| h.revision());
            if now < self.store.revision {
                tracing::warn!(
                    now,
                    seen = self.store.revision,
                    "etcd's revision went back: reading everything again"
                );
                full = true;
            }
        }
        let mut tick = tokio::time::interval(self.cfg.lease_ttl / 3);
        loop {
            if full {
                let r = cfg
                    .call(
                        "a full read",
                        kv.get(self.layout.all(), Some(GetOptions::new().with_prefix())),
                    )
                    .await?;
                let rev = r.header().map_or(0, |h| h.revision());
                let kvs: Vec<(String, Vec<u8>)> = r
                    .kvs()
                    .iter()
                    .map(|kv| {
                        (
                            String::from_utf8_lossy(kv.key()).into_owned(),
                            kv.value().to_vec(),
                        )
                    })
                    .collect();
                self.store.replace_all(kvs, rev);
                self.from_etcd = true;
                let rejected = self.store.rejected().len() as u64;
                self.update_status(|s| s.rejected_total += rejected);
            }
            self.restored().await;
            self.publish(&mut kv, lease).await?;
            if let Some(stale) = self.stale_lease.take() {
                // Best effort: what is still attached to it (nothing, now
                // that this session wrote its keys) goes with it; if etcd
                // says no, the lease runs out by itself.
                let _ = cfg.call("a lease revocation", leases.revoke(stale)).await;
            }
            let mut stream = cfg
                .call(
                    "a watch",
                    watcher.watch(
                        self.layout.all(),
                        Some(
                            WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(self.store.revision + 1),
                        ),
                    ),
                )
                .await?;
            loop {
                tokio::select! {
                    msg = stream.message() => {
                        let resp = msg.map_err(|e| cfg.error(e))?.ok_or_else(|| {
                            RegistryError::Unreachable {
                                endpoints: cfg.url.endpoints.join(","),
                                detail: "the watch stream ended".into(),
                            }
                        })?;
                        if resp.canceled() {
                            if resp.compact_revision() > 0 {
                                tracing::info!(
                                    from = self.store.revision + 1,
                                    compacted_to = resp.compact_revision(),
                                    "registry watch fell behind a compaction: reading everything again"
                                );
                                self.update_status(|s| s.resyncs += 1);
                                full = true;
                                break;
                            }
                            return Err(RegistryError::Etcd {
                                endpoints: cfg.url.endpoints.join(","),
                                detail: format!("etcd cancelled the watch: {}", resp.cancel_reason()),
                            }.into());
                        }
                        if resp.events().is_empty() {
                            continue;
                        }
                        let mut rejected = 0;
                        for ev in resp.events() {
                            let Some(item) = ev.kv() else { continue };
                            let key = String::from_utf8_lossy(item.key()).into_owned();
                            match ev.event_type() {
                                EventType::Put => {
                                    if self.store.put(key.clone(), item.value().to_vec())
                                        && let Some(why) = self.store.rejected().into_iter().find(|i| i.key == key)
                                    {
                                        tracing::warn!(key, reason = why.reason, "ignoring a registry record");
                                        rejected += 1;
                                    }
                                }
                                EventType::Delete => {
                                    self.store.delete(&key);
                                }
                            }
                            self.store.revision = self.store.revision.max(item.mod_revision());
                        }
                        if let Some(h) = resp.header() {
                            self.store.revision = self.store.revision.max(h.revision());
                        }
                        self.update_status(|s| s.rejected_total += rejected);
                        self.publish(&mut kv, lease).await?;
                    }
                    _ = tick.tick() => {
                        cfg.call("a lease keep-alive", keeper.keep_alive()).await?;
                    }
                    k = keepalive.message() => {
                        match k.map_err(|e| cfg.error(e))? {
                            Some(r) if r.ttl() > 0 => {}
                            _ => return Err(RegistryError::Etcd {
                                endpoints: cfg.url.endpoints.join(","),
                                detail: format!("lease {lease} expired"),
                            }.into()),
                        }
                    }
                }
            }
        }
    }

    async fn restored(&mut self) {
        if !self.connected {
            self.connected = true;
            tracing::info!(registry = %self.cfg.etcd.url, revision = self.store.revision, "registry connected");
            self.update_status(|s| {
                s.connected = true;
                s.last_error = None;
            });
            if self.lost_reported {
                self.lost_reported = false;
                self.emit(MembershipEvent::ConnectionRestored).await;
            }
        }
    }

    /// After the content changed: write what this device must have there,
    /// tell the daemon about a new membership, refresh the cache.
    async fn publish(&mut self, kv: &mut etcd_client::KvClient, lease: i64) -> Result<(), End> {
        let cfg = self.cfg.etcd.clone();
        let revision = self.store.revision;
        let note = self.snapshot_note();
        self.update_status(|s| {
            s.revision = revision;
            s.ignored = self.store.rejected();
            s.ignored.extend(note);
        });
        if let Some(ep) = &self.endpoint {
            let key = self.layout.endpoint(&self.own);
            if self.store.raw(&key) != Some(ep.as_slice()) || self.endpoint_lease != Some(lease) {
                cfg.call(
                    "publishing the endpoint",
                    kv.put(key, ep.clone(), Some(PutOptions::new().with_lease(lease))),
                )
                .await?;
                self.endpoint_lease = Some(lease);
            }
        }
        let m = match membership::build(&self.store) {
            Ok(m) => Some(m),
            Err(e) => {
                self.update_status(|s| s.last_error = Some(e.to_string()));
                None
            }
        };
        let member = m
            .as_ref()
            .is_some_and(|m| m.mesh.device(&self.own).is_some());
        if member
            && !self.memory
            && let Err(why) = self.freshness()
        {
            // Never saw the mesh, and nothing says what etcd shows is
            // current: believe nothing yet (issue 21). Asking to join
            // would be wrong too; wait for a valid snapshot.
            if !self.stale_logged {
                self.stale_logged = true;
                tracing::warn!(
                    reason = why,
                    "not believing the membership etcd shows until a valid snapshot covers it"
                );
            }
            return Ok(());
        }
        if !member {
            let key = self.layout.request(&self.own);
            if self.store.raw(&key) != Some(self.request.as_slice())
                || self.request_lease != Some(lease)
            {
                cfg.call(
                    "writing the join request",
                    kv.put(
                        key,
                        self.request.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                )
                .await?;
                self.request_lease = Some(lease);
            }
            // Someone else asking (or approved) under this device's name:
            // its request may have been replaced. Shown and logged once.
            let claims = requests::claims(&self.store, m.as_ref(), &self.own, &self.cfg.name);
            for c in &claims {
                if self.claims_logged.insert(c.key.clone()) {
                    tracing::warn!(key = c.key, "{}", c.reason);
                }
            }
            self.update_status(|s| s.ignored.extend(claims));
            if !self.waiting {
                tracing::info!(
                    name = self.cfg.name,
                    fingerprint = requests::fingerprint(&self.own),
                    "not a member of the mesh: join request published, waiting for approval (the admin approves it with `nexctl mesh approve NAME --fingerprint FINGERPRINT`)"
                );
                self.waiting = true;
                self.last = None;
                self.update_status(|s| s.waiting_for_approval = true);
                self.emit(MembershipEvent::WaitingForApproval).await;
            }
            return Ok(());
        }
        let Some(m) = m else { return Ok(()) };
        // A member asks for nothing: a request left from a time it was not
        // one (revoked, or its record briefly unverifiable) goes. The
        // approval itself deletes the request in its transaction.
        let request_key = self.layout.request(&self.own);
        if self.store.raw(&request_key).is_some() {
            cfg.call("removing the join request", kv.delete(request_key, None))
                .await?;
        }
        self.request_lease = None;
        self.waiting = false;
        let source = Source::Registry { revision };
        self.update_status(|s| s.waiting_for_approval = false);
        self.set_membership_status(&m, Some(source));
        let same = self.last.as_ref().is_some_and(|l| l.same_mesh(&m));
        // Also when only a mark moved: what was verified must survive a
        // restart even if the mesh it gives did not change.
        if (!same || self.saved_marks != self.store.marks_generation())
            && cache::worth_saving(&self.store)
        {
            match cache::save(&self.state_dir, &self.store, unix_now()) {
                Ok(()) => self.saved_marks = self.store.marks_generation(),
                Err(e) => tracing::warn!(error = %e, "cannot write the registry cache"),
            }
        }
        if same {
            return Ok(());
        }
        tracing::info!(
            devices = m.mesh.devices.len(),
            revision,
            "registry membership changed"
        );
        if let Err(why) = self.freshness()
            && !self.stale_logged
        {
            self.stale_logged = true;
            tracing::warn!(
                reason = why,
                "the registry's snapshot is not valid: following etcd with what this device verified"
            );
        }
        self.accept(m, source).await;
        Ok(())
    }
}
