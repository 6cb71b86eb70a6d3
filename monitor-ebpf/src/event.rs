//! Events written in place in the ring buffer: reserved first, filled field by field, then
//! submitted. No event is built on the stack and copied, and nothing is zeroed through
//! `memset` (see `kernel.rs` for why); the writes are volatile so that LLVM cannot merge
//! runs of them back into one.
use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated},
    maps::ring_buf::RingBufEntry,
};
use monitor_common::{ConnEvent, UNKNOWN_MS, flags};

use crate::{
    kernel::sk_netns,
    maps::{EVENTS, LOST, OWNERS},
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
    /// Reserves an event for `sk`, stamped with the current task and the owner map's entry.
    /// `None` when the ring buffer is full; the loss is counted in `LOST`.
    #[inline(always)]
    pub fn begin(hook: u8, sk: u64) -> Option<Slot> {
        let Some(entry) = EVENTS.reserve::<ConnEvent>(0) else {
            if let Some(lost) = LOST.get_ptr_mut(0) {
                // SAFETY: index 0 of a per-CPU array: this CPU's slot, no other writer.
                unsafe { *lost += 1 };
            }
            return None;
        };
        let slot = Slot(entry);
        let words = slot.as_ptr().cast::<u64>();
        for i in 0..ConnEvent::SIZE / 8 {
            // SAFETY: the reservation is ConnEvent::SIZE bytes, 8-aligned.
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
        }
        let pid_tgid = bpf_get_current_pid_tgid();
        set!(slot, ts_ns, unsafe { bpf_ktime_get_ns() });
        set!(slot, hook, hook);
        set!(slot, skaddr, sk);
        set!(slot, ctx_tgid, (pid_tgid >> 32) as u32);
        set!(slot, ctx_pid, pid_tgid as u32);
        set!(slot, since_send_ms, UNKNOWN_MS);
        set!(slot, since_recv_ms, UNKNOWN_MS);
        if sk != 0 {
            set!(slot, netns, sk_netns(sk));
        }
        let event = slot.as_ptr();
        // SAFETY: the helper writes at most 16 bytes into the event's 16-byte comm array
        // (zero on failure, as zeroed above).
        let _ = unsafe { generated::bpf_get_current_comm((&raw mut (*event).ctx_comm).cast(), 16) };
        // SAFETY: a pointer from a lookup in a preallocated (LRU) map: valid memory, though
        // the entry may be recycled for another socket meanwhile; then the event names the
        // wrong owner, which userspace cannot tell (a known, rare race).
        let owner = (sk != 0)
            .then(|| OWNERS.get_ptr(sk))
            .flatten()
            .map(|owner| unsafe { &*owner });
        let mut cgroup_id = 0;
        if let Some(owner) = owner {
            set!(slot, born_ns, owner.born_ns);
            if owner.tgid != 0 {
                set!(slot, flags, flags::OWNER_KNOWN);
                set!(slot, owner_tgid, owner.tgid);
                set!(slot, owner_pid, owner.pid);
                cgroup_id = owner.cgroup_id;
                let from = (&raw const owner.comm).cast::<u64>();
                // SAFETY: both are 8-aligned 16-byte arrays: the map value's (SockOwner
                // asserts the offset) and the reserved event's.
                unsafe {
                    let to = (&raw mut (*event).owner_comm).cast::<u64>();
                    core::ptr::write_volatile(to, core::ptr::read_volatile(from));
                    core::ptr::write_volatile(to.add(1), core::ptr::read_volatile(from.add(1)));
                }
            }
        }
        if cgroup_id == 0 {
            // The running task's: the owner's when the hook runs in process context.
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
