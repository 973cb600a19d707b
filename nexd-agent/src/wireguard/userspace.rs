//! Userspace WireGuard: boringtun's device running inside nexd on a TUN
//! interface, configured through the standard UAPI.
//!
//! boringtun has two ways to serve its UAPI. Its socket mode
//! (`/var/run/wireguard/<iface>.sock`) also grabs SIGINT and SIGTERM through
//! a signalfd, which races nexd's own handlers for a process-wide SIGTERM
//! (seen: nexd never heard the signal and never cleaned up), and it shuts
//! the device down if anything removes the socket file. So nexd uses the
//! other mode: the UAPI runs over one end of a socketpair that nexd holds
//! (`UapiChannel`), with no signal handling and no file to lose. To keep
//! `wg show` and other UAPI readers working, nexd serves the standard
//! socket file itself and relays read requests over the channel (`Relay`).
//!
//! boringtun panics when asked to modify an existing peer, so an update is
//! sent as remove-then-add, which restarts that one peer's session; peers
//! that did not change are never touched.

use std::{
    collections::HashSet,
    io::{self, BufRead as _, BufReader, Write as _},
    os::{
        fd::IntoRawFd as _,
        unix::{
            fs::PermissionsExt as _,
            net::{UnixListener, UnixStream},
        },
    },
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use boringtun::device::{DeviceConfig as BtConfig, DeviceHandle};
use tracing::{debug, warn};

use super::{
    BackendKind, DeviceConfig, DeviceStatus, PeerConfig, WgError, WireGuard,
    uapi::{self, UapiChannel, UapiError},
};
use crate::keys::PublicKey;

/// How long the device may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// A boringtun device owned by its own thread.
pub struct UserspaceWireGuard {
    iface: String,
    channel: Arc<UapiChannel>,
    /// Sending on (or dropping) this stops the device.
    stop: Mutex<Option<mpsc::Sender<()>>>,
    owner: Mutex<Option<thread::JoinHandle<()>>>,
    relay: Mutex<Option<Relay>>,
    /// The public key last configured; boringtun never reports the private one.
    configured_key: Mutex<Option<PublicKey>>,
}

impl UserspaceWireGuard {
    /// Creates the TUN interface and starts the device.
    pub fn start(iface: &str) -> Result<Self, WgError> {
        let start_err = |reason: String| WgError::UserspaceStart {
            iface: iface.to_owned(),
            reason,
        };
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| start_err(format!("socketpair: {e}")))?;
        let channel =
            Arc::new(UapiChannel::new(ours).map_err(|e| start_err(format!("UAPI stream: {e}")))?);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let name = iface.to_owned();
        // boringtun takes ownership of the descriptor.
        let uapi_fd = theirs.into_raw_fd();
        let owner = thread::Builder::new()
            .name(format!("wg-{iface}"))
            .spawn(move || {
                let config = BtConfig {
                    // One worker was measured fastest on 2 cores; see
                    // docs/ARCHITECTURE.md.
                    n_threads: 1,
                    // Unconnected sockets: with connected ones boringtun picks
                    // the source address at connect() time, before the fwmark
                    // applies, which breaks exit-node policy routing.
                    use_connected_socket: false,
                    use_multi_queue: false,
                    uapi_fd,
                };
                let handle = match DeviceHandle::new(&name, config) {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:?}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let _ = stop_rx.recv();
                drop(handle);
            })
            .map_err(|e| start_err(format!("cannot spawn the device thread: {e}")))?;

        let started = ready_rx
            .recv_timeout(START_TIMEOUT)
            .map_err(|_| "the device did not start in time".to_owned())
            .and_then(|r| r);
        if let Err(reason) = started {
            let _ = owner.join();
            return Err(start_err(format!(
                "{reason} (is /dev/net/tun available and does nexd have CAP_NET_ADMIN?)"
            )));
        }
        let dev = UserspaceWireGuard {
            iface: iface.to_owned(),
            channel,
            stop: Mutex::new(Some(stop_tx)),
            owner: Mutex::new(Some(owner)),
            relay: Mutex::new(None),
            configured_key: Mutex::new(None),
        };
        if let Err(e) = dev.channel.get() {
            dev.shutdown();
            return Err(start_err(format!(
                "the device does not answer on UAPI: {e}"
            )));
        }
        match Relay::start(iface, Arc::clone(&dev.channel)) {
            Ok(r) => *dev.relay.lock().unwrap_or_else(|p| p.into_inner()) = Some(r),
            Err(e) => {
                warn!(iface, error = %e, "cannot serve the UAPI socket; `wg show` will not see this device")
            }
        }
        Ok(dev)
    }

    fn err(&self, op: &'static str, e: UapiError) -> WgError {
        match e {
            UapiError::Io(source) => WgError::Uapi {
                iface: self.iface.clone(),
                op,
                source,
            },
            other => WgError::UapiErrno {
                iface: self.iface.clone(),
                op,
                message: other.to_string(),
            },
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
        let current = self.channel.get().map_err(|e| self.err("get", e))?;
        let mut key_slot = self
            .configured_key
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let want_key = config.private_key.public_key();
        let key = (*key_slot != Some(want_key)).then_some(&config.private_key);
        // Reopening the listen socket drops every peer's endpoint socket, so
        // only send the port when it really changes.
        let port = (current.listen_port != Some(config.listen_port)).then_some(config.listen_port);
        let mark = (current.fwmark != config.fwmark).then_some(config.fwmark.unwrap_or(0));
        let body = uapi::device_body(key, port, mark);
        if !body.is_empty() {
            self.channel
                .set(&body)
                .map_err(|e| self.err("set device", e))?;
            debug!(iface = %self.iface, ?port, ?mark, key_changed = key.is_some(), "device configured");
        }
        *key_slot = Some(want_key);
        Ok(())
    }

    fn apply_peers(&self, upsert: &[PeerConfig], remove: &[PublicKey]) -> Result<(), WgError> {
        if upsert.is_empty() && remove.is_empty() {
            return Ok(());
        }
        let existing: HashSet<PublicKey> = self
            .channel
            .get()
            .map_err(|e| self.err("get", e))?
            .peers
            .into_iter()
            .map(|p| p.public_key)
            .collect();
        let mut removals: Vec<PublicKey> = remove
            .iter()
            .filter(|k| existing.contains(k))
            .copied()
            .collect();
        // boringtun cannot modify a peer in place: remove, then add anew.
        removals.extend(
            upsert
                .iter()
                .map(|p| p.public_key)
                .filter(|k| existing.contains(k)),
        );
        if !removals.is_empty() {
            self.channel
                .set(&uapi::remove_body(&removals))
                .map_err(|e| self.err("remove peers", e))?;
        }
        if !upsert.is_empty() {
            self.channel
                .set(&uapi::add_body(upsert))
                .map_err(|e| self.err("add peers", e))?;
        }
        Ok(())
    }

    fn status(&self) -> Result<DeviceStatus, WgError> {
        self.channel.get().map_err(|e| self.err("get", e))
    }

    fn shutdown(&self) {
        if let Some(relay) = self.relay.lock().unwrap_or_else(|p| p.into_inner()).take() {
            relay.stop();
        }
        if let Some(stop) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = stop.send(());
        }
        if let Some(owner) = self.owner.lock().unwrap_or_else(|p| p.into_inner()).take()
            && owner.join().is_err()
        {
            warn!(iface = %self.iface, "the userspace WireGuard thread panicked while stopping");
        }
    }
}

impl Drop for UserspaceWireGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serves `/var/run/wireguard/<iface>.sock` (mode 0600) and relays read
/// requests over the device's channel, so `wg show` works as for any
/// WireGuard implementation.
struct Relay {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Relay {
    fn start(iface: &str, channel: Arc<UapiChannel>) -> io::Result<Self> {
        let dir = PathBuf::from(uapi::SOCKET_DIR);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{iface}.sock"));
        // A live socket of that name belongs to another implementation:
        // leave it alone rather than hijack its users.
        if UnixStream::connect(&path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another process", path.display()),
            ));
        }
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stopping);
        let thread = thread::Builder::new()
            .name(format!("uapi-{iface}"))
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            if let Err(e) = relay_one(conn, &channel) {
                                debug!(error = %e, "UAPI relay request failed");
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => {
                            debug!(error = %e, "UAPI relay accept failed");
                            thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
        Ok(Relay {
            path,
            stopping,
            thread,
        })
    }

    fn stop(self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers one UAPI client. Only `get=1` is relayed: nexd owns this
/// device's configuration (and boringtun panics on some changes made behind
/// its back), so `set=1` is refused with EPERM.
fn relay_one(conn: UnixStream, channel: &UapiChannel) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(uapi::IO_TIMEOUT))?;
    conn.set_write_timeout(Some(uapi::IO_TIMEOUT))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let reply = match first.trim_end() {
        "get=1" => match channel.exchange("get=1\n") {
            Ok(lines) => {
                let mut s = lines.join("\n");
                s.push_str("\n\n");
                s
            }
            Err(_) => "errno=5\n\n".to_owned(),
        },
        "set=1" => format!("errno={}\n\n", libc::EPERM),
        _ => format!("errno={}\n\n", libc::EINVAL),
    };
    let mut w = conn;
    w.write_all(reply.as_bytes())
}
