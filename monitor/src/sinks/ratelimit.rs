//! Bounded finding logs. A neighbour's reset flood once made the daemon write 485 MB of
//! near-identical lines in two minutes; what an on-call engineer needs from it is a few
//! samples and how many more there were.
//!
//! Each aggregation key (the metrics' labels: kind, cause, process, workload, peer port
//! class) has a token bucket: a burst of lines, then a steady rate. A bucket over all keys
//! caps the total, so a flood of distinct keys is bounded too. What a bucket refuses is
//! counted per key and written later as one summary line: before the key's next logged
//! finding, or once the key has been quiet for one refill period, or at stop.
use std::hash::Hash;

use super::metrics::Fold;
use crate::FastMap;

const NS_PER_SEC: u64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitConfig {
    /// Lines of one key logged back to back before its rate applies.
    pub burst: u32,
    /// Lines of one key per minute after its burst.
    pub per_min: u32,
    /// Lines per second over all keys (also its burst: one second's worth).
    pub total_per_sec: u32,
    /// Keys remembered; beyond, the least recently seen are forgotten (counted).
    pub max_keys: usize,
}

/// A token bucket holding nanoseconds of credit: integer, exact at any rate.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    credit_ns: u64,
    at_ns: u64,
}

impl Bucket {
    fn refill(&mut self, now_ns: u64, cap_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.at_ns);
        self.credit_ns = self.credit_ns.saturating_add(elapsed).min(cap_ns);
        self.at_ns = self.at_ns.max(now_ns);
    }
}

/// Findings of one key not logged: how many, and the first's and last's time
/// (CLOCK_MONOTONIC ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suppressed {
    pub count: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

impl Suppressed {
    fn merge(into: &mut Option<Suppressed>, more: Suppressed) {
        *into = Some(match *into {
            None => more,
            Some(held) => Suppressed {
                count: held.count + more.count,
                first_ns: held.first_ns.min(more.first_ns),
                last_ns: held.last_ns.max(more.last_ns),
            },
        });
    }
}

#[derive(Debug)]
struct Entry {
    bucket: Bucket,
    pending: Option<Suppressed>,
    seen_ns: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log the finding; first the summary of the key's findings suppressed before it.
    Log(Option<Suppressed>),
    /// Counted, not logged.
    Suppress,
}

#[derive(Debug)]
pub struct LogLimiter<K> {
    key_cost_ns: u64,
    key_cap_ns: u64,
    total_cost_ns: u64,
    total_cap_ns: u64,
    max_keys: usize,
    keys: FastMap<K, Entry>,
    total: Bucket,
    /// What forgotten keys had suppressed, by folded key (`other` for the process and
    /// workload): a bounded vocabulary of kinds and causes.
    folded: FastMap<K, Suppressed>,
    /// No summary is due before this (CLOCK_MONOTONIC ns): [`LogLimiter::due`] costs a
    /// comparison while nothing is.
    next_due_ns: Option<u64>,
    /// Keys forgotten while they still limited something, to keep the table bounded.
    pub evictions: u64,
}

impl<K: Hash + Eq + Clone + Fold> LogLimiter<K> {
    pub fn new(config: LimitConfig, now_ns: u64) -> LogLimiter<K> {
        let key_cost_ns = 60 * NS_PER_SEC / u64::from(config.per_min.max(1));
        let total_cost_ns = NS_PER_SEC / u64::from(config.total_per_sec.max(1));
        let total_cap_ns = total_cost_ns * u64::from(config.total_per_sec.max(1));
        LogLimiter {
            key_cost_ns,
            key_cap_ns: key_cost_ns * u64::from(config.burst.max(1)),
            total_cost_ns,
            total_cap_ns,
            max_keys: config.max_keys.max(1),
            keys: FastMap::default(),
            total: Bucket {
                credit_ns: total_cap_ns,
                at_ns: now_ns,
            },
            folded: FastMap::default(),
            next_due_ns: None,
            evictions: 0,
        }
    }

    /// Whether a finding of `key` found at `now_ns` is logged.
    pub fn admit(&mut self, key: &K, now_ns: u64) -> Verdict {
        self.total.refill(now_ns, self.total_cap_ns);
        if !self.keys.contains_key(key) {
            if self.keys.len() >= self.max_keys {
                self.make_room(now_ns);
            }
            let fresh = Bucket {
                credit_ns: self.key_cap_ns,
                at_ns: now_ns,
            };
            self.keys.insert(
                key.clone(),
                Entry {
                    bucket: fresh,
                    pending: None,
                    seen_ns: now_ns,
                },
            );
        }
        let Some(entry) = self.keys.get_mut(key) else {
            return Verdict::Suppress; // just inserted: unreachable, and harmless
        };
        entry.bucket.refill(now_ns, self.key_cap_ns);
        entry.seen_ns = entry.seen_ns.max(now_ns);
        if entry.bucket.credit_ns >= self.key_cost_ns && self.total.credit_ns >= self.total_cost_ns
        {
            entry.bucket.credit_ns -= self.key_cost_ns;
            self.total.credit_ns -= self.total_cost_ns;
            return Verdict::Log(entry.pending.take());
        }
        Suppressed::merge(
            &mut entry.pending,
            Suppressed {
                count: 1,
                first_ns: now_ns,
                last_ns: now_ns,
            },
        );
        self.schedule(now_ns + self.key_cost_ns);
        Verdict::Suppress
    }

    fn schedule(&mut self, at_ns: u64) {
        self.next_due_ns = Some(self.next_due_ns.map_or(at_ns, |next| next.min(at_ns)));
    }

    /// A full table: forgets the keys that hold nothing (a full bucket, nothing pending:
    /// the same as a key never seen), else the least recently seen eighth, whose pending
    /// counts fold into their kind's.
    fn make_room(&mut self, now_ns: u64) {
        let cap = self.key_cap_ns;
        self.keys.retain(|_, entry| {
            entry.bucket.refill(now_ns, cap);
            entry.pending.is_some() || entry.bucket.credit_ns < cap
        });
        if self.keys.len() < self.max_keys {
            return;
        }
        let mut by_age: Vec<(u64, K)> = self
            .keys
            .iter()
            .map(|(key, entry)| (entry.seen_ns, key.clone()))
            .collect();
        by_age.sort_unstable_by_key(|(seen, _)| *seen);
        for (_, key) in by_age.into_iter().take((self.max_keys / 8).max(1)) {
            if let Some(entry) = self.keys.remove(&key) {
                self.evictions += 1;
                if let Some(pending) = entry.pending {
                    let folded = key.folded();
                    let mut held = self.folded.get(&folded).copied();
                    Suppressed::merge(&mut held, pending);
                    self.folded.extend(held.map(|held| (folded, held)));
                    self.schedule(pending.last_ns + self.key_cost_ns);
                }
            }
        }
    }

    /// Summaries due at `now_ns`: keys quiet for one refill period since their last
    /// suppressed finding, within the total rate (the rest wait). Also forgets the keys
    /// that hold nothing any more.
    pub fn due(&mut self, now_ns: u64) -> Vec<(K, Suppressed)> {
        match self.next_due_ns {
            Some(next) if next <= now_ns => {}
            _ => return Vec::new(),
        }
        self.total.refill(now_ns, self.total_cap_ns);
        let (cost, cap) = (self.key_cost_ns, self.key_cap_ns);
        let mut summaries = Vec::new();
        let mut next: Option<u64> = None;
        let total = &mut self.total;
        let total_cost = self.total_cost_ns;
        let mut take = |key: &K, pending: &mut Option<Suppressed>| {
            let Some(held) = *pending else { return };
            let quiet_at = held.last_ns + cost;
            if quiet_at <= now_ns && total.credit_ns >= total_cost {
                total.credit_ns -= total_cost;
                summaries.push((key.clone(), held));
                *pending = None;
            } else {
                // Not quiet yet, or quiet and waiting for the total's next token.
                let at = if quiet_at > now_ns {
                    quiet_at
                } else {
                    now_ns + total_cost
                };
                next = Some(next.map_or(at, |n: u64| n.min(at)));
            }
        };
        self.keys.retain(|key, entry| {
            take(key, &mut entry.pending);
            entry.bucket.refill(now_ns, cap);
            entry.pending.is_some() || entry.bucket.credit_ns < cap
        });
        self.folded.retain(|key, held| {
            let mut pending = Some(*held);
            take(key, &mut pending);
            pending.is_some()
        });
        self.next_due_ns = next;
        summaries
    }

    /// Every summary still held, at stop: the counts must add up.
    pub fn drain(&mut self) -> Vec<(K, Suppressed)> {
        let mut summaries: Vec<(K, Suppressed)> = self
            .keys
            .iter_mut()
            .filter_map(|(key, entry)| Some((key.clone(), entry.pending.take()?)))
            .collect();
        summaries.extend(self.folded.drain());
        summaries.sort_by_key(|(_, held)| held.first_ns);
        self.next_due_ns = None;
        summaries
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NS_PER_SEC;

    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    struct Key(&'static str, u32);

    impl Fold for Key {
        fn folded(&self) -> Self {
            Key(self.0, 0)
        }
    }

    fn config() -> LimitConfig {
        LimitConfig {
            burst: 3,
            per_min: 6,
            total_per_sec: 100,
            max_keys: 16,
        }
    }

    fn logged(verdicts: &[Verdict]) -> usize {
        verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Log(_)))
            .count()
    }

    #[test]
    fn a_burst_then_one_line_per_period_with_the_count_before_it() {
        let mut limiter = LogLimiter::new(config(), 0);
        let key = Key("peer_reset", 1);
        let first: Vec<Verdict> = (0..1000).map(|i| limiter.admit(&key, i)).collect();
        assert_eq!(logged(&first), 3, "the burst");
        // 10 s later (6 a minute) one more line, carrying the 997 held back.
        assert_eq!(limiter.admit(&key, 10 * SEC - 1), Verdict::Suppress);
        assert_eq!(
            limiter.admit(&key, 10 * SEC),
            Verdict::Log(Some(Suppressed {
                count: 998,
                first_ns: 3,
                last_ns: 10 * SEC - 1,
            }))
        );
        assert_eq!(limiter.admit(&key, 10 * SEC + 1), Verdict::Suppress);
    }

    #[test]
    fn a_single_finding_is_logged_at_once_during_another_keys_flood() {
        let mut limiter = LogLimiter::new(config(), 0);
        for i in 0..10_000 {
            limiter.admit(&Key("local_reset", 1), i);
        }
        assert_eq!(
            limiter.admit(&Key("peer_reset_idle", 2), 10_000),
            Verdict::Log(None)
        );
    }

    #[test]
    fn the_total_rate_bounds_a_flood_of_distinct_keys() {
        let config = LimitConfig {
            max_keys: 100_000,
            ..config()
        };
        let mut limiter = LogLimiter::new(config, 0);
        // 10 000 distinct keys within one second: each has a burst, the total does not.
        let verdicts: Vec<Verdict> = (0..10_000)
            .map(|i| limiter.admit(&Key("peer_reset", i), u64::from(i) * 100_000))
            .collect();
        let logged = logged(&verdicts);
        // One second's burst, and one second's refill.
        assert!((100..=201).contains(&logged), "{logged}");
    }

    #[test]
    fn a_quiet_key_gets_its_summary_and_nothing_is_lost() {
        let mut limiter = LogLimiter::new(config(), 0);
        let key = Key("peer_reset", 1);
        for i in 0..10 {
            limiter.admit(&key, i * SEC / 10);
        }
        assert_eq!(limiter.due(SEC), vec![], "not quiet yet");
        let last = 9 * SEC / 10;
        assert_eq!(limiter.due(last + 10 * SEC - 1), vec![]);
        assert_eq!(
            limiter.due(last + 10 * SEC),
            vec![(
                key.clone(),
                Suppressed {
                    count: 7,
                    first_ns: 3 * SEC / 10,
                    last_ns: last,
                }
            )]
        );
        assert_eq!(limiter.due(100 * SEC), vec![], "said once");
        assert_eq!(limiter.drain(), vec![]);
    }

    #[test]
    fn a_full_table_forgets_the_oldest_and_keeps_their_counts() {
        let mut limiter = LogLimiter::new(config(), 0);
        let mut suppressed = 0;
        for port in 0..40u32 {
            for i in 0..5 {
                let at = u64::from(port) * 1000 + i;
                if limiter.admit(&Key("peer_reset", port + 1), at) == Verdict::Suppress {
                    suppressed += 1;
                }
            }
            assert!(limiter.keys() <= 16);
        }
        assert!(limiter.evictions > 0);
        let drained = limiter.drain();
        assert_eq!(
            drained.iter().map(|(_, s)| s.count).sum::<u64>(),
            suppressed,
            "{drained:?}"
        );
        assert!(
            drained.iter().any(|(key, _)| *key == Key("peer_reset", 0)),
            "folded"
        );
    }

    #[test]
    fn summaries_wait_for_the_total_rate() {
        let config = LimitConfig {
            burst: 1,
            total_per_sec: 1,
            max_keys: 1000,
            ..config()
        };
        let mut limiter = LogLimiter::new(config, 0);
        // Three keys, each one logged line (the total's only one) and one suppressed.
        for port in 1..=3 {
            limiter.admit(&Key("peer_reset", port), 0);
            limiter.admit(&Key("peer_reset", port), 0);
        }
        let at = 10 * SEC;
        let first = limiter.due(at);
        assert_eq!(first.len(), 1, "one a second: {first:?}");
        assert_eq!(limiter.due(at + SEC / 2), vec![]);
        assert_eq!(limiter.due(at + SEC).len(), 1);
        assert_eq!(limiter.drain().len(), 1);
    }
}
