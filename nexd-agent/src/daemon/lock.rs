//! One nexd per state directory. The lock is a `flock` on a file in the
//! state directory, so the kernel releases it when the process dies, even by
//! SIGKILL: a crash never leaves a lock that blocks the next start.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, Write as _},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

/// File name of the lock inside the state directory.
pub const LOCK_FILE: &str = "nexd.lock";

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another nexd{} already runs with state directory {dir} (lock {path} is held)", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held {
        dir: PathBuf,
        path: PathBuf,
        pid: Option<u32>,
    },
    #[error("cannot open lock file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The held lock; released when dropped or when the process exits.
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    /// Takes the lock in `state_dir` (which must exist), writing our pid.
    pub fn acquire(state_dir: &Path) -> Result<Self, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err)?;
        // SAFETY: flock on a file descriptor we own.
        let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if ret != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    dir: state_dir.to_owned(),
                    path,
                    pid: text.trim().parse().ok(),
                });
            }
            return Err(io_err(err));
        }
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        Ok(InstanceLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_pid() {
        let dir = std::env::temp_dir().join(format!("nexd-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let first = InstanceLock::acquire(&dir).expect("first");
        match InstanceLock::acquire(&dir) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Held, got {:?}", other.err()),
        }
        drop(first);
        let _again = InstanceLock::acquire(&dir).expect("released");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
