//! Test hosts: two network namespaces joined by veth, made and removed by the test.
use std::fs::File;

use super::run;

/// Our own test hosts: addresses that exist only inside the namespaces this test creates.
pub const CLIENT_ADDR: &str = "10.231.0.1";
pub const SERVER_ADDR: &str = "10.231.0.2";

pub struct Hosts {
    pub client: String,
    pub server: String,
    pub veth_server: String,
}

impl Hosts {
    pub fn create() -> Hosts {
        // Unique per test, not only per process: a file's tests run in parallel threads.
        static CREATED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CREATED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = format!("{}x{n}", std::process::id());
        let hosts = Hosts {
            client: format!("cw-cli-{id}"),
            server: format!("cw-srv-{id}"),
            veth_server: format!("cws{id}"),
        };
        run("ip", &["netns", "add", &hosts.client]);
        run("ip", &["netns", "add", &hosts.server]);
        let veth_client = format!("cwc{id}");
        let veth_server = hosts.veth_server.clone();
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

    /// A listener on the server host.
    pub fn server_listener(&self) -> std::net::TcpListener {
        Hosts::on(&self.server, "cw-srv-ns", || {
            std::net::TcpListener::bind((SERVER_ADDR, 0)).unwrap()
        })
    }

    /// The path goes dark: every packet into the server host is dropped, silently (no RST,
    /// no ICMP), as a NAT or firewall that forgot the connection does.
    pub fn drop_into_server(&self) {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.server,
                "nft",
                "add table inet cw; add chain inet cw in { type filter hook input priority 0; policy drop; }",
            ],
        );
    }

    /// Runs `body` on a thread that lives in namespace `ns`; sockets it creates live there.
    pub fn on<T: Send + 'static>(
        ns: &str,
        name: &str,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let path = format!("/run/netns/{ns}");
        super::in_thread(name, move || {
            let netns = File::open(&path).unwrap();
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            body()
        })
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
