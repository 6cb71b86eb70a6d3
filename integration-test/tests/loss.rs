//! Events the kernel cannot fit in the ring buffer are counted and shown, never dropped
//! silently.
mod support;

use std::{net::TcpStream, thread, time::Duration};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use support::*;

#[test]
fn a_full_ring_buffer_is_reported() {
    // One page holds about 24 events; a stopped reader lets 100 connections overflow it.
    let (listener, server_port, watch) =
        watched_listener("127.0.0.1:0", &["--all", "--ring-buffer-size", "4096"]);
    let connwatch = Pid::from_raw(watch.pid() as i32);
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
    let lost: Vec<_> = stopped
        .events
        .iter()
        .filter(|e| kind(e) == "events_lost")
        .collect();
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
