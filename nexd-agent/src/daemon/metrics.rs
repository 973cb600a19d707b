//! The Prometheus text the metrics endpoint serves, rendered from the
//! daemon's state with prometheus-client. Names follow Prometheus
//! conventions: `nexd_` prefix, `_total` for counters, base units (bytes,
//! seconds).

use std::{sync::atomic::AtomicU64, time::Instant};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{agent::Daemon, answers::HEALTHY_HANDSHAKE};
use crate::exit::{self, ExitStatus, Phase};

type Labels = Vec<(String, String)>;

fn label(k: &str, v: impl Into<String>) -> Labels {
    vec![(k.to_owned(), v.into())]
}

/// One series per field of a counters struct (named u64 fields), labelled
/// `outcome`: the struct is the single list of outcomes, so a new one
/// shows up here without a second list to keep in step.
fn outcomes(family: &Family<Labels, Counter>, counters: &impl serde::Serialize) {
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(counters) {
        for (name, v) in fields {
            if let Some(n) = v.as_u64() {
                family.get_or_create(&label("outcome", name)).inc_by(n);
            }
        }
    }
}

impl Daemon {
    /// The whole scrape, as Prometheus text format.
    pub(super) fn metrics_text(&self) -> String {
        let mut reg = Registry::default();

        let build = Family::<Labels, Gauge>::default();
        build
            .get_or_create(&label("version", env!("CARGO_PKG_VERSION")))
            .set(1);
        reg.register("nexd_build_info", "nexd's version", build);

        let packets = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        for (name, total) in self.dataplane.counters() {
            packets
                .get_or_create(&label("verdict", name))
                .inc_by(total.packets);
            bytes
                .get_or_create(&label("verdict", name))
                .inc_by(total.bytes);
        }
        reg.register(
            "nexd_datapath_packets",
            "Packets per eBPF data path verdict",
            packets,
        );
        reg.register(
            "nexd_datapath_bytes",
            "Bytes per eBPF data path verdict",
            bytes,
        );

        let sent = Family::<Labels, Counter>::default();
        let received = Family::<Labels, Counter>::default();
        let age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let healthy = Family::<Labels, Gauge>::default();
        // Live, not the last tick's snapshot: a scrape sees every byte.
        let live = self.iface.as_ref().and_then(|i| i.status().ok());
        if let Some(st) = live.as_ref().or(self.last_status.as_ref()) {
            for p in &st.peers {
                let name = self
                    .heartbeats
                    .book()
                    .name(&p.public_key)
                    .unwrap_or("unknown")
                    .to_owned();
                let l = label("peer", name);
                sent.get_or_create(&l).inc_by(p.tx_bytes);
                received.get_or_create(&l).inc_by(p.rx_bytes);
                if let Some(h) = p.last_handshake {
                    age.get_or_create(&l).set(h.as_secs_f64());
                }
                healthy.get_or_create(&l).set(i64::from(
                    p.last_handshake.is_some_and(|h| h < HEALTHY_HANDSHAKE),
                ));
            }
        }
        reg.register(
            "nexd_peer_sent_bytes",
            "Bytes sent to each peer through WireGuard",
            sent,
        );
        reg.register(
            "nexd_peer_received_bytes",
            "Bytes received from each peer through WireGuard",
            received,
        );
        reg.register(
            "nexd_peer_handshake_age_seconds",
            "Seconds since the last WireGuard handshake with each peer",
            age,
        );
        reg.register(
            "nexd_peer_healthy",
            "1 if the peer completed a handshake within 180 s",
            healthy,
        );

        let now = Instant::now();
        let available = Family::<Labels, Gauge>::default();
        let book = self.heartbeats.book();
        for k in book.keys() {
            if let (Some(name), Some(live)) = (book.name(k), book.live(k))
                && let Some(status) = exit::status(live, now)
            {
                available
                    .get_or_create(&label("exit_node", name))
                    .set(i64::from(status == ExitStatus::Available));
            }
        }
        reg.register(
            "nexd_exit_node_available",
            "1 for each exit node that is available now, 0 if stale",
            available,
        );
        let active = Family::<Labels, Gauge>::default();
        let phase_now = self.exit_client.phase();
        if let Some(k) = phase_now.exit_peer() {
            active
                .get_or_create(&label("exit_node", book.name(&k).unwrap_or("unknown")))
                .set(1);
        }
        reg.register(
            "nexd_exit_node_active",
            "1 for the exit node this client uses",
            active,
        );
        let phase = Family::<Labels, Gauge>::default();
        for p in ["off", "waiting", "active", "held"] {
            let on = matches!(
                (p, phase_now),
                ("off", Phase::Off)
                    | ("waiting", Phase::Waiting)
                    | ("active", Phase::Active(_))
                    | ("held", Phase::Held)
            );
            phase.get_or_create(&label("phase", p)).set(i64::from(on));
        }
        reg.register(
            "nexd_exit_node_client_phase",
            "The exit-node client's phase (1 for the current one)",
            phase,
        );
        let failovers: Counter = Counter::default();
        failovers.inc_by(self.exit_client.failovers());
        reg.register(
            "nexd_exit_node_failovers",
            "Times the client moved to another exit node (the one in use went away, or another was clearly faster)",
            failovers,
        );

        let announcements = Family::<Labels, Counter>::default();
        outcomes(&announcements, &book.counters());
        outcomes(&announcements, &self.heartbeats.socket_counters());
        reg.register(
            "nexd_announcements",
            "Announcements received from peers, by outcome (accepted, or why they were dropped or partly ignored)",
            announcements,
        );

        if self.exit_server.is_some() {
            self.exit_node_metrics(&mut reg);
        }

        self.membership.register_metrics(&mut reg);

        let mut out = String::new();
        if encode(&mut out, &reg).is_err() {
            out = "# encoding failed\n".into();
        }
        out
    }

    /// The exit node's side: each client's traffic, refusals and limits,
    /// and what its DNS resolver did.
    fn exit_node_metrics(&self, reg: &mut Registry) {
        let rx = Family::<Labels, Counter>::default();
        let tx = Family::<Labels, Counter>::default();
        let denied = Family::<Labels, Counter>::default();
        let limit = Family::<Labels, Gauge>::default();
        // A failed read leaves the families empty: the scrape still works,
        // and the failure is in the log (and in `exit-node clients`).
        for c in self.dataplane.exit_clients().unwrap_or_else(|e| {
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
        if let Some(server) = &self.exit_server
            && !server.probe_failures().is_empty()
        {
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
        if let Some(dns) = self.exit_server.as_ref().and_then(|s| s.dns_counters()) {
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
