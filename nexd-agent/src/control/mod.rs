//! The control socket between `nexctl` and `nexd`: wire types shared by
//! both (`protocol`), the daemon side (`server`) and the CLI side (`client`).

pub mod client;
pub mod protocol;
pub mod server;
