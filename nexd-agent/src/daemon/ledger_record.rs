//! The daemon's side of the record of what is installed (`ledger`): what a
//! previous nexd left (read once at start), and the record of this run,
//! rewritten in the state directory whenever what is installed changes.
//! The parts that change are reported by their owners; this component
//! only adds the fixed settings and writes the file.

use std::path::PathBuf;

use tracing::warn;

use crate::{
    ledger::{self, Ledger},
    routing::PolicyNumbers,
};

/// The fixed part of the record, from the command line.
#[derive(Debug, Clone)]
pub struct RecordSettings {
    pub state_dir: PathBuf,
    pub interface: String,
    pub bpffs: PathBuf,
    pub numbers: PolicyNumbers,
    pub kill_switch: bool,
    pub lan_interfaces: Vec<String>,
}

/// What changes while nexd runs, each part from its owner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// The exit-node client is wanted (by flag or by `nexctl`).
    pub exit_wanted: bool,
    pub guard_interfaces: Vec<String>,
    pub clsact_interfaces: Vec<String>,
    /// "family name" of every nftables table in place.
    pub nft_tables: Vec<String>,
}

/// What a previous nexd that did not clean up left for this one to act on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Previous {
    /// Exit mode was wanted and the kill switch holds: resume exit mode
    /// and take the pinned guard over instead of removing it.
    pub resume_exit: bool,
    /// The nexd that wrote the record.
    pub pid: u32,
    /// The clsact qdiscs it added.
    pub clsact_interfaces: Vec<String>,
}

pub struct Record {
    settings: RecordSettings,
    /// As last written (`None`: not yet, or the write failed).
    written: Option<Ledger>,
}

impl Record {
    pub fn new(settings: RecordSettings) -> Self {
        Record {
            settings,
            written: None,
        }
    }

    /// What a previous nexd left, if its record is valid. Only with the
    /// kill switch on now does exit mode resume: otherwise its guard is
    /// removed like any leftover.
    pub fn previous(&self) -> Previous {
        let previous = match ledger::read(&self.settings.state_dir) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "ignoring the record of a previous nexd");
                None
            }
        };
        let Some(p) = previous else {
            return Previous::default();
        };
        Previous {
            resume_exit: self.settings.kill_switch && p.exit_wanted,
            pid: p.pid,
            clsact_interfaces: p.clsact_interfaces,
        }
    }

    /// Rewrites the record when what is installed changed.
    pub fn write(&mut self, installed: Installed) {
        let s = &self.settings;
        let now = Ledger {
            pid: std::process::id(),
            interface: s.interface.clone(),
            bpffs: s.bpffs.clone(),
            exit_table: s.numbers.table,
            exit_fwmark: s.numbers.fwmark,
            exit_rule_priority: s.numbers.priority,
            exit_wanted: installed.exit_wanted,
            kill_switch: s.kill_switch,
            guard_interfaces: installed.guard_interfaces,
            clsact_interfaces: installed.clsact_interfaces,
            lan_interfaces: s.lan_interfaces.clone(),
            nft_tables: installed.nft_tables,
        };
        if self.written.as_ref() == Some(&now) {
            return;
        }
        match ledger::write(&s.state_dir, &now) {
            Ok(()) => self.written = Some(now),
            Err(e) => warn!(error = %e, "cannot record what nexd installed in its state directory"),
        }
    }

    /// Everything is gone: nothing is left for a successor to adopt.
    pub fn remove(&mut self) {
        ledger::remove(&self.settings.state_dir);
        self.written = None;
    }
}
