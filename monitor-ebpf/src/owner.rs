//! Ownership: who accepted a socket, and forgetting sockets the kernel destroyed (telling
//! userspace of those its peer had reset).
#![expect(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand each program its context by value"
)]

use core::mem::MaybeUninit;

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use aya_log_ebpf::debug;
use monitor_common::{PeerEnded, SockOwner, hook, peer_end, tcp_state};

use crate::{
    event::{Slot, Subject, set},
    kernel::{Record, Tp, is_inet_tcp, layout, new_owner, set_owner_task, sock_of_fd},
    maps::{OWNERS, PEER_ENDED},
    used_after::{copy_tuple, peer_ended},
};

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    record_acceptor(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    record_acceptor(&ctx)
}

/// accept() returns in the owner's process context: the one place a passive socket's
/// process is known for sure.
#[inline(always)]
fn record_acceptor(ctx: &TracePointContext) -> u32 {
    let tp = layout(Tp::SysExit);
    let mut record = Record::new();
    if !record.fill(ctx, &tp) {
        return 0;
    }
    let Some(fd) = record
        .get::<i64>(tp.ret)
        .and_then(|ret| u64::try_from(ret).ok())
    else {
        // No record, or accept() failed (a negative errno).
        return 0;
    };
    let Some(sk) = sock_of_fd(fd) else {
        // The fd table walk failed (or another thread closed the fd already).
        debug!(
            ctx,
            "accept() returned fd {} but no socket was found behind it", fd
        );
        return 0;
    };
    if !is_inet_tcp(sk) {
        return 0;
    }
    if let Some(known) = OWNERS.get_ptr_mut(sk) {
        // Born at SYN_RECV (its birth time identifies this socket's life): filled in place,
        // which spares the LRU map allocating a new element as an update would. Were the
        // element recycled for another socket meanwhile (the map full), that socket would
        // be named as owned by this task: a known, rare misattribution, never a fault.
        set_owner_task(known);
    } else {
        let mut owner = MaybeUninit::<SockOwner>::uninit();
        new_owner(owner.as_mut_ptr(), true);
        // SAFETY: new_owner wrote every field.
        let _ = OWNERS.insert(sk, unsafe { owner.assume_init_ref() }, 0);
    }
    0
}

#[tracepoint(category = "tcp", name = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    let tp = layout(Tp::DestroySock);
    let mut record = Record::new();
    if record.fill(&ctx, &tp)
        && let Some(sk) = record.get::<u64>(tp.skaddr)
    {
        // Few sockets were ever ended by their peer: a lookup is cheaper than a delete,
        // which locks the hash bucket even when the key is absent.
        let mut copy = MaybeUninit::<PeerEnded>::uninit();
        let mark = copy.as_mut_ptr();
        // The delete is by key: it fails when the socket's own mark is gone (evicted, its
        // element maybe recycled for another socket since the copy), and then the copy is
        // not trusted (see `used_after`).
        if peer_ended(sk, mark)
            && PEER_ENDED.remove(sk).is_ok()
            // SAFETY: `peer_ended` wrote the whole stack copy.
            && unsafe { (*mark).how } == peer_end::RESET
        {
            destroyed_after_reset(sk, mark);
        }
        // After the event: its birth time, from this entry, tells this socket's life from a
        // later one at the same address.
        let _ = OWNERS.remove(sk);
    }
    0
}

/// The application let go of a socket its peer reset (closed it, or had before the RST):
/// userspace counts an idle reset it was holding back as handled. Only after a reset: a
/// FIN's handling shows in the state change its close makes (CLOSE_WAIT → LAST_ACK).
/// `mark` is a whole copy from `peer_ended`.
#[inline(always)]
fn destroyed_after_reset(sk: u64, mark: *const PeerEnded) {
    let Some(slot) = Slot::begin_for(hook::DESTROY, sk, Subject::at_peer_end(mark, false)) else {
        return;
    };
    set!(slot, old_state, tcp_state::CLOSE);
    set!(slot, new_state, tcp_state::CLOSE);
    set!(slot, peer_end, peer_end::RESET);
    copy_tuple(mark, &slot);
    slot.submit();
}
