//! Resets, in and out. The kernel half (`monitor-ebpf/src/reset.rs`) measures how long the
//! socket had been idle; here that becomes "the pool handed out a connection the peer had
//! already given up on" (`peer_reset_idle`) or an ordinary reset.
use std::time::Duration;

use super::Kind;
use crate::events::{Event, Hook};

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
