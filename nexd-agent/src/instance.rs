//! One nexd instance on a machine: where its files are and the names and
//! numbers of what it installs. nexd reads it to run; nexctl reads the same
//! (from the same defaults, `NEXD_*` variables and configuration file,
//! through `cli::config`) to find nexd's socket, and, when nexd is dead, to
//! find and remove what it left. So a nexd started with a non-default
//! interface, state directory, bpffs or routing numbers is cleaned up by
//! a plain `nexctl nexd exit-node disable` from the same environment.

use std::path::PathBuf;

use crate::routing::PolicyNumbers;

/// Where the configuration file is when neither `--config` nor
/// `NEXD_CONFIG` says; a missing default file is fine.
pub const DEFAULT_CONFIG: &str = "/etc/nexd/nexd.toml";
pub const DEFAULT_MESH_FILE: &str = "/etc/nexd/mesh.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nexd";
pub const DEFAULT_SOCKET: &str = "/run/nexd.sock";
pub const DEFAULT_INTERFACE: &str = "wg0";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// The settings that identify an instance and what it installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// nexctl's way in.
    pub socket: PathBuf,
    /// Key, lock, and the records of what was changed (sysctls).
    pub state_dir: PathBuf,
    /// The WireGuard interface (and the pin directory's name).
    pub interface: String,
    /// Where the leak guard is pinned.
    pub bpffs: PathBuf,
    /// Table, mark and rule priorities of the client's policy routing.
    pub policy: PolicyNumbers,
}

/// Where running instances say where their state directory is, so that
/// `nexctl … disable` with nexd dead finds an instance started with
/// options nexctl was not given (another `--state-dir`, `--interface`,
/// `--bpffs`, routing numbers): the record in that state directory names
/// the rest. /run is emptied at boot, as what the entries point to goes.
pub const REGISTRY_DIR: &str = "/run/nexd/instances";

/// One running (or crashed) instance, as it registered itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registered {
    /// The network namespace it runs in (device and inode of
    /// /proc/self/ns/net): nexctl acts only on its own namespace's.
    pub netns: (u64, u64),
    pub state_dir: PathBuf,
    pub socket: PathBuf,
}

/// This process's network namespace.
pub fn current_netns() -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata("/proc/self/ns/net")?;
    Ok((m.dev(), m.ino()))
}

/// The file of the entry for `state_dir` in `dir`, in namespace `netns`.
fn entry_path(dir: &std::path::Path, netns: (u64, u64), state_dir: &std::path::Path) -> PathBuf {
    let name: String = state_dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    dir.join(format!("{}-{}-{name}.json", netns.0, netns.1))
}

/// Registers the instance in `dir` (normally [`REGISTRY_DIR`]); returns
/// the entry's path, for [`unregister`] at a clean stop.
pub fn register(
    dir: &std::path::Path,
    state_dir: &std::path::Path,
    socket: &std::path::Path,
) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    let netns = current_netns()?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let entry = Registered {
        netns,
        state_dir: state_dir.to_owned(),
        socket: socket.to_owned(),
    };
    let path = entry_path(dir, netns, state_dir);
    let text = serde_json::to_string(&entry).map_err(std::io::Error::other)?;
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Removes an entry (a clean stop, or the instance was cleaned up).
pub fn unregister(entry: &std::path::Path) {
    let _ = std::fs::remove_file(entry);
}

/// The entries of this network namespace in `dir`, each with its file.
/// Entries that do not parse are skipped: whatever wrote them, nexctl acts
/// only on what a record in the state directory they name confirms.
pub fn registered_here(dir: &std::path::Path) -> Vec<(PathBuf, Registered)> {
    let Ok(netns) = current_netns() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            let r: Registered = serde_json::from_str(&text).ok()?;
            (r.netns == netns && r.state_dir.is_absolute()).then(|| (e.path(), r))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_registers_in_its_namespace_and_unregisters() {
        let dir = std::env::temp_dir().join(format!("nexd-instances-{}", std::process::id()));
        let state = std::path::Path::new("/var/lib/nexd-other");
        let path =
            register(&dir, state, std::path::Path::new("/run/nexd-other.sock")).expect("register");
        let here = registered_here(&dir);
        assert_eq!(here.len(), 1, "{here:?}");
        assert_eq!(here[0].1.state_dir, state);
        assert_eq!(here[0].0, path);
        // Another namespace's entry is not this one's to act on.
        let other = Registered {
            netns: (0, 1),
            state_dir: "/srv/x".into(),
            socket: "/run/x.sock".into(),
        };
        std::fs::write(
            dir.join("0-1-x.json"),
            serde_json::to_string(&other).expect("json"),
        )
        .expect("write");
        std::fs::write(dir.join("junk.json"), "{not json").expect("write");
        assert_eq!(registered_here(&dir).len(), 1);
        unregister(&path);
        assert!(registered_here(&dir).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
