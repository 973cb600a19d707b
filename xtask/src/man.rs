//! `cargo xtask man`: man pages for nexd and nexctl, generated from their
//! clap definitions by nexctl's hidden `man` command (so xtask need not
//! link the agent): one page per command and subcommand, section 8.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

use crate::{
    progress::step,
    setup::{self, Need},
    workspace,
};

#[derive(clap::Args)]
pub struct Args {
    /// Where to write the pages.
    #[arg(long, default_value = "target/man")]
    pub out: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        workspace::root().join(&args.out)
    };
    setup::ensure("the man pages (nexctl writes them)", &[Need::Build])?;
    step(&format!("writing man pages to {}", out.display()));
    let status = crate::workspace::cargo_command()
        .args([
            "run",
            "--package",
            "nexd-agent",
            "--bin",
            "nexctl",
            "--",
            "man",
        ])
        .arg(&out)
        .status()
        .context("running nexctl man")?;
    if !status.success() {
        bail!("generating the man pages failed ({status})");
    }
    println!("view with: man {}", out.join("nexctl.8").display());
    Ok(())
}
