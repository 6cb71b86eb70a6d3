//! Findings held back for a short grace: the peer's FIN or RST of an idle socket is a finding
//! only if the application still holds the socket [`HANDLED_GRACE`] later. A healthy client
//! closes its end within milliseconds; a stale pool holds the dead socket until its next
//! checkout.
use std::{collections::VecDeque, time::Duration};

use super::Finding;
use crate::FastMap;

/// How long the application has, after a peer's FIN or RST of an idle connection, to close
/// its end before it is a finding. A healthy client closes within milliseconds (its event
/// loop reads the EOF or the error at once; a pool that checks its connections drops them);
/// a stale pool holds the socket until its next checkout, seconds or minutes later. 200 ms
/// is two orders above a loaded node's scheduling delay and below any pool's checkout
/// interval, and keeps the finding ahead of the application's next write.
pub const HANDLED_GRACE: Duration = Duration::from_millis(200);

struct Held {
    finding: Finding,
    due_ns: u64,
}

/// Findings within their grace, by socket address, and the order they fall due in.
pub struct Grace {
    held: FastMap<u64, Held>,
    due: VecDeque<(u64, u64)>,
    max: usize,
}

impl Grace {
    pub fn new(max: usize) -> Grace {
        Grace {
            held: FastMap::default(),
            due: VecDeque::new(),
            max,
        }
    }

    /// Holds `finding` until its time plus the grace. With no room to wait it is reported
    /// at once, as before the grace existed. A later finding for the same address (a reused
    /// one) replaces it.
    pub fn hold(&mut self, finding: Finding, findings: &mut Vec<Finding>) {
        let skaddr = finding.event.socket.skaddr;
        if self.held.len() >= self.max && !self.held.contains_key(&skaddr) {
            findings.push(finding);
            return;
        }
        let due_ns = finding.mono_ns + crate::bounds::nanos(HANDLED_GRACE);
        self.due.push_back((due_ns, skaddr));
        self.held.insert(skaddr, Held { finding, due_ns });
    }

    /// The finding held for `skaddr`, if `matches` says it is the one: released early
    /// (confirmed or handled).
    pub fn take_if(
        &mut self,
        skaddr: u64,
        matches: impl FnOnce(&Finding) -> bool,
    ) -> Option<Finding> {
        if !matches(&self.held.get(&skaddr)?.finding) {
            return None;
        }
        self.held.remove(&skaddr).map(|held| held.finding)
    }

    pub fn take(&mut self, skaddr: u64) -> Option<Finding> {
        self.take_if(skaddr, |_| true)
    }

    /// Findings whose grace ended with the socket still held.
    pub fn due(&mut self, mono_now_ns: u64, findings: &mut Vec<Finding>) {
        while let Some(&(due_ns, skaddr)) = self.due.front() {
            if due_ns > mono_now_ns {
                break;
            }
            self.due.pop_front();
            // Taken early, or replaced by a later finding of a reused address: skipped.
            if self.held.get(&skaddr).is_some_and(|h| h.due_ns == due_ns)
                && let Some(held) = self.held.remove(&skaddr)
            {
                findings.push(held.finding);
            }
        }
    }
}
