//! Reading the kernel: tracepoint records and `struct sock` fields at offsets that userspace
//! resolved from the running kernel (tracefs formats and BTF) and wrote into these globals.
//!
//! Nothing here builds a value by zeroing a buffer: LLVM turns such zeroing into calls to an
//! out-of-line `memset`, and Linux 6.1's verifier stops pruning states at subprogram calls
//! (inet_sock_set_state then exceeded its 1M-instruction limit).
use core::mem::{MaybeUninit, align_of, size_of};

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_jiffies64, bpf_ktime_get_ns,
        bpf_probe_read_kernel, generated,
    },
    programs::TracePointContext,
};
use aya_log_ebpf::debug;
use monitor_common::{
    ABSENT, AF_INET, AF_INET6, ConnEvent, KernelLayout, Settings, SockOwner, TpLayout, Tuple,
    UNKNOWN_MS, UNSET_OFFSET, UNSET_SIGNED_OFFSET, flags,
};

// Globals overwritten by the loader (`EbpfLoader::override_global`, `must_exist`), which then
// freezes them: the verifier sees every offset as a constant and prunes the branches this
// kernel's layout rules out. The placeholders fail safe, should a program ever run with one:
// every layout offset is unset (`UNSET_OFFSET`, `ABSENT`), so each read at it returns
// `None` (checked before any address is formed), and every setting is off.
#[unsafe(no_mangle)]
static KERNEL: KernelLayout = KernelLayout::unset();
#[unsafe(no_mangle)]
static SETTINGS: Settings = Settings {
    eof_grace_ns: 0,
    wakeup_bytes: 0,
    all_state_changes: 0,
    io_marks: 0,
    filters: 0,
};
#[unsafe(no_mangle)]
static TP_SET_STATE: TpLayout = TpLayout::absent();
#[unsafe(no_mangle)]
static TP_RECEIVE_RESET: TpLayout = TpLayout::absent();
#[unsafe(no_mangle)]
static TP_SEND_RESET: TpLayout = TpLayout::absent();
#[unsafe(no_mangle)]
static TP_DESTROY_SOCK: TpLayout = TpLayout::absent();
#[unsafe(no_mangle)]
static TP_SYS_EXIT: TpLayout = TpLayout::absent();
#[unsafe(no_mangle)]
static TP_SOCK_LENGTH: TpLayout = TpLayout::absent();

/// Which tracepoint's layout to read; keeps the globals private to this module.
#[derive(Clone, Copy)]
pub enum Tp {
    SetState,
    ReceiveReset,
    SendReset,
    DestroySock,
    SysExit,
    SockLength,
}

#[inline(always)]
pub fn layout(tp: Tp) -> TpLayout {
    let global = match tp {
        Tp::SetState => &TP_SET_STATE,
        Tp::ReceiveReset => &TP_RECEIVE_RESET,
        Tp::SendReset => &TP_SEND_RESET,
        Tp::DestroySock => &TP_DESTROY_SOCK,
        Tp::SysExit => &TP_SYS_EXIT,
        Tp::SockLength => &TP_SOCK_LENGTH,
    };
    // SAFETY: a valid, aligned, initialised static of plain integers. Volatile so that the
    // compiler does not fold in the placeholder: the loader rewrites the value before the
    // program runs.
    unsafe { core::ptr::read_volatile(global) }
}

#[inline(always)]
fn kernel() -> KernelLayout {
    // SAFETY: as in `layout`.
    unsafe { core::ptr::read_volatile(&raw const KERNEL) }
}

#[inline(always)]
pub fn settings() -> Settings {
    // SAFETY: as in `layout`.
    unsafe { core::ptr::read_volatile(&raw const SETTINGS) }
}

/// Bytes of a tracepoint record copied to the stack; userspace refuses longer records.
pub const RECORD_BYTES: usize = monitor_common::MAX_RECORD_BYTES as usize;

/// A tracepoint record copied to the stack with one helper call, instead of one call per
/// field. `TpLayout::record_size` covers every field offset userspace handed over.
pub struct Record(MaybeUninit<[u64; RECORD_BYTES / 8]>);

impl Record {
    #[inline(always)]
    pub fn new() -> Record {
        Record(MaybeUninit::uninit())
    }

    /// Copies this hook's record; false if the layout is unset or the copy failed.
    #[inline(always)]
    pub fn fill(&mut self, ctx: &TracePointContext, tp: &TpLayout) -> bool {
        let len = u32::from(tp.record_size);
        if len == 0 || len > u32::from(monitor_common::MAX_RECORD_BYTES) {
            // Userspace sets the layout of every tracepoint it attaches a program to.
            debug!(
                ctx,
                "tracepoint record layout unset (size {}): hook skipped", len
            );
            return false;
        }
        // SAFETY: writes `len` ≤ RECORD_BYTES bytes into our buffer; the source is the
        // tracepoint's own record, `record_size` bytes long on this kernel.
        let ret = unsafe {
            generated::bpf_probe_read_kernel(self.0.as_mut_ptr().cast(), len, ctx.as_ptr())
        };
        if ret != 0 {
            debug!(
                ctx,
                "reading the tracepoint record ({} bytes) failed: {}; hook skipped", len, ret
            );
        }
        ret == 0
    }

    /// The field at `offset`; `None` when this kernel's tracepoint lacks it.
    #[inline(always)]
    pub fn get<T: Copy>(&self, offset: u16) -> Option<T> {
        let at = usize::from(offset);
        if offset == ABSENT
            || !at.is_multiple_of(align_of::<T>())
            || at + size_of::<T>() > RECORD_BYTES
        {
            return None;
        }
        // SAFETY: in bounds and aligned (checked; the buffer is 8-aligned), and written by
        // `fill`, since `record_size` reaches past every field of the layout.
        Some(unsafe { *self.0.as_ptr().cast::<u8>().add(at).cast::<T>() })
    }

    /// Copies a 16-byte address stored at `offset`, in 2-byte words: Linux 6.1 places
    /// `saddr_v6` at offset 30 (userspace checks the 2-byte alignment).
    #[inline(always)]
    #[expect(
        clippy::cast_ptr_alignment,
        reason = "`dst` is a Tuple address: 8-aligned (monitor-common asserts the offsets)"
    )]
    fn addr16(&self, offset: u16, dst: *mut [u8; 16]) {
        let words = dst.cast::<u16>();
        let mut at = offset;
        for i in 0..8 {
            let word = self.get::<u16>(at).unwrap_or(0);
            at = at.wrapping_add(2);
            // SAFETY: `dst` is a valid, 8-aligned 16-byte array (an event or a stack value).
            unsafe { core::ptr::write_volatile(words.add(i), word) };
        }
    }

    /// An IPv4 address (network order) stored at `offset`, in 2-byte words likewise.
    #[inline(always)]
    fn addr4(&self, offset: u16) -> [u16; 2] {
        [
            self.get::<u16>(offset).unwrap_or(0),
            self.get::<u16>(offset.wrapping_add(2)).unwrap_or(0),
        ]
    }

    /// Local and remote port (host order), for either address layout.
    #[inline(always)]
    pub fn ports(&self, tp: &TpLayout) -> [u16; 2] {
        if tp.saddr_sockaddr == ABSENT {
            [
                self.get::<u16>(tp.sport).unwrap_or(0),
                self.get::<u16>(tp.dport).unwrap_or(0),
            ]
        } else {
            // The port follows the family in `sockaddr_in` and `sockaddr_in6` alike.
            let port = |at: u16| u16::from_be(self.get::<u16>(at + 2).unwrap_or(0));
            [port(tp.saddr_sockaddr), port(tp.daddr_sockaddr)]
        }
    }

    /// Fills `tuple` (all 40 bytes) from the record, for either address layout.
    #[inline(always)]
    pub fn tuple(&self, tp: &TpLayout, sk: u64, tuple: *mut Tuple) {
        // SAFETY: `tuple` points at a whole, 8-aligned `Tuple` (in an event being written or
        // a stack value); each field is written through its own place.
        unsafe {
            let (family, sport, dport) = if tp.saddr_sockaddr == ABSENT {
                // Older layouts: `saddr_v6`/`daddr_v6` hold IPv4-mapped addresses for IPv4
                // sockets. Linux 5.10's tcp_event_sk has no `family`: the socket has it.
                self.addr16(tp.saddr_v6, &raw mut (*tuple).saddr);
                self.addr16(tp.daddr_v6, &raw mut (*tuple).daddr);
                let family = match self.get::<u16>(tp.family) {
                    Some(family) => family,
                    None => read::<u16>(sk, kernel().sk_family).unwrap_or(0),
                };
                let [sport, dport] = self.ports(tp);
                (family, sport, dport)
            } else {
                // Linux 6.10+ tcp_send_reset: sockaddr_in { u16 family; be16 port; be32 addr }
                // or sockaddr_in6 { u16 family; be16 port; u32 flowinfo; u8 addr[16] }.
                let family = self.get::<u16>(tp.saddr_sockaddr).unwrap_or(0);
                if family == AF_INET6 {
                    self.addr16(tp.saddr_sockaddr + 8, &raw mut (*tuple).saddr);
                    self.addr16(tp.daddr_sockaddr + 8, &raw mut (*tuple).daddr);
                } else {
                    v4_mapped(self.addr4(tp.saddr_sockaddr + 4), &raw mut (*tuple).saddr);
                    v4_mapped(self.addr4(tp.daddr_sockaddr + 4), &raw mut (*tuple).daddr);
                }
                let [sport, dport] = self.ports(tp);
                (family, sport, dport)
            };
            core::ptr::write_volatile(&raw mut (*tuple).family, family);
            core::ptr::write_volatile(&raw mut (*tuple).sport, sport);
            core::ptr::write_volatile(&raw mut (*tuple).dport, dport);
            core::ptr::write_volatile(&raw mut (*tuple).pad, 0);
        }
    }
}

/// Where a hook finds a socket's 4-tuple: its tracepoint record, or the socket itself.
pub trait TupleSource {
    /// `sk` is the hook's typed `struct sock *` argument (a typed raw tracepoint), which
    /// helpers taking a socket (socket storage) accept; not an address read from a record.
    const TYPED_SK: bool;
    /// Fills `tuple` (all 40 bytes) for `sk`.
    fn tuple(&self, sk: u64, tuple: *mut Tuple);
}

/// A classic tracepoint's record, which the kernel filled from the socket.
pub struct FromRecord<'a>(pub &'a Record, pub &'a TpLayout);

impl TupleSource for FromRecord<'_> {
    const TYPED_SK: bool = false;

    #[inline(always)]
    fn tuple(&self, sk: u64, tuple: *mut Tuple) {
        self.0.tuple(self.1, sk, tuple);
    }
}

/// `sock_common` read directly, as typed raw tracepoints must (the kernel builds no
/// record for them); the same values the `inet_sock_set_state` record holds.
pub struct FromSock;

impl TupleSource for FromSock {
    const TYPED_SK: bool = true;

    #[inline(always)]
    fn tuple(&self, sk: u64, tuple: *mut Tuple) {
        let k = kernel();
        // Two reads for an IPv4 socket's tuple instead of five: `sock_common`'s head
        // (family, daddr, dport) and `inet_sock`'s saddr and sport lie close together.
        let common = Block::read(sk, k.sk_daddr.min(k.sk_dport).min(k.sk_family));
        let inet = Block::read(sk, k.inet_saddr.min(k.inet_sport));
        let family = common.get::<u16>(k.sk_family).unwrap_or(0);
        // SAFETY: `tuple` points at a whole, 8-aligned `Tuple`; each field is written
        // through its own place, the addresses by the helper (16 bytes each, zeroed by it
        // on failure).
        unsafe {
            if family == AF_INET6 {
                for (dst, offset) in [
                    (&raw mut (*tuple).saddr, k.sk_v6_rcv_saddr),
                    (&raw mut (*tuple).daddr, k.sk_v6_daddr),
                ] {
                    if offset == UNSET_OFFSET {
                        v4_mapped([0; 2], dst);
                        continue;
                    }
                    let _ = generated::bpf_probe_read_kernel(
                        dst.cast(),
                        16,
                        (sk + u64::from(offset)) as *const core::ffi::c_void,
                    );
                }
            } else {
                let saddr = inet.get::<[u16; 2]>(k.inet_saddr).unwrap_or([0; 2]);
                let daddr = common.get::<[u16; 2]>(k.sk_daddr).unwrap_or([0; 2]);
                v4_mapped(saddr, &raw mut (*tuple).saddr);
                v4_mapped(daddr, &raw mut (*tuple).daddr);
            }
            let sport = u16::from_be(inet.get::<u16>(k.inet_sport).unwrap_or(0));
            let dport = u16::from_be(common.get::<u16>(k.sk_dport).unwrap_or(0));
            core::ptr::write_volatile(&raw mut (*tuple).family, family);
            core::ptr::write_volatile(&raw mut (*tuple).sport, sport);
            core::ptr::write_volatile(&raw mut (*tuple).dport, dport);
            core::ptr::write_volatile(&raw mut (*tuple).pad, 0);
        }
    }
}

/// Bytes of kernel memory a [`Block`] holds.
const BLOCK_BYTES: usize = 32;
#[expect(
    clippy::cast_possible_truncation,
    reason = "a 32-byte block: the helper takes its length as u32"
)]
const BLOCK_BYTES_U32: u32 = BLOCK_BYTES as u32;

/// Kernel memory from `start` read with one helper call, so that fields close together
/// cost one read instead of one each. A field the block does not hold (this kernel's
/// layout spreads them further) is read on its own: the answer is the same either way.
struct Block {
    base: u64,
    start: u32,
    bytes: MaybeUninit<[u64; BLOCK_BYTES / 8]>,
    ok: bool,
}

impl Block {
    #[inline(always)]
    fn read(base: u64, start: u32) -> Block {
        let mut bytes = MaybeUninit::<[u64; BLOCK_BYTES / 8]>::uninit();
        // An unset offset reads nothing: every `get` then falls back to `read`, which
        // refuses it too.
        let ok = base != 0 && start != UNSET_OFFSET && {
            // SAFETY: writes BLOCK_BYTES bytes into our buffer; bpf_probe_read_kernel checks
            // the source and fails instead of faulting.
            let ret = unsafe {
                generated::bpf_probe_read_kernel(
                    bytes.as_mut_ptr().cast(),
                    BLOCK_BYTES_U32,
                    (base + u64::from(start)) as *const core::ffi::c_void,
                )
            };
            ret == 0
        };
        Block {
            base,
            start,
            bytes,
            ok,
        }
    }

    /// The `T` at `offset` from the base.
    #[inline(always)]
    fn get<T: Copy>(&self, offset: u32) -> Option<T> {
        let at = offset.wrapping_sub(self.start) as usize;
        if self.ok
            && offset >= self.start
            && at.is_multiple_of(align_of::<T>())
            && at + size_of::<T>() <= BLOCK_BYTES
        {
            // SAFETY: in bounds and aligned (checked; the buffer is 8-aligned), and written
            // by the successful read.
            return Some(unsafe { *self.bytes.as_ptr().cast::<u8>().add(at).cast::<T>() });
        }
        read::<T>(self.base, offset)
    }
}

/// `::ffff:a.b.c.d` from an IPv4 address (network order), as the tracepoints store them.
#[inline(always)]
#[expect(
    clippy::cast_ptr_alignment,
    reason = "`dst` is a Tuple address: 8-aligned (monitor-common asserts the offsets)"
)]
fn v4_mapped(addr: [u16; 2], dst: *mut [u8; 16]) {
    let words = dst.cast::<u16>();
    // SAFETY: `dst` is a valid, 8-aligned 16-byte array.
    unsafe {
        for i in 0..5 {
            core::ptr::write_volatile(words.add(i), 0);
        }
        core::ptr::write_volatile(words.add(5), 0xffff);
        core::ptr::write_volatile(words.add(6), addr[0]);
        core::ptr::write_volatile(words.add(7), addr[1]);
    }
}

/// Copies a `T` (a whole number of 8-byte words) as words, with volatile accesses: no
/// out-of-line `memcpy` (see the module doc), and no merging back into one.
///
/// # Safety
/// `from` and `to` are valid for a whole `T` and 8-aligned.
#[inline(always)]
pub unsafe fn copy_words<T>(from: *const T, to: *mut T) {
    const { assert!(size_of::<T>().is_multiple_of(8)) };
    let (from, to) = (from.cast::<u64>(), to.cast::<u64>());
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: word `i` lies within both `T`s, 8-aligned (the caller's contract).
        unsafe { core::ptr::write_volatile(to.add(i), core::ptr::read_volatile(from.add(i))) };
    }
}

/// Zeroes a `T` (a whole number of 8-byte words) as words, with volatile writes: no
/// out-of-line `memset` (see the module doc).
///
/// # Safety
/// `to` is valid for a whole `T` and 8-aligned.
#[inline(always)]
pub unsafe fn zero_words<T>(to: *mut T) {
    const { assert!(size_of::<T>().is_multiple_of(8)) };
    let to = to.cast::<u64>();
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: word `i` lies within the `T`, 8-aligned (the caller's contract).
        unsafe { core::ptr::write_volatile(to.add(i), 0) };
    }
}

/// Reads `T` at `base + offset` in kernel memory; `None` when `base` is NULL or `offset` was
/// never set (the `KERNEL` placeholder's).
#[inline(always)]
pub fn read<T>(base: u64, offset: u32) -> Option<T> {
    if offset == UNSET_OFFSET {
        return None;
    }
    read_at(base, base.wrapping_add(u64::from(offset)))
}

/// Reads `T` at `addr`, an address computed from `base`; `None` when `base` is NULL.
#[inline(always)]
fn read_at<T>(base: u64, addr: u64) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// `sk->__sk_common.skc_state`; valid for full, timewait and request sockets alike.
#[inline(always)]
pub fn sk_state(sk: u64) -> u8 {
    let offset = kernel().sk_state;
    read::<u8>(sk, offset).unwrap_or_else(|| {
        debug!(
            &(),
            "reading sk_state (offset {}) of a socket failed", offset
        );
        0
    })
}

/// A full socket's local and remote port (host order), where its tuple has them:
/// `inet_sport` outlives the port's release on the way to CLOSE (`skc_num` does not).
#[inline(always)]
pub fn sk_ports(sk: u64) -> [u16; 2] {
    let k = kernel();
    let port = |offset: u32| u16::from_be(read::<u16>(sk, offset).unwrap_or(0));
    [port(k.inet_sport), port(k.sk_dport)]
}

/// `sk->sk_err` of a full socket.
#[inline(always)]
pub fn sk_err(sk: u64) -> i32 {
    read::<i32>(sk, kernel().sk_err).unwrap_or(0)
}

/// `SOCK_LINGER` in `enum sock_flags` (include/net/sock.h; unchanged since 2.6).
const SOCK_LINGER: u64 = 4;

/// SO_LINGER on with a zero timeout, on a full socket.
#[inline(always)]
pub fn linger_zero(sk: u64) -> bool {
    let k = kernel();
    let on = read::<u64>(sk, k.sk_flags).is_some_and(|f| f & (1 << SOCK_LINGER) != 0);
    on && read::<u64>(sk, k.sk_lingertime) == Some(0)
}

/// The network namespace of `sk` (`net->ns.inum`); 0 if unreadable. Valid for full,
/// timewait and request sockets alike (all start with `sock_common`).
#[inline(always)]
pub fn sk_netns(sk: u64) -> u32 {
    let k = kernel();
    read::<u64>(sk, k.sk_net)
        .and_then(|net| read::<u32>(net, k.net_inum))
        .unwrap_or(0)
}

/// True for a TCP socket, IPv4 or IPv6.
#[inline(always)]
pub fn is_tcp(sk: u64) -> bool {
    read::<u16>(sk, kernel().sk_protocol) == Some(monitor_common::IPPROTO_TCP)
}

/// True for an IPv4/IPv6 TCP full socket (`accept()` also returns unix sockets).
#[inline(always)]
pub fn is_inet_tcp(sk: u64) -> bool {
    let k = kernel();
    let family = read::<u16>(sk, k.sk_family).unwrap_or(0);
    let protocol = read::<u16>(sk, k.sk_protocol).unwrap_or(0);
    (family == AF_INET || family == AF_INET6) && protocol == monitor_common::IPPROTO_TCP
}

/// Fields that need a full `tcp_sock`: idle times and inode, written into `event`. Callers
/// check the state first, because timewait and request mini-sockets end where `tcp_sock`
/// fields begin. `idle` says whether the send/receive stamps mean "last data" (not before
/// the handshake ends).
#[inline(always)]
pub fn read_full_socket(sk: u64, idle: bool, event: *mut ConnEvent) {
    let k = kernel();
    let inode = read::<u64>(sk, k.sk_socket)
        .and_then(|socket| {
            // `socket_ino` is signed: from the socket to the inode beside it.
            (k.socket_ino != UNSET_SIGNED_OFFSET).then_some(())?;
            read_at::<u64>(socket, socket.wrapping_add_signed(i64::from(k.socket_ino)))
        })
        .unwrap_or(0);
    let mut bits = flags::FULL_SOCKET;
    let (mut since_send, mut since_recv) = (UNKNOWN_MS, UNKNOWN_MS);
    if idle && k.hz != 0 {
        // tcp_sock times are u32 jiffies (tcp_jiffies32): compare in the same clock, wrapping.
        // SAFETY: no preconditions; returns the jiffies counter.
        let now = jiffies32(unsafe { bpf_jiffies64() });
        let ms = |then: u32| {
            let ms = u64::from(now.wrapping_sub(then)) * 1000 / u64::from(k.hz);
            u32::try_from(ms).unwrap_or(u32::MAX)
        };
        if let (Some(sent), Some(received)) = (
            read::<u32>(sk, k.tcp_lsndtime),
            read::<u32>(sk, k.tcp_lrcvtime),
        ) {
            since_send = ms(sent).min(UNKNOWN_MS - 1);
            since_recv = ms(received).min(UNKNOWN_MS - 1);
            bits |= flags::IDLE_KNOWN;
        } else {
            debug!(
                &(),
                "reading tcp_sock.lsndtime/lrcvtime (offsets {}, {}) failed: idle time unknown",
                k.tcp_lsndtime,
                k.tcp_lrcvtime
            );
        }
    }
    // SAFETY: `event` points at a whole event being written (see `event::Slot`).
    unsafe {
        core::ptr::write_volatile(&raw mut (*event).inode, inode);
        core::ptr::write_volatile(&raw mut (*event).since_send_ms, since_send);
        core::ptr::write_volatile(&raw mut (*event).since_recv_ms, since_recv);
        let old = core::ptr::read_volatile(&raw const (*event).flags);
        core::ptr::write_volatile(&raw mut (*event).flags, old | bits);
    }
}

/// Follows `current->files->fdt->fd[fd]->private_data->sk`: the socket an accept() returned.
#[inline(always)]
pub fn sock_of_fd(fd: u64) -> Option<u64> {
    let k = kernel();
    // SAFETY: no preconditions; returns the current task's address.
    let task = unsafe { generated::bpf_get_current_task() };
    let files = read::<u64>(task, k.task_files)?;
    let fdt = read::<u64>(files, k.files_fdt)?;
    let max_fds = read::<u32>(fdt, k.fdt_max_fds)?;
    if fd >= u64::from(max_fds) {
        return None;
    }
    let fds = read::<u64>(fdt, k.fdt_fd)?;
    // fd < max_fds (a u32): the entry lies within the table.
    let file = read_at::<u64>(fds, fds.wrapping_add(fd * 8))?;
    let socket = read::<u64>(file, k.file_private_data)?;
    let sk = read::<u64>(socket, k.socket_sk)?;
    (sk != 0).then_some(sk)
}

/// Starts a new owner entry in `owner` (a whole `SockOwner` on the stack): born now, and
/// owned by the task running now when `with_task`. In softirq the running task is whoever
/// was interrupted, not the socket's owner: a passive child born there gets zero task
/// fields and its owner at accept().
#[inline(always)]
pub fn new_owner(owner: *mut SockOwner, with_task: bool) {
    // SAFETY: `owner` points at a whole, 8-aligned SockOwner on the stack, whose `comm` is
    // 8-aligned too (monitor-common asserts its offset).
    unsafe {
        core::ptr::write_volatile(&raw mut (*owner).born_ns, bpf_ktime_get_ns());
        if with_task {
            set_owner_task(owner);
        } else {
            zero_words(&raw mut (*owner).comm);
            core::ptr::write_volatile(&raw mut (*owner).cgroup_id, 0);
            core::ptr::write_volatile(&raw mut (*owner).pid, 0);
            core::ptr::write_volatile(&raw mut (*owner).tgid, 0);
        }
    }
}

/// Writes the task running now into `owner`'s task fields, `tgid` last: an event being
/// written on another CPU reads `tgid` first (`event::Slot::begin`), so on x86's ordered
/// stores it never pairs a new tgid with the old, empty name. `owner` may be a map value.
#[inline(always)]
pub fn set_owner_task(owner: *mut SockOwner) {
    // SAFETY: `owner` points at a whole, 8-aligned SockOwner (stack or map value), whose
    // `comm` is 8-aligned too; the comm helper writes at most TASK_COMM_LEN bytes into it.
    unsafe {
        let comm = &raw mut (*owner).comm;
        // Zeroed first: Linux 6.1's helper copies up to the NUL and pads nothing, and the
        // name is compared whole (`watch --comm` looks it up as a 16-byte map key).
        zero_words(comm);
        let _ = generated::bpf_get_current_comm(comm.cast(), 16);
        core::ptr::write_volatile(&raw mut (*owner).cgroup_id, bpf_get_current_cgroup_id());
        let [tgid, pid] = split_pid_tgid(bpf_get_current_pid_tgid());
        core::ptr::write_volatile(&raw mut (*owner).pid, pid);
        core::ptr::write_volatile(&raw mut (*owner).tgid, tgid);
    }
}

/// `[tgid, pid]` from `bpf_get_current_pid_tgid()`'s `tgid << 32 | pid`.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the helper packs two u32s into the u64: each half is taken whole"
)]
pub fn split_pid_tgid(pid_tgid: u64) -> [u32; 2] {
    [(pid_tgid >> 32) as u32, pid_tgid as u32]
}

/// The low 32 bits of jiffies, the clock `tcp_sock`'s stamps use (`tcp_jiffies32`).
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "tcp_jiffies32 is jiffies truncated to 32 bits: the same truncation"
)]
fn jiffies32(jiffies: u64) -> u32 {
    jiffies as u32
}
