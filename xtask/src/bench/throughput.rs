//! Benchmark 3, end-to-end throughput to the internet server through the exit node,
//! from the client and from a LAN host behind it (iperf3). nexd with its
//! eBPF data path against the same WireGuard backend and the same policy
//! routing without any eBPF (`nexd --no-ebpf`, the wg-quick way), and the
//! direct path without a tunnel to show what the tunnel itself costs.

use std::{process::Command, time::Duration};

use anyhow::{Context as _, bail};
use nexd_testkit::{
    Netns, NodeSpec,
    cmd::output_with_timeout,
    proto::ClientPhase,
    topology::{SERVER_V4, lan_behind},
    world::World,
};

use super::{Plan, Row};

fn iperf(from: &Netns, secs: u64, udp: bool) -> anyhow::Result<f64> {
    let t = secs.to_string();
    let mut args = vec!["iperf3", "-c", SERVER_V4, "-t", t.as_str(), "-J"];
    if udp {
        args.extend(["-u", "-b", "0", "-l", "1300"]);
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
    let bps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .or_else(|| end["sum"]["bits_per_second"].as_f64())
        .context("no throughput in iperf3 output")?;
    Ok(bps / 1e6)
}

pub fn run(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    let secs = if plan.quick { 1 } else { 4 };
    let mut w = World::new(&["exit1", "client"])?;
    let lan = Netns::new("blan")?;
    lan_behind(&w.node("client").ns, &lan)?;
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
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut server = server.spawn().context("starting iperf3 -s")?;
    std::thread::sleep(Duration::from_millis(300));
    w.node_mut("exit1").start(&NodeSpec {
        args: vec!["router".into(), "--exit-node".into()],
        log_level: "info".into(),
        ..NodeSpec::default()
    })?;

    let mut m: std::collections::HashMap<&str, Vec<f64>> = Default::default();
    let result = (|| -> anyhow::Result<()> {
        for round in 0..=plan.rounds() {
            for (variant, extra) in [("nexd", None), ("no-ebpf", Some("--no-ebpf"))] {
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
                let tcp = iperf(&w.node("client").ns, secs, false)?;
                let udp = iperf(&w.node("client").ns, secs, true)?;
                let lan_tcp = iperf(&lan, secs, false)?;
                w.node_mut("client").stop()?;
                // Round 0 is the warm-up.
                if round > 0 {
                    m.entry(if variant == "nexd" {
                        "tcp_nexd"
                    } else {
                        "tcp_base"
                    })
                    .or_default()
                    .push(tcp);
                    m.entry(if variant == "nexd" {
                        "udp_nexd"
                    } else {
                        "udp_base"
                    })
                    .or_default()
                    .push(udp);
                    m.entry(if variant == "nexd" {
                        "lan_nexd"
                    } else {
                        "lan_base"
                    })
                    .or_default()
                    .push(lan_tcp);
                }
            }
            // No tunnel at all: the client straight to the server.
            let direct = iperf(&w.node("client").ns, secs, false)?;
            if round > 0 {
                m.entry("direct").or_default().push(direct);
            }
        }
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result?;
    let g = |k: &str| m.get(k).cloned().unwrap_or_default();
    Ok(vec![
        Row::new(
            "throughput",
            "TCP client -> server",
            "Mbit/s",
            "same WG, no eBPF",
            &g("tcp_base"),
            &g("tcp_nexd"),
            true,
        ),
        Row::new(
            "throughput",
            "UDP client -> server",
            "Mbit/s",
            "same WG, no eBPF",
            &g("udp_base"),
            &g("udp_nexd"),
            true,
        ),
        Row::new(
            "throughput",
            "TCP LAN host -> server",
            "Mbit/s",
            "same WG, no eBPF",
            &g("lan_base"),
            &g("lan_nexd"),
            true,
        ),
        Row::new(
            "throughput",
            "TCP client -> server",
            "Mbit/s",
            "no tunnel",
            &g("direct"),
            &g("tcp_nexd"),
            true,
        ),
    ])
}
