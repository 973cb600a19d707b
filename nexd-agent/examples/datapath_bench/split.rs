//! Benchmark 2, split tunnelling at scale: small UDP packets from a LAN host through a
//! gateway namespace, with N excluded prefixes, three ways:
//!
//! * nexd: the steering classifier with the prefixes in its LPM tries;
//! * (a) N `ip rule add to <prefix> lookup main` rules;
//! * (b) an nftables interval set with the prefixes and `meta mark set`.
//!
//! All three share the exit-node client's policy routing (steered traffic
//! to a "tunnel" veth, bypassed traffic to the uplink). The probes go to a
//! destination outside every prefix, the common case and the worst one for
//! a linear rule list. Each configuration is built in fresh namespaces
//! (`ip rule flush` of thousands of rules is slow and unreliable). Reported:
//! packets per second received behind the gateway, and softirq CPU time
//! per packet (system-wide, from /proc/stat), because on 2 cores the
//! sender can be the bottleneck and hide differences in pps.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use nexd::datapath::{BypassSet, Datapath};
use nexd_common::config::{DatapathConfig, FLAG_STEER};
use nexd_testkit::{Netns, netns::veth, topology::nft_script};

use super::{Plan, Samples, classifier::prefixes};

const MARK: u32 = 0x6e78;
const TABLE: u32 = 28280;
const DST: &str = "203.0.113.10";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Nexd,
    IpRules,
    NftSet,
}

struct Bed {
    sender: Netns,
    gw: Netns,
    _up: Netns,
    tun: Netns,
}

fn bed() -> anyhow::Result<Bed> {
    let sender = Netns::new("bsend")?;
    let gw = Netns::new("bgw")?;
    let up = Netns::new("bup")?;
    let tun = Netns::new("btun")?;
    veth(&sender, "eth0", &gw, "lan0")?;
    veth(&gw, "up0", &up, "eth0")?;
    veth(&gw, "tun0", &tun, "eth0")?;
    sender.ip("addr add 10.99.0.2/24 dev eth0")?;
    sender.ip("route add default via 10.99.0.1")?;
    gw.ip("addr add 10.99.0.1/24 dev lan0")?;
    gw.ip("addr add 192.0.2.1/24 dev up0")?;
    gw.ip("addr add 100.64.0.1/24 dev tun0")?;
    gw.ip("route add default via 192.0.2.254")?;
    gw.ip(&format!("route add default via 100.64.0.254 table {TABLE}"))?;
    gw.ip("rule add priority 28278 lookup main suppress_prefixlength 0")?;
    gw.ip(&format!(
        "rule add priority 28279 not fwmark {MARK:#x} lookup {TABLE}"
    ))?;
    gw.sysctl("net.ipv4.ip_forward", "1")?;
    up.ip("addr add 192.0.2.254/24 dev eth0")?;
    tun.ip("addr add 100.64.0.254/24 dev eth0")?;
    // Static neighbours: no ARP in the measurement.
    for (ns, ip, dev) in [(&gw, "192.0.2.254", "up0"), (&gw, "100.64.0.254", "tun0")] {
        let mac = mac_of(if dev == "up0" { &up } else { &tun }, "eth0")?;
        ns.ip(&format!(
            "neigh replace {ip} lladdr {mac} dev {dev} nud permanent"
        ))?;
    }
    let gw_mac = mac_of(&gw, "lan0")?;
    sender.ip(&format!(
        "neigh replace 10.99.0.1 lladdr {gw_mac} dev eth0 nud permanent"
    ))?;
    // The sinks drop what they get (no ICMP back), after counting it.
    for ns in [&up, &tun] {
        nft_script(
            ns,
            "table inet sink {\n chain input { type filter hook prerouting priority raw; policy drop; }\n}\n",
        )?;
    }
    Ok(Bed {
        sender,
        gw,
        _up: up,
        tun,
    })
}

fn mac_of(ns: &Netns, dev: &str) -> anyhow::Result<String> {
    let out = ns.ip(&format!("-j link show {dev}"))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["address"]
        .as_str()
        .map(str::to_owned)
        .context("no MAC address")
}

/// Packets received on `dev` in `ns`.
fn rx_packets(ns: &Netns, dev: &str) -> anyhow::Result<u64> {
    let out = ns.ip(&format!("-j -s link show {dev}"))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx counter")
}

/// Total softirq time of all CPUs, in seconds.
fn softirq_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let hz = 100.0; // USER_HZ
    stat.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(7))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |t| t / hz)
}

/// Sends 64-byte UDP datagrams to `dst` as fast as it can for `secs`,
/// with sendmmsg batches, from inside `ns`.
fn blast(ns: &Netns, dst: SocketAddr, secs: f64) -> anyhow::Result<u64> {
    ns.run_in(move || -> anyhow::Result<u64> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(dst)?;
        let fd = sock.as_raw_fd();
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
        while Instant::now() < end {
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

/// Configures `variant` with `prefixes` on the gateway. For nexd, the
/// returned sender keeps the data path attached until dropped.
fn configure(
    bed: &Bed,
    variant: Variant,
    prefixes: &[IpNet],
) -> anyhow::Result<Option<mpsc::Sender<()>>> {
    match variant {
        Variant::IpRules => {
            for (fam, v6) in [("-4", false), ("-6", true)] {
                let mut batch = String::new();
                for (i, p) in prefixes
                    .iter()
                    .filter(|p| p.addr().is_ipv6() == v6)
                    .enumerate()
                {
                    batch.push_str(&format!(
                        "rule add priority {} to {p} lookup main\n",
                        1000 + i % 20000
                    ));
                }
                if batch.is_empty() {
                    continue;
                }
                let path = std::env::temp_dir()
                    .join(format!("nexd-bench-rules-{}{fam}", std::process::id()));
                std::fs::write(&path, batch)?;
                bed.gw.ip(&format!("{fam} -batch {}", path.display()))?;
                let _ = std::fs::remove_file(&path);
            }
            let v4_rules = bed.gw.ip("-4 rule show")?.lines().count();
            let want_v4 = prefixes.iter().filter(|p| p.addr().is_ipv4()).count();
            if v4_rules < want_v4 {
                bail!("only {v4_rules} IPv4 rules installed, wanted {want_v4}");
            }
            Ok(None)
        }
        Variant::NftSet => {
            let v4: Vec<String> = prefixes
                .iter()
                .filter(|p| p.addr().is_ipv4())
                .map(ToString::to_string)
                .collect();
            let v6: Vec<String> = prefixes
                .iter()
                .filter(|p| !p.addr().is_ipv4())
                .map(ToString::to_string)
                .collect();
            let mut script = String::from(
                "table inet excl {\n set v4 { type ipv4_addr; flags interval; auto-merge; }\n set v6 { type ipv6_addr; flags interval; auto-merge; }\n",
            );
            script.push_str(&format!(
                " chain pre {{ type filter hook prerouting priority mangle; policy accept;\n  ip daddr @v4 meta mark set {MARK:#x}\n  ip6 daddr @v6 meta mark set {MARK:#x}\n }}\n}}\n"
            ));
            for (set, list) in [("v4", &v4), ("v6", &v6)] {
                for chunk in list.chunks(5000) {
                    script.push_str(&format!(
                        "add element inet excl {set} {{ {} }}\n",
                        chunk.join(", ")
                    ));
                }
            }
            nft_script(&bed.gw, &script)?;
            Ok(None)
        }
        Variant::Nexd => {
            let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
            let (stop_tx, stop_rx) = mpsc::channel::<()>();
            let prefixes = prefixes.to_vec();
            let handle = bed.gw.spawn_in(move || -> anyhow::Result<()> {
                let setup = || -> anyhow::Result<Datapath> {
                    let mut dp = Datapath::load()?;
                    dp.set_mesh_prefixes(&[
                        "100.64.0.0/10".parse()?,
                        "fd6e:6578:6400::/48".parse()?,
                    ])?;
                    let set: BypassSet = prefixes.iter().map(|p| (*p, 3u8)).collect();
                    dp.sync_bypass(&set)?;
                    dp.set_config(DatapathConfig {
                        flags: FLAG_STEER,
                        fwmark: MARK,
                        ..DatapathConfig::default()
                    })?;
                    dp.attach_steer("lan0", true)?;
                    Ok(dp)
                };
                match setup() {
                    Ok(dp) => {
                        let _ = ready_tx.send(Ok(()));
                        let _ = stop_rx.recv();
                        drop(dp);
                        Ok(())
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        Ok(())
                    }
                }
            })?;
            ready_rx.recv().context("data path thread died")??;
            std::mem::forget(handle);
            Ok(Some(stop_tx))
        }
    }
}

/// One measurement: (received pps, softirq ns per received packet).
fn measure(variant: Variant, prefixes: &[IpNet], secs: f64) -> anyhow::Result<(f64, f64)> {
    let bed = bed()?;
    let keep = configure(&bed, variant, prefixes)?;
    let dst: SocketAddr = SocketAddr::new(DST.parse::<Ipv4Addr>()?.into(), 9);
    // Warm-up: caches, neighbour entries, the classifier's first lookups.
    blast(&bed.sender, dst, 0.2)?;
    let rx0 = rx_packets(&bed.tun, "eth0")?;
    let cpu0 = softirq_seconds();
    let start = Instant::now();
    blast(&bed.sender, dst, secs)?;
    // Let in-flight packets land.
    std::thread::sleep(Duration::from_millis(50));
    let elapsed = start.elapsed().as_secs_f64();
    let rx = rx_packets(&bed.tun, "eth0")? - rx0;
    let cpu = softirq_seconds() - cpu0;
    if let Some(stop) = keep {
        let _ = stop.send(());
    }
    let pps = rx as f64 / elapsed;
    let ns_per_pkt = if rx > 0 {
        cpu * 1e9 / rx as f64
    } else {
        f64::NAN
    };
    Ok((pps, ns_per_pkt))
}

pub fn run(plan: &Plan) -> anyhow::Result<Vec<Samples>> {
    let sizes: &[usize] = if plan.quick {
        &[10]
    } else {
        &[10, 1_000, 10_000]
    };
    let secs = if plan.quick { 0.3 } else { 3.0 };
    let mut rows = Vec::new();
    for &n in sizes {
        let prefixes = prefixes(n);
        let mut r: std::collections::HashMap<&str, (Vec<f64>, Vec<f64>)> = Default::default();
        for _ in 0..plan.rounds() {
            for (name, v) in [
                ("nexd", Variant::Nexd),
                ("rules", Variant::IpRules),
                ("nft", Variant::NftSet),
            ] {
                let (pps, ns) = measure(v, &prefixes, secs)?;
                let e = r.entry(name).or_default();
                e.0.push(pps);
                e.1.push(ns);
            }
        }
        let get = |k: &str| r.get(k).cloned().unwrap_or_default();
        let (nexd, rules, nft) = (get("nexd"), get("rules"), get("nft"));
        rows.push(Samples::new(
            "split",
            &format!("pps, {n} prefixes"),
            "pps",
            &format!("{n} ip rules"),
            &rules.0,
            &nexd.0,
            true,
        ));
        rows.push(Samples::new(
            "split",
            &format!("pps, {n} prefixes"),
            "pps",
            "nft interval set",
            &nft.0,
            &nexd.0,
            true,
        ));
        rows.push(Samples::new(
            "split",
            &format!("softirq/pkt, {n} prefixes"),
            "ns",
            &format!("{n} ip rules"),
            &rules.1,
            &nexd.1,
            false,
        ));
        rows.push(Samples::new(
            "split",
            &format!("softirq/pkt, {n} prefixes"),
            "ns",
            "nft interval set",
            &nft.1,
            &nexd.1,
            false,
        ));
    }
    Ok(rows)
}
