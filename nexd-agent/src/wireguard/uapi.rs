//! WireGuard's cross-platform UAPI (the `key=value` protocol of
//! `/var/run/wireguard/<iface>.sock`), written for nexd rather than taken
//! from wireguard-control: it never prints to stdout, never spawns
//! wireguard-go, has timeouts, and copes with boringtun's dialect
//! (`own_public_key` instead of `private_key`, and a handshake *age* where
//! the reference implementation reports a timestamp).
//!
//! nexd talks to its in-process device over one persistent stream (a
//! socketpair, see `userspace`), so requests are serialised here and every
//! reply is read exactly to its end: the trailing blank line included.

use std::{
    fmt::Write as _,
    io::{self, BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;

use super::{DeviceStatus, PeerConfig, PeerStatus};
use crate::keys::{PrivateKey, PublicKey};

/// Directory of the UAPI sockets, shared by all implementations.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// How long one UAPI exchange may take before nexd gives up on it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Handshake values above this are Unix timestamps (reference dialect);
/// below it they are ages in seconds (boringtun). 10^9 s is 2001-09-09.
const TIMESTAMP_THRESHOLD: u64 = 1_000_000_000;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the device answered errno={0} ({1})")]
    Errno(i32, io::Error),
    #[error("malformed reply line {0:?}")]
    Malformed(String),
}

/// A persistent UAPI stream to one device. Requests are serialised.
pub struct UapiChannel {
    stream: Mutex<BufReader<UnixStream>>,
}

impl UapiChannel {
    /// Wraps nexd's end of the device's UAPI stream.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(UapiChannel {
            stream: Mutex::new(BufReader::new(stream)),
        })
    }

    /// Sends one request (`get=1\n` or `set=1\n...\n\n`) and returns the
    /// reply lines up to and including the `errno=` line.
    pub fn exchange(&self, request: &str) -> Result<Vec<String>, UapiError> {
        let mut reader = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        reader.get_mut().write_all(request.as_bytes())?;
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(UapiError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the device closed its UAPI stream",
                )));
            }
            let line = line.trim_end_matches('\n').to_owned();
            let done = line.starts_with("errno=");
            lines.push(line);
            if done {
                break;
            }
        }
        // The reply ends with a blank line; consume it so the next reply
        // starts clean.
        let mut blank = String::new();
        reader.read_line(&mut blank)?;
        if !blank.trim().is_empty() {
            return Err(UapiError::Malformed(blank));
        }
        Ok(lines)
    }

    /// Reads the device and its peers.
    pub fn get(&self) -> Result<DeviceStatus, UapiError> {
        parse_get(&self.exchange("get=1\n")?, SystemTime::now())
    }

    /// Sends one `set=1` request with `body` (lines ending in `\n`).
    pub fn set(&self, body: &str) -> Result<(), UapiError> {
        let lines = self.exchange(&format!("set=1\n{body}\n"))?;
        check_errno(lines.last().map_or("", String::as_str))
    }
}

fn check_errno(line: &str) -> Result<(), UapiError> {
    match line.strip_prefix("errno=").map(str::parse::<i32>) {
        Some(Ok(0)) => Ok(()),
        Some(Ok(n)) => Err(UapiError::Errno(n, io::Error::from_raw_os_error(n))),
        _ => Err(UapiError::Malformed(line.to_owned())),
    }
}

/// Parses a `get=1` reply. `now` converts reference-dialect timestamps to ages.
pub fn parse_get(lines: &[String], now: SystemTime) -> Result<DeviceStatus, UapiError> {
    let mut dev = DeviceStatus::default();
    let mut peer: Option<PeerStatus> = None;
    // (seconds, nanoseconds) of the current peer's last handshake.
    let mut handshake = (0u64, 0u32);
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| UapiError::Malformed(line.clone()))?;
        let bad = || UapiError::Malformed(line.clone());
        match key {
            "errno" => {
                check_errno(line)?;
            }
            "listen_port" => dev.listen_port = Some(value.parse().map_err(|_| bad())?),
            "fwmark" => {
                let mark: u32 = value.parse().map_err(|_| bad())?;
                dev.fwmark = (mark != 0).then_some(mark);
            }
            "public_key" => {
                if let Some(p) = peer.take() {
                    dev.peers.push(p);
                }
                handshake = (0, 0);
                peer = Some(PeerStatus {
                    public_key: PublicKey::from_hex(value).ok_or_else(bad)?,
                    endpoint: None,
                    allowed_ips: Vec::new(),
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                });
            }
            _ => {
                let Some(p) = peer.as_mut() else {
                    // Device-level keys nexd does not need: private_key,
                    // own_public_key (boringtun), protocol_version.
                    continue;
                };
                match key {
                    "endpoint" => {
                        p.endpoint = Some(value.parse::<SocketAddr>().map_err(|_| bad())?)
                    }
                    "allowed_ip" => p
                        .allowed_ips
                        .push(value.parse::<IpNet>().map_err(|_| bad())?),
                    "rx_bytes" => p.rx_bytes = value.parse().map_err(|_| bad())?,
                    "tx_bytes" => p.tx_bytes = value.parse().map_err(|_| bad())?,
                    "last_handshake_time_sec" => {
                        handshake.0 = value.parse().map_err(|_| bad())?;
                        p.last_handshake = handshake_age(handshake, now);
                    }
                    "last_handshake_time_nsec" => {
                        handshake.1 = value.parse().map_err(|_| bad())?;
                        p.last_handshake = handshake_age(handshake, now);
                    }
                    // preshared_key, persistent_keepalive_interval,
                    // protocol_version.
                    _ => {}
                }
            }
        }
    }
    if let Some(p) = peer.take() {
        dev.peers.push(p);
    }
    Ok(dev)
}

/// Both dialects in one: zero seconds *and* zero nanoseconds is "never"
/// (reference); a large value is a timestamp (reference); anything else is
/// an age (boringtun, where a handshake 0.3 s ago reads sec=0 nsec=3e8).
fn handshake_age((secs, nanos): (u64, u32), now: SystemTime) -> Option<Duration> {
    if secs == 0 && nanos == 0 {
        None
    } else if secs >= TIMESTAMP_THRESHOLD {
        let at = UNIX_EPOCH + Duration::new(secs, nanos);
        Some(now.duration_since(at).unwrap_or_default())
    } else {
        Some(Duration::new(secs, nanos))
    }
}

/// Body of a set request for the device-wide values.
pub fn device_body(
    private_key: Option<&PrivateKey>,
    listen_port: Option<u16>,
    fwmark: Option<u32>,
) -> String {
    let mut s = String::new();
    if let Some(k) = private_key {
        let _ = writeln!(s, "private_key={}", k.to_hex());
    }
    if let Some(p) = listen_port {
        let _ = writeln!(s, "listen_port={p}");
    }
    if let Some(m) = fwmark {
        let _ = writeln!(s, "fwmark={m}");
    }
    s
}

/// Body of a set request removing `keys`.
pub fn remove_body(keys: &[PublicKey]) -> String {
    let mut s = String::new();
    for k in keys {
        let _ = writeln!(s, "public_key={}\nremove=true", k.to_hex());
    }
    s
}

/// Body of a set request adding `peers` as new peers.
///
/// boringtun carries `endpoint` over from one peer section to the next
/// when a section does not set it, so peers without an endpoint go first;
/// every other per-peer value is written for every peer.
pub fn add_body(peers: &[PeerConfig]) -> String {
    let mut ordered: Vec<&PeerConfig> = peers.iter().collect();
    ordered.sort_by_key(|p| p.endpoint.is_some());
    let mut s = String::new();
    for p in ordered {
        let _ = writeln!(s, "public_key={}", p.public_key.to_hex());
        let _ = writeln!(s, "replace_allowed_ips=true");
        if let Some(ep) = p.endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive
        );
        for ip in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={ip}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_owned).collect()
    }

    #[test]
    fn boringtun_dialect_is_parsed_as_ages() {
        let k = PrivateKey::generate().public_key();
        let text = format!(
            "own_public_key=00\nlisten_port=51820\nfwmark=51820\npublic_key={}\npersistent_keepalive_interval=25\nendpoint=192.0.2.2:51820\nallowed_ip=100.64.0.2/32\nallowed_ip=fd00::2/128\nlast_handshake_time_sec=7\nlast_handshake_time_nsec=5\nrx_bytes=10\ntx_bytes=20\nerrno=0",
            k.to_hex()
        );
        let d = parse_get(&lines(&text), SystemTime::now()).expect("parse");
        assert_eq!(d.listen_port, Some(51820));
        assert_eq!(d.fwmark, Some(51820));
        assert_eq!(d.peers.len(), 1);
        let p = &d.peers[0];
        assert_eq!(p.public_key, k);
        assert_eq!(p.last_handshake, Some(Duration::new(7, 5)));
        assert_eq!(p.rx_bytes, 10);
        assert_eq!(p.tx_bytes, 20);
        assert_eq!(p.allowed_ips.len(), 2);
        assert_eq!(p.endpoint, Some("192.0.2.2:51820".parse().expect("addr")));
    }

    #[test]
    fn reference_dialect_timestamps_become_ages() {
        let k = PrivateKey::generate().public_key();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        let text = format!(
            "private_key=aa\npublic_key={}\nlast_handshake_time_sec=1700000000\nerrno=0\n",
            k.to_hex()
        );
        let d = parse_get(&lines(&text), now).expect("parse");
        assert_eq!(d.peers[0].last_handshake, Some(Duration::from_secs(100)));
        let never = format!(
            "public_key={}\nlast_handshake_time_sec=0\nerrno=0",
            k.to_hex()
        );
        let d = parse_get(&lines(&never), now).expect("parse");
        assert_eq!(d.peers[0].last_handshake, None);
    }

    #[test]
    fn errors_and_garbage_are_reported() {
        assert!(matches!(
            parse_get(&lines("errno=22"), SystemTime::now()),
            Err(UapiError::Errno(22, _))
        ));
        assert!(matches!(
            parse_get(&lines("public_key=zz\nerrno=0"), SystemTime::now()),
            Err(UapiError::Malformed(_))
        ));
    }

    #[test]
    fn peers_without_endpoint_come_first() {
        let a = PeerConfig {
            public_key: PrivateKey::generate().public_key(),
            endpoint: Some("192.0.2.1:1".parse().expect("addr")),
            allowed_ips: vec!["100.64.0.1/32".parse().expect("net")],
            persistent_keepalive: 25,
        };
        let b = PeerConfig {
            endpoint: None,
            public_key: PrivateKey::generate().public_key(),
            ..a.clone()
        };
        let body = add_body(&[a.clone(), b.clone()]);
        let first = body.find(&b.public_key.to_hex()).expect("b");
        let second = body.find(&a.public_key.to_hex()).expect("a");
        assert!(first < second, "{body}");
        assert_eq!(body.matches("persistent_keepalive_interval=25").count(), 2);
    }
}
