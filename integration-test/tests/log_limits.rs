//! The daemon's finding log stays bounded during a neighbour's reset flood: a few samples
//! per aggregation key, then `log_suppressed` lines whose counts add up to the
//! `connwatch_log_lines_suppressed_total` metric, while an unrelated finding is still
//! logged as it happens.
mod support;

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::*;

/// Resets the neighbour makes: thousands of findings.
const FLOOD: u64 = 4000;

/// Suppressed findings by kind, as the `log_suppressed` lines count them.
fn logged_suppressed(events: &[Value]) -> BTreeMap<String, u64> {
    let mut by_kind = BTreeMap::new();
    for line in events.iter().filter(|e| kind(e) == "log_suppressed") {
        let finding = line["finding"].as_str().expect("finding kind").to_string();
        *by_kind.entry(finding).or_default() += line["suppressed"].as_u64().expect("a count");
    }
    by_kind
}

/// `connwatch_log_lines_suppressed_total` by kind.
fn metric_suppressed(body: &str) -> BTreeMap<String, u64> {
    let prefix = "connwatch_log_lines_suppressed_total{kind=\"";
    body.lines()
        .filter_map(|line| line.strip_prefix(prefix))
        .filter_map(|rest| {
            let (kind, value) = rest.split_once("\"} ")?;
            Some((kind.to_string(), value.parse::<u64>().ok()?))
        })
        .collect()
}

#[test]
fn a_reset_flood_is_logged_as_samples_and_counts() {
    let addr = format!("127.0.0.1:{}", free_port());
    // One line a second per key after the burst of 10: its summaries come a second after
    // the flood.
    // A ring that holds the whole flood: a daemon behind it (a debug build on a busy CI
    // machine) catches up later instead of losing the lone reset.
    let daemon = Watch::spawn(&[
        "daemon",
        "--listen",
        &addr,
        "--log-rate",
        "60",
        "--ring-buffer-size",
        "67108864",
    ]);
    let metrics = format!("http://{addr}/metrics");

    let (neighbour, _) = listen("127.0.0.1:0");
    let flood = ResetFlood::start(neighbour);
    while flood.resets() < FLOOD / 2 {
        thread::sleep(Duration::from_millis(10));
    }
    // Mid-flood, past every flood key's burst: a reset under another key is logged. Keys
    // name the process (this one, as the flood's) and the server's port: a port of its own.
    let (listener, _) = listen_below_ephemeral();
    let lone = Pair::connect(&listener, "cw-lone-client");
    let lone_port = lone.client_port();
    let _client = lone.reset_from_server();
    // The flood runs until stopped: it goes on past the lone reset, whose line the daemon
    // writes in event order, however far behind the flood it is.
    while flood.resets() < FLOOD {
        thread::sleep(Duration::from_millis(10));
    }
    let resets = flood.stop();
    daemon.wait_for("the lone reset, logged amid the flood", |events| {
        of_kind(events, "peer_reset", lone_port)
            .iter()
            .any(|e| e["comm"] == "cw-lone-client")
    });

    // Every suppressed finding is in a log_suppressed line once its key has been quiet for
    // a second: the lines' counts reach the metric's.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let (logged, counted) = loop {
        let (_, body) = get(&metrics).expect("metrics");
        let counted = metric_suppressed(&body);
        let logged = logged_suppressed(&daemon.events());
        if !counted.is_empty() && logged == counted {
            break (logged, counted);
        }
        assert!(
            Instant::now() < deadline,
            "log_suppressed lines {logged:?} never added up to the metric {counted:?}"
        );
        thread::sleep(Duration::from_millis(200));
    };
    let suppressed: u64 = counted.values().sum();
    let stopped = daemon.stop_with(Signal::SIGTERM);
    let findings = stopped
        .events
        .iter()
        .filter(|e| RESET_KINDS.contains(&kind(e)))
        .count() as u64;
    // Each reset is two findings (the RST sent, the RST received): a few thousand, of
    // which a few dozen lines were written.
    assert!(
        suppressed >= resets,
        "{suppressed} suppressed of {resets} resets: {logged:?}"
    );
    assert!(
        findings * 20 < resets,
        "{findings} reset lines for {resets} resets"
    );
    let summary = stopped
        .events
        .iter()
        .find(|e| kind(e) == "log_suppressed" && e["finding"] == "local_reset")
        .expect("a log_suppressed line for the RSTs sent");
    for field in ["ts", "since", "until", "comm", "remote_port", "cause"] {
        assert!(summary[field].is_string(), "{field} missing: {summary}");
    }
    assert!(
        stopped.stderr.contains("findings not logged"),
        "{}",
        stopped.stderr
    );
}

#[test]
fn log_rate_flags_are_bounded() {
    for (flag, bad) in [
        ("--log-burst", "0"),
        ("--log-burst", "100001"),
        ("--log-rate", "0"),
        ("--log-max-rate", "1000001"),
    ] {
        let output = std::process::Command::new(&*CONNWATCH)
            .args(["daemon", flag, bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} {bad}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid value '{bad}' for '{flag} ")),
            "{stderr}"
        );
    }
}
