//! Replacing a file in nexd's state directory so that a crash at any
//! moment leaves the old content or the new, never a torn one: the ledger,
//! the registry cache, the announcement epoch and the last snapshot all
//! decide what a restarted nexd believes, so a half-written one would be
//! worse than none.

use std::{
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

/// The temporary file `replace` writes next to `path` first.
pub fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes `bytes` to `path` through a private (0600) temporary file,
/// synced, renamed over `path`, and the directory synced so the rename
/// itself survives a power loss.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temporary(path);
    // A temporary left by a crash is stale by definition.
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replace_leaves_the_new_content_private_and_no_temporary() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("nexd-state-file-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("x.json");
        fs::write(temporary(&p), b"stale").expect("stale temporary");
        replace(&p, b"one").expect("first");
        replace(&p, b"two").expect("second");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(
            fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert!(!temporary(&p).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
