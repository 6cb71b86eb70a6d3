//! Pools and stalls: sockets opened before connwatch started, and queries stuck on a real
//! PostgreSQL.
mod support;

use std::{process::Command, thread, time::Duration};

use serde_json::Value;
use support::{postgres::Postgres, *};

/// A pool of `connections` held by another process (python3) until [`PyClient::finish`],
/// and the server ends of them.
fn python_pool(
    listener: &std::net::TcpListener,
    connections: usize,
) -> (PyClient, Vec<std::net::TcpStream>) {
    let port = listener.local_addr().unwrap().port().to_string();
    let mut client = PyClient::start(&["pool", &port, &connections.to_string()]);
    let accepted = (0..connections)
        .map(|_| listener.accept().unwrap().0)
        .collect();
    assert_eq!(client.line(), "ready");
    (client, accepted)
}

#[test]
fn top_once_shows_a_pool_opened_before_start() {
    const CONNECTIONS: usize = 20;
    let (listener, server_port) = listen("127.0.0.1:0");
    // Another process holds the pool, opened before connwatch exists.
    let (client, _accepted) = python_pool(&listener, CONNECTIONS);

    let (snapshot, _) = top_once(Command::new(&*CONNWATCH), &[]);
    let endpoint = format!("127.0.0.1:{server_port}");
    let pools = snapshot["pools"].as_array().unwrap();
    let outbound: Vec<&Value> = pools
        .iter()
        .filter(|p| p["endpoint"] == endpoint.as_str() && p["direction"] == "outbound")
        .collect();
    assert_eq!(outbound.len(), 1, "one client pool: {pools:#?}");
    let pool = outbound[0];
    assert_eq!(pool["pid"], client.pid());
    assert_eq!(pool["comm"], "python3");
    assert_eq!(pool["total"], CONNECTIONS);
    assert_eq!(pool["established"], CONNECTIONS);
    assert_eq!(pool["close_wait"], 0);
    // The server side is one inbound pool on the listening endpoint, not 20.
    let inbound: Vec<&Value> = pools
        .iter()
        .filter(|p| p["endpoint"] == endpoint.as_str() && p["direction"] == "inbound")
        .collect();
    assert_eq!(inbound.len(), 1, "{pools:#?}");
    assert_eq!(inbound[0]["pid"], std::process::id());
    assert_eq!(inbound[0]["established"], CONNECTIONS);
    client.finish();
}

/// Connect rates come from the kernel's per-endpoint counters, not from an event per
/// connection: each side of 30 connects is charged to its pool.
#[test]
fn top_counts_each_pools_connects_in_the_kernel() {
    const CONNECTIONS: usize = 30;
    let (listener, server_port) = listen("127.0.0.1:0");
    let top = Watch::spawn(&["top", "--json", "--refresh", "1s"]);
    let (client, _accepted) = python_pool(&listener, CONNECTIONS);
    let endpoint = format!("127.0.0.1:{server_port}");
    let pool = |refreshes: &[Value], direction: &str| -> Option<Value> {
        let pools = refreshes.last()?["pools"].as_array()?.clone();
        pools
            .into_iter()
            .find(|p| p["endpoint"] == endpoint.as_str() && p["direction"] == direction)
    };
    let counted = |refreshes: &[Value]| {
        [("outbound", client.pid()), ("inbound", std::process::id())]
            .iter()
            .all(|&(direction, pid)| {
                pool(refreshes, direction)
                    .is_some_and(|p| p["pid"] == pid && p["connects_per_min"] == CONNECTIONS)
            })
    };
    top.wait_for("both pools with their 30 connects", counted);
    client.finish();
    let stopped = top.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
}

#[test]
fn queries_stuck_on_postgres_are_stalled_and_idle_ones_are_not() {
    const STUCK: usize = 3;
    let pg = Postgres::start();
    let pg_port = pg.port.to_string();
    let watch = Watch::start(&[&["--port", &pg_port][..], &STALL_WATCH].concat());
    // An idle part of the pool: used once, then left alone.
    let mut idle: Vec<::postgres::Client> = (0..2).map(|_| pg.connect().unwrap()).collect();
    for client in &mut idle {
        client.simple_query("SELECT 1").unwrap();
    }
    // The stuck part: pooled connections, warmed up, later checked out for queries with no
    // timeout. (A request sent within one kernel tick of the previous answer cannot be
    // ordered by tcp_info's jiffy timestamps; a pool's checkout comes much later.)
    let mut stuck: Vec<::postgres::Client> = (0..STUCK).map(|_| pg.connect().unwrap()).collect();
    for client in &mut stuck {
        client.simple_query("SELECT 1").unwrap();
    }
    thread::sleep(Duration::from_millis(100));
    for mut client in stuck {
        thread::Builder::new()
            .name("cw-stuck-query".into())
            .spawn(move || {
                // Ends with an error when the server shuts down at the end of the test.
                let _ = client.simple_query("SELECT pg_sleep(60)");
            })
            .unwrap();
    }
    watch.wait_for("a request_stalled per stuck query", |events| {
        events
            .iter()
            .filter(|e| kind(e) == "request_stalled")
            .count()
            >= STUCK
    });
    thread::sleep(Duration::from_millis(2500)); // more refreshes: still once per stall
    let events = watch.stop().events;
    let stalled: Vec<&Value> = events
        .iter()
        .filter(|e| kind(e) == "request_stalled")
        .collect();
    assert_eq!(stalled.len(), STUCK, "{events:#?}");
    for event in &stalled {
        assert_eq!(event["pid"], std::process::id());
        assert_eq!(port(&event["remote"]), pg.port);
        assert!(ms(event, "stalled_ms") >= 2000, "{event:?}");
        assert_eq!(event["state"], "ESTABLISHED");
    }
    // Exactly STUCK: the idle connections, open all along, were not flagged.
    drop(idle);
    // The server's own sockets wait on their clients; they are not stalled requests.
    assert!(
        stalled.iter().all(|e| port(&e["local"]) != pg.port),
        "{stalled:#?}"
    );
}

/// The pool of `pid` towards `endpoint` in `direction`, from a `top --json` snapshot.
fn pool_in<'a>(snapshot: &'a Value, pid: u32, direction: &str, endpoint: &str) -> &'a Value {
    let pools = snapshot["pools"].as_array().unwrap();
    let found: Vec<&Value> = pools
        .iter()
        .filter(|p| p["pid"] == pid && p["direction"] == direction && p["endpoint"] == endpoint)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {direction} pool of {pid} to {endpoint}: {pools:#?}"
    );
    found[0]
}

fn number(pool: &Value, field: &str) -> u64 {
    pool[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing: {pool:#}"))
}

/// Each connection in one state only, and the columns add up: ESTAB = IDLE + ACTIVE +
/// STALLED and TOTAL = ESTAB + CL_WAIT + OTHER, on both sides of one pool of five
/// connections (one stalled, one idle, one active, one half-closed by each side). A pool all
/// in CLOSE_WAIT has no MAX_IDLE, rather than 0.
#[test]
fn top_states_are_exclusive_and_add_up() {
    use std::{
        net::Shutdown,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
    };
    let (listener, port) = listen("127.0.0.1:0");
    let idle = Pair::connect(&listener, "cw-idle");
    let mut stalled = Pair::connect(&listener, "cw-stalled");
    let active = Pair::connect(&listener, "cw-active");
    // The client closes its side: FIN_WAIT2 here, CLOSE_WAIT on the server.
    let client_closed = Pair::connect(&listener, "cw-fin-wait");
    client_closed.client.shutdown(Shutdown::Write).unwrap();
    // The server closes its side: CLOSE_WAIT here, FIN_WAIT2 on the server.
    let server_closed = Pair::connect(&listener, "cw-close-wait");
    server_closed.server.shutdown(Shutdown::Write).unwrap();
    // A request the server reads, or not, and never answers. Past a jiffy after the last
    // answer, so tcp_info's stamps order it (it is sent before connwatch starts).
    thread::sleep(Duration::from_millis(50));
    std::io::Write::write_all(&mut stalled.client, b"SELECT pg_sleep(3600)").unwrap();
    let busy = Arc::new(AtomicBool::new(true));
    let pinger = {
        let busy = busy.clone();
        let mut active = active;
        thread::spawn(move || {
            while busy.load(Ordering::SeqCst) {
                active.round_trip();
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // A second endpoint whose only connection is in CLOSE_WAIT.
    let (lonely_listener, lonely_port) = listen("127.0.0.1:0");
    let lonely = Pair::connect(&lonely_listener, "cw-lonely");
    lonely.server.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(1200)); // the idle threshold (1s) and stall threshold

    let (snapshot, _) = top_once(
        Command::new(&*CONNWATCH),
        &["--stall-threshold", "1s", "--refresh", "1s"],
    );
    busy.store(false, Ordering::SeqCst);
    pinger.join().unwrap();
    let endpoint = format!("127.0.0.1:{port}");
    let me = std::process::id();
    let client = pool_in(&snapshot, me, "outbound", &endpoint);
    let columns = |pool: &Value| {
        [
            "total",
            "established",
            "idle",
            "active",
            "stalled",
            "close_wait",
            "other",
        ]
        .map(|field| number(pool, field))
    };
    assert_eq!(
        columns(client),
        [5, 3, 1, 1, 1, 1, 1],
        "total, established, idle, active, stalled, close_wait, other: {client:#}"
    );
    // The server's side: never stalled (it waits on its clients); the same sums.
    let server = pool_in(&snapshot, me, "inbound", &endpoint);
    let [
        total,
        established,
        idle_n,
        active_n,
        stalled_n,
        close_wait,
        other,
    ] = columns(server);
    assert_eq!(
        (total, established, stalled_n, close_wait, other),
        (5, 3, 0, 1, 1),
        "{server:#}"
    );
    for pool in [client, server] {
        let [
            total,
            established,
            idle_n,
            active_n,
            stalled_n,
            close_wait,
            other,
        ] = columns(pool);
        assert_eq!(established, idle_n + active_n + stalled_n, "{pool:#}");
        assert_eq!(total, established + close_wait + other, "{pool:#}");
    }
    assert_eq!((idle_n, active_n), (2, 1), "{server:#}");
    assert!(number(client, "max_idle_ms") >= 1000, "{client:#}");
    let lonely_pool = pool_in(
        &snapshot,
        me,
        "outbound",
        &format!("127.0.0.1:{lonely_port}"),
    );
    assert_eq!(number(lonely_pool, "close_wait"), 1, "{lonely_pool:#}");
    assert!(
        lonely_pool.get("max_idle_ms").is_none(),
        "unknown, not 0: {lonely_pool:#}"
    );
    drop((idle, stalled, client_closed, server_closed, lonely));
}

/// A process that opens connections and has each one reset, holding none at any refresh,
/// is still a pool in `top --once`: its resets and connects over the last minute, with no
/// socket. So is the server that resets them.
#[test]
fn top_shows_a_process_that_is_reset_and_holds_no_socket() {
    const CONNECTIONS: usize = 20;
    let (listener, port) = listen("127.0.0.1:0");
    // Resets every connection it accepts. On a slow guest the RST can beat connect()
    // back to the client (ECONNRESET from connect): connected and reset all the same.
    let server = thread::spawn(move || {
        for stream in listener.incoming().take(CONNECTIONS) {
            abort(stream.unwrap());
        }
        listener
    });
    // --once prints the second refresh: the resets happen between the two (10 s: python
    // takes seconds to start in a guest without KVM).
    let top = Watch::spawn(&["top", "--once", "--json", "--refresh", "10s"]);
    let mut client = PyClient::start(&["resets", &port.to_string(), &CONNECTIONS.to_string()]);
    assert_eq!(client.line(), "done");
    let _listener = server.join().unwrap();
    let stopped = top.wait_exit();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert_eq!(
        stopped.events.len(),
        1,
        "one snapshot: {:#?}",
        stopped.events
    );
    let snapshot = &stopped.events[0];
    let endpoint = format!("127.0.0.1:{port}");
    let reset = pool_in(snapshot, client.pid(), "outbound", &endpoint);
    assert_eq!(reset["comm"], "python3", "{reset:#}");
    assert_eq!(
        ["total", "connects_per_min", "resets_per_min"].map(|f| number(reset, f)),
        [0, CONNECTIONS as u64, CONNECTIONS as u64],
        "total, connects_per_min, resets_per_min: {reset:#}"
    );
    assert!(reset.get("max_idle_ms").is_none(), "{reset:#}");
    let resetting = pool_in(snapshot, std::process::id(), "inbound", &endpoint);
    assert_eq!(
        ["total", "connects_per_min", "resets_per_min"].map(|f| number(resetting, f)),
        [0, CONNECTIONS as u64, CONNECTIONS as u64],
        "total, connects_per_min, resets_per_min: {resetting:#}"
    );
    client.finish();
}
