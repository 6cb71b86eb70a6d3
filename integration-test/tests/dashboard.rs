//! deploy/grafana/connwatch.json: every query of every panel, run by a real Prometheus
//! scraping a real `connwatch daemon` while real sockets make each finding the panels show,
//! returns data. And the dashboard is well formed for Grafana to import.
mod support;

use std::{
    collections::HashSet,
    io::{self, BufRead, BufReader, ErrorKind, Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    netns::{Hosts, SERVER_ADDR},
    prometheus::Prometheus,
    *,
};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/grafana/connwatch.json"
);
const ZOMBIE_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/zombie.py");
/// Short thresholds and refreshes: each finding within seconds.
const DAEMON_FLAGS: [&str; 10] = [
    "--refresh",
    "1s",
    "--stall-threshold",
    "2s",
    "--close-wait-threshold",
    "2s",
    "--zombie-threshold",
    "2s",
    "--leak-threshold",
    "3s",
];
/// Past the idle threshold (1 s): a reset or FIN now is `*_idle`.
const IDLE: Duration = Duration::from_millis(1500);
/// The proxy kills connections idle this long; the pool idles longer between requests.
/// Far apart: a kill the proxy fires late (a loaded machine) must not let a request
/// through after the kill's idle, which would contradict the limit (a survival).
const PROXY_KILL: &str = "1500ms";
const POOL_IDLE: Duration = Duration::from_secs(4);
/// Panels no scenario here can feed, with the reason. Keep it empty if at all possible.
const ALLOWED_EMPTY: &[(&str, &str)] = &[];

/// Grafana's variables as the test's Prometheus has them: one node, every namespace.
fn promql(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "1m")
        .replace("$__range", "10m")
        .replace("$instance", ".*")
        .replace("$namespace", ".*");
    assert!(
        !expr.contains('$'),
        "a variable the test does not know: {expr}"
    );
    expr
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap()
}

/// Every query target: (panel title, refId, expr).
fn targets(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            all.push((
                panel["title"].as_str().unwrap().to_string(),
                target["refId"].as_str().unwrap().to_string(),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    all
}

/// The targets that return nothing now, each with why.
fn empty_targets(prometheus: &Prometheus, targets: &[(String, String, String)]) -> Vec<String> {
    targets
        .iter()
        .filter_map(|(title, ref_id, expr)| {
            let why = match prometheus.instant(&promql(expr)) {
                Ok(result) if !result.is_empty() => return None,
                Ok(_) => "no data".to_string(),
                Err(err) => err,
            };
            Some(format!("panel {title:?} target {ref_id}: {why}: {expr}"))
        })
        .collect()
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A thread looping `step` until dropped.
struct Looping {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Looping {
    fn start(mut body: impl FnMut() + Send + 'static) -> Looping {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                body();
            }
        });
        Looping {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Looping {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends back whatever each connection sends.
fn echo_server() -> u16 {
    let (listener, port) = listen("127.0.0.1:0");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = io::copy(&mut &stream, &mut &stream);
            });
        }
    });
    port
}

/// A connection to `port` that has carried one request and its answer.
fn used_connection(port: u16) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.write_all(b"ping")?;
    stream.read_exact(&mut [0u8; 4])?;
    Ok(stream)
}

/// `zombie.py service push`: writes to every client every 150 ms.
fn push_service() -> (Killed, u16) {
    let mut child = Command::new("python3")
        .args([ZOMBIE_PY, "service", "push"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let port = first
        .trim()
        .strip_prefix("listening ")
        .unwrap()
        .parse()
        .unwrap();
    (Killed(child), port)
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one incident after another, in the order of the dashboard's rows"
)]
fn every_panel_shows_what_the_scenarios_made() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["daemon", "--listen", &addr];
    args.extend(DAEMON_FLAGS);
    let _daemon = Watch::spawn(&args);
    let prometheus = Prometheus::start(&addr);
    prometheus.wait_for(r#"up{job="connwatch"}"#, 1.0);

    // Learned idle limit, idle resets and writes after them: a pool behind a proxy that
    // resets idle connections, reconnecting after each failed request.
    let proxy = Proxy::start(echo_server(), "--reset-idle-after", PROXY_KILL);
    let _pool: Vec<Looping> = (0..4)
        .map(|_| {
            let port = proxy.port;
            let mut held = None;
            Looping::start(move || {
                let Some(mut stream) = held.take().or_else(|| used_connection(port).ok()) else {
                    return thread::sleep(Duration::from_millis(50));
                };
                thread::sleep(POOL_IDLE);
                let mut answer = [0u8; 4];
                if stream
                    .write_all(b"ping")
                    .and_then(|()| stream.read_exact(&mut answer))
                    .is_ok()
                {
                    held = Some(stream);
                }
            })
        })
        .collect();

    // A leaking pool: a new connection every 1.2 s, each used once and never again.
    let leak_port = echo_server();
    let mut leaked = Vec::new();
    let _leak = Looping::start(move || {
        if leaked.len() < 10 {
            leaked.push(used_connection(leak_port).unwrap());
        }
        thread::sleep(Duration::from_millis(1200));
    });

    // A zombie: an old connection that went quiet while the service writes into it, and a
    // newer one from the same client, active both ways.
    let (_service, service_port) = push_service();
    let mut old = TcpStream::connect(("127.0.0.1", service_port)).unwrap();
    old.write_all(b"hello\n").unwrap();

    // A pool whose every connection has a request nobody answers: stalls, exhausted.
    let (stall_listener, _) = listen("127.0.0.1:0");
    let _stalled: Vec<(TcpStream, TcpStream)> = (0..2)
        .map(|_| {
            let mut client = TcpStream::connect(stall_listener.local_addr().unwrap()).unwrap();
            client.write_all(b"SELECT pg_sleep(3600)").unwrap();
            (client, stall_listener.accept().unwrap().0)
        })
        .collect();

    // A silent death: the path drops everything, TCP_USER_TIMEOUT gives up.
    let hosts = Hosts::create();
    let death_listener = hosts.server_listener();
    let death_port = death_listener.local_addr().unwrap().port();
    let mut doomed = Hosts::on(&hosts.client, "cw-dash-doomed", move || {
        let stream = TcpStream::connect((SERVER_ADDR, death_port)).unwrap();
        socket2::SockRef::from(&stream)
            .set_tcp_user_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        stream
    });
    let _death_server = death_listener.accept().unwrap();

    // An idle reset the application writes after, and an idle FIN it never closes
    // (CLOSE_WAIT, lingering).
    let (listener, _) = listen("127.0.0.1:0");
    let reset = Pair::connect(&listener, "cw-dash-reset");
    let closed = Pair::connect(&listener, "cw-dash-closed");

    thread::sleep(IDLE);
    let mut reset_client = reset.reset_from_server();
    thread::sleep(Duration::from_millis(50)); // the RST in, well within the grace (200 ms)
    let _ = reset_client.write_all(b"SELECT 1"); // ECONNRESET: used_after_reset
    drop(closed.server);
    let _close_wait = closed.client;
    hosts.drop_into_server();
    doomed.write_all(b"SELECT 1").unwrap();
    // The zombie's sibling: connected a refresh or more after the old one.
    thread::sleep(Duration::from_millis(1100));
    let mut sibling = TcpStream::connect(("127.0.0.1", service_port)).unwrap();
    sibling
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let _sibling = Looping::start(move || {
        sibling.write_all(b"ping\n").unwrap();
        match sibling.read(&mut [0u8; 4096]) {
            Ok(_) => {}
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(err) => panic!("zombie sibling: {err}"),
        }
        thread::sleep(Duration::from_millis(200));
    });

    let dashboard = dashboard();
    let targets: Vec<_> = targets(&dashboard)
        .into_iter()
        .filter(|(title, _, _)| !ALLOWED_EMPTY.iter().any(|(allowed, _)| allowed == title))
        .collect();
    let deadline = Instant::now() + Duration::from_mins(2);
    let mut empty = empty_targets(&prometheus, &targets);
    while !empty.is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_secs(1));
        empty = empty_targets(&prometheus, &targets);
    }
    assert!(
        empty.is_empty(),
        "panels with nothing to show:\n{}\n\nprometheus log:\n{}",
        empty.join("\n"),
        prometheus.log()
    );

    // The check can fail: a misspelt metric in one panel is named.
    let mut broken = targets.clone();
    broken[0].2 = broken[0]
        .2
        .replace("connwatch_resets_total", "connwatch_reset_total");
    let empty = empty_targets(&prometheus, &broken);
    assert_eq!(empty.len(), 1, "{empty:#?}");
    assert!(
        empty[0].contains(&format!("panel {:?}", broken[0].0)),
        "{empty:?}"
    );

    // The variables' values come from the same data.
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(query) = variable["query"]["query"].as_str() else {
            continue;
        };
        let (series, label) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(", "))
            .unwrap_or_else(|| panic!("not label_values(SERIES, LABEL): {query}"));
        let values = prometheus
            .instant(&promql(&format!("count by ({label}) ({series})")))
            .unwrap();
        assert!(!values.is_empty(), "variable {}: {query}", variable["name"]);
    }
}

/// What Grafana needs to import the dashboard and lay it out. No registry package ships a
/// JSON Schema of the classic dashboard model (@grafana/schema and
/// @grafana/grafana-foundation-sdk ship TypeScript), so the structure is checked here.
#[test]
fn the_dashboard_is_well_formed() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "connwatch");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let datasource = variables
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(
        (&datasource["type"], &datasource["query"]),
        (&"datasource".into(), &"prometheus".into())
    );
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        assert_eq!(variable["datasource"]["uid"], "${datasource}", "{variable}");
    }
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = HashSet::new();
    let mut cells = HashSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("a title");
        assert!(!title.is_empty());
        let id = panel["id"].as_u64().expect("an id");
        assert!(ids.insert(id), "id {id} twice ({title})");
        let grid = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            grid[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        });
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: {grid}");
        for cell in (x..x + w).flat_map(|cx| (y..y + h).map(move |cy| (cx, cy))) {
            assert!(
                cells.insert(cell),
                "{title} overlaps another panel at {cell:?}"
            );
        }
        let kind = panel["type"].as_str().expect("a type");
        if kind == "row" {
            assert!(panel.get("targets").is_none(), "{title}");
            continue;
        }
        assert!(
            ["timeseries", "heatmap", "table", "stat", "bargauge"].contains(&kind),
            "{title}: {kind}"
        );
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}");
        let mut ref_ids = HashSet::new();
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            assert!(ref_ids.insert(target["refId"].as_str().unwrap()), "{title}");
            let expr = target["expr"].as_str().expect("an expr");
            // Rates and increases over Grafana's interval, so a zoomed-out panel stays right.
            if expr.contains("rate(") || expr.contains("increase(") {
                assert!(
                    expr.contains("[$__rate_interval]") || expr.contains("[$__range]"),
                    "{title}: {expr}"
                );
            }
        }
    }
}
