//! `connwatch watch`: live findings on the terminal or as NDJSON.
use std::{io, time::Duration};

use anyhow::Result;
use tokio::time::{Instant, sleep_until};

use crate::{
    args::{PipelineArgs, parse_positive_duration},
    common::{Shutdown, output_closed},
    detect::{
        Finding, Kind,
        idle_limit::{IdleLimit, Path},
    },
    engine::{Consumer, Engine, Flow, Streams},
    probes::{ProbeOptions, filter::KernelFilter},
    sinks::{
        Loss, Report, Sink, WallClock,
        cli::{CliSink, format_ms},
        json::JsonSink,
    },
};

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub probes: ProbeOptions,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
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
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,
    /// Stop after printing this many lines (events with --json; incidents in the table,
    /// which prints the incidents still open at the stop too).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
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

/// Where `watch` sends findings: filter, sink, and the `--count` budget.
struct Output {
    sink: Box<dyn Sink>,
    filter: Filter,
    clock: WallClock,
    printed: u64,
    count: Option<u64>,
}

impl Output {
    /// Counts what the sink wrote (lines in the table, objects in JSON) against `--count`.
    fn printed(&mut self, written: io::Result<u64>) -> Result<Flow> {
        match written {
            Ok(lines) => self.printed += lines,
            Err(err) => return output_closed(err),
        }
        Ok(match self.count {
            Some(count) if self.printed >= count => Flow::Stop,
            _ => Flow::Continue,
        })
    }
}

impl Consumer for Output {
    fn finding(&mut self, finding: &Finding) -> Result<Flow> {
        let report = Report::new(finding, &self.clock);
        if !self.filter.matches(&report) {
            return Ok(Flow::Continue);
        }
        let printed = self.sink.finding(&report);
        self.printed(printed)
    }

    fn poll(&mut self, mono_now_ns: u64) -> Result<Flow> {
        let printed = self.sink.flush_due(mono_now_ns);
        self.printed(printed)
    }

    fn finish(&mut self) -> Result<()> {
        let printed = self.sink.finish();
        self.printed(printed).map(|_| ())
    }

    fn lost(&mut self, loss: &Loss) -> Result<Flow> {
        match self.sink.lost(loss) {
            Ok(()) => Ok(Flow::Continue),
            Err(err) => output_closed(err),
        }
    }
}

pub async fn run(args: WatchArgs) -> Result<()> {
    let streams = Streams {
        state_changes: args.all || args.kind.contains(&Kind::StateChange),
        filter: KernelFilter::new(&args.pid, &args.comm, &args.port)?,
    };
    let mut engine = Engine::start(&args.probes, &args.pipeline, &streams)?;
    let stdout = crate::output::stdout().writer();
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
        clock: engine.clock,
        printed: 0,
        count: args.count,
    };
    let shutdown = Shutdown::install()?;
    log::info!("watching");
    let deadline = args.duration.map(|d| Instant::now() + d);
    let stop = async {
        tokio::select! {
            () = shutdown.received() => {}
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {}
        }
    };
    let outcome = engine.run(&mut output, stop).await;
    log::info!("{}", engine.summary(output.printed));
    let limits = engine.pipeline.idle_limits();
    for (path, limit) in limits.iter().take(SUMMARY_LIMITS) {
        log::info!("{}", idle_limit_line(path, limit));
    }
    if limits.len() > SUMMARY_LIMITS {
        log::info!(
            "{} more paths with an idle limit: `connwatch top` shows each pool's",
            limits.len() - SUMMARY_LIMITS
        );
    }
    outcome
}

/// Idle limits named at stop, at most: the paths with the most kills.
const SUMMARY_LIMITS: usize = 10;

/// What a path's idle limit is, what it rests on, and what to set.
fn idle_limit_line(path: &Path, limit: &IdleLimit) -> String {
    let survived = limit.survived_ms.map_or_else(String::new, |ms| {
        format!(", the longest idle survived {}", format_ms(ms))
    });
    format!(
        "idle limit: connections to {} ({}, netns {}) are killed after ~{} idle ({} kills, {} \
         of them at {}–{}{survived}): keep the pool's idle timeout or max lifetime below it, \
         or TCP keepalive time",
        path.endpoint,
        path.direction.as_str(),
        path.netns,
        format_ms(limit.limit_ms),
        limit.kills,
        limit.clustered,
        format_ms(limit.limit_ms),
        format_ms(limit.high_ms),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::pools::Direction;

    #[test]
    fn an_idle_limit_line_says_what_to_set() {
        let path = Path {
            netns: 4_026_531_840,
            direction: Direction::Outbound,
            endpoint: "10.0.0.5:5432".parse().unwrap(),
        };
        let limit = IdleLimit {
            limit_ms: 300_000,
            clustered: 4,
            kills: 5,
            high_ms: 306_000,
            survived_ms: Some(240_000),
        };
        assert_eq!(
            idle_limit_line(&path, &limit),
            "idle limit: connections to 10.0.0.5:5432 (outbound, netns 4026531840) are killed \
             after ~5m00s idle (5 kills, 4 of them at 5m00s–5m06s, the longest idle survived \
             4m00s): keep the pool's idle timeout or max lifetime below it, or TCP keepalive time"
        );
    }
}
