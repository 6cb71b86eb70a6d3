//! The path every event takes: decode → socket table (owner) → detectors.
use std::path::PathBuf;

use crate::{
    detect::{DetectConfig, Detectors, Finding},
    events::{self, DecodeError, Event},
    sockets::SocketTable,
};

/// One record's decoded event and what the detectors made of it.
pub struct Processed<'a> {
    pub event: Event,
    pub findings: &'a [Finding],
}

pub struct Pipeline {
    table: SocketTable,
    detectors: Detectors,
    findings: Vec<Finding>,
    pub events: u64,
    pub undecodable: u64,
}

impl Pipeline {
    pub fn new(config: &DetectConfig, proc_root: PathBuf) -> Pipeline {
        Pipeline {
            table: SocketTable::new(proc_root),
            detectors: Detectors::new(config),
            findings: Vec::new(),
            events: 0,
            undecodable: 0,
        }
    }

    /// Processes one ring-buffer record; a record that does not decode is counted.
    pub fn record(&mut self, bytes: &[u8]) -> Result<Processed<'_>, DecodeError> {
        match events::decode(bytes) {
            Ok(event) => {
                self.event(&event);
                Ok(Processed {
                    event,
                    findings: &self.findings,
                })
            }
            Err(err) => {
                self.undecodable += 1;
                Err(err)
            }
        }
    }

    /// Sockets connwatch knows, by state (closed ones excluded).
    pub fn sockets_by_state(&self) -> std::collections::HashMap<crate::events::TcpState, usize> {
        self.table.count_by_state()
    }

    pub fn event(&mut self, event: &Event) -> &[Finding] {
        self.events += 1;
        self.findings.clear();
        let owner = self
            .table
            .observe(event)
            .and_then(|entry| entry.owner.clone())
            .or_else(|| event.owner.clone());
        self.detectors
            .inspect(event, owner.as_ref(), &mut self.findings);
        &self.findings
    }

    /// Periodic upkeep: findings that come from time passing; forget old closed sockets.
    pub fn tick(&mut self, mono_now_ns: u64) -> &[Finding] {
        self.table.expire(mono_now_ns);
        self.findings.clear();
        self.detectors.tick(mono_now_ns, &mut self.findings);
        &self.findings
    }
}
