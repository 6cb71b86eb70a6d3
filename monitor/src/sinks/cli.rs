//! Human-readable lines for a terminal during an incident.
use std::{io::Write, time::SystemTime};

use super::{Report, Sink};
use crate::detect::Kind;

pub struct CliSink<W: Write> {
    out: W,
    header_written: bool,
}

impl<W: Write> CliSink<W> {
    pub fn new(out: W) -> Self {
        CliSink {
            out,
            header_written: false,
        }
    }

    fn header(&mut self) -> std::io::Result<()> {
        if !self.header_written {
            self.header_written = true;
            writeln!(
                self.out,
                "{:<12} {:<20} {:<24} {:<47} {:<12} {:<7} DETAIL",
                "TIME", "KIND", "PID/COMM", "LOCAL → REMOTE", "STATE", "IDLE"
            )?;
        }
        Ok(())
    }
}

/// `2.0s`, `350ms`, `3m12s`: the precision an engineer reads at a glance.
pub fn format_ms(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// What the kind-specific fields say, in words.
fn detail(report: &Report) -> String {
    if let Some(cause) = &report.cause {
        return format!("cause: {cause}");
    }
    if let (None, Some(error)) = (report.op, report.error) {
        // What matters for a silent death is how long the peer had been silent.
        let silent = report.since_recv_ms.map_or_else(String::new, |ms| {
            format!(", nothing from the peer for {}", format_ms(ms as u64))
        });
        return format!("killed by the kernel: {error}{silent}; no RST or FIN arrived");
    }
    if let (Some(op), Some(error)) = (report.op, report.error) {
        let (since, end) = match (report.since_reset_ms, report.since_close_ms) {
            (Some(ms), _) => (ms, "reset"),
            (_, Some(ms)) => (ms, "FIN"),
            _ => return format!("{op} → {error}"),
        };
        return format!(
            "{op} → {error}, {} after the peer's {end}",
            format_ms(since as u64)
        );
    }
    if report.kind == Kind::PoolExhausted.as_str() {
        return format!(
            "all {} connections of the pool wait on stalled requests, the oldest for {}: \
             the next request waits for a connection",
            report.connections.unwrap_or(0),
            format_ms(report.stalled_ms.unwrap_or(0))
        );
    }
    if report.kind == Kind::PoolRecovered.as_str() {
        return format!(
            "a connection is free again, after {} exhausted",
            format_ms(report.age_ms.unwrap_or(0))
        );
    }
    if let Some(siblings) = report.siblings {
        let silent = report
            .since_recv_ms
            .map_or_else(String::new, |ms| format_ms(ms as u64));
        let connections = if siblings == 1 {
            "connection"
        } else {
            "connections"
        };
        return format!(
            "written to and acknowledged, nothing received for {silent}; \
             {siblings} newer {connections} from this peer active: the client moved"
        );
    }
    match (report.age_ms, report.stalled_ms) {
        (Some(age), _) => format!(
            "in CLOSE_WAIT for {}{}: the application never closed it",
            if report.age_at_least == Some(true) {
                "at least "
            } else {
                ""
            },
            format_ms(age)
        ),
        (_, Some(stalled)) if report.kind == Kind::RequestStalled.as_str() => format!(
            "request sent and acknowledged {} ago, no answer yet",
            format_ms(stalled)
        ),
        // A reset or FIN ended a connection whose request was waiting: not an idle one.
        (_, Some(waited)) => format!("a request had waited {} for its answer", format_ms(waited)),
        _ => String::new(),
    }
}

fn clock_time(ts: &str) -> &str {
    // RFC 3339 "2026-11-26T21:58:01.123456Z" → "21:58:01.123".
    ts.get(11..23).unwrap_or(ts)
}

impl<W: Write> Sink for CliSink<W> {
    fn finding(&mut self, report: &Report) -> std::io::Result<()> {
        self.header()?;
        let who = match (report.pid, &report.comm) {
            (Some(pid), Some(comm)) => format!("{pid}/{comm}"),
            _ => "?".to_string(),
        };
        let state = match (report.old_state, report.new_state) {
            (Some(old), Some(new)) => format!("{old}→{new}"),
            _ => report.state.to_string(),
        };
        let idle = report.idle_ms.map_or_else(|| "-".to_string(), format_ms);
        writeln!(
            self.out,
            "{:<12} {:<20} {:<24} {:<47} {:<12} {:<7} {}",
            clock_time(&report.ts),
            report.kind,
            who,
            format!("{} → {}", report.local, report.remote),
            state,
            idle,
            detail(report)
        )?;
        self.out.flush()
    }

    fn lost(&mut self, at: SystemTime, count: u64, total: u64) -> std::io::Result<()> {
        let ts = humantime::format_rfc3339_millis(at).to_string();
        writeln!(
            self.out,
            "{:<12} events_lost          {count} events dropped by the kernel ({total} in all): \
             ring buffer full, raise --ring-buffer-size",
            clock_time(&ts)
        )?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(format_ms(350), "350ms");
        assert_eq!(format_ms(2049), "2.0s");
        assert_eq!(format_ms(192_000), "3m12s");
    }

    fn report(kind: Kind, edit: impl FnOnce(&mut crate::detect::Finding)) -> Report {
        use crate::events::{from_raw, tests::raw_send_after_reset};
        let event = from_raw(&raw_send_after_reset()).unwrap();
        let mut finding = crate::detect::Finding::new(kind, &event, None);
        if kind != Kind::WriteAfterReset {
            finding.event.io = None;
        }
        edit(&mut finding);
        Report::new(&finding, &crate::sinks::WallClock::now())
    }

    #[test]
    fn details_say_what_happened() {
        assert_eq!(
            detail(&report(Kind::WriteAfterReset, |_| {})),
            "send → ECONNRESET, 1.5s after the peer's reset"
        );
        assert_eq!(
            detail(&report(Kind::CloseWaitLingering, |f| f.age_ms = Some(31_000))),
            "in CLOSE_WAIT for 31.0s: the application never closed it"
        );
        assert_eq!(
            detail(&report(Kind::RequestStalled, |f| f.stalled_ms = Some(12_000))),
            "request sent and acknowledged 12.0s ago, no answer yet"
        );
        assert_eq!(
            detail(&report(Kind::PoolExhausted, |f| {
                f.connections = Some(4);
                f.stalled_ms = Some(31_000);
            })),
            "all 4 connections of the pool wait on stalled requests, the oldest for 31.0s: \
             the next request waits for a connection"
        );
        assert_eq!(
            detail(&report(Kind::PoolRecovered, |f| f.age_ms = Some(45_000))),
            "a connection is free again, after 45.0s exhausted"
        );
        let zombie = report(Kind::ZombieConnection, |f| {
            f.siblings = Some(2);
            f.age_ms = Some(60_000);
            f.event.since_recv_ms = Some(31_000);
        });
        assert_eq!(
            detail(&zombie),
            "written to and acknowledged, nothing received for 31.0s; \
             2 newer connections from this peer active: the client moved"
        );
        assert_eq!(
            detail(&report(Kind::PeerReset, |f| f.event.waiting_ms = Some(95_000))),
            "a request had waited 1m35s for its answer"
        );
        assert_eq!(detail(&report(Kind::PeerResetIdle, |_| {})), "");
    }

    #[test]
    fn clock_time_slices_rfc3339() {
        assert_eq!(clock_time("2026-11-26T21:58:01.123456Z"), "21:58:01.123");
    }
}
