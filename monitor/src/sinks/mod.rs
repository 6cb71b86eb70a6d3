//! Where findings go. [`Report`] is the one schema every sink writes (`watch --json`, and
//! later the daemon's structured logs), so field names are fixed here once.
pub mod cli;
pub mod incident;
pub mod json;
pub mod metrics;
pub mod process_metrics;
pub mod ratelimit;

use std::{
    io,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{
    detect::{Finding, Kind},
    events::{IoOp, PeerEnd, errno_name},
    sockets::workload::Workload,
};

/// Turns the kernel's CLOCK_MONOTONIC stamps into wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    /// Wall time at monotonic zero.
    epoch: SystemTime,
}

impl WallClock {
    pub fn now() -> WallClock {
        let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(Duration::from)
            .unwrap_or_default();
        WallClock {
            epoch: SystemTime::now() - mono,
        }
    }

    pub fn at(&self, mono_ns: u64) -> SystemTime {
        self.epoch + Duration::from_nanos(mono_ns)
    }

    /// CLOCK_MONOTONIC now, the clock of the kernel's stamps (`bpf_ktime_get_ns`): a step
    /// of the wall clock must not age or rejuvenate anything.
    pub fn mono_now_ns(&self) -> u64 {
        mono_now_ns()
    }
}

/// CLOCK_MONOTONIC now, in ns (see [`WallClock::mono_now_ns`]).
pub fn mono_now_ns() -> u64 {
    // u64 nanoseconds last 584 years of uptime.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |ts| crate::bounds::nanos(Duration::from(ts)))
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// RFC 3339, UTC.
    pub ts: String,
    /// `ts` as CLOCK_MONOTONIC ns: the table orders an incident's steps by it. Not in the
    /// JSON (`ts` says it).
    #[serde(skip)]
    pub mono_ns: u64,
    pub kind: &'static str,
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    pub comm: Option<String>,
    pub local: String,
    pub remote: String,
    pub family: &'static str,
    /// The socket's state when it happened: before the RST/FIN for resets and closes,
    /// at the call for used_after_*, CLOSE_WAIT for lingering; for state changes the new
    /// state.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_state: Option<&'static str>,
    /// Time since data last moved either way.
    pub idle_ms: Option<u64>,
    pub since_send_ms: Option<u32>,
    pub since_recv_ms: Option<u32>,
    /// Stable within one run for one socket's life; kernel addresses are not exposed.
    pub sock_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,
    /// The owner's cgroup v2 id, as the kernel program read it with the event; absent for
    /// findings from the socket list (stalls, pools, zombies), which carry none (their
    /// `cgroup` still names it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// used_after_*: the call (`send` or `recv`) and what it got.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<&'static str>,
    /// The errno the call failed with; 0 for EOF or an accepted write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// `ECONNRESET`, `EPIPE`, `EOF` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since_reset_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since_close_ms: Option<u32>,
    /// close_wait_lingering: time in CLOSE_WAIT so far; pool_recovered: how long the pool
    /// was exhausted; zombie_connection, pool_leak*: time since connwatch first listed the
    /// (oldest stranded) connection (its age, at least).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
    /// close_wait_lingering of a socket in CLOSE_WAIT before connwatch saw it enter the
    /// state (listed by sock_diag): `age_ms` counts from the first listing, a lower bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_at_least: Option<bool>,
    /// request_stalled: time since the request was sent with no answer; pool_exhausted: the
    /// oldest stalled request's; a reset or FIN: the request it cut short, if one waited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled_ms: Option<u64>,
    /// pool_exhausted: the pool's established connections, every one stalled; pool_leak,
    /// pool_leak_exhausted: its stranded connections (with `age_ms`, the oldest's age).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    /// pool_leak, pool_leak_exhausted: stranded connections added per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_min: Option<u32>,
    /// The socket's network namespace (inode), for findings from the socket list: two pods'
    /// sockets can have the same addresses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    /// zombie_connection: newer connections from the same peer IP to the same endpoint,
    /// active both ways (with `since_recv_ms`, and `age_ms` since connwatch first saw it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub siblings: Option<u32>,
    /// Resets: why the RST was sent or received (see README, "Reset causes").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// `peer_*_idle`: the idle limit learned on the connection's path, and the kills seen
    /// there so far (see README, "Idle limits").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_limit_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_kills: Option<u64>,
    /// `cgroup`, and `container`, `pod_uid`, `pod`, `namespace` when known.
    #[serde(flatten)]
    pub workload: Workload,
}

impl Report {
    pub fn new(finding: &Finding, clock: &WallClock) -> Report {
        let event = &finding.event;
        let state_change = finding.kind == Kind::StateChange;
        let owner = finding.owner.as_ref();
        let io = event.io.as_ref();
        let since = |end| {
            io.filter(|io| io.peer_end == end)
                .map(|io| io.since_peer_end_ms)
        };
        Report {
            ts: humantime::format_rfc3339_micros(clock.at(finding.mono_ns)).to_string(),
            mono_ns: finding.mono_ns,
            kind: finding.kind.as_str(),
            pid: owner.map(|o| o.pid),
            tid: owner.map(|o| o.tid),
            comm: owner.map(|o| o.comm.to_string()),
            local: event.local.to_string(),
            remote: event.remote.to_string(),
            family: if event.is_ipv6() { "ipv6" } else { "ipv4" },
            state: match finding.kind {
                Kind::StateChange | Kind::CloseWaitLingering => event.new_state.name(),
                _ => event.old_state.name(),
            },
            old_state: state_change.then(|| event.old_state.name()),
            new_state: state_change.then(|| event.new_state.name()),
            idle_ms: event.idle_ms(),
            since_send_ms: event.since_send_ms,
            since_recv_ms: event.since_recv_ms,
            sock_id: sock_id(event.socket.skaddr, event.socket.born_ns),
            cookie: (event.cookie != 0).then_some(event.cookie),
            inode: (event.inode != 0).then_some(event.inode),
            // 0 is no cgroup's id: not known.
            cgroup_id: (event.cgroup_id != 0).then_some(event.cgroup_id),
            op: io.map(|io| match io.op {
                IoOp::Send => "send",
                IoOp::Recv => "recv",
            }),
            errno: io
                .map(super::events::UsedAfterPeerEnd::errno)
                .or((finding.kind == Kind::SilentDeath).then_some(event.sk_err)),
            error: io
                .map(super::events::UsedAfterPeerEnd::outcome)
                .or((finding.kind == Kind::SilentDeath).then(|| errno_name(event.sk_err))),
            since_reset_ms: since(PeerEnd::Reset),
            since_close_ms: since(PeerEnd::Fin),
            age_ms: finding.age_ms,
            age_at_least: finding.age_at_least.then_some(true),
            // A reset or FIN that ended a waiting request carries the wait too.
            stalled_ms: finding.stalled_ms.or(event.waiting_ms.map(u64::from)),
            connections: finding.connections,
            per_min: finding.per_min,
            netns: event.netns,
            siblings: finding.siblings,
            cause: finding.cause.clone(),
            idle_limit_ms: finding.idle_limit.map(|limit| limit.limit_ms),
            path_kills: finding.idle_limit.map(|limit| limit.kills),
            workload: finding.workload.clone(),
        }
    }

    pub fn local_port(&self) -> Option<u16> {
        port_of(&self.local)
    }

    pub fn remote_port(&self) -> Option<u16> {
        port_of(&self.remote)
    }
}

fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

/// splitmix64 of the socket's identity: unique enough to follow one socket, and hides
/// the kernel address (KASLR) from logs shipped off the node.
fn sock_id(skaddr: u64, born_ns: u64) -> String {
    let mut z = skaddr ^ born_ns.rotate_left(32);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:016x}", z ^ (z >> 31))
}

pub trait Sink {
    /// Returns the lines (or records) written: `watch --count` counts them. A sink that
    /// groups findings may write none now and more later.
    fn finding(&mut self, report: &Report) -> io::Result<u64>;
    /// Writes what waited for `mono_now_ns` (CLOCK_MONOTONIC ns) to come; called at every
    /// poll of the event loop. Returns the lines written.
    fn flush_due(&mut self, _mono_now_ns: u64) -> io::Result<u64> {
        Ok(0)
    }
    /// Writes everything still held, at stop. Returns the lines written.
    fn finish(&mut self) -> io::Result<u64> {
        Ok(0)
    }
    fn lost(&mut self, loss: &Loss) -> io::Result<()>;
}

/// The kernel dropped `count` events (ring buffer full); `total` since start.
pub struct Loss<'a> {
    pub at: SystemTime,
    pub count: u64,
    pub total: u64,
    /// The kernel filter the lost events had passed (`--port 5432`): they may have matched
    /// it. `None`: nothing was filtered in the kernel, so they may be any event.
    pub within: Option<&'a str>,
}

impl Loss<'_> {
    /// Whether the lost events could have been ones being watched, in words.
    pub fn scope(&self) -> String {
        match self.within {
            Some(filter) => {
                format!("they passed the kernel filter ({filter}), so some may be yours")
            }
            None => "no filter ran in the kernel, so they may be any event".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{from_raw, tests::raw_reset};

    #[test]
    fn report_fields() {
        let event = from_raw(&raw_reset(2100)).unwrap();
        let mut finding = Finding::new(Kind::PeerResetIdle, &event, event.owner.as_ref());
        finding.mono_ns = 1_000;
        let report = Report::new(&finding, &WallClock::now());
        assert_eq!(report.kind, "peer_reset_idle");
        assert_eq!(report.pid, Some(42));
        assert_eq!(report.comm.as_deref(), Some("psql"));
        assert_eq!(report.state, "ESTABLISHED");
        assert_eq!(report.old_state, None);
        assert_eq!(report.idle_ms, Some(2100));
        assert_eq!(report.local_port(), Some(40000));
        assert_eq!(report.remote_port(), Some(5432));
        assert!(
            report.ts.ends_with('Z') && report.ts.contains('T'),
            "{}",
            report.ts
        );
        assert_ne!(report.sock_id, sock_id(0xffff_8880_0000_1000, 501));
        assert_eq!(
            (report.op, report.errno, report.since_reset_ms),
            (None, None, None)
        );
        let json = serde_json::to_value(&report).unwrap();
        assert!(json.get("errno").is_none(), "absent, not null: {json}");
    }

    #[test]
    fn used_after_reset_fields() {
        let event = from_raw(&crate::events::tests::raw_send_after_reset()).unwrap();
        let finding = Finding::new(Kind::UsedAfterReset, &event, Some(&event.current));
        let report = Report::new(&finding, &WallClock::now());
        assert_eq!(report.kind, "used_after_reset");
        assert_eq!(report.pid, Some(42));
        assert_eq!(report.op, Some("send"));
        assert_eq!(
            (report.errno, report.error),
            (Some(104), Some("ECONNRESET"))
        );
        assert_eq!(
            (report.since_reset_ms, report.since_close_ms),
            (Some(1500), None)
        );
    }

    #[test]
    fn zombie_fields() {
        let mut event = from_raw(&raw_reset(0)).unwrap();
        event.since_recv_ms = Some(31_000);
        let mut finding = Finding::new(Kind::ZombieConnection, &event, event.owner.as_ref());
        finding.siblings = Some(1);
        finding.age_ms = Some(45_000);
        let json = serde_json::to_value(Report::new(&finding, &WallClock::now())).unwrap();
        assert_eq!(json["kind"], "zombie_connection");
        assert_eq!(
            (&json["siblings"], &json["since_recv_ms"], &json["age_ms"]),
            (&1.into(), &31_000.into(), &45_000.into())
        );
        finding.kind = Kind::PeerResetIdle;
        finding.siblings = None;
        let json = serde_json::to_value(Report::new(&finding, &WallClock::now())).unwrap();
        assert!(json.get("siblings").is_none(), "absent, not null: {json}");
    }

    #[test]
    fn cgroup_id_only_when_known() {
        let mut event = from_raw(&raw_reset(0)).unwrap();
        event.cgroup_id = 1;
        let finding = Finding::new(Kind::PeerResetIdle, &event, event.owner.as_ref());
        let json = serde_json::to_value(Report::new(&finding, &WallClock::now())).unwrap();
        assert_eq!(json["cgroup_id"], 1);
        // A finding from the socket list: the kernel program read no cgroup for it.
        event.cgroup_id = 0;
        let stalled = Finding::new(Kind::RequestStalled, &event, event.owner.as_ref());
        let json = serde_json::to_value(Report::new(&stalled, &WallClock::now())).unwrap();
        assert!(json.get("cgroup_id").is_none(), "absent, not 0: {json}");
    }

    #[test]
    fn ports_of_ipv6() {
        assert_eq!(port_of("[::1]:5432"), Some(5432));
    }
}
