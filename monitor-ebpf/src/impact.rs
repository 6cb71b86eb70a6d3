//! `sock:sock_send_length` / `sock:sock_recv_length`: the application runs into a connection
//! its peer already ended (write: broken pipe, ECONNRESET, EOF). These fire on every
//! send/recv on the host, so a healthy call leaves after reading its return value (and, for
//! a successful send, the socket state); only marked sockets cost a map lookup.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use monitor_common::{IPPROTO_TCP, hook, io, peer_end, tcp_state};

use crate::{
    kernel::{Tp, field, layout, new_event, settings, sk_state},
    maps::{PEER_ENDED, emit},
};

const EAGAIN: i32 = 11;
const EINTR: i32 = 4;

#[tracepoint(category = "sock", name = "sock_send_length")]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    after_peer_end(&ctx, io::SEND)
}

#[tracepoint(category = "sock", name = "sock_recv_length")]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    after_peer_end(&ctx, io::RECV)
}

#[inline(always)]
fn after_peer_end(ctx: &TracePointContext, op: u8) -> u32 {
    let tp = layout(Tp::SockLength);
    let Some(ret) = field::<i32>(ctx, tp.ret) else {
        return 0;
    };
    // Data moved, or a non-blocking socket had none: the common case, done.
    if (ret > 0 && op == io::RECV) || ret == -EAGAIN || ret == -EINTR {
        return 0;
    }
    let Some(sk) = field::<u64>(ctx, tp.skaddr) else {
        return 0;
    };
    // After a FIN the socket still accepts writes (CLOSE_WAIT), so a successful send is
    // interesting there, and in CLOSE when the write itself drew the peer's RST.
    if ret > 0 {
        let state = sk_state(sk);
        if state != tcp_state::CLOSE_WAIT && state != tcp_state::CLOSE {
            return 0;
        }
    }
    if field::<u16>(ctx, tp.protocol) != Some(IPPROTO_TCP) {
        return 0;
    }
    let Some(mark) = PEER_ENDED.get_ptr_mut(sk) else {
        return 0;
    };
    // SAFETY: the pointer is from a map lookup on this CPU; a racing update of `reported`
    // can at worst report twice, never read freed memory (LRU entries are preallocated).
    let found = unsafe { *mark };
    if found.reported != 0 {
        return 0;
    }
    let since_ns = unsafe { bpf_ktime_get_ns() }.saturating_sub(found.at_ns);
    if op == io::RECV
        && ret == 0
        && found.how == peer_end::FIN
        && since_ns < settings().eof_grace_ns
    {
        // A reader woken by the FIN: an ordinary close. Keep the mark for a later write.
        return 0;
    }
    unsafe { (*mark).reported = 1 };
    let mark = found;
    let mut event = new_event(hook::IO_AFTER_PEER_END, sk);
    event.io = op;
    event.ret = ret;
    event.peer_end = mark.how;
    event.since_peer_end_ms = (since_ns / 1_000_000) as u32;
    event.old_state = sk_state(sk);
    event.new_state = event.old_state;
    event.family = mark.family;
    event.sport = mark.sport;
    event.dport = mark.dport;
    event.saddr = mark.saddr;
    event.daddr = mark.daddr;
    emit(&event);
    0
}
