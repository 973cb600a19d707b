//! Real traffic between namespaces: ping through the system tool, TCP and
//! UDP through sockets opened inside the namespaces. Every operation has a
//! deadline.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::Netns;

/// One ICMP echo from `from` to `to`; true if a reply came within `wait`.
pub fn ping_once(from: &Netns, to: IpAddr, wait: Duration) -> anyhow::Result<bool> {
    let w = wait.as_secs().max(1).to_string();
    let target = to.to_string();
    let out = from.exec_output(
        &["ping", "-n", "-q", "-c", "1", "-W", &w, &target],
        wait + Duration::from_secs(5),
    )?;
    Ok(out.status.success())
}

/// Pings until one reply arrives or `timeout` passes (the first packets of
/// a tunnel wait for a handshake).
pub fn ping_until(from: &Netns, to: IpAddr, timeout: Duration) -> anyhow::Result<()> {
    let timeout = crate::scaled(timeout);
    let deadline = Instant::now() + timeout;
    loop {
        if ping_once(from, to, Duration::from_secs(1))? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "no ping reply from {to} in {} within {timeout:?}",
                from.name()
            );
        }
    }
}

/// FNV-1a, enough to prove the bytes arrived intact and in order.
fn fnv(data: &[u8], mut h: u64) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) % 251) as u8).collect()
}

/// Result of a TCP transfer.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// The client address as the server saw it.
    pub seen_from: SocketAddr,
    pub bytes: usize,
    pub elapsed: Duration,
}

/// The first connection on a non-blocking `listener` within `timeout`,
/// made blocking with `timeout` as its read timeout.
fn accept_within(
    listener: &TcpListener,
    timeout: Duration,
) -> anyhow::Result<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    let (conn, peer) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!("no connection within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(timeout))?;
    Ok((conn, peer))
}

/// Sends `len` bytes over TCP from a socket in `from` to a listener on
/// `to_addr` in `to`, and checks the server received exactly those bytes.
pub fn tcp_transfer(
    from: &Netns,
    to: &Netns,
    to_addr: IpAddr,
    len: usize,
    timeout: Duration,
) -> anyhow::Result<Transfer> {
    let timeout = crate::scaled(timeout);
    let listener =
        to.run_in(move || TcpListener::bind(SocketAddr::new(to_addr, 0)).context("bind"))?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let server = std::thread::spawn(move || -> anyhow::Result<(SocketAddr, usize, u64)> {
        let (mut conn, peer) = accept_within(&listener, timeout)?;
        let mut total = 0usize;
        let mut h = FNV_OFFSET;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = conn.read(&mut buf).context("server read")?;
            if n == 0 {
                break;
            }
            h = fnv(&buf[..n], h);
            total += n;
        }
        conn.write_all(&(total as u64).to_be_bytes())?;
        conn.write_all(&h.to_be_bytes())?;
        Ok((peer, total, h))
    });
    let data = pattern(len);
    let expect_hash = fnv(&data, FNV_OFFSET);
    let start = Instant::now();
    let client = from.run_in(move || -> anyhow::Result<(usize, u64)> {
        let addr = SocketAddr::new(to_addr, port);
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connect {addr}"))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(&data).context("client write")?;
        s.shutdown(Shutdown::Write)?;
        let mut reply = [0u8; 16];
        s.read_exact(&mut reply).context("client read reply")?;
        let total = u64::from_be_bytes(reply[..8].try_into()?) as usize;
        let h = u64::from_be_bytes(reply[8..].try_into()?);
        Ok((total, h))
    });
    let elapsed = start.elapsed();
    let server = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))?;
    let (total, h) = client?;
    let (peer, s_total, s_hash) = server?;
    if total != len || s_total != len || h != expect_hash || s_hash != expect_hash {
        bail!("TCP transfer to {to_addr} corrupted: sent {len} bytes, server got {s_total}");
    }
    Ok(Transfer {
        seen_from: peer,
        bytes: len,
        elapsed,
    })
}

/// Result of a throughput run: what the receiver counted and how long the
/// sender took, from its first write to the receiver's acknowledgement of
/// the last byte (so data still queued in the tunnel is counted in time).
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Throughput {
    pub fn mbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }
}

/// Bulk TCP from a socket in `from` to a sink listening on `to_addr` in
/// `to`: sends until `max_bytes` are sent or `duration` has passed,
/// whichever comes first, then waits for the sink's byte count. The VM's
/// userland has no iperf3, so the benchmarks that run there measure with
/// this. `duration` is not scaled (it is the measurement, not a deadline);
/// every wait (connect, the sink's reads, the count) is bounded by
/// `timeout`, scaled.
pub fn tcp_throughput(
    from: &Netns,
    to: &Netns,
    to_addr: IpAddr,
    max_bytes: u64,
    duration: Duration,
    timeout: Duration,
) -> anyhow::Result<Throughput> {
    let timeout = crate::scaled(timeout);
    let listener =
        to.run_in(move || TcpListener::bind(SocketAddr::new(to_addr, 0)).context("bind"))?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let sink = std::thread::spawn(move || -> anyhow::Result<u64> {
        let (mut conn, _) = accept_within(&listener, timeout)?;
        let mut total = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = conn.read(&mut buf).context("sink read")?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        conn.write_all(&total.to_be_bytes())?;
        Ok(total)
    });
    let sender = from.run_in(move || -> anyhow::Result<(u64, u64, Duration)> {
        let addr = SocketAddr::new(to_addr, port);
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connect {addr}"))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_read_timeout(Some(timeout))?;
        let chunk = pattern(128 * 1024);
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < max_bytes && start.elapsed() < duration {
            let n = chunk.len().min((max_bytes - sent) as usize);
            s.write_all(&chunk[..n]).context("sender write")?;
            sent += n as u64;
        }
        s.shutdown(Shutdown::Write)?;
        let mut reply = [0u8; 8];
        s.read_exact(&mut reply)
            .context("sender read the sink's count")?;
        Ok((sent, u64::from_be_bytes(reply), start.elapsed()))
    });
    let sink = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))?;
    let (sent, counted, elapsed) = sender?;
    let received = sink?;
    if counted != sent || received != sent {
        bail!("TCP to {to_addr}: sent {sent} bytes, the sink counted {received}");
    }
    Ok(Throughput {
        bytes: received,
        elapsed,
    })
}

/// Socket options for a UDP probe, to imitate applications that route
/// around the routing table (the leaks a kill switch must stop).
#[derive(Debug, Clone, Default)]
pub struct UdpOpts {
    /// SO_BINDTODEVICE: send out of this interface whatever the routes say.
    pub bind_device: Option<String>,
    /// SO_MARK on the socket.
    pub mark: Option<u32>,
}

fn apply_opts(s: &UdpSocket, opts: &UdpOpts) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = s.as_raw_fd();
    if let Some(dev) = &opts.bind_device {
        let name = std::ffi::CString::new(dev.as_str())?;
        let bytes = name.as_bytes_with_nul();
        // SAFETY: valid fd, pointer and length of a NUL-terminated name.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                bytes.as_ptr().cast(),
                bytes.len() as libc::socklen_t,
            )
        };
        if r != 0 {
            bail!("SO_BINDTODEVICE {dev}: {}", std::io::Error::last_os_error());
        }
    }
    if let Some(mark) = opts.mark {
        // SAFETY: valid fd, pointer to a u32 and its size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if r != 0 {
            bail!("SO_MARK: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends one UDP datagram from `from` to a socket on `to_addr` in `to` and
/// waits for the echo; returns the client address the server saw.
pub fn udp_exchange(
    from: &Netns,
    to: &Netns,
    to_addr: IpAddr,
    timeout: Duration,
) -> anyhow::Result<SocketAddr> {
    udp_exchange_with(from, to, to_addr, timeout, &UdpOpts::default())
}

/// `udp_exchange` with socket options on the sender.
pub fn udp_exchange_with(
    from: &Netns,
    to: &Netns,
    to_addr: IpAddr,
    timeout: Duration,
    opts: &UdpOpts,
) -> anyhow::Result<SocketAddr> {
    let timeout = crate::scaled(timeout);
    let opts = opts.clone();
    let server_sock =
        to.run_in(move || UdpSocket::bind(SocketAddr::new(to_addr, 0)).context("bind"))?;
    let port = server_sock.local_addr()?.port();
    server_sock.set_read_timeout(Some(timeout))?;
    let server = std::thread::spawn(move || -> anyhow::Result<SocketAddr> {
        let mut buf = [0u8; 1500];
        let (n, peer) = server_sock.recv_from(&mut buf).context("udp server recv")?;
        server_sock.send_to(&buf[..n], peer)?;
        Ok(peer)
    });
    let unspecified: IpAddr = if to_addr.is_ipv4() {
        "0.0.0.0".parse()?
    } else {
        "::".parse()?
    };
    from.run_in(move || -> anyhow::Result<()> {
        let s = UdpSocket::bind(SocketAddr::new(unspecified, 0))?;
        apply_opts(&s, &opts)?;
        let deadline = Instant::now() + timeout;
        let msg = b"nexd-udp-probe";
        loop {
            // Never wait past the deadline: a caller polling with a short
            // timeout gets its answer at that timeout, not later.
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_millis(500));
            s.set_read_timeout(Some(wait))?;
            s.send_to(msg, SocketAddr::new(to_addr, port))?;
            let mut buf = [0u8; 64];
            match s.recv_from(&mut buf) {
                Ok((n, _)) if &buf[..n] == msg => return Ok(()),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(e.into()),
            }
            if Instant::now() >= deadline {
                bail!("no UDP echo from {to_addr}:{port} within {timeout:?}");
            }
        }
    })?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("udp server thread panicked"))?
}

/// One answered datagram of a [`UdpStream`].
#[derive(Debug, Clone, Copy)]
pub struct Echo {
    pub sent: Instant,
    pub received: Instant,
    /// The sender's address as the server saw it (which exit node's, say).
    pub source: IpAddr,
}

/// A steady stream of numbered UDP datagrams from `from` to an echo server
/// in `to`, each answer naming the source address the server saw. Made for
/// measuring how long a path change interrupts traffic: unlike a probe
/// that waits for each answer, a lost datagram costs one interval, so the
/// first datagram through the new path is seen within an interval of the
/// switch.
pub struct UdpStream {
    stop: Arc<AtomicBool>,
    echoes: Arc<Mutex<Vec<Echo>>>,
    client: JoinHandle<anyhow::Result<()>>,
    server: JoinHandle<anyhow::Result<()>>,
}

impl UdpStream {
    /// Starts sending every `interval`; both ends stop by themselves after
    /// `limit` (and on [`UdpStream::finish`]).
    pub fn start(
        from: &Netns,
        to: &Netns,
        to_addr: IpAddr,
        interval: Duration,
        limit: Duration,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let echoes = Arc::new(Mutex::new(Vec::new()));
        let server_sock =
            to.run_in(move || UdpSocket::bind(SocketAddr::new(to_addr, 0)).context("bind"))?;
        let port = server_sock.local_addr()?.port();
        server_sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        let until = Instant::now() + limit;
        let server = {
            let stop = stop.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    match server_sock.recv_from(&mut buf) {
                        Ok((8, peer)) => {
                            let mut answer = buf[..8].to_vec();
                            answer.extend_from_slice(peer.ip().to_string().as_bytes());
                            server_sock.send_to(&answer, peer)?;
                        }
                        Ok(_) => {}
                        Err(e) if is_timeout(&e) => {}
                        Err(e) => return Err(e).context("echo server"),
                    }
                }
                Ok(())
            })
        };
        let client = {
            let (stop, echoes) = (stop.clone(), echoes.clone());
            let unspecified: IpAddr = if to_addr.is_ipv4() {
                "0.0.0.0".parse()?
            } else {
                "::".parse()?
            };
            from.spawn_in(move || -> anyhow::Result<()> {
                let s = UdpSocket::bind(SocketAddr::new(unspecified, 0))?;
                let mut sent: Vec<Instant> = Vec::new();
                let mut buf = [0u8; 128];
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    let seq = sent.len() as u64;
                    sent.push(Instant::now());
                    // A send can fail while routes change (no route for a
                    // moment): that datagram is lost, as an application's.
                    let _ = s.send_to(&seq.to_be_bytes(), SocketAddr::new(to_addr, port));
                    let next = Instant::now() + interval;
                    while let Some(wait) = next
                        .checked_duration_since(Instant::now())
                        .filter(|w| !w.is_zero())
                    {
                        s.set_read_timeout(Some(wait))?;
                        match s.recv_from(&mut buf) {
                            Ok((n, _)) if n > 8 => {
                                let received = Instant::now();
                                let seq = u64::from_be_bytes(buf[..8].try_into()?);
                                let source: IpAddr = std::str::from_utf8(&buf[8..n])?.parse()?;
                                let sent = *usize::try_from(seq)
                                    .ok()
                                    .and_then(|i| sent.get(i))
                                    .context("an echo of a datagram never sent")?;
                                echoes
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .push(Echo {
                                        sent,
                                        received,
                                        source,
                                    });
                            }
                            Ok(_) => {}
                            Err(e) if is_timeout(&e) => break,
                            Err(e) => return Err(e).context("stream client"),
                        }
                    }
                }
                Ok(())
            })?
        };
        Ok(UdpStream {
            stop,
            echoes,
            client,
            server,
        })
    }

    /// The first echo received at or after `after` whose source is `source`.
    pub fn first_from(&self, source: IpAddr, after: Instant) -> Option<Echo> {
        self.echoes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|e| e.source == source && e.received >= after)
            .copied()
    }

    /// Whether both ends still run (an end stops early only on an error,
    /// which `finish` returns).
    pub fn running(&self) -> bool {
        !self.client.is_finished() && !self.server.is_finished()
    }

    /// The latest echo, if any.
    pub fn last_echo(&self) -> Option<Echo> {
        self.echoes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last()
            .copied()
    }

    /// Stops both ends; returns every echo.
    pub fn finish(self) -> anyhow::Result<Vec<Echo>> {
        self.stop.store(true, Ordering::Relaxed);
        let joined = |h: JoinHandle<anyhow::Result<()>>, what: &str| {
            h.join()
                .map_err(|_| anyhow::anyhow!("the stream's {what} thread panicked"))?
        };
        joined(self.client, "client")?;
        joined(self.server, "server")?;
        Ok(std::mem::take(
            &mut *self.echoes.lock().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}
