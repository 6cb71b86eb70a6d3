//! `connwatch daemon` as a Prometheus target, scraped by a real Prometheus server.
mod support;

use std::{
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
    // Listed before anything happened: families whose first series is an incident, and
    // each family's overflow count at 0.
    for listed in [
        "# TYPE connwatch_silent_deaths counter",
        "# TYPE connwatch_pool_flagged_sockets gauge",
        "# TYPE connwatch_peer_close_idle_seconds histogram",
        r#"connwatch_label_overflow_total{metric="connwatch_resets"} 0"#,
        r#"connwatch_label_overflow_total{metric="connwatch_silent_deaths"} 0"#,
    ] {
        assert!(
            body.contains(listed),
            "{listed} not in the first scrape:\n{body}"
        );
    }

    let prometheus = Prometheus::start(&addr);
    prometheus.wait_for(r#"up{job="connwatch"}"#, 1.0);

    // A port of its own (below the ephemeral range): the series are this test's alone.
    let (listener, port) = listen_below_ephemeral();
    let pairs: Vec<Pair> = (0..RESETS)
        .map(|_| Pair::connect(&listener, "cw-prom-client"))
        .collect();
    thread::sleep(Duration::from_millis(1500));
    let _clients: Vec<_> = pairs.into_iter().map(Pair::reset_from_server).collect();

    // Labelled by the process, not the thread that connected.
    let who = format!(r#"comm="{}",remote_port="{port}""#, process_comm());
    let resets = format!(r#"sum(connwatch_resets_total{{kind="peer_reset_idle",{who}}})"#);
    prometheus.wait_for(&resets, sample(RESETS));
    // Idle ~1.5 s: in the (1, 5] bucket, none at or below 1 s.
    let bucket =
        |le: &str| format!(r#"sum(connwatch_peer_reset_idle_seconds_bucket{{{who},le=~"{le}"}})"#);
    prometheus.wait_for(
        &format!(r"sum(connwatch_peer_reset_idle_seconds_count{{{who}}})"),
        sample(RESETS),
    );
    prometheus.wait_for(&bucket(r"1(\\.0)?"), 0.0);
    prometheus.wait_for(&bucket(r"5(\\.0)?"), sample(RESETS));
    // The shipped alert fires on this label set's first burst (`increase()` alone needs a
    // sample before it).
    prometheus.wait_for(
        &format!(
            r#"count(ALERTS{{alertname="ConnwatchIdleConnectionsReset",alertstate="firing",{who}}})"#
        ),
        1.0,
    );
    // Exactly: two more scrapes later, still the same count.
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(prometheus.query(&resets), Some(sample(RESETS)));

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
        if body.contains(&format!(
            r#"kind="peer_reset",cause="reset_while_established",comm="{}""#,
            process_comm()
        )) {
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
    let (listener, port) = listen_below_ephemeral();
    let pairs: Vec<Pair> = (0..3)
        .map(|_| Pair::connect(&listener, "cw-pool"))
        .collect();
    // Pools are attributed through /proc: the process name, not the thread's.
    let pool = [
        r#"direction="outbound""#.to_string(),
        format!(
            r#"comm="{}",namespace="",pod="",container="",local_port="",remote_port="{port}""#,
            process_comm()
        ),
    ];
    wait_for_pool_sockets(&format!("http://{addr}/metrics"), &pool, 3.0);
    drop(pairs);
    daemon.stop_with(Signal::SIGTERM);
}

/// A multi-threaded client whose worker threads (named with PR_SET_NAME, as thread pools
/// do) each hold an idle connection: process `cw-myapp`, threads `worker-0`…`worker-2`.
/// Each worker holds its socket 3 s after the peer's reset (a stale pool, not a client
/// that handles it).
const THREADED_CLIENT: &str = r#"
import ctypes, socket, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
def name(n):
    libc.prctl(15, n.encode(), 0, 0, 0)  # PR_SET_NAME
name("cw-myapp")
port = int(sys.argv[1])
def worker(i):
    name(f"worker-{i}")
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"ping")
    s.recv(4)
    try:
        s.recv(1)
    except OSError:
        pass
    time.sleep(3)
    s.close()
threads = [threading.Thread(target=worker, args=(i,), name=f"worker-{i}") for i in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"#;

/// Metrics as a platform engineer groups them: by process (not thread), by the server's
/// port on both sides (`remote_port` for the client, `local_port` for the server), with
/// pool states that add up to the pool's sockets.
#[test]
fn metrics_label_the_process_and_the_servers_port() {
    let addr = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{addr}/metrics");
    let daemon = Watch::spawn(&["daemon", "--listen", &addr, "--refresh", "1s"]);
    let (listener, port) = listen_below_ephemeral();
    let mut client = Command::new("python3")
        .args(["-c", THREADED_CLIENT, &port.to_string()])
        .spawn()
        .expect("python3");
    let mut servers: Vec<_> = (0..3)
        .map(|_| {
            let (mut server, _) = listener.accept().unwrap();
            let mut ping = [0u8; 4];
            server.read_exact(&mut ping).unwrap();
            std::io::Write::write_all(&mut server, b"pong").unwrap();
            server
        })
        .collect();
    let server_pool = [
        r#"direction="inbound""#.to_string(),
        format!(
            r#"comm="{}",namespace="",pod="",container="",local_port="{port}",remote_port="""#,
            process_comm()
        ),
    ];
    let client_pool = [
        r#"direction="outbound""#.to_string(),
        format!(
            r#"comm="cw-myapp",namespace="",pod="",container="",local_port="",remote_port="{port}""#
        ),
    ];
    // Both pools' states add up to their three sockets, and are a partition: each state
    // once, no `established` (the sum of two of them) or flags among them.
    for pool in [&server_pool, &client_pool] {
        let body = wait_for_pool_sockets(&url, pool, 3.0);
        let mut states: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("connwatch_pool_sockets{"))
            .filter(|l| pool.iter().all(|label| l.contains(label.as_str())))
            .map(|l| {
                l.split(r#"state=""#)
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
            })
            .collect();
        states.sort_unstable();
        assert_eq!(states, ["active", "close_wait", "idle", "other"], "{body}");
        let flagged = metric_sum_where(&body, "connwatch_pool_flagged_sockets", pool);
        assert!(flagged < 0.5, "{flagged} flagged: {body}");
    }
    thread::sleep(Duration::from_millis(1500));

    // The server resets the idle connections the worker threads still hold.
    servers.drain(..).for_each(abort);
    let resets = [format!(
        r#"kind="peer_reset_idle",cause="reset_while_established",comm="cw-myapp",namespace="",pod="",container="",local_port="",remote_port="{port}"}} 3"#
    )];
    let body = wait_for_body(&url, &resets[0]);
    assert!(
        !body.contains(r#"comm="worker-"#),
        "a thread's name as a label:\n{body}"
    );
    assert!(client.wait().unwrap().success());

    // A client resets a connection this process (the server) holds: the server's series
    // name its listening port, and no client port.
    let pair = Pair::connect(&listener, "cw-reset-client");
    abort(pair.client);
    let server_reset = format!(
        r#"cause="reset_while_established",comm="{}",namespace="",pod="",container="",local_port="{port}",remote_port=""}} 1"#,
        process_comm()
    );
    wait_for_body(&url, &server_reset);
    drop(pair.server);
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
        if counted >= sample(CONNECTIONS) && events >= 2.0 * sample(CONNECTIONS) {
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
        changes >= 10.0 * sample(CONNECTIONS),
        "{changes} state changes counted"
    );
    assert!(
        events <= 0.25 * changes,
        "{events} events for {changes} state changes: the kernel streamed what it only counts"
    );
    daemon.stop_with(Signal::SIGTERM);
}
