//! Detectors: turn socket events into findings an on-call engineer acts on.
//! One module per detector; each sees every event with the socket's resolved owner.
pub mod close;
pub mod death;
pub mod exhausted;
pub mod grace;
pub mod idle_limit;
pub mod leak;
pub mod listed;
pub mod reset;
pub mod stall;
pub mod used_after;
pub mod zombie;

use std::{collections::HashMap, time::Duration};

use crate::{
    bounds::millis,
    events::{Event, Hook, Task},
    sockets::{
        diag::DiagSocket,
        pools::{Listeners, Requests},
        workload::Workload,
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Kind {
    /// The peer reset a socket that had been idle at least the idle threshold, and the
    /// application still held it after the grace (or wrote into it sooner).
    PeerResetIdle,
    /// The peer reset a socket in use.
    PeerReset,
    /// This host sent an RST.
    LocalReset,
    /// The peer closed (FIN) a socket that had been idle at least the idle threshold.
    PeerCloseIdle,
    /// The application sent on, or read from, a socket its peer had reset.
    UsedAfterReset,
    /// The application wrote to, or read EOF from, a socket its peer had closed.
    UsedAfterClose,
    /// A socket stayed in CLOSE_WAIT past the threshold: the application never closed it.
    CloseWaitLingering,
    /// A request was sent and acknowledged, and no answer came for the stall threshold.
    RequestStalled,
    /// Every established connection of a pool has a stalled request.
    PoolExhausted,
    /// An exhausted pool has a connection free again (or is gone).
    PoolRecovered,
    /// A pool's stranded connections (idle since shortly after they opened, while the
    /// process opened newer ones to the same endpoint) keep growing: a connection leak.
    PoolLeak,
    /// A leaking pool stopped opening connections with nearly all of them stranded: its
    /// limit is likely reached ("QueuePool limit reached").
    PoolLeakExhausted,
    /// An accepted connection written to and acknowledged, silent inbound past the zombie
    /// threshold, while a newer one from the same peer is active: the client reconnected
    /// and a proxy keeps the old one open.
    ZombieConnection,
    /// The kernel killed a connection with no RST or FIN (retransmission, keepalive or user
    /// timeout; unreachable): the network dropped it silently.
    SilentDeath,
    /// Any TCP state change (`watch --all`).
    StateChange,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PeerResetIdle => "peer_reset_idle",
            Kind::PeerReset => "peer_reset",
            Kind::LocalReset => "local_reset",
            Kind::PeerCloseIdle => "peer_close_idle",
            Kind::UsedAfterReset => "used_after_reset",
            Kind::UsedAfterClose => "used_after_close",
            Kind::CloseWaitLingering => "close_wait_lingering",
            Kind::RequestStalled => "request_stalled",
            Kind::PoolExhausted => "pool_exhausted",
            Kind::PoolRecovered => "pool_recovered",
            Kind::PoolLeak => "pool_leak",
            Kind::PoolLeakExhausted => "pool_leak_exhausted",
            Kind::ZombieConnection => "zombie_connection",
            Kind::SilentDeath => "silent_death",
            Kind::StateChange => "state_change",
        }
    }
}

/// A flagged event, with the process it is attributed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: Kind,
    pub event: Event,
    /// The socket's owner; for write/read-after kinds, the process that made the call.
    pub owner: Option<Task>,
    /// When it was found (CLOCK_MONOTONIC ns): the event's time, or the tick's.
    pub mono_ns: u64,
    /// For `close_wait_lingering`: how long the socket has been in CLOSE_WAIT; for
    /// `pool_recovered`: how long the pool was exhausted; for `pool_leak*`: since the
    /// oldest stranded connection was first listed.
    pub age_ms: Option<u64>,
    /// `age_ms` counts from when connwatch first listed the socket, not from when it
    /// entered the state (which no event told): the true age is longer.
    pub age_at_least: bool,
    /// For `request_stalled`: how long the request has waited for an answer; for
    /// `pool_exhausted`: the oldest stalled request's wait.
    pub stalled_ms: Option<u64>,
    /// For `pool_exhausted`: the pool's established connections, all stalled; for
    /// `pool_leak*`: its stranded connections.
    pub connections: Option<u32>,
    /// For `pool_leak*`: stranded connections added per minute.
    pub per_min: Option<u32>,
    /// For `zombie_connection`: newer connections from the same peer, active both ways.
    pub siblings: Option<u32>,
    /// Container and pod of the process, filled in by the pipeline.
    pub workload: Workload,
    /// For resets: why the RST was sent or received.
    pub cause: Option<String>,
    /// For `peer_*_idle`: the idle limit learned on the connection's path, if any.
    pub idle_limit: Option<idle_limit::IdleLimit>,
    /// The socket is a server's (its local endpoint listens, as the last refresh listed):
    /// its metrics name the listening port (`local_port`), not the client's.
    pub inbound: bool,
}

impl Finding {
    pub fn new(kind: Kind, event: &Event, owner: Option<&Task>) -> Finding {
        Finding {
            kind,
            event: event.clone(),
            owner: owner.cloned(),
            mono_ns: event.mono_ns,
            age_ms: None,
            age_at_least: false,
            stalled_ms: None,
            connections: None,
            per_min: None,
            siblings: None,
            workload: Workload::default(),
            cause: None,
            idle_limit: None,
            inbound: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DetectConfig {
    pub idle_threshold: Duration,
    pub close_wait_threshold: Duration,
    pub stall_threshold: Duration,
    pub zombie_threshold: Duration,
    pub leak_threshold: Duration,
    /// Bound on every per-socket table.
    pub max_sockets: usize,
    /// This kernel's `enum sk_rst_reason`, value → name.
    pub rst_reasons: HashMap<u32, String>,
    /// Also report every state change.
    pub state_changes: bool,
    /// `--ignore-port`: sockets on these ports wait by design (long polls, streams).
    pub quiet_ports: Vec<u16>,
}

pub struct Detectors {
    reset: reset::ResetDetector,
    rst_reasons: HashMap<u32, String>,
    close: close::CloseDetector,
    stall: stall::StallDetector,
    state_changes: bool,
}

impl Detectors {
    pub fn new(config: &DetectConfig) -> Detectors {
        Detectors {
            reset: reset::ResetDetector::new(config.idle_threshold, config.max_sockets),
            rst_reasons: config.rst_reasons.clone(),
            close: close::CloseDetector::new(
                config.idle_threshold,
                config.close_wait_threshold,
                config.max_sockets,
            ),
            stall: stall::StallDetector::new(millis(config.stall_threshold)),
            state_changes: config.state_changes,
        }
    }

    pub fn inspect(&mut self, event: &Event, owner: Option<&Task>, findings: &mut Vec<Finding>) {
        if let Some(kind) = self.reset.classify(event) {
            let mut finding = Finding::new(kind, event, owner);
            finding.cause = Some(reset::cause(event, &self.rst_reasons));
            self.reset.report(finding, findings);
        }
        if let Some(kind) = death::classify(event) {
            findings.push(Finding::new(kind, event, owner));
        }
        // Before used_after: a FIN or RST still in its grace is reported ahead of the call that
        // hit it.
        self.close.observe(event, owner, findings);
        self.reset.observe(event, findings);
        if let Some(kind) = used_after::classify(event) {
            // The caller hit the ended connection; it is the process to name.
            findings.push(Finding::new(kind, event, Some(&event.current)));
        }
        if self.state_changes && event.hook == Hook::StateChange {
            findings.push(Finding::new(Kind::StateChange, event, owner));
        }
    }

    /// Entries dropped from bounded tables.
    pub fn evictions(&self) -> u64 {
        self.close.evictions
    }

    /// Idle FINs the application closed within the grace (healthy; metrics only).
    pub fn fins_handled(&self) -> u64 {
        self.close.handled
    }

    /// Idle resets the application closed within the grace (healthy; metrics only).
    pub fn resets_handled(&self) -> u64 {
        self.reset.handled
    }

    /// Findings whose grace ended: checked often (every poll of the ring), so that a stale
    /// socket is flagged within milliseconds of its grace.
    pub fn due(&mut self, mono_now_ns: u64, findings: &mut Vec<Finding>) {
        self.close.due(mono_now_ns, findings);
        self.reset.due(mono_now_ns, findings);
    }

    /// CLOSE_WAIT sockets of a socket list that no event told of, due for a report: each
    /// with how long it has been listed in the state.
    pub fn listed_close_wait<'a>(
        &mut self,
        sockets: &'a [DiagSocket],
        mono_now_ns: u64,
    ) -> Vec<(&'a DiagSocket, u64)> {
        self.close.listed(sockets, mono_now_ns)
    }

    /// The sockets whose request started stalling since the last refresh, with how long
    /// each has waited (ms): see [`stall::StallDetector::refresh`].
    pub fn stalled<'a>(
        &mut self,
        sockets: &'a [DiagSocket],
        listeners: &Listeners,
        mono_now_ns: u64,
    ) -> Vec<(&'a DiagSocket, u64)> {
        self.stall.refresh(sockets, listeners, mono_now_ns)
    }

    /// Every request waiting for its answer at the last refresh: such a socket is busy.
    pub fn requests(&self) -> Requests<'_> {
        self.stall.requests()
    }

    /// Findings that come from time passing rather than from an event.
    pub fn tick(&mut self, mono_now_ns: u64, findings: &mut Vec<Finding>) {
        // Not `due`: graces end at the engine's poll, right after it drains the ring, so that
        // no event that could settle one is still waiting there.
        self.close.tick(mono_now_ns, findings);
    }
}
