//! nexd: a WireGuard mesh agent with an eBPF exit-node data path.
//!
//! One module per concern, each the single owner of the kernel objects it
//! creates; see docs/ARCHITECTURE.md for the map.

pub mod announce;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod devsock;
pub mod dns;
pub mod exclude;
pub mod exit;
pub mod exit_group;
pub mod instance;
pub mod keys;
pub mod ledger;
pub mod mesh;
pub mod metrics;
pub mod netif;
pub mod netlink;
pub mod notify;
pub mod offline;
pub mod registry;
pub mod routing;
pub mod state_file;
#[cfg(test)]
pub(crate) mod testing;
pub mod wireguard;

/// An error and its causes on one line, each cause once: nexd's error
/// messages already quote their source, so a cause whose text is part of
/// what came before is left out (anyhow's `{:#}` would repeat it).
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
