//! Zombie connections behind a multiplexer: a client reconnects through a proxy that keeps
//! its old upstream connection open and acknowledges everything, and the service goes on
//! writing into it. And the look-alikes, run alongside, that must not be flagged: a one-way
//! push stream, a client with two active connections, an idle pool. The actors are
//! `support/zombie.py`.
mod support;

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use serde_json::Value;
use support::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/zombie.py");
const THRESHOLD_MS: u64 = 2000;
/// Several refreshes (500 ms each; slower under TCG): what connects after it is first
/// listed at a later refresh, so it is newer.
const NEXT_REFRESH: Duration = Duration::from_secs(2);

/// A running `zombie.py` actor and the lines it prints after `listening PORT`.
struct Actor {
    child: Child,
    port: u16,
    lines: mpsc::Receiver<String>,
}

impl Actor {
    fn start(args: &[&str]) -> Actor {
        let mut child = Command::new("python3")
            .arg(SCRIPT)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let (tx, lines) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut actor = Actor {
            child,
            port: 0,
            lines,
        };
        let first = actor.line();
        actor.port = first
            .strip_prefix("listening ")
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("{args:?} printed {first:?}"));
        actor
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(EVENT_TIMEOUT)
            .expect("a line from zombie.py")
    }

    /// The proxy's upstream port for the client connected from `client_port`.
    fn upstream_of(&self, client_port: u16) -> u16 {
        loop {
            let line = self.line();
            let fields: Vec<u16> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|f| f.parse().ok())
                .collect();
            if let [client, upstream] = fields[..]
                && client == client_port
            {
                return upstream;
            }
        }
    }
}

impl Drop for Actor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client in conversation: a ping every 200 ms, and it reads whatever comes back. Closes
/// its connection when dropped.
struct Chatty {
    local_port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Chatty {
    fn connect(port: u16) -> Chatty {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let local_port = stream.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                stream.write_all(b"ping\n").unwrap();
                match stream.read(&mut buf) {
                    Ok(0) => panic!("the service closed a client's connection"),
                    Ok(_) => {}
                    Err(err)
                        if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(err) => panic!("client read: {err}"),
                }
                thread::sleep(Duration::from_millis(200));
            }
        });
        Chatty {
            local_port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Chatty {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One round trip with an echo service, then the connection sits in the pool.
fn pooled(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(b"SELECT 1\n").unwrap();
    let mut answer = [0u8; 9];
    stream.read_exact(&mut answer).unwrap();
    stream
}

#[test]
fn old_upstream_connection_behind_a_multiplexer_is_a_zombie_and_look_alikes_are_not() {
    let service = Actor::start(&["service", "push"]);
    let proxy = Actor::start(&["proxy", &service.port.to_string()]);
    // The look-alikes, each on a service of its own.
    let push_stream = Actor::start(&["service", "push"]);
    let two_connections = Actor::start(&["service", "push"]);
    let pool = Actor::start(&["service", "echo"]);
    let ports: Vec<String> = [&service, &proxy, &push_stream, &two_connections, &pool]
        .iter()
        .map(|actor| actor.port.to_string())
        .collect();
    let mut args = vec![
        "--kind",
        "zombie_connection",
        "--zombie-threshold",
        "2s",
        "--refresh",
        "500ms",
    ];
    for port in &ports {
        args.extend(["--port", port]);
    }
    let watch = Watch::start(&args);

    // The older connections: each talks both ways (but the subscriber, which only listens).
    let client = Chatty::connect(proxy.port);
    let old_upstream = proxy.upstream_of(client.local_port);
    let _subscriber = TcpStream::connect(("127.0.0.1", push_stream.port)).unwrap();
    let _first_of_two = Chatty::connect(two_connections.port);
    let _idle: Vec<TcpStream> = (0..3).map(|_| pooled(pool.port)).collect();
    thread::sleep(NEXT_REFRESH);

    // The client goes away and reconnects; the proxy keeps the old upstream connection,
    // and the service keeps writing into it. Each look-alike gets a newer active sibling
    // from the same address too.
    drop(client);
    let _reconnected = Chatty::connect(proxy.port);
    let _active_beside_subscriber = Chatty::connect(push_stream.port);
    let _second_of_two = Chatty::connect(two_connections.port);
    let _active_beside_pool = Chatty::connect(pool.port);

    watch.wait_for("zombie_connection on the service", |events| {
        count(events, "zombie_connection", service.port) >= 1
    });
    // The look-alikes have been silent past the threshold too: a few more refreshes.
    thread::sleep(Duration::from_secs(2));
    let events = watch.stop().events;

    let zombies: Vec<&Value> = events
        .iter()
        .filter(|e| kind(e) == "zombie_connection")
        .collect();
    assert_eq!(
        zombies.len(),
        1,
        "only the old upstream connection (service {}); not the push stream ({}), the two \
         active connections ({}) or the idle pool ({}): {zombies:#?}",
        service.port,
        push_stream.port,
        two_connections.port,
        pool.port
    );
    let zombie = zombies[0];
    assert_eq!(port(&zombie["local"]), service.port, "{zombie:#}");
    assert_eq!(port(&zombie["remote"]), old_upstream, "{zombie:#}");
    assert_eq!(zombie["pid"], service.child.id(), "{zombie:#}");
    assert_eq!(zombie["comm"], "python3", "{zombie:#}");
    assert!(ms(zombie, "siblings") >= 1, "{zombie:#}");
    assert!(ms(zombie, "since_recv_ms") >= THRESHOLD_MS, "{zombie:#}");
    assert_eq!(zombie["state"], "ESTABLISHED", "{zombie:#}");
}
