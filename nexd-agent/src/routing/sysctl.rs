//! Sysctls nexd changes, and their original values.
//!
//! The originals are written to `<state-dir>/sysctl.saved` before anything
//! changes, so that after a crash the next nexd restores the values the
//! device had before nexd, not the ones the crashed instance left.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use tracing::{debug, info, warn};

/// Why a sysctl could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("sysctl {key}: {source}")]
pub struct SysctlError {
    pub key: String,
    pub source: io::Error,
}

fn path_of(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Reads a sysctl (in nexd's network namespace).
pub fn read(key: &str) -> Result<String, SysctlError> {
    std::fs::read_to_string(path_of(key))
        .map(|s| s.trim().to_owned())
        .map_err(|source| SysctlError {
            key: key.to_owned(),
            source,
        })
}

fn write(key: &str, value: &str) -> Result<(), SysctlError> {
    std::fs::write(path_of(key), value).map_err(|source| SysctlError {
        key: key.to_owned(),
        source,
    })
}

/// The sysctls nexd has changed, with their original values.
pub struct Sysctls {
    file: PathBuf,
    saved: BTreeMap<String, String>,
}

impl Sysctls {
    /// Opens the record in `state_dir`. Values left by a crashed nexd are
    /// restored right away: the device starts from its own settings.
    pub fn open(state_dir: &Path) -> Self {
        let file = state_dir.join("sysctl.saved");
        let saved: BTreeMap<String, String> = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let mut s = Sysctls {
            file,
            saved: BTreeMap::new(),
        };
        if !saved.is_empty() {
            warn!(
                count = saved.len(),
                "restoring sysctls left changed by a previous nexd"
            );
            s.saved = saved;
            s.restore_all();
        }
        s
    }

    fn persist(&self) {
        let result = if self.saved.is_empty() {
            match std::fs::remove_file(&self.file) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            serde_json::to_vec(&self.saved)
                .map_err(io::Error::other)
                .and_then(|b| std::fs::write(&self.file, b))
        };
        if let Err(e) = result {
            warn!(file = %self.file.display(), error = %e, "cannot record original sysctl values");
        }
    }

    /// Sets `key` to `value`, remembering the original the first time.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), SysctlError> {
        let current = read(key)?;
        if !self.saved.contains_key(key) {
            if current == value {
                return Ok(());
            }
            self.saved.insert(key.to_owned(), current.clone());
            self.persist();
        }
        if current != value {
            write(key, value)?;
            info!(key, value, "sysctl set");
        }
        Ok(())
    }

    /// Puts `key` back to its original value, if nexd changed it.
    pub fn restore(&mut self, key: &str) {
        if let Some(orig) = self.saved.remove(key) {
            match write(key, &orig) {
                Ok(()) => debug!(key, value = %orig, "sysctl restored"),
                Err(e) => warn!(error = %e, "cannot restore sysctl"),
            }
            self.persist();
        }
    }

    /// Puts every changed sysctl back.
    pub fn restore_all(&mut self) {
        let keys: Vec<String> = self.saved.keys().cloned().collect();
        for k in keys {
            self.restore(&k);
        }
    }
}
