//! End-to-end: what an operator scrapes and reads. The Prometheus endpoint
//! serves the data path counters, per-peer bytes and handshake age, the
//! active exit node and the failover count; nexctl's YAML output is the
//! same document as its JSON.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use anyhow::Context as _;
use nexd_testkit::{Netns, NodeSpec, proto::ClientPhase, traffic::tcp_transfer, world::World};

fn scrape(ns: &Netns, path: &str) -> anyhow::Result<(String, String)> {
    let path = path.to_owned();
    ns.run_in(move || -> anyhow::Result<(String, String)> {
        let mut s = TcpStream::connect_timeout(&"127.0.0.1:9599".parse()?, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp.split_once("\r\n\r\n").context("no HTTP body")?;
        Ok((
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        ))
    })
}

/// The value of the first series whose line starts with `prefix`.
fn value(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_endpoint_and_yaml_output() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let mut w = World::new(&["exit1", "client"])?;
    w.node_mut("exit1").start(&NodeSpec {
        args: vec!["router".into(), "--exit-node".into()],
        ..NodeSpec::default()
    })?;
    w.node_mut("client").start(&NodeSpec {
        args: vec![
            "--exit-node-client".into(),
            "--metrics-listen".into(),
            "127.0.0.1:9599".into(),
        ],
        ..NodeSpec::default()
    })?;
    w.node("client")
        .wait_phase(ClientPhase::Active, Duration::from_secs(20))?;
    tcp_transfer(
        &w.node("client").ns,
        &w.inet.ns,
        World::server(false),
        64 * 1024,
        Duration::from_secs(10),
    )?;

    let ns = &w.node("client").ns;
    let (status, body) = scrape(ns, "/metrics")?;
    assert!(status.contains("200"), "{status}");
    assert_eq!(
        value(&body, "nexd_build_info{version=\""),
        Some(1.0),
        "{body}"
    );
    assert!(
        value(&body, "nexd_datapath_packets_total{verdict=\"tunnel_tx\"}").is_some_and(|v| v > 0.0),
        "{body}"
    );
    assert!(
        value(&body, "nexd_peer_sent_bytes_total{peer=\"exit1\"}")
            .is_some_and(|v| v > 64.0 * 1024.0),
        "{body}"
    );
    assert!(
        value(&body, "nexd_peer_handshake_age_seconds{peer=\"exit1\"}").is_some_and(|v| v < 180.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "nexd_peer_healthy{peer=\"exit1\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "nexd_exit_node_active{exit_node=\"exit1\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "nexd_exit_node_available{exit_node=\"exit1\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "nexd_exit_node_client_phase{phase=\"active\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "nexd_exit_node_failovers_total"),
        Some(0.0),
        "{body}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    // nexctl shows the same text.
    let out = w.node("client").nexctl(&["nexd", "metrics"])?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("nexd_exit_node_active"));
    let (status, _) = scrape(ns, "/other")?;
    assert!(status.contains("404"), "{status}");

    // YAML carries the same fields as JSON.
    let json = w.node("client").exit_nodes()?;
    let yaml = w
        .node("client")
        .nexctl(&["--output", "yaml", "nexd", "exit-node", "list"])?;
    let yaml = String::from_utf8_lossy(&yaml.stdout);
    assert!(yaml.starts_with("- active: true\n"), "{yaml}");
    assert!(
        yaml.contains(&format!("  public_key: {:?}\n", json[0].public_key)),
        "{yaml}"
    );
    Ok(())
}
