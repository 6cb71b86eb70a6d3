//! Why each RST happened, one test per cause, and connections the network killed silently.
mod support;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    thread,
    time::Duration,
};

use serde_json::Value;
use support::{netns::*, *};

fn with_cause<'a>(events: &'a [Value], kind_name: &str, local_port: u16) -> Vec<&'a str> {
    of_kind(events, kind_name, local_port)
        .iter()
        .map(|e| e["cause"].as_str().unwrap_or("(none)"))
        .collect()
}

#[test]
fn connecting_to_a_closed_port() {
    let (listener, port) = listen("127.0.0.1:0");
    drop(listener);
    let watch = Watch::start(&["--port", &port.to_string()]);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    let sides = if sees_socketless_resets() { 2 } else { 1 };
    watch.wait_for("both sides of the refusal", |events| {
        events
            .iter()
            .filter(|e| RESET_KINDS.contains(&kind(e)))
            .count()
            >= sides
    });
    let events = watch.stop().events;
    let refused: Vec<&Value> = events.iter().filter(|e| kind(e) == "peer_reset").collect();
    assert_eq!(refused.len(), 1, "{events:#?}");
    assert_eq!(refused[0]["cause"], "connection_refused");
    assert_eq!(refused[0]["state"], "SYN_SENT");
    // The kernel answered the SYN for a port nobody listens on (sent on loopback before the
    // client's receive, so it would be here by now).
    let expected: &[&str] = if sees_socketless_resets() {
        &["no_socket"]
    } else {
        &[]
    };
    assert_eq!(with_cause(&events, "local_reset", port), expected);
}

/// Causes, not idleness, are under test: on a slow machine (a kernel-matrix guest under
/// emulation) a connection can sit idle for seconds before its reset, which would make a
/// `peer_reset` a `peer_reset_idle`.
const NOT_IDLE: &[&str] = &["--idle-threshold", "1h"];

/// Linux 6.10 made tcp:tcp_send_reset fire for RSTs sent with no socket; before, the
/// receiving side is all there is to see (doctor says so).
fn sees_socketless_resets() -> bool {
    kernel_at_least(6, 10)
}

#[test]
fn closing_with_unread_data() {
    let (listener, server_port, watch) = watched_listener("127.0.0.1:0", NOT_IDLE);
    let mut pair = Pair::connect(&listener, "cw-chatty");
    pair.client.write_all(b"never read by the server").unwrap();
    thread::sleep(Duration::from_millis(100));
    let client_port = pair.client_port();
    drop(pair.server); // plain close(), data still queued
    watch.wait_for("the reset", |events| {
        count(events, "local_reset", server_port) >= 1
            && count(events, "peer_reset", client_port) >= 1
    });
    let events = watch.stop().events;
    assert_eq!(
        with_cause(&events, "local_reset", server_port),
        ["unread_data_on_close"]
    );
    assert_eq!(
        with_cause(&events, "peer_reset", client_port),
        ["reset_while_established"]
    );
}

#[test]
fn so_linger_zero() {
    let (listener, server_port, watch) = watched_listener("127.0.0.1:0", NOT_IDLE);
    let pair = Pair::connect(&listener, "cw-linger");
    let client_port = pair.client_port();
    let _client = pair.reset_from_server();
    watch.wait_for("the reset", |events| {
        count(events, "peer_reset", client_port) >= 1
    });
    let events = watch.stop().events;
    assert_eq!(
        with_cause(&events, "local_reset", server_port),
        ["linger_zero_abort"]
    );
    assert_eq!(
        with_cause(&events, "peer_reset", client_port),
        ["reset_while_established"]
    );
}

#[test]
fn ss_kill() {
    let (listener, server_port, watch) = watched_listener("127.0.0.1:0", NOT_IDLE);
    let pair = Pair::connect(&listener, "cw-destroyed");
    let client_port = pair.client_port();
    kill_established(None, server_port);
    watch.wait_for("the reset", |events| {
        count(events, "peer_reset", client_port) >= 1
    });
    let events = watch.stop().events;
    // Before 6.10 only an ECONNABORTED set before the RST tells `ss -K` from a timer's
    // abort; 5.10 sets it first, 6.1 after.
    let cause = with_cause(&events, "local_reset", server_port);
    if kernel_at_least(6, 10) {
        assert_eq!(cause, ["socket_destroyed"]);
    } else {
        assert!(
            cause == ["socket_destroyed"] || cause == ["live_abort"],
            "{cause:?}"
        );
    }
    drop(pair);
}

#[test]
fn data_after_shutdown() {
    let (listener, server_port, watch) = watched_listener("127.0.0.1:0", NOT_IDLE);
    let mut pair = Pair::connect(&listener, "cw-late-writer");
    let client_port = pair.client_port();
    pair.server.shutdown(Shutdown::Both).unwrap();
    thread::sleep(Duration::from_millis(100));
    // The client (in CLOSE_WAIT) still writes: the server's kernel refuses the data.
    let _ = pair.client.write_all(b"too late");
    watch.wait_for("the reset", |events| {
        count(events, "local_reset", server_port) >= 1
    });
    let events = watch.stop().events;
    assert_eq!(
        with_cause(&events, "local_reset", server_port),
        ["data_after_close"]
    );
    assert_eq!(
        with_cause(&events, "peer_reset", client_port),
        ["reset_during_close"]
    );
}

/// A server that lost its socket without telling the client (its RST was dropped, as after
/// a crash behind a firewall): the client's next segment gets an RST for no socket.
#[test]
fn stray_segment_after_the_server_forgot() {
    let hosts = Hosts::create();
    let listener = hosts.server_listener();
    let server_port = listener.local_addr().unwrap().port();
    let watch = Watch::start(&["--port", &server_port.to_string()]);
    let mut client: TcpStream = Hosts::on(&hosts.client, "cw-stray", move || {
        TcpStream::connect((SERVER_ADDR, server_port)).unwrap()
    });
    let (server, _) = listener.accept().unwrap();
    let nft = |script: &str| run("ip", &["netns", "exec", &hosts.server, "nft", script]);
    nft(
        "add table inet cw; add chain inet cw out { type filter hook output priority 0; }; add rule inet cw out tcp flags rst drop",
    );
    // The server goes away (a crash, or a restart not listening yet); its RST never leaves
    // the host.
    abort(server);
    drop(listener);
    nft("delete table inet cw");
    client.write_all(b"anyone there?").unwrap();
    let mut buf = [0u8; 8];
    assert!(
        client.read(&mut buf).is_err(),
        "the stray segment is answered with an RST"
    );
    let client_port = client.local_addr().unwrap().port();
    watch.wait_for("the stray reset", |events| {
        if sees_socketless_resets() {
            with_cause(events, "local_reset", server_port).contains(&"no_socket")
        } else {
            !with_cause(events, "peer_reset", client_port).is_empty()
        }
    });
    let events = watch.stop().events;
    let expected: &[&str] = if sees_socketless_resets() {
        &["linger_zero_abort", "no_socket"]
    } else {
        &["linger_zero_abort"]
    };
    assert_eq!(
        with_cause(&events, "local_reset", server_port),
        expected,
        "the dropped abort, then the answer to the stray segment"
    );
}

/// The network drops everything silently; TCP_USER_TIMEOUT gives up on the unacknowledged
/// write: no RST, no FIN, ETIMEDOUT.
#[test]
fn a_connection_the_network_dropped_dies_of_timeout() {
    let hosts = Hosts::create();
    let listener = hosts.server_listener();
    let server_port = listener.local_addr().unwrap().port();
    // A healthy idle connection on loopback, watched too: it must stay quiet.
    let (healthy_listener, healthy_port) = listen("127.0.0.1:0");
    let watch = Watch::start(&[
        "--port",
        &server_port.to_string(),
        "--port",
        &healthy_port.to_string(),
    ]);
    let healthy = Pair::connect(&healthy_listener, "cw-healthy");
    let mut client: TcpStream = Hosts::on(&hosts.client, "cw-doomed", move || {
        let stream = TcpStream::connect((SERVER_ADDR, server_port)).unwrap();
        socket2::SockRef::from(&stream)
            .set_tcp_user_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        stream
    });
    let (_server, _) = listener.accept().unwrap();
    let client_port = client.local_addr().unwrap().port();
    thread::sleep(Duration::from_millis(1200));
    // The path goes dark: every packet into the server host is dropped.
    hosts.drop_into_server();
    client.write_all(b"SELECT 1").unwrap();
    watch.wait_for("silent_death", |events| {
        count(events, "silent_death", client_port) >= 1
    });
    let events = watch.stop().events;
    let death = of_kind(&events, "silent_death", client_port);
    assert_eq!(death.len(), 1, "{events:#?}");
    assert_eq!(death[0]["error"], "ETIMEDOUT");
    assert_eq!(death[0]["errno"], libc::ETIMEDOUT);
    assert_eq!(death[0]["pid"], std::process::id());
    assert_eq!(death[0]["comm"], "cw-doomed");
    // Silent from the peer since before the cut: the idle time plus the user timeout.
    assert!(ms(death[0], "since_recv_ms") >= 2500, "{:?}", death[0]);
    for kind_name in RESET_KINDS {
        assert_eq!(
            count(&events, kind_name, client_port),
            0,
            "no RST was involved"
        );
    }
    assert_eq!(count(&events, "silent_death", healthy.client_port()), 0);
    drop(healthy);
}
