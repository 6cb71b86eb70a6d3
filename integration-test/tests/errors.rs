//! Bad input gets one clear line naming the problem and the fix, a non-zero exit, no panic.
#[path = "../../monitor/tests/outcome/mod.rs"]
mod outcome;
mod support;

use std::{process::Command, time::Instant};

use outcome::Outcome;
use support::CONNWATCH;

fn connwatch(args: &[&str]) -> Outcome {
    Outcome::of(Command::new(&*CONNWATCH).args(args))
}

#[test]
fn missing_btf_names_the_fix() {
    let outcome = connwatch(&["watch", "--btf", "/nonexistent/vmlinux"]);
    outcome.assert_one_line_error("kernel BTF not found at /nonexistent/vmlinux");
    assert!(outcome.stderr.contains("CONFIG_DEBUG_INFO_BTF"));
}

/// A tracefs that lacks `tcp:tcp_receive_reset`, as an old kernel's would.
#[test]
fn missing_tracepoint_is_named() {
    let fake = support::FakeTracefs::without("tcp/tcp_receive_reset");
    let outcome = connwatch(&["watch", "--tracefs", fake.path()]);
    outcome.assert_one_line_error("tracepoint tcp:tcp_receive_reset is missing");
}

#[test]
fn not_a_tracefs() {
    let outcome = connwatch(&["watch", "--tracefs", "/tmp"]);
    outcome.assert_one_line_error("/tmp is not a tracefs mount");
}

#[test]
fn duration_ends_the_watch_cleanly() {
    let started = Instant::now();
    let outcome = connwatch(&["watch", "--duration", "1s"]);
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("connwatch: watching"),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("connwatch: stopped:"),
        "{}",
        outcome.stderr
    );
    assert!(started.elapsed().as_secs_f64() >= 1.0);
}

/// A FIFO would block the read forever: refused at once (`timeout` turns a hang into 124).
#[test]
fn a_fifo_as_btf_is_refused_at_once() {
    let dir = support::TempDir::new("btf-fifo");
    let fifo = dir.join("vmlinux");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let outcome = Outcome::of(
        Command::new("timeout")
            .args(["10", &*CONNWATCH, "watch", "--btf"])
            .arg(&fifo),
    );
    outcome.assert_one_line_error("is a FIFO, not a file");
}

/// An empty or missing `--host-proc` would leave every existing socket unattributed.
#[test]
fn a_host_proc_that_is_not_proc_is_refused() {
    let empty = support::TempDir::new("empty-proc");
    let outcome = connwatch(&["top", "--once", "--host-proc", empty.to_str()]);
    outcome.assert_one_line_error("is not a proc filesystem");
    let outcome = connwatch(&["daemon", "--host-proc", "/nonexistent/proc"]);
    outcome.assert_one_line_error("--host-proc /nonexistent/proc: No such file");
}
