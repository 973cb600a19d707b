//! Step lines: what a long run is doing, with the time since xtask
//! started, so a CI log shows where its minutes go (the budget is tight).

use std::{sync::OnceLock, time::Instant};

/// When xtask started (the first call fixes it; `main` makes that call).
pub fn started() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Prints a step header: `==> [mm:ss] msg`.
pub fn step(msg: &str) {
    let t = started().elapsed().as_secs();
    println!("\x1b[1m==> [{:02}:{:02}] {msg}\x1b[0m", t / 60, t % 60);
}
