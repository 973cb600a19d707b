//! The underlay: WireGuard's own UDP sockets, one IPv4 and one IPv6
//! (`IPV6_V6ONLY`) on the listen port, and batched I/O on them.
//!
//! What the rest of nexd relies on:
//! - the sockets carry the device's fwmark (`SO_MARK`), set and cleared on
//!   the live sockets, so the exit-node client's policy rules send
//!   WireGuard's own packets to the main table;
//! - they are never `connect()`ed: every send names its destination and the
//!   kernel picks the source per packet, after the mark applies (a
//!   connected socket fixes the source at connect time, before the mark,
//!   which breaks policy routing).
//!
//! Speed: `sendmmsg` where each run of equal-sized datagrams to one
//! destination is one message with `UDP_SEGMENT` (GSO: one route lookup and
//! one trip through the stack per up to 64 datagrams), and `recvmmsg` on a
//! socket with `UDP_GRO`, whose coalesced buffers are cut back into
//! datagrams by the size the kernel reports. Both are probed and fall back:
//! no GSO where `UDP_SEGMENT` is unknown, or after the first `EIO` (an
//! egress device without checksum offload, as wireguard-go found); no GRO
//! where `UDP_GRO` is refused.

use std::{
    io, mem,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, RawFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::{debug, warn};

use super::batch::SendBatch;

/// Socket buffer size asked for (with the FORCE variants, root may exceed
/// the sysctl limits): room for a few 64 KiB GSO/GRO batches.
const SOCKET_BUFFER: usize = 4 << 20;

/// The kernel's cap on segments per GSO send (64 before Linux 6.9).
const GSO_MAX_SEGMENTS: usize = 64;
/// Bytes of UDP payload in one GSO send (below the 65,507 IPv4 limit).
const GSO_MAX_BYTES: usize = 65_000;

/// A blocked send gives up after this; the datagrams are dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Messages per `recvmmsg`.
const RECV_MESSAGES: usize = 8;
/// Buffer per received message: a whole GRO batch.
const RECV_BUFFER: usize = 65_536;

const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// One UDP socket of the underlay.
pub struct UdpSocket {
    sock: Socket,
    v6: bool,
    gso: AtomicBool,
    gro: bool,
}

/// Both sockets, bound to one port.
pub struct Underlay {
    pub port: u16,
    v4: UdpSocket,
    v6: Option<UdpSocket>,
}

/// What the sockets could be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub gso: bool,
    pub gro: bool,
    pub ipv6: bool,
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid fd, a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const v).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn getsockopt_ok(fd: RawFd, level: libc::c_int, opt: libc::c_int) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid fd, a pointer to a live c_int and its size.
    unsafe { libc::getsockopt(fd, level, opt, (&raw mut v).cast(), &raw mut len) == 0 }
}

impl UdpSocket {
    fn open(v6: bool, port: u16, fwmark: Option<u32>) -> io::Result<Self> {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let sock = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
        if v6 {
            sock.set_only_v6(true)?;
        }
        let fd = sock.as_raw_fd();
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            let size = SOCKET_BUFFER as libc::c_int;
            if setsockopt_int(fd, libc::SOL_SOCKET, force, size).is_err() {
                let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, size);
            }
        }
        sock.set_write_timeout(Some(SEND_TIMEOUT))?;
        if let Some(mark) = fwmark {
            sock.set_mark(mark)?;
        }
        let addr: SocketAddr = if v6 {
            (Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, port).into()
        };
        sock.bind(&addr.into())?;
        let gso = getsockopt_ok(fd, libc::SOL_UDP, UDP_SEGMENT);
        let gro = setsockopt_int(fd, libc::SOL_UDP, UDP_GRO, 1).is_ok();
        Ok(UdpSocket {
            sock,
            v6,
            gso: AtomicBool::new(gso),
            gro,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn port(&self) -> io::Result<u16> {
        self.sock
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .ok_or_else(|| io::Error::other("the socket has no IP address"))
    }
}

impl Underlay {
    /// Binds both sockets to `port` (0: a free one, the same for both).
    /// IPv6 is optional: a namespace without it gets an IPv4-only device.
    pub fn open(port: u16, fwmark: Option<u32>) -> io::Result<Self> {
        // With port 0 the IPv4 socket picks one that IPv6 may find taken.
        let attempts = if port == 0 { 8 } else { 1 };
        let mut last_err = None;
        for _ in 0..attempts {
            let v4 = UdpSocket::open(false, port, fwmark)?;
            let bound = v4.port()?;
            match UdpSocket::open(true, bound, fwmark) {
                Ok(v6) => {
                    return Ok(Underlay {
                        port: bound,
                        v4,
                        v6: Some(v6),
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => last_err = Some(e),
                Err(e) => {
                    warn!(error = %e, port = bound, "no IPv6 underlay socket; WireGuard runs over IPv4 only");
                    return Ok(Underlay {
                        port: bound,
                        v4,
                        v6: None,
                    });
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EADDRINUSE)))
    }

    pub fn features(&self) -> Features {
        Features {
            gso: self.v4.gso.load(Ordering::Relaxed),
            gro: self.v4.gro,
            ipv6: self.v6.is_some(),
        }
    }

    /// Sets (or with `None` clears) the fwmark on the live sockets.
    pub fn set_fwmark(&self, fwmark: Option<u32>) -> io::Result<()> {
        self.v4.sock.set_mark(fwmark.unwrap_or(0))?;
        if let Some(v6) = &self.v6 {
            v6.sock.set_mark(fwmark.unwrap_or(0))?;
        }
        Ok(())
    }

    /// The sockets, for polling.
    pub fn sockets(&self) -> impl Iterator<Item = &UdpSocket> {
        std::iter::once(&self.v4).chain(self.v6.as_ref())
    }

    /// Sends every datagram of `batch` and empties it. Datagrams that
    /// cannot be sent (no IPv6 socket, unreachable, buffer full) are
    /// dropped and counted in the result.
    pub fn send(&self, batch: &mut SendBatch) -> usize {
        let mut dropped = 0;
        for sock in self.sockets() {
            let idx: Vec<usize> = (0..batch.len())
                .filter(|&i| batch.dest(i).is_ipv6() == sock.v6)
                .collect();
            if !idx.is_empty() {
                dropped += send_on(sock, batch, &idx);
            }
        }
        if self.v6.is_none() {
            dropped += (0..batch.len())
                .filter(|&i| batch.dest(i).is_ipv6())
                .count();
        }
        batch.clear();
        dropped
    }
}

/// One `sendmmsg` message: `count` datagrams starting at position `start`
/// of the list, each `size` bytes except a shorter last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: usize,
    pub count: usize,
    pub size: usize,
}

/// Cuts a list of (length, destination) into GSO runs: consecutive
/// datagrams to the same destination, all `size` long but a shorter last
/// one, at most 64 and 65,000 bytes. Without `gso` every datagram is its
/// own run. Pure.
pub fn runs(items: &[(usize, SocketAddr)], gso: bool) -> Vec<Run> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let (size, to) = items[i];
        let mut total = size;
        let mut j = i + 1;
        while gso && j < items.len() && j - i < GSO_MAX_SEGMENTS {
            let (len, dest) = items[j];
            if dest != to || len > size || len == 0 || total + len > GSO_MAX_BYTES {
                break;
            }
            total += len;
            j += 1;
            if len < size {
                break;
            }
        }
        out.push(Run {
            start: i,
            count: j - i,
            size,
        });
        i = j;
    }
    out
}

fn sockaddr(to: &SocketAddr) -> SockAddr {
    SockAddr::from(*to)
}

/// Sends the datagrams `idx` of `batch` on `sock`; returns how many were
/// dropped.
fn send_on(sock: &UdpSocket, batch: &SendBatch, idx: &[usize]) -> usize {
    let items: Vec<(usize, SocketAddr)> = idx
        .iter()
        .map(|&i| (batch.datagram(i).len(), batch.dest(i)))
        .collect();
    let gso = sock.gso.load(Ordering::Relaxed);
    let plan = runs(&items, gso);
    let mut dropped = 0;
    let mut done = 0;
    while done < plan.len() {
        match sendmmsg(sock, batch, idx, &plan[done..]) {
            Ok(n) => done += n,
            Err(e) => {
                let run = plan[done];
                if run.count > 1 {
                    if e.raw_os_error() == Some(libc::EIO)
                        && sock.gso.swap(false, Ordering::Relaxed)
                    {
                        warn!(error = %e, "UDP segmentation offload refused by the egress device; sending datagrams one by one");
                    }
                    // Resend this run one datagram per message.
                    let singles: Vec<Run> = (run.start..run.start + run.count)
                        .map(|start| Run {
                            start,
                            count: 1,
                            size: items[start].0,
                        })
                        .collect();
                    let mut k = 0;
                    while k < singles.len() {
                        match sendmmsg(sock, batch, idx, &singles[k..]) {
                            Ok(n) => k += n,
                            Err(e) => {
                                debug!(error = %e, to = %items[singles[k].start].1, "UDP send failed");
                                dropped += 1;
                                k += 1;
                            }
                        }
                    }
                } else {
                    debug!(error = %e, to = %items[run.start].1, "UDP send failed");
                    dropped += 1;
                }
                done += 1;
            }
        }
    }
    dropped
}

/// One `sendmmsg` of `plan`'s messages; the number sent, or the error of
/// the first one.
fn sendmmsg(sock: &UdpSocket, batch: &SendBatch, idx: &[usize], plan: &[Run]) -> io::Result<usize> {
    let plan = &plan[..plan.len().min(1024)];
    let iov: Vec<libc::iovec> = plan
        .iter()
        .flat_map(|r| r.start..r.start + r.count)
        .map(|k| {
            let d = batch.datagram(idx[k]);
            libc::iovec {
                iov_base: d.as_ptr().cast_mut().cast(),
                iov_len: d.len(),
            }
        })
        .collect();
    let addrs: Vec<SockAddr> = plan
        .iter()
        .map(|r| sockaddr(&batch.dest(idx[r.start])))
        .collect();
    let mut cmsgs = vec![[0u64; 4]; plan.len()];
    let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(plan.len());
    let mut at = 0;
    for (k, r) in plan.iter().enumerate() {
        // SAFETY: an all-zero msghdr is a valid empty one.
        let mut h: libc::msghdr = unsafe { mem::zeroed() };
        h.msg_name = addrs[k].as_ptr().cast_mut().cast();
        h.msg_namelen = addrs[k].len();
        h.msg_iov = iov[at..].as_ptr().cast_mut();
        h.msg_iovlen = r.count;
        at += r.count;
        if r.count > 1 {
            let c = cmsgs[k].as_mut_ptr().cast::<libc::cmsghdr>();
            // SAFETY: the 32-byte, 8-aligned buffer holds a cmsghdr and a
            // u16 (CMSG_SPACE(2) = 24).
            unsafe {
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), r.size as u16);
                h.msg_controllen = libc::CMSG_SPACE(2) as usize;
            }
            h.msg_control = c.cast();
        }
        msgs.push(libc::mmsghdr {
            msg_hdr: h,
            msg_len: 0,
        });
    }
    loop {
        // SAFETY: every pointer in msgs refers to iov, addrs, cmsgs or the
        // batch, all alive for the call.
        let r =
            unsafe { libc::sendmmsg(sock.fd(), msgs.as_mut_ptr(), msgs.len() as libc::c_uint, 0) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Buffers for `recvmmsg`, reused.
pub struct RecvBatch {
    buf: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<[u64; 4]>,
    /// (length, source, GRO segment size) of each received message.
    got: Vec<(usize, SocketAddr, usize)>,
}

impl Default for RecvBatch {
    /// 512 KiB: eight whole GRO batches.
    fn default() -> Self {
        RecvBatch {
            buf: vec![0; RECV_MESSAGES * RECV_BUFFER],
            // SAFETY: sockaddr_storage is plain data; zero is valid.
            names: vec![unsafe { mem::zeroed() }; RECV_MESSAGES],
            ctrl: vec![[0; 4]; RECV_MESSAGES],
            got: Vec::with_capacity(RECV_MESSAGES),
        }
    }
}

fn socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            // An IPv4-mapped source cannot happen on a V6ONLY socket.
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

impl RecvBatch {
    /// Receives what `sock` has without waiting; false when nothing was
    /// there.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<bool> {
        self.got.clear();
        let mut iov: Vec<libc::iovec> = self
            .buf
            .chunks_exact_mut(RECV_BUFFER)
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: RECV_BUFFER,
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = (0..RECV_MESSAGES)
            .map(|k| {
                // SAFETY: an all-zero msghdr is a valid empty one.
                let mut h: libc::msghdr = unsafe { mem::zeroed() };
                h.msg_name = (&raw mut self.names[k]).cast();
                h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_iov = &raw mut iov[k];
                h.msg_iovlen = 1;
                h.msg_control = self.ctrl[k].as_mut_ptr().cast();
                h.msg_controllen = mem::size_of::<[u64; 4]>();
                libc::mmsghdr {
                    msg_hdr: h,
                    msg_len: 0,
                }
            })
            .collect();
        let n = loop {
            // SAFETY: msgs points into iov, names and ctrl, alive for the call.
            let r = unsafe {
                libc::recvmmsg(
                    sock.fd(),
                    msgs.as_mut_ptr(),
                    RECV_MESSAGES as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(false),
                _ => return Err(e),
            }
        };
        for m in &msgs[..n] {
            let len = m.msg_len as usize;
            let k = self.got.len();
            let Some(src) = socket_addr(&self.names[k]) else {
                self.got.push((0, SocketAddr::from(([0, 0, 0, 0], 0)), 1));
                continue;
            };
            let seg = if sock.gro { gro_size(&m.msg_hdr) } else { None };
            self.got.push((len, src, seg.unwrap_or(len).max(1)));
        }
        Ok(n > 0)
    }

    /// The datagrams received, GRO batches cut back into datagrams:
    /// (source, datagram).
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.got
            .iter()
            .enumerate()
            .flat_map(move |(k, &(len, src, seg))| {
                self.buf[k * RECV_BUFFER..k * RECV_BUFFER + len]
                    .chunks(seg)
                    .map(move |d| (src, d))
            })
    }
}

fn gro_size(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: h was filled by recvmmsg; the CMSG macros walk its control
    // buffer within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok().filter(|&v| v > 0);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::sock as a;

    #[test]
    fn equal_sizes_to_one_destination_make_one_run() {
        let x = a("192.0.2.1:51820");
        let items = vec![(1452, x), (1452, x), (1452, x), (700, x)];
        assert_eq!(
            runs(&items, true),
            vec![Run {
                start: 0,
                count: 4,
                size: 1452
            }]
        );
        assert_eq!(runs(&items, false).len(), 4);
    }

    #[test]
    fn a_shorter_datagram_ends_a_run_and_a_longer_one_starts_one() {
        let x = a("192.0.2.1:51820");
        let items = vec![(1452, x), (100, x), (1452, x), (1500, x), (1500, x)];
        let r: Vec<(usize, usize)> = runs(&items, true)
            .iter()
            .map(|r| (r.start, r.count))
            .collect();
        assert_eq!(r, vec![(0, 2), (2, 1), (3, 2)]);
    }

    #[test]
    fn destinations_and_limits_split_runs() {
        let x = a("192.0.2.1:51820");
        let y = a("[2001:db8::1]:51820");
        let items = vec![(1000, x), (1000, y), (1000, x)];
        assert_eq!(runs(&items, true).len(), 3);
        let many: Vec<(usize, SocketAddr)> = (0..200).map(|_| (100, x)).collect();
        let r = runs(&many, true);
        assert!(r.iter().all(|r| r.count <= GSO_MAX_SEGMENTS));
        assert_eq!(r.iter().map(|r| r.count).sum::<usize>(), 200);
        let big: Vec<(usize, SocketAddr)> = (0..60).map(|_| (1500, x)).collect();
        let r = runs(&big, true);
        assert!(r.iter().all(|r| r.count * r.size <= GSO_MAX_BYTES), "{r:?}");
    }

    /// Real sockets on loopback: a GSO send arrives as the datagrams it
    /// was made of (or as a GRO batch cut back into them).
    #[test]
    fn batches_go_through_loopback() -> io::Result<()> {
        let rx = Underlay::open(0, None)?;
        let tx = Underlay::open(0, None)?;
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, rx.port));
        let mut batch = SendBatch::new(16);
        for i in 0..10u8 {
            let len = if i == 9 { 300 } else { 1000 };
            assert!(batch.push(&vec![i; len], to));
        }
        let dropped = tx.send(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(dropped, 0);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut recv = RecvBatch::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < 10 && std::time::Instant::now() < deadline {
            if recv.recv(&rx.v4)? {
                got.extend(recv.datagrams().map(|(src, d)| {
                    assert_eq!(src.port(), tx.port);
                    d.to_vec()
                }));
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert_eq!(got.len(), 10);
        for (i, d) in got.iter().enumerate() {
            assert!(d.iter().all(|&b| b == i as u8));
            assert_eq!(d.len(), if i == 9 { 300 } else { 1000 });
        }
        Ok(())
    }
}
