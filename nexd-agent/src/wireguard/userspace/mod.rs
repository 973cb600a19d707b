//! Userspace WireGuard, in-process: boringtun's noise core (`Tunn`: the
//! handshake, sessions and their timers) with nexd's own I/O around it.
//!
//! | module | owns |
//! |---|---|
//! | `tun` | the TUN file descriptor, its offloads and its (merged) writes (the link lives as long as it) |
//! | `underlay` | the UDP sockets (IPv4, IPv6), their fwmark, GSO and GRO |
//! | `offload` | nothing: virtio-net headers, segmentation and merging (pure) |
//! | `allowed_ips` | nothing: the longest-prefix table (pure) |
//! | `peers` | each peer's noise state, endpoint, counters and queue; the table the data path reads |
//! | `message` | nothing: WireGuard's message types and what they mean for the handshake (pure) |
//! | `batch` | nothing: the fixed-slot batches the cores fill and the threads empty (pure) |
//! | `drops` | the drop counters, and the reasons the data path gives |
//! | `tx` | nothing: the send side's decisions (a TUN packet to its peer, each peer's timers) |
//! | `rx` | nothing: the receive side's decisions (a datagram in, its outcome out) |
//! | `engine` | the threads `wg-tx` and `wg-rx` and the state they share: the I/O around `tx` and `rx` |
//! | `super::uapi` | the read-only UAPI socket for `wg show` |
//!
//! Why not boringtun's device: one packet per syscall and no offloads
//! (about 600 Mbit/s here), peers could not be modified in place (an
//! AllowedIPs change restarted the session), its UAPI socket mode grabbed
//! SIGTERM, and it queued up to 256 packets per unreachable peer. See
//! docs/ARCHITECTURE.md "WireGuard backends" for the design and the
//! measurements.
//!
//! Threads: `wg-tx-<iface>`, `wg-rx-<iface>` and `uapi-<iface>`, all
//! joined by `shutdown`. No signal is touched.

mod allowed_ips;
mod batch;
mod drops;
mod engine;
mod message;
mod offload;
mod peers;
mod rx;
#[cfg(test)]
mod testing;
mod tun;
mod tx;
mod underlay;

use std::{
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::{Instant, SystemTime},
};

use tracing::{debug, info, warn};

use super::{
    BackendKind, DeviceConfig, DeviceStatus, PeerConfig, WgError, WireGuard,
    uapi::{self, GetReply, Relay},
};
use crate::keys::{PrivateKey, PublicKey};

use engine::Shared;
use peers::{Keys, PeerRegistry};
use tun::Tun;
use underlay::Underlay;

/// The control side's state: what was configured.
#[derive(Default)]
struct Control {
    peers: PeerRegistry,
    key: Option<PrivateKey>,
    listen_port: Option<u16>,
    /// The port the sockets are bound to (the configured one may be 0).
    bound_port: Option<u16>,
    fwmark: Option<u32>,
}

impl Control {
    fn get_reply(&self) -> GetReply {
        GetReply {
            private_key: self.key.clone(),
            listen_port: self.bound_port,
            fwmark: self.fwmark,
            peers: self.peers.status(Instant::now()),
        }
    }
}

fn lock(c: &Mutex<Control>) -> MutexGuard<'_, Control> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// The running device.
pub struct UserspaceWireGuard {
    iface: String,
    shared: Arc<Shared>,
    control: Arc<Mutex<Control>>,
    /// Held until `shutdown`; closing the last reference removes the link.
    tun: Mutex<Option<Arc<Tun>>>,
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
    relay: Mutex<Option<Relay>>,
}

impl UserspaceWireGuard {
    /// Creates the TUN interface and starts the data path. Sockets, key and
    /// peers come with `configure` and `apply_peers`.
    pub fn start(iface: &str) -> Result<Self, WgError> {
        let start_err = |reason: String| WgError::UserspaceStart {
            iface: iface.to_owned(),
            reason,
        };
        let tun = Arc::new(Tun::open(iface).map_err(|e| {
            start_err(format!(
                "creating the TUN device: {e} (is /dev/net/tun available and does nexd have CAP_NET_ADMIN?)"
            ))
        })?);
        let offloads = tun.offloads();
        let shared = Arc::new(Shared::new(iface).map_err(|e| start_err(format!("eventfd: {e}")))?);
        let threads = engine::spawn(&shared, &tun)
            .map_err(|e| start_err(format!("cannot start the data path threads: {e}")))?;
        let control = Arc::new(Mutex::new(Control::default()));
        let relay = {
            let control = Arc::clone(&control);
            Relay::start(iface, move || {
                uapi::format_get(&lock(&control).get_reply(), SystemTime::now())
            })
        };
        let relay = match relay {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(iface, error = %e, "cannot serve the UAPI socket; `wg show` will not see this device");
                None
            }
        };
        info!(
            iface,
            tun_vnet_hdr = offloads.vnet_hdr,
            tun_tso = offloads.tso,
            tun_uso = offloads.uso,
            "userspace WireGuard data path started"
        );
        Ok(UserspaceWireGuard {
            iface: iface.to_owned(),
            shared,
            control,
            tun: Mutex::new(Some(tun)),
            threads: Mutex::new(threads),
            relay: Mutex::new(relay),
        })
    }

    fn err(&self, op: &'static str, source: std::io::Error) -> WgError {
        WgError::Userspace {
            iface: self.iface.clone(),
            op,
            source,
        }
    }
}

impl WireGuard for UserspaceWireGuard {
    fn kind(&self) -> BackendKind {
        BackendKind::Userspace
    }

    fn interface(&self) -> &str {
        &self.iface
    }

    fn configure(&self, config: &DeviceConfig) -> Result<(), WgError> {
        let mut c = lock(&self.control);
        let want = config.private_key.public_key();
        if c.key.as_ref().map(PrivateKey::public_key) != Some(want) {
            let keys = Arc::new(Keys::new(&config.private_key));
            c.peers.rekey(&keys);
            self.shared.set_keys(keys);
            c.key = Some(config.private_key.clone());
            debug!(iface = %self.iface, public_key = %want, "device key set");
        }
        if c.listen_port != Some(config.listen_port) {
            // New sockets on the new port (the old ones close once the
            // threads let go of them); sessions and peers stay.
            let u = Underlay::open(config.listen_port, config.fwmark)
                .map_err(|e| self.err("binding the UDP port", e))?;
            let f = u.features();
            info!(iface = %self.iface, port = u.port, udp_gso = f.gso, udp_gro = f.gro, ipv6 = f.ipv6, "WireGuard UDP sockets bound");
            c.bound_port = Some(u.port);
            self.shared.set_underlay(u);
            c.listen_port = Some(config.listen_port);
            c.fwmark = config.fwmark;
        } else if c.fwmark != config.fwmark {
            if let Some(u) = self.shared.underlay() {
                u.set_fwmark(config.fwmark)
                    .map_err(|e| self.err("setting the fwmark", e))?;
            }
            c.fwmark = config.fwmark;
            debug!(iface = %self.iface, fwmark = ?config.fwmark, "fwmark set on the live sockets");
        }
        Ok(())
    }

    fn apply_peers(&self, upsert: &[PeerConfig], remove: &[PublicKey]) -> Result<(), WgError> {
        if upsert.is_empty() && remove.is_empty() {
            return Ok(());
        }
        let mut c = lock(&self.control);
        let Some(keys) = self.shared.keys() else {
            return Err(self.err(
                "adding peers",
                std::io::Error::other("the device has no private key yet"),
            ));
        };
        if let Some(table) = c.peers.apply_changes(&keys, upsert, remove) {
            self.shared.set_table(table);
        }
        Ok(())
    }

    fn status(&self) -> Result<DeviceStatus, WgError> {
        let c = lock(&self.control);
        Ok(DeviceStatus {
            listen_port: c.bound_port,
            fwmark: c.fwmark,
            peers: c
                .peers
                .status(Instant::now())
                .into_iter()
                .map(|(p, _)| p)
                .collect(),
        })
    }

    fn shutdown(&self) {
        if let Some(relay) = self.relay.lock().unwrap_or_else(|p| p.into_inner()).take() {
            relay.stop();
        }
        self.shared.stop();
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            if t.join().is_err() {
                warn!(iface = %self.iface, "a userspace WireGuard thread panicked");
            }
        }
        // The threads are gone: this is the last reference, and closing it
        // removes the link.
        self.tun.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl Drop for UserspaceWireGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}
