//! Maps shared by all programs. Userspace resizes them at load time (`set_max_entries`).
use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use monitor_common::{ConnectKey, IoMark, PeerEnded, SockOwner, TASK_COMM_LEN, filter};

/// Every observation, in order per CPU.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Events that could not be reserved in `EVENTS` (ring full). Index 0 only.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Events `watch`'s filters kept out of the ring buffer. Index 0 only.
#[map]
pub static FILTERED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `watch --pid`: owners' (or callers') process ids.
#[map]
pub static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(filter::MAX_VALUES, 0);

/// `watch --comm`: task names, zero-padded as the kernel keeps them.
#[map]
pub static FILTER_COMMS: HashMap<[u8; TASK_COMM_LEN], u8> =
    HashMap::with_max_entries(filter::MAX_VALUES, 0);

/// `watch --port`: local or remote ports.
#[map]
pub static FILTER_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(filter::MAX_VALUES, 0);

/// TCP state changes by `tcp_state::index(old, new)`, per CPU: the transitions metric,
/// read at scrape time, so that no state change needs an event to be counted.
#[map]
pub static TRANSITIONS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(monitor_common::tcp_state::TRANSITIONS, 0);

/// Socket → owner, captured in process context. LRU so a missed destroy cannot fill it.
#[map]
pub static OWNERS: LruHashMap<u64, SockOwner> = LruHashMap::with_max_entries(65536, 0);

/// Sockets the peer reset or closed (FIN): the only sockets the send/recv hooks look at.
#[map]
pub static PEER_ENDED: LruHashMap<u64, PeerEnded> = LruHashMap::with_max_entries(65536, 0);

/// Where kprobes serve the send/recv hooks: each thread's `tcp_sendmsg` / `tcp_recvmsg` call
/// in flight (key: `bpf_get_current_pid_tgid()`), its socket carried from the entry kprobe
/// to the kretprobe, which takes it out. LRU, so that entries a missed kretprobe leaves
/// behind (beyond the kernel's maxactive, or a thread that exits) are evicted, never fill
/// it. 10240 covers that many threads in a send or recv at once; beyond it, the oldest
/// calls (those blocked longest) lose their entry and go unseen, which maxactive does long
/// before.
#[map]
pub static IO_CALLS: LruHashMap<u64, IoCall> = LruHashMap::with_max_entries(10240, 0);

/// A send or recv call in flight, from its kprobe to its kretprobe.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IoCall {
    /// The `struct sock *` argument.
    pub sk: u64,
    /// `io::SEND` or `io::RECV`: a kretprobe takes only its own function's entry, should a
    /// missed entry kprobe leave the thread's other call behind.
    pub op: u64,
}

/// Connects per process and endpoint (`ConnectKey`), read at each refresh: pools' connect
/// rates. LRU, so endpoints no longer used make room for new ones.
#[map]
pub static CONNECTS: LruHashMap<ConnectKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// Each TCP socket's last data call (`IoMark`), in the socket itself: freed with it, never
/// full, and read back per socket through sock_diag. A BTF map: socket storage requires it.
#[btf_map]
pub static IO_MARKS: SkStorage<IoMark> = SkStorage::new();
