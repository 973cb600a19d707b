//! Network namespaces owned by a test: created with a unique name, removed
//! (with every process still inside) when the guard drops.

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

use crate::cmd::{self, output_with_timeout};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace that lives as long as this guard.
#[derive(Debug)]
pub struct Netns {
    name: String,
    label: String,
    /// Set by `keep`: the namespace outlives the guard.
    kept: bool,
}

impl Netns {
    /// Creates a namespace named after `label`, unique to this process, with
    /// loopback up.
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Self::named(&format!("nx{}x{n}-{label}", std::process::id()), label)
    }

    /// Creates a namespace with exactly this name (the lab uses fixed
    /// names so `cargo xtask lab down` can find them later).
    pub fn named(name: &str, label: &str) -> anyhow::Result<Self> {
        cmd::ip(["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
            label: label.to_owned(),
            kept: false,
        };
        ns.ip("link set lo up")?;
        // Keep DAD out of the way of test addresses on veths.
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        Ok(ns)
    }

    /// A handle on an existing namespace that does not own it (dropping it
    /// removes nothing), for use from another thread.
    pub fn attach(name: &str) -> anyhow::Result<Self> {
        if !std::path::Path::new(&format!("/run/netns/{name}")).exists() {
            bail!("no network namespace {name}");
        }
        Ok(Netns {
            name: name.to_owned(),
            label: name.to_owned(),
            kept: true,
        })
    }

    /// Gives up ownership: the namespace outlives this guard. Returns its
    /// name, for whoever removes it later.
    pub fn keep(&mut self) -> String {
        self.kept = true;
        self.name.clone()
    }

    /// The namespace's name for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The short label it was created with.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Runs `ip -n <ns> <args>` (args split on whitespace).
    pub fn ip(&self, args: &str) -> anyhow::Result<String> {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend(cmd::words(args));
        cmd::ip(v)
    }

    /// Runs a command inside the namespace; fails unless it exits 0.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut v = vec!["netns", "exec", self.name.as_str()];
        v.extend_from_slice(args);
        cmd::ip(v)
    }

    /// Runs a command inside the namespace and returns its output whatever
    /// its status.
    pub fn exec_output(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<std::process::Output> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        output_with_timeout(&mut c, timeout)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it
    /// creates belong to the namespace for their whole life.
    pub fn run_in<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> anyhow::Result<T> + Send + 'static,
    {
        self.spawn_in(f)?
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
    }

    /// Like `run_in`, but returns the thread's handle.
    pub fn spawn_in<T, F>(&self, f: F) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce() -> anyhow::Result<T> + Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        Ok(std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
            f()
        }))
    }

    /// The network state nexd could touch, as text: links, addresses,
    /// routes of every table, rules, nftables. Used to prove that a stop
    /// restores exactly what was there before.
    pub fn snapshot(&self) -> anyhow::Result<String> {
        let mut out = String::new();
        for args in [
            "-o link show",
            "-o -4 addr show",
            "-o -6 addr show",
            "-4 route show table all",
            "-6 route show table all",
            "-4 rule show",
            "-6 rule show",
        ] {
            out.push_str(&format!("## ip {args}\n"));
            let text = self.ip(args)?;
            for line in text.lines() {
                // Link statistics and address lifetimes change by themselves.
                let line = line.split("valid_lft").next().unwrap_or(line).trim_end();
                out.push_str(line);
                out.push('\n');
            }
        }
        // Traffic control: a qdisc or filter nexd added and left (clsact
        // on kernels without TCX) is a leftover like a route.
        out.push_str("## tc qdisc show\n");
        let qdiscs = self.exec(&["tc", "qdisc", "show"])?;
        for line in qdiscs.lines() {
            out.push_str(line.split(" refcnt").next().unwrap_or(line).trim_end());
            out.push('\n');
        }
        for link in self.ip("-o link show")?.lines() {
            let Some(name) = link.split(':').nth(1).map(|n| n.trim()) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            for dir in ["ingress", "egress"] {
                let filters = self
                    .exec(&["tc", "filter", "show", "dev", name, dir])
                    .unwrap_or_default();
                if !filters.trim().is_empty() {
                    out.push_str(&format!("## tc filter {name} {dir}\n{filters}"));
                }
            }
        }
        out.push_str("## nft list ruleset\n");
        out.push_str(&self.exec(&["nft", "list", "ruleset"]).unwrap_or_default());
        Ok(out)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        // Anything still running inside keeps the namespace alive: kill it.
        if let Ok(pids) = cmd::ip(["netns", "pids", &self.name]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if let Err(e) = cmd::ip(["netns", "del", &self.name]) {
            eprintln!("warning: could not remove namespace {}: {e}", self.name);
        }
    }
}

/// Creates a veth pair with one end in each namespace, both up. Nothing is
/// created in the root namespace: the pair is made inside `a`.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> anyhow::Result<()> {
    if a_if.len() > 15 || b_if.len() > 15 {
        bail!("interface names are limited to 15 characters: {a_if} {b_if}");
    }
    a.ip(&format!(
        "link add {a_if} type veth peer name {b_if} netns {}",
        b.name()
    ))?;
    a.ip(&format!("link set {a_if} up"))?;
    b.ip(&format!("link set {b_if} up"))?;
    Ok(())
}
