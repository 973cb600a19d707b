//! The exit node's DNS resolver against its upstream, in namespaces
//! (root): the round trip of a query a client sends through the exit
//! node's resolver (answered from its cache) against the same query sent
//! by the exit node straight to the upstream (an in-memory authoritative
//! server: the floor), alternating, after a warm-up; then the queries per
//! second eight clients get through the resolver at once.
//!
//! `cargo bench -p nexd-agent --bench dns_resolver [-- --rounds N]`

#[path = "../tests/support/dns_lab.rs"]
mod dns_lab;

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use dns_lab::*;
use hickory_server::proto::{
    op::{Message, ResponseCode},
    rr::RecordType,
};
use nexd::dns::{DnsConfig, Limits};
use nexd_testkit::{Netns, dns::query};

const QUERIES_PER_ROUND: usize = 2000;
const CLIENTS: usize = 8;
const QUERIES_PER_CLIENT: usize = 1000;

/// Median round trip of `n` sequential queries from `src` in `ns` to
/// `dst:53`, each answer checked.
fn round(ns: &Netns, src: IpAddr, dst: IpAddr, n: usize) -> anyhow::Result<Duration> {
    let q = query("www.nexd.test.", RecordType::A)?;
    ns.run_in(move || -> anyhow::Result<Duration> {
        let s = UdpSocket::bind(SocketAddr::new(src, 0))?;
        s.set_read_timeout(Some(WAIT))?;
        let mut buf = [0u8; 1500];
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            s.send_to(&q, SocketAddr::new(dst, 53))?;
            let (len, _) = s.recv_from(&mut buf)?;
            times.push(t.elapsed());
            let m = Message::from_vec(&buf[..len])?;
            anyhow::ensure!(
                m.metadata.response_code == ResponseCode::NoError && !m.answers.is_empty(),
                "bad answer: {m:?}"
            );
        }
        times.sort();
        Ok(times[n / 2])
    })
}

/// min, median, max.
fn spread(v: &mut [Duration]) -> String {
    v.sort();
    format!(
        "{:>9.1?} {:>9.1?} {:>9.1?}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

fn median(v: &[Duration]) -> f64 {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(5usize)
        .max(1);
    if !nexd_testkit::privileged()? {
        anyhow::bail!("the DNS benchmark needs root (network namespaces)");
    }
    let lab = Lab::new("dnsbench", &["100.64.0.2/10"])?;
    let _upstream = upstream(&lab.inet)?;
    let conf = TempFile::new("bench.conf", &format!("nameserver {UPSTREAM}\n"))?;
    let config = DnsConfig {
        bind: vec!["100.64.0.1".parse()?],
        port: nexd::dns::PORT,
        interface: Some("wg0".into()),
        resolv_conf: conf.0.clone(),
        limits: Limits::default(),
    };
    let resolver = Resolver::start(&lab.exit, config, vec!["100.64.0.2".parse()?])?;
    let client: IpAddr = "100.64.0.2".parse()?;
    let via: IpAddr = "100.64.0.1".parse()?;
    let exit: IpAddr = "192.0.2.1".parse()?;
    let upstream_ip: IpAddr = UPSTREAM.parse()?;

    // Warm-up: fills the resolver's cache, the neighbour tables, the code.
    round(&lab.client, client, via, 200)?;
    round(&lab.exit, exit, upstream_ip, 200)?;
    let (mut nexd, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        nexd.push(round(&lab.client, client, via, QUERIES_PER_ROUND)?);
        floor.push(round(&lab.exit, exit, upstream_ip, QUERIES_PER_ROUND)?);
    }
    let ratio = median(&nexd) / median(&floor);
    println!(
        "DNS round trip: median of {QUERIES_PER_ROUND} queries a round, {rounds} rounds (min median max)"
    );
    println!(
        "  through the exit node's resolver (cached)  {}",
        spread(&mut nexd)
    );
    println!(
        "  exit node straight to the upstream (floor) {}",
        spread(&mut floor)
    );
    println!("  ratio of the medians                       {ratio:.2}");

    let q = query("www.nexd.test.", RecordType::A)?;
    let t = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let q = q.clone();
        clients.push(lab.client.spawn_in(move || -> anyhow::Result<()> {
            let s = UdpSocket::bind(SocketAddr::new(client, 0))?;
            s.set_read_timeout(Some(WAIT))?;
            let mut buf = [0u8; 1500];
            for _ in 0..QUERIES_PER_CLIENT {
                s.send_to(&q, SocketAddr::new(via, 53))?;
                let (len, _) = s.recv_from(&mut buf)?;
                let m = Message::from_vec(&buf[..len])?;
                anyhow::ensure!(
                    m.metadata.response_code == ResponseCode::NoError,
                    "bad answer: {m:?}"
                );
            }
            Ok(())
        })?);
    }
    for c in clients {
        c.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    let elapsed = t.elapsed();
    let total = CLIENTS * QUERIES_PER_CLIENT;
    println!(
        "  {CLIENTS} clients x {QUERIES_PER_CLIENT} queries at once: {total} in {elapsed:.1?}, {:.0} queries/s",
        total as f64 / elapsed.as_secs_f64()
    );
    let c = resolver.counters()?;
    anyhow::ensure!(c.overloaded == 0 && c.timed_out == 0, "{c:?}");
    Ok(())
}
