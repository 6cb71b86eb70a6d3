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
