//! Resets, in and out. The kernel half (`monitor-ebpf/src/reset.rs`) measures how long the
//! socket had been idle; here that becomes "the pool handed out a connection the peer had
//! already given up on" (`peer_reset_idle`) or an ordinary reset.
use std::time::Duration;

use super::Kind;
use std::collections::HashMap;

use crate::events::{Event, Hook, TcpState};

pub struct ResetDetector {
    idle_threshold_ms: u64,
}

impl ResetDetector {
    pub fn new(idle_threshold: Duration) -> ResetDetector {
        ResetDetector {
            idle_threshold_ms: idle_threshold.as_millis() as u64,
        }
    }

    pub fn classify(&self, event: &Event) -> Option<Kind> {
        match event.hook {
            Hook::ReceiveReset => Some(match event.idle_ms() {
                Some(idle) if idle >= self.idle_threshold_ms => Kind::PeerResetIdle,
                _ => Kind::PeerReset,
            }),
            Hook::SendReset => Some(Kind::LocalReset),
            Hook::StateChange | Hook::IoAfterPeerEnd | Hook::Snapshot => None,
        }
    }
}

/// Why an RST was sent or received, as the on-call engineer would say it.
///
/// Sent: from the kernel's own `sk_rst_reason` (Linux 6.10+; names read from BTF, since the
/// values differ between kernels), with `sk_err` telling `ss -K` (ECONNABORTED, set before
/// the RST) from an SO_LINGER 0 close; older kernels fall back to the socket's state.
/// Received: from the state the socket was in.
pub fn cause(event: &Event, reasons: &HashMap<u32, String>) -> String {
    match event.hook {
        Hook::SendReset => sent_cause(event, reasons),
        Hook::ReceiveReset => received_cause(event.old_state).to_string(),
        _ => "unknown".to_string(),
    }
}

fn sent_cause(event: &Event, reasons: &HashMap<u32, String>) -> String {
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
        Some("TCP_STATE") | Some("NOT_SPECIFIED") => abort_cause(event).into(),
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
    use monitor_common::tcp_state::*;
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
        ResetDetector::new(Duration::from_secs(1))
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
            raw.old_state = monitor_common::tcp_state::CLOSE;
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
        use monitor_common::tcp_state::{CLOSE, ESTABLISHED as LIVE};
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
        use monitor_common::tcp_state::*;
        assert_eq!(received(SYN_SENT), "connection_refused");
        assert_eq!(received(ESTABLISHED), "reset_while_established");
        assert_eq!(received(CLOSE_WAIT), "reset_during_close");
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
    }
}
