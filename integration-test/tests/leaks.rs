//! Leaked pool connections (issue #19): a real SQLAlchemy QueuePool (psycopg2) on a real
//! PostgreSQL, driven by support/leakpool.py. A workload that never returns its
//! connections is `pool_leak` before the pool's limit, then `pool_leak_exhausted`; the
//! same load with correct code, and pools that are healthy in the ways that look alike,
//! are not.
mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, SystemTime},
};

use serde_json::Value;
use support::{postgres::Postgres, *};

/// Each refresh lists the sockets; a connection idle this long is judged (TCG guests run
/// the Python client slowly: its pings and queries may lag a second or two).
const REFRESH: &str = "1s";
const LEAK_THRESHOLD: &str = "4s";

/// leakpool.py in `mode` against `pg`, and what it prints, line by line.
struct App {
    child: Child,
    _stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    pid: u32,
}

impl App {
    fn start(mode: &str, pg: &Postgres) -> App {
        let mut child = Command::new(python_clients())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/leakpool.py"
            ))
            .args([mode, &pg.port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut app = App {
            child,
            _stdin: stdin,
            lines,
            pid: 0,
        };
        let ready = app.line("ready");
        app.pid = ready["ready ".len()..].parse().unwrap();
        app
    }

    /// The next line starting with `prefix` (Python in a TCG guest is slow: minutes).
    fn line(&mut self, prefix: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_mins(4))
                .unwrap_or_else(|err| panic!("leakpool.py never printed {prefix:?}: {err}"));
            if line.starts_with(prefix) {
                return line;
            }
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn watch(pg: &Postgres) -> Watch {
    Watch::start(&[
        "--port",
        &pg.port.to_string(),
        "--kind",
        "pool_leak,pool_leak_exhausted",
        "--refresh",
        REFRESH,
        "--leak-threshold",
        LEAK_THRESHOLD,
    ])
}

fn of_kind_for<'a>(events: &'a [Value], kind_name: &str, pid: u32) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| kind(e) == kind_name && e["pid"] == pid)
        .collect()
}

fn ts(event: &Value) -> SystemTime {
    humantime::parse_rfc3339(event["ts"].as_str().unwrap()).expect("ts is RFC 3339")
}

/// A session never closed per request: flagged, with the process and the PostgreSQL
/// endpoint, before "QueuePool limit of size 5 overflow 5 reached"; then the plateau.
#[test]
fn a_leaking_pool_is_flagged_before_its_limit_then_its_plateau() {
    let pg = Postgres::start();
    let watch = watch(&pg);
    let mut app = App::start("leak", &pg);
    let pid = app.pid;
    let limit = app.line("limit ");
    assert!(
        limit.contains("QueuePool limit of size 5 overflow 5 reached"),
        "the application's view of the incident: {limit}"
    );
    let limit_at: f64 = limit.split(' ').nth(1).unwrap().parse().unwrap();
    let limit_at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(limit_at);
    watch.wait_for("pool_leak_exhausted", |events| {
        !of_kind_for(events, "pool_leak_exhausted", pid).is_empty()
    });
    let events = watch.stop().events;
    let leaks = of_kind_for(&events, "pool_leak", pid);
    assert_eq!(leaks.len(), 1, "once per episode: {events:#?}");
    let leak = leaks[0];
    assert!(
        leak["comm"].as_str().unwrap().starts_with("python"),
        "{leak}"
    );
    assert_eq!(leak["remote"], format!("127.0.0.1:{}", pg.port), "{leak}");
    assert!(
        ts(leak) < limit_at,
        "flagged before the pool's limit: {leak} vs {limit}"
    );
    let stranded = leak["connections"].as_u64().unwrap();
    assert!((3..10).contains(&stranded), "{leak}");
    assert!(leak["per_min"].as_u64().unwrap() > 0, "{leak}");
    assert!(
        ms(leak, "age_ms") >= 4000,
        "the oldest idle past the threshold: {leak}"
    );
    let plateau = of_kind_for(&events, "pool_leak_exhausted", pid);
    assert_eq!(plateau.len(), 1, "{events:#?}");
    assert!(
        plateau[0]["connections"].as_u64().unwrap() >= 9,
        "{}",
        plateau[0]
    );
    assert!(ts(plateau[0]) > ts(leak));
}

/// A healthy workload in `mode`: watched through its load, then for `idle_s` more (past
/// the leak threshold), with no finding for it.
fn no_leak(mode: &str, idle_s: u64) {
    let pg = Postgres::start();
    let watch = watch(&pg);
    let mut app = App::start(mode, &pg);
    app.line("done");
    thread::sleep(Duration::from_secs(idle_s));
    let events = watch.stop().events;
    let found: Vec<&Value> = events.iter().filter(|e| e["pid"] == app.pid).collect();
    assert!(found.is_empty(), "{mode}: {found:#?}");
}

/// The same load as the leak, each connection returned: the pool reuses one.
#[test]
fn the_same_load_with_connections_returned_is_not_a_leak() {
    no_leak("correct", 8);
}

/// Grows to eight connections under rising load, then idles: each was reused.
#[test]
fn a_pool_grown_under_load_then_idle_is_not_a_leak() {
    no_leak("burst", 10);
}

/// Five connections opened together at start, then idle.
#[test]
fn minimum_idle_connections_opened_at_start_are_not_a_leak() {
    no_leak("minidle", 10);
}

/// Opened as the leak opens them, but each pinged every second: not idle.
#[test]
fn pinged_idle_connections_are_not_a_leak() {
    no_leak("pinged", 8);
}

/// NullPool: every request opens, queries and closes its own connection.
#[test]
fn short_lived_connections_are_not_a_leak() {
    no_leak("shortlived", 8);
}
