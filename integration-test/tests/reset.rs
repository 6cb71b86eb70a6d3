//! Resets on loopback, IPv4 and IPv6, seen through the real eBPF programs.
mod support;

use std::{io::Write, thread, time::Duration};

use serde_json::Value;
use support::*;

/// Client idles 2 s, server closes with SO_LINGER {1,0}.
fn idle_reset(bind: &str, family: &str) {
    let (listener, server_port, watch) = watched_listener(bind, &[]);
    let pair = Pair::connect(&listener, "cw-idle-client");
    let client_port = pair.client_port();
    thread::sleep(Duration::from_secs(2));
    let _client = pair.reset_from_server();
    watch.wait_for("peer_reset_idle and local_reset", |events| {
        count(events, "peer_reset_idle", client_port) >= 1
            && count(events, "local_reset", server_port) >= 1
    });
    let events = watch.stop().events;

    let flagged = of_kind(&events, "peer_reset_idle", client_port);
    assert_eq!(flagged.len(), 1, "exactly one idle reset: {events:#?}");
    let flagged = flagged[0];
    assert_eq!(flagged["pid"], std::process::id());
    assert_eq!(flagged["comm"], "cw-idle-client");
    assert_eq!(port(&flagged["remote"]), server_port);
    assert_eq!(flagged["family"], family);
    assert_eq!(flagged["state"], "ESTABLISHED");
    // Read from the socket by the kernel program: pods reuse addresses.
    assert_eq!(flagged["netns"], netns_inode(std::process::id()));
    let idle = flagged["idle_ms"].as_u64().expect("idle_ms measured");
    assert!((1900..10_000).contains(&idle), "idle_ms={idle}");
    humantime::parse_rfc3339(flagged["ts"].as_str().unwrap()).expect("ts is RFC 3339");
    assert_eq!(count(&events, "peer_reset", client_port), 0);

    let sent = of_kind(&events, "local_reset", server_port);
    assert_eq!(sent.len(), 1, "{events:#?}");
    // The server socket was accepted by this process (the test harness thread).
    assert_eq!(sent[0]["pid"], std::process::id());
    assert_eq!(port(&sent[0]["remote"]), client_port);
    assert!(ms(sent[0], "idle_ms") >= 1900, "{:?}", sent[0]);
}

#[test]
fn idle_reset_ipv4() {
    idle_reset("127.0.0.1:0", "ipv4");
}

#[test]
fn idle_reset_ipv6() {
    idle_reset("[::1]:0", "ipv6");
}

/// The server reads a request, sits on it 2 s, then aborts (a proxy killing a stuck
/// query's connection). The client's socket had a request waiting: not idle, whatever its
/// timestamps say, and the reset names how long the request had waited.
#[test]
fn reset_of_a_waiting_request_is_not_idle() {
    let (listener, _server_port, watch) = watched_listener("127.0.0.1:0", &[]);
    let mut pair = Pair::connect(&listener, "cw-waiting-client");
    let client_port = pair.client_port();
    pair.client.write_all(b"SELECT").unwrap();
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut pair.server, &mut buf).unwrap();
    thread::sleep(Duration::from_secs(2));
    let _client = pair.reset_from_server();
    watch.wait_for("the reset", |events| {
        count(events, "peer_reset", client_port) + count(events, "peer_reset_idle", client_port)
            >= 1
    });
    let events = watch.stop().events;
    if !requests_ordered() {
        // No socket storage from the send/recv hooks: tcp_info's stamps only, it looks idle.
        assert_eq!(
            count(&events, "peer_reset_idle", client_port),
            1,
            "{events:#?}"
        );
        return;
    }
    let reset = of_kind(&events, "peer_reset", client_port);
    assert_eq!(
        reset.len(),
        1,
        "a waiting request, not an idle socket: {events:#?}"
    );
    assert!(reset[0]["idle_ms"].is_null(), "{:?}", reset[0]);
    let waited = ms(reset[0], "stalled_ms");
    assert!((1900..10_000).contains(&waited), "stalled_ms={waited}");
}

#[test]
fn reset_right_after_a_write_is_not_idle() {
    let (listener, server_port, watch) = watched_listener("127.0.0.1:0", &[]);
    let mut pair = Pair::connect(&listener, "cw-busy-client");
    let client_port = pair.client_port();
    pair.client.write_all(b"more").unwrap();
    let mut buf = [0u8; 4];
    std::io::Read::read_exact(&mut pair.server, &mut buf).unwrap();
    let _client = pair.reset_from_server();
    watch.wait_for("peer_reset", |events| {
        count(events, "peer_reset", client_port) >= 1
            && count(events, "local_reset", server_port) >= 1
    });
    let events = watch.stop().events;
    let reset = of_kind(&events, "peer_reset", client_port);
    assert_eq!(reset.len(), 1, "{events:#?}");
    assert_eq!(reset[0]["comm"], "cw-busy-client");
    // The write was a request still waiting (socket storage), else it was recent.
    let field = if requests_ordered() {
        "stalled_ms"
    } else {
        "idle_ms"
    };
    assert!(ms(reset[0], field) < 1000, "{:?}", reset[0]);
    assert_eq!(count(&events, "peer_reset_idle", client_port), 0);
}

/// An orderly close, watched with `--all`: no reset of any kind, and the half-close as it
/// happened, with the right 4-tuple from either kind of state-change tracepoint.
fn graceful_close(bind: &str, family: &str, served_by: &str, extra: &[&str]) {
    let mut args = vec!["--all"];
    args.extend_from_slice(extra);
    let (listener, server_port, watch) = watched_listener(bind, &args);
    let mut pair = Pair::connect(&listener, "cw-fin-client");
    let client_port = pair.client_port();
    let client_addr = pair.client.local_addr().unwrap().to_string();
    drop(pair.server);
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut pair.client, &mut rest).unwrap();
    drop(pair.client);
    let closed = |events: &[Value]| {
        of_kind(events, "state_change", client_port)
            .iter()
            .any(|e| e["old_state"] == "LAST_ACK" && e["new_state"] == "CLOSE")
    };
    watch.wait_for("the client's LAST_ACK → CLOSE", closed);
    let stopped = watch.stop();
    assert!(
        stopped
            .stderr
            .contains(&format!("state changes ← {served_by}")),
        "{}",
        stopped.stderr
    );
    let events = stopped.events;
    for kind_name in RESET_KINDS {
        for port in [client_port, server_port] {
            assert_eq!(
                count(&events, kind_name, port),
                0,
                "{kind_name}: {events:#?}"
            );
        }
    }
    // --all shows the half-close as it happened, attributed to the client.
    let close_wait = of_kind(&events, "state_change", client_port)
        .into_iter()
        .find(|e| e["new_state"] == "CLOSE_WAIT")
        .expect("ESTABLISHED → CLOSE_WAIT seen");
    assert_eq!(close_wait["old_state"], "ESTABLISHED");
    assert_eq!(close_wait["state"], "CLOSE_WAIT");
    assert_eq!(close_wait["comm"], "cw-fin-client");
    assert_eq!(close_wait["family"], family);
    // Addresses too: both read from the socket itself by the typed tracepoint.
    let server_addr = listener.local_addr().unwrap().to_string();
    assert_eq!(close_wait["remote"], server_addr.as_str());
    assert_eq!(close_wait["local"], client_addr.as_str());
    // The server's side ends too (its local port is the listener's, to the last change).
    assert!(
        of_kind(&events, "state_change", server_port)
            .iter()
            .any(|e| e["new_state"] == "CLOSE" && port(&e["remote"]) == client_port),
        "{events:#?}"
    );
}

#[test]
fn graceful_close_is_no_reset() {
    graceful_close(
        "127.0.0.1:0",
        "ipv4",
        "tp_btf sock:inet_sock_set_state",
        &[],
    );
}

#[test]
fn graceful_close_is_no_reset_ipv6() {
    graceful_close("[::1]:0", "ipv6", "tp_btf sock:inet_sock_set_state", &[]);
}

/// The classic tracepoint, the fallback where tp_btf is refused, reads the same.
#[test]
fn graceful_close_with_classic_tracepoints() {
    graceful_close(
        "127.0.0.1:0",
        "ipv4",
        "tracepoint sock:inet_sock_set_state (tp_btf not used: --classic-tracepoints)",
        &["--classic-tracepoints"],
    );
}

#[test]
fn filters_and_count() {
    let (listener, server_port) = listen("127.0.0.1:0");
    let server = server_port.to_string();
    // Another process, which connects on cue: the only pid the first watch lets through.
    let mut other = PyClient::start(&["one", &server, "cued"]);
    let by_pid = Watch::start(&["--port", &server, "--pid", &other.pid().to_string()]);
    // Only the client's thread name passes, and --count 1 ends the watch after it.
    let by_comm = Watch::start(&["--port", &server, "--comm", "cw-filter-cli", "--count", "1"]);
    let pair = Pair::connect(&listener, "cw-filter-cli");
    let client_port = pair.client_port();
    let _client = pair.reset_from_server();

    let by_comm = by_comm.wait_exit();
    assert!(by_comm.status.success(), "{}", by_comm.stderr);
    assert_eq!(by_comm.events.len(), 1, "{:#?}", by_comm.events);
    assert_eq!(by_comm.events[0]["comm"], "cw-filter-cli");
    assert_eq!(port(&by_comm.events[0]["local"]), client_port);

    // The sentinel: the other process's connection, reset after ours. connwatch handles
    // events in order, so once its reset is shown, ours has been seen and filtered out.
    other.cue();
    let other_port: u16 = other.line().parse().expect("the other client's local port");
    abort(listener.accept().unwrap().0);
    by_pid.wait_for("the other process's reset", |events| {
        RESET_KINDS
            .iter()
            .any(|kind_name| count(events, kind_name, other_port) >= 1)
    });
    let other_pid = other.pid();
    other.finish();
    let events = by_pid.stop().events;
    assert!(
        events.iter().all(|e| e["pid"] == other_pid),
        "only the other process's: {events:#?}"
    );
}
