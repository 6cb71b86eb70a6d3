//! `connwatch top`: pools (process × endpoint) as a live table, like `top`, or once as JSON.
use std::{
    cmp::Reverse,
    io::{self, Write},
    time::SystemTime,
};

use anyhow::Result;
use serde::Serialize;

use crate::{
    args::PipelineArgs,
    detect::Finding,
    engine::{Consumer, Engine, Flow, Shutdown},
    probes::ProbeOptions,
    sinks::cli::format_ms,
    sockets::pools::Pool,
    watch::output_closed,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Column {
    Total,
    Established,
    Idle,
    Active,
    CloseWait,
    Stalled,
    Zombie,
    MaxIdle,
    Connects,
    Resets,
    Deaths,
}

impl Column {
    fn key(self, pool: &Pool) -> u64 {
        match self {
            Column::Total => pool.total as u64,
            Column::Established => pool.established as u64,
            Column::Idle => pool.idle as u64,
            Column::Active => pool.active as u64,
            Column::CloseWait => pool.close_wait as u64,
            Column::Stalled => pool.stalled as u64,
            Column::Zombie => pool.zombie as u64,
            Column::MaxIdle => pool.max_idle_ms,
            Column::Connects => pool.connects_per_min as u64,
            Column::Resets => pool.resets_per_min as u64,
            Column::Deaths => pool.deaths_per_min as u64,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub probes: ProbeOptions,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Sort pools by this column, largest first.
    #[arg(long, value_enum, default_value = "total")]
    pub sort: Column,
    /// Print the pools once and exit.
    #[arg(long)]
    pub once: bool,
    /// JSON instead of a table (one object per refresh).
    #[arg(long)]
    pub json: bool,
    /// Show at most this many pools.
    #[arg(long, value_name = "N", default_value_t = 40)]
    pub limit: usize,
}

#[derive(Serialize)]
struct Snapshot<'a> {
    ts: String,
    pools: &'a [Pool],
}

struct Screen {
    sort: Column,
    once: bool,
    json: bool,
    limit: usize,
    refresh: String,
}

impl Screen {
    fn render(&self, pools: &[Pool]) -> io::Result<()> {
        let mut sorted = pools.to_vec();
        sorted.sort_by_key(|p| (Reverse(self.sort.key(p)), p.pid, p.endpoint));
        sorted.truncate(self.limit);
        let mut out = crate::output::stdout().writer();
        let ts = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        if self.json {
            serde_json::to_writer(&mut out, &Snapshot { ts, pools: &sorted })?;
            writeln!(out)?;
            return out.flush();
        }
        if !self.once {
            // Clear the screen and home the cursor, as top does.
            write!(out, "\x1b[2J\x1b[H")?;
        }
        writeln!(
            out,
            "connwatch top  {}  {} pools, by {:?}, refresh {}",
            ts.get(11..19).unwrap_or(&ts),
            pools.len(),
            self.sort,
            self.refresh
        )?;
        writeln!(
            out,
            "{:>8} {:<16} {:>10} {:<4} {:<28} {:>5} {:>5} {:>5} {:>6} {:>7} {:>7} {:>9} {:>6} {:>8} {:>8} {:>7} {:>8}  POD",
            "PID",
            "COMM",
            "NETNS",
            "DIR",
            "ENDPOINT",
            "TOTAL",
            "ESTAB",
            "IDLE",
            "ACTIVE",
            "CL_WAIT",
            "STALLED",
            "EXHAUSTED",
            "ZOMBIE",
            "MAX_IDLE",
            "CONN/MIN",
            "RST/MIN",
            "DIED/MIN"
        )?;
        for p in &sorted {
            writeln!(
                out,
                "{:>8} {:<16} {:>10} {:<4} {:<28} {:>5} {:>5} {:>5} {:>6} {:>7} {:>7} {:>9} {:>6} {:>8} {:>8} {:>7} {:>8}  {}",
                p.pid,
                p.comm,
                p.netns,
                if p.direction.as_str() == "inbound" {
                    "in"
                } else {
                    "out"
                },
                p.endpoint.to_string(),
                p.total,
                p.established,
                p.idle,
                p.active,
                p.close_wait,
                p.stalled,
                // How long the oldest stalled request has waited: the episode's age at least.
                if p.exhausted {
                    format_ms(p.oldest_stall_ms)
                } else {
                    "-".into()
                },
                p.zombie,
                format_ms(p.max_idle_ms),
                p.connects_per_min,
                p.resets_per_min,
                p.deaths_per_min,
                // namespace/pod, where the process runs in one.
                match (&p.workload.namespace, &p.workload.pod) {
                    (Some(namespace), Some(pod)) => format!("{namespace}/{pod}"),
                    _ => "-".into(),
                }
            )?;
        }
        out.flush()
    }
}

impl Consumer for Screen {
    fn finding(&mut self, _finding: &Finding) -> Result<Flow> {
        Ok(Flow::Continue)
    }

    fn lost(&mut self, _count: u64, _total: u64) -> Result<Flow> {
        Ok(Flow::Continue)
    }

    fn pools(&mut self, pools: &[Pool]) -> Result<Flow> {
        if let Err(err) = self.render(pools) {
            return output_closed(err);
        }
        Ok(if self.once {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }
}

pub async fn run(args: TopArgs) -> Result<()> {
    let mut engine = Engine::start(&args.probes, &args.pipeline, false)?;
    let shutdown = Shutdown::install()?;
    // As `watch` says it: from here, connects are counted.
    log::info!("watching");
    let mut screen = Screen {
        sort: args.sort,
        once: args.once,
        json: args.json,
        limit: args.limit,
        refresh: humantime::format_duration(args.pipeline.refresh).to_string(),
    };
    engine.run(&mut screen, shutdown.received()).await
}
