//! Benchmark 4, control-plane timings and memory, each against a baseline measured
//! in the same run:
//!
//! * enable -> first packet through the exit node, against one probe round
//!   trip once exit mode is on (the floor of the measurement itself);
//! * exit node SIGKILLed -> traffic through the second one, against
//!   SIGKILL -> the client listing it as stale (detection alone), and
//!   against the same with heartbeats only (`--no-exit-probes`, the 3 s
//!   design before probes);
//! * start-up with a 1,000-device mesh file, against a 10-device one;
//! * applying a 1-device change to the 1,000-device file (SIGHUP), against
//!   a SIGHUP that changes nothing;
//! * peak RSS (VmHWM) with 1,000 peers against 10 peers, and the steady
//!   state (VmRSS 5 s after start-up) likewise;
//! * SIGTERM to a finished clean-up with 1,000 peers against 10 peers;
//! * idle: CPU time and wake-ups per second of a settled nexd with 1,000
//!   peers against 10, and of an exit-node client with exit mode on
//!   against the same client with it off (issue 25: laptops are our
//!   clients, idle must mean idle).

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use base64::Engine as _;
use nexd_testkit::{
    Node, NodeSpec,
    proto::ExitStatus,
    topology::{MESH_V6_PREFIX, MeshDevice},
    traffic::{UdpStream, udp_exchange},
    wait_for,
    world::World,
};
use nix::sys::signal::Signal;

use super::{Plan, Row};

fn spec(args: &[&str]) -> NodeSpec {
    NodeSpec {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        log_level: "warn".into(),
        ..NodeSpec::default()
    }
}

/// How long an idle measurement looks: long enough that the 5 s
/// handshake retries to silent peers and the 1 s heartbeats are in it.
fn idle_window(plan: &Plan) -> Duration {
    Duration::from_secs(if plan.quick { 2 } else { 10 })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Time until a UDP echo from the server comes back from `via`.
fn first_packet_via(
    w: &World,
    via: std::net::IpAddr,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    wait_for(
        "a packet through the exit node",
        timeout,
        Duration::from_millis(1),
        || match udp_exchange(
            &w.node("client").ns,
            &w.inet.ns,
            World::server(false),
            Duration::from_millis(200),
        ) {
            Ok(src) if src.ip() == via => Some(t0.elapsed()),
            _ => None,
        },
    )
}

fn enable_and_failover(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    let mut w = World::new(&["exit1", "exit2", "client"])?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&[]))?;
    w.node("client")
        .wait_exit_node("exit1", Duration::from_secs(20))?;
    let exit1 = w.underlay("exit1", false);
    let client_pid = w
        .node("client")
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the client has no process"))?;
    let (mut enable, mut probe) = (Vec::new(), Vec::new());
    let (mut cpu_on, mut wake_on, mut cpu_off, mut wake_off) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..=plan.rounds() {
        let t0 = Instant::now();
        let out = w.node("client").nexctl(&["exit-node", "enable"])?;
        anyhow::ensure!(out.status.success(), "enable failed: {out:?}");
        let first = first_packet_via(&w, exit1, Duration::from_secs(10))?;
        let total = t0.elapsed().max(first);
        let p = first_packet_via(&w, exit1, Duration::from_secs(10))?;
        std::thread::sleep(Duration::from_millis(500));
        let on = idle_cost(client_pid, idle_window(plan))?;
        w.node("client").nexctl(&["exit-node", "disable"])?;
        // Settled again (the disable's own work done) before the baseline.
        std::thread::sleep(Duration::from_millis(500));
        let off = idle_cost(client_pid, idle_window(plan))?;
        if round > 0 {
            enable.push(ms(total));
            probe.push(ms(p));
            cpu_on.push(on.0);
            wake_on.push(on.1);
            cpu_off.push(off.0);
            wake_off.push(off.1);
        }
    }
    let mut rows = vec![Row::new(
        "control",
        "enable -> first packet via exit",
        "ms",
        "one probe, exit on",
        &probe,
        &enable,
        false,
    )];
    rows.push(Row::new(
        "control",
        "idle CPU, client in exit mode",
        "us/s",
        "exit mode off",
        &cpu_off,
        &cpu_on,
        false,
    ));
    rows.push(Row::new(
        "control",
        "idle wake-ups, client in exit mode",
        "1/s",
        "exit mode off",
        &wake_off,
        &wake_on,
        false,
    ));

    // Failover: with probes (today's client), then with heartbeats only
    // (the 3 s design, `--no-exit-probes`) as the same run's baseline.
    w.node_mut("exit2")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node("client").nexctl(&["exit-node", "enable"])?;
    let (detect, switch) = failover_rounds(&mut w, plan.rounds())?;
    rows.push(Row::new(
        "control",
        "exit node killed -> traffic via 2nd",
        "ms",
        "kill -> seen stale",
        &detect,
        &switch,
        false,
    ));
    w.node_mut("client").stop()?;
    w.node_mut("client")
        .start(&spec(&["--exit-node-client", "--no-exit-probes"]))?;
    let (_, old_switch) = failover_rounds(&mut w, plan.rounds())?;
    rows.push(Row::new(
        "control",
        "failover with probes",
        "ms",
        "heartbeats only (3 s design)",
        &old_switch,
        &switch,
        false,
    ));
    Ok(rows)
}

/// `rounds` times: both exit nodes available, the active one SIGKILLed;
/// the time from the signal until the client lists it stale and until
/// traffic flows through the other (then the killed one is started
/// again). Traffic is a datagram every 2 ms from the client to a server
/// on the internet, so the first one through the other exit node is seen
/// within 2 ms of the switch (a probe that waits for each answer would
/// add its own timeout to every lost one).
fn failover_rounds(w: &mut World, rounds: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut detect, mut switch) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        wait_for(
            "both exits available, one active",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let rows = w.node("client").exit_nodes().ok()?;
                (rows.len() == 2
                    && rows.iter().all(|r| r.status == ExitStatus::Available)
                    && rows.iter().any(|r| r.active))
                .then_some(())
            },
        )?;
        // Both watched (the probes need a moment to be answered).
        std::thread::sleep(Duration::from_millis(500));
        let list = w.node("client").exit_nodes()?;
        let active = list
            .iter()
            .find(|r| r.active)
            .map_or("exit1", |r| r.name.as_str())
            .to_owned();
        let other = if active == "exit1" { "exit2" } else { "exit1" };
        let (active_ip, other_ip) = (w.underlay(&active, false), w.underlay(other, false));
        let stream = UdpStream::start(
            &w.node("client").ns,
            &w.inet.ns,
            World::server(false),
            Duration::from_millis(2),
            Duration::from_secs(40),
        )?;
        let started = Instant::now();
        wait_for(
            "the stream to flow through the active exit node",
            Duration::from_secs(5),
            Duration::from_millis(5),
            || stream.first_from(active_ip, started).map(|_| ()),
        )?;
        // The clock starts at the signal: the exit node stops answering
        // then, while its process takes a while longer to be reaped.
        let t0 = Instant::now();
        w.node_mut(&active).kill()?;
        let client = w.node("client");
        let detected = wait_for(
            "the killed exit node to be stale",
            Duration::from_secs(30),
            Duration::from_millis(5),
            || {
                client
                    .exit_nodes()
                    .ok()?
                    .iter()
                    .any(|r| r.name == active && r.status == ExitStatus::Stale)
                    .then(|| t0.elapsed())
            },
        )?;
        let switched = wait_for(
            "traffic through the other exit node",
            Duration::from_secs(30),
            Duration::from_millis(5),
            || stream.first_from(other_ip, t0).map(|e| e.received - t0),
        )
        .map_err(|e| {
            // What the client saw, so that a failure says why.
            let log = client.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            e.context(format!(
                "killed {active}; the client lists {:?}; the stream is {}; the last echo came at {:?} after the kill; its log ends:\n{}",
                client.exit_nodes(),
                if stream.running() { "running" } else { "stopped" },
                stream.last_echo().map(|e| (e.source, e.received.checked_duration_since(t0))),
                tail.join("\n")
            ))
        })?;
        stream.finish()?;
        detect.push(ms(detected));
        switch.push(ms(switched));
        w.node_mut(&active)
            .start(&spec(&["router", "--exit-node"]))?;
    }
    Ok((detect, switch))
}

/// A mesh file with `n` devices; device 0 is `node`'s own key.
/// SIGHUP samples of each kind per round (odd: the last change moves d7).
const HUP_SAMPLES: usize = 5;

fn big_mesh(own: &str, n: usize, tweak: usize) -> String {
    let mut s = format!("[mesh]\nipv6_prefix = \"{MESH_V6_PREFIX}\"\n");
    let mut devices = vec![MeshDevice {
        name: "self".into(),
        public_key: own.into(),
        endpoint: Some("192.0.2.1:51820".into()),
        ipv4: "100.64.0.1".into(),
        ipv6: "fd6e:6578:6400::1".into(),
    }];
    let mut x: u64 = 42;
    for i in 1..n {
        // Deterministic keys (the same file twice), distinct per device.
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut bytes = [0u8; 32];
        for (j, b) in bytes.iter_mut().enumerate() {
            *b = (x >> ((j % 8) * 8)) as u8 ^ (i as u8).wrapping_mul(j as u8 + 1) ^ (i >> 8) as u8;
        }
        // Any 32 bytes are an X25519 public key; no device holds these.
        let key = base64::engine::general_purpose::STANDARD.encode(bytes);
        let port = 10000 + i + if i == tweak { 20000 } else { 0 };
        devices.push(MeshDevice {
            name: format!("d{i}"),
            public_key: key,
            endpoint: Some(format!("198.51.100.{}:{port}", 1 + i % 250)),
            ipv4: format!("100.64.{}.{}", (i + 2) >> 8, (i + 2) & 255),
            ipv6: format!("fd6e:6578:6400::{:x}", i + 2),
        });
    }
    for d in &devices {
        let _ = write!(
            s,
            "\n[[device]]\nname = \"{}\"\npublic_key = \"{}\"\nendpoint = \"{}\"\nipv4 = \"{}\"\nipv6 = \"{}\"\n",
            d.name,
            d.public_key,
            d.endpoint.as_deref().unwrap_or_default(),
            d.ipv4,
            d.ipv6
        );
    }
    s
}

/// CPU time (ns, every thread, from schedstat: exact, not in 10 ms
/// ticks) and context switches (voluntary and not: each is a wake-up or
/// a preemption) of process `pid` so far. Threads that ended meanwhile are
/// not counted, so a window must not span a thread's exit.
fn cpu_and_switches(pid: u32) -> anyhow::Result<(u64, u64)> {
    let (mut ns, mut switches) = (0u64, 0u64);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        let (Ok(sched), Ok(status)) = (
            std::fs::read_to_string(dir.join("schedstat")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // the thread ended while being read
        };
        ns += sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| anyhow::anyhow!("{}: no CPU time in {sched:?}", dir.display()))?;
        for l in status.lines() {
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>()?;
            }
        }
    }
    Ok((ns, switches))
}

/// Idle cost of `pid` over `window`: CPU microseconds per second and
/// context switches per second.
fn idle_cost(pid: u32, window: Duration) -> anyhow::Result<(f64, f64)> {
    let (ns0, sw0) = cpu_and_switches(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(window);
    let (ns1, sw1) = cpu_and_switches(pid)?;
    let secs = t0.elapsed().as_secs_f64();
    Ok((
        ns1.saturating_sub(ns0) as f64 / 1000.0 / secs,
        sw1.saturating_sub(sw0) as f64 / secs,
    ))
}

/// A `/proc/PID/status` field in KiB: `VmHWM` (peak RSS) or `VmRSS`.
fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(f64::NAN)
}

fn mesh_scaling(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    let big = if plan.quick { 50 } else { 1000 };
    let small = 10;
    let mut node = Node::new("bmesh")?;
    let own = node.keygen()?;
    node.ns.ip("link add eth0 type veth peer name eth1")?;
    node.ns.ip("link set eth1 up")?;
    node.ns.ip("addr add 192.0.2.1/24 dev eth0")?;
    node.ns.ip("link set eth0 up")?;
    let (mut up_small, mut up_big, mut rss_small, mut rss_big, mut hup_same, mut hup_change) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let (mut stop_small, mut stop_big) = (Vec::new(), Vec::new());
    let (mut steady_small, mut steady_big) = (Vec::new(), Vec::new());
    let (mut cpu_small, mut cpu_big, mut wake_small, mut wake_big) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..=plan.rounds() {
        for n in [small, big] {
            node.write_mesh(&big_mesh(&own, n, usize::MAX))?;
            let t0 = Instant::now();
            node.start(&spec(&[]))?;
            wait_for(
                "all peers",
                Duration::from_secs(60),
                Duration::from_millis(5),
                || node.peers().ok().filter(|a| a.len() == n - 1),
            )?;
            let up = ms(t0.elapsed());
            // Let it settle (handshake attempts, first ticks) before RSS.
            std::thread::sleep(Duration::from_millis(if plan.quick { 200 } else { 1500 }));
            let pid = node.pid().unwrap_or(0);
            let rss = status_kib(pid, "VmHWM");
            // Steady state: what it holds once start-up is over (the
            // handshake attempts to the absent peers keep going).
            let settle = Duration::from_secs(if plan.quick { 1 } else { 5 });
            std::thread::sleep(settle.saturating_sub(t0.elapsed()));
            let steady = status_kib(pid, "VmRSS");
            let (cpu, wakeups) = idle_cost(pid, idle_window(plan))?;
            if n == big {
                // SIGHUP with nothing changed, then with one device changed
                // (d7 moved, then moved back), five times each, 300 ms
                // apart: one sample a round landed on the data path's
                // handshake retries to the 999 silent peers (every 5 s,
                // about 0.2 s of a CPU) often enough to decide the median.
                // A status request after the signal is answered once the
                // reload is done (the loop handles events in order).
                for i in 0..HUP_SAMPLES {
                    for change in [false, true] {
                        if change {
                            let tweak = if i % 2 == 0 { 7 } else { usize::MAX };
                            node.write_mesh(&big_mesh(&own, n, tweak))?;
                        }
                        let t = Instant::now();
                        node.signal(Signal::SIGHUP)?;
                        std::thread::sleep(Duration::from_millis(2));
                        let out = node.nexctl(&["nexd", "status"])?;
                        anyhow::ensure!(out.status.success(), "status after SIGHUP failed");
                        let d = ms(t.elapsed());
                        if round > 0 {
                            if change {
                                hup_change.push(d)
                            } else {
                                hup_same.push(d)
                            }
                        }
                        std::thread::sleep(Duration::from_millis(300));
                    }
                }
                // An odd number of changes leaves d7 moved.
                let peers = node.peers()?;
                let moved = peers
                    .iter()
                    .find(|p| p.name == "d7")
                    .and_then(|p| p.endpoint.as_deref())
                    .is_some_and(|e| e.ends_with(":30007"));
                anyhow::ensure!(moved, "the 1-device change was not applied");
            }
            // A systemd-style stop: SIGTERM, until the process is gone with
            // its clean-up done.
            let t = Instant::now();
            let status = node.stop()?;
            let stop = ms(t.elapsed());
            anyhow::ensure!(status.success(), "nexd exited with {status}");
            if round > 0 {
                if n == big {
                    up_big.push(up);
                    rss_big.push(rss);
                    steady_big.push(steady);
                    stop_big.push(stop);
                    cpu_big.push(cpu);
                    wake_big.push(wakeups);
                } else {
                    up_small.push(up);
                    rss_small.push(rss);
                    steady_small.push(steady);
                    stop_small.push(stop);
                    cpu_small.push(cpu);
                    wake_small.push(wakeups);
                }
            }
        }
    }
    Ok(vec![
        Row::new(
            "control",
            &format!("start with {big} devices"),
            "ms",
            &format!("{small} devices"),
            &up_small,
            &up_big,
            false,
        ),
        Row::new(
            "control",
            &format!("SIGHUP, 1 of {big} changed"),
            "ms",
            "SIGHUP, no change",
            &hup_same,
            &hup_change,
            false,
        ),
        Row::new(
            "control",
            &format!("peak RSS, {} peers", big - 1),
            "KiB",
            &format!("{} peers", small - 1),
            &rss_small,
            &rss_big,
            false,
        ),
        Row::new(
            "control",
            &format!("steady RSS (5 s), {} peers", big - 1),
            "KiB",
            &format!("{} peers", small - 1),
            &steady_small,
            &steady_big,
            false,
        ),
        Row::new(
            "control",
            &format!("idle CPU, {} peers", big - 1),
            "us/s",
            &format!("{} peers", small - 1),
            &cpu_small,
            &cpu_big,
            false,
        ),
        Row::new(
            "control",
            &format!("idle wake-ups, {} peers", big - 1),
            "1/s",
            &format!("{} peers", small - 1),
            &wake_small,
            &wake_big,
            false,
        ),
        Row::new(
            "control",
            &format!("SIGTERM -> clean exit, {} peers", big - 1),
            "ms",
            &format!("{} peers", small - 1),
            &stop_small,
            &stop_big,
            false,
        ),
    ])
}

/// `scaling_only`: the mesh-size rows without the exit-node ones (which
/// take most of the time), for iterating on start-up and memory.
pub fn run(plan: &Plan, part: Part) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    if part != Part::Scaling {
        rows.extend(enable_and_failover(plan)?);
    }
    if part != Part::Failover {
        rows.extend(mesh_scaling(plan)?);
    }
    Ok(rows)
}

/// Which rows of this benchmark to measure (`--only control`,
/// `control-failover`, `control-scaling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    All,
    Failover,
    Scaling,
}
