//! `connwatch daemon`: the node agent. Serves `/metrics`, `/healthz` and `/readyz`, and logs
//! every finding as one JSON line on stdout (the `watch --json` schema).
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

use crate::{
    args::PipelineArgs,
    detect::{Finding, Kind},
    engine::{Consumer, Engine, Flow, Shutdown, Streams},
    events::Event,
    http::{self, HttpMetrics, Limits},
    pipeline::Pipeline,
    probes::ProbeOptions,
    sinks::{
        Loss, Report, Sink, WallClock,
        json::JsonSink,
        metrics::{Metrics, ephemeral_ports},
    },
    sockets::pools::Pool,
    watch::output_closed,
};

pub const DEFAULT_LISTEN: &str = "0.0.0.0:9964";

/// `/healthz` turns 503 when the event loop has not ticked for this long.
const STALL_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub probes: ProbeOptions,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "CONNWATCH_LISTEN", value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Log every finding as a JSON line on stdout.
    #[arg(long, env = "CONNWATCH_LOG_EVENTS", value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub log_events: bool,
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
        let now = self.started.elapsed().as_millis() as u64;
        self.last_tick_ms.store(now, Ordering::SeqCst);
    }

    /// Healthy while the probes are attached and the loop reading events is alive.
    pub fn healthy(&self) -> Result<(), &'static str> {
        if !self.attached.load(Ordering::SeqCst) {
            return Err("probes not attached");
        }
        let now = self.started.elapsed().as_millis() as u64;
        let since = now.saturating_sub(self.last_tick_ms.load(Ordering::SeqCst));
        if since > STALL_LIMIT.as_millis() as u64 {
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

struct DaemonConsumer {
    metrics: Metrics,
    log: Option<JsonSink<crate::output::Queued>>,
    health: Arc<Health>,
    clock: WallClock,
    findings: u64,
}

impl Consumer for DaemonConsumer {
    fn event(&mut self, event: &Event) {
        self.metrics.event(event);
    }

    fn finding(&mut self, finding: &Finding) -> Result<Flow> {
        self.findings += 1;
        self.metrics.finding(finding);
        if let Some(log) = &mut self.log
            && finding.kind != Kind::StateChange
            && let Err(err) = log.finding(&Report::new(finding, &self.clock))
        {
            // Logs are optional; a closed stdout must not stop the metrics.
            if let Flow::Stop = output_closed(err)? {
                self.log = None;
            }
        }
        Ok(Flow::Continue)
    }

    fn lost(&mut self, loss: &Loss) -> Result<Flow> {
        self.metrics.lost(loss.count);
        Ok(Flow::Continue)
    }

    fn tick(&mut self, pipeline: &Pipeline) {
        self.metrics.tick(pipeline);
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
        health: health.clone(),
        clock: engine.clock,
        findings: 0,
    };
    let outcome = engine.run(&mut consumer, shutdown.received()).await;
    health.set_attached(false);
    server.abort();
    log::info!("{}", engine.summary(consumer.findings));
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
        let started = Instant::now() - STALL_LIMIT - Duration::from_secs(1);
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
