//! A thin handle on rtnetlink: one connection per daemon, errors that say
//! which operation on which object failed and keep the kernel's errno, so
//! callers can tell "already there" from real failures.
//!
//! This module owns no kernel object itself; `netif` (the mesh interface and
//! its addresses) and `routing` (rules and routes) build on it.

use std::io;

use futures::TryStreamExt as _;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};

/// A failed netlink request.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct NetlinkError {
    /// What was being done, e.g. "adding address 100.64.0.1/10 to wg0".
    pub op: String,
    #[source]
    pub source: io::Error,
}

impl NetlinkError {
    /// The kernel's errno, when the kernel answered with one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    pub(crate) fn new(op: impl Into<String>, e: rtnetlink::Error) -> Self {
        let source = match e {
            rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
            other => io::Error::other(other.to_string()),
        };
        NetlinkError {
            op: op.into(),
            source,
        }
    }
}

/// The daemon's rtnetlink connection.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a route netlink socket in the current network namespace. Must
    /// run inside the tokio runtime, which drives the connection.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetlinkError {
            op: "opening a route netlink socket".into(),
            source,
        })?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The raw handle, for modules that build their own requests.
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// The index of the link called `name`, or `None` when there is none.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self.link(name).await?.map(|l| l.header.index))
    }

    /// The link called `name`, or `None` when there is none.
    pub async fn link(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(rtnetlink::Error::NetlinkError(msg)) if msg.raw_code().abs() == libc::ENODEV => {
                Ok(None)
            }
            Err(e) => Err(NetlinkError::new(format!("looking up link {name}"), e)),
        }
    }

    /// The name of the link with `index`.
    pub async fn link_name(&self, index: u32) -> Result<Option<String>, NetlinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(msg)) if msg.raw_code().abs() == libc::ENODEV => {
                Ok(None)
            }
            Err(e) => Err(NetlinkError::new(format!("looking up link #{index}"), e)),
        }
    }

    /// The index of every link there is now.
    pub async fn link_indices(&self) -> Result<Vec<u32>, NetlinkError> {
        let mut links = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(link) = links
            .try_next()
            .await
            .map_err(|e| NetlinkError::new("listing links", e))?
        {
            out.push(link.header.index);
        }
        Ok(out)
    }

    /// Deletes the link with `index`; a link that is already gone is fine.
    pub async fn delete_link(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(msg)) if msg.raw_code().abs() == libc::ENODEV => {
                Ok(())
            }
            Err(e) => Err(NetlinkError::new(format!("deleting link {name}"), e)),
        }
    }
}
