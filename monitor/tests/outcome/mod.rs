//! One run of connwatch as the user meets it: exit code and stderr. Shared by the
//! unprivileged CLI tests here and the privileged ones in integration-test (by `#[path]`).
use std::process::Command;

pub struct Outcome {
    pub code: Option<i32>,
    pub stderr: String,
}

impl Outcome {
    pub fn of(command: &mut Command) -> Outcome {
        let output = command.output().expect("run connwatch");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "panic: {stderr}");
        Outcome {
            code: output.status.code(),
            stderr,
        }
    }

    /// A runtime error: exactly one line, starting `connwatch: error:`, exit 1.
    pub fn assert_one_line_error(&self, expected: &str) {
        assert_eq!(self.code, Some(1), "{}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line expected: {}", self.stderr);
        assert!(lines[0].starts_with("connwatch: error: "), "{}", lines[0]);
        assert!(
            lines[0].contains(expected),
            "{:?} lacks {expected:?}",
            lines[0]
        );
    }
}
