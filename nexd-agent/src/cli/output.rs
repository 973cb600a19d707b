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
    /// YAML: the same document as the JSON.
    Yaml,
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
    let mut out = String::new();
    render(&mut out, format, value, table);
    print!("{out}");
}

/// What [`print`] prints, appended to `out`: for `nexctl mesh`, which
/// prints only once its connections to etcd are closed.
pub fn render<T: Serialize>(
    out: &mut String,
    format: OutputFormat,
    value: &T,
    table: impl FnOnce() -> Table,
) {
    match format {
        OutputFormat::Json => match serde_json::to_string_pretty(value) {
            Ok(s) => {
                out.push_str(&s);
                out.push('\n');
            }
            Err(e) => eprintln!("error: cannot encode JSON: {e}"),
        },
        OutputFormat::Yaml => match serde_json::to_value(value) {
            Ok(v) => out.push_str(&yaml(&v)),
            Err(e) => eprintln!("error: cannot encode YAML: {e}"),
        },
        OutputFormat::Column => out.push_str(&table().render(true)),
        OutputFormat::NoHeader => out.push_str(&table().render(false)),
    }
}

/// YAML for a JSON document: block style, every string double-quoted
/// (YAML's double-quoted scalars take JSON's escapes), so the output is
/// unambiguous and round-trips.
pub fn yaml(v: &serde_json::Value) -> String {
    let mut out = String::new();
    match v {
        serde_json::Value::Array(a) if a.is_empty() => out.push_str("[]\n"),
        serde_json::Value::Object(o) if o.is_empty() => out.push_str("{}\n"),
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => yaml_block(v, 0, &mut out),
        scalar => {
            out.push_str(&yaml_scalar(scalar));
            out.push('\n');
        }
    }
    out
}

fn yaml_scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null".into(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => serde_json::Value::String(s.clone()).to_string(),
        serde_json::Value::Array(a) if a.is_empty() => "[]".into(),
        serde_json::Value::Object(o) if o.is_empty() => "{}".into(),
        _ => String::new(),
    }
}

fn is_block(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
        _ => false,
    }
}

fn yaml_block(v: &serde_json::Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        serde_json::Value::Object(o) => {
            for (k, val) in o {
                if is_block(val) {
                    out.push_str(&format!("{pad}{k}:\n"));
                    yaml_block(val, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}{k}: {}\n", yaml_scalar(val)));
                }
            }
        }
        serde_json::Value::Array(a) => {
            for item in a {
                if is_block(item) {
                    // The first line of the item goes after the dash.
                    let mut inner = String::new();
                    yaml_block(item, indent + 2, &mut inner);
                    let inner = inner.trim_start();
                    out.push_str(&format!("{pad}- {inner}"));
                } else {
                    out.push_str(&format!("{pad}- {}\n", yaml_scalar(item)));
                }
            }
        }
        scalar => out.push_str(&format!("{pad}{}\n", yaml_scalar(scalar))),
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
    fn yaml_is_block_style_with_quoted_strings() {
        let v = serde_json::json!([
            {"name": "exit", "active": true, "rtt_ms": 1.5, "endpoint": null,
             "allowed_ips": ["0.0.0.0/0", "::/0"], "nested": {"a": 1}},
            {"name": "b\"q", "allowed_ips": []}
        ]);
        assert_eq!(
            yaml(&v),
            "- active: true\n  allowed_ips:\n    - \"0.0.0.0/0\"\n    - \"::/0\"\n  endpoint: null\n  name: \"exit\"\n  nested:\n    a: 1\n  rtt_ms: 1.5\n- allowed_ips: []\n  name: \"b\\\"q\"\n"
        );
        assert_eq!(yaml(&serde_json::json!([])), "[]\n");
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
