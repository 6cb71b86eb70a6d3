//! Pools and stalls: sockets opened before connwatch started, and queries stuck on a real
//! PostgreSQL.
mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use serde_json::Value;
use support::{postgres::Postgres, *};

/// A pool of `connections` held by another process (python3) until its stdin closes, and
/// the server ends of them.
fn python_pool(
    listener: &std::net::TcpListener,
    connections: usize,
) -> (std::process::Child, Vec<std::net::TcpStream>) {
    let mut client = Command::new("python3")
        .args([
            "-c",
            "import socket, sys\n\
             port, n = int(sys.argv[1]), int(sys.argv[2])\n\
             pool = [socket.create_connection(('127.0.0.1', port)) for _ in range(n)]\n\
             print('ready', flush=True)\n\
             sys.stdin.read()\n",
            &listener.local_addr().unwrap().port().to_string(),
            &connections.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let accepted = (0..connections)
        .map(|_| listener.accept().unwrap().0)
        .collect();
    let mut ready = String::new();
    BufReader::new(client.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    (client, accepted)
}

#[test]
fn top_once_shows_a_pool_opened_before_start() {
    const CONNECTIONS: usize = 20;
    let (listener, server_port) = listen("127.0.0.1:0");
    // Another process holds the pool, opened before connwatch exists.
    let (mut client, _accepted) = python_pool(&listener, CONNECTIONS);

    let (snapshot, _) = top_once(Command::new(&*CONNWATCH), &[]);
    let endpoint = format!("127.0.0.1:{server_port}");
    let pools = snapshot["pools"].as_array().unwrap();
    let outbound: Vec<&Value> = pools
        .iter()
        .filter(|p| p["endpoint"] == endpoint.as_str() && p["direction"] == "outbound")
        .collect();
    assert_eq!(outbound.len(), 1, "one client pool: {pools:#?}");
    let pool = outbound[0];
    assert_eq!(pool["pid"], client.id());
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
    drop(client.stdin.take());
    client.wait().unwrap();
}

/// Connect rates come from the kernel's per-endpoint counters, not from an event per
/// connection: each side of 30 connects is charged to its pool.
#[test]
fn top_counts_each_pools_connects_in_the_kernel() {
    const CONNECTIONS: usize = 30;
    let (listener, server_port) = listen("127.0.0.1:0");
    let top = Watch::spawn(&["top", "--json", "--refresh", "1s"]);
    let (mut client, _accepted) = python_pool(&listener, CONNECTIONS);
    let endpoint = format!("127.0.0.1:{server_port}");
    let pool = |refreshes: &[Value], direction: &str| -> Option<Value> {
        let pools = refreshes.last()?["pools"].as_array()?.clone();
        pools
            .into_iter()
            .find(|p| p["endpoint"] == endpoint.as_str() && p["direction"] == direction)
    };
    let counted = |refreshes: &[Value]| {
        [("outbound", client.id()), ("inbound", std::process::id())]
            .iter()
            .all(|&(direction, pid)| {
                pool(refreshes, direction)
                    .is_some_and(|p| p["pid"] == pid && p["connects_per_min"] == CONNECTIONS)
            })
    };
    top.wait_for("both pools with their 30 connects", counted);
    drop(client.stdin.take());
    client.wait().unwrap();
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
