//! End-to-end: membership through etcd with real nexd processes (issue 14,
//! the device side). A real etcd (Debian's etcd-server, one member or
//! three) runs in namespaces on the World's switch, the admin runs
//! `nexctl mesh` from a namespace of its own, and every device runs
//! `nexd --registry` with its mesh file removed, so the registry is its
//! only source of membership.
//!
//! Proves:
//! * devices start (control socket up) before they are approved and say
//!   "waiting for approval"; three approved devices reach each other over
//!   the mesh, IPv4 and IPv6; a fourth approved later is configured by
//!   every device (the time is printed); a revoked device is removed
//!   everywhere while the others' sessions survive (their byte counters
//!   do not restart), and it removes every peer itself; SIGHUP reads no
//!   mesh file; the metrics show the registry;
//! * an exit node approved with `--exit-node` is used by a client (the
//!   internet server sees its address); a member running `router
//!   --exit-node` without the role is not; revoking the role of the exit
//!   node in use makes the client fail over to another one, revoking that
//!   one's makes it hold, and nothing leaks (the internet's counters);
//! * records written straight into etcd without the admin's signature (a
//!   new device made exit node, an existing device made exit node, a
//!   changed address) are ignored by every nexd (each lists them as
//!   ignored) and change nothing they could not also delete;
//! * a writer to etcd cannot roll back a signed change (issue 21): the
//!   exit-node record saved before `approve --no-exit-node` and written
//!   back is ignored by every nexd as older than what it verified, and
//!   the client never lists nor routes through that node again; with the
//!   serial counter set back, the admin's next serial is still above every
//!   serial it can read, and the revocation voids every record of the
//!   device, so the record written back after it brings nothing back;
//! * one etcd member of three killed: approvals still propagate; all
//!   killed: the mesh keeps working and a restarted nexd comes up from its
//!   cache; etcd back: changes propagate again.
//!
//! The mesh-file path without `--registry` is what every other end-to-end
//! file runs (`mesh`, `exit_node`, `gateway`...).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nexd_testkit::{
    Netns, Node, NodeSpec,
    etcd::{EtcdCluster, MeshAdmin, key_id},
    proto::{ClientPhase, MembershipSource, MembershipState, PeerRow, RegistryInfo},
    traffic::{UdpStream, ping_once, ping_until, tcp_transfer, udp_exchange},
    wait_for,
    world::World,
};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(10);
/// The etcd prefix of the tests' mesh.
const PREFIX: &str = "/mesh";

/// A World whose devices take their membership from etcd.
struct Lab {
    w: World,
    etcd: EtcdCluster,
    admin: MeshAdmin,
}

impl Lab {
    /// The World's devices, `members` etcd members at 192.0.2.201... on its
    /// switch, and the admin (192.0.2.200) with an initialised mesh.
    fn new(names: &[&str], members: usize) -> anyhow::Result<Self> {
        let mut w = World::new(names)?;
        // The registry must be the only source: no device has a file.
        for n in &w.nodes {
            std::fs::remove_file(n.mesh_file())?;
        }
        let cidrs: Vec<String> = (0..members)
            .map(|i| format!("192.0.2.{}/24", 201 + i))
            .collect();
        let refs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        let etcd = EtcdCluster::start(&mut w.sw, &refs)?;
        let ns = Netns::new("admin")?;
        w.sw.attach(&ns, "eth0", &["192.0.2.200/24"])?;
        let admin = MeshAdmin::init(ns, etcd.url(PREFIX), &[])?;
        Ok(Lab { w, etcd, admin })
    }

    /// nexd's options for `name`: `before` (`router --exit-node`), the
    /// registry options publishing its underlay endpoint, then `after`.
    fn spec(&self, name: &str, before: &[&str], after: &[&str]) -> NodeSpec {
        let endpoint = format!("{}:51820", self.w.underlay(name, false));
        let mut args: Vec<String> = before.iter().map(|s| (*s).to_owned()).collect();
        args.extend(self.admin.device_args(name, Some(&endpoint)));
        args.extend(after.iter().map(|s| (*s).to_owned()));
        NodeSpec {
            args,
            ..NodeSpec::default()
        }
    }

    /// Starts `name` in registry mode; its control socket answers at once.
    fn start(&mut self, name: &str, before: &[&str], after: &[&str]) -> anyhow::Result<()> {
        let spec = self.spec(name, before, after);
        self.w.node_mut(name).start(&spec)
    }

    fn node(&self, name: &str) -> &Node {
        self.w.node(name)
    }

    /// `name`'s WireGuard public key.
    fn public_key(&self, name: &str) -> anyhow::Result<&str> {
        self.w
            .devices
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.public_key.as_str())
            .with_context(|| format!("no device {name}"))
    }

    /// The etcd key of `name`'s device record.
    fn record_key(&self, name: &str) -> anyhow::Result<String> {
        Ok(format!(
            "{PREFIX}/devices/{}",
            key_id(self.public_key(name)?)
        ))
    }
}

/// The registry section of `name`'s status.
fn registry(node: &Node) -> anyhow::Result<RegistryInfo> {
    node.status()?
        .registry
        .with_context(|| format!("{}: status has no registry section", node.name))
}

fn wait_state(node: &Node, want: MembershipState, timeout: Duration) -> anyhow::Result<()> {
    wait_for(
        &format!("{} to be {}", node.name, want.as_str()),
        timeout,
        Duration::from_millis(50),
        || (registry(node).ok()?.membership == want).then_some(()),
    )
}

fn peer_names(node: &Node) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = node.peers()?.into_iter().map(|p| p.name).collect();
    names.sort();
    Ok(names)
}

/// Waits until `node`'s peers are exactly `names`.
fn wait_peers(node: &Node, names: &[&str], timeout: Duration) -> anyhow::Result<()> {
    let mut want: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    wait_for(
        &format!("{} to have the peers {want:?}", node.name),
        timeout,
        Duration::from_millis(50),
        || (peer_names(node).ok()? == want).then_some(()),
    )
    .with_context(|| format!("{} has {:?}", node.name, peer_names(node)))
}

/// Waits until every node in `names` is a member with the others as peers.
fn wait_mesh(lab: &Lab, names: &[&str]) -> anyhow::Result<()> {
    for n in names {
        let others: Vec<&str> = names.iter().copied().filter(|o| o != n).collect();
        wait_peers(lab.node(n), &others, T)?;
        wait_state(lab.node(n), MembershipState::Member, T)?;
    }
    Ok(())
}

/// `node`'s mesh address as the registry gave it.
fn mesh_ip(node: &Node, v6: bool) -> anyhow::Result<IpAddr> {
    let st = node.status()?;
    let text = if v6 { st.mesh_ipv6 } else { st.mesh_ipv4 };
    text.parse()
        .with_context(|| format!("{}: no mesh address ({text:?})", node.name))
}

/// Pings every pair both ways, IPv4 and IPv6.
fn all_reach_each_other(lab: &Lab, names: &[&str]) -> anyhow::Result<()> {
    for a in names {
        for b in names {
            if a == b {
                continue;
            }
            for v6 in [false, true] {
                ping_until(&lab.node(a).ns, mesh_ip(lab.node(b), v6)?, T)
                    .with_context(|| format!("{a} -> {b} (v6: {v6})"))?;
            }
        }
    }
    Ok(())
}

fn peer<'a>(rows: &'a [PeerRow], name: &str) -> anyhow::Result<&'a PeerRow> {
    rows.iter()
        .find(|p| p.name == name)
        .with_context(|| format!("no peer {name} in {rows:?}"))
}

/// Polls every node in `on` (in parallel) until `done` holds for it;
/// returns, per node, the time from `t0` (bounded by `timeout`).
fn times_until(
    lab: &Lab,
    on: &[&str],
    t0: Instant,
    timeout: Duration,
    done: impl Fn(&Node) -> bool + Sync,
) -> anyhow::Result<Vec<(String, Duration)>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = on
            .iter()
            .map(|name| {
                let node = lab.node(name);
                let done = &done;
                s.spawn(move || {
                    wait_for(
                        &format!("{name} to follow the registry"),
                        timeout,
                        Duration::from_millis(10),
                        || done(node).then(|| t0.elapsed()),
                    )
                    .map(|d| ((*name).to_owned(), d))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a poller panicked"))?)
            .collect()
    })
}

fn print_times(what: &str, times: &[(String, Duration)], command: Duration) {
    let list: Vec<String> = times
        .iter()
        .map(|(n, d)| {
            format!(
                "{n} {} ms ({} ms after the command returned)",
                d.as_millis(),
                d.saturating_sub(command).as_millis()
            )
        })
        .collect();
    println!(
        "{what}: command took {} ms; configured on {}",
        command.as_millis(),
        list.join(", ")
    );
}

#[test]
fn devices_join_are_approved_and_follow_revocations() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut lab = Lab::new(&["a", "b", "c", "d"], 1)?;

    // Started before approval: the control socket answers, status says
    // so, no peers, no mesh address.
    for n in ["a", "b", "c"] {
        lab.start(n, &[], &[])?;
    }
    for n in ["a", "b", "c"] {
        wait_state(lab.node(n), MembershipState::WaitingForApproval, T)?;
        let st = lab.node(n).status()?;
        assert_eq!(st.peers, 0, "{st:?}");
        assert_eq!(st.mesh_ipv4, "", "{st:?}");
        assert_eq!(st.mesh_file, "", "no mesh file in registry mode: {st:?}");
        assert_eq!(st.device_name, n, "the name it asks to join under: {st:?}");
    }
    let table = lab.node("a").nexctl(&["nexd", "status"])?;
    let text = String::from_utf8_lossy(&table.stdout);
    println!("nexctl nexd status before approval:\n{text}");
    assert!(
        text.contains("REGISTRY") && text.contains("(connected"),
        "{text}"
    );
    assert!(text.contains("waiting for approval"), "{text}");
    assert!(
        text.contains("IGNORED RECORDS") && !text.contains("MESH FILE"),
        "{text}"
    );
    // Their join requests are what the admin sees.
    let requests = lab.admin.ok(&[
        "requests",
        "--registry-admin-key",
        lab.admin.public_key(),
        "-o",
        "json",
    ])?;
    for n in ["a", "b", "c"] {
        assert!(requests.contains(&format!("\"{n}\"")), "{requests}");
    }

    for n in ["a", "b", "c"] {
        lab.admin.approve(n, &[])?;
    }
    wait_mesh(&lab, &["a", "b", "c"])?;
    let info = registry(lab.node("a"))?;
    assert_eq!(info.devices, 3, "{info:?}");
    assert!(
        matches!(info.source, Some(MembershipSource::Registry { .. })),
        "{info:?}"
    );
    assert!(info.connected && info.ignored.is_empty(), "{info:?}");
    all_reach_each_other(&lab, &["a", "b", "c"])?;

    // A fourth device joins later: every device configures it.
    lab.start("d", &[], &[])?;
    wait_state(lab.node("d"), MembershipState::WaitingForApproval, T)?;
    let t0 = Instant::now();
    lab.admin.approve("d", &[])?;
    let command = t0.elapsed();
    let has_d = |n: &Node| peer_names(n).is_ok_and(|p| p.iter().any(|x| x == "d"));
    let times = times_until(&lab, &["a", "b", "c"], t0, T, has_d)?;
    print_times("approval of d", &times, command);
    wait_mesh(&lab, &["a", "b", "c", "d"])?;
    for v6 in [false, true] {
        ping_until(&lab.node("a").ns, mesh_ip(lab.node("d"), v6)?, T)?;
        ping_until(&lab.node("d").ns, mesh_ip(lab.node("b"), v6)?, T)?;
    }

    // Traffic between a and b, then c is revoked: removed everywhere,
    // while a's session with b goes on (its counters do not restart).
    let (a, b) = (lab.node("a"), lab.node("b"));
    tcp_transfer(&a.ns, &b.ns, mesh_ip(b, false)?, 256 * 1024, T)?;
    let before = peer(&a.peers()?, "b")?.clone();
    assert!(before.transmitted_bytes > 256 * 1024, "{before:?}");
    let t0 = Instant::now();
    lab.admin.revoke("c")?;
    let command = t0.elapsed();
    let no_c = |n: &Node| peer_names(n).is_ok_and(|p| !p.iter().any(|x| x == "c"));
    let times = times_until(&lab, &["a", "b", "d"], t0, T, no_c)?;
    print_times("revocation of c", &times, command);
    // The revoked device drops every peer and its mesh addresses itself.
    wait_state(lab.node("c"), MembershipState::Revoked, T)?;
    wait_peers(lab.node("c"), &[], T)?;
    let st = lab.node("c").status()?;
    assert_eq!(st.mesh_ipv4, "", "{st:?}");
    assert!(
        !ping_once(
            &lab.node("c").ns,
            mesh_ip(lab.node("a"), false)?,
            Duration::from_secs(1)
        )?,
        "a revoked device still reaches the mesh"
    );
    let table = lab.node("c").nexctl(&["nexd", "status"])?;
    let text = String::from_utf8_lossy(&table.stdout);
    println!("nexctl nexd status of the revoked device:\n{text}");
    assert!(text.contains("revoked"), "{text}");
    let after = peer(&lab.node("a").peers()?, "b")?.clone();
    assert!(
        after.transmitted_bytes >= before.transmitted_bytes
            && after.received_bytes >= before.received_bytes,
        "a's session with b restarted: {before:?} -> {after:?}"
    );
    assert!(
        after.latest_handshake_seconds.is_some(),
        "a lost its handshake with b: {after:?}"
    );
    ping_until(&lab.node("a").ns, mesh_ip(lab.node("b"), true)?, T)?;
    let log = lab.node("a").log();
    assert!(log.contains("peer removed"), "{log}");

    // SIGHUP reads no mesh file in registry mode: a broken one at the
    // default path changes nothing.
    std::fs::write(lab.node("a").mesh_file(), "this is not a mesh file")?;
    lab.node("a").signal(Signal::SIGHUP)?;
    wait_for("a to handle SIGHUP", T, Duration::from_millis(50), || {
        lab.node("a")
            .log()
            .contains("no mesh file is read")
            .then_some(())
    })?;
    assert!(!lab.node("a").log().contains("mesh file rejected"));
    assert_eq!(peer_names(lab.node("a"))?, ["b", "d"]);

    // The metrics show the registry.
    let out = lab.node("a").nexctl(&["nexd", "metrics"])?;
    let metrics = String::from_utf8_lossy(&out.stdout);
    for line in [
        "nexd_registry_connected 1",
        "nexd_registry_member 1",
        "nexd_registry_ignored_records 0",
        "nexd_registry_rejected_records_total 0",
        "nexd_registry_resyncs_total 0",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }

    // A clean stop revokes the lease: d's endpoint goes at once.
    let endpoint = format!("{PREFIX}/endpoints/{}", key_id(lab.public_key("d")?));
    assert!(lab.etcd.get(&endpoint)?.is_some());
    let status = lab.w.node_mut("d").stop()?;
    assert!(status.success(), "{status}");
    assert!(
        lab.etcd.get(&endpoint)?.is_none(),
        "d's endpoint outlived it"
    );
    Ok(())
}

/// The source address the internet server sees for TCP from `from`.
fn tcp_source(lab: &Lab, from: &str, v6: bool) -> anyhow::Result<IpAddr> {
    Ok(tcp_transfer(
        &lab.node(from).ns,
        &lab.w.inet.ns,
        World::server(v6),
        16 * 1024,
        T,
    )?
    .seen_from
    .ip())
}

/// The exit node the client uses now.
fn active_exit(lab: &Lab) -> Option<String> {
    lab.node("client").status().ok()?.exit_node.active_exit_node
}

/// Waits until every node in `on` lists `key` among its ignored records.
fn wait_ignored(lab: &Lab, on: &[&str], key: &str) -> anyhow::Result<()> {
    for n in on {
        wait_for(
            &format!("{n} to ignore {key}"),
            T,
            Duration::from_millis(50),
            || {
                registry(lab.node(n))
                    .ok()?
                    .ignored
                    .iter()
                    .any(|i| i.key == key)
                    .then_some(())
            },
        )?;
    }
    Ok(())
}

/// No node in `on` has `addr` in any peer's allowed IPs.
fn nobody_routes(lab: &Lab, on: &[&str], addr: &str) -> anyhow::Result<()> {
    for n in on {
        for p in lab.node(n).peers()? {
            if p.allowed_ips.iter().any(|a| a.starts_with(addr)) {
                bail!("{n} routes {addr} to {}: {p:?}", p.name);
            }
        }
    }
    Ok(())
}

#[test]
fn exit_roles_come_from_signed_records_and_forged_ones_change_nothing() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut lab = Lab::new(&["exit1", "exit2", "client", "intruder"], 1)?;
    let router = ["router", "--exit-node"];
    lab.start("exit1", &router, &[])?;
    lab.start("exit2", &router, &[])?;
    lab.start("client", &[], &["--exit-node-client"])?;
    // The intruder runs an exit node too, but is never approved.
    lab.start("intruder", &router, &[])?;
    lab.admin.approve("exit1", &["--exit-node"])?;
    // exit2 is a member without the exit role: it announces itself as
    // exit node, and the client must not believe it.
    lab.admin.approve("exit2", &[])?;
    lab.admin.approve("client", &[])?;
    wait_mesh(&lab, &["exit1", "exit2", "client"])?;
    lab.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    assert_eq!(active_exit(&lab).as_deref(), Some("exit1"));
    assert_eq!(
        tcp_source(&lab, "client", false)?,
        lab.w.underlay("exit1", false)
    );
    assert_eq!(
        tcp_source(&lab, "client", true)?,
        lab.w.underlay("exit1", true)
    );
    let listed: Vec<String> = lab
        .node("client")
        .exit_nodes()?
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(listed, ["exit1"], "only the approved exit node is listed");

    // From here on, nothing from the client's own address may reach the
    // internet server, and nothing through exit2 or the intruder until
    // the admin says so.
    let w = &lab.w;
    w.inet
        .watch("client4", &w.underlay("client", false).to_string())?;
    w.inet
        .watch("client6", &w.underlay("client", true).to_string())?;
    w.inet
        .watch("intruder4", &w.underlay("intruder", false).to_string())?;
    w.inet
        .watch("exit2_4", &w.underlay("exit2", false).to_string())?;
    let everyone = ["exit1", "exit2", "client", "intruder"];

    // 1. A new device, unsigned, made exit node: the intruder itself.
    let intruder_key = lab.public_key("intruder")?;
    let forged = serde_json::json!({
        "name": "intruder", "public_key": intruder_key, "ipv4": "100.64.0.50",
        "ipv6": "fd6e:6578:6400::50", "listen_port": 51820,
        "endpoint": "192.0.2.4:51820", "exit_node": true, "serial": 99
    });
    let intruder_path = lab.record_key("intruder")?;
    lab.etcd.put(&intruder_path, &forged.to_string())?;
    wait_ignored(&lab, &everyone, &intruder_path)?;
    for n in ["exit1", "exit2", "client"] {
        assert!(
            !peer_names(lab.node(n))?.contains(&"intruder".to_owned()),
            "{n} configured the intruder"
        );
    }
    // Not even the intruder believes its own forged record.
    let st = registry(lab.node("intruder"))?;
    assert_eq!(st.membership, MembershipState::WaitingForApproval, "{st:?}");
    assert_eq!(peer_names(lab.node("intruder"))?, Vec::<String>::new());
    nobody_routes(&lab, &everyone, "100.64.0.50")?;

    // 2. An existing device made exit node: exit2's signed record with
    // the flag flipped. Ignored everywhere; what the writer achieves is
    // what deleting the record would (exit2 drops out), never the role.
    let exit2_path = lab.record_key("exit2")?;
    let original = lab.etcd.get(&exit2_path)?.context("exit2's record")?;
    let made_exit = original.replace("\\\"exit_node\\\":false", "\\\"exit_node\\\":true");
    assert_ne!(made_exit, original, "the record's form changed: {original}");
    lab.etcd.put(&exit2_path, &made_exit)?;
    wait_ignored(&lab, &everyone, &exit2_path)?;
    wait_peers(lab.node("client"), &["exit1"], T)?;
    assert_eq!(active_exit(&lab).as_deref(), Some("exit1"));
    assert_eq!(
        tcp_source(&lab, "client", false)?,
        lab.w.underlay("exit1", false)
    );
    // The admin's record written back: exit2 is back, still no exit node.
    lab.etcd.put(&exit2_path, &original)?;
    wait_mesh(&lab, &["exit1", "exit2", "client"])?;

    // 3. A changed address: exit2's record moved to 100.64.0.77.
    let ip = mesh_ip(lab.node("exit2"), false)?.to_string();
    let moved = original.replace(&format!("\\\"{ip}\\\""), "\\\"100.64.0.77\\\"");
    assert_ne!(moved, original, "the record's form changed: {original}");
    lab.etcd.put(&exit2_path, &moved)?;
    wait_ignored(&lab, &everyone, &exit2_path)?;
    nobody_routes(&lab, &everyone, "100.64.0.77")?;
    // exit2 itself does not take the forged address: it is no member now.
    wait_state(lab.node("exit2"), MembershipState::Revoked, T)?;
    assert_eq!(lab.node("exit2").status()?.mesh_ipv4, "");
    lab.etcd.put(&exit2_path, &original)?;
    wait_mesh(&lab, &["exit1", "exit2", "client"])?;
    assert_eq!(mesh_ip(lab.node("exit2"), false)?.to_string(), ip);
    // Meanwhile exit2 asked to join again; a member again, it withdraws
    // the request (only the intruder's is left).
    wait_for(
        "exit2 to withdraw its join request",
        T,
        Duration::from_millis(100),
        || {
            let r = lab
                .admin
                .ok(&[
                    "requests",
                    "--registry-admin-key",
                    lab.admin.public_key(),
                    "-o",
                    "json",
                ])
                .ok()?;
            (!r.contains("\"exit2\"") && r.contains("\"intruder\"")).then_some(())
        },
    )?;
    for n in everyone {
        let info = registry(lab.node(n))?;
        assert!(info.rejected_total >= 2, "{n}: {info:?}");
    }
    let out = lab.node("client").nexctl(&["nexd", "metrics"])?;
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.contains("nexd_registry_ignored_records 1"),
        "the intruder's record stays ignored:\n{metrics}"
    );
    assert_eq!(lab.w.inet.count("intruder4")?, 0);
    assert_eq!(
        lab.w.inet.count("exit2_4")?,
        0,
        "traffic went through exit2"
    );

    // Role changes from the admin. exit2 made exit node (signed this
    // time): the client lists it; exit1 keeps the traffic.
    lab.admin.approve("exit2", &["--exit-node"])?;
    lab.node("client").wait_exit_node("exit2", T * 2)?;
    // exit1's role revoked: the client fails over to exit2.
    let t0 = Instant::now();
    lab.admin.approve("exit1", &["--no-exit-node"])?;
    wait_for(
        "the client to fail over to exit2",
        T * 2,
        Duration::from_millis(20),
        || (active_exit(&lab).as_deref() == Some("exit2")).then_some(()),
    )?;
    println!(
        "exit1's role revoked: the client moved to exit2 in {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(
        tcp_source(&lab, "client", false)?,
        lab.w.underlay("exit2", false)
    );
    assert_eq!(
        tcp_source(&lab, "client", true)?,
        lab.w.underlay("exit2", true)
    );
    // exit2's role revoked too: no exit node is left, the client holds.
    lab.admin.approve("exit2", &["--no-exit-node"])?;
    lab.node("client").wait_phase(ClientPhase::Held, T * 2)?;
    let client = &lab.node("client").ns;
    assert!(
        udp_exchange(
            client,
            &lab.w.inet.ns,
            World::server(false),
            Duration::from_secs(2)
        )
        .is_err()
    );
    assert!(!ping_once(
        client,
        World::server(true),
        Duration::from_secs(1)
    )?);
    // Mesh traffic still flows; nothing leaked at any point.
    ping_until(client, mesh_ip(lab.node("exit1"), false)?, T)?;
    assert_eq!(lab.w.inet.count("client4")?, 0, "IPv4 leaked");
    assert_eq!(lab.w.inet.count("client6")?, 0, "IPv6 leaked");
    assert_eq!(lab.w.inet.count("intruder4")?, 0);
    Ok(())
}

#[test]
fn etcd_member_loss_outage_and_restart_from_the_cache() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut lab = Lab::new(&["a", "b", "c"], 3)?;
    lab.start("a", &[], &[])?;
    lab.start("b", &[], &[])?;
    lab.admin.approve("a", &[])?;
    lab.admin.approve("b", &[])?;
    wait_mesh(&lab, &["a", "b"])?;

    // One member of three killed: approvals still propagate.
    lab.etcd.kill(0)?;
    lab.start("c", &[], &[])?;
    wait_state(lab.node("c"), MembershipState::WaitingForApproval, T * 2)?;
    let t0 = Instant::now();
    lab.admin.approve("c", &[])?;
    let command = t0.elapsed();
    let has_c = |n: &Node| peer_names(n).is_ok_and(|p| p.iter().any(|x| x == "c"));
    let times = times_until(&lab, &["a", "b"], t0, T * 2, has_c)?;
    print_times("approval of c with one etcd member down", &times, command);
    wait_mesh(&lab, &["a", "b", "c"])?;
    all_reach_each_other(&lab, &["a", "b", "c"])?;

    // All members killed: nothing changes in the data path.
    lab.etcd.kill(1)?;
    lab.etcd.kill(2)?;
    for n in ["a", "b", "c"] {
        wait_for(
            &format!("{n} to notice etcd is gone"),
            T * 2,
            Duration::from_millis(100),
            || (!registry(lab.node(n)).ok()?.connected).then_some(()),
        )?;
        let info = registry(lab.node(n))?;
        assert_eq!(info.membership, MembershipState::Member, "{n}: {info:?}");
        assert!(info.disconnects > 0, "{n}: {info:?}");
    }
    all_reach_each_other(&lab, &["a", "b", "c"])?;
    let table = lab.node("a").nexctl(&["nexd", "status"])?;
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("unreachable"),
        "{table:?}"
    );
    // A restarted nexd comes up from its cache, and says so.
    let status = lab.w.node_mut("b").stop()?;
    assert!(status.success(), "{status}");
    lab.start("b", &[], &[])?;
    wait_peers(lab.node("b"), &["a", "c"], T * 3)?;
    let info = registry(lab.node("b"))?;
    assert!(
        matches!(info.source, Some(MembershipSource::Cache { .. })),
        "{info:?}"
    );
    let table = lab.node("b").nexctl(&["nexd", "status"])?;
    let text = String::from_utf8_lossy(&table.stdout);
    println!("nexctl nexd status restarted with etcd down:\n{text}");
    assert!(text.contains("from the cache"), "{text}");
    assert!(
        lab.node("b")
            .log()
            .contains("using the last verified membership from the cache")
    );
    all_reach_each_other(&lab, &["a", "b", "c"])?;

    // etcd back: changes propagate again.
    lab.etcd.restart_all()?;
    let t0 = Instant::now();
    lab.admin.revoke("c")?;
    let command = t0.elapsed();
    let no_c = |n: &Node| peer_names(n).is_ok_and(|p| !p.iter().any(|x| x == "c"));
    let times = times_until(&lab, &["a", "b"], t0, T * 3, no_c)?;
    print_times("revocation of c after etcd came back", &times, command);
    wait_state(lab.node("c"), MembershipState::Revoked, T * 2)?;
    wait_for(
        "b to read etcd again",
        T * 2,
        Duration::from_millis(100),
        || {
            let info = registry(lab.node("b")).ok()?;
            (info.connected && matches!(info.source, Some(MembershipSource::Registry { .. })))
                .then_some(())
        },
    )?;
    ping_until(&lab.node("a").ns, mesh_ip(lab.node("b"), true)?, T)?;
    Ok(())
}

/// Issue 21, finding 0: a client in exit mode whose own membership goes
/// (revoked by the admin) loses its mesh addresses; the kernel then
/// deletes every IPv4 route through the WireGuard interface, the default
/// route of nexd's table among them. Held must still mean blocked, and
/// approved again, the client must route through the exit node again.
#[test]
fn a_client_that_leaves_the_mesh_holds_its_traffic_and_resumes_when_approved_again()
-> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut lab = Lab::new(&["exit1", "client"], 1)?;
    lab.start("exit1", &["router", "--exit-node"], &[])?;
    lab.start("client", &[], &["--exit-node-client"])?;
    lab.admin.approve("exit1", &["--exit-node"])?;
    lab.admin.approve("client", &[])?;
    wait_mesh(&lab, &["exit1", "client"])?;
    lab.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    let w = &lab.w;
    w.inet
        .watch("client4", &w.underlay("client", false).to_string())?;
    w.inet
        .watch("client6", &w.underlay("client", true).to_string())?;
    // Traffic all along, as an application would keep sending.
    let stream = |v6| {
        UdpStream::start(
            &lab.node("client").ns,
            &lab.w.inet.ns,
            World::server(v6),
            Duration::from_millis(10),
            Duration::from_secs(60),
        )
    };
    let (s4, s6) = (stream(false)?, stream(true)?);

    lab.admin.revoke("client")?;
    wait_state(lab.node("client"), MembershipState::Revoked, T)?;
    lab.node("client").wait_phase(ClientPhase::Held, T)?;
    assert_eq!(lab.node("client").status()?.mesh_ipv4, "", "addresses gone");
    // Held for a while: nothing may leave directly.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.w.inet.count("client4")?, 0, "IPv4 leaked while held");
    assert_eq!(lab.w.inet.count("client6")?, 0, "IPv6 leaked while held");

    // Approved again: the traffic flows through the exit node again.
    let approved = Instant::now();
    lab.admin.approve("client", &[])?;
    wait_state(lab.node("client"), MembershipState::Member, T)?;
    lab.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    let exit1 = |v6| lab.w.underlay("exit1", v6);
    for (s, v6) in [(&s4, false), (&s6, true)] {
        wait_for(
            &format!("the client's stream (IPv6: {v6}) through exit1 again"),
            T,
            Duration::from_millis(50),
            || s.first_from(exit1(v6), approved).map(|_| ()),
        )?;
    }
    assert_eq!(tcp_source(&lab, "client", false)?, exit1(false));
    assert_eq!(tcp_source(&lab, "client", true)?, exit1(true));
    s4.finish()?;
    s6.finish()?;
    assert_eq!(lab.w.inet.count("client4")?, 0, "IPv4 leaked");
    assert_eq!(lab.w.inet.count("client6")?, 0, "IPv6 leaked");
    Ok(())
}

/// Fails if `bad` says something (what is wrong) at any poll within `d`.
fn never_for(what: &str, d: Duration, bad: impl Fn() -> Option<String>) -> anyhow::Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if let Some(why) = bad() {
            bail!("{what}: {why}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Why the client would be using or offered `exit`, if it is.
fn uses_exit(lab: &Lab, exit: &str) -> Option<String> {
    let client = lab.node("client");
    if let Ok(rows) = client.exit_nodes()
        && let Some(r) = rows.iter().find(|r| r.name == exit)
    {
        return Some(format!("the client lists {exit} as exit node: {r:?}"));
    }
    if let Ok(peers) = client.peers()
        && let Some(p) = peers.iter().find(|p| {
            p.allowed_ips
                .iter()
                .any(|a| a == "0.0.0.0/0" || a == "::/0")
        })
    {
        return Some(format!(
            "the client routes the internet to {}: {p:?}",
            p.name
        ));
    }
    match client.client_phase() {
        Ok(ClientPhase::Held) => None,
        other => Some(format!("the client's phase is {other:?}, not held")),
    }
}

/// The reason `node` gives for ignoring `key`, once it does.
fn wait_ignored_reason(node: &Node, key: &str) -> anyhow::Result<String> {
    wait_for(
        &format!("{} to ignore {key}", node.name),
        T,
        Duration::from_millis(50),
        || {
            registry(node)
                .ok()?
                .ignored
                .into_iter()
                .find(|i| i.key == key)
                .map(|i| i.reason)
        },
    )
    .with_context(|| format!("{}: {:?}", node.name, registry(node)))
}

#[test]
fn a_rolled_back_role_change_is_not_believed() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut lab = Lab::new(&["ex", "client"], 1)?;
    lab.start("ex", &["router", "--exit-node"], &[])?;
    lab.start("client", &[], &["--exit-node-client"])?;
    lab.admin.approve("ex", &["--exit-node"])?;
    lab.admin.approve("client", &[])?;
    wait_mesh(&lab, &["ex", "client"])?;
    lab.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    assert_eq!(active_exit(&lab).as_deref(), Some("ex"));

    // The exit-node record as an etcd writer saves it, then the admin
    // takes the role away: the client holds (ex was its only exit node).
    let ex_path = lab.record_key("ex")?;
    let as_exit_node = lab.etcd.get(&ex_path)?.context("ex's record")?;
    lab.admin.approve("ex", &["--no-exit-node"])?;
    let without_role = lab.etcd.get(&ex_path)?.context("ex's record")?;
    lab.node("client").wait_phase(ClientPhase::Held, T * 2)?;
    let w = &lab.w;
    w.inet.watch("ex4", &w.underlay("ex", false).to_string())?;

    // The writer puts the exit-node record back. Every nexd has verified
    // a newer record of that key: it ignores this one, saying why, and the
    // client never lists ex nor routes anything through it.
    lab.etcd.put(&ex_path, &as_exit_node)?;
    never_for(
        "the rolled-back exit-node record was believed",
        Duration::from_secs(3),
        || uses_exit(&lab, "ex"),
    )?;
    for n in ["ex", "client"] {
        let reason = wait_ignored_reason(lab.node(n), &ex_path)?;
        println!("{n} ignores the rolled-back record: {reason}");
        assert!(reason.contains("rolled back"), "{n}: {reason}");
    }
    assert!(
        udp_exchange(
            &lab.node("client").ns,
            &lab.w.inet.ns,
            World::server(false),
            Duration::from_secs(2)
        )
        .is_err(),
        "the client's traffic got out"
    );
    assert_eq!(lab.w.inet.count("ex4")?, 0, "traffic went out through ex");

    // The admin's record written back: ex is a member again, without the
    // role; the client still holds.
    lab.etcd.put(&ex_path, &without_role)?;
    wait_mesh(&lab, &["ex", "client"])?;
    never_for("ex's role came back", Duration::from_secs(2), || {
        uses_exit(&lab, "ex")
    })?;
    Ok(())
}

#[test]
fn a_revocation_holds_when_the_serial_counter_is_set_back() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut lab = Lab::new(&["ex", "client", "late"], 1)?;
    lab.start("ex", &["router", "--exit-node"], &[])?;
    lab.start("client", &[], &["--exit-node-client"])?;
    // Serials 2 to 5; ex's record ends at serial 5, the counter at 5.
    lab.admin.approve("ex", &["--exit-node"])?;
    lab.admin.approve("client", &[])?;
    lab.admin.approve("ex", &["--exit-clients", "client"])?;
    lab.admin.approve("ex", &["--all-exit-clients"])?;
    assert_eq!(lab.admin.serial_of("ex")?, Some(5));
    wait_mesh(&lab, &["ex", "client"])?;
    lab.node("client").wait_phase(ClientPhase::Active, T * 2)?;
    let ex_path = lab.record_key("ex")?;
    let serial5 = lab.etcd.get(&ex_path)?.context("ex's record")?;

    // The writer sets the unsigned counter back to 1; the admin then
    // edits ex and revokes it.
    let counter = format!("{PREFIX}/serial");
    lab.etcd.put(&counter, "1")?;
    lab.admin.approve("ex", &["--exit-clients", "client"])?;
    let edited = lab.admin.serial_of("ex")?;
    lab.admin.revoke("ex")?;
    lab.node("client").wait_phase(ClientPhase::Held, T * 2)?;
    wait_peers(lab.node("client"), &[], T)?;
    let w = &lab.w;
    w.inet.watch("ex4", &w.underlay("ex", false).to_string())?;

    // The serial-5 record written back brings nothing back: not to the
    // client, which saw the revocation, nor to the admin's list.
    lab.etcd.put(&ex_path, &serial5)?;
    never_for(
        "the revoked exit node came back",
        Duration::from_secs(3),
        || {
            uses_exit(&lab, "ex").or_else(|| {
                let p = peer_names(lab.node("client")).ok()?;
                p.iter()
                    .any(|n| n == "ex")
                    .then(|| format!("the client has ex as a peer again: {p:?}"))
            })
        },
    )?;
    // Older than the edit it verified, and void under the revocation
    // (which voids every record of ex signed before it): either reason.
    let reason = wait_ignored_reason(lab.node("client"), &ex_path)?;
    println!("the client ignores the written-back record: {reason}");
    assert!(
        reason.starts_with("revoked") || reason.starts_with("rolled back"),
        "{reason}"
    );
    assert_eq!(lab.admin.serial_of("ex")?, None, "the admin lists ex again");
    assert!(
        udp_exchange(
            &lab.node("client").ns,
            &lab.w.inet.ns,
            World::server(false),
            Duration::from_secs(2)
        )
        .is_err(),
        "the client's traffic got out"
    );
    assert_eq!(lab.w.inet.count("ex4")?, 0, "traffic went out through ex");
    // A device that joins now never verified ex's edit: the revocation
    // alone voids the serial-5 record for it.
    lab.start("late", &[], &[])?;
    wait_state(lab.node("late"), MembershipState::WaitingForApproval, T)?;
    lab.admin.approve("late", &[])?;
    wait_mesh(&lab, &["client", "late"])?;
    let reason = wait_ignored_reason(lab.node("late"), &ex_path)?;
    println!("a device that joined later ignores it: {reason}");
    assert!(reason.starts_with("revoked"), "{reason}");
    // The edit after the counter was set back took a serial above every
    // one the admin could read (ex's 5), not the counter's 2.
    assert!(
        edited.is_some_and(|s| s > 5),
        "the edit was signed with serial {edited:?}, not above 5"
    );
    Ok(())
}
