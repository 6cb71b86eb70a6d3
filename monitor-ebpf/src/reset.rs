//! `tcp:tcp_receive_reset` and `tcp:tcp_send_reset`: RSTs in and out, with how long the
//! socket had been idle, read from its own timestamps (no per-packet hook).
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use monitor_common::{hook, peer_end, tcp_state};

use crate::{
    kernel::{Tp, field, layout, new_event, read_full_socket, read_tuple, sk_err, sk_state},
    maps::{emit, mark_peer_end},
};

/// Fires in softirq: the current task is not the owner (on loopback it is the RST sender).
#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let tp = layout(Tp::ReceiveReset);
    let Some(sk) = field::<u64>(&ctx, tp.skaddr) else {
        return 0;
    };
    let state = sk_state(sk);
    let mut event = new_event(hook::RECEIVE_RESET, sk);
    event.old_state = state;
    event.new_state = tcp_state::CLOSE;
    event.cookie = field(&ctx, tp.cookie).unwrap_or(0);
    read_tuple(&ctx, &tp, &mut event);
    read_full_socket(sk, tcp_state::is_synchronized(state), &mut event);
    emit(&event);
    mark_peer_end(peer_end::RESET, &event);
    0
}

/// `skaddr` may be NULL (no socket for the segment), a timewait or a request socket.
#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let tp = layout(Tp::SendReset);
    let sk = field::<u64>(&ctx, tp.skaddr).unwrap_or(0);
    let mut event = new_event(hook::SEND_RESET, sk);
    event.reason = field::<u32>(&ctx, tp.reason).unwrap_or(0) as u16;
    read_tuple(&ctx, &tp, &mut event);
    if sk != 0 {
        let state = sk_state(sk);
        event.old_state = state;
        if state != tcp_state::TIME_WAIT && state != tcp_state::NEW_SYN_RECV {
            // An abort (close with SO_LINGER 0, `ss -K`) moves the socket to CLOSE before the
            // RST leaves; its timestamps still tell how long it had been idle.
            let idle = tcp_state::is_synchronized(state) || state == tcp_state::CLOSE;
            read_full_socket(sk, idle, &mut event);
            // ECONNABORTED here means sock_destroy (`ss -K`) set it before the RST.
            event.sk_err = sk_err(sk);
        }
    }
    emit(&event);
    0
}
