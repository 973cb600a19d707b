//! `cargo xtask lab`: real nexd agents in network namespaces (an exit
//! node, a client, a peer, and an internet server), narrated step by step,
//! then torn down (or kept with `--keep`, and removed later with
//! `cargo xtask lab down`).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nexd_testkit::{
    Netns, Node, NodeSpec, counter,
    node::KeptNode,
    topology::lan_behind,
    traffic::{ping_until, tcp_transfer},
    world::{Naming, World},
};

use crate::setup::{self, Need};

/// What the lab needs installed: nexd built, and network namespaces.
pub const NEEDS: &[Need] = &[Need::Build, Need::Namespaces];

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Leave the lab running and print the commands to explore it.
    #[arg(long)]
    pub keep: bool,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    pub no_setup: bool,
}

#[derive(clap::Subcommand)]
pub enum Action {
    /// Remove a lab left running with --keep.
    Down,
}

/// Where a kept lab records what to remove.
const STATE_DIR: &str = "/run/nexd-lab";
const NS_PREFIX: &str = "nexd-lab-";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: tearing the lab down");
    }
    Ok(())
}

fn say(text: &str) {
    println!("\n\x1b[1;36m# {text}\x1b[0m");
}

fn show(cmdline: &str, output: &str) {
    println!("\x1b[2m$ {cmdline}\x1b[0m");
    print!("{output}");
    if !output.ends_with('\n') {
        println!();
    }
}

fn nexctl_show(node: &Node, args: &[&str]) -> anyhow::Result<()> {
    let out = node.nexctl(args)?;
    show(
        &format!(
            "ip netns exec {} nexctl --socket {} {}",
            node.ns.name(),
            node.socket().display(),
            args.join(" ")
        ),
        &format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    );
    if !out.status.success() {
        bail!("nexctl {} failed", args.join(" "));
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab creates network namespaces and needs root; run `sudo cargo xtask lab`");
    }
    if let Some(Action::Down) = args.action {
        return down();
    }
    if Path::new(STATE_DIR).join("lab.json").exists() {
        bail!("a lab is already up (kept with --keep); remove it with `cargo xtask lab down`");
    }
    if !args.no_setup {
        setup::ensure("the lab", NEEDS)?;
    }
    crate::workspace::build_agent(false)?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::Handler(on_sigint),
        );
    }
    let started = Instant::now();
    let result = lab_story(args.keep);
    match &result {
        Ok(()) if args.keep => {}
        Ok(()) => say(&format!(
            "Done in {:.1}s: nexd removed its interfaces on SIGTERM, and the lab's namespaces are gone.",
            started.elapsed().as_secs_f64()
        )),
        Err(_) => say("The lab failed; everything it created has been removed."),
    }
    result
}

/// Sends 256 KiB over TCP from `from` to the server, prints who the
/// server saw, and fails unless it was `expect`.
fn show_source(
    w: &World,
    from: &Netns,
    label: &str,
    v6: bool,
    expect: IpAddr,
) -> anyhow::Result<()> {
    let server = World::server(v6);
    let t = tcp_transfer(
        from,
        &w.inet.ns,
        server,
        256 * 1024,
        Duration::from_secs(10),
    )?;
    let seen = t.seen_from.ip();
    println!(
        "  {label:<8} -> server {server:<18} TCP 256 KiB ok; the server saw it come from {seen}"
    );
    if seen != expect {
        bail!("the server saw {seen}, the lab expected {expect}");
    }
    Ok(())
}

/// Prints a narrated check and fails the lab if it does not hold.
fn check(ok: bool, what: &str) -> anyhow::Result<()> {
    if ok {
        println!("  ok: {what}");
        Ok(())
    } else {
        bail!("check failed: {what}")
    }
}

fn lab_story(keep: bool) -> anyhow::Result<()> {
    let base = PathBuf::from(STATE_DIR);
    std::fs::create_dir_all(&base)?;
    say(
        "The lab: an \"internet\" namespace with a server (203.0.113.10, 2001:db8:203::10) that routes for a LAN segment, and three devices on that segment, each in its own network namespace running a real nexd (userspace WireGuard, boringtun): exit (an exit node), client (also the gateway of a small LAN with one host) and peer.",
    );
    let names = ["exit", "client", "peer"];
    let mut w = World::build(
        &names,
        &Naming::Fixed {
            prefix: NS_PREFIX,
            dir: &base,
        },
    )?;
    let lan = Netns::named(&format!("{NS_PREFIX}lanhost"), "lanhost")?;
    // The client is a home router: it NATs its LAN to its uplink already.
    lan_behind(&w.node("client").ns, &lan)?;
    for name in names {
        println!(
            "  {name:<8} namespace {:<20} underlay {} / {}   mesh {} / {}",
            w.node(name).ns.name(),
            w.underlay(name, false),
            w.underlay(name, true),
            w.mesh_ip(name, false),
            w.mesh_ip(name, true)
        );
    }
    println!(
        "  lanhost  namespace {:<20} 10.99.0.2 behind client's lan0",
        lan.name()
    );
    check_interrupt()?;
    say(
        "Each device made its key with `nexd keygen`; one mesh file lists them all, and each nexd finds itself in it by its public key:",
    );
    print!("{}", std::fs::read_to_string(w.node("client").mesh_file())?);

    say(
        "Starting nexd: `nexd router --exit-node` on exit; on client `nexd --lan-interface lan0 --exclude-route 198.51.100.0/24 --kill-switch`; plain `nexd` on peer.",
    );
    w.inet.ns.ip("addr add 198.51.100.10/32 dev lo")?;
    let spec = |args: &[&str]| NodeSpec {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        log_level: "info".into(),
        ..NodeSpec::default()
    };
    w.node_mut("exit")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&[
        "--lan-interface",
        "lan0",
        "--exclude-route",
        "198.51.100.0/24",
        "--kill-switch",
    ]))?;
    w.node_mut("peer").start(&spec(&[]))?;
    for name in names {
        let n = w.node(name);
        println!(
            "  {name:<8} nexd pid {:<7} log {}",
            n.pid().unwrap_or(0),
            n.log_path().display()
        );
    }
    check_interrupt()?;
    nexctl_show(w.node("client"), &["nexd", "status"])?;

    say("The mesh works peer to peer, IPv4 and IPv6 (ping, then 1 MiB over TCP):");
    for (a, b) in [("client", "peer"), ("peer", "exit"), ("exit", "client")] {
        for v6 in [false, true] {
            let addr = w.mesh_ip(b, v6);
            ping_until(&w.node(a).ns, addr, Duration::from_secs(10))?;
            let t = tcp_transfer(
                &w.node(a).ns,
                &w.node(b).ns,
                addr,
                1 << 20,
                Duration::from_secs(10),
            )?;
            println!(
                "  {a:<7} -> {b:<7} {:<20} {:>6.1} ms; {b} saw {}",
                addr.to_string(),
                t.elapsed.as_secs_f64() * 1000.0,
                t.seen_from.ip()
            );
            check(
                t.seen_from.ip() == w.mesh_ip(a, v6),
                &format!("{b} saw {a}'s mesh address"),
            )?;
        }
        check_interrupt()?;
    }

    say("The exit node announces itself inside the tunnel; the client lists it:");
    w.node("client")
        .wait_exit_node("exit", Duration::from_secs(20))?;
    nexctl_show(w.node("client"), &["nexd", "exit-node", "list"])?;

    let client_ns = &w.node("client").ns;
    say(
        "Before: the client and its LAN host reach the internet server directly, from the client's own address.",
    );
    show_source(&w, client_ns, "client", false, w.underlay("client", false))?;
    show_source(&w, client_ns, "client", true, w.underlay("client", true))?;
    show_source(&w, &lan, "lanhost", false, w.underlay("client", false))?;

    say("Enable the exit node client:");
    nexctl_show(w.node("client"), &["nexd", "exit-node", "enable"])?;
    say(
        "After: the server sees the exit node's address, from the client (IPv4 and IPv6) and from the LAN host (steered by the eBPF classifier on lan0).",
    );
    let client_ns = &w.node("client").ns;
    show_source(&w, client_ns, "client", false, w.underlay("exit", false))?;
    show_source(&w, client_ns, "client", true, w.underlay("exit", true))?;
    show_source(&w, &lan, "lanhost", false, w.underlay("exit", false))?;
    say("An excluded prefix (198.51.100.0/24) still goes direct, for the client and its LAN:");
    let excluded: IpAddr = "198.51.100.10".parse()?;
    for (label, from) in [("client", client_ns), ("lanhost", &lan)] {
        let t = tcp_transfer(
            from,
            &w.inet.ns,
            excluded,
            64 * 1024,
            Duration::from_secs(10),
        )?;
        println!("  {label:<8} -> {excluded} seen from {}", t.seen_from.ip());
        check(
            t.seen_from.ip() == w.underlay("client", false),
            "excluded traffic left directly",
        )?;
    }
    say("Mesh traffic still goes straight to the peer (it sees the client's mesh address):");
    for (label, from) in [("client", client_ns), ("lanhost", &lan)] {
        let t = tcp_transfer(
            from,
            &w.node("peer").ns,
            w.mesh_ip("peer", false),
            1 << 20,
            Duration::from_secs(10),
        )?;
        println!(
            "  {label:<8} -> peer {} peer saw {}",
            w.mesh_ip("peer", false),
            t.seen_from.ip()
        );
        check(
            t.seen_from.ip() == w.mesh_ip("client", false),
            "peer reached directly",
        )?;
    }
    say(
        "What nexd installed on the client: three rules per family at fixed priorities (excluded routes, main without its default, the tunnel) and a table with default routes into wg0.",
    );
    show(
        &format!("ip -n {} rule", client_ns.name()),
        &client_ns.ip("rule")?,
    );
    show(
        &format!("ip -n {} route show table 28280", client_ns.name()),
        &client_ns.ip("route show table 28280")?,
    );
    nexctl_show(w.node("client"), &["nexd", "peers", "list"])?;
    say(
        "The eBPF counters: LAN traffic steered, sent direct to the mesh, bypassed; the leak guard on eth0:",
    );
    nexctl_show(w.node("client"), &["nexd", "stats"])?;
    let stats = w.node("client").stats()?;
    let packets = |name: &str| counter(&stats, name).unwrap_or(0);
    check(
        packets("steered_exit") > 0 && packets("direct_mesh") > 0 && packets("bypassed") > 0,
        "the classifier counted steered, mesh and bypassed packets",
    )?;
    check_interrupt()?;

    if keep {
        let kept: Vec<KeptNode> = w.nodes.drain(..).map(Node::keep).collect();
        let mut namespaces: Vec<String> = kept.iter().map(|k| k.netns.clone()).collect();
        let mut lan = lan;
        namespaces.push(lan.keep());
        namespaces.push(w.inet.ns.keep());
        namespaces.push(w.sw.ns.keep());
        let state = serde_json::json!({
            "namespaces": namespaces,
            "pids": kept.iter().filter_map(|k| k.pid).collect::<Vec<_>>(),
        });
        std::fs::write(base.join("lab.json"), serde_json::to_vec_pretty(&state)?)?;
        say("The lab stays up. Explore it:");
        let nexctl = nexd_testkit::bins::nexctl()?;
        for k in &kept {
            println!(
                "  ip netns exec {} {} --socket {}/nexd.sock nexd peers list",
                k.netns,
                nexctl.display(),
                k.dir.display()
            );
        }
        println!(
            "  ip netns exec {NS_PREFIX}client {} --socket {STATE_DIR}/client/nexd.sock nexd exit-node disable",
            nexctl.display()
        );
        println!("  ip netns exec {NS_PREFIX}lanhost ping 203.0.113.10");
        println!("  tail -f {STATE_DIR}/client/nexd.1.log");
        println!("Remove it with: sudo cargo xtask lab down");
        return Ok(());
    }

    say("Disable: the direct path comes back.");
    nexctl_show(w.node("client"), &["nexd", "exit-node", "disable"])?;
    show_source(
        &w,
        &w.node("client").ns,
        "client",
        false,
        w.underlay("client", false),
    )?;

    say(
        "Stopping every nexd with SIGTERM: each removes its interface, routes, rules, nftables tables and eBPF programs.",
    );
    for name in names {
        let status = w.node_mut(name).stop()?;
        let links = w.node(name).ns.ip("-o link show")?;
        let rules = w.node(name).ns.ip("-4 rule")?.lines().count();
        println!(
            "  {name:<8} exited {status}; links left: {}; rules left: {rules}",
            links
                .lines()
                .filter_map(|l| l.split(':').nth(1))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(", ")
        );
        check(
            status.success() && rules == 3,
            &format!("{name} stopped cleanly"),
        )?;
    }
    drop(lan);
    drop(w);
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

/// Removes a kept lab: stops its nexd processes, deletes its namespaces.
fn down() -> anyhow::Result<()> {
    let base = PathBuf::from(STATE_DIR);
    let state_path = base.join("lab.json");
    let mut namespaces: Vec<String> = Vec::new();
    if let Ok(text) = std::fs::read_to_string(&state_path) {
        let state: serde_json::Value = serde_json::from_str(&text).context("lab.json")?;
        for pid in state["pids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_i64())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        namespaces.extend(
            state["namespaces"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str().map(str::to_owned)),
        );
    }
    // Also anything with the lab's prefix (a lab interrupted half-way).
    let listed = nexd_testkit::cmd::ip(["netns", "list"]).unwrap_or_default();
    for line in listed.lines() {
        if let Some(name) = line.split_whitespace().next()
            && name.starts_with(NS_PREFIX)
            && !namespaces.iter().any(|n| n == name)
        {
            namespaces.push(name.to_owned());
        }
    }
    // Give nexd a moment to clean up after SIGTERM, then remove everything.
    std::thread::sleep(Duration::from_millis(500));
    for ns in &namespaces {
        let pids = nexd_testkit::cmd::ip(["netns", "pids", ns]).unwrap_or_default();
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        match nexd_testkit::cmd::ip(["netns", "del", ns]) {
            Ok(_) => println!("removed namespace {ns}"),
            Err(e) => eprintln!("warning: {e}"),
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    if namespaces.is_empty() {
        println!("no lab was up");
    }
    Ok(())
}
