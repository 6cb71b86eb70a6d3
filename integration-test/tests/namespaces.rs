//! Pods' sockets: two network namespaces run the same loopback pool (same addresses and
//! ports), one of them stuck; both exist before connwatch starts. Pools, stalls and `top`
//! must keep them apart.
mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
};

use serde_json::Value;
use support::*;

/// Inside each namespace, the pool's server listens here (a port per test: they run in
/// parallel, and each must see only its own pods).
const PORT: &str = "15432";
const PORT_NOBODY: &str = "15433";
const POOL: usize = 3;

/// A network namespace running `support/nspool.py`: a loopback server and a pool of
/// [`POOL`] connections, each with a request sent (`stall`: never answered).
struct PodPool {
    netns: String,
    child: Child,
}

impl PodPool {
    fn start(port: &str, stall: bool) -> PodPool {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let netns = format!("cw-pod-{}x{n}", std::process::id());
        run("ip", &["netns", "add", &netns]);
        run("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &netns, "python3"])
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/nspool.py"
            ))
            .args([
                port,
                &POOL.to_string(),
                if stall { "stall" } else { "idle" },
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready");
        PodPool { netns, child }
    }

    /// `ip netns exec` execs python3: the child's pid is the pool's.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The namespace's inode, as connwatch reports it.
    fn inode(&self) -> u64 {
        netns_inode(self.pid())
    }
}

impl Drop for PodPool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
    }
}

/// The outbound pools towards the pods' shared endpoint in `top --once --json`.
fn outbound_pools<'a>(top: &'a Value, port: &str) -> Vec<&'a Value> {
    let endpoint = format!("127.0.0.1:{port}");
    top["pools"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["endpoint"] == endpoint.as_str() && p["direction"] == "outbound")
        .collect()
}

#[test]
fn identical_pools_in_two_namespaces_stay_apart() {
    let stuck = PodPool::start(PORT, true);
    let fine = PodPool::start(PORT, false);
    // Past the 1 s threshold `top` uses, so its first refresh sees the stalls.
    std::thread::sleep(std::time::Duration::from_millis(1200));

    let (top, _) = top_once(Command::new(&*CONNWATCH), &["--stall-threshold", "1s"]);
    let pools = outbound_pools(&top, PORT);
    assert_eq!(pools.len(), 2, "one pool per namespace: {top:#}");
    for (pod, stalled) in [(&stuck, POOL), (&fine, 0)] {
        let pool = pools
            .iter()
            .find(|p| p["pid"] == pod.pid())
            .unwrap_or_else(|| panic!("no pool for pid {}: {top:#}", pod.pid()));
        assert_eq!(pool["netns"], pod.inode(), "{pool:#}");
        assert_eq!(pool["established"], POOL, "{pool:#}");
        assert_eq!(pool["stalled"], stalled, "{pool:#}");
    }

    let watch = Watch::start(&[
        "--kind",
        "request_stalled",
        "--stall-threshold",
        "1s",
        "--refresh",
        "1s",
    ]);
    watch.wait_for("the stuck pool's stalls", |events| {
        events.iter().filter(|e| e["pid"] == stuck.pid()).count() >= POOL
    });
    let events = watch.stop().events;
    let ours: Vec<&Value> = events
        .iter()
        .filter(|e| port(&e["remote"]).to_string() == PORT)
        .collect();
    assert_eq!(
        ours.len(),
        POOL,
        "only the stuck pool's requests: {events:#?}"
    );
    for event in ours {
        assert_eq!(event["pid"], stuck.pid(), "{event:?}");
        assert_eq!(event["netns"], stuck.inode(), "{event:?}");
    }
}

/// Without CAP_SYS_ADMIN connwatch cannot enter the namespaces: their pools are still
/// listed, from /proc/<pid>/net/tcp, and it says what is missing.
#[test]
fn without_cap_sys_admin_pools_are_listed_and_the_gap_is_said() {
    const FOUR: &str = "+bpf,+perfmon,+sys_ptrace,+dac_read_search";
    let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid").unwrap();
    if !kernel_at_least(5, 11) || paranoid.trim().parse::<i32>().unwrap() > 2 {
        // Such kernels need more than the four capabilities to attach at all
        // (tests/reliability.rs), CAP_SYS_ADMIN included on Debian's.
        eprintln!("skipped: the four capabilities cannot attach on this kernel");
        return;
    }
    let stuck = PodPool::start(PORT_NOBODY, true);
    let fine = PodPool::start(PORT_NOBODY, false);
    let (top, stderr) = top_once(as_nobody(FOUR), &[]);
    let pools = outbound_pools(&top, PORT_NOBODY);
    let mut pids: Vec<u64> = pools.iter().map(|p| p["pid"].as_u64().unwrap()).collect();
    pids.sort_unstable();
    let mut expected = vec![u64::from(stuck.pid()), u64::from(fine.pid())];
    expected.sort_unstable();
    assert_eq!(pids, expected, "{top:#}");
    assert!(
        stderr.contains("takes CAP_SYS_ADMIN") && stderr.contains("/proc/<pid>/net/tcp"),
        "{stderr}"
    );
}
