//! The nexd daemon: start-up, the event loop, and shutdown.
//!
//! One task owns all state and is the only one that changes kernel objects;
//! signals, control requests, announcements, resolved endpoints and a timer
//! reach it as events. The state is split by concern into components, each
//! the owner of its kernel objects (see `agent`); the loop only wires them.
//! Slow work (DNS) runs on tasks of its own and comes back as an event, so
//! no event waits behind it.

mod agent;
mod answers;
mod dataplane;
mod endpoints;
mod exit_client;
mod exit_probe;
mod exit_server;
mod heartbeats;
mod interface;
pub mod lock;
mod membership;
mod metrics;
pub mod reconcile;
mod split_tunnel;

use std::{os::unix::fs::DirBuilderExt as _, path::PathBuf, time::Duration};

use anyhow::{Context as _, anyhow};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    control::server::{self, ControlServer},
    keys,
    netlink::Netlink,
    routing::PolicyNumbers,
    wireguard::BackendChoice,
};

pub use agent::Daemon;
/// At most this many `--exit-probe-target`s.
pub use exit_probe::MAX_TARGETS as MAX_EXIT_PROBE_TARGETS;

/// Everything the daemon needs to know from its command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub mesh_file: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub interface: String,
    pub wireguard: BackendChoice,
    /// `nexd router --exit-node`: serve as exit node.
    pub exit_server: Option<ExitServerOptions>,
    /// `--exit-node-client`: send internet traffic through an exit node
    /// as soon as one is available.
    pub exit_node_client: bool,
    /// Table, mark and rule priorities of the client's policy routing.
    pub policy: PolicyNumbers,
    /// LAN interfaces this device is a gateway for (steering classifier).
    pub lan_interfaces: Vec<String>,
    /// `--exclude-route` prefixes.
    pub exclude_routes: Vec<ipnet::IpNet>,
    /// `--exclude-routes-file`, re-read on SIGHUP.
    pub exclude_routes_file: Option<PathBuf>,
    /// `--kill-switch`: the leak guard, pinned so it survives a crash.
    pub kill_switch: bool,
    /// `--exit-node-allow-lan-dns`: DNS keeps going to the configured
    /// resolvers (a LAN resolver sees the queries) instead of the exit node.
    pub exit_node_allow_lan_dns: bool,
    /// `--kill-switch-allow`: prefixes the guard lets out directly.
    pub kill_switch_allow: Vec<ipnet::IpNet>,
    /// Log every packet the leak guard drops (debug level).
    pub log_guard_drops: bool,
    /// Where bpffs is (pins).
    pub bpffs: PathBuf,
    /// The uplink (exit node masquerade, leak guard); default: the
    /// interfaces of the default routes.
    pub uplink: Option<String>,
    /// Run without the eBPF data path (benchmark baseline).
    pub no_ebpf: bool,
    /// Clamp TCP's MSS on the exit node's and the gateway's tunnel.
    pub mss_clamp: bool,
    /// Probe the exit node in use (fast failover); off only for the
    /// benchmark's baseline (`--no-exit-probes`).
    pub exit_probes: bool,
    /// `--exit-node NAME|PUBLIC_KEY`: use only this exit node.
    pub exit_node_pin: Option<String>,
    /// Group allowed read-only access to the control socket.
    pub socket_group: Option<String>,
    /// Address of the Prometheus endpoint, if any.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `--registry`: membership through etcd instead of the mesh file.
    pub registry: Option<crate::registry::DeviceConfig>,
}

/// Options of the exit node role.
#[derive(Debug, Clone, Default)]
pub struct ExitServerOptions {
    /// `--exit-allow`: subnets shared with the clients besides the internet.
    pub allow: Vec<ipnet::IpNet>,
    /// `--exit-rate-limit`: each client's limit where its entry has none.
    pub rate_limit: Option<crate::mesh::Rate>,
    /// `--exit-probe-target`: withdraw the exit capability when none of
    /// these answers a TCP connect.
    pub probe_targets: Vec<std::net::SocketAddr>,
}

/// How often the loop wakes up without an event: backend status,
/// heartbeats, exit-node health.
const TICK: Duration = Duration::from_millis(500);
/// Past the active exit node's deadline before re-evaluating, so the
/// timer never fires a hair early (tokio's timer has millisecond
/// granularity) and finds the exit node still fresh.
const STALE_MARGIN: Duration = Duration::from_millis(2);

/// Runs nexd until SIGINT or SIGTERM, then removes everything it created.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    // Signal handlers first: a SIGTERM during start-up must still lead to a
    // clean teardown, not the default "die with things installed".
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.state_dir)
        .with_context(|| format!("cannot create state directory {}", opts.state_dir.display()))?;
    let _lock = lock::InstanceLock::acquire(&opts.state_dir)?;
    server::check_socket_free(&opts.socket)?;

    let (key, created) = keys::load_or_create(&opts.state_dir)?;
    let own = key.public_key();
    if created {
        info!(public_key = %own, path = %keys::key_path(&opts.state_dir).display(), "generated a new private key");
    }
    if opts.exit_server.is_some() && opts.exit_node_client {
        anyhow::bail!(
            "--exit-node-client cannot be combined with `router --exit-node`: an exit node sends its own traffic out directly"
        );
    }
    if opts.exit_server.is_some() && (opts.kill_switch || !opts.lan_interfaces.is_empty()) {
        anyhow::bail!(
            "--kill-switch and --lan-interface are exit-node client options; they cannot be used with `router --exit-node`"
        );
    }
    // After the option checks: a misconfigured nexd publishes no join
    // request.
    let (membership, mut membership_events) = membership::Membership::open(&opts, &own).await?;
    info!(device = %membership.starting_name(&own), public_key = %own, interface = %opts.interface, "starting nexd {}", env!("CARGO_PKG_VERSION"));

    let split = split_tunnel::SplitTunnel::load(
        opts.exclude_routes.clone(),
        opts.exclude_routes_file.clone(),
        opts.policy.exclusion_table(),
    )?;
    // Sequence numbers of this run's announcements start above every
    // earlier run's, whatever the clock says.
    let epoch = crate::announce::seq::next_epoch(&opts.state_dir)?;
    let nl = Netlink::connect()?;
    // Uplinks are followed as they change (a new default route, Wi-Fi,
    // tethering, a renumbered interface), not on a timer.
    let (uplink_changes, mut uplinks_changed) = mpsc::channel(1);
    let _watch = crate::routing::uplink::watch_changes(uplink_changes)?;
    let (announcements, mut incoming) = mpsc::channel(crate::announce::QUEUE);
    let (resolved_tx, mut resolved) = mpsc::channel(4);
    let (exit_probe_tx, mut exit_probe_rounds) = mpsc::channel(4);
    let mut daemon = Daemon::new(
        opts.clone(),
        key,
        nl,
        membership,
        split,
        agent::Channels {
            announcements,
            resolved: resolved_tx,
            exit_probes: exit_probe_tx,
        },
        epoch,
    );
    let started = tokio::select! {
        r = daemon.start() => r,
        _ = sigterm.recv() => Err(anyhow!("stopped by SIGTERM during start-up")),
        _ = sigint.recv() => Err(anyhow!("stopped by SIGINT during start-up")),
    };
    if let Err(e) = started {
        daemon.teardown().await;
        return Err(e);
    }
    daemon.record();
    let (control, mut calls) = match ControlServer::bind(&opts.socket, opts.socket_group.as_deref())
    {
        Ok(x) => x,
        Err(e) => {
            daemon.teardown().await;
            return Err(e.into());
        }
    };
    let _metrics = match opts.metrics_listen {
        None => None,
        Some(addr) => match crate::metrics::MetricsServer::start(addr, control.calls()).await {
            Ok(m) => Some(m),
            Err(e) => {
                control.shutdown();
                daemon.teardown().await;
                return Err(anyhow!("--metrics-listen {addr}: {e}"));
            }
        },
    };
    info!(socket = %opts.socket.display(), "ready");
    crate::notify::ready();

    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe = tokio::time::interval(crate::exit::PROBE_INTERVAL);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        // The exit node in use is left the moment its deadline passes,
        // not at the next probe tick (up to 100 ms later).
        let stale_at = daemon.exit_stale_at();
        let probing = daemon.probe_tick_due();
        let exit_deadline = async {
            match stale_at {
                Some(t) => tokio::time::sleep_until((t + STALE_MARGIN).into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sighup.recv() => {
                crate::notify::reloading();
                daemon.reload().await;
                release_freed_memory();
                crate::notify::ready();
            }
            Some(call) = calls.recv() => {
                let response = daemon.answer(call.method).await;
                let _ = call.reply.send(response);
            }
            Some(inc) = incoming.recv() => daemon.on_announcement(inc).await,
            Some(r) = resolved.recv() => daemon.on_resolved(r).await,
            Some(r) = exit_probe_rounds.recv() => daemon.on_exit_probe(r),
            Some(ev) = membership_events.recv() => {
                daemon.on_membership(ev).await;
                release_freed_memory();
            }
            Some(()) = uplinks_changed.recv() => daemon.on_uplinks_changed().await,
            _ = tick.tick() => daemon.tick().await,
            _ = probe.tick(), if probing => daemon.probe_tick().await,
            () = exit_deadline => daemon.evaluate_exit().await,
        }
        daemon.record();
    };
    info!(reason, "stopping: removing everything nexd installed");
    crate::notify::stopping();
    control.shutdown();
    daemon.teardown().await;
    info!("stopped");
    Ok(())
}

/// Logs every line of a multi-line error at error level, so each mesh-file
/// problem is its own log line.
pub(crate) fn log_error_lines(context: &str, err: &dyn std::fmt::Display) {
    let text = err.to_string();
    let mut lines = text.lines();
    if let Some(first) = lines.next() {
        error!("{context}: {first}");
    }
    for line in lines {
        error!("{context}: {}", line.trim());
    }
}

/// Hands memory freed after a burst (loading the eBPF object, a large
/// mesh) back to the system: glibc keeps freed heap for reuse, which made
/// nexd's steady RSS most of its peak.
pub(crate) fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; it takes no
    // pointer and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Logs a failure to undo something during teardown; teardown carries on.
pub(crate) fn teardown_warning(what: &str, err: &dyn std::fmt::Display) {
    warn!(error = %err, "teardown: {what} failed");
}
