//! `connwatch top`: pools (process × endpoint) as a live table, like `top`, or once as JSON.
use std::{
    cmp::Reverse,
    fmt::Write as _,
    io::{self, Write},
    time::SystemTime,
};

use anyhow::Result;
use serde::Serialize;

use crate::{
    args::PipelineArgs,
    common::{Shutdown, output_closed},
    detect::Finding,
    engine::{Consumer, Engine, Flow, Streams},
    probes::ProbeOptions,
    sinks::{Loss, cli::format_ms},
    sockets::pools::{Direction, Pool, UNKNOWN_COMM},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Column {
    Total,
    Established,
    Idle,
    Active,
    CloseWait,
    Other,
    Stalled,
    Zombie,
    Stranded,
    MaxIdle,
    Connects,
    Resets,
    Deaths,
}

impl Column {
    fn key(self, pool: &Pool) -> u64 {
        match self {
            Column::Total => u64::from(pool.total),
            Column::Established => u64::from(pool.established),
            Column::Idle => u64::from(pool.idle),
            Column::Active => u64::from(pool.active),
            Column::CloseWait => u64::from(pool.close_wait),
            Column::Other => u64::from(pool.other),
            Column::Stalled => u64::from(pool.stalled),
            Column::Zombie => u64::from(pool.zombie),
            Column::Stranded => u64::from(pool.stranded),
            // Unknown sorts last.
            Column::MaxIdle => pool.max_idle_ms.unwrap_or(0),
            Column::Connects => u64::from(pool.connects_per_min),
            Column::Resets => u64::from(pool.resets_per_min),
            Column::Deaths => u64::from(pool.deaths_per_min),
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
    /// Print the pools once, at the second refresh (one --refresh after start, so the
    /// per-minute rates have watched that long), and exit.
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
struct Frame<'a> {
    ts: String,
    pools: &'a [Pool],
}

struct Screen {
    sort: Column,
    once: bool,
    json: bool,
    limit: usize,
    refresh: String,
    /// Refreshes seen so far.
    refreshes: u64,
    /// The host's /proc, to name processes only their connect counters knew.
    host_proc: std::path::PathBuf,
}

/// The pool table's columns.
const HEADER: [&str; 21] = [
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
    "OTHER",
    "STALLED",
    "EXHAUSTED",
    "ZOMBIE",
    "STRANDED",
    "MAX_IDLE",
    "IDLE_LIMIT",
    "CONN/MIN",
    "RST/MIN",
    "DIED/MIN",
    "POD",
];

/// The pool table's header and rows. The ENDPOINT column is as wide as the longest
/// endpoint shown (an IPv6 one is up to 47 characters), so the columns stay aligned.
fn table(pools: &[Pool]) -> String {
    let endpoint_width = pools
        .iter()
        .map(|p| p.endpoint.to_string().len())
        .max()
        .unwrap_or(0)
        .max(ENDPOINT_WIDTH);
    let mut out = String::new();
    let row = |out: &mut String, cells: [&str; 21]| {
        let [pid, comm, netns, dir, endpoint, rest @ ..] = cells;
        let _ = write!(
            out,
            "{pid:>8} {comm:<16} {netns:>10} {dir:<4} {endpoint:<endpoint_width$}"
        );
        let widths = [5, 5, 5, 6, 7, 5, 7, 9, 6, 8, 8, 10, 8, 7, 8];
        for (cell, width) in rest.iter().zip(widths) {
            let _ = write!(out, " {cell:>width$}");
        }
        let _ = writeln!(out, "  {}", rest[rest.len() - 1]);
    };
    row(&mut out, HEADER);
    for p in pools {
        let numbers = [
            p.total,
            p.established,
            p.idle,
            p.active,
            p.close_wait,
            p.other,
            p.stalled,
        ]
        .map(|n| n.to_string());
        let rates = [
            p.zombie,
            p.stranded,
            p.connects_per_min,
            p.resets_per_min,
            p.deaths_per_min,
        ]
        .map(|n| n.to_string());
        row(
            &mut out,
            [
                &p.pid.to_string(),
                &p.comm,
                &p.netns.to_string(),
                if p.direction == Direction::Inbound {
                    "in"
                } else {
                    "out"
                },
                &p.endpoint.to_string(),
                &numbers[0],
                &numbers[1],
                &numbers[2],
                &numbers[3],
                &numbers[4],
                &numbers[5],
                &numbers[6],
                // How long the oldest stalled request has waited: the episode's age at least.
                &p.oldest_stall_ms
                    .filter(|_| p.exhausted)
                    .map_or_else(|| "-".into(), format_ms),
                &rates[0],
                &rates[1],
                // Unknown: no established connection with a known idle time.
                &p.max_idle_ms.map_or_else(|| "-".into(), format_ms),
                // Learned from kills on the path (README, "Idle limits"), `-` until then.
                &p.idle_limit_ms
                    .map_or_else(|| "-".into(), |ms| format!("~{}", format_ms(ms))),
                &rates[2],
                &rates[3],
                &rates[4],
                // namespace/pod, where the process runs in one.
                &match (&p.workload.namespace, &p.workload.pod) {
                    (Some(namespace), Some(pod)) => format!("{namespace}/{pod}"),
                    _ => "-".into(),
                },
            ],
        );
    }
    out
}

/// ENDPOINT's width at least: an IPv4 address and port, and some.
const ENDPOINT_WIDTH: usize = 28;

/// The pools to show, largest first by `sort`.
fn arrange(pools: &[Pool], sort: Column, limit: usize) -> Vec<Pool> {
    let mut sorted = pools.to_vec();
    sorted.sort_by_key(|p| (Reverse(sort.key(p)), p.pid, p.endpoint));
    sorted.truncate(limit);
    sorted
}

impl Screen {
    fn render(&self, pools: &[Pool]) -> io::Result<()> {
        let mut sorted = arrange(pools, self.sort, self.limit);
        // A process known only by its connect counters: named while it runs (only the rows
        // shown cost a read).
        for pool in sorted.iter_mut().filter(|p| p.comm == UNKNOWN_COMM) {
            if let Ok(comm) =
                std::fs::read_to_string(self.host_proc.join(format!("{}/comm", pool.pid)))
            {
                pool.comm = comm.trim_end().to_string();
            }
        }
        let mut out = crate::output::stdout().writer();
        let ts = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        if self.json {
            serde_json::to_writer(&mut out, &Frame { ts, pools: &sorted })?;
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
        out.write_all(table(&sorted).as_bytes())?;
        out.flush()
    }
}

impl Consumer for Screen {
    fn finding(&mut self, _finding: &Finding) -> Result<Flow> {
        Ok(Flow::Continue)
    }

    fn lost(&mut self, _loss: &Loss) -> Result<Flow> {
        Ok(Flow::Continue)
    }

    fn pools(&mut self, pools: &[Pool]) -> Result<Flow> {
        self.refreshes += 1;
        // The first refresh comes at start: nothing has been watched happening yet, and
        // every per-minute rate would read 0.
        if self.once && self.refreshes < 2 {
            return Ok(Flow::Continue);
        }
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
    let mut engine = Engine::start(&args.probes, &args.pipeline, &Streams::default())?;
    let shutdown = Shutdown::install()?;
    // As `watch` says it: from here, connects are counted.
    log::info!("watching");
    let mut screen = Screen {
        sort: args.sort,
        once: args.once,
        json: args.json,
        limit: args.limit,
        refresh: humantime::format_duration(args.pipeline.refresh).to_string(),
        refreshes: 0,
        host_proc: args.pipeline.host_proc.clone(),
    };
    engine.run(&mut screen, shutdown.received()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::pools::Direction;

    fn pool(pid: u32, comm: &str, direction: Direction, endpoint: &str) -> Pool {
        Pool::new(
            pid,
            comm,
            4_026_531_840,
            direction,
            endpoint.parse().unwrap(),
        )
    }

    /// The pools README.md's `connwatch top` sample shows.
    fn readme_pools() -> Vec<Pool> {
        let mut exhausted = pool(4242, "python3", Direction::Outbound, "10.0.0.9:5432");
        exhausted.netns = 4_026_532_177;
        (exhausted.total, exhausted.established, exhausted.stalled) = (4, 4, 4);
        (exhausted.exhausted, exhausted.oldest_stall_ms) = (true, Some(31_200));
        exhausted.workload.namespace = Some("payments".into());
        exhausted.workload.pod = Some("api-7d9f8b6c5-x2x9z".into());
        exhausted.idle_limit_ms = Some(300_000);
        let mut server = pool(1717, "postgres", Direction::Inbound, "10.0.0.7:5432");
        (server.total, server.established, server.idle, server.active) = (42, 40, 30, 10);
        (server.close_wait, server.other) = (1, 1);
        (server.max_idle_ms, server.connects_per_min) = (Some(721_000), 6);
        let mut churn = pool(5120, "churn", Direction::Outbound, "10.0.0.12:8080");
        (churn.connects_per_min, churn.resets_per_min) = (1180, 1180);
        let mut leaking = pool(3131, "gunicorn", Direction::Outbound, "10.0.0.9:5432");
        (
            leaking.total,
            leaking.established,
            leaking.idle,
            leaking.active,
        ) = (15, 15, 14, 1);
        (leaking.stranded, leaking.max_idle_ms) = (14, Some(552_000));
        vec![exhausted, server, churn, leaking]
    }

    /// Each column of the header: its name, and where it starts and ends, in characters.
    fn columns(header: &str) -> Vec<(String, usize, usize)> {
        let chars: Vec<char> = header.chars().collect();
        let mut columns = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            if chars[i] == ' ' {
                i += 1;
                continue;
            }
            let start = i;
            while i < chars.len() && chars[i] != ' ' {
                i += 1;
            }
            columns.push((chars[start..i].iter().collect(), start, i));
        }
        columns
    }

    #[test]
    fn columns_stay_aligned_with_a_long_ipv6_endpoint() {
        let mut v6 = pool(
            3030,
            "envoy",
            Direction::Outbound,
            "[2001:db8:85a3:1234:5678:8a2e:370:7334]:443",
        );
        (v6.total, v6.established, v6.active) = (2, 2, 2);
        v6.max_idle_ms = Some(120);
        let mut pools = readme_pools();
        pools.insert(1, v6);
        let text = table(&pools);
        let lines: Vec<Vec<char>> = text.lines().map(|l| l.chars().collect()).collect();
        let header: String = lines[0].iter().collect();
        for (name, start, end) in columns(&header) {
            for line in &lines[1..] {
                let row: String = line.iter().collect();
                let filled = |at: usize| line.get(at).is_some_and(|c| *c != ' ');
                match name.as_str() {
                    // Left-aligned: starts where its header does.
                    "COMM" | "DIR" | "ENDPOINT" | "POD" => {
                        assert!(
                            filled(start) && !filled(start - 1),
                            "{name}:\n{text}\n{row}"
                        );
                    }
                    // Right-aligned: ends where its header does.
                    _ => assert!(filled(end - 1) && !filled(end), "{name}:\n{text}\n{row}"),
                }
            }
        }
        assert!(text.contains("[2001:db8:85a3:1234:5678:8a2e:370:7334]:443"));
    }

    #[test]
    fn an_unknown_max_idle_is_a_dash() {
        let mut close_wait = pool(1, "app", Direction::Outbound, "10.0.0.9:5432");
        (close_wait.total, close_wait.close_wait) = (3, 3);
        let text = table(&[close_wait]);
        let header = text.lines().next().unwrap();
        let row = text.lines().nth(1).unwrap();
        let (_, start, end) = columns(header)
            .into_iter()
            .find(|(name, _, _)| name == "MAX_IDLE")
            .unwrap();
        let cell: String = row.chars().skip(start).take(end - start).collect();
        assert_eq!(cell.trim(), "-", "{text}");
    }

    /// The `connwatch top` section of README.md without its code blocks.
    fn readme_prose() -> String {
        crate::readme_tests::section("## `connwatch top`")
            .split("```")
            .step_by(2)
            .collect()
    }

    #[test]
    fn the_readme_explains_every_column() {
        let prose = readme_prose();
        let header = table(&[]);
        let missing: Vec<&str> = header
            .split_whitespace()
            .filter(|name| !prose.contains(name))
            .collect();
        assert!(
            missing.is_empty(),
            "README.md's `connwatch top` section does not explain columns {missing:?}"
        );
    }

    #[test]
    fn the_readme_lists_every_sort_key() {
        use clap::ValueEnum as _;
        let prose = readme_prose();
        let list = prose
            .split_once("`--sort COLUMN` (")
            .and_then(|(_, rest)| rest.split_once(')'))
            .expect("README.md's top section lists the sort keys after `--sort COLUMN` (")
            .0;
        let documented: Vec<&str> = crate::readme_tests::quoted(list, '`');
        let keys: Vec<String> = Column::value_variants()
            .iter()
            .map(|c| c.to_possible_value().unwrap().get_name().to_string())
            .collect();
        assert_eq!(documented, keys, "README.md's `--sort` keys are not top's");
    }

    #[test]
    fn the_readme_lists_every_json_field() {
        // Every field filled: a field added to Pool fails to compile until given a value.
        let full = Pool {
            pid: 1,
            comm: "app".into(),
            netns: 1,
            workload: crate::readme_tests::full_workload(),
            direction: Direction::Outbound,
            endpoint: "10.0.0.9:5432".parse().unwrap(),
            total: 1,
            established: 1,
            idle: 1,
            active: 0,
            close_wait: 0,
            other: 0,
            stalled: 0,
            exhausted: false,
            oldest_stall_ms: Some(1),
            oldest_stall: Some(1),
            zombie: 0,
            stranded: 0,
            max_idle_ms: Some(1),
            idle_limit_ms: Some(1),
            connects_per_min: 0,
            resets_per_min: 0,
            deaths_per_min: 0,
        };
        let mut emitted = crate::readme_tests::keys(&Frame {
            ts: String::new(),
            pools: &[],
        });
        emitted.extend(crate::readme_tests::keys(&full));
        let prose = readme_prose();
        let paragraph = prose
            .split_once("`connwatch top --once --json` prints")
            .and_then(|(_, rest)| rest.split("\n\n").next())
            .expect("README.md's top section describes `connwatch top --once --json`");
        let documented = crate::readme_tests::quoted(paragraph, '"')
            .into_iter()
            .map(str::to_string)
            .collect();
        assert_eq!(
            emitted, documented,
            "README.md's `top --once --json` fields are not top's"
        );
    }

    #[test]
    fn the_readme_shows_the_table_as_printed() {
        let readme = include_str!("../../README.md");
        let printed = table(&arrange(&readme_pools(), Column::Total, 40));
        assert!(
            readme.contains(&printed),
            "README.md's `connwatch top` sample is not what top prints:\n{printed}"
        );
    }
}
