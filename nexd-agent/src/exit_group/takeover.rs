//! What a change of holder asks of conntrackd, as data: the commands run
//! one transition at a time, in this order.
//!
//! On becoming the holder: commit the external cache (the other members'
//! flows) into the kernel (`-c`), flush the internal cache (`-f internal`,
//! the stale view of this member's own table), resync it from the kernel
//! (`-R`), and send a bulk update so the others learn this member's table
//! (`-B`). On losing the address: purge what the kernel no longer needs
//! (`-t`, after `PurgeTimeout`) and ask the holder for a full resync
//! (`-n`). The order is keepalived's documented primary-backup script's
//! (conntrack-tools' doc/sync/primary-backup.sh); the external cache is
//! not flushed after a commit, as conntrackd 1.4.7 refuses every later
//! flush once a commit ran.

/// Whether this member holds the group's egress address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    Holder,
    Standby,
}

impl Holding {
    /// From whether the egress address is on the uplink.
    pub fn from_address(present: bool) -> Holding {
        if present {
            Holding::Holder
        } else {
            Holding::Standby
        }
    }
}

/// The conntrackd control commands (their arguments after `-C conf`) for a
/// move from `from` (`None`: just started) to `to`; nothing when nothing
/// changed.
pub fn commands(from: Option<Holding>, to: Holding) -> &'static [&'static [&'static str]] {
    if from == Some(to) {
        return &[];
    }
    match to {
        Holding::Holder => &[&["-c"], &["-f", "internal"], &["-R"], &["-B"]],
        // At start there is nothing of ours to purge yet; a resync request
        // fills the external cache from the holder.
        Holding::Standby if from.is_none() => &[&["-n"]],
        Holding::Standby => &[&["-t"], &["-n"]],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_takeover_commits_before_anything_else_and_nothing_repeats() {
        let take = commands(Some(Holding::Standby), Holding::Holder);
        assert_eq!(take[0], ["-c"], "the cache goes into the kernel first");
        assert_eq!(take, [&["-c"][..], &["-f", "internal"], &["-R"], &["-B"]]);
        assert!(
            !take
                .iter()
                .any(|c| c == &["-f", "external"] || c == &["-f"]),
            "conntrackd 1.4.7 refuses the flush after a commit"
        );
        assert_eq!(commands(None, Holding::Holder), take);
        assert_eq!(
            commands(Some(Holding::Holder), Holding::Standby),
            [&["-t"][..], &["-n"]]
        );
        assert_eq!(commands(None, Holding::Standby), [&["-n"][..]]);
        for h in [Holding::Holder, Holding::Standby] {
            assert!(commands(Some(h), h).is_empty());
        }
        assert_eq!(Holding::from_address(true), Holding::Holder);
    }
}
