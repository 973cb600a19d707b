//! Split tunnelling: the excluded prefixes (from `--exclude-route` and the
//! excluded-routes file) and the one kernel object they need outside the
//! eBPF maps, the routes of the excluded-routes table for the device's
//! own traffic, kept pointing at the current default routes.

use std::path::PathBuf;

use ipnet::IpNet;
use tracing::info;

use super::settings::SplitSettings;
use crate::{
    netlink::{Netlink, NetlinkError},
    routing::{
        exclusions::ExcludedRoutes,
        uplink::{self, DefaultRoute},
    },
};

pub struct SplitTunnel {
    /// `--exclude-route` prefixes.
    fixed: Vec<IpNet>,
    /// `--exclude-routes-file`, re-read on SIGHUP.
    file: Option<PathBuf>,
    /// The merged list in force.
    exclusions: Vec<IpNet>,
    routes: ExcludedRoutes,
    /// The default routes the routes were installed via.
    via: Option<(Option<DefaultRoute>, Option<DefaultRoute>)>,
}

impl SplitTunnel {
    /// Reads the file once; a bad file fails the start (with its lines).
    pub fn load(settings: &SplitSettings) -> anyhow::Result<Self> {
        let SplitSettings {
            routes: fixed,
            file,
            table,
        } = settings.clone();
        let exclusions = crate::exclude::load(&fixed, file.as_deref())?;
        Ok(SplitTunnel {
            fixed,
            file,
            exclusions,
            routes: ExcludedRoutes::new(table),
            via: None,
        })
    }

    pub fn exclusions(&self) -> &[IpNet] {
        &self.exclusions
    }

    /// Re-reads the file (SIGHUP). A bad file is rejected with its line
    /// numbers and the running list stays. Returns whether the list changed.
    pub fn reload(&mut self) -> bool {
        let Some(file) = self.file.clone() else {
            return false;
        };
        match crate::exclude::load(&self.fixed, Some(&file)) {
            Ok(list) if list != self.exclusions => {
                info!(count = list.len(), "excluded routes reloaded");
                self.exclusions = list;
                // Force a resync of the routes.
                self.via = None;
                true
            }
            Ok(_) => false,
            Err(e) => {
                super::report::log_error_lines(
                    "excluded routes file rejected, keeping the running list",
                    &e,
                );
                false
            }
        }
    }

    /// Mirrors the excluded prefixes into the table via the current
    /// default routes; a no-op when neither changed.
    pub async fn sync(&mut self, nl: &Netlink) -> Result<(), NetlinkError> {
        let defaults = uplink::default_routes(nl).await?;
        if self.via != Some(defaults) || self.routes.len() != self.exclusions.len() {
            self.routes
                .sync(nl, &self.exclusions, defaults.0, defaults.1)
                .await?;
            self.via = Some(defaults);
        }
        Ok(())
    }

    /// Removes every route of the table (also what a crashed nexd left).
    pub async fn clear(&mut self, nl: &Netlink) -> Result<(), NetlinkError> {
        self.via = None;
        self.routes.clear(nl).await.map(|_| ())
    }
}
