//! `pool_leak`: a process checks connections out of its pool and never returns them. Each
//! leaked connection carries a query or two right after it opens, then nothing, ever;
//! meanwhile the process opens more to the same endpoint, although idle ones exist. A
//! healthy pool uses its idle connections before it opens one, so its old connections
//! show activity again. `pool_leak_exhausted` follows when the pool stops opening (its
//! limit: "QueuePool limit reached") with nearly every connection stranded.
//!
//! A connection (outbound, ESTABLISHED) is *stranded* when, conservatively:
//! - its age is known: first listed after connwatch started, so it opened between the
//!   dump before and that listing (one open at start may be hours old: never judged);
//! - its last data (`tcp_info`, either way) came no later than a refresh interval (at
//!   least [`OPEN_SPAN_NS`]) after its first listing: idle since shortly after it opened;
//! - it has been idle at least the leak threshold;
//! - a newer connection of the same process to the same endpoint, in the same network
//!   namespace, is listed now whose *earliest* possible open (the start of the dump before
//!   its first listing) is after that last data: the process opened another while this one
//!   sat idle. Two connections first listed together are a tie, never "newer".
use std::net::SocketAddr;

use crate::{
    FastMap,
    events::TcpState,
    sockets::{diag::DiagSocket, pools::Direction, pools::Listeners},
};

use super::{Kind, listed::FirstListed};

/// A process's outbound connections to one endpoint, in one network namespace.
type PoolKey = (u32, u64, SocketAddr);

const MS: u64 = 1_000_000;
/// "Shortly after it opened" spans at least this much past its first listing: a pool's
/// connect, authentication and first query, in a slow interpreter, take about a second.
pub const OPEN_SPAN_NS: u64 = 2_000 * MS;
/// A leak needs this many stranded connections, first listed at as many different
/// refreshes: connections opened together at start (a pool's minimum) are one batch, not
/// growth.
pub const MIN_STRANDED: u32 = 3;

/// A leak finding for one pool, named by its oldest stranded connection.
#[derive(Debug, Clone, Copy)]
pub struct Leak<'a> {
    /// [`Kind::PoolLeak`] or [`Kind::PoolLeakExhausted`].
    pub kind: Kind,
    pub socket: &'a DiagSocket,
    /// Stranded connections now.
    pub stranded: u32,
    /// Established connections of the pool now.
    pub established: u32,
    /// Stranded connections per minute, from the first listings of the oldest and the
    /// newest.
    pub per_min: u32,
    /// Since the oldest stranded connection was first listed: its age, at least.
    pub oldest_ms: u64,
}

/// A pool's leak episode: from the `pool_leak` finding until no connection is stranded.
#[derive(Debug, Default, Clone, Copy)]
struct Episode {
    exhausted: bool,
}

pub struct LeakDetector {
    threshold_ms: u64,
    /// Outbound ESTABLISHED sockets of the last dump: when each was first listed. Its
    /// evictions are the detector's.
    pub listed: FirstListed,
    /// Stranded connections per pool at the last refresh (pools with any).
    counts: FastMap<PoolKey, u32>,
    /// The stranded sockets (cookies), for the pools' STRANDED column.
    stranded: std::collections::HashSet<u64>,
    /// Pools in a leak episode; bounded by the pools with stranded connections.
    episodes: FastMap<PoolKey, Episode>,
}

/// One pool's connections at a refresh.
#[derive(Default)]
struct View<'a> {
    established: u32,
    /// The latest "opened after" of its connections of known age.
    newest_after_ns: Option<u64>,
    /// The latest first listing of its connections of known age.
    newest_at_ns: Option<u64>,
    /// Stranded: first listing, socket.
    stranded: Vec<(u64, &'a DiagSocket)>,
}

impl LeakDetector {
    pub fn new(threshold_ms: u64, max_sockets: usize) -> LeakDetector {
        LeakDetector {
            threshold_ms,
            listed: FirstListed::new(max_sockets),
            counts: FastMap::default(),
            stranded: std::collections::HashSet::default(),
            episodes: FastMap::default(),
        }
    }

    /// Stranded connections now (cookies).
    pub fn stranded(&self) -> &std::collections::HashSet<u64> {
        &self.stranded
    }

    /// Folds in a dump that started at `dump_ns`, at `now_ns`; `pid_of` is a socket's
    /// owner by inode. Returns the episodes that started, and the pools that plateaued.
    pub fn refresh<'a>(
        &mut self,
        snapshot: &'a [DiagSocket],
        pid_of: impl Fn(u64) -> Option<u32>,
        listeners: &Listeners,
        dump_ns: u64,
        now_ns: u64,
    ) -> Vec<Leak<'a>> {
        let established = TcpState::ESTABLISHED;
        let conns: Vec<(PoolKey, &DiagSocket)> = snapshot
            .iter()
            .filter(|s| s.state == established && s.inode != 0)
            .filter_map(|s| {
                let (direction, endpoint) = listeners.classify(Some(s.netns), s.local, s.remote);
                let pid = pid_of(s.inode)?;
                (direction == Direction::Outbound).then_some(((pid, s.netns, endpoint), s))
            })
            .collect();
        self.listed
            .remember(conns.iter().map(|(_, s)| s.cookie), dump_ns, now_ns);

        let mut pools: FastMap<PoolKey, View> = FastMap::default();
        for &(key, socket) in &conns {
            let view = pools.entry(key).or_default();
            view.established += 1;
            if let Some(listed) = self.listed.get(socket.cookie)
                && let Some(after) = listed.after_ns
            {
                view.newest_after_ns = view.newest_after_ns.max(Some(after));
                view.newest_at_ns = view.newest_at_ns.max(Some(listed.at_ns));
            }
        }
        for &(key, socket) in &conns {
            let view = pools
                .get_mut(&key)
                .expect("every connection's pool is viewed");
            if let Some(at_ns) = self.stranded_since(socket, view.newest_after_ns, now_ns) {
                view.stranded.push((at_ns, socket));
            }
        }

        let mut found = Vec::new();
        let mut counts = FastMap::default();
        let mut episodes = FastMap::default();
        self.stranded.clear();
        for (key, mut view) in pools {
            let count = u32::try_from(view.stranded.len()).unwrap_or(u32::MAX);
            if count == 0 {
                // The episode, if any, is over.
                continue;
            }
            self.stranded
                .extend(view.stranded.iter().map(|(_, s)| s.cookie));
            view.stranded
                .sort_unstable_by_key(|&(at, socket)| (at, socket.cookie));
            let mut listings: Vec<u64> = view.stranded.iter().map(|&(at, _)| at).collect();
            listings.dedup();
            let (oldest_at, oldest) = view.stranded[0];
            let span_ms = (listings[listings.len() - 1] - listings[0]) / MS;
            let leak = |kind| Leak {
                kind,
                socket: oldest,
                stranded: count,
                established: view.established,
                per_min: ((u64::from(count) - 1) * 60_000)
                    .checked_div(span_ms)
                    .map_or(0, |rate| u32::try_from(rate).unwrap_or(u32::MAX)),
                oldest_ms: now_ns.saturating_sub(oldest_at) / MS,
            };
            let before = self.counts.get(&key).copied().unwrap_or(0);
            let mut episode = self.episodes.get(&key).copied();
            let growing =
                count >= MIN_STRANDED && listings.len() >= MIN_STRANDED as usize && count > before;
            if episode.is_none() && growing {
                found.push(leak(Kind::PoolLeak));
                episode = Some(Episode::default());
            }
            if let Some(episode) = &mut episode {
                // Nothing opened for the threshold (or ever, since start).
                let quiet = view
                    .newest_at_ns
                    .is_none_or(|at| now_ns.saturating_sub(at) >= self.threshold_ms * MS);
                // The newest connection is never stranded (nothing is newer): "nearly all"
                // is 90% of the others.
                let nearly_all = count * 10 >= (view.established - 1) * 9;
                if !episode.exhausted && quiet && nearly_all {
                    found.push(leak(Kind::PoolLeakExhausted));
                    episode.exhausted = true;
                }
                episodes.insert(key, *episode);
            }
            counts.insert(key, count);
        }
        self.counts = counts;
        self.episodes = episodes;
        found
    }

    /// When `socket` was first listed, if it is stranded: see the module's doc.
    /// `newest_after_ns`: the latest "opened after" among its pool's connections.
    fn stranded_since(
        &self,
        socket: &DiagSocket,
        newest_after_ns: Option<u64>,
        now_ns: u64,
    ) -> Option<u64> {
        let listed = self.listed.get(socket.cookie)?;
        let after = listed.after_ns?;
        let idle_ms = socket.idle_ms()?;
        if idle_ms < self.threshold_ms {
            return None;
        }
        // Measured at the dump, which came before now: "now − idle" is later than the true
        // last data, which errs towards not stranded.
        let last_data_ns = now_ns.saturating_sub(idle_ms * MS);
        let open_span = listed.at_ns.saturating_sub(after).max(OPEN_SPAN_NS);
        let idle_since_open = last_data_ns <= listed.at_ns + open_span;
        let newer_opened_since = newest_after_ns.is_some_and(|newest| newest > last_data_ns);
        (idle_since_open && newer_opened_since).then_some(listed.at_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::diag::TcpActivity;

    const S: u64 = 1_000_000_000;
    const THRESHOLD_MS: u64 = 30_000;
    /// Refreshes every 5 s, the default; each dump takes 100 ms.
    const REFRESH: u64 = 5 * S;
    const DUMP: u64 = S / 10;

    /// A connection of process 10 to 10.0.0.9:5432 in network namespace `netns`: when it
    /// opens and closes, and when it carries data.
    #[derive(Clone)]
    struct Conn {
        cookie: u64,
        netns: u64,
        open: u64,
        close: Option<u64>,
        data: Vec<u64>,
    }

    /// `n` connections opened `every` apart from `start`, each with one query 100 ms after
    /// it opens.
    fn opened(n: u64, start: u64, every: u64) -> Vec<Conn> {
        (0..n)
            .map(|i| {
                let open = start + i * every;
                Conn {
                    cookie: 100 + i,
                    netns: 1,
                    open,
                    close: None,
                    data: vec![open + S / 10],
                }
            })
            .collect()
    }

    /// What a dump at `t` lists of `conns`.
    fn dump(conns: &[Conn], t: u64) -> Vec<DiagSocket> {
        conns
            .iter()
            .filter(|c| c.open <= t && c.close.is_none_or(|close| close > t))
            .map(|c| {
                let last = c.data.iter().copied().filter(|&d| d <= t).max();
                let idle = u32::try_from((t - last.unwrap_or(c.open)) / MS).unwrap();
                DiagSocket {
                    local: SocketAddr::from((
                        [10, 0, 0, 1],
                        40_000 + u16::try_from(c.cookie).unwrap(),
                    )),
                    remote: "10.0.0.9:5432".parse().unwrap(),
                    state: TcpState::ESTABLISHED,
                    inode: c.cookie,
                    cookie: c.cookie,
                    netns: c.netns,
                    recv_queue: 0,
                    activity: Some(TcpActivity {
                        last_data_sent_ms: idle,
                        last_data_recv_ms: idle,
                        last_ack_recv_ms: idle,
                        unacked: 0,
                        retransmits: 0,
                        bytes_received: 100,
                        bytes_acked: 100,
                    }),
                    last_io: None,
                }
            })
            .collect()
    }

    #[derive(Debug, PartialEq, Eq)]
    struct Found {
        at_s: u64,
        kind: Kind,
        cookie: u64,
        stranded: u32,
        per_min: u32,
        oldest_s: u64,
    }

    /// Refreshes from `from` to `until` (s), each dump started 100 ms before it is folded
    /// in; the findings, and the most stranded at once.
    fn watch(
        detector: &mut LeakDetector,
        conns: &[Conn],
        from: u64,
        until: u64,
    ) -> (Vec<Found>, usize) {
        let mut found = Vec::new();
        let mut most = 0;
        let mut t = from * S + DUMP;
        while t <= until * S {
            let snapshot = dump(conns, t - DUMP);
            let leaks =
                detector.refresh(&snapshot, |_| Some(10), &Listeners::default(), t - DUMP, t);
            found.extend(leaks.iter().map(|l| Found {
                at_s: t / S,
                kind: l.kind,
                cookie: l.socket.cookie,
                stranded: l.stranded,
                per_min: l.per_min,
                oldest_s: l.oldest_ms / 1000,
            }));
            most = most.max(detector.stranded().len());
            t += REFRESH;
        }
        (found, most)
    }

    fn detector() -> LeakDetector {
        LeakDetector::new(THRESHOLD_MS, 1024)
    }

    #[test]
    fn a_growing_leak_is_one_finding_before_the_limit_then_its_plateau() {
        // One leaked connection every 4 s up to the limit of 30 (at 118 s).
        let conns = opened(30, 2 * S, 4 * S);
        let (found, _) = watch(&mut detector(), &conns, 0, 400);
        let [leak, plateau] = &found[..] else {
            panic!("two findings: {found:#?}");
        };
        assert_eq!(leak.kind, Kind::PoolLeak);
        // They went idle at 2, 6, 10 and 14 s, and each is stranded 30 s on (newer ones
        // opened since): four at the refresh at 45 s, first listed at 5, 10, 10 and 15 s.
        assert_eq!(
            (leak.at_s, leak.cookie, leak.stranded),
            (45, 100, 4),
            "{leak:?}"
        );
        assert!(leak.at_s < 118, "before the pool's limit");
        // Three more in 10 s; the oldest first listed 40 s ago.
        assert_eq!((leak.per_min, leak.oldest_s), (18, 40));
        // The limit at 118 s; nothing new for the threshold, all but the newest stranded.
        assert_eq!(plateau.kind, Kind::PoolLeakExhausted);
        assert_eq!(
            (plateau.at_s, plateau.stranded, plateau.cookie),
            (150, 29, 100)
        );
    }

    #[test]
    fn a_pool_that_grew_under_load_and_idles_reuses_its_connections() {
        // Eight connections opened one per 5 s under rising load; every one used each
        // second until 60 s, then all idle.
        let mut conns = opened(8, 0, 5 * S);
        for conn in &mut conns {
            conn.data.extend((conn.open / S..60).map(|s| s * S + S / 2));
        }
        let mut detector = detector();
        let (found, most) = watch(&mut detector, &conns, 0, 600);
        assert!(found.is_empty(), "{found:#?}");
        assert_eq!(most, 0);
    }

    #[test]
    fn minimum_idle_connections_opened_together_at_start_are_not_a_leak() {
        let conns = opened(5, 20 * S, S / 10);
        let (found, most) = watch(&mut detector(), &conns, 0, 600);
        assert_eq!((found, most), (vec![], 0));
        // Opened together in one refresh interval, then one more a minute later: stranded,
        // but one batch is no growth.
        let mut more = conns.clone();
        more.extend(opened(1, 80 * S, S).into_iter().map(|mut c| {
            c.cookie = 200;
            c
        }));
        let (found, most) = watch(&mut detector(), &more, 0, 600);
        assert!(found.is_empty(), "{found:#?}");
        assert_eq!(most, 5, "the batch is stranded, counted, not reported");
    }

    #[test]
    fn pinged_idle_connections_are_not_stranded() {
        // Opened as the leak opens them, and each pinged every 20 s.
        let mut conns = opened(30, 2 * S, 4 * S);
        for conn in &mut conns {
            conn.data.extend((1..30).map(|i| conn.open + i * 20 * S));
        }
        let (found, most) = watch(&mut detector(), &conns, 0, 400);
        assert_eq!((found, most), (vec![], 0));
    }

    #[test]
    fn short_lived_connections_are_not_stranded() {
        // One a second, each closed 3 s after its query (some are listed), and one
        // long-lived idle connection among them: one stranded at most, never a leak.
        let mut conns = opened(300, S, S);
        for conn in &mut conns {
            conn.close = Some(conn.open + 3 * S);
        }
        conns.push(Conn {
            cookie: 1,
            netns: 1,
            open: 500_000_000,
            close: None,
            data: vec![600_000_000],
        });
        let (found, most) = watch(&mut detector(), &conns, 0, 300);
        assert!(found.is_empty(), "{found:#?}");
        assert_eq!(most, 1);
    }

    #[test]
    fn connections_open_at_start_are_not_judged() {
        // A leak that began before connwatch: ten connections there at its first dump, of
        // unknown age. Only the ones opened since count.
        let conns = opened(30, 0, 4 * S);
        let mut detector = detector();
        let (found, _) = watch(&mut detector, &conns, 40, 400);
        let leak = &found[0];
        assert_eq!(leak.kind, Kind::PoolLeak);
        assert_eq!(
            (leak.at_s, leak.cookie, leak.stranded),
            (85, 111, 3),
            "{leak:?}"
        );
        assert!(
            detector.stranded().iter().all(|&cookie| cookie > 110),
            "the ten of unknown age are never stranded"
        );
        assert_eq!(found.len(), 1, "all but the newest is not 90%: {found:#?}");
    }

    #[test]
    fn pools_are_per_network_namespace() {
        // Two pods' copies of one process image (the same pid in each pid namespace) to
        // the same 10.0.0.9:5432: the first's three connections idle since they opened,
        // the second's busy and opened later. Newer in another namespace is not newer.
        let mut conns = opened(3, 2 * S, 6 * S);
        conns.extend(opened(6, 20 * S, 4 * S).into_iter().map(|mut c| {
            (c.cookie, c.netns) = (c.cookie + 100, 2);
            c.data.extend((0..400).map(|s| s * S));
            c
        }));
        let mut detector = detector();
        let (found, most) = watch(&mut detector, &conns, 0, 400);
        assert!(found.is_empty(), "{found:#?}");
        assert_eq!(
            most, 2,
            "within its namespace, the first pool's newest is not stranded"
        );
        // Together, they would be a leak.
        for conn in &mut conns {
            conn.netns = 1;
        }
        let (found, _) = watch(&mut LeakDetector::new(THRESHOLD_MS, 1024), &conns, 0, 400);
        assert_eq!(found.len(), 1, "{found:#?}");
    }

    #[test]
    fn tracking_is_bounded_and_forgets_closed_connections() {
        let conns = opened(30, 2 * S, 4 * S);
        let mut detector = LeakDetector::new(THRESHOLD_MS, 8);
        let (found, _) = watch(&mut detector, &conns, 0, 400);
        // The first eight are tracked; the rest never are (a full table never makes an old
        // socket look new), and each untracked socket at each refresh is counted.
        assert_eq!(detector.listed.len(), 8);
        assert!(
            detector.listed.evictions > 22,
            "{}",
            detector.listed.evictions
        );
        assert_eq!(found[0].kind, Kind::PoolLeak);
        // The process exits: everything forgotten, the episode over.
        watch(&mut detector, &[], 401, 402);
        assert_eq!((detector.listed.len(), detector.stranded().len()), (0, 0));
        assert!(detector.episodes.is_empty() && detector.counts.is_empty());
    }
}
