//! Running nftables transactions with the `nft` tool. Each script is one
//! transaction: it applies completely or not at all.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

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

/// Deletes the table `family name` if it exists.
pub fn delete_table(family: &str, name: &str) -> Result<(), NftError> {
    // "add" first makes the delete succeed whether or not it existed, in
    // one transaction.
    apply(&format!(
        "add table {family} {name}\ndelete table {family} {name}\n"
    ))
}

/// Deletes every table of `tables` (`(family, name)`) that exists, in one
/// transaction: one `nft` run instead of one per table (each run costs
/// 10-30 ms, most of it starting `nft`).
pub fn delete_tables(tables: &[(&str, &str)]) -> Result<(), NftError> {
    apply(&delete_tables_script(tables))
}

/// "add" first makes each delete succeed whether or not the table existed.
fn delete_tables_script(tables: &[(&str, &str)]) -> String {
    tables
        .iter()
        .map(|(family, name)| format!("add table {family} {name}\ndelete table {family} {name}\n"))
        .collect()
}

/// Whether the table `family name` exists.
pub fn table_exists(family: &str, name: &str) -> Result<bool, NftError> {
    let out = Command::new("nft")
        .args(["list", "table", family, name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(NftError::Spawn)?;
    Ok(out.success())
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
    fn one_transaction_deletes_tables_that_may_not_exist() {
        let s = super::delete_tables_script(&[("inet", "nexd"), ("inet", "nexd_gw")]);
        assert_eq!(
            s,
            "add table inet nexd\ndelete table inet nexd\nadd table inet nexd_gw\ndelete table inet nexd_gw\n"
        );
        if let Err(e) = super::check(&s) {
            panic!("{e}");
        }
    }
}
