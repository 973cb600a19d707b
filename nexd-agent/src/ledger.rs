//! The record of what a running nexd installed, kept in its state
//! directory (`installed.json`) and rewritten whenever that changes. A
//! clean stop removes everything and then the record; a crash leaves it.
//!
//! Two readers need it after a crash. A restarted nexd: if exit mode was
//! wanted (also when it was enabled with nexctl, not by flag) and the kill
//! switch still holds, it resumes exit mode and takes the pinned leak
//! guard over instead of removing it. And `nexctl … disable` with nexd
//! dead: it removes what the record names as well as what it finds by
//! nexd's fixed names, so a changed configuration cannot hide something
//! the dead instance installed.
//!
//! The file is nexd's (0600 in a 0700 directory), but it is read back only
//! after checking every field the way the command line checks the same
//! setting: a damaged or hand-edited record cannot make nexd or nexctl
//! touch anything but nexd's own objects.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::routing;

/// File name inside the state directory.
pub const FILE: &str = "installed.json";

/// What an instance installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ledger {
    /// The nexd that wrote it.
    pub pid: u32,
    pub interface: String,
    pub bpffs: PathBuf,
    pub exit_table: u32,
    pub exit_fwmark: u32,
    pub exit_rule_priority: u32,
    /// The exit-node client was wanted (by flag or by `nexctl … enable`).
    pub exit_wanted: bool,
    pub kill_switch: bool,
    /// Interfaces the leak guard is attached to.
    pub guard_interfaces: Vec<String>,
    /// LAN interfaces with the steering classifier.
    pub lan_interfaces: Vec<String>,
    /// nftables tables, as "family name" (`routing::nft::Table` written
    /// out), among `routing::NFT_TABLES`.
    pub nft_tables: Vec<String>,
    /// Interfaces whose clsact qdisc nexd added (kernels without TCX).
    /// Absent in records of older versions.
    #[serde(default)]
    pub clsact_interfaces: Vec<String>,
}

/// Why a record was not used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a record nexd wrote: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn valid_iface(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
}

impl Ledger {
    /// Every field as the command line would accept it.
    fn check(&self) -> Result<(), String> {
        routing::check_table(self.exit_table)?;
        routing::check_fwmark(self.exit_fwmark)?;
        routing::check_priority(self.exit_rule_priority)?;
        for i in std::iter::once(&self.interface)
            .chain(&self.guard_interfaces)
            .chain(&self.lan_interfaces)
            .chain(&self.clsact_interfaces)
        {
            if !valid_iface(i) {
                return Err(format!("{i:?} is not an interface name"));
            }
        }
        if !self.bpffs.is_absolute() || self.bpffs.components().any(|c| c.as_os_str() == "..") {
            return Err(format!(
                "bpffs {} is not an absolute path",
                self.bpffs.display()
            ));
        }
        if let Some(t) = self
            .nft_tables
            .iter()
            .find(|t| !routing::NFT_TABLES.iter().any(|n| n.to_string() == **t))
        {
            return Err(format!("{t:?} is not one of nexd's nftables tables"));
        }
        Ok(())
    }

    /// The routing numbers it names.
    pub fn policy(&self) -> routing::PolicyNumbers {
        routing::PolicyNumbers {
            table: self.exit_table,
            fwmark: self.exit_fwmark,
            priority: self.exit_rule_priority,
        }
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The record a previous nexd left in `state_dir`, if any.
pub fn read(state_dir: &Path) -> Result<Option<Ledger>, LedgerError> {
    let path = path(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LedgerError::Read { path, source }),
    };
    let ledger: Ledger = serde_json::from_str(&text).map_err(|e| LedgerError::Invalid {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    ledger
        .check()
        .map_err(|reason| LedgerError::Invalid { path, reason })?;
    Ok(Some(ledger))
}

/// Writes `ledger` atomically (a reader sees the old or the new record).
pub fn write(state_dir: &Path, ledger: &Ledger) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(ledger).map_err(io::Error::other)?;
    crate::state_file::replace(&path(state_dir), &bytes)
}

/// Removes the record (a clean stop, or everything was removed offline).
pub fn remove(state_dir: &Path) {
    match std::fs::remove_file(path(state_dir)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(error = %e, "cannot remove {}", path(state_dir).display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Ledger {
        Ledger {
            pid: 7,
            interface: "wg0".into(),
            bpffs: "/sys/fs/bpf".into(),
            exit_table: 28280,
            exit_fwmark: 0x6e78,
            exit_rule_priority: 28278,
            exit_wanted: true,
            kill_switch: true,
            guard_interfaces: vec!["eth0".into()],
            lan_interfaces: vec![],
            nft_tables: vec!["inet nexd_dns".into()],
            clsact_interfaces: vec!["eth0".into()],
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nexd-ledger-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    #[test]
    fn a_record_of_an_older_version_reads_without_clsact() {
        let d = dir("old");
        let mut v = serde_json::to_value(sample()).expect("json");
        v.as_object_mut()
            .expect("object")
            .remove("clsact_interfaces");
        std::fs::write(path(&d), v.to_string()).expect("write");
        let l = read(&d).expect("read").expect("some");
        assert!(l.clsact_interfaces.is_empty());
        remove(&d);
    }

    #[test]
    fn a_record_may_name_every_table_nexd_creates_as_earlier_versions_wrote_it() {
        let d = dir("tables");
        let l = Ledger {
            nft_tables: vec![
                "inet nexd".into(),
                "inet nexd_gw".into(),
                "inet nexd_dns".into(),
            ],
            ..sample()
        };
        write(&d, &l).expect("write");
        assert_eq!(read(&d).expect("read"), Some(l));
        let named: Vec<String> = routing::NFT_TABLES.iter().map(|t| t.to_string()).collect();
        assert_eq!(
            named,
            ["inet nexd", "inet nexd_gw", "inet nexd_dns", "inet nexd_ks"]
        );
        remove(&d);
    }

    #[test]
    fn round_trip_and_removal() {
        let d = dir("rt");
        assert!(read(&d).expect("none").is_none());
        write(&d, &sample()).expect("write");
        assert_eq!(read(&d).expect("read"), Some(sample()));
        remove(&d);
        assert!(read(&d).expect("gone").is_none());
    }

    #[test]
    fn a_record_naming_what_is_not_nexds_is_refused() {
        let d = dir("bad");
        for (what, l) in [
            (
                "main table",
                Ledger {
                    exit_table: 254,
                    ..sample()
                },
            ),
            (
                "zero mark",
                Ledger {
                    exit_fwmark: 0,
                    ..sample()
                },
            ),
            (
                "priority 0",
                Ledger {
                    exit_rule_priority: 0,
                    ..sample()
                },
            ),
            (
                "interface",
                Ledger {
                    interface: "../../etc".into(),
                    ..sample()
                },
            ),
            (
                "guard iface",
                Ledger {
                    guard_interfaces: vec!["a b".into()],
                    ..sample()
                },
            ),
            (
                "clsact iface",
                Ledger {
                    clsact_interfaces: vec!["-o;x".into(), "eth0 x".into()],
                    ..sample()
                },
            ),
            (
                "table",
                Ledger {
                    nft_tables: vec!["inet filter".into()],
                    ..sample()
                },
            ),
            (
                "bpffs",
                Ledger {
                    bpffs: "relative".into(),
                    ..sample()
                },
            ),
        ] {
            write(&d, &l).expect("write");
            assert!(
                matches!(read(&d), Err(LedgerError::Invalid { .. })),
                "{what} accepted"
            );
        }
        std::fs::write(path(&d), b"{\"pid\": 1, \"extra\": true}").expect("write");
        assert!(matches!(read(&d), Err(LedgerError::Invalid { .. })));
    }
}
