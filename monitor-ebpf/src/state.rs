//! `sock:inet_sock_set_state`: every TCP state change, and the moments a socket is born.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use monitor_common::{IPPROTO_TCP, SockOwner, hook, peer_end, tcp_state};

use crate::{
    kernel::{Tp, current, field, layout, new_event, read_full_socket, read_tuple, sk_err},
    maps::{OWNERS, emit, mark_peer_end},
};

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let tp = layout(Tp::SetState);
    if field::<u16>(&ctx, tp.protocol) != Some(IPPROTO_TCP) {
        return 0;
    }
    let Some(sk) = field::<u64>(&ctx, tp.skaddr) else {
        return 0;
    };
    let old_state = field::<i32>(&ctx, tp.old_state).unwrap_or(0) as u8;
    let new_state = field::<i32>(&ctx, tp.new_state).unwrap_or(0) as u8;
    record_birth(sk, new_state);

    let mut event = new_event(hook::STATE_CHANGE, sk);
    event.old_state = old_state;
    event.new_state = new_state;
    read_tuple(&ctx, &tp, &mut event);
    // Idle as of the old state: ESTABLISHED → CLOSE_WAIT measures how long the peer's FIN
    // found the connection unused.
    read_full_socket(sk, tcp_state::is_synchronized(old_state), &mut event);
    if new_state == tcp_state::CLOSE {
        // Why it died: ETIMEDOUT from retransmission/keepalive/user timeouts, ECONNRESET
        // after an RST, ECONNABORTED from sock_destroy, 0 after a normal close.
        event.sk_err = sk_err(sk);
    }
    emit(&event);
    if new_state == tcp_state::CLOSE_WAIT {
        // The peer sent FIN: the application's next write or EOF read is worth reporting.
        mark_peer_end(peer_end::FIN, &event);
    }
    0
}

/// Starts the owner map entry, so that events name one socket's life, not its address.
#[inline(always)]
fn record_birth(sk: u64, new_state: u8) {
    let owner = match new_state {
        // connect() and listen() run in the owner's process context.
        tcp_state::SYN_SENT | tcp_state::LISTEN => current(),
        // A passive child is born in softirq; its owner is filled in at accept().
        tcp_state::SYN_RECV => SockOwner {
            tgid: 0,
            pid: 0,
            comm: [0; 16],
            ..current()
        },
        _ => return,
    };
    let _ = OWNERS.insert(sk, owner, 0);
}
