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

#[test]
fn idle_reset_names_cgroup_container_and_pod() {
    let top = format!("connwatch-test-{}", std::process::id());
    let relative = format!("/{top}/kubepods/burstable/pod{POD_UID}/{CONTAINER}");
    let dir = cgroup2_root().join(relative.trim_start_matches('/'));
    fs::create_dir_all(&dir).unwrap();
    let _cgroup = Cgroup(dir.clone());
    let pod_logs = std::env::temp_dir().join(format!("connwatch-pod-logs-{}", std::process::id()));
    fs::create_dir_all(pod_logs.join(format!("payments_api-7d9f8b6c5-x2x9z_{POD_UID}"))).unwrap();

    let (listener, server_port, watch) =
        watched_listener("127.0.0.1:0", &["--pod-logs", pod_logs.to_str().unwrap()]);
    // The client moves itself into the pod's cgroup, then becomes python.
    let mut client = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec python3 -c \"$0\" {server_port}",
            dir.display()
        ))
        .arg(
            "import socket, sys\n\
             s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n\
             print('ready', flush=True)\n\
             sys.stdin.read()\n",
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
        &["--pod-logs", pod_logs.to_str().unwrap()],
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
    fs::remove_dir_all(&pod_logs).unwrap();

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
