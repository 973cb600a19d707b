//! A UDP relay that delays every datagram by an adjustable time, standing
//! in for a slow network path. This kernel has no `sch_netem`, so tests
//! that need one exit node to be measurably slower than another put this
//! relay between a device's WireGuard socket and the exit node's endpoint:
//! the device's mesh file names the relay as the endpoint.
//!
//! The relay runs on a thread inside the device's namespace. Its socket to
//! the far end carries WireGuard's fwmark, so the device's policy routing
//! treats it like WireGuard's own traffic (it must not enter the tunnel).

use std::{
    collections::VecDeque,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::sys::socket::{setsockopt, sockopt};

use crate::Netns;

/// nexd's fwmark (0x6e78): what WireGuard's own packets carry.
const WG_FWMARK: u32 = 28280;

/// A running relay; stops (and joins its thread) when dropped.
pub struct DelayRelay {
    /// Where the device's WireGuard should send (the mesh file endpoint).
    pub listen: SocketAddr,
    delay_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl DelayRelay {
    /// Starts a relay in `ns` listening on 127.0.0.1 (a free port) and
    /// forwarding to `target`, with no delay yet.
    pub fn start(ns: &Netns, target: SocketAddr) -> anyhow::Result<Self> {
        let delay_us = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (d, s) = (delay_us.clone(), stop.clone());
        let thread = ns.spawn_in(move || {
            let front = UdpSocket::bind("127.0.0.1:0").context("binding the relay")?;
            let back = UdpSocket::bind("0.0.0.0:0").context("binding the relay's far side")?;
            setsockopt(&back, sockopt::Mark, &WG_FWMARK).context("SO_MARK")?;
            back.connect(target).context("connecting to the target")?;
            front.set_nonblocking(true)?;
            back.set_nonblocking(true)?;
            let _ = tx.send(front.local_addr()?);
            relay(&front, &back, &d, &s)
        })?;
        let listen = rx
            .recv_timeout(Duration::from_secs(5))
            .context("the relay did not start")?;
        Ok(DelayRelay {
            listen,
            delay_us,
            stop,
            thread: Some(thread),
        })
    }

    /// Delays each datagram, in both directions, by `d` from now on.
    pub fn set_delay(&self, d: Duration) {
        self.delay_us.store(
            d.as_micros().try_into().unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A datagram waiting for its time, and which way it goes.
struct Held {
    due: Instant,
    to_target: bool,
    bytes: Vec<u8>,
}

fn relay(
    front: &UdpSocket,
    back: &UdpSocket,
    delay_us: &AtomicU64,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut client: Option<SocketAddr> = None;
    let mut queue: VecDeque<Held> = VecDeque::new();
    let mut buf = vec![0u8; 65536];
    // A test never needs more than this; it bounds the thread's life even
    // if the owner leaks the relay.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let delay = Duration::from_micros(delay_us.load(Ordering::Relaxed));
        let mut idle = true;
        while let Ok((n, from)) = front.recv_from(&mut buf) {
            client = Some(from);
            queue.push_back(Held {
                due: Instant::now() + delay,
                to_target: true,
                bytes: buf[..n].to_vec(),
            });
            idle = false;
        }
        while let Ok(n) = back.recv(&mut buf) {
            queue.push_back(Held {
                due: Instant::now() + delay,
                to_target: false,
                bytes: buf[..n].to_vec(),
            });
            idle = false;
        }
        // A shorter new delay may put an earlier deadline behind a later
        // one; sending in arrival order then is what a real queue does.
        while queue.front().is_some_and(|h| h.due <= Instant::now()) {
            let Some(h) = queue.pop_front() else { break };
            if h.to_target {
                let _ = back.send(&h.bytes);
            } else if let Some(c) = client {
                let _ = front.send_to(&h.bytes, c);
            }
            idle = false;
        }
        if idle {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    Ok(())
}
