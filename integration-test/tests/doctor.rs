//! `connwatch doctor` on this machine, and on a kernel that lacks a tracepoint.
mod support;

use std::process::Command;

use support::{CONNWATCH, FakeTracefs, kernel_at_least, requests_ordered, send_recv_typed};

fn doctor(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(&*CONNWATCH)
        .arg("doctor")
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn row<'a>(table: &'a str, check: &str) -> &'a str {
    table
        .lines()
        .find(|line| line.starts_with(check))
        .unwrap_or_else(|| panic!("no {check} row in:\n{table}"))
}

#[test]
fn this_machine_can_run_connwatch() {
    let (code, table, stderr) = doctor(&[]);
    assert_eq!(code, Some(0), "{table}{stderr}");
    for check in [
        "kernel ",
        "capabilities",
        "kernel BTF",
        "tracefs",
        "tracepoint sock:inet_sock_set_state",
        "tracepoint tcp:tcp_receive_reset",
        "tracepoint tcp:tcp_send_reset",
        "tracepoint tcp:tcp_destroy_sock",
        "BPF ring buffer",
        "load and attach",
        "capability state changes",
    ] {
        let line = row(&table, check);
        assert!(line.contains(" ok "), "{line}");
    }
    // Tracepoints from Linux 6.3, fexit before; where BPF trampolines cannot attach to
    // kernel functions (arm64 before 6.5), kprobes, which may miss calls.
    let used_after = row(&table, "capability used_after_*");
    if send_recv_typed() {
        assert!(used_after.contains(" ok "), "{used_after}");
    } else {
        assert!(
            used_after.contains(" degraded ") && used_after.contains("kprobe+kretprobe"),
            "{used_after}"
        );
    }
    // Linux 6.10 gave tcp_send_reset its reason and made it fire without a full socket.
    let expected = if kernel_at_least(6, 10) {
        " ok "
    } else {
        " degraded "
    };
    for check in ["capability resets", "capability reset causes"] {
        let line = row(&table, check);
        assert!(line.contains(expected), "{line}");
    }
    // Socket storage from tracing programs (5.11) orders requests against answers; before,
    // tcp_info's ticks do, and doctor says what that misses.
    let stalls = row(&table, "capability request_stalled");
    if requests_ordered() {
        assert!(
            stalls.contains(" ok ") && stalls.contains("socket storage"),
            "{stalls}"
        );
    } else {
        let why = if kernel_at_least(5, 11) {
            "kprobes, which cannot reach socket storage"
        } else {
            "needs Linux 5.11"
        };
        assert!(
            stalls.contains(" degraded ") && stalls.contains(why),
            "{stalls}"
        );
    }
    // Informational rows are present whatever their status.
    row(&table, "kprobes");
    row(&table, "BPF trampolines (fentry)");
    assert!(!table.contains("MISSING"), "{table}");
    assert!(
        table.contains("connwatch can run on this node: yes"),
        "{table}"
    );
}

/// `--no-trampolines`, where the send/recv tracepoints are missing (before Linux 6.3): a
/// kprobe and kretprobe serve used_after_*, as on kernels without BPF trampolines (arm64
/// before 6.5), degraded by the kretprobe's limit on calls in flight; request_stalled falls
/// back to tcp_info (kprobes cannot reach socket storage). Skipped where the tracepoints
/// exist: they serve whatever the flag says.
#[test]
fn without_trampolines_kprobes_serve_used_after() {
    let tracefs = monitor::probes::tracefs::locate(None).expect("tracefs");
    if tracefs.join("events/sock/sock_send_length").is_dir() {
        println!(
            "without_trampolines_kprobes_serve_used_after: skipped: this kernel has \
             sock:sock_send_length, which serves used_after_* before kprobes"
        );
        return;
    }
    let (code, table, stderr) = doctor(&["--no-trampolines"]);
    assert_eq!(code, Some(0), "{table}{stderr}");
    let used_after = row(&table, "capability used_after_*");
    assert!(
        used_after.contains(" degraded ")
            && used_after.contains(
                "served by kprobe+kretprobe tcp_sendmsg, tcp_recvmsg (fexit not used: \
                 --no-trampolines)"
            )
            && used_after.contains("maxactive"),
        "{used_after}"
    );
    let stalls = row(&table, "capability request_stalled");
    assert!(
        stalls.contains(" degraded ") && stalls.contains("tcp_info"),
        "{stalls}"
    );
    assert!(row(&table, "kprobes").contains(" ok "), "{table}");
    assert!(
        table.contains("connwatch can run on this node: yes"),
        "{table}"
    );
}

#[test]
fn a_missing_tracepoint_is_reported_and_fails() {
    let fake = FakeTracefs::without("tcp/tcp_receive_reset");
    let (code, table, stderr) = doctor(&["--tracefs", fake.path()]);
    assert_eq!(code, Some(1), "{table}{stderr}");
    let line = row(&table, "tracepoint tcp:tcp_receive_reset");
    assert!(
        line.contains("MISSING") && line.contains("Linux 5.8"),
        "{line}"
    );
    assert!(row(&table, "tracepoint tcp:tcp_send_reset").contains(" ok "));
    assert!(
        table.contains("connwatch can run on this node: NO"),
        "{table}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// Without CAP_BPF no map can be made, so the ring buffer cannot be probed: the row names
/// the capability, not an old kernel.
#[test]
fn without_cap_bpf_the_ring_buffer_row_names_the_capability() {
    let output = support::as_nobody("-all").arg("doctor").output().unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    let ring = row(&table, "BPF ring buffer");
    assert!(
        ring.contains("MISSING") && ring.contains("CAP_BPF"),
        "{ring}"
    );
    assert!(!ring.contains("5.8"), "{ring}");
}
