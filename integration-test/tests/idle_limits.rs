//! Idle limits learned from kills: `connwatch proxy` instances killing idle connections
//! after 2 s and 5 s (RST) and 3 s (FIN), a pool with varied idle times through each, and a
//! server that resets busy connections, which teaches no limit.
mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;

/// How long each pooled connection sits idle before its next request, in turn (ms): some
/// below every limit, some above. Each connection starts at a different place in it.
const IDLES_MS: [u64; 8] = [500, 6500, 1000, 8000, 700, 2500, 1500, 5500];
const CONNECTIONS: usize = 4;
/// A limit is to be learned within this many kills, within this share of the truth.
const MAX_KILLS: u64 = 5;
const TOLERANCE: f64 = 0.10;
/// Long enough for five kills behind the 5 s proxy (two or three rounds of `IDLES_MS`).
const LEARN_TIMEOUT: Duration = Duration::from_mins(2);

/// Answers each line with the same line, per connection, until the peer goes away.
fn echo_server() -> u16 {
    let (listener, port) = listen("127.0.0.1:0");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if writer.write_all(format!("{line}\n").as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// Reads each request, then resets the connection without answering: every reset finds
/// a request waiting, none an idle connection.
fn busy_resetting_server() -> u16 {
    let (listener, port) = listen("127.0.0.1:0");
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 5];
            if stream.read_exact(&mut buf).is_ok() {
                abort(stream);
            }
        }
    });
    port
}

/// One pooled connection to `port`: idle for each of `idles` in turn, then a request; a
/// request that fails (reset, EOF) reconnects, as a pool replaces a dead connection. It
/// holds its connection in between, as a pool does: nothing reads it while idle.
fn pooled_connection(port: u16, start: usize, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let connect = || loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(stream) => return stream,
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        };
        let mut stream = connect();
        for idle in IDLES_MS.iter().cycle().skip(start) {
            thread::sleep(Duration::from_millis(*idle));
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let mut answer = [0u8; 5];
            let answered = stream
                .write_all(b"ping\n")
                .and_then(|()| stream.read_exact(&mut answer));
            if answered.is_err() {
                stream = connect();
            }
        }
    })
}

fn remote_port(event: &Value) -> u16 {
    port(&event["remote"])
}

/// The first finding on `port`'s path that carries a learned limit.
fn first_estimate(events: &[Value], port: u16) -> Option<&Value> {
    events
        .iter()
        .filter(|e| remote_port(e) == port && e["idle_limit_ms"].is_u64())
        .min_by_key(|e| e["path_kills"].as_u64())
}

#[test]
fn idle_limits_are_learned_per_path_and_only_from_idle_kills() {
    let watch = Watch::start(&["--refresh", "500ms"]);
    let rst_2s = Proxy::start(echo_server(), "--reset-idle-after", "2s");
    let rst_5s = Proxy::start(echo_server(), "--reset-idle-after", "5s");
    let fin_3s = Proxy::start(echo_server(), "--fin-idle-after", "3s");
    let busy = busy_resetting_server();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for port in [rst_2s.port, rst_5s.port, fin_3s.port, busy] {
        for i in 0..CONNECTIONS {
            clients.push(pooled_connection(port, 2 * i, stop.clone()));
        }
    }
    let learned = [
        (rst_2s.port, 2000),
        (rst_5s.port, 5000),
        (fin_3s.port, 3000),
    ];
    let deadline = Instant::now() + LEARN_TIMEOUT;
    while Instant::now() < deadline
        && !learned
            .iter()
            .all(|(port, _)| first_estimate(&watch.events(), *port).is_some())
    {
        thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let stopped = watch.stop();
    for client in clients {
        client.join().unwrap();
    }
    for (port, limit_ms) in learned {
        let estimate = first_estimate(&stopped.events, port).unwrap_or_else(|| {
            panic!(
                "no idle limit learned for the {limit_ms} ms proxy: {}",
                stopped.stderr
            )
        });
        let (ms, kills) = (ms(estimate, "idle_limit_ms"), ms(estimate, "path_kills"));
        eprintln!("{limit_ms} ms limit: learned {ms} ms at kill {kills}");
        assert!(
            kills <= MAX_KILLS,
            "learned only after {kills} kills: {estimate}"
        );
        let error = (f64::from(u32::try_from(ms).unwrap()) - f64::from(limit_ms)).abs()
            / f64::from(limit_ms);
        assert!(
            error <= TOLERANCE,
            "{ms} ms learned for {limit_ms} ms: {estimate}"
        );
        let line = format!("idle limit: connections to 127.0.0.1:{port} (outbound");
        assert!(
            stopped.stderr.contains(&line),
            "{line} not in {}",
            stopped.stderr
        );
    }
    // Its resets all cut a waiting request short: nothing to learn there.
    let busy_resets = stopped
        .events
        .iter()
        .filter(|e| remote_port(e) == busy && kind(e) == "peer_reset")
        .count();
    assert!(
        busy_resets > 0,
        "the busy server reset nothing: {}",
        stopped.stderr
    );
    assert!(first_estimate(&stopped.events, busy).is_none());
    assert!(
        !stopped
            .stderr
            .contains(&format!("connections to 127.0.0.1:{busy} ")),
        "{}",
        stopped.stderr
    );
}
