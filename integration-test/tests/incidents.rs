//! The incidents connwatch exists for, reproduced on a real PostgreSQL with real clients:
//! the Rust `postgres` crate and `psql`.
mod support;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    thread,
    time::Duration,
};

use serde_json::Value;
use support::{postgres::Postgres, *};

fn client_url(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")
}

/// Events for `comm`'s sockets towards `remote_port`.
fn of<'a>(events: &'a [Value], kind_name: &str, comm: &str, remote_port: u16) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| kind(e) == kind_name && e["comm"] == comm && port(&e["remote"]) == remote_port)
        .collect()
}

fn index_of(events: &[Value], kind_name: &str, comm: &str) -> usize {
    events
        .iter()
        .position(|e| kind(e) == kind_name && e["comm"] == comm)
        .unwrap_or_else(|| panic!("no {kind_name} for {comm}: {events:#?}"))
}

/// psql reading commands from a pipe, printing bare values.
struct Psql {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Psql {
    fn connect(port: u16) -> Psql {
        let mut child = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-p", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql (Debian postgresql-client)");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut psql = Psql {
            child,
            stdin,
            stdout,
        };
        assert_eq!(psql.query("SELECT 1;"), "1");
        psql
    }

    fn query(&mut self, sql: &str) -> String {
        writeln!(self.stdin, "{sql}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    fn send(&mut self, sql: &str) {
        let _ = writeln!(self.stdin, "{sql}");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Psql {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy ends idle pooled connections (`fault`); each client's next query fails. Both
/// client stacks must show `peer_kind` for the idle connection, then `app_kind` when they
/// run into it.
fn proxy_ends_idle_connections(fault: &str, peer_kind: &str, app_kind: &str) {
    let pg = Postgres::start();
    let proxy = Proxy::start(pg.port, fault, "1s");
    let watch = Watch::start(&["--port", &proxy.port.to_string()]);

    // Rust client stack: the pool's connection, reused after idling.
    let url = client_url(proxy.port);
    let mut rust_client = in_thread("cw-app", move || {
        let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        client.simple_query("SELECT 1").unwrap();
        client
    });
    // psql, the second stack.
    let mut psql = Psql::connect(proxy.port);
    thread::sleep(Duration::from_secs(2));
    let failed = in_thread("cw-app", move || {
        rust_client.simple_query("SELECT 2").is_err()
    });
    assert!(failed, "the query on the ended connection must fail");
    psql.send("SELECT 2;");

    watch.wait_for(app_kind, |events| {
        !of(events, app_kind, "cw-app", proxy.port).is_empty()
            && !of(events, app_kind, "psql", proxy.port).is_empty()
    });
    let events = watch.stop().events;
    for (comm, pid) in [("cw-app", std::process::id()), ("psql", psql.pid())] {
        let ended = of(&events, peer_kind, comm, proxy.port);
        assert_eq!(ended.len(), 1, "{comm}: {events:#?}");
        assert_eq!(ended[0]["pid"], pid, "{comm}");
        assert!(ms(ended[0], "idle_ms") >= 900, "{:?}", ended[0]);
        let hit = of(&events, app_kind, comm, proxy.port);
        assert_eq!(hit[0]["pid"], pid, "{comm}");
        assert!(index_of(&events, peer_kind, comm) < index_of(&events, app_kind, comm));
    }
    if app_kind == "used_after_reset" {
        let hit = of(&events, app_kind, "cw-app", proxy.port);
        assert!(
            ["ECONNRESET", "EPIPE"].contains(&hit[0]["error"].as_str().unwrap()),
            "{:?}",
            hit[0]
        );
    }
}

/// (a) A proxy resets idle pooled connections; the next query fails.
#[test]
fn proxy_resets_idle_connections() {
    proxy_ends_idle_connections("--reset-idle-after", "peer_reset_idle", "used_after_reset");
}

/// (b) A proxy closes idle connections with FIN; the next query reads EOF.
#[test]
fn proxy_closes_idle_connections() {
    proxy_ends_idle_connections("--fin-idle-after", "peer_close_idle", "used_after_close");
}

/// `watch` and `top` for a stalled pool: stalls, exhaustion and recovery, at a 2 s threshold.
const POOL_WATCH: [&str; 6] = [
    "--kind",
    "request_stalled,pool_exhausted,pool_recovered",
    "--stall-threshold",
    "2s",
    "--refresh",
    "1s",
];

/// A table with the one row every pooled query updates, and a session holding its lock.
fn locked_row(pg: &Postgres) -> Psql {
    pg.connect()
        .unwrap()
        .batch_execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, n int); INSERT INTO accounts VALUES (1, 0)",
        )
        .unwrap();
    let mut locker = Psql::connect(pg.port);
    locker.send("BEGIN;");
    assert_eq!(
        locker.query("SELECT n FROM accounts WHERE id = 1 FOR UPDATE;"),
        "0"
    );
    locker
}

/// PostgreSQL with one row locked by another session (psql), and `watch` and `top --json`
/// on its port, both started before any query blocks.
struct LockedRow {
    pg: Postgres,
    locker: Psql,
    watch: Option<Watch>,
    top: Option<Watch>,
}

impl LockedRow {
    /// `None` (skipped) where the kernel cannot order requests against their answers.
    fn start() -> Option<LockedRow> {
        if !kernel_orders_requests() {
            return None;
        }
        let pg = Postgres::start();
        let locker = locked_row(&pg);
        let port = pg.port.to_string();
        let watch = Watch::start(&[&["--port", &port][..], &POOL_WATCH].concat());
        let top = Watch::spawn(&["top", "--json", "--refresh", "1s"]);
        Some(LockedRow {
            pg,
            locker,
            watch: Some(watch),
            top: Some(top),
        })
    }

    /// Waits until `pid`'s pool is reported exhausted with all `size` connections stalled,
    /// by `watch` and by `top`; then releases the lock, and the pool must be reported
    /// recovered.
    fn exhausted_then_recovered(&mut self, pid: u32, size: usize) {
        let (watch, top) = (self.watch.take().unwrap(), self.top.take().unwrap());
        let pg_port = self.pg.port;
        let mine = |e: &&Value| e["pid"] == pid && port(&e["remote"]) == pg_port;
        watch.wait_for("pool_exhausted", |events| {
            events
                .iter()
                .filter(mine)
                .any(|e| kind(e) == "pool_exhausted")
        });
        let endpoint = format!("127.0.0.1:{pg_port}");
        let exhausted_pool = |snapshot: &Value| -> Option<Value> {
            snapshot["pools"]
                .as_array()?
                .iter()
                .find(|p| {
                    p["pid"] == pid && p["endpoint"] == endpoint.as_str() && p["exhausted"] == true
                })
                .cloned()
        };
        top.wait_for("top marks the pool exhausted", |snapshots| {
            snapshots.iter().any(|s| exhausted_pool(s).is_some())
        });
        let pool = top.stop().events.iter().find_map(exhausted_pool).unwrap();
        assert_eq!(
            (&pool["stalled"], &pool["idle"], &pool["established"]),
            (&Value::from(size), &Value::from(0), &Value::from(size)),
            "a stuck query is never idle: {pool:#?}"
        );
        self.locker.send("ROLLBACK;");
        watch.wait_for("pool_recovered", |events| {
            events
                .iter()
                .filter(mine)
                .any(|e| kind(e) == "pool_recovered")
        });
        let events = watch.stop().events;
        let stalled: Vec<&Value> = events
            .iter()
            .filter(mine)
            .filter(|e| kind(e) == "request_stalled")
            .collect();
        assert_eq!(stalled.len(), size, "one per stuck query: {events:#?}");
        for event in &stalled {
            assert!(ms(event, "stalled_ms") >= 2000, "{event:?}");
        }
        let exhausted: Vec<&Value> = events
            .iter()
            .filter(|e| kind(e) == "pool_exhausted")
            .collect();
        assert_eq!(
            exhausted.len(),
            1,
            "one per episode, only this pool: {events:#?}"
        );
        assert_eq!(exhausted[0]["connections"], size);
        assert!(ms(exhausted[0], "stalled_ms") >= 2000);
        let recovered: Vec<&Value> = events
            .iter()
            .filter(|e| kind(e) == "pool_recovered")
            .collect();
        assert_eq!(recovered.len(), 1, "{events:#?}");
        assert!(ms(recovered[0], "age_ms") >= 1000, "{:?}", recovered[0]);
    }
}

/// Whether the send/recv hooks can keep each socket's last call ([`requests_ordered`]).
/// Elsewhere `tcp_info`'s ticks cannot order these clients' sends against the answers
/// before them, as `doctor` says (tests/doctor.rs checks that).
fn kernel_orders_requests() -> bool {
    let orders = requests_ordered();
    if !orders {
        eprintln!("skipped: this kernel orders requests by tcp_info's ticks only");
    }
    orders
}

/// (c) A SQLAlchemy QueuePool (psycopg2) whose every connection blocks on a row lock: the
/// application gets "QueuePool limit ... reached". psycopg2 sends each UPDATE right after
/// reading BEGIN's answer, often in the same kernel tick.
#[test]
fn sqlalchemy_pool_blocked_on_a_row_lock() {
    const SIZE: usize = 4;
    let Some(mut scene) = LockedRow::start() else {
        return;
    };
    let mut app = Command::new(python_clients())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/queuepool.py"
        ))
        .args([&scene.pg.port.to_string(), &SIZE.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(app.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert!(
        line.contains("QueuePool limit of size 4 overflow 0 reached"),
        "the application's view of the incident: {line}"
    );
    scene.exhausted_then_recovered(app.id(), SIZE);
    drop(app.stdin.take());
    let _ = app.kill();
    let _ = app.wait();
}

/// (c') The Rust `postgres` crate sends BEGIN and the UPDATE back to back, in one write: no
/// answer comes between them at all.
#[test]
fn rust_pool_sends_begin_and_update_back_to_back() {
    const SIZE: usize = 3;
    let Some(mut scene) = LockedRow::start() else {
        return;
    };
    let mut pool: Vec<::postgres::Client> =
        (0..SIZE).map(|_| scene.pg.connect().unwrap()).collect();
    for client in &mut pool {
        client.simple_query("SELECT 1").unwrap();
    }
    let queries: Vec<_> = pool
        .into_iter()
        .map(|mut client| {
            thread::spawn(move || {
                client
                    .batch_execute("BEGIN; UPDATE accounts SET n = n + 1 WHERE id = 1; COMMIT")
                    .unwrap();
            })
        })
        .collect();
    scene.exhausted_then_recovered(std::process::id(), SIZE);
    for query in queries {
        query.join().unwrap();
    }
}

/// (d) The server ends sessions (a DBA, idle_session_timeout); clients never close theirs.
#[test]
fn clients_leak_connections_the_server_closed() {
    let pg = Postgres::start();
    let watch = Watch::start(&[
        "--port",
        &pg.port.to_string(),
        "--kind",
        "close_wait_lingering",
        "--close-wait-threshold",
        "2s",
    ]);
    let url = pg.url();
    let leaked = in_thread("cw-leaky-pool", move || {
        let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        client.simple_query("SELECT 1").unwrap();
        client
    });
    let psql = Psql::connect(pg.port);
    let mut admin = pg.connect().unwrap();
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
        )
        .unwrap();
    watch.wait_for("close_wait_lingering for both clients", |events| {
        !of(events, "close_wait_lingering", "cw-leaky-pool", pg.port).is_empty()
            && !of(events, "close_wait_lingering", "psql", pg.port).is_empty()
    });
    let events = watch.stop().events;
    for (comm, pid) in [("cw-leaky-pool", std::process::id()), ("psql", psql.pid())] {
        let lingering = of(&events, "close_wait_lingering", comm, pg.port);
        assert_eq!(lingering.len(), 1, "{comm}: {events:#?}");
        assert_eq!(lingering[0]["pid"], pid);
        assert_eq!(lingering[0]["state"], "CLOSE_WAIT");
        assert!(ms(lingering[0], "age_ms") >= 2000);
    }
    // The admin's own connection stayed healthy.
    assert!(
        events.iter().all(|e| e["comm"] != "incidents"),
        "{events:#?}"
    );
    drop(leaked);
}

#[test]
fn selftest_passes() {
    let output = Command::new(&*CONNWATCH).arg("selftest").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("ok: peer_reset_idle attributed to pid"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: used_after_reset attributed to pid"),
        "{stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("connwatch selftest: passed"),
        "{stdout}"
    );
}

/// Zombie connections behind a proxy: writes are accepted and lead nowhere.
#[test]
fn proxy_blackholes_idle_connections() {
    let pg = Postgres::start();
    let proxy = Proxy::start(pg.port, "--blackhole-idle-after", "1s");
    let proxy_port = proxy.port.to_string();
    let watch = Watch::start(&[&["--port", &proxy_port][..], &STALL_WATCH].concat());
    let url = client_url(proxy.port);
    let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    client.simple_query("SELECT 1").unwrap();
    thread::sleep(Duration::from_millis(1500));
    // Blocks until the proxy goes away at the end of the test.
    thread::spawn(move || {
        let _ = client.simple_query("SELECT 2");
    });
    watch.wait_for("request_stalled", |events| {
        events.iter().any(|e| kind(e) == "request_stalled")
    });
    let events = watch.stop().events;
    let stalled: Vec<&Value> = events
        .iter()
        .filter(|e| kind(e) == "request_stalled")
        .collect();
    assert_eq!(stalled.len(), 1, "{events:#?}");
    assert_eq!(stalled[0]["pid"], std::process::id());
    assert_eq!(port(&stalled[0]["remote"]), proxy.port);
}

/// `--ignore-port`: a long poll waits for its answer by design. Its port is not judged for
/// stalls; beside it, a stuck request on another port still is.
#[test]
fn an_ignored_port_is_not_stalled() {
    let (long_poll, long_poll_port) = listen("127.0.0.1:0");
    let (database, database_port) = listen("127.0.0.1:0");
    let ignored = long_poll_port.to_string();
    let watch = Watch::start(&[&["--ignore-port", &ignored][..], &STALL_WATCH].concat());
    let mut waiting = Pair::connect(&long_poll, "cw-long-poll");
    let mut stuck = Pair::connect(&database, "cw-stuck");
    thread::sleep(Duration::from_millis(100));
    waiting.client.write_all(b"GET /events").unwrap();
    stuck.client.write_all(b"SELECT").unwrap();
    let (waiting_port, stuck_port) = (waiting.client_port(), stuck.client_port());
    watch.wait_for("request_stalled for the database request", |events| {
        count(events, "request_stalled", stuck_port) == 1
    });
    thread::sleep(Duration::from_millis(2500)); // more refreshes, past the threshold
    let events = watch.stop().events;
    assert_eq!(
        count(&events, "request_stalled", waiting_port),
        0,
        "{events:#?}"
    );
    assert_eq!(
        database_port,
        port(&of_kind(&events, "request_stalled", stuck_port)[0]["remote"])
    );
}
