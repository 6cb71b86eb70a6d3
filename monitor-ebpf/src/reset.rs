//! `tcp:tcp_receive_reset` and `tcp:tcp_send_reset`: RSTs in and out, with how long the
//! socket had been idle, read from its own timestamps (no per-packet hook).
#![expect(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand each program its context by value"
)]

use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use monitor_common::{hook, peer_end, tcp_state};

use crate::{
    event::{Slot, Subject, set},
    kernel::{
        FromRecord, FromSock, Record, Tp, TupleSource, layout, linger_zero, read_full_socket,
        sk_err, sk_state,
    },
    used_after::{mark_peer_end, note_waiting_request},
};

/// Fires in softirq: the current task is not the owner (on loopback it is the RST sender).
#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let tp = layout(Tp::ReceiveReset);
    let mut record = Record::new();
    if !record.fill(&ctx, &tp) {
        return 0;
    }
    let Some(sk) = record.get::<u64>(tp.skaddr) else {
        return 0;
    };
    received_reset(
        sk,
        record.get(tp.cookie).unwrap_or(0),
        &FromRecord(&record, &tp),
    )
}

/// `tcp_receive_reset(struct sock *sk)` as a typed raw tracepoint: no record, and the
/// socket's storage is reachable, which tells a request waiting for its answer (not idle).
/// The tracepoint's cookie is computed into its record only, so it is 0 here.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset_btf(ctx: BtfTracePointContext) -> i32 {
    received_reset(ctx.arg::<u64>(0), 0, &FromSock).cast_signed()
}

#[inline(always)]
fn received_reset<S: TupleSource>(sk: u64, cookie: u64, source: &S) -> u32 {
    mark_peer_end(peer_end::RESET, source, sk);
    let Some(slot) = Slot::begin(hook::RECEIVE_RESET, sk) else {
        return 0;
    };
    let state = sk_state(sk);
    set!(slot, old_state, state);
    set!(slot, new_state, tcp_state::CLOSE);
    set!(slot, cookie, cookie);
    // SAFETY: the slot's event is a whole, reserved ConnEvent.
    source.tuple(sk, unsafe { &raw mut (*slot.as_ptr()).tuple });
    read_full_socket(sk, tcp_state::is_synchronized(state), slot.as_ptr());
    if S::TYPED_SK && state == tcp_state::ESTABLISHED {
        note_waiting_request(sk, slot.as_ptr());
    }
    slot.submit();
    0
}

/// `skaddr` may be NULL (no socket for the segment), a timewait or a request socket.
#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let tp = layout(Tp::SendReset);
    let mut record = Record::new();
    if !record.fill(&ctx, &tp) {
        return 0;
    }
    let sk = record.get::<u64>(tp.skaddr).unwrap_or(0);
    // The record has the ports whatever `sk` is: none, timewait, request or full socket.
    let subject = Subject {
        ports: Some(record.ports(&tp)),
        caller: false,
    };
    let Some(slot) = Slot::begin_for(hook::SEND_RESET, sk, subject) else {
        return 0;
    };
    set!(
        slot,
        reason,
        // `enum sk_rst_reason` counts a few dozen reasons; u16::MAX names none.
        u16::try_from(record.get::<u32>(tp.reason).unwrap_or(0)).unwrap_or(u16::MAX)
    );
    // SAFETY: the slot's event is a whole, reserved ConnEvent.
    record.tuple(&tp, sk, unsafe { &raw mut (*slot.as_ptr()).tuple });
    if sk != 0 {
        let state = sk_state(sk);
        set!(slot, old_state, state);
        if state != tcp_state::TIME_WAIT && state != tcp_state::NEW_SYN_RECV {
            // An abort (close with SO_LINGER 0, `ss -K`) moves the socket to CLOSE before the
            // RST leaves; its timestamps still tell how long it had been idle.
            let idle = tcp_state::is_synchronized(state) || state == tcp_state::CLOSE;
            read_full_socket(sk, idle, slot.as_ptr());
            // ECONNABORTED here means sock_destroy (`ss -K`) set it before the RST.
            set!(slot, sk_err, sk_err(sk));
            if linger_zero(sk) {
                // SAFETY: the slot's event is a whole, reserved ConnEvent.
                let flags = unsafe { core::ptr::read_volatile(&raw const (*slot.as_ptr()).flags) };
                set!(slot, flags, flags | monitor_common::flags::LINGER_ZERO);
            }
        }
    }
    slot.submit();
    0
}
