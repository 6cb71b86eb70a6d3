//! `zombie_connection`: a service keeps writing into an old connection from a client that
//! has since reconnected. A proxy or multiplexer in between keeps the old connection open
//! and acknowledges everything, so the writes succeed and lead nowhere. Read from sock_diag
//! `tcp_info` at each refresh, like stalls.
//!
//! Addresses alone do not name a client (behind a multiplexer or NAT many share one), so
//! only the whole conjunction counts, on an accepted socket:
//! - it carried data both ways, and nothing has come in for the threshold;
//! - the application still writes to it, and wrote into the silence: data sent within the
//!   threshold and at least the threshold after the last data received (a server that
//!   answered a slow request a moment ago has not written into a silence), and the peer's
//!   TCP acknowledges it all (`unacked == 0`);
//! - a newer connection to the same local endpoint from the same remote IP carried data
//!   both ways within the threshold: the client is there, on another connection.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
};

use crate::{
    FastMap,
    events::TcpState,
    sockets::{
        diag::{DiagSocket, TcpActivity},
        pools::Listeners,
    },
};

use super::listed::FirstListed;

/// One socket that entered the zombie set at this refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zombie<'a> {
    pub socket: &'a DiagSocket,
    /// Newer connections from the same peer IP to the same endpoint, active both ways.
    pub siblings: u32,
    /// Since connwatch first listed the socket: a lower bound of its age.
    pub age_ms: u64,
}

pub struct ZombieDetector {
    threshold_ms: u64,
    /// Accepted, ESTABLISHED sockets of the last snapshot → when first listed. "Newer" is
    /// a later first listing, not a larger cookie: sock_diag generates a socket's cookie
    /// when it first lists it, so cookies order sockets by first listing too, but the
    /// sockets new to one dump get theirs in hash-table order. The first listing makes
    /// those a tie, and a tie is never "newer" (no finding on a guess). Its evictions are
    /// the detector's.
    pub first_seen: FirstListed,
    /// Cookies in a zombie episode: reported once, until data comes in or the socket goes.
    zombies: HashSet<u64>,
}

impl ZombieDetector {
    pub fn new(threshold_ms: u64, max_sockets: usize) -> ZombieDetector {
        ZombieDetector {
            threshold_ms,
            first_seen: FirstListed::new(max_sockets),
            zombies: HashSet::new(),
        }
    }

    /// Sockets in a zombie episode now.
    pub fn zombies(&self) -> &HashSet<u64> {
        &self.zombies
    }

    /// Folds in a snapshot; returns the sockets that became zombies since the last refresh.
    pub fn refresh<'a>(
        &mut self,
        snapshot: &'a [DiagSocket],
        listeners: &Listeners,
        now_ns: u64,
    ) -> Vec<Zombie<'a>> {
        let accepted: Vec<(&DiagSocket, TcpActivity)> = snapshot
            .iter()
            .filter(|s| s.state == TcpState::ESTABLISHED)
            .filter(|s| listeners.is_inbound(Some(s.netns), s.local))
            .filter_map(|s| Some((s, s.activity?)))
            .collect();
        self.first_seen
            .remember(accepted.iter().map(|(s, _)| s.cookie), now_ns, now_ns);

        // Per (endpoint, peer IP): when each connection active both ways was first listed,
        // sorted, so counting the newer ones is a binary search.
        let mut active: FastMap<(u64, SocketAddr, IpAddr), Vec<u64>> = FastMap::default();
        for (socket, activity) in &accepted {
            if let Some(listed) = self.first_seen.get(socket.cookie)
                && self.recently_both_ways(activity)
            {
                active.entry(key(socket)).or_default().push(listed.at_ns);
            }
        }
        for times in active.values_mut() {
            times.sort_unstable();
        }

        let mut zombies = HashSet::new();
        let mut started = Vec::new();
        for (socket, activity) in accepted {
            let Some(seen) = self.first_seen.get(socket.cookie).map(|l| l.at_ns) else {
                continue;
            };
            if u64::from(activity.last_data_recv_ms) < self.threshold_ms {
                continue;
            }
            // The episode lasts while nothing comes in: an ACK lagging a write, or the
            // sibling pausing, does not end it and report it again.
            if self.zombies.contains(&socket.cookie) {
                zombies.insert(socket.cookie);
                continue;
            }
            if !self.written_into_silence(&activity) {
                continue;
            }
            let newer = active.get(&key(socket)).map_or(0, |times| {
                times.len() - times.partition_point(|&other| other <= seen)
            });
            if newer == 0 {
                continue;
            }
            zombies.insert(socket.cookie);
            started.push(Zombie {
                socket,
                siblings: u32::try_from(newer).unwrap_or(u32::MAX),
                age_ms: now_ns.saturating_sub(seen) / 1_000_000,
            });
        }
        self.zombies = zombies;
        started
    }

    /// Carried data both ways, and both within the threshold: a client in conversation.
    fn recently_both_ways(&self, a: &TcpActivity) -> bool {
        carried_both_ways(a)
            && u64::from(a.last_data_recv_ms) < self.threshold_ms
            && u64::from(a.last_data_sent_ms) < self.threshold_ms
    }

    /// Was a conversation (data both ways), and the application still writes to it, a
    /// threshold or more into the peer's silence, with the peer's TCP taking everything:
    /// not an idle pool member (nothing written), not a late answer, not a dead peer
    /// (unacknowledged, retransmitting).
    fn written_into_silence(&self, a: &TcpActivity) -> bool {
        let (sent, received) = (
            u64::from(a.last_data_sent_ms),
            u64::from(a.last_data_recv_ms),
        );
        carried_both_ways(a)
            && sent < self.threshold_ms
            && sent + self.threshold_ms <= received
            && a.unacked == 0
    }
}

/// Payload both ways over the connection's life. An active opener's SYN counts as one
/// acknowledged byte, so more than one is data; a push stream never received any.
fn carried_both_ways(a: &TcpActivity) -> bool {
    a.bytes_received > 0 && a.bytes_acked > 1
}

/// The service endpoint and the peer's address, without its port.
/// Siblings share the network namespace, the local endpoint and the peer's address.
fn key(socket: &DiagSocket) -> (u64, SocketAddr, IpAddr) {
    (socket.netns, socket.local, socket.remote.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    const THRESHOLD: u64 = 30_000;
    const S: u64 = 1_000_000_000;

    /// An accepted socket on 10.0.0.1:8080 from `remote`, with its last data each way (ms
    /// ago) and payload bytes each way.
    fn socket(cookie: u64, remote: &str, sent: u32, recv: u32, bytes_in: u64) -> DiagSocket {
        DiagSocket {
            local: "10.0.0.1:8080".parse().unwrap(),
            remote: remote.parse().unwrap(),
            state: TcpState::ESTABLISHED,
            inode: cookie,
            cookie,
            netns: 0,
            recv_queue: 0,
            activity: Some(TcpActivity {
                last_data_sent_ms: sent,
                last_data_recv_ms: recv,
                last_ack_recv_ms: sent,
                unacked: 0,
                retransmits: 0,
                bytes_received: bytes_in,
                bytes_acked: 5_000,
            }),
            last_io: None,
        }
    }

    fn listener() -> DiagSocket {
        DiagSocket {
            local: "0.0.0.0:8080".parse().unwrap(),
            remote: "0.0.0.0:0".parse().unwrap(),
            state: TcpState::LISTEN,
            inode: 1000,
            cookie: 1000,
            netns: 0,
            recv_queue: 0,
            activity: None,
            last_io: None,
        }
    }

    /// The old connection, then the client's reconnection, each listed at its own refresh.
    fn reconnected() -> (ZombieDetector, Vec<DiagSocket>) {
        let mut detector = ZombieDetector::new(THRESHOLD, 64);
        let old = socket(1, "10.0.0.7:50001", 100, 100, 300);
        assert!(run(&mut detector, vec![old.clone()], 0).is_empty());
        let new = socket(2, "10.0.0.7:50002", 100, 100, 300);
        let later = vec![socket(1, "10.0.0.7:50001", 150, 40_000, 300), new];
        (detector, later)
    }

    /// What the reconnection's next refresh finds once `edit` changed its snapshot (the old
    /// socket first, its sibling second).
    fn found_after(edit: impl FnOnce(&mut [DiagSocket], &mut TcpActivity)) -> Vec<u64> {
        let (mut detector, mut snapshot) = reconnected();
        let mut old = snapshot[0].activity.unwrap();
        edit(&mut snapshot, &mut old);
        snapshot[0].activity = Some(old);
        run(&mut detector, snapshot, 45 * S)
    }

    fn run(detector: &mut ZombieDetector, mut snapshot: Vec<DiagSocket>, at: u64) -> Vec<u64> {
        snapshot.push(listener());
        let listeners = Listeners::from_snapshot(&snapshot);
        detector
            .refresh(&snapshot, &listeners, at)
            .iter()
            .map(|z| z.socket.cookie)
            .collect()
    }

    #[test]
    fn old_connection_written_into_after_the_client_reconnected() {
        let (mut detector, mut snapshot) = reconnected();
        snapshot.push(listener());
        let listeners = Listeners::from_snapshot(&snapshot);
        let found = detector.refresh(&snapshot, &listeners, 45 * S);
        assert_eq!(found.len(), 1, "{found:?}");
        let zombie = found[0];
        assert_eq!(zombie.socket.cookie, 1);
        assert_eq!((zombie.siblings, zombie.age_ms), (1, 45_000));
        assert_eq!(detector.zombies(), &HashSet::from([1]));
        assert_eq!(
            found_after(|_, _| {}),
            [1],
            "found_after edits nothing itself"
        );
    }

    #[test]
    fn once_per_episode() {
        let (mut detector, snapshot) = reconnected();
        assert_eq!(run(&mut detector, snapshot.clone(), 45 * S), [1]);
        assert!(run(&mut detector, snapshot.clone(), 50 * S).is_empty());
        // An ACK lagging the latest write does not end the episode.
        let mut lagging = snapshot.clone();
        lagging[0].activity.as_mut().unwrap().unacked = 1;
        assert!(run(&mut detector, lagging, 55 * S).is_empty());
        assert_eq!(detector.zombies(), &HashSet::from([1]));
        // Data comes in: the episode ends; a new silence is a new episode.
        let mut answered = snapshot.clone();
        answered[0].activity.as_mut().unwrap().last_data_recv_ms = 10;
        assert!(run(&mut detector, answered, 60 * S).is_empty());
        assert!(detector.zombies().is_empty());
        assert_eq!(run(&mut detector, snapshot, 95 * S), [1]);
    }

    #[test]
    fn one_way_push_stream_is_not_a_zombie() {
        // Never received a byte: a subscriber or log stream, pushed to.
        assert!(found_after(|_, old| old.bytes_received = 0).is_empty());
    }

    #[test]
    fn two_active_connections_from_one_client_are_not_zombies() {
        assert!(found_after(|_, old| old.last_data_recv_ms = 200).is_empty());
    }

    #[test]
    fn idle_pool_members_are_not_zombies() {
        // Nothing written to it either.
        assert!(found_after(|_, old| old.last_data_sent_ms = 40_000).is_empty());
    }

    #[test]
    fn writes_that_stopped_are_not_a_zombie() {
        // Written into the silence once, a minute ago, not since.
        let stopped = found_after(|_, old| {
            old.last_data_recv_ms = 100_000;
            old.last_data_sent_ms = 60_000;
        });
        assert!(stopped.is_empty());
    }

    #[test]
    fn a_slow_request_answered_lately_is_not_a_zombie() {
        // Received 40 s ago, answered 25 s later: the write followed the request, it was
        // not written into a silence.
        assert!(found_after(|_, old| old.last_data_sent_ms = 15_000).is_empty());
    }

    #[test]
    fn unacknowledged_writes_are_a_dead_peer_not_a_zombie() {
        assert!(found_after(|_, old| old.unacked = 3).is_empty());
    }

    #[test]
    fn the_sibling_must_be_newer_active_and_from_the_same_peer_and_endpoint() {
        // An older sibling: the silent connection is the later one, not a leftover.
        let mut detector = ZombieDetector::new(THRESHOLD, 64);
        run(
            &mut detector,
            vec![socket(2, "10.0.0.7:50002", 100, 100, 300)],
            0,
        );
        let snapshot = vec![
            socket(2, "10.0.0.7:50002", 100, 100, 300),
            socket(1, "10.0.0.7:50001", 150, 40_000, 300),
        ];
        assert!(run(&mut detector, snapshot, 45 * S).is_empty());
        // The newer one is quiet inbound: the client did not move to it.
        let quiet = found_after(|s, _| s[1].activity.as_mut().unwrap().last_data_recv_ms = 35_000);
        assert!(quiet.is_empty());
        let other_peer = found_after(|s, _| s[1].remote = "10.0.0.8:50002".parse().unwrap());
        assert!(other_peer.is_empty());
        let other_service = found_after(|s, _| s[1].local = "10.0.0.1:9090".parse().unwrap());
        assert!(other_service.is_empty());
    }

    #[test]
    fn sockets_first_listed_together_are_a_tie() {
        let mut detector = ZombieDetector::new(THRESHOLD, 64);
        let snapshot = vec![
            socket(1, "10.0.0.7:50001", 150, 40_000, 300),
            socket(2, "10.0.0.7:50002", 100, 100, 300),
        ];
        assert!(run(&mut detector, snapshot, 0).is_empty());
    }

    #[test]
    fn outbound_sockets_are_not_considered() {
        // A client's two connections from one local port to two servers on one host: no
        // listener on 10.0.0.1:40000, so neither is a service's.
        let outbound = found_after(|s, _| s.iter_mut().for_each(|s| s.local.set_port(40_000)));
        assert!(outbound.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_keeps_known_sockets_first() {
        let mut detector = ZombieDetector::new(THRESHOLD, 2);
        let old = socket(1, "10.0.0.7:50001", 100, 100, 300);
        run(&mut detector, vec![old], 0);
        let crowd: Vec<DiagSocket> = (2..6)
            .map(|c| socket(c, &format!("10.0.0.9:{}", 50_000 + c), 100, 100, 1))
            .chain([socket(1, "10.0.0.7:50001", 150, 40_000, 300)])
            .collect();
        run(&mut detector, crowd, S);
        assert_eq!(detector.first_seen.len(), 2);
        assert_eq!(
            detector.first_seen.get(1).map(|l| l.at_ns),
            Some(0),
            "the known socket kept"
        );
        assert_eq!(detector.first_seen.evictions, 3);
    }
}
