//! Command-line errors an ordinary user can meet without privileges: bad flag values, and
//! running without the capabilities. Plain `cargo test` runs these; the privileged error
//! paths are in integration-test/tests/errors.rs.
mod outcome;

use std::process::Command;

use outcome::Outcome;

const CONNWATCH: &str = env!("CARGO_BIN_EXE_connwatch");

fn connwatch(args: &[&str]) -> Outcome {
    Outcome::of(Command::new(CONNWATCH).args(args))
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
        (
            &["watch", "--ring-buffer-size", "2147483648"],
            "2147483648 is above the limit of 268435456 (256 MiB)",
        ),
        (
            &["daemon", "--max-tracked-sockets", "16777216"],
            "16777216 is above the limit of 1048576: the kernel preallocates about 240 bytes \
             per tracked socket, so this would pin 3840 MiB",
        ),
        (
            &["daemon", "--max-tracked-sockets", "8"],
            "8 is below the minimum of 64",
        ),
        (
            &["watch", "--zombie-threshold", "0s"],
            "invalid value '0s' for '--zombie-threshold <DURATION>': must be greater than zero",
        ),
        (
            &["daemon", "--zombie-threshold", "2days"],
            "2days is above the limit of 1 day",
        ),
        (
            &["top", "--stall-threshold", "0s"],
            "invalid value '0s' for '--stall-threshold <DURATION>': must be greater than zero: \
             use a little more than your slowest legitimate query takes",
        ),
        (
            &["daemon", "--stall-threshold", "3days"],
            "3days is above the limit of 1 day: use a little more than your slowest",
        ),
        (&["top", "--refresh", "10ms"], "10ms is outside 100ms..1h"),
        (
            &["watch", "--idle-threshold", "2days"],
            "2days is above the limit of 1 day",
        ),
        (
            &["daemon", "--close-wait-threshold", "0s"],
            "must be greater than zero: use the time after which a socket still in CLOSE_WAIT",
        ),
        (
            &["watch", "--ignore-port", "0"],
            "invalid value '0' for '--ignore-port <PORT>'",
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

/// Checked before anything is loaded, so an ordinary user meets it too.
#[test]
fn too_many_ignored_ports_are_refused() {
    let ports: Vec<String> = (1..=65).map(|p| p.to_string()).collect();
    let outcome = connwatch(&["watch", "--ignore-port", &ports.join(",")]);
    outcome.assert_one_line_error("65 ports given to --ignore-port, more than 64");
}

#[test]
fn unprivileged_user_is_told_which_capabilities() {
    // As root, become nobody with no capabilities at all; as anyone else, run as is.
    let outcome = if nix::unistd::geteuid().is_root() {
        Outcome::of(
            Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "--inh-caps=-all",
                ])
                .arg(CONNWATCH)
                .arg("watch"),
        )
    } else {
        connwatch(&["watch"])
    };
    outcome.assert_one_line_error("missing capability CAP_BPF and CAP_PERFMON");
    assert!(
        outcome.stderr.contains("run connwatch as root"),
        "{}",
        outcome.stderr
    );
}
