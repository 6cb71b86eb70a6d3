//! `cargo xtask reliability`: the adversarial figures of RELIABILITY.md, made by the release
//! build under the conditions that wedged or grew earlier versions: a reset flood with its
//! stdout read and never read, floods with the refresh off, idle HTTP clients at a low fd
//! limit. Figures, not assertions: the integration tests assert the behaviour.
use crate::bench::float;
use std::{
    fmt::Write as _,
    io::Read as _,
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::bench::{Workload, drive, http_get, metric, nix_kill, peak_rss_kib, ready};

/// What one flood cost the daemon.
struct Flood {
    resets_per_s: f64,
    events: u64,
    lost: u64,
    lines_dropped: u64,
    /// `/metrics` round trips during the flood, sorted (ms).
    scrapes_ms: Vec<f64>,
    healthz: String,
}

/// Runs a reset storm against a ready daemon while scraping its metrics every 100 ms.
fn flood(addr: &str) -> Result<Flood> {
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (stop, url) = (stop.clone(), format!("http://{addr}/metrics"));
        thread::spawn(move || {
            let mut took = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                if http_get(&url).is_ok() {
                    took.push(started.elapsed().as_secs_f64() * 1e3);
                }
                thread::sleep(Duration::from_millis(100));
            }
            took
        })
    };
    let resets_per_s = drive(Workload::ResetStorm)?;
    stop.store(true, Ordering::Relaxed);
    let mut scrapes_ms = scraper.join().expect("scraper thread");
    scrapes_ms.sort_by(f64::total_cmp);
    // The backlog drains within the tick after the storm.
    thread::sleep(Duration::from_millis(1500));
    let body = http_get(&format!("http://{addr}/metrics"))?;
    let healthz = match ureq::get(&format!("http://{addr}/healthz")).call() {
        Ok(response) => response.status().as_u16().to_string(),
        Err(ureq::Error::StatusCode(code)) => code.to_string(),
        Err(err) => format!("no answer ({err})"),
    };
    Ok(Flood {
        resets_per_s,
        events: metric(&body, "connwatch_events_total"),
        lost: metric(&body, "connwatch_ring_buffer_lost_events_total"),
        lines_dropped: metric(&body, "connwatch_log_lines_dropped_total"),
        scrapes_ms,
        healthz,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[crate::bench::nearest_rank(sorted.len(), p)]
}

/// SIGTERM, and how long the daemon took to exit (gives up after 30 s).
fn stop_timed(mut daemon: Child) -> Result<String> {
    let started = Instant::now();
    nix_kill(daemon.id())?;
    while daemon.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = daemon.kill();
            return Ok("over 30 s (killed)".into());
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(format!("{:.2} s", started.elapsed().as_secs_f64()))
}

fn flood_row(out: &mut String, scenario: &str, flood: &Flood, rss_mib: f64, stop: &str) {
    let _ = writeln!(
        out,
        "| {scenario} | {:.0} | {} | {} ({:.1}%) | {} | {:.1} / {:.1} / {:.1} | {} | {rss_mib:.0} | {stop} |",
        flood.resets_per_s,
        flood.events,
        flood.lost,
        100.0 * float(flood.lost) / float((flood.events + flood.lost).max(1)),
        flood.lines_dropped,
        percentile(&flood.scrapes_ms, 0.5),
        percentile(&flood.scrapes_ms, 0.99),
        percentile(&flood.scrapes_ms, 1.0),
        flood.healthz,
    );
}

pub fn run(root: &Path, connwatch: &Path) -> Result<()> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Reliability\n\nMade by `cargo xtask reliability` on {} (release build; {}).\n\n\
         The conditions that wedged or grew earlier versions, measured. The integration tests \
         (`tests/wedge.rs`, `tests/http.rs`, `tests/workload.rs`) assert the behaviour; these \
         are the figures.\n\n\
         ## Reset floods\n\nEach flood: {} s of a reset storm on loopback (2 client threads, \
         every connection aborted by the server), `/metrics` scraped every 100 ms meanwhile.\n\n\
         | scenario | resets/s | events read | lost (ring buffer) | log lines dropped | scrape p50 / p99 / max (ms) | /healthz after | peak RSS (MiB) | SIGTERM to exit |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        crate::bench::humantime_now(),
        crate::bench::machine(),
        crate::bench::RUN.as_secs(),
    );
    // Findings logged, stdout read (a working log collector).
    crate::step("reliability: reset flood, stdout read");
    let (mut daemon, addr) = ready(Command::new(connwatch), &[], Stdio::piped())?;
    let mut stdout = daemon.stdout.take().context("daemon stdout")?;
    let reader = thread::spawn(move || {
        let mut sink = vec![0u8; 64 << 10];
        while matches!(stdout.read(&mut sink), Ok(n) if n > 0) {}
    });
    let read = flood(&addr)?;
    let rss = float(peak_rss_kib(daemon.id())) / 1024.0;
    let stop = stop_timed(daemon)?;
    let _ = reader.join();
    flood_row(&mut out, "stdout read", &read, rss, &stop);

    // The same, with a stdout nobody reads: a log collector that stopped.
    crate::step("reliability: reset flood, stdout never read");
    let (mut daemon, addr) = ready(Command::new(connwatch), &[], Stdio::piped())?;
    let held = daemon.stdout.take();
    let blocked = flood(&addr)?;
    let rss = float(peak_rss_kib(daemon.id())) / 1024.0;
    let stop = stop_timed(daemon)?;
    drop(held);
    flood_row(&mut out, "stdout never read", &blocked, rss, &stop);

    // Two floods with one refresh at start and none after: what only a refresh prunes.
    crate::step("reliability: two floods, refresh off");
    let (daemon, addr) = ready(
        Command::new(connwatch),
        &["--log-events", "false", "--refresh", "1h"],
        Stdio::null(),
    )?;
    let rss_now = |pid| float(crate::bench::status_kib(pid, "VmRSS:")) / 1024.0;
    let start_rss = rss_now(daemon.id());
    let first = flood(&addr)?;
    let after_first = rss_now(daemon.id());
    let mut second = flood(&addr)?;
    // The counters are the daemon's totals: the second flood's own share.
    second.events = second.events.saturating_sub(first.events);
    second.lost = second.lost.saturating_sub(first.lost);
    let after_second = rss_now(daemon.id());
    let peak = float(peak_rss_kib(daemon.id())) / 1024.0;
    let stop = stop_timed(daemon)?;
    flood_row(&mut out, "refresh off, 1st flood", &first, peak, "");
    flood_row(&mut out, "refresh off, 2nd flood", &second, peak, &stop);
    let _ = writeln!(
        out,
        "\nRSS with the refresh off: {start_rss:.1} MiB at start, {after_first:.1} MiB after \
         the first flood ({} events), {after_second:.1} MiB after the second ({} more): \
         rates are kept in fixed buckets and every table is bounded, so a second flood \
         costs no memory.",
        first.events, second.events,
    );

    // Idle HTTP clients at a 256-descriptor limit.
    crate::step("reliability: 300 idle HTTP clients at 256 fds");
    let mut limited = Command::new("prlimit");
    limited.args(["--nofile=256:256", "--"]).arg(connwatch);
    let (daemon, addr) = ready(limited, &["--log-events", "false"], Stdio::null())?;
    let idle: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    thread::sleep(Duration::from_millis(500));
    let mut healthz_ms = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        if http_get(&format!("http://{addr}/healthz")).is_ok() {
            healthz_ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        thread::sleep(Duration::from_millis(100));
    }
    healthz_ms.sort_by(f64::total_cmp);
    let body = http_get(&format!("http://{addr}/metrics")).unwrap_or_default();
    let shed = metric(
        &body,
        "connwatch_http_connections_closed_total{reason=\"shed\"}",
    );
    let stop = stop_timed(daemon)?;
    drop(idle);
    let _ = writeln!(
        out,
        "\n## Idle HTTP clients\n\n300 connections to the daemon that send nothing, under \
         `prlimit --nofile=256:256`: /healthz answered {} of 10 times, in {:.1} ms at the \
         median and {:.1} ms at worst; {shed} idle connections shed at the cap of 64; \
         SIGTERM to exit {stop}.",
        healthz_ms.len(),
        percentile(&healthz_ms, 0.5),
        percentile(&healthz_ms, 1.0),
    );
    std::fs::write(root.join("RELIABILITY.md"), &out).context("writing RELIABILITY.md")?;
    print!("{out}");
    Ok(())
}
