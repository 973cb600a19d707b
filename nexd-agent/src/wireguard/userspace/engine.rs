//! The data path's two threads and the state they share.
//!
//! - `wg-tx` (TUN -> UDP): reads the TUN without blocking until it is
//!   empty (at most `TX_READS` reads per round), cuts super-packets into
//!   segments, routes each read by its destination (AllowedIPs), encrypts
//!   under the peer's lock (taken once per read: a super-packet is one
//!   flow) and sends the round's datagrams with one `sendmmsg`, equal-sized
//!   runs as UDP GSO messages.
//! - `wg-rx` (UDP -> TUN): `recvmmsg` on both sockets, GRO batches cut into
//!   datagrams, each decrypted under its peer's lock (kept across
//!   consecutive datagrams of one peer), its inner source checked against
//!   that peer's AllowedIPs, then the batch is written to the TUN with
//!   segments of one flow merged into super-packets. It also runs the
//!   timers every 250 ms (handshake retries, rekeying, session expiry,
//!   keepalives) and resets the handshake rate limiter every second.
//!
//! Two threads, because on two cores more do not help: both tunnel ends
//! and the applications share the CPUs, and the measured cost is the
//! crypto. Both stop when the stop eventfd becomes readable; nothing here
//! handles signals.

use std::{
    io::{self, IoSlice},
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc, MutexGuard, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use boringtun::noise::{
    Packet, Tunn, TunnResult, errors::WireGuardError, handshake::parse_handshake_anon,
};
use tracing::{debug, trace, warn};

use super::{
    message::{MessageType, completes_handshake},
    offload::{self, VNET_HDR_LEN},
    peers::{Keys, PeerState, Table, keepalive_due},
    tun::Tun,
    underlay::{RecvBatch, SLOT, SendBatch, UdpSocket, Underlay},
};
use crate::keys::PublicKey;

/// TUN reads per send round.
const TX_READS: usize = 64;
/// Datagrams per `sendmmsg` round on the send side.
const TX_BATCH: usize = 256;
/// Replies (handshakes, keepalives, queued packets) per round on the
/// receive side.
const RX_REPLIES: usize = 64;
/// Decrypted packets held for one round of TUN writes.
const RX_PLAIN: usize = 256;
/// WireGuard's data message overhead (header 16 + tag 16).
const OVERHEAD: usize = 32;
/// How often the timers run (boringtun's device uses the same).
const TICK: Duration = Duration::from_millis(250);
/// How often the handshake rate limiter is reset.
const RATE_RESET: Duration = Duration::from_secs(1);
/// How often dropped-packet counters are logged (when they moved).
const DROP_LOG: Duration = Duration::from_secs(10);
/// A TUN read buffer: the largest super-packet plus its header.
const TUN_FRAME: usize = VNET_HDR_LEN + 65_535;

/// Packets the data path dropped, by reason (logged at debug level).
#[derive(Default)]
pub struct Drops {
    no_route: AtomicU64,
    no_endpoint: AtomicU64,
    queue_full: AtomicU64,
    invalid: AtomicU64,
    source: AtomicU64,
    send: AtomicU64,
    tun: AtomicU64,
}

impl Drops {
    fn add(counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> [u64; 7] {
        [
            &self.no_route,
            &self.no_endpoint,
            &self.queue_full,
            &self.invalid,
            &self.source,
            &self.send,
            &self.tun,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }
}

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
        Some(u) => Drops::add(&shared.drops.send, u.send(batch)),
        None => {
            // Sockets come with the first configure(); until then there is
            // nowhere to send from.
            Drops::add(&shared.drops.send, batch.len());
            batch.clear();
        }
    }
}

/// Encrypts `pkt` for the peer into `batch` and returns the datagram's
/// length (0 if nothing to send).
fn encrypt_into(s: &mut PeerState, pkt: &[u8], batch: &mut SendBatch, to: SocketAddr) -> usize {
    if pkt.len() + OVERHEAD > SLOT {
        return 0;
    }
    match s.tunn().encapsulate(pkt, batch.slot()) {
        TunnResult::WriteToNetwork(out) => {
            let n = out.len();
            batch.commit(n, to);
            n
        }
        _ => 0,
    }
}

/// Starts a handshake unless one is under way; returns the bytes queued.
fn initiate(s: &mut PeerState, batch: &mut SendBatch, to: SocketAddr) -> usize {
    match s.tunn().format_handshake_initiation(batch.slot(), false) {
        TunnResult::WriteToNetwork(out) => {
            let n = out.len();
            batch.commit(n, to);
            n
        }
        _ => 0,
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

    fn one_read(&mut self, table: &Table, underlay: Option<&Underlay>, n: usize, vnet: bool) {
        let drops = &self.shared.drops;
        let start = if vnet { VNET_HDR_LEN } else { 0 };
        let Some(dst) = self.frame.get(start..n).and_then(offload::destination) else {
            Drops::add(&drops.invalid, 1);
            return;
        };
        let Some(pi) = table.route(dst) else {
            Drops::add(&drops.no_route, 1);
            return;
        };
        let peer = &table.peers[pi];
        let mut s = peer.lock();
        let Some(to) = s.endpoint else {
            Drops::add(&drops.no_endpoint, 1);
            return;
        };
        let session = s.has_session();
        let mut sent = 0;
        let mut dropped = 0;
        let batch = &mut self.batch;
        let shared = self.shared;
        let mut emit = |seg: &[u8]| {
            if !session {
                if !s.enqueue(seg) {
                    dropped += 1;
                }
                return;
            }
            if batch.is_full() {
                flush(shared, underlay, batch);
            }
            let n = encrypt_into(&mut s, seg, batch, to);
            if n == 0 {
                dropped += 1;
            }
            sent += n;
        };
        if vnet {
            if let Err(e) = offload::split(&mut self.frame[..n], &mut self.scratch, &mut emit) {
                trace!(error = %e, "TUN read dropped");
                Drops::add(&drops.invalid, 1);
            }
        } else {
            emit(&self.frame[..n]);
        }
        Drops::add(&drops.queue_full, dropped);
        if !session {
            if self.batch.is_full() {
                flush(self.shared, underlay, &mut self.batch);
            }
            sent += initiate(&mut s, &mut self.batch, to);
        }
        if sent > 0 {
            s.last_sent = Some(Instant::now());
            peer.tx_bytes.fetch_add(sent as u64, Ordering::Relaxed);
        }
    }
}

/// Decrypted packets waiting for the TUN: fixed slots, reused.
struct Plain {
    buf: Vec<u8>,
    lens: Vec<usize>,
}

impl Plain {
    fn new() -> Self {
        Plain {
            buf: vec![0; RX_PLAIN * SLOT],
            lens: Vec::with_capacity(RX_PLAIN),
        }
    }

    fn is_full(&self) -> bool {
        self.lens.len() == RX_PLAIN
    }

    fn slot(&mut self) -> &mut [u8] {
        let i = self.lens.len().min(RX_PLAIN - 1);
        &mut self.buf[i * SLOT..(i + 1) * SLOT]
    }

    fn packet(&self, i: usize) -> &[u8] {
        &self.buf[i * SLOT..i * SLOT + self.lens[i]]
    }

    /// Writes every held packet to the TUN (merged where the offloads
    /// allow) and empties the slots; returns how many writes failed.
    fn write(&mut self, tun: &Tun) -> usize {
        let mut failed = 0;
        let offloads = tun.offloads();
        if !offloads.vnet_hdr {
            for i in 0..self.lens.len() {
                if let Err(e) = tun.write(&[IoSlice::new(self.packet(i))]) {
                    trace!(error = %e, "TUN write failed");
                    failed += 1;
                }
            }
            self.lens.clear();
            return failed;
        }
        let pkts: Vec<&[u8]> = (0..self.lens.len()).map(|i| self.packet(i)).collect();
        let zero = [0u8; VNET_HDR_LEN];
        let mut head = [0u8; 128];
        for g in offload::plan(&pkts, offloads.uso) {
            let first = pkts[g.members[0]];
            if g.is_single() {
                if let Err(e) = tun.write(&[IoSlice::new(&zero), IoSlice::new(first)]) {
                    trace!(error = %e, "TUN write failed");
                    failed += 1;
                }
                continue;
            }
            let hl = g.header_len();
            let last_psh = g.members.last().is_some_and(|&m| offload::has_psh(pkts[m]));
            head[..hl].copy_from_slice(&first[..hl]);
            let vnet = offload::merge_headers(&mut head[..hl], &g, last_psh).encode();
            let mut iov = Vec::with_capacity(g.members.len() + 2);
            iov.push(IoSlice::new(&vnet));
            iov.push(IoSlice::new(&head[..hl]));
            iov.extend(g.members.iter().map(|&m| IoSlice::new(&pkts[m][hl..])));
            if let Err(e) = tun.write(&iov) {
                // The merged packet was refused: the segments one by one.
                debug!(error = %e, segments = g.members.len(), "TUN refused a merged packet");
                for &m in &g.members {
                    if tun
                        .write(&[IoSlice::new(&zero), IoSlice::new(pkts[m])])
                        .is_err()
                    {
                        failed += 1;
                    }
                }
            }
        }
        self.lens.clear();
        failed
    }
}

struct Rx<'a> {
    shared: &'a Shared,
    tun: &'a Tun,
    replies: SendBatch,
    plain: Plain,
    /// Scratch for `Tunn`'s own queue and rate-limiter answers.
    tmp: Vec<u8>,
    /// The time of the batch being processed (one clock read per batch).
    now: Instant,
}

/// The peer whose lock is held across consecutive datagrams.
struct Locked<'t> {
    index: usize,
    state: MutexGuard<'t, PeerState>,
    /// The last inner source address found to belong to this peer.
    allowed_src: Option<IpAddr>,
}

impl<'a> Rx<'a> {
    fn new(shared: &'a Shared, tun: &'a Tun) -> Self {
        Rx {
            shared,
            tun,
            replies: SendBatch::new(RX_REPLIES),
            plain: Plain::new(),
            tmp: vec![0; SLOT],
            now: Instant::now(),
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
                    let [
                        no_route,
                        no_endpoint,
                        queue_full,
                        invalid,
                        source,
                        send,
                        tun,
                    ] = d;
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

    fn batch(&mut self, recv: &RecvBatch, underlay: &Underlay) {
        let table = self.shared.table();
        let Some(keys) = self.shared.keys() else {
            return;
        };
        let mut locked: Option<Locked<'_>> = None;
        self.now = Instant::now();
        for (src, d) in recv.datagrams() {
            self.datagram(&table, &keys, underlay, &mut locked, src, d);
        }
        drop(locked);
        let failed = self.plain.write(self.tun);
        Drops::add(&self.shared.drops.tun, failed);
        flush(self.shared, Some(underlay), &mut self.replies);
    }

    fn datagram<'t>(
        &mut self,
        table: &'t Table,
        keys: &Keys,
        underlay: &Underlay,
        locked: &mut Option<Locked<'t>>,
        src: SocketAddr,
        d: &[u8],
    ) {
        let drops = &self.shared.drops;
        let Ok(packet) = Tunn::parse_incoming_packet(d) else {
            Drops::add(&drops.invalid, 1);
            return;
        };
        let kind = MessageType::of_packet(&packet);
        let pi = match packet {
            Packet::HandshakeInit(p) => {
                // MACs (and under load the cookie) before the expensive DH.
                let mut cookie = [0u8; 64];
                match keys.limiter.verify_packet(Some(src.ip()), d, &mut cookie) {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(reply)) => {
                        self.reply(underlay, reply, src);
                        return;
                    }
                    Err(_) => {
                        Drops::add(&drops.invalid, 1);
                        return;
                    }
                }
                parse_handshake_anon(&keys.secret, &keys.public, &p)
                    .ok()
                    .and_then(|h| table.by_key(&PublicKey(h.peer_static_public)))
            }
            Packet::HandshakeResponse(p) => table.by_receiver(p.receiver_idx),
            Packet::PacketCookieReply(p) => table.by_receiver(p.receiver_idx),
            Packet::PacketData(p) => table.by_receiver(p.receiver_idx),
        };
        let Some(pi) = pi else {
            Drops::add(&drops.invalid, 1);
            return;
        };
        // The decrypted packet must fit a slot (Tunn panics otherwise).
        if d.len() > SLOT {
            Drops::add(&drops.invalid, 1);
            return;
        }
        if locked.as_ref().is_none_or(|l| l.index != pi) {
            *locked = None;
            *locked = Some(Locked {
                index: pi,
                state: table.peers[pi].lock(),
                allowed_src: None,
            });
        }
        let Some(l) = locked.as_mut() else {
            return;
        };
        if self.plain.is_full() {
            let failed = self.plain.write(self.tun);
            Drops::add(&drops.tun, failed);
        }
        let now = self.now;
        let mut sent = 0;
        let authenticated = match l
            .state
            .tunn()
            .decapsulate(Some(src.ip()), d, self.plain.slot())
        {
            TunnResult::WriteToTunnelV4(pkt, from) => {
                let (len, from) = (pkt.len(), IpAddr::V4(from));
                self.accept(table, l, pi, from, len);
                true
            }
            TunnResult::WriteToTunnelV6(pkt, from) => {
                let (len, from) = (pkt.len(), IpAddr::V6(from));
                self.accept(table, l, pi, from, len);
                true
            }
            TunnResult::WriteToNetwork(out) => {
                let sent_kind = MessageType::of(out);
                sent += out.len();
                if !self.replies.push(out, src) {
                    flush(self.shared, Some(underlay), &mut self.replies);
                    self.replies.push(out, src);
                }
                if sent_kind.is_some_and(|sent| completes_handshake(kind, sent)) {
                    l.state.last_handshake = Some(now);
                }
                // What boringtun queued itself (keepalives from its timers).
                while let TunnResult::WriteToNetwork(q) =
                    l.state.tunn().decapsulate(None, &[], &mut self.tmp)
                {
                    sent += q.len();
                    if !self.replies.push(q, src) {
                        flush(self.shared, Some(underlay), &mut self.replies);
                        self.replies.push(q, src);
                    }
                }
                sent_kind != Some(MessageType::CookieReply)
            }
            TunnResult::Done => kind == MessageType::Data,
            TunnResult::Err(e) => {
                trace!(error = ?e, %src, "datagram dropped");
                Drops::add(&drops.invalid, 1);
                false
            }
        };
        if !authenticated {
            return;
        }
        let peer = &table.peers[pi];
        peer.rx_bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
        // Roaming: the peer is wherever its authenticated packets come from.
        if l.state.endpoint != Some(src) {
            l.state.endpoint = Some(src);
        }
        if l.state.queued() > 0 && l.state.has_session() {
            for q in l.state.take_queue() {
                if self.replies.is_full() {
                    flush(self.shared, Some(underlay), &mut self.replies);
                }
                sent += encrypt_into(&mut l.state, &q, &mut self.replies, src);
            }
        }
        if sent > 0 {
            l.state.last_sent = Some(now);
            peer.tx_bytes.fetch_add(sent as u64, Ordering::Relaxed);
        }
    }

    /// Keeps a decrypted packet if its source belongs to the peer that sent
    /// it (cryptokey routing); drops it otherwise.
    fn accept(&mut self, table: &Table, l: &mut Locked<'_>, pi: usize, from: IpAddr, len: usize) {
        let ok = l.allowed_src == Some(from) || table.route(from) == Some(pi);
        if ok {
            l.allowed_src = Some(from);
            self.plain.lens.push(len);
        } else {
            trace!(%from, "inner source not in the peer's AllowedIPs; dropped");
            Drops::add(&self.shared.drops.source, 1);
        }
    }

    fn reply(&mut self, underlay: &Underlay, data: &[u8], to: SocketAddr) {
        if !self.replies.push(data, to) {
            flush(self.shared, Some(underlay), &mut self.replies);
            self.replies.push(data, to);
        }
    }

    /// Every peer's timers: handshake retries and rekeying (`Tunn`),
    /// persistent keepalives and the queue (nexd).
    fn timers(&mut self, underlay: Option<&Underlay>, now: Instant) {
        let table = self.shared.table();
        for peer in &table.peers {
            let mut s = peer.lock();
            let Some(to) = s.endpoint else {
                continue;
            };
            let mut sent = 0;
            if self.replies.is_full() {
                flush(self.shared, underlay, &mut self.replies);
            }
            let timer = match s.built_tunn() {
                Some(t) => t.update_timers(self.replies.slot()),
                None => TunnResult::Done,
            };
            match timer {
                TunnResult::WriteToNetwork(out) => {
                    let n = out.len();
                    self.replies.commit(n, to);
                    sent += n;
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => s.clear_queue(),
                TunnResult::Err(e) => trace!(peer = %peer.key, error = ?e, "timer"),
                _ => {}
            }
            if keepalive_due(s.keepalive, s.last_sent, now) {
                if self.replies.is_full() {
                    flush(self.shared, underlay, &mut self.replies);
                }
                sent += if s.has_session() {
                    encrypt_into(&mut s, &[], &mut self.replies, to)
                } else {
                    initiate(&mut s, &mut self.replies, to)
                };
            }
            if s.queued() > 0 && s.has_session() {
                for q in s.take_queue() {
                    if self.replies.is_full() {
                        flush(self.shared, underlay, &mut self.replies);
                    }
                    sent += encrypt_into(&mut s, &q, &mut self.replies, to);
                }
            }
            if sent > 0 {
                s.last_sent = Some(now);
                peer.tx_bytes.fetch_add(sent as u64, Ordering::Relaxed);
            }
        }
        flush(self.shared, underlay, &mut self.replies);
    }
}
