//! Never wedged: what is around the agent (a log reader that stopped, a kubelet that never
//! answers) costs lines or names, never its event loop, its signals or its metrics.
mod support;

use std::{
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use support::*;

/// Polls `/metrics` until `series` exceeds `above`, for at most the event timeout.
fn wait_for_metric_above(metrics: &str, series: &str, above: f64) -> f64 {
    let deadline = Instant::now() + EVENT_TIMEOUT * 2;
    loop {
        let value = get(metrics)
            .and_then(|(_, body)| metric(&body, series))
            .unwrap_or(0.0);
        if value > above {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {value} (not above {above})"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// SIGTERM, then the time the process took to exit and its stop summary.
fn stop_timed(watch: Watch) -> (Duration, String) {
    let started = Instant::now();
    let stopped = watch.stop_with(Signal::SIGTERM);
    let summary = stopped
        .stderr
        .lines()
        .find(|l| l.starts_with("connwatch: stopped:"))
        .unwrap_or_else(|| panic!("no summary: {}", stopped.stderr))
        .to_string();
    (started.elapsed(), summary)
}

#[test]
fn a_stdout_nobody_reads_stops_neither_the_daemon_nor_its_signals() {
    let addr = format!("127.0.0.1:{}", free_port());
    // The log rate limits at their widest: lines enough to fill the pipe and the queue.
    let daemon = Watch::spawn_unread(&[
        "daemon",
        "--listen",
        &addr,
        "--log-burst",
        "100000",
        "--log-rate",
        "600000",
        "--log-max-rate",
        "1000000",
    ]);
    let metrics = format!("http://{addr}/metrics");
    let (listener, _) = listen("127.0.0.1:0");
    let flood = ResetFlood::start(listener);
    // The pipe (64 KiB) and the queue (4 MiB) fill; from then on lines are dropped...
    wait_for_metric_above(&metrics, "connwatch_log_lines_dropped_total", 0.0);
    // ...while the loop goes on: events still counted, past the health check's stall limit.
    let events = wait_for_metric_above(&metrics, "connwatch_events_total", 0.0);
    thread::sleep(Duration::from_secs(6));
    wait_for_metric_above(&metrics, "connwatch_events_total", events);
    let (status, why) = get(&format!("http://{addr}/healthz")).unwrap();
    assert_eq!(status, 200, "{why}");
    let resets = flood.stop();
    let (took, summary) = stop_timed(daemon);
    eprintln!("{resets} resets; stopped in {took:?}: {summary}");
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
    assert!(
        summary_count(&summary, "output lines dropped (stdout not read)") > 0,
        "{summary}"
    );
}

#[test]
fn watch_with_a_stdout_nobody_reads_exits_on_sigterm() {
    let (listener, port) = listen("127.0.0.1:0");
    let watch = Watch::spawn_unread(&["watch", "--json", "--port", &port.to_string()]);
    let flood = ResetFlood::start(listener);
    // Well past the pipe's 64 KiB: its writes would now block.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while flood.resets() < 20_000 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let resets = flood.stop();
    let (took, summary) = stop_timed(watch);
    eprintln!("{resets} resets; stopped in {took:?}: {summary}");
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
}

/// The resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[test]
fn memory_stays_bounded_across_floods_with_the_refresh_off() {
    // One refresh at start, then none: nothing that only a refresh prunes may grow.
    let addr = format!("127.0.0.1:{}", free_port());
    let daemon = Watch::spawn(&[
        "daemon",
        "--listen",
        &addr,
        "--refresh",
        "1h",
        "--log-events",
        "false",
    ]);
    let metrics = format!("http://{addr}/metrics");
    let events = || {
        get(&metrics)
            .and_then(|(_, body)| metric(&body, "connwatch_events_total"))
            .unwrap_or(0.0)
    };
    let flood = |seconds| {
        let (listener, _) = listen("127.0.0.1:0");
        let flood = ResetFlood::start(listener);
        thread::sleep(Duration::from_secs(seconds));
        flood.stop();
        // Until the backlog is read: events_total steady but for the scrapes' own.
        let mut last = events();
        loop {
            thread::sleep(Duration::from_millis(1500));
            let now = events();
            if now - last < 100.0 {
                return (now, rss_kib(daemon.pid()));
            }
            last = now;
        }
    };
    // The first flood fills the tables to their bounds; the next ones must not grow past.
    let mut samples = vec![(events(), rss_kib(daemon.pid()))];
    for _ in 0..3 {
        samples.push(flood(8));
    }
    eprintln!("(events, RSS KiB) after each flood: {samples:?}");
    let (events_before, rss_before) = samples[1];
    let (events_after, rss_after) = samples[3];
    let grown_kib = rss_after.saturating_sub(rss_before);
    let per_event = f64::from(u32::try_from(grown_kib).expect("RSS growth below 4 TiB")) * 1024.0
        / (events_after - events_before).max(1.0);
    // A queue per event grew ~9 bytes per event here (a million events per flood); tables
    // at their bounds grow nothing. A slow guest reads fewer events: 8 MiB is allocator noise.
    assert!(
        per_event < 4.0 || grown_kib < 8 * 1024,
        "RSS grew {per_event:.1} bytes per event over two more floods: {samples:?}"
    );
    daemon.stop_with(Signal::SIGTERM);
}
