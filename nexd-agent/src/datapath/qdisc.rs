//! The clsact qdisc on kernels without TCX (before 6.6): nexd adds it to
//! attach its filters, so nexd removes it again, but only where nexd added
//! it (another tool's clsact, and its filters, are not nexd's to touch)
//! and only once no filter is left on it (deleting a clsact deletes its
//! filters: a kill switch's guard filter that must stay keeps it).
//!
//! aya adds a clsact but can neither list filters nor delete a qdisc, so
//! this asks `tc` (iproute2, which the package depends on; the offline
//! check already reads filters through it).

use std::process::Command;

use aya::programs::tc;
use tracing::{debug, info};

use super::DatapathError;

/// Adds a clsact qdisc to `iface`. `Ok(true)`: nexd added it now;
/// `Ok(false)`: one was there already (a previous nexd's, or another
/// tool's).
pub fn add_clsact(iface: &str) -> Result<bool, DatapathError> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(true),
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(source) => Err(DatapathError::Qdisc {
            iface: iface.to_owned(),
            source: Box::new(source),
        }),
    }
}

/// Whether `iface` has a clsact qdisc now.
pub fn has_clsact(iface: &str) -> bool {
    tc_output(&["qdisc", "show", "dev", iface]).is_some_and(|out| {
        out.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("clsact"))
    })
}

/// Removes the clsact qdisc from `iface` when no filter is left on it
/// (either direction). Returns whether it was removed; an interface that
/// is gone, or a qdisc already gone, is not an error.
pub fn remove_clsact_if_empty(iface: &str) -> Result<bool, String> {
    if !has_clsact(iface) {
        return Ok(false);
    }
    for dir in ["ingress", "egress"] {
        let filters = tc_output(&["filter", "show", "dev", iface, dir])
            .ok_or_else(|| format!("cannot list the tc filters on {iface} ({dir})"))?;
        if !filters.trim().is_empty() {
            debug!(iface, dir, "clsact still has filters; kept");
            return Ok(false);
        }
    }
    let out = Command::new("tc")
        .args(["qdisc", "del", "dev", iface, "clsact"])
        .output()
        .map_err(|e| format!("running tc: {e}"))?;
    if out.status.success() {
        info!(iface, "removed the clsact qdisc nexd added");
        Ok(true)
    } else if !has_clsact(iface) {
        Ok(false)
    } else {
        Err(format!(
            "tc qdisc del dev {iface} clsact: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn tc_output(args: &[&str]) -> Option<String> {
    let out = Command::new("tc").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
