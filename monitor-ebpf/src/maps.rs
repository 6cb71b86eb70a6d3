//! Maps shared by all programs. Userspace resizes them at load time (`set_max_entries`).
use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use monitor_common::{ConnEvent, PeerEnd, SockOwner, peer_end};

// bpf_ringbuf_submit/query flags (include/uapi/linux/bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Every observation, in order per CPU.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Events that could not be reserved in `EVENTS` (ring full). Index 0 only.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Socket → owner, captured in process context. LRU so a missed destroy cannot fill it.
#[map]
pub static OWNERS: LruHashMap<u64, SockOwner> = LruHashMap::with_max_entries(65536, 0);

/// Sockets the peer reset or closed (FIN): the only sockets the send/recv hooks look at.
#[map]
pub static PEER_ENDED: LruHashMap<u64, PeerEnd> = LruHashMap::with_max_entries(65536, 0);

/// Remembers that the peer ended the socket of `event` (`how`: [`peer_end`]).
#[inline(always)]
pub fn mark_peer_end(how: u8, event: &ConnEvent) {
    let sk = event.skaddr;
    if how == peer_end::RESET
        && let Some(mark) = PEER_ENDED.get_ptr(sk)
        // SAFETY: pointer from a lookup of a preallocated (LRU) map, read once.
        && unsafe { (*mark).how == peer_end::FIN && (*mark).reported == 0 }
    {
        // The application has not touched the socket since the FIN: its next call is
        // reported against the FIN, the root cause (on loopback a write after FIN draws the
        // RST before the write's own hook runs).
        return;
    }
    let mark = PeerEnd {
        at_ns: event.ts_ns,
        how,
        reported: 0,
        family: event.family,
        sport: event.sport,
        dport: event.dport,
        saddr: event.saddr,
        daddr: event.daddr,
    };
    let _ = PEER_ENDED.insert(sk, mark, 0);
}

/// Sends `event` to userspace, counting it in `LOST` when the ring buffer is full.
#[inline(always)]
pub fn emit(event: &ConnEvent) {
    match EVENTS.reserve::<ConnEvent>(0) {
        Some(mut entry) => {
            entry.write(*event);
            // Batch wakeups: userspace polls every few milliseconds anyway.
            let waiting = EVENTS.query(BPF_RB_AVAIL_DATA);
            let wake = if waiting >= crate::kernel::settings().wakeup_bytes {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            entry.submit(wake);
        }
        None => {
            if let Some(lost) = LOST.get_ptr_mut(0) {
                // Per-CPU slot: no other writer, a plain add is enough.
                unsafe { *lost += 1 };
            }
        }
    }
}
