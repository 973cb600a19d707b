//! Man pages rendered from clap definitions (so they never disagree with
//! `--help`): one page per command and subcommand, section 8. nexctl's
//! hidden `man` command, which `cargo xtask man` and the packaging run,
//! passes nexd's and its own.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

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

/// Writes every page of `commands` into `out`, each command's pages named
/// after it; returns their paths.
pub fn write_all(out: &Path, commands: &[clap::Command]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    for cmd in commands {
        render(cmd, cmd.get_name(), out, &mut written)?;
    }
    Ok(written)
}
