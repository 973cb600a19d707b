//! Sockets bound to one address and, optionally, to one interface
//! (`SO_BINDTODEVICE`), for the services nexd offers inside the tunnel
//! (announcements, the exit node's DNS).
//!
//! Binding the mesh address alone is not enough: Linux accepts a packet
//! for any local address on any interface (the weak host model), so a
//! neighbour on the uplink could send to the mesh address, with a spoofed
//! mesh source even. Bound to the WireGuard interface, a socket receives
//! only what came out of the tunnel, where WireGuard has already checked
//! the source against the sending peer's AllowedIPs.
//!
//! The binding is to the interface's *index* at bind time: a socket must
//! be bound again when the interface is recreated.

use std::{
    ffi::OsString,
    io,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsRawFd as _, OwnedFd},
};

use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, setsockopt, sockopt,
};

/// Adds what was being done to an OS error, keeping its kind.
fn context(
    what: &str,
    addr: SocketAddr,
    device: Option<&str>,
    e: impl Into<io::Error>,
) -> io::Error {
    let e = e.into();
    let on = device.map(|d| format!(" on {d}")).unwrap_or_default();
    io::Error::new(e.kind(), format!("{what} {addr}{on}: {e}"))
}

fn bound_socket(addr: SocketAddr, device: Option<&str>, kind: SockType) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(
        family,
        kind,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| context("creating a socket for", addr, device, e))?;
    if let Some(dev) = device {
        setsockopt(&fd, sockopt::BindToDevice, &OsString::from(dev))
            .map_err(|e| context("binding to the interface", addr, device, e))?;
    }
    if kind == SockType::Stream {
        // A restart must not wait for the previous listener's TIME_WAIT.
        setsockopt(&fd, sockopt::ReuseAddr, &true)
            .map_err(|e| context("SO_REUSEADDR for", addr, device, e))?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(|e| context("binding", addr, device, e))?;
    Ok(fd)
}

/// A non-blocking UDP socket bound to `addr`, and to `device` if given.
pub fn udp(addr: SocketAddr, device: Option<&str>) -> io::Result<UdpSocket> {
    Ok(UdpSocket::from(bound_socket(
        addr,
        device,
        SockType::Datagram,
    )?))
}

/// A non-blocking TCP listener on `addr`, and on `device` if given.
pub fn tcp_listener(
    addr: SocketAddr,
    device: Option<&str>,
    backlog: i32,
) -> io::Result<TcpListener> {
    let fd = bound_socket(addr, device, SockType::Stream)?;
    let backlog =
        Backlog::new(backlog).map_err(|e| context("listen backlog for", addr, device, e))?;
    socket::listen(&fd, backlog).map_err(|e| context("listening on", addr, device, e))?;
    Ok(TcpListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_address_and_interface() {
        // No such interface: the error says which bind failed and why.
        // (Needs no privileges to fail: ENODEV, or EPERM without
        // CAP_NET_RAW on old kernels; either way the message names both.)
        let e = udp("127.0.0.1:0".parse().expect("sa"), Some("nexd-nosuch0")).expect_err("bind");
        let msg = e.to_string();
        assert!(
            msg.contains("127.0.0.1:0") && msg.contains("nexd-nosuch0"),
            "{msg}"
        );
    }

    #[test]
    fn loopback_without_interface_binds() {
        let s = udp("127.0.0.1:0".parse().expect("sa"), None).expect("bind");
        assert!(s.local_addr().expect("addr").port() != 0);
        // (Binding to an interface needs CAP_NET_RAW before Linux 5.7.)
        let l = tcp_listener("127.0.0.1:0".parse().expect("sa"), Some("lo"), 16).expect("listen");
        assert!(l.local_addr().expect("addr").port() != 0);
    }
}
