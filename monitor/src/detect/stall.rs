//! `request_stalled`: the application sent a request, the peer's TCP acknowledged it, and
//! nothing has come back for the stall threshold: a query stuck without a timeout, holding
//! its pooled connection. Read at each refresh from sock_diag, not from events: the
//! application's last send/recv as the kernel hooks keep it in socket storage, else
//! `tcp_info`'s stamps.
use std::collections::HashMap;

use crate::{
    events::{IoOp, TcpState},
    sockets::{
        diag::DiagSocket,
        pools::{Listeners, Requests},
    },
};

pub struct StallDetector {
    threshold_ms: u64,
    /// Outstanding requests at the last refresh: cookie → how long they have waited (ms).
    outstanding: HashMap<u64, u64>,
}

impl StallDetector {
    pub fn new(threshold_ms: u64) -> StallDetector {
        StallDetector {
            threshold_ms,
            outstanding: HashMap::new(),
        }
    }

    /// Every request waiting for its answer now, stalled or not, and the threshold: such a
    /// socket is busy, never idle.
    pub fn requests(&self) -> Requests<'_> {
        Requests {
            outstanding: &self.outstanding,
            stall_threshold_ms: self.threshold_ms,
        }
    }

    fn is_stalled(&self, waited_ms: u64) -> bool {
        waited_ms >= self.threshold_ms
    }

    /// Updates the outstanding requests; returns the sockets that started stalling since
    /// the last refresh (one report per stall), with how long they have been waiting.
    pub fn refresh<'a>(
        &mut self,
        snapshot: &'a [DiagSocket],
        listeners: &Listeners,
        mono_now_ns: u64,
    ) -> Vec<(&'a DiagSocket, u64)> {
        let mut now = HashMap::new();
        let mut started = Vec::new();
        for socket in snapshot {
            // A server waiting on its client is not a stuck request.
            if listeners.is_inbound(Some(socket.netns), socket.local) {
                continue;
            }
            let Some(waited_ms) = outstanding_for(socket, mono_now_ns) else {
                continue;
            };
            now.insert(socket.cookie, waited_ms);
            let was_stalled = self
                .outstanding
                .get(&socket.cookie)
                .is_some_and(|&before| self.is_stalled(before) && before <= waited_ms);
            if self.is_stalled(waited_ms) && !was_stalled {
                started.push((socket, waited_ms));
            }
        }
        self.outstanding = now;
        started
    }
}

/// How long the socket's request has waited, if one is outstanding: sent, taken by the
/// peer's TCP, and not answered.
pub fn outstanding_for(socket: &DiagSocket, mono_now_ns: u64) -> Option<u64> {
    let activity = socket.activity?;
    // unacked == 0: the peer's TCP took the request; a dead peer would leave it unacked and
    // retransmitting.
    if socket.state != TcpState::ESTABLISHED || activity.unacked != 0 {
        return None;
    }
    // No request without data sent: the handshake alone acknowledges one byte (the SYN), and
    // a connection that never sent has tcp_info stamps a tick apart from its connect.
    if activity.bytes_acked <= 1 {
        return None;
    }
    match socket.last_io {
        // The application's last call was a send, and no answer waits unread.
        Some(last) => (last.op == IoOp::Send && socket.recv_queue == 0)
            .then(|| mono_now_ns.saturating_sub(last.at_ns) / 1_000_000),
        // Only tcp_info's jiffy stamps: a send in the same tick as the last receive (the
        // statement right after BEGIN's answer) cannot be ordered, and is missed.
        None => (activity.last_data_sent_ms < activity.last_data_recv_ms)
            .then_some(u64::from(activity.last_data_sent_ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::diag::{LastIo, TcpActivity};

    const SECOND: u64 = 1_000_000_000;

    fn stalled_for(socket: &DiagSocket, threshold_ms: u64) -> Option<u64> {
        outstanding_for(socket, 100 * SECOND).filter(|&waited| waited >= threshold_ms)
    }

    fn socket(cookie: u64, sent: u32, recv: u32, unacked: u32) -> DiagSocket {
        DiagSocket {
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.9:5432".parse().unwrap(),
            state: TcpState::ESTABLISHED,
            inode: cookie,
            cookie,
            netns: 0,
            recv_queue: 0,
            last_io: None,
            activity: Some(TcpActivity {
                last_data_sent_ms: sent,
                last_data_recv_ms: recv,
                last_ack_recv_ms: sent,
                unacked,
                retransmits: 0,
                bytes_received: 0,
                bytes_acked: 100,
            }),
        }
    }

    #[test]
    fn a_connection_that_never_sent_has_no_request() {
        // Connected, nothing sent: tcp_info's send stamp is the connect's, a tick before
        // the receive stamp, which looked like a request sent and never answered.
        let mut idle = socket(1, 11_800, 11_804, 0);
        idle.activity.as_mut().unwrap().bytes_acked = 1;
        assert_eq!(outstanding_for(&idle, 100 * SECOND), None);
        idle.activity.as_mut().unwrap().bytes_acked = 9;
        assert_eq!(outstanding_for(&idle, 100 * SECOND), Some(11_800));
    }

    #[test]
    fn classic_stall() {
        assert_eq!(
            stalled_for(&socket(1, 12_000, 15_000, 0), 10_000),
            Some(12_000)
        );
        // Below the threshold.
        assert_eq!(stalled_for(&socket(1, 9_000, 15_000, 0), 10_000), None);
        // The answer came after the request: an idle pooled connection.
        assert_eq!(stalled_for(&socket(1, 60_000, 59_000, 0), 10_000), None);
        // Unacknowledged: the peer is gone, not slow.
        assert_eq!(stalled_for(&socket(1, 12_000, 15_000, 1), 10_000), None);
    }

    #[test]
    fn the_kernels_last_call_orders_what_ticks_cannot() {
        // tcp_info ties: the statement went out in the tick BEGIN's answer came in.
        let mut tied = socket(1, 12_000, 12_000, 0);
        assert_eq!(
            stalled_for(&tied, 10_000),
            None,
            "tcp_info alone cannot tell"
        );
        tied.last_io = Some(LastIo {
            op: IoOp::Send,
            at_ns: 88 * SECOND,
        });
        assert_eq!(stalled_for(&tied, 10_000), Some(12_000));
        // The answer was read: idle, whatever the stamps say.
        tied.last_io = Some(LastIo {
            op: IoOp::Recv,
            at_ns: 88 * SECOND,
        });
        assert_eq!(outstanding_for(&tied, 100 * SECOND), None);
        // Sent, and the answer waits unread: the peer answered; not stalled.
        let mut unread = socket(1, 12_000, 11_000, 0);
        unread.last_io = Some(LastIo {
            op: IoOp::Send,
            at_ns: 88 * SECOND,
        });
        unread.recv_queue = 120;
        assert_eq!(outstanding_for(&unread, 100 * SECOND), None);
        // Outstanding for less than the threshold: busy, not stalled.
        unread.recv_queue = 0;
        assert_eq!(outstanding_for(&unread, 90 * SECOND), Some(2_000));
    }

    #[test]
    fn once_per_stall() {
        let mut detector = StallDetector::new(10_000);
        let listeners = Listeners::default();
        let now = 100 * SECOND;
        let snapshot = vec![socket(1, 12_000, 15_000, 0), socket(2, 1, 2, 0)];
        assert_eq!(detector.refresh(&snapshot, &listeners, now).len(), 1);
        assert_eq!(
            detector.requests().outstanding.len(),
            2,
            "both wait, one stalled"
        );
        let later = vec![socket(1, 13_000, 16_000, 0), socket(2, 1, 2, 0)];
        assert_eq!(
            detector.refresh(&later, &listeners, now).len(),
            0,
            "still the same stall"
        );
        // The answer arrives: the stall ends; a new one later is reported again.
        let answered = vec![socket(1, 100, 50, 0)];
        assert_eq!(detector.refresh(&answered, &listeners, now).len(), 0);
        assert!(detector.requests().outstanding.is_empty());
        assert_eq!(detector.refresh(&snapshot, &listeners, now).len(), 1);
        // A new request on the same socket between two refreshes: its wait restarted.
        let next_request = vec![socket(1, 10_500, 11_000, 0)];
        assert_eq!(detector.refresh(&next_request, &listeners, now).len(), 1);
    }
}
