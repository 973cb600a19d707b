//! The two command lines: `nexd` (the agent) and `nexctl` (its CLI). The
//! binaries in src/bin only parse arguments and call into here.

pub mod config;
pub mod exit;
pub mod man;
pub mod mesh;
pub mod nexctl;
pub mod nexd;
pub mod output;
pub mod registry_args;
