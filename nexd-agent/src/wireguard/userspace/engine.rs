//! The data path's two threads and the state they share: the I/O layer
//! around the cores (`tx`, `rx`), which make every decision. The threads
//! poll, read, call a core per packet or datagram, and empty the batches
//! when the next call might not fit and at the end of each round.
//!
//! - `wg-tx` (TUN -> UDP): reads the TUN without blocking until it is
//!   empty (at most `TX_READS` reads per round), cuts super-packets into
//!   segments, hands each read to `tx::Transmit` (one route lookup and one
//!   peer lock per read: a super-packet is one flow) and sends the round's
//!   datagrams with one `sendmmsg`, equal-sized runs as UDP GSO messages.
//! - `wg-rx` (UDP -> TUN): `recvmmsg` on both sockets, GRO batches cut into
//!   datagrams, each given to `rx::Receiver` (which keeps a peer's lock
//!   across its consecutive datagrams), then the decrypted packets are
//!   written to the TUN with segments of one flow merged into
//!   super-packets. It also runs every peer's timers every 250 ms
//!   (`tx::tick`) and resets the handshake rate limiter every second.
//!
//! Two threads, because on two cores more do not help: both tunnel ends
//! and the applications share the CPUs, and the measured cost is the
//! crypto. Both stop when the stop eventfd becomes readable; nothing here
//! handles signals.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tracing::{debug, trace, warn};

use super::{
    batch::{PlainBatch, SendBatch},
    drops::{DropCounts, DropReason, Drops},
    offload::{self, VNET_HDR_LEN},
    peers::{Keys, Table},
    rx::{self, Receiver},
    tun::Tun,
    tx::{self, Transmit},
    underlay::{RecvBatch, UdpSocket, Underlay},
};

/// TUN reads per send round.
const TX_READS: usize = 64;
/// Datagrams per `sendmmsg` round on the send side.
const TX_BATCH: usize = 256;
/// Replies (handshakes, keepalives, queued packets) per round on the
/// receive side.
const RX_REPLIES: usize = 64;
/// Decrypted packets held for one round of TUN writes.
const RX_PLAIN: usize = 256;
/// How often the timers run (boringtun's device uses the same).
const TICK: Duration = Duration::from_millis(250);
/// How often the handshake rate limiter is reset.
const RATE_RESET: Duration = Duration::from_secs(1);
/// How often dropped-packet counters are logged (when they moved).
const DROP_LOG: Duration = Duration::from_secs(10);
/// A TUN read buffer: the largest super-packet plus its header.
const TUN_FRAME: usize = VNET_HDR_LEN + 65_535;

/// What the control side and the threads share.
pub struct Shared {
    pub iface: String,
    table: RwLock<Arc<Table>>,
    underlay: RwLock<Option<Arc<Underlay>>>,
    keys: RwLock<Option<Arc<Keys>>>,
    stopping: AtomicBool,
    stop_fd: OwnedFd,
    pub drops: Drops,
}

fn read<T: ?Sized>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T: ?Sized>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn new(iface: &str) -> io::Result<Self> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Shared {
            iface: iface.to_owned(),
            table: RwLock::new(Arc::new(Table::default())),
            underlay: RwLock::new(None),
            keys: RwLock::new(None),
            stopping: AtomicBool::new(false),
            // SAFETY: fd is a fresh descriptor nothing else owns.
            stop_fd: unsafe { OwnedFd::from_raw_fd(fd) },
            drops: Drops::default(),
        })
    }

    pub fn table(&self) -> Arc<Table> {
        Arc::clone(&read(&self.table))
    }

    pub fn set_table(&self, table: Table) {
        *write(&self.table) = Arc::new(table);
    }

    pub fn underlay(&self) -> Option<Arc<Underlay>> {
        read(&self.underlay).clone()
    }

    pub fn set_underlay(&self, underlay: Underlay) {
        *write(&self.underlay) = Some(Arc::new(underlay));
    }

    pub fn keys(&self) -> Option<Arc<Keys>> {
        read(&self.keys).clone()
    }

    pub fn set_keys(&self, keys: Arc<Keys>) {
        *write(&self.keys) = Some(keys);
    }

    /// Tells both threads to finish their round and exit. The eventfd stays
    /// readable, so each sees it.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        let _ = unsafe { libc::write(self.stop_fd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// Starts `wg-tx` and `wg-rx`.
pub fn spawn(shared: &Arc<Shared>, tun: &Arc<Tun>) -> io::Result<Vec<thread::JoinHandle<()>>> {
    let (s, t) = (Arc::clone(shared), Arc::clone(tun));
    let tx = thread::Builder::new()
        .name(format!("wg-tx-{}", shared.iface))
        .spawn(move || Tx::new(&s, &t).run())?;
    let (s, t) = (Arc::clone(shared), Arc::clone(tun));
    let rx = thread::Builder::new()
        .name(format!("wg-rx-{}", shared.iface))
        .spawn(move || Rx::new(&s, &t).run());
    match rx {
        Ok(rx) => Ok(vec![tx, rx]),
        Err(e) => {
            shared.stop();
            let _ = tx.join();
            Err(e)
        }
    }
}

/// Waits until one of `fds` is readable (or `timeout` passes); returns the
/// revents of each.
fn poll(fds: &[RawFd], timeout: Option<Duration>) -> Vec<libc::c_short> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    // SAFETY: p is a valid array of pollfd of the given length.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if r < 0 {
        return vec![0; fds.len()];
    }
    p.iter().map(|p| p.revents).collect()
}

/// Sends and empties `batch` (drops it when there are no sockets yet).
fn flush(shared: &Shared, underlay: Option<&Underlay>, batch: &mut SendBatch) {
    if batch.is_empty() {
        return;
    }
    match underlay {
        Some(u) => shared.drops.count(&DropReason::Send, u.send(batch)),
        None => {
            // Sockets come with the first configure(); until then there is
            // nowhere to send from.
            shared.drops.count(&DropReason::Send, batch.len());
            batch.clear();
        }
    }
}

struct Tx<'a> {
    shared: &'a Shared,
    tun: &'a Tun,
    frame: Vec<u8>,
    scratch: Vec<u8>,
    batch: SendBatch,
}

impl<'a> Tx<'a> {
    fn new(shared: &'a Shared, tun: &'a Tun) -> Self {
        Tx {
            shared,
            tun,
            frame: vec![0; TUN_FRAME],
            scratch: vec![0; 65_536],
            batch: SendBatch::new(TX_BATCH),
        }
    }

    fn run(mut self) {
        let fds = [self.shared.stop_fd.as_raw_fd(), self.tun.fd()];
        let mut complained = false;
        loop {
            let ev = poll(&fds, None);
            if self.shared.stopping() {
                break;
            }
            if ev[1] & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                if !complained {
                    warn!(iface = %self.shared.iface, "the TUN device reports an error; the tunnel cannot send");
                    complained = true;
                }
                thread::sleep(Duration::from_millis(100));
                continue;
            }
            self.round();
        }
    }

    /// Up to `TX_READS` TUN reads, then one send.
    fn round(&mut self) {
        let table = self.shared.table();
        let underlay = self.shared.underlay();
        let vnet = self.tun.offloads().vnet_hdr;
        for _ in 0..TX_READS {
            let n = match self.tun.read(&mut self.frame) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!(iface = %self.shared.iface, error = %e, "TUN read failed");
                    break;
                }
            };
            self.one_read(&table, underlay.as_deref(), n, vnet);
        }
        flush(self.shared, underlay.as_deref(), &mut self.batch);
    }

    /// One TUN read (a packet, or with offloads a super-packet to cut)
    /// through `tx::Transmit`, the batch sent whenever it is full.
    fn one_read(&mut self, table: &Table, underlay: Option<&Underlay>, n: usize, vnet: bool) {
        let shared = self.shared;
        let start = if vnet { VNET_HDR_LEN } else { 0 };
        let first = self.frame.get(start..n).unwrap_or(&[]);
        let Ok(mut transmit) = Transmit::begin(table, first, &shared.drops) else {
            return;
        };
        let batch = &mut self.batch;
        let mut emit = |seg: &[u8]| {
            if batch.is_full() {
                flush(shared, underlay, batch);
            }
            transmit.packet(seg, batch);
        };
        if vnet {
            if let Err(e) = offload::split(&mut self.frame[..n], &mut self.scratch, &mut emit) {
                trace!(error = %e, "TUN read dropped");
                shared.drops.count(&DropReason::Malformed, 1);
            }
        } else {
            emit(&self.frame[..n]);
        }
        if self.batch.is_full() {
            flush(shared, underlay, &mut self.batch);
        }
        transmit.finish(&mut self.batch, Instant::now());
    }
}

struct Rx<'a> {
    shared: &'a Shared,
    tun: &'a Tun,
    replies: SendBatch,
    plain: PlainBatch,
}

impl<'a> Rx<'a> {
    fn new(shared: &'a Shared, tun: &'a Tun) -> Self {
        Rx {
            shared,
            tun,
            replies: SendBatch::new(RX_REPLIES),
            plain: PlainBatch::new(RX_PLAIN),
        }
    }

    fn run(mut self) {
        let now = Instant::now();
        let (mut next_tick, mut next_reset, mut next_log) =
            (now + TICK, now + RATE_RESET, now + DROP_LOG);
        let mut logged = self.shared.drops.snapshot();
        let mut recv = RecvBatch::default();
        loop {
            let underlay = self.shared.underlay();
            let mut fds = vec![self.shared.stop_fd.as_raw_fd()];
            if let Some(u) = &underlay {
                fds.extend(u.sockets().map(|s| s.fd()));
            }
            let ev = poll(
                &fds,
                Some(next_tick.saturating_duration_since(Instant::now())),
            );
            if self.shared.stopping() {
                break;
            }
            if let Some(u) = &underlay {
                for (k, sock) in u.sockets().enumerate() {
                    if ev[k + 1] & libc::POLLIN != 0 {
                        self.drain(&mut recv, u, sock);
                    }
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                self.timers(underlay.as_deref(), now);
            }
            if now >= next_reset {
                next_reset = now + RATE_RESET;
                if let Some(k) = self.shared.keys() {
                    k.limiter.reset_count();
                }
            }
            if now >= next_log {
                next_log = now + DROP_LOG;
                let d = self.shared.drops.snapshot();
                if d != logged {
                    let DropCounts {
                        no_route,
                        no_endpoint,
                        queue_full,
                        invalid,
                        source,
                        send,
                        tun,
                    } = d;
                    debug!(iface = %self.shared.iface, no_route, no_endpoint, queue_full, invalid, source, send, tun, "userspace WireGuard drops (totals)");
                    logged = d;
                }
            }
        }
    }

    /// Receives what `sock` has, a few rounds at most so timers and the
    /// other socket get their turn.
    fn drain(&mut self, recv: &mut RecvBatch, underlay: &Underlay, sock: &UdpSocket) {
        for _ in 0..16 {
            match recv.recv(sock) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    debug!(iface = %self.shared.iface, error = %e, "UDP receive failed");
                    break;
                }
            }
            self.batch(recv, underlay);
        }
    }

    /// One `recvmmsg` worth of datagrams through `rx::Receiver`; the TUN
    /// written and the replies sent when full and at the end.
    fn batch(&mut self, recv: &RecvBatch, underlay: &Underlay) {
        let table = self.shared.table();
        let Some(keys) = self.shared.keys() else {
            return;
        };
        let mut receiver = Receiver::new(&table, &keys, &self.shared.drops, Instant::now());
        for (src, d) in recv.datagrams() {
            if self.plain.is_full() {
                self.write_tun();
            }
            if self.replies.room() < rx::REPLY_ROOM {
                flush(self.shared, Some(underlay), &mut self.replies);
            }
            receiver.datagram(src, d, &mut self.plain, &mut self.replies);
        }
        // The last peer's lock is released before the writes.
        drop(receiver);
        self.write_tun();
        flush(self.shared, Some(underlay), &mut self.replies);
    }

    fn write_tun(&mut self) {
        let failed = self.tun.write_batch(&mut self.plain);
        self.shared.drops.count(&DropReason::Tun, failed);
    }

    /// Every peer's timers (`tx::tick`).
    fn timers(&mut self, underlay: Option<&Underlay>, now: Instant) {
        let table = self.shared.table();
        for peer in &table.peers {
            if self.replies.room() < tx::TICK_ROOM {
                flush(self.shared, underlay, &mut self.replies);
            }
            tx::tick(peer, now, &mut self.replies);
        }
        flush(self.shared, underlay, &mut self.replies);
    }
}
