//! The device side of membership through etcd (`registry::Registry`)
//! against a real etcd from Debian's etcd-server, in test namespaces.
//!
//! Each device runs in a thread that entered a "device" namespace, on its
//! own runtime, and forwards its events (with the time they arrived) to
//! the test. Admin operations run in an "admin" namespace through
//! `registry::admin`, as `nexctl mesh` does.
//!
//! Proves: a device asks to join and waits; approval reaches it (and a
//! watching member) within 1 s, revocation likewise; records forged in
//! etcd are ignored and counted; a watch whose start was compacted away
//! (the device was cut off meanwhile) ends in a full resync; etcd killed
//! and restarted: the device reports the loss, keeps its membership,
//! reconnects; unreachable at start: the cached membership is used; one
//! member of three killed: approvals still arrive; TLS with client
//! certificates works and a client without a certificate is refused; a
//! device restarted while etcd was rolled back to an older record of it
//! does not believe that record (issue 21: the marks in its cache); with
//! the mesh's signed snapshot, a device that starts without a cache does
//! not believe an etcd rolled back to before a revocation, believes
//! nothing once the snapshot expired, while a running device keeps its
//! membership and still follows changes.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures::future::BoxFuture;
use nexd::{
    keys::{PrivateKey, PublicKey},
    registry::{
        AdminKey, DeviceConfig, EtcdConfig, MembershipEvent, Registry, RegistryStatus, Source,
        TlsFiles,
        admin::{Admin, AdminError, RoleChange},
        records::Settings,
    },
};
use nexd_testkit::{Netns, etcd::EtcdCluster, topology::Switch};

const ONE_SECOND: Duration = Duration::from_secs(1);

/// Switch, etcd, an admin and a device namespace.
struct Lab {
    etcd: EtcdCluster,
    admin_ns: Netns,
    device_ns: Netns,
    _sw: Switch,
    seed: [u8; 32],
    dir: PathBuf,
    prefix: String,
    /// The last snapshot `refresh` wrote.
    last_snapshot: Mutex<Option<Vec<u8>>>,
}

impl Lab {
    fn new(name: &str, members: &[&str], tls: bool) -> anyhow::Result<Self> {
        let mut sw = Switch::new("regsw")?;
        let etcd = if tls {
            EtcdCluster::start_tls(&mut sw, members)?
        } else {
            EtcdCluster::start(&mut sw, members)?
        };
        let admin_ns = Netns::new("admin")?;
        sw.attach(&admin_ns, "eth0", &["198.51.100.100/24"])?;
        let device_ns = Netns::new("dev")?;
        sw.attach(&device_ns, "eth0", &["198.51.100.101/24"])?;
        let dir = std::env::temp_dir().join(format!("nexd-registry-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut seed = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        let lab = Lab {
            etcd,
            admin_ns,
            device_ns,
            _sw: sw,
            seed,
            dir,
            prefix: format!("/{name}"),
            last_snapshot: Mutex::new(None),
        };
        let settings = Settings {
            ipv4_prefix: "100.64.0.0/10".parse()?,
            ipv6_prefix: "fd6e:6578:6400::/48".parse()?,
            mtu: 1420,
            persistent_keepalive: 25,
            agent_port: 51829,
            serial: 1,
            snapshots: None,
        };
        lab.admin(move |a, k| Box::pin(async move { a.init(&k, settings).await }))?;
        Ok(lab)
    }

    fn key(&self) -> AdminKey {
        AdminKey::from_seed(self.seed)
    }

    /// The mesh's snapshot key (derived from the admin seed: another key).
    fn snapshot_key(&self) -> AdminKey {
        let mut seed = self.seed;
        seed[0] ^= 0xff;
        AdminKey::from_seed(seed)
    }

    /// Names the snapshot key in the settings (snapshots valid at most
    /// `max_validity` s).
    fn enable_snapshots(&self, max_validity: u64) -> anyhow::Result<()> {
        let public = self.snapshot_key().public_key();
        self.admin(move |a, k| {
            Box::pin(async move { a.set_snapshot_key(&k, public, max_validity).await })
        })?;
        Ok(())
    }

    /// What the refresher does: a new snapshot valid `validity` s, from
    /// what etcd holds and the last snapshot it wrote (its memory, as
    /// `nexctl mesh refresh-snapshot` keeps in FILE.last).
    fn refresh(&self, validity: u64) -> anyhow::Result<nexd::registry::records::Snapshot> {
        let sk = self.snapshot_key();
        let previous = self
            .last_snapshot
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        let now_ms = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis(),
        )?;
        let r = self.admin(move |a, k| {
            Box::pin(async move {
                a.refresh_snapshot(
                    k.public_key(),
                    &sk,
                    Some(validity),
                    previous.as_deref(),
                    now_ms,
                )
                .await
            })
        })?;
        *self
            .last_snapshot
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))? = Some(r.raw);
        Ok(r.snapshot)
    }

    fn etcd_config(&self) -> anyhow::Result<EtcdConfig> {
        let tls = self.etcd.pki().map(|p| TlsFiles {
            ca: p.ca(),
            cert: Some(p.client_cert()),
            key: Some(p.client_key()),
        });
        Ok(EtcdConfig {
            url: self
                .etcd
                .url(&self.prefix)
                .parse()
                .map_err(anyhow::Error::msg)?,
            tls,
            credentials: None,
        })
    }

    /// Runs an admin operation in the admin namespace.
    fn admin<T: Send + 'static>(
        &self,
        f: impl for<'a> FnOnce(&'a mut Admin, AdminKey) -> BoxFuture<'a, Result<T, AdminError>>
        + Send
        + 'static,
    ) -> anyhow::Result<T> {
        let cfg = self.etcd_config()?;
        let key = self.key();
        self.admin_ns.run_in(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut a = Admin::connect(cfg).await?;
                Ok(f(&mut a, key).await?)
            })
        })
    }

    fn approve(&self, who: &str) -> anyhow::Result<Instant> {
        let who = who.to_owned();
        self.admin(move |a, k| {
            Box::pin(async move { a.approve(&k, &who, &RoleChange::default()).await })
        })?;
        Ok(Instant::now())
    }

    fn make_exit_node(&self, who: &str) -> anyhow::Result<()> {
        let who = who.to_owned();
        let change = RoleChange {
            exit_node: Some(true),
            ..RoleChange::default()
        };
        self.admin(move |a, k| Box::pin(async move { a.approve(&k, &who, &change).await }))?;
        Ok(())
    }

    fn revoke(&self, who: &str) -> anyhow::Result<Instant> {
        let who = who.to_owned();
        self.admin(move |a, k| Box::pin(async move { a.revoke(&k, &who).await }))?;
        Ok(Instant::now())
    }

    /// Starts a device named `name` (its state directory under the lab's).
    fn device(&self, name: &str, n: u8) -> anyhow::Result<Device> {
        let key = PrivateKey::generate().public_key();
        self.device_with_key(name, n, key, self.etcd_config()?)
    }

    fn device_with_key(
        &self,
        name: &str,
        n: u8,
        own: PublicKey,
        etcd: EtcdConfig,
    ) -> anyhow::Result<Device> {
        let state = self.dir.join(name);
        std::fs::create_dir_all(&state)?;
        let mut cfg = DeviceConfig::new(etcd, self.key().public_key(), name.to_owned(), 51820);
        cfg.advertise = Some(format!("192.0.2.{n}:51820"));
        cfg.lease_ttl = Duration::from_secs(4);
        cfg.backoff = (Duration::from_millis(100), Duration::from_secs(1));
        Device::start(&self.device_ns, cfg, own, state)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `Registry` in the device namespace.
struct Device {
    name: String,
    key: PublicKey,
    events: mpsc::Receiver<(Instant, MembershipEvent)>,
    status: Arc<Mutex<RegistryStatus>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Device {
    fn start(
        ns: &Netns,
        cfg: DeviceConfig,
        own: PublicKey,
        state: PathBuf,
    ) -> anyhow::Result<Self> {
        let (tx, events) = mpsc::channel();
        let status = Arc::new(Mutex::new(RegistryStatus::default()));
        let st = status.clone();
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let name = cfg.name.clone();
        let thread = ns.spawn_in(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let (reg, mut rx) = Registry::connect(cfg, own, state).await?;
                let mut sw = reg.status_watch();
                loop {
                    tokio::select! {
                        ev = rx.recv() => match ev {
                            Some(ev) => { let _ = tx.send((Instant::now(), ev)); }
                            None => bail!("the registry task ended"),
                        },
                        r = sw.changed() => {
                            if r.is_err() { bail!("status channel closed"); }
                            let s = sw.borrow().clone();
                            if let Ok(mut g) = st.lock() { *g = s; }
                        }
                        _ = &mut stop_rx => {
                            reg.shutdown().await;
                            return Ok(());
                        }
                    }
                }
            })
        })?;
        Ok(Device {
            name,
            key: own,
            events,
            status,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn status(&self) -> RegistryStatus {
        self.status.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Waits (bounded) until the status satisfies `ok` (status updates
    /// travel apart from events).
    fn wait_status(
        &self,
        what: &str,
        ok: impl Fn(&RegistryStatus) -> bool,
    ) -> anyhow::Result<RegistryStatus> {
        nexd_testkit::wait_for(
            what,
            Duration::from_secs(5),
            Duration::from_millis(20),
            || Some(self.status()).filter(|s| ok(s)),
        )
        .with_context(|| format!("{}: status {:?}", self.name, self.status()))
    }

    /// The next event matching `f` within `timeout`; others are skipped.
    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&MembershipEvent) -> Option<T>,
    ) -> anyhow::Result<(Instant, T)> {
        let deadline = Instant::now() + nexd_testkit::scaled(timeout);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((at, ev)) => {
                    if let Some(v) = f(&ev) {
                        return Ok((at, v));
                    }
                }
                Err(_) => bail!(
                    "{}: no {what} within {timeout:?}; status: {:?}",
                    self.name,
                    self.status()
                ),
            }
        }
    }

    /// Fails if an event matching `bad` arrives within `d`.
    fn none_for(&self, d: Duration, bad: impl Fn(&MembershipEvent) -> bool) -> anyhow::Result<()> {
        let until = Instant::now() + d;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok((_, ev)) if bad(&ev) => bail!("{}: unexpected {ev:?}", self.name),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// The next membership within `timeout` that satisfies `ok`.
    fn membership(
        &self,
        timeout: Duration,
        ok: impl Fn(&nexd::registry::Membership) -> bool,
    ) -> anyhow::Result<(Instant, nexd::registry::Membership, Source)> {
        let (at, (m, s)) = self.wait("matching membership", timeout, |e| match e {
            MembershipEvent::Membership { membership, source } if ok(membership) => {
                Some(((**membership).clone(), *source))
            }
            _ => None,
        })?;
        Ok((at, m, s))
    }

    fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("device thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn names(m: &nexd::registry::Membership) -> Vec<String> {
    m.mesh.devices.iter().map(|d| d.name.clone()).collect()
}

fn has(m: &nexd::registry::Membership, name: &str) -> bool {
    m.mesh.devices.iter().any(|d| d.name == name)
}

#[test]
fn approvals_and_revocations_reach_devices_within_a_second() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("flow", &["198.51.100.11/24"], false)?;
    let a = lab.device("alpha", 1)?;
    a.wait("waiting for approval", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    a.wait_status("waiting in the status", |s| s.waiting_for_approval)?;

    let approved = lab.approve("alpha")?;
    let (at, m, source) = a.membership(Duration::from_secs(5), |m| has(m, "alpha"))?;
    let took = at.saturating_duration_since(approved);
    println!("alpha: approval to membership event {took:?}");
    assert!(took < ONE_SECOND, "{took:?}");
    assert!(matches!(source, Source::Registry { .. }));
    let me = m.mesh.device(&a.key).context("alpha in its mesh")?;
    assert_eq!(me.ipv4.to_string(), "100.64.0.1");
    assert_eq!(
        me.endpoint.as_ref().map(ToString::to_string).as_deref(),
        Some("192.0.2.1:51820"),
        "alpha's published endpoint"
    );

    // A second device: asks, is approved, alpha configures it within 1 s.
    let b = lab.device("beta", 2)?;
    b.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    let approved = lab.approve("beta")?;
    let (at, m, _) = a.membership(Duration::from_secs(5), |m| has(m, "beta"))?;
    let took = at.saturating_duration_since(approved);
    println!("alpha sees beta {took:?} after its approval");
    assert!(took < ONE_SECOND, "{took:?}");
    assert_eq!(names(&m), ["alpha", "beta"]);
    b.membership(Duration::from_secs(5), |m| {
        has(m, "alpha") && has(m, "beta")
    })?;

    // Revoke beta: alpha drops it within 1 s; beta is waiting again.
    let revoked = lab.revoke("beta")?;
    let (at, m, _) = a.membership(Duration::from_secs(5), |m| !has(m, "beta"))?;
    let took = at.saturating_duration_since(revoked);
    println!("alpha drops beta {took:?} after its revocation");
    assert!(took < ONE_SECOND, "{took:?}");
    assert_eq!(names(&m), ["alpha"]);
    b.wait("beta waiting again", Duration::from_secs(5), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;

    // Stopping revokes the lease: the endpoint goes at once.
    b.stop()?;
    let left = lab
        .etcd
        .etcdctl(&["get", "--prefix", "--keys-only", "/flow/endpoints/"])?;
    assert_eq!(left.lines().filter(|l| !l.is_empty()).count(), 1, "{left}");
    a.stop()
}

#[test]
fn forged_records_are_ignored_and_counted() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("forged", &["198.51.100.11/24"], false)?;
    let a = lab.device("alpha", 1)?;
    a.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    lab.approve("alpha")?;
    let (_, before, _) = a.membership(Duration::from_secs(5), |m| has(m, "alpha"))?;
    let layout = nexd::registry::location::Layout::new("/forged");
    let mine = layout.device(&a.key);
    let genuine = lab.etcd.get(&mine)?.context("alpha's record")?;

    // Unsigned new device; a device signed by another admin; alpha's record
    // tampered (address, exit node); a settings record by another admin.
    let intruder = PrivateKey::generate().public_key();
    let body = serde_json::json!({"name": "intruder", "public_key": intruder.to_string(),
        "ipv4": "100.64.0.66", "ipv6": "fd6e:6578:6400::66", "listen_port": 51820,
        "exit_node": true, "serial": 1000});
    lab.etcd.put(&layout.device(&intruder), &body.to_string())?;
    let other = AdminKey::generate();
    let k2 = PrivateKey::generate().public_key();
    let mut rec: nexd::registry::records::DeviceRecord = serde_json::from_value(body.clone())?;
    rec.public_key = k2;
    rec.name = "other".into();
    let forged = nexd::registry::signed::seal(&other, &layout.device(&k2), &rec)?;
    lab.etcd
        .put(&layout.device(&k2), std::str::from_utf8(&forged)?)?;
    let tampered = genuine
        .replace("100.64.0.1", "100.64.0.99")
        .replace("\\\"exit_node\\\":false", "\\\"exit_node\\\":true");
    lab.etcd.put(&mine, &tampered)?;
    let settings = Settings {
        ipv4_prefix: "10.0.0.0/8".parse()?,
        ipv6_prefix: "fd00::/48".parse()?,
        mtu: 1280,
        persistent_keepalive: 1,
        agent_port: 1,
        serial: 99,
        snapshots: None,
    };
    let fs = nexd::registry::signed::seal(&other, &layout.settings(), &settings)?;
    lab.etcd
        .put(&layout.settings(), std::str::from_utf8(&fs)?)?;

    // Then a genuine change: the device must still hear about real news,
    // but nothing forged is in it.
    let s = a.wait_status("4 rejected values", |s| {
        s.rejected_total >= 4 && s.ignored.len() >= 4
    })?;
    let keys: Vec<&str> = s.ignored.iter().map(|i| i.key.as_str()).collect();
    for k in [
        layout.device(&intruder),
        layout.device(&k2),
        mine.clone(),
        layout.settings(),
    ] {
        assert!(keys.contains(&k.as_str()), "{k} not counted: {s:?}");
    }
    for i in &s.ignored {
        assert!(
            i.reason == "missing signature" || i.reason.contains("does not verify"),
            "{i:?}"
        );
    }
    // No membership event carried any of it (settings rejected: there is
    // no membership until they are genuine again).
    while let Ok((_, ev)) = a.events.try_recv() {
        if let MembershipEvent::Membership { membership, .. } = ev {
            assert!(!has(&membership, "intruder") && !has(&membership, "other"));
            assert_eq!(membership.mesh.ipv4_prefix, before.mesh.ipv4_prefix);
            assert!(!membership.roles.values().any(|r| r.exit_node));
        }
    }
    // Put the genuine values back: membership as before, nothing forged.
    lab.etcd.put(&mine, &genuine)?;
    lab.etcd.etcdctl(&["del", "--", &layout.settings()])?;
    let key = lab.key();
    let good = nexd::registry::signed::seal(
        &key,
        &layout.settings(),
        &Settings {
            ipv4_prefix: "100.64.0.0/10".parse()?,
            ipv6_prefix: "fd6e:6578:6400::/48".parse()?,
            mtu: 1420,
            persistent_keepalive: 25,
            agent_port: 51829,
            serial: 1,
            snapshots: None,
        },
    )?;
    lab.etcd
        .put(&layout.settings(), std::str::from_utf8(&good)?)?;
    let (_, after, _) = a.membership(Duration::from_secs(5), |m| has(m, "alpha"))?;
    assert_eq!(names(&after), ["alpha"]);
    assert_eq!(after.mesh, before.mesh);
    a.stop()
}

/// Rejects TCP from the device namespace to etcd (RST), as a partition.
fn cut(ns: &Netns, on: bool) -> anyhow::Result<()> {
    if on {
        nexd_testkit::topology::nft_script(
            ns,
            "add table inet cut\nadd chain inet cut out { type filter hook output priority 0; policy accept; }\nadd rule inet cut out tcp dport 2379 reject with tcp reset\n",
        )
    } else {
        ns.exec(&["nft", "delete", "table", "inet", "cut"])
            .map(|_| ())
    }
}

#[test]
fn a_compacted_watch_ends_in_a_full_resync() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("compact", &["198.51.100.11/24"], false)?;
    let a = lab.device("alpha", 1)?;
    a.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    lab.approve("alpha")?;
    a.membership(Duration::from_secs(5), |m| has(m, "alpha"))?;
    let b = lab.device("beta", 2)?;
    b.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    b.stop()?; // its request goes with its lease; approve it from a new one below

    // Cut alpha off, change the registry and compact its history away.
    cut(&lab.device_ns, true)?;
    a.wait("connection lost", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::ConnectionLost { .. }).then_some(())
    })?;
    let c = PrivateKey::generate().public_key();
    let req =
        serde_json::json!({"name": "gamma", "public_key": c.to_string(), "listen_port": 51820});
    lab.etcd.put(
        &nexd::registry::location::Layout::new("/compact").request(&c),
        &req.to_string(),
    )?;
    lab.approve("gamma")?;
    let rev = lab.etcd.compact()?;
    println!("compacted at revision {rev}");
    assert_eq!(a.status().resyncs, 0);

    // Back: the resumed watch is refused as compacted, a full read follows.
    cut(&lab.device_ns, false)?;
    a.wait("connection restored", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::ConnectionRestored).then_some(())
    })?;
    a.membership(Duration::from_secs(5), |m| has(m, "gamma"))?;
    let s = a.wait_status("the resync in the status", |s| s.revision >= rev)?;
    assert_eq!(s.resyncs, 1, "{s:?}");
    a.stop()
}

#[test]
fn a_short_outage_never_unpublishes_the_endpoint() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("blip", &["198.51.100.11/24"], false)?;
    let a = lab.device("alpha", 1)?;
    a.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    lab.approve("alpha")?;
    a.membership(Duration::from_secs(5), |m| {
        m.mesh.device(&a.key).is_some_and(|d| d.endpoint.is_some())
    })?;
    // A blip much shorter than the lease TTL (4 s): the old session's
    // lease is still alive when the new session starts. The endpoint must
    // move to the new lease before the old one is revoked or runs out.
    cut(&lab.device_ns, true)?;
    a.wait("connection lost", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::ConnectionLost { .. }).then_some(())
    })?;
    cut(&lab.device_ns, false)?;
    a.wait("connection restored", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::ConnectionRestored).then_some(())
    })?;
    let own = a.key;
    a.none_for(Duration::from_secs(6), |e| match e {
        MembershipEvent::Membership { membership, .. } => membership
            .mesh
            .device(&own)
            .is_some_and(|d| d.endpoint.is_none()),
        _ => false,
    })?;
    let ep = lab
        .etcd
        .get(&nexd::registry::location::Layout::new("/blip").endpoint(&own))?;
    assert!(ep.is_some(), "alpha's endpoint is published");
    a.stop()
}

#[test]
fn etcd_restart_and_unreachable_start_use_what_was_verified() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut lab = Lab::new("restart", &["198.51.100.11/24"], false)?;
    let own = PrivateKey::generate().public_key();
    let a = lab.device_with_key("alpha", 1, own, lab.etcd_config()?)?;
    a.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    lab.approve("alpha")?;
    let (_, known, _) = a.membership(Duration::from_secs(5), |m| has(m, "alpha"))?;

    // etcd killed: reported, nothing else happens.
    lab.etcd.kill(0)?;
    a.wait("connection lost", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::ConnectionLost { .. }).then_some(())
    })?;
    a.stop()?;

    // A device starting while etcd is down comes up from its cache.
    let a = lab.device_with_key("alpha", 1, own, lab.etcd_config()?)?;
    let (_, cached, source) = a.membership(Duration::from_secs(15), |_| true)?;
    assert!(matches!(source, Source::Cache { .. }), "{source:?}");
    assert_eq!(cached.mesh, known.mesh);
    let s = a.wait_status("the cache as source", |s| s.source == Some(source))?;
    assert!(!s.connected, "{s:?}");

    // etcd back: the device reconnects by itself, and follows changes again.
    lab.etcd.restart(0)?;
    a.wait("connection restored", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::ConnectionRestored).then_some(())
    })?;
    let b = lab.device("beta", 2)?;
    b.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    let approved = lab.approve("beta")?;
    let (at, _, source) = a.membership(Duration::from_secs(5), |m| has(m, "beta"))?;
    assert!(matches!(source, Source::Registry { .. }));
    let took = at.saturating_duration_since(approved);
    assert!(took < ONE_SECOND, "{took:?}");
    drop(b);
    a.stop()
}

#[test]
fn one_member_of_three_down_changes_nothing() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut lab = Lab::new(
        "three",
        &["198.51.100.11/24", "198.51.100.12/24", "198.51.100.13/24"],
        false,
    )?;
    let a = lab.device("alpha", 1)?;
    a.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    lab.approve("alpha")?;
    a.membership(Duration::from_secs(5), |m| has(m, "alpha"))?;

    for victim in [0usize, 1] {
        lab.etcd.kill(victim)?;
        let name = format!("d{victim}");
        let d = lab.device(&name, 10 + victim as u8)?;
        d.wait("waiting", Duration::from_secs(10), |e| {
            matches!(e, MembershipEvent::WaitingForApproval).then_some(())
        })?;
        let approved = lab.approve(&name)?;
        // The device may have been talking to the killed member: it then
        // reconnects to another (backoff from 100 ms) and resumes.
        let (at, _, _) = a.membership(Duration::from_secs(5), |m| has(m, &name))?;
        let took = at.saturating_duration_since(approved);
        println!("member {victim} down: approval reached alpha in {took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        drop(d);
        lab.etcd.restart(victim)?;
    }
    // And with all three back, within a second again.
    let d = lab.device("late", 20)?;
    d.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    let approved = lab.approve("late")?;
    let (at, _, _) = a.membership(Duration::from_secs(5), |m| has(m, "late"))?;
    assert!(at.saturating_duration_since(approved) < ONE_SECOND);
    drop(d);
    a.stop()
}

#[test]
fn tls_with_client_certificates() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("tls", &["198.51.100.11/24"], true)?;
    let a = lab.device("alpha", 1)?;
    a.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    lab.approve("alpha")?;
    a.membership(Duration::from_secs(5), |m| has(m, "alpha"))?;
    a.wait_status("connected over TLS", |s| s.connected)?;

    // Without a client certificate etcd refuses the device.
    let mut cfg = lab.etcd_config()?;
    if let Some(t) = cfg.tls.as_mut() {
        t.cert = None;
        t.key = None;
    }
    let n = lab.device_with_key("nocert", 3, PrivateKey::generate().public_key(), cfg)?;
    let (_, err) = n.wait("connection lost", Duration::from_secs(15), |e| match e {
        MembershipEvent::ConnectionLost { error } => Some(error.clone()),
        _ => None,
    })?;
    println!("without a client certificate: {err}");
    assert!(!n.status().connected);
    drop(n);
    // A bad CA path is a configuration error at once, naming the file.
    let mut cfg = lab.etcd_config()?;
    if let Some(t) = cfg.tls.as_mut() {
        t.ca = lab.dir.join("missing-ca.pem");
    }
    let e = cfg.validate().expect_err("missing CA file");
    assert!(e.to_string().contains("missing-ca.pem"), "{e}");
    a.stop()
}

#[test]
fn a_restarted_device_does_not_believe_a_record_older_than_its_cache() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("recall", &["198.51.100.11/24"], false)?;
    let own = PrivateKey::generate().public_key();
    let a = lab.device_with_key("alpha", 1, own, lab.etcd_config()?)?;
    a.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    lab.approve("alpha")?;
    a.membership(Duration::from_secs(5), |m| has(m, "alpha"))?;
    let key = nexd::registry::location::Layout::new("/recall").device(&own);
    let member = lab.etcd.get(&key)?.context("alpha's record")?;
    lab.make_exit_node("alpha")?;
    a.membership(Duration::from_secs(5), |m| {
        m.roles.get(&own).is_some_and(|r| r.exit_node)
    })?;
    a.stop()?;

    // While alpha is down, an etcd writer puts its older record back;
    // alpha starts again with etcd reachable.
    lab.etcd.put(&key, &member)?;
    let a = lab.device_with_key("alpha", 1, own, lab.etcd_config()?)?;
    let s = a.wait_status("the older record ignored", |s| {
        s.ignored
            .iter()
            .any(|i| i.key == key && i.reason.starts_with("rolled back"))
    })?;
    println!("restarted: {:?}", s.ignored);
    a.none_for(Duration::from_secs(2), |e| match e {
        MembershipEvent::Membership { membership, .. } => {
            membership.roles.get(&own).is_some_and(|r| !r.exit_node)
        }
        _ => false,
    })?;
    // Had the admin restored that state on purpose (etcd from a backup),
    // signing it again above what devices saw makes it the newest.
    lab.admin(|a, k| Box::pin(async move { a.resign(&k, 3).await }))?;
    let (_, m, _) = a.membership(Duration::from_secs(5), |m| has(m, "alpha"))?;
    assert!(!m.roles[&own].exit_node, "{m:?}");
    a.stop()
}

/// Starts `name` with its key and no cache (its state directory emptied).
fn start_without_cache(lab: &Lab, name: &str, n: u8, own: PublicKey) -> anyhow::Result<Device> {
    let state = lab.dir.join(name);
    let _ = std::fs::remove_dir_all(&state);
    lab.device_with_key(name, n, own, lab.etcd_config()?)
}

#[test]
fn a_device_without_a_cache_believes_etcd_only_under_a_valid_snapshot() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("snap", &["198.51.100.11/24"], false)?;
    lab.enable_snapshots(60)?;
    lab.refresh(60)?;
    let layout = nexd::registry::location::Layout::new("/snap");
    let own = PrivateKey::generate().public_key();
    let a = lab.device_with_key("alpha", 1, own, lab.etcd_config()?)?;
    a.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    lab.approve("alpha")?;
    let ex = lab.device("ex", 2)?;
    ex.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    lab.approve("ex")?;
    a.membership(Duration::from_secs(5), |m| has(m, "alpha") && has(m, "ex"))?;
    let ex_public = ex.key;
    let ex_key = layout.device(&ex_public);
    let ex_record = lab.etcd.get(&ex_key)?.context("ex's record")?;
    // Valid 10 s only, so the test need not wait long for it to expire.
    let before_revocation = lab.refresh(10)?;
    let old_snapshot = lab.etcd.get(&layout.snapshot())?.context("snapshot")?;
    drop(ex);

    // ex revoked; the refresher runs after it.
    lab.revoke("ex")?;
    a.membership(Duration::from_secs(5), |m| !has(m, "ex"))?;
    let after = lab.refresh(60)?;
    assert!(after.version > before_revocation.version);
    a.stop()?;

    // An etcd writer deletes the revocation and writes ex's record back.
    // alpha starts with no cache: it never saw the mesh.
    lab.etcd
        .etcdctl(&["del", "--", &layout.revoked(&ex_public)])?;
    lab.etcd.put(&ex_key, &ex_record)?;
    let a = start_without_cache(&lab, "alpha", 1, own)?;
    let (_, m, _) = a.membership(Duration::from_secs(10), |m| has(m, "alpha"))?;
    assert!(
        !has(&m, "ex"),
        "a device without a cache believed the record of a revoked device: {:?}",
        names(&m)
    );
    let s = a.wait_status("ex ignored", |s| s.ignored.iter().any(|i| i.key == ex_key))?;
    println!(
        "without a cache, under the newest snapshot: {:?}",
        s.ignored
    );
    a.stop()?;

    // The writer also puts back the snapshot from before the revocation:
    // believed while it is valid (the bound: 10 s for this one), never
    // after.
    lab.etcd.put(&layout.snapshot(), &old_snapshot)?;
    let wait = before_revocation
        .expires
        .saturating_sub(after.issued)
        .saturating_add(2);
    println!("waiting {wait} s for the old snapshot to expire");
    std::thread::sleep(Duration::from_secs(wait));
    let a = start_without_cache(&lab, "alpha", 1, own)?;
    let s = a.wait_status("the expired snapshot reported", |s| {
        s.ignored
            .iter()
            .any(|i| i.key == layout.snapshot() && i.reason.contains("expired"))
    })?;
    println!(
        "without a cache, under an expired snapshot: {:?}",
        s.ignored
    );
    a.none_for(Duration::from_secs(2), |e| {
        matches!(e, MembershipEvent::Membership { .. })
    })?;
    // The refresher runs again: a membership, without ex.
    lab.refresh(60)?;
    let (_, m, _) = a.membership(Duration::from_secs(10), |m| has(m, "alpha"))?;
    assert!(!has(&m, "ex"), "{:?}", names(&m));
    a.stop()
}

#[test]
fn a_running_device_keeps_its_membership_when_the_refresher_stops() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let lab = Lab::new("stale", &["198.51.100.11/24"], false)?;
    lab.enable_snapshots(60)?;
    let snap = lab.refresh(3)?;
    let a = lab.device("alpha", 1)?;
    a.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    lab.approve("alpha")?;
    a.membership(Duration::from_secs(5), |m| has(m, "alpha"))?;
    // The snapshot runs out (the refresher stopped): alpha says so, keeps
    // its membership and still follows changes.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    std::thread::sleep(Duration::from_secs(snap.expires.saturating_sub(now) + 1));
    let b = lab.device("beta", 2)?;
    b.wait("waiting", Duration::from_secs(10), |e| {
        matches!(e, MembershipEvent::WaitingForApproval).then_some(())
    })?;
    lab.approve("beta")?;
    let (_, m, _) = a.membership(Duration::from_secs(5), |m| has(m, "beta"))?;
    assert_eq!(names(&m), ["alpha", "beta"]);
    let s = a.wait_status("stale in the status", |s| {
        s.ignored.iter().any(|i| i.reason.starts_with("stale"))
    })?;
    println!("refresher stopped: {:?}", s.ignored);
    drop(b);
    a.stop()
}
