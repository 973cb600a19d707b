//! `cargo xtask bench`: every figure is a ratio against a baseline measured
//! in the same run, baseline and nexd alternating, with min / median / max
//! over the rounds. `--quick` runs each benchmark once on tiny sizes (CI
//! runs that so the code never rots; nothing asserts a timing).

mod control;
mod datapath;
mod exit;
mod registry;
mod stats;
mod throughput;

use std::path::PathBuf;

use anyhow::bail;
pub use stats::Row;

use crate::{
    progress::step,
    setup::{self, Need},
};

#[derive(clap::Args)]
pub struct Args {
    /// Run every benchmark once on tiny sizes.
    #[arg(long)]
    pub quick: bool,
    /// Write the results as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Only these benchmarks (repeatable): classifier, split, throughput, control, exit, registry;
    /// `control-failover` is the enable and failover part of control alone, `control-scaling`
    /// its mesh-size part (start-up, reload, memory).
    #[arg(long = "only", value_name = "NAME")]
    pub only: Vec<String>,
    /// Rounds per measurement after the warm-up (ignored with --quick).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    pub no_setup: bool,
}

/// Sizes and durations for a run.
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
}

impl Plan {
    /// Rounds after the warm-up.
    pub fn rounds(&self) -> usize {
        if self.quick { 1 } else { self.rounds.max(1) }
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the benchmarks load eBPF programs and create network namespaces; run `sudo cargo xtask bench`"
        );
    }
    if !args.no_setup {
        setup::ensure(
            "the benchmarks",
            &[Need::Build, Need::Namespaces, Need::Tests, Need::Bench],
        )?;
    }
    // Measurements need optimised binaries; --quick only checks the code
    // runs, so the debug build CI already has will do.
    crate::workspace::build_agent(!args.quick)?;
    let plan = Plan {
        quick: args.quick,
        rounds: args.rounds,
    };
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let mut rows: Vec<Row> = Vec::new();
    let in_process: Vec<&str> = ["classifier", "split"]
        .into_iter()
        .filter(|b| wanted(b))
        .collect();
    if !in_process.is_empty() {
        step(
            "1-2. classifier cost per packet, split tunnelling at scale (the eBPF programs in-process)",
        );
        rows.extend(datapath::run(&plan, &in_process, !args.quick)?);
    }
    if wanted("throughput") {
        step("3. end-to-end throughput through the exit node");
        rows.extend(throughput::run(&plan)?);
    }
    if wanted("control") {
        step("4. control-plane timings and memory");
        rows.extend(control::run(&plan, control::Part::All)?);
    } else if args.only.iter().any(|o| o == "control-failover") {
        step("4. control-plane timings (enable and failover only)");
        rows.extend(control::run(&plan, control::Part::Failover)?);
    } else if args.only.iter().any(|o| o == "control-scaling") {
        step("4. control-plane timings and memory (mesh size only)");
        rows.extend(control::run(&plan, control::Part::Scaling)?);
    }
    if wanted("exit") {
        step("5. exit node policy: CPU per forwarded packet, eBPF against nftables");
        rows.extend(exit::run(&plan)?);
    }
    if wanted("registry") {
        step("6. membership through etcd: approval to the peer configured, start-up, RSS");
        rows.extend(registry::run(&plan)?);
    }
    println!();
    print!("{}", stats::table(&rows));
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "quick": args.quick,
            "rounds": plan.rounds(),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "results": rows,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
        println!("results written to {}", path.display());
    }
    Ok(())
}
