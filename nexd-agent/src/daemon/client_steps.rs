//! The exit-node client's steps on the real host: each `plan::Step` as a
//! call to the owner of the kernel object it changes (the WireGuard
//! interface, the client's policy routing, the programs' switches, the
//! DNS redirect). The executor (`exit_client`) decides the order; this
//! only carries each step out.

use tracing::warn;

use super::{exit_client::StepRunner, host::Host, interface::MeshInterface};
use crate::{
    announce::book::PeerBook,
    exit::plan::{Dns, Step},
    keys::PublicKey,
    mesh::Mesh,
    routing::{
        PolicyNumbers, dns,
        policy::{ClientRouting, Present},
    },
};

/// The kernel objects a plan's steps act on, each through its owner.
pub struct ClientSteps<'a> {
    pub host: &'a mut Host,
    pub iface: &'a mut MeshInterface,
    pub routing: ClientRouting,
    /// For an exit node's mesh addresses (its DNS resolver) and prefixes.
    pub mesh: &'a Mesh,
    /// For peer names in log lines.
    pub book: &'a PeerBook,
    /// The DNS redirect's table also drops what the kill switch forbids.
    pub kill_switch: bool,
}

impl StepRunner for ClientSteps<'_> {
    async fn run(&mut self, step: Step) -> anyhow::Result<()> {
        let book = self.book;
        let names = |k: &PublicKey| book.name(k).unwrap_or("?").to_owned();
        let host = &mut *self.host;
        match step {
            Step::AttachGuard => host.programs.set_guard(&host.nl, true).await,
            Step::DetachGuard => host.programs.set_guard(&host.nl, false).await,
            Step::SetFwmark => Ok(self.iface.set_fwmark(Some(self.routing.numbers().fwmark))?),
            Step::ClearFwmark => Ok(self.iface.set_fwmark(None)?),
            Step::AddFallback => Ok(self.routing.add_fallback(&host.nl).await?),
            Step::RemoveFallback => Ok(self.routing.remove_fallback(&host.nl).await?),
            Step::AddRoutes => Ok(self
                .routing
                .add_routes(&host.nl, self.iface.index(), self.iface.name())
                .await?),
            Step::RemoveRoutes => Ok(self.routing.remove_routes(&host.nl).await?),
            Step::RouteVia(k) => Ok(self.iface.route_default_via(k, &names)?),
            Step::AddRules => Ok(self.routing.add_rules(&host.nl, &mut host.sysctls).await?),
            Step::RemoveRules => Ok(self
                .routing
                .remove_rules_and_mark(&host.nl, &mut host.sysctls)
                .await?),
            Step::SteeringOn => host.programs.set_steering(&host.nl, true).await,
            Step::SteeringOff => host.programs.set_steering(&host.nl, false).await,
            Step::Dns(d) => self.redirect_dns(d),
        }
    }
}

impl ClientSteps<'_> {
    /// Which of the client's routing objects the kernel holds now.
    pub async fn present(&self) -> anyhow::Result<Present> {
        Ok(self
            .routing
            .present(&self.host.nl, self.iface.index())
            .await?)
    }

    /// Writes the DNS redirect `d` again, for members that changed.
    pub fn refresh_dns(&self, d: Dns) -> anyhow::Result<()> {
        self.redirect_dns(d)
    }

    fn redirect_dns(&self, d: Dns) -> anyhow::Result<()> {
        let ctx = dns::Context {
            wg: self.iface.name().to_owned(),
            mesh_v4: self.mesh.ipv4_prefix,
            mesh_v6: self.mesh.ipv6_prefix,
            kill_switch: self.kill_switch,
            members: super::reconcile::member_routes(self.mesh),
        };
        let redirect = match d {
            Dns::Off => return Ok(dns::remove()?),
            Dns::Blocked => dns::Redirect::Refused,
            Dns::Via(k) => {
                let exit = self
                    .mesh
                    .device(&k)
                    .ok_or_else(|| anyhow::anyhow!("exit node {k} is not in the mesh"))?;
                dns::Redirect::To(exit.ipv4, exit.ipv6)
            }
        };
        Ok(dns::apply(&ctx, redirect)?)
    }
}

/// Removes whatever a crashed nexd left of the client's routing at nexd's
/// numbers (rules, routes, `src_valid_mark`) before anything else starts.
/// (A leftover DNS redirect goes with the other nftables tables, in
/// `routing::remove_leftover_tables`.)
pub async fn remove_leftovers(numbers: PolicyNumbers, host: &mut Host) {
    if let Err(e) = ClientRouting::new(numbers)
        .remove(&host.nl, &mut host.sysctls)
        .await
    {
        warn!(error = %e, "removing leftover exit-node client routing failed");
    }
}
