//! End-to-end: the alerting rules and the dashboard nexd ships
//! (dist/prometheus/nexd-alerts.yml, dist/grafana/nexd-dashboard.json),
//! against a real Prometheus (Debian's, installed by `cargo xtask setup`
//! without starting its service) scraping a real nexd.
//!
//! Proves: `promtool check rules` accepts the rules; every metric the
//! rules and the dashboard query is one nexd exports; with the exit node
//! killed, the client holds its traffic and NexdTrafficHeld and
//! NexdExitNodeUnavailable fire (the rules' `for:` durations shortened to
//! a second, nothing else changed), and none of them fires before.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use nexd_testkit::{Netns, NodeSpec, proto::ClientPhase, wait_for, world::World};

const T: Duration = Duration::from_secs(20);
const METRICS: &str = "127.0.0.1:9599";
const PROMETHEUS: &str = "127.0.0.1:9590";

fn dist(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .join(file)
}

/// Debian's prometheus and promtool, on PATH. Missing is a failure.
fn tool(name: &str) -> anyhow::Result<PathBuf> {
    which(name).with_context(|| {
        format!(
            "{name} not found on PATH: `cargo xtask setup --for tests` installs Debian's prometheus"
        )
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Prometheus in `ns` while it lives.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A GET in `ns`; the body.
fn get(ns: &Netns, addr: &'static str, path: &str) -> anyhow::Result<String> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    ns.run_in(move || {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .context("no HTTP body")?;
        Ok(body)
    })
}

/// The names of the alerts firing now.
fn firing(ns: &Netns) -> anyhow::Result<Vec<String>> {
    let body = get(ns, PROMETHEUS, "/api/v1/alerts")?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v["data"]["alerts"]
        .as_array()
        .context("no alerts array")?
        .iter()
        .filter(|a| a["state"] == "firing")
        .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_owned))
        .collect())
}

/// The metric names in a PromQL expression that start with `nexd_`.
fn nexd_metrics(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("nexd_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

#[test]
fn the_shipped_alerts_fire_when_an_exit_node_fails() -> anyhow::Result<()> {
    if !nexd_testkit::privileged()? {
        return Ok(());
    }
    let (prometheus, promtool) = (tool("prometheus")?, tool("promtool")?);
    let rules = dist("prometheus/nexd-alerts.yml");
    let check = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()?;
    assert!(check.status.success(), "promtool: {check:?}");

    let mut w = World::new(&["exit1", "client"])?;
    w.node_mut("exit1").start(&NodeSpec {
        args: vec!["router".into(), "--exit-node".into()],
        ..NodeSpec::default()
    })?;
    w.node_mut("client").start(&NodeSpec {
        args: vec![
            "--exit-node-client".into(),
            "--metrics-listen".into(),
            METRICS.into(),
        ],
        ..NodeSpec::default()
    })?;
    w.node("client").wait_phase(ClientPhase::Active, T)?;
    let ns = Netns::attach(w.node("client").ns.name())?;

    // Every metric the rules and the dashboard use is one nexd exports
    // (the exit node's own families appear only on an exit node).
    let scrape = get(&ns, METRICS, "/metrics")?;
    let exit_scrape = { w.node("exit1").nexctl(&["nexd", "metrics"])?.stdout };
    let exported = format!("{scrape}\n{}", String::from_utf8_lossy(&exit_scrape));
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dist(
        "grafana/nexd-dashboard.json",
    ))?)?;
    let mut exprs: Vec<String> = std::fs::read_to_string(&rules)?
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:").map(str::to_owned))
        .collect();
    for p in dashboard["panels"].as_array().context("panels")? {
        for t in p["targets"].as_array().context("targets")? {
            exprs.push(t["expr"].as_str().context("expr")?.to_owned());
        }
    }
    let optional = [
        "nexd_registry_",
        "nexd_exit_dns_",
        "nexd_exit_client_denied",
    ];
    for e in &exprs {
        for m in nexd_metrics(e) {
            let known =
                exported.contains(&format!("\n{m}")) || exported.contains(&format!("# TYPE {m}"));
            let absent_until_used = optional.iter().any(|o| m.starts_with(o));
            assert!(
                known || absent_until_used,
                "{m} (in `{e}`) is not a metric nexd exports"
            );
        }
    }

    // Prometheus next to the client, the rules as shipped but for `for:`.
    let dir = w.node("client").dir().join("prometheus");
    std::fs::create_dir_all(dir.join("data"))?;
    let fast = std::fs::read_to_string(&rules)?
        .lines()
        .map(|l| match l.trim().strip_prefix("for:") {
            Some(_) => format!("{}for: 1s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("rules.yml"), fast)?;
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             rule_files: [ {rules:?} ]\n\
             scrape_configs:\n  - job_name: nexd\n    static_configs: [ {{ targets: ['{METRICS}'] }} ]\n",
            rules = dir.join("rules.yml"),
        ),
    )?;
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let _prom = Prometheus(
        Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(&prometheus)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus")?,
    );
    let prom_log = || std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    wait_for(
        "Prometheus to scrape nexd",
        T,
        Duration::from_millis(200),
        || {
            let body = get(&ns, PROMETHEUS, "/api/v1/query?query=up").ok()?;
            body.contains("\"value\"").then_some(())
        },
    )
    .with_context(prom_log)?;
    // Healthy: nothing of nexd's fires (the exit node is up, the client active).
    std::thread::sleep(Duration::from_secs(3));
    let before = firing(&ns)?;
    assert!(before.is_empty(), "firing while healthy: {before:?}");

    // The exit node dies: the client holds its traffic back.
    w.node_mut("exit1").kill()?;
    w.node("client").wait_phase(ClientPhase::Held, T)?;
    let fired = wait_for("the alerts to fire", T, Duration::from_millis(500), || {
        let f = firing(&ns).ok()?;
        (f.iter().any(|a| a == "NexdTrafficHeld")
            && f.iter().any(|a| a == "NexdExitNodeUnavailable"))
        .then_some(f)
    })
    .with_context(prom_log)?;
    println!("firing after the exit node died: {fired:?}");
    if fired.iter().any(|a| a == "NexdDown") {
        bail!("nexd reported down while it ran: {fired:?}");
    }
    Ok(())
}
