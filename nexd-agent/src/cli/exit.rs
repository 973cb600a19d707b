//! nexctl's exit statuses, documented in the README: scripts may rely on
//! them. Shared by every nexctl command (`nexctl nexd ...` and `nexctl
//! mesh ...`), which each map their failures onto them.

/// nexd reported a failure, or something else went wrong.
pub const FAILURE: u8 = 1;
/// The command line was invalid (clap's own status).
pub const USAGE: u8 = 2;
/// nexd is not running or did not answer.
pub const UNREACHABLE: u8 = 3;
/// The caller may not talk to nexd or may not make this change.
pub const PERMISSION: u8 = 4;
/// nexctl and nexd speak different protocol versions.
pub const VERSION_MISMATCH: u8 = 5;
/// The request was valid but cannot be done now; nothing changed.
pub const UNAVAILABLE: u8 = 6;
