//! An exit group member's effects (issue 22): the files, keepalived and
//! conntrackd as nexd's child processes, who holds the egress address, and
//! conntrackd's commands when that changes. What they are is decided in
//! `crate::exit_group` (pure); this is the thin layer that does it.
//!
//! Who holds the address is read from the kernel (the egress address on
//! this host, re-read on every address change notice), not from
//! keepalived's notifications: it is the fact the NAT depends on, and a
//! notification can be lost or come twice. The conntrackd commands of one
//! change run on a task of their own, one change after another (they take
//! milliseconds each, which the event loop must not wait for; two changes
//! must never interleave).
//!
//! The children get SIGTERM when nexd dies (`PR_SET_PDEATHSIG`): keepalived
//! then gives the address up at once (a priority 0 advert) instead of
//! holding it with nobody to announce it. On stop, nexd sends SIGTERM,
//! waits, and removes the egress address itself if it is still there.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    process::{Child, Command},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::{
    exit_group::{
        Files, Membership, conntrackd, keepalived,
        takeover::{self, Holding},
    },
    netif,
    netlink::Netlink,
    routing::forward::Egress,
};

/// How long a child has after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a child that exited waits before it is started again.
const RESTART_AFTER: Duration = Duration::from_secs(1);

pub struct GroupMember {
    membership: Membership,
    files: Files,
    conntrackd: Supervised,
    keepalived: Supervised,
    /// What the kernel said last (`None` before the first look).
    holding: Option<Holding>,
    transitions: mpsc::UnboundedSender<Holding>,
    runner: JoinHandle<()>,
}

impl GroupMember {
    /// Writes the configuration, removes what an earlier nexd left (its
    /// daemons, the egress address), and starts conntrackd, then
    /// keepalived.
    pub async fn start(
        nl: &Netlink,
        membership: Membership,
        state_dir: &Path,
    ) -> anyhow::Result<GroupMember> {
        let files = Files::new(&state_dir.join("exit-group"));
        fs::create_dir_all(&files.dir)
            .with_context(|| format!("creating {}", files.dir.display()))?;
        for pid_file in [
            files.keepalived_pid(),
            files.vrrp_pid(),
            files.conntrackd_pid(),
        ] {
            stop_leftover(&pid_file);
        }
        let _ = fs::remove_file(files.conntrackd_lock());
        let _ = fs::remove_file(files.conntrackd_socket());
        remove_egress(nl, &membership).await;
        fs::write(
            files.conntrackd_conf(),
            conntrackd::render(&membership, &files),
        )
        .with_context(|| format!("writing {}", files.conntrackd_conf().display()))?;
        fs::write(files.keepalived_conf(), keepalived::render(&membership))
            .with_context(|| format!("writing {}", files.keepalived_conf().display()))?;
        let conntrackd = Supervised::start(
            "conntrackd",
            conntrackd::args(&files, &[]),
            files.dir.join("conntrackd.out"),
            Some(files.conntrackd_pid()),
        );
        let keepalived = Supervised::start(
            "keepalived",
            keepalived::args(&files),
            files.dir.join("keepalived.log"),
            None,
        );
        let (transitions, queue) = mpsc::unbounded_channel();
        let runner = tokio::spawn(run_transitions(files.clone(), queue));
        info!(
            group = %membership.group.name,
            egress = %membership.group.egress_ipv4,
            priority = membership.priority(),
            members = membership.members.len(),
            "exit group member: keepalived and conntrackd started"
        );
        Ok(GroupMember {
            membership,
            files,
            conntrackd,
            keepalived,
            holding: None,
            transitions,
            runner,
        })
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The group's egress addresses, for the NAT.
    pub fn egress(&self) -> Egress {
        Egress {
            v4: self.membership.group.egress_ipv4.addr(),
            v6: self.membership.group.egress_ipv6.map(|n| n.addr()),
        }
    }

    /// Whether this member holds the egress address (as last read).
    pub fn holds(&self) -> bool {
        self.holding == Some(Holding::Holder)
    }

    /// Reads whether this member holds the egress address now; on a
    /// change, queues conntrackd's commands. Returns whether it changed.
    pub async fn follow(&mut self, nl: &Netlink) -> bool {
        let present = match egress_present(nl, &self.membership).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %crate::error_text(&e), "reading the exit group's egress address failed");
                return false;
            }
        };
        let now = Holding::from_address(present);
        if self.holding == Some(now) {
            return false;
        }
        match now {
            Holding::Holder => info!(
                group = %self.membership.group.name,
                egress = %self.membership.group.egress_ipv4,
                "this member holds the exit group's egress address: committing the synced connections, serving"
            ),
            Holding::Standby if self.holding.is_some() => warn!(
                group = %self.membership.group.name,
                "this member no longer holds the exit group's egress address: standing by"
            ),
            Holding::Standby => info!(
                group = %self.membership.group.name,
                "standing by in the exit group"
            ),
        }
        self.holding = Some(now);
        // The runner only ends when the sender is dropped.
        let _ = self.transitions.send(now);
        true
    }

    /// Stops keepalived (which gives up the address), conntrackd and the
    /// command runner, and removes the egress address if it is left.
    pub async fn stop(self, nl: &Netlink) {
        let GroupMember {
            membership,
            files,
            conntrackd,
            keepalived,
            transitions,
            runner,
            ..
        } = self;
        drop(transitions);
        keepalived.stop().await;
        conntrackd.stop().await;
        if tokio::time::timeout(STOP_GRACE, runner).await.is_err() {
            warn!("conntrackd's commands did not finish in time");
        }
        remove_egress(nl, &membership).await;
        let _ = fs::remove_file(files.conntrackd_socket());
        info!(group = %membership.group.name, "left the exit group: keepalived and conntrackd stopped");
    }
}

/// Whether the group's IPv4 egress address is on this host.
async fn egress_present(nl: &Netlink, m: &Membership) -> anyhow::Result<bool> {
    let Some(index) = nl.link_index(&m.group.uplink).await? else {
        return Ok(false);
    };
    let egress = IpAddr::V4(m.group.egress_ipv4.addr());
    Ok(netif::addresses(nl, index)
        .await?
        .iter()
        .any(|a| a.addr() == egress))
}

/// Removes the egress addresses from the uplink: what a stopped or
/// crashed member may have left. keepalived adds them back if this member
/// becomes the holder.
async fn remove_egress(nl: &Netlink, m: &Membership) {
    let g = &m.group;
    let index = match nl.link_index(&g.uplink).await {
        Ok(Some(i)) => i,
        Ok(None) => return,
        Err(e) => {
            warn!(error = %e, uplink = %g.uplink, "looking up the exit group's uplink failed");
            return;
        }
    };
    let mut addrs = vec![ipnet::IpNet::V4(g.egress_ipv4)];
    addrs.extend(g.egress_ipv6.map(ipnet::IpNet::V6));
    for a in addrs {
        if let Err(e) = netif::del_address(nl, index, &g.uplink, a).await {
            warn!(error = %e, "removing the exit group's egress address failed");
        }
    }
}

/// Runs conntrackd's commands for each change, one change at a time.
async fn run_transitions(files: Files, mut queue: mpsc::UnboundedReceiver<Holding>) {
    let mut from = None;
    while let Some(to) = queue.recv().await {
        for cmd in takeover::commands(from, to) {
            let t0 = std::time::Instant::now();
            let out = Command::new("conntrackd")
                .args(conntrackd::args(&files, cmd))
                .stdin(Stdio::null())
                .output()
                .await;
            match out {
                Ok(o) if o.status.success() => {
                    debug!(command = ?cmd, elapsed = ?t0.elapsed(), "conntrackd command done");
                }
                Ok(o) => warn!(
                    command = ?cmd,
                    status = %o.status,
                    stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                    "conntrackd command failed"
                ),
                Err(e) => warn!(command = ?cmd, error = %e, "running conntrackd failed"),
            }
        }
        from = Some(to);
    }
}

/// Ends a daemon an earlier nexd left, by its pid file, if the process
/// is still that daemon.
fn stop_leftover(pid_file: &Path) {
    let Ok(text) = fs::read_to_string(pid_file) else {
        return;
    };
    let _ = fs::remove_file(pid_file);
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !matches!(comm.trim(), "keepalived" | "conntrackd") {
        return;
    }
    warn!(pid, daemon = %comm.trim(), "ending a daemon an earlier nexd left");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// A child process kept running until stopped.
struct Supervised {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Supervised {
    fn start(
        program: &'static str,
        args: Vec<String>,
        log: PathBuf,
        pid_file: Option<PathBuf>,
    ) -> Supervised {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                let child = spawn(program, &args, &log);
                let mut child = match child {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(program, error = %e, "starting it failed; trying again");
                        tokio::select! {
                            _ = tokio::time::sleep(RESTART_AFTER) => continue,
                            _ = &mut stopped => return,
                        }
                    }
                };
                if let (Some(f), Some(pid)) = (&pid_file, child.id()) {
                    let _ = fs::write(f, format!("{pid}\n"));
                }
                tokio::select! {
                    status = child.wait() => {
                        warn!(program, status = ?status, log = %log.display(), "exited; starting it again");
                        tokio::select! {
                            _ = tokio::time::sleep(RESTART_AFTER) => {}
                            _ = &mut stopped => return,
                        }
                    }
                    _ = &mut stopped => {
                        terminate(program, &mut child).await;
                        return;
                    }
                }
            }
        });
        Supervised {
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // Stopped without `stop` (a panic): the child still goes, by
        // SIGKILL (kill_on_drop) when the task is dropped.
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

fn spawn(program: &str, args: &[String], log: &Path) -> std::io::Result<Child> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`].
async fn terminate(program: &str, child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        warn!(program, "did not stop on SIGTERM; killing it");
        let _ = child.kill().await;
    }
}
