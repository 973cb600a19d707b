//! End-to-end: an exit group (issue 22). Two exit nodes share the egress
//! address 192.0.2.100 on the shared uplink segment (the switch), with a
//! sync link of their own; real keepalived and conntrackd run as nexd's
//! children. Two clients in exit mode use the group's holder; the
//! internet runs a TCP echo server and a server-first stream, and records
//! every connection it accepts.
//!
//! `flows_survive_a_crash_of_the_holder`: an echo flow (a line every
//! 50 ms), a server-first flow, and two flows whose NAT source ports
//! collide (both clients bind the same port to the same server port, so
//! the second is remapped) run through the holder; its nexd is SIGKILLed,
//! keepalived and conntrackd frozen and killed, its links taken down.
//! Every flow continues on the same connection (the server accepted no
//! new one, none was reset), from the group's egress address; the longest
//! gap is printed. Nothing reaches the internet from a client's underlay
//! meanwhile (v4 and v6), and stopping the new holder removes its daemons,
//! the egress address and its table.
//!
//! `flows_survive_a_stop_of_the_holder`: the same when the holder's nexd
//! is stopped (SIGTERM, maintenance): keepalived hands the address over.
//!
//! `without_state_sync_the_flows_stall`: the same with the standby's
//! conntrackd frozen before the flows start: the new holder has no state
//! for them and, with loose tracking off, the echo flow does not recover.
//! It shows that the first test can fail, and what the sync buys.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nexd_testkit::{
    Netns, NodeSpec,
    netns::veth,
    proto::ClientPhase,
    topology::{MESH_V6_PREFIX, SERVER_V4},
    wait_for,
    world::World,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

const T: Duration = Duration::from_secs(20);
const EGRESS: &str = "192.0.2.100";
const ECHO_PORT: u16 = 7000;
const STREAM_PORT: u16 = 7001;
/// The source port both clients bind for the colliding flows.
const COLLIDING_PORT: u16 = 40000;
/// How often each flow sends (or the server streams) a line.
const EVERY: Duration = Duration::from_millis(50);

fn spec(args: &[&str]) -> NodeSpec {
    NodeSpec {
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        ..NodeSpec::default()
    }
}

/// The mesh file: exit1 and exit2 in group "g" (egress 192.0.2.100 on
/// eth0, sync link sync0), the clients plain members.
fn mesh_text(w: &World) -> String {
    let mut s = format!(
        "[mesh]\nipv4_prefix = \"100.64.0.0/10\"\nipv6_prefix = \"{MESH_V6_PREFIX}\"\n\n\
         [[exit_group]]\nname = \"g\"\negress_ipv4 = \"{EGRESS}/24\"\nuplink = \"eth0\"\nsync_interface = \"sync0\"\nvrrp_id = 51\n"
    );
    for (i, d) in w.devices.iter().enumerate() {
        s.push_str(&format!(
            "\n[[device]]\nname = \"{}\"\npublic_key = \"{}\"\nendpoint = \"{}\"\nipv4 = \"{}\"\nipv6 = \"{}\"\n",
            d.name,
            d.public_key,
            d.endpoint.as_deref().unwrap_or_default(),
            d.ipv4,
            d.ipv6
        ));
        if d.name.starts_with("exit") {
            s.push_str(&format!(
                "exit_node = true\nexit_group = \"g\"\nexit_group_sync_ipv4 = \"10.9.0.{}\"\n",
                i + 1
            ));
        }
    }
    s
}

/// Builds the world, the sync link, starts both members and waits for one
/// of them to hold the egress address; then the clients, in exit mode.
fn group_world() -> anyhow::Result<World> {
    let mut w = World::new(&["exit1", "exit2", "client1", "client2"])?;
    veth(&w.node("exit1").ns, "sync0", &w.node("exit2").ns, "sync0")?;
    for (name, addr) in [("exit1", "10.9.0.1/24"), ("exit2", "10.9.0.2/24")] {
        let ns = &w.node(name).ns;
        ns.ip(&format!("addr add {addr} dev sync0"))?;
        ns.ip("link set sync0 up")?;
    }
    // Multicast VRRP over the bridge (gotcha 8 of the notes).
    w.sw.ns.exec(&[
        "sh",
        "-c",
        "echo 0 > /sys/class/net/br0/bridge/multicast_snooping",
    ])?;
    let text = mesh_text(&w);
    for n in &w.nodes {
        n.write_mesh(&text)?;
    }
    for exit in ["exit1", "exit2"] {
        w.node_mut(exit).start(&spec(&["router", "--exit-node"]))?;
    }
    holder(&w, T)?;
    for exit in ["exit1", "exit2"] {
        // Loose tracking picks mid-stream flows up on its own and would
        // hide whether state sync works (gotcha 1).
        w.node(exit)
            .ns
            .sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")?;
    }
    for client in ["client1", "client2"] {
        w.node_mut(client).start(&spec(&["--exit-node-client"]))?;
    }
    for client in ["client1", "client2"] {
        w.node(client).wait_phase(ClientPhase::Active, T)?;
        // A client takes an exit node only with a WireGuard session up
        // (a handshake within 180 s), as a standby member always has on a
        // mesh that has run for a second; right after start it may not.
        wait_for(
            "sessions with both members",
            T,
            Duration::from_millis(50),
            || {
                let peers = w.node(client).peers().ok()?;
                ["exit1", "exit2"]
                    .iter()
                    .all(|e| {
                        peers
                            .iter()
                            .any(|p| p.name == *e && p.latest_handshake_seconds.is_some())
                    })
                    .then_some(())
            },
        )?;
    }
    Ok(w)
}

/// The member that holds the egress address, waiting up to `timeout`.
fn holder(w: &World, timeout: Duration) -> anyhow::Result<String> {
    holder_among(w, &["exit1", "exit2"], timeout, Duration::from_millis(50))
}

/// The first of `members` that holds the egress address (a crashed
/// member's down link keeps it, so the caller names the live ones).
fn holder_among(
    w: &World,
    members: &[&str],
    timeout: Duration,
    every: Duration,
) -> anyhow::Result<String> {
    wait_for(
        "a member to hold the egress address",
        timeout,
        every,
        || {
            members.iter().copied().find_map(|name| {
                let out = w.node(name).ns.ip("-4 addr show dev eth0").ok()?;
                out.contains(&format!("{EGRESS}/")).then(|| name.to_owned())
            })
        },
    )
}

/// The connections the internet's servers accepted, by source.
type Accepted = Arc<Mutex<Vec<SocketAddr>>>;

/// The echo server (a line back for every line) and the server-first
/// stream (a line every [`EVERY`] from the moment it accepts).
fn start_servers(inet: &Netns, accepted: &Accepted, stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    for (port, first) in [(ECHO_PORT, false), (STREAM_PORT, true)] {
        let accepted = Arc::clone(accepted);
        let stop = Arc::clone(stop);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let _server = inet.spawn_in(move || -> anyhow::Result<()> {
            let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
            listener.set_nonblocking(true)?;
            let _ = ready_tx.send(());
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        conn.set_nonblocking(false)?;
                        if let Ok(mut a) = accepted.lock() {
                            a.push(peer);
                        }
                        let stop = Arc::clone(&stop);
                        std::thread::spawn(move || serve(conn, first, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            Ok(())
        })?;
        ready
            .recv_timeout(Duration::from_secs(5))
            .context("server did not start")?;
    }
    Ok(())
}

fn serve(conn: TcpStream, first: bool, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut out = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    if first {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            if out.write_all(format!("{n}\n").as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(EVERY);
        }
        return;
    }
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if out.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// What a flow saw: when each line came back (or arrived), and how it
/// ended if it did.
#[derive(Debug, Default)]
struct FlowLog {
    times: Vec<Instant>,
    error: Option<String>,
}

impl FlowLog {
    /// The longest time without a line between `from` and `to`.
    fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut last = from;
        let mut gap = Duration::ZERO;
        for t in self.times.iter().copied().filter(|t| *t > from && *t <= to) {
            gap = gap.max(t - last);
            last = t;
        }
        gap.max(to.saturating_duration_since(last))
    }
}

struct Flow {
    name: String,
    log: Arc<Mutex<FlowLog>>,
    thread: JoinHandle<anyhow::Result<()>>,
}

/// A flow from `ns` to the server: `echo` sends a line every [`EVERY`] and
/// reads it back; otherwise it reads the server's stream. `bind`: the
/// source port.
fn start_flow(
    name: &str,
    ns: &Netns,
    port: u16,
    echo: bool,
    bind: Option<u16>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Flow> {
    let log = Arc::new(Mutex::new(FlowLog::default()));
    let (l, stop) = (Arc::clone(&log), Arc::clone(stop));
    let server = SocketAddr::new(SERVER_V4.parse()?, port);
    let thread = ns.spawn_in(move || -> anyhow::Result<()> {
        let conn = connect(server, bind)?;
        conn.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut out = conn.try_clone()?;
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        let mut next_send = Instant::now();
        let mut n = 0u64;
        let result = (|| -> anyhow::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                if echo && Instant::now() >= next_send {
                    n += 1;
                    out.write_all(format!("{n}\n").as_bytes())?;
                    next_send += EVERY;
                }
                match reader.read_line(&mut line) {
                    Ok(0) => bail!("closed by the server"),
                    Ok(_) if line.ends_with('\n') => {
                        line.clear();
                        if let Ok(mut l) = l.lock() {
                            l.times.push(Instant::now());
                        }
                    }
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })();
        // The servers close when the test ends; what comes after is not
        // the flow's failure.
        let result = if stop.load(Ordering::Relaxed) {
            Ok(())
        } else {
            result
        };
        if let Err(e) = &result
            && let Ok(mut l) = l.lock()
        {
            l.error = Some(format!("{e:#}"));
        }
        result
    })?;
    Ok(Flow {
        name: name.to_owned(),
        log,
        thread,
    })
}

fn connect(server: SocketAddr, bind: Option<u16>) -> anyhow::Result<TcpStream> {
    let Some(port) = bind else {
        return Ok(TcpStream::connect_timeout(&server, Duration::from_secs(5))?);
    };
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())?;
    s.connect_timeout(&server.into(), Duration::from_secs(5))?;
    Ok(s.into())
}

/// The pids in a member's pid file (keepalived's parent and VRRP child,
/// conntrackd).
fn daemon_pids(w: &World, member: &str) -> Vec<i32> {
    let dir = w.node(member).state_dir().join("exit-group");
    ["keepalived.pid", "vrrp.pid", "conntrackd.pid"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn signal_all(pids: &[i32], sig: Signal) {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), sig);
    }
}

/// The holder dies as a host would: its daemons frozen (so they cannot
/// hand anything over), nexd and the daemons killed, its links down.
fn crash(w: &mut World, member: &str) -> anyhow::Result<()> {
    let pids = daemon_pids(w, member);
    if pids.len() < 3 {
        bail!("{member}: not all of keepalived and conntrackd run: {pids:?}");
    }
    signal_all(&pids, Signal::SIGSTOP);
    w.node_mut(member).kill()?;
    signal_all(&pids, Signal::SIGKILL);
    let ns = &w.node(member).ns;
    ns.ip("link set eth0 down")?;
    ns.ip("link set sync0 down")?;
    Ok(())
}

struct Run {
    flows: Vec<Flow>,
    accepted: Accepted,
    stop: Arc<AtomicBool>,
}

/// Starts the four flows and waits until each has had a line.
fn start_flows(w: &World) -> anyhow::Result<Run> {
    let accepted: Accepted = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    start_servers(&w.inet.ns, &accepted, &stop)?;
    let c1 = &w.node("client1").ns;
    let c2 = &w.node("client2").ns;
    let flows = vec![
        start_flow("echo", c1, ECHO_PORT, true, None, &stop)?,
        start_flow("server-first", c2, STREAM_PORT, false, None, &stop)?,
        start_flow(
            "colliding-1",
            c1,
            ECHO_PORT,
            true,
            Some(COLLIDING_PORT),
            &stop,
        )?,
        start_flow(
            "colliding-2",
            c2,
            ECHO_PORT,
            true,
            Some(COLLIDING_PORT),
            &stop,
        )?,
    ];
    wait_for(
        "every flow to carry a line",
        T,
        Duration::from_millis(20),
        || {
            flows
                .iter()
                .all(|f| f.log.lock().is_ok_and(|l| !l.times.is_empty()))
                .then_some(())
        },
    )?;
    Ok(Run {
        flows,
        accepted,
        stop,
    })
}

fn accepted(run: &Run) -> Vec<SocketAddr> {
    run.accepted.lock().map(|a| a.clone()).unwrap_or_default()
}

/// How the holder goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Departure {
    /// As a dead host: see [`crash`].
    Crash,
    /// Maintenance: nexd stopped with SIGTERM (keepalived hands the
    /// address over with a priority 0 advert).
    Stop,
}

#[test]
fn flows_survive_a_crash_of_the_holder() -> anyhow::Result<()> {
    flows_survive(Departure::Crash)
}

#[test]
fn flows_survive_a_stop_of_the_holder() -> anyhow::Result<()> {
    flows_survive(Departure::Stop)
}

fn flows_survive(departure: Departure) -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = group_world()?;
    let first = holder(&w, T)?;
    let second = if first == "exit1" { "exit2" } else { "exit1" };
    let run = start_flows(&w)?;
    let before = accepted(&run);
    assert_eq!(before.len(), 4, "{before:?}");
    let egress: IpAddr = EGRESS.parse()?;
    assert!(
        before.iter().all(|a| a.ip() == egress),
        "every flow leaves from the group's egress address: {before:?}"
    );
    let colliding: Vec<u16> = before
        .iter()
        .filter(|a| a.port() != 0)
        .map(SocketAddr::port)
        .collect();
    assert!(
        colliding.contains(&COLLIDING_PORT),
        "one colliding flow keeps its port: {before:?}"
    );
    // Let the state reach the standby.
    std::thread::sleep(Duration::from_millis(1500));

    // From here on the internet counts anything that arrives straight
    // from a client's underlay: a leak during the takeover.
    for (i, client) in ["client1", "client2"].iter().enumerate() {
        for v6 in [false, true] {
            let name = format!("leak{i}{}", if v6 { 6 } else { 4 });
            w.inet.watch(&name, &w.underlay(client, v6).to_string())?;
        }
    }
    let crashed = Instant::now();
    match departure {
        Departure::Crash => crash(&mut w, &first)?,
        Departure::Stop => w.node(&first).signal(Signal::SIGTERM)?,
    }
    holder_among(&w, &[second], T, Duration::from_millis(5))?;
    let took_after = crashed.elapsed();
    if departure == Departure::Stop {
        w.node_mut(&first).wait_exit(T)?;
        let left = w.node(&first).ns.ip("-4 addr show dev eth0")?;
        assert!(
            !left.contains(EGRESS),
            "the stopped member kept the address: {left}"
        );
    }
    // The flows must carry on for a while after the takeover.
    std::thread::sleep(Duration::from_secs(4));
    let end = Instant::now();
    run.stop.store(true, Ordering::Relaxed);

    let after = accepted(&run);
    let mut report = Vec::new();
    let mut longest = Duration::ZERO;
    let mut outcomes = Vec::new();
    for f in run.flows {
        let thread = f.thread;
        let outcome = thread
            .join()
            .map_err(|_| anyhow::anyhow!("flow thread panicked"))?;
        let log = f.log.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let gap = log.longest_gap(crashed, end);
        longest = longest.max(gap);
        report.push(format!(
            "{}: longest gap {} ms, {}",
            f.name,
            gap.as_millis(),
            match &outcome {
                Ok(()) => "open".to_owned(),
                Err(e) => format!("ended: {e:#}"),
            }
        ));
        outcomes.push((f.name, outcome.is_ok(), gap));
    }
    eprintln!(
        "exit group failover ({departure:?}): {second} held the egress address {} ms after it; longest gap {} ms\n  {}",
        took_after.as_millis(),
        longest.as_millis(),
        report.join("\n  ")
    );
    for (name, ok, gap) in outcomes {
        assert!(ok, "{name} ended: {report:#?}");
        assert!(
            gap < Duration::from_secs(3),
            "{name}: the flow stalled ({} ms)",
            gap.as_millis()
        );
    }
    assert_eq!(
        after, before,
        "no flow reconnected: the server accepted no new connection"
    );
    for name in ["leak04", "leak06", "leak14", "leak16"] {
        assert_eq!(
            w.inet.count(name)?,
            0,
            "{name}: a client leaked during the takeover"
        );
    }

    // A stop removes what the member installed: its daemons, the egress
    // address, the table.
    let pids = daemon_pids(&w, second);
    assert_eq!(pids.len(), 3, "{pids:?}");
    w.node_mut(second).stop()?;
    for pid in pids {
        assert!(
            kill(Pid::from_raw(pid), None).is_err(),
            "pid {pid} of {second}'s daemons outlived nexd"
        );
    }
    let ns = &w.node(second).ns;
    let addrs = ns.ip("-4 addr show dev eth0")?;
    assert!(!addrs.contains(EGRESS), "{addrs}");
    let tables = ns.exec(&["nft", "list", "tables"])?;
    assert!(!tables.contains("nexd"), "{tables}");
    Ok(())
}

#[test]
fn without_state_sync_the_flows_stall() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = group_world()?;
    let first = holder(&w, T)?;
    let second = if first == "exit1" { "exit2" } else { "exit1" };
    // The standby's conntrackd learns nothing from here on.
    let standby = daemon_pids(&w, second);
    let conntrackd: Vec<i32> = standby.last().copied().into_iter().collect();
    signal_all(&conntrackd, Signal::SIGSTOP);
    let run = start_flows(&w)?;
    std::thread::sleep(Duration::from_millis(1500));
    let crashed = Instant::now();
    crash(&mut w, &first)?;
    holder_among(&w, &[second], T, Duration::from_millis(20))?;
    std::thread::sleep(Duration::from_secs(5));
    let end = Instant::now();
    run.stop.store(true, Ordering::Relaxed);
    signal_all(&conntrackd, Signal::SIGCONT);
    let mut echo_gap = Duration::ZERO;
    for f in run.flows {
        let _ = f.thread.join();
        let log = f.log.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let gap = log.longest_gap(crashed, end);
        eprintln!(
            "without sync, {}: longest gap {} ms",
            f.name,
            gap.as_millis()
        );
        if f.name == "echo" {
            echo_gap = gap;
        }
    }
    assert!(
        echo_gap >= Duration::from_secs(4),
        "without state sync the echo flow should stall, but its longest gap was {} ms",
        echo_gap.as_millis()
    );
    Ok(())
}
