//! `cargo xtask fuzz`: runs every cargo-fuzz target for a bounded time.
//! Seeds come from fuzz/corpus/<target> (committed); what libFuzzer finds
//! goes to a scratch directory, so a run never dirties the tree. A crash
//! fails the run and leaves its input in fuzz/artifacts/<target>/: turn it
//! into a unit test next to the code it broke.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{
    progress::step,
    setup::{self, Need},
    workspace,
};

/// The targets, in fuzz/fuzz_targets.
pub const TARGETS: [&str; 3] = ["control_request", "mesh_file", "announcement"];

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Only this target.
    #[arg(long)]
    pub target: Option<String>,
    /// Build the targets without optimisation (`cargo fuzz build --dev`,
    /// still with AddressSanitizer and debug assertions): much quicker to
    /// build from nothing, fewer runs a second. For a short smoke run like
    /// CI's; fuzzing to find something wants the optimised default.
    #[arg(long)]
    pub dev: bool,
}

impl Args {
    /// cargo fuzz's build flags (the same for `build` and `run`, so `run`
    /// finds the build fresh).
    fn build_flags(&self) -> &'static [&'static str] {
        if self.dev {
            &["--dev"]
        } else {
            &["--release", "--debug-assertions"]
        }
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let fuzz_dir = workspace::root().join("fuzz");
    let targets: Vec<&str> = TARGETS
        .iter()
        .copied()
        .filter(|t| args.target.as_deref().is_none_or(|w| w == *t))
        .collect();
    if targets.is_empty() {
        bail!(
            "no fuzz target called {:?}; targets: {}",
            args.target,
            TARGETS.join(", ")
        );
    }
    setup::ensure("fuzzing", &[Need::Build, Need::Fuzz])?;
    step(&format!(
        "building the fuzz targets (nightly, AddressSanitizer, {})",
        if args.dev { "unoptimised" } else { "optimised" }
    ));
    let mut build = nightly_cargo()?;
    build
        .current_dir(&fuzz_dir)
        .args(["fuzz", "build"])
        .args(args.build_flags());
    if !build
        .status()
        .context("cannot run cargo fuzz; `cargo xtask setup` installs it")?
        .success()
    {
        bail!("building the fuzz targets failed");
    }
    for t in targets {
        step(&format!("fuzzing {t} for {} s", args.seconds));
        let scratch = std::env::temp_dir().join(format!("nexd-fuzz-{}-{t}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        let status = nightly_cargo()?
            .current_dir(&fuzz_dir)
            .args(["fuzz", "run"])
            .args(args.build_flags())
            .arg(t)
            .arg(&scratch)
            .arg(fuzz_dir.join("corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .arg("-rss_limit_mb=2048")
            .status()
            .context("cannot run cargo fuzz")?;
        let _ = std::fs::remove_dir_all(&scratch);
        if !status.success() {
            bail!(
                "fuzz target {t} found a failure: see fuzz/artifacts/{t}/ and make it a unit test"
            );
        }
    }
    Ok(())
}

/// `rustup run <pinned nightly> cargo`, clean of the outer cargo's
/// variables (cargo-fuzz needs nightly for -Zsanitizer; the pinned one is
/// the one `cargo xtask setup` installs).
fn nightly_cargo() -> anyhow::Result<Command> {
    let c = crate::workspace::cargo_command();
    let mut n = Command::new("rustup");
    n.args(["run", &crate::workspace::nightly()?, "cargo"]);
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => n.env(k, v),
            None => n.env_remove(k),
        };
    }
    n.env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC");
    if let Some(dir) = c.get_current_dir() {
        n.current_dir(dir);
    }
    Ok(n)
}
