//! Reading the exit node's per-client counters: one row per client, the
//! CPUs summed, for `nexctl nexd exit-node clients` and the metrics.

use std::collections::BTreeMap;

use aya::maps::{MapData, PerCpuArray};
use nexd_common::{
    exit::{ClientCounters, DenyReason},
    names,
};

use crate::datapath::{Datapath, DatapathError};

pub use nexd_proto::ExitClientRow;

/// Sums one slot's per-CPU counters.
pub fn sum(per_cpu: &[ClientCounters]) -> ClientCounters {
    per_cpu
        .iter()
        .fold(ClientCounters::default(), |mut acc, c| {
            acc.rx_packets += c.rx_packets;
            acc.rx_bytes += c.rx_bytes;
            acc.tx_packets += c.tx_packets;
            acc.tx_bytes += c.tx_bytes;
            for (a, d) in acc.denied.iter_mut().zip(c.denied.iter()) {
                *a += d;
            }
            acc
        })
}

/// The denied counts by reason name, non-zero only, and their total.
pub fn denied_by_reason(c: &ClientCounters) -> (BTreeMap<String, u64>, u64) {
    let mut by = BTreeMap::new();
    let mut total = 0;
    for (i, n) in c.denied.iter().enumerate() {
        total += n;
        if *n > 0 {
            let name = DenyReason::from_index(i).map_or("unknown", DenyReason::name);
            *by.entry(name.to_owned()).or_insert(0) += n;
        }
    }
    (by, total)
}

impl Datapath {
    /// Every served client's counters, by client name.
    pub fn exit_clients(&self) -> Result<Vec<ExitClientRow>, DatapathError> {
        let name = names::EXIT_CLIENT_COUNTERS_MAP;
        let arr: PerCpuArray<&MapData, ClientCounters> = self.typed_map(name)?;
        let mut rows = Vec::with_capacity(self.exit.clients.clients.len());
        for (client, inst) in &self.exit.clients.clients {
            let per_cpu = arr
                .get(&inst.slot, 0)
                .map_err(|e| DatapathError::map(name, e))?;
            let c = sum(&per_cpu);
            let (denied, denied_total) = denied_by_reason(&c);
            rows.push(ExitClientRow {
                client: client.clone(),
                addresses: inst.addresses.iter().copied().collect(),
                rx_packets: c.rx_packets,
                rx_bytes: c.rx_bytes,
                tx_packets: c.tx_packets,
                tx_bytes: c.tx_bytes,
                denied,
                denied_total,
                rate_limit_from_client: inst.limits.from_client.map(|l| l.bits_per_second),
                rate_limit_to_client: inst.limits.to_client.map(|l| l.bits_per_second),
            });
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_are_summed_and_reasons_named() {
        let mut a = ClientCounters {
            rx_packets: 1,
            rx_bytes: 100,
            ..Default::default()
        };
        a.denied[DenyReason::Metadata.index()] = 2;
        let mut b = ClientCounters {
            rx_packets: 2,
            tx_bytes: 7,
            ..Default::default()
        };
        b.denied[DenyReason::Metadata.index()] = 1;
        b.denied[DenyReason::RateToClient.index()] = 4;
        let s = sum(&[a, b]);
        assert_eq!((s.rx_packets, s.rx_bytes, s.tx_bytes), (3, 100, 7));
        let (by, total) = denied_by_reason(&s);
        assert_eq!(total, 7);
        assert_eq!(by.get("metadata"), Some(&3));
        assert_eq!(by.get("rate_limit_to_client"), Some(&4));
        assert_eq!(by.len(), 2);
    }
}
