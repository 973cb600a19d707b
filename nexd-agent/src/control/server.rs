//! nexd's side of the control socket: accepts connections, reads one
//! bounded request per connection, checks who is asking, and hands the
//! request to the daemon loop, which is the only place that changes state.

use std::{
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{debug, warn};

use super::protocol::{ErrorCode, MAX_REQUEST_BYTES, Method, Response, decode_request};

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon loop may take to answer before the client is told so.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A request on its way to the daemon loop.
pub struct ControlCall {
    pub method: Method,
    /// Where the daemon sends the answer.
    pub reply: oneshot::Sender<Response>,
}

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "another nexd is already running: its control socket {0} answers (stop it first, or give this one --socket and --interface of its own)"
    )]
    AlreadyRunning(PathBuf),
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("--socket-group {0}: no such group")]
    UnknownGroup(String),
}

/// Fails if a live nexd answers on `path`; removes a stale socket file left
/// by a crashed one.
pub fn check_socket_free(path: &Path) -> Result<(), ControlError> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ControlError::AlreadyRunning(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            // Nobody listens: a leftover of a previous run.
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ControlError::Io {
                    path: path.to_owned(),
                    source,
                }),
            }
        }
    }
}

/// The listening socket and its accept task.
pub struct ControlServer {
    path: PathBuf,
    task: JoinHandle<()>,
    calls: mpsc::Sender<ControlCall>,
}

impl ControlServer {
    /// Binds `path` and starts accepting. Mode 0600 (only root may talk to
    /// nexd), or 0660 with `group` as the socket's group, whose members may
    /// then make read-only requests (changes still need uid 0).
    /// Requests arrive on the returned receiver.
    pub fn bind(
        path: &Path,
        group: Option<&str>,
    ) -> Result<(Self, mpsc::Receiver<ControlCall>), ControlError> {
        let io_err = |source| ControlError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        check_socket_free(path)?;
        let gid = match group {
            None => None,
            Some(name) => Some(
                nix::unistd::Group::from_name(name)
                    .map_err(|e| io_err(io::Error::from(e)))?
                    .ok_or_else(|| ControlError::UnknownGroup(name.to_owned()))?
                    .gid,
            ),
        };
        let listener = UnixListener::bind(path).map_err(io_err)?;
        let mode = if let Some(gid) = gid {
            nix::unistd::chown(path, None, Some(gid)).map_err(|e| io_err(io::Error::from(e)))?;
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(listener, tx.clone()));
        Ok((
            ControlServer {
                path: path.to_owned(),
                task,
                calls: tx,
            },
            rx,
        ))
    }

    /// A sender into the same queue, for other front ends (metrics).
    pub fn calls(&self) -> mpsc::Sender<ControlCall> {
        self.calls.clone()
    }

    /// Stops accepting and removes the socket file.
    pub fn shutdown(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<ControlCall>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, tx.clone()));
            }
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(stream: UnixStream, tx: mpsc::Sender<ControlCall>) {
    let uid = stream.peer_cred().ok().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    let response = match tokio::time::timeout(READ_TIMEOUT, read_request(read)).await {
        Err(_) => Response::error(
            ErrorCode::BadRequest,
            format!(
                "no complete request within {} seconds",
                READ_TIMEOUT.as_secs()
            ),
        ),
        Ok(Err(resp)) => resp,
        Ok(Ok(line)) => match decode_request(&line) {
            Err(e) => Response::error(e.code, e.message),
            Ok(req) if req.method.is_mutating() && uid != Some(0) => Response::error(
                ErrorCode::PermissionDenied,
                "permission denied: only root may change nexd's state (try sudo)",
            ),
            Ok(req) => dispatch(req.method, &tx).await,
        },
    };
    let mut bytes = match serde_json::to_vec(&response) {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "cannot encode a control reply");
            return;
        }
    };
    bytes.push(b'\n');
    if let Err(e) = write.write_all(&bytes).await {
        debug!(error = %e, "control client went away before the reply");
    }
    let _ = write.shutdown().await;
}

async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Vec<u8>, Response> {
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await.map_err(|e| {
        Response::error(
            ErrorCode::BadRequest,
            format!("reading the request failed: {e}"),
        )
    })?;
    if line.last() != Some(&b'\n') {
        return Err(if line.len() > MAX_REQUEST_BYTES {
            Response::error(
                ErrorCode::BadRequest,
                format!("request is larger than {MAX_REQUEST_BYTES} bytes"),
            )
        } else {
            Response::error(
                ErrorCode::BadRequest,
                "request ended before its newline (truncated?)",
            )
        });
    }
    Ok(line)
}

async fn dispatch(method: Method, tx: &mpsc::Sender<ControlCall>) -> Response {
    let (reply, rx) = oneshot::channel();
    if tx.send(ControlCall { method, reply }).await.is_err() {
        return Response::error(ErrorCode::Unavailable, "nexd is shutting down");
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(_)) => Response::error(ErrorCode::Unavailable, "nexd is shutting down"),
        Err(_) => Response::error(
            ErrorCode::Internal,
            format!(
                "nexd did not answer within {} seconds",
                ANSWER_TIMEOUT.as_secs()
            ),
        ),
    }
}
