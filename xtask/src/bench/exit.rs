//! Benchmark: an exit node's CPU per forwarded packet with the exit
//! policy and per-client counters, nexd's eBPF programs against the same
//! policy in nftables, measured in one run.
//!
//! Three namespaces: `clients` sends small UDP packets from several
//! client mesh addresses, through a veth standing in for the WireGuard
//! interface (`wg0`), to the `exit` namespace, which forwards and
//! masquerades them out of its uplink to `sink` (which drops them after
//! counting). Every configuration has the exit node's own nftables table
//! (masquerade, and towards wg0 only `ct state established,related`).
//! On top of it:
//!
//! * **nexd**: the exit programs on wg0 (ingress and egress) with N
//!   clients and 100 denied prefixes, attached by the `exit_datapath`
//!   example binary of nexd-agent (xtask does not link nexd);
//! * **nft**: the same in nftables: sets of the clients' addresses
//!   (unknown sources dropped and counted), an interval map of the denied
//!   prefixes to a named counter per reason (dropped), a map of client
//!   address to a named counter per client (both directions), and MSS
//!   clamping of SYNs;
//! * **no policy** (the floor): nothing on top.
//!
//! Reported: softirq CPU time per forwarded packet (from /proc/stat, of
//! the CPU the sender is pinned to, where a veth path does all its
//! forwarding: pps alone can hide the gateway's cost when the sender is
//! the bottleneck) and packets per second received by the sink.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use nexd_testkit::{Netns, netns::veth, topology::nft_script};

use super::{Plan, Row};

const DST: &str = "203.0.113.10";
const DENIED: usize = 100;
/// Client addresses the sender uses (spread over the client table).
const SENDERS: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Floor,
    Nft,
    Nexd,
}

/// The synthetic exit node the `exit_datapath` example installs, as it
/// prints it (`--print-setup`): the nftables variant gets exactly the
/// same denied prefixes and clients.
struct Setup {
    /// Denied prefixes and their reasons (longest match wins).
    denied: Vec<(IpNet, String)>,
    /// Each client's addresses (IPv4 and IPv6).
    clients: Vec<Vec<IpAddr>>,
}

fn setup(bin: &PathBuf, clients: usize) -> anyhow::Result<Setup> {
    let out = Command::new(bin)
        .args(["--print-setup", "--clients", &clients.to_string()])
        .args(["--denied", &DENIED.to_string()])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "exit_datapath --print-setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let denied = v["denied"]
        .as_array()
        .context("no denied prefixes")?
        .iter()
        .map(|e| -> anyhow::Result<(IpNet, String)> {
            let net = e[0].as_str().context("prefix")?.parse()?;
            Ok((net, e[1].as_str().context("reason")?.to_owned()))
        })
        .collect::<anyhow::Result<_>>()?;
    let clients = v["clients"]
        .as_array()
        .context("no clients")?
        .iter()
        .map(|c| -> anyhow::Result<Vec<IpAddr>> {
            c.as_array()
                .context("addresses")?
                .iter()
                .map(|a| Ok(a.as_str().context("address")?.parse()?))
                .collect()
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Setup { denied, clients })
}

/// An address as a number, and the family's width in bits.
fn num(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn addr(v6: bool, n: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(n))
    } else {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    }
}

/// Longest-prefix-match prefixes as disjoint ranges, each with the reason
/// of the longest prefix covering it, adjacent equal reasons merged:
/// nftables interval maps refuse overlapping elements, so this is how the
/// same policy is written there.
fn flatten(prefixes: &[(IpNet, String)], v6: bool) -> Vec<(u128, u128, String)> {
    let nets: Vec<(u128, u128, u8, &str)> = prefixes
        .iter()
        .filter(|(n, _)| n.addr().is_ipv6() == v6)
        .map(|(n, r)| {
            (
                num(n.network()),
                num(n.broadcast()),
                n.prefix_len(),
                r.as_str(),
            )
        })
        .collect();
    let mut starts: Vec<u128> = nets
        .iter()
        .flat_map(|(lo, hi, _, _)| [Some(*lo), hi.checked_add(1)])
        .flatten()
        .collect();
    starts.sort_unstable();
    starts.dedup();
    let mut out: Vec<(u128, u128, String)> = Vec::new();
    for (i, s) in starts.iter().enumerate() {
        // The last start runs to the end of the address space: only a
        // prefix reaching the very last address (no end boundary) can
        // cover it.
        let end = starts.get(i + 1).map_or(u128::MAX, |next| next - 1);
        let best = nets
            .iter()
            .filter(|(lo, hi, _, _)| lo <= s && *s <= *hi)
            .max_by_key(|(_, _, len, _)| *len);
        if let Some((_, _, _, reason)) = best {
            match out.last_mut() {
                Some(last) if last.2 == *reason && last.1.checked_add(1) == Some(*s) => {
                    last.1 = end
                }
                _ => out.push((*s, end, (*reason).to_owned())),
            }
        }
    }
    out
}

/// The nftables expression of the exit policy and per-client counters.
fn nft_policy(setup: &Setup) -> String {
    let mut s = String::from("table inet exitpol {\n");
    let mut reasons: Vec<&str> = setup.denied.iter().map(|(_, r)| r.as_str()).collect();
    reasons.sort_unstable();
    reasons.dedup();
    for r in &reasons {
        s.push_str(&format!(" counter d_{r} {{ }}\n"));
    }
    s.push_str(" counter unauthorized { }\n");
    for i in 0..setup.clients.len() {
        s.push_str(&format!(" counter c{i} {{ }}\n"));
    }
    for (fam, v6) in [("ipv4_addr", false), ("ipv6_addr", true)] {
        let tag = if v6 { "6" } else { "4" };
        let mut members = Vec::new();
        let mut counters = Vec::new();
        for (i, c) in setup.clients.iter().enumerate() {
            for a in c.iter().filter(|a| a.is_ipv6() == v6) {
                members.push(a.to_string());
                counters.push(format!("{a} : \"c{i}\""));
            }
        }
        if !members.is_empty() {
            s.push_str(&format!(
                " set clients{tag} {{ type {fam}; elements = {{ {} }} }}\n",
                members.join(", ")
            ));
            s.push_str(&format!(
                " map cnt{tag} {{ type {fam} : counter; elements = {{ {} }} }}\n",
                counters.join(", ")
            ));
        }
        let ranges: Vec<String> = flatten(&setup.denied, v6)
            .iter()
            .map(|(lo, hi, r)| {
                let range = if lo == hi {
                    addr(v6, *lo).to_string()
                } else {
                    format!("{}-{}", addr(v6, *lo), addr(v6, *hi))
                };
                format!("{range} : \"d_{r}\"")
            })
            .collect();
        if !ranges.is_empty() {
            s.push_str(&format!(
                " map deny{tag} {{ type {fam} : counter; flags interval; elements = {{ {} }} }}\n",
                ranges.join(", ")
            ));
        }
    }
    // The forward chain never sees traffic to the exit node's own mesh
    // address (that is local delivery): no local entry is needed here.
    s.push_str(
        " chain exit_policy {\n  type filter hook forward priority filter - 1; policy accept;\n\
         \x20 iifname \"wg0\" ip saddr != @clients4 counter name \"unauthorized\" drop\n\
         \x20 iifname \"wg0\" ip6 saddr != @clients6 counter name \"unauthorized\" drop\n\
         \x20 iifname \"wg0\" counter name ip daddr map @deny4 drop\n\
         \x20 iifname \"wg0\" counter name ip6 daddr map @deny6 drop\n\
         \x20 tcp flags syn / syn,rst tcp option maxseg size set 1380\n\
         \x20 iifname \"wg0\" counter name ip saddr map @cnt4 accept\n\
         \x20 iifname \"wg0\" counter name ip6 saddr map @cnt6 accept\n\
         \x20 oifname \"wg0\" ct state established,related counter name ip daddr map @cnt4 accept\n\
         \x20 oifname \"wg0\" ct state established,related counter name ip6 daddr map @cnt6 accept\n\
         \x20}\n}\n",
    );
    s
}

/// The exit node's own table, in every variant: masquerade out of the
/// uplink; towards wg0 only replies.
const EXIT_TABLE: &str = "table inet nexd {\n\
 chain forward { type filter hook forward priority filter; policy accept;\n\
  oifname \"wg0\" ct state established,related accept\n\
  oifname \"wg0\" drop\n\
  iifname \"wg0\" accept\n }\n\
 chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n\
  oifname \"up0\" ip saddr 100.64.0.0/10 masquerade\n }\n}\n";

struct Bed {
    clients: Netns,
    exit: Netns,
    sink: Netns,
}

fn mac_of(ns: &Netns, dev: &str) -> anyhow::Result<String> {
    let out = ns.ip(&format!("-j link show {dev}"))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["address"]
        .as_str()
        .map(str::to_owned)
        .context("no MAC address")
}

fn bed(senders: &[Ipv4Addr]) -> anyhow::Result<Bed> {
    let clients = Netns::new("xcli")?;
    let exit = Netns::new("xexit")?;
    let sink = Netns::new("xsink")?;
    veth(&clients, "eth0", &exit, "wg0")?;
    veth(&exit, "up0", &sink, "eth0")?;
    for a in senders {
        clients.ip(&format!("addr add {a}/32 dev eth0"))?;
    }
    clients.ip("route add 100.64.0.1/32 dev eth0")?;
    clients.ip("route add default via 100.64.0.1 dev eth0 onlink")?;
    exit.ip("addr add 100.64.0.1/10 dev wg0")?;
    exit.ip("addr add 192.0.2.1/24 dev up0")?;
    exit.ip("route add default via 192.0.2.254")?;
    exit.sysctl("net.ipv4.ip_forward", "1")?;
    sink.ip("addr add 192.0.2.254/24 dev eth0")?;
    // Static neighbours: no ARP during the measurement.
    let exit_wg = mac_of(&exit, "wg0")?;
    clients.ip(&format!(
        "neigh replace 100.64.0.1 lladdr {exit_wg} dev eth0 nud permanent"
    ))?;
    let sink_mac = mac_of(&sink, "eth0")?;
    exit.ip(&format!(
        "neigh replace 192.0.2.254 lladdr {sink_mac} dev up0 nud permanent"
    ))?;
    let cli_mac = mac_of(&clients, "eth0")?;
    for a in senders {
        exit.ip(&format!(
            "neigh replace {a} lladdr {cli_mac} dev wg0 nud permanent"
        ))?;
    }
    nft_script(
        &sink,
        "table inet sink {\n chain input { type filter hook prerouting priority raw; policy drop; }\n}\n",
    )?;
    nft_script(&exit, EXIT_TABLE)?;
    Ok(Bed {
        clients,
        exit,
        sink,
    })
}

/// The `exit_datapath` example, attached in the exit namespace until its
/// stdin closes.
struct Attached {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Kept open: it prints the counters when it stops.
    stdout: BufReader<ChildStdout>,
}

impl Attached {
    fn start(bin: &PathBuf, ns: &Netns, clients: usize) -> anyhow::Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(bin)
            .args(["--iface", "wg0", "--clients", &clients.to_string()])
            .args(["--denied", &DENIED.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("exit_datapath did not get ready: {line:?}");
        }
        Ok(Attached {
            child,
            stdin,
            stdout,
        })
    }

    /// Detaches and returns what the programs counted.
    fn finish(mut self) -> anyhow::Result<serde_json::Value> {
        drop(self.stdin.take());
        let mut out = String::new();
        self.stdout.read_line(&mut out)?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("exit_datapath failed: {status}");
        }
        Ok(serde_json::from_str(out.trim())?)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            drop(self.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rx_packets(ns: &Netns, dev: &str) -> anyhow::Result<u64> {
    let out = ns.ip(&format!("-j -s link show {dev}"))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx counter")
}

/// The CPU the sender is pinned to: a veth hands packets to the
/// receiving side on the sending CPU, so the whole forwarding path runs
/// there, in softirq, and other CPUs' noise stays out of the figure.
fn bench_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

/// Softirq time of `cpu`, in seconds (USER_HZ ticks in /proc/stat).
fn softirq_seconds(cpu: usize) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let name = format!("cpu{cpu}");
    stat.lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .and_then(|l| l.split_whitespace().nth(7))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|t| t / 100.0)
        .with_context(|| format!("no softirq time for {name} in /proc/stat"))
}

/// Sends 64-byte UDP datagrams to `dst` from each of `srcs` in turn, in
/// sendmmsg batches, for `secs`.
fn blast(ns: &Netns, srcs: Vec<Ipv4Addr>, dst: SocketAddr, secs: f64) -> anyhow::Result<u64> {
    ns.run_in(move || -> anyhow::Result<u64> {
        let mut set = nix::sched::CpuSet::new();
        set.set(bench_cpu())?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
        let socks: Vec<UdpSocket> = srcs
            .iter()
            .map(|s| -> anyhow::Result<UdpSocket> {
                let sock = UdpSocket::bind((*s, 0))?;
                sock.connect(dst)?;
                Ok(sock)
            })
            .collect::<anyhow::Result<_>>()?;
        const BATCH: usize = 64;
        let payload = [0x5au8; 64];
        let mut iov: Vec<libc::iovec> = (0..BATCH)
            .map(|_| libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; zero is a valid empty header.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut sent = 0u64;
        let mut i = 0;
        while Instant::now() < end {
            let fd = socks[i % socks.len()].as_raw_fd();
            i += 1;
            // SAFETY: msgs points at BATCH valid headers whose iovecs point
            // at `payload`, alive for the call.
            let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent += n as u64;
            }
        }
        Ok(sent)
    })
}

/// One measurement: (received pps, softirq ns per received packet).
fn measure(
    variant: Variant,
    setup: &Setup,
    bin: &PathBuf,
    secs: f64,
) -> anyhow::Result<(f64, f64)> {
    let clients = setup.clients.len();
    let k = SENDERS.min(clients);
    let senders: Vec<Ipv4Addr> = (0..k)
        .filter_map(|i| {
            setup.clients[i * clients / k].iter().find_map(|a| match a {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
        })
        .collect();
    let bed = bed(&senders)?;
    let attached = match variant {
        Variant::Floor => None,
        Variant::Nft => {
            nft_script(&bed.exit, &nft_policy(setup))?;
            None
        }
        Variant::Nexd => Some(Attached::start(bin, &bed.exit, clients)?),
    };
    let dst = SocketAddr::new(DST.parse::<Ipv4Addr>()?.into(), 9);
    // Warm-up: caches, conntrack entries, the programs' first lookups.
    blast(&bed.clients, senders.clone(), dst, 0.2)?;
    let rx0 = rx_packets(&bed.sink, "eth0")?;
    let cpu0 = softirq_seconds(bench_cpu())?;
    let start = Instant::now();
    blast(&bed.clients, senders, dst, secs)?;
    std::thread::sleep(Duration::from_millis(50));
    let elapsed = start.elapsed().as_secs_f64();
    let rx = rx_packets(&bed.sink, "eth0")? - rx0;
    let cpu = softirq_seconds(bench_cpu())? - cpu0;
    // Each policy must have seen (and counted per client) what arrived.
    let counted = match attached {
        Some(a) => {
            let c = a.finish()?;
            c["rx_packets"].as_u64().context("no rx_packets")?
        }
        None if variant == Variant::Nft => nft_client_packets(&bed.exit)?,
        None => rx,
    };
    if counted < rx {
        bail!(
            "{variant:?}: the policy counted {counted} packets per client, the sink received {rx}"
        );
    }
    if rx == 0 {
        bail!("{variant:?}: nothing reached the sink");
    }
    let _ = &bed.exit;
    Ok((rx as f64 / elapsed, cpu * 1e9 / rx as f64))
}

/// Packets counted by the nftables variant's per-client counters.
fn nft_client_packets(ns: &Netns) -> anyhow::Result<u64> {
    let out = ns.exec(&["nft", "-j", "list", "counters", "table", "inet", "exitpol"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["nftables"]
        .as_array()
        .context("no nftables listing")?
        .iter()
        .filter(|e| {
            e["counter"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with('c') && n[1..].chars().all(|c| c.is_ascii_digit()))
        })
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .sum())
}

/// Builds the `exit_datapath` example (release unless quick) and returns
/// its path.
fn build_example(release: bool) -> anyhow::Result<PathBuf> {
    let mut c = crate::workspace::cargo_command();
    c.args([
        "build",
        "--package",
        "nexd-agent",
        "--example",
        "exit_datapath",
    ]);
    if release {
        c.arg("--release");
    }
    if !c.status()?.success() {
        bail!("building the exit_datapath example failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace::root().join("target"));
    let path = target
        .join(if release { "release" } else { "debug" })
        .join("examples/exit_datapath");
    if !path.exists() {
        bail!("{} not found after building it", path.display());
    }
    Ok(path)
}

pub fn run(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    let bin = build_example(!plan.quick)?;
    let sizes: &[usize] = if plan.quick {
        &[10]
    } else {
        &[10, 1_000, 10_000]
    };
    let secs = if plan.quick { 0.3 } else { 3.0 };
    let mut rows = Vec::new();
    for &n in sizes {
        let setup = setup(&bin, n)?;
        let mut r: std::collections::BTreeMap<&str, (Vec<f64>, Vec<f64>)> = Default::default();
        for _ in 0..plan.rounds() {
            for (name, v) in [
                ("nexd", Variant::Nexd),
                ("nft", Variant::Nft),
                ("floor", Variant::Floor),
            ] {
                let (pps, ns) = measure(v, &setup, &bin, secs)?;
                let e = r.entry(name).or_default();
                e.0.push(pps);
                e.1.push(ns);
            }
        }
        let get = |k: &str| r.get(k).cloned().unwrap_or_default();
        let (nexd, nft, floor) = (get("nexd"), get("nft"), get("floor"));
        let case = |what: &str| format!("{what}, {n} clients, {DENIED} denied");
        rows.push(Row::new(
            "exit",
            &case("softirq/pkt"),
            "ns",
            "nftables policy",
            &nft.1,
            &nexd.1,
            false,
        ));
        rows.push(Row::new(
            "exit",
            &case("softirq/pkt"),
            "ns",
            "no policy",
            &floor.1,
            &nexd.1,
            false,
        ));
        rows.push(Row::new(
            "exit",
            &case("pps"),
            "pps",
            "nftables policy",
            &nft.0,
            &nexd.0,
            true,
        ));
    }
    let _ = std::io::stdout().flush();
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(list: &[(&str, &str)]) -> Vec<(IpNet, String)> {
        list.iter()
            .map(|(n, r)| (n.parse().expect("net"), (*r).to_owned()))
            .collect()
    }

    #[test]
    fn nested_prefixes_flatten_to_disjoint_ranges_with_the_longest_reason() {
        let d = denied(&[
            ("10.0.0.0/8", "private"),
            ("10.20.1.0/24", "connected"),
            ("10.20.1.5/32", "host_address"),
            ("11.0.0.0/8", "private"),
        ]);
        let f = flatten(&d, false);
        let show: Vec<(String, String, &str)> = f
            .iter()
            .map(|(lo, hi, r)| {
                (
                    addr(false, *lo).to_string(),
                    addr(false, *hi).to_string(),
                    r.as_str(),
                )
            })
            .collect();
        assert_eq!(
            show,
            vec![
                ("10.0.0.0".into(), "10.20.0.255".into(), "private"),
                ("10.20.1.0".into(), "10.20.1.4".into(), "connected"),
                ("10.20.1.5".into(), "10.20.1.5".into(), "host_address"),
                ("10.20.1.6".into(), "10.20.1.255".into(), "connected"),
                ("10.20.2.0".into(), "11.255.255.255".into(), "private"),
            ]
        );
        let f6 = flatten(&denied(&[("ff00::/8", "multicast")]), true);
        assert_eq!(f6, vec![(0xff00u128 << 112, u128::MAX, "multicast".into())]);
    }

    #[test]
    fn the_nft_policy_has_every_client_and_range() {
        let setup = Setup {
            denied: denied(&[
                ("169.254.0.0/16", "link_local"),
                ("169.254.169.254/32", "metadata"),
            ]),
            clients: vec![
                vec![
                    "100.64.1.0".parse().expect("ip"),
                    "fd6e::1".parse().expect("ip"),
                ],
                vec!["100.64.1.1".parse().expect("ip")],
            ],
        };
        let s = nft_policy(&setup);
        assert!(s.contains("counter c1 { }"), "{s}");
        assert!(s.contains("100.64.1.1 : \"c1\""), "{s}");
        assert!(s.contains("fd6e::1 : \"c0\""), "{s}");
        assert!(s.contains("169.254.169.254 : \"d_metadata\""), "{s}");
        assert!(
            s.contains("169.254.169.255-169.254.255.255 : \"d_link_local\""),
            "{s}"
        );
    }
}
