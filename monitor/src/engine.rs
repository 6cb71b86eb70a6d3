//! The event loop `watch` and `daemon` share: ring buffer → [`Pipeline`] → a [`Consumer`],
//! with the kernel's loss counter checked every second. Only what happens to findings
//! differs between the commands.
use std::{
    future::Future,
    os::fd::AsFd as _,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use monitor_common::Settings;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
    time::{MissedTickBehavior, interval},
};

use crate::{
    args::PipelineArgs,
    detect::Finding,
    events::Event,
    pipeline::Pipeline,
    probes::{ProbeOptions, Probes, filter::KernelFilter},
    resolver::{Resolver, SharedProcIndex},
    sinks::{
        Loss, WallClock,
        metrics::{RefreshErrors, Stats},
    },
    sockets::{
        diag::{self, Snapshot},
        pools::Pool,
        process::ProcIndex,
    },
};

/// How long a stopping command waits for findings still being attributed.
/// With [`crate::output::finish`]'s, it keeps a stop under 2 s however stuck a lookup.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Records read per turn of the event loop: under a flood the ring never empties, and a
/// signal, a tick or a snapshot must still get their turn.
const DRAIN_BATCH: usize = 4096;

/// How often the ring buffer is drained without a wakeup from the kernel.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

pub enum Flow {
    Continue,
    Stop,
}

/// What a command does with the pipeline's output.
pub trait Consumer {
    /// Every decoded event, before its findings.
    fn event(&mut self, _event: &Event) {}
    fn finding(&mut self, finding: &Finding) -> Result<Flow>;
    /// The kernel dropped more events.
    fn lost(&mut self, loss: &Loss) -> Result<Flow>;
    /// Once a second: the loop is alive, and what it counted.
    fn tick(&mut self, _stats: &Stats) {}
    /// After each sock_diag refresh.
    fn pools(&mut self, _pools: &[Pool]) -> Result<Flow> {
        Ok(Flow::Continue)
    }
    /// At every poll of the ring ([`POLL_INTERVAL`]), `mono_now_ns` being CLOCK_MONOTONIC
    /// now: for what waits for time to pass rather than for an event. Runs 200 times a
    /// second: cheap when there is nothing to do.
    fn poll(&mut self, _mono_now_ns: u64) -> Result<Flow> {
        Ok(Flow::Continue)
    }
    /// The loop ends (a stop, or the consumer said stop): write out what is still held.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// What the kernel streams to a command.
#[derive(Debug, Default)]
pub struct Streams {
    /// Every state change (`watch --all`), not only those the detectors need.
    pub state_changes: bool,
    /// `watch --pid/--comm/--port`, applied before events take ring-buffer space.
    pub filter: KernelFilter,
}

pub struct Engine {
    probes: Probes,
    ring: AsyncFd<RingBuf<MapData>>,
    pub pipeline: Pipeline,
    /// Findings go through it on their way to the consumer.
    resolver: Resolver,
    pub clock: WallClock,
    lost_total: u64,
    /// The kernel filter's flags, when one runs (`--port 5432`).
    filter: Option<String>,
    warned_undecodable: bool,
    /// Socket lists taken by the refresher thread.
    snapshots: mpsc::Receiver<Result<Snapshot, String>>,
    /// Socket lists the refresher could not take (`connwatch_refresh_errors_total`).
    refresh_errors: u64,
}

impl Engine {
    /// Attaches the probes; warnings about optional hooks go to stderr.
    pub fn start(
        probe_options: &ProbeOptions,
        pipeline: &PipelineArgs,
        streams: &Streams,
    ) -> Result<Engine> {
        let Streams {
            state_changes,
            filter,
        } = streams;
        let state_changes = *state_changes;
        crate::sockets::process::check_proc_root(&pipeline.host_proc)
            .map_err(anyhow::Error::msg)?;
        if pipeline.ignore_port.len() > crate::args::MAX_IGNORED_PORTS {
            anyhow::bail!(
                "{} ports given to --ignore-port, more than {}: ignore the few ports of long \
                 polls and streams, not ranges",
                pipeline.ignore_port.len(),
                crate::args::MAX_IGNORED_PORTS
            );
        }
        let settings = Settings {
            // A reader woken by the FIN or RST reads within milliseconds, as a healthy client
            // closes within them: the same grace, not the idle threshold (a pool's read a
            // second after the RST is its next query finding out).
            eof_grace_ns: crate::bounds::nanos(crate::detect::grace::HANDLED_GRACE),
            wakeup_bytes: u64::from(probe_options.ring_buffer_size / 16),
            all_state_changes: u64::from(state_changes),
            // Probes::attach decides these two: from what the kernel allows, from `filter`.
            io_marks: 0,
            filters: 0,
        };
        let (mut probes, events) = Probes::attach(
            probe_options,
            &settings,
            filter,
            pipeline.max_tracked_sockets,
            crate::probes::klog::wanted(),
        )?;
        let connects = probes.take_connects();
        let io_marks = probes.take_io_marks();
        log::info!(
            "on {}: {}",
            crate::probes::kernel_release(),
            crate::probes::describe(&probes.capabilities)
        );
        for warning in probes.warnings.iter().chain(&attribution_warning()) {
            log::warn!("{warning}");
        }
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until the
        // AsyncFd (and the RingBuf inside it) is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|err| err.into_parts().1)
            .context("registering the ring buffer with the event loop")?;
        let mut detect = pipeline.detect_config(state_changes);
        detect.rst_reasons.clone_from(&probes.rst_reasons);
        let processes: SharedProcIndex = std::sync::Arc::new(std::sync::Mutex::new(
            ProcIndex::new(pipeline.host_proc.clone()),
        ));
        Ok(Engine {
            probes,
            ring,
            pipeline: Pipeline::new(&detect, processes.clone()),
            resolver: Resolver::spawn(&pipeline.host_paths(), processes.clone())?,
            clock: WallClock::now(),
            lost_total: 0,
            filter: (filter.bits() != 0).then(|| filter.to_string()),
            warned_undecodable: false,
            snapshots: spawn_refresher(
                pipeline.refresh,
                &pipeline.host_paths(),
                processes,
                connects,
                io_marks,
            )?,
            refresh_errors: 0,
        })
    }

    /// The kernel's own counters (state transitions), for the metrics to read at scrape
    /// time; `None` once taken.
    pub fn take_kernel_counters(&mut self) -> Option<crate::probes::KernelCounters> {
        self.probes.take_counters()
    }

    /// Runs until `stop` resolves or the consumer says stop.
    pub async fn run(
        &mut self,
        consumer: &mut impl Consumer,
        stop: impl Future<Output = ()>,
    ) -> Result<()> {
        let mut upkeep = interval(Duration::from_secs(1));
        upkeep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The kernel wakes us only for a backlog; this bounds the delay of the rest.
        let mut poll = interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(MissedTickBehavior::Skip);
        tokio::pin!(stop);
        loop {
            let flow = tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard.context("waiting on the ring buffer")?;
                    let (flow, more) = drain(guard.get_inner_mut(), &mut self.pipeline, &mut self.resolver, consumer, &mut self.warned_undecodable)?;
                    if !more {
                        // Only once empty: with records left, the next turn reads on.
                        guard.clear_ready();
                    }
                    flow
                }
                _ = poll.tick() => {
                    // Read before the drain, and graces ended only once the ring is empty:
                    // the events stamped before `now` that could settle a grace (the
                    // application's close, its write) are in by then.
                    let now = self.clock.mono_now_ns();
                    let (flow, more) = drain(self.ring.get_mut(), &mut self.pipeline, &mut self.resolver, consumer, &mut self.warned_undecodable)?;
                    match flow {
                        Flow::Stop => Flow::Stop,
                        Flow::Continue if more => consumer.poll(now)?,
                        Flow::Continue => {
                            match deliver(self.pipeline.due(now), &mut self.resolver, consumer)? {
                                Flow::Stop => Flow::Stop,
                                Flow::Continue => consumer.poll(now)?,
                            }
                        }
                    }
                }
                Some(finding) = self.resolver.next() => consumer.finding(&finding)?,
                _ = upkeep.tick() => self.upkeep(consumer)?,
                Some(snapshot) = self.snapshots.recv() => self.apply(snapshot, consumer)?,
                () = &mut stop => {
                    // What the ring holds (one batch: a stop stays prompt under a flood),
                    // then idle FINs and resets still in their grace: the application held
                    // them to the end. Reported, not dropped.
                    let (flow, _) = drain(self.ring.get_mut(), &mut self.pipeline, &mut self.resolver, consumer, &mut self.warned_undecodable)?;
                    if let Flow::Continue = flow
                        && let Flow::Continue =
                            deliver(self.pipeline.due(u64::MAX), &mut self.resolver, consumer)?
                    {
                        self.flush(consumer).await?;
                    }
                    return consumer.finish();
                }
            };
            if let Flow::Stop = flow {
                return consumer.finish();
            }
        }
    }

    /// Delivers the findings still being attributed, waiting at most [`FLUSH_TIMEOUT`]:
    /// what was found before a stop is still reported.
    async fn flush(&mut self, consumer: &mut impl Consumer) -> Result<()> {
        let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
        while self.resolver.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, self.resolver.next()).await {
                Ok(Some(finding)) => {
                    if let Flow::Stop = consumer.finding(&finding)? {
                        break;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        Ok(())
    }

    fn upkeep(&mut self, consumer: &mut impl Consumer) -> Result<Flow> {
        let now = self.clock.mono_now_ns();
        if let Flow::Stop = deliver(self.pipeline.tick(now), &mut self.resolver, consumer)? {
            return Ok(Flow::Stop);
        }
        consumer.tick(&self.stats());
        let dropped = self.probes.lost_events()?;
        if dropped > self.lost_total {
            let count = dropped - self.lost_total;
            self.lost_total = dropped;
            let loss = Loss {
                at: SystemTime::now(),
                count,
                total: dropped,
                within: self.filter.as_deref(),
            };
            log::warn!(
                "the kernel dropped {count} events (ring buffer full): raise \
                 --ring-buffer-size; {}",
                loss.scope()
            );
            return consumer.lost(&loss);
        }
        Ok(Flow::Continue)
    }

    fn apply(
        &mut self,
        snapshot: Result<Snapshot, String>,
        consumer: &mut impl Consumer,
    ) -> Result<Flow> {
        match snapshot {
            Ok(snapshot) => {
                let now = self.clock.mono_now_ns();
                let findings = self.pipeline.refresh(&snapshot, now);
                if let Flow::Stop = deliver(findings, &mut self.resolver, consumer)? {
                    return Ok(Flow::Stop);
                }
                consumer.pools(self.pipeline.pools())
            }
            Err(err) => {
                if self.refresh_errors == 0 {
                    log::warn!(
                        "cannot list sockets (pools and stalls unavailable): {err} (said once; \
                         connwatch_refresh_errors_total{{source=\"sock_diag\"}} counts them)"
                    );
                }
                self.refresh_errors += 1;
                Ok(Flow::Continue)
            }
        }
    }

    /// The counts the metrics mirror: the pipeline's, and the engine's own.
    fn stats(&self) -> Stats {
        Stats {
            log_lines_dropped: crate::output::stdout().dropped(),
            refresh_errors: RefreshErrors {
                sock_diag: self.refresh_errors,
                kubelet: crate::sockets::workload::kubelet_errors(),
            },
            ..self.pipeline.stats()
        }
    }

    /// One line for stderr at exit; `reported` is what the command output.
    pub fn summary(&self, reported: u64) -> String {
        let lost = self.probes.lost_events().unwrap_or(self.lost_total);
        let filtered = match self.probes.filtered_events() {
            Ok(count) if self.filter.is_some() => format!(", {count} filtered out in the kernel"),
            _ => String::new(),
        };
        format!(
            "stopped: {} events read{filtered}, {reported} reported, {lost} lost, {} undecodable, \
             {} evicted from full tables, {} reported unattributed (resolver behind), \
             {} output lines dropped (stdout not read), {} idle FINs and {} idle resets \
             handled within the grace (not reported)",
            self.pipeline.events,
            self.pipeline.undecodable,
            self.pipeline.evictions(),
            self.resolver.unattributed,
            crate::output::stdout().dropped(),
            self.pipeline.fins_handled(),
            self.pipeline.resets_handled(),
        )
    }
}

/// Takes a snapshot every `every` on a thread of its own, so a dump of a busy node's sockets
/// and /proc never delays events. It ends when the engine drops the receiver.
fn spawn_refresher(
    every: Duration,
    hosts: &crate::pipeline::HostPaths,
    processes: SharedProcIndex,
    connects: Option<crate::probes::ConnectCounts>,
    mut io_marks: Option<std::os::fd::OwnedFd>,
) -> Result<mpsc::Receiver<Result<Snapshot, String>>> {
    // Its own: pools are named by pod off the event loop, never waiting behind findings.
    let workloads = crate::sockets::workload::WorkloadResolver::new(
        &hosts.root,
        hosts.proc.clone(),
        hosts.pod_logs.clone(),
    )
    .with_kubelet(hosts.kubelet_url.clone());
    let (sender, receiver) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("cw-refresh".into())
        .spawn(move || {
            let mut warned_namespaces = false;
            let mut workloads = workloads;
            loop {
                let mut snapshot = diag::take_snapshot(
                    &processes,
                    io_marks.as_ref().map(|fd| fd.as_fd()),
                    &mut workloads,
                );
                if let (Err(err), Some(_)) = (&snapshot, &io_marks) {
                    // Said once; stalls are still found, at tcp_info's resolution.
                    log::warn!(
                        "sock_diag refused to dump the send/recv socket \
                         storage ({err:#}); request_stalled falls back to tcp_info's stamps"
                    );
                    io_marks = None;
                    snapshot = diag::take_snapshot(&processes, None, &mut workloads);
                }
                let snapshot = snapshot
                    .map(|mut snapshot| {
                        if let Some(why) = snapshot.namespaces_degraded.take()
                            && !warned_namespaces
                        {
                            // Said once: the next refreshes read them the same way.
                            log::warn!("{why}");
                            warned_namespaces = true;
                        }
                        snapshot.connects = connects
                            .as_ref()
                            .map(super::probes::ConnectCounts::totals)
                            .unwrap_or_default();
                        snapshot
                    })
                    .map_err(|err| format!("{err:#}"));
                if sender.blocking_send(snapshot).is_err() {
                    return;
                }
                std::thread::sleep(every);
            }
        })
        .context("starting the refresh thread")?;
    Ok(receiver)
}

/// Sends findings to be attributed; the resolver's answers reach the consumer from the
/// event loop. Delivered here at once: findings attributed from a remembered answer, and
/// those the resolver has no room for, as they are.
fn deliver(
    findings: &[Finding],
    resolver: &mut Resolver,
    consumer: &mut impl Consumer,
) -> Result<Flow> {
    for finding in findings {
        if let Some(unattributed) = resolver.submit(finding.clone())
            && let Flow::Stop = consumer.finding(&unattributed)?
        {
            return Ok(Flow::Stop);
        }
    }
    Ok(Flow::Continue)
}

/// Reads at most [`DRAIN_BATCH`] records; also says whether records may be left.
fn drain(
    ring: &mut RingBuf<MapData>,
    pipeline: &mut Pipeline,
    resolver: &mut Resolver,
    consumer: &mut impl Consumer,
    warned_undecodable: &mut bool,
) -> Result<(Flow, bool)> {
    for _ in 0..DRAIN_BATCH {
        let Some(item) = ring.next() else {
            return Ok((Flow::Continue, false));
        };
        let processed = match pipeline.record(&item) {
            Ok(processed) => processed,
            Err(err) => {
                if !*warned_undecodable {
                    *warned_undecodable = true;
                    log::warn!("skipping undecodable record: {err}");
                }
                continue;
            }
        };
        consumer.event(&processed.event);
        if let Flow::Stop = deliver(processed.findings, resolver, consumer)? {
            return Ok((Flow::Stop, true));
        }
    }
    Ok((Flow::Continue, true))
}

fn attribution_warning() -> Option<String> {
    let missing = crate::probes::missing_attribution_caps();
    (!missing.is_empty()).then(|| {
        format!(
            "missing capability {}: sockets of other users' processes are attributed only when \
             connwatch saw them connect or accept",
            missing.join(" and ")
        )
    })
}
