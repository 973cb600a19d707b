//! Excluded routes: destinations that bypass the exit node (split
//! tunnelling), from `--exclude-route` and `--exclude-routes-file`.
//!
//! The file has one CIDR (or bare address, meaning /32 or /128) per line;
//! `#` starts a comment; blank lines are ignored. Every bad line is
//! reported with its number, and a bad file on reload keeps the running
//! list.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;

/// Why an exclusion could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ExcludeError {
    #[error("cannot read excluded routes file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", format_lines(path, lines))]
    Invalid {
        path: PathBuf,
        lines: Vec<(usize, String)>,
    },
}

fn format_lines(path: &Path, lines: &[(usize, String)]) -> String {
    let shown: Vec<String> = lines
        .iter()
        .take(20)
        .map(|(n, m)| format!("{}:{n}: {m}", path.display()))
        .collect();
    let more = if lines.len() > 20 {
        format!("\n  ... and {} more", lines.len() - 20)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join("\n  "))
}

/// Parses one exclusion: a CIDR without host bits, or a bare address.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IP prefix like 198.51.100.0/24 or 2001:db8::/32"))?;
    if net.trunc() != net {
        return Err(format!(
            "{s} has host bits set; the prefix is {}",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Parses the text of an excluded routes file.
pub fn parse_file(text: &str) -> Result<Vec<IpNet>, Vec<(usize, String)>> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match parse_cidr(line) {
            Ok(n) => out.push(n),
            Err(m) => bad.push((i + 1, m)),
        }
    }
    if bad.is_empty() { Ok(out) } else { Err(bad) }
}

/// Reads an excluded routes file.
pub fn read_file(path: &Path) -> Result<Vec<IpNet>, ExcludeError> {
    let text = std::fs::read_to_string(path).map_err(|source| ExcludeError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_file(&text).map_err(|lines| ExcludeError::Invalid {
        path: path.to_owned(),
        lines,
    })
}

/// The exclusions from the command line and the file, merged and sorted.
pub fn load(flags: &[IpNet], file: Option<&Path>) -> Result<Vec<IpNet>, ExcludeError> {
    let mut set: BTreeSet<IpNet> = flags.iter().map(IpNet::trunc).collect();
    if let Some(f) = file {
        set.extend(read_file(f)?);
    }
    Ok(set.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_format_accepts_comments_blank_lines_and_bare_addresses() {
        let v = parse_file(
            "# excluded\n198.51.100.0/24\n\n  2001:db8::/32  # docs\n203.0.113.7\n2001:db8:1::1\n",
        )
        .expect("valid");
        let s: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(
            s,
            [
                "198.51.100.0/24",
                "2001:db8::/32",
                "203.0.113.7/32",
                "2001:db8:1::1/128"
            ]
        );
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let bad = parse_file("198.51.100.0/24\nnonsense\n198.51.100.1/24\n10.0.0.0/33\n")
            .expect_err("invalid");
        assert_eq!(bad.len(), 3);
        assert_eq!(bad[0].0, 2);
        assert_eq!(bad[1].0, 3);
        assert!(bad[1].1.contains("host bits"), "{bad:?}");
        assert_eq!(bad[2].0, 4);
        let err = ExcludeError::Invalid {
            path: PathBuf::from("/etc/nexd/exclude.txt"),
            lines: bad,
        };
        assert!(
            err.to_string().starts_with("/etc/nexd/exclude.txt:2: "),
            "{err}"
        );
    }

    #[test]
    fn fifty_thousand_lines_parse() {
        let text: String = (0..50_000u32)
            .map(|i| format!("{}.{}.{}.0/24\n", 10 + (i >> 16), (i >> 8) & 255, i & 255))
            .collect();
        assert_eq!(parse_file(&text).expect("valid").len(), 50_000);
    }

    #[test]
    fn flags_and_file_merge_without_duplicates() {
        let dir = std::env::temp_dir().join(format!("nexd-excl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("x.txt");
        std::fs::write(&f, "198.51.100.0/24\n203.0.113.0/24\n").expect("write");
        let flags = ["198.51.100.0/24".parse().expect("net")];
        assert_eq!(load(&flags, Some(&f)).expect("load").len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
