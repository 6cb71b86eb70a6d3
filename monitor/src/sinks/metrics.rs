//! Prometheus metrics for the daemon's `/metrics` (OpenMetrics text).
//!
//! Labels name what an SRE groups by: the process (`comm`, the process's name, not the
//! thread's) and the server's port: `remote_port` on a client's sockets, `local_port` (the
//! listening port) on a server's. Pids and ephemeral ports never become labels, and each
//! family admits at most `--max-series` label sets; later ones fold into `comm="other"` and
//! are counted in `connwatch_label_overflow_total`. Every family is listed (HELP, TYPE) from
//! the first scrape, series or not.
use std::{
    collections::HashMap,
    hash::Hash,
    ops::RangeInclusive,
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
        info::Info,
    },
    registry::Registry,
};

use crate::{
    FastMap,
    detect::{Finding, Kind},
    events::{Event, TcpState},
    probes::KernelCounters,
    sockets::{
        pools::{Direction, Pool},
        workload::Workload,
    },
};

/// Idle-time buckets (seconds) at the timeouts that kill pooled connections in practice:
/// AWS ALB 60 s, NLB 350 s, common proxy 900 s/1 h, MySQL `wait_timeout` 8 h.
const IDLE_BUCKETS: [f64; 14] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 350.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
    28800.0,
];

pub const OTHER: &str = "other";

/// Who a series is about: bounded by the cap.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Who {
    /// The process's name (its thread-group leader's comm), else the thread's.
    pub comm: String,
    /// Kubernetes namespace, pod and container (12-character id) when the process runs in
    /// one, else empty. Container ids change on every restart: the series cap bounds them.
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// A server's sockets: the listening port (`ephemeral` when it lies in that range);
    /// empty on a client's.
    pub local_port: String,
    /// A client's sockets: the peer's port when it is a server port, `ephemeral` or `none`
    /// otherwise; empty on a server's (the peers are its clients).
    pub remote_port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindWho {
    pub kind: String,
    /// Why the RST happened (bounded: a fixed vocabulary).
    pub cause: String,
    #[prometheus(flatten)]
    pub who: Who,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorWho {
    pub kind: String,
    pub error: String,
    #[prometheus(flatten)]
    pub who: Who,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub direction: String,
    /// `idle`, `active`, `close_wait` or `other`: a partition, so `sum` is the pool's
    /// sockets.
    pub state: String,
    #[prometheus(flatten)]
    pub who: Who,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolFlag {
    pub direction: String,
    /// `stalled`, `zombie` or `stranded`: sockets the detectors hold so, which also count
    /// in a state (and may carry two flags).
    pub flag: String,
    #[prometheus(flatten)]
    pub who: Who,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolWho {
    pub direction: String,
    #[prometheus(flatten)]
    pub who: Who,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Transition {
    from: String,
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MetricLabel {
    metric: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    kernel: String,
}

/// Label sets whose unbounded part can be folded into `other`.
pub trait Fold {
    #[must_use]
    fn folded(&self) -> Self;
}

impl Fold for Who {
    fn folded(&self) -> Self {
        Who {
            comm: OTHER.into(),
            namespace: OTHER.into(),
            pod: OTHER.into(),
            container: OTHER.into(),
            local_port: OTHER.into(),
            remote_port: OTHER.into(),
        }
    }
}

impl Fold for KindWho {
    fn folded(&self) -> Self {
        KindWho {
            kind: self.kind.clone(),
            cause: self.cause.clone(),
            who: self.who.folded(),
        }
    }
}

impl Fold for PoolLabels {
    fn folded(&self) -> Self {
        PoolLabels {
            direction: self.direction.clone(),
            state: self.state.clone(),
            who: self.who.folded(),
        }
    }
}

impl Fold for PoolFlag {
    fn folded(&self) -> Self {
        PoolFlag {
            direction: self.direction.clone(),
            flag: self.flag.clone(),
            who: self.who.folded(),
        }
    }
}

impl Fold for PoolWho {
    fn folded(&self) -> Self {
        PoolWho {
            direction: self.direction.clone(),
            who: self.who.folded(),
        }
    }
}

impl Fold for ErrorWho {
    fn folded(&self) -> Self {
        ErrorWho {
            kind: self.kind.clone(),
            error: self.error.clone(),
            who: self.who.folded(),
        }
    }
}

/// A family with a hard cap on distinct label sets, and the handle of each admitted one:
/// a finding then costs one lookup in a fast map, not a label-set hash (SipHash over every
/// label string) in the cap's set and again in the family's own map.
struct Capped<L, M> {
    name: &'static str,
    family: Family<L, M>,
    admitted: FastMap<L, M>,
}

impl<L: Clone + Hash + Eq + Fold, M: Clone> Capped<L, M> {
    /// Also starts the family's overflow count at 0: an alert on it needs the series before
    /// the first fold.
    fn new(
        name: &'static str,
        family: Family<L, M>,
        overflow: &Family<MetricLabel, Counter>,
    ) -> Self {
        overflow
            .get_or_create(&MetricLabel {
                metric: name.into(),
            })
            .inc_by(0);
        Capped {
            name,
            family,
            admitted: FastMap::default(),
        }
    }

    /// The series for `labels`, or for their folded form once the family is full (counted
    /// in `overflow`).
    fn series(&mut self, labels: L, max: usize, overflow: &Family<MetricLabel, Counter>) -> M {
        if let Some(metric) = self.admitted.get(&labels) {
            return metric.clone();
        }
        if self.admitted.len() < max {
            let metric = self.family.get_or_create(&labels).clone();
            self.admitted.insert(labels, metric.clone());
            return metric;
        }
        overflow
            .get_or_create(&MetricLabel {
                metric: self.name.into(),
            })
            .inc();
        self.family.get_or_create(&labels.folded()).clone()
    }

    /// Forgets every series (gauges rebuilt from scratch).
    fn clear(&mut self) {
        self.family.clear();
        self.admitted.clear();
    }
}

impl<L: Clone + Hash + Eq + Fold> Capped<L, Gauge> {
    /// Adds each part's count (a pool's states, or its flags) to its series.
    fn add_each(
        &mut self,
        parts: &[(&str, u32)],
        labels: impl Fn(&str) -> L,
        max: usize,
        overflow: &Family<MetricLabel, Counter>,
    ) {
        for &(part, count) in parts {
            self.series(labels(part), max, overflow)
                .inc_by(i64::from(count));
        }
    }
}

impl<L: Clone + Hash + Eq + Fold, M: Clone + Default> Capped<L, M> {
    fn empty(name: &'static str, overflow: &Family<MetricLabel, Counter>) -> Self {
        Capped::new(name, Family::default(), overflow)
    }
}

/// Counters the kernel keeps (per-CPU maps), read and encoded at scrape time, as
/// ebpf_exporter does: counting them costs no event and no userspace work per occurrence.
#[derive(Debug, Default)]
struct KernelCollector(OnceLock<KernelCounters>);

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut family = encoder.encode_descriptor(
            "connwatch_tcp_state_transitions",
            "TCP state changes, counted in the kernel (every socket on the node)",
            None,
            MetricType::Counter,
        )?;
        // Before the probes attach there is nothing to count; a failed map read leaves the
        // family empty for this scrape rather than failing every other family with it.
        let Some(Ok(transitions)) = self.0.get().map(KernelCounters::transitions) else {
            return Ok(());
        };
        for (old, new, count) in transitions {
            let labels = Transition {
                from: TcpState(old).name().into(),
                to: TcpState(new).name().into(),
            };
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// A metric listed from the first scrape: prometheus-client leaves out a family with no
/// series, HELP and TYPE included, so a family whose first series is a first incident
/// (a death, an overflow) was missing from dashboards, `absent()` and metadata until then.
#[derive(Debug)]
struct Listed<M>(M);

impl<M: EncodeMetric> EncodeMetric for Listed<M> {
    fn encode(&self, encoder: MetricEncoder) -> std::fmt::Result {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// A metric handle that can register a clone of itself (families and counters share
/// their storage between clones).
trait Registrable {
    fn register_in(&self, registry: &mut Registry, name: &str, help: &str);
}

impl<M: prometheus_client::registry::Metric + Clone> Registrable for M {
    fn register_in(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, Listed(self.clone()));
    }
}

/// What the metrics mirror each second, counted by the engine and its pipeline: plain
/// counts, so the sink never reaches back into the pipeline.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Sockets by state in the last socket list (every network namespace).
    pub sockets_by_state: HashMap<TcpState, usize>,
    /// Network namespaces the last refresh listed, and how long it took.
    pub namespaces: usize,
    pub refresh_took: Duration,
    pub undecodable: u64,
    /// Entries dropped from full tables.
    pub evictions: u64,
    /// Idle FINs and resets the application closed within the grace.
    pub fins_handled: u64,
    pub resets_handled: u64,
    /// Log lines stdout's reader did not take.
    pub log_lines_dropped: u64,
    pub refresh_errors: RefreshErrors,
}

/// Refreshes that failed, by what failed: each is said once on stderr, counted always.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RefreshErrors {
    /// The socket list (sock_diag): pools and stalls go stale.
    pub sock_diag: u64,
    /// The kubelet's pod list (`--kubelet-url`): pods go unnamed.
    pub kubelet: u64,
}

/// The label values of `connwatch_refresh_errors_total`.
const REFRESH_SOURCES: [&str; 2] = ["sock_diag", "kubelet"];

pub struct Metrics {
    max_series: usize,
    ephemeral_ports: RangeInclusive<u16>,
    resets: Capped<KindWho, Counter>,
    peer_reset_idle: Capped<Who, Histogram>,
    peer_close_idle: Capped<Who, Histogram>,
    used_after: Capped<ErrorWho, Counter>,
    close_wait_lingering: Capped<Who, Counter>,
    request_stalled: Capped<Who, Counter>,
    pool_exhaustions: Capped<Who, Counter>,
    pool_exhausted: Capped<PoolWho, Gauge>,
    pool_idle_limit: Capped<PoolWho, Gauge<f64, std::sync::atomic::AtomicU64>>,
    zombie_connections: Capped<Who, Counter>,
    pool_leaks: Capped<Who, Counter>,
    deaths: Capped<ErrorWho, Counter>,
    pool_sockets: Capped<PoolLabels, Gauge>,
    pool_flagged: Capped<PoolFlag, Gauge>,
    kernel: Arc<KernelCollector>,
    sockets: Family<StateLabel, Gauge>,
    namespaces: Gauge,
    refresh_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    events: Counter,
    undecodable: Counter,
    lost: Counter,
    evictions: Counter,
    log_lines_dropped: Counter,
    log_lines_suppressed: Family<KindLabel, Counter>,
    fins_handled: Counter,
    resets_handled: Counter,
    refresh_errors: Family<SourceLabel, Counter>,
    overflow: Family<MetricLabel, Counter>,
}

/// Milliseconds as a metric's seconds. Idle times and limits come from the kernel's 32-bit
/// millisecond stamps, so they convert exactly.
fn seconds(ms: u64) -> f64 {
    f64::from(u32::try_from(ms).unwrap_or(u32::MAX)) / 1000.0
}

/// A container id as a label: its first 12 characters, as `docker ps` and `crictl` show it.
fn container_label(id: Option<&str>) -> String {
    id.map(|id| id.chars().take(12).collect())
        .unwrap_or_default()
}

fn histogram() -> Histogram {
    Histogram::new(IDLE_BUCKETS)
}

impl Metrics {
    /// The metrics and the registry `/metrics` encodes (shared with the HTTP server).
    #[expect(
        clippy::too_many_lines,
        reason = "one entry per family, name and help: the registry read as one table"
    )]
    pub fn new(
        max_series: usize,
        ephemeral_ports: RangeInclusive<u16>,
        kernel: &str,
    ) -> (Metrics, Arc<Registry>) {
        let mut registry = Registry::default();
        let histograms = || Family::new_with_constructor(histogram as fn() -> Histogram);
        let overflow = Family::default();
        let metrics = Metrics {
            max_series,
            ephemeral_ports,
            resets: Capped::empty("connwatch_resets", &overflow),
            peer_reset_idle: Capped::new(
                "connwatch_peer_reset_idle_seconds",
                histograms(),
                &overflow,
            ),
            peer_close_idle: Capped::new(
                "connwatch_peer_close_idle_seconds",
                histograms(),
                &overflow,
            ),
            used_after: Capped::empty("connwatch_used_after_peer_end", &overflow),
            close_wait_lingering: Capped::empty("connwatch_close_wait_lingering", &overflow),
            request_stalled: Capped::empty("connwatch_request_stalled", &overflow),
            pool_exhaustions: Capped::empty("connwatch_pool_exhaustions", &overflow),
            pool_exhausted: Capped::empty("connwatch_pool_exhausted", &overflow),
            pool_idle_limit: Capped::empty("connwatch_pool_idle_limit_seconds", &overflow),
            zombie_connections: Capped::empty("connwatch_zombie_connections", &overflow),
            pool_leaks: Capped::empty("connwatch_pool_leaks", &overflow),
            deaths: Capped::empty("connwatch_silent_deaths", &overflow),
            pool_sockets: Capped::empty("connwatch_pool_sockets", &overflow),
            pool_flagged: Capped::empty("connwatch_pool_flagged_sockets", &overflow),
            kernel: Arc::new(KernelCollector::default()),
            sockets: Family::default(),
            namespaces: Gauge::default(),
            refresh_seconds: Gauge::default(),
            events: Counter::default(),
            undecodable: Counter::default(),
            lost: Counter::default(),
            evictions: Counter::default(),
            log_lines_dropped: Counter::default(),
            log_lines_suppressed: Family::default(),
            fins_handled: Counter::default(),
            resets_handled: Counter::default(),
            refresh_errors: Family::default(),
            overflow,
        };
        for source in REFRESH_SOURCES {
            metrics
                .refresh_errors
                .get_or_create(&SourceLabel { source })
                .inc_by(0);
        }
        registry.register(
            "connwatch_build",
            "connwatch version and the kernel it runs on",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
                kernel: kernel.into(),
            }),
        );
        let families = [
            (
                &metrics.resets.family as &dyn Registrable,
                "connwatch_resets",
                "TCP resets: received from the peer (peer_reset_idle, peer_reset) or sent (local_reset)",
            ),
            (
                &metrics.peer_reset_idle.family,
                "connwatch_peer_reset_idle_seconds",
                "How long sockets reset by their peer had been idle (peer_reset_idle)",
            ),
            (
                &metrics.peer_close_idle.family,
                "connwatch_peer_close_idle_seconds",
                "How long sockets closed by their peer (FIN) had been idle (peer_close_idle)",
            ),
            (
                &metrics.used_after.family,
                "connwatch_used_after_peer_end",
                "Application sends/reads on sockets the peer had reset or closed, by what they got",
            ),
            (
                &metrics.close_wait_lingering.family,
                "connwatch_close_wait_lingering",
                "Sockets left in CLOSE_WAIT past the threshold (the application never closed them)",
            ),
            (
                &metrics.request_stalled.family,
                "connwatch_request_stalled",
                "Requests sent and acknowledged that got no answer within the stall threshold",
            ),
            (
                &metrics.pool_exhaustions.family,
                "connwatch_pool_exhaustions",
                "Episodes of pool_exhausted: every established connection of a pool had a stalled request",
            ),
            (
                &metrics.pool_exhausted.family,
                "connwatch_pool_exhausted",
                "Pools exhausted now (every established connection stalled): 1 per pool, absent when none",
            ),
            (
                &metrics.pool_idle_limit.family,
                "connwatch_pool_idle_limit_seconds",
                "The idle time at which the pool's path kills connections, learned from clustered peer_reset_idle/peer_close_idle kills (README, Idle limits); absent until learned",
            ),
            (
                &metrics.zombie_connections.family,
                "connwatch_zombie_connections",
                "Accepted connections written to and acknowledged, silent inbound past the zombie threshold, while a newer one from the same peer is active",
            ),
            (
                &metrics.pool_leaks.family,
                "connwatch_pool_leaks",
                "Episodes of pool_leak: a pool's stranded connections (idle since just after they opened, while newer ones opened) kept growing",
            ),
            (
                &metrics.deaths.family,
                "connwatch_silent_deaths",
                "Connections the kernel killed with no RST or FIN (timeouts, unreachable), by error",
            ),
            (
                &metrics.pool_sockets.family,
                "connwatch_pool_sockets",
                "Sockets per pool (process, direction, server port) by state: idle, active (a request outstanding included), close_wait, other; the states sum to the pool's sockets",
            ),
            (
                &metrics.pool_flagged.family,
                "connwatch_pool_flagged_sockets",
                "A pool's sockets flagged stalled (request unanswered past the threshold), zombie or stranded (pool_leak); each also counts in connwatch_pool_sockets",
            ),
            (
                &metrics.sockets,
                "connwatch_sockets",
                "Open TCP sockets connwatch knows, by state",
            ),
            (
                &metrics.namespaces,
                "connwatch_network_namespaces",
                "Network namespaces whose sockets the last refresh listed",
            ),
            (
                &metrics.refresh_seconds,
                "connwatch_refresh_duration_seconds",
                "How long the last refresh took to list every namespace's sockets and their processes",
            ),
            (
                &metrics.events,
                "connwatch_events",
                "Kernel events processed",
            ),
            (
                &metrics.undecodable,
                "connwatch_undecodable_events",
                "Ring buffer records that did not decode (skipped)",
            ),
            (
                &metrics.lost,
                "connwatch_ring_buffer_lost_events",
                "Events the kernel dropped because the ring buffer was full",
            ),
            (
                &metrics.fins_handled,
                "connwatch_peer_closes_handled",
                "Idle connections the peer closed (FIN) whose application closed its end within the grace (200 ms): healthy, not reported",
            ),
            (
                &metrics.resets_handled,
                "connwatch_peer_resets_handled",
                "Idle connections the peer reset (RST) whose application closed its socket within the grace (200 ms): healthy, not reported",
            ),
            (
                &metrics.log_lines_dropped,
                "connwatch_log_lines_dropped",
                "Finding log lines dropped because stdout's reader did not keep up",
            ),
            (
                &metrics.log_lines_suppressed,
                "connwatch_log_lines_suppressed",
                "Finding log lines not written by the log rate limits (--log-burst, --log-rate, --log-max-rate), by kind: counted in log_suppressed lines",
            ),
            (
                &metrics.evictions,
                "connwatch_table_evictions",
                "Entries forgotten, or events not counted, to keep connwatch's tables bounded (--max-tracked-sockets, rate windows)",
            ),
            (
                &metrics.refresh_errors,
                "connwatch_refresh_errors",
                "Refreshes that failed, by source: sock_diag (the socket list: pools and stalls go stale), kubelet (its pod list: pods go unnamed)",
            ),
            (
                &metrics.overflow,
                "connwatch_label_overflow",
                "Observations folded into comm=\"other\" because a family hit --max-series",
            ),
        ];
        for (metric, name, help) in families {
            metric.register_in(&mut registry, name, help);
        }
        registry.register_collector(Box::new(metrics.kernel.clone()));
        registry.register_collector(Box::<super::process_metrics::ProcessCollector>::default());
        (metrics, Arc::new(registry))
    }

    pub fn event(&mut self, _event: &Event) {
        self.events.inc();
    }

    /// Serves the kernel's own counters from now on (they exist once the probes attach).
    pub fn serve_kernel_counters(&self, counters: KernelCounters) {
        let _ = self.kernel.0.set(counters);
    }

    /// Counts `finding`; returns its labels' `who`, for the caller's own keys.
    pub fn finding(&mut self, finding: &Finding) -> Who {
        let who = self.who(finding);
        self.count(finding, who.clone());
        who
    }

    fn count(&mut self, finding: &Finding, who: Who) {
        let max = self.max_series;
        let idle_s = finding.event.idle_ms().map(seconds);
        match finding.kind {
            Kind::PeerResetIdle | Kind::PeerReset | Kind::LocalReset => {
                let labels = KindWho {
                    kind: finding.kind.as_str().into(),
                    cause: finding.cause.clone().unwrap_or_default(),
                    who: who.clone(),
                };
                self.resets.series(labels, max, &self.overflow).inc();
                if let (Kind::PeerResetIdle, Some(idle)) = (finding.kind, idle_s) {
                    self.peer_reset_idle
                        .series(who, max, &self.overflow)
                        .observe(idle);
                }
            }
            Kind::PeerCloseIdle => {
                if let Some(idle) = idle_s {
                    self.peer_close_idle
                        .series(who, max, &self.overflow)
                        .observe(idle);
                }
            }
            Kind::UsedAfterReset | Kind::UsedAfterClose => {
                let error = finding.event.io.map_or("none", |io| io.outcome());
                let labels = ErrorWho {
                    kind: finding.kind.as_str().into(),
                    error: error.into(),
                    who,
                };
                self.used_after.series(labels, max, &self.overflow).inc();
            }
            Kind::CloseWaitLingering => {
                self.close_wait_lingering
                    .series(who, max, &self.overflow)
                    .inc();
            }
            Kind::RequestStalled => {
                self.request_stalled.series(who, max, &self.overflow).inc();
            }
            Kind::PoolExhausted => {
                self.pool_exhaustions.series(who, max, &self.overflow).inc();
            }
            Kind::PoolLeak => {
                self.pool_leaks.series(who, max, &self.overflow).inc();
            }
            Kind::ZombieConnection => {
                self.zombie_connections
                    .series(who, max, &self.overflow)
                    .inc();
            }
            Kind::SilentDeath => {
                let labels = ErrorWho {
                    kind: finding.kind.as_str().into(),
                    error: crate::events::errno_name(finding.event.sk_err).into(),
                    who,
                };
                self.deaths.series(labels, max, &self.overflow).inc();
            }
            // Gauges tell these: an exhausted pool's ended, a leak's stranded connections
            // plateau.
            Kind::PoolRecovered | Kind::PoolLeakExhausted | Kind::StateChange => {}
        }
    }

    /// Pool gauges, rebuilt from each refresh (pools come and go).
    pub fn pools(&mut self, pools: &[Pool]) {
        self.pool_sockets.clear();
        self.pool_flagged.clear();
        self.pool_exhausted.clear();
        self.pool_idle_limit.clear();
        // A pool with no socket (only recent connects, resets or deaths) has no gauge.
        for pool in pools.iter().filter(|pool| pool.total > 0) {
            // An inbound pool is named by its listening endpoint.
            let who = self.who_of(
                &pool.comm,
                &pool.workload,
                pool.direction == Direction::Inbound,
                pool.endpoint.port(),
                pool.endpoint.port(),
            );
            let direction = pool.direction.as_str();
            // A stalled socket has a request outstanding: it is active.
            let states = [
                ("idle", pool.idle),
                ("active", pool.active + pool.stalled),
                ("close_wait", pool.close_wait),
                ("other", pool.other),
            ];
            self.pool_sockets.add_each(
                &states,
                |state| PoolLabels {
                    direction: direction.into(),
                    state: state.into(),
                    who: who.clone(),
                },
                self.max_series,
                &self.overflow,
            );
            let flags = [
                ("stalled", pool.stalled),
                ("zombie", pool.zombie),
                ("stranded", pool.stranded),
            ];
            self.pool_flagged.add_each(
                &flags,
                |flag| PoolFlag {
                    direction: direction.into(),
                    flag: flag.into(),
                    who: who.clone(),
                },
                self.max_series,
                &self.overflow,
            );
            if pool.exhausted {
                let labels = PoolWho {
                    direction: pool.direction.as_str().into(),
                    who: who.clone(),
                };
                // inc, not set: a folded `other` series counts its pools.
                self.pool_exhausted
                    .series(labels, self.max_series, &self.overflow)
                    .inc();
            }
            if let Some(limit_ms) = pool.idle_limit_ms {
                let labels = PoolWho {
                    direction: pool.direction.as_str().into(),
                    who: who.clone(),
                };
                let limit = seconds(limit_ms);
                let gauge = self
                    .pool_idle_limit
                    .series(labels, self.max_series, &self.overflow);
                // A folded `other` series keeps the shortest limit: the one that bites first.
                let current = gauge.get();
                gauge.set(if current > 0.0 {
                    current.min(limit)
                } else {
                    limit
                });
            }
        }
    }

    /// A finding the log rate limits kept off stdout.
    pub fn log_suppressed(&self, kind: &str) {
        self.log_lines_suppressed
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    pub fn lost(&mut self, count: u64) {
        self.lost.inc_by(count);
    }

    /// Gauges and counters that mirror the engine's own counts.
    pub fn tick(&mut self, stats: &Stats) {
        for state in TcpState::known() {
            let count = stats.sockets_by_state.get(&state).copied().unwrap_or(0);
            self.sockets
                .get_or_create(&StateLabel {
                    state: state.name().into(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        self.namespaces
            .set(i64::try_from(stats.namespaces).unwrap_or(i64::MAX));
        self.refresh_seconds.set(stats.refresh_took.as_secs_f64());
        let refresh_errors = [
            (REFRESH_SOURCES[0], stats.refresh_errors.sock_diag),
            (REFRESH_SOURCES[1], stats.refresh_errors.kubelet),
        ];
        let refresh_errors = refresh_errors.map(|(source, count)| {
            (
                self.refresh_errors
                    .get_or_create(&SourceLabel { source })
                    .clone(),
                count,
            )
        });
        let totals = [
            (&self.undecodable, stats.undecodable),
            (&self.evictions, stats.evictions),
            (&self.fins_handled, stats.fins_handled),
            (&self.resets_handled, stats.resets_handled),
            (&self.log_lines_dropped, stats.log_lines_dropped),
        ];
        // Counters of totals kept elsewhere: each tick adds what is new.
        for (counter, total) in totals.into_iter().chain(
            refresh_errors
                .iter()
                .map(|(counter, total)| (counter, *total)),
        ) {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    fn who(&self, finding: &Finding) -> Who {
        let thread = finding
            .owner
            .as_ref()
            .map_or("unknown", |owner| &*owner.comm);
        let event = &finding.event;
        self.who_of(
            thread,
            &finding.workload,
            finding.inbound,
            event.local.port(),
            event.remote.port(),
        )
    }

    /// The labels of a process's sockets: its name (the thread's, `comm`, when the process
    /// is gone), its workload, and the server's port on the side it is on.
    fn who_of(
        &self,
        comm: &str,
        workload: &Workload,
        inbound: bool,
        local_port: u16,
        remote_port: u16,
    ) -> Who {
        let port = |port| port_label(port, &self.ephemeral_ports);
        let (local_port, remote_port) = if inbound {
            (port(local_port), String::new())
        } else {
            (String::new(), port(remote_port))
        };
        Who {
            comm: workload.process.as_deref().unwrap_or(comm).to_string(),
            namespace: workload.namespace.clone().unwrap_or_default(),
            pod: workload.pod.clone().unwrap_or_default(),
            container: container_label(workload.container.as_deref()),
            local_port,
            remote_port,
        }
    }
}

/// A port is a label only when it cannot be a client's ephemeral port.
pub fn port_label(port: u16, ephemeral: &RangeInclusive<u16>) -> String {
    match port {
        0 => "none".into(),
        port if ephemeral.contains(&port) => "ephemeral".into(),
        port => port.to_string(),
    }
}

/// This host's ephemeral port range (`net.ipv4.ip_local_port_range`), Linux's default if
/// unreadable.
pub fn ephemeral_ports(proc_root: &std::path::Path) -> RangeInclusive<u16> {
    let path = proc_root.join("sys/net/ipv4/ip_local_port_range");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some(parts.next()??..=parts.next()??)
        })
        .unwrap_or(32768..=60999)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{from_raw, tests::raw_reset};
    use crate::sockets::pools::Direction;

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    fn idle_reset(comm: &str, idle_ms: u32) -> Finding {
        let event = from_raw(&raw_reset(idle_ms)).unwrap();
        let mut owner = event.owner.clone().unwrap();
        owner.comm = comm.into();
        Finding::new(Kind::PeerResetIdle, &event, Some(&owner))
    }

    #[test]
    fn names_and_labels() {
        let (mut metrics, registry) = Metrics::new(100, 32768..=60999, "6.18.0");
        metrics.finding(&idle_reset("psql", 90_000));
        let text = encode(&registry);
        assert!(
            text.contains(
                r#"connwatch_resets_total{kind="peer_reset_idle",cause="",comm="psql",namespace="",pod="",container="",local_port="",remote_port="5432"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"connwatch_peer_reset_idle_seconds_bucket{le="60.0",comm="psql",namespace="",pod="",container="",local_port="",remote_port="5432"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"connwatch_peer_reset_idle_seconds_bucket{le="120.0",comm="psql",namespace="",pod="",container="",local_port="",remote_port="5432"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"connwatch_peer_reset_idle_seconds_sum{comm="psql",namespace="",pod="",container="",local_port="",remote_port="5432"} 90.0"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"connwatch_build_info{version="0.1.0",kernel="6.18.0"} 1"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
        assert!(!text.contains("pid"), "pids are never labels: {text}");
    }

    /// Every family the README lists, as a scrape sees it before connwatch has found
    /// anything: dashboards, `absent()` and metadata need them from the start, and an alert
    /// on overflow needs each family's count at 0.
    #[test]
    fn every_family_is_listed_from_the_first_scrape() {
        let (_metrics, registry) = Metrics::new(100, 32768..=60999, "k");
        let text = encode(&registry);
        for family in [
            "# TYPE connwatch_build info",
            "# TYPE connwatch_resets counter",
            "# TYPE connwatch_silent_deaths counter",
            "# TYPE connwatch_peer_reset_idle_seconds histogram",
            "# TYPE connwatch_peer_close_idle_seconds histogram",
            "# TYPE connwatch_used_after_peer_end counter",
            "# TYPE connwatch_close_wait_lingering counter",
            "# TYPE connwatch_request_stalled counter",
            "# TYPE connwatch_zombie_connections counter",
            "# TYPE connwatch_pool_leaks counter",
            "# TYPE connwatch_pool_sockets gauge",
            "# TYPE connwatch_pool_flagged_sockets gauge",
            "# TYPE connwatch_pool_exhaustions counter",
            "# TYPE connwatch_pool_exhausted gauge",
            "# TYPE connwatch_pool_idle_limit_seconds gauge",
            "# TYPE connwatch_tcp_state_transitions counter",
            "# TYPE connwatch_sockets gauge",
            "# TYPE connwatch_network_namespaces gauge",
            "# TYPE connwatch_refresh_duration_seconds gauge",
            "# TYPE connwatch_events counter",
            "# TYPE connwatch_undecodable_events counter",
            "# TYPE connwatch_ring_buffer_lost_events counter",
            "# TYPE connwatch_table_evictions counter",
            "# TYPE connwatch_log_lines_dropped counter",
            "# TYPE connwatch_log_lines_suppressed counter",
            "# TYPE connwatch_peer_closes_handled counter",
            "# TYPE connwatch_peer_resets_handled counter",
            "# TYPE connwatch_label_overflow counter",
            "# TYPE connwatch_refresh_errors counter",
            "connwatch_refresh_errors_total{source=\"sock_diag\"} 0\n",
            "connwatch_refresh_errors_total{source=\"kubelet\"} 0\n",
            "# HELP connwatch_silent_deaths Connections the kernel killed",
            "# HELP connwatch_pool_flagged_sockets A pool's sockets flagged",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
        for metric in [
            "connwatch_resets",
            "connwatch_silent_deaths",
            "connwatch_peer_reset_idle_seconds",
            "connwatch_peer_close_idle_seconds",
            "connwatch_used_after_peer_end",
            "connwatch_close_wait_lingering",
            "connwatch_request_stalled",
            "connwatch_zombie_connections",
            "connwatch_pool_leaks",
            "connwatch_pool_sockets",
            "connwatch_pool_flagged_sockets",
            "connwatch_pool_exhaustions",
            "connwatch_pool_exhausted",
            "connwatch_pool_idle_limit_seconds",
        ] {
            let zero = format!(r#"connwatch_label_overflow_total{{metric="{metric}"}} 0"#);
            assert!(text.contains(&zero), "{zero} missing:\n{text}");
        }
        // Each TYPE once: listed, not duplicated.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let names: std::collections::HashSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(types, names.len(), "{text}");
    }

    /// Totals kept by the engine become counters that rise by what is new at each tick.
    #[test]
    fn a_tick_mirrors_the_engine_counts() {
        let (mut metrics, registry) = Metrics::new(100, 32768..=60999, "k");
        let mut stats = Stats {
            sockets_by_state: [(TcpState::ESTABLISHED, 3)].into_iter().collect(),
            namespaces: 2,
            undecodable: 1,
            refresh_errors: RefreshErrors {
                sock_diag: 2,
                kubelet: 1,
            },
            ..Stats::default()
        };
        metrics.tick(&stats);
        stats.refresh_errors.sock_diag = 5;
        metrics.tick(&stats);
        let text = encode(&registry);
        for series in [
            "connwatch_sockets{state=\"ESTABLISHED\"} 3\n",
            "connwatch_sockets{state=\"LISTEN\"} 0\n",
            "connwatch_network_namespaces 2\n",
            "connwatch_undecodable_events_total 1\n",
            "connwatch_refresh_errors_total{source=\"sock_diag\"} 5\n",
            "connwatch_refresh_errors_total{source=\"kubelet\"} 1\n",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }

    /// Every family's series, each exercised once.
    #[test]
    fn every_family_is_exported() {
        use crate::events::tests::raw_send_after_reset;
        let (mut metrics, registry) = Metrics::new(100, 32768..=60999, "k");
        for kind in [
            Kind::PeerResetIdle,
            Kind::PeerReset,
            Kind::LocalReset,
            Kind::PeerCloseIdle,
            Kind::CloseWaitLingering,
            Kind::RequestStalled,
            Kind::PoolExhausted,
            Kind::PoolLeak,
            Kind::ZombieConnection,
            Kind::SilentDeath,
        ] {
            let mut finding = idle_reset("app", 5000);
            finding.kind = kind;
            metrics.finding(&finding);
        }
        let io = from_raw(&raw_send_after_reset()).unwrap();
        metrics.finding(&Finding::new(Kind::UsedAfterReset, &io, io.owner.as_ref()));
        let mut change = raw_reset(0);
        change.hook = monitor_common::hook::STATE_CHANGE;
        metrics.event(&from_raw(&change).unwrap());
        metrics.pools(&[Pool {
            pid: 1,
            comm: "app".into(),
            netns: 1,
            workload: Workload::default(),
            direction: Direction::Outbound,
            endpoint: "10.0.0.9:5432".parse().unwrap(),
            total: 1,
            established: 1,
            idle: 0,
            active: 0,
            close_wait: 0,
            other: 0,
            stalled: 1,
            exhausted: true,
            oldest_stall_ms: Some(12_000),
            oldest_stall: Some(1),
            zombie: 0,
            stranded: 0,
            max_idle_ms: Some(5000),
            idle_limit_ms: Some(300_000),
            connects_per_min: 0,
            resets_per_min: 0,
            deaths_per_min: 0,
        }]);
        metrics.tick(&Stats::default());
        metrics.lost(1);
        metrics.log_suppressed("peer_reset");
        let text = encode(&registry);
        for series in [
            "connwatch_log_lines_suppressed_total{kind=\"peer_reset\"} 1",
            "connwatch_resets_total{",
            "connwatch_silent_deaths_total{",
            "connwatch_peer_reset_idle_seconds_count{",
            "connwatch_peer_close_idle_seconds_count{",
            "connwatch_used_after_peer_end_total{",
            "connwatch_close_wait_lingering_total{",
            "connwatch_request_stalled_total{",
            "connwatch_zombie_connections_total{",
            "connwatch_pool_leaks_total{",
            "connwatch_pool_sockets{",
            "connwatch_pool_flagged_sockets{",
            "connwatch_pool_exhaustions_total{",
            "connwatch_pool_exhausted{direction=\"outbound\",comm=\"app\"",
            r#"connwatch_pool_idle_limit_seconds{direction="outbound",comm="app",namespace="",pod="",container="",local_port="",remote_port="5432"} 300.0"#,
            "connwatch_sockets{",
            "connwatch_events_total 1",
            "connwatch_ring_buffer_lost_events_total 1",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }

    #[test]
    fn workload_labels_when_known() {
        let (mut metrics, registry) = Metrics::new(100, 32768..=60999, "k");
        let mut finding = idle_reset("api", 2000);
        finding.workload.namespace = Some("payments".into());
        finding.workload.pod = Some("api-7d9f8b6c5-x2x9z".into());
        finding.workload.container =
            Some("5e1f7c3a9b2d4e6f8a0b1c3d5e7f9a1b3c5d7e9f1a3b5c7d9e1f3a5b7c9d1e3f".into());
        metrics.finding(&finding);
        let text = encode(&registry);
        assert!(
            text.contains(r#"comm="api",namespace="payments",pod="api-7d9f8b6c5-x2x9z",container="5e1f7c3a9b2d",local_port="",remote_port="5432""#),
            "{text}"
        );
    }

    #[test]
    fn pool_gauges_count_sockets_and_a_pool_without_any_has_none() {
        let (mut metrics, registry) = Metrics::new(100, 32768..=60999, "k");
        let endpoint = "10.0.0.9:5432".parse().unwrap();
        let mut holding = Pool::new(1, "app", 1, Direction::Outbound, endpoint);
        (
            holding.total,
            holding.established,
            holding.idle,
            holding.other,
        ) = (2, 1, 1, 1);
        let mut churning = Pool::new(2, "churn", 1, Direction::Outbound, endpoint);
        churning.resets_per_min = 1200;
        metrics.pools(&[holding, churning]);
        let text = encode(&registry);
        assert!(
            text.lines()
                .any(|l| l.starts_with("connwatch_pool_sockets{")
                    && l.contains(r#"comm="app""#)
                    && l.contains(r#"state="other""#)
                    && l.ends_with(" 1")),
            "{text}"
        );
        assert!(!text.contains(r#"comm="churn""#), "{text}");
    }

    /// `sum(connwatch_pool_sockets)` is the pool's sockets: a stalled socket counts once,
    /// as active, and is flagged in a family of its own.
    #[test]
    fn pool_states_partition_the_sockets_and_flags_are_apart() {
        let (mut metrics, registry) = Metrics::new(100, 32768..=60999, "k");
        let endpoint = "10.0.0.9:5432".parse().unwrap();
        let mut pool = Pool::new(1, "app", 1, Direction::Outbound, endpoint);
        (pool.idle, pool.active, pool.stalled) = (3, 2, 2);
        (pool.close_wait, pool.other) = (2, 1);
        pool.established = pool.idle + pool.active + pool.stalled;
        pool.total = pool.established + pool.close_wait + pool.other;
        (pool.zombie, pool.stranded) = (1, 2);
        metrics.pools(&[pool]);
        let text = encode(&registry);
        // By label value: the family's own order is its hash map's.
        let samples = |family: &str, label: &str| -> Vec<(String, f64)> {
            let mut samples: Vec<(String, f64)> = text
                .lines()
                .filter(|l| l.starts_with(&format!("{family}{{")))
                .map(|l| {
                    let value = l.rsplit_once(' ').unwrap().1.parse().unwrap();
                    let at = l.find(&format!(r#"{label}=""#)).unwrap() + label.len() + 2;
                    let name = l[at..].split('"').next().unwrap().to_string();
                    (name, value)
                })
                .collect();
            samples.sort_by(|a, b| a.0.cmp(&b.0));
            samples
        };
        let states = samples("connwatch_pool_sockets", "state");
        assert_eq!(
            states,
            [
                ("active".into(), 4.0),
                ("close_wait".into(), 2.0),
                ("idle".into(), 3.0),
                ("other".into(), 1.0)
            ],
            "{text}"
        );
        assert!((states.iter().map(|(_, v)| v).sum::<f64>() - 10.0).abs() < f64::EPSILON);
        let flags = samples("connwatch_pool_flagged_sockets", "flag");
        assert_eq!(
            flags,
            [
                ("stalled".into(), 2.0),
                ("stranded".into(), 2.0),
                ("zombie".into(), 1.0)
            ],
            "{text}"
        );
        assert!(
            text.contains(r#"connwatch_pool_flagged_sockets{direction="outbound",flag="stalled",comm="app",namespace="",pod="",container="",local_port="",remote_port="5432"} 2"#),
            "{text}"
        );
    }

    /// A server's series carry its listening port in `local_port`, and no client port.
    #[test]
    fn server_side_series_name_the_listening_port() {
        let (mut metrics, registry) = Metrics::new(100, 32768..=60999, "k");
        let listening = "10.0.0.1:8080".parse().unwrap();
        let mut pool = Pool::new(1, "api", 1, Direction::Inbound, listening);
        (pool.total, pool.established, pool.idle) = (1, 1, 1);
        metrics.pools(&[pool]);
        let mut finding = idle_reset("api", 90_000);
        finding.event.local = listening;
        finding.event.remote = "10.0.0.2:41000".parse().unwrap();
        finding.inbound = true;
        metrics.finding(&finding);
        let text = encode(&registry);
        assert!(
            text.contains(r#"connwatch_pool_sockets{direction="inbound",state="idle",comm="api",namespace="",pod="",container="",local_port="8080",remote_port=""} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"connwatch_resets_total{kind="peer_reset_idle",cause="",comm="api",namespace="",pod="",container="",local_port="8080",remote_port=""} 1"#),
            "{text}"
        );
        // A server listening in the ephemeral range: its port is no label either.
        finding.event.local = "10.0.0.1:40000".parse().unwrap();
        metrics.finding(&finding);
        let text = encode(&registry);
        assert!(
            text.contains(r#"comm="api",namespace="",pod="",container="",local_port="ephemeral",remote_port=""} 1"#),
            "{text}"
        );
    }

    /// One process is one series, whichever of its threads made the call.
    #[test]
    fn comm_is_the_process_name_else_the_thread_name() {
        let (mut metrics, registry) = Metrics::new(100, 32768..=60999, "k");
        for thread in ["worker-0", "worker-1", "worker-2"] {
            let mut finding = idle_reset(thread, 90_000);
            finding.workload.process = Some("myapp".into());
            metrics.finding(&finding);
        }
        // The process was gone by the time it was asked for: the thread's name.
        metrics.finding(&idle_reset("worker-3", 90_000));
        let text = encode(&registry);
        assert!(
            text.contains(r#"connwatch_resets_total{kind="peer_reset_idle",cause="",comm="myapp",namespace="",pod="",container="",local_port="",remote_port="5432"} 3"#),
            "{text}"
        );
        assert!(text.contains(r#"comm="worker-3""#), "{text}");
        assert!(!text.contains(r#"comm="worker-0""#), "{text}");
    }

    #[test]
    fn cardinality_cap_folds_into_other() {
        let (mut metrics, registry) = Metrics::new(2, 32768..=60999, "k");
        for comm in ["a", "b", "c", "d", "a"] {
            metrics.finding(&idle_reset(comm, 2000));
        }
        let text = encode(&registry);
        let resets: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("connwatch_resets_total"))
            .collect();
        assert_eq!(resets.len(), 3, "two admitted series and other: {resets:?}");
        assert!(text.contains(r#"connwatch_resets_total{kind="peer_reset_idle",cause="",comm="other",namespace="other",pod="other",container="other",local_port="other",remote_port="other"} 2"#), "{text}");
        assert!(
            text.contains(
                r#"connwatch_resets_total{kind="peer_reset_idle",cause="",comm="a",namespace="",pod="",container="",local_port="",remote_port="5432"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"connwatch_label_overflow_total{metric="connwatch_resets"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn ports_become_labels_only_outside_the_ephemeral_range() {
        let range = 32768..=60999;
        assert_eq!(port_label(5432, &range), "5432");
        assert_eq!(port_label(443, &range), "443");
        assert_eq!(port_label(40000, &range), "ephemeral");
        assert_eq!(port_label(0, &range), "none");
        assert_eq!(port_label(61000, &range), "61000");
    }

    #[test]
    fn reads_the_host_port_range() {
        let range = ephemeral_ports(std::path::Path::new("/proc"));
        assert!(range.start() < range.end());
        let missing = ephemeral_ports(std::path::Path::new("/nonexistent"));
        assert_eq!(missing, 32768..=60999);
    }
}
