//! The mesh interface as a network device: its creation (kernel WireGuard),
//! MTU, up state and mesh addresses. This module is the one owner of those
//! addresses; the interface's own deletion removes them and their routes.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags},
    link::{InfoKind, LinkAttribute, LinkInfo},
};
use rtnetlink::{LinkUnspec, LinkWireguard};
use tracing::{debug, info};

use crate::netlink::{Netlink, NetlinkError};

/// Creates a kernel WireGuard link called `name`. Fails with EOPNOTSUPP (or
/// similar) when the kernel has no WireGuard support, which is how `auto`
/// backend selection finds out.
pub async fn create_wireguard_link(nl: &Netlink, name: &str) -> Result<(), NetlinkError> {
    nl.handle()
        .link()
        .add(LinkWireguard::new(name).build())
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("creating WireGuard link {name}"), e))
}

/// Whether the link at `name` is a kernel WireGuard link (as opposed to a
/// TUN device run by a userspace implementation).
pub async fn is_kernel_wireguard(nl: &Netlink, name: &str) -> Result<bool, NetlinkError> {
    Ok(nl.link(name).await?.is_some_and(|link| {
        link.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos
                .iter()
                .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Wireguard))),
            _ => false,
        })
    }))
}

/// Sets the MTU and brings the link up.
pub async fn set_up(nl: &Netlink, index: u32, name: &str, mtu: u32) -> Result<(), NetlinkError> {
    nl.handle()
        .link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("setting MTU {mtu} and bringing up {name}"), e))
}

/// The addresses on link `index`, as prefixes (address plus prefix length).
pub async fn addresses(nl: &Netlink, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
    let mut stream = nl
        .handle()
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut out = Vec::new();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|e| NetlinkError::new(format!("listing addresses of link #{index}"), e))?
    {
        if msg.header.index != index {
            continue;
        }
        let addr = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let addr = addr.or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        if let Some(ip) = addr
            && let Ok(net) = IpNet::new(ip, msg.header.prefix_len)
        {
            out.push(net);
        }
    }
    Ok(out)
}

/// Adds `addr` to link `index`, with its prefix length (for source address
/// selection) but without the connected route for the whole prefix: the
/// mesh prefix holds addresses that are no member's (100.100.100.200, a
/// cloud's metadata service, is in 100.64.0.0/10), and only members are
/// routed into the tunnel (`MeshInterface::set_member_routes`). Already
/// present is fine. IPv6 addresses skip duplicate address detection: the
/// mesh file already guarantees uniqueness and DAD would delay the address
/// by seconds.
pub async fn add_address(
    nl: &Netlink,
    index: u32,
    name: &str,
    addr: IpNet,
) -> Result<(), NetlinkError> {
    let mut req = nl
        .handle()
        .address()
        .add(index, addr.addr(), addr.prefix_len())
        .replace();
    let msg = req.message_mut();
    if matches!(addr.addr(), IpAddr::V6(_)) {
        msg.header.flags |= AddressHeaderFlags::Nodad;
        msg.attributes.push(AddressAttribute::Flags(
            AddressFlags::Nodad | AddressFlags::Noprefixroute,
        ));
    } else {
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Noprefixroute));
    }
    req.execute()
        .await
        .map_err(|e| NetlinkError::new(format!("adding address {addr} to {name}"), e))?;
    debug!(iface = name, %addr, "address added");
    Ok(())
}

/// Removes `addr` from link `index`; an address that is not there is fine.
pub async fn del_address(
    nl: &Netlink,
    index: u32,
    name: &str,
    addr: IpNet,
) -> Result<(), NetlinkError> {
    let mut stream = nl
        .handle()
        .address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(addr.addr())
        .set_prefix_length_filter(addr.prefix_len())
        .execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|e| NetlinkError::new(format!("looking up address {addr} on {name}"), e))?
    {
        if msg.header.index != index {
            continue;
        }
        match nl.handle().address().del(msg).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == libc::EADDRNOTAVAIL => {
                return Ok(());
            }
            Err(e) => {
                return Err(NetlinkError::new(
                    format!("removing address {addr} from {name}"),
                    e,
                ));
            }
        }
    }
    info!(iface = name, %addr, "address removed");
    Ok(())
}
