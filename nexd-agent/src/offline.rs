//! Restoring the direct path without nexd: what `nexctl nexd exit-node
//! disable` does when nexd is not running (crashed, killed, or stopped by
//! someone who did not let it clean up). The promise "to return
//! connectivity, disable the exit-node client with nexctl" must hold when
//! the daemon is dead too.
//!
//! Everything is found by nexd's fixed numbers and names, exactly as a
//! starting nexd cleans up after a crashed one: the rules at its
//! priorities, the routes of its tables, the leak guard's pins, the LAN
//! gateway's nftables table, and the sysctls recorded in the state
//! directory.

use anyhow::Context as _;

use crate::{
    datapath,
    instance::Instance,
    netlink::Netlink,
    routing::{
        exclusions::ExcludedRoutes, gateway, policy::ClientRouting, sysctl::Sysctls, uplink,
    },
};

/// What was found (and removed).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub routing: bool,
    pub leak_guard: bool,
}

impl Removed {
    pub fn anything(&self) -> bool {
        self.routing || self.leak_guard
    }
}

/// Removes the exit-node client configuration nexd left behind.
pub fn restore_direct_path(opts: &Instance) -> anyhow::Result<Removed> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for netlink")?;
    rt.block_on(async {
        let nl = Netlink::connect()?;
        let client = ClientRouting::new(opts.policy);
        let routing = client.installed(&nl).await?;
        // Opening the record restores every sysctl nexd changed.
        let mut sysctls = Sysctls::open(&opts.state_dir);
        client.remove(&nl, &mut sysctls).await?;
        ExcludedRoutes::new(opts.policy.exclusion_table())
            .clear(&nl)
            .await?;
        let mut ifaces = vec![opts.interface.clone()];
        if let Ok((a, b)) = uplink::default_route_interfaces(&nl).await {
            ifaces.extend(a);
            ifaces.extend(b);
        }
        let leak_guard = datapath::remove_leftovers(&opts.bpffs, &opts.interface, &ifaces);
        gateway::remove_table();
        Ok(Removed {
            routing,
            leak_guard,
        })
    })
}
