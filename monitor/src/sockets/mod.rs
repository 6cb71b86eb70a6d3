//! The socket table: what connwatch knows about each socket's life, and who owns it.
pub mod diag;
pub mod pools;
pub mod process;
pub mod workload;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use crate::{
    FastMap,
    bounds::make_room,
    events::{Event, Hook, SocketId, Task, TcpState},
};

/// How long a closed socket stays in the table: resets and late events (on loopback the
/// local `tcp_send_reset` arrives after the peer's receive) still find their owner.
const CLOSED_RETENTION_NS: u64 = 10_000_000_000;

#[derive(Debug, Clone)]
pub struct SocketEntry {
    pub id: SocketId,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    pub owner: Option<Task>,
    /// Monotonic time the socket's end was seen: CLOSE, or the application's close after
    /// the peer's FIN (its orderly end, LAST_ACK → CLOSE, is not streamed).
    pub closed_ns: Option<u64>,
}

pub struct SocketTable {
    /// Keyed by kernel address; the entry's `id.born_ns` tells reuse apart.
    sockets: FastMap<u64, SocketEntry>,
    /// Shared with the threads that scan /proc; only peeked at here, never waited for.
    processes: Arc<Mutex<process::ProcIndex>>,
    max: usize,
    /// Entries dropped to stay within `max` (closed ones first).
    pub evictions: u64,
}

impl SocketTable {
    pub fn new(processes: Arc<Mutex<process::ProcIndex>>, max: usize) -> SocketTable {
        SocketTable {
            sockets: FastMap::default(),
            processes,
            max,
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Folds `event` into the table and returns the socket's entry as it now stands.
    pub fn observe(&mut self, event: &Event) -> Option<&SocketEntry> {
        let skaddr = event.socket.skaddr;
        if skaddr == 0 {
            return None;
        }
        let reused = self
            .sockets
            .get(&skaddr)
            .is_some_and(|entry| is_new_life(entry, event));
        if reused {
            self.sockets.remove(&skaddr);
        }
        if !self.sockets.contains_key(&skaddr) {
            self.evictions += make_room(&mut self.sockets, self.max, |e| e.closed_ns.is_some());
        }
        let entry = self.sockets.entry(skaddr).or_insert_with(|| SocketEntry {
            id: event.socket,
            local: event.local,
            remote: event.remote,
            state: event.old_state,
            owner: None,
            closed_ns: None,
        });
        if entry.id.born_ns == 0 {
            entry.id.born_ns = event.socket.born_ns;
        }
        if event.hook == Hook::StateChange {
            entry.state = event.new_state;
            entry.local = event.local;
            entry.remote = event.remote;
        }
        let ended = event.new_state == TcpState::CLOSE
            || (event.hook == Hook::StateChange && event.old_state == TcpState::CLOSE_WAIT);
        if ended && entry.closed_ns.is_none() {
            entry.closed_ns = Some(event.mono_ns);
        }
        if let Some(owner) = &event.owner {
            entry.owner = Some(owner.clone());
        } else if entry.owner.is_none() && event.inode != 0 {
            // The last scan's answer if the index is free now; a finding without an owner
            // gets one from the resolver thread, which may wait for a scan.
            entry.owner = self
                .processes
                .try_lock()
                .ok()
                .and_then(|index| index.cached(event.inode));
        }
        Some(entry)
    }

    /// Drops sockets closed longer than the retention period before `now_ns`.
    pub fn expire(&mut self, now_ns: u64) {
        self.sockets.retain(|_, entry| {
            entry
                .closed_ns
                .is_none_or(|closed| now_ns.saturating_sub(closed) < CLOSED_RETENTION_NS)
        });
    }
}

/// The kernel closed a connection that no RST or FIN ended: retransmission, keepalive or
/// TCP_USER_TIMEOUT gave up on a silently dropped flow (`silent_death`).
pub fn died_silently(event: &Event) -> bool {
    let died = event.hook == Hook::StateChange
        && (event.old_state == TcpState::ESTABLISHED || event.old_state == TcpState::CLOSE_WAIT)
        && event.new_state == TcpState::CLOSE;
    // 0: a normal close; ECONNRESET/EPIPE: an RST (reported as a reset); ECONNABORTED:
    // destroyed on purpose (`ss -K`), reported as a local reset.
    let silent = !matches!(
        event.sk_err,
        0 | libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED
    );
    died && silent
}

/// A different socket now lives at this address: a new birth time, or (for sockets born
/// before connwatch, which have none) a new 4-tuple after a close.
fn is_new_life(entry: &SocketEntry, event: &Event) -> bool {
    if event.socket.born_ns != 0 && entry.id.born_ns != 0 {
        return event.socket.born_ns != entry.id.born_ns;
    }
    entry.closed_ns.is_some()
        && event.hook == Hook::StateChange
        && (event.local, event.remote) != (entry.local, entry.remote)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{from_raw, tests::raw_reset};

    /// A /proc with no processes: attribution must come from the events.
    fn no_processes() -> Arc<Mutex<process::ProcIndex>> {
        let root = std::env::temp_dir().join("connwatch-no-such-proc");
        Arc::new(Mutex::new(process::ProcIndex::new(root)))
    }

    fn table() -> SocketTable {
        SocketTable::new(no_processes(), 1000)
    }

    #[test]
    fn table_stays_within_its_bound() {
        let mut table = SocketTable::new(no_processes(), 64);
        for i in 0..1000u64 {
            let mut raw = raw_reset(1);
            raw.hook = monitor_common::hook::STATE_CHANGE;
            raw.new_state = monitor_common::tcp_state::ESTABLISHED;
            raw.skaddr = 0x1000 + i;
            table.observe(&from_raw(&raw).unwrap());
            assert!(table.len() <= 64);
        }
        assert_eq!(table.evictions, 1000 - table.len() as u64);
    }

    #[test]
    fn reused_address_is_a_new_socket() {
        let mut table = table();
        let first = from_raw(&raw_reset(1)).unwrap();
        table.observe(&first);
        let mut raw = raw_reset(1);
        raw.born_ns = 9_999;
        raw.flags &= !monitor_common::flags::OWNER_KNOWN;
        let second = from_raw(&raw).unwrap();
        let entry = table.observe(&second).unwrap();
        assert_eq!(entry.id.born_ns, 9_999);
        assert_eq!(
            entry.owner, None,
            "the old socket's owner must not leak to the new one"
        );
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn same_life_keeps_owner() {
        let mut table = table();
        table.observe(&from_raw(&raw_reset(1)).unwrap());
        let mut raw = raw_reset(1);
        raw.flags &= !monitor_common::flags::OWNER_KNOWN;
        let entry = table.observe(&from_raw(&raw).unwrap()).unwrap();
        assert_eq!(entry.owner.as_ref().map(|o| o.pid), Some(42));
    }

    #[test]
    fn closed_sockets_expire() {
        let mut table = table();
        let event = from_raw(&raw_reset(1)).unwrap();
        table.observe(&event);
        table.expire(event.mono_ns + CLOSED_RETENTION_NS - 1);
        assert_eq!(table.len(), 1);
        table.expire(event.mono_ns + CLOSED_RETENTION_NS);
        assert!(table.is_empty());
    }

    #[test]
    fn closing_after_the_peers_fin_ends_the_socket() {
        // The orderly LAST_ACK → CLOSE that follows is not streamed.
        let mut table = table();
        let mut raw = raw_reset(1);
        raw.hook = monitor_common::hook::STATE_CHANGE;
        raw.old_state = monitor_common::tcp_state::CLOSE_WAIT;
        raw.new_state = monitor_common::tcp_state::LAST_ACK;
        let event = from_raw(&raw).unwrap();
        assert_eq!(
            table.observe(&event).unwrap().closed_ns,
            Some(event.mono_ns)
        );
        table.expire(event.mono_ns + CLOSED_RETENTION_NS);
        assert!(table.is_empty());
    }
}
