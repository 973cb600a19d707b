//! How the daemon reports a problem it carries on after: each line of a
//! multi-line error as its own log line, and teardown's failures as
//! warnings (teardown never stops half way).

use tracing::{error, warn};

/// Logs every line of a multi-line error at error level, so each mesh-file
/// problem is its own log line.
pub fn log_error_lines(context: &str, err: &dyn std::fmt::Display) {
    let text = err.to_string();
    let mut lines = text.lines();
    if let Some(first) = lines.next() {
        error!("{context}: {first}");
    }
    for line in lines {
        error!("{context}: {}", line.trim());
    }
}

/// Logs a failure to undo something during teardown; teardown carries on.
pub fn teardown_warning(what: &str, err: &dyn std::fmt::Display) {
    warn!(error = %err, "teardown: {what} failed");
}
