//! nexd's configuration file: every command-line option, under its long
//! name, in TOML. Precedence, highest first: command line, environment
//! variable (`NEXD_*`), configuration file, built-in default.
//!
//! ```toml
//! exit-node-client = true
//! lan-interface = ["lan0"]
//! exclude-routes-file = "/etc/nexd/exclude.txt"
//! log-level = "info"
//! [router]
//! exit-node = true        # same as `nexd router --exit-node`
//! ```
//!
//! The file is read by turning it into command-line arguments for the
//! options that neither the command line nor the environment set, and
//! parsing again: so a value in the file is checked exactly like the same
//! value on the command line.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{CommandFactory as _, FromArgMatches as _, parser::ValueSource};
use toml::Spanned;

use super::nexd::Cli;
use crate::instance::{DEFAULT_CONFIG, Instance};

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn to_args(
    path: &Path,
    text: &str,
    key: &Spanned<String>,
    value: &Spanned<toml::Value>,
) -> Result<Vec<String>, String> {
    let at = || format!("{}:{}", path.display(), line_of(text, key.span().start));
    let name = key.get_ref();
    let scalar = |v: &toml::Value| -> Result<String, String> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            other => Err(format!(
                "{}: {name} must be a string or a number, not {}",
                at(),
                other.type_str()
            )),
        }
    };
    Ok(match value.get_ref() {
        toml::Value::Boolean(true) => vec![format!("--{name}")],
        toml::Value::Boolean(false) => Vec::new(),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| scalar(i).map(|s| format!("--{name}={s}")))
            .collect::<Result<_, _>>()?,
        v => vec![format!("--{name}={}", scalar(v)?)],
    })
}

/// Parses `argv` with the configuration file folded in.
pub fn parse(argv: Vec<OsString>) -> Result<Cli, clap::Error> {
    let first = Cli::command().try_get_matches_from(&argv)?;
    let explicit = first.value_source("config") == Some(ValueSource::CommandLine)
        || first.value_source("config") == Some(ValueSource::EnvVariable);
    let path: PathBuf = first
        .get_one::<PathBuf>("config")
        .cloned()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Cli::from_arg_matches(&first);
        }
        Err(e) => {
            return Err(Cli::command().error(
                clap::error::ErrorKind::Io,
                format!("cannot read configuration file {}: {e}", path.display()),
            ));
        }
    };
    let fail = |msg: String| Cli::command().error(clap::error::ErrorKind::InvalidValue, msg);
    let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> =
        toml::from_str(&text).map_err(|e| {
            let line = e.span().map_or(1, |s| line_of(&text, s.start));
            fail(format!("{}:{line}: {}", path.display(), e.message().trim()))
        })?;

    // Long names of the agent's options, and their ids.
    let cmd = Cli::command();
    let longs: BTreeMap<String, String> = cmd
        .get_arguments()
        .filter_map(|a| Some((a.get_long()?.to_owned(), a.get_id().to_string())))
        .collect();
    let mut injected: Vec<String> = Vec::new();
    let mut router = false;
    for (key, value) in &table {
        if key.get_ref() == "router" {
            let toml::Value::Table(t) = value.get_ref() else {
                return Err(fail(format!(
                    "{}:{}: router must be a table",
                    path.display(),
                    line_of(&text, key.span().start)
                )));
            };
            for (k, v) in t {
                match (k.as_str(), v) {
                    ("exit-node", toml::Value::Boolean(b)) => router = *b,
                    _ => {
                        return Err(fail(format!(
                            "{}:{}: unknown setting router.{k} (known: router.exit-node = true|false)",
                            path.display(),
                            line_of(&text, key.span().start)
                        )));
                    }
                }
            }
            continue;
        }
        if key.get_ref() == "config" {
            return Err(fail(format!(
                "{}:{}: config cannot be set in the configuration file",
                path.display(),
                line_of(&text, key.span().start)
            )));
        }
        let Some(id) = longs.get(key.get_ref()) else {
            return Err(fail(format!(
                "{}:{}: unknown setting {:?} (settings are nexd's long option names, see nexd --help)",
                path.display(),
                line_of(&text, key.span().start),
                key.get_ref()
            )));
        };
        // Command line and environment win.
        if matches!(
            first.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        injected.extend(to_args(&path, &text, key, value).map_err(fail)?);
    }
    let mut full: Vec<OsString> = argv.iter().take(1).cloned().collect();
    full.extend(injected.into_iter().map(OsString::from));
    full.extend(argv.iter().skip(1).cloned());
    if router && first.subcommand().is_none() {
        full.push("router".into());
        full.push("--exit-node".into());
    }
    let second = Cli::command().try_get_matches_from(&full)?;
    Cli::from_arg_matches(&second)
}

/// The instance a nexd started from this environment (`NEXD_*` variables)
/// and configuration file (`config`, else `NEXD_CONFIG`, else the default)
/// would be: what nexctl uses to find nexd and to clean up after it.
pub fn instance(config: Option<&Path>) -> Result<Instance, clap::Error> {
    let mut argv: Vec<OsString> = vec!["nexd".into()];
    if let Some(c) = config {
        argv.push("--config".into());
        argv.push(c.as_os_str().to_owned());
    }
    Ok(parse(argv)?.agent.instance())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::nexd::Command;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nexd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn file_values_apply_and_the_command_line_wins() {
        let p = write(
            "a.toml",
            "exit-node-client = true\nlog-level = \"debug\"\nlan-interface = [\"lan0\", \"lan1\"]\ninterface = \"wg7\"\nexit-fwmark = \"0x99\"\n",
        );
        let cli = parse(args(&[
            "nexd",
            "--config",
            p.to_str().expect("p"),
            "--interface",
            "wg1",
        ]))
        .expect("parse");
        assert!(cli.agent.exit_node_client);
        assert_eq!(cli.agent.log_level, "debug");
        assert_eq!(cli.agent.lan_interfaces, ["lan0", "lan1"]);
        assert_eq!(cli.agent.interface, "wg1", "the command line wins");
        assert_eq!(cli.agent.exit_fwmark, 0x99);
    }

    #[test]
    fn router_table_selects_the_exit_node_role() {
        let p = write("r.toml", "[router]\nexit-node = true\n");
        let cli = parse(args(&["nexd", "--config", p.to_str().expect("p")])).expect("parse");
        assert!(matches!(cli.command, Some(Command::Router(r)) if r.exit_node));
    }

    #[test]
    fn exit_probe_targets_come_from_the_file_and_are_checked() {
        let p = write(
            "p.toml",
            "exit-probe-target = [\"203.0.113.10:443\", \"[2001:db8::1]:443\"]\n[router]\nexit-node = true\n",
        );
        let cli = parse(args(&["nexd", "--config", p.to_str().expect("p")])).expect("parse");
        assert_eq!(cli.agent.exit_probe_targets.len(), 2);
        let p = write("q.toml", "exit-probe-target = [\"probe.example:443\"]\n");
        let e = parse(args(&["nexd", "--config", p.to_str().expect("p")])).expect_err("a name");
        assert!(e.to_string().contains("--exit-probe-target"), "{e}");
    }

    #[test]
    fn unknown_and_bad_settings_name_the_line() {
        let p = write("b.toml", "log-level = \"info\"\ncolour = \"red\"\n");
        let e = parse(args(&["nexd", "--config", p.to_str().expect("p")])).expect_err("unknown");
        assert!(
            e.to_string()
                .contains("b.toml:2: unknown setting \"colour\""),
            "{e}"
        );
        let p = write("c.toml", "exclude-route = \"198.51.100.1/24\"\n");
        let e = parse(args(&["nexd", "--config", p.to_str().expect("p")])).expect_err("bad value");
        assert!(e.to_string().contains("host bits"), "{e}");
    }

    #[test]
    fn a_missing_default_file_is_fine_but_a_named_one_is_not() {
        assert!(parse(args(&["nexd", "--config", "/nonexistent/nexd.toml"])).is_err());
        let cli = parse(args(&["nexd"])).expect("default file absent");
        assert_eq!(cli.agent.interface, "wg0");
    }

    #[test]
    fn registry_options_come_from_the_config_file_too() {
        let dir = std::env::temp_dir().join(format!("nexd-regcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let admin = crate::registry::AdminKey::generate()
            .public_key()
            .to_string();
        let p = dir.join("nexd.toml");
        std::fs::write(
            &p,
            format!(
                "registry = \"etcd://198.51.100.1:2379/nexd\"\nregistry-admin-key = \"{admin}\"\nregistry-name = \"gw9\"\n"
            ),
        )
        .expect("write");
        let cli = parse(
            ["nexd", "--config", p.to_str().expect("p")]
                .iter()
                .map(std::ffi::OsString::from)
                .collect(),
        )
        .expect("parse");
        let cfg = cli.agent.device_config(false).expect("ok").expect("some");
        assert_eq!(cfg.name, "gw9");
        assert_eq!(cfg.etcd.url.prefix, "/nexd");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
