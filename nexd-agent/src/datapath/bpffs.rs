//! bpffs: pins live there. It is usually mounted by the init system; when
//! it is not, nexd mounts it (in its own mount namespace, that is where it
//! stays). The kill switch's pinned guard must outlive nexd, so it needs a
//! bpffs whose mount outlives nexd too (`check_persistent`).

use std::path::Path;

use tracing::info;

use super::DatapathError;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` is a mounted bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Whether pins under `path` outlive this process: `path` is a bpffs
/// mounted already (by the init system, an operator, a container's
/// runtime: something other than nexd), or a mount nexd makes there lands
/// in the init mount namespace, which lives on. A mount made in a mount
/// namespace of nexd's own (`ip netns exec` makes one per command) dies
/// with nexd's last process, and every pin in it. `Err` says why and what
/// to do.
pub fn check_persistent(path: &Path) -> Result<(), String> {
    if within_bpffs(path) {
        return Ok(());
    }
    let ns = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    match (ns("/proc/self/ns/mnt"), ns("/proc/1/ns/mnt")) {
        (Ok(own), Ok(init)) if own == init => Ok(()),
        _ => Err(format!(
            "{} is not a mounted bpffs, and a bpffs nexd mounted there would live in a mount namespace of its own (one `ip netns exec` makes, say) and die with nexd, taking the pinned leak guard with it: mount bpffs there first where it outlives nexd (`mount -t bpf bpf {}`), or point --bpffs at one",
            path.display(),
            path.display()
        )),
    }
}

/// Whether `path`, or the nearest of its ancestors that exists, is on a
/// bpffs: a directory made there holds pins without a mount of nexd's.
fn within_bpffs(path: &Path) -> bool {
    path.ancestors().find(|p| p.exists()).is_some_and(is_bpffs)
}

/// Makes `path` a place for pins: itself, or a directory made inside a
/// bpffs that is mounted already, else a bpffs nexd mounts there.
pub fn ensure_mounted(path: &Path) -> Result<(), DatapathError> {
    let inside = within_bpffs(path);
    std::fs::create_dir_all(path).map_err(|e| DatapathError::Bpffs {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if inside {
        return Ok(());
    }
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
