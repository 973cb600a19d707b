//! Restoring the direct path without nexd: what `nexctl nexd exit-node
//! disable` does when nexd is not running (crashed, killed, or stopped by
//! someone who did not let it clean up). The promise "to return
//! connectivity, disable the exit-node client with nexctl" must hold when
//! the daemon is dead too, and what nexctl says must be true.
//!
//! 1. The instance lock is taken first: a nexd that holds it is alive,
//!    whatever its socket, and nothing of it is touched.
//! 2. Everything the instance recorded in its state directory is removed,
//!    and everything found by nexd's fixed names and numbers for the
//!    instance the configuration describes (both, when they differ): the
//!    client's rules and routes, the excluded-routes table, the leak
//!    guard's pins and filters, nexd's nftables tables, and the sysctls
//!    recorded with their original values.
//! 3. Then it looks again: rules at nexd's priorities, routes in its
//!    tables, a leak guard on any uplink's egress or pinned, nexd's
//!    nftables tables. The report lists what was removed and what is still
//!    there; only when nothing is does it say the direct path is back.

use std::{collections::BTreeSet, path::PathBuf};

use anyhow::Context as _;
use tracing::warn;

use crate::{
    daemon::lock::{InstanceLock, LockError},
    datapath,
    instance::Instance,
    ledger,
    netlink::Netlink,
    routing::{
        NFT_TABLES, PolicyNumbers, exclusions::ExcludedRoutes, policy::ClientRouting,
        sysctl::Sysctls, uplink,
    },
};

/// Why nothing was done.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error(
        "a nexd{} still holds the instance lock of {state_dir} but does not answer on {socket}: \
         refusing to touch what it installed (is it running with another --socket?)",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Running {
        state_dir: PathBuf,
        socket: PathBuf,
        pid: Option<u32>,
    },
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// What was removed, and what is still in place after the removal.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub removed: Vec<String>,
    pub remaining: Vec<String>,
}

impl Report {
    /// Whether none of nexd's client configuration is left: the direct
    /// path is back.
    pub fn restored(&self) -> bool {
        self.remaining.is_empty()
    }
}

/// Removes what the instance `inst` left behind and checks the result;
/// then the same for every other instance registered in this network
/// namespace (`instance::REGISTRY_DIR`) that is dead: one started with
/// options nexctl was not given (another state directory, interface,
/// bpffs or routing numbers) is found through its registration and the
/// record in its state directory. A live one is left alone.
pub fn restore_direct_path(inst: &Instance) -> Result<Report, OfflineError> {
    restore_with_registry(inst, std::path::Path::new(crate::instance::REGISTRY_DIR))
}

fn restore_with_registry(
    inst: &Instance,
    registry: &std::path::Path,
) -> Result<Report, OfflineError> {
    // The instance nexctl was pointed at: a live one is refused.
    let mut subjects = vec![Subject::take(inst.clone(), None)?];
    // Every other dead instance of this namespace, from its registration
    // and the record in its state directory; a live one is left alone.
    for (entry, reg) in crate::instance::registered_here(registry) {
        if reg.state_dir == inst.state_dir {
            subjects[0].entry = Some(entry);
            continue;
        }
        let record = match ledger::read(&reg.state_dir) {
            Ok(Some(r)) => r,
            // Stopped cleanly (no record): nothing of it is left.
            Ok(None) => {
                crate::instance::unregister(&entry);
                continue;
            }
            Err(e) => {
                warn!(error = %e, "ignoring a registered instance whose record is not nexd's");
                continue;
            }
        };
        let other = Instance {
            socket: reg.socket.clone(),
            state_dir: reg.state_dir.clone(),
            interface: record.interface.clone(),
            bpffs: record.bpffs.clone(),
            policy: record.policy(),
        };
        match Subject::take(other, Some(entry)) {
            Ok(s) => subjects.push(s),
            Err(OfflineError::Running { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let report = restore(&subjects)?;
    if report.restored() {
        for s in &subjects {
            ledger::remove(&s.inst.state_dir);
            if let Some(entry) = &s.entry {
                crate::instance::unregister(entry);
            }
        }
    }
    Ok(report)
}

/// One dead instance to clean up: held by its lock meanwhile, with its
/// record and registration.
struct Subject {
    inst: Instance,
    record: Option<ledger::Ledger>,
    entry: Option<PathBuf>,
    _lock: Option<InstanceLock>,
}

impl Subject {
    /// Takes the instance's lock; `Running` if a nexd holds it.
    fn take(inst: Instance, entry: Option<PathBuf>) -> Result<Self, OfflineError> {
        let lock = if inst.state_dir.is_dir() {
            match InstanceLock::acquire(&inst.state_dir) {
                Ok(lock) => Some(lock),
                Err(LockError::Held { pid, .. }) => {
                    return Err(OfflineError::Running {
                        state_dir: inst.state_dir.clone(),
                        socket: inst.socket.clone(),
                        pid,
                    });
                }
                Err(e) => return Err(OfflineError::Failed(e.into())),
            }
        } else {
            None
        };
        let record = match ledger::read(&inst.state_dir) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "ignoring the record nexd left; removing by fixed names only");
                None
            }
        };
        Ok(Subject {
            inst,
            record,
            entry,
            _lock: lock,
        })
    }
}

/// Removes what the instances left behind, then checks once for all of
/// them (a check between two instances' clean-ups would report what the
/// second removes).
fn restore(subjects: &[Subject]) -> Result<Report, OfflineError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for netlink")?;
    let report = rt.block_on(async {
        let nl = Netlink::connect()?;
        let uplinks = uplink::all_default_route_interfaces(&nl).await?;
        let mut report = Report::default();
        let mut all_policies = Vec::new();
        let mut all_wg = Vec::new();
        let mut all_ifaces: BTreeSet<String> = uplinks.iter().cloned().collect();
        for s in subjects {
            let inst = &s.inst;
            let mut policies = vec![inst.policy];
            let mut wg_ifaces = vec![(inst.bpffs.clone(), inst.interface.clone())];
            let mut ifaces: BTreeSet<String> = uplinks.iter().cloned().collect();
            ifaces.insert(inst.interface.clone());
            if let Some(r) = &s.record {
                if r.policy() != inst.policy {
                    policies.push(r.policy());
                }
                if (r.bpffs.clone(), r.interface.clone()) != wg_ifaces[0] {
                    wg_ifaces.push((r.bpffs.clone(), r.interface.clone()));
                }
                ifaces.insert(r.interface.clone());
                ifaces.extend(r.guard_interfaces.iter().cloned());
                ifaces.extend(r.lan_interfaces.iter().cloned());
            }
            // Only the record knows which clsact qdiscs nexd added; without
            // one, none is touched (another tool's are not nexd's).
            let clsact: Vec<String> = s
                .record
                .as_ref()
                .map_or_else(Vec::new, |r| r.clsact_interfaces.clone());
            remove_routing(&nl, &policies, &inst.state_dir, &mut report).await?;
            let ifaces_now: Vec<String> = ifaces.iter().cloned().collect();
            for (bpffs, wg) in &wg_ifaces {
                report.removed.extend(datapath::remove_leftovers(
                    bpffs,
                    wg,
                    &ifaces_now,
                    false,
                    &clsact,
                ));
            }
            all_policies.extend(policies);
            all_wg.extend(wg_ifaces);
            all_ifaces.extend(ifaces);
        }
        for table in NFT_TABLES {
            if table.exists()? {
                table.delete()?;
                report.removed.push(format!("the nftables table {table}"));
            }
        }
        let all_ifaces: Vec<String> = all_ifaces.into_iter().collect();
        check(&nl, &all_policies, &all_wg, &all_ifaces, &mut report).await?;
        Ok::<_, anyhow::Error>(report)
    })?;
    Ok(report)
}

/// The client's rules and routes, the excluded routes, `src_valid_mark`
/// and the forwarding sysctls.
async fn remove_routing(
    nl: &Netlink,
    policies: &[PolicyNumbers],
    state_dir: &std::path::Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    // Opening the record restores every sysctl nexd changed.
    let saved: Vec<String> = std::fs::read_to_string(state_dir.join("sysctl.saved"))
        .ok()
        .and_then(|t| serde_json::from_str::<std::collections::BTreeMap<String, String>>(&t).ok())
        .map(|m| m.into_keys().collect())
        .unwrap_or_default();
    let mut sysctls = Sysctls::open(state_dir);
    for key in saved {
        report.removed.push(format!(
            "the change to sysctl {key} (original value restored)"
        ));
    }
    for p in policies {
        let client = ClientRouting::new(*p);
        let rules = client.installed(nl).await?;
        let routes = client.routes_installed(nl).await?;
        client.remove(nl, &mut sysctls).await?;
        if rules {
            report.removed.push(format!(
                "the policy rules at priorities {}-{} (IPv4 and IPv6)",
                p.priority - 1,
                p.priority + 1
            ));
        }
        if routes {
            report
                .removed
                .push(format!("the default routes of table {}", p.table));
        }
        let n = ExcludedRoutes::new(p.exclusion_table()).clear(nl).await?;
        if n > 0 {
            report.removed.push(format!(
                "{n} excluded route(s) of table {}",
                p.exclusion_table()
            ));
        }
    }
    Ok(())
}

/// Looks again for everything that would keep the direct path closed.
async fn check(
    nl: &Netlink,
    policies: &[PolicyNumbers],
    wg_ifaces: &[(PathBuf, String)],
    ifaces: &[String],
    report: &mut Report,
) -> anyhow::Result<()> {
    for p in policies {
        let client = ClientRouting::new(*p);
        if client.installed(nl).await? {
            report.remaining.push(format!(
                "policy rules at priorities {}-{}",
                p.priority - 1,
                p.priority + 1
            ));
        }
        if client.routes_installed(nl).await? {
            report
                .remaining
                .push(format!("routes in table {}", p.table));
        }
    }
    for (bpffs, wg) in wg_ifaces {
        let dir = datapath::pin_dir(bpffs, wg);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                report
                    .remaining
                    .push(format!("a leak guard pinned at {}", e.path().display()));
            }
        }
    }
    for iface in ifaces {
        for prog in datapath::guards_on(iface) {
            report
                .remaining
                .push(format!("the leak guard ({prog}) on {iface}'s egress"));
        }
    }
    for table in NFT_TABLES {
        if table.exists()? {
            report.remaining.push(format!("the nftables table {table}"));
        }
    }
    Ok(())
}
