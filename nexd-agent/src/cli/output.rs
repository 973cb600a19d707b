//! Output formats shared by every nexctl listing: aligned columns (with or
//! without the header line) for people, JSON for scripts.

use std::fmt::Write as _;

use serde::Serialize;

/// `--output` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns with a header line.
    #[default]
    Column,
    /// Aligned columns without the header line, for `awk` and friends.
    NoHeader,
    /// JSON (stable, snake_case field names).
    Json,
}

/// A table to print in column form.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders the table; every column is as wide as its widest cell, with
    /// three spaces between columns and no trailing spaces.
    pub fn render(&self, header: bool) -> String {
        let cols = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut l = String::new();
            for (i, cell) in cells.enumerate() {
                if i > 0 {
                    l.push_str("   ");
                }
                let _ = write!(l, "{cell:<width$}", width = widths[i]);
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        if header {
            line(&mut self.headers.iter().copied());
        }
        for row in &self.rows {
            line(&mut row.iter().map(String::as_str));
        }
        out
    }
}

/// Prints `value` as JSON or `table` as columns, as `format` says.
pub fn print<T: Serialize>(format: OutputFormat, value: &T, table: impl FnOnce() -> Table) {
    match format {
        OutputFormat::Json => match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot encode JSON: {e}"),
        },
        OutputFormat::Column => print!("{}", table().render(true)),
        OutputFormat::NoHeader => print!("{}", table().render(false)),
    }
}

/// Bytes in binary units without spaces, so a column stays one field for
/// `awk`: 376B, 1.50KiB, 2.00MiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2}{}", UNITS[unit])
}

/// A handshake age without spaces: "never", "42s", "3m5s", "2h1m".
pub fn human_age(secs: Option<u64>) -> String {
    match secs {
        None => "never".into(),
        Some(s) if s < 60 => format!("{s}s"),
        Some(s) if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        Some(s) => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_header_is_optional() {
        let mut t = Table::new(&["PUBLIC KEY", "ENDPOINT"]);
        t.row(vec!["abc".into(), "192.0.2.1:51820".into()]);
        t.row(vec!["a-much-longer-key".into(), "-".into()]);
        assert_eq!(
            t.render(true),
            "PUBLIC KEY          ENDPOINT\nabc                 192.0.2.1:51820\na-much-longer-key   -\n"
        );
        assert_eq!(
            t.render(false),
            "abc                 192.0.2.1:51820\na-much-longer-key   -\n"
        );
    }

    #[test]
    fn bytes_and_ages_read_well() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1536), "1.50KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.00MiB");
        assert_eq!(human_age(None), "never");
        assert_eq!(human_age(Some(5)), "5s");
        assert_eq!(human_age(Some(125)), "2m5s");
        assert_eq!(human_age(Some(7260)), "2h1m");
    }
}
