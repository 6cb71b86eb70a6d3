//! Bounds on connwatch's own work and memory: how often an expensive lookup runs
//! ([`Throttle`]) and how large a table grows ([`make_room`]).
use std::{hash::BuildHasher, time::Duration};

/// A duration in whole milliseconds, saturating: connwatch's durations (thresholds, uptimes)
/// are far below the 584 million years that overflow.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A duration in nanoseconds, saturating (at 584 years).
pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Lets an expensive lookup (a /proc walk, a cgroupfs walk, a kubelet request) run at most
/// once per interval, however many misses ask for it.
#[derive(Debug)]
pub struct Throttle {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
}

impl Throttle {
    pub const fn new(every: std::time::Duration) -> Throttle {
        Throttle { every, last: None }
    }

    /// True, and the interval restarts, when the last run is at least `every` ago.
    pub fn ready(&mut self) -> bool {
        if self.last.is_some_and(|at| at.elapsed() < self.every) {
            return false;
        }
        self.last = Some(std::time::Instant::now());
        true
    }
}

/// Makes room in a table bounded to `max` entries before an insert: first drops entries
/// `expendable` says can go, then, if still full, an arbitrary sixteenth of the table, so the
/// full pass is paid once per `max / 16` inserts. Returns how many were evicted.
pub fn make_room<K, V, S: BuildHasher>(
    table: &mut std::collections::HashMap<K, V, S>,
    max: usize,
    expendable: impl Fn(&V) -> bool,
) -> u64 {
    if table.len() < max.max(1) {
        return 0;
    }
    let before = table.len();
    table.retain(|_, v| !expendable(v));
    if table.len() >= max.max(1) {
        let batch = (max / 16).max(1);
        let mut dropped = 0;
        table.retain(|_, _| {
            dropped += 1;
            dropped > batch
        });
    }
    u64::try_from(before - table.len()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FastMap;

    #[test]
    fn throttle_runs_once_per_interval() {
        let mut throttle = Throttle::new(std::time::Duration::from_hours(1));
        assert!(throttle.ready());
        assert!(!throttle.ready());
        let mut always = Throttle::new(std::time::Duration::ZERO);
        assert!(always.ready() && always.ready());
    }

    #[test]
    fn bounded_with_closed_sockets_evicted_first() {
        let mut map: FastMap<u32, bool> = (0..32).map(|i| (i, i % 2 == 0)).collect();
        // Full: the 16 "closed" (true) entries go, nothing else.
        assert_eq!(make_room(&mut map, 32, |closed| *closed), 16);
        assert!(map.values().all(|closed| !closed));
        // Full of open entries: a sixteenth of the bound goes.
        let mut open: FastMap<u32, bool> = (0..64).map(|i| (i, false)).collect();
        assert_eq!(make_room(&mut open, 64, |closed| *closed), 4);
        assert_eq!(open.len(), 60);
        // Not full: nothing goes.
        assert_eq!(make_room(&mut open, 64, |closed| *closed), 0);
    }
}
