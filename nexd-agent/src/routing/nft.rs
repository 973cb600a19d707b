//! Running nftables transactions with the `nft` tool. Each script is one
//! transaction: it applies completely or not at all.

use std::{
    fmt,
    io::Write as _,
    process::{Command, Stdio},
};

use tracing::warn;

/// Why an nftables change failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run `nft` ({0}); install nftables")]
    Spawn(std::io::Error),
    #[error("nft rejected the change: {0}")]
    Rejected(String),
}

/// Applies `script` as one transaction (`nft -f -`).
pub fn apply(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Rejected(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// An nftables table of nexd's: named once, by the module that owns it
/// (`forward`, `gateway`, `dns`), and listed for clean-up and for the
/// record in [`super::NFT_TABLES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    pub family: &'static str,
    pub name: &'static str,
}

impl Table {
    /// The start of a script that replaces the table, or of one that
    /// deletes it: "add" first makes the delete succeed whether or not it
    /// existed, and the script is one transaction, so the table is never
    /// missing in between.
    pub fn clear_script(self) -> String {
        format!("add table {self}\ndelete table {self}\n")
    }

    /// Deletes the table if it exists.
    pub fn delete(self) -> Result<(), NftError> {
        apply(&self.clear_script())
    }

    /// Deletes the table (also one left by a crashed nexd); a failure is
    /// logged, for callers on their way out that can do nothing else.
    pub fn remove(self) {
        if let Err(e) = self.delete() {
            warn!(error = %e, "cannot delete nftables table {self}");
        }
    }

    /// The table's named counters: name -> packets.
    pub fn counters(self) -> Result<std::collections::BTreeMap<String, u64>, NftError> {
        let out = Command::new("nft")
            .args(["-j", "list", "counters", "table", self.family, self.name])
            .stdin(Stdio::null())
            .output()
            .map_err(NftError::Spawn)?;
        if !out.status.success() {
            return Err(NftError::Rejected(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        counters_of(&out.stdout)
            .map_err(|e| NftError::Rejected(format!("unreadable counter listing: {e}")))
    }

    /// Whether the table exists.
    pub fn exists(self) -> Result<bool, NftError> {
        let out = Command::new("nft")
            .args(["list", "table", self.family, self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(NftError::Spawn)?;
        Ok(out.success())
    }
}

/// Named counters in `nft -j list counters` output: name -> packets.
fn counters_of(json: &[u8]) -> Result<std::collections::BTreeMap<String, u64>, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let list = v["nftables"]
        .as_array()
        .ok_or_else(|| "no \"nftables\" list".to_owned())?;
    Ok(list
        .iter()
        .filter_map(|e| {
            let c = &e["counter"];
            Some((c["name"].as_str()?.to_owned(), c["packets"].as_u64()?))
        })
        .collect())
}

/// "family name", as `nft` writes it (and the record keeps it).
impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.family, self.name)
    }
}

/// Deletes every table of `tables` that exists, in one transaction: one
/// `nft` run instead of one per table (each run costs 10-30 ms, most of it
/// starting `nft`).
pub fn delete_tables(tables: &[Table]) -> Result<(), NftError> {
    apply(&delete_tables_script(tables))
}

fn delete_tables_script(tables: &[Table]) -> String {
    tables.iter().map(|t| t.clear_script()).collect()
}

/// Checks `script` with `nft -c` in a network namespace of its own:
/// nothing is applied anywhere. For unit tests of generated rulesets;
/// needs root (unshare) and nft.
#[cfg(test)]
pub fn check(script: &str) -> Result<(), String> {
    match nexd_testkit::privileged() {
        Ok(true) => {}
        Ok(false) => return Ok(()),
        Err(e) => return Err(e.to_string()),
    }
    let mut child = Command::new("unshare")
        .args(["--net", "nft", "-c", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run unshare nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_are_read_by_name() {
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "inet", "name": "forwarded", "table": "nexd", "handle": 4, "packets": 12, "bytes": 900}}, {"counter": {"family": "inet", "name": "flow_limit_0", "table": "nexd", "handle": 5, "packets": 3, "bytes": 90}}]}"#;
        let c = super::counters_of(json).expect("listing");
        assert_eq!(c.len(), 2);
        assert_eq!(c["forwarded"], 12);
        assert_eq!(c["flow_limit_0"], 3);
        assert!(super::counters_of(b"not json").is_err());
    }

    #[test]
    fn one_transaction_deletes_tables_that_may_not_exist() {
        let table = |name| super::Table {
            family: "inet",
            name,
        };
        let s = super::delete_tables_script(&[table("nexd"), table("nexd_gw")]);
        assert_eq!(
            s,
            "add table inet nexd\ndelete table inet nexd\nadd table inet nexd_gw\ndelete table inet nexd_gw\n"
        );
        if let Err(e) = super::check(&s) {
            panic!("{e}");
        }
    }
}
