//! Benchmark 6, membership through etcd (issue 14), each row against a
//! baseline measured in the same run:
//!
//! * the registry's own rows, in-process (`nexd-agent/examples/
//!   registry_bench`, run through cargo like `datapath`): signed import,
//!   read and verify at start-up, approval to the membership event, one
//!   `approve`;
//! * with N approved devices in etcd (N = 1,000; written by the bench with
//!   `nexctl mesh import`, not N nexd processes) and one watching nexd:
//!   - approval of one more device to its peer configured on the watcher
//!     (p50 and p99 over 50 approvals), against the same one-device change
//!     made to a mesh file and applied by SIGHUP;
//!   - `nexctl mesh approve` to the peer configured, against the command
//!     alone (what the admin sees);
//!   - nexd's start-up from etcd against the same N devices from a mesh
//!     file (until every peer is configured);
//!   - the watcher's RSS (peak at start-up, and after the approvals)
//!     against nexd with the mesh file.
//!
//! "Approval" is the moment etcd publishes the signed record: a plain
//! `etcdctl watch` on the devices prefix stamps it (etcd's own watch
//! delivery, ~1 ms here, is the only part of the path it leaves out). The
//! peer is configured when nexd logs "peer configured" for it (the log's
//! UTC timestamp, microseconds), so polling does not blur the figure and
//! costs nexd nothing.

use std::{
    io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use nexd_testkit::{
    Netns, Node, NodeSpec,
    etcd::{EtcdCluster, MeshAdmin, key_id},
    topology::{MESH_V6_PREFIX, Switch},
    wait_for,
};
use nix::sys::signal::Signal;
use serde::Deserialize;

use super::{Plan, Row};

/// The etcd prefix of the benchmark's mesh.
const PREFIX: &str = "/bench";
/// The watcher's underlay address and endpoint.
const WATCHER: &str = "192.0.2.1";
/// Log lines the measurement reads: the peers as they are configured.
const LOG_LEVEL: &str = "warn,nexd::daemon::interface=info";

/// A row as `registry_bench` writes it (as `datapath_bench`).
#[derive(Deserialize)]
struct Samples {
    benchmark: String,
    case: String,
    unit: String,
    baseline_name: String,
    baseline: Vec<f64>,
    nexd: Vec<f64>,
    higher_is_better: bool,
}

pub fn run(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    let mut rows = in_process(plan)?;
    rows.extend(daemon_rows(plan)?);
    Ok(rows)
}

/// The example's rows (its own etcd, in namespaces of its own).
fn in_process(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    let json =
        std::env::temp_dir().join(format!("nexd-bench-registry-{}.json", std::process::id()));
    let mut c = crate::workspace::cargo_command();
    c.args([
        "run",
        "--package",
        "nexd-agent",
        "--example",
        "registry_bench",
    ]);
    if !plan.quick {
        c.arg("--release");
    }
    c.arg("--");
    if plan.quick {
        c.arg("--quick");
    }
    c.args(["--rounds", &plan.rounds().to_string()]);
    c.arg("--json").arg(&json);
    let status = c
        .status()
        .context("running the registry benchmark example")?;
    if !status.success() {
        bail!("the registry benchmark example failed ({status})");
    }
    let text = std::fs::read(&json).with_context(|| format!("reading {}", json.display()));
    let _ = std::fs::remove_file(&json);
    let samples: Vec<Samples> = serde_json::from_slice(&text?)
        .with_context(|| format!("{} is not the benchmark's JSON", json.display()))?;
    Ok(samples
        .into_iter()
        .map(|s| {
            Row::new(
                &s.benchmark,
                &s.case,
                &s.unit,
                &s.baseline_name,
                &s.baseline,
                &s.nexd,
                s.higher_is_better,
            )
        })
        .collect())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `a - b` in milliseconds, negative when `a` is earlier.
fn ms_between(a: SystemTime, b: SystemTime) -> f64 {
    match a.duration_since(b) {
        Ok(d) => ms(d),
        Err(e) => -ms(e.duration()),
    }
}

/// The `q` quantile (nearest rank) of `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((v.len() as f64) * q).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// A WireGuard public key no device holds (any 32 bytes are one).
fn random_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Mesh address number `off` (100.64.0.0 + off, fd6e:6578:6400::off).
fn addresses(off: usize) -> (String, String) {
    let v4 = std::net::Ipv4Addr::from(0x6440_0000u32 + off as u32);
    (v4.to_string(), format!("fd6e:6578:6400::{off:x}"))
}

/// One `[[device]]`.
fn device_toml(name: &str, key: &str, endpoint: &str, off: usize) -> String {
    let (v4, v6) = addresses(off);
    format!(
        "\n[[device]]\nname = \"{name}\"\npublic_key = \"{key}\"\nendpoint = \"{endpoint}\"\nipv4 = \"{v4}\"\nipv6 = \"{v6}\"\n"
    )
}

/// A mesh file of `n` devices: the watcher (`self`, `own`) and n - 1
/// others no machine holds, at offsets 1..=n.
fn mesh_file(own: &str, n: usize) -> anyhow::Result<String> {
    let mut s = format!("[mesh]\nipv6_prefix = \"{MESH_V6_PREFIX}\"\n");
    s.push_str(&device_toml("self", own, &format!("{WATCHER}:51820"), 1));
    for i in 1..n {
        let endpoint = format!("198.51.100.{}:{}", 1 + i % 250, 10000 + i);
        s.push_str(&device_toml(
            &format!("d{i}"),
            &random_key()?,
            &endpoint,
            i + 1,
        ));
    }
    Ok(s)
}

/// Seconds since the Unix epoch of a tracing timestamp
/// (`2026-11-27T11:53:36.643841Z`).
fn parse_utc(s: &str) -> Option<SystemTime> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.strip_suffix('Z')?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Follows a nexd log file from where it was opened.
struct LogTail {
    path: PathBuf,
    pos: u64,
    pending: String,
}

impl LogTail {
    /// From the end of `path` as it is now.
    fn new(path: &Path) -> anyhow::Result<Self> {
        let pos = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Ok(LogTail {
            path: path.to_owned(),
            pos,
            pending: String::new(),
        })
    }

    /// The timestamp of the first new line containing `needle`, waiting
    /// (bounded) for it.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<SystemTime> {
        wait_for(
            &format!("{needle:?} in {}", self.path.display()),
            timeout,
            Duration::from_millis(5),
            || self.scan(needle),
        )
    }

    fn scan(&mut self, needle: &str) -> Option<SystemTime> {
        let mut f = std::fs::File::open(&self.path).ok()?;
        f.seek(SeekFrom::Start(self.pos)).ok()?;
        let mut buf = String::new();
        let n = f.read_to_string(&mut buf).ok()?;
        self.pos += n as u64;
        self.pending.push_str(&buf);
        let complete = self.pending.rfind('\n').map_or(0, |i| i + 1);
        let lines: String = self.pending.drain(..complete).collect();
        lines
            .lines()
            .find(|l| l.contains(needle))
            .and_then(|l| parse_utc(l.split_whitespace().next()?))
    }
}

/// `etcdctl watch --prefix` on the devices prefix, from the admin's
/// namespace: each device key it prints, with the time it was read.
struct EtcdWatch {
    child: Child,
    seen: mpsc::Receiver<(String, SystemTime)>,
}

impl EtcdWatch {
    fn start(ns: &Netns, endpoint: &str) -> anyhow::Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "etcdctl"])
            .arg(format!("--endpoints=http://{endpoint}"))
            .args(["watch", "--prefix", &format!("{PREFIX}/devices/")])
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcdctl watch")?;
        let out = child.stdout.take().context("etcdctl's stdout")?;
        let (tx, seen) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.starts_with(PREFIX) && tx.send((line, SystemTime::now())).is_err() {
                    break;
                }
            }
        });
        // The watch is established before the first approval.
        std::thread::sleep(Duration::from_millis(300));
        Ok(EtcdWatch { child, seen })
    }

    /// When `key` was published (bounded wait).
    fn published(&self, key: &str) -> anyhow::Result<SystemTime> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.seen.recv_timeout(left) {
                Ok((k, at)) if k == key => return Ok(at),
                Ok(_) => {}
                Err(e) => bail!("etcdctl watch did not show {key}: {e}"),
            }
        }
    }
}

impl Drop for EtcdWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spec(args: Vec<String>) -> NodeSpec {
    NodeSpec {
        args,
        log_level: LOG_LEVEL.into(),
        ..NodeSpec::default()
    }
}

/// KiB from a `/proc/PID/status` field (`VmHWM`, `VmRSS`).
fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(f64::NAN)
}

/// Starts nexd and waits until `peers` peers are configured; the time
/// from the spawn.
fn start_until_peers(node: &mut Node, spec: &NodeSpec, peers: usize) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    node.start(spec)?;
    wait_for(
        &format!("{peers} peers"),
        Duration::from_secs(120),
        Duration::from_millis(5),
        || {
            node.status()
                .ok()
                .filter(|s| s.peers == peers)
                .map(|_| t0.elapsed())
        },
    )
}

fn print_quantiles(what: &str, v: &[f64]) {
    println!(
        "    {what}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n = {})",
        quantile(v, 0.5),
        quantile(v, 0.99),
        quantile(v, 1.0),
        v.len()
    );
}

fn daemon_rows(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    let (n, approvals) = if plan.quick { (50, 5) } else { (1000, 50) };
    println!("  registry, daemon rows: {n} devices, {approvals} approvals");
    let mut sw = Switch::new("regbsw")?;
    let etcd = EtcdCluster::start(&mut sw, &["192.0.2.201/24"])?;
    let admin_ns = Netns::new("regbadm")?;
    sw.attach(&admin_ns, "eth0", &["192.0.2.200/24"])?;
    let mut node = Node::new("regbw")?;
    sw.attach(&node.ns, "eth0", &[&format!("{WATCHER}/24")])?;
    let own = node.keygen()?;
    let text = mesh_file(&own, n)?;
    node.write_mesh(&text)?;
    let admin = MeshAdmin::import(admin_ns, etcd.url(PREFIX), &node.mesh_file())?;
    let registry = spec(admin.device_args("self", Some(&format!("{WATCHER}:51820"))));
    let file = spec(Vec::new());

    // Start-up, alternating; round 0 warms up.
    let (mut up_file, mut up_reg, mut hwm_file, mut hwm_reg) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..=plan.rounds() {
        for from_etcd in [false, true] {
            let s = if from_etcd { &registry } else { &file };
            let up = start_until_peers(&mut node, s, n - 1)?;
            std::thread::sleep(Duration::from_millis(if plan.quick { 200 } else { 1500 }));
            let hwm = status_kib(node.pid().unwrap_or(0), "VmHWM:");
            let status = node.stop()?;
            anyhow::ensure!(status.success(), "nexd exited with {status}");
            if round > 0 {
                let (u, h) = if from_etcd {
                    (&mut up_reg, &mut hwm_reg)
                } else {
                    (&mut up_file, &mut hwm_file)
                };
                u.push(ms(up));
                h.push(hwm);
            }
        }
    }

    // Approvals seen by a watching nexd.
    start_until_peers(&mut node, &registry, n - 1)?;
    let watch = EtcdWatch::start(admin.ns(), &etcd.endpoints()[0])?;
    let mut log = LogTail::new(&node.log_path())?;
    let (mut applied, mut command, mut total, mut after_reply) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..approvals {
        let key = random_key()?;
        let name = format!("extra{i}");
        let request = serde_json::json!({
            "name": name, "public_key": key, "listen_port": 51820,
            "endpoint": null, "exit_node": false, "requested_at": 0
        });
        etcd.put(
            &format!("{PREFIX}/requests/{}", key_id(&key)),
            &request.to_string(),
        )?;
        let t_start = SystemTime::now();
        admin.approve(&name, &[])?;
        let t_reply = SystemTime::now();
        let published = watch.published(&format!("{PREFIX}/devices/{}", key_id(&key)))?;
        let configured = log.wait_for(
            &format!("peer configured peer={name} "),
            Duration::from_secs(10),
        )?;
        applied.push(ms_between(configured, published));
        command.push(ms_between(t_reply, t_start));
        total.push(ms_between(configured, t_start));
        after_reply.push(ms_between(configured, t_reply));
    }
    std::thread::sleep(Duration::from_millis(if plan.quick { 200 } else { 1500 }));
    let pid = node.pid().unwrap_or(0);
    let (rss_reg, peak_reg) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    drop(watch);
    let status = node.stop()?;
    anyhow::ensure!(status.success(), "nexd exited with {status}");

    // The same change through the mesh file: one device added, SIGHUP.
    start_until_peers(&mut node, &file, n - 1)?;
    let mut log = LogTail::new(&node.log_path())?;
    let mut text = text;
    let mut sighup = Vec::new();
    for i in 0..approvals {
        let name = format!("fextra{i}");
        text.push_str(&device_toml(
            &name,
            &random_key()?,
            &format!("198.51.100.251:{}", 40000 + i),
            n + 1 + i,
        ));
        node.write_mesh(&text)?;
        let t = SystemTime::now();
        node.signal(Signal::SIGHUP)?;
        let configured = log.wait_for(
            &format!("peer configured peer={name} "),
            Duration::from_secs(10),
        )?;
        sighup.push(ms_between(configured, t));
    }
    std::thread::sleep(Duration::from_millis(if plan.quick { 200 } else { 1500 }));
    let pid = node.pid().unwrap_or(0);
    let (rss_file, peak_file) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    let status = node.stop()?;
    anyhow::ensure!(status.success(), "nexd exited with {status}");

    println!("  approval -> peer configured on the watching nexd ({n} devices):");
    print_quantiles("etcd published the record -> peer configured", &applied);
    print_quantiles("`nexctl mesh approve` started -> peer configured", &total);
    print_quantiles(
        "`nexctl mesh approve` returned -> peer configured",
        &after_reply,
    );
    print_quantiles("`nexctl mesh approve` alone", &command);
    print_quantiles("mesh file + SIGHUP -> peer configured", &sighup);
    let p99 = quantile(&applied, 0.99);
    let ratio = quantile(&up_reg, 0.5) / quantile(&up_file, 0.5);
    println!(
        "  goals: approval p99 {p99:.1} ms (goal <= 500 ms: {}), start-up from etcd {ratio:.2}x the mesh file's (goal <= 1.2x: {})",
        if p99 <= 500.0 { "met" } else { "NOT met" },
        if ratio <= 1.2 { "met" } else { "NOT met" },
    );
    println!(
        "  RSS after the approvals: watcher {rss_reg:.0} KiB (peak {peak_reg:.0}), mesh-file nexd {rss_file:.0} KiB (peak {peak_file:.0})"
    );
    drop(admin);
    drop(etcd);
    Ok(vec![
        Row::new(
            "registry",
            &format!("approval -> peer configured, {n} devices"),
            "ms",
            "file + SIGHUP, 1 added",
            &sighup,
            &applied,
            false,
        ),
        Row::new(
            "registry",
            &format!("mesh approve -> peer configured, {n}"),
            "ms",
            "mesh approve alone",
            &command,
            &total,
            false,
        ),
        Row::new(
            "registry",
            &format!("nexd start-up from etcd, {n} devices"),
            "ms",
            "from a mesh file",
            &up_file,
            &up_reg,
            false,
        ),
        Row::new(
            "registry",
            &format!("peak RSS at start-up from etcd, {n}"),
            "KiB",
            "from a mesh file",
            &hwm_file,
            &hwm_reg,
            false,
        ),
        Row::new(
            "registry",
            &format!("RSS after {approvals} approvals, {n}"),
            "KiB",
            &format!("file, {approvals} SIGHUPs"),
            &[rss_file],
            &[rss_reg],
            false,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracing_timestamps_parse_to_unix_time() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert_eq!(
            parse_utc("2000-03-01T00:00:00.5Z"),
            Some(UNIX_EPOCH + Duration::new(951_868_800, 500_000_000))
        );
        assert_eq!(
            parse_utc("2026-11-27T11:53:36.643841Z"),
            Some(UNIX_EPOCH + Duration::new(1_795_780_416, 643_841_000))
        );
        assert_eq!(parse_utc("nonsense"), None);
        assert_eq!(parse_utc("2026-11-27T11:53:36.64x841Z"), None);
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v[..50], 0.99), 50.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
