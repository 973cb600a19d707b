//! Benchmark 3, end-to-end throughput to the internet server through the
//! exit node (iperf3), candidates alternating round by round:
//!
//! - **nexd**: an exit node (`router --exit-node`) and a client
//!   (`--exit-node-client --lan-interface lan0`), with the eBPF data path;
//! - **no eBPF**: the same with `--no-ebpf` on the client (what the eBPF
//!   programs cost);
//! - **wireguard-go**: both nexd stopped; Debian's wireguard-go on both
//!   nodes, configured by hand as wg-quick would (full tunnel: fwmark,
//!   `not fwmark` rule into a table with the default route, `suppress
//!   prefixlength 0`), and an nftables masquerade on the exit node (the
//!   testkit's `hand_tunnel`). The independent userspace WireGuard to
//!   compare with;
//! - **no tunnel**: the client straight to the server;
//! - with `NEXD_BENCH_BASELINE_BIN_DIR` set to another build's binaries
//!   (e.g. the previous commit's `target/release`): that nexd too, for a
//!   before/after in one run.
//!
//! Measured: TCP upload (client -> server) and download (`-R`), UDP at a
//! fixed offered rate (`-b 2G -l 1300`: above what a userspace tunnel
//! carries here, so the tunnel is the limit; at 1 Gbit/s nexd delivered
//! 91% of the bare path's figure and the ratio was capped by the offer;
//! with `-b 0` the figure is set by how much CPU the iperf3 receiver gets
//! on two cores, not by the tunnel), TCP
//! from a LAN host behind the client, what the exit node's tunnel
//! interface delivered during the UDP test ("carried": the tunnel's
//! capacity, whether or not the iperf3 receiver kept up), and the CPU time (user + system) the
//! two tunnel processes (nexd or wireguard-go, client and exit node) spent
//! per GB delivered: a figure that holds up on a loaded machine, where the
//! scheduler decides the Mbit/s.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nexd_testkit::{
    Netns, NodeSpec,
    cmd::output_with_timeout,
    cpu::cpu_seconds,
    hand_tunnel::{Backend, HandTunnel, Keys, Spec},
    proto::ClientPhase,
    topology::{SERVER_V4, lan_behind},
    world::World,
};

use super::{Plan, Row};

/// Offered UDP load (see the module doc).
const UDP_RATE: &str = "2G";
/// The wireguard-go baseline (the rest is the testkit's: wg-quick's
/// fwmark and table, addresses, rule priorities).
const WGGO: Spec = Spec {
    backend: Backend::WireguardGo,
    exit: "exit1",
    client: "client",
    iface: "wggo",
    port: 51830,
    nft_table: "bench_wggo",
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    TcpUp,
    TcpDown,
    Udp,
}

/// One iperf3 run: Mbit/s and bytes received.
struct Transfer {
    mbps: f64,
    bytes: f64,
}

fn iperf(from: &Netns, secs: u64, mode: Mode) -> anyhow::Result<Transfer> {
    let t = secs.to_string();
    let mut args = vec!["iperf3", "-c", SERVER_V4, "-t", t.as_str(), "-J"];
    match mode {
        Mode::TcpUp => {}
        Mode::TcpDown => args.push("-R"),
        Mode::Udp => args.extend(["-u", "-b", UDP_RATE, "-l", "1300"]),
    }
    let mut c = Command::new("ip");
    c.args(["netns", "exec", from.name()]).args(&args);
    let out = output_with_timeout(&mut c, Duration::from_secs(secs + 20))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let end = &v["end"];
    let sum = if end["sum_received"].is_object() {
        &end["sum_received"]
    } else {
        &end["sum"]
    };
    let bps = sum["bits_per_second"]
        .as_f64()
        .context("no throughput in iperf3 output")?;
    let bytes = sum["bytes"]
        .as_f64()
        .context("no byte count in iperf3 output")?;
    Ok(Transfer {
        mbps: bps / 1e6,
        bytes,
    })
}

/// Runs `mode` from `from`, recording Mbit/s under `key` and, with tunnel
/// process ids, CPU seconds per GB under `key` + ".cpu".
fn measure(
    m: &mut HashMap<String, Vec<f64>>,
    record: bool,
    key: &str,
    from: &Netns,
    secs: u64,
    mode: Mode,
    pids: &[u32],
) -> anyhow::Result<()> {
    let before = cpu_seconds(pids)?;
    let t = iperf(from, secs, mode)?;
    let cpu = cpu_seconds(pids)? - before;
    if record {
        m.entry(key.to_owned()).or_default().push(t.mbps);
        if !pids.is_empty() && t.bytes > 0.0 {
            m.entry(format!("{key}.cpu"))
                .or_default()
                .push(cpu / (t.bytes / 1e9));
        }
    }
    Ok(())
}

/// Bytes the tunnel interface `iface` in `ns` received so far.
fn rx_bytes(ns: &Netns, iface: &str) -> anyhow::Result<f64> {
    let path = format!("/sys/class/net/{iface}/statistics/rx_bytes");
    let v = ns.exec(&["cat", &path])?;
    v.trim()
        .parse()
        .with_context(|| format!("{path} in {}: {v:?}", ns.name()))
}

/// `measure` for UDP, also recording under `key` + ".carried" what the exit
/// node's tunnel interface delivered (Mbit/s over the test's duration):
/// what the tunnel moved, whether or not the iperf3 receiver kept up.
#[expect(
    clippy::too_many_arguments,
    reason = "one call per candidate, all named"
)]
fn measure_udp(
    m: &mut HashMap<String, Vec<f64>>,
    record: bool,
    key: &str,
    from: &Netns,
    secs: u64,
    pids: &[u32],
    exit: &Netns,
    iface: &str,
) -> anyhow::Result<()> {
    let before = rx_bytes(exit, iface)?;
    measure(m, record, key, from, secs, Mode::Udp, pids)?;
    let carried = rx_bytes(exit, iface)? - before;
    if record {
        m.entry(format!("{key}.carried"))
            .or_default()
            .push(carried * 8.0 / secs as f64 / 1e6);
    }
    Ok(())
}

/// The wireguard-go baseline on both nodes, up: a ping to the server
/// passes through it.
fn wireguard_go(w: &mut World, keys: &Keys, dir: &Path) -> anyhow::Result<HandTunnel> {
    let tunnel = HandTunnel::start(w, &WGGO, keys, dir)?;
    let cl = &w.node(WGGO.client).ns;
    let deadline = Instant::now() + Duration::from_secs(10);
    while cl
        .exec_output(&["ping", "-c1", "-W1", SERVER_V4], Duration::from_secs(5))
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            bail!("no ping through the wireguard-go tunnel");
        }
    }
    Ok(tunnel)
}

/// Runs `f` with `NEXD_BIN_DIR` pointing at `dir`, then restores it.
fn with_bin_dir<T>(dir: &Path, f: impl FnOnce() -> T) -> T {
    let before = std::env::var_os("NEXD_BIN_DIR");
    // SAFETY: the benchmark runs on one thread; no other thread reads the
    // environment meanwhile.
    unsafe { std::env::set_var("NEXD_BIN_DIR", dir) };
    let r = f();
    match before {
        // SAFETY: as above.
        Some(b) => unsafe { std::env::set_var("NEXD_BIN_DIR", b) },
        // SAFETY: as above.
        None => unsafe { std::env::remove_var("NEXD_BIN_DIR") },
    }
    r
}

fn exit_spec() -> NodeSpec {
    NodeSpec {
        args: vec!["router".into(), "--exit-node".into()],
        log_level: "info".into(),
        ..NodeSpec::default()
    }
}

pub fn run(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    let secs = if plan.quick { 1 } else { 4 };
    let other_build = std::env::var_os("NEXD_BENCH_BASELINE_BIN_DIR").map(PathBuf::from);
    let mut w = World::new(&["exit1", "client"])?;
    let lan = Netns::new("blan")?;
    lan_behind(&w.node("client").ns, &lan)?;
    let dir = w.node("client").dir().to_owned();
    let wggo_keys = Keys::generate(&dir, "wggo")?;
    // The iperf3 server lives as long as the internet namespace.
    let mut server = Command::new("ip");
    server
        .args([
            "netns",
            "exec",
            w.inet.ns.name(),
            "iperf3",
            "-s",
            "-B",
            SERVER_V4,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = server.spawn().context("starting iperf3 -s")?;
    std::thread::sleep(Duration::from_millis(300));

    let mut m: HashMap<String, Vec<f64>> = HashMap::new();
    let mut variants = vec![
        ("nexd", None::<&str>, None::<&Path>),
        ("no-ebpf", Some("--no-ebpf"), None),
    ];
    if let Some(d) = other_build.as_deref() {
        variants.push(("other", None, Some(d)));
    }
    let result = (|| -> anyhow::Result<()> {
        for round in 0..=plan.rounds() {
            // Round 0 is the warm-up.
            let rec = round > 0;
            for &(variant, extra, bins) in &variants {
                let mut go = || -> anyhow::Result<()> {
                    w.node_mut("exit1").start(&exit_spec())?;
                    let mut args = vec![
                        "--exit-node-client".to_owned(),
                        "--lan-interface".into(),
                        "lan0".into(),
                    ];
                    args.extend(extra.map(str::to_owned));
                    w.node_mut("client").start(&NodeSpec {
                        args,
                        log_level: "info".into(),
                        ..NodeSpec::default()
                    })?;
                    w.node("client")
                        .wait_phase(ClientPhase::Active, Duration::from_secs(20))?;
                    let pids: Vec<u32> = ["client", "exit1"]
                        .iter()
                        .filter_map(|n| w.node(n).pid())
                        .collect();
                    let ns = &w.node("client").ns;
                    measure(
                        &mut m,
                        rec,
                        &format!("{variant}.tcp"),
                        ns,
                        secs,
                        Mode::TcpUp,
                        &pids,
                    )?;
                    if variant != "no-ebpf" {
                        measure(
                            &mut m,
                            rec,
                            &format!("{variant}.tcpR"),
                            ns,
                            secs,
                            Mode::TcpDown,
                            &pids,
                        )?;
                    }
                    measure_udp(
                        &mut m,
                        rec,
                        &format!("{variant}.udp"),
                        ns,
                        secs,
                        &pids,
                        &w.node("exit1").ns,
                        "wg0",
                    )?;
                    if variant != "other" {
                        measure(
                            &mut m,
                            rec,
                            &format!("{variant}.lan"),
                            &lan,
                            secs,
                            Mode::TcpUp,
                            &[],
                        )?;
                    }
                    w.node_mut("client").stop()?;
                    w.node_mut("exit1").stop()?;
                    Ok(())
                };
                match bins {
                    Some(d) => with_bin_dir(d, go)?,
                    None => go()?,
                }
            }
            // wireguard-go configured by hand, nexd stopped on both nodes.
            {
                let wg = wireguard_go(&mut w, &wggo_keys, &dir)?;
                let pids = wg.pids();
                let ns = &w.node("client").ns;
                measure(&mut m, rec, "wggo.tcp", ns, secs, Mode::TcpUp, &pids)?;
                measure(&mut m, rec, "wggo.tcpR", ns, secs, Mode::TcpDown, &pids)?;
                measure_udp(
                    &mut m,
                    rec,
                    "wggo.udp",
                    ns,
                    secs,
                    &pids,
                    &w.node("exit1").ns,
                    WGGO.iface,
                )?;
            }
            // No tunnel at all: the client straight to the server.
            let ns = &w.node("client").ns;
            measure(&mut m, rec, "direct.tcp", ns, secs, Mode::TcpUp, &[])?;
            measure(&mut m, rec, "direct.udp", ns, secs, Mode::Udp, &[])?;
        }
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result?;
    let g = |k: &str| m.get(k).cloned().unwrap_or_default();
    let udp = format!("UDP client -> server ({UDP_RATE}b/s offered)");
    let mut rows = vec![
        Row::new(
            "throughput",
            "TCP client -> server",
            "Mbit/s",
            "wireguard-go (wg-quick)",
            &g("wggo.tcp"),
            &g("nexd.tcp"),
            true,
        ),
        Row::new(
            "throughput",
            "TCP server -> client",
            "Mbit/s",
            "wireguard-go (wg-quick)",
            &g("wggo.tcpR"),
            &g("nexd.tcpR"),
            true,
        ),
        Row::new(
            "throughput",
            &udp,
            "Mbit/s",
            "wireguard-go (wg-quick)",
            &g("wggo.udp"),
            &g("nexd.udp"),
            true,
        ),
        Row::new(
            "throughput",
            "UDP carried by the tunnel",
            "Mbit/s",
            "wireguard-go (wg-quick)",
            &g("wggo.udp.carried"),
            &g("nexd.udp.carried"),
            true,
        ),
        Row::new(
            "throughput",
            "TCP client -> server",
            "Mbit/s",
            "no tunnel",
            &g("direct.tcp"),
            &g("nexd.tcp"),
            true,
        ),
        Row::new(
            "throughput",
            &udp,
            "Mbit/s",
            "no tunnel",
            &g("direct.udp"),
            &g("nexd.udp"),
            true,
        ),
        Row::new(
            "throughput",
            "CPU per GB, TCP up",
            "CPU-s/GB",
            "wireguard-go (wg-quick)",
            &g("wggo.tcp.cpu"),
            &g("nexd.tcp.cpu"),
            false,
        ),
        Row::new(
            "throughput",
            "CPU per GB, TCP down",
            "CPU-s/GB",
            "wireguard-go (wg-quick)",
            &g("wggo.tcpR.cpu"),
            &g("nexd.tcpR.cpu"),
            false,
        ),
        Row::new(
            "throughput",
            "CPU per GB, UDP",
            "CPU-s/GB",
            "wireguard-go (wg-quick)",
            &g("wggo.udp.cpu"),
            &g("nexd.udp.cpu"),
            false,
        ),
        Row::new(
            "throughput",
            "TCP client -> server",
            "Mbit/s",
            "same WG, no eBPF",
            &g("no-ebpf.tcp"),
            &g("nexd.tcp"),
            true,
        ),
        Row::new(
            "throughput",
            &udp,
            "Mbit/s",
            "same WG, no eBPF",
            &g("no-ebpf.udp"),
            &g("nexd.udp"),
            true,
        ),
        Row::new(
            "throughput",
            "TCP LAN host -> server",
            "Mbit/s",
            "same WG, no eBPF",
            &g("no-ebpf.lan"),
            &g("nexd.lan"),
            true,
        ),
    ];
    if other_build.is_some() {
        let b = "other build (NEXD_BENCH_BASELINE_BIN_DIR)";
        rows.extend([
            Row::new(
                "throughput",
                "TCP client -> server",
                "Mbit/s",
                b,
                &g("other.tcp"),
                &g("nexd.tcp"),
                true,
            ),
            Row::new(
                "throughput",
                "TCP server -> client",
                "Mbit/s",
                b,
                &g("other.tcpR"),
                &g("nexd.tcpR"),
                true,
            ),
            Row::new(
                "throughput",
                &udp,
                "Mbit/s",
                b,
                &g("other.udp"),
                &g("nexd.udp"),
                true,
            ),
            Row::new(
                "throughput",
                "UDP carried by the tunnel",
                "Mbit/s",
                b,
                &g("other.udp.carried"),
                &g("nexd.udp.carried"),
                true,
            ),
            Row::new(
                "throughput",
                "CPU per GB, TCP up",
                "CPU-s/GB",
                b,
                &g("other.tcp.cpu"),
                &g("nexd.tcp.cpu"),
                false,
            ),
            Row::new(
                "throughput",
                "CPU per GB, UDP",
                "CPU-s/GB",
                b,
                &g("other.udp.cpu"),
                &g("nexd.udp.cpu"),
                false,
            ),
        ]);
    }
    Ok(rows)
}
