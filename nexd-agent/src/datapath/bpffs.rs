//! bpffs: pins live there. It is usually mounted by the init system; when
//! it is not, nexd mounts it (in its own mount namespace, that is where it
//! stays).

use std::path::Path;

use tracing::info;

use super::DatapathError;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` is a mounted bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Mounts bpffs at `path` unless it is one already.
pub fn ensure_mounted(path: &Path) -> Result<(), DatapathError> {
    if is_bpffs(path) {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(|e| DatapathError::Bpffs {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| DatapathError::Bpffs {
        path: path.to_owned(),
        reason: format!("mounting bpffs failed: {e}"),
    })?;
    info!(path = %path.display(), "mounted bpffs");
    Ok(())
}
