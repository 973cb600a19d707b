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

/// Removes what the instance `inst` left behind and checks the result.
pub fn restore_direct_path(inst: &Instance) -> Result<Report, OfflineError> {
    let _lock = if inst.state_dir.is_dir() {
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for netlink")?;
    let report = rt.block_on(async {
        let nl = Netlink::connect()?;
        let mut policies = vec![inst.policy];
        let mut wg_ifaces = vec![(inst.bpffs.clone(), inst.interface.clone())];
        let mut ifaces: BTreeSet<String> = BTreeSet::new();
        ifaces.insert(inst.interface.clone());
        if let Some(r) = &record {
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
        let clsact: Vec<String> = record
            .as_ref()
            .map_or_else(Vec::new, |r| r.clsact_interfaces.clone());
        let uplinks = uplink::all_default_route_interfaces(&nl).await?;
        ifaces.extend(uplinks.iter().cloned());

        let mut report = Report::default();
        remove_routing(&nl, &policies, &inst.state_dir, &mut report).await?;
        let ifaces: Vec<String> = ifaces.into_iter().collect();
        for (bpffs, wg) in &wg_ifaces {
            report.removed.extend(datapath::remove_leftovers(
                bpffs, wg, &ifaces, false, &clsact,
            ));
        }
        for table in NFT_TABLES {
            if table.exists()? {
                table.delete()?;
                report.removed.push(format!("the nftables table {table}"));
            }
        }
        check(&nl, &policies, &wg_ifaces, &ifaces, &mut report).await?;
        Ok::<_, anyhow::Error>(report)
    })?;
    if report.restored() {
        ledger::remove(&inst.state_dir);
    }
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
