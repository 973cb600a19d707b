//! Benchmarks 1 and 2 (classifier cost, split tunnelling at scale) load
//! nexd's eBPF programs in-process, so they live with the agent as an
//! example (`nexd-agent/examples/datapath_bench`) and run through cargo:
//! xtask never links the agent, and a bare machine can run `cargo xtask
//! setup` before the eBPF toolchain exists.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde::Deserialize;

use super::{Plan, Row};

/// A row as the example writes it: the raw samples of both sides.
#[derive(Deserialize)]
struct Samples {
    benchmark: String,
    case: String,
    unit: String,
    baseline_name: String,
    baseline: Vec<f64>,
    nexd: Vec<f64>,
    higher_is_better: bool,
}

/// Runs the example for `only` (classifier, split) and returns its rows.
pub fn run(plan: &Plan, only: &[&str], release: bool) -> anyhow::Result<Vec<Row>> {
    let json =
        std::env::temp_dir().join(format!("nexd-bench-datapath-{}.json", std::process::id()));
    let mut c = crate::workspace::cargo_command();
    c.args([
        "run",
        "--package",
        "nexd-agent",
        "--example",
        "datapath_bench",
    ]);
    if release {
        c.arg("--release");
    }
    c.arg("--");
    if plan.quick {
        c.arg("--quick");
    }
    c.args(["--rounds", &plan.rounds().to_string()]);
    for o in only {
        c.args(["--only", o]);
    }
    c.arg("--json").arg(&json);
    let status = c.status().context("running the datapath benchmarks")?;
    if !status.success() {
        bail!("the datapath benchmarks failed ({status})");
    }
    let rows = read(&json);
    let _ = std::fs::remove_file(&json);
    rows
}

fn read(path: &Path) -> anyhow::Result<Vec<Row>> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let samples: Vec<Samples> = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not the benchmark's JSON", path.display()))?;
    Ok(samples
        .into_iter()
        .map(|s| {
            Row::new(
                &s.benchmark,
                &s.case,
                &s.unit,
                &s.baseline_name,
                &s.baseline,
                &s.nexd,
                s.higher_is_better,
            )
        })
        .collect())
}
