//! Two test hosts (network namespaces joined by veth); the server's socket is destroyed with
//! `ss -K`, as an operator or a proxy's connection reaper would.
mod support;

use std::{
    fs::File,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

use support::*;

/// Our own test hosts: addresses that exist only inside the namespaces this test creates.
const CLIENT_ADDR: &str = "10.231.0.1";
const SERVER_ADDR: &str = "10.231.0.2";

struct Hosts {
    client: String,
    server: String,
}

impl Hosts {
    fn create() -> Hosts {
        let id = std::process::id();
        let hosts = Hosts {
            client: format!("cw-cli-{id}"),
            server: format!("cw-srv-{id}"),
        };
        run("ip", &["netns", "add", &hosts.client]);
        run("ip", &["netns", "add", &hosts.server]);
        let veth_client = format!("cwc{id}");
        let veth_server = format!("cws{id}");
        run(
            "ip",
            &[
                "link",
                "add",
                &veth_client,
                "netns",
                &hosts.client,
                "type",
                "veth",
                "peer",
                "name",
                &veth_server,
                "netns",
                &hosts.server,
            ],
        );
        for (ns, dev, addr) in [
            (&hosts.client, &veth_client, CLIENT_ADDR),
            (&hosts.server, &veth_server, SERVER_ADDR),
        ] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev],
            );
            run("ip", &["-n", ns, "link", "set", dev, "up"]);
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    /// Runs `body` on a thread that lives in namespace `ns`; sockets it creates live there.
    fn on<T: Send + 'static>(ns: &str, name: &str, body: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let netns = File::open(&path).unwrap();
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                body()
            })
            .unwrap()
            .join()
            .unwrap()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth end and, with it, the peer.
        for ns in [&self.client, &self.server] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", ns])
                .status();
        }
    }
}

#[test]
fn ss_kill_across_veth_is_an_idle_reset() {
    let hosts = Hosts::create();
    let listener: TcpListener = Hosts::on(&hosts.server, "cw-srv-ns", || {
        TcpListener::bind((SERVER_ADDR, 0)).unwrap()
    });
    let server_port = listener.local_addr().unwrap().port();
    let watch = Watch::start(&["--port", &server_port.to_string()]);

    let mut client: TcpStream = Hosts::on(&hosts.client, "cw-ns-client", move || {
        TcpStream::connect((SERVER_ADDR, server_port)).unwrap()
    });
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    let client_port = client.local_addr().unwrap().port();
    thread::sleep(Duration::from_secs(2));

    // Destroy the server's established socket from inside the server host.
    run(
        "ip",
        &[
            "netns",
            "exec",
            &hosts.server,
            "ss",
            "-K",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{server_port}"),
        ],
    );
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
