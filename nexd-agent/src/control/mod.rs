//! The control socket between `nexctl` and `nexd`: wire types shared by
//! both (`protocol`), the daemon side (`server`) and the CLI side (`client`).

pub mod client;
pub mod server;

/// The wire types live in their own crate (`nexd-proto`), so the tests and
/// tools that read nexctl's JSON need not build the agent.
pub use nexd_proto as protocol;
