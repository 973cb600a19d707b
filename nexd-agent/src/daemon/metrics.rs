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

        self.membership.register_metrics(&mut reg);

        let mut out = String::new();
        if encode(&mut out, &reg).is_err() {
            out = "# encoding failed\n".into();
        }
        out
    }
}
