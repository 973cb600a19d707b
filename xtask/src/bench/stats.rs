//! Min / median / max, ratios, and the report table.

use serde::Serialize;

/// A series of measurements of one thing.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stats {
    pub fn of(samples: &[f64]) -> Self {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let median = if v.is_empty() {
            f64::NAN
        } else if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Stats {
            min: v.first().copied().unwrap_or(f64::NAN),
            median,
            max: v.last().copied().unwrap_or(f64::NAN),
            samples: samples.to_vec(),
        }
    }
}

/// One line of the report: nexd against its baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub benchmark: String,
    pub case: String,
    pub unit: String,
    pub baseline_name: String,
    pub baseline: Stats,
    pub nexd: Stats,
    /// median(nexd) / median(baseline).
    pub ratio: f64,
    /// Whether a higher figure is better (pps, throughput) or worse (time).
    pub higher_is_better: bool,
}

impl Row {
    pub fn new(
        benchmark: &str,
        case: &str,
        unit: &str,
        baseline_name: &str,
        baseline: &[f64],
        nexd: &[f64],
        higher_is_better: bool,
    ) -> Self {
        let b = Stats::of(baseline);
        let n = Stats::of(nexd);
        let ratio = n.median / b.median;
        let row = Row {
            benchmark: benchmark.into(),
            case: case.into(),
            unit: unit.into(),
            baseline_name: baseline_name.into(),
            baseline: b,
            nexd: n,
            ratio,
            higher_is_better,
        };
        println!(
            "  {:<34} {:<22} {:>12} vs {:>12} {:<8} ratio {:.3}",
            case,
            baseline_name,
            fmt(row.nexd.median),
            fmt(row.baseline.median),
            unit,
            ratio
        );
        row
    }
}

fn fmt(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// The report: one line per row, min/median/max of both sides.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<12} {:<34} {:<8} {:<22} {:>30} {:>30} {:>7}\n",
        "BENCHMARK",
        "CASE",
        "UNIT",
        "BASELINE",
        "BASELINE min/med/max",
        "NEXD min/med/max",
        "RATIO"
    );
    for r in rows {
        let s = |s: &Stats| format!("{}/{}/{}", fmt(s.min), fmt(s.median), fmt(s.max));
        out.push_str(&format!(
            "{:<12} {:<34} {:<8} {:<22} {:>30} {:>30} {:>7.3}\n",
            r.benchmark,
            r.case,
            r.unit,
            r.baseline_name,
            s(&r.baseline),
            s(&r.nexd),
            r.ratio
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_series() {
        assert_eq!(Stats::of(&[3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Stats::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        let s = Stats::of(&[5.0, 1.0]);
        assert_eq!((s.min, s.max), (1.0, 5.0));
    }
}
