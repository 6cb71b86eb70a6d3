//! Floods, restarts, races and least privilege: nothing lost silently, nothing crashes.
mod support;

use std::{
    net::TcpStream,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::{Signal, kill};
use serde_json::Value;
use support::*;

/// A client in another process holding one connection to `port` until
/// [`PyClient::finish`] (then it writes into it); and its local port.
fn python_client(port: u16) -> (PyClient, u16) {
    let mut client = PyClient::start(&["one", &port.to_string()]);
    let local_port = client.line().parse().expect("the client's local port");
    (client, local_port)
}

#[test]
fn flood_is_counted_and_the_daemon_recovers() {
    let addr = format!("127.0.0.1:{}", free_port());
    let daemon = Watch::spawn(&[
        "daemon",
        "--listen",
        &addr,
        "--ring-buffer-size",
        "4096",
        "--log-events",
        "false",
    ]);
    // The reader is stopped while a loopback generator resets thousands of connections.
    kill(support::pid(daemon.pid()), Signal::SIGSTOP).unwrap();
    let (listener, port) = listen("127.0.0.1:0");
    let started = Instant::now();
    for _ in 0..2000 {
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        abort(listener.accept().unwrap().0);
        drop(client);
    }
    let rate = 2000.0 / started.elapsed().as_secs_f64();
    kill(support::pid(daemon.pid()), Signal::SIGCONT).unwrap();
    eprintln!("flood: 2000 resets at {rate:.0}/s");

    let metrics = format!("http://{addr}/metrics");
    let body = wait_for_body(&metrics, "connwatch_ring_buffer_lost_events_total");
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut lost = 0.0;
    while lost == 0.0 && Instant::now() < deadline {
        lost = metric(
            &get(&metrics).unwrap().1,
            "connwatch_ring_buffer_lost_events_total",
        )
        .unwrap_or(0.0);
        thread::sleep(Duration::from_millis(200));
    }
    assert!(lost > 0.0, "drops counted: {body}");
    // Still healthy, and still seeing new events after the flood.
    assert_eq!(get(&format!("http://{addr}/healthz")).unwrap().0, 200);
    let pair = Pair::connect(&listener, "cw-after-flood");
    thread::sleep(Duration::from_millis(1200));
    let _client = pair.reset_from_server();
    // Labelled by the process, not its thread.
    wait_for_body(
        &metrics,
        &format!(
            r#"connwatch_resets_total{{kind="peer_reset_idle",cause="reset_while_established",comm="{}""#,
            process_comm()
        ),
    );
    daemon.stop_with(Signal::SIGTERM);
}

#[test]
fn after_kill_9_a_restart_knows_the_existing_sockets() {
    let (listener, server_port) = listen("127.0.0.1:0");
    let first = Watch::spawn(&["daemon", "--listen", &format!("127.0.0.1:{}", free_port())]);
    let (client, client_port) = python_client(server_port);
    let (server, _) = listener.accept().unwrap();
    kill(support::pid(first.pid()), Signal::SIGKILL).unwrap();
    drop(first);

    // The second daemon starts after the connection exists: only sock_diag and /proc know it.
    let addr = format!("127.0.0.1:{}", free_port());
    let second = Watch::spawn(&["daemon", "--listen", &addr, "--refresh", "1s"]);
    wait_for_body(
        &format!("http://{addr}/metrics"),
        r#"connwatch_pool_flagged_sockets{direction="outbound",flag="stalled",comm="python3""#,
    );
    thread::sleep(Duration::from_millis(1200));
    abort(server);
    // Both ports: an ephemeral port can serve connections to different servers at once,
    // and this daemon sees every test's connections.
    let ours = |e: &Value| {
        kind(e) == "peer_reset_idle"
            && port(&e["local"]) == client_port
            && port(&e["remote"]) == server_port
    };
    second.wait_for("peer_reset_idle for the pre-existing socket", |events| {
        events.iter().any(ours)
    });
    let events = second.stop_with(Signal::SIGTERM).events;
    let reset = events.iter().find(|e| ours(e)).unwrap();
    assert_eq!(reset["pid"], client.pid(), "{reset:?}");
    assert_eq!(reset["comm"], "python3");
    assert!(ms(reset, "idle_ms") >= 1000, "{reset:?}");
    client.finish();
}

/// Ids of the BPF programs process `pid` holds, from its fds' fdinfo.
fn program_ids_of(pid: u32) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .flat_map(|info| {
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|id| id.trim().parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Program ids loaded in the kernel now, as bpftool lists them.
fn loaded_programs() -> Vec<u64> {
    let output = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .unwrap();
    let programs: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    programs.iter().filter_map(|p| p["id"].as_u64()).collect()
}

#[test]
fn nothing_is_left_in_the_kernel_after_sigterm_or_kill_9() {
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let daemon = Watch::spawn(&["daemon", "--listen", &format!("127.0.0.1:{}", free_port())]);
        let pid = daemon.pid();
        let held = program_ids_of(pid);
        assert!(
            held.len() >= 6,
            "attached programs visible while running: {held:?}"
        );
        assert!(held.iter().all(|id| loaded_programs().contains(id)));
        kill(support::pid(pid), signal).unwrap();
        drop(daemon); // waits for the exit
        // Program teardown is deferred (RCU): give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut left: Vec<u64> = held.clone();
        while !left.is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
            let loaded = loaded_programs();
            left.retain(|id| loaded.contains(id));
        }
        assert!(
            left.is_empty(),
            "programs {left:?} left behind after {signal}"
        );
    }
    // connwatch never pins: bpffs holds nothing of it.
    let pinned: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.contains("connwatch") || name.contains("OWNERS"))
                .collect()
        })
        .unwrap_or_default();
    assert!(pinned.is_empty(), "{pinned:?}");
}

#[test]
fn a_process_that_exits_at_once_is_still_attributed() {
    let (listener, server_port, watch) = watched_listener("127.0.0.1:0", &[]);
    // Connects, is reset, and exits before connwatch could look in /proc. A child it leaves
    // behind holds the socket past the grace (a process that closed it at once would have
    // handled the reset: no finding).
    let child = PyClient::start(&["exits-early", &server_port.to_string()]);
    let (server, _) = listener.accept().unwrap();
    thread::sleep(Duration::from_millis(1100));
    abort(server);
    let child_pid = child.pid();
    child.finish();
    watch.wait_for("peer_reset_idle", |events| {
        events.iter().any(|e| kind(e) == "peer_reset_idle")
    });
    let events = watch.stop().events;
    let reset = events
        .iter()
        .find(|e| kind(e) == "peer_reset_idle")
        .unwrap();
    assert_eq!(reset["pid"], child_pid);
}

#[test]
fn runs_as_nobody_with_four_capabilities_and_names_each_missing_one() {
    const FOUR: &str = "+bpf,+perfmon,+sys_ptrace,+dac_read_search";
    let mut all = FOUR.to_string();
    if !kernel_at_least(5, 11) {
        // Maps are charged to RLIMIT_MEMLOCK there; raising it needs CAP_SYS_RESOURCE.
        all.push_str(",+sys_resource");
    }
    let paranoid: i32 = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if paranoid > 2 {
        // Debian's patch: only CAP_SYS_ADMIN may attach tracepoints. The error says so.
        let output = as_nobody(&all)
            .args(["watch", "--duration", "1s"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains("kernel.perf_event_paranoid is"),
            "{stderr}"
        );
        all.push_str(",+sys_admin");
    }
    let all = all.as_str();
    let (listener, server_port) = listen("127.0.0.1:0");
    let mut command = as_nobody(all);
    command.args(["watch", "--json", "--port", &server_port.to_string()]);
    let watch = Watch::spawn_command(command);
    let pair = Pair::connect(&listener, "cw-least-priv");
    let client_port = pair.client_port();
    thread::sleep(Duration::from_millis(1200));
    let _client = pair.reset_from_server();
    watch.wait_for("peer_reset_idle", |events| {
        count(events, "peer_reset_idle", client_port) >= 1
    });
    let stopped = watch.stop();
    let reset = of_kind(&stopped.events, "peer_reset_idle", client_port)[0];
    assert_eq!(reset["pid"], std::process::id());
    assert_eq!(reset["comm"], "cw-least-priv");
    assert!(!stopped.stderr.contains("warning"), "{}", stopped.stderr);

    for (without, expected, fatal) in [
        ("bpf", "missing capability CAP_BPF", true),
        ("perfmon", "missing capability CAP_PERFMON", true),
        (
            "dac_read_search",
            "missing capability CAP_DAC_READ_SEARCH",
            true,
        ),
        ("sys_ptrace", "missing capability CAP_SYS_PTRACE", false),
    ] {
        if all.contains("+sys_admin") && ["bpf", "perfmon"].contains(&without) {
            continue; // CAP_SYS_ADMIN stands in for both
        }
        let caps = all
            .replace(&format!(",+{without}"), "")
            .replace(&format!("+{without},"), "");
        let output = as_nobody(&caps)
            .args(["watch", "--duration", "1s"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "without {without}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(
            output.status.success(),
            !fatal,
            "without {without}: {stderr}"
        );
    }
}

/// (name, max_entries) of the BPF maps process `pid` holds.
fn maps_of(pid: u32) -> Vec<(String, u64)> {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .filter_map(|info| {
            let id = info
                .lines()
                .find_map(|l| l.strip_prefix("map_id:"))?
                .trim()
                .to_string();
            let output = Command::new("bpftool")
                .args(["-j", "map", "show", "id", &id])
                .output()
                .ok()?;
            let map: Value = serde_json::from_slice(&output.stdout).ok()?;
            Some((
                map["name"].as_str()?.to_string(),
                map["max_entries"].as_u64()?,
            ))
        })
        .collect()
}

#[test]
fn tables_stay_bounded_and_evictions_are_counted() {
    let (listener, server_port, watch) =
        watched_listener("127.0.0.1:0", &["--all", "--max-tracked-sockets", "64"]);
    let maps = maps_of(watch.pid());
    for name in ["OWNERS", "PEER_ENDED"] {
        assert!(
            maps.contains(&(name.to_string(), 64)),
            "{name} bounded to 64: {maps:?}"
        );
    }
    let mut held = Vec::new();
    for _ in 0..300 {
        held.push(TcpStream::connect(("127.0.0.1", server_port)).unwrap());
        held.push(listener.accept().unwrap().0);
    }
    sync_with_sentinel(&listener, &watch);
    let stderr = watch.stop().stderr;
    let summary = stderr
        .lines()
        .find(|l| l.starts_with("connwatch: stopped:"))
        .unwrap();
    let evicted: u64 = summary
        .rsplit_once(" lost, ")
        .and_then(|(_, rest)| rest.split(", ").nth(1))
        .and_then(|part| part.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no eviction count in {summary}"));
    assert!(evicted >= 300, "600 sockets in a 64-entry table: {summary}");
    drop(held);
}
