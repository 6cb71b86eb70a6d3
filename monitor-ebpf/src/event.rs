//! Events written in place in the ring buffer: reserved first, filled field by field, then
//! submitted. No event is built on the stack and copied, and nothing is zeroed through
//! `memset` (see `kernel.rs` for why); the writes are volatile so that LLVM cannot merge
//! runs of them back into one.
use core::mem::MaybeUninit;

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated},
    maps::ring_buf::RingBufEntry,
};
use aya_log_ebpf::debug;
use monitor_common::{ConnEvent, SockOwner, TASK_COMM_LEN, UNKNOWN_MS, filter, flags};

use crate::{
    kernel::{copy_words, sk_netns, sk_ports, split_pid_tgid},
    maps::{EVENTS, FILTER_COMMS, FILTER_PIDS, FILTER_PORTS, FILTERED, LOST, OWNERS},
};

// bpf_ringbuf_submit/query flags (include/uapi/linux/bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Sets one field of the event being written: `set!(slot, field, value)`.
macro_rules! set {
    ($slot:expr, $($field:ident).+, $value:expr) => {{
        let value = $value;
        let event = $slot.as_ptr();
        // SAFETY: `event` is the slot's reserved, 8-aligned record of a whole ConnEvent.
        unsafe { core::ptr::write_volatile(&raw mut (*event).$($field).+, value) }
    }};
}
pub(crate) use set;

/// A reserved event. It must end in [`submit`](Slot::submit): the verifier rejects a
/// program that can leave a reservation open.
pub struct Slot(RingBufEntry<ConnEvent>);

impl Slot {
    /// Reserves an event for `sk`, about its owner and with ports read from it: see
    /// [`Slot::begin_for`].
    #[inline(always)]
    pub fn begin(hook: u8, sk: u64) -> Option<Slot> {
        Slot::begin_for(hook, sk, Subject::OWNER)
    }

    /// Reserves an event for `sk`, stamped with the current task and the owner map's entry.
    /// `None` when `watch`'s filters rule it out (counted in `FILTERED`) or the ring buffer
    /// is full (counted in `LOST`).
    #[inline(always)]
    pub fn begin_for(hook: u8, sk: u64, subject: Subject) -> Option<Slot> {
        // SAFETY: a pointer from a lookup in a preallocated (LRU) map: valid memory, though
        // the entry may be recycled for another socket meanwhile; then the event names the
        // wrong owner, which userspace cannot tell (a known, rare race).
        let owner = (sk != 0)
            .then(|| OWNERS.get_ptr(sk))
            .flatten()
            .map(|owner| unsafe { &*owner });
        let filters = crate::kernel::settings().filters;
        if filters != 0 && !admits(filters, sk, owner, &subject) {
            count(&FILTERED);
            return None;
        }
        let Some(entry) = EVENTS.reserve::<ConnEvent>(0) else {
            count(&LOST);
            debug!(
                &(),
                "ring buffer full: event of hook {} skipped (counted in events_lost)", hook
            );
            return None;
        };
        let slot = Slot(entry);
        let words = slot.as_ptr().cast::<u64>();
        for i in 0..ConnEvent::SIZE / 8 {
            // SAFETY: the reservation is ConnEvent::SIZE bytes, 8-aligned.
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
        }
        let [tgid, pid] = split_pid_tgid(bpf_get_current_pid_tgid());
        // SAFETY: no preconditions; returns the monotonic clock.
        set!(slot, ts_ns, unsafe { bpf_ktime_get_ns() });
        set!(slot, hook, hook);
        set!(slot, skaddr, sk);
        set!(slot, ctx_tgid, tgid);
        set!(slot, ctx_pid, pid);
        set!(slot, since_send_ms, UNKNOWN_MS);
        set!(slot, since_recv_ms, UNKNOWN_MS);
        if sk != 0 {
            set!(slot, netns, sk_netns(sk));
        }
        let event = slot.as_ptr();
        // SAFETY: the helper writes at most 16 bytes into the event's 16-byte comm array
        // (zero on failure, as zeroed above).
        let _ = unsafe { generated::bpf_get_current_comm((&raw mut (*event).ctx_comm).cast(), 16) };
        let mut cgroup_id = 0;
        if let Some(owner) = owner {
            set!(slot, born_ns, owner.born_ns);
            if owner.tgid != 0 {
                set!(slot, flags, flags::OWNER_KNOWN);
                set!(slot, owner_tgid, owner.tgid);
                set!(slot, owner_pid, owner.pid);
                cgroup_id = owner.cgroup_id;
                // SAFETY: both are 8-aligned 16-byte arrays: the map value's and the reserved
                // event's (monitor-common asserts both offsets).
                unsafe { copy_words(&raw const owner.comm, &raw mut (*event).owner_comm) };
            }
        }
        if cgroup_id == 0 {
            // The running task's: the owner's when the hook runs in process context.
            // SAFETY: no preconditions; returns the current task's cgroup id.
            cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        }
        set!(slot, cgroup_id, cgroup_id);
        Some(slot)
    }

    #[inline(always)]
    pub fn as_ptr(&self) -> *mut ConnEvent {
        self.0.as_ptr().cast_mut()
    }

    /// Hands the event to userspace, waking it only once a batch is waiting: userspace also
    /// drains on a short timer, and one wakeup per event costs more than the event.
    #[inline(always)]
    pub fn submit(self) {
        let waiting = EVENTS.query(BPF_RB_AVAIL_DATA);
        let wake = if waiting >= crate::kernel::settings().wakeup_bytes {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        self.0.submit(wake);
    }
}

/// Who and what an event is about, as `watch`'s filters see it.
#[derive(Clone, Copy)]
pub struct Subject {
    /// Local and remote port when the hook has them at hand (a record, a saved tuple);
    /// `None` reads them from the full socket.
    pub ports: Option<[u16; 2]>,
    /// The task making the call is the one the finding names (a call into an ended
    /// connection, in process context), not the socket's owner.
    pub caller: bool,
}

impl Subject {
    pub const OWNER: Subject = Subject {
        ports: None,
        caller: false,
    };

    /// With the ports a peer-end mark saved at the RST or FIN: a reset socket has released
    /// its local port since. `mark` is a whole copy from `used_after::peer_ended`.
    #[inline(always)]
    pub fn at_peer_end(mark: *const monitor_common::PeerEnded, caller: bool) -> Subject {
        // SAFETY: the caller's whole stack copy of a mark.
        let ports = unsafe { [(*mark).tuple.sport, (*mark).tuple.dport] };
        Subject {
            ports: Some(ports),
            caller,
        }
    }
}

/// Whether an event may match `watch`'s filters; only a sure mismatch keeps it out. A
/// socket whose owner the kernel never saw (opened before connwatch started, or not yet
/// accepted) passes the process filters: userspace names it and decides.
#[inline(always)]
fn admits(filters: u64, sk: u64, owner: Option<&SockOwner>, subject: &Subject) -> bool {
    if filters & filter::PORT != 0 {
        let [local, remote] = subject.ports.unwrap_or_else(|| sk_ports(sk));
        if FILTER_PORTS.get_ptr(local).is_none() && FILTER_PORTS.get_ptr(remote).is_none() {
            return false;
        }
    }
    if filters & (filter::PID | filter::COMM) == 0 {
        return true;
    }
    let wanted = |tgid: u32, comm: &[u8; TASK_COMM_LEN]| {
        (filters & filter::PID == 0 || FILTER_PIDS.get_ptr(tgid).is_some())
            && (filters & filter::COMM == 0 || FILTER_COMMS.get_ptr(comm).is_some())
    };
    if subject.caller {
        // Two words, not a byte array: zeroing one would be an out-of-line `memset`, which
        // Linux 6.1's verifier cannot prune (see `kernel.rs`).
        let mut words = MaybeUninit::<[u64; 2]>::uninit();
        let at = words.as_mut_ptr().cast::<u64>();
        // SAFETY: both words of the 8-aligned stack array are written before the helper
        // writes at most 16 bytes into it. Zeroed first: Linux 6.1's helper stops at the
        // NUL, and the key is compared whole.
        let comm = unsafe {
            core::ptr::write_volatile(at, 0);
            core::ptr::write_volatile(at.add(1), 0);
            let _ = generated::bpf_get_current_comm(at.cast(), 16);
            &*at.cast::<[u8; TASK_COMM_LEN]>()
        };
        let [tgid, _] = split_pid_tgid(bpf_get_current_pid_tgid());
        return wanted(tgid, comm);
    }
    match owner {
        Some(owner) if owner.tgid != 0 => wanted(owner.tgid, &owner.comm),
        _ => true,
    }
}

/// Adds one to index 0 of a per-CPU counter.
#[inline(always)]
fn count(counter: &aya_ebpf::maps::PerCpuArray<u64>) {
    if let Some(value) = counter.get_ptr_mut(0) {
        // SAFETY: index 0 of a per-CPU array: this CPU's slot, no other writer.
        unsafe { *value += 1 };
    }
}
