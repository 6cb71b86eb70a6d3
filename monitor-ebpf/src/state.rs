//! `sock:inet_sock_set_state`: every TCP state change, and the moments a socket is born.
//! A typed raw tracepoint where the kernel allows it, else the classic one.
#![expect(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand each program its context by value"
)]

use core::mem::MaybeUninit;

use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use aya_log_ebpf::debug;
use monitor_common::{ConnectKey, IPPROTO_TCP, SockOwner, Tuple, hook, peer_end, tcp_state};

use crate::{
    event::{Slot, set},
    kernel::{
        FromRecord, FromSock, Record, Tp, TupleSource, copy_words, is_tcp, layout, new_owner,
        read_full_socket, settings, sk_err, split_pid_tgid,
    },
    maps::{CONNECTS, OWNERS, TRANSITIONS},
    used_after::{mark_peer_end, note_waiting_request},
};

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let tp = layout(Tp::SetState);
    let mut record = Record::new();
    if !record.fill(&ctx, &tp) || record.get::<u16>(tp.protocol) != Some(IPPROTO_TCP) {
        return 0;
    }
    let Some(sk) = record.get::<u64>(tp.skaddr) else {
        return 0;
    };
    let old_state = state(record.get::<i32>(tp.old_state).unwrap_or(0));
    let new_state = state(record.get::<i32>(tp.new_state).unwrap_or(0));
    state_changed(sk, old_state, new_state, &FromRecord(&record, &tp))
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)` as a typed raw
/// tracepoint: the kernel builds no record (which costs on every state change of every
/// socket, TCP or not), and the 4-tuple is read from the socket only for the few changes
/// that need it. Preferred where the kernel allows it; the classic tracepoint is the
/// fallback.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    if !is_tcp(sk) {
        return 0;
    }
    let (old_state, new_state) = (state(ctx.arg::<i32>(1)), state(ctx.arg::<i32>(2)));
    state_changed(sk, old_state, new_state, &FromSock).cast_signed()
}

/// A TCP state as the kernel passes it (an `int`); 0, never a state, if out of range
/// (then counted and logged as an unexpected change).
#[inline(always)]
fn state(raw: i32) -> u8 {
    u8::try_from(raw).unwrap_or(0)
}

/// What every TCP state change does: count it, note births and connects, mark the peer's
/// FIN, and stream the few changes userspace acts on.
#[inline(always)]
fn state_changed<S: TupleSource>(sk: u64, old_state: u8, new_state: u8, source: &S) -> u32 {
    if !known(old_state) || !known(new_state) {
        // The transition counters' slots are 4 bits per state: an unknown one is counted
        // as another change.
        debug!(
            &(),
            "unexpected TCP state change {} -> {}", old_state, new_state
        );
    }
    if let Some(count) = TRANSITIONS.get_ptr_mut(tcp_state::index(old_state, new_state)) {
        // SAFETY: a valid slot of a per-CPU array: this CPU's copy. Only programs on this
        // CPU write it, and trace_call_bpf's per-CPU guard keeps them from nesting; were
        // one to interrupt this increment, a count would be lost, nothing worse.
        unsafe { *count += 1 };
    }
    record_birth(sk, new_state);
    if tcp_state::is_connect(old_state, new_state) {
        count_connect(source, sk, new_state == tcp_state::ESTABLISHED);
    }
    if new_state == tcp_state::CLOSE_WAIT {
        // The peer sent FIN: the application's next write or EOF read is worth reporting.
        mark_peer_end(peer_end::FIN, source, sk);
    }
    if settings().all_state_changes == 0 && !tcp_state::streamed(old_state, new_state) {
        return 0;
    }

    let Some(slot) = Slot::begin(hook::STATE_CHANGE, sk) else {
        return 0;
    };
    set!(slot, old_state, old_state);
    set!(slot, new_state, new_state);
    // SAFETY: the slot's event is a whole, reserved ConnEvent.
    source.tuple(sk, unsafe { &raw mut (*slot.as_ptr()).tuple });
    // Idle as of the old state: ESTABLISHED → CLOSE_WAIT measures how long the peer's FIN
    // found the connection unused.
    read_full_socket(sk, tcp_state::is_synchronized(old_state), slot.as_ptr());
    if S::TYPED_SK && old_state == tcp_state::ESTABLISHED {
        note_waiting_request(sk, slot.as_ptr());
    }
    if new_state == tcp_state::CLOSE {
        // Why it died: ETIMEDOUT from retransmission/keepalive/user timeouts, ECONNRESET
        // after an RST, ECONNABORTED from sock_destroy, 0 after a normal close.
        set!(slot, sk_err, sk_err(sk));
    }
    slot.submit();
    0
}

/// A TCP state this kernel defines (`TCP_ESTABLISHED` 1 to `TCP_NEW_SYN_RECV` 12).
#[inline(always)]
fn known(state: u8) -> bool {
    (tcp_state::ESTABLISHED..=tcp_state::NEW_SYN_RECV).contains(&state)
}

/// Starts the owner map entry, so that events name one socket's life, not its address.
#[inline(always)]
fn record_birth(sk: u64, new_state: u8) {
    let with_task = match new_state {
        // connect() and listen() run in the owner's process context.
        tcp_state::SYN_SENT | tcp_state::LISTEN => true,
        // A passive child is born in softirq; its owner is filled in at accept().
        tcp_state::SYN_RECV => false,
        _ => return,
    };
    let mut owner = MaybeUninit::<SockOwner>::uninit();
    new_owner(owner.as_mut_ptr(), with_task);
    // SAFETY: new_owner wrote every field.
    let _ = OWNERS.insert(sk, unsafe { owner.assume_init_ref() }, 0);
}

/// Counts a connect against its process and endpoint (see `ConnectKey`): a pool's connect
/// rate without an event per connection.
#[inline(always)]
fn count_connect(source: &impl TupleSource, sk: u64, inbound: bool) {
    let mut tuple = MaybeUninit::<Tuple>::uninit();
    let mut key = MaybeUninit::<ConnectKey>::uninit();
    let (t, k) = (tuple.as_mut_ptr(), key.as_mut_ptr());
    // SAFETY: `tuple` writes every field of the stack tuple; every field of the stack key is
    // written below, the address as two 8-byte words of the 8-aligned tuple's.
    unsafe {
        source.tuple(sk, t);
        let (addr, port, tgid) = if inbound {
            (&raw const (*t).saddr, (*t).sport, 0)
        } else {
            let [tgid, _] = split_pid_tgid(aya_ebpf::helpers::bpf_get_current_pid_tgid());
            (&raw const (*t).daddr, (*t).dport, tgid)
        };
        copy_words(addr, &raw mut (*k).addr);
        core::ptr::write_volatile(&raw mut (*k).tgid, tgid);
        core::ptr::write_volatile(&raw mut (*k).port, port);
        core::ptr::write_volatile(&raw mut (*k).inbound, u8::from(inbound));
        let ipv6 = core::ptr::read_volatile(&raw const (*t).family) == monitor_common::AF_INET6;
        core::ptr::write_volatile(&raw mut (*k).ipv6, u8::from(ipv6));
    }
    // SAFETY: every field was written above.
    let key = unsafe { key.assume_init_ref() };
    if let Some(count) = CONNECTS.get_ptr_mut(key) {
        // SAFETY: a value of a preallocated map, 8-aligned and valid for 8 bytes; other
        // CPUs add to it too, hence the atomic add (BPF_XADD: the BPF target has no atomic
        // read-modify-write in `core`). It writes only that word.
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({count} + 0) += {one}",
                count = in(reg) count,
                one = in(reg) 1u64,
                options(nostack),
            );
        }
    } else {
        // BPF_NOEXIST: when another CPU created the entry meanwhile, this connect is not
        // counted (rare: only the first connects of an endpoint race).
        let _ = CONNECTS.insert(key, 1, 1);
    }
}
