//! Two test hosts (network namespaces joined by veth); the server's socket is destroyed with
//! `ss -K`, as an operator or a proxy's connection reaper would.
mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    thread,
    time::Duration,
};

use support::{netns::*, *};

#[test]
fn ss_kill_across_veth_is_an_idle_reset() {
    let hosts = Hosts::create();
    let listener = hosts.server_listener();
    let server_port = listener.local_addr().unwrap().port();
    let watch = Watch::start(&["--port", &server_port.to_string()]);

    let mut client: TcpStream = Hosts::on(&hosts.client, "cw-ns-client", move || {
        TcpStream::connect((SERVER_ADDR, server_port)).unwrap()
    });
    let (mut server, _) = listener.accept().unwrap();
    // One request and its answer: then the pooled connection idles.
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    server.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    let client_port = client.local_addr().unwrap().port();
    thread::sleep(Duration::from_secs(2));

    // Destroy the server's established socket from inside the server host.
    kill_established(Some(&hosts.server), server_port);
    watch.wait_for("peer_reset_idle across veth", |events| {
        count(events, "peer_reset_idle", client_port) >= 1
            && count(events, "local_reset", server_port) >= 1
    });
    let events = watch.stop().events;
    let flagged = of_kind(&events, "peer_reset_idle", client_port);
    assert_eq!(flagged.len(), 1, "{events:#?}");
    assert_eq!(flagged[0]["pid"], std::process::id());
    assert_eq!(flagged[0]["comm"], "cw-ns-client");
    assert_eq!(flagged[0]["local"], format!("{CLIENT_ADDR}:{client_port}"));
    assert_eq!(flagged[0]["remote"], format!("{SERVER_ADDR}:{server_port}"));
    assert!(ms(flagged[0], "idle_ms") >= 1900, "{:?}", flagged[0]);
    // The destroyed socket's RST went out from the server host, owned by this process.
    let sent = of_kind(&events, "local_reset", server_port);
    assert_eq!(sent[0]["pid"], std::process::id(), "{:?}", sent[0]);
    drop(server);
}
