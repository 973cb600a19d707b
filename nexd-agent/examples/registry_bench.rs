//! The registry's benchmark rows (issue 14), run like `datapath_bench`:
//! `cargo run --release -p nexd-agent --example registry_bench -- [--quick]
//! [--rounds N] [--json PATH]`, so `cargo xtask bench --only registry` only
//! has to run it and read the JSON (the same `Samples` rows). Needs root:
//! etcd (Debian's etcd-server) runs in test namespaces.
//!
//! Rows, each against a baseline measured in the same run:
//! * start-up from etcd with N devices (connect, full read, verify every
//!   signature, build the `Mesh`), against parsing the same mesh file;
//! * N signed device records written (`import`), against N unsigned values
//!   of the same size in the same transaction batches (the signing and the
//!   guards' cost);
//! * approval committed to the membership event on a watching `Registry`
//!   with N devices, against a plain put to a plain watch event (etcd's
//!   floor);
//! * one approval (read and verify N records, allocate, commit), against
//!   one read of the prefix.
//!
//! N is 1,000 (50 with `--quick`). The rows that need a real nexd
//! (approval to the peer configured on a watching nexd, nexd's start-up
//! from etcd against the mesh file, the watcher's RSS) are xtask's own
//! (`xtask/src/bench/registry.rs`), which runs this example first.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use etcd_client::{GetOptions, Txn, TxnOp, WatchOptions};
use nexd::{
    keys::{PrivateKey, PublicKey},
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
use serde::Serialize;

/// One row: nexd's samples against its baseline's (as `datapath_bench`).
#[derive(Debug, Serialize)]
struct Samples {
    benchmark: String,
    case: String,
    unit: String,
    baseline_name: String,
    baseline: Vec<f64>,
    nexd: Vec<f64>,
    higher_is_better: bool,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn p99(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len().saturating_sub(1)) as f64 * 0.99).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn row(case: &str, baseline_name: &str, baseline: &[f64], nexd: &[f64]) -> Samples {
    println!(
        "  {case:<62} {:>9.2} ms (p99 {:>9.2}) vs {baseline_name}: {:>9.2} ms",
        median(nexd),
        p99(nexd),
        median(baseline)
    );
    Samples {
        benchmark: "registry".into(),
        case: case.into(),
        unit: "ms".into(),
        baseline_name: baseline_name.into(),
        baseline: baseline.to_vec(),
        nexd: nexd.to_vec(),
        higher_is_better: false,
    }
}

struct Args {
    quick: bool,
    rounds: usize,
    json: Option<PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        quick: false,
        rounds: 5,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--rounds" => a.rounds = it.next().context("--rounds N")?.parse()?,
            "--json" => a.json = Some(it.next().context("--json PATH")?.into()),
            other => bail!("unknown argument {other:?} (known: --quick, --rounds N, --json PATH)"),
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
            exit_node: false,
            exit_clients: None,
            exit_rate_limit: None,
            exit_flow_limit: None,
            exit_new_flow_rate: None,
            exit_capacity: None,
            exit_group: None,
        });
    }
    Ok(Mesh {
        ipv4_prefix: "100.64.0.0/10".parse()?,
        ipv6_prefix: "fd6e:6578:6400::/48".parse()?,
        persistent_keepalive: 25,
        mtu: 1420,
        agent_port: 51829,
        devices,
        exit_groups: Vec::new(),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Start-up as the device side does it: connect, read, verify, build.
async fn start_up(cfg: &EtcdConfig, key: &AdminKey, prefix: &str, n: usize) -> anyhow::Result<f64> {
    let t = Instant::now();
    let client = cfg.connect().await?;
    let mut kv = client.kv_client();
    let layout = Layout::new(prefix);
    let r = kv
        .get(layout.all(), Some(GetOptions::new().with_prefix()))
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

/// The time the membership event containing `k` (any, for `None`) came.
async fn member_event(rx: &mut Stamped, k: Option<&PublicKey>) -> anyhow::Result<Instant> {
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

async fn measure(
    cfg: EtcdConfig,
    state: PathBuf,
    n: usize,
    rounds: usize,
    approvals: usize,
) -> anyhow::Result<Vec<Samples>> {
    let key = AdminKey::generate();
    let mesh = mesh_of(n)?;
    let file_text = mesh::render(&mesh, &[]);
    let mut rows = Vec::new();

    // Writing: signed import into a fresh prefix vs the same number of
    // unsigned values of the same size, same batches.
    let (mut signed, mut raw) = (Vec::new(), Vec::new());
    let client = cfg.connect().await?;
    let mut kv = client.kv_client();
    for r in 0..rounds {
        let mut c = cfg.clone();
        c.url.prefix = format!("/w{r}");
        let mut admin = Admin::connect(c).await?;
        let t = Instant::now();
        admin.import(&key, &mesh).await?;
        signed.push(ms(t.elapsed()));
        let value = vec![b'x'; 420];
        let t = Instant::now();
        for (b, chunk) in (0..n).collect::<Vec<_>>().chunks(40).enumerate() {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .flat_map(|i| {
                    [
                        TxnOp::put(format!("/raw{r}/d/{i}"), value.clone(), None),
                        TxnOp::put(format!("/raw{r}/a4/{i}"), "x", None),
                        TxnOp::put(format!("/raw{r}/a6/{i}"), "x", None),
                    ]
                })
                .chain([TxnOp::put(format!("/raw{r}/serial"), b.to_string(), None)])
                .collect();
            kv.txn(Txn::new().and_then(ops)).await?;
        }
        raw.push(ms(t.elapsed()));
    }
    rows.push(row(
        &format!("{n} signed device records written (import)"),
        "same values unsigned",
        &raw,
        &signed,
    ));

    // Start-up: from etcd vs from the file, alternating.
    let (mut etcd, mut file) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        etcd.push(start_up(&cfg, &key, "/w0", n).await?);
        let t = Instant::now();
        let parsed = mesh::parse(&file_text).map_err(|p| anyhow::anyhow!("{p:?}"))?;
        if parsed.devices.len() != n {
            bail!("parsed {} devices", parsed.devices.len());
        }
        file.push(ms(t.elapsed()));
    }
    rows.push(row(
        &format!("start-up from etcd, {n} devices (read, verify, build)"),
        "mesh file parse",
        &file,
        &etcd,
    ));

    // A watcher with N devices; approvals one at a time; the floor is a
    // plain put seen by a plain watch on the same etcd.
    let mut c = cfg.clone();
    c.url.prefix = "/w0".into();
    let mut admin = Admin::connect(c.clone()).await?;
    let own = mesh.devices[0].public_key;
    let dcfg = DeviceConfig::new(c, key.public_key(), "dev0".into(), 20000);
    let (reg, mut events) = Registry::connect(dcfg, own, state).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if tx.send((Instant::now(), e)).is_err() {
                break;
            }
        }
    });
    member_event(&mut rx, None).await?;
    let mut watch = client
        .watch_client()
        .watch("/floor/", Some(WatchOptions::new().with_prefix()))
        .await?;
    let layout = Layout::new("/w0");
    let (mut event, mut floor, mut approve, mut read) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
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
        let at = member_event(&mut rx, Some(&k)).await?;
        // The event can come before the commit's reply is read: then 0.
        event.push(ms(at.saturating_duration_since(committed)));
        approve.push(ms(committed - t));

        kv.put(format!("/floor/{i}"), "x", None).await?;
        let put = Instant::now();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), watch.message())
                .await??
                .context("watch ended")?;
            if !m.events().is_empty() {
                break;
            }
        }
        floor.push(ms(put.elapsed()));

        let t = Instant::now();
        kv.get(layout.all(), Some(GetOptions::new().with_prefix()))
            .await?;
        read.push(ms(t.elapsed()));
    }
    reg.shutdown().await;
    rows.push(row(
        &format!("approval committed -> membership event, {n} devices"),
        "put -> watch event",
        &floor,
        &event,
    ));
    rows.push(row(
        &format!("one approval: read+verify {n}, allocate, commit"),
        "read of the prefix",
        &read,
        &approve,
    ));
    Ok(rows)
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the registry benchmark runs etcd in network namespaces: run it as root");
    }
    let (n, approvals, rounds) = if a.quick {
        (50, 5, 1)
    } else {
        (1000, 50, a.rounds.max(1))
    };
    println!("registry: {n} devices, {rounds} rounds, {approvals} approvals");
    let mut sw = Switch::new("benchsw")?;
    let etcd = EtcdCluster::start(&mut sw, &["198.51.100.11/24"])?;
    let ns = Netns::new("bench")?;
    sw.attach(&ns, "eth0", &["198.51.100.100/24"])?;
    let cfg = EtcdConfig {
        url: etcd.url("/w0").parse().map_err(anyhow::Error::msg)?,
        tls: None,
        credentials: None,
    };
    let state = std::env::temp_dir().join(format!("nexd-bench-registry-{}", std::process::id()));
    std::fs::create_dir_all(&state)?;
    let st = state.clone();
    let rows = ns.run_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(measure(cfg, st, n, rounds, approvals))
    });
    let _ = std::fs::remove_dir_all(&state);
    let rows = rows?;
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(etcd);
    Ok(())
}
