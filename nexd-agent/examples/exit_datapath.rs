//! A test-only command for the namespace benchmark (`cargo xtask bench
//! --only exit`), which must not link nexd itself: loads nexd's eBPF
//! object, fills the exit maps with a synthetic exit node (N clients, a
//! policy with M denied prefixes, MSS for a 1420-byte tunnel), attaches
//! the exit programs to an interface of the current network namespace,
//! prints `ready`, and holds until its stdin closes. Then it prints the
//! clients' counters summed as one JSON line and detaches.
//!
//! ```sh
//! ip netns exec NS exit_datapath --iface wg0 --clients 1000 --denied 100 [--l3]
//! exit_datapath --print-setup --clients 1000 --denied 100
//! ```
//!
//! `--print-setup` loads nothing: it prints the synthetic exit node as
//! JSON (denied prefixes with their reasons, the clients' addresses), so
//! the benchmark can express exactly the same policy in nftables.
//!
//! `--l3` attaches the variants for links without an Ethernet header
//! (WireGuard); the default is the Ethernet variants (a veth standing in
//! for the tunnel).

#[path = "../tests/support/exit_setup.rs"]
mod exit_setup;

use std::io::{BufRead as _, Write as _};

use anyhow::{Context as _, bail};
use nexd::datapath::{Datapath, exit::mss_for_mtu};

struct Args {
    iface: String,
    clients: usize,
    denied: usize,
    l2: bool,
    print_setup: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        iface: String::new(),
        clients: 10,
        denied: 100,
        l2: true,
        print_setup: false,
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> anyhow::Result<usize> {
        v.with_context(|| format!("{what} needs a number"))?
            .parse()
            .with_context(|| format!("{what} needs a number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--iface" => a.iface = it.next().context("--iface needs a name")?,
            "--clients" => a.clients = num(it.next(), "--clients")?,
            "--denied" => a.denied = num(it.next(), "--denied")?,
            "--l3" => a.l2 = false,
            "--print-setup" => a.print_setup = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if a.iface.is_empty() && !a.print_setup {
        bail!(
            "usage: exit_datapath --iface IF [--clients N] [--denied M] [--l3] | --print-setup [--clients N] [--denied M]"
        );
    }
    Ok(a)
}

fn print_setup(a: &Args) -> anyhow::Result<()> {
    let policy = exit_setup::policy(a.denied)?;
    let denied: Vec<(String, &str)> = exit_setup::denied(&policy)
        .iter()
        .map(|(n, r)| (n.to_string(), r.name()))
        .collect();
    let clients: Vec<Vec<String>> = exit_setup::clients(a.clients, false)
        .iter()
        .map(|c| c.addresses.iter().map(ToString::to_string).collect())
        .collect();
    println!(
        "{}",
        serde_json::json!({ "denied": denied, "clients": clients })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    if a.print_setup {
        return print_setup(&a);
    }
    let mut dp = Datapath::load()?;
    dp.sync_exit_policy(&exit_setup::policy(a.denied)?)?;
    dp.sync_exit_clients(&exit_setup::clients(a.clients, false))?;
    dp.set_mss(mss_for_mtu(1420))?;
    dp.attach_exit(&a.iface, a.l2)?;
    println!("ready");
    std::io::stdout().flush()?;
    // Hold until whoever started us closes our stdin.
    for line in std::io::stdin().lock().lines() {
        line?;
    }
    let rows = dp.exit_clients()?;
    let sum = |f: fn(&nexd::datapath::exit::ExitClientRow) -> u64| rows.iter().map(f).sum::<u64>();
    let counters = dp.counters()?;
    let global = |name: &str| counters.get(name).map_or(0, |c| c.packets);
    println!(
        "{}",
        serde_json::json!({
            "rx_packets": sum(|r| r.rx_packets),
            "tx_packets": sum(|r| r.tx_packets),
            "denied": sum(|r| r.denied_total),
            "unauthorized": global("exit_unauthorized"),
        })
    );
    dp.detach_exit()?;
    Ok(())
}
