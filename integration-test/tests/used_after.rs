//! What happens after the peer ends a connection: the application's next call into it, the
//! idle FIN, and CLOSE_WAIT left behind.
mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    thread,
    time::Duration,
};

use serde_json::Value;
use support::*;

fn write_then_read(mut stream: TcpStream) {
    let _ = stream.write_all(b"SELECT 1");
    let mut buf = [0u8; 16];
    let _ = stream.read(&mut buf);
}

fn position(events: &[Value], kind_name: &str, local_port: u16) -> usize {
    events
        .iter()
        .position(|e| kind(e) == kind_name && port(&e["local"]) == local_port)
        .unwrap_or_else(|| panic!("no {kind_name}: {events:#?}"))
}

/// Where the send/recv tracepoints exist (Linux 6.3+), they serve `used_after_*` whatever
/// `--no-trampolines` says: the kprobe path is then not reachable, and `test` is skipped,
/// saying so. It runs in the guests of older kernels (5.10, 6.1).
fn kprobes_unreachable(test: &str) -> bool {
    let tracefs = monitor::probes::tracefs::locate(None).expect("tracefs");
    let exists = tracefs.join("events/sock/sock_send_length").is_dir();
    if exists {
        println!(
            "{test}: skipped: this kernel has sock:sock_send_length, which serves \
             used_after_* before kprobes; the kprobe path is tested on kernels before 6.3"
        );
    }
    exists
}

/// Runs `test`'s scenario with `--no-trampolines` where the kprobes can serve, and checks
/// that the start-up line (the scenario's stderr) names them.
fn through_kprobes(test: &str, scenario: fn(&[&str]) -> String) {
    if kprobes_unreachable(test) {
        return;
    }
    let stderr = scenario(&["--no-trampolines"]);
    assert!(stderr.contains(KPROBES_SERVE), "{stderr}");
}

/// What the start-up line says serves `used_after_*` with `--no-trampolines`.
const KPROBES_SERVE: &str = "used_after_* ← kprobe+kretprobe tcp_sendmsg, tcp_recvmsg \
    (fexit not used: --no-trampolines) (degraded: a kretprobe follows at most the kernel's \
    maxactive calls";

#[test]
fn used_after_idle_reset() {
    used_after_idle_reset_with(&[]);
}

/// The kprobe and kretprobe that serve where the kernel has no BPF trampolines (arm64
/// before 6.5), forced: a write after the peer's RST, seen through the kretprobe.
#[test]
fn used_after_idle_reset_with_kprobes() {
    through_kprobes(
        "used_after_idle_reset_with_kprobes",
        used_after_idle_reset_with,
    );
}

/// A pooled connection reset while idle, then written by another thread: one
/// `used_after_reset`, after the `peer_reset_idle`. Returns connwatch's stderr.
fn used_after_idle_reset_with(extra: &[&str]) -> String {
    let (listener, server_port, watch) = watched_listener("127.0.0.1:0", extra);
    let pair = Pair::connect(&listener, "cw-pool-conn");
    let client_port = pair.client_port();
    thread::sleep(Duration::from_secs(2));
    let client = pair.reset_from_server();
    thread::sleep(Duration::from_millis(200));
    in_thread("cw-query", move || write_then_read(client));
    watch.wait_for("used_after_reset", |events| {
        count(events, "used_after_reset", client_port) >= 1
    });
    let Stopped { events, stderr, .. } = watch.stop();
    assert!(
        position(&events, "peer_reset_idle", client_port)
            < position(&events, "used_after_reset", client_port)
    );
    let hit = of_kind(&events, "used_after_reset", client_port);
    assert_eq!(hit.len(), 1, "one per socket: {events:#?}");
    let hit = hit[0];
    assert_eq!(hit["pid"], std::process::id());
    assert_eq!(
        hit["comm"], "cw-query",
        "the caller, not the connecting thread"
    );
    assert_eq!(hit["op"], "send");
    assert!(
        [libc::ECONNRESET, libc::EPIPE]
            .contains(&i32::try_from(hit["errno"].as_i64().unwrap()).unwrap()),
        "{hit:?}"
    );
    assert_eq!(port(&hit["remote"]), server_port);
    let since = ms(hit, "since_reset_ms");
    assert!((150..5000).contains(&since), "since_reset_ms={since}");
    assert_eq!(count(&events, "used_after_close", client_port), 0);
    stderr
}

#[test]
fn no_used_after_leaves_the_send_recv_hooks_out() {
    let (listener, _, watch) = watched_listener("127.0.0.1:0", &["--no-used-after"]);
    let pair = Pair::connect(&listener, "cw-pool-conn");
    let client_port = pair.client_port();
    thread::sleep(Duration::from_millis(1200));
    let client = pair.reset_from_server();
    thread::sleep(Duration::from_millis(200));
    // A clone: the pool still holds the socket after the query (no hook sees the write,
    // so only holding it past the grace makes the reset a finding).
    let query = client.try_clone().unwrap();
    in_thread("cw-query", move || write_then_read(query));
    sync_with_sentinel(&listener, &watch);
    let events = watch.stop().events;
    assert_eq!(
        count(&events, "peer_reset_idle", client_port),
        1,
        "{events:#?}"
    );
    assert_eq!(
        count(&events, "used_after_reset", client_port),
        0,
        "{events:#?}"
    );
    drop(client);
}

/// A pooled connection idle for 2 s, closed by the server (FIN); `after` the FIN, a
/// `cw-query` thread writes into it and reads. Returns the client's port.
fn used_after_fin(listener: &std::net::TcpListener, after: Duration) -> u16 {
    let pair = Pair::connect(listener, "cw-pool-conn");
    let client_port = pair.client_port();
    thread::sleep(Duration::from_secs(2));
    drop(pair.server); // graceful close: FIN
    thread::sleep(after);
    in_thread("cw-query", move || write_then_read(pair.client));
    client_port
}

#[test]
fn used_after_idle_fin() {
    let (listener, _, watch) = watched_listener("127.0.0.1:0", &[]);
    let client_port = used_after_fin(&listener, Duration::from_millis(200));
    watch.wait_for("used_after_close", |events| {
        count(events, "used_after_close", client_port) >= 1
    });
    let events = watch.stop().events;
    let fin = of_kind(&events, "peer_close_idle", client_port);
    assert_eq!(fin.len(), 1, "{events:#?}");
    assert_eq!(fin[0]["comm"], "cw-pool-conn");
    assert_eq!(fin[0]["state"], "ESTABLISHED");
    assert!(ms(fin[0], "idle_ms") >= 1900, "{:?}", fin[0]);
    assert!(
        position(&events, "peer_close_idle", client_port)
            < position(&events, "used_after_close", client_port)
    );
    let hit = of_kind(&events, "used_after_close", client_port);
    assert_eq!(hit.len(), 1, "{events:#?}");
    assert_eq!(hit[0]["comm"], "cw-query");
    assert_eq!(hit[0]["op"], "send");
    assert!(ms(hit[0], "since_close_ms") >= 150, "{:?}", hit[0]);
    assert_eq!(count(&events, "used_after_reset", client_port), 0);
}

/// Acceptance: one incident line for the FIN → write → RST sequence. The table prints
/// one line for the client's socket with the sequence (the server's TIME_WAIT RST joins it,
/// on kernels whose tracepoint reports it), while `--json`, watching the same connection,
/// still prints each finding.
#[test]
fn fin_write_rst_is_one_incident_line() {
    let (listener, server_port, json) = watched_listener("127.0.0.1:0", &[]);
    let table = Watch::start_table(&["--port", &server_port.to_string()]);
    // Past the FIN's 200 ms grace: the idle FIN is its own finding first.
    let client_port = used_after_fin(&listener, Duration::from_millis(300));
    let client = format!(":{client_port} ");
    let sequence = |line: &str| {
        line.contains(" peer FIN after ")
            && line.contains(" idle → app wrote ")
            && line.ends_with("ms later (send accepted) → peer RST")
    };
    table.wait_for("the incident line", |lines| {
        lines.iter().any(|l| sequence(l.as_str().unwrap()))
    });
    json.wait_for("the reset", |events| {
        RESET_KINDS
            .iter()
            .any(|k| count(events, k, client_port) >= 1)
    });
    let lines: Vec<String> = table
        .stop()
        .events
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    let events = json.stop().events;
    let of_the_socket: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(&client) && !l.contains("cause: timewait_socket"))
        .filter(|l| !l.contains(&format!(":{server_port} → 127.0.0.1{client}")))
        .collect();
    assert_eq!(of_the_socket.len(), 1, "one line: {lines:#?}");
    let line = of_the_socket[0];
    assert!(sequence(line), "{line}");
    assert!(line.contains(" peer_close_idle "), "headline: {line}");
    assert!(
        line.contains("/cw-pool-conn "),
        "the socket's owner: {line}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("cause: timewait_socket")),
        "the server's TIME_WAIT RST joins the incident: {lines:#?}"
    );
    // --json: each finding, as before.
    let of_kinds =
        |kinds: &[&str]| -> usize { kinds.iter().map(|k| count(&events, k, client_port)).sum() };
    assert_eq!(
        [
            of_kinds(&["peer_close_idle"]),
            of_kinds(&["used_after_close"]),
            of_kinds(&RESET_KINDS)
        ],
        [1, 1, 1],
        "{events:#?}"
    );
}

#[test]
fn close_wait_that_lingers() {
    let (listener, _, watch) = watched_listener("127.0.0.1:0", &["--close-wait-threshold", "2s"]);
    let leaky = Pair::connect(&listener, "cw-leaky");
    let tidy = Pair::connect(&listener, "cw-tidy");
    let (leaky_port, tidy_port) = (leaky.client_port(), tidy.client_port());
    drop(leaky.server);
    drop(tidy.server);
    let mut tidy_client = tidy.client;
    let mut rest = Vec::new();
    tidy_client.read_to_end(&mut rest).unwrap();
    drop(tidy_client); // closes promptly after EOF
    let _leaked = leaky.client; // never closed
    watch.wait_for("close_wait_lingering", |events| {
        count(events, "close_wait_lingering", leaky_port) >= 1
    });
    thread::sleep(Duration::from_millis(1500)); // another tick: no second report
    let events = watch.stop().events;
    let lingering = of_kind(&events, "close_wait_lingering", leaky_port);
    assert_eq!(lingering.len(), 1, "once per socket: {events:#?}");
    assert_eq!(lingering[0]["pid"], std::process::id());
    assert_eq!(lingering[0]["comm"], "cw-leaky");
    assert_eq!(lingering[0]["state"], "CLOSE_WAIT");
    assert!(ms(lingering[0], "age_ms") >= 2000, "{:?}", lingering[0]);
    assert_eq!(count(&events, "close_wait_lingering", tidy_port), 0);
}

/// A keep-alive client's connection: a thread blocked reading it (as the client's event
/// loop is), which closes the socket as soon as the read ends (EOF or error).
struct Healthy {
    server: TcpStream,
    port: u16,
    reader: thread::JoinHandle<std::io::Result<usize>>,
}

impl Healthy {
    /// A healthy client and a stale pool's connection, both idle past the threshold.
    fn next_to_a_stale_pool(listener: &std::net::TcpListener) -> (Healthy, Pair) {
        let healthy = Healthy::connect(listener);
        let stale = Pair::connect(listener, "cw-stale-pool");
        thread::sleep(Duration::from_millis(1500));
        (healthy, stale)
    }

    fn connect(listener: &std::net::TcpListener) -> Healthy {
        let pair = Pair::connect(listener, "cw-keepalive");
        let port = pair.client_port();
        let mut client = pair.client;
        let reader = thread::spawn(move || {
            let read = client.read_to_end(&mut Vec::new());
            drop(client); // closed at once
            read
        });
        Healthy {
            server: pair.server,
            port,
            reader,
        }
    }
}

/// The core distinction: after a peer's FIN of an idle connection, a healthy client (here a
/// thread blocked reading it, as a keep-alive client's event loop is) closes its end at
/// once: counted, not reported. A pool that holds the dead socket past the grace is
/// flagged, before its next write.
#[test]
fn a_fin_handled_at_once_is_healthy_and_one_held_is_flagged() {
    let (listener, _, watch) = watched_listener("127.0.0.1:0", &[]);
    let (healthy, stale) = Healthy::next_to_a_stale_pool(&listener);
    let (healthy_port, stale_port) = (healthy.port, stale.client_port());
    drop(healthy.server);
    drop(stale.server);
    healthy.reader.join().unwrap().unwrap(); // EOF
    watch.wait_for("peer_close_idle for the stale pool", |events| {
        count(events, "peer_close_idle", stale_port) == 1
    });
    sync_with_sentinel(&listener, &watch);
    let events = watch.stop().events;
    assert_eq!(
        count(&events, "peer_close_idle", healthy_port),
        0,
        "{events:#?}"
    );
    assert_eq!(
        count(&events, "used_after_close", healthy_port),
        0,
        "{events:#?}"
    );
    drop(stale.client);
}

/// The same for an RST: a healthy client (a thread blocked reading, woken by
/// `ECONNRESET`) closes the reset socket at once; the kernel frees it (`tcp_destroy_sock`)
/// within the grace: counted, no `peer_reset_idle`. A pool that holds the dead socket (no
/// reader) is flagged after the grace, dated by the RST.
#[test]
fn an_idle_reset_handled_at_once_is_healthy_and_one_held_is_flagged() {
    an_idle_reset_handled_at_once_with(&[]);
}

/// The same through the kprobes: the healthy reader's recv is blocked when the RST comes,
/// its kretprobe armed across the wait; woken by ECONNRESET within the grace, the read is
/// the client noticing, not reported.
#[test]
fn an_idle_reset_handled_at_once_is_healthy_with_kprobes() {
    if kprobes_unreachable("an_idle_reset_handled_at_once_is_healthy_with_kprobes") {
        return;
    }
    an_idle_reset_handled_at_once_with(&["--no-trampolines"]);
}

fn an_idle_reset_handled_at_once_with(extra: &[&str]) {
    let (listener, _, watch) = watched_listener("127.0.0.1:0", extra);
    let (healthy, stale) = Healthy::next_to_a_stale_pool(&listener);
    let (healthy_port, stale_port) = (healthy.port, stale.client_port());
    abort(healthy.server); // ECONNRESET for the reader
    let stale_client = stale.reset_from_server();
    let read = healthy.reader.join().unwrap();
    assert_eq!(
        read.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset)
    );
    watch.wait_for("peer_reset_idle for the stale pool", |events| {
        count(events, "peer_reset_idle", stale_port) == 1
    });
    sync_with_sentinel(&listener, &watch);
    let stopped = watch.stop();
    let events = stopped.events;
    // Nothing at all: its reader woken by ECONNRESET is the client noticing, not a call
    // into a dead connection.
    let on_healthy: Vec<&Value> = events
        .iter()
        .filter(|e| port(&e["local"]) == healthy_port)
        .collect();
    assert!(on_healthy.is_empty(), "{on_healthy:#?}");
    let flagged = of_kind(&events, "peer_reset_idle", stale_port);
    assert_eq!(flagged.len(), 1, "{events:#?}");
    assert_eq!(flagged[0]["comm"], "cw-stale-pool");
    assert!(ms(flagged[0], "idle_ms") >= 1400, "{:?}", flagged[0]);
    // The healthy one was counted: the stop summary's handled resets.
    let summary = stopped
        .stderr
        .lines()
        .find(|l| l.starts_with("connwatch: stopped:"))
        .unwrap_or_else(|| panic!("no summary: {}", stopped.stderr));
    let handled: u64 = summary
        .split(" idle FINs and ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no handled resets in {summary}"));
    assert!(handled >= 1, "{summary}");
    drop(stale_client);
}

/// Leaks from before connwatch started: no event told of their FIN, the socket list does.
/// Reported once listed for the threshold, with an age that is a lower bound.
#[test]
fn close_wait_from_before_the_start_is_reported() {
    let (listener, server_port) = listen("127.0.0.1:0");
    let leaked: Vec<Pair> = (0..3)
        .map(|_| Pair::connect(&listener, "cw-old-leak"))
        .collect();
    let tidy = Pair::connect(&listener, "cw-old-tidy");
    let tidy_port = tidy.client_port();
    let ports: Vec<u16> = leaked.iter().map(Pair::client_port).collect();
    // The server closes each; the clients never do (but the tidy one).
    let leaked: Vec<TcpStream> = leaked
        .into_iter()
        .map(|pair| {
            drop(pair.server);
            pair.client
        })
        .collect();
    drop(tidy.server);
    thread::sleep(Duration::from_millis(200));
    let port = server_port.to_string();
    let watch = Watch::start(&[
        "--port",
        &port,
        "--close-wait-threshold",
        "1s",
        "--refresh",
        "500ms",
    ]);
    // The tidy client closes after connwatch started: its end is an event, not a leak.
    drop(tidy.client);
    watch.wait_for("close_wait_lingering for the three old leaks", |events| {
        ports
            .iter()
            .all(|&p| count(events, "close_wait_lingering", p) == 1)
    });
    thread::sleep(Duration::from_millis(1500)); // more refreshes: no second report
    let events = watch.stop().events;
    for &p in &ports {
        let lingering = of_kind(&events, "close_wait_lingering", p);
        assert_eq!(lingering.len(), 1, "once per socket: {events:#?}");
        assert_eq!(lingering[0]["pid"], std::process::id());
        assert_eq!(lingering[0]["state"], "CLOSE_WAIT");
        assert_eq!(lingering[0]["age_at_least"], true, "{:?}", lingering[0]);
        assert!(ms(lingering[0], "age_ms") >= 1000, "{:?}", lingering[0]);
    }
    assert_eq!(count(&events, "close_wait_lingering", tidy_port), 0);
    drop(leaked);
}

#[test]
fn busy_healthy_connection_is_quiet() {
    let (listener, _, watch) = watched_listener("127.0.0.1:0", &["--all"]);
    let mut busy = Pair::connect(&listener, "cw-busy");
    let busy_port = busy.client_port();
    let mut server = busy.server.try_clone().unwrap();
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 100];
        for _ in 0..5000 {
            server.read_exact(&mut buf).unwrap();
        }
    });
    for _ in 0..5000 {
        busy.client.write_all(&[7u8; 100]).unwrap();
    }
    reader.join().unwrap();
    for _ in 0..2000 {
        busy.round_trip();
    }
    sync_with_sentinel(&listener, &watch);
    let events = watch.stop().events;
    for kind_name in [
        "used_after_reset",
        "used_after_close",
        "peer_close_idle",
        "close_wait_lingering",
        "peer_reset_idle",
        "peer_reset",
        "local_reset",
    ] {
        assert_eq!(
            count(&events, kind_name, busy_port),
            0,
            "{kind_name}: {events:#?}"
        );
    }
    // The busy socket was seen (it is filtered by port, not missed).
    assert!(
        count(&events, "state_change", busy_port) >= 1,
        "{events:#?}"
    );
}

#[test]
fn eof_read_right_after_fin_is_an_ordinary_close() {
    let (listener, server_port, watch) = watched_listener("127.0.0.1:0", &[]);
    let pair = Pair::connect(&listener, "cw-keepalive");
    let mut server = pair.server;
    // A server blocked in read, woken by the client's FIN: how HTTP keep-alive ends.
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).unwrap(), 0, "EOF");
    });
    drop(pair.client);
    reader.join().unwrap();
    sync_with_sentinel(&listener, &watch);
    let events = watch.stop().events;
    assert_eq!(
        count(&events, "used_after_close", server_port),
        0,
        "{events:#?}"
    );
}

#[test]
fn eof_read_long_after_fin_is_reported() {
    eof_read_long_after_fin_with(&[]);
}

/// The same through the kprobes (see [`used_after_idle_reset_with_kprobes`]): a recv.
#[test]
fn eof_read_long_after_fin_is_reported_with_kprobes() {
    through_kprobes(
        "eof_read_long_after_fin_is_reported_with_kprobes",
        eof_read_long_after_fin_with,
    );
}

/// A pool reads from a connection whose peer closed it 1.5 s before: one
/// `used_after_close` (EOF). Returns connwatch's stderr.
fn eof_read_long_after_fin_with(extra: &[&str]) -> String {
    let (listener, server_port, watch) = watched_listener("127.0.0.1:0", extra);
    let pair = Pair::connect(&listener, "cw-pool-conn");
    let client_port = pair.client_port();
    drop(pair.server);
    // The pool leaves the connection alone past the idle threshold, then reads from it.
    thread::sleep(Duration::from_millis(1500));
    let mut stream = pair.client;
    in_thread("cw-checkout", move || {
        let mut buf = [0u8; 16];
        assert_eq!(stream.read(&mut buf).unwrap(), 0, "EOF");
    });
    watch.wait_for("used_after_close", |events| {
        count(events, "used_after_close", client_port) >= 1
    });
    let Stopped { events, stderr, .. } = watch.stop();
    let hit = of_kind(&events, "used_after_close", client_port);
    assert_eq!(hit.len(), 1, "{events:#?}");
    assert_eq!(hit[0]["comm"], "cw-checkout");
    assert_eq!(
        (&hit[0]["op"], &hit[0]["error"]),
        (&"recv".into(), &"EOF".into())
    );
    assert_eq!(hit[0]["errno"], 0);
    assert!(ms(hit[0], "since_close_ms") >= 1400, "{:?}", hit[0]);
    assert_eq!(port(&hit[0]["remote"]), server_port);
    stderr
}

/// A stop within an idle FIN's grace reports it: the application still held the socket at
/// the end (on this host the stop comes about 50 ms into the 200 ms).
#[test]
fn an_idle_fin_still_in_its_grace_at_stop_is_reported() {
    let (listener, _, watch) = watched_listener("127.0.0.1:0", &[]);
    let pair = Pair::connect(&listener, "cw-held-at-stop");
    let client_port = pair.client_port();
    thread::sleep(Duration::from_millis(1500));
    drop(pair.server);
    thread::sleep(Duration::from_millis(50));
    let stopped = watch.stop();
    assert_eq!(
        count(&stopped.events, "peer_close_idle", client_port),
        1,
        "{:#?}\n{}",
        stopped.events,
        stopped.stderr
    );
    drop(pair.client);
}
