//! Registry benchmark helper (issue 14's rows), run by
//! `cargo bench -p nexd-agent --bench registry` (and later by
//! `cargo xtask bench --only registry`). Needs root: etcd runs in test
//! namespaces (Debian's etcd-server).
//!
//! What it measures now, without the daemon:
//! 1. writing N (default 1,000) signed device records into etcd, as
//!    `nexctl mesh import` does (the set-up of the daemon rows);
//! 2. start-up from etcd as the device side does it (connect, full read,
//!    verify every signature, build the `Mesh`) against parsing the same
//!    mesh from a mesh file;
//! 3. approval of one more device to the watching `Registry`'s event, over
//!    `--approvals` approvals (p50 / p99): the registry's share of the
//!    "approval to peer configured" row.
//!
//! The daemon rows proper (approval to the peer configured on a watching
//! nexd, nexd start-up from etcd against the mesh file, the watcher's RSS)
//! need nexd to consume `registry::Registry`; see docs/ARCHITECTURE.md
//! ("Membership through etcd").
//!
//! Options: `--devices N`, `--approvals N`, `--json PATH`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nexd::{
    keys::PrivateKey,
    mesh::{self, Device, Mesh},
    registry::{
        AdminKey, DeviceConfig, EtcdConfig, MembershipEvent, Registry,
        admin::{Admin, RoleChange},
        location::Layout,
        membership,
        records::JoinRequest,
        verify::Store,
    },
};
use nexd_testkit::{Netns, etcd::EtcdCluster, topology::Switch};

struct Args {
    devices: usize,
    approvals: usize,
    json: Option<std::path::PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        devices: 1000,
        approvals: 50,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--devices" => a.devices = it.next().context("--devices N")?.parse()?,
            "--approvals" => a.approvals = it.next().context("--approvals N")?.parse()?,
            "--json" => a.json = Some(it.next().context("--json PATH")?.into()),
            // cargo bench passes --bench; other harness flags are ignored.
            _ => {}
        }
    }
    Ok(a)
}

/// A mesh of `n` devices with distinct keys, endpoints and addresses.
fn mesh_of(n: usize) -> anyhow::Result<Mesh> {
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        let k = u32::try_from(i + 1)?;
        let port = u16::try_from(20000 + i)?;
        devices.push(Device {
            name: format!("dev{i}"),
            public_key: PrivateKey::generate().public_key(),
            endpoint: Some(mesh::Endpoint {
                host: mesh::Host::Ip(std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1))),
                port,
            }),
            listen_port: port,
            ipv4: std::net::Ipv4Addr::from(0x6440_0000u32 + k),
            ipv6: std::net::Ipv6Addr::from(
                0xfd6e_6578_6400_0000_0000_0000_0000_0000u128 + u128::from(k),
            ),
        });
    }
    Ok(Mesh {
        ipv4_prefix: "100.64.0.0/10".parse()?,
        ipv6_prefix: "fd6e:6578:6400::/48".parse()?,
        persistent_keepalive: 25,
        mtu: 1420,
        agent_port: 51829,
        devices,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Start-up as the device side does it: connect, read, verify, build.
async fn start_up(cfg: &EtcdConfig, key: &AdminKey, n: usize) -> anyhow::Result<f64> {
    let t = Instant::now();
    let client = cfg.connect().await?;
    let mut kv = client.kv_client();
    let layout = Layout::new("/bench");
    let r = kv
        .get(
            layout.all(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let mut store = Store::new(layout, key.public_key());
    store.replace_all(
        r.kvs().iter().map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        }),
        r.header().map_or(0, |h| h.revision()),
    );
    let m = membership::build(&store)?;
    if m.mesh.devices.len() != n {
        bail!("read {} devices, wrote {n}", m.mesh.devices.len());
    }
    Ok(ms(t.elapsed()))
}

/// Events stamped with the time the registry delivered them.
type Stamped = tokio::sync::mpsc::UnboundedReceiver<(Instant, MembershipEvent)>;

/// Waits for the membership event that contains `k`; returns when it came.
async fn wait_for_member(
    rx: &mut Stamped,
    k: Option<&nexd::keys::PublicKey>,
) -> anyhow::Result<Instant> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await? {
            Some((at, MembershipEvent::Membership { membership, .. }))
                if k.is_none_or(|k| membership.mesh.device(k).is_some()) =>
            {
                return Ok(at);
            }
            Some(_) => {}
            None => bail!("the registry task ended"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the registry benchmark runs etcd in network namespaces: run it as root");
    }
    let mut sw = Switch::new("benchsw")?;
    let etcd = EtcdCluster::start(&mut sw, &["198.51.100.11/24"])?;
    let ns = Netns::new("bench")?;
    sw.attach(&ns, "eth0", &["198.51.100.100/24"])?;
    let cfg = EtcdConfig {
        url: etcd.url("/bench").parse().map_err(anyhow::Error::msg)?,
        tls: None,
        credentials: None,
    };
    let n = a.devices;
    let approvals = a.approvals;
    let mesh = mesh_of(n)?;
    let file_text = mesh::render(&mesh, &[]);
    let state = std::env::temp_dir().join(format!("nexd-bench-registry-{}", std::process::id()));
    std::fs::create_dir_all(&state)?;
    let state_dir = state.clone();

    let rows = ns.run_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let key = AdminKey::generate();
            let mut admin = Admin::connect(cfg.clone()).await?;

            // 1. N signed records in.
            let t = Instant::now();
            admin.import(&key, &mesh).await?;
            let write = ms(t.elapsed());

            // 2. Start-up from etcd vs from the file (median of 5 each).
            let mut from_etcd = Vec::new();
            let mut from_file = Vec::new();
            for _ in 0..5 {
                from_etcd.push(start_up(&cfg, &key, n).await?);
                let t = Instant::now();
                let parsed = mesh::parse(&file_text).map_err(|p| anyhow::anyhow!("{p:?}"))?;
                if parsed.devices.len() != n {
                    bail!("parsed {} devices", parsed.devices.len());
                }
                from_file.push(ms(t.elapsed()));
            }
            from_etcd.sort_by(f64::total_cmp);
            from_file.sort_by(f64::total_cmp);

            // 3. A watching device; approvals one at a time.
            let own = mesh.devices[0].public_key;
            let dcfg = DeviceConfig::new(cfg.clone(), key.public_key(), "dev0".into(), 20000);
            let (reg, mut events) = Registry::connect(dcfg, own, state_dir).await?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(e) = events.recv().await {
                    if tx.send((Instant::now(), e)).is_err() {
                        break;
                    }
                }
            });
            wait_for_member(&mut rx, None).await?;
            let layout = Layout::new("/bench");
            let mut lat = Vec::new();
            let mut cmd = Vec::new();
            for i in 0..approvals {
                let k = PrivateKey::generate().public_key();
                let name = format!("extra{i}");
                let req = serde_json::to_vec(&JoinRequest {
                    name: name.clone(),
                    public_key: k,
                    listen_port: 51820,
                    endpoint: None,
                    exit_node: false,
                    requested_at: 0,
                })?;
                admin.put_raw(&layout.request(&k), req).await?;
                let t = Instant::now();
                admin.approve(&key, &name, &RoleChange::default()).await?;
                let committed = Instant::now();
                let at = wait_for_member(&mut rx, Some(&k)).await?;
                // The event can come before the commit's reply: then 0.
                lat.push(ms(at.saturating_duration_since(committed)));
                cmd.push(ms(committed - t));
            }
            cmd.sort_by(f64::total_cmp);
            reg.shutdown().await;
            lat.sort_by(f64::total_cmp);
            let (fe, ff) = (percentile(&from_etcd, 0.5), percentile(&from_file, 0.5));
            Ok(serde_json::json!([
                {"row": format!("registry: write {n} signed device records (import)"), "ms": write},
                {"row": format!("registry: start-up read+verify+build, {n} devices (median of 5)"),
                 "ms": fe, "baseline": "mesh file parse, same devices", "baseline_ms": ff, "ratio": fe / ff},
                {"row": format!("registry: approval committed -> membership event on the watcher, {n} devices ({approvals} approvals)"),
                 "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99),
                 "max_ms": lat.last().copied().unwrap_or(f64::NAN)},
                {"row": format!("registry: one approval (read + verify {n} records, allocate, transaction)"),
                 "p50_ms": percentile(&cmd, 0.5), "p99_ms": percentile(&cmd, 0.99)},
            ]))
        })
    })?;
    let _ = std::fs::remove_dir_all(&state);
    for r in rows.as_array().into_iter().flatten() {
        println!("{r}");
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&rows)?)?;
        println!("results written to {}", p.display());
    }
    drop(etcd);
    Ok(())
}
