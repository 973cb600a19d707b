//! End-to-end: crashes, a dead daemon, a flapping exit node, and callers
//! who may not change anything.
//!
//! * nexd SIGKILLed during start, right after enable, during disable and
//!   during stop, then started again, converges to exactly the state of a
//!   clean run (rules, routes of nexd's tables, nftables, WireGuard config);
//! * `nexctl exit-node disable` with nexd dead (kill switch on) restores the
//!   direct path by itself;
//! * an exit node going up and down for a minute leaks nothing, never piles
//!   rules up, and the log grows by event, not by time;
//! * an unprivileged user cannot change state through the socket.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nexd_testkit::{
    Netns, Node, NodeSpec,
    proto::ClientPhase,
    traffic::{tcp_transfer, udp_exchange},
    world::World,
};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(10);

fn spec(args: &[&str]) -> NodeSpec {
    NodeSpec {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..NodeSpec::default()
    }
}

/// What an exit-node client installs, in a form that compares across runs.
/// `ruleset` with every `zone set N` written as `zone set Z`.
fn zones_masked(ruleset: &str) -> String {
    const MARK: &str = "zone set ";
    ruleset
        .lines()
        .map(|l| match l.find(MARK) {
            Some(i) => {
                let rest = &l[i + MARK.len()..];
                let digits = rest.chars().take_while(char::is_ascii_digit).count();
                format!("{}Z{}", &l[..i + MARK.len()], &rest[digits..])
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn installed_state(node: &Node) -> anyhow::Result<String> {
    let ns = &node.ns;
    let mut s = String::new();
    for args in [
        "-4 rule show",
        "-6 rule show",
        "-4 route show table 28280",
        "-6 route show table 28280",
        "-4 route show table 28281",
        "-6 route show table 28281",
    ] {
        s.push_str(&format!("## {args}\n{}", ns.ip(args)?));
    }
    // The DNS redirect's conntrack zone is new with every change (so a
    // retrying stub follows a failover): compare everything but its number.
    let ruleset = ns.exec(&["nft", "list", "ruleset"])?;
    s.push_str(&zones_masked(&ruleset));
    if node.pid().is_some() {
        let wg: Vec<String> = node
            .wg_show()?
            .lines()
            .filter(|l| !l.contains("handshake") && !l.contains("transfer"))
            .map(str::to_owned)
            .collect();
        s.push_str(&wg.join("\n"));
    }
    Ok(s)
}

fn source(w: &World, from: &Netns, v6: bool) -> anyhow::Result<IpAddr> {
    Ok(
        tcp_transfer(from, &w.inet.ns, World::server(v6), 8 * 1024, T)?
            .seen_from
            .ip(),
    )
}

/// A copy of the configuration file `config` in the node's directory with
/// the socket path replaced by `socket` (a file name there).
fn client_dir_config(
    node: &Node,
    config: &std::path::Path,
    socket: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let text = std::fs::read_to_string(config)?;
    let elsewhere = node.dir().join(socket);
    let changed: String = text
        .lines()
        .map(|l| {
            if l.starts_with("socket") {
                format!("socket = {elsewhere:?}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let path = node.dir().join("nexd-other-socket.toml");
    std::fs::write(&path, changed)?;
    Ok(path)
}

/// After an offline disable: the client's rules are as before nexd, the
/// guard's pin is gone, and traffic leaves from its own address again.
fn assert_direct_path_back(w: &mut World, rules_before: &str, pin: &str) -> anyhow::Result<()> {
    assert_eq!(w.node("client").ns.ip("rule show")?, rules_before);
    assert!(!w.node_mut("client").file_exists(pin)?, "{pin} is left");
    for v6 in [false, true] {
        assert_eq!(
            source(w, &w.node("client").ns, v6)?,
            w.underlay("client", v6)
        );
    }
    Ok(())
}

#[test]
fn sigkill_at_any_point_converges_after_restart() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client"])?;
    let pristine = w.node("client").ns.snapshot()?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    let client_args = [
        "--exit-node-client",
        "--kill-switch",
        "--exclude-route",
        "198.51.100.0/24",
    ];

    // The reference: a clean run, exit mode active.
    w.node_mut("client").start(&spec(&client_args))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    let clean = installed_state(w.node("client"))?;
    let exit_v4 = w.underlay("exit1", false);

    let converge = |w: &mut World, what: &str| -> anyhow::Result<()> {
        w.node_mut("client").start(&spec(&client_args))?;
        w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
        assert_eq!(
            installed_state(w.node("client"))?,
            clean,
            "after SIGKILL {what}"
        );
        assert_eq!(
            source(w, &w.node("client").ns, false)?,
            exit_v4,
            "after SIGKILL {what}"
        );
        Ok(())
    };

    // 1. Killed in exit mode (the steady state).
    w.node_mut("client").kill()?;
    converge(&mut w, "in exit mode")?;

    // 2. Killed during start-up, at a few moments.
    for delay in [5u64, 60, 250] {
        w.node_mut("client").kill()?;
        w.node_mut("client").spawn(&spec(&client_args))?;
        std::thread::sleep(Duration::from_millis(delay));
        w.node_mut("client").kill()?;
        converge(&mut w, &format!("{delay} ms into start-up"))?;
    }

    // 3. Killed right after enable, and during disable.
    w.node_mut("client").kill()?;
    w.node_mut("client").start(&spec(&[
        "--kill-switch",
        "--exclude-route",
        "198.51.100.0/24",
    ]))?;
    w.node("client").wait_exit_node("exit1", T * 2)?;
    assert!(
        w.node("client")
            .nexctl(&["exit-node", "enable"])?
            .status
            .success()
    );
    w.node_mut("client").kill()?;
    converge(&mut w, "right after enable")?;
    let client = w.node("client");
    let sock = client.socket();
    let nexctl = nexd_testkit::bins::nexctl()?;
    let mut disabling = std::process::Command::new(nexctl)
        .arg("--socket")
        .arg(&sock)
        .args(["exit-node", "disable"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(3));
    w.node_mut("client").kill()?;
    let _ = disabling.wait();
    converge(&mut w, "during disable")?;

    // 4. Killed during a SIGTERM's clean-up.
    w.node("client").signal(Signal::SIGTERM)?;
    std::thread::sleep(Duration::from_millis(2));
    w.node_mut("client").kill()?;
    converge(&mut w, "during stop")?;

    // And a clean stop still leaves nothing behind.
    let status = w.node_mut("client").stop()?;
    assert!(status.success());
    assert_eq!(w.node("client").ns.snapshot()?, pristine);
    Ok(())
}

#[test]
fn offline_disable_restores_the_direct_path() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client"])?;
    let rules_before = w.node("client").ns.ip("rule show")?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client")
        .start(&spec(&["--exit-node-client", "--kill-switch"]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    w.node_mut("client").kill()?;
    // Dead daemon, rules and pinned guard in place: no way out.
    assert!(
        udp_exchange(
            &w.node("client").ns,
            &w.inet.ns,
            World::server(false),
            Duration::from_secs(2)
        )
        .is_err()
    );

    let state_dir = w.node("client").state_dir();
    let out = w.node_mut("client").nexctl_on_device(&[
        "exit-node",
        "disable",
        "--state-dir",
        state_dir.to_str().context("path")?,
    ])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("nexd is not running") && stdout.contains("direct path is restored"),
        "{stdout}"
    );
    assert!(stdout.contains("leak guard"), "{stdout}");
    assert_direct_path_back(&mut w, &rules_before, "/sys/fs/bpf/nexd/wg0/guard-eth0")?;
    // A second time there is nothing left, and it says so.
    let out = w.node_mut("client").nexctl_on_device(&[
        "exit-node",
        "disable",
        "--state-dir",
        state_dir.to_str().context("path")?,
    ])?;
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("it left nothing behind"),
        "{out:?}"
    );
    Ok(())
}

/// One instance configuration for nexd and nexctl: a nexd started from a
/// configuration file alone, with a non-default interface, state
/// directory, socket, bpffs and routing numbers, is SIGKILLed with the
/// kill switch on; a plain `nexctl nexd exit-node disable` from the same
/// environment (`NEXD_CONFIG`, no flags) finds and removes all of it, and
/// traffic proves the direct path is back.
#[test]
fn offline_disable_finds_a_non_default_instance_from_its_config() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client"])?;
    let rules_before = w.node("client").ns.ip("rule show")?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    let client = w.node("client");
    let config = client.dir().join("nexd.toml");
    std::fs::write(
        &config,
        format!(
            "state-dir = {:?}\nmesh-file = {:?}\nsocket = {:?}\ninterface = \"nx7\"\n\
             bpffs = \"/sys/fs/bpf/alt\"\nexit-table = 3000\nexit-rule-priority = 3100\n\
             exit-fwmark = \"0x77\"\nexit-node-client = true\nkill-switch = true\n",
            client.state_dir(),
            client.mesh_file(),
            client.socket(),
        ),
    )?;
    w.node_mut("client").start(&NodeSpec {
        config: Some(config.clone()),
        ..NodeSpec::default()
    })?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    let status = w.node("client").status()?;
    assert_eq!(status.interface, "nx7");
    let rules = w.node("client").ns.ip("rule show")?;
    assert!(
        rules.contains("3100:") && rules.contains("lookup 3000"),
        "{rules}"
    );
    assert!(
        w.node_mut("client")
            .file_exists("/sys/fs/bpf/alt/nexd/nx7/guard-eth0")?
            || !nexd_testkit::tcx_kernel()
    );
    // A nexd that is alive but reached through another socket path: nexctl
    // finds no socket, tries to clean up offline, and refuses because the
    // instance lock is held. Nothing changes.
    let other = client_dir_config(w.node("client"), &config, "elsewhere.sock")?;
    let rules_active = w.node("client").ns.ip("rule show")?;
    let out = w.node_mut("client").nexctl_in_env(
        &[("NEXD_CONFIG", &other)],
        &["nexd", "exit-node", "disable"],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(stderr.contains("holds the instance lock"), "{stderr}");
    assert_eq!(w.node("client").ns.ip("rule show")?, rules_active);
    w.node("client").wait_phase(ClientPhase::Active, T)?;

    w.node_mut("client").kill()?;
    assert!(
        udp_exchange(
            &w.node("client").ns,
            &w.inet.ns,
            World::server(false),
            Duration::from_secs(2)
        )
        .is_err(),
        "the guard let traffic out after the crash"
    );

    let out = w.node_mut("client").nexctl_in_env(
        &[("NEXD_CONFIG", &config)],
        &["nexd", "exit-node", "disable"],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("leak guard"), "{stdout}");
    assert_direct_path_back(&mut w, &rules_before, "/sys/fs/bpf/alt/nexd/nx7/guard-eth0")?;
    Ok(())
}

#[test]
fn flapping_exit_node_leaks_nothing_and_piles_nothing_up() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client"])?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&["--exit-node-client"]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    let rules_installed = w.node("client").ns.ip("rule show")?;
    w.inet
        .watch("client4", &w.underlay("client", false).to_string())?;
    w.inet
        .watch("client6", &w.underlay("client", true).to_string())?;
    let log_lines_before = w.node("client").log().lines().count();

    // Traffic the whole time: UDP probes from the client to the server.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let client_ns = w.node("client").ns.name().to_owned();
    let inet_ns = w.inet.ns.name().to_owned();
    let prober = std::thread::spawn(move || -> anyhow::Result<(u32, u32)> {
        let (from, to) = (Netns::attach(&client_ns)?, Netns::attach(&inet_ns)?);
        let (mut ok, mut failed) = (0, 0);
        while !flag.load(Ordering::Relaxed) {
            match udp_exchange(&from, &to, World::server(false), Duration::from_millis(200)) {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        Ok((ok, failed))
    });

    // Up and down every 3 seconds for a minute.
    let start = Instant::now();
    let mut flaps = 0;
    while start.elapsed() < Duration::from_secs(60) {
        w.node_mut("exit1").kill()?;
        std::thread::sleep(Duration::from_secs(3));
        w.node_mut("exit1")
            .start(&spec(&["router", "--exit-node"]))?;
        flaps += 1;
        std::thread::sleep(Duration::from_secs(3));
        // Whatever the phase, the rules are exactly the installed set.
        assert_eq!(
            w.node("client").ns.ip("rule show")?,
            rules_installed,
            "flap {flaps}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = prober
        .join()
        .map_err(|_| anyhow::anyhow!("prober panicked"))??;
    eprintln!("{flaps} flaps: {ok} probes answered, {failed} held back");
    assert!(ok > 0, "no probe ever got through");
    assert_eq!(
        w.inet.count("client4")?,
        0,
        "IPv4 leaked while the exit node flapped"
    );
    assert_eq!(
        w.inet.count("client6")?,
        0,
        "IPv6 leaked while the exit node flapped"
    );
    // The log grows by event: a few lines per flap, not per second.
    let grown = w.node("client").log().lines().count() - log_lines_before;
    assert!(grown <= flaps * 12, "{grown} log lines for {flaps} flaps");
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    Ok(())
}

#[test]
fn unprivileged_callers_cannot_change_state() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    const NOBODY: u32 = 65534;
    let mut w = World::new(&["exit1", "client"])?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    // Root-only socket: nobody cannot even connect.
    w.node_mut("client").start(&spec(&[]))?;
    let out = w
        .node("client")
        .nexctl_as(NOBODY, NOBODY, &["nexd", "status"])?;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );
    w.node_mut("client").stop()?;

    // With --socket-group, the group may read but not change.
    w.node_mut("client")
        .start(&spec(&["--socket-group", "nogroup"]))?;
    let out = w
        .node("client")
        .nexctl_as(NOBODY, NOBODY, &["nexd", "status"])?;
    assert!(out.status.success(), "{out:?}");
    w.node("client").wait_exit_node("exit1", T * 2)?;
    let rules = w.node("client").ns.ip("rule show")?;
    let out = w
        .node("client")
        .nexctl_as(NOBODY, NOBODY, &["exit-node", "enable"])?;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );
    assert_eq!(
        w.node("client").ns.ip("rule show")?,
        rules,
        "an unprivileged enable changed the rules"
    );
    assert_eq!(w.node("client").client_phase()?, ClientPhase::Off);
    // Root still can.
    assert!(
        w.node("client")
            .nexctl(&["exit-node", "enable"])?
            .status
            .success()
    );
    Ok(())
}

/// Issue 21, finding 14: nexd started with options on its command line
/// (another interface, bpffs and routing numbers) is SIGKILLed with the
/// kill switch on; nexctl, run without those options, used to find the
/// guard on the uplink and leave it there (and the device without
/// internet). The instance registered itself where nexctl looks, so a
/// plain `nexctl nexd exit-node disable` removes all of it.
#[test]
fn offline_disable_finds_an_instance_started_with_other_options() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client"])?;
    let rules_before = w.node("client").ns.ip("rule show")?;
    w.node_mut("exit1")
        .start(&spec(&["router", "--exit-node"]))?;
    w.node_mut("client").start(&spec(&[
        "--exit-node-client",
        "--kill-switch",
        "--interface",
        "nx8",
        "--bpffs",
        "/sys/fs/bpf/other",
        "--exit-table",
        "3200",
        "--exit-rule-priority",
        "3300",
        "--exit-fwmark",
        "0x88",
    ]))?;
    w.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    w.node_mut("client").kill()?;
    assert!(
        udp_exchange(
            &w.node("client").ns,
            &w.inet.ns,
            World::server(false),
            Duration::from_secs(2)
        )
        .is_err(),
        "the dead nexd's kill switch holds"
    );
    // nexctl as an operator would run it: defaults only (the socket is
    // the test's; the state directory is not given).
    let out = w
        .node_mut("client")
        .nexctl_on_device(&["exit-node", "disable"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("direct path is restored"), "{stdout}");
    assert_direct_path_back(
        &mut w,
        &rules_before,
        "/sys/fs/bpf/other/nexd/nx8/guard-eth0",
    )?;
    Ok(())
}
