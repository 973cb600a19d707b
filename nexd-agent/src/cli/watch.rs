//! `--watch` for nexctl's listings: the same request again every interval,
//! redrawn in place on a terminal (one document per refresh in JSON or
//! YAML, and a blank line between tables when the output is not a
//! terminal, so a log or a pipe keeps every refresh). For the exit node's
//! clients, the rates since the last refresh are added.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use super::output::{OutputFormat, human_bytes};
use crate::control::protocol::ExitClientRow;

/// `--watch [SECONDS]` and `--count N`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WatchArgs {
    /// Redraw every SECONDS (default 1) until interrupted.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1")]
    pub watch: Option<f64>,
    /// With --watch: stop after N refreshes.
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
}

/// Why a watch cannot start.
#[derive(Debug, thiserror::Error)]
#[error("--watch {0}: the interval must be between 0.1 and 3600 seconds")]
pub struct BadInterval(f64);

impl WatchArgs {
    /// The interval, if watching.
    pub fn interval(&self) -> Result<Option<Duration>, BadInterval> {
        match self.watch {
            None => Ok(None),
            Some(s) if (0.1..=3600.0).contains(&s) => Ok(Some(Duration::from_secs_f64(s))),
            Some(s) => Err(BadInterval(s)),
        }
    }
}

/// Runs `view` every `interval` (at most `count` times), each rendering
/// the whole screen; a failed refresh shows its error and the next one
/// tries again (nexd restarting is worth watching too).
pub fn run<E: std::fmt::Display>(
    format: OutputFormat,
    interval: Duration,
    count: Option<u64>,
    mut view: impl FnMut() -> Result<String, E>,
) {
    let redraw = std::io::stdout().is_terminal()
        && matches!(format, OutputFormat::Column | OutputFormat::NoHeader);
    let mut n = 0u64;
    loop {
        let started = Instant::now();
        let body = view().unwrap_or_else(|e| format!("error: {e}\n"));
        let mut out = std::io::stdout().lock();
        let written = if redraw {
            // Home, clear, then the header line and the view.
            write!(
                out,
                "\x1b[H\x1b[2J every {:.1}s\n\n{body}",
                interval.as_secs_f64()
            )
        } else if n > 0 && matches!(format, OutputFormat::Column | OutputFormat::NoHeader) {
            write!(out, "\n{body}")
        } else {
            write!(out, "{body}")
        };
        if written.and_then(|()| out.flush()).is_err() {
            // The reader went away (a closed pipe): nothing to show to.
            return;
        }
        drop(out);
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return;
        }
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}

/// Each client's bytes per second received from it and sent to it since
/// the previous refresh, by name. A client new since then, or whose
/// counters went down (the exit node restarted), has no rate yet.
pub fn client_rates(
    before: &[ExitClientRow],
    now: &[ExitClientRow],
    elapsed: Duration,
) -> BTreeMap<String, (f64, f64)> {
    let secs = elapsed.as_secs_f64();
    let mut out = BTreeMap::new();
    if secs <= 0.0 {
        return out;
    }
    for c in now {
        let Some(b) = before.iter().find(|b| b.client == c.client) else {
            continue;
        };
        if let (Some(rx), Some(tx)) = (
            c.rx_bytes.checked_sub(b.rx_bytes),
            c.tx_bytes.checked_sub(b.tx_bytes),
        ) {
            out.insert(c.client.clone(), (rx as f64 / secs, tx as f64 / secs));
        }
    }
    out
}

/// A rate for a table cell: bytes per second, or "-" without one.
pub fn rate_cell(rate: Option<f64>) -> String {
    match rate {
        // Rounded to whole bytes for the display only.
        Some(r) if r.is_finite() && r >= 0.0 => format!("{}/s", human_bytes(r.round() as u64)),
        _ => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(client: &str, rx: u64, tx: u64) -> ExitClientRow {
        ExitClientRow {
            client: client.into(),
            rx_bytes: rx,
            tx_bytes: tx,
            ..ExitClientRow::default()
        }
    }

    #[test]
    fn rates_come_from_the_difference_since_the_last_refresh() {
        let before = [row("a", 1000, 0), row("b", 5000, 5000)];
        let now = [row("a", 3000, 1000), row("b", 100, 100), row("c", 9, 9)];
        let r = client_rates(&before, &now, Duration::from_secs(2));
        assert_eq!(r.get("a"), Some(&(1000.0, 500.0)));
        // Counters that went down (a restart) and a new client: no rate.
        assert_eq!(r.get("b"), None);
        assert_eq!(r.get("c"), None);
        assert!(client_rates(&before, &now, Duration::ZERO).is_empty());
        assert_eq!(rate_cell(Some(2048.0)), "2.00KiB/s");
        assert_eq!(rate_cell(None), "-");
    }

    #[test]
    fn the_interval_is_bounded() {
        let w = |s| WatchArgs {
            watch: Some(s),
            count: None,
        };
        assert_eq!(
            w(1.0).interval().ok().flatten(),
            Some(Duration::from_secs(1))
        );
        assert!(w(0.0).interval().is_err());
        assert!(w(f64::NAN).interval().is_err());
        assert!(w(7200.0).interval().is_err());
        assert_eq!(WatchArgs::default().interval().ok().flatten(), None);
    }
}
