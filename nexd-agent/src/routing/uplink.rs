//! Finding the uplink: the interface (and gateway) of the default route,
//! and noticing when it may have moved.

use std::net::IpAddr;

use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};

use super::routes::{self, MAIN_TABLE, table_of};
use crate::netlink::{Netlink, NetlinkError};

/// The main table's default route of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultRoute {
    pub oif: u32,
    pub gateway: Option<IpAddr>,
}

fn default_of(msg: &RouteMessage) -> Option<DefaultRoute> {
    let mut oif = None;
    let mut gateway = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(IpAddr::V4(*g)),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some(IpAddr::V6(*g)),
            RouteAttribute::MultiPath(hops) if oif.is_none() => {
                oif = hops.first().map(|h| h.interface_index);
            }
            _ => {}
        }
    }
    oif.map(|oif| DefaultRoute { oif, gateway })
}

/// Every route of the main table, IPv4 then IPv6, with whether it is
/// IPv6: the one listing the uplink readers filter.
pub async fn main_routes(nl: &Netlink) -> Result<Vec<(bool, RouteMessage)>, NetlinkError> {
    routes::of_table(nl, MAIN_TABLE).await
}

/// The IPv4 and IPv6 default routes of the main table.
pub async fn default_routes(
    nl: &Netlink,
) -> Result<(Option<DefaultRoute>, Option<DefaultRoute>), NetlinkError> {
    let mut out = (None, None);
    for (v6, r) in main_routes(nl).await? {
        if r.header.destination_prefix_length == 0 {
            let slot = if v6 { &mut out.1 } else { &mut out.0 };
            if slot.is_none() {
                *slot = default_of(&r);
            }
        }
    }
    Ok(out)
}

/// Every interface a default route of the main table leaves through: all
/// default routes of both families (a second one with a higher metric is
/// still a way out) and every hop of a multipath route. These are the
/// uplinks the leak guard must sit on.
pub async fn all_default_route_interfaces(nl: &Netlink) -> Result<Vec<String>, NetlinkError> {
    let mut indexes: Vec<u32> = Vec::new();
    for (_, r) in main_routes(nl).await? {
        if r.header.destination_prefix_length != 0 {
            continue;
        }
        for a in &r.attributes {
            match a {
                RouteAttribute::Oif(i) => indexes.push(*i),
                RouteAttribute::MultiPath(hops) => {
                    indexes.extend(hops.iter().map(|h| h.interface_index));
                }
                _ => {}
            }
        }
    }
    indexes.sort_unstable();
    indexes.dedup();
    let mut names = Vec::new();
    for i in indexes {
        if let Some(n) = nl.link_name(i).await? {
            names.push(n);
        }
    }
    Ok(names)
}

/// Interface names of the IPv4 and IPv6 default routes in the main table.
pub async fn default_route_interfaces(
    nl: &Netlink,
) -> Result<(Option<String>, Option<String>), NetlinkError> {
    let (v4, v6) = default_routes(nl).await?;
    let name = |r: Option<DefaultRoute>| async move {
        match r {
            Some(r) => nl.link_name(r.oif).await,
            None => Ok(None),
        }
    };
    Ok((name(v4).await?, name(v6).await?))
}

/// Whether this host has a way to the internet now: a default route (either
/// family) through an interface that is up with a carrier (`only`: through
/// that interface). An exit node without one withdraws its exit
/// capability.
pub async fn internet_reachable(nl: &Netlink, only: Option<&str>) -> Result<bool, NetlinkError> {
    use netlink_packet_route::link::LinkFlags;
    let (v4, v6) = default_route_interfaces(nl).await?;
    for name in [v4, v6].into_iter().flatten() {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        if let Some(link) = nl.link(&name).await?
            && link
                .header
                .flags
                .contains(LinkFlags::Up | LinkFlags::LowerUp)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a route event matters: every route of every table does (a
/// default route moves uplinks; any other route, in main or in a table a
/// policy rule uses, changes what an exit node's clients may not reach;
/// `own_tables` hold what nexd relies on), except nexd's own churn and
/// the kernel's: routes of `churn_tables` (the excluded routes, which
/// nexd itself writes by the tens of thousands) and cached clones (PMTU
/// and redirect exceptions, which come and go with traffic and change no
/// table).
fn route_event_matters(msg: &RouteMessage, own_tables: &[u32], churn_tables: &[u32]) -> bool {
    use netlink_packet_route::route::RouteFlags;
    let table = table_of(msg);
    own_tables.contains(&table)
        || !(churn_tables.contains(&table) || msg.header.flags.contains(RouteFlags::Cloned))
}

/// Listens for the changes that move uplinks: links appearing, going or
/// changing state, addresses, and routes (default routes move uplinks;
/// the others are what an exit node's policy is made of); and for
/// changes to what nexd relies on: every route of `own_tables` and every
/// policy rule (the daemon checks its own objects against them and puts
/// back what was removed behind its back; its own changes cost one
/// check). Routes of `churn_tables` (nexd's excluded routes) do not
/// count. Each burst of changes becomes one notice on `notices` (a full
/// channel already holds one, which is all the loop needs to know), so
/// the daemon re-evaluates within milliseconds instead of on a timer.
pub fn watch_changes(
    notices: tokio::sync::mpsc::Sender<()>,
    own_tables: Vec<u32>,
    churn_tables: Vec<u32>,
) -> Result<tokio::task::JoinHandle<()>, NetlinkError> {
    use futures::StreamExt as _;
    use netlink_packet_route::RouteNetlinkMessage;
    use rtnetlink::constants::{
        RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE, RTMGRP_IPV6_IFADDR,
        RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
    };
    /// RTNLGRP_IPV6_RULE (19) as a legacy group bit; rtnetlink has no
    /// constant for it.
    const RTMGRP_IPV6_RULE: u32 = 1 << (19 - 1);
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::sys::AsyncSocket as _;

    let io = |op: &str, source: std::io::Error| NetlinkError {
        op: op.into(),
        source,
    };
    let (mut conn, _handle, mut messages) = rtnetlink::new_connection()
        .map_err(|e| io("opening a route netlink socket for change notices", e))?;
    let groups = RTMGRP_LINK
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV6_ROUTE
        | RTMGRP_IPV4_RULE
        | RTMGRP_IPV6_RULE;
    conn.socket_mut()
        .socket_mut()
        .bind(&rtnetlink::sys::SocketAddr::new(0, groups))
        .map_err(|e| io("subscribing to route, address and link changes", e))?;
    tokio::spawn(conn);
    Ok(tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let relevant = match msg.payload {
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r),
                ) => route_event_matters(&r, &own_tables, &churn_tables),
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewAddress(_)
                    | RouteNetlinkMessage::DelAddress(_)
                    | RouteNetlinkMessage::NewLink(_)
                    | RouteNetlinkMessage::DelLink(_)
                    | RouteNetlinkMessage::NewRule(_)
                    | RouteNetlinkMessage::DelRule(_),
                ) => true,
                _ => false,
            };
            if relevant
                && let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) =
                    notices.try_send(())
            {
                return;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use netlink_packet_route::route::RouteFlags;
    use rtnetlink::RouteMessageBuilder;

    use super::*;

    /// Issue 21, finding 6: a route added to main (or any table) while an
    /// exit node runs changes its policy, so it must wake the daemon; the
    /// excluded routes nexd writes itself (28281 here) do not.
    #[test]
    fn every_route_event_matters_but_nexds_churn_and_the_kernels_cached_clones() {
        let route = |table: u32, len: u8| {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(table)
                .destination_prefix(Ipv4Addr::new(198, 51, 100, 0), len)
                .build()
        };
        for (table, len) in [
            (MAIN_TABLE, 0),
            (MAIN_TABLE, 25),
            (100, 25),
            (255, 32),
            (28280, 0),
        ] {
            assert!(
                route_event_matters(&route(table, len), &[28280], &[28281]),
                "{table} /{len}"
            );
        }
        assert!(!route_event_matters(&route(28281, 24), &[28280], &[28281]));
        let mut clone = route(MAIN_TABLE, 32);
        clone.header.flags |= RouteFlags::Cloned;
        assert!(!route_event_matters(&clone, &[28280], &[28281]));
        let mut own_clone = route(28280, 32);
        own_clone.header.flags |= RouteFlags::Cloned;
        assert!(route_event_matters(&own_clone, &[28280], &[28281]));
    }
}
