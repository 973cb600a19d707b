//! Announcements between agents, inside the tunnel.
//!
//! Every agent sends each peer a small authenticated datagram every second
//! (`wire`): a heartbeat that also carries capabilities (exit node) and an
//! echo for round-trip times. `book::PeerBook` decides what to believe;
//! this module owns the two UDP sockets, bound to this device's mesh
//! addresses only, so nothing arrives on them from outside the mesh.

pub mod book;
pub mod wire;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::{net::UdpSocket, sync::mpsc, task::JoinHandle};
use tracing::debug;

/// A datagram received on an announcement socket.
pub struct Incoming {
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
}

/// The announcement sockets and their receive tasks.
pub struct Announcer {
    v4: Arc<UdpSocket>,
    v6: Arc<UdpSocket>,
    addrs: (IpAddr, IpAddr),
    port: u16,
    tasks: Vec<JoinHandle<()>>,
}

/// How many received datagrams may wait for the daemon loop; beyond that
/// they are dropped, so a flood cannot grow memory. The daemon creates the
/// queue once (so rebinding the sockets keeps it).
pub const QUEUE: usize = 1024;

impl Announcer {
    /// Binds `v4:port` and `v6:port` (this device's mesh addresses) and
    /// starts receiving into `tx`.
    pub fn bind(v4: IpAddr, v6: IpAddr, port: u16, tx: mpsc::Sender<Incoming>) -> io::Result<Self> {
        let bind = |ip: IpAddr| -> io::Result<UdpSocket> {
            let std = std::net::UdpSocket::bind(SocketAddr::new(ip, port)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("binding announcement socket {ip}:{port}: {e}"),
                )
            })?;
            std.set_nonblocking(true)?;
            UdpSocket::from_std(std)
        };
        let s4 = Arc::new(bind(v4)?);
        let s6 = Arc::new(bind(v6)?);
        let tasks = [Arc::clone(&s4), Arc::clone(&s6)]
            .into_iter()
            .map(|s| tokio::spawn(receive_loop(s, tx.clone())))
            .collect();
        Ok(Announcer {
            v4: s4,
            v6: s6,
            addrs: (v4, v6),
            port,
            tasks,
        })
    }

    /// The addresses and port the sockets are bound to.
    pub fn bound(&self) -> (IpAddr, IpAddr, u16) {
        (self.addrs.0, self.addrs.1, self.port)
    }

    /// Sends one datagram without waiting; a full socket buffer or a peer
    /// without a route just loses this heartbeat.
    pub fn send(&self, to: SocketAddr, bytes: &[u8]) {
        let sock = if to.is_ipv4() { &self.v4 } else { &self.v6 };
        if let Err(e) = sock.try_send_to(bytes, to) {
            debug!(%to, error = %e, "announcement not sent");
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn receive_loop(sock: Arc<UdpSocket>, tx: mpsc::Sender<Incoming>) {
    let mut buf = [0u8; 512];
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, from)) => {
                if tx
                    .try_send(Incoming {
                        from,
                        bytes: buf[..n].to_vec(),
                    })
                    .is_err()
                    && tx.is_closed()
                {
                    return;
                }
            }
            Err(e) => {
                debug!(error = %e, "announcement receive failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
