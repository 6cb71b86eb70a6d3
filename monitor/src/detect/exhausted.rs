//! `pool_exhausted`: every established connection of a pool (process × endpoint) has a
//! request stalled past the stall threshold. The application's next query waits for a
//! connection that will not come back ("QueuePool limit reached"), or opens yet another.
//! One finding when the episode starts, one (`pool_recovered`) when it ends.
use std::collections::HashMap;

use super::{Finding, Kind};
use crate::sockets::pools::{Direction, Pool};

type PoolKey = (u32, u64, Direction, std::net::SocketAddr);

#[derive(Default)]
pub struct ExhaustionDetector {
    /// Pools exhausted at the last refresh → the finding that opened the episode. Bounded
    /// by the pools of one snapshot: an episode ends when its pool is not exhausted.
    episodes: HashMap<PoolKey, Finding>,
}

impl ExhaustionDetector {
    /// Compares the pools with the last refresh's. `exhausted` makes the finding for a pool
    /// that just became exhausted (`None` if its stalled socket is gone; retried next time).
    pub fn refresh(
        &mut self,
        pools: &[Pool],
        mono_now_ns: u64,
        mut exhausted: impl FnMut(&Pool) -> Option<Finding>,
        findings: &mut Vec<Finding>,
    ) {
        let mut now = HashMap::new();
        for pool in pools.iter().filter(|pool| pool.exhausted) {
            let key = (pool.pid, pool.netns, pool.direction, pool.endpoint);
            let opened = if let Some(opened) = self.episodes.remove(&key) {
                opened
            } else {
                let Some(mut finding) = exhausted(pool) else {
                    continue;
                };
                finding.kind = Kind::PoolExhausted;
                finding.connections = Some(pool.established);
                finding.stalled_ms = pool.oldest_stall_ms;
                findings.push(finding.clone());
                finding
            };
            now.insert(key, opened);
        }
        // What is left was exhausted and is no longer: recovered, or gone.
        for (_, mut finding) in self.episodes.drain() {
            finding.kind = Kind::PoolRecovered;
            finding.age_ms = Some(mono_now_ns.saturating_sub(finding.mono_ns) / 1_000_000);
            finding.mono_ns = mono_now_ns;
            findings.push(finding);
        }
        self.episodes = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{from_raw, tests::raw_reset};

    fn pool(stalled: u32, established: u32) -> Pool {
        Pool {
            pid: 7,
            comm: "app".into(),
            netns: 1,
            workload: crate::sockets::workload::Workload::default(),
            direction: Direction::Outbound,
            endpoint: "10.0.0.9:5432".parse().unwrap(),
            total: established,
            established,
            idle: 0,
            active: established - stalled,
            close_wait: 0,
            other: 0,
            stalled,
            exhausted: stalled == established,
            oldest_stall_ms: Some(12_000),
            oldest_stall: Some(1),
            zombie: 0,
            stranded: 0,
            max_idle_ms: None,
            idle_limit_ms: None,
            connects_per_min: 0,
            resets_per_min: 0,
            deaths_per_min: 0,
        }
    }

    fn refresh(detector: &mut ExhaustionDetector, pools: &[Pool], now_s: u64) -> Vec<Finding> {
        let mut findings = Vec::new();
        detector.refresh(
            pools,
            now_s * 1_000_000_000,
            |_| {
                let mut event = from_raw(&raw_reset(0)).unwrap();
                event.mono_ns = now_s * 1_000_000_000;
                Some(Finding::new(Kind::RequestStalled, &event, None))
            },
            &mut findings,
        );
        findings
    }

    #[test]
    fn one_finding_per_episode_and_its_end() {
        let mut detector = ExhaustionDetector::default();
        assert!(refresh(&mut detector, &[pool(3, 4)], 1).is_empty());
        let opened = refresh(&mut detector, &[pool(4, 4)], 2);
        assert_eq!(opened.len(), 1);
        assert_eq!(opened[0].kind, Kind::PoolExhausted);
        assert_eq!(
            (opened[0].connections, opened[0].stalled_ms),
            (Some(4), Some(12_000))
        );
        assert!(
            refresh(&mut detector, &[pool(4, 4)], 3).is_empty(),
            "same episode"
        );
        let closed = refresh(&mut detector, &[pool(1, 4)], 12);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].kind, Kind::PoolRecovered);
        assert_eq!(closed[0].age_ms, Some(10_000), "the episode lasted 10 s");
        assert_eq!(
            refresh(&mut detector, &[pool(4, 4)], 13).len(),
            1,
            "a new one"
        );
        // The pool went away (its process exited): the episode ends too.
        let gone = refresh(&mut detector, &[], 14);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].kind, Kind::PoolRecovered);
    }
}
