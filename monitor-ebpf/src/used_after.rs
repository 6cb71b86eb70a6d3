//! The application runs into a connection its peer already ended (write: broken pipe,
//! ECONNRESET, EOF). Hooked on every send/recv of the host: `sock:sock_send_length` /
//! `sock:sock_recv_length` where the kernel has them (6.3+; typed raw tracepoints, else
//! classic ones), else fexit on `tcp_sendmsg` / `tcp_recvmsg`, else a kprobe and a
//! kretprobe on each (kernels without BPF trampolines, such as arm64 before 6.5), chosen by
//! userspace at load time. A healthy call leaves after reading its return value (and, for a successful send,
//! the socket state); only marked sockets cost a map lookup.
//!
//! The peer-end marks (`PEER_ENDED`) are read through a lookup's pointer into a
//! preallocated LRU element, which the map recycles for another socket when it evicts the
//! mark (the map is full: more peer-ended sockets than `max_sockets`). So a mark is copied
//! once ([`peer_ended`]) and acted on only through by-key operations on its socket: spent
//! with a `BPF_EXIST` update ([`spend`]), removed by key at destroy. Another socket's mark
//! is therefore never spent, and a copy taken from a recycled element is dropped: its
//! socket's own mark was evicted, so that socket's report is lost, as any evicted mark's
//! is. What remains: were the socket to be marked anew (another RST/FIN on it) between
//! the copy and the update, a report can carry a tuple mixed from another socket's; and
//! two calls racing on one socket can both report it (a duplicate, never a loss).
#![expect(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand each program its context by value"
)]

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_SK_STORAGE_GET_F_CREATE},
    cty::c_void,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_sk_storage_get},
    macros::{btf_tracepoint, fexit, kprobe, kretprobe, tracepoint},
    programs::{
        BtfTracePointContext, FExitContext, ProbeContext, RetProbeContext, TracePointContext,
    },
};
use monitor_common::{ConnEvent, IPPROTO_TCP, IoMark, PeerEnded, hook, io, peer_end, tcp_state};

use crate::{
    event::{Slot, Subject, set},
    kernel::{Record, Tp, TupleSource, copy_words, is_tcp, layout, settings, sk_state},
    maps::{IO_CALLS, IO_MARKS, IoCall, PEER_ENDED},
};

const EAGAIN: i32 = 11;
const EINTR: i32 = 4;
const ECONNRESET: i32 = 104;
const ENOENT: i32 = 2;

#[tracepoint(category = "sock", name = "sock_send_length")]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    from_tracepoint(&ctx, io::SEND)
}

#[tracepoint(category = "sock", name = "sock_recv_length")]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    from_tracepoint(&ctx, io::RECV)
}

/// `sock_send_length(struct sock *sk, int ret, int flags)` as a typed raw tracepoint: the
/// arguments are read from the context, with no record to copy. Preferred where the kernel
/// allows it; the classic tracepoint above is the fallback.
#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length_btf(ctx: BtfTracePointContext) -> i32 {
    after_peer_end(
        ctx.arg::<u64>(0),
        ctx.arg::<i32>(1),
        io::SEND,
        Protocol::Unchecked,
        Sk::Typed,
    )
    .cast_signed()
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)`, likewise.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_btf(ctx: BtfTracePointContext) -> i32 {
    after_peer_end(
        ctx.arg::<u64>(0),
        ctx.arg::<i32>(1),
        io::RECV,
        Protocol::Unchecked,
        Sk::Typed,
    )
    .cast_signed()
}

/// `int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)`.
#[fexit(function = "tcp_sendmsg")]
pub fn tcp_sendmsg_exit(ctx: FExitContext) -> u32 {
    after_peer_end(
        ctx.arg::<u64>(0),
        ctx.arg::<i32>(3),
        io::SEND,
        Protocol::Tcp,
        Sk::Typed,
    )
}

/// `tcp_recvmsg(sk, msg, len, flags, addr_len)`, Linux 5.19+.
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg_exit5(ctx: FExitContext) -> u32 {
    after_peer_end(
        ctx.arg::<u64>(0),
        ctx.arg::<i32>(5),
        io::RECV,
        Protocol::Tcp,
        Sk::Typed,
    )
}

/// `tcp_recvmsg(sk, msg, len, nonblock, flags, addr_len)`, before Linux 5.19.
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg_exit6(ctx: FExitContext) -> u32 {
    after_peer_end(
        ctx.arg::<u64>(0),
        ctx.arg::<i32>(6),
        io::RECV,
        Protocol::Tcp,
        Sk::Typed,
    )
}

/// `tcp_sendmsg(sk, ...)` entry, where neither the tracepoints nor fexit serve: keeps the
/// socket for the kretprobe, which sees only the return value.
#[kprobe]
pub fn tcp_sendmsg_entry(ctx: ProbeContext) -> u32 {
    call_entry(&ctx, io::SEND)
}

/// `tcp_sendmsg`'s return: the call's result, with the socket its entry kept.
#[kretprobe]
pub fn tcp_sendmsg_return(ctx: RetProbeContext) -> u32 {
    call_return(&ctx, io::SEND)
}

/// `tcp_recvmsg(sk, ...)` entry: `sk` is the first argument in both arities (5.19 dropped
/// `nonblock`, a later one), so one program serves every kernel.
#[kprobe]
pub fn tcp_recvmsg_entry(ctx: ProbeContext) -> u32 {
    call_entry(&ctx, io::RECV)
}

/// `tcp_recvmsg`'s return.
#[kretprobe]
pub fn tcp_recvmsg_return(ctx: RetProbeContext) -> u32 {
    call_return(&ctx, io::RECV)
}

/// Keeps `sk` (argument 0) for this thread's call until its return. A thread is in one
/// send or recv at a time, so the thread's key holds at most this call's socket; a newer
/// call overwrites what a missed kretprobe left.
#[inline(always)]
fn call_entry(ctx: &ProbeContext, op: u8) -> u32 {
    let Some(sk) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let call = IoCall {
        sk,
        op: u64::from(op),
    };
    let thread = bpf_get_current_pid_tgid();
    // Full (every entry a call in flight, none evictable): the call goes unseen.
    let _ = IO_CALLS.insert(thread, call, 0);
    0
}

/// Takes this thread's call kept at entry and checks its result. The socket is an address
/// read from the registers, not a typed pointer: no socket storage (`Sk::Read`).
#[inline(always)]
fn call_return(ctx: &RetProbeContext, op: u8) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    let Some(kept) = IO_CALLS.get_ptr(thread) else {
        // None: the call began before the kprobe was attached, or its entry was evicted.
        return 0;
    };
    // SAFETY: `kept` points at a preallocated map element, valid and 8-aligned memory for a
    // whole IoCall for the program's run whichever key holds it. Only this thread writes its
    // key; were the element evicted and recycled for another thread's call in between (the
    // map full of calls in flight), the copy is that call's socket: checked below as this
    // call's, at worst a report against the wrong socket, as rare as such an eviction.
    let IoCall { sk, op: kept_op } = unsafe { core::ptr::read(kept) };
    let _ = IO_CALLS.remove(thread);
    if kept_op != u64::from(op) {
        return 0;
    }
    after_peer_end(sk, ctx.ret::<i32>(), op, Protocol::Tcp, Sk::Read)
}

#[inline(always)]
fn from_tracepoint(ctx: &TracePointContext, op: u8) -> u32 {
    let tp = layout(Tp::SockLength);
    let mut record = Record::new();
    if !record.fill(ctx, &tp) || record.get::<u16>(tp.protocol) != Some(IPPROTO_TCP) {
        return 0;
    }
    match (record.get::<u64>(tp.skaddr), record.get::<i32>(tp.ret)) {
        (Some(sk), Some(ret)) => after_peer_end(sk, ret, op, Protocol::Tcp, Sk::Read),
        _ => 0,
    }
}

/// Whether the hook already knows the socket is TCP (`sock_*_length` fire for every
/// protocol; the typed ones check only when it matters, after the cheaper tests).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Tcp,
    Unchecked,
}

/// Where the hook's `sk` came from: socket storage takes only the kernel's typed pointer
/// (the verifier checks its type), not an address read out of a tracepoint record or a
/// kprobe's registers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sk {
    Typed,
    Read,
}

#[inline(always)]
fn after_peer_end(sk: u64, ret: i32, op: u8, protocol: Protocol, origin: Sk) -> u32 {
    // `io_marks` is a load-time constant: on kernels without socket storage for tracing
    // programs the verifier never walks this branch, so the helper call is not refused.
    if ret > 0
        && origin == Sk::Typed
        && settings().io_marks != 0
        && (protocol == Protocol::Tcp || is_tcp(sk))
    {
        mark_io(sk, op);
    }
    // Data moved, or a non-blocking socket had none: the common case, done.
    if (ret > 0 && op == io::RECV) || ret == -EAGAIN || ret == -EINTR {
        return 0;
    }
    // After a FIN the socket still accepts writes (CLOSE_WAIT), so a successful send is
    // interesting there, and in CLOSE when the write itself drew the peer's RST.
    if ret > 0 {
        let state = sk_state(sk);
        if state != tcp_state::CLOSE_WAIT && state != tcp_state::CLOSE {
            return 0;
        }
    }
    if protocol == Protocol::Unchecked && !is_tcp(sk) {
        return 0;
    }
    let mut copy = MaybeUninit::<PeerEnded>::uninit();
    let mark = copy.as_mut_ptr();
    if !peer_ended(sk, mark) {
        return 0;
    }
    // SAFETY: `peer_ended` wrote the whole stack copy.
    let (at_ns, how, reported) = unsafe { ((*mark).at_ns, (*mark).how, (*mark).reported) };
    if reported != 0 {
        return 0;
    }
    // SAFETY: no preconditions; returns the monotonic clock.
    let since_ns = unsafe { bpf_ktime_get_ns() }.saturating_sub(at_ns);
    let woken = match how {
        peer_end::FIN => ret == 0,
        _ => ret == -ECONNRESET,
    };
    if op == io::RECV && woken && since_ns < settings().eof_grace_ns {
        // A reader woken by the FIN (EOF) or the RST (ECONNRESET): the application noticing
        // the end, as a healthy client does. Keep the mark for a later write.
        return 0;
    }
    if !spend(sk, mark) {
        return 0;
    }
    let subject = Subject::at_peer_end(mark, true);
    let Some(slot) = Slot::begin_for(hook::USED_AFTER_PEER_END, sk, subject) else {
        return 0;
    };
    let state = sk_state(sk);
    set!(slot, io, op);
    set!(slot, ret, ret);
    set!(slot, peer_end, how);
    set!(slot, since_peer_end_ms, ms(since_ns));
    set!(slot, old_state, state);
    set!(slot, new_state, state);
    copy_tuple(mark, &slot);
    slot.submit();
    0
}

/// Whole milliseconds in `ns`, saturating at `u32::MAX` (49 days).
#[inline(always)]
fn ms(ns: u64) -> u32 {
    u32::try_from(ns / 1_000_000).unwrap_or(u32::MAX)
}

/// Copies `sk`'s peer-end mark into `to` (a whole, 8-aligned `PeerEnded`, on the stack);
/// false when it has none. The copy may be of a recycled element (see the module doc):
/// act on it only through by-key operations on `sk` that fail once its mark is gone.
#[inline(always)]
pub fn peer_ended(sk: u64, to: *mut PeerEnded) -> bool {
    let Some(mark) = PEER_ENDED.get_ptr(sk) else {
        return false;
    };
    // SAFETY: `mark` points at a preallocated map element, valid and 8-aligned memory for a
    // whole PeerEnded whichever socket holds it now (only its contents can change); `to`
    // is the caller's whole, 8-aligned value.
    unsafe { copy_words(mark, to) };
    true
}

/// Marks `sk`'s mark reported by writing the whole copy back by key (`BPF_EXIST`), never
/// through the lookup's pointer: had the element been recycled, an in-place write would
/// spend another socket's mark and lose its report. False when `sk` has no mark any more
/// (evicted, or removed at destroy): the copy may then be another socket's, and the report
/// is dropped. `mark` is a whole copy from [`peer_ended`].
#[inline(always)]
fn spend(sk: u64, mark: *mut PeerEnded) -> bool {
    // SAFETY: `mark` is the caller's whole, 8-aligned stack copy; every byte of it was
    // written by `peer_ended`, so it may be read as a whole value.
    let result = unsafe {
        core::ptr::write_volatile(&raw mut (*mark).reported, 1);
        // A reference, not a value: a by-value copy could become an out-of-line memcpy.
        let value: &PeerEnded = &*mark;
        PEER_ENDED.insert(sk, value, u64::from(BPF_EXIST))
    };
    // On any other failure (no free element for the update) report anyway: the mark stays
    // unspent, so a later call may report it again (a duplicate, not a loss).
    result != Err(-ENOENT)
}

/// Copies the tuple a peer-end mark kept (as it was at the RST or FIN) into the event.
/// `mark` is a whole copy from [`peer_ended`].
#[inline(always)]
pub fn copy_tuple(mark: *const PeerEnded, slot: &Slot) {
    let event = slot.as_ptr();
    // SAFETY: both are whole, 8-aligned tuples (monitor-common asserts the offsets): the
    // reserved event's, and the caller's stack copy's.
    unsafe { copy_words(&raw const (*mark).tuple, &raw mut (*event).tuple) };
}

/// Records the application's data call on `sk` in the socket's storage, created on first use.
#[inline(always)]
fn mark_io(sk: u64, op: u8) {
    // SAFETY: `sk` is the hook's typed `struct sock *` argument, the type the helper takes
    // (the verifier checks it); the map pointer is the BTF map definition the loader
    // relocates to the map; no initial value is passed.
    let mark = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&IO_MARKS).cast_mut().cast(),
            sk as *mut c_void,
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<IoMark>();
    if mark.is_null() {
        return;
    }
    // SAFETY: non-null from the helper: this socket's storage, valid for the program's run.
    // Another CPU's call on the same socket may write it too: the last call wins, which is
    // what the mark means (the socket's last data call); a torn pair is a stamp off by one
    // concurrent call.
    unsafe {
        (*mark).at_ns = bpf_ktime_get_ns();
        (*mark).io = op;
    }
}

/// Flags `event` when a request was waiting for its answer on `sk` (the application's last
/// data call was a send), with how long. `sk` must be the hook's typed pointer.
#[inline(always)]
pub fn note_waiting_request(sk: u64, event: *mut ConnEvent) {
    if settings().io_marks == 0 {
        return;
    }
    // SAFETY: as in `mark_io`; flags 0: look up only, never create.
    let mark = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&IO_MARKS).cast_mut().cast(),
            sk as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<IoMark>();
    if mark.is_null() {
        return;
    }
    // SAFETY: non-null from the helper: this socket's storage; `event` is a whole, reserved
    // ConnEvent (the caller's slot).
    unsafe {
        if (*mark).io != io::SEND {
            return;
        }
        let waited_ns = bpf_ktime_get_ns().saturating_sub((*mark).at_ns);
        let flags = core::ptr::read_volatile(&raw const (*event).flags);
        core::ptr::write_volatile(
            &raw mut (*event).flags,
            flags | monitor_common::flags::AWAITING_ANSWER,
        );
        core::ptr::write_volatile(&raw mut (*event).waited_ms, ms(waited_ns));
    }
}

/// Remembers that the peer ended `sk` (`how`: [`peer_end`]), with its tuple as it is now.
#[inline(always)]
pub fn mark_peer_end(how: u8, source: &impl TupleSource, sk: u64) {
    let mut mark = MaybeUninit::<PeerEnded>::uninit();
    let ptr = mark.as_mut_ptr();
    if how == peer_end::RESET
        && peer_ended(sk, ptr)
        // SAFETY: `peer_ended` wrote the whole stack copy.
        && unsafe { (*ptr).how == peer_end::FIN && (*ptr).reported == 0 }
    {
        // The application has not touched the socket since the FIN: its next call is
        // reported against the FIN, the root cause (on loopback a write after FIN draws the
        // RST before the write's own hook runs). Were the copy of a recycled element (the
        // FIN mark evicted), the RST goes unmarked: the socket's mark was lost either way.
        return;
    }
    // SAFETY: every field of the stack value is written here or by `tuple`.
    unsafe {
        core::ptr::write_volatile(&raw mut (*ptr).at_ns, bpf_ktime_get_ns());
        core::ptr::write_volatile(&raw mut (*ptr).how, how);
        core::ptr::write_volatile(&raw mut (*ptr).reported, 0);
        core::ptr::write_volatile(&raw mut (*ptr).pad, 0);
        core::ptr::write_volatile(&raw mut (*ptr).pad2, 0);
        source.tuple(sk, &raw mut (*ptr).tuple);
        let _ = PEER_ENDED.insert(sk, mark.assume_init_ref(), 0);
    }
}
