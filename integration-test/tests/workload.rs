//! Container and pod attribution on the real kernel: a client process in a cgroup shaped
//! like a containerd pod's, named by a kubelet-style pod log directory.
mod support;

use std::{
    fs,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use support::*;

const CONTAINER: &str = "5e1f7c3a9b2d4e6f8a0b1c3d5e7f9a1b3c5d7e9f1a3b5c7d9e1f3a5b7c9d1e3f";
const POD_UID: &str = "7c9e2a4b-6d8f-4a1b-8c3d-5e7f9a1b3c5d";

/// The cgroup v2 root: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid.
fn cgroup2_root() -> PathBuf {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|dir| dir.join("cgroup.controllers").exists())
        .expect("a cgroup v2 hierarchy")
}

struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Innermost first; a cgroup can only be removed once empty.
        let mut dir = self.0.clone();
        while dir != cgroup2_root() {
            let _ = fs::remove_dir(&dir);
            dir.pop();
        }
    }
}

/// A cgroup shaped like a containerd pod's container (`qos` class, pod `uid`), removed on
/// drop; and its path from the cgroup v2 root.
fn pod_cgroup(qos: &str, uid: &str) -> (Cgroup, String) {
    let top = format!("connwatch-test-{}-{qos}", std::process::id());
    let relative = format!("/{top}/kubepods/{qos}/pod{uid}/{CONTAINER}");
    let dir = cgroup2_root().join(relative.trim_start_matches('/'));
    fs::create_dir_all(&dir).unwrap();
    (Cgroup(dir), relative)
}

/// python3 running `script` with `port` as its argument, moved into `cgroup` first.
fn python_in(cgroup: &Cgroup, script: &str, port: u16) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec python3 -c \"$0\" {port}",
            cgroup.0.display()
        ))
        .arg(script);
    command
}

#[test]
fn idle_reset_names_cgroup_container_and_pod() {
    let (cgroup, relative) = pod_cgroup("burstable", POD_UID);
    let pod_logs = TempDir::new("pod-logs");
    fs::create_dir_all(pod_logs.join(format!("payments_api-7d9f8b6c5-x2x9z_{POD_UID}"))).unwrap();

    let (listener, server_port, watch) =
        watched_listener("127.0.0.1:0", &["--pod-logs", pod_logs.to_str()]);
    // The client moves itself into the pod's cgroup, then becomes python.
    let mut client = python_in(
        &cgroup,
        "import socket, sys\n\
         s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n\
         print('ready', flush=True)\n\
         sys.stdin.read()\n",
        server_port,
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let (server, _) = listener.accept().unwrap();
    let mut ready = String::new();
    BufReader::new(client.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    // The pod's pool, named by `top` as findings are.
    let (top, _) = top_once(
        Command::new(&*CONNWATCH),
        &["--pod-logs", pod_logs.to_str()],
    );
    let pool = top["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == client.id() && p["direction"] == "outbound")
        .unwrap_or_else(|| panic!("no pool for the client: {top:#}"));
    assert_eq!(
        (&pool["namespace"], &pool["pod"], &pool["container"]),
        (
            &serde_json::Value::from("payments"),
            &serde_json::Value::from("api-7d9f8b6c5-x2x9z"),
            &serde_json::Value::from(CONTAINER)
        ),
        "{pool:#}"
    );
    thread::sleep(Duration::from_millis(1500));
    abort(server);
    watch.wait_for("peer_reset_idle", |events| {
        events.iter().any(|e| kind(e) == "peer_reset_idle")
    });
    let events = watch.stop().events;
    drop(client.stdin.take());
    client.wait().unwrap();

    let reset = events
        .iter()
        .find(|e| kind(e) == "peer_reset_idle")
        .unwrap();
    assert_eq!(reset["pid"], client.id());
    assert_eq!(reset["cgroup"], relative.as_str(), "{reset:?}");
    assert_eq!(reset["container"], CONTAINER);
    assert_eq!(reset["pod_uid"], POD_UID);
    assert_eq!(reset["pod"], "api-7d9f8b6c5-x2x9z");
    assert_eq!(reset["namespace"], "payments");
    // The server, this test process, runs in no pod: a cgroup, and nothing more.
    let sent = events.iter().find(|e| kind(e) == "local_reset").unwrap();
    assert!(sent["cgroup"].is_string(), "{sent:?}");
    assert!(sent.get("pod").is_none(), "{sent:?}");
}

/// A kubelet that accepts and never answers: each pod lookup waits out its timeout. The
/// lookups run beside the event loop, so the same churn loses no more events than without.
#[test]
fn a_kubelet_that_never_answers_costs_no_events() {
    const UNNAMED_POD: &str = "0b5e7a9c-2d4f-4e6a-8b1c-3d5f7a9b1c2d";
    let (cgroup, _) = pod_cgroup("besteffort", UNNAMED_POD);
    // No log directory names the pod: the kubelet is asked.
    let pod_logs = TempDir::new("no-pods");
    let kubelet = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let kubelet_url = format!("http://{}", kubelet.local_addr().unwrap());
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let asked = asked.clone();
        thread::spawn(move || {
            let mut held = Vec::new();
            for connection in kubelet.incoming().flatten() {
                asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                held.push(connection);
            }
        });
    }
    let churn = |extra: &[&str]| -> String {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "daemon",
            "--listen",
            &addr,
            "--log-events",
            "false",
            // About 1,500 events: a loop held up for a lookup's 2 s timeout overflows it.
            "--ring-buffer-size",
            "262144",
            "--pod-logs",
            pod_logs.to_str(),
        ];
        args.extend_from_slice(extra);
        let daemon = Watch::spawn(&args);
        let (listener, server_port) = listen("127.0.0.1:0");
        // The pod's process connects 4,000 times over about 8 s; each is reset (on a slow
        // guest the RST can beat connect() back: ECONNRESET there is part of the churn).
        let mut client = python_in(
            &cgroup,
            "import socket, sys, time\n\
                 for i in range(4000):\n\
                 \x20   try:\n\
                 \x20       s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n\
                 \x20   except OSError:\n\
                 \x20       continue\n\
                 \x20   try:\n\
                 \x20       s.recv(1)\n\
                 \x20   except OSError:\n\
                 \x20       pass\n\
                 \x20   s.close()\n\
                 \x20   if i % 50 == 0:\n\
                 \x20       time.sleep(0.1)\n",
            server_port,
        )
        .spawn()
        .unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = {
            let done = done.clone();
            listener.set_nonblocking(true).unwrap();
            thread::spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => abort(stream),
                        Err(_) => thread::sleep(Duration::from_millis(1)),
                    }
                }
            })
        };
        let status = client.wait().unwrap();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        server.join().unwrap();
        assert!(status.success(), "the churning client failed");
        let metrics = format!("http://{addr}/metrics");
        wait_for_body(&metrics, r#"connwatch_resets_total{kind="peer_reset""#);
        let stderr = daemon.stop().stderr;
        stderr
            .lines()
            .find(|l| l.starts_with("connwatch: stopped:"))
            .unwrap_or_else(|| panic!("no summary: {stderr}"))
            .to_string()
    };
    let without = churn(&[]);
    let with = churn(&["--kubelet-url", &kubelet_url]);
    eprintln!("without a kubelet: {without}\nwith one that hangs: {with}");
    assert!(
        asked.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the kubelet was never asked: the test proves nothing"
    );
    let events: u64 = with
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no event count in {with}"));
    // A loop that waited on the kubelet would lose a quarter of them; 2% is noise.
    assert!(
        summary_count(&with, "lost") <= summary_count(&without, "lost") + events / 50,
        "a hanging kubelet cost events: {with} (without it: {without})"
    );
}
