//! Excluded routes for the device's *own* traffic.
//!
//! Forwarded (LAN) traffic is classified by the eBPF steering classifier
//! before its route lookup. Locally originated traffic never crosses a TC
//! ingress hook before its route is chosen (and its source address with
//! it), so for it nexd mirrors the excluded prefixes into a routing table
//! of its own, each as a route via the main table's default gateway, looked
//! up by one fixed rule (installed with the client's policy routing). The
//! kernel FIB is itself a longest-prefix-match trie, so 50,000 exclusions
//! cost 50,000 routes and still one rule.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::RouteMessageBuilder;
use tracing::{debug, info};

use super::{routes, uplink::DefaultRoute};
use crate::netlink::{Netlink, NetlinkError};

/// Owner of the routes in nexd's exclusion table.
pub struct ExcludedRoutes {
    table: u32,
    /// Installed routes and the next hop they were installed with.
    installed: HashMap<IpNet, DefaultRoute>,
}

impl ExcludedRoutes {
    pub fn new(table: u32) -> Self {
        ExcludedRoutes {
            table,
            installed: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.installed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
    }

    fn message(&self, net: &IpNet, via: &DefaultRoute) -> RouteMessage {
        match (net, via.gateway) {
            (IpNet::V4(n), gw) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(n.network(), n.prefix_len())
                    .output_interface(via.oif)
                    .table_id(self.table);
                if let Some(IpAddr::V4(g)) = gw {
                    b = b.gateway(g);
                } else {
                    b = b.scope(RouteScope::Link);
                }
                b.build()
            }
            (IpNet::V6(n), gw) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(n.network(), n.prefix_len())
                    .output_interface(via.oif)
                    .table_id(self.table);
                if let Some(IpAddr::V6(g)) = gw {
                    b = b.gateway(g);
                }
                b.build()
            }
        }
    }

    /// Makes the table hold one route per `wanted` prefix, via the default
    /// route of its family (prefixes of a family without default route are
    /// left out: they would go nowhere). Only differences are sent.
    pub async fn sync(
        &mut self,
        nl: &Netlink,
        wanted: &[IpNet],
        v4: Option<DefaultRoute>,
        v6: Option<DefaultRoute>,
    ) -> Result<(), NetlinkError> {
        let mut want: HashMap<IpNet, DefaultRoute> = HashMap::with_capacity(wanted.len());
        for net in wanted {
            let via = match net {
                IpNet::V4(_) => v4,
                IpNet::V6(_) => v6,
            };
            if let Some(via) = via {
                want.insert(*net, via);
            }
        }
        let stale: Vec<(IpNet, DefaultRoute)> = self
            .installed
            .iter()
            .filter(|(n, via)| want.get(*n) != Some(*via))
            .map(|(n, v)| (*n, *v))
            .collect();
        let deletions = stale.iter().map(|(net, via)| {
            let msg = self.message(net, via);
            async move {
                let r = routes::delete(nl, msg, || format!("deleting excluded route {net}")).await;
                (*net, r)
            }
        });
        let mut first_error = None;
        for (net, r) in concurrently(deletions).await {
            match r {
                Ok(()) => {
                    self.installed.remove(&net);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let table = self.table;
        let additions = want
            .iter()
            .filter(|(net, via)| self.installed.get(*net) != Some(*via))
            .map(|(net, via)| {
                let msg = self.message(net, via);
                async move {
                    let r = routes::replace(nl, msg, || {
                        format!("adding excluded route {net} (table {table})")
                    })
                    .await;
                    (*net, *via, r)
                }
            });
        let mut added = 0usize;
        for (net, via, r) in concurrently(additions).await {
            match r {
                Ok(()) => {
                    self.installed.insert(net, via);
                    added += 1;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if added > 0 || !stale.is_empty() {
            info!(
                added,
                removed = stale.len(),
                total = self.installed.len(),
                table = self.table,
                "excluded routes updated"
            );
        }
        Ok(())
    }

    /// Deletes every route of the table, also ones a crashed nexd left;
    /// returns how many there were.
    pub async fn clear(&mut self, nl: &Netlink) -> Result<usize, NetlinkError> {
        let table = self.table;
        let found = routes::of_table(nl, table).await?;
        let n = found.len();
        let deletions = found.into_iter().map(|(_, mut r)| {
            // A dump carries attributes the delete must not repeat as-is
            // (cache info); destination, table and next hop suffice.
            r.attributes.retain(|a| {
                matches!(
                    a,
                    RouteAttribute::Destination(_)
                        | RouteAttribute::Table(_)
                        | RouteAttribute::Oif(_)
                        | RouteAttribute::Gateway(_)
                )
            });
            routes::delete(nl, r, move || format!("deleting a route of table {table}"))
        });
        for r in concurrently(deletions).await {
            r?;
        }
        if n > 0 {
            debug!(routes = n, table, "exclusion table cleared");
        }
        self.installed.clear();
        Ok(n)
    }
}

/// How many route requests are in flight at once on the netlink socket:
/// one at a time, 50,000 excluded routes took 10 s to add (each waits for
/// its answer); the kernel answers each on its own, in order.
const IN_FLIGHT: usize = 64;

/// Runs `requests` with up to `IN_FLIGHT` at a time; every one runs, and
/// the outcomes come back in no particular order.
async fn concurrently<T>(requests: impl Iterator<Item = impl Future<Output = T>>) -> Vec<T> {
    use futures::StreamExt as _;
    futures::stream::iter(requests)
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await
}
