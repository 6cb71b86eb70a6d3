//! Events the kernel cannot fit in the ring buffer are counted and shown, never dropped
//! silently.
mod support;

use std::{
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

use nix::sys::signal::{Signal, kill};
use support::*;

/// The `events_lost` records among what `watch --json` printed.
fn lost_records(events: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    events.iter().filter(|e| kind(e) == "events_lost").collect()
}

#[test]
fn a_full_ring_buffer_is_reported() {
    // One page holds about 24 events; a stopped reader lets 100 connections overflow it.
    let (listener, server_port, watch) =
        watched_listener("127.0.0.1:0", &["--all", "--ring-buffer-size", "4096"]);
    let connwatch = support::pid(watch.pid());
    kill(connwatch, Signal::SIGSTOP).unwrap();
    let mut streams = Vec::new();
    for _ in 0..100 {
        streams.push(TcpStream::connect(("127.0.0.1", server_port)).unwrap());
        streams.push(listener.accept().unwrap().0);
    }
    drop(streams);
    kill(connwatch, Signal::SIGCONT).unwrap();
    watch.wait_for("an events_lost record", |events| {
        events.iter().any(|e| kind(e) == "events_lost")
    });
    thread::sleep(Duration::from_millis(100));
    let stopped = watch.stop();
    let lost = lost_records(&stopped.events);
    let counted: u64 = lost.iter().map(|e| e["count"].as_u64().unwrap()).sum();
    assert!(counted > 0, "{lost:?}");
    assert_eq!(lost.last().unwrap()["total"].as_u64().unwrap(), counted);
    // The summary line names the same number.
    assert!(
        stopped.stderr.contains(&format!("{counted} lost")),
        "{}",
        stopped.stderr
    );
    assert!(
        stopped.stderr.contains("raise --ring-buffer-size"),
        "{}",
        stopped.stderr
    );
}

/// Resets in the neighbour's flood: each is four events or more (an RST each way, two
/// state changes), so a few hundred overflow a one-page ring (about 22 events) many times.
const FLOOD: u64 = 300;

/// `watch`'s filters run in the kernel: a neighbour's reset flood, made while connwatch
/// reads nothing (stopped), would overflow a one-page ring many times over, yet costs the
/// watched connection (to `listener`) no event: it never takes ring-buffer space.
/// `filter` is the flags; `flood` makes the neighbour's traffic, at least [`FLOOD`] resets;
/// the watched client connects from a thread named `client` (each test its own: they run
/// side by side in one process).
fn nothing_lost_inside_the_filter(
    listener: &TcpListener,
    client: &str,
    filter: &[&str],
    flood: impl FnOnce(),
) {
    let mut args = vec!["--ring-buffer-size", "4096"];
    args.extend_from_slice(filter);
    let watch = Watch::start(&args);
    let connwatch = support::pid(watch.pid());
    kill(connwatch, Signal::SIGSTOP).unwrap();
    flood();
    // The watched connection, reset by its server while connwatch is still stopped.
    let watched = Pair::connect(listener, client);
    let client_port = watched.client_port();
    let _client = watched.reset_from_server();
    kill(connwatch, Signal::SIGCONT).unwrap();
    watch.wait_for("the watched reset", |events| {
        count(events, "peer_reset", client_port) >= 1
    });
    let stopped = watch.stop();
    let lost = lost_records(&stopped.events);
    assert!(lost.is_empty(), "{lost:?}\n{}", stopped.stderr);
    assert_eq!(
        summary_count(&stopped.stderr, "lost"),
        0,
        "{}",
        stopped.stderr
    );
    // Kept out by the kernel, not by userspace: the test's point.
    let filtered = summary_count(&stopped.stderr, "filtered out in the kernel");
    assert!(filtered >= 2 * FLOOD, "{}", stopped.stderr);
    let foreign: Vec<_> = stopped
        .events
        .iter()
        .filter(|e| port(&e["local"]) != client_port && port(&e["remote"]) != client_port)
        .collect();
    assert!(foreign.is_empty(), "events outside the filter: {foreign:?}");
}

#[test]
fn a_flood_on_another_port_costs_the_watched_port_nothing() {
    let (listener, port) = listen("127.0.0.1:0");
    let port = port.to_string();
    nothing_lost_inside_the_filter(&listener, "cw-by-port", &["--port", &port], || {
        let (neighbour, _) = listen("127.0.0.1:0");
        let flood = ResetFlood::start(neighbour);
        while flood.resets() < FLOOD {
            thread::sleep(Duration::from_millis(10));
        }
        flood.stop();
    });
}

/// By process id and name: this test process's `cw-by-process` thread, the watched client
/// (other tests of this binary flood from other threads of this process meanwhile).
#[test]
fn a_flood_by_another_process_costs_the_watched_process_nothing() {
    let (listener, _) = listen("127.0.0.1:0");
    let pid = std::process::id().to_string();
    let filter = ["--pid", &pid, "--comm", "cw-by-process"];
    nothing_lost_inside_the_filter(&listener, "cw-by-process", &filter, || {
        // The neighbour owns both ends: it connects, accepts and resets.
        let flood = format!(
            r#"
import socket, struct
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(512)
for _ in range({FLOOD}):
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    accepted.close()
    client.close()
"#
        );
        run("python3", &["-c", &flood]);
    });
}
