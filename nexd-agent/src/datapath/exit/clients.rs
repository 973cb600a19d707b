//! The clients an exit node serves, in its maps: each client gets a slot
//! (its counters and its token buckets), and each of its mesh addresses
//! points at that slot.
//!
//! A sync is planned as data from (what the maps hold, what is wanted)
//! and then applied in an order that keeps every packet's view sound:
//!
//! 1. addresses nobody should have any more are removed (their packets
//!    are unauthorized from then on);
//! 2. new clients' counters are zeroed and limits written (changed limits
//!    too), before any address points at their slot;
//! 3. addresses are inserted; an address that moves to another client is
//!    overwritten in place (one atomic map update), never removed first.
//!
//! Slots freed by removed clients are reused only after the slots never
//! used, and their counters are zeroed again before reuse.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use nexd_common::{
    exit::{ClientCounters, ClientLimit},
    names,
};
use tracing::debug;

use super::rate::ClientLimits;
use crate::datapath::{Datapath, DatapathError};

/// A client the exit node should serve (not to be confused with
/// `daemon::exit_client::ExitClient`, this device as a client of one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedClient {
    /// The device's name in the mesh file (the client id shown to the
    /// operator).
    pub name: String,
    /// Its mesh addresses (IPv4 and IPv6). WireGuard's cryptokey routing
    /// guarantees a packet from the tunnel carries one of the sending
    /// peer's addresses, so the source address identifies the client.
    pub addresses: Vec<IpAddr>,
    pub limits: ClientLimits,
}

/// Why a client list cannot be installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExitClientError {
    #[error("exit client {name:?} is listed twice")]
    DuplicateName { name: String },
    #[error("address {address} belongs to two exit clients, {first:?} and {second:?}")]
    DuplicateAddress {
        address: IpAddr,
        first: String,
        second: String,
    },
    #[error(
        "{wanted} exit clients (or IPv4/IPv6 addresses of them) do not fit the data path's \
         {capacity} slots; load it with a larger capacity"
    )]
    Capacity { wanted: usize, capacity: u32 },
}

/// A client as installed in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub slot: u32,
    pub addresses: BTreeSet<IpAddr>,
    pub limits: ClientLimits,
}

/// What the client maps hold (nexd's mirror of them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTable {
    pub clients: BTreeMap<String, Installed>,
    /// Slots used before and free again.
    free: BTreeSet<u32>,
    /// The lowest slot never used.
    next: u32,
}

impl ClientTable {
    /// The client and slot an address belongs to.
    pub fn owner(&self, addr: IpAddr) -> Option<(&str, u32)> {
        self.clients
            .iter()
            .find(|(_, c)| c.addresses.contains(&addr))
            .map(|(n, c)| (n.as_str(), c.slot))
    }
}

/// One step of a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp {
    RemoveAddress(IpAddr),
    ResetCounters(u32),
    SetLimits { slot: u32, limits: ClientLimits },
    InsertAddress { address: IpAddr, slot: u32 },
}

/// A sync, planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPlan {
    /// In the order they must run.
    pub ops: Vec<ClientOp>,
    /// The table once they ran.
    pub table: ClientTable,
    pub summary: ClientSync,
}

/// What a sync changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientSync {
    pub added: usize,
    pub removed: usize,
    /// Kept clients whose addresses or limits changed.
    pub changed: usize,
}

/// Plans the ops that turn `current` into `wanted` within `capacity`
/// slots (and addresses per family).
pub fn plan_clients(
    current: &ClientTable,
    wanted: &[ServedClient],
    capacity: u32,
) -> Result<ClientPlan, ExitClientError> {
    // Validate: unique names, every address owned once, capacity.
    let mut owners: HashMap<IpAddr, &str> = HashMap::new();
    let mut names_seen = BTreeSet::new();
    for c in wanted {
        if !names_seen.insert(c.name.as_str()) {
            return Err(ExitClientError::DuplicateName {
                name: c.name.clone(),
            });
        }
        for a in &c.addresses {
            if let Some(first) = owners.insert(*a, &c.name)
                && first != c.name
            {
                return Err(ExitClientError::DuplicateAddress {
                    address: *a,
                    first: first.to_owned(),
                    second: c.name.clone(),
                });
            }
        }
    }
    let v4 = owners.keys().filter(|a| a.is_ipv4()).count();
    let most = wanted.len().max(v4).max(owners.len() - v4);
    if most > capacity as usize {
        return Err(ExitClientError::Capacity {
            wanted: most,
            capacity,
        });
    }

    let mut table = current.clone();
    let mut removes = Vec::new();
    let mut writes = Vec::new();
    let mut inserts = Vec::new();
    let mut summary = ClientSync::default();

    // Gone clients: their addresses (unless someone keeps them) and slots.
    let wanted_names: BTreeSet<&str> = wanted.iter().map(|c| c.name.as_str()).collect();
    let gone: Vec<String> = table
        .clients
        .keys()
        .filter(|n| !wanted_names.contains(n.as_str()))
        .cloned()
        .collect();
    let mut quarantined = BTreeSet::new();
    for name in gone {
        if let Some(c) = table.clients.remove(&name) {
            for a in &c.addresses {
                if !owners.contains_key(a) {
                    removes.push(ClientOp::RemoveAddress(*a));
                }
            }
            quarantined.insert(c.slot);
            summary.removed += 1;
        }
    }

    for c in wanted {
        let addrs: BTreeSet<IpAddr> = c.addresses.iter().copied().collect();
        match table.clients.get_mut(&c.name) {
            Some(inst) => {
                let mut changed = false;
                for a in inst.addresses.difference(&addrs) {
                    if !owners.contains_key(a) {
                        removes.push(ClientOp::RemoveAddress(*a));
                    }
                    changed = true;
                }
                for a in addrs.difference(&inst.addresses) {
                    inserts.push(ClientOp::InsertAddress {
                        address: *a,
                        slot: inst.slot,
                    });
                    changed = true;
                }
                if inst.limits != c.limits {
                    writes.push(ClientOp::SetLimits {
                        slot: inst.slot,
                        limits: c.limits,
                    });
                    changed = true;
                }
                inst.addresses = addrs;
                inst.limits = c.limits;
                summary.changed += usize::from(changed);
            }
            None => {
                let slot = if let Some(s) = table.free.pop_first() {
                    s
                } else if table.next < capacity {
                    table.next += 1;
                    table.next - 1
                } else if let Some(s) = quarantined.pop_first() {
                    // Full: reuse a slot freed in this very sync (its
                    // addresses are removed first, its counters zeroed).
                    s
                } else {
                    return Err(ExitClientError::Capacity {
                        wanted: wanted.len(),
                        capacity,
                    });
                };
                writes.push(ClientOp::ResetCounters(slot));
                writes.push(ClientOp::SetLimits {
                    slot,
                    limits: c.limits,
                });
                for a in &addrs {
                    inserts.push(ClientOp::InsertAddress { address: *a, slot });
                }
                table.clients.insert(
                    c.name.clone(),
                    Installed {
                        slot,
                        addresses: addrs,
                        limits: c.limits,
                    },
                );
                summary.added += 1;
            }
        }
    }
    table.free.extend(quarantined);

    let mut ops = removes;
    ops.extend(writes);
    ops.extend(inserts);
    Ok(ClientPlan {
        ops,
        table,
        summary,
    })
}

impl Datapath {
    fn client_map4(&mut self) -> Result<BpfHashMap<&mut MapData, [u8; 4], u32>, DatapathError> {
        self.typed_map_mut(names::EXIT_CLIENTS_V4_MAP)
    }

    fn client_map6(&mut self) -> Result<BpfHashMap<&mut MapData, [u8; 16], u32>, DatapathError> {
        self.typed_map_mut(names::EXIT_CLIENTS_V6_MAP)
    }

    fn apply_client_op(&mut self, op: &ClientOp) -> Result<(), DatapathError> {
        match *op {
            ClientOp::RemoveAddress(ip) => {
                let (name, r) = match ip {
                    IpAddr::V4(a) => (
                        names::EXIT_CLIENTS_V4_MAP,
                        self.client_map4()?.remove(&a.octets()),
                    ),
                    IpAddr::V6(a) => (
                        names::EXIT_CLIENTS_V6_MAP,
                        self.client_map6()?.remove(&a.octets()),
                    ),
                };
                match r {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                    Err(e) => Err(DatapathError::map(name, e)),
                }
            }
            ClientOp::InsertAddress { address, slot } => match address {
                IpAddr::V4(a) => self
                    .client_map4()?
                    .insert(a.octets(), slot, 0)
                    .map_err(|e| DatapathError::map(names::EXIT_CLIENTS_V4_MAP, e)),
                IpAddr::V6(a) => self
                    .client_map6()?
                    .insert(a.octets(), slot, 0)
                    .map_err(|e| DatapathError::map(names::EXIT_CLIENTS_V6_MAP, e)),
            },
            ClientOp::SetLimits { slot, limits } => {
                let name = names::EXIT_LIMITS_MAP;
                let mut arr: Array<&mut MapData, ClientLimit> = self.typed_map_mut(name)?;
                arr.set(slot, limits.to_map(), 0)
                    .map_err(|e| DatapathError::map(name, e))
            }
            ClientOp::ResetCounters(slot) => {
                let name = names::EXIT_CLIENT_COUNTERS_MAP;
                let cpus =
                    aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e.to_string()))?;
                let mut arr: PerCpuArray<&mut MapData, ClientCounters> =
                    self.typed_map_mut(name)?;
                let zeros = PerCpuValues::try_from(vec![ClientCounters::default(); cpus])
                    .map_err(|e| DatapathError::Cpus(e.to_string()))?;
                arr.set(slot, zeros, 0)
                    .map_err(|e| DatapathError::map(name, e))
            }
        }
    }

    /// Empties the client maps, whatever they hold (after a sync failed
    /// half-way, nexd's mirror of them can no longer be trusted).
    fn clear_exit_clients(&mut self) -> Result<(), DatapathError> {
        let keys4: Vec<[u8; 4]> = self.client_map4()?.keys().filter_map(Result::ok).collect();
        for k in keys4 {
            self.apply_client_op(&ClientOp::RemoveAddress(IpAddr::from(k)))?;
        }
        let keys6: Vec<[u8; 16]> = self.client_map6()?.keys().filter_map(Result::ok).collect();
        for k in keys6 {
            self.apply_client_op(&ClientOp::RemoveAddress(IpAddr::from(k)))?;
        }
        self.exit.clients = ClientTable::default();
        self.exit.clients_dirty = false;
        Ok(())
    }

    /// Makes the client maps serve exactly `wanted`: diffs, applied in a
    /// safe order (see the module's comment). A failure half-way leaves
    /// the maps partly updated; the next sync starts from empty maps.
    pub fn sync_exit_clients(
        &mut self,
        wanted: &[ServedClient],
    ) -> Result<ClientSync, DatapathError> {
        if self.exit.clients_dirty {
            self.clear_exit_clients()?;
        }
        let plan = plan_clients(&self.exit.clients, wanted, self.exit.capacity)?;
        for op in &plan.ops {
            if let Err(e) = self.apply_client_op(op) {
                self.exit.clients_dirty = true;
                return Err(e);
            }
        }
        self.exit.clients = plan.table;
        let s = plan.summary;
        if s != ClientSync::default() {
            debug!(
                added = s.added,
                removed = s.removed,
                changed = s.changed,
                total = self.exit.clients.clients.len(),
                "exit clients updated"
            );
        }
        Ok(s)
    }

    /// The clients as nexd last installed them.
    pub fn exit_client_table(&self) -> &ClientTable {
        &self.exit.clients
    }
}

#[cfg(test)]
mod tests {
    use super::super::rate::RateLimit;
    use super::*;
    use crate::testing::ip;

    fn client(name: &str, addrs: &[&str]) -> ServedClient {
        ServedClient {
            name: name.into(),
            addresses: addrs.iter().map(|a| ip(a)).collect(),
            limits: ClientLimits::default(),
        }
    }

    /// Applies `ops` to a model of the maps: address -> slot, and which
    /// slots were reset; checks that no address ever points at a slot
    /// whose counters were not reset since it was (re)assigned.
    fn run(model: &mut BTreeMap<IpAddr, u32>, ops: &[ClientOp]) {
        let mut seen_insert = false;
        for op in ops {
            match op {
                ClientOp::RemoveAddress(a) => {
                    assert!(!seen_insert, "a remove after an insert: {ops:?}");
                    model.remove(a);
                }
                ClientOp::InsertAddress { address, slot } => {
                    seen_insert = true;
                    model.insert(*address, *slot);
                }
                ClientOp::ResetCounters(_) | ClientOp::SetLimits { .. } => {
                    assert!(!seen_insert, "a slot written after an insert: {ops:?}");
                }
            }
        }
    }

    fn model_of(t: &ClientTable) -> BTreeMap<IpAddr, u32> {
        t.clients
            .values()
            .flat_map(|c| c.addresses.iter().map(|a| (*a, c.slot)))
            .collect()
    }

    #[test]
    fn a_first_sync_gives_slots_in_order_and_resets_them() {
        let wanted = [
            client("a", &["100.64.0.2", "fd00::2"]),
            client("b", &["100.64.0.3"]),
        ];
        let plan = plan_clients(&ClientTable::default(), &wanted, 8).expect("plan");
        assert_eq!(plan.summary.added, 2);
        assert_eq!(plan.table.clients["a"].slot, 0);
        assert_eq!(plan.table.clients["b"].slot, 1);
        assert!(plan.ops.contains(&ClientOp::ResetCounters(0)));
        assert!(plan.ops.contains(&ClientOp::ResetCounters(1)));
        let mut m = BTreeMap::new();
        run(&mut m, &plan.ops);
        assert_eq!(m, model_of(&plan.table));
    }

    #[test]
    fn an_unchanged_list_plans_nothing() {
        let wanted = [client("a", &["100.64.0.2"])];
        let first = plan_clients(&ClientTable::default(), &wanted, 8).expect("plan");
        let again = plan_clients(&first.table, &wanted, 8).expect("plan");
        assert!(again.ops.is_empty(), "{:?}", again.ops);
        assert_eq!(again.summary, ClientSync::default());
    }

    #[test]
    fn removed_clients_free_their_slot_for_later_and_their_addresses_now() {
        let t0 = plan_clients(
            &ClientTable::default(),
            &[client("a", &["100.64.0.2"]), client("b", &["100.64.0.3"])],
            8,
        )
        .expect("plan")
        .table;
        let p = plan_clients(
            &t0,
            &[client("b", &["100.64.0.3"]), client("c", &["100.64.0.4"])],
            8,
        )
        .expect("plan");
        assert_eq!(p.ops[0], ClientOp::RemoveAddress(ip("100.64.0.2")));
        // c does not take a's slot in the same sync while others are free.
        assert_eq!(p.table.clients["c"].slot, 2);
        let mut m = model_of(&t0);
        run(&mut m, &p.ops);
        assert_eq!(m, model_of(&p.table));
        // Later, the freed slot is reused (and reset).
        let p2 = plan_clients(
            &p.table,
            &[
                client("b", &["100.64.0.3"]),
                client("c", &["100.64.0.4"]),
                client("d", &["100.64.0.5"]),
            ],
            8,
        )
        .expect("plan");
        assert_eq!(p2.table.clients["d"].slot, 0);
        assert!(p2.ops.contains(&ClientOp::ResetCounters(0)));
    }

    #[test]
    fn an_address_moving_between_clients_is_overwritten_not_removed() {
        let t0 = plan_clients(&ClientTable::default(), &[client("a", &["100.64.0.2"])], 8)
            .expect("plan")
            .table;
        let p = plan_clients(&t0, &[client("b", &["100.64.0.2"])], 8).expect("plan");
        assert!(
            !p.ops
                .iter()
                .any(|o| matches!(o, ClientOp::RemoveAddress(_))),
            "{:?}",
            p.ops
        );
        let mut m = model_of(&t0);
        run(&mut m, &p.ops);
        assert_eq!(m, model_of(&p.table));
        assert_eq!(p.table.owner(ip("100.64.0.2")).map(|(n, _)| n), Some("b"));
    }

    #[test]
    fn changed_limits_are_written_without_resetting_counters() {
        let t0 = plan_clients(&ClientTable::default(), &[client("a", &["100.64.0.2"])], 8)
            .expect("plan")
            .table;
        let mut a = client("a", &["100.64.0.2"]);
        a.limits = ClientLimits::both(RateLimit::new(50_000_000));
        let p = plan_clients(&t0, &[a.clone()], 8).expect("plan");
        assert_eq!(
            p.ops,
            vec![ClientOp::SetLimits {
                slot: 0,
                limits: a.limits
            }]
        );
        assert_eq!(p.summary.changed, 1);
    }

    #[test]
    fn bad_lists_are_refused() {
        let e = plan_clients(
            &ClientTable::default(),
            &[client("a", &["100.64.0.2"]), client("a", &[])],
            8,
        );
        assert!(matches!(e, Err(ExitClientError::DuplicateName { .. })));
        let e = plan_clients(
            &ClientTable::default(),
            &[client("a", &["100.64.0.2"]), client("b", &["100.64.0.2"])],
            8,
        );
        assert!(matches!(e, Err(ExitClientError::DuplicateAddress { .. })));
        let many: Vec<ServedClient> = (0..9).map(|i| client(&format!("c{i}"), &[])).collect();
        let e = plan_clients(&ClientTable::default(), &many, 8);
        assert!(matches!(
            e,
            Err(ExitClientError::Capacity { wanted: 9, .. })
        ));
    }

    #[test]
    fn a_full_table_reuses_slots_freed_in_the_same_sync() {
        let two = [client("a", &["100.64.0.2"]), client("b", &["100.64.0.3"])];
        let t0 = plan_clients(&ClientTable::default(), &two, 2)
            .expect("plan")
            .table;
        let p = plan_clients(
            &t0,
            &[client("a", &["100.64.0.2"]), client("c", &["100.64.0.4"])],
            2,
        )
        .expect("plan");
        assert_eq!(p.table.clients["c"].slot, 1);
        let mut m = model_of(&t0);
        run(&mut m, &p.ops);
        assert_eq!(m, model_of(&p.table));
    }

    /// Random lists against the invariants, over many syncs.
    #[test]
    fn random_syncs_keep_the_model_and_the_table_equal() {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut table = ClientTable::default();
        let mut model = BTreeMap::new();
        for _ in 0..500 {
            let n = (next() % 12) as usize;
            let mut used = BTreeSet::new();
            let mut wanted = Vec::new();
            for _ in 0..n {
                let name = format!("c{}", next() % 16);
                if !used.insert(name.clone()) {
                    continue;
                }
                let a = ip(&format!("100.64.0.{}", next() % 20));
                if wanted
                    .iter()
                    .any(|c: &ServedClient| c.addresses.contains(&a))
                {
                    continue;
                }
                wanted.push(client(&name, &[&a.to_string()]));
            }
            let plan = plan_clients(&table, &wanted, 16).expect("plan");
            run(&mut model, &plan.ops);
            table = plan.table;
            assert_eq!(model, model_of(&table));
            let slots: BTreeSet<u32> = table.clients.values().map(|c| c.slot).collect();
            assert_eq!(slots.len(), table.clients.len(), "two clients share a slot");
            assert!(slots.iter().all(|s| *s < 16));
        }
    }
}
