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

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::RouteMessageBuilder;
use tracing::{debug, info};

use super::uplink::{DefaultRoute, table_of};
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
        for (net, via) in &stale {
            let msg = self.message(net, via);
            match nl.handle().route().del(msg).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(m))
                    if matches!(m.raw_code().abs(), libc::ESRCH | libc::ENOENT) => {}
                Err(e) => {
                    return Err(NetlinkError::new(
                        format!("deleting excluded route {net}"),
                        e,
                    ));
                }
            }
            self.installed.remove(net);
        }
        let mut added = 0usize;
        for (net, via) in &want {
            if self.installed.get(net) == Some(via) {
                continue;
            }
            let msg = self.message(net, via);
            nl.handle()
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|e| {
                    NetlinkError::new(
                        format!("adding excluded route {net} (table {})", self.table),
                        e,
                    )
                })?;
            self.installed.insert(*net, *via);
            added += 1;
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
        let mut found: Vec<RouteMessage> = Vec::new();
        for v6 in [false, true] {
            let query = if v6 {
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .table_id(table)
                    .build()
            } else {
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .table_id(table)
                    .build()
            };
            let mut routes = nl.handle().route().get(query).execute();
            while let Some(r) = routes
                .try_next()
                .await
                .map_err(|e| NetlinkError::new("listing routes", e))?
            {
                if table_of(&r) == table {
                    found.push(r);
                }
            }
        }
        let n = found.len();
        for mut r in found {
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
            match nl.handle().route().del(r).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(m))
                    if matches!(m.raw_code().abs(), libc::ESRCH | libc::ENOENT) => {}
                Err(e) => {
                    return Err(NetlinkError::new(
                        format!("deleting a route of table {table}"),
                        e,
                    ));
                }
            }
        }
        if n > 0 {
            debug!(routes = n, table, "exclusion table cleared");
        }
        self.installed.clear();
        Ok(n)
    }
}
