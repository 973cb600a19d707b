//! Sequence numbers of outgoing announcements, and the start counter
//! (epoch) they are built on.
//!
//! A receiver accepts an announcement only with a sequence number higher
//! than the last one it accepted from that sender (replay protection), so
//! the numbers must increase across the sender's restarts too. They used
//! to come from the wall clock, and a clock stepped back across a restart
//! (no RTC, NTP correcting a bad clock) silenced the sender until every
//! receiver restarted. Now they are
//!
//! ```text
//!   bit 63        1 (this scheme; the wall-clock scheme never sets it)
//!   bits 62..40   epoch: a counter in the state directory, bumped at every start
//!   bits 39..0    counter within this run, from 1
//! ```
//!
//! Compatibility both ways without a flag day: the wall-clock numbers of
//! the previous version (microseconds since 1970, about 2^51) are all
//! below 2^63, so a receiver of either version accepts an upgraded sender
//! right away, and a receiver of this version still accepts an old sender
//! (it only compares). The one rule: a *downgraded* sender is ignored by
//! peers that saw it upgraded, until they restart.
//!
//! Limits: 2^23 - 1 starts (the epoch file refuses to go further) and 2^40
//! announcements per run (35 years at 1,000 peers a second).

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

/// File in the state directory holding the last epoch, in decimal.
pub const EPOCH_FILE: &str = "announce.epoch";

const SCHEME_BIT: u64 = 1 << 63;
const COUNTER_BITS: u32 = 40;
/// The largest epoch: 23 bits.
pub const MAX_EPOCH: u32 = (1 << 23) - 1;
const MAX_COUNTER: u64 = (1 << COUNTER_BITS) - 1;

/// Why the epoch could not be advanced.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{path} holds {content:?}, not a start counter; remove it to count from 1 again (peers that are running then ignore this device's announcements until they restart)"
    )]
    Corrupt { path: PathBuf, content: String },
    #[error(
        "{path}: the start counter reached its limit ({MAX_EPOCH}); remove the file and restart every peer"
    )]
    Exhausted { path: PathBuf },
}

/// Reads the epoch in `state_dir`, adds one, and writes it back atomically
/// (a temporary file, fsync, rename, fsync of the directory), before
/// anything is sent with it: a crash can waste an epoch, never reuse one.
/// A missing file is epoch 0 (the first start).
pub fn next_epoch(state_dir: &Path) -> Result<u32, EpochError> {
    let path = state_dir.join(EPOCH_FILE);
    let io_err = |action, source| EpochError::Io {
        action,
        path: path.clone(),
        source,
    };
    let last = match fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|e| *e <= MAX_EPOCH)
            .ok_or_else(|| EpochError::Corrupt {
                path: path.clone(),
                content: text.chars().take(40).collect(),
            })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err("read", e)),
    };
    if last >= MAX_EPOCH {
        return Err(EpochError::Exhausted { path });
    }
    let next = last + 1;
    crate::state_file::replace(&path, format!("{next}\n").as_bytes())
        .map_err(|e| io_err("write", e))?;
    Ok(next)
}

/// Where outgoing sequence numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqSource {
    /// The previous scheme: wall-clock microseconds, kept only for an
    /// agent started without an epoch (`PeerBook::new`).
    WallClock { last: u64 },
    /// Epoch and counter (see the module doc).
    Epoch { epoch: u32, counter: u64 },
}

impl SeqSource {
    pub fn epoch(epoch: u32) -> Self {
        SeqSource::Epoch {
            epoch: epoch.min(MAX_EPOCH),
            counter: 0,
        }
    }

    /// The next sequence number, strictly greater than the previous one.
    /// (Past 2^40 in one run it stays at the last value: receivers then
    /// drop it as a replay, which is the safe failure.)
    pub fn next_seq(&mut self) -> u64 {
        match self {
            SeqSource::WallClock { last } => {
                let wall = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
                *last = (*last + 1).max(wall);
                *last
            }
            SeqSource::Epoch { epoch, counter } => {
                *counter = (*counter + 1).min(MAX_COUNTER);
                SCHEME_BIT | (u64::from(*epoch) << COUNTER_BITS) | *counter
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nexd-seq-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn the_epoch_goes_up_by_one_per_start_and_survives_on_disk() {
        let d = tmpdir("up");
        assert_eq!(next_epoch(&d).expect("first"), 1);
        assert_eq!(next_epoch(&d).expect("second"), 2);
        assert_eq!(fs::read_to_string(d.join(EPOCH_FILE)).expect("read"), "2\n");
        assert!(!crate::state_file::temporary(&d.join(EPOCH_FILE)).exists());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_corrupt_or_exhausted_file_is_an_error_not_a_restart_from_zero() {
        let d = tmpdir("bad");
        fs::write(d.join(EPOCH_FILE), "twelve\n").expect("write");
        assert!(matches!(next_epoch(&d), Err(EpochError::Corrupt { .. })));
        fs::write(d.join(EPOCH_FILE), format!("{MAX_EPOCH}\n")).expect("write");
        assert!(matches!(next_epoch(&d), Err(EpochError::Exhausted { .. })));
        let _ = fs::remove_dir_all(&d);
        let missing = d.join("no-such-dir");
        assert!(matches!(next_epoch(&missing), Err(EpochError::Io { .. })));
    }

    #[test]
    fn a_later_start_always_sends_higher_numbers() {
        // Whatever the clock does: a run with epoch n+1 starts above
        // everything a run with epoch n sent, however long it ran.
        let mut run1 = SeqSource::Epoch {
            epoch: 7,
            counter: MAX_COUNTER - 2,
        };
        let last_of_run1 = (0..5).map(|_| run1.next_seq()).max().expect("some");
        let first_of_run2 = SeqSource::epoch(8).next_seq();
        assert!(first_of_run2 > last_of_run1);
        // Strictly increasing within a run.
        let mut s = SeqSource::epoch(1);
        let (a, b) = (s.next_seq(), s.next_seq());
        assert!(b > a);
    }

    #[test]
    fn upgraded_senders_are_above_every_wall_clock_number() {
        // The previous version's numbers: wall-clock microseconds, even a
        // clock set to the year 2500 (about 1.6e16 < 2^63).
        let mut old = SeqSource::WallClock {
            last: 16_725_225_600_000_000,
        };
        let old_seq = old.next_seq();
        assert!(SeqSource::epoch(1).next_seq() > old_seq);
        assert!(old_seq < SCHEME_BIT);
    }
}
