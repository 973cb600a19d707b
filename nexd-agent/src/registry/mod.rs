//! Membership through etcd, signed by the mesh admin (issue 14).
//!
//! Instead of every device carrying the same mesh file, devices ask to join
//! through an etcd prefix, an admin approves them with `nexctl mesh`, and
//! every device follows the prefix. etcd is not trusted: the settings and
//! every device record are signed with the admin's ed25519 key, and a
//! device believes only what that key signed for that exact etcd key
//! (`signed`). What comes out is the same `Mesh` a mesh file gives
//! (`membership`), so the daemon applies it through its usual
//! diff-and-apply path.
//!
//! | file | owns |
//! |---|---|
//! | `location` | the `--registry` URL and the key layout under the prefix |
//! | `admin_key` | the admin key pair and its files |
//! | `records` | the record formats |
//! | `signed` | the canonical signed encoding: seal and open |
//! | `verify` | the verifying reader: every value checked, rejects kept with reasons |
//! | `membership` | verified records → `Mesh` + roles (pure) |
//! | `snapshot` | the signed, expiring snapshot: built, and when a device may believe etcd (pure) |
//! | `allocate` | which addresses a new device gets (pure) |
//! | `requests` | join requests: key fingerprints, names claimed twice (pure) |
//! | `cache` | the last verified content in the state directory |
//! | `connection` | etcd connection options (TLS, user) and error classes |
//! | `admin` | `nexctl mesh` operations as etcd transactions |
//! | `device` | the device side: `Registry`, a task with events for the daemon |

pub mod admin;
pub mod admin_key;
pub mod allocate;
pub mod cache;
pub mod connection;
pub mod device;
#[cfg(test)]
mod fixtures;
pub mod location;
pub mod membership;
pub mod records;
pub mod requests;
pub mod signed;
pub mod snapshot;
pub mod verify;

pub use admin_key::{AdminKey, AdminPublicKey};
pub use connection::{Credentials, EtcdConfig, RegistryError, TlsFiles};
pub use device::{DeviceConfig, MembershipEvent, Registry, RegistryStatus, Source};
pub use location::RegistryUrl;
pub use membership::Membership;
