//! `connwatch daemon`: the node agent. Serves `/metrics`, `/healthz` and `/readyz`, and logs
//! findings as JSON lines on stdout (the `watch --json` schema), rate-limited per
//! aggregation key with the suppressed ones counted (`log_suppressed` lines).
use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::{
    args::PipelineArgs,
    bounds::millis,
    common::{Shutdown, output_closed},
    detect::{Finding, Kind},
    engine::{Consumer, Engine, Flow, Streams},
    events::Event,
    http::{self, HttpMetrics, Limits},
    probes::ProbeOptions,
    sinks::{
        Loss, Report, WallClock,
        json::JsonSink,
        metrics::{KindWho, Metrics, Stats, ephemeral_ports},
        ratelimit::{LimitConfig, LogLimiter, Suppressed, Verdict},
    },
    sockets::pools::Pool,
};

pub const DEFAULT_LISTEN: &str = "0.0.0.0:9964";

/// `/healthz` turns 503 when the event loop has not ticked for this long.
const STALL_LIMIT: Duration = Duration::from_secs(5);

/// Aggregation keys the log rate limits remember (a few hundred bytes each).
const LOG_KEYS: usize = 4096;

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub probes: ProbeOptions,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "CONNWATCH_LISTEN", value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Log findings as JSON lines on stdout (within --log-burst, --log-rate, --log-max-rate).
    #[arg(long, env = "CONNWATCH_LOG_EVENTS", value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub log_events: bool,
    /// Log lines per aggregation key (kind, cause, process, workload, peer port) before
    /// --log-rate applies.
    #[arg(long, env = "CONNWATCH_LOG_BURST", value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub log_burst: u32,
    /// Log lines per aggregation key per minute after its burst; the rest are counted
    /// into a `log_suppressed` line.
    #[arg(long, env = "CONNWATCH_LOG_RATE", value_name = "PER_MIN", default_value_t = 6,
          value_parser = clap::value_parser!(u32).range(1..=600_000))]
    pub log_rate: u32,
    /// Log lines per second in total, whatever their keys.
    #[arg(long, env = "CONNWATCH_LOG_MAX_RATE", value_name = "PER_SEC", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub log_max_rate: u32,
    /// At most this many label sets per metric family; more fold into comm="other".
    #[arg(long, env = "CONNWATCH_MAX_SERIES", value_name = "N", default_value_t = 2000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_series: u32,
}

/// What `/healthz` and `/readyz` answer from.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    attached: AtomicBool,
    /// Milliseconds after `started` of the event loop's last tick.
    last_tick_ms: AtomicU64,
}

impl Health {
    pub fn new() -> Health {
        Health {
            started: Instant::now(),
            attached: AtomicBool::new(false),
            last_tick_ms: AtomicU64::new(0),
        }
    }

    pub fn set_attached(&self, attached: bool) {
        self.tick();
        self.attached.store(attached, Ordering::SeqCst);
    }

    pub fn tick(&self) {
        let now = millis(self.started.elapsed());
        self.last_tick_ms.store(now, Ordering::SeqCst);
    }

    /// Healthy while the probes are attached and the loop reading events is alive.
    pub fn healthy(&self) -> Result<(), &'static str> {
        if !self.attached.load(Ordering::SeqCst) {
            return Err("probes not attached");
        }
        let now = millis(self.started.elapsed());
        let since = now.saturating_sub(self.last_tick_ms.load(Ordering::SeqCst));
        if since > millis(STALL_LIMIT) {
            return Err("event loop stalled");
        }
        Ok(())
    }

    pub fn ready(&self) -> bool {
        self.attached.load(Ordering::SeqCst)
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

#[derive(Clone)]
struct Shared {
    registry: Arc<Registry>,
    health: Arc<Health>,
}

async fn serve_metrics(State(shared): State<Shared>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &shared.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics: {err}\n"),
        ),
    }
}

async fn healthz(State(shared): State<Shared>) -> impl IntoResponse {
    match shared.health.healthy() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn readyz(State(shared): State<Shared>) -> impl IntoResponse {
    if shared.health.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "probes not attached yet\n")
    }
}

/// Adds the HTTP server's families to the registry `Metrics::new` just made: it hands over
/// the only reference, so the registry is still ours to change.
fn register_http(registry: &mut Arc<Registry>, http: &HttpMetrics) {
    let registry = Arc::get_mut(registry).expect("Metrics::new keeps no reference to its registry");
    http.register(registry);
}

/// Binds first, so a taken port fails before anything is loaded into the kernel.
fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    http::bind(addr).map_err(|err| match err.kind() {
        io::ErrorKind::AddrInUse => anyhow!(
            "cannot listen on {addr}: the port is in use (another connwatch daemon?): \
             stop that process or pick another address with --listen"
        ),
        io::ErrorKind::AddrNotAvailable => anyhow!(
            "cannot listen on {addr}: no such local address: use 0.0.0.0 or an address of \
             this host with --listen"
        ),
        _ => anyhow!("cannot listen on {addr}: {err}"),
    })
}

/// The line standing for a key's findings the log rate limits held back.
#[derive(Debug, Serialize)]
struct SuppressedLine<'a> {
    ts: String,
    kind: &'static str,
    /// The kind of the findings not logged.
    finding: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    cause: &'a str,
    comm: &'a str,
    namespace: &'a str,
    pod: &'a str,
    container: &'a str,
    /// A server's findings: its listening port (and `remote_port` empty), as in the metrics.
    #[serde(skip_serializing_if = "str::is_empty")]
    local_port: &'a str,
    remote_port: &'a str,
    suppressed: u64,
    /// When the first and the last of them were found.
    since: String,
    until: String,
}

impl<'a> SuppressedLine<'a> {
    fn new(key: &'a KindWho, held: &Suppressed, clock: &WallClock) -> SuppressedLine<'a> {
        let ts = |mono_ns| humantime::format_rfc3339_micros(clock.at(mono_ns)).to_string();
        SuppressedLine {
            ts: ts(clock.mono_now_ns()),
            kind: "log_suppressed",
            finding: &key.kind,
            cause: &key.cause,
            comm: &key.who.comm,
            namespace: &key.who.namespace,
            pod: &key.who.pod,
            container: &key.who.container,
            local_port: &key.who.local_port,
            remote_port: &key.who.remote_port,
            suppressed: held.count,
            since: ts(held.first_ns),
            until: ts(held.last_ns),
        }
    }
}

struct DaemonConsumer {
    metrics: Metrics,
    log: Option<JsonSink<crate::output::Queued>>,
    limiter: LogLimiter<KindWho>,
    suppressed: u64,
    health: Arc<Health>,
    clock: WallClock,
    findings: u64,
}

impl DaemonConsumer {
    /// One log line; logs are optional, so a closed stdout stops them, not the metrics.
    fn write(&mut self, record: &impl Serialize) -> Result<()> {
        if let Some(log) = &mut self.log
            && let Err(err) = log.record(record)
            && let Flow::Stop = output_closed(err)?
        {
            self.log = None;
        }
        Ok(())
    }

    fn summaries(&mut self, summaries: &[(KindWho, Suppressed)]) -> Result<()> {
        for (key, held) in summaries {
            self.write(&SuppressedLine::new(key, held, &self.clock))?;
        }
        Ok(())
    }
}

impl Consumer for DaemonConsumer {
    fn event(&mut self, event: &Event) {
        self.metrics.event(event);
    }

    fn finding(&mut self, finding: &Finding) -> Result<Flow> {
        self.findings += 1;
        let who = self.metrics.finding(finding);
        if self.log.is_none() || finding.kind == Kind::StateChange {
            return Ok(Flow::Continue);
        }
        let key = KindWho {
            kind: finding.kind.as_str().into(),
            cause: finding.cause.clone().unwrap_or_default(),
            who,
        };
        // Limited by when lines are written, not by the findings' own (possibly older) time.
        match self.limiter.admit(&key, self.clock.mono_now_ns()) {
            Verdict::Suppress => {
                self.suppressed += 1;
                self.metrics.log_suppressed(&key.kind);
            }
            Verdict::Log(held) => {
                self.summaries(&held.map(|held| (key, held)).into_iter().collect::<Vec<_>>())?;
                self.write(&Report::new(finding, &self.clock))?;
            }
        }
        Ok(Flow::Continue)
    }

    fn poll(&mut self, mono_now_ns: u64) -> Result<Flow> {
        let due = self.limiter.due(mono_now_ns);
        self.summaries(&due)?;
        Ok(Flow::Continue)
    }

    fn finish(&mut self) -> Result<()> {
        let held = self.limiter.drain();
        self.summaries(&held)
    }

    fn lost(&mut self, loss: &Loss) -> Result<Flow> {
        self.metrics.lost(loss.count);
        Ok(Flow::Continue)
    }

    fn tick(&mut self, stats: &Stats) {
        self.metrics.tick(stats);
        self.health.tick();
    }

    fn pools(&mut self, pools: &[Pool]) -> Result<Flow> {
        self.metrics.pools(pools);
        Ok(Flow::Continue)
    }
}

pub async fn run(args: DaemonArgs) -> Result<()> {
    let listener = bind(args.listen)?;
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let (metrics, mut registry) = Metrics::new(
        args.max_series as usize,
        ephemeral_ports(&args.pipeline.host_proc),
        &kernel,
    );
    let http_metrics = HttpMetrics::default();
    register_http(&mut registry, &http_metrics);
    let health = Arc::new(Health::new());
    let app = Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Shared {
            registry,
            health: health.clone(),
        });
    let server = tokio::spawn(http::serve(
        listener,
        app,
        Limits::default(),
        http_metrics.clone(),
    ));

    let mut engine = Engine::start(&args.probes, &args.pipeline, &Streams::default())?;
    if let Some(counters) = engine.take_kernel_counters() {
        metrics.serve_kernel_counters(counters);
    }
    let shutdown = Shutdown::install()?;
    health.set_attached(true);
    log::info!("serving /metrics, /healthz and /readyz on {}", args.listen);
    log::info!("watching");
    let mut consumer = DaemonConsumer {
        metrics,
        log: args
            .log_events
            .then(|| JsonSink::new(crate::output::stdout().writer())),
        limiter: LogLimiter::new(
            LimitConfig {
                burst: args.log_burst,
                per_min: args.log_rate,
                total_per_sec: args.log_max_rate,
                max_keys: LOG_KEYS,
            },
            engine.clock.mono_now_ns(),
        ),
        suppressed: 0,
        health: health.clone(),
        clock: engine.clock,
        findings: 0,
    };
    let outcome = engine.run(&mut consumer, shutdown.received()).await;
    health.set_attached(false);
    server.abort();
    log::info!("{}", engine.summary(consumer.findings));
    if consumer.suppressed > 0 {
        log::info!(
            "log rate limits: {} findings not logged (counted in log_suppressed lines), \
             {} keys forgotten to stay bounded",
            consumer.suppressed,
            consumer.limiter.evictions
        );
    }
    if let Some(line) = http_metrics.summary() {
        log::info!("{line}");
    }
    drop(engine); // detaches the programs before exit
    outcome.context("event loop")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_attach_and_ticks() {
        let health = Health::new();
        assert_eq!(health.healthy(), Err("probes not attached"));
        assert!(!health.ready());
        health.set_attached(true);
        assert_eq!(health.healthy(), Ok(()));
        assert!(health.ready());
        // A loop that stopped ticking is unhealthy while still attached.
        health.last_tick_ms.store(0, Ordering::SeqCst);
        let started = Instant::now()
            .checked_sub(STALL_LIMIT + Duration::from_secs(1))
            .unwrap();
        let stalled = Health {
            started,
            attached: AtomicBool::new(true),
            last_tick_ms: AtomicU64::new(0),
        };
        assert_eq!(stalled.healthy(), Err("event loop stalled"));
    }

    #[test]
    fn http_metrics_join_the_registry_metrics_serves() {
        let (_metrics, mut registry) = Metrics::new(10, 32768..=60999, "k");
        let http = HttpMetrics::default();
        register_http(&mut registry, &http);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("connwatch_http_connections_closed_total{reason=\"shed\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("connwatch_build_info{"), "{text}");
    }
}
