//! What networks the host itself has: every address of every interface
//! and the destinations of its routes, in every routing table. An exit
//! node denies its clients all of it (its own addresses, its connected
//! and routed subnets: the VPC, a private network only it reaches, a
//! partner's prefix a policy rule sends through table 100), so it reads
//! them here and again whenever links, addresses or routes change.

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;

use super::routes;
use crate::netlink::{Netlink, NetlinkError};

/// Every address of every interface, with its prefix length.
pub async fn addresses(nl: &Netlink) -> Result<Vec<IpNet>, NetlinkError> {
    let mut out = Vec::new();
    let mut stream = nl.handle().address().get().execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|e| NetlinkError::new("listing addresses", e))?
    {
        let len = msg.header.prefix_len;
        let addr = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = addr
            && let Ok(net) = IpNet::new(ip, len)
        {
            out.push(net);
        }
    }
    Ok(out)
}

/// Destinations of the routes of every table other than the default
/// routes and the halves that split a default (0.0.0.0/1 and 128.0.0.0/1,
/// ::/1 and 8000::/1, as VPN clients install): subnets the host reaches
/// that are not the internet. Every table, not main alone: a policy rule
/// can send any destination through any of them, so a route anywhere is
/// a subnet the host reaches (the nftables table also keeps clients'
/// traffic on the uplinks, whatever routing decides).
pub async fn routed_subnets(nl: &Netlink) -> Result<Vec<IpNet>, NetlinkError> {
    let mut out = Vec::new();
    for (_, r) in routes::of_every_table(nl).await? {
        if r.header.destination_prefix_length <= 1 {
            continue;
        }
        if let Some(net) = routes::destination(&r) {
            out.push(net);
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}
