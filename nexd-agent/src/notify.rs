//! systemd's readiness protocol (`Type=notify`): one datagram to the socket
//! in `$NOTIFY_SOCKET`. Without that variable (not under systemd) every
//! call does nothing. Failures are logged, never fatal: readiness is a
//! courtesy to the service manager, not part of nexd's job.

use std::os::unix::net::UnixDatagram;

use tracing::debug;

fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket address.
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        debug!(error = %e, state, "sd_notify failed");
    }
}

/// Start-up is complete: the mesh is up and the control socket answers.
pub fn ready() {
    send("READY=1\nSTATUS=mesh up");
}

/// A SIGHUP reload begins; `ready()` ends it.
pub fn reloading() {
    send("RELOADING=1");
}

/// Shutdown (and clean-up) begins.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=removing what nexd installed");
}
