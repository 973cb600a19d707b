//! Man pages for nexd and nexctl, rendered from their clap definitions (so
//! they never disagree with `--help`): one page per command and
//! subcommand, section 8. Reached through nexctl's hidden `man` command,
//! which `cargo xtask man` and the packaging run.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory as _;

fn render(
    cmd: &clap::Command,
    name: &str,
    out: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    // clap names are static strings; a handful leak in a one-shot command.
    let static_name: &'static str = Box::leak(name.to_owned().into_boxed_str());
    let cmd = cmd.clone().name(static_name);
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut buf)
        .with_context(|| format!("rendering {name}"))?;
    let path = out.join(format!("{name}.8"));
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() {
            continue;
        }
        render(sub, &format!("{name}-{}", sub.get_name()), out, written)?;
    }
    Ok(())
}

/// Writes every page into `out`; returns their paths.
pub fn write_all(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    render(&super::nexd::Cli::command(), "nexd", out, &mut written)?;
    render(&super::nexctl::Cli::command(), "nexctl", out, &mut written)?;
    Ok(written)
}
