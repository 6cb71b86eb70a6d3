//! Bad input gets one clear line naming the problem and the fix, a non-zero exit, no panic.
mod support;

use std::{path::Path, process::Command, time::Instant};

use support::CONNWATCH;

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn connwatch(args: &[&str]) -> Outcome {
    let output = Command::new(CONNWATCH).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    Outcome {
        code: output.status.code(),
        stderr,
    }
}

/// A runtime error: exactly one line, starting `connwatch: error:`, exit 1.
fn assert_one_line_error(outcome: &Outcome, expected: &str) {
    assert_eq!(outcome.code, Some(1), "{}", outcome.stderr);
    let lines: Vec<&str> = outcome.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {}", outcome.stderr);
    assert!(lines[0].starts_with("connwatch: error: "), "{}", lines[0]);
    assert!(
        lines[0].contains(expected),
        "{:?} lacks {expected:?}",
        lines[0]
    );
}

#[test]
fn bad_flag_values_are_named() {
    for (args, expected) in [
        (
            &["watch", "--idle-threshold", "soon"][..],
            "invalid value 'soon' for '--idle-threshold <DURATION>'",
        ),
        (&["watch", "--duration", "0s"], "must be greater than zero"),
        (
            &["watch", "--port", "0"],
            "invalid value '0' for '--port <PORT>'",
        ),
        (
            &["watch", "--count=0"],
            "invalid value '0' for '--count <N>'",
        ),
        (
            &["watch", "--ring-buffer-size", "5000"],
            "5000 is not a power of two of at least 4096",
        ),
        (&["watch", "--bogus"], "unexpected argument '--bogus'"),
    ] {
        let outcome = connwatch(args);
        assert_eq!(outcome.code, Some(2), "{args:?}: {}", outcome.stderr);
        let first = outcome.stderr.lines().next().unwrap_or_default();
        assert!(
            first.contains(expected),
            "{args:?}: {first:?} lacks {expected:?}"
        );
    }
}

#[test]
fn unprivileged_user_is_told_which_capabilities() {
    // nobody, with no capabilities at all.
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(CONNWATCH)
        .arg("watch")
        .output()
        .unwrap();
    let outcome = Outcome {
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert_one_line_error(&outcome, "missing capability CAP_BPF and CAP_PERFMON");
    assert!(
        outcome.stderr.contains("run connwatch as root"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn missing_btf_names_the_fix() {
    let outcome = connwatch(&["watch", "--btf", "/nonexistent/vmlinux"]);
    assert_one_line_error(&outcome, "kernel BTF not found at /nonexistent/vmlinux");
    assert!(outcome.stderr.contains("CONFIG_DEBUG_INFO_BTF"));
}

/// A tracefs that lacks `tcp:tcp_receive_reset`, as an old kernel's would.
#[test]
fn missing_tracepoint_is_named() {
    let fake = support::FakeTracefs::without("tcp/tcp_receive_reset");
    let outcome = connwatch(&["watch", "--tracefs", fake.path()]);
    assert_one_line_error(&outcome, "tracepoint tcp:tcp_receive_reset is missing");
}

#[test]
fn not_a_tracefs() {
    let outcome = connwatch(&["watch", "--tracefs", "/tmp"]);
    assert_one_line_error(&outcome, "/tmp is not a tracefs mount");
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
    assert!(Path::new(CONNWATCH).exists());
}
