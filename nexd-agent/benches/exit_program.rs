//! Benchmark: the exit node's programs, ns per packet under
//! BPF_PROG_TEST_RUN (kernel-timed, many repeats), with 10, 1,000 and
//! 10,000 clients and 100 denied prefixes, against a no-op program run
//! the same way (the floor: the test-run harness itself). Floor and
//! program alternate, after a warm-up.
//!
//! ```sh
//! sudo cargo bench -p nexd-agent --bench exit_program -- [--quick] [--rounds N] [--json PATH]
//! ```
//!
//! Rows (stdout, and with `--json` an array of objects): {benchmark,
//! case, unit, baseline_name, baseline: [samples], nexd: [samples],
//! higher_is_better}.
//!
//! What the figure is and is not: BPF_PROG_TEST_RUN repeats one packet,
//! so the client's map entries and counters stay in cache; a real exit
//! node with 10,000 active clients pays some cache misses on top (the
//! namespace benchmark, `xtask bench --only exit`, measures a forwarding
//! path end to end).

#[path = "../tests/support/exit_setup.rs"]
mod exit_setup;
#[path = "../tests/support/packets.rs"]
mod packets;

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use exit_setup::{client_v4, client_v6, clients, policy};
use nexd::datapath::{Datapath, TestContext, exit::mss_for_mtu};
use nexd_common::names;
use serde::Serialize;

#[derive(Serialize)]
struct Row {
    benchmark: String,
    case: String,
    unit: String,
    baseline_name: String,
    baseline: Vec<f64>,
    nexd: Vec<f64>,
    higher_is_better: bool,
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
            "--rounds" => {
                a.rounds = it
                    .next()
                    .context("--rounds needs a number")?
                    .parse()
                    .context("--rounds needs a number")?;
            }
            "--json" => a.json = Some(it.next().context("--json needs a path")?.into()),
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => bail!("unknown argument {other:?} (--quick, --rounds N, --json PATH)"),
        }
    }
    Ok(a)
}

/// (floor samples, program samples), ns per run.
fn measure(
    dp: &mut Datapath,
    prog: &str,
    packet: &[u8],
    ctx: TestContext,
    repeat: u32,
    rounds: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    // Warm-up, then alternate.
    dp.test_run_with(names::NOOP_PROG, packet, ctx, repeat)?;
    let first = dp.test_run_with(prog, packet, ctx, repeat)?;
    if first.outcome.action != -1 {
        bail!(
            "{prog} did not pass the probe (action {})",
            first.outcome.action
        );
    }
    let (mut floor, mut nexd) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        floor.push(
            dp.test_run_with(names::NOOP_PROG, packet, ctx, repeat)?
                .outcome
                .nanos_per_run as f64,
        );
        nexd.push(
            dp.test_run_with(prog, packet, ctx, repeat)?
                .outcome
                .nanos_per_run as f64,
        );
    }
    Ok((floor, nexd))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

fn run(a: &Args) -> anyhow::Result<Vec<Row>> {
    if !nix::unistd::geteuid().is_root() {
        bail!("loading eBPF programs needs root: run it with sudo");
    }
    let sizes: &[usize] = if a.quick { &[10] } else { &[10, 1_000, 10_000] };
    let repeat = if a.quick { 10_000 } else { 1_000_000 };
    let rounds = if a.quick { 1 } else { a.rounds.max(1) };
    let mut dp = Datapath::load()?;
    dp.sync_exit_policy(&policy(100)?)?;
    dp.set_mss(mss_for_mtu(1420))?;
    dp.set_exit_enforcing(true)?;
    let internet4: IpAddr = "203.0.113.10".parse()?;
    let internet6: IpAddr = "2001:db8:203::10".parse()?;
    let forwarded = TestContext {
        ingress_ifindex: 7,
        ..Default::default()
    };
    let mut rows = Vec::new();
    let mut row = |case: String, (floor, nexd): (Vec<f64>, Vec<f64>)| {
        println!(
            "  {case:<58} {:>7.1} ns/pkt vs no-op {:>6.1} (+{:.1})",
            median(&nexd),
            median(&floor),
            median(&nexd) - median(&floor)
        );
        rows.push(Row {
            benchmark: "exit_program".into(),
            case,
            unit: "ns/pkt".into(),
            baseline_name: "no-op program".into(),
            baseline: floor,
            nexd,
            higher_is_better: false,
        });
    };
    for &n in sizes {
        dp.sync_exit_clients(&clients(n, false))?;
        // A client in the middle of the table, 64-byte UDP payloads.
        let k = n / 2;
        let (c4, c6) = (IpAddr::V4(client_v4(k)), IpAddr::V6(client_v6(k)));
        let cases = [
            (
                "ingress IPv4",
                names::EXIT_INGRESS_L2_PROG,
                packets::udp_packet(c4, internet4, 64),
                TestContext::default(),
            ),
            (
                "ingress IPv6",
                names::EXIT_INGRESS_L2_PROG,
                packets::udp_packet(c6, internet6, 64),
                TestContext::default(),
            ),
            (
                "egress IPv4",
                names::EXIT_EGRESS_L2_PROG,
                packets::udp_packet(internet4, c4, 64),
                forwarded,
            ),
            (
                "egress IPv6",
                names::EXIT_EGRESS_L2_PROG,
                packets::udp_packet(internet6, c6, 64),
                forwarded,
            ),
        ];
        for (what, prog, packet, ctx) in cases {
            let m = measure(&mut dp, prog, &packet, ctx, repeat, rounds)?;
            row(format!("{what}, {n} clients, 100 denied prefixes"), m);
        }
        if n == 1_000 || a.quick {
            // The same with every client rate-limited (a limit never
            // reached): the cost of the token bucket.
            dp.sync_exit_clients(&clients(n, true))?;
            let p = packets::udp_packet(c4, internet4, 64);
            let m = measure(
                &mut dp,
                names::EXIT_INGRESS_L2_PROG,
                &p,
                TestContext::default(),
                repeat,
                rounds,
            )?;
            row(format!("ingress IPv4, {n} clients rate-limited"), m);
            dp.sync_exit_clients(&clients(n, false))?;
        }
    }
    Ok(rows)
}

fn main() -> ExitCode {
    let result = args().and_then(|a| {
        println!("exit node programs, ns per packet (BPF_PROG_TEST_RUN)");
        let rows = run(&a)?;
        if let Some(path) = &a.json {
            std::fs::write(path, serde_json::to_vec_pretty(&rows)?)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("results written to {}", path.display());
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exit_program benchmark: {e:#}");
            ExitCode::FAILURE
        }
    }
}
