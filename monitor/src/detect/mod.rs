//! Detectors: turn socket events into findings an on-call engineer acts on.
//! One module per detector; each sees every event with the socket's resolved owner.
pub mod reset;

use std::time::Duration;

use crate::events::{Event, Hook, Task};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The peer reset a socket that had been idle at least the idle threshold.
    PeerResetIdle,
    /// The peer reset a socket in use.
    PeerReset,
    /// This host sent an RST.
    LocalReset,
    /// Any TCP state change (`watch --all`).
    StateChange,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::PeerResetIdle,
        Kind::PeerReset,
        Kind::LocalReset,
        Kind::StateChange,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PeerResetIdle => "peer_reset_idle",
            Kind::PeerReset => "peer_reset",
            Kind::LocalReset => "local_reset",
            Kind::StateChange => "state_change",
        }
    }
}

/// A flagged event, with the process it is attributed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: Kind,
    pub event: Event,
    pub owner: Option<Task>,
}

#[derive(Debug, Clone)]
pub struct DetectConfig {
    pub idle_threshold: Duration,
    /// Also report every state change.
    pub state_changes: bool,
}

pub struct Detectors {
    reset: reset::ResetDetector,
    state_changes: bool,
}

impl Detectors {
    pub fn new(config: &DetectConfig) -> Detectors {
        Detectors {
            reset: reset::ResetDetector::new(config.idle_threshold),
            state_changes: config.state_changes,
        }
    }

    pub fn inspect(&mut self, event: &Event, owner: Option<&Task>, findings: &mut Vec<Finding>) {
        let mut flag = |kind| {
            findings.push(Finding {
                kind,
                event: event.clone(),
                owner: owner.cloned(),
            })
        };
        if let Some(kind) = self.reset.classify(event) {
            flag(kind);
        }
        if self.state_changes && event.hook == Hook::StateChange {
            flag(Kind::StateChange);
        }
    }
}
