//! `request_stalled`: the application sent a request, the peer's TCP acknowledged it, and
//! nothing has come back for the stall threshold: a query stuck without a timeout, holding
//! its pooled connection. Read from sock_diag `tcp_info` at each refresh, not from events.
use std::collections::HashSet;

use crate::{
    events::TcpState,
    sockets::{diag::DiagSocket, pools::Listeners},
};

pub struct StallDetector {
    threshold_ms: u64,
    /// Cookies of sockets stalled at the last refresh.
    stalled: HashSet<u64>,
}

impl StallDetector {
    pub fn new(threshold_ms: u64) -> StallDetector {
        StallDetector {
            threshold_ms,
            stalled: HashSet::new(),
        }
    }

    /// Sockets stalled now.
    pub fn stalled(&self) -> &HashSet<u64> {
        &self.stalled
    }

    /// Updates the stalled set; returns the sockets that started stalling since the last
    /// refresh (one report per stall), with how long they have been waiting.
    pub fn refresh<'a>(
        &mut self,
        snapshot: &'a [DiagSocket],
        listeners: &Listeners,
    ) -> Vec<(&'a DiagSocket, u64)> {
        let mut now_stalled = HashSet::new();
        let mut started = Vec::new();
        for socket in snapshot {
            let Some(stalled_ms) = stalled_for(socket, self.threshold_ms) else {
                continue;
            };
            // A server waiting on its client is not a stuck request.
            if listeners.is_inbound(socket.local) {
                continue;
            }
            now_stalled.insert(socket.cookie);
            if !self.stalled.contains(&socket.cookie) {
                started.push((socket, stalled_ms));
            }
        }
        self.stalled = now_stalled;
        started
    }
}

/// How long the request has waited, if the socket is a stalled request.
pub fn stalled_for(socket: &DiagSocket, threshold_ms: u64) -> Option<u64> {
    let activity = socket.activity?;
    let waiting = activity.last_data_sent_ms as u64;
    let request_outstanding = activity.last_data_sent_ms < activity.last_data_recv_ms;
    // unacked == 0: the peer's TCP took the request; a dead peer would leave it unacked and
    // retransmitting.
    (socket.state == TcpState(monitor_common::tcp_state::ESTABLISHED)
        && request_outstanding
        && activity.unacked == 0
        && waiting >= threshold_ms)
        .then_some(waiting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::diag::TcpActivity;

    fn socket(cookie: u64, sent: u32, recv: u32, unacked: u32) -> DiagSocket {
        DiagSocket {
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.9:5432".parse().unwrap(),
            state: TcpState(monitor_common::tcp_state::ESTABLISHED),
            inode: cookie,
            cookie,
            recv_queue: 0,
            activity: Some(TcpActivity {
                last_data_sent_ms: sent,
                last_data_recv_ms: recv,
                last_ack_recv_ms: sent,
                unacked,
                retransmits: 0,
                bytes_received: 0,
                bytes_acked: 0,
            }),
        }
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
    fn once_per_stall() {
        let mut detector = StallDetector::new(10_000);
        let listeners = Listeners::default();
        let snapshot = vec![socket(1, 12_000, 15_000, 0), socket(2, 1, 2, 0)];
        assert_eq!(detector.refresh(&snapshot, &listeners).len(), 1);
        assert_eq!(
            detector.refresh(&snapshot, &listeners).len(),
            0,
            "still the same stall"
        );
        // The answer arrives: the stall ends; a new one later is reported again.
        let answered = vec![socket(1, 100, 50, 0)];
        assert_eq!(detector.refresh(&answered, &listeners).len(), 0);
        assert_eq!(detector.refresh(&snapshot, &listeners).len(), 1);
    }
}
