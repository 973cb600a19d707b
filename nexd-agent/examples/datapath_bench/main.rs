//! The benchmarks that load nexd's eBPF programs in-process, run by
//! `cargo xtask bench` through cargo (`cargo run --example datapath_bench`),
//! so xtask itself never links the agent and its eBPF build:
//!
//! * `classifier`: the steering classifier's ns/packet under
//!   BPF_PROG_TEST_RUN against a no-op program;
//! * `split`: packets per second and softirq CPU per packet through a
//!   gateway namespace with N excluded prefixes, nexd's classifier against
//!   ip rules and an nftables interval set.
//!
//! Prints progress, and writes the raw samples of every row as JSON
//! (`--json PATH`) for xtask's report. Needs root.

mod classifier;
mod split;

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use serde::Serialize;

/// Sizes and repetitions of a run.
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

/// One row of the report: nexd's samples against its baseline's, measured
/// alternately in the same run.
#[derive(Debug, Serialize)]
pub struct Samples {
    pub benchmark: String,
    pub case: String,
    pub unit: String,
    pub baseline_name: String,
    pub baseline: Vec<f64>,
    pub nexd: Vec<f64>,
    pub higher_is_better: bool,
}

impl Samples {
    pub fn new(
        benchmark: &str,
        case: &str,
        unit: &str,
        baseline_name: &str,
        baseline: &[f64],
        nexd: &[f64],
        higher_is_better: bool,
    ) -> Self {
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        println!(
            "  {case:<34} {baseline_name:<22} {:>12.1} vs {:>12.1} {unit}",
            median(nexd),
            median(baseline)
        );
        Samples {
            benchmark: benchmark.into(),
            case: case.into(),
            unit: unit.into(),
            baseline_name: baseline_name.into(),
            baseline: baseline.to_vec(),
            nexd: nexd.to_vec(),
            higher_is_better,
        }
    }
}

struct Args {
    plan: Plan,
    only: Vec<String>,
    json: Option<PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        plan: Plan {
            quick: false,
            rounds: 5,
        },
        only: Vec::new(),
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.plan.quick = true,
            "--rounds" => {
                a.plan.rounds = it
                    .next()
                    .context("--rounds needs a number")?
                    .parse()
                    .context("--rounds needs a number")?;
            }
            "--only" => a.only.push(it.next().context("--only needs a name")?),
            "--json" => a.json = Some(it.next().context("--json needs a path")?.into()),
            other => bail!(
                "unknown argument {other:?} (known: --quick, --rounds N, --only classifier|split, --json PATH)"
            ),
        }
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let wanted = |name: &str| a.only.is_empty() || a.only.iter().any(|o| o == name);
    let mut rows = Vec::new();
    if wanted("classifier") {
        println!("classifier cost per packet (BPF_PROG_TEST_RUN)");
        rows.extend(classifier::run(&a.plan)?);
    }
    if wanted("split") {
        println!("split tunnelling at scale (packets per second through a gateway)");
        rows.extend(split::run(&a.plan)?);
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
