//! Human-readable lines for a terminal during an incident.
use std::io::Write;

use super::{
    Loss, Report, Sink,
    incident::{Incident, Incidents},
};
use crate::detect::Kind;

/// The table: one line per socket incident (see [`super::incident`]).
pub struct CliSink<W: Write> {
    out: W,
    /// The widths the header was printed with; `None` before the first line.
    widths: Option<Widths>,
    incidents: Incidents,
    /// CLOCK_MONOTONIC ns now: when a finding reached the table.
    clock: fn() -> u64,
}

/// The widths of the columns whose text varies most, in characters. They start wide enough
/// for IPv4 and grow (never shrink) when a line needs more, such as a long IPv6 address or a
/// state change; the header is printed again then, so the columns below it line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Widths {
    who: usize,
    addresses: usize,
    state: usize,
}

impl Widths {
    const START: Widths = Widths {
        who: 24,
        // Two IPv4 endpoints (21 characters each at most) and the arrow.
        addresses: 47,
        state: 12,
    };
}

/// One line's cells: TIME, KIND, PID/COMM, LOCAL → REMOTE, STATE, IDLE, DETAIL.
type Row<'a> = [&'a str; 7];

const HEADER: Row<'static> = [
    "TIME",
    "KIND",
    "PID/COMM",
    "LOCAL → REMOTE",
    "STATE",
    "IDLE",
    "DETAIL",
];

/// A line of the table, without trailing blanks.
fn line(widths: Widths, [time, kind, who, addresses, state, idle, detail]: Row) -> String {
    let Widths {
        who: who_width,
        addresses: addresses_width,
        state: state_width,
    } = widths;
    let line = format!(
        "{time:<12} {kind:<20} {who:<who_width$} {addresses:<addresses_width$} \
         {state:<state_width$} {idle:<7} {detail}"
    );
    line.trim_end().to_string()
}

impl<W: Write> CliSink<W> {
    pub fn new(out: W) -> Self {
        CliSink {
            out,
            widths: None,
            incidents: Incidents::default(),
            clock: super::mono_now_ns,
        }
    }

    /// Prints complete incidents; returns how many lines.
    fn print(&mut self, incidents: Vec<Incident>) -> std::io::Result<u64> {
        if incidents.is_empty() {
            return Ok(0);
        }
        let lines = incidents.len() as u64;
        for incident in incidents {
            let headline = incident.headline();
            // A lone finding says what it is in its own words, as before grouping.
            let detail = if incident.reports.len() == 1 {
                detail(headline)
            } else {
                incident.sequence()
            };
            self.finding_row(headline, &detail)?;
        }
        self.out.flush()?;
        Ok(lines)
    }

    fn finding_row(&mut self, report: &Report, detail: &str) -> std::io::Result<()> {
        let who = match (report.pid, &report.comm) {
            (Some(pid), Some(comm)) => format!("{pid}/{comm}"),
            _ => "?".to_string(),
        };
        let state = match (report.old_state, report.new_state) {
            (Some(old), Some(new)) => format!("{old}→{new}"),
            _ => report.state.to_string(),
        };
        let idle = report.idle_ms.map_or_else(|| "-".to_string(), format_ms);
        self.row([
            clock_time(&report.ts),
            report.kind,
            &who,
            &format!("{} → {}", report.local, report.remote),
            &state,
            &idle,
            detail,
        ])
    }

    /// Writes a line, with the header first if it is the first or needs wider columns.
    fn row(&mut self, row: Row) -> std::io::Result<()> {
        let width = |cell: &str| cell.chars().count();
        let current = self.widths.unwrap_or(Widths::START);
        let needed = Widths {
            who: current.who.max(width(row[2])),
            addresses: current.addresses.max(width(row[3])),
            state: current.state.max(width(row[4])),
        };
        if self.widths != Some(needed) {
            self.widths = Some(needed);
            writeln!(self.out, "{}", line(needed, HEADER))?;
        }
        writeln!(self.out, "{}", line(needed, row))
    }
}

/// `2.0s`, `350ms`, `3m12s`: the precision an engineer reads at a glance.
pub fn format_ms(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        // Below a minute: exact in a u32, and so in an f64.
        1_000..60_000 => format!(
            "{:.1}s",
            f64::from(u32::try_from(ms).unwrap_or(u32::MAX)) / 1000.0
        ),
        _ => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// pool_leak and pool_leak_exhausted, in words.
fn leak_detail(report: &Report) -> String {
    let stranded = format!(
        "{} connections stranded (idle since just after they opened while newer ones opened), \
         {} more a minute, the oldest listed {} ago",
        report.connections.unwrap_or(0),
        report.per_min.unwrap_or(0),
        format_ms(report.age_ms.unwrap_or(0))
    );
    if report.kind == Kind::PoolLeak.as_str() {
        format!("{stranded}: connections checked out and never returned")
    } else {
        format!("{stranded}; no new connection since: pool likely exhausted by leaked connections")
    }
}

/// What the kind-specific fields say, in words.
fn detail(report: &Report) -> String {
    let what = what_happened(report);
    match (report.idle_limit_ms, report.path_kills) {
        (Some(limit), Some(kills)) => format!(
            "{what}; {} kill at ~{} idle on this path: keep pooled connections' idle time \
             below it",
            ordinal(kills),
            format_ms(limit)
        ),
        _ => what,
    }
}

/// 1st, 2nd, 3rd, 4th, …, 11th, 12th, 13th, 21st.
fn ordinal(n: u64) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// The finding's own detail, without the path's idle limit.
fn what_happened(report: &Report) -> String {
    if let Some(cause) = &report.cause {
        return format!("cause: {cause}");
    }
    if let (None, Some(error)) = (report.op, report.error) {
        // What matters for a silent death is how long the peer had been silent.
        let silent = report.since_recv_ms.map_or_else(String::new, |ms| {
            format!(", nothing from the peer for {}", format_ms(u64::from(ms)))
        });
        return format!("killed by the kernel: {error}{silent}; no RST or FIN arrived");
    }
    if let (Some(op), Some(error)) = (report.op, report.error) {
        let call = match (op, error) {
            ("send", "none") => "send accepted (no error yet)".to_string(),
            ("recv", "EOF") => "read EOF".to_string(),
            ("recv", "none") => "recv returned data".to_string(),
            (op, error) => format!("{op} → {error}"),
        };
        let (since, end) = match (report.since_reset_ms, report.since_close_ms) {
            (Some(ms), _) => (ms, "reset"),
            (_, Some(ms)) => (ms, "FIN"),
            _ => return call,
        };
        return format!(
            "{call}, {} after the peer's {end}",
            format_ms(u64::from(since))
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
    if report.kind == Kind::PoolLeak.as_str() || report.kind == Kind::PoolLeakExhausted.as_str() {
        return leak_detail(report);
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
            .map_or_else(String::new, |ms| format_ms(u64::from(ms)));
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
    fn finding(&mut self, report: &Report) -> std::io::Result<u64> {
        let complete = self.incidents.add(report.clone(), (self.clock)());
        self.print(complete)
    }

    fn flush_due(&mut self, mono_now_ns: u64) -> std::io::Result<u64> {
        let complete = self.incidents.due(mono_now_ns);
        self.print(complete)
    }

    fn finish(&mut self) -> std::io::Result<u64> {
        if self.incidents.flushed_early > 0 {
            log::warn!(
                "{} incidents printed before they were complete: more than {} sockets had \
                 one open",
                self.incidents.flushed_early,
                super::incident::MAX_OPEN
            );
        }
        let open = self.incidents.drain();
        self.print(open)
    }

    fn lost(&mut self, loss: &Loss) -> std::io::Result<()> {
        let ts = humantime::format_rfc3339_millis(loss.at).to_string();
        writeln!(
            self.out,
            "{:<12} events_lost          {} events dropped by the kernel ({} in all): ring \
             buffer full, raise --ring-buffer-size; {}",
            clock_time(&ts),
            loss.count,
            loss.total,
            loss.scope()
        )?;
        self.out.flush()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(format_ms(350), "350ms");
        assert_eq!(format_ms(2049), "2.0s");
        assert_eq!(format_ms(192_000), "3m12s");
    }

    pub(in crate::sinks) fn report(
        kind: Kind,
        edit: impl FnOnce(&mut crate::detect::Finding),
    ) -> Report {
        use crate::events::{from_raw, tests::raw_send_after_reset};
        let event = from_raw(&raw_send_after_reset()).unwrap();
        let mut finding = crate::detect::Finding::new(kind, &event, None);
        if kind != Kind::UsedAfterReset {
            finding.event.io = None;
        }
        edit(&mut finding);
        Report::new(&finding, &crate::sinks::WallClock::now())
    }

    #[test]
    fn idle_kills_name_the_paths_limit() {
        let limit = crate::detect::idle_limit::IdleLimit {
            limit_ms: 300_000,
            clustered: 3,
            kills: 3,
            high_ms: 302_000,
            survived_ms: Some(240_000),
        };
        let report = report(Kind::PeerResetIdle, |f| {
            f.cause = Some("reset_while_established".into());
            f.idle_limit = Some(limit);
        });
        assert_eq!(
            detail(&report),
            "cause: reset_while_established; 3rd kill at ~5m00s idle on this path: keep pooled \
             connections' idle time below it"
        );
        let ordinals: Vec<String> = [1, 2, 4, 11, 12, 13, 21, 22, 103].map(ordinal).into();
        assert_eq!(
            ordinals,
            [
                "1st", "2nd", "4th", "11th", "12th", "13th", "21st", "22nd", "103rd"
            ]
        );
    }

    #[test]
    fn details_say_what_happened() {
        assert_eq!(
            detail(&report(Kind::UsedAfterReset, |_| {})),
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
    fn calls_say_what_they_got() {
        let call = |op, error| {
            let mut report = report(Kind::UsedAfterClose, |_| {});
            (report.op, report.error) = (Some(op), Some(error));
            report.since_close_ms = Some(300);
            detail(&report)
        };
        assert_eq!(
            call("send", "none"),
            "send accepted (no error yet), 300ms after the peer's FIN"
        );
        assert_eq!(call("recv", "EOF"), "read EOF, 300ms after the peer's FIN");
        assert_eq!(
            call("send", "EPIPE"),
            "send → EPIPE, 300ms after the peer's FIN"
        );
    }

    /// What `watch` printed, line by line.
    fn printed(reports: &[Report]) -> Vec<String> {
        let mut sink = CliSink::new(Vec::new());
        for report in reports {
            sink.finding(report).unwrap();
        }
        sink.finish().unwrap();
        String::from_utf8(sink.out)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn columns_stay_aligned_with_a_long_ipv6_address() {
        let v4 = report(Kind::UsedAfterReset, |_| {});
        let mut v6 = v4.clone();
        v6.sock_id = "another socket".into();
        v6.local = "[2001:db8:85a3:1234:5678:8a2e:370:7334]:50432".into();
        v6.remote = "[2001:db8:85a3:ffff:5678:8a2e:370:7335]:5432".into();
        let mut v4_again = v4.clone();
        v4_again.sock_id = "a third socket".into();
        let lines = printed(&[v4, v6, v4_again]);
        // The header, a line, the header again (wider), two lines.
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(lines[2].starts_with("TIME"), "{lines:#?}");
        for block in [&lines[..2], &lines[2..]] {
            let header = &block[0];
            let column = |name: &str| header[..header.find(name).unwrap()].chars().count();
            for name in ["KIND", "PID/COMM", "LOCAL", "STATE", "IDLE", "DETAIL"] {
                let at = column(name);
                for row in &block[1..] {
                    let chars: Vec<char> = row.chars().collect();
                    assert!(
                        chars[at] != ' ' && chars[at - 1] == ' ',
                        "{name} is not where its header is:\n{}",
                        block.join("\n")
                    );
                }
            }
        }
        assert!(!lines[3].ends_with(' '), "no trailing blanks");
    }

    /// A detail's shape: numbers and durations as placeholders, a cause as `<cause>`.
    fn shape(detail: &str) -> String {
        if detail.starts_with("cause: ") {
            return "cause: <cause>".into();
        }
        let mut numbers = String::new();
        for c in detail.chars() {
            if !c.is_ascii_digit() {
                numbers.push(c);
            } else if !numbers.ends_with('#') {
                numbers.push('#');
            }
        }
        numbers
            .replace("#m#s", "<d>")
            .replace("#.#s", "<d>")
            .replace("#ms", "<d>")
            .replace('#', "<n>")
    }

    /// Every DETAIL `watch` can print for `kind`, as shapes.
    fn details(kind: Kind) -> Vec<String> {
        let base = |edit: &dyn Fn(&mut Report)| {
            let mut report = report(kind, |f| f.event.waiting_ms = None);
            (report.op, report.error, report.errno) = (None, None, None);
            (report.since_reset_ms, report.since_close_ms) = (None, None);
            edit(&mut report);
            shape(&detail(&report))
        };
        let calls = |end: fn(&mut Report)| {
            let mut shapes = Vec::new();
            for op in ["send", "recv"] {
                for error in ["ECONNRESET", "EPIPE", "EOF", "none"] {
                    shapes.push(base(&|r: &mut Report| {
                        (r.op, r.error) = (Some(op), Some(error));
                        end(r);
                    }));
                }
            }
            shapes
        };
        match kind {
            Kind::PeerResetIdle | Kind::PeerReset | Kind::LocalReset => {
                vec![base(&|r| r.cause = Some("linger_zero_abort".into()))]
            }
            Kind::PeerCloseIdle => vec![base(&|_| {}), base(&|r| r.stalled_ms = Some(1500))],
            Kind::UsedAfterReset => calls(|r| r.since_reset_ms = Some(300)),
            Kind::UsedAfterClose => calls(|r| r.since_close_ms = Some(300)),
            Kind::CloseWaitLingering | Kind::PoolRecovered => {
                vec![base(&|r| r.age_ms = Some(2100))]
            }
            Kind::RequestStalled => vec![base(&|r| r.stalled_ms = Some(2300))],
            Kind::PoolExhausted => vec![base(&|r| {
                (r.connections, r.stalled_ms) = (Some(4), Some(2300));
            })],
            Kind::PoolLeak | Kind::PoolLeakExhausted => vec![base(&|r| {
                (r.connections, r.per_min, r.age_ms) = (Some(4), Some(12), Some(2100));
            })],
            Kind::ZombieConnection => [1, 2]
                .map(|n| {
                    base(&|r| {
                        (r.siblings, r.since_recv_ms) = (Some(n), Some(2600));
                    })
                })
                .to_vec(),
            Kind::SilentDeath => vec![
                base(&|r| r.error = Some("ETIMEDOUT")),
                base(&|r| (r.error, r.since_recv_ms) = (Some("ETIMEDOUT"), Some(5000))),
            ],
            Kind::StateChange => vec![base(&|_| {})],
        }
    }

    const KINDS: [Kind; 15] = [
        Kind::PeerResetIdle,
        Kind::PeerReset,
        Kind::LocalReset,
        Kind::PeerCloseIdle,
        Kind::UsedAfterReset,
        Kind::UsedAfterClose,
        Kind::CloseWaitLingering,
        Kind::RequestStalled,
        Kind::PoolExhausted,
        Kind::PoolRecovered,
        Kind::PoolLeak,
        Kind::PoolLeakExhausted,
        Kind::ZombieConnection,
        Kind::SilentDeath,
        Kind::StateChange,
    ];

    /// README.md's `watch` samples are laid out as `watch` prints them, with a DETAIL it
    /// prints for their kind; its table headers are the one `watch` prints.
    #[test]
    fn the_readme_shows_lines_as_watch_prints_them() {
        let readme = include_str!("../../../README.md");
        let header = line(Widths::START, HEADER);
        let is_time = |token: &str| {
            token.len() == 12
                && token.chars().enumerate().all(|(i, c)| {
                    [2, 5].contains(&i) && c == ':' || i == 8 && c == '.' || c.is_ascii_digit()
                })
        };
        let mut rows = 0;
        for readme_line in readme.lines() {
            if readme_line.starts_with("TIME ") {
                assert_eq!(readme_line, header, "README.md's header is not watch's");
                continue;
            }
            if !readme_line.split(' ').next().is_some_and(is_time) {
                continue;
            }
            // TIME KIND PID/COMM LOCAL → REMOTE STATE IDLE, then DETAIL.
            let mut rest = readme_line;
            let mut cells = Vec::new();
            for _ in 0..8 {
                rest = rest.trim_start();
                let end = rest.find(' ').unwrap_or(rest.len());
                cells.push(&rest[..end]);
                rest = &rest[end..];
            }
            let detail_text = rest.trim_start();
            if readme_line == readme_incident_line() {
                rows += 1;
                continue;
            }
            let Some(&kind) = KINDS.iter().find(|k| k.as_str() == cells[1]) else {
                panic!("README.md: not a kind: {readme_line}");
            };
            let addresses = format!("{} → {}", cells[3], cells[5]);
            let as_printed = line(
                Widths::START,
                [
                    cells[0],
                    cells[1],
                    cells[2],
                    &addresses,
                    cells[6],
                    cells[7],
                    detail_text,
                ],
            );
            assert_eq!(
                readme_line, as_printed,
                "README.md's line is not laid out as watch's"
            );
            let shapes = details(kind);
            assert!(
                shapes.contains(&shape(detail_text)),
                "README.md shows a DETAIL watch does not print for {}: {detail_text:?}; \
                 it prints {shapes:#?}",
                kind.as_str()
            );
            rows += 1;
        }
        assert!(rows >= 15, "only {rows} sample lines found in README.md");
    }

    /// README.md's incident line: the FIN → write → RST story of one socket, with the
    /// sample's values, as the table prints it.
    fn readme_incident_line() -> String {
        let story = crate::sinks::incident::tests::fin_write_rst("49138").map(|(mut r, _)| {
            r.ts = "2026-11-30T08:13:06.605123Z".into();
            (r.pid, r.comm) = (Some(15242), Some("python3".into()));
            if r.kind == Kind::PeerCloseIdle.as_str() {
                r.idle_ms = Some(1500);
            }
            if r.since_close_ms.is_some() {
                r.since_close_ms = Some(299);
            }
            r
        });
        let lines = printed(&story);
        assert_eq!(lines.len(), 2, "the header and one line: {lines:#?}");
        lines[1].clone()
    }

    #[test]
    fn the_readme_shows_an_incident_line_as_watch_prints_it() {
        let line = readme_incident_line();
        assert!(
            line.ends_with(
                "peer FIN after 1.5s idle → app wrote 299ms later (send accepted) → peer RST"
            ),
            "{line}"
        );
        assert!(
            include_str!("../../../README.md").contains(&line),
            "README.md does not show the incident line as watch prints it:\n{line}"
        );
    }

    #[test]
    fn a_lone_finding_prints_as_before_grouping() {
        let report = report(Kind::UsedAfterReset, |_| {});
        let mut sink = CliSink::new(Vec::new());
        sink.finding_row(&report, &detail(&report)).unwrap();
        let before = String::from_utf8(sink.out).unwrap();
        assert_eq!(printed(&[report]).join("\n") + "\n", before);
    }

    #[test]
    fn clock_time_slices_rfc3339() {
        assert_eq!(clock_time("2026-11-26T21:58:01.123456Z"), "21:58:01.123");
    }
}
