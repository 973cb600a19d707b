//! Finding the nexd and nexctl binaries under test.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

/// Directory holding `nexd` and `nexctl`: `$NEXD_BIN_DIR` if set, else the
/// cargo profile directory this test binary was built into
/// (target/<profile>/deps/<test> -> target/<profile>).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("NEXD_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of a binary of the workspace, checked to exist.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.exists() {
        bail!(
            "{} not found; build it first with `cargo build -p nexd-agent --bins` (`cargo xtask test` does), or set NEXD_BIN_DIR",
            path.display()
        );
    }
    Ok(path)
}

/// The nexd binary.
pub fn nexd() -> anyhow::Result<PathBuf> {
    bin("nexd")
}

/// The nexctl binary.
pub fn nexctl() -> anyhow::Result<PathBuf> {
    bin("nexctl")
}
