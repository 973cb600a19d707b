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
