//! `connwatch daemon` as a Prometheus target, scraped by a real Prometheus server.
mod support;

use std::{
    fs,
    io::Read,
    net::TcpListener,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use support::{prometheus::Prometheus, *};

#[test]
fn prometheus_counts_exactly_the_idle_resets() {
    const RESETS: usize = 3;
    let addr = format!("127.0.0.1:{}", free_port());
    let daemon = Watch::spawn(&["daemon", "--listen", &addr]);
    let base = format!("http://{addr}");
    assert_eq!(get(&format!("{base}/readyz")).unwrap().0, 200);
    assert_eq!(get(&format!("{base}/healthz")).unwrap().0, 200);
    let (status, body) = get(&format!("{base}/metrics")).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("connwatch_build_info{"), "{body}");

    let prometheus = Prometheus::start(&addr);
    prometheus.wait_for(r#"up{job="connwatch"}"#, 1.0);

    let (listener, _) = listen("127.0.0.1:0");
    let pairs: Vec<Pair> = (0..RESETS)
        .map(|_| Pair::connect(&listener, "cw-prom-client"))
        .collect();
    thread::sleep(Duration::from_millis(1500));
    let _clients: Vec<_> = pairs.into_iter().map(Pair::reset_from_server).collect();

    let resets = r#"sum(connwatch_resets_total{kind="peer_reset_idle",comm="cw-prom-client"})"#;
    prometheus.wait_for(resets, RESETS as f64);
    // Idle ~1.5 s: in the (1, 5] bucket, none at or below 1 s.
    let bucket = |le: &str| {
        format!(
            r#"sum(connwatch_peer_reset_idle_seconds_bucket{{comm="cw-prom-client",le=~"{le}"}})"#
        )
    };
    prometheus.wait_for(
        r#"sum(connwatch_peer_reset_idle_seconds_count{comm="cw-prom-client"})"#,
        RESETS as f64,
    );
    prometheus.wait_for(&bucket(r"1(\\.0)?"), 0.0);
    prometheus.wait_for(&bucket(r"5(\\.0)?"), RESETS as f64);
    // Exactly: two more scrapes later, still the same count.
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(prometheus.query(resets), Some(RESETS as f64));

    // SIGTERM: detach and exit 0 within 2 s.
    let stopped_at = Instant::now();
    let stopped = daemon.stop_with(Signal::SIGTERM);
    assert!(
        stopped_at.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopped_at.elapsed()
    );
    assert!(
        get(&format!("{base}/healthz")).is_none(),
        "endpoint gone after exit"
    );
    // The structured log has the same findings, in the watch --json schema.
    let logged = stopped
        .events
        .iter()
        .filter(|e| kind(e) == "peer_reset_idle" && e["comm"] == "cw-prom-client")
        .count();
    assert_eq!(logged, RESETS, "{:#?}", stopped.events);
}

#[test]
fn log_events_can_be_turned_off() {
    let addr = format!("127.0.0.1:{}", free_port());
    let daemon = Watch::spawn(&["daemon", "--listen", &addr, "--log-events", "false"]);
    let (listener, _) = listen("127.0.0.1:0");
    let pair = Pair::connect(&listener, "cw-quiet");
    let _client = pair.reset_from_server();
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let (_, body) = get(&format!("http://{addr}/metrics")).unwrap();
        if body.contains(r#"kind="peer_reset",cause="reset_while_established",comm="cw-quiet""#) {
            break;
        }
        assert!(Instant::now() < deadline, "reset never counted: {body}");
        thread::sleep(Duration::from_millis(100));
    }
    let stopped = daemon.stop_with(Signal::SIGTERM);
    assert!(stopped.events.is_empty(), "{:#?}", stopped.events);
}

#[test]
fn port_in_use_and_bad_flags() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = Command::new(&*CONNWATCH)
        .args(["daemon", "--listen", &addr])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "connwatch: error: cannot listen on {addr}: the port is in use"
        )),
        "{stderr}"
    );
    for (args, expected) in [
        (
            &["daemon", "--listen", "localhost"][..],
            "invalid value 'localhost' for '--listen <ADDR>'",
        ),
        (
            &["daemon", "--max-series", "0"],
            "invalid value '0' for '--max-series <N>'",
        ),
        (
            &["daemon", "--log-events", "maybe"],
            "invalid value 'maybe' for '--log-events <BOOL>'",
        ),
    ] {
        let output = Command::new(&*CONNWATCH).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.lines().next().unwrap().contains(expected),
            "{args:?}: {stderr}"
        );
    }
    // The environment variable works like the flag.
    let output = Command::new(&*CONNWATCH)
        .args(["daemon"])
        .env("CONNWATCH_LISTEN", &addr)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains(&format!("cannot listen on {addr}")));
}

#[test]
fn pool_gauges_follow_the_sockets() {
    let addr = format!("127.0.0.1:{}", free_port());
    let daemon = Watch::spawn(&["daemon", "--listen", &addr, "--refresh", "1s"]);
    let (listener, _) = listen("127.0.0.1:0");
    let pairs: Vec<Pair> = (0..3)
        .map(|_| Pair::connect(&listener, "cw-pool"))
        .collect();
    // Pools are attributed through /proc: the process name, not the thread's.
    let comm = fs::read_to_string("/proc/self/comm").unwrap();
    let series = format!(
        r#"connwatch_pool_sockets{{direction="outbound",state="established",comm="{}",namespace="",pod="",container="",remote_port="ephemeral"}} 3"#,
        comm.trim()
    );
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let (_, body) = get(&format!("http://{addr}/metrics")).unwrap();
        if body.contains(&series) {
            break;
        }
        assert!(Instant::now() < deadline, "no {series} in:\n{body}");
        thread::sleep(Duration::from_millis(200));
    }
    drop(pairs);
    daemon.stop_with(Signal::SIGTERM);
}

/// Every state change is counted in the kernel (read at scrape time); only those connwatch
/// acts on cross the ring buffer as events.
#[test]
fn state_changes_are_counted_in_the_kernel_and_few_are_streamed() {
    const CONNECTIONS: usize = 200;
    let addr = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{addr}/metrics");
    let daemon = Watch::spawn(&["daemon", "--listen", &addr, "--log-events", "false"]);
    let transitions = "connwatch_tcp_state_transitions_total{";
    let active_close = r#"connwatch_tcp_state_transitions_total{from="FIN_WAIT1",to="FIN_WAIT2"}"#;
    let before = wait_for_body(&url, "connwatch_events_total");
    let (listener, _) = listen("127.0.0.1:0");
    for _ in 0..CONNECTIONS {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        // The client closes first: FIN_WAIT1 → FIN_WAIT2 → CLOSE (its TIME_WAIT is a
        // mini-socket) on its side; CLOSE_WAIT, then, once the server has read the EOF,
        // LAST_ACK → CLOSE on the server's.
        drop(client);
        assert_eq!(server.read(&mut [0u8; 1]).unwrap(), 0);
        drop(server);
    }
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let after = loop {
        let (_, body) = get(&url).unwrap();
        let delta =
            |series| metric(&body, series).unwrap_or(0.0) - metric(&before, series).unwrap_or(0.0);
        let (counted, events) = (delta(active_close), delta("connwatch_events_total"));
        // Two streamed per connection: the peer's FIN and the application's close after it.
        if counted >= CONNECTIONS as f64 && events >= 2.0 * CONNECTIONS as f64 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "{counted} active closes counted, {events} events:\n{body}"
        );
        thread::sleep(Duration::from_millis(200));
    };
    let changes = metric_sum(&after, transitions) - metric_sum(&before, transitions);
    let events = metric(&after, "connwatch_events_total").unwrap()
        - metric(&before, "connwatch_events_total").unwrap();
    // 10 state changes per connection, 2 of them streamed (the connects are counted per
    // endpoint, the orderly ends only counted).
    assert!(
        changes >= 10.0 * CONNECTIONS as f64,
        "{changes} state changes counted"
    );
    assert!(
        events <= 0.25 * changes,
        "{events} events for {changes} state changes: the kernel streamed what it only counts"
    );
    daemon.stop_with(Signal::SIGTERM);
}
