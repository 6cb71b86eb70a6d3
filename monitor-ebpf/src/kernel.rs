//! Reading the kernel: tracepoint records and `struct sock` fields at offsets that userspace
//! resolved from the running kernel (tracefs formats and BTF) and wrote into these globals.
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_jiffies64,
        bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    programs::TracePointContext,
};
use monitor_common::{
    ABSENT, AF_INET, AF_INET6, ConnEvent, KernelLayout, Settings, SockOwner, TpLayout, UNKNOWN_MS,
    flags,
};

use crate::maps::OWNERS;

// Globals overwritten by the loader (`EbpfLoader::override_global`); the values here are
// placeholders that make every read fail safe (ABSENT) rather than read a wrong offset.
#[unsafe(no_mangle)]
static KERNEL: KernelLayout = KernelLayout::zeroed();
#[unsafe(no_mangle)]
static SETTINGS: Settings = Settings {
    eof_grace_ns: 0,
    wakeup_bytes: 0,
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
    // read_volatile: without it the compiler folds the placeholder values in.
    unsafe {
        core::ptr::read_volatile(match tp {
            Tp::SetState => &TP_SET_STATE,
            Tp::ReceiveReset => &TP_RECEIVE_RESET,
            Tp::SendReset => &TP_SEND_RESET,
            Tp::DestroySock => &TP_DESTROY_SOCK,
            Tp::SysExit => &TP_SYS_EXIT,
            Tp::SockLength => &TP_SOCK_LENGTH,
        })
    }
}

#[inline(always)]
fn kernel() -> KernelLayout {
    unsafe { core::ptr::read_volatile(&KERNEL) }
}

#[inline(always)]
pub fn settings() -> Settings {
    unsafe { core::ptr::read_volatile(&SETTINGS) }
}

/// Reads a tracepoint field; `None` when this kernel's tracepoint lacks it.
#[inline(always)]
pub fn field<T>(ctx: &TracePointContext, offset: u16) -> Option<T> {
    if offset == ABSENT {
        return None;
    }
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

/// Reads `T` at `base + offset` in kernel memory.
#[inline(always)]
fn read<T>(base: u64, offset: i64) -> Option<T> {
    if base == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base as i64 + offset) as *const T) }.ok()
}

/// Fills family, ports and addresses from the record, for either address layout.
#[inline(always)]
pub fn read_tuple(ctx: &TracePointContext, tp: &TpLayout, event: &mut ConnEvent) {
    if tp.saddr_sockaddr != ABSENT {
        // sockaddr_in { u16 family; be16 port; be32 addr } or
        // sockaddr_in6 { u16 family; be16 port; u32 flowinfo; u8 addr[16] }.
        let family: u16 = field(ctx, tp.saddr_sockaddr).unwrap_or(0);
        event.family = family;
        let addr_at = if family == AF_INET6 { 8 } else { 4 };
        event.sport = u16::from_be(field(ctx, tp.saddr_sockaddr + 2).unwrap_or(0));
        event.dport = u16::from_be(field(ctx, tp.daddr_sockaddr + 2).unwrap_or(0));
        if family == AF_INET6 {
            event.saddr = field(ctx, tp.saddr_sockaddr + addr_at).unwrap_or([0; 16]);
            event.daddr = field(ctx, tp.daddr_sockaddr + addr_at).unwrap_or([0; 16]);
        } else {
            copy4(&mut event.saddr, field(ctx, tp.saddr_sockaddr + addr_at));
            copy4(&mut event.daddr, field(ctx, tp.daddr_sockaddr + addr_at));
        }
        return;
    }
    event.family = field(ctx, tp.family).unwrap_or(0);
    event.sport = field(ctx, tp.sport).unwrap_or(0);
    event.dport = field(ctx, tp.dport).unwrap_or(0);
    if event.family == AF_INET {
        copy4(&mut event.saddr, field(ctx, tp.saddr));
        copy4(&mut event.daddr, field(ctx, tp.daddr));
    } else {
        event.saddr = field(ctx, tp.saddr_v6).unwrap_or([0; 16]);
        event.daddr = field(ctx, tp.daddr_v6).unwrap_or([0; 16]);
    }
}

#[inline(always)]
fn copy4(dst: &mut [u8; 16], src: Option<[u8; 4]>) {
    if let Some(src) = src {
        dst[0] = src[0];
        dst[1] = src[1];
        dst[2] = src[2];
        dst[3] = src[3];
    }
}

/// `sk->__sk_common.skc_state`; valid for full, timewait and request sockets alike.
#[inline(always)]
pub fn sk_state(sk: u64) -> u8 {
    read::<u8>(sk, kernel().sk_state as i64).unwrap_or(0)
}

/// `sk->sk_err` of a full socket.
#[inline(always)]
pub fn sk_err(sk: u64) -> i32 {
    read::<i32>(sk, kernel().sk_err as i64).unwrap_or(0)
}

/// True for an IPv4/IPv6 TCP full socket (`accept()` also returns unix sockets).
#[inline(always)]
pub fn is_inet_tcp(sk: u64) -> bool {
    let k = kernel();
    let family = read::<u16>(sk, k.sk_family as i64).unwrap_or(0);
    let protocol = read::<u16>(sk, k.sk_protocol as i64).unwrap_or(0);
    (family == AF_INET || family == AF_INET6) && protocol == monitor_common::IPPROTO_TCP
}

/// Fields that need a full `tcp_sock`: idle times and inode. Callers check the state first,
/// because timewait and request mini-sockets end where `tcp_sock` fields begin. `idle`
/// says whether the send/receive stamps mean "last data" (not before the handshake ends).
#[inline(always)]
pub fn read_full_socket(sk: u64, idle: bool, event: &mut ConnEvent) {
    let k = kernel();
    event.flags |= flags::FULL_SOCKET;
    if let Some(socket) = read::<u64>(sk, k.sk_socket as i64) {
        event.inode = read::<u64>(socket, k.socket_ino as i64).unwrap_or(0);
    }
    if !idle || k.hz == 0 {
        return;
    }
    // tcp_sock times are u32 jiffies (tcp_jiffies32): compare in the same clock, wrapping.
    let now = unsafe { bpf_jiffies64() } as u32;
    let ms = |then: u32| (now.wrapping_sub(then) as u64 * 1000 / k.hz as u64) as u32;
    if let (Some(sent), Some(received)) = (
        read::<u32>(sk, k.tcp_lsndtime as i64),
        read::<u32>(sk, k.tcp_lrcvtime as i64),
    ) {
        event.since_send_ms = ms(sent).min(UNKNOWN_MS - 1);
        event.since_recv_ms = ms(received).min(UNKNOWN_MS - 1);
        event.flags |= flags::IDLE_KNOWN;
    }
}

/// Follows `current->files->fdt->fd[fd]->private_data->sk`: the socket an accept() returned.
#[inline(always)]
pub fn sock_of_fd(fd: u64) -> Option<u64> {
    let k = kernel();
    let task = unsafe { aya_ebpf::helpers::generated::bpf_get_current_task() };
    let files = read::<u64>(task, k.task_files as i64)?;
    let fdt = read::<u64>(files, k.files_fdt as i64)?;
    let max_fds = read::<u32>(fdt, k.fdt_max_fds as i64)?;
    if fd >= max_fds as u64 {
        return None;
    }
    let fds = read::<u64>(fdt, k.fdt_fd as i64)?;
    let file = read::<u64>(fds, (fd * 8) as i64)?;
    let socket = read::<u64>(file, k.file_private_data as i64)?;
    let sk = read::<u64>(socket, k.socket_sk as i64)?;
    (sk != 0).then_some(sk)
}

/// The task running now. In softirq this is whoever was interrupted, not the socket's owner.
#[inline(always)]
pub fn current() -> SockOwner {
    let pid_tgid = bpf_get_current_pid_tgid();
    SockOwner {
        born_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// A new event for `sk` stamped with the current task and the owner map's entry.
#[inline(always)]
pub fn new_event(hook: u8, sk: u64) -> ConnEvent {
    let now = current();
    let mut event = ConnEvent::zeroed();
    event.ts_ns = now.born_ns;
    event.hook = hook;
    event.skaddr = sk;
    event.ctx_tgid = now.tgid;
    event.ctx_pid = now.pid;
    event.ctx_comm = now.comm;
    event.cgroup_id = now.cgroup_id;
    if sk != 0
        && let Some(owner) = unsafe { OWNERS.get(sk) }
    {
        event.born_ns = owner.born_ns;
        if owner.tgid != 0 {
            event.flags |= flags::OWNER_KNOWN;
            event.owner_tgid = owner.tgid;
            event.owner_pid = owner.pid;
            event.owner_comm = owner.comm;
            event.cgroup_id = owner.cgroup_id;
        }
    }
    event
}
