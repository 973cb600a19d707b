//! `cargo xtask lab`: a local mesh of real nexd agents in network
//! namespaces, narrated step by step, then torn down (or kept with
//! `--keep`, and removed later with `cargo xtask lab down`).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nexd_testkit::{
    Node, NodeSpec,
    node::KeptNode,
    topology::{MeshDevice, Switch, mesh_toml},
    traffic::{ping_until, tcp_transfer},
};

use crate::{setup, step, workspace_root};

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
        setup::run(&setup::Args { check: false })?;
    }
    step("building nexd and nexctl");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--package", "nexd-agent", "--bins"])
        .current_dir(workspace_root())
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("building nexd failed");
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::Handler(on_sigint),
        );
    }
    // Binaries for the toolkit.
    // SAFETY: set before any thread of ours reads the environment.
    unsafe { std::env::set_var("NEXD_BIN_DIR", workspace_root().join("target/debug")) };
    let started = Instant::now();
    let result = mesh_story(args.keep);
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

fn mesh_story(keep: bool) -> anyhow::Result<()> {
    let base = PathBuf::from(STATE_DIR);
    std::fs::create_dir_all(&base)?;
    say(
        "A lab mesh: three devices (alpha, beta, gamma) on one LAN segment, each in its own network namespace, each running a real nexd with userspace WireGuard (boringtun).",
    );
    let mut sw = Switch::in_netns(nexd_testkit::Netns::named(
        &format!("{NS_PREFIX}switch"),
        "switch",
    )?)?;
    let names = ["alpha", "beta", "gamma"];
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let n = i + 1;
        let node = Node::named(name, &format!("{NS_PREFIX}{name}"), &base.join(name))?;
        sw.attach(
            &node.ns,
            "eth0",
            &[&format!("192.0.2.{n}/24"), &format!("2001:db8:1::{n}/64")],
        )?;
        println!(
            "  {name:<6} namespace {}  underlay 192.0.2.{n} / 2001:db8:1::{n}",
            node.ns.name()
        );
        nodes.push(node);
    }
    check_interrupt()?;

    say(
        "Each device gets a key pair (`nexd keygen` writes the private key to its state directory, mode 0600, and prints the public key).",
    );
    let mut devices = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let n = i + 1;
        let key = node.keygen()?;
        println!("  {:<6} {key}", node.name);
        devices.push(MeshDevice {
            name: node.name.clone(),
            public_key: key,
            endpoint: Some(if n == 2 {
                format!("[2001:db8:1::{n}]:51820")
            } else {
                format!("192.0.2.{n}:51820")
            }),
            ipv4: format!("100.64.0.{n}"),
            ipv6: format!("fd6e:6578:6400::{n}"),
        });
    }
    let mesh = mesh_toml(&devices);
    say(
        "The mesh file lists every device; each nexd finds itself in it by its public key. beta is reached over IPv6, the others over IPv4.",
    );
    print!("{mesh}");

    say("Starting nexd on every device.");
    let spec = NodeSpec {
        log_level: "info".into(),
        ..NodeSpec::default()
    };
    for node in &mut nodes {
        node.write_mesh(&mesh)?;
        node.start(&spec)?;
        println!(
            "  {:<6} nexd pid {}  log {}",
            node.name,
            node.pid().unwrap_or(0),
            node.log_path().display()
        );
    }
    check_interrupt()?;
    nexctl_show(&nodes[0], &["nexd", "status"])?;

    say("Traffic across the mesh, IPv4 and IPv6, between every pair: ping, then 1 MiB over TCP.");
    for a in 0..3 {
        for b in 0..3 {
            if a == b {
                continue;
            }
            for addr in [
                format!("100.64.0.{}", b + 1).parse::<IpAddr>()?,
                format!("fd6e:6578:6400::{}", b + 1).parse::<IpAddr>()?,
            ] {
                ping_until(&nodes[a].ns, addr, Duration::from_secs(10))?;
                let t = tcp_transfer(
                    &nodes[a].ns,
                    &nodes[b].ns,
                    addr,
                    1 << 20,
                    Duration::from_secs(10),
                )?;
                println!(
                    "  {:<6} -> {:<6} {:<22} ping ok, TCP 1 MiB in {:>6.1} ms (server saw {})",
                    names[a],
                    names[b],
                    addr.to_string(),
                    t.elapsed.as_secs_f64() * 1000.0,
                    t.seen_from.ip()
                );
                check_interrupt()?;
            }
        }
    }
    say(
        "The server always saw the sender's mesh address: the traffic went through WireGuard. Look at the peers from alpha's side:",
    );
    nexctl_show(&nodes[0], &["nexd", "peers", "list"])?;
    say("And the eBPF counters on alpha's wg0 (TC programs attached by nexd):");
    nexctl_show(&nodes[0], &["nexd", "stats"])?;

    if keep {
        let kept: Vec<KeptNode> = nodes.into_iter().map(Node::keep).collect();
        let sw_name = sw.ns.keep();
        let state = serde_json::json!({
            "namespaces": kept.iter().map(|k| k.netns.clone()).chain([sw_name]).collect::<Vec<_>>(),
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
        println!("  ip netns exec {}alpha ping fd6e:6578:6400::2", NS_PREFIX);
        println!("  tail -f {}/alpha/nexd.1.log", STATE_DIR);
        println!("Remove it with: sudo cargo xtask lab down");
        return Ok(());
    }

    say(
        "Stopping every nexd with SIGTERM: each removes its interface, addresses and eBPF programs.",
    );
    for node in &mut nodes {
        let status = node.stop()?;
        let links = node.ns.ip("-o link show")?;
        println!(
            "  {:<6} exited {status}; links left: {}",
            node.name,
            links
                .lines()
                .filter_map(|l| l.split(':').nth(1))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    drop(nodes);
    drop(sw);
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
