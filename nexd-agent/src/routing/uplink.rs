//! Finding the uplink: the interface of the default route.

use std::net::{Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::RouteMessageBuilder;

use crate::netlink::{Netlink, NetlinkError};

/// The routing table a route message belongs to.
pub fn table_of(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn oif(msg: &RouteMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
        _ => None,
    })
}

/// Interface names of the IPv4 and IPv6 default routes in the main table.
pub async fn default_route_interfaces(
    nl: &Netlink,
) -> Result<(Option<String>, Option<String>), NetlinkError> {
    let mut v4 = None;
    let mut routes = nl
        .handle()
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(r) = routes
        .try_next()
        .await
        .map_err(|e| NetlinkError::new("listing IPv4 routes", e))?
    {
        if r.header.destination_prefix_length == 0 && table_of(&r) == 254 {
            v4 = v4.or(oif(&r));
        }
    }
    let mut v6 = None;
    let mut routes = nl
        .handle()
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute();
    while let Some(r) = routes
        .try_next()
        .await
        .map_err(|e| NetlinkError::new("listing IPv6 routes", e))?
    {
        if r.header.destination_prefix_length == 0 && table_of(&r) == 254 {
            v6 = v6.or(oif(&r));
        }
    }
    let name = |idx: Option<u32>| async move {
        match idx {
            Some(i) => nl.link_name(i).await,
            None => Ok(None),
        }
    };
    Ok((name(v4).await?, name(v6).await?))
}
