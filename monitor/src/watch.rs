//! `connwatch watch`: live findings on the terminal or as NDJSON.
use std::{
    io::{self, ErrorKind},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior, interval, sleep_until},
};

use crate::{
    detect::{DetectConfig, Finding, Kind},
    pipeline::Pipeline,
    probes::{ProbeOptions, Probes},
    sinks::{Report, Sink, WallClock, cli::CliSink, json::JsonSink},
};

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub probes: ProbeOptions,
    /// Print NDJSON, one object per event, instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also print every TCP state change (kind `state_change`).
    #[arg(long)]
    pub all: bool,
    /// Only sockets owned by this process id (repeatable).
    #[arg(long, value_name = "PID")]
    pub pid: Vec<u32>,
    /// Only sockets owned by a process with exactly this name (repeatable).
    #[arg(long, value_name = "NAME")]
    pub comm: Vec<String>,
    /// Only sockets with this local or remote port (repeatable).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Vec<u16>,
    /// Only these kinds (repeatable or comma-separated).
    #[arg(long, value_name = "KIND", value_delimiter = ',')]
    pub kind: Vec<Kind>,
    /// A peer reset or FIN after at least this long without data is `*_idle`.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub idle_threshold: Duration,
    /// A socket in CLOSE_WAIT longer than this is `close_wait_lingering`.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_positive_duration)]
    pub close_wait_threshold: Duration,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,
    /// Stop after printing this many events.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// The host's /proc, for attributing sockets opened before connwatch started.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/proc",
        env = "CONNWATCH_HOST_PROC"
    )]
    pub host_proc: PathBuf,
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("{err}; expected a duration like 500ms, 1s or 2m"))
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err("must be greater than zero".to_string()),
        duration => Ok(duration),
    }
}

/// The `--pid/--comm/--port/--kind` filters: a report passes when it matches every filter
/// given.
#[derive(Debug, Default)]
pub struct Filter {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub ports: Vec<u16>,
    pub kinds: Vec<Kind>,
}

impl Filter {
    pub fn matches(&self, report: &Report) -> bool {
        let pid_ok = self.pids.is_empty() || report.pid.is_some_and(|p| self.pids.contains(&p));
        let comm_ok =
            self.comms.is_empty() || report.comm.as_ref().is_some_and(|c| self.comms.contains(c));
        let port_ok = self.ports.is_empty()
            || [report.local_port(), report.remote_port()]
                .into_iter()
                .flatten()
                .any(|p| self.ports.contains(&p));
        let kind_ok = self.kinds.is_empty() || self.kinds.iter().any(|k| k.as_str() == report.kind);
        pid_ok && comm_ok && port_ok && kind_ok
    }
}

/// Where findings go after detection: filter, sink, and the `--count` budget.
struct Output {
    sink: Box<dyn Sink>,
    filter: Filter,
    clock: WallClock,
    printed: u64,
    count: Option<u64>,
}

enum Flow {
    Continue,
    Stop,
}

impl Output {
    fn deliver(&mut self, findings: &[Finding]) -> Result<Flow> {
        for finding in findings {
            let report = Report::new(finding, &self.clock);
            if !self.filter.matches(&report) {
                continue;
            }
            if let Err(err) = self.sink.finding(&report) {
                return output_closed(err).map(|()| Flow::Stop);
            }
            self.printed += 1;
            if self.count.is_some_and(|count| self.printed >= count) {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }
}

pub async fn run(args: WatchArgs) -> Result<()> {
    let (probes, events) = Probes::attach(&args.probes)?;
    for warning in &probes.warnings {
        eprintln!("connwatch: warning: {warning}");
    }
    let clock = WallClock::now();
    let mut pipeline = Pipeline::new(
        &DetectConfig {
            idle_threshold: args.idle_threshold,
            close_wait_threshold: args.close_wait_threshold,
            state_changes: args.all || args.kind.contains(&Kind::StateChange),
        },
        args.host_proc.clone(),
    );
    let stdout = io::stdout().lock();
    let mut output = Output {
        sink: if args.json {
            Box::new(JsonSink::new(stdout))
        } else {
            Box::new(CliSink::new(stdout))
        },
        filter: Filter {
            pids: args.pid.clone(),
            comms: args.comm.clone(),
            ports: args.port.clone(),
            kinds: args.kind.clone(),
        },
        clock,
        printed: 0,
        count: args.count,
    };
    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until the
    // AsyncFd (and the RingBuf inside it) is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|err| err.into_parts().1)
        .context("registering the ring buffer with the event loop")?;
    eprintln!("connwatch: watching");

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let deadline = args.duration.map(|d| Instant::now() + d);
    let mut upkeep = interval(Duration::from_secs(1));
    upkeep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut lost_total = 0u64;
    let mut warned_undecodable = false;

    let outcome: Result<()> = 'watch: loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                let events = guard.get_inner_mut();
                while let Some(item) = events.next() {
                    let record: &[u8] = &item;
                    let findings = match pipeline.record(record) {
                        Ok(findings) => findings,
                        Err(err) => {
                            if !warned_undecodable {
                                warned_undecodable = true;
                                eprintln!("connwatch: warning: skipping undecodable record: {err}");
                            }
                            continue;
                        }
                    };
                    match output.deliver(findings) {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Stop) => break 'watch Ok(()),
                        Err(err) => break 'watch Err(err),
                    }
                }
                guard.clear_ready();
            }
            _ = upkeep.tick() => {
                match output.deliver(pipeline.tick(clock.mono_now_ns())) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Stop) => break 'watch Ok(()),
                    Err(err) => break 'watch Err(err),
                }
                let lost = probes.lost_events()?;
                if lost > lost_total {
                    let count = lost - lost_total;
                    lost_total = lost;
                    eprintln!("connwatch: warning: the kernel dropped {count} events (ring buffer full); raise --ring-buffer-size");
                    if let Err(err) = output.sink.lost(SystemTime::now(), count, lost_total) {
                        break 'watch output_closed(err);
                    }
                }
            }
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => break 'watch Ok(()),
            _ = sigterm.recv() => break 'watch Ok(()),
            _ = sigint.recv() => break 'watch Ok(()),
        }
    };
    let lost_total = probes.lost_events().unwrap_or(lost_total);
    eprintln!(
        "connwatch: stopped: {} events read, {} printed, {lost_total} lost, {} undecodable",
        pipeline.events, output.printed, pipeline.undecodable
    );
    outcome
}

/// A closed stdout (e.g. `| head`) ends the watch quietly; other write errors are errors.
fn output_closed(err: io::Error) -> Result<()> {
    if err.kind() == ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(err).context("writing to stdout")
    }
}
