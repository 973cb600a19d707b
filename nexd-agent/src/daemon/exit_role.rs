//! The exit node role (`nexd router --exit-node`) as the daemon holds it:
//! whether it is configured, the server while this device serves, and the
//! wiring of the probe tasks. Serving follows the membership: `follow` is
//! the one path that starts, updates and stops the server, at start-up
//! and after every membership change alike.

use std::time::Instant;

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry as Metrics,
};
use tokio::sync::mpsc;
use tracing::warn;

use super::{
    exit_load::{self, ForwardMeter, Forwarded},
    exit_probe::Round,
    exit_server::{self, ExitServer, ExitSettings, ProbeWiring},
    host::Host,
};
use crate::{
    keys::PublicKey,
    mesh::Mesh,
    metrics::{Labels, label, outcomes},
    routing::forward::Uplinks,
};

pub struct ExitRole {
    /// `None`: nexd runs without `router --exit-node`.
    settings: Option<ExitSettings>,
    own: PublicKey,
    /// `Some` while this device serves.
    server: Option<ExitServer>,
    /// Where the probe tasks send their rounds.
    probe_rounds: mpsc::Sender<Round>,
    /// Probe tasks started so far: a round of an earlier task is ignored.
    probe_tasks: u64,
    /// `follow` has run once (start-up logs differ from later changes).
    followed: bool,
    /// Forwarded bits per second, for the load this exit node announces.
    meter: ForwardMeter,
}

impl ExitRole {
    pub fn new(
        settings: Option<ExitSettings>,
        own: PublicKey,
        probes: mpsc::Sender<Round>,
    ) -> Self {
        ExitRole {
            settings,
            own,
            server: None,
            probe_rounds: probes,
            probe_tasks: 0,
            followed: false,
            meter: ForwardMeter::default(),
        }
    }

    /// Whether this device serves as exit node now.
    pub fn serving(&self) -> bool {
        self.server.is_some()
    }

    /// Serving follows `mesh`: the server starts when the membership lets
    /// this device serve, takes in the new clients, limits and table while
    /// it may, and stops (and stops announcing itself) at once when it no
    /// longer may. A failure to start is returned (fatal at start-up; the
    /// caller logs it later); updates log their own problems.
    pub async fn follow(&mut self, host: &mut Host, mesh: &Mesh) -> anyhow::Result<()> {
        let Some(settings) = &self.settings else {
            return Ok(());
        };
        let first = !self.followed;
        self.followed = true;
        match (
            self.server.as_mut(),
            exit_server::not_allowed(mesh, &self.own),
        ) {
            (Some(server), None) => server.reload(host, mesh).await,
            (Some(_), Some(why)) => {
                warn!("{why}: no longer serving as exit node");
                self.remove(host).await;
            }
            (None, None) => {
                let settings = settings.clone();
                self.probe_tasks += 1;
                let probe = ProbeWiring {
                    results: self.probe_rounds.clone(),
                    id: self.probe_tasks,
                };
                self.server =
                    Some(ExitServer::start(host, settings, mesh, &self.own, probe).await?);
            }
            // Serving starts when an update lets this device serve.
            (None, Some(why)) if first => {
                warn!("{why}: not serving as exit node until the membership allows it");
            }
            (None, Some(_)) => {}
        }
        Ok(())
    }

    /// The host's links, addresses or routes changed; returns whether the
    /// exit capability was just withdrawn (peers are told at once).
    pub async fn on_host_changed(&mut self, host: &mut Host, mesh: &Mesh) -> bool {
        match &mut self.server {
            Some(server) => server.refresh_host(host, mesh).await,
            None => false,
        }
    }

    /// A round of the probe task; returns whether the exit capability was
    /// just withdrawn.
    pub fn on_probe_round(&mut self, round: Round) -> bool {
        self.server
            .as_mut()
            .is_some_and(|s| s.on_probe_round(round))
    }

    /// Whether this device tells its peers it serves as exit node now.
    pub fn announces(&self, now: Instant) -> bool {
        self.server.as_ref().is_some_and(|s| s.announces(now))
    }

    /// Why this exit node does not announce itself now, while serving.
    pub fn withdrawn(&self, now: Instant) -> Option<String> {
        self.server.as_ref().and_then(|s| s.withdrawn(now))
    }

    /// Each served client's row for `exit-node clients` and the metrics:
    /// the data path's counters, with what the nftables table refused of
    /// it (its flow limits) among its denied packets.
    pub fn client_rows(
        &self,
        host: &Host,
    ) -> Result<Vec<crate::datapath::exit::ExitClientRow>, String> {
        let mut rows = host.programs.exit_clients()?;
        let Some(server) = &self.server else {
            return Ok(rows);
        };
        match server.flow_refusals() {
            Ok(refused) => {
                for row in &mut rows {
                    for (reason, n) in refused.get(&row.client).into_iter().flatten() {
                        *row.denied.entry(reason.clone()).or_default() += n;
                        row.denied_total += n;
                    }
                }
            }
            // The data path's part is still right; the log says why the
            // rest is missing.
            Err(e) => tracing::debug!(error = %e, "the exit table's per-client counters not read"),
        }
        Ok(rows)
    }

    /// The load to announce, while serving (issue 23): forwarded bits per
    /// second from the data path's per-client counters, `clients` (the
    /// peers that say they use this exit node), the uplink's link speed
    /// lowered to this device's `exit_capacity` in the mesh file. Counters
    /// that cannot be read count as nothing forwarded (logged at debug).
    pub fn load_report(
        &mut self,
        host: &Host,
        mesh: &Mesh,
        clients: usize,
        now: Instant,
    ) -> Option<crate::announce::wire::LoadReport> {
        let server = self.server.as_ref()?;
        let totals = match host.programs.exit_clients() {
            Ok(rows) => rows.iter().fold(Forwarded::default(), |t, r| Forwarded {
                from_clients: t.from_clients + r.rx_bytes,
                to_clients: t.to_clients + r.tx_bytes,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "exit clients' counters not read for the load");
                Forwarded::default()
            }
        };
        let bps = self.meter.sample(totals, now);
        let uplinks = server.uplinks();
        let link = uplinks
            .v4
            .as_deref()
            .or(uplinks.v6.as_deref())
            .map_or(0, link_bits_per_second);
        let capacity = mesh
            .device(&self.own)
            .and_then(|d| d.exit_capacity)
            .map(crate::mesh::Rate::bits_per_second);
        Some(exit_load::report(bps, clients, link, capacity, None))
    }

    /// The exit node's connection tracking, while serving.
    pub fn conntrack(&self) -> Option<nexd_proto::ConntrackInfo> {
        self.server
            .as_ref()
            .and_then(|_| crate::routing::conntrack::read())
    }

    /// The interfaces the clients' traffic leaves through, while serving.
    pub fn uplinks(&self) -> Option<&Uplinks> {
        self.server.as_ref().map(ExitServer::uplinks)
    }

    /// Why `exit-node clients` has nothing to show.
    pub fn not_serving_reason(&self, mesh: &Mesh) -> String {
        match &self.settings {
            None => {
                "this device does not serve as exit node (nexd runs without `router --exit-node`)"
                    .to_owned()
            }
            Some(_) => exit_server::not_allowed(mesh, &self.own)
                .unwrap_or_else(|| "this device does not serve as exit node now".into()),
        }
    }

    /// The nftables tables the role has in place (for the record).
    pub fn nft_tables(&self) -> Vec<String> {
        if self.serving() {
            vec![crate::routing::forward::NFT_TABLE.to_string()]
        } else {
            Vec::new()
        }
    }

    /// Stops serving.
    pub async fn remove(&mut self, host: &mut Host) {
        if let Some(server) = self.server.take() {
            server.remove(host).await;
        }
    }

    /// The exit node's side of the metrics: each client's traffic,
    /// refusals and limits (from the data path's counters), the probes,
    /// and what its DNS resolver did.
    pub fn register_metrics(&self, reg: &mut Metrics, host: &Host) {
        let Some(server) = &self.server else {
            return;
        };
        let rx = Family::<Labels, Counter>::default();
        let tx = Family::<Labels, Counter>::default();
        let denied = Family::<Labels, Counter>::default();
        let limit = Family::<Labels, Gauge>::default();
        // A failed read leaves the families empty: the scrape still works,
        // and the failure is in the log (and in `exit-node clients`).
        for c in self.client_rows(host).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "exit clients' counters not read");
            Vec::new()
        }) {
            let l = label("client", c.client.clone());
            rx.get_or_create(&l).inc_by(c.rx_bytes);
            tx.get_or_create(&l).inc_by(c.tx_bytes);
            for (reason, n) in &c.denied {
                denied
                    .get_or_create(&vec![
                        ("client".to_owned(), c.client.clone()),
                        ("reason".to_owned(), reason.clone()),
                    ])
                    .inc_by(*n);
            }
            for (dir, bps) in [
                ("from_client", c.rate_limit_from_client),
                ("to_client", c.rate_limit_to_client),
            ] {
                if let Some(b) = bps {
                    limit
                        .get_or_create(&vec![
                            ("client".to_owned(), c.client.clone()),
                            ("direction".to_owned(), dir.to_owned()),
                        ])
                        .set(i64::try_from(b).unwrap_or(i64::MAX));
                }
            }
        }
        reg.register(
            "nexd_exit_client_received_bytes",
            "Bytes the exit node received from each client and forwarded",
            rx,
        );
        reg.register(
            "nexd_exit_client_sent_bytes",
            "Bytes the exit node forwarded to each client",
            tx,
        );
        reg.register(
            "nexd_exit_client_denied_packets",
            "Packets of each client the exit node dropped, by reason",
            denied,
        );
        reg.register(
            "nexd_exit_client_rate_limit_bits_per_second",
            "Each client's rate limit by direction (absent: unlimited)",
            limit,
        );
        if let Some(ct) = self.conntrack() {
            let gauge = |reg: &mut Metrics, name: &str, help: &str, v: u64| {
                let g = Gauge::<i64>::default();
                g.set(i64::try_from(v).unwrap_or(i64::MAX));
                reg.register(name, help, g);
            };
            gauge(
                reg,
                "nexd_exit_conntrack_entries",
                "Flows the exit node's connection tracking holds",
                ct.entries,
            );
            if let Some(max) = ct.max {
                gauge(
                    reg,
                    "nexd_exit_conntrack_max",
                    "The size of the exit node's connection tracking table",
                    max,
                );
            }
            if let Some(m) = ct.masqueraded {
                gauge(
                    reg,
                    "nexd_exit_masqueraded_flows",
                    "Flows the exit node masquerades now",
                    m,
                );
            }
            if let Some(p) = ct.busiest_destination_ports {
                gauge(
                    reg,
                    "nexd_exit_busiest_destination_ports",
                    "Masquerade ports the busiest destination uses (of 64512)",
                    p,
                );
            }
        }
        if !server.probe_failures().is_empty() {
            let failures = Family::<Labels, Counter>::default();
            for (target, n) in server.probe_failures() {
                failures
                    .get_or_create(&label("target", target.to_string()))
                    .inc_by(*n);
            }
            reg.register(
                "nexd_exit_probe_failures",
                "Probes of each --exit-probe-target that got no connection",
                failures,
            );
        }
        if let Some(dns) = server.dns_counters() {
            let queries = Family::<Labels, Counter>::default();
            outcomes(&queries, &dns);
            reg.register(
                "nexd_exit_dns_queries",
                "The exit node's DNS resolver for its clients, by outcome",
                queries,
            );
        }
    }
}

/// The interface's link speed from sysfs, bits per second; 0 when the
/// kernel does not know it (virtual devices report -1 or fail).
fn link_bits_per_second(interface: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{interface}/speed"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(0, |mbit| mbit.saturating_mul(1_000_000))
}
