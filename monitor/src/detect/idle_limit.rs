//! The idle limit that kills a path's connections: a NAT's or load balancer's idle timeout,
//! a proxy's, a server's own (`idle_session_timeout`, `wait_timeout`). What a pool must stay
//! below ("keep the idle timeout or max lifetime under it"), and what nobody can read off a
//! histogram of idle times.
//!
//! Two sources, per path (an outbound pool's remote endpoint, an inbound one's listener):
//! - **Kills**: the idle time of each `peer_reset_idle` / `peer_close_idle` on the path,
//!   handled or not. A limit kills at (or a timer's period after) one idle time, so kills
//!   by a limit cluster; a path whose resets are scattered has no limit to learn.
//! - **Survivals**: an established connection listed idle for some time that then carried
//!   data again lived through that idle. A limit must lie above every survival; kills
//!   clustered below a survival were not an idle limit.
//!
//! The estimate is the lowest kill of the cluster: the limit is at most that, and a timer
//! that scans periodically only kills later. No estimate without a cluster.
use std::{collections::VecDeque, net::SocketAddr};

use crate::{
    FastMap,
    events::{Event, Hook, TcpState},
    sockets::{
        diag::DiagSocket,
        pools::{Direction, Listeners, Pool},
    },
};

/// Kills needed before a cluster means a limit: two can agree by chance.
pub const MIN_KILLS: usize = 3;
/// Kills kept per path (the most recent): a limit that changed shows within this many.
const KEPT_KILLS: usize = 16;
/// How far above a cluster's lowest kill the others may lie: a timer that scans every few
/// seconds kills a little after the limit (a NAT's 300 s table sweep kills by ~310 s).
const CLUSTER_SPREAD: f64 = 0.10;
/// Plus this, for short limits measured in kernel ticks.
const CLUSTER_SLACK_MS: u64 = 50;
/// Share of the kept kills the cluster must hold: most kills on the path are the limit's.
const CLUSTER_SHARE: f64 = 0.75;
/// Paths tracked at most; the least recently touched are forgotten first.
pub const MAX_PATHS: usize = 4096;
/// A path with no kill and no survival for this long is forgotten: the limit may have
/// changed, and a path nobody uses needs no advice.
const FORGET_AFTER_NS: u64 = 3600 * 1_000_000_000;

/// Where a limit applies: the endpoint a pool is named by, in its network namespace (0
/// when not known).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Path {
    pub netns: u64,
    pub direction: Direction,
    pub endpoint: SocketAddr,
}

impl Path {
    pub fn of_pool(pool: &Pool) -> Path {
        Path {
            netns: pool.netns,
            direction: pool.direction,
            endpoint: pool.endpoint,
        }
    }
}

/// A learned idle limit, and what it rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleLimit {
    /// Connections idle this long are killed (the cluster's lowest kill).
    pub limit_ms: u64,
    /// Kills in the cluster, and on the path since it was first seen.
    pub clustered: u32,
    pub kills: u64,
    /// The cluster's highest kill: `limit_ms..=high_ms` is the observed range.
    pub high_ms: u64,
    /// The longest idle a connection on the path lived through, as listed (at least).
    pub survived_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct PathRecord {
    kills: VecDeque<u64>,
    total_kills: u64,
    survived_ms: Option<u64>,
    touched_ns: u64,
}

/// An established connection's idle as last listed.
struct Stretch {
    path: Path,
    idle_ms: u64,
}

pub struct IdleLimits {
    idle_threshold_ms: u64,
    paths: FastMap<Path, PathRecord>,
    /// By socket cookie: the idle each established connection had at the last refresh.
    stretches: FastMap<u64, Stretch>,
    max_sockets: usize,
    /// Paths forgotten to stay within [`MAX_PATHS`], and sockets not followed beyond
    /// `max_sockets`.
    pub evictions: u64,
}

impl IdleLimits {
    pub fn new(idle_threshold_ms: u64, max_sockets: usize) -> IdleLimits {
        IdleLimits {
            idle_threshold_ms,
            paths: FastMap::default(),
            stretches: FastMap::default(),
            max_sockets,
            evictions: 0,
        }
    }

    /// The path of a connection, by which side listens.
    pub fn path_of(
        listeners: &Listeners,
        netns: Option<u64>,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Path {
        let (direction, endpoint) = listeners.classify(netns, local, remote);
        Path {
            netns: netns.unwrap_or(0),
            direction,
            endpoint,
        }
    }

    /// A peer's RST or FIN of an idle connection (the events behind `peer_*_idle`, handled
    /// ones included: the limit killed those too). Returns the kill's path.
    pub fn observe(&mut self, event: &Event, listeners: &Listeners) -> Option<Path> {
        let killed = match event.hook {
            Hook::ReceiveReset => true,
            Hook::StateChange => {
                event.old_state == TcpState::ESTABLISHED && event.new_state == TcpState::CLOSE_WAIT
            }
            _ => false,
        };
        let idle_ms = event
            .idle_ms()
            .filter(|&idle| killed && idle >= self.idle_threshold_ms)?;
        let path = IdleLimits::path_of(listeners, event.netns, event.local, event.remote);
        let record = self.record(path, event.mono_ns);
        if record.kills.len() == KEPT_KILLS {
            record.kills.pop_front();
        }
        record.kills.push_back(idle_ms);
        record.total_kills += 1;
        Some(path)
    }

    /// Survivals, from a fresh socket list: an established connection listed idle that has
    /// carried data since, still established, lived through its listed idle.
    pub fn refresh(&mut self, sockets: &[DiagSocket], listeners: &Listeners, mono_now_ns: u64) {
        let mut previous = std::mem::take(&mut self.stretches);
        for socket in sockets {
            if socket.state != TcpState::ESTABLISHED {
                continue;
            }
            let Some(idle_ms) = socket.idle_ms() else {
                continue;
            };
            let (path, survived) = match previous.remove(&socket.cookie) {
                Some(stretch) => (
                    stretch.path,
                    (idle_ms < stretch.idle_ms).then_some(stretch.idle_ms),
                ),
                None => (
                    IdleLimits::path_of(listeners, Some(socket.netns), socket.local, socket.remote),
                    None,
                ),
            };
            if let Some(survived) = survived.filter(|&ms| ms >= self.idle_threshold_ms) {
                let record = self.record(path, mono_now_ns);
                record.survived_ms = Some(record.survived_ms.unwrap_or(0).max(survived));
            }
            if self.stretches.len() >= self.max_sockets {
                self.evictions += 1;
                continue;
            }
            self.stretches
                .insert(socket.cookie, Stretch { path, idle_ms });
        }
        // Aged out, not evicted: the limit may have changed since.
        self.paths
            .retain(|_, record| mono_now_ns.saturating_sub(record.touched_ns) < FORGET_AFTER_NS);
    }

    fn record(&mut self, path: Path, mono_now_ns: u64) -> &mut PathRecord {
        if !self.paths.contains_key(&path)
            && self.paths.len() >= MAX_PATHS
            && let Some(stalest) = self
                .paths
                .iter()
                .min_by_key(|(_, record)| record.touched_ns)
                .map(|(path, _)| *path)
        {
            self.paths.remove(&stalest);
            self.evictions += 1;
        }
        let record = self.paths.entry(path).or_default();
        record.touched_ns = record.touched_ns.max(mono_now_ns);
        record
    }

    /// The path's limit, when its kills cluster and no survival contradicts them.
    pub fn estimate(&self, path: &Path) -> Option<IdleLimit> {
        let record = self.paths.get(path)?;
        let mut kills: Vec<u64> = record.kills.iter().copied().collect();
        kills.sort_unstable();
        let (start, clustered) = densest_cluster(&kills)?;
        #[expect(
            clippy::cast_precision_loss,
            reason = "counts of one path's recorded kills: far below f64's exact integers"
        )]
        let too_spread = (clustered as f64) < CLUSTER_SHARE * kills.len() as f64;
        if clustered < MIN_KILLS || too_spread {
            return None;
        }
        let limit_ms = kills[start];
        if record
            .survived_ms
            .is_some_and(|survived| survived >= limit_ms)
        {
            return None;
        }
        Some(IdleLimit {
            limit_ms,
            clustered: u32::try_from(clustered).unwrap_or(u32::MAX),
            kills: record.total_kills,
            high_ms: kills[start + clustered - 1],
            survived_ms: record.survived_ms,
        })
    }

    /// Every path with an estimate, most kills first.
    pub fn estimates(&self) -> Vec<(Path, IdleLimit)> {
        let mut all: Vec<(Path, IdleLimit)> = self
            .paths
            .keys()
            .filter_map(|path| Some((*path, self.estimate(path)?)))
            .collect();
        all.sort_by(|a, b| b.1.kills.cmp(&a.1.kills).then(a.0.cmp(&b.0)));
        all
    }
}

/// The start and size of the largest run of sorted `kills` within [`CLUSTER_SPREAD`] (plus
/// [`CLUSTER_SLACK_MS`]) of its lowest; the lowest such run on a tie.
fn densest_cluster(kills: &[u64]) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize)> = None;
    for (start, &low) in kills.iter().enumerate() {
        #[expect(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "idle times in ms, exact in f64; a tenth of one is positive and fits u64"
        )]
        let spread = (low as f64 * CLUSTER_SPREAD) as u64;
        let high = low + spread + CLUSTER_SLACK_MS;
        let size = kills[start..]
            .iter()
            .take_while(|&&kill| kill <= high)
            .count();
        if best.is_none_or(|(_, most)| size > most) {
            best = Some((start, size));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> Path {
        Path {
            netns: 1,
            direction: Direction::Outbound,
            endpoint: "10.0.0.5:5432".parse().unwrap(),
        }
    }

    fn limits_with(kills: &[u64], survived: Option<u64>) -> IdleLimits {
        let mut limits = IdleLimits::new(1000, 1024);
        let record = limits.record(path(), 1);
        record.kills.extend(kills);
        record.total_kills = kills.len() as u64;
        record.survived_ms = survived;
        limits
    }

    #[test]
    fn clustered_kills_give_their_lowest() {
        let limits = limits_with(&[2040, 2010, 2090, 2005], Some(1800));
        let limit = limits.estimate(&path()).unwrap();
        assert_eq!(
            (limit.limit_ms, limit.high_ms, limit.clustered, limit.kills),
            (2005, 2090, 4, 4)
        );
        assert_eq!(limit.survived_ms, Some(1800));
    }

    #[test]
    fn no_estimate_before_three_kills() {
        assert_eq!(limits_with(&[5000, 5010], None).estimate(&path()), None);
        assert!(
            limits_with(&[5000, 5010, 5020], None)
                .estimate(&path())
                .is_some()
        );
    }

    #[test]
    fn scattered_kills_give_none() {
        let limits = limits_with(&[600, 1900, 3300, 5200, 7900], None);
        assert_eq!(limits.estimate(&path()), None);
    }

    #[test]
    fn a_cluster_must_hold_most_kills() {
        // Three at ~5 s, three scattered: not a limit's pattern.
        let limits = limits_with(&[5000, 5020, 5100, 1200, 2500, 9000], None);
        assert_eq!(limits.estimate(&path()), None);
        // A stray kill among many clustered ones does not hide the limit.
        let limits = limits_with(&[5000, 5020, 5100, 5050, 1200], None);
        assert_eq!(limits.estimate(&path()).unwrap().limit_ms, 5000);
    }

    #[test]
    fn a_longer_survival_contradicts_the_cluster() {
        let limits = limits_with(&[2000, 2010, 2020], Some(2500));
        assert_eq!(limits.estimate(&path()), None);
    }

    #[test]
    fn only_the_recent_kills_count() {
        let mut kills = vec![9000; 10];
        kills.extend([3000; KEPT_KILLS]);
        let mut limits = IdleLimits::new(1000, 1024);
        let listeners = Listeners::from_snapshot(&[]);
        for idle in kills {
            let event = kill_event(idle);
            limits.observe(&event, &listeners).unwrap();
        }
        let limit = limits.estimate(&path_of_kill()).unwrap();
        assert_eq!(
            (limit.limit_ms, limit.kills),
            (3000, 10 + KEPT_KILLS as u64)
        );
    }

    fn path_of_kill() -> Path {
        let event = kill_event(0);
        Path {
            netns: event.netns.unwrap_or(0),
            direction: Direction::Outbound,
            endpoint: event.remote,
        }
    }

    fn kill_event(idle_ms: u32) -> Event {
        let mut event = crate::events::from_raw(&crate::events::tests::raw_reset(idle_ms)).unwrap();
        event.since_send_ms = Some(idle_ms);
        event.since_recv_ms = Some(idle_ms);
        event
    }

    #[test]
    fn busy_resets_and_short_idles_are_not_kills() {
        let mut limits = IdleLimits::new(1000, 1024);
        let listeners = Listeners::from_snapshot(&[]);
        assert!(limits.observe(&kill_event(400), &listeners).is_none());
        let mut waiting = kill_event(5000);
        waiting.waiting_ms = Some(5000);
        assert!(limits.observe(&waiting, &listeners).is_none());
        assert!(limits.observe(&kill_event(5000), &listeners).is_some());
    }

    #[test]
    fn survivals_come_from_idle_then_data() {
        let mut limits = IdleLimits::new(1000, 1024);
        let listeners = Listeners::from_snapshot(&[]);
        let mut socket = established(7, 1500);
        limits.refresh(std::slice::from_ref(&socket), &listeners, 1);
        socket = established(7, 3200);
        limits.refresh(std::slice::from_ref(&socket), &listeners, 2);
        let path = IdleLimits::path_of(&listeners, Some(socket.netns), socket.local, socket.remote);
        assert_eq!(
            limits.paths.get(&path).map(|r| r.survived_ms),
            None,
            "no data yet"
        );
        socket = established(7, 20);
        limits.refresh(std::slice::from_ref(&socket), &listeners, 3);
        assert_eq!(limits.paths[&path].survived_ms, Some(3200));
        // A socket gone from the list is forgotten.
        limits.refresh(&[], &listeners, 4);
        assert!(limits.stretches.is_empty());
    }

    fn established(cookie: u64, idle_ms: u32) -> DiagSocket {
        let established = monitor_common::tcp_state::ESTABLISHED;
        crate::sockets::pools::tests::socket(
            "10.1.0.2:40000",
            "10.0.0.5:5432",
            established,
            cookie,
            idle_ms,
        )
    }

    #[test]
    fn paths_are_bounded() {
        let mut limits = IdleLimits::new(1000, 1024);
        for port in 0..u16::try_from(MAX_PATHS).unwrap() + 10 {
            let mut path = path();
            path.endpoint.set_port(port);
            limits.record(path, u64::from(port));
        }
        assert_eq!(limits.paths.len(), MAX_PATHS);
        assert_eq!(limits.evictions, 10);
    }
}
