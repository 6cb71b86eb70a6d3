//! The peer's FIN, and what the application does (or fails to do) after it.
//!
//! `peer_close_idle`: a proxy or server closed a connection the pool had left idle, and the
//! application still holds it [`HANDLED_GRACE`](super::grace::HANDLED_GRACE) later (or
//! writes into it sooner); the next query will read EOF. A client that closes its end within the grace handled the FIN: it
//! is counted, not reported. `close_wait_lingering`: the application never closed its end
//! after the peer's FIN, the leak that piles up CLOSE_WAIT behind proxies.
use std::time::Duration;

use super::{Finding, Kind, grace::Grace};
use crate::{
    FastMap, FastSet,
    bounds::{make_room, millis, nanos},
    events::{Event, Hook, Task, TcpState},
    sockets::diag::DiagSocket,
};

/// A CLOSE_WAIT socket known only from the socket list: it entered the state before
/// connwatch started (or while its event was lost), so its age counts from the first
/// listing and is a lower bound.
struct Listed {
    first_listed_ns: u64,
    reported: bool,
}

struct Waiting {
    entered: Event,
    owner: Option<Task>,
    reported: bool,
}

pub struct CloseDetector {
    idle_threshold_ms: u64,
    close_wait_threshold_ns: u64,
    /// Sockets now in CLOSE_WAIT, by kernel address.
    waiting: FastMap<u64, Waiting>,
    /// Sockets in CLOSE_WAIT in the last socket list that no event told of, by cookie.
    listed: FastMap<u64, Listed>,
    /// Idle FINs within their grace.
    pending: Grace,
    /// Idle FINs the application handled within the grace: healthy, counted only.
    pub handled: u64,
    max: usize,
    /// CLOSE_WAIT sockets forgotten to stay within `max` (reported ones first).
    pub evictions: u64,
}

impl CloseDetector {
    pub fn new(
        idle_threshold: Duration,
        close_wait_threshold: Duration,
        max: usize,
    ) -> CloseDetector {
        CloseDetector {
            idle_threshold_ms: millis(idle_threshold),
            close_wait_threshold_ns: nanos(close_wait_threshold),
            waiting: FastMap::default(),
            listed: FastMap::default(),
            pending: Grace::new(max),
            handled: 0,
            max,
            evictions: 0,
        }
    }

    /// Tracks CLOSE_WAIT entries and exits. An idle socket's FIN waits out the grace; the
    /// application's first call into the socket confirms it at once (pushed to `findings`
    /// before that call's own finding), its close within the grace makes it handled.
    pub fn observe(&mut self, event: &Event, owner: Option<&Task>, findings: &mut Vec<Finding>) {
        let skaddr = event.socket.skaddr;
        match event.hook {
            Hook::UsedAfterPeerEnd => {
                findings.extend(self.pending.take(skaddr));
                return;
            }
            Hook::StateChange => {}
            _ => return,
        }
        if event.new_state != TcpState::CLOSE_WAIT {
            if event.old_state == TcpState::CLOSE_WAIT
                && let Some(pending) = self.pending.take(skaddr)
            {
                if event.new_state == TcpState::LAST_ACK {
                    // The application's close() sent its FIN: handled.
                    self.handled += 1;
                } else {
                    // Straight to CLOSE: the peer reset it, because the application wrote
                    // into it (on loopback the RST is in before the send returns), or an
                    // abort. Either way it was still held: confirmed now.
                    findings.push(pending);
                }
            }
            self.waiting.remove(&skaddr);
            return;
        }
        if !self.waiting.contains_key(&skaddr) {
            self.evictions += make_room(&mut self.waiting, self.max, |w| w.reported);
        }
        self.waiting.insert(
            skaddr,
            Waiting {
                entered: event.clone(),
                owner: owner.cloned(),
                reported: false,
            },
        );
        let idle = event.idle_ms().unwrap_or(0);
        if event.old_state != TcpState::ESTABLISHED || idle < self.idle_threshold_ms {
            return;
        }
        self.pending
            .hold(Finding::new(Kind::PeerCloseIdle, event, owner), findings);
    }

    /// Idle FINs whose grace ended with the socket still held: findings now.
    pub fn due(&mut self, mono_now_ns: u64, findings: &mut Vec<Finding>) {
        self.pending.due(mono_now_ns, findings);
    }

    /// Folds in a socket list: CLOSE_WAIT sockets no event told of are followed from their
    /// first listing. Returns, once each, those listed for the threshold by now, with
    /// that time (their age in CLOSE_WAIT is at least that).
    pub fn listed<'a>(
        &mut self,
        sockets: &'a [DiagSocket],
        mono_now_ns: u64,
    ) -> Vec<(&'a DiagSocket, u64)> {
        let from_events: FastSet<u64> = self.waiting.values().map(|w| w.entered.cookie).collect();
        let mut still = FastMap::default();
        let mut due = Vec::new();
        for socket in sockets {
            // Without a cookie a socket cannot be followed from one list to the next; one
            // an event told of is timed by it.
            if socket.state != TcpState::CLOSE_WAIT
                || socket.cookie == 0
                || from_events.contains(&socket.cookie)
            {
                continue;
            }
            if still.len() >= self.max {
                self.evictions += 1;
                continue;
            }
            let mut listed = self.listed.remove(&socket.cookie).unwrap_or(Listed {
                first_listed_ns: mono_now_ns,
                reported: false,
            });
            let age_ns = mono_now_ns.saturating_sub(listed.first_listed_ns);
            if !listed.reported && age_ns >= self.close_wait_threshold_ns {
                listed.reported = true;
                due.push((socket, age_ns / 1_000_000));
            }
            still.insert(socket.cookie, listed);
        }
        // Those no longer listed in CLOSE_WAIT were closed (or left the state).
        self.listed = still;
        due
    }

    /// Reports, once each, sockets in CLOSE_WAIT longer than the threshold.
    pub fn tick(&mut self, mono_now_ns: u64, findings: &mut Vec<Finding>) {
        for waiting in self.waiting.values_mut() {
            let age_ns = mono_now_ns.saturating_sub(waiting.entered.mono_ns);
            if waiting.reported || age_ns < self.close_wait_threshold_ns {
                continue;
            }
            waiting.reported = true;
            let mut finding = Finding::new(
                Kind::CloseWaitLingering,
                &waiting.entered,
                waiting.owner.as_ref(),
            );
            finding.mono_ns = mono_now_ns;
            finding.age_ms = Some(age_ns / 1_000_000);
            findings.push(finding);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        detect::grace::HANDLED_GRACE,
        events::{from_raw, tests::raw_reset},
    };
    use monitor_common::{hook, tcp_state};

    fn transition(old: u8, new: u8, idle_ms: u32, at_ns: u64) -> Event {
        let mut raw = raw_reset(idle_ms);
        raw.hook = hook::STATE_CHANGE;
        raw.old_state = old;
        raw.new_state = new;
        raw.ts_ns = at_ns;
        from_raw(&raw).unwrap()
    }

    fn detector() -> CloseDetector {
        CloseDetector::new(Duration::from_secs(1), Duration::from_secs(30), 1000)
    }

    /// The address of the socket `transition` makes (raw_reset's).
    fn fin_at(idle_ms: u32, at_ns: u64) -> Event {
        transition(
            tcp_state::ESTABLISHED,
            tcp_state::CLOSE_WAIT,
            idle_ms,
            at_ns,
        )
    }

    #[test]
    fn an_idle_fin_still_held_after_the_grace_is_flagged() {
        let mut close = detector();
        let mut findings = Vec::new();
        close.observe(&fin_at(1500, 0), None, &mut findings);
        assert!(findings.is_empty(), "within the grace");
        close.due(nanos(HANDLED_GRACE) - 1, &mut findings);
        assert!(findings.is_empty());
        close.due(nanos(HANDLED_GRACE), &mut findings);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].kind, Kind::PeerCloseIdle);
        assert_eq!(findings[0].mono_ns, 0, "dated by the FIN");
        close.due(u64::MAX, &mut findings);
        assert_eq!(findings.len(), 1, "once");
        // A busy socket's FIN, or another transition: never.
        close.observe(&fin_at(10, 0), None, &mut findings);
        let other = transition(tcp_state::FIN_WAIT1, tcp_state::CLOSING, 5000, 0);
        close.observe(&other, None, &mut findings);
        close.due(u64::MAX, &mut findings);
        assert_eq!(findings.len(), 1);
        assert_eq!(close.handled, 0);
    }

    #[test]
    fn an_idle_fin_closed_within_the_grace_is_handled_not_flagged() {
        let mut close = detector();
        let mut findings = Vec::new();
        close.observe(&fin_at(1500, 0), None, &mut findings);
        let closed = transition(tcp_state::CLOSE_WAIT, tcp_state::LAST_ACK, 0, 3_000_000);
        close.observe(&closed, None, &mut findings);
        close.due(u64::MAX, &mut findings);
        assert!(findings.is_empty(), "{findings:?}");
        assert_eq!(close.handled, 1);
        // Reset while still in CLOSE_WAIT (the peer's answer to a write): still held.
        close.observe(&fin_at(1500, 10_000_000), None, &mut findings);
        let reset = transition(tcp_state::CLOSE_WAIT, tcp_state::CLOSE, 0, 20_000_000);
        close.observe(&reset, None, &mut findings);
        assert_eq!(findings.len(), 1, "confirmed at the reset");
        assert_eq!(close.handled, 1);
    }

    #[test]
    fn a_write_within_the_grace_confirms_the_fin_at_once() {
        let mut close = detector();
        let mut findings = Vec::new();
        close.observe(&fin_at(1500, 0), None, &mut findings);
        let mut raw = crate::events::tests::raw_send_after_reset();
        raw.peer_end = monitor_common::peer_end::FIN;
        raw.skaddr = fin_at(0, 0).socket.skaddr;
        close.observe(&from_raw(&raw).unwrap(), None, &mut findings);
        assert_eq!(
            findings.iter().map(|f| f.kind).collect::<Vec<_>>(),
            [Kind::PeerCloseIdle]
        );
        close.due(u64::MAX, &mut findings);
        assert_eq!(findings.len(), 1, "not again at the deadline");
    }

    #[test]
    fn lingering_is_reported_once_after_threshold() {
        let mut close = detector();
        let s = 1_000_000_000u64;
        close.observe(
            &transition(tcp_state::ESTABLISHED, tcp_state::CLOSE_WAIT, 0, s),
            None,
            &mut Vec::new(),
        );
        let mut findings = Vec::new();
        close.tick(30 * s, &mut findings);
        assert!(findings.is_empty(), "29 s is below the threshold");
        close.tick(31 * s, &mut findings);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].kind, Kind::CloseWaitLingering);
        assert_eq!(findings[0].age_ms, Some(30_000));
        assert_eq!(findings[0].mono_ns, 31 * s);
        close.tick(60 * s, &mut findings);
        assert_eq!(findings.len(), 1, "once per socket");
    }

    fn listed(cookie: u64, state: u8) -> DiagSocket {
        DiagSocket {
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.9:5432".parse().unwrap(),
            state: TcpState(state),
            inode: cookie,
            cookie,
            netns: 0,
            recv_queue: 0,
            last_io: None,
            activity: None,
        }
    }

    #[test]
    fn close_wait_from_before_the_start_is_reported_once_from_its_first_listing() {
        let mut close = detector();
        let s = 1_000_000_000u64;
        let mut list = vec![
            listed(7, tcp_state::CLOSE_WAIT),
            listed(8, tcp_state::ESTABLISHED),
            listed(0, tcp_state::CLOSE_WAIT),
        ];
        assert!(close.listed(&list, 100 * s).is_empty(), "first listing");
        assert!(
            close.listed(&list, 129 * s).is_empty(),
            "29 s is below the threshold"
        );
        let due = close.listed(&list, 131 * s);
        assert_eq!(
            due.iter()
                .map(|(s, age)| (s.cookie, *age))
                .collect::<Vec<_>>(),
            [(7, 31_000)]
        );
        assert!(close.listed(&list, 200 * s).is_empty(), "once per socket");
        // Closed, then a new socket with another cookie: counted from its own listing.
        list[0] = listed(9, tcp_state::CLOSE_WAIT);
        assert!(close.listed(&list, 201 * s).is_empty());
        assert_eq!(close.listed(&list, 231 * s).len(), 1);
        // One an event told of is timed by the event, not listed twice.
        let mut raw = raw_reset(0);
        raw.hook = hook::STATE_CHANGE;
        raw.old_state = tcp_state::ESTABLISHED;
        raw.new_state = tcp_state::CLOSE_WAIT;
        raw.cookie = 10;
        close.observe(&from_raw(&raw).unwrap(), None, &mut Vec::new());
        list.push(listed(10, tcp_state::CLOSE_WAIT));
        close.listed(&list, 300 * s);
        assert!(close.listed(&list, 400 * s).is_empty());
    }

    #[test]
    fn closing_in_time_is_not_lingering() {
        let mut close = detector();
        close.observe(
            &transition(tcp_state::ESTABLISHED, tcp_state::CLOSE_WAIT, 0, 0),
            None,
            &mut Vec::new(),
        );
        close.observe(
            &transition(tcp_state::CLOSE_WAIT, tcp_state::LAST_ACK, 0, 1),
            None,
            &mut Vec::new(),
        );
        let mut findings = Vec::new();
        close.tick(u64::MAX, &mut findings);
        assert!(findings.is_empty());
    }
}
