//! The exit-node client in the daemon: applies the phase `exit::next_phase`
//! picks, in an order that never leaks and never strands the device.

use std::time::Instant;

use tracing::{error, info, warn};

use super::state::Daemon;
use crate::{
    control::protocol::{ErrorCode, ExitNodeRow, Reply, Response},
    exit::{self, Candidate, Phase},
    keys::PublicKey,
};

/// The exact messages users know from Nexodus.
pub const ENABLED: &str = "Successfully enabled exit node client on this device";
pub const DISABLED: &str = "Successfully disabled exit node client on this device";

impl Daemon {
    fn name_of(&self, key: &PublicKey) -> String {
        self.book.name(key).unwrap_or("?").to_owned()
    }

    /// The pinned exit node's key (`--exit-node`), found by name or key in
    /// the mesh. `Err` when the pin names no device: then no exit node may
    /// be used at all.
    fn pinned_exit(&self) -> Result<Option<PublicKey>, ()> {
        let Some(pin) = self.opts.exit_node_pin.as_deref() else {
            return Ok(None);
        };
        self.mesh
            .peers_of(&self.own)
            .find(|d| d.name == pin || d.public_key.to_string() == pin)
            .map(|d| Some(d.public_key))
            .ok_or(())
    }

    fn exit_available(&self, key: &PublicKey) -> bool {
        self.book
            .live(key)
            .and_then(|l| exit::status(l, Instant::now()))
            == Some(exit::ExitStatus::Available)
    }

    /// The exit node `exit::choose` picks now.
    fn choose_exit(&self, now: Instant) -> Option<PublicKey> {
        let pinned = self.pinned_exit().ok()?;
        let candidates = self.book.keys().filter_map(|k| {
            Some(Candidate {
                key: *k,
                name: self.book.name(k)?,
                live: self.book.live(k)?,
            })
        });
        let current = self.phase.exit_peer().map(|key| exit::Current {
            key,
            since: self.exit_since,
        });
        exit::choose(current, pinned, candidates, now)
    }

    /// Moves the client to the phase the announcements call for.
    pub(super) async fn evaluate_exit(&mut self) {
        if self.forwarding.is_some() {
            return;
        }
        let chosen = if self.exit_wanted {
            self.choose_exit(Instant::now())
        } else {
            None
        };
        let next = exit::next_phase(self.exit_wanted, self.phase, chosen);
        if next != self.phase
            && let Err(e) = self.transition(next).await
        {
            error!(error = %crate::error_text(&e), "changing the exit-node client failed");
        }
    }

    /// Applies `next`. Enabling installs the tunnel side (fwmark, 0/0 on
    /// the exit peer) before the rules that send traffic into it; disabling
    /// removes the rules first. A failed enable is rolled back.
    pub(super) async fn transition(&mut self, next: Phase) -> anyhow::Result<()> {
        let prev = self.phase;
        self.log_transition(prev, next);
        if let (Phase::Active(a), Phase::Active(b)) = (prev, next)
            && a != b
        {
            self.failovers += 1;
        }
        if next.exit_peer().is_some() && next.exit_peer() != prev.exit_peer() {
            self.exit_since = Instant::now();
        }
        let index = self.link_index.unwrap_or_default();
        let mesh = self.mesh.clone();
        match (prev.routing_installed(), next.routing_installed()) {
            (false, true) => {
                self.phase = next;
                let installed = match self.apply(&mesh).await {
                    Ok(()) => self
                        .client
                        .install(&self.nl, index, &self.opts.interface, &mut self.sysctls)
                        .await
                        .map_err(anyhow::Error::from),
                    Err(e) => Err(e),
                };
                if let Err(e) = installed {
                    let _ = self.client.remove(&self.nl, &mut self.sysctls).await;
                    self.phase = prev;
                    if let Err(e2) = self.apply(&mesh).await {
                        warn!(error = %e2, "rolling back the peer config failed");
                    }
                    return Err(e);
                }
            }
            (true, false) => {
                let removed = self.client.remove(&self.nl, &mut self.sysctls).await;
                self.phase = next;
                // apply() also syncs the data path: steering off, guard gone.
                self.apply(&mesh).await?;
                removed?;
            }
            _ => {
                self.phase = next;
                self.apply(&mesh).await?;
            }
        }
        Ok(())
    }

    fn log_transition(&self, prev: Phase, next: Phase) {
        match (prev, next) {
            (_, Phase::Off) if prev.routing_installed() => {
                info!("exit-node client disabled: the direct path is restored")
            }
            (_, Phase::Off) => info!("exit-node client off"),
            (_, Phase::Waiting) => info!(
                "exit-node client wanted, but no exit node is available yet: waiting (the device keeps its direct path)"
            ),
            (Phase::Active(old), Phase::Active(new)) if self.exit_available(&old) => info!(
                from = %self.name_of(&old),
                to = %self.name_of(&new),
                "exit node {} is clearly faster than {}: switching to it",
                self.name_of(&new),
                self.name_of(&old)
            ),
            (Phase::Active(old), Phase::Active(new)) => warn!(
                from = %self.name_of(&old),
                to = %self.name_of(&new),
                "exit node {} is no longer available: switching to {}",
                self.name_of(&old),
                self.name_of(&new)
            ),
            (Phase::Held, Phase::Active(new)) => info!(
                exit = %self.name_of(&new),
                "exit node {} is available: internet traffic flows through it again",
                self.name_of(&new)
            ),
            (_, Phase::Active(new)) => info!(
                exit = %self.name_of(&new),
                "exit-node client enabled: internet traffic goes through {}",
                self.name_of(&new)
            ),
            (Phase::Active(old), Phase::Held) => warn!(
                exit = %self.name_of(&old),
                "exit node {} is no longer available and no other is: internet traffic is held back (not leaked) until one returns",
                self.name_of(&old)
            ),
            (_, Phase::Held) => warn!("exit-node client holding internet traffic back"),
        }
    }

    /// `nexctl nexd exit-node enable`.
    pub(super) async fn exit_enable(&mut self) -> Response {
        if self.forwarding.is_some() {
            return Response::error(
                ErrorCode::Unavailable,
                "this device is an exit node (nexd router --exit-node); it cannot also be an exit-node client",
            );
        }
        if let Phase::Active(_) = self.phase {
            self.exit_wanted = true;
            return Response::ok(Reply::Done {
                message: ENABLED.into(),
            });
        }
        let Some(chosen) = self.choose_exit(Instant::now()) else {
            let known = self.exit_rows(Instant::now()).len();
            let detail = if self.pinned_exit().is_err() {
                format!(
                    "--exit-node {:?} names no device of the mesh",
                    self.opts.exit_node_pin.as_deref().unwrap_or_default()
                )
            } else if let Ok(Some(k)) = self.pinned_exit() {
                format!("the pinned exit node {} is not available", self.name_of(&k))
            } else if known == 0 {
                "no device of the mesh announces itself as exit node (start one with `nexd router --exit-node`)".to_owned()
            } else {
                format!(
                    "{known} exit node(s) known, none available now; see `nexctl nexd exit-node list`"
                )
            };
            return Response::error(
                ErrorCode::Unavailable,
                format!(
                    "cannot enable the exit node client: no exit node is available: {detail}. Nothing was changed."
                ),
            );
        };
        let was_wanted = self.exit_wanted;
        self.exit_wanted = true;
        match self.transition(Phase::Active(chosen)).await {
            Ok(()) => Response::ok(Reply::Done {
                message: ENABLED.into(),
            }),
            Err(e) => {
                self.exit_wanted = was_wanted;
                Response::error(
                    ErrorCode::Internal,
                    format!(
                        "enabling the exit node client failed: {}",
                        crate::error_text(&e)
                    ),
                )
            }
        }
    }

    /// `nexctl nexd exit-node disable`.
    pub(super) async fn exit_disable(&mut self) -> Response {
        self.exit_wanted = false;
        if self.phase != Phase::Off
            && let Err(e) = self.transition(Phase::Off).await
        {
            return Response::error(
                ErrorCode::Internal,
                format!(
                    "disabling the exit node client failed: {}",
                    crate::error_text(&e)
                ),
            );
        }
        Response::ok(Reply::Done {
            message: DISABLED.into(),
        })
    }

    /// Every peer that announces itself (or last announced itself) as exit
    /// node, sorted by name.
    pub(super) fn exit_rows(&self, now: Instant) -> Vec<ExitNodeRow> {
        let mut rows: Vec<ExitNodeRow> = self
            .mesh
            .peers_of(&self.own)
            .filter_map(|d| {
                let live = self.book.live(&d.public_key)?;
                let status = exit::status(live, now)?;
                let endpoint = self
                    .last_status
                    .as_ref()
                    .and_then(|s| s.peers.iter().find(|p| p.public_key == d.public_key))
                    .and_then(|p| p.endpoint)
                    .map(|e| e.to_string())
                    .or_else(|| d.endpoint.as_ref().map(ToString::to_string));
                Some(ExitNodeRow {
                    endpoint_address: endpoint,
                    public_key: d.public_key.to_string(),
                    name: d.name.clone(),
                    mesh_ipv4: d.ipv4.to_string(),
                    mesh_ipv6: d.ipv6.to_string(),
                    status,
                    active: self.phase.exit_peer() == Some(d.public_key),
                    rtt_ms: live.rtt.map(|r| r.as_secs_f64() * 1000.0),
                    last_heard_seconds: live
                        .last_heard
                        .map(|t| now.saturating_duration_since(t).as_secs_f64()),
                })
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }
}
