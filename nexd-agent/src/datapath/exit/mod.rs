//! The exit node's data path in eBPF: who may use it (clients), where
//! they may go (policy), how fast (rate limits), TCP MSS clamping, and
//! per-client counters; plus the MSS clamp alone for a LAN gateway.
//!
//! The daemon, on an exit node:
//!
//! 1. `sync_exit_policy(&exit_policy(&host, &allow))` and
//!    `sync_exit_clients(&clients)` (diffs; call again on every change);
//! 2. `set_mss(mss_for_mtu(path_mtu))`;
//! 3. `attach_exit(wg_iface, false)`: attaches both programs and starts
//!    enforcing; it refuses while the policy has no local entry (the
//!    exit node's own mesh addresses), which would cut it off from its
//!    mesh peers;
//! 4. reads `exit_clients()` for `nexctl` and the metrics;
//! 5. `detach_exit()` when it stops serving (dropping the `Datapath`
//!    detaches too).
//!
//! The stateful rule ("towards the tunnel only replies") stays in
//! nftables: `ct state established,related` in the forward chain, since
//! the masquerading the exit node needs runs connection tracking on every
//! forwarded packet anyway. Redoing it with BPF conntrack kfuncs would
//! need kernel 6.0+ and aya support for kfuncs, and would look up the
//! same conntrack entry a second time.

mod clients;
mod policy;
mod rate;
mod stats;

use aya::programs::TcAttachType;
use nexd_common::{
    exit::{ExitConfig, FLAG_EXIT_ENFORCE, MssConfig, PolicyValue},
    names,
};
use tracing::info;

pub use clients::{
    ClientOp, ClientPlan, ClientSync, ClientTable, ExitClientError, Installed, ServedClient,
    plan_clients,
};
pub use policy::{ExitPolicy, HostNetworks, builtin_denies, exit_policy, policy_lookup};
pub use rate::{ClientLimits, DEFAULT_BURST_MS, MIN_BURST_BYTES, RateLimit, RateParseError};
pub use stats::ExitClientRow;

use super::{Datapath, DatapathError};

/// The exit data path's state in user space (nexd's mirror of the maps).
#[derive(Debug, Default)]
pub struct ExitState {
    pub(crate) policy: ExitPolicy,
    pub(crate) clients: ClientTable,
    /// A client sync failed half-way: the maps must be rebuilt.
    pub(crate) clients_dirty: bool,
    /// Slots in the client maps, limits and counters.
    pub(crate) capacity: u32,
    pub(crate) config: ExitConfig,
    pub(crate) mss: MssConfig,
}

impl ExitState {
    pub(crate) fn new(capacity: u32) -> Self {
        ExitState {
            capacity,
            ..Default::default()
        }
    }
}

/// IPv4 and IPv6 header sizes plus TCP's.
const V4_OVERHEAD: u32 = 20 + 20;
const V6_OVERHEAD: u32 = 40 + 20;

/// The MSS to clamp SYNs to for a path MTU (the smallest of the tunnel's
/// MTU and whatever the operator knows of the underlay): MTU minus the IP
/// and TCP headers. IPv6 needs at least 1280 (below that, no clamping for
/// IPv6: such a link cannot carry IPv6 anyway).
pub fn mss_for_mtu(mtu: u32) -> MssConfig {
    let v4 = mtu.saturating_sub(V4_OVERHEAD).min(u32::from(u16::MAX));
    let v6 = if mtu >= 1280 {
        (mtu - V6_OVERHEAD).min(u32::from(u16::MAX))
    } else {
        0
    };
    MssConfig {
        mss_v4: v4 as u16,
        mss_v6: v6 as u16,
    }
}

impl Datapath {
    fn set_exit_config(&mut self, cfg: ExitConfig) -> Result<(), DatapathError> {
        if cfg == self.exit.config {
            return Ok(());
        }
        self.set_single(names::EXIT_CONFIG_MAP, cfg)?;
        self.exit.config = cfg;
        Ok(())
    }

    /// Turns the exit programs' enforcement (and counting) on or off
    /// without attaching or detaching them. `attach_exit` and
    /// `detach_exit` do this themselves; tests and benchmarks that run
    /// the programs with BPF_PROG_TEST_RUN turn it on by hand.
    pub fn set_exit_enforcing(&mut self, on: bool) -> Result<(), DatapathError> {
        self.set_exit_config(ExitConfig {
            flags: if on { FLAG_EXIT_ENFORCE } else { 0 },
            reserved: 0,
        })
    }

    /// Writes the MSS the clamps lower SYNs to (exit programs and the
    /// LAN gateway's clamp alike); zero for a family turns its clamping
    /// off.
    pub fn set_mss(&mut self, mss: MssConfig) -> Result<(), DatapathError> {
        if mss == self.exit.mss {
            return Ok(());
        }
        self.set_single(names::MSS_CONFIG_MAP, mss)?;
        self.exit.mss = mss;
        info!(
            mss_v4 = mss.mss_v4,
            mss_v6 = mss.mss_v6,
            "TCP MSS clamp set"
        );
        Ok(())
    }

    /// The MSS last written.
    pub fn mss(&self) -> MssConfig {
        self.exit.mss
    }

    /// Attaches the exit programs to the WireGuard interface (`l2`: the
    /// link has an Ethernet header; WireGuard has not) and starts
    /// enforcing. Sync the policy and the clients first: until then every
    /// forwarded packet is unauthorized.
    pub fn attach_exit(&mut self, iface: &str, l2: bool) -> Result<(), DatapathError> {
        if let Some((current, _)) = &self.attached.exit {
            if current == iface {
                return Ok(());
            }
            self.detach_exit()?;
        }
        if !self.exit.policy.values().any(|v| *v == PolicyValue::Local) {
            return Err(DatapathError::ExitNotReady);
        }
        let (ingress, egress) = if l2 {
            (names::EXIT_INGRESS_L2_PROG, names::EXIT_EGRESS_L2_PROG)
        } else {
            (names::EXIT_INGRESS_PROG, names::EXIT_EGRESS_PROG)
        };
        let links = self.attach_all(
            iface,
            [
                (ingress, TcAttachType::Ingress),
                (egress, TcAttachType::Egress),
            ],
        )?;
        self.attached.exit = Some((iface.to_owned(), links));
        self.set_exit_enforcing(true)?;
        info!(
            iface,
            clients = self.exit.clients.clients.len(),
            policy_entries = self.exit.policy.len(),
            "exit node data path attached"
        );
        Ok(())
    }

    /// Stops enforcing and detaches the exit programs.
    pub fn detach_exit(&mut self) -> Result<(), DatapathError> {
        let Some((iface, links)) = self.attached.exit.take() else {
            return Ok(());
        };
        let mut results = vec![self.set_exit_enforcing(false)];
        for a in links {
            results.push(self.detach_on(&iface, a));
        }
        info!(iface, "exit node data path detached");
        results.into_iter().collect()
    }

    /// The interface the exit programs are attached to.
    pub fn exit_interface(&self) -> Option<&str> {
        self.attached.exit.as_ref().map(|(i, _)| i.as_str())
    }

    /// Attaches the MSS clamp alone to both directions of `iface` (a LAN
    /// gateway's WireGuard interface, `l2 = false`, clamps its whole
    /// LAN<->tunnel path; a LAN interface takes `l2 = true`). Set the MSS
    /// with [`Datapath::set_mss`].
    pub fn attach_mss_clamp(&mut self, iface: &str, l2: bool) -> Result<(), DatapathError> {
        if self.attached.mss.contains_key(iface) {
            return Ok(());
        }
        let program = if l2 {
            names::MSS_CLAMP_L2_PROG
        } else {
            names::MSS_CLAMP_PROG
        };
        let links = self.attach_all(
            iface,
            [
                (program, TcAttachType::Ingress),
                (program, TcAttachType::Egress),
            ],
        )?;
        self.attached.mss.insert(iface.to_owned(), links);
        info!(iface, "TCP MSS clamp attached");
        Ok(())
    }

    /// Detaches the MSS clamp from `iface`.
    pub fn detach_mss_clamp(&mut self, iface: &str) -> Result<(), DatapathError> {
        let Some(links) = self.attached.mss.remove(iface) else {
            return Ok(());
        };
        let results: Vec<_> = links
            .into_iter()
            .map(|a| self.detach_on(iface, a))
            .collect();
        info!(iface, "TCP MSS clamp detached");
        results.into_iter().collect()
    }

    /// Interfaces with the MSS clamp alone attached.
    pub fn mss_clamped_interfaces(&self) -> Vec<String> {
        self.attached.mss.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mss_follows_the_mtu() {
        assert_eq!(
            mss_for_mtu(1420),
            MssConfig {
                mss_v4: 1380,
                mss_v6: 1360
            }
        );
        assert_eq!(
            mss_for_mtu(1500),
            MssConfig {
                mss_v4: 1460,
                mss_v6: 1440
            }
        );
        // A small link: no IPv6 there.
        assert_eq!(
            mss_for_mtu(500),
            MssConfig {
                mss_v4: 460,
                mss_v6: 0
            }
        );
        assert_eq!(mss_for_mtu(0), MssConfig::default());
    }
}
