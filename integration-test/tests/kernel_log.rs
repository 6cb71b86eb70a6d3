//! The kernel programs' own diagnostics (aya-log): shown at `--log-level debug`, absent at
//! the default level, where the programs are loaded with them off.
mod support;

use std::{process::Command, thread, time::Duration};

use nix::sys::signal::{Signal, kill};
use support::*;

/// What the kernel says when a record finds the ring buffer full (`monitor-ebpf/src/event.rs`).
const SKIPPED: &str = "kernel: ring buffer full: event of hook";

/// Resets made while connwatch reads nothing: each is four events or more, so these
/// overflow a one-page ring (about 22 events) many times.
const FLOOD: u64 = 100;

/// `watch` with a one-page ring and `extra` flags, stopped during a reset flood on its
/// port; its stderr once it has reported the loss and stopped.
fn overflow(extra: &[&str]) -> String {
    let (listener, port) = listen("127.0.0.1:0");
    let port = port.to_string();
    let mut flags = vec!["--port", &port, "--ring-buffer-size", "4096"];
    flags.extend_from_slice(extra);
    let watch = Watch::start(&flags);
    let connwatch = support::pid(watch.pid());
    kill(connwatch, Signal::SIGSTOP).unwrap();
    let flood = ResetFlood::start(listener);
    while flood.resets() < FLOOD {
        thread::sleep(Duration::from_millis(10));
    }
    flood.stop();
    kill(connwatch, Signal::SIGCONT).unwrap();
    watch.wait_for("an events_lost record", |events| {
        events.iter().any(|e| kind(e) == "events_lost")
    });
    // A stop forwards what the kernel logged before it.
    watch.stop().stderr
}

#[test]
fn a_skipped_record_is_a_kernel_diagnostic_at_debug_level() {
    let stderr = overflow(&["--log-level", "debug"]);
    let line = stderr
        .lines()
        .find(|l| l.contains(SKIPPED))
        .unwrap_or_else(|| panic!("no kernel diagnostic in:\n{stderr}"));
    assert!(line.starts_with("connwatch: debug: kernel: "), "{line}");
    assert!(line.ends_with("skipped (counted in events_lost)"), "{line}");
    // The start-up line names the capability.
    assert!(stderr.contains("kernel diagnostics ← aya-log"), "{stderr}");
}

#[test]
fn kernel_diagnostics_are_off_by_default() {
    let stderr = overflow(&[]);
    // The same overflow: userspace reports the loss...
    assert!(stderr.contains("raise --ring-buffer-size"), "{stderr}");
    // ...and the kernel, loaded with its diagnostics off, says nothing.
    assert!(!stderr.contains("kernel: "), "{stderr}");
    assert!(!stderr.contains("kernel diagnostics"), "{stderr}");
}

#[test]
fn a_bad_log_level_is_refused_by_name() {
    for (flag, env) in [(Some("verbose"), None), (None, Some("verbose"))] {
        let mut command = Command::new(&*CONNWATCH);
        command.arg("doctor").env_remove("RUST_LOG");
        if let Some(level) = flag {
            command.args(["--log-level", level]);
        }
        if let Some(level) = env {
            command.env("RUST_LOG", level);
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("`verbose` is not a log level") && stderr.contains("debug"),
            "{stderr}"
        );
    }
}
