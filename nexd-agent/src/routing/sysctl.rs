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

/// IPv4 forwarding (exit node, LAN gateway).
pub const FORWARD_V4: &str = "net.ipv4.ip_forward";
/// IPv6 forwarding (exit node, LAN gateway).
pub const FORWARD_V6: &str = "net.ipv6.conf.all.forwarding";
/// Reverse-path checks honour marks (exit-node client, as wg-quick).
pub const SRC_VALID_MARK: &str = "net.ipv4.conf.all.src_valid_mark";

/// Every sysctl nexd ever sets. `sysctl.saved` names only these: anything
/// else found there is not nexd's to write back.
pub const KNOWN: [&str; 3] = [FORWARD_V4, FORWARD_V6, SRC_VALID_MARK];

/// The entries of a `sysctl.saved` nexd may restore: known keys with
/// decimal values; the rest is reported and ignored.
fn checked(saved: BTreeMap<String, String>) -> BTreeMap<String, String> {
    saved
        .into_iter()
        .filter(|(k, v)| {
            let known = KNOWN.contains(&k.as_str());
            let numeric = !v.trim().is_empty() && v.trim().bytes().all(|b| b.is_ascii_digit());
            if !(known && numeric) {
                warn!(key = %k, value = %v, "ignoring an entry of sysctl.saved: nexd sets only {KNOWN:?}, to decimal values");
            }
            known && numeric
        })
        .map(|(k, v)| (k, v.trim().to_owned()))
        .collect()
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
        let saved: BTreeMap<String, String> = match std::fs::read_to_string(&file) {
            Ok(t) => match serde_json::from_str(&t) {
                Ok(m) => checked(m),
                Err(e) => {
                    warn!(file = %file.display(), error = %e, "sysctl.saved is not a record nexd wrote; ignoring it");
                    BTreeMap::new()
                }
            },
            Err(_) => BTreeMap::new(),
        };
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

    /// Turns IPv4 and IPv6 forwarding on (exit node, LAN gateway),
    /// remembering the originals for [`Sysctls::restore_forwarding`].
    pub fn enable_forwarding(&mut self) -> Result<(), SysctlError> {
        self.set(FORWARD_V4, "1")?;
        self.set(FORWARD_V6, "1")
    }

    /// Puts IPv4 and IPv6 forwarding back to what they were.
    pub fn restore_forwarding(&mut self) {
        self.restore(FORWARD_V4);
        self.restore(FORWARD_V6);
    }

    /// Puts every changed sysctl back.
    pub fn restore_all(&mut self) {
        let keys: Vec<String> = self.saved.keys().cloned().collect();
        for k in keys {
            self.restore(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_keys_with_numeric_values_are_restored() {
        let saved: BTreeMap<String, String> = [
            (FORWARD_V4, "0"),
            (SRC_VALID_MARK, " 1\n"),
            ("kernel.core_pattern", "|/tmp/x"),
            (FORWARD_V6, "1; reboot"),
            ("net.ipv4.conf.all.rp_filter", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let ok = checked(saved);
        assert_eq!(ok.get(FORWARD_V4).map(String::as_str), Some("0"));
        assert_eq!(ok.get(SRC_VALID_MARK).map(String::as_str), Some("1"));
        assert_eq!(ok.len(), 2, "{ok:?}");
    }
}
