//! Resets, in and out. The kernel half (`monitor-ebpf/src/reset.rs`) measures how long the
//! socket had been idle; here that becomes "the pool handed out a connection the peer had
//! already given up on" (`peer_reset_idle`) or an ordinary reset.
//!
//! An idle reset waits out [`HANDLED_GRACE`](super::grace::HANDLED_GRACE), like the FIN in
//! `close.rs`: the application closing the socket within it (the kernel's destroy event)
//! handled it, counted only; a write into it confirms it at once; still held at the end of
//! the grace, it is reported, dated by the RST.
use std::time::Duration;

use super::{Finding, Kind, grace::Grace};
use std::collections::HashMap;

use crate::events::{Event, Hook, IoOp, TcpState};

pub struct ResetDetector {
    idle_threshold_ms: u64,
    /// Idle resets within their grace.
    pending: Grace,
    /// Idle resets the application closed within the grace: healthy, counted only.
    pub handled: u64,
}

impl ResetDetector {
    pub fn new(idle_threshold: Duration, max: usize) -> ResetDetector {
        ResetDetector {
            idle_threshold_ms: crate::bounds::millis(idle_threshold),
            pending: Grace::new(max),
            handled: 0,
        }
    }

    pub fn classify(&self, event: &Event) -> Option<Kind> {
        match event.hook {
            Hook::ReceiveReset => Some(match event.idle_ms() {
                Some(idle) if idle >= self.idle_threshold_ms => Kind::PeerResetIdle,
                _ => Kind::PeerReset,
            }),
            Hook::SendReset => Some(Kind::LocalReset),
            Hook::StateChange | Hook::UsedAfterPeerEnd | Hook::Destroy | Hook::Snapshot => None,
        }
    }

    /// Reports a reset finding: an idle reset after its grace, the others at once.
    pub fn report(&mut self, finding: Finding, findings: &mut Vec<Finding>) {
        if finding.kind == Kind::PeerResetIdle {
            self.pending.hold(finding, findings);
        } else {
            findings.push(finding);
        }
    }

    /// Settles an idle reset within its grace: the socket's destroy makes it handled (unless
    /// it is an older life's at a reused address); the application's first write confirms
    /// it at once, pushed ahead of the write's own finding. A read does not: a reader woken
    /// by the RST, or a pool checking its connections, is how a healthy client finds out;
    /// whether it then closes the socket decides.
    pub fn observe(&mut self, event: &Event, findings: &mut Vec<Finding>) {
        let skaddr = event.socket.skaddr;
        match event.hook {
            Hook::UsedAfterPeerEnd if event.io.is_some_and(|io| io.op == IoOp::Send) => {
                findings.extend(self.pending.take(skaddr));
            }
            Hook::Destroy => {
                let same_life = |held: &Finding| {
                    let (held, destroyed) = (held.event.socket.born_ns, event.socket.born_ns);
                    held == 0 || destroyed == 0 || held == destroyed
                };
                if self.pending.take_if(skaddr, same_life).is_some() {
                    self.handled += 1;
                }
            }
            _ => {}
        }
    }

    /// Idle resets whose grace ended with the socket still held: findings now.
    pub fn due(&mut self, mono_now_ns: u64, findings: &mut Vec<Finding>) {
        self.pending.due(mono_now_ns, findings);
    }
}

/// Why an RST was sent or received, as the on-call engineer would say it.
///
/// Sent: from the kernel's own `sk_rst_reason` (Linux 6.10+; names read from BTF, since the
/// values differ between kernels), with `sk_err` telling `ss -K` (ECONNABORTED, set before
/// the RST) from an SO_LINGER 0 close; older kernels fall back to the socket's state.
/// Received: from the state the socket was in.
pub fn cause<S: std::hash::BuildHasher>(
    event: &Event,
    reasons: &HashMap<u32, String, S>,
) -> String {
    match event.hook {
        Hook::SendReset => sent_cause(event, reasons),
        Hook::ReceiveReset => received_cause(event.old_state).to_string(),
        _ => "unknown".to_string(),
    }
}

fn sent_cause<S: std::hash::BuildHasher>(
    event: &Event,
    reasons: &HashMap<u32, String, S>,
) -> String {
    let reason = reasons
        .get(&u32::from(event.rst_reason))
        .map(|name| name.trim_start_matches("SK_RST_REASON_"));
    match reason {
        Some("NO_SOCKET") => "no_socket".into(),
        Some("TCP_ABORT_ON_CLOSE") => "unread_data_on_close".into(),
        Some("TCP_ABORT_ON_DATA") => "data_after_close".into(),
        Some("TCP_ABORT_ON_LINGER") => "linger_timeout".into(),
        Some("TCP_ABORT_ON_MEMORY") => "out_of_memory".into(),
        Some("TCP_KEEPALIVE_TIMEOUT") => "keepalive_timeout".into(),
        Some("TCP_TIMEWAIT_SOCKET") => "timewait_socket".into(),
        Some("TCP_STATE" | "NOT_SPECIFIED") => abort_cause(event).into(),
        Some(other) => other.to_ascii_lowercase(),
        None if reasons.is_empty() => socket_cause(event).into(),
        None => abort_cause(event).into(),
    }
}

/// Before Linux 6.10 `tcp_send_reset` gives no reason: the socket tells what it can.
/// - A live socket: destroyed from outside (`ss -K`), or aborted by a timer (keepalive,
///   FIN_WAIT2 linger, out of memory). Only ECONNABORTED, which `tcp_abort` sets before its
///   RST on some of these kernels (5.10, not 6.1), tells them apart; without it the cause
///   stays `live_abort`.
/// - A close that aborts (SO_LINGER 0) and a close with unread data both move the socket
///   to CLOSE before the RST; the linger flag tells them apart. `tcp_reset` after data
///   arrived past shutdown sets ECONNRESET before the RST leaves.
fn socket_cause(event: &Event) -> &'static str {
    if event.old_state == TcpState::TIME_WAIT {
        return "timewait_socket";
    }
    if event.socket.skaddr == 0 || !event.full_socket {
        return abort_cause(event);
    }
    if event.old_state != TcpState::CLOSE {
        return if event.sk_err == libc::ECONNABORTED {
            "socket_destroyed"
        } else {
            "live_abort"
        };
    }
    if event.linger_zero {
        "linger_zero_abort"
    } else if event.sk_err == libc::ECONNRESET {
        "data_after_close"
    } else if event.sk_err == 0 {
        "unread_data_on_close"
    } else {
        abort_cause(event)
    }
}

/// An RST from a socket aborted in place: destroyed by `ss -K`/sock_destroy, or closed
/// with SO_LINGER 0; with no socket at all, a stray segment.
///
/// `tcp_disconnect` (SO_LINGER 0 close, `connect(AF_UNSPEC)`) moves the socket to CLOSE
/// before it sends the RST; `tcp_abort` (sock_destroy) sends it from the live state, and
/// sets ECONNABORTED before it on older kernels, after it since 6.x.
fn abort_cause(event: &Event) -> &'static str {
    if event.socket.skaddr == 0 {
        "no_socket"
    } else if event.sk_err == libc::ECONNABORTED
        || (event.full_socket && event.old_state != TcpState::CLOSE)
    {
        "socket_destroyed"
    } else if event.full_socket {
        "linger_zero_abort"
    } else {
        "unspecified"
    }
}

fn received_cause(state: TcpState) -> &'static str {
    use monitor_common::tcp_state::{
        CLOSE_WAIT, CLOSING, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, LAST_ACK, SYN_RECV, SYN_SENT,
    };
    match state.0 {
        SYN_SENT => "connection_refused",
        SYN_RECV => "reset_during_handshake",
        ESTABLISHED => "reset_while_established",
        FIN_WAIT1 | FIN_WAIT2 | CLOSING | LAST_ACK | CLOSE_WAIT => "reset_during_close",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{from_raw, tests::raw_reset};
    use monitor_common::hook;

    fn detector() -> ResetDetector {
        ResetDetector::new(Duration::from_secs(1), 1000)
    }

    #[test]
    fn idle_reset_needs_threshold() {
        let idle = from_raw(&raw_reset(1000)).unwrap();
        assert_eq!(detector().classify(&idle), Some(Kind::PeerResetIdle));
        let busy = from_raw(&raw_reset(999)).unwrap();
        assert_eq!(detector().classify(&busy), Some(Kind::PeerReset));
    }

    #[test]
    fn unknown_idle_is_plain_reset() {
        let mut raw = raw_reset(5000);
        raw.flags &= !monitor_common::flags::IDLE_KNOWN;
        assert_eq!(
            detector().classify(&from_raw(&raw).unwrap()),
            Some(Kind::PeerReset)
        );
    }

    #[test]
    fn causes() {
        use monitor_common::tcp_state::{
            CLOSE, CLOSE_WAIT, ESTABLISHED, ESTABLISHED as LIVE, SYN_SENT,
        };
        let reasons: HashMap<u32, String> = [
            (1, "SK_RST_REASON_NO_SOCKET"),
            (9, "SK_RST_REASON_TCP_ABORT_ON_CLOSE"),
            (12, "SK_RST_REASON_TCP_STATE"),
            (7, "SK_RST_REASON_TCP_ABORT_ON_DATA"),
            (20, "SK_RST_REASON_TCP_INVALID_SYN"),
        ]
        .into_iter()
        .map(|(v, n)| (v, n.to_string()))
        .collect();
        let sent = |reason: u16, sk_err: i32, skaddr: u64| {
            let mut raw = raw_reset(0);
            raw.hook = hook::SEND_RESET;
            raw.reason = reason;
            raw.sk_err = sk_err;
            raw.skaddr = skaddr;
            cause(&from_raw(&raw).unwrap(), &reasons)
        };
        assert_eq!(sent(1, 0, 0), "no_socket");
        assert_eq!(sent(9, 0, 1), "unread_data_on_close");
        assert_eq!(sent(7, 0, 1), "data_after_close");
        // raw_reset is ESTABLISHED: a TCP_STATE abort from a live state is sock_destroy.
        assert_eq!(sent(12, 0, 1), "socket_destroyed");
        assert_eq!(sent(12, libc::ECONNABORTED, 1), "socket_destroyed");
        let closed = {
            let mut raw = raw_reset(0);
            raw.hook = hook::SEND_RESET;
            raw.reason = 12;
            raw.old_state = CLOSE;
            cause(&from_raw(&raw).unwrap(), &reasons)
        };
        assert_eq!(closed, "linger_zero_abort");
        assert_eq!(sent(20, 0, 1), "tcp_invalid_syn");
        // A kernel without reasons: the socket tells.
        assert_eq!(
            cause(
                &from_raw(&{
                    let mut r = raw_reset(0);
                    r.hook = hook::SEND_RESET;
                    r.skaddr = 0;
                    r
                })
                .unwrap(),
                &HashMap::new()
            ),
            "no_socket"
        );
        let from_socket = |state: u8, sk_err: i32, linger_zero: bool| {
            let mut raw = raw_reset(0);
            raw.hook = hook::SEND_RESET;
            raw.old_state = state;
            raw.sk_err = sk_err;
            if linger_zero {
                raw.flags |= monitor_common::flags::LINGER_ZERO;
            }
            cause(&from_raw(&raw).unwrap(), &HashMap::new())
        };
        assert_eq!(from_socket(CLOSE, 0, true), "linger_zero_abort");
        assert_eq!(from_socket(CLOSE, 0, false), "unread_data_on_close");
        assert_eq!(
            from_socket(CLOSE, libc::ECONNRESET, false),
            "data_after_close"
        );
        assert_eq!(
            from_socket(LIVE, libc::ECONNABORTED, false),
            "socket_destroyed"
        );
        assert_eq!(from_socket(LIVE, 0, false), "live_abort");
        let received = |state: u8| {
            let mut raw = raw_reset(0);
            raw.old_state = state;
            cause(&from_raw(&raw).unwrap(), &reasons)
        };
        assert_eq!(received(SYN_SENT), "connection_refused");
        assert_eq!(received(ESTABLISHED), "reset_while_established");
        assert_eq!(received(CLOSE_WAIT), "reset_during_close");
    }

    /// An idle reset at `at_ns`, through the detector as `Detectors::inspect` runs it.
    fn idle_reset(reset: &mut ResetDetector, at_ns: u64, born_ns: u64) -> Vec<Finding> {
        let mut raw = raw_reset(5000);
        raw.ts_ns = at_ns;
        raw.born_ns = born_ns;
        let event = from_raw(&raw).unwrap();
        let mut findings = Vec::new();
        let kind = reset.classify(&event).unwrap();
        reset.report(Finding::new(kind, &event, None), &mut findings);
        reset.observe(&event, &mut findings);
        findings
    }

    /// The kernel freeing the socket of `raw_reset`'s address (one life of it).
    fn destroyed(at_ns: u64, born_ns: u64) -> Event {
        let mut raw = raw_reset(0);
        raw.hook = hook::DESTROY;
        raw.flags = monitor_common::flags::OWNER_KNOWN;
        raw.old_state = monitor_common::tcp_state::CLOSE;
        raw.peer_end = monitor_common::peer_end::RESET;
        raw.ts_ns = at_ns;
        raw.born_ns = born_ns;
        from_raw(&raw).unwrap()
    }

    #[expect(
        clippy::cast_possible_truncation,
        reason = "the grace is 200 ms; a const cannot call u64::try_from"
    )]
    const GRACE_NS: u64 = super::super::grace::HANDLED_GRACE.as_nanos() as u64;

    #[test]
    fn an_idle_reset_closed_within_the_grace_is_handled_not_reported() {
        let mut reset = detector();
        assert!(idle_reset(&mut reset, 1_000, 500).is_empty(), "held");
        let mut findings = Vec::new();
        reset.observe(&destroyed(3_000_000, 500), &mut findings);
        reset.due(u64::MAX, &mut findings);
        assert!(findings.is_empty(), "{findings:?}");
        assert_eq!(reset.handled, 1);
        // A busy socket's reset is not held: reported at once, as before.
        let mut raw = raw_reset(10);
        raw.ts_ns = 5_000_000;
        let busy = from_raw(&raw).unwrap();
        reset.report(Finding::new(Kind::PeerReset, &busy, None), &mut findings);
        assert_eq!(findings.len(), 1);
        reset.observe(&destroyed(6_000_000, 500), &mut findings);
        assert_eq!((findings.len(), reset.handled), (1, 1), "nothing held");
    }

    #[test]
    fn an_idle_reset_still_held_after_the_grace_is_reported_once_dated_by_the_rst() {
        let mut reset = detector();
        assert!(idle_reset(&mut reset, 1_000, 500).is_empty());
        let mut findings = Vec::new();
        reset.due(1_000 + GRACE_NS - 1, &mut findings);
        assert!(findings.is_empty(), "within the grace");
        reset.due(1_000 + GRACE_NS, &mut findings);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].kind, Kind::PeerResetIdle);
        assert_eq!(findings[0].mono_ns, 1_000, "dated by the RST");
        // The destroy after the grace, and later deadlines: nothing more.
        reset.observe(&destroyed(1_000 + 2 * GRACE_NS, 500), &mut findings);
        reset.due(u64::MAX, &mut findings);
        assert_eq!((findings.len(), reset.handled), (1, 0));
    }

    #[test]
    fn a_write_within_the_grace_confirms_the_reset_at_once_a_read_does_not() {
        let mut reset = detector();
        assert!(idle_reset(&mut reset, 1_000, 500).is_empty());
        let mut findings = Vec::new();
        // A reader woken by the RST (ECONNRESET from recv): the client found out.
        let mut read = crate::events::tests::raw_send_after_reset();
        read.io = monitor_common::io::RECV;
        read.ts_ns = 2_000_000;
        reset.observe(&from_raw(&read).unwrap(), &mut findings);
        assert!(findings.is_empty(), "a read does not confirm");
        let mut write = crate::events::tests::raw_send_after_reset();
        write.ts_ns = 3_000_000;
        reset.observe(&from_raw(&write).unwrap(), &mut findings);
        assert_eq!(
            findings.iter().map(|f| f.kind).collect::<Vec<_>>(),
            [Kind::PeerResetIdle]
        );
        assert_eq!(findings[0].mono_ns, 1_000, "dated by the RST");
        reset.observe(&destroyed(4_000_000, 500), &mut findings);
        reset.due(u64::MAX, &mut findings);
        assert_eq!((findings.len(), reset.handled), (1, 0), "once, not handled");
    }

    #[test]
    fn an_older_lifes_destroy_does_not_cancel_a_new_one() {
        let mut reset = detector();
        // The address now holds a socket born at 900; a late destroy of the one born at 500.
        assert!(idle_reset(&mut reset, 1_000, 900).is_empty());
        let mut findings = Vec::new();
        reset.observe(&destroyed(2_000, 500), &mut findings);
        assert_eq!(reset.handled, 0);
        reset.due(1_000 + GRACE_NS, &mut findings);
        assert_eq!(findings.len(), 1, "still held: reported");
        assert_eq!(findings[0].event.socket.born_ns, 900);
        // Without a birth time on either side (a socket from before connwatch), the
        // address decides.
        assert!(idle_reset(&mut reset, 10_000, 0).is_empty());
        reset.observe(&destroyed(20_000, 0), &mut findings);
        assert_eq!(reset.handled, 1);
    }

    #[test]
    fn sent_resets_and_state_changes() {
        let mut raw = raw_reset(5000);
        raw.hook = hook::SEND_RESET;
        assert_eq!(
            detector().classify(&from_raw(&raw).unwrap()),
            Some(Kind::LocalReset)
        );
        raw.hook = hook::STATE_CHANGE;
        assert_eq!(detector().classify(&from_raw(&raw).unwrap()), None);
        raw.hook = hook::DESTROY;
        assert_eq!(detector().classify(&from_raw(&raw).unwrap()), None);
    }
}
