//! The Prometheus text the metrics endpoint serves: every component
//! registers its own series (prometheus-client); this only collects them.
//! Names follow Prometheus conventions: `nexd_` prefix, `_total` for
//! counters, base units (bytes, seconds).

use std::time::Instant;

use prometheus_client::{
    encoding::text::encode,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use super::view::View;
use crate::metrics::{Labels, label};

/// The whole scrape, as Prometheus text format.
pub fn text(v: &View<'_>) -> String {
    let mut reg = Registry::default();
    let build = Family::<Labels, Gauge>::default();
    build
        .get_or_create(&label("version", env!("CARGO_PKG_VERSION")))
        .set(1);
    reg.register("nexd_build_info", "nexd's version", build);

    v.host.programs.register_metrics(&mut reg);
    if let Some(iface) = v.iface {
        iface.register_metrics(&mut reg, v.book());
    }
    v.heartbeats.register_metrics(&mut reg, Instant::now());
    v.exit_client.register_metrics(&mut reg, v.book(), v.mesh);
    v.exit_role.register_metrics(&mut reg, v.host);
    v.membership.register_metrics(&mut reg);

    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out = "# encoding failed\n".into();
    }
    out
}
