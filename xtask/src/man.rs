//! `cargo xtask man`: man pages for nexd and nexctl, generated from their
//! clap definitions (so they never disagree with `--help`): one page per
//! command and subcommand, section 8.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::CommandFactory as _;

use crate::{step, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Where to write the pages.
    #[arg(long, default_value = "target/man")]
    pub out: PathBuf,
}

fn render(
    cmd: &clap::Command,
    name: &str,
    out: &std::path::Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    // clap names are static strings; a handful leak in a one-shot tool.
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

pub fn run(args: &Args) -> anyhow::Result<()> {
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        workspace_root().join(&args.out)
    };
    std::fs::create_dir_all(&out)?;
    step(&format!("writing man pages to {}", out.display()));
    let mut written = Vec::new();
    render(&nexd::cli::nexd::Cli::command(), "nexd", &out, &mut written)?;
    render(
        &nexd::cli::nexctl::Cli::command(),
        "nexctl",
        &out,
        &mut written,
    )?;
    for p in &written {
        println!("  {}", p.display());
    }
    println!("view with: man {}", out.join("nexctl.8").display());
    Ok(())
}
