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
mod client_steps;
mod endpoints;
mod exit_client;
mod exit_group;
mod exit_load;
mod exit_probe;
mod exit_role;
mod exit_server;
mod heartbeats;
mod host;
mod interface;
mod lan_gateway;
mod ledger_record;
pub mod lock;
mod membership;
mod metrics;
mod programs;
pub mod reconcile;
mod report;
mod settings;
mod split_tunnel;
mod view;

use std::{os::unix::fs::DirBuilderExt as _, time::Duration};

use anyhow::{Context as _, anyhow};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    control::server::{self, ControlServer},
    keys,
    netlink::Netlink,
};

use agent::Daemon;
/// At most this many `--exit-probe-target`s.
pub use exit_probe::MAX_TARGETS as MAX_EXIT_PROBE_TARGETS;
use settings::Settings;
pub use settings::{ExitServerOptions, Options};

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

    // The one place the whole set of options is read.
    let settings = Settings::split(opts)?;
    let state_dir = &settings.state_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
    let _lock = lock::InstanceLock::acquire(state_dir)?;
    // Where nexctl finds this instance when nexd is dead and nexctl was
    // not given its options; a clean stop removes the entry.
    let _registration = Registration::new(state_dir, &settings.control.socket);
    let control_settings = settings.control.clone();
    server::check_socket_free(&control_settings.socket)?;

    let (key, created) = keys::load_or_create(state_dir)?;
    let own = key.public_key();
    if created {
        info!(public_key = %own, path = %keys::key_path(state_dir).display(), "generated a new private key");
    }
    // After the option checks: a misconfigured nexd publishes no join
    // request.
    let (membership, mut membership_events) =
        membership::Membership::open(&settings.membership, &own).await?;
    info!(device = %membership.starting_name(&own), public_key = %own, interface = %settings.interface.name, "starting nexd {}", env!("CARGO_PKG_VERSION"));

    let split = split_tunnel::SplitTunnel::load(&settings.split)?;
    // Sequence numbers of this run's announcements start above every
    // earlier run's, whatever the clock says.
    let epoch = crate::announce::seq::next_epoch(state_dir)?;
    let nl = Netlink::connect()?;
    // Uplinks are followed as they change (a new default route, Wi-Fi,
    // tethering, a renumbered interface), not on a timer.
    let (uplink_changes, mut uplinks_changed) = mpsc::channel(1);
    // Also the client's own table and rules: what the kernel (or anyone)
    // removes of them behind nexd's back is put back. Not the excluded
    // routes nexd writes itself (tens of thousands at a time).
    let _watch = crate::routing::uplink::watch_changes(
        uplink_changes,
        vec![settings.client.numbers.table],
        vec![settings.client.numbers.exclusion_table()],
    )?;
    let (announcements, mut incoming) = mpsc::channel(crate::announce::QUEUE);
    let (resolved_tx, mut resolved) = mpsc::channel(4);
    let (exit_probe_tx, mut exit_probe_rounds) = mpsc::channel(4);
    let mut daemon = Daemon::new(
        settings,
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
    let (control, mut calls) = match ControlServer::bind(
        &control_settings.socket,
        control_settings.socket_group.as_deref(),
    ) {
        Ok(x) => x,
        Err(e) => {
            daemon.teardown().await;
            return Err(e.into());
        }
    };
    let _metrics = match control_settings.metrics_listen {
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
    info!(socket = %control_settings.socket.display(), "ready");
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
                crate::notify::ready();
            }
            Some(call) = calls.recv() => {
                let response = daemon.answer(call.method).await;
                let _ = call.reply.send(response);
            }
            Some(inc) = incoming.recv() => daemon.on_announcement(inc).await,
            Some(r) = resolved.recv() => daemon.on_resolved(r).await,
            Some(r) = exit_probe_rounds.recv() => daemon.on_exit_probe(r),
            Some(ev) = membership_events.recv() => daemon.on_membership(ev).await,
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

/// This instance's entry in `instance::REGISTRY_DIR` while it runs: gone
/// with every way `run` returns (everything was removed by then), left
/// behind by a crash, for nexctl to find.
struct Registration(Option<std::path::PathBuf>);

impl Registration {
    fn new(state_dir: &std::path::Path, socket: &std::path::Path) -> Self {
        let dir = std::path::Path::new(crate::instance::REGISTRY_DIR);
        match crate::instance::register(dir, state_dir, socket) {
            Ok(path) => Registration(Some(path)),
            Err(e) => {
                warn!(error = %e, dir = %dir.display(), "cannot register this instance: with nexd dead, `nexctl … disable` finds it only from the same options");
                Registration(None)
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            crate::instance::unregister(path);
        }
    }
}
