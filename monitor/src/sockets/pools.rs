//! Pools: a process's sockets towards one endpoint. Pool exhaustion (every connection stuck
//! in a query, or leaked until "QueuePool limit reached") shows up here as a pattern across
//! sockets that no single socket's events reveal.
//!
//! Outbound pools group by the remote endpoint; inbound ones by the local listening
//! endpoint, so a server's accepted sockets form one pool instead of one per client port.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;

use monitor_common::ConnectKey;

use super::diag::DiagSocket;
use crate::{
    FastMap,
    events::{Event, Hook, Task, TcpState},
};

const MINUTE_NS: u64 = 60_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Local endpoints with a listening socket, per network namespace: a socket on one of them
/// was accepted. Every pod has its own 127.0.0.1 and its own ports.
#[derive(Debug, Default, Clone)]
pub struct Listeners {
    by_netns: HashSet<(u64, SocketAddr)>,
    /// The same endpoints in any namespace, for what carries no namespace.
    anywhere: HashSet<SocketAddr>,
}

impl Listeners {
    pub fn from_snapshot(snapshot: &[DiagSocket]) -> Listeners {
        let listening: Vec<&DiagSocket> = snapshot
            .iter()
            .filter(|s| s.state == TcpState::LISTEN)
            .collect();
        Listeners {
            by_netns: listening.iter().map(|s| (s.netns, s.local)).collect(),
            anywhere: listening.iter().map(|s| s.local).collect(),
        }
    }

    /// Whether `local` in network namespace `netns` (`None`: any) is a listening endpoint.
    pub fn is_inbound(&self, netns: Option<u64>, local: SocketAddr) -> bool {
        let listens = |addr: SocketAddr| match netns {
            Some(netns) => self.by_netns.contains(&(netns, addr)),
            None => self.anywhere.contains(&addr),
        };
        let port = local.port();
        listens(local)
            || listens(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            || listens(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
    }

    /// Which side a socket is on, and the endpoint its pool is named by.
    pub fn classify(
        &self,
        netns: Option<u64>,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> (Direction, SocketAddr) {
        if self.is_inbound(netns, local) {
            (Direction::Inbound, local)
        } else {
            (Direction::Outbound, remote)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pool {
    pub pid: u32,
    pub comm: String,
    /// The network namespace (its inode, as `ls -iL /proc/<pid>/ns/net` shows it).
    pub netns: u64,
    /// The process's container and pod, where it runs in one.
    #[serde(flatten)]
    pub workload: super::workload::Workload,
    pub direction: Direction,
    /// Serialized as "ip:port" (IPv6 "[ip]:port").
    pub endpoint: SocketAddr,
    pub total: u32,
    pub established: u32,
    /// ESTABLISHED with no data either way for at least the idle threshold, and no request
    /// outstanding.
    pub idle: u32,
    /// ESTABLISHED and not idle: recent data, or a request outstanding (below the stall
    /// threshold).
    pub active: u32,
    pub close_wait: u32,
    /// In any other state: SYN_SENT, SYN_RECV, FIN_WAIT1/2, CLOSING, LAST_ACK, CLOSE (a
    /// TIME_WAIT socket belongs to no process). `total` = `established` + `close_wait` +
    /// `other`, and `established` = `idle` + `active` + `stalled`.
    pub other: u32,
    /// ESTABLISHED with a request unanswered for at least the stall threshold.
    pub stalled: u32,
    /// Every established connection is stalled: the next request waits for a connection
    /// ("QueuePool limit reached"), or opens one more.
    pub exhausted: bool,
    /// How long the oldest stalled request has waited; absent when none has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_stall_ms: Option<u64>,
    /// The socket of the oldest stalled request (its cookie), to name in findings.
    #[serde(skip)]
    pub oldest_stall: Option<u64>,
    /// `zombie_connection` now.
    pub zombie: u32,
    /// Stranded now (outbound): idle since shortly after it opened, while the process
    /// opened newer connections here (see `pool_leak`).
    pub stranded: u32,
    /// The longest-idle ESTABLISHED connection's idle time; absent when none has a known
    /// one (no established connection, or every one waiting on a request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_idle_ms: Option<u64>,
    /// The idle limit learned on the pool's path (`detect::idle_limit`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_limit_ms: Option<u64>,
    pub connects_per_min: u32,
    pub resets_per_min: u32,
    /// silent_death over the last minute.
    pub deaths_per_min: u32,
}

/// The requests waiting for an answer at this refresh (from the stall detector).
#[derive(Debug, Clone, Copy)]
pub struct Requests<'a> {
    /// Socket cookie → how long its request has waited (ms).
    pub outstanding: &'a HashMap<u64, u64>,
    pub stall_threshold_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Happened {
    Connect = 0,
    Reset = 1,
    Death = 2,
}

/// Per-minute rates are summed over this many buckets of [`BUCKET_NS`].
const BUCKETS: usize = 6;
const BUCKET_NS: u64 = MINUTE_NS / BUCKETS as u64;
/// At most this many (process, endpoint) rate windows: 184 bytes each (with the key), in a
/// map of at most 131,072 slots: 23 MiB at most. A scan across many endpoints must not grow
/// the agent; past it, new keys are not counted (and said so).
const MAX_RATE_KEYS: usize = 65_536;

/// What happened to one key over the last minute, in fixed memory: connects, resets and
/// deaths per 10-second bucket, however high the rate (a queue of events grew with it).
#[derive(Debug, Default, Clone, Copy)]
struct RateWindow {
    /// Which 10-second slot (monotonic time / [`BUCKET_NS`]) each bucket holds.
    slots: [u64; BUCKETS],
    counts: [[u32; 3]; BUCKETS],
}

impl RateWindow {
    fn add(&mut self, now_ns: u64, what: Happened, times: u32) {
        let slot = now_ns / BUCKET_NS;
        let bucket = (slot % BUCKETS as u64) as usize;
        if self.slots[bucket] != slot {
            self.slots[bucket] = slot;
            self.counts[bucket] = [0; 3];
        }
        let count = &mut self.counts[bucket][what as usize];
        *count = count.saturating_add(times);
    }

    /// The count over the last minute: the current bucket and the five before it (so
    /// between 50 and 60 s of history).
    fn per_minute(&self, now_ns: u64, what: Happened) -> u32 {
        let now = now_ns / BUCKET_NS;
        self.slots
            .iter()
            .zip(&self.counts)
            .filter(|&(&slot, _)| slot <= now && now - slot < BUCKETS as u64)
            .fold(0u32, |sum, (_, counts)| {
                sum.saturating_add(counts[what as usize])
            })
    }

    fn is_stale(&self, now_ns: u64) -> bool {
        let now = now_ns / BUCKET_NS;
        self.slots
            .iter()
            .all(|&slot| now.saturating_sub(slot) >= BUCKETS as u64)
    }
}

/// Who to charge a connect or reset to; pid 0 when the owner is not known yet (a passive
/// socket before accept()).
type RateKey = (u32, Direction, SocketAddr);

/// One key's rates, and who it is as its last event named it: a process whose connections
/// come and go between refreshes holds no socket to be named by, and is still shown.
#[derive(Debug, Default, Clone)]
struct Recent {
    window: RateWindow,
    /// The owner's name (the thread's, as events carry it), from its last reset or death;
    /// connect counters carry none.
    comm: Option<Arc<str>>,
    /// The socket's network namespace, from the same event (0: not known).
    netns: u64,
}

#[derive(Default)]
pub struct PoolTracker {
    listeners: Listeners,
    /// What happened per key over the last minute.
    recent: FastMap<RateKey, Recent>,
    /// Connects, resets and deaths not counted because [`MAX_RATE_KEYS`] were in use.
    pub uncounted: u64,
    /// The kernel's connect counters as last read, to take the difference.
    connect_totals: FastMap<ConnectKey, u64>,
    pools: Vec<Pool>,
}

impl Pool {
    /// A pool with no sockets counted yet.
    pub fn new(
        pid: u32,
        comm: &str,
        netns: u64,
        direction: Direction,
        endpoint: SocketAddr,
    ) -> Pool {
        Pool {
            pid,
            comm: comm.to_string(),
            netns,
            workload: super::workload::Workload::default(),
            direction,
            endpoint,
            total: 0,
            established: 0,
            idle: 0,
            active: 0,
            close_wait: 0,
            other: 0,
            stalled: 0,
            exhausted: false,
            oldest_stall_ms: None,
            oldest_stall: None,
            zombie: 0,
            stranded: 0,
            max_idle_ms: None,
            idle_limit_ms: None,
            connects_per_min: 0,
            resets_per_min: 0,
            deaths_per_min: 0,
        }
    }
}

/// A process's name where connwatch knows none: its sockets are gone and no event named it.
pub const UNKNOWN_COMM: &str = "?";

impl PoolTracker {
    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// Gives each pool its path's learned idle limit.
    pub fn set_idle_limits(&mut self, limit_of: impl Fn(&Pool) -> Option<u64>) {
        for pool in &mut self.pools {
            pool.idle_limit_ms = limit_of(pool);
        }
    }

    /// Names each pool's container and pod, by its process.
    pub fn name_workloads(&mut self, workloads: &HashMap<u32, super::workload::Workload>) {
        for pool in &mut self.pools {
            if let Some(workload) = workloads.get(&pool.pid) {
                pool.workload = workload.clone();
            }
        }
    }

    /// Counts resets and deaths for the per-minute rates. Connects are counted in the
    /// kernel instead ([`connects`](PoolTracker::connects)): a healthy connection sends no
    /// event.
    pub fn event(&mut self, event: &Event, owner: Option<&Task>) {
        let happened = match event.hook {
            Hook::ReceiveReset | Hook::SendReset => Happened::Reset,
            _ if super::died_silently(event) => Happened::Death,
            _ => return,
        };
        let (direction, endpoint) = self
            .listeners
            .classify(event.netns, event.local, event.remote);
        let pid = owner.map_or(0, |o| o.pid);
        if let Some(recent) = self.count((pid, direction, endpoint), event.mono_ns, happened, 1) {
            if let Some(owner) = owner {
                // Shared, not copied.
                recent.comm = Some(owner.comm.clone());
            }
            recent.netns = event.netns.unwrap_or(recent.netns);
        }
    }

    fn count(
        &mut self,
        key: RateKey,
        now_ns: u64,
        what: Happened,
        times: u32,
    ) -> Option<&mut Recent> {
        if self.recent.len() >= MAX_RATE_KEYS && !self.recent.contains_key(&key) {
            self.recent
                .retain(|_, recent| !recent.window.is_stale(now_ns));
            if self.recent.len() >= MAX_RATE_KEYS {
                self.uncounted += u64::from(times);
                return None;
            }
        }
        let recent = self.recent.entry(key).or_default();
        recent.window.add(now_ns, what, times);
        Some(recent)
    }

    /// Folds in the kernel's connect counters: the connects since the last reading. An
    /// entry that is new, or that the kernel evicted and made again, counts from zero.
    pub fn connects(&mut self, totals: &[(ConnectKey, u64)], now_ns: u64) {
        let mut seen = FastMap::default();
        for &(key, total) in totals {
            let before = self.connect_totals.get(&key).copied().unwrap_or(0);
            let new = if total >= before {
                total - before
            } else {
                total
            };
            if new > 0 {
                let times = u32::try_from(new).unwrap_or(u32::MAX);
                self.count(rate_key(&key), now_ns, Happened::Connect, times);
            }
            seen.insert(key, total);
        }
        self.connect_totals = seen;
    }

    /// The listening endpoints of the snapshot the next [`refresh`](PoolTracker::refresh)
    /// folds in (also what resets and deaths are charged by).
    pub fn set_listeners(&mut self, listeners: Listeners) {
        self.listeners = listeners;
    }

    /// Rebuilds the pools from a fresh snapshot, whose listeners were set: one per
    /// (process, namespace, direction, endpoint) with sockets, and one for each process
    /// that connected, reset or died towards an endpoint within the last minute and holds no
    /// socket there now (a process that churns connections between refreshes). `zombie`
    /// and `stranded`: the sockets the zombie and leak detectors hold so (cookies).
    #[allow(clippy::too_many_arguments)]
    pub fn refresh(
        &mut self,
        snapshot: &[DiagSocket],
        mut owner_of: impl FnMut(u64) -> Option<Task>,
        requests: Requests,
        zombie: &HashSet<u64>,
        stranded: &HashSet<u64>,
        idle_threshold_ms: u64,
        now_ns: u64,
    ) {
        self.recent
            .retain(|_, recent| !recent.window.is_stale(now_ns));
        // The namespace too: a process's pools in two pods' namespaces are two pools.
        let mut pools: HashMap<(u32, u64, Direction, SocketAddr), Pool> = HashMap::new();
        // Who listens where: accepted connections not yet accept()ed are charged to them.
        let mut listening: Vec<(SocketAddr, u64, Task)> = Vec::new();
        for socket in snapshot {
            // TIME_WAIT and orphans belong to no process.
            if socket.inode == 0 {
                continue;
            }
            let Some(owner) = owner_of(socket.inode) else {
                continue;
            };
            // Listeners are not connections.
            if socket.state == TcpState::LISTEN {
                listening.push((socket.local, socket.netns, owner));
                continue;
            }
            let (direction, endpoint) =
                self.listeners
                    .classify(Some(socket.netns), socket.local, socket.remote);
            let pool = pools
                .entry((owner.pid, socket.netns, direction, endpoint))
                .or_insert_with(|| {
                    Pool::new(owner.pid, &owner.comm, socket.netns, direction, endpoint)
                });
            pool.total += 1;
            if socket.state == TcpState::ESTABLISHED {
                pool.established += 1;
                match requests.outstanding.get(&socket.cookie) {
                    Some(&waited) if waited >= requests.stall_threshold_ms => {
                        pool.stalled += 1;
                        if pool.oldest_stall_ms.is_none_or(|oldest| waited >= oldest) {
                            pool.oldest_stall_ms = Some(waited);
                            pool.oldest_stall = Some(socket.cookie);
                        }
                    }
                    // Waiting for its answer: busy, however quiet the line.
                    Some(_) => pool.active += 1,
                    None => match socket.idle_ms() {
                        Some(idle) => {
                            pool.max_idle_ms = Some(pool.max_idle_ms.unwrap_or(0).max(idle));
                            if idle >= idle_threshold_ms {
                                pool.idle += 1;
                            } else {
                                pool.active += 1;
                            }
                        }
                        // No tcp_info: not known to be idle.
                        None => pool.active += 1,
                    },
                }
            } else if socket.state == TcpState::CLOSE_WAIT {
                pool.close_wait += 1;
            } else {
                pool.other += 1;
            }
            if zombie.contains(&socket.cookie) {
                pool.zombie += 1;
            }
            if stranded.contains(&socket.cookie) {
                pool.stranded += 1;
            }
        }
        self.add_churning(&mut pools, &listening, now_ns);
        for (key, pool) in &mut pools {
            let (pid, _, direction, endpoint) = *key;
            pool.exhausted = pool.established > 0 && pool.stalled == pool.established;
            let count = |rate_pid, what| {
                self.recent
                    .get(&(rate_pid, direction, endpoint))
                    .map_or(0, |recent| recent.window.per_minute(now_ns, what))
            };
            pool.connects_per_min = count(pid, Happened::Connect);
            pool.resets_per_min = count(pid, Happened::Reset);
            pool.deaths_per_min = count(pid, Happened::Death);
            if direction == Direction::Inbound {
                // Accepted sockets are counted before accept() names their owner.
                pool.connects_per_min += count(0, Happened::Connect);
                pool.resets_per_min += count(0, Happened::Reset);
                pool.deaths_per_min += count(0, Happened::Death);
            }
        }
        self.pools = pools.into_values().collect();
    }

    /// Adds a pool with no socket for each key that connected, reset or died within the
    /// last minute and has no socket now: a process whose connections come and go between
    /// refreshes, or that resets every one, is shown all the same. Connections accepted but
    /// never named (pid 0) are the listening process's, where one alone listens there.
    fn add_churning(
        &self,
        pools: &mut HashMap<(u32, u64, Direction, SocketAddr), Pool>,
        listening: &[(SocketAddr, u64, Task)],
        now_ns: u64,
    ) {
        let happened = |recent: &Recent| {
            [Happened::Connect, Happened::Reset, Happened::Death]
                .into_iter()
                .any(|what| recent.window.per_minute(now_ns, what) > 0)
        };
        // Rate keys have no namespace: a process's pool there in any namespace takes them.
        let with_sockets: HashSet<RateKey> = pools
            .keys()
            .map(|&(pid, _, direction, endpoint)| (pid, direction, endpoint))
            .collect();
        // Each process's name and namespace, from its sockets elsewhere.
        let mut known: HashMap<u32, (&str, u64)> = HashMap::new();
        for pool in pools.values() {
            known.entry(pool.pid).or_insert((&pool.comm, pool.netns));
        }
        for (_, netns, task) in listening {
            known.entry(task.pid).or_insert((&task.comm, *netns));
        }
        let mut churning = Vec::new();
        for (&(pid, direction, endpoint), recent) in &self.recent {
            if pid == 0 || with_sockets.contains(&(pid, direction, endpoint)) || !happened(recent) {
                continue;
            }
            let other = known.get(&pid);
            // The process's name as its other pools show it, else its thread's from events.
            let comm = other
                .map(|&(comm, _)| comm)
                .or(recent.comm.as_deref())
                .unwrap_or(UNKNOWN_COMM);
            let netns = match recent.netns {
                0 => other.map_or(0, |&(_, netns)| netns),
                netns => netns,
            };
            churning.push(Pool::new(pid, comm, netns, direction, endpoint));
        }
        drop(known);
        for pool in churning {
            pools
                .entry((pool.pid, pool.netns, pool.direction, pool.endpoint))
                .or_insert(pool);
        }
        let inbound: HashSet<SocketAddr> = pools
            .keys()
            .filter(|&&(_, _, direction, _)| direction == Direction::Inbound)
            .map(|&(_, _, _, endpoint)| endpoint)
            .collect();
        for (&(pid, direction, endpoint), recent) in &self.recent {
            if pid != 0
                || direction != Direction::Inbound
                || inbound.contains(&endpoint)
                || !happened(recent)
            {
                continue;
            }
            let mut listeners = listening.iter().filter(|(local, _, _)| {
                local.port() == endpoint.port()
                    && (local.ip() == endpoint.ip() || local.ip().is_unspecified())
            });
            let Some((_, netns, owner)) = listeners.next() else {
                continue;
            };
            if listeners
                .any(|(_, other_netns, other)| (other.pid, other_netns) != (owner.pid, netns))
            {
                continue;
            }
            pools
                .entry((owner.pid, *netns, direction, endpoint))
                .or_insert_with(|| Pool::new(owner.pid, &owner.comm, *netns, direction, endpoint));
        }
    }
}

/// Who a kernel connect counter charges: the connecting process and the remote endpoint,
/// or (accepted, owner not yet known) pid 0 and the local endpoint.
fn rate_key(key: &ConnectKey) -> RateKey {
    let v6 = Ipv6Addr::from(key.addr);
    let ip = match v6.to_ipv4_mapped() {
        // An AF_INET socket: sock_diag lists it as IPv4, and so do pools.
        Some(v4) if key.ipv6 == 0 => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    };
    let direction = if key.inbound != 0 {
        Direction::Inbound
    } else {
        Direction::Outbound
    };
    (key.tgid, direction, SocketAddr::new(ip, key.port))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sockets::diag::TcpActivity;

    pub(crate) fn socket(
        local: &str,
        remote: &str,
        state: u8,
        inode: u64,
        idle_ms: u32,
    ) -> DiagSocket {
        DiagSocket {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state: TcpState(state),
            inode,
            cookie: inode,
            netns: 0,
            recv_queue: 0,
            last_io: None,
            activity: Some(TcpActivity {
                last_data_sent_ms: idle_ms,
                last_data_recv_ms: idle_ms,
                last_ack_recv_ms: idle_ms,
                unacked: 0,
                retransmits: 0,
                bytes_received: 0,
                bytes_acked: 0,
            }),
        }
    }

    #[expect(
        clippy::unnecessary_wraps,
        reason = "stands in for the snapshot's owner lookup, which may miss"
    )]
    fn owner(inode: u64) -> Option<Task> {
        let pid = if inode < 100 { 10 } else { 20 };
        Some(Task {
            pid,
            tid: pid,
            comm: format!("app{pid}").into(),
        })
    }

    #[test]
    fn rates_take_fixed_memory_and_age_out_by_the_minute() {
        let mut window = RateWindow::default();
        let second = 1_000_000_000;
        let start = 1_000 * MINUTE_NS;
        // A flood: a million resets in 5 s cost no more than one.
        for i in 0..1_000_000u64 {
            window.add(start + i * 5_000, Happened::Reset, 1);
        }
        window.add(start + 30 * second, Happened::Connect, 7);
        assert_eq!(std::mem::size_of::<RateWindow>(), 6 * 8 + 6 * 3 * 4);
        // With its key, the owner's name and namespace: what MAX_RATE_KEYS says.
        assert_eq!(std::mem::size_of::<(RateKey, Recent)>(), 184);
        let at = start + 40 * second;
        assert_eq!(window.per_minute(at, Happened::Reset), 1_000_000);
        assert_eq!(window.per_minute(at, Happened::Connect), 7);
        assert_eq!(window.per_minute(at, Happened::Death), 0);
        // A minute on, the flood is out of the window; the connects a little later.
        assert_eq!(window.per_minute(start + 61 * second, Happened::Reset), 0);
        assert_eq!(window.per_minute(start + 61 * second, Happened::Connect), 7);
        assert!(!window.is_stale(start + 61 * second));
        assert!(window.is_stale(start + 100 * second));
        assert_eq!(
            window.per_minute(start + 100 * second, Happened::Connect),
            0
        );
    }

    #[test]
    fn rate_keys_are_capped_and_what_does_not_fit_is_counted() {
        let mut tracker = PoolTracker::default();
        let endpoint = |i: u32| SocketAddr::from((std::net::Ipv4Addr::from(i), 5432));
        for i in 0..u32::try_from(MAX_RATE_KEYS).unwrap() + 10 {
            tracker.count((1, Direction::Outbound, endpoint(i)), 0, Happened::Reset, 1);
        }
        assert_eq!(tracker.recent.len(), MAX_RATE_KEYS);
        assert_eq!(tracker.uncounted, 10);
        // Two minutes on, the stale keys make room.
        let later = 2 * MINUTE_NS;
        tracker.count(
            (2, Direction::Outbound, endpoint(0)),
            later,
            Happened::Reset,
            1,
        );
        assert_eq!((tracker.recent.len(), tracker.uncounted), (1, 10));
    }

    #[test]
    fn a_pool_whose_every_connection_is_stalled_is_exhausted() {
        use monitor_common::tcp_state::*;
        fn requests(outstanding: &HashMap<u64, u64>) -> Requests<'_> {
            Requests {
                outstanding,
                stall_threshold_ms: 10_000,
            }
        }
        // Quiet lines, all three: a stuck query looks idle to tcp_info.
        let snapshot = vec![
            socket("10.0.0.1:40001", "10.0.0.9:5432", ESTABLISHED, 1, 60_000),
            socket("10.0.0.1:40002", "10.0.0.9:5432", ESTABLISHED, 2, 60_000),
            socket("10.0.0.1:40003", "10.0.0.9:5432", ESTABLISHED, 3, 60_000),
            socket("10.0.0.1:40004", "10.0.0.9:5432", CLOSE_WAIT, 4, 0),
        ];
        let mut outstanding = HashMap::from([(1, 12_000), (2, 31_000), (3, 2_000)]);
        let mut tracker = PoolTracker::default();
        tracker.set_listeners(Listeners::from_snapshot(&snapshot));
        tracker.refresh(
            &snapshot,
            owner,
            requests(&outstanding),
            &HashSet::new(),
            &HashSet::new(),
            1000,
            0,
        );
        let pool = &tracker.pools()[0];
        assert_eq!((pool.idle, pool.active, pool.stalled), (0, 1, 2));
        assert_eq!(pool.max_idle_ms, None, "a waiting request is not idleness");
        assert!(
            !pool.exhausted,
            "one connection is still below the threshold"
        );
        outstanding.insert(3, 10_000);
        tracker.set_listeners(Listeners::from_snapshot(&snapshot));
        tracker.refresh(
            &snapshot,
            owner,
            requests(&outstanding),
            &HashSet::new(),
            &HashSet::new(),
            1000,
            0,
        );
        let pool = &tracker.pools()[0];
        assert!(pool.exhausted, "{pool:?}");
        assert_eq!(
            (pool.oldest_stall_ms, pool.oldest_stall),
            (Some(31_000), Some(2))
        );
    }

    /// Refreshes `tracker` from `snapshot` (its listeners included) with `outstanding`
    /// requests at a 10 s stall threshold, no zombies and a 1 s idle threshold; the pools
    /// by pid.
    fn refreshed(
        tracker: &mut PoolTracker,
        snapshot: &[DiagSocket],
        outstanding: &HashMap<u64, u64>,
        at: u64,
    ) -> Vec<Pool> {
        tracker.set_listeners(Listeners::from_snapshot(snapshot));
        let requests = Requests {
            outstanding,
            stall_threshold_ms: 10_000,
        };
        tracker.refresh(
            snapshot,
            owner,
            requests,
            &HashSet::new(),
            &HashSet::new(),
            1000,
            at,
        );
        let mut pools = tracker.pools().to_vec();
        pools.sort_by_key(|p| p.pid);
        pools
    }

    /// `established` = `idle` + `active` + `stalled`; `total` = `established` +
    /// `close_wait` + `other`.
    fn assert_columns_add_up(pool: &Pool) {
        assert_eq!(
            pool.established,
            pool.idle + pool.active + pool.stalled,
            "{pool:?}"
        );
        assert_eq!(
            pool.total,
            pool.established + pool.close_wait + pool.other,
            "{pool:?}"
        );
    }

    #[test]
    fn states_are_exclusive_and_the_columns_add_up() {
        use monitor_common::tcp_state::*;
        let to = "10.0.0.9:5432";
        let mut snapshot = vec![
            // Stalled, quiet for a minute: stalled only, not idle too.
            socket("10.0.0.1:40001", to, ESTABLISHED, 1, 60_000),
            // Idle.
            socket("10.0.0.1:40002", to, ESTABLISHED, 2, 60_000),
            // Active: recent data.
            socket("10.0.0.1:40003", to, ESTABLISHED, 3, 10),
            // Active: a request waiting below the threshold, on a quiet line.
            socket("10.0.0.1:40004", to, ESTABLISHED, 4, 60_000),
            // No tcp_info: not known to be idle.
            socket("10.0.0.1:40005", to, ESTABLISHED, 5, 0),
            socket("10.0.0.1:40006", to, CLOSE_WAIT, 6, 0),
            // Neither ESTABLISHED nor CLOSE_WAIT: OTHER.
            socket("10.0.0.1:40007", to, SYN_SENT, 7, 0),
            socket("10.0.0.1:40008", to, FIN_WAIT2, 8, 0),
            socket("10.0.0.1:40009", to, LAST_ACK, 9, 0),
            // No process: not in any pool.
            socket("10.0.0.1:40010", to, TIME_WAIT, 0, 0),
        ];
        snapshot[4].activity = None;
        let outstanding = HashMap::from([(1, 30_000), (4, 2_000)]);
        let pools = refreshed(&mut PoolTracker::default(), &snapshot, &outstanding, 0);
        let [pool] = &pools[..] else {
            panic!("one pool: {pools:#?}");
        };
        assert_eq!(
            (pool.stalled, pool.idle, pool.active, pool.established),
            (1, 1, 3, 5)
        );
        assert_eq!((pool.close_wait, pool.other, pool.total), (1, 3, 9));
        assert_columns_add_up(pool);
        // Only the idle-eligible connections: the stalled one waits, it is not idle.
        assert_eq!(pool.max_idle_ms, Some(60_000));
        let json = serde_json::to_value(pool).unwrap();
        assert_eq!(
            (&json["other"], &json["max_idle_ms"]),
            (&3.into(), &60_000.into())
        );
    }

    #[test]
    fn max_idle_is_unknown_without_an_idle_candidate() {
        use monitor_common::tcp_state::*;
        let snapshot = vec![
            socket("10.0.0.1:40001", "10.0.0.9:5432", CLOSE_WAIT, 1, 0),
            socket("10.0.0.1:40002", "10.0.0.9:5432", CLOSE_WAIT, 2, 0),
        ];
        let pools = refreshed(&mut PoolTracker::default(), &snapshot, &HashMap::new(), 0);
        let pool = &pools[0];
        assert_eq!((pool.close_wait, pool.max_idle_ms), (2, None), "not 0ms");
        assert_columns_add_up(pool);
        let json = serde_json::to_value(pool).unwrap();
        assert!(json.get("max_idle_ms").is_none(), "absent, not 0: {json}");
    }

    #[test]
    fn a_process_with_recent_events_and_no_socket_is_still_a_pool() {
        use crate::events::{from_raw, tests::raw_reset};
        use monitor_common::tcp_state::*;
        let s = 1_000_000_000u64;
        // A server on :8080 (pid 20) that resets each connection it accepts, and its client
        // psql (pid 42, in namespace 7) that is reset: neither holds a connection at the
        // refresh.
        let snapshot = vec![socket("0.0.0.0:8080", "0.0.0.0:0", LISTEN, 200, 0)];
        let mut tracker = PoolTracker::default();
        tracker.set_listeners(Listeners::from_snapshot(&snapshot));
        let mut reset = raw_reset(0);
        reset.tuple.dport = 8080;
        let mut event = from_raw(&reset).unwrap();
        event.netns = Some(7);
        for i in 0..20 {
            event.mono_ns = i * s / 20;
            tracker.event(&event, event.owner.clone().as_ref());
        }
        // 30 connects the kernel counted for each side; the accepted ones' owner unknown.
        let loopback = Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets();
        let client = ConnectKey {
            addr: loopback,
            tgid: 42,
            port: 8080,
            inbound: 0,
            ipv6: 0,
        };
        let accepted = ConnectKey {
            tgid: 0,
            inbound: 1,
            ..client
        };
        tracker.connects(&[(client, 30), (accepted, 30)], s);
        let refresh =
            |tracker: &mut PoolTracker, at: u64| refreshed(tracker, &snapshot, &HashMap::new(), at);
        let pools = refresh(&mut tracker, 2 * s);
        assert_eq!(pools.len(), 2, "{pools:#?}");
        let (server, client) = (&pools[0], &pools[1]);
        assert_eq!(
            (server.pid, server.comm.as_str(), server.direction),
            (20, "app20", Direction::Inbound),
            "accepted connections are the listening process's"
        );
        assert_eq!(server.endpoint.to_string(), "127.0.0.1:8080");
        assert_eq!((server.total, server.connects_per_min), (0, 30));
        assert_eq!(
            (client.pid, client.comm.as_str(), client.netns),
            (42, "psql", 7),
            "named by its events"
        );
        assert_eq!(
            (client.direction, client.endpoint.to_string().as_str()),
            (Direction::Outbound, "127.0.0.1:8080")
        );
        assert_eq!(
            (
                client.total,
                client.resets_per_min,
                client.connects_per_min,
                client.max_idle_ms
            ),
            (0, 20, 30, None)
        );
        assert_columns_add_up(client);
        // A minute without events: gone.
        assert!(refresh(&mut tracker, 80 * s).is_empty());
    }

    #[test]
    fn groups_outbound_by_remote_and_inbound_by_listener() {
        use monitor_common::tcp_state::*;
        let snapshot = vec![
            socket("0.0.0.0:5432", "0.0.0.0:0", LISTEN, 200, 0),
            socket("10.0.0.1:40001", "10.0.0.9:5432", ESTABLISHED, 1, 5000),
            socket("10.0.0.1:40002", "10.0.0.9:5432", ESTABLISHED, 2, 10),
            socket("10.0.0.1:40003", "10.0.0.9:5432", CLOSE_WAIT, 3, 0),
            socket("10.0.0.1:5432", "10.0.0.7:50001", ESTABLISHED, 201, 0),
            socket("10.0.0.1:5432", "10.0.0.7:50002", ESTABLISHED, 202, 0),
            socket("10.0.0.1:40004", "10.0.0.9:6379", TIME_WAIT, 0, 0),
        ];
        let mut tracker = PoolTracker::default();
        let requests = Requests {
            outstanding: &[(2, 30_000)].into(),
            stall_threshold_ms: 10_000,
        };
        let zombie = HashSet::from([202]);
        tracker.set_listeners(Listeners::from_snapshot(&snapshot));
        tracker.refresh(
            &snapshot,
            owner,
            requests,
            &zombie,
            &HashSet::new(),
            1000,
            0,
        );
        let mut pools = tracker.pools().to_vec();
        pools.sort_by_key(|p| p.pid);
        assert_eq!(pools.len(), 2, "{pools:#?}");
        let out = &pools[0];
        assert_eq!(
            (out.direction, out.endpoint.to_string().as_str()),
            (Direction::Outbound, "10.0.0.9:5432")
        );
        assert_eq!(
            (
                out.total,
                out.established,
                out.idle,
                out.active,
                out.stalled
            ),
            (3, 2, 1, 0, 1)
        );
        assert_eq!(
            (out.close_wait, out.oldest_stall_ms, out.max_idle_ms),
            (1, Some(30_000), Some(5000))
        );
        assert!(!out.exhausted, "one of two connections is idle");
        let inbound = &pools[1];
        assert_eq!(
            (inbound.direction, inbound.endpoint.to_string().as_str()),
            (Direction::Inbound, "10.0.0.1:5432")
        );
        assert_eq!((inbound.total, inbound.zombie), (2, 1));
    }

    #[test]
    fn connect_rates_are_the_kernel_counters_differences_over_a_minute() {
        use monitor_common::tcp_state::*;
        let snapshot = vec![
            socket("0.0.0.0:5432", "0.0.0.0:0", LISTEN, 200, 0),
            socket("10.0.0.1:40001", "10.0.0.9:5432", ESTABLISHED, 1, 0),
            socket("10.0.0.1:5432", "10.0.0.7:50001", ESTABLISHED, 201, 0),
        ];
        let mapped = |ip: [u8; 4]| {
            let mut addr = [0u8; 16];
            addr[10..12].copy_from_slice(&[0xff, 0xff]);
            addr[12..].copy_from_slice(&ip);
            addr
        };
        // App 10 connects out to 10.0.0.9:5432; 10.0.0.1:5432 accepts (owner not known yet).
        let out = ConnectKey {
            addr: mapped([10, 0, 0, 9]),
            tgid: 10,
            port: 5432,
            inbound: 0,
            ipv6: 0,
        };
        let inbound = ConnectKey {
            addr: mapped([10, 0, 0, 1]),
            tgid: 0,
            inbound: 1,
            ..out
        };
        let s = 1_000_000_000u64;
        let mut tracker = PoolTracker::default();
        let rates = |tracker: &mut PoolTracker, at: u64| {
            let pools = refreshed(tracker, &snapshot, &HashMap::new(), at);
            pools.iter().map(|p| p.connects_per_min).collect::<Vec<_>>()
        };
        tracker.connects(&[(out, 5), (inbound, 3)], 0);
        assert_eq!(rates(&mut tracker, 0), [5, 3]);
        tracker.connects(&[(out, 7), (inbound, 3)], 10 * s);
        assert_eq!(rates(&mut tracker, 10 * s), [7, 3]);
        // The outbound entry was evicted and made again; the inbound one is gone. A minute
        // is six 10 s buckets, the current one included: at 69 s, what came at 0 s is out.
        tracker.connects(&[(out, 1)], 69 * s);
        assert_eq!(
            rates(&mut tracker, 69 * s),
            [3, 0],
            "the first minute's 5 and 3 expired"
        );
    }
}
