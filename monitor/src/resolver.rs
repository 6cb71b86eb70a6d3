//! Attribution off the event loop. A finding's owner (through /proc, for a socket the kernel
//! programs never saw connect or accept) and its workload (cgroupfs, pod log directories,
//! the kubelet) are resolved on a thread of its own: a slow /proc walk or a hanging kubelet
//! delays attribution, never events, signals or metrics.
//!
//! Findings come back in the order they went in. A finding whose answer the thread already
//! found (the same process, within seconds) is attributed on the spot when nothing is in
//! flight, with no round trip. When the thread is [`QUEUE`] findings behind, the event loop
//! delivers new ones as they are (owner from the kernel, no workload) and counts them in
//! [`Resolver::unattributed`].
use std::sync::{Arc, Mutex, mpsc as std_mpsc};

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;

use crate::{
    detect::Finding,
    events::Hook,
    pipeline::HostPaths,
    sockets::{
        process::ProcIndex,
        workload::{Remembered, WorkloadResolver},
    },
};

/// Findings waiting for, or back from, the resolver thread, at most.
pub const QUEUE: usize = 4096;

/// The process index both off-loop threads share: the refresher fills it at each socket
/// list, the resolver asks it for owners, and the event loop only peeks (`try_lock`).
pub type SharedProcIndex = Arc<Mutex<ProcIndex>>;

pub struct Resolver {
    requests: std_mpsc::SyncSender<Finding>,
    answers: mpsc::Receiver<Finding>,
    /// The thread's complete answers, read without waiting for it.
    remembered: Remembered,
    in_flight: usize,
    /// Findings delivered without attribution: the resolver was [`QUEUE`] behind.
    pub unattributed: u64,
}

impl Resolver {
    pub fn spawn(hosts: &HostPaths, processes: SharedProcIndex) -> Result<Resolver> {
        let (requests, pending) = std_mpsc::sync_channel::<Finding>(QUEUE);
        let (done, answers) = mpsc::channel(QUEUE);
        let mut workloads =
            WorkloadResolver::new(&hosts.root, hosts.proc.clone(), hosts.pod_logs.clone())
                .with_kubelet(hosts.kubelet_url.clone());
        let remembered = workloads.remembered();
        std::thread::Builder::new()
            .name("cw-resolve".into())
            .spawn(move || {
                // Ends when the engine drops either end.
                while let Ok(mut finding) = pending.recv() {
                    attribute(&mut finding, &processes, &mut workloads);
                    if done.blocking_send(finding).is_err() {
                        return;
                    }
                }
            })
            .context("starting the resolver thread")?;
        Ok(Resolver {
            requests,
            answers,
            remembered,
            in_flight: 0,
            unattributed: 0,
        })
    }

    /// Hands `finding` to the thread (`None`), or gives it back to be delivered now:
    /// attributed from a remembered answer, or as it is, counted, when the thread is behind.
    pub fn submit(&mut self, mut finding: Finding) -> Option<Finding> {
        if self.in_flight == 0 && finding.owner.is_some() {
            let (cgroup_id, pid) = workload_key(&finding);
            if let Some(workload) = self.remembered.try_get(cgroup_id, pid) {
                finding.workload = workload;
                return Some(finding);
            }
        }
        // Bounded twice: what waits to be resolved, and what waits to be delivered.
        if self.in_flight >= QUEUE {
            self.unattributed += 1;
            return Some(finding);
        }
        match self.requests.try_send(finding) {
            Ok(()) => {
                self.in_flight += 1;
                None
            }
            Err(
                std_mpsc::TrySendError::Full(finding)
                | std_mpsc::TrySendError::Disconnected(finding),
            ) => {
                self.unattributed += 1;
                Some(finding)
            }
        }
    }

    /// The next attributed finding, in order; pending forever when none is in flight.
    pub async fn next(&mut self) -> Option<Finding> {
        if self.in_flight == 0 {
            return std::future::pending().await;
        }
        let finding = self.answers.recv().await;
        self.in_flight = self.in_flight.saturating_sub(1);
        finding
    }

    /// Findings handed over and not yet back.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// Names a finding's owner (when the kernel did not) and its container and pod.
fn attribute(finding: &mut Finding, processes: &SharedProcIndex, workloads: &mut WorkloadResolver) {
    let event = &finding.event;
    if finding.owner.is_none() && event.inode != 0 {
        // A poisoned lock only means another thread panicked mid-scan: it is a cache.
        let mut index = processes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        finding.owner = index.owner_of(event.inode);
    }
    let (cgroup_id, pid) = workload_key(finding);
    finding.workload = workloads.resolve(cgroup_id, pid);
}

/// What a finding's workload is looked up by: (cgroup id, pid).
fn workload_key(finding: &Finding) -> (u64, u32) {
    let event = &finding.event;
    // In softirq the kernel's cgroup id is the interrupted task's; trust it only when it
    // came from the owner map or a call in the owner's own context.
    let trusted = event.owner.is_some() || event.hook == Hook::UsedAfterPeerEnd;
    let cgroup_id = if trusted { event.cgroup_id } else { 0 };
    (cgroup_id, finding.owner.as_ref().map_or(0, |o| o.pid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        detect::Kind,
        events::{from_raw, tests::raw_reset},
    };

    fn resolver() -> Resolver {
        let nowhere = std::path::PathBuf::from("/nonexistent");
        let hosts = HostPaths {
            proc: nowhere.clone(),
            root: nowhere.clone(),
            pod_logs: None,
            kubelet_url: None,
        };
        let processes = Arc::new(Mutex::new(ProcIndex::new(nowhere)));
        Resolver::spawn(&hosts, processes).unwrap()
    }

    fn finding(n: u64) -> Finding {
        let mut raw = raw_reset(1);
        raw.skaddr = n;
        Finding::new(Kind::PeerReset, &from_raw(&raw).unwrap(), None)
    }

    #[test]
    fn findings_come_back_in_order_and_a_backlog_is_delivered_as_is() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut resolver = resolver();
        for n in 0..QUEUE as u64 {
            assert!(resolver.submit(finding(n)).is_none());
        }
        // Full: handed back, counted, for the caller to deliver unattributed.
        let back = resolver.submit(finding(u64::MAX)).expect("no room");
        assert_eq!(back.event.socket.skaddr, u64::MAX);
        assert_eq!(resolver.unattributed, 1);
        runtime.block_on(async {
            for n in 0..QUEUE as u64 {
                let next = resolver.next().await.unwrap();
                assert_eq!(next.event.socket.skaddr, n);
            }
        });
        assert_eq!(resolver.in_flight(), 0);
        assert!(resolver.submit(finding(1)).is_none(), "room again");
    }
}
