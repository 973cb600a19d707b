//! The host's shared handles: what several components change, each
//! through its owner's methods. Passed as one `&mut Host` instead of the
//! same three arguments threaded through every call.
//!
//! - `nl`: the netlink handle (routes, rules, links, addresses);
//! - `sysctls`: every sysctl nexd changed, with its original value, so
//!   the exit role, the gateway and the client restore what they set;
//! - `programs`: the eBPF programs and maps, fed by the exit role (its
//!   policy and clients), flipped by the exit client's plan (steering,
//!   guard) and mirrored from the mesh by the daemon.

use super::programs::Programs;
use crate::{netlink::Netlink, routing::sysctl::Sysctls};

pub struct Host {
    pub nl: Netlink,
    pub sysctls: Sysctls,
    pub programs: Programs,
}
