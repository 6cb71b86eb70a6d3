//! The path every event takes: decode → socket table (owner) → detectors; and, at each
//! refresh, the kernel's socket list → pools and stalls. Findings leave unattributed: the
//! resolver thread (`resolver.rs`) names their container and pod.
use std::{collections::HashMap, path::PathBuf};

use crate::{
    bounds::{millis, nanos},
    detect::{
        DetectConfig, Detectors, Finding, Kind,
        exhausted::ExhaustionDetector,
        idle_limit::{IdleLimit, IdleLimits, Path},
        leak::LeakDetector,
        zombie::ZombieDetector,
    },
    events::{self, DecodeError, Event, Hook, SocketId, Task, TcpState},
    resolver::SharedProcIndex,
    sinks::metrics::Stats,
    sockets::{
        SocketTable,
        diag::{DiagSocket, Snapshot},
        pools::{Pool, PoolTracker},
    },
};

/// One record's decoded event and what the detectors made of it.
pub struct Processed<'a> {
    pub event: Event,
    pub findings: &'a [Finding],
}

/// Where the host's files are: /proc, its root, the kubelet's pod logs.
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub proc: PathBuf,
    pub root: PathBuf,
    pub pod_logs: Option<PathBuf>,
    pub kubelet_url: Option<String>,
}

pub struct Pipeline {
    table: SocketTable,
    detectors: Detectors,
    pools: PoolTracker,
    exhaustion: ExhaustionDetector,
    zombies: ZombieDetector,
    limits: IdleLimits,
    leaks: LeakDetector,
    idle_threshold_ms: u64,
    /// `--ignore-port`: left out of the stall and zombie detectors.
    quiet_ports: Vec<u16>,
    /// Sockets by state in the last snapshot.
    snapshot_states: HashMap<TcpState, usize>,
    /// The last refresh's network namespaces, and how long it took.
    last_namespaces: usize,
    last_took: std::time::Duration,
    findings: Vec<Finding>,
    pub events: u64,
    pub undecodable: u64,
}

impl Pipeline {
    pub fn new(config: &DetectConfig, processes: SharedProcIndex) -> Pipeline {
        Pipeline {
            table: SocketTable::new(processes, config.max_sockets),
            detectors: Detectors::new(config),
            pools: PoolTracker::default(),
            exhaustion: ExhaustionDetector::default(),
            zombies: ZombieDetector::new(millis(config.zombie_threshold), config.max_sockets),
            limits: IdleLimits::new(millis(config.idle_threshold), config.max_sockets),
            leaks: LeakDetector::new(millis(config.leak_threshold), config.max_sockets),
            idle_threshold_ms: millis(config.idle_threshold),
            quiet_ports: config.quiet_ports.clone(),
            snapshot_states: HashMap::new(),
            last_namespaces: 0,
            last_took: std::time::Duration::ZERO,
            findings: Vec::new(),
            events: 0,
            undecodable: 0,
        }
    }

    /// Processes one ring-buffer record; a record that does not decode is counted.
    pub fn record(&mut self, bytes: &[u8]) -> Result<Processed<'_>, DecodeError> {
        match events::decode(bytes) {
            Ok(event) => {
                self.event(&event);
                Ok(Processed {
                    event,
                    findings: &self.findings,
                })
            }
            Err(err) => {
                self.undecodable += 1;
                Err(err)
            }
        }
    }

    pub fn event(&mut self, event: &Event) -> &[Finding] {
        self.events += 1;
        self.findings.clear();
        // Borrowed, not cloned: this runs for every event.
        let owner = self
            .table
            .observe(event)
            .and_then(|entry| entry.owner.as_ref())
            .or(event.owner.as_ref());
        self.pools.event(event, owner);
        self.limits.observe(event, self.pools.listeners());
        self.detectors.inspect(event, owner, &mut self.findings);
        self.annotate_idle_limits();
        &self.findings
    }

    /// Findings whose grace has ended (cheap when none waits): called at every poll.
    pub fn due(&mut self, mono_now_ns: u64) -> &[Finding] {
        self.findings.clear();
        self.detectors.due(mono_now_ns, &mut self.findings);
        self.annotate_idle_limits();
        &self.findings
    }

    /// Gives each `peer_*_idle` finding its path's learned idle limit.
    fn annotate_idle_limits(&mut self) {
        self.annotate_sides();
        for finding in &mut self.findings {
            if matches!(finding.kind, Kind::PeerResetIdle | Kind::PeerCloseIdle) {
                let event = &finding.event;
                let path = IdleLimits::path_of(
                    self.pools.listeners(),
                    event.netns,
                    event.local,
                    event.remote,
                );
                finding.idle_limit = self.limits.estimate(&path);
            }
        }
    }

    /// Marks the findings on a server's sockets (by the last refresh's listeners).
    fn annotate_sides(&mut self) {
        let listeners = self.pools.listeners();
        for finding in &mut self.findings {
            finding.inbound = listeners.is_inbound(finding.event.netns, finding.event.local);
        }
    }

    /// Every path's learned idle limit, most kills first.
    pub fn idle_limits(&self) -> Vec<(Path, IdleLimit)> {
        self.limits.estimates()
    }

    /// A pool's path's learned idle limit.
    pub fn idle_limit(&self, pool: &Pool) -> Option<IdleLimit> {
        self.limits.estimate(&Path::of_pool(pool))
    }

    /// Idle FINs the application closed within the grace.
    pub fn fins_handled(&self) -> u64 {
        self.detectors.fins_handled()
    }

    /// Idle resets the application closed within the grace.
    pub fn resets_handled(&self) -> u64 {
        self.detectors.resets_handled()
    }

    /// Periodic upkeep: findings that come from time passing; forget old closed sockets.
    pub fn tick(&mut self, mono_now_ns: u64) -> &[Finding] {
        self.table.expire(mono_now_ns);
        self.findings.clear();
        self.detectors.tick(mono_now_ns, &mut self.findings);
        self.annotate_sides();
        &self.findings
    }

    /// Folds in a fresh sock_diag snapshot: pools, requests that started stalling and pools
    /// they exhausted, and connections that became zombies.
    pub fn refresh(&mut self, snapshot: &Snapshot, mono_now_ns: u64) -> &[Finding] {
        self.findings.clear();
        self.count_states(snapshot);
        let owner_of = |inode: u64| snapshot.owners.get(&inode).cloned();
        // Built once per refresh: stalls, zombies and pools all classify by it.
        self.pools
            .set_listeners(crate::sockets::pools::Listeners::from_snapshot(
                &snapshot.sockets,
            ));
        let judged = self.judged(&snapshot.sockets);
        for (socket, stalled_ms) in
            self.detectors
                .stalled(&judged, self.pools.listeners(), mono_now_ns)
        {
            let owner = owner_of(socket.inode);
            let event = snapshot_event(socket, owner.clone(), mono_now_ns, Some(stalled_ms));
            let mut finding = Finding::new(Kind::RequestStalled, &event, owner.as_ref());
            finding.stalled_ms = Some(stalled_ms);
            self.findings.push(finding);
        }
        for zombie in self
            .zombies
            .refresh(&judged, self.pools.listeners(), mono_now_ns)
        {
            let owner = owner_of(zombie.socket.inode);
            let event = snapshot_event(zombie.socket, owner.clone(), mono_now_ns, None);
            let mut finding = Finding::new(Kind::ZombieConnection, &event, owner.as_ref());
            finding.siblings = Some(zombie.siblings);
            finding.age_ms = Some(zombie.age_ms);
            self.findings.push(finding);
        }
        for (socket, listed_ms) in self
            .detectors
            .listed_close_wait(&snapshot.sockets, mono_now_ns)
        {
            let owner = owner_of(socket.inode);
            let event = snapshot_event(socket, owner.clone(), mono_now_ns, None);
            let mut finding = Finding::new(Kind::CloseWaitLingering, &event, owner.as_ref());
            finding.age_ms = Some(listed_ms);
            finding.age_at_least = true;
            self.findings.push(finding);
        }
        self.limits
            .refresh(&snapshot.sockets, self.pools.listeners(), mono_now_ns);
        // The dump started about `took` before now: what it did not list opened after that.
        let dump_ns = mono_now_ns.saturating_sub(nanos(snapshot.took));
        for leak in self.leaks.refresh(
            &snapshot.sockets,
            |inode| snapshot.owners.get(&inode).map(|owner| owner.pid),
            self.pools.listeners(),
            dump_ns,
            mono_now_ns,
        ) {
            let owner = owner_of(leak.socket.inode);
            let event = snapshot_event(leak.socket, owner.clone(), mono_now_ns, None);
            let mut finding = Finding::new(leak.kind, &event, owner.as_ref());
            finding.connections = Some(leak.stranded);
            finding.per_min = Some(leak.per_min);
            // Since its first listing: it opened a refresh before at most.
            finding.age_ms = Some(leak.oldest_ms);
            finding.age_at_least = true;
            self.findings.push(finding);
        }
        self.pools.connects(&snapshot.connects, mono_now_ns);
        self.pools.refresh(
            &snapshot.sockets,
            owner_of,
            self.detectors.requests(),
            self.zombies.zombies(),
            self.leaks.stranded(),
            self.idle_threshold_ms,
            mono_now_ns,
        );
        self.pools.name_workloads(&snapshot.workloads);
        let limits = &self.limits;
        self.pools
            .set_idle_limits(|pool| Some(limits.estimate(&Path::of_pool(pool))?.limit_ms));
        self.exhaustion.refresh(
            self.pools.pools(),
            mono_now_ns,
            |pool| {
                // Named by its oldest stalled connection.
                let socket = snapshot
                    .sockets
                    .iter()
                    .find(|s| Some(s.cookie) == pool.oldest_stall)?;
                let owner = owner_of(socket.inode);
                let event =
                    snapshot_event(socket, owner.clone(), mono_now_ns, pool.oldest_stall_ms);
                Some(Finding::new(Kind::PoolExhausted, &event, owner.as_ref()))
            },
            &mut self.findings,
        );
        self.annotate_sides();
        &self.findings
    }

    /// Sockets by state, the namespaces listed and the time taken, for the metrics.
    fn count_states(&mut self, snapshot: &Snapshot) {
        self.snapshot_states.clear();
        self.last_namespaces = snapshot.namespaces;
        self.last_took = snapshot.took;
        for socket in &snapshot.sockets {
            *self.snapshot_states.entry(socket.state).or_insert(0) += 1;
        }
    }

    /// The sockets judged for stalls and zombies: long polls and streams (`--ignore-port`)
    /// wait by design.
    fn judged<'a>(&self, sockets: &'a [DiagSocket]) -> std::borrow::Cow<'a, [DiagSocket]> {
        if self.quiet_ports.is_empty() {
            return std::borrow::Cow::Borrowed(sockets);
        }
        let quiet = |s: &&DiagSocket| {
            self.quiet_ports.contains(&s.local.port())
                || self.quiet_ports.contains(&s.remote.port())
        };
        std::borrow::Cow::Owned(sockets.iter().filter(|s| !quiet(s)).cloned().collect())
    }

    /// Entries dropped from full tables (socket table, CLOSE_WAIT, zombie and leak tracking).
    pub fn evictions(&self) -> u64 {
        self.table.evictions
            + self.detectors.evictions()
            + self.zombies.first_seen.evictions
            + self.leaks.listed.evictions
            + self.limits.evictions
            + self.pools.uncounted
    }

    pub fn pools(&self) -> &[Pool] {
        self.pools.pools()
    }

    /// The pipeline's counts for the metrics; the engine adds its own. Sockets by state
    /// come from the last snapshot: events cannot tell, only the state changes connwatch
    /// acts on cross the ring buffer.
    pub fn stats(&self) -> Stats {
        Stats {
            sockets_by_state: self.snapshot_states.clone(),
            namespaces: self.last_namespaces,
            refresh_took: self.last_took,
            undecodable: self.undecodable,
            evictions: self.evictions(),
            fins_handled: self.fins_handled(),
            resets_handled: self.resets_handled(),
            ..Stats::default()
        }
    }
}

#[cfg(test)]
impl Pipeline {
    /// Default thresholds, small tables, and a /proc that finds nothing.
    pub fn for_tests() -> Pipeline {
        let config = DetectConfig {
            idle_threshold: std::time::Duration::from_secs(1),
            close_wait_threshold: std::time::Duration::from_secs(30),
            stall_threshold: std::time::Duration::from_secs(10),
            zombie_threshold: std::time::Duration::from_secs(30),
            leak_threshold: std::time::Duration::from_secs(30),
            max_sockets: 64,
            rst_reasons: HashMap::default(),
            quiet_ports: Vec::new(),
            state_changes: false,
        };
        let processes = crate::sockets::process::ProcIndex::new("/nonexistent".into());
        Pipeline::new(
            &config,
            std::sync::Arc::new(std::sync::Mutex::new(processes)),
        )
    }
}

/// A snapshot's socket as an [`Event`], so findings from snapshots report like any other.
/// `waiting_ms`: how long its request has waited for an answer, if one is outstanding.
fn snapshot_event(
    socket: &DiagSocket,
    owner: Option<Task>,
    mono_now_ns: u64,
    waiting_ms: Option<u64>,
) -> Event {
    Event {
        hook: Hook::Snapshot,
        mono_ns: mono_now_ns,
        socket: SocketId {
            skaddr: 0,
            born_ns: socket.cookie,
        },
        cookie: socket.cookie,
        inode: socket.inode,
        cgroup_id: 0,
        local: socket.local,
        remote: socket.remote,
        old_state: socket.state,
        new_state: socket.state,
        current: owner.clone().unwrap_or(Task {
            pid: 0,
            tid: 0,
            comm: "".into(),
        }),
        owner,
        since_send_ms: socket.activity.map(|a| a.last_data_sent_ms),
        since_recv_ms: socket.activity.map(|a| a.last_data_recv_ms),
        rst_reason: 0,
        full_socket: true,
        linger_zero: false,
        io: None,
        sk_err: 0,
        waiting_ms: waiting_ms.map(|ms| u32::try_from(ms).unwrap_or(u32::MAX)),
        netns: Some(socket.netns),
    }
}
