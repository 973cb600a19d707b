//! The routes of one routing table through rtnetlink, read and written
//! the same way by every owner of routes (`policy`, `exclusions`) and
//! reader of them (`uplink`, `host`): which table a route belongs to,
//! every route of a table, and adding or deleting one where "already
//! gone" is not an error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::RouteMessageBuilder;

use crate::netlink::{Netlink, NetlinkError};

/// The kernel's main table.
pub const MAIN_TABLE: u32 = 254;

/// The routing table a route message belongs to (the attribute for
/// tables above 255, the header otherwise).
pub fn table_of(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

/// The destination prefix of a route (`None` for a default route, which
/// carries no destination, or an address of another family).
pub fn destination(msg: &RouteMessage) -> Option<IpNet> {
    let ip = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    IpNet::new(ip, msg.header.destination_prefix_length)
        .ok()
        .map(|n| n.trunc())
}

/// The output interface of a route, if it names one.
pub fn oif(msg: &RouteMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// What a route dump for `table` returns (0: every table), IPv4 then
/// IPv6, with whether it is IPv6.
async fn dump(nl: &Netlink, table: u32) -> Result<Vec<(bool, RouteMessage)>, NetlinkError> {
    let mut out = Vec::new();
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
        let family = if v6 { "IPv6" } else { "IPv4" };
        let mut routes = nl.handle().route().get(query).execute();
        while let Some(r) = routes.try_next().await.map_err(|e| {
            let of = match table {
                0 => "every table".to_owned(),
                t => format!("table {t}"),
            };
            NetlinkError::new(format!("listing {family} routes of {of}"), e)
        })? {
            out.push((v6, r));
        }
    }
    Ok(out)
}

/// Every route of `table`, IPv4 then IPv6, with whether it is IPv6. The
/// kernel may dump other tables' routes too (it filters by table only
/// with strict checking), so they are filtered here.
pub async fn of_table(nl: &Netlink, table: u32) -> Result<Vec<(bool, RouteMessage)>, NetlinkError> {
    let mut routes = dump(nl, table).await?;
    routes.retain(|(_, r)| table_of(r) == table);
    Ok(routes)
}

/// Every route of every table (main, local, policy-routing tables, nexd's
/// own), IPv4 then IPv6, with whether it is IPv6: table 0 in the request
/// asks for all of them, with or without strict checking.
pub async fn of_every_table(nl: &Netlink) -> Result<Vec<(bool, RouteMessage)>, NetlinkError> {
    dump(nl, 0).await
}

/// Adds `msg`, replacing the route with the same destination in its
/// table if there is one. `what` names the route for the error.
pub async fn replace(
    nl: &Netlink,
    msg: RouteMessage,
    what: impl FnOnce() -> String,
) -> Result<(), NetlinkError> {
    nl.handle()
        .route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(|e| NetlinkError::new(what(), e))
}

/// Deletes `msg`; a route that is already gone is what was wanted. `what`
/// names the deletion for the error.
pub async fn delete(
    nl: &Netlink,
    msg: RouteMessage,
    what: impl FnOnce() -> String,
) -> Result<(), NetlinkError> {
    match nl.handle().route().del(msg).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(m))
            if matches!(m.raw_code().abs(), libc::ESRCH | libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(NetlinkError::new(what(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_attribute_wins_over_the_header() {
        let mut small = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(MAIN_TABLE)
            .build();
        assert_eq!(table_of(&small), MAIN_TABLE);
        small.attributes.clear();
        assert_eq!(table_of(&small), MAIN_TABLE, "the header alone");
        let large = RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(28280)
            .build();
        assert_eq!(table_of(&large), 28280);
    }
}
