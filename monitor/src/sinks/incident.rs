//! `watch`'s table shows one line per socket incident: what happened to one socket within a
//! short window (the peer's FIN, the application's write into it, the RST that answered)
//! is one story, and an on-call engineer reads it best as one line with the sequence.
//! `--json` is not grouped: one object per finding.
//!
//! An incident opens at a socket's first finding (by `sock_id`); later findings of that
//! socket join it. It is complete, and printed, at the first of:
//! - [`SETTLE`] after a closing finding (a reset either way, a kernel timeout, the socket
//!   reaching CLOSE): the socket is gone, nothing more can happen to it;
//! - [`QUIET`] with no new finding of the socket;
//! - [`CAP`] after it opened, however busy the socket;
//! - the table of open incidents is full ([`MAX_OPEN`]): the oldest is printed early.
//!
//! Deadlines count from when findings reach the table (the monotonic clock at arrival),
//! not from their event time: an idle FIN's finding arrives after its 200 ms grace, dated
//! by the FIN. Lines come out when incidents complete, so their TIME (the first step's)
//! is not always in order.
use std::{collections::HashMap, fmt::Write as _, time::Duration};

use super::{Report, cli::format_ms};
use crate::{bounds::nanos, detect::Kind};

/// How long an incident waits for its socket's next finding. The steps of one incident
/// follow each other within the application's reaction and a round trip: the write 300 ms
/// after a FIN (past its 200 ms grace), the RST within milliseconds. A second is well past
/// those and still short enough that a lone finding is not news by the time it shows.
pub const QUIET: Duration = Duration::from_secs(1);

/// How long a closed socket's incident waits for the findings of the same moment: a write
/// whose send provoked the RST returns (and is reported) after the RST is, and findings of
/// one moment may leave the resolver out of order. Milliseconds would do on an idle host;
/// 250 ms leaves room for a loaded one.
pub const SETTLE: Duration = Duration::from_millis(250);

/// The longest an incident is held: a socket with findings every half second (state
/// changes with `--all`) still gets a line every 5 s.
pub const CAP: Duration = Duration::from_secs(5);

/// Open incidents at most: a reset storm on 10k sockets must not grow the table without
/// bound. When full, the oldest is printed early (counted in [`Incidents::flushed_early`]).
pub const MAX_OPEN: usize = 1024;

/// Steps kept per incident; findings beyond are counted and said (`… and 3 more`).
pub const MAX_STEPS: usize = 16;

/// One socket's findings, in the order they arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Incident {
    pub reports: Vec<Report>,
    /// Findings past [`MAX_STEPS`].
    pub more: u32,
    opened_ns: u64,
    last_ns: u64,
    /// When a closing finding arrived.
    closed_ns: Option<u64>,
}

impl Incident {
    fn new(report: Report, now_ns: u64) -> Incident {
        let mut incident = Incident {
            reports: Vec::new(),
            more: 0,
            opened_ns: now_ns,
            last_ns: now_ns,
            closed_ns: None,
        };
        incident.join(report, now_ns);
        incident
    }

    fn join(&mut self, report: Report, now_ns: u64) {
        self.last_ns = now_ns;
        if self.closed_ns.is_none() && closes(&report) {
            self.closed_ns = Some(now_ns);
        }
        if self.reports.len() < MAX_STEPS {
            self.reports.push(report);
        } else {
            self.more += 1;
        }
    }

    fn due_ns(&self) -> u64 {
        let after = |ns: u64, d: Duration| ns.saturating_add(nanos(d));
        let wait = match self.closed_ns {
            Some(closed) => after(closed, SETTLE),
            None => after(self.last_ns, QUIET),
        };
        wait.min(after(self.opened_ns, CAP))
    }

    /// The steps in the order they happened: by event time, except that a call into a
    /// socket the peer had closed (`used_after_close`) comes before the reset it
    /// provoked: the call returns, and is stamped, after the RST it drew back.
    pub fn steps(&self) -> Vec<&Report> {
        let mut steps: Vec<&Report> = self.reports.iter().collect();
        steps.sort_by_key(|r| r.mono_ns);
        if let Some(first_close) = steps.iter().position(|r| closes(r)) {
            let (calls, rest): (Vec<&Report>, Vec<&Report>) = steps[first_close..]
                .iter()
                .partition(|r| r.kind == Kind::UsedAfterClose.as_str());
            steps.truncate(first_close);
            steps.extend(calls);
            steps.extend(rest);
        }
        steps
    }

    /// The line's columns come from the first step, the finding that opened the story;
    /// with `--all`, the first that is not a state change (the FIN's CLOSE_WAIT comes
    /// before its `peer_close_idle`, which says more).
    pub fn headline(&self) -> &Report {
        let steps = self.steps();
        steps
            .iter()
            .find(|r| r.kind != Kind::StateChange.as_str())
            .unwrap_or(&steps[0])
    }

    /// DETAIL of an incident of several steps: each step, with the time since the one
    /// before when there was any, e.g. `peer FIN after 2.0s idle → app wrote 300ms later
    /// (send accepted) → peer RST`.
    pub fn sequence(&self) -> String {
        let mut text = String::new();
        let mut previous: Option<u64> = None;
        for report in self.steps() {
            // A call says itself how long after the peer's FIN or RST it came (the step
            // before it); its stamp is when it returned.
            let since_end = report.since_close_ms.or(report.since_reset_ms);
            let gap = match (previous, since_end) {
                (None, _) => 0,
                (Some(_), Some(ms)) => u64::from(ms),
                (Some(at), None) => report.mono_ns.saturating_sub(at) / 1_000_000,
            };
            if previous.is_some() {
                text.push_str(" → ");
            }
            text.push_str(&step(report, gap));
            previous = Some(previous.map_or(report.mono_ns, |at| at.max(report.mono_ns)));
        }
        if self.more > 0 {
            let _ = write!(text, " … and {} more", self.more);
        }
        text
    }
}

/// The kinds about one socket; the pool's are about many and are never grouped.
fn groupable(report: &Report) -> bool {
    !report.sock_id.is_empty()
        && report.kind != Kind::PoolExhausted.as_str()
        && report.kind != Kind::PoolRecovered.as_str()
}

/// The socket is gone after this finding.
fn closes(report: &Report) -> bool {
    [
        Kind::PeerReset,
        Kind::PeerResetIdle,
        Kind::LocalReset,
        Kind::SilentDeath,
    ]
    .iter()
    .any(|k| k.as_str() == report.kind)
        || report.new_state == Some("CLOSE")
}

/// An RST the kernel sent from a TIME_WAIT socket: its answer to a late segment of a
/// connection already ending, whose own findings tell the story. Its socket is the
/// TIME_WAIT one (its own `sock_id`), and on one host the connection's other end (the
/// addresses reversed): it joins the incident of either end.
fn timewait_reset(report: &Report) -> bool {
    report.kind == Kind::LocalReset.as_str() && report.cause.as_deref() == Some("timewait_socket")
}

/// One step of a sequence; `gap_ms` since the step before.
fn step(report: &Report, gap_ms: u64) -> String {
    let later = if gap_ms > 0 {
        format!(" {} later", format_ms(gap_ms))
    } else {
        String::new()
    };
    let idle = report
        .idle_ms
        .filter(|&ms| ms > 0)
        .map_or_else(String::new, |ms| format!(" after {} idle", format_ms(ms)));
    match <Kind as clap::ValueEnum>::from_str(report.kind, false).ok() {
        Some(Kind::PeerCloseIdle) => format!("peer FIN{idle}{later}"),
        Some(Kind::PeerResetIdle) => format!("peer RST{idle}{later}"),
        Some(Kind::PeerReset) => format!("peer RST{later}"),
        Some(Kind::LocalReset) => format!(
            "RST sent{later} ({})",
            report.cause.as_deref().unwrap_or("unknown")
        ),
        Some(Kind::UsedAfterClose | Kind::UsedAfterReset) => {
            let (verb, op) = match report.op {
                Some("recv") => ("read", "recv"),
                _ => ("wrote", "send"),
            };
            let outcome = match report.error {
                Some("none") if op == "send" => "send accepted".to_string(),
                Some("none") => "recv returned data".to_string(),
                Some("EOF") => "read EOF".to_string(),
                Some(error) => format!("{op} → {error}"),
                None => op.to_string(),
            };
            format!("app {verb}{later} ({outcome})")
        }
        // The new state alone: the step before says the old one.
        Some(Kind::StateChange) => format!("{}{later}", report.new_state.unwrap_or("?")),
        _ => format!("{}{later}", report.kind),
    }
}

/// The open incidents, by socket.
#[derive(Debug, Default)]
pub struct Incidents {
    open: HashMap<String, Incident>,
    /// The earliest deadline of an open incident, or earlier: [`Incidents::due`] costs a
    /// comparison while nothing is due.
    next_due_ns: Option<u64>,
    /// Incidents printed before they were complete because the table was full.
    pub flushed_early: u64,
}

impl Incidents {
    /// Adds a finding that arrived at `now_ns`; returns the incidents to print now: the
    /// finding itself when it is not about one socket, the oldest when the table is full.
    pub fn add(&mut self, report: Report, now_ns: u64) -> Vec<Incident> {
        if !groupable(&report) {
            return vec![Incident::new(report, now_ns)];
        }
        if let Some(incident) = self.open.get_mut(&report.sock_id) {
            incident.join(report, now_ns);
            // A closing finding makes it due sooner.
            let due = incident.due_ns();
            self.next_due_ns = Some(self.next_due_ns.map_or(due, |next| next.min(due)));
            return Vec::new();
        }
        if timewait_reset(&report)
            && self.open.values().any(|i| {
                let first = &i.reports[0];
                (first.local == report.local && first.remote == report.remote)
                    || (first.local == report.remote && first.remote == report.local)
            })
        {
            // Not news: not a step of its own (the JSON has it), and it neither closes
            // the incident nor extends its wait.
            return Vec::new();
        }
        let mut printed = Vec::new();
        if self.open.len() >= MAX_OPEN
            && let Some(oldest) = self
                .open
                .iter()
                .min_by_key(|(_, i)| i.opened_ns)
                .map(|(id, _)| id.clone())
        {
            printed.extend(self.open.remove(&oldest));
            self.flushed_early += 1;
        }
        let incident = Incident::new(report, now_ns);
        let due = incident.due_ns();
        self.next_due_ns = Some(self.next_due_ns.map_or(due, |next| next.min(due)));
        self.open
            .insert(incident.reports[0].sock_id.clone(), incident);
        printed
    }

    /// The incidents complete at `now_ns`, oldest first.
    pub fn due(&mut self, now_ns: u64) -> Vec<Incident> {
        match self.next_due_ns {
            Some(next) if next <= now_ns => {}
            _ => return Vec::new(),
        }
        let done: Vec<String> = self
            .open
            .iter()
            .filter(|(_, i)| i.due_ns() <= now_ns)
            .map(|(id, _)| id.clone())
            .collect();
        let mut printed: Vec<Incident> =
            done.iter().filter_map(|id| self.open.remove(id)).collect();
        printed.sort_by_key(|i| i.opened_ns);
        self.next_due_ns = self.open.values().map(Incident::due_ns).min();
        printed
    }

    /// Every open incident, oldest first: at stop.
    pub fn drain(&mut self) -> Vec<Incident> {
        let mut printed: Vec<Incident> = self.open.drain().map(|(_, i)| i).collect();
        printed.sort_by_key(|i| i.opened_ns);
        self.next_due_ns = None;
        printed
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A finding of `kind` on socket `sock` (client 127.0.0.1:49138 → 127.0.0.1:47004),
    /// stamped at `at_ms`.
    pub(in crate::sinks) fn finding(kind: Kind, sock: &str, at_ms: u64) -> Report {
        let mut report = crate::sinks::cli::tests::report(kind, |_| {});
        (report.op, report.error, report.errno) = (None, None, None);
        (report.since_reset_ms, report.since_close_ms, report.cause) = (None, None, None);
        report.sock_id = sock.into();
        report.mono_ns = at_ms * MS;
        report.local = "127.0.0.1:49138".into();
        report.remote = "127.0.0.1:47004".into();
        report
    }

    /// The FIN → write → RST story of one socket, as the pipeline delivers it: the idle
    /// FIN after its 200 ms grace (dated by the FIN), the RST the write drew back, then
    /// the write (its send returns after the RST was handled), and the peer's TIME_WAIT
    /// RST, from the other end of the connection.
    pub(in crate::sinks) fn fin_write_rst(sock: &str) -> [(Report, u64); 4] {
        let mut fin = finding(Kind::PeerCloseIdle, sock, 0);
        (fin.idle_ms, fin.state) = (Some(2000), "ESTABLISHED");
        let mut timewait = finding(Kind::LocalReset, "the peer's TIME_WAIT socket", 300);
        (timewait.local, timewait.remote) = (fin.remote.clone(), fin.local.clone());
        timewait.cause = Some("timewait_socket".into());
        let mut rst = finding(Kind::PeerReset, sock, 300);
        (rst.idle_ms, rst.cause) = (Some(0), Some("reset_during_close".into()));
        let mut write = finding(Kind::UsedAfterClose, sock, 301);
        (write.op, write.error, write.since_close_ms) = (Some("send"), Some("none"), Some(300));
        [(fin, 200), (timewait, 300), (rst, 300), (write, 301)]
    }

    /// The one incident printed.
    fn one(mut printed: Vec<Incident>) -> Incident {
        assert_eq!(printed.len(), 1, "{printed:#?}");
        printed.remove(0)
    }

    fn add_all(incidents: &mut Incidents, findings: impl IntoIterator<Item = (Report, u64)>) {
        for (report, at_ms) in findings {
            assert_eq!(
                incidents.add(report, at_ms * MS),
                vec![],
                "nothing printed yet"
            );
        }
    }

    #[test]
    fn fin_write_rst_is_one_incident_with_the_sequence() {
        let mut incidents = Incidents::default();
        add_all(&mut incidents, fin_write_rst("a"));
        assert_eq!(incidents.due(300 * MS + nanos(SETTLE) - 1), vec![]);
        let incident = one(incidents.due(301 * MS + nanos(SETTLE)));
        assert_eq!(incident.headline().kind, "peer_close_idle");
        assert_eq!(
            incident.reports.len(),
            3,
            "the TIME_WAIT reset joined, not a step"
        );
        assert_eq!(
            incident.sequence(),
            "peer FIN after 2.0s idle → app wrote 300ms later (send accepted) → peer RST"
        );
        assert!(incidents.is_empty());
    }

    #[test]
    fn a_lone_finding_is_an_incident_of_one() {
        let mut incidents = Incidents::default();
        let fin = finding(Kind::PeerCloseIdle, "a", 0);
        add_all(&mut incidents, [(fin.clone(), 200)]);
        let incident = one(incidents.due(200 * MS + nanos(QUIET)));
        assert_eq!(incident.reports, vec![fin]);
    }

    #[test]
    fn interleaved_sockets_are_two_incidents() {
        let mut incidents = Incidents::default();
        let [a, b] = [fin_write_rst("a"), fin_write_rst("b")];
        // a's steps at their times, b's 10 ms later, interleaved.
        let b = b.map(|(mut report, at)| {
            report.mono_ns += 10 * MS;
            (report, at + 10)
        });
        add_all(
            &mut incidents,
            a.into_iter().zip(b).flat_map(|(a, b)| [a, b]),
        );
        let printed = incidents.due(10 * 1000 * MS);
        assert_eq!(printed.len(), 2, "{printed:#?}");
        for (incident, sock) in printed.iter().zip(["a", "b"]) {
            assert_eq!(incident.headline().sock_id, sock);
            assert_eq!(incident.reports.len(), 3);
            assert!(incident.reports.iter().all(|r| r.sock_id == sock));
        }
    }

    #[test]
    fn a_quiet_socket_is_printed_after_the_quiet_window() {
        let mut incidents = Incidents::default();
        let quiet = nanos(QUIET);
        let mut fin = finding(Kind::PeerCloseIdle, "a", 0);
        fin.idle_ms = Some(1500);
        add_all(&mut incidents, [(fin, 200)]);
        assert_eq!(incidents.due(200 * MS + quiet - 1), vec![]);
        // A later finding of the socket restarts the window.
        add_all(
            &mut incidents,
            [(finding(Kind::CloseWaitLingering, "a", 900), 900)],
        );
        assert_eq!(incidents.due(900 * MS + quiet - 1), vec![]);
        assert_eq!(
            one(incidents.due(900 * MS + quiet)).sequence(),
            "peer FIN after 1.5s idle → close_wait_lingering 900ms later"
        );
    }

    #[test]
    fn a_busy_socket_is_printed_at_the_cap() {
        let mut incidents = Incidents::default();
        let cap_ms = u64::try_from(CAP.as_millis()).unwrap();
        let mut at = 0;
        while at < cap_ms {
            let mut change = finding(Kind::StateChange, "a", at);
            (change.old_state, change.new_state) = (Some("ESTABLISHED"), Some("FIN_WAIT1"));
            add_all(&mut incidents, [(change, at)]);
            assert_eq!(incidents.due(at * MS), vec![], "held at {at} ms");
            at += 900;
        }
        let incident = one(incidents.due(cap_ms * MS));
        assert_eq!(incident.reports.len(), 6);
        assert!(
            incident
                .sequence()
                .starts_with("FIN_WAIT1 → FIN_WAIT1 900ms later → "),
            "{}",
            incident.sequence()
        );
    }

    #[test]
    fn a_full_table_prints_its_oldest() {
        let mut incidents = Incidents::default();
        for i in 0..MAX_OPEN as u64 {
            add_all(
                &mut incidents,
                [(finding(Kind::PeerCloseIdle, &format!("s{i}"), i), i)],
            );
        }
        let printed = one(incidents.add(finding(Kind::PeerCloseIdle, "new", 5000), 5000 * MS));
        assert_eq!(printed.headline().sock_id, "s0");
        assert_eq!(incidents.flushed_early, 1);
        assert_eq!(incidents.drain().len(), MAX_OPEN, "nothing dropped");
    }

    #[test]
    fn a_timewait_reset_joins_the_incident_of_either_end() {
        let mut incidents = Incidents::default();
        let [fin, timewait, ..] = fin_write_rst("a");
        add_all(&mut incidents, [fin, timewait.clone()]);
        let mut same_end = timewait.0.clone();
        (same_end.local, same_end.remote) = (timewait.0.remote.clone(), timewait.0.local.clone());
        add_all(&mut incidents, [(same_end, 400)]);
        assert_eq!(one(incidents.drain()).reports.len(), 1, "the FIN alone");
        // With no incident to join, it is a line of its own.
        add_all(&mut incidents, [timewait]);
        one(incidents.drain());
    }

    #[test]
    fn a_reset_comes_before_the_write_it_failed() {
        let mut incidents = Incidents::default();
        let mut rst = finding(Kind::PeerResetIdle, "a", 0);
        rst.idle_ms = Some(30_000);
        let mut write = finding(Kind::UsedAfterReset, "a", 120);
        (write.op, write.error) = (Some("send"), Some("ECONNRESET"));
        add_all(&mut incidents, [(rst, 0), (write, 120)]);
        let incident = one(incidents.due(120 * MS + nanos(SETTLE)));
        assert_eq!(incident.headline().kind, "peer_reset_idle");
        assert_eq!(
            incident.sequence(),
            "peer RST after 30.0s idle → app wrote 120ms later (send → ECONNRESET)"
        );
    }

    #[test]
    fn a_state_change_is_no_headline() {
        let mut incidents = Incidents::default();
        let mut change = finding(Kind::StateChange, "a", 0);
        (change.old_state, change.new_state) = (Some("ESTABLISHED"), Some("CLOSE_WAIT"));
        let mut fin = finding(Kind::PeerCloseIdle, "a", 0);
        fin.idle_ms = Some(2000);
        add_all(&mut incidents, [(change, 0), (fin, 200)]);
        let incident = one(incidents.drain());
        assert_eq!(incident.headline().kind, "peer_close_idle");
        assert_eq!(incident.sequence(), "CLOSE_WAIT → peer FIN after 2.0s idle");
    }

    #[test]
    fn a_pool_finding_is_printed_at_once() {
        let mut incidents = Incidents::default();
        one(incidents.add(finding(Kind::PoolExhausted, "a", 0), 0));
        assert!(incidents.is_empty());
    }
}
