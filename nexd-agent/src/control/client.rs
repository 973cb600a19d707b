//! nexctl's side of the control socket. Every failure says what happened
//! and what to do about it: daemon not running, no permission, version
//! mismatch, or the daemon's own error message.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::protocol::{
    ErrorCode, ErrorReply, MAX_REPLY_BYTES, Method, Outcome, PROTOCOL_VERSION, Reply, Request,
    Response,
};

/// Why a call did not produce a reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "nexd is not running: no control socket at {0} (start it with `systemctl start nexd`, or pass --socket if it uses another path)"
    )]
    NotRunning(PathBuf),
    #[error(
        "nexd is not running: {0} exists but nobody answers (a stale socket from a crash; start nexd again)"
    )]
    Stale(PathBuf),
    #[error("permission denied opening {0}: nexctl must run as root (try sudo)")]
    PermissionDenied(PathBuf),
    #[error("nexd did not answer on {path} within {secs} seconds")]
    Timeout { path: PathBuf, secs: u64 },
    #[error(
        "version mismatch: this nexctl ({version}) speaks control protocol {PROTOCOL_VERSION}, nexd speaks {0}; use the nexctl that came with the running nexd",
        version = env!("CARGO_PKG_VERSION")
    )]
    ProtocolMismatch(u32),
    #[error("talking to nexd on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("nexd sent a reply nexctl cannot read: {0}")]
    BadReply(String),
    #[error("{}", .0.message)]
    Remote(ErrorReply),
    /// A nexd holds the instance lock but does not answer on this socket.
    #[error("{0}")]
    Silent(String),
    /// nexd is not running and cleaning up after it failed or is
    /// incomplete.
    #[error("{0}")]
    Offline(String),
}

impl ClientError {
    /// The error code nexd gave, if this is nexd's own error.
    pub fn remote_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Remote(e) => Some(e.code),
            _ => None,
        }
    }
}

/// Sends `method` to the nexd listening on `path` and returns its reply.
pub fn call(path: &Path, method: Method, timeout: Duration) -> Result<Reply, ClientError> {
    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ClientError::NotRunning(path.to_owned()),
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.to_owned()),
        io::ErrorKind::ConnectionRefused => ClientError::Stale(path.to_owned()),
        _ => ClientError::Io {
            path: path.to_owned(),
            source: e,
        },
    })?;
    let io_err = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ClientError::Timeout {
                path: path.to_owned(),
                secs: timeout.as_secs(),
            }
        } else {
            ClientError::Io {
                path: path.to_owned(),
                source,
            }
        }
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut line = serde_json::to_vec(&Request {
        protocol: PROTOCOL_VERSION,
        method,
    })
    .map_err(|e| ClientError::BadReply(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    let mut reader = BufReader::new(stream.take(MAX_REPLY_BYTES as u64));
    let mut reply = Vec::new();
    reader.read_until(b'\n', &mut reply).map_err(io_err)?;
    decode_reply(&reply)
}

/// Decodes a reply line, reporting a version mismatch before anything else.
pub fn decode_reply(line: &[u8]) -> Result<Reply, ClientError> {
    if line.is_empty() {
        return Err(ClientError::BadReply(
            "nexd closed the connection without answering".into(),
        ));
    }
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| ClientError::BadReply(e.to_string()))?;
    let protocol = value
        .get("protocol")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| ClientError::BadReply("reply has no protocol field".into()))?;
    // nexd answers a mismatch with its own explanation; prefer that text.
    let resp: Result<Response, _> = serde_json::from_value(value);
    if protocol != u64::from(PROTOCOL_VERSION) {
        if let Ok(Response {
            outcome: Outcome::Error(e),
            ..
        }) = resp
        {
            return Err(ClientError::Remote(e));
        }
        return Err(ClientError::ProtocolMismatch(
            u32::try_from(protocol).unwrap_or(u32::MAX),
        ));
    }
    match resp
        .map_err(|e| ClientError::BadReply(e.to_string()))?
        .outcome
    {
        Outcome::Ok(reply) => Ok(reply),
        Outcome::Error(e) => Err(ClientError::Remote(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_socket_says_nexd_is_not_running() {
        let err = call(
            Path::new("/nonexistent/nexd.sock"),
            Method::Status,
            Duration::from_secs(1),
        )
        .expect_err("no socket");
        assert!(matches!(err, ClientError::NotRunning(_)));
        assert!(err.to_string().contains("nexd is not running"), "{err}");
    }

    #[test]
    fn newer_nexd_is_reported_as_mismatch() {
        let err =
            decode_reply(br#"{"protocol":7,"ok":{"type":"something_new"}}"#).expect_err("mismatch");
        assert!(matches!(err, ClientError::ProtocolMismatch(7)), "{err:?}");
        assert!(err.to_string().contains("speaks 7"), "{err}");
    }

    #[test]
    fn remote_errors_carry_their_text() {
        let err = decode_reply(
            br#"{"protocol":1,"error":{"code":"unavailable","message":"no exit node is available"}}"#,
        )
        .expect_err("remote");
        assert_eq!(err.to_string(), "no exit node is available");
        assert_eq!(err.remote_code(), Some(ErrorCode::Unavailable));
    }
}
