//! The read side of WireGuard's cross-platform UAPI (the `key=value`
//! protocol of `/var/run/wireguard/<iface>.sock`), so that `wg show` and
//! other UAPI readers see the userspace device as they would any WireGuard
//! implementation.
//!
//! nexd configures its in-process device through typed calls, not through
//! this protocol, and owns the configuration: the socket answers `get=1`
//! in the reference dialect (`private_key`, handshake times as Unix
//! timestamps) and refuses `set=1` with EPERM. The socket is mode 0600, as
//! the kernel's netlink interface is root's only.

use std::{
    fmt::Write as _,
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::{
        fs::PermissionsExt as _,
        net::{UnixListener, UnixStream},
    },
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tracing::debug;

use super::PeerStatus;
use crate::keys::PrivateKey;

/// Directory of the UAPI sockets, shared by all implementations.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// How long one UAPI exchange may take before nexd gives up on it.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the relay looks for a new client (and for its stop flag).
const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// What a `get=1` reply describes.
pub struct GetReply {
    pub private_key: Option<PrivateKey>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    /// Each peer with its persistent keepalive interval.
    pub peers: Vec<(PeerStatus, u16)>,
}

/// The `get=1` reply in the reference dialect, ending with `errno=0` and
/// the blank line. `now` turns handshake ages into timestamps.
pub fn format_get(reply: &GetReply, now: SystemTime) -> String {
    let mut s = String::new();
    if let Some(k) = &reply.private_key {
        let _ = writeln!(s, "private_key={}", k.to_hex());
    }
    if let Some(p) = reply.listen_port {
        let _ = writeln!(s, "listen_port={p}");
    }
    if let Some(m) = reply.fwmark {
        let _ = writeln!(s, "fwmark={m}");
    }
    for (p, keepalive) in &reply.peers {
        let _ = writeln!(s, "public_key={}", p.public_key.to_hex());
        if let Some(ep) = p.endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let at = p
            .last_handshake
            .and_then(|age| now.checked_sub(age))
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(s, "last_handshake_time_sec={}", at.as_secs());
        let _ = writeln!(s, "last_handshake_time_nsec={}", at.subsec_nanos());
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(s, "persistent_keepalive_interval={keepalive}");
        for ip in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={ip}");
        }
        let _ = writeln!(s, "protocol_version=1");
    }
    s.push_str("errno=0\n\n");
    s
}

/// Serves `/var/run/wireguard/<iface>.sock` (mode 0600) on its own thread,
/// answering `get=1` with what `answer` returns.
pub struct Relay {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Relay {
    pub fn start(iface: &str, answer: impl Fn() -> String + Send + 'static) -> io::Result<Self> {
        let dir = PathBuf::from(SOCKET_DIR);
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
                            if let Err(e) = answer_one(conn, &answer) {
                                debug!(error = %e, "UAPI request failed");
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(ACCEPT_POLL);
                        }
                        Err(e) => {
                            debug!(error = %e, "UAPI accept failed");
                            thread::sleep(ACCEPT_POLL);
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

    pub fn stop(self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers one UAPI client.
fn answer_one(conn: UnixStream, answer: &dyn Fn() -> String) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let reply = match first.trim_end() {
        "get=1" => answer(),
        "set=1" => format!("errno={}\n\n", libc::EPERM),
        _ => format!("errno={}\n\n", libc::EINVAL),
    };
    let mut w = conn;
    w.write_all(reply.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PublicKey;

    #[test]
    fn get_is_written_in_the_reference_dialect() {
        let key = PrivateKey::generate();
        let peer = PrivateKey::generate().public_key();
        let never = PrivateKey::generate().public_key();
        let now = UNIX_EPOCH + Duration::new(1_700_000_100, 500);
        let status = |k: PublicKey, hs: Option<Duration>| PeerStatus {
            public_key: k,
            endpoint: hs.map(|_| "192.0.2.2:51820".parse().expect("addr")),
            allowed_ips: vec![
                "100.64.0.2/32".parse().expect("net"),
                "fd00::2/128".parse().expect("net"),
            ],
            last_handshake: hs,
            rx_bytes: 10,
            tx_bytes: 20,
        };
        let reply = GetReply {
            private_key: Some(key.clone()),
            listen_port: Some(51820),
            fwmark: Some(0x6e78),
            peers: vec![
                (status(peer, Some(Duration::from_secs(100))), 25),
                (status(never, None), 0),
            ],
        };
        let text = format_get(&reply, now);
        let want_peer = format!(
            "public_key={}\nendpoint=192.0.2.2:51820\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500\ntx_bytes=20\nrx_bytes=10\npersistent_keepalive_interval=25\nallowed_ip=100.64.0.2/32\nallowed_ip=fd00::2/128\nprotocol_version=1\n",
            peer.to_hex()
        );
        assert!(text.starts_with(&format!(
            "private_key={}\nlisten_port=51820\nfwmark=28280\n",
            key.to_hex()
        )));
        assert!(text.contains(&want_peer), "{text}");
        // No handshake yet: zero, which readers show as "never".
        assert!(text.contains(&format!(
            "public_key={}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n",
            never.to_hex()
        )));
        assert!(text.ends_with("errno=0\n\n"));
    }
}
