//! Types shared by the eBPF programs (`monitor-ebpf`) and the daemon (`monitor`).
//!
//! Everything here is `#[repr(C)]` with explicit padding: the kernel writes these bytes and
//! userspace reads them, so both sides must agree on every offset.
#![cfg_attr(not(test), no_std)]

/// Which hook produced a [`ConnEvent`].
pub mod hook {
    /// `sock:inet_sock_set_state` for a TCP socket.
    pub const STATE_CHANGE: u8 = 1;
    /// `tcp:tcp_receive_reset`: the peer reset this socket.
    pub const RECEIVE_RESET: u8 = 2;
    /// `tcp:tcp_send_reset`: this host sent an RST.
    pub const SEND_RESET: u8 = 3;
    /// `sock:sock_send_length` / `sock:sock_recv_length` on a socket whose peer had ended
    /// the connection: the application ran into it.
    pub const USED_AFTER_PEER_END: u8 = 4;
    /// `tcp:tcp_destroy_sock` of a socket the peer had reset: the application closed it
    /// (or had already, and the kernel freed it at the RST). Sent only for such sockets, so
    /// that userspace can tell an idle reset the application handled from one it still holds.
    pub const DESTROY: u8 = 5;
}

/// How the peer ended a connection ([`PeerEnded::how`], [`ConnEvent::peer_end`]).
pub mod peer_end {
    pub const RESET: u8 = 1;
    pub const FIN: u8 = 2;
}

/// Which call ran into the ended connection ([`ConnEvent::io`]).
pub mod io {
    pub const SEND: u8 = 1;
    pub const RECV: u8 = 2;
}

/// Bits of [`ConnEvent::flags`].
pub mod flags {
    /// `owner_*` fields come from the owner map (captured at connect/accept/listen).
    pub const OWNER_KNOWN: u8 = 1 << 0;
    /// `since_send_ms` / `since_recv_ms` were read from the socket.
    pub const IDLE_KNOWN: u8 = 1 << 1;
    /// `skaddr` was a full socket (not NULL, not a timewait or request mini-socket).
    pub const FULL_SOCKET: u8 = 1 << 2;
    /// The socket sending an RST had SO_LINGER on with a zero timeout: the application
    /// closed it to abort. Tells that abort from a close with unread data on kernels whose
    /// `tcp_send_reset` gives no reason (before 6.10).
    pub const LINGER_ZERO: u8 = 1 << 3;
    /// The application's last data call on the socket (its [`IoMark`](crate::IoMark)) was
    /// a send: a request waited for its answer, for `waited_ms`. Such a socket is not idle,
    /// whatever its timestamps say.
    pub const AWAITING_ANSWER: u8 = 1 << 4;
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;

    /// Slots of the kernel's per-CPU transition counters: `index(old, new)`.
    pub const TRANSITIONS: u32 = 256;

    /// The counter slot of `old → new` (states are 1..=12, four bits each).
    pub const fn index(old: u8, new: u8) -> u32 {
        ((old & 0xf) as u32) << 4 | (new & 0xf) as u32
    }

    /// The state changes userspace acts on, so the only ones that cross the ring buffer
    /// unless every change is asked for: the peer's FIN (→ CLOSE_WAIT), the application
    /// closing after it (CLOSE_WAIT →), and an end that is not an orderly close (→ CLOSE
    /// from any state but LAST_ACK, FIN_WAIT2 or CLOSING: a reset, a timeout, an abort, a
    /// refused connect), with its error. A healthy connection's other changes (connect and
    /// accept, counted per endpoint in `ConnectKey`'s map; FIN_WAIT*, TIME_WAIT, an orderly
    /// end) are only counted, in the kernel.
    pub const fn streamed(old: u8, new: u8) -> bool {
        new == CLOSE_WAIT
            || old == CLOSE_WAIT
            || (new == CLOSE && !matches!(old, LAST_ACK | FIN_WAIT2 | CLOSING))
    }

    /// A connect the kernel counts per endpoint: an active open (→ SYN_SENT, in the
    /// connecting process's context) or a passive child becoming ESTABLISHED.
    pub const fn is_connect(old: u8, new: u8) -> bool {
        new == SYN_SENT || (old == SYN_RECV && new == ESTABLISHED)
    }

    /// States in which `tcp_sock` send/receive timestamps mean "last data exchanged".
    pub const fn is_synchronized(state: u8) -> bool {
        matches!(
            state,
            ESTABLISHED | FIN_WAIT1 | FIN_WAIT2 | CLOSE_WAIT | CLOSING | LAST_ACK
        )
    }
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
pub const TASK_COMM_LEN: usize = 16;

/// `since_*_ms` value meaning "not measured".
pub const UNKNOWN_MS: u32 = u32::MAX;

/// A connection's addresses, as the kernel program read them.
///
/// Addresses are always 16 bytes in IPv6 form: an `AF_INET` socket's are IPv4-mapped
/// (`::ffff:a.b.c.d`), as the tracepoints themselves store them, so the kernel side copies
/// one layout whatever the family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// `AF_INET` or `AF_INET6`; 0 when the kernel gave no socket (a stray segment's RST).
    pub family: u16,
    /// Local and remote ports, host byte order.
    pub sport: u16,
    pub dport: u16,
    /// Explicit padding (no implicit padding in a wire type), always 0.
    pub pad: u16,
}

/// One kernel observation, written to the `EVENTS` ring buffer.
///
/// The kernel side writes it in place in the ring buffer, field by field (see
/// `monitor-ebpf/src/event.rs`), so every byte, padding included, is written there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`; 0 for an RST sent with no socket.
    pub skaddr: u64,
    /// When the owner map first saw this socket; with `skaddr` it names one socket's life.
    pub born_ns: u64,
    /// Socket cookie where the tracepoint provides one, else 0.
    pub cookie: u64,
    /// Inode of the socket's file (0 before accept or after close).
    pub inode: u64,
    /// cgroup id of the owner (or of the current task when the owner is unknown).
    pub cgroup_id: u64,
    /// Milliseconds since the socket last sent data ([`UNKNOWN_MS`] if not measured).
    pub since_send_ms: u32,
    /// Milliseconds since the socket last received data ([`UNKNOWN_MS`] if not measured).
    pub since_recv_ms: u32,
    /// Owner's process id (tgid) from the owner map.
    pub owner_tgid: u32,
    /// Owner's thread id.
    pub owner_pid: u32,
    /// Task running when the hook fired: the caller in process context, anyone in softirq.
    pub ctx_tgid: u32,
    pub ctx_pid: u32,
    /// One of [`hook`].
    pub hook: u8,
    /// Bits of [`flags`].
    pub flags: u8,
    pub old_state: u8,
    pub new_state: u8,
    /// `enum sk_rst_reason` for sent resets on kernels that report it, else 0.
    pub reason: u16,
    /// One of [`io`] (0 for other hooks).
    pub io: u8,
    /// One of [`peer_end`] (0 for other hooks).
    pub peer_end: u8,
    /// Return value of the send/recv that ran into an ended connection.
    pub ret: i32,
    /// Milliseconds from the peer's RST/FIN to that send/recv.
    pub since_peer_end_ms: u32,
    /// `sk->sk_err` when a socket dies (state change to CLOSE) or sends an RST, else 0.
    pub sk_err: i32,
    /// With [`flags::AWAITING_ANSWER`]: milliseconds since the request was sent.
    pub waited_ms: u32,
    pub tuple: Tuple,
    pub owner_comm: [u8; TASK_COMM_LEN],
    pub ctx_comm: [u8; TASK_COMM_LEN],
    /// The socket's network namespace (`net->ns.inum`, the inode `/proc/<pid>/ns/net`
    /// shows), 0 when unknown: pods reuse addresses, so the tuple alone names no socket.
    pub netns: u32,
    /// Explicit padding to a whole 8-byte word, always 0.
    pub pad: u32,
}

impl ConnEvent {
    /// Size in bytes; the kernel side zeroes and copies it in 8-byte words.
    pub const SIZE: usize = 176;

    pub const fn zeroed() -> Self {
        ConnEvent {
            ts_ns: 0,
            skaddr: 0,
            born_ns: 0,
            cookie: 0,
            inode: 0,
            cgroup_id: 0,
            since_send_ms: UNKNOWN_MS,
            since_recv_ms: UNKNOWN_MS,
            owner_tgid: 0,
            owner_pid: 0,
            ctx_tgid: 0,
            ctx_pid: 0,
            hook: 0,
            flags: 0,
            old_state: 0,
            new_state: 0,
            reason: 0,
            io: 0,
            peer_end: 0,
            ret: 0,
            since_peer_end_ms: 0,
            sk_err: 0,
            waited_ms: 0,
            tuple: Tuple {
                saddr: [0; 16],
                daddr: [0; 16],
                family: 0,
                sport: 0,
                dport: 0,
                pad: 0,
            },
            owner_comm: [0; TASK_COMM_LEN],
            ctx_comm: [0; TASK_COMM_LEN],
            netns: 0,
            pad: 0,
        }
    }
}

/// A socket whose peer reset or closed it; the send/recv hooks look these up.
///
/// Keeps the 4-tuple as it was at the RST/FIN: by the time the application writes, a reset
/// socket has already released its local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerEnded {
    pub at_ns: u64,
    /// One of [`peer_end`].
    pub how: u8,
    /// Set once the application's first call into it was reported.
    pub reported: u8,
    /// Explicit padding up to `tuple`'s 8-byte word, always 0.
    pub pad: u16,
    pub pad2: u32,
    pub tuple: Tuple,
}

/// Who owns a socket, captured in process context (connect, accept, listen).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOwner {
    pub born_ns: u64,
    pub cgroup_id: u64,
    /// 0 while unknown (a passive socket between SYN_RECV and accept()).
    pub tgid: u32,
    pub pid: u32,
    pub comm: [u8; TASK_COMM_LEN],
}

/// Key of the kernel's connect counters: connects per process and endpoint, so that a
/// pool's connect rate needs no event per connection.
///
/// Outbound: the connecting process and the remote endpoint. Inbound: tgid 0 (the child is
/// born in softirq, before accept() names its owner) and the local endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectKey {
    /// IPv6 form; IPv4 as `::ffff:a.b.c.d`, as in [`Tuple`].
    pub addr: [u8; 16],
    pub tgid: u32,
    /// Host order.
    pub port: u16,
    /// 1 for a passive (accepted) connection.
    pub inbound: u8,
    /// 1 for an `AF_INET6` socket (whose peer may still be IPv4-mapped).
    pub ipv6: u8,
}

/// Field offsets of one classic tracepoint's record, read from tracefs `format` at load time.
///
/// Offsets change between kernels (`tcp_send_reset` switched to sockaddr fields in 6.10;
/// Linux 5.10's `tcp_receive_reset` has no `family`), so they are never compiled in.
/// [`ABSENT`] marks a field this kernel's tracepoint lacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpLayout {
    /// Bytes the kernel program copies from the record: past the end of every field here,
    /// at most [`MAX_RECORD_BYTES`].
    pub record_size: u16,
    pub skaddr: u16,
    /// `oldstate` (set_state) or `state` (send_reset).
    pub old_state: u16,
    pub new_state: u16,
    pub family: u16,
    pub protocol: u16,
    pub sport: u16,
    pub dport: u16,
    /// 16-byte addresses (IPv4-mapped for IPv4 sockets), 4-aligned.
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// `saddr`/`daddr` as `sockaddr_in6`-sized unions (tcp_send_reset since 6.10).
    pub saddr_sockaddr: u16,
    pub daddr_sockaddr: u16,
    pub cookie: u16,
    pub reason: u16,
    /// `ret` of a syscall exit or send/recv tracepoint.
    pub ret: u16,
    /// Explicit padding, always 0.
    pub pad: u16,
}

pub const ABSENT: u16 = u16::MAX;

/// The longest tracepoint record the kernel programs copy (one stack buffer).
pub const MAX_RECORD_BYTES: u16 = 128;

impl TpLayout {
    pub const fn absent() -> Self {
        TpLayout {
            record_size: 0,
            skaddr: ABSENT,
            old_state: ABSENT,
            new_state: ABSENT,
            family: ABSENT,
            protocol: ABSENT,
            sport: ABSENT,
            dport: ABSENT,
            saddr_v6: ABSENT,
            daddr_v6: ABSENT,
            saddr_sockaddr: ABSENT,
            daddr_sockaddr: ABSENT,
            cookie: ABSENT,
            reason: ABSENT,
            ret: ABSENT,
            pad: 0,
        }
    }
}

/// Kernel struct offsets resolved from the running kernel's BTF at load time.
///
/// aya-ebpf emits no CO-RE relocations, so the programs read fields at these offsets
/// instead of offsets baked in from the build machine's headers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    /// Kernel tick rate, to turn jiffies into milliseconds.
    pub hz: u32,
    /// `sock.__sk_common.skc_state` (u8).
    pub sk_state: u32,
    /// `sock.__sk_common.skc_family` (u16).
    pub sk_family: u32,
    /// `sock.sk_protocol` (u16).
    pub sk_protocol: u32,
    /// `sock.sk_socket` (struct socket *).
    pub sk_socket: u32,
    /// From a `struct socket *` to its inode's `i_ino`, via `struct socket_alloc`.
    pub socket_ino: i32,
    /// `tcp_sock.lsndtime` (u32 jiffies of the last data sent).
    pub tcp_lsndtime: u32,
    /// `tcp_sock.inet_conn.icsk_ack.lrcvtime` (u32 jiffies of the last data received).
    pub tcp_lrcvtime: u32,
    /// `task_struct.files`.
    pub task_files: u32,
    /// `files_struct.fdt`.
    pub files_fdt: u32,
    /// `fdtable.max_fds`.
    pub fdt_max_fds: u32,
    /// `fdtable.fd`.
    pub fdt_fd: u32,
    /// `file.private_data`.
    pub file_private_data: u32,
    /// `socket.sk`.
    pub socket_sk: u32,
    /// `sock.sk_err` (int): the error a dead or aborted socket reports.
    pub sk_err: u32,
    /// `sock.sk_flags` (unsigned long; bit `SOCK_LINGER`).
    pub sk_flags: u32,
    /// `sock.sk_lingertime` (unsigned long).
    pub sk_lingertime: u32,
    /// The 4-tuple, for the typed `inet_sock_set_state` (whose record the kernel does not
    /// build), from where that record takes it: `skc_daddr`, `inet_sock.inet_saddr`
    /// (be32)...
    pub sk_daddr: u32,
    pub inet_saddr: u32,
    /// ...`skc_dport`, `inet_sock.inet_sport` (be16; `skc_num` is already 0 when a
    /// socket's port is released on the way to CLOSE)...
    pub sk_dport: u32,
    pub inet_sport: u32,
    /// ...and `skc_v6_daddr`, `skc_v6_rcv_saddr` (16 bytes each).
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    /// `sock_common.skc_net.net` (the `struct net *`), and `net.ns.inum` in it.
    pub sk_net: u32,
    pub net_inum: u32,
}

/// A [`KernelLayout`] offset the loader did not set: every kernel read at it fails.
pub const UNSET_OFFSET: u32 = u32::MAX;

/// [`KernelLayout::socket_ino`] (signed) left unset.
pub const UNSET_SIGNED_OFFSET: i32 = i32::MIN;

impl KernelLayout {
    /// The kernel programs' placeholder until the loader writes the real layout: every
    /// offset [`UNSET_OFFSET`], so that a program run with it reads nothing (its kernel
    /// reads fail) instead of reading offset 0 of every struct; `hz` 0 (idle unknown).
    pub const fn unset() -> Self {
        KernelLayout {
            hz: 0,
            sk_state: UNSET_OFFSET,
            sk_family: UNSET_OFFSET,
            sk_protocol: UNSET_OFFSET,
            sk_socket: UNSET_OFFSET,
            socket_ino: UNSET_SIGNED_OFFSET,
            tcp_lsndtime: UNSET_OFFSET,
            tcp_lrcvtime: UNSET_OFFSET,
            task_files: UNSET_OFFSET,
            files_fdt: UNSET_OFFSET,
            fdt_max_fds: UNSET_OFFSET,
            fdt_fd: UNSET_OFFSET,
            file_private_data: UNSET_OFFSET,
            socket_sk: UNSET_OFFSET,
            sk_err: UNSET_OFFSET,
            sk_flags: UNSET_OFFSET,
            sk_lingertime: UNSET_OFFSET,
            sk_daddr: UNSET_OFFSET,
            inet_saddr: UNSET_OFFSET,
            sk_dport: UNSET_OFFSET,
            inet_sport: UNSET_OFFSET,
            sk_v6_daddr: UNSET_OFFSET,
            sk_v6_rcv_saddr: UNSET_OFFSET,
            sk_net: UNSET_OFFSET,
            net_inum: UNSET_OFFSET,
        }
    }
}

/// Detection settings the kernel programs need, set by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// An EOF read this soon after the peer's FIN, or an ECONNRESET read this soon after
    /// its RST, is the application noticing the end (a blocked reader woken by it), not
    /// running into a stale connection.
    pub eof_grace_ns: u64,
    /// Wake the reader only once this much is waiting in the ring buffer; userspace also
    /// drains on a short timer. One wakeup per event costs more than handling the event.
    pub wakeup_bytes: u64,
    /// Nonzero: stream every state change (`watch --all`), not only the `streamed` ones.
    pub all_state_changes: u64,
    /// Nonzero: the kernel lets tracing programs use socket storage (Linux 5.11+), so the
    /// send/recv hooks keep an [`IoMark`] per socket.
    pub io_marks: u64,
    /// Bits of [`filter`]: which of `watch`'s filters the kernel applies before an event
    /// takes ring-buffer space.
    pub filters: u64,
}

/// `watch --pid/--comm/--port`, applied in the kernel so that traffic outside them never
/// competes for the ring buffer: bits of [`Settings::filters`], each with its map of
/// values (`FILTER_PIDS`, `FILTER_COMMS`, `FILTER_PORTS`).
pub mod filter {
    pub const PID: u64 = 1 << 0;
    pub const COMM: u64 = 1 << 1;
    pub const PORT: u64 = 1 << 2;
    /// Values per filter, at most: the maps' size.
    pub const MAX_VALUES: u32 = 64;
}

/// The application's last data call on a TCP socket, kept in the socket's own storage
/// (`BPF_MAP_TYPE_SK_STORAGE`, read back through sock_diag). It orders a request against
/// its answer to the nanosecond, where `tcp_info`'s jiffy stamps tie within a tick.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoMark {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the call.
    pub at_ns: u64,
    /// [`io::SEND`] or [`io::RECV`]: data moved that way.
    pub io: u8,
    /// Explicit padding to a whole 8-byte word, always 0.
    pub pad: [u8; 7],
}

impl IoMark {
    pub const SIZE: usize = 16;
}

// The wire types' layout, field by field: the kernel writes these bytes and userspace reads
// them (and the kernel copies some as whole 8-byte words), so a field moved, resized or
// reordered on one side fails the build here instead of corrupting every event.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};

    assert!(size_of::<Tuple>() == 40);
    assert!(offset_of!(Tuple, saddr) == 0);
    assert!(offset_of!(Tuple, daddr) == 16);
    assert!(offset_of!(Tuple, family) == 32);
    assert!(offset_of!(Tuple, sport) == 34);
    assert!(offset_of!(Tuple, dport) == 36);
    assert!(offset_of!(Tuple, pad) == 38);

    assert!(size_of::<ConnEvent>() == ConnEvent::SIZE);
    assert!(align_of::<ConnEvent>() == 8);
    assert!(offset_of!(ConnEvent, ts_ns) == 0);
    assert!(offset_of!(ConnEvent, skaddr) == 8);
    assert!(offset_of!(ConnEvent, born_ns) == 16);
    assert!(offset_of!(ConnEvent, cookie) == 24);
    assert!(offset_of!(ConnEvent, inode) == 32);
    assert!(offset_of!(ConnEvent, cgroup_id) == 40);
    assert!(offset_of!(ConnEvent, since_send_ms) == 48);
    assert!(offset_of!(ConnEvent, since_recv_ms) == 52);
    assert!(offset_of!(ConnEvent, owner_tgid) == 56);
    assert!(offset_of!(ConnEvent, owner_pid) == 60);
    assert!(offset_of!(ConnEvent, ctx_tgid) == 64);
    assert!(offset_of!(ConnEvent, ctx_pid) == 68);
    assert!(offset_of!(ConnEvent, hook) == 72);
    assert!(offset_of!(ConnEvent, flags) == 73);
    assert!(offset_of!(ConnEvent, old_state) == 74);
    assert!(offset_of!(ConnEvent, new_state) == 75);
    assert!(offset_of!(ConnEvent, reason) == 76);
    assert!(offset_of!(ConnEvent, io) == 78);
    assert!(offset_of!(ConnEvent, peer_end) == 79);
    assert!(offset_of!(ConnEvent, ret) == 80);
    assert!(offset_of!(ConnEvent, since_peer_end_ms) == 84);
    assert!(offset_of!(ConnEvent, sk_err) == 88);
    assert!(offset_of!(ConnEvent, waited_ms) == 92);
    assert!(offset_of!(ConnEvent, tuple) == 96);
    assert!(offset_of!(ConnEvent, owner_comm) == 136);
    assert!(offset_of!(ConnEvent, ctx_comm) == 152);
    assert!(offset_of!(ConnEvent, netns) == 168);
    assert!(offset_of!(ConnEvent, pad) == 172);

    assert!(size_of::<PeerEnded>() == 56);
    assert!(align_of::<PeerEnded>() == 8);
    assert!(offset_of!(PeerEnded, at_ns) == 0);
    assert!(offset_of!(PeerEnded, how) == 8);
    assert!(offset_of!(PeerEnded, reported) == 9);
    assert!(offset_of!(PeerEnded, pad) == 10);
    assert!(offset_of!(PeerEnded, pad2) == 12);
    assert!(offset_of!(PeerEnded, tuple) == 16);

    assert!(size_of::<SockOwner>() == 40);
    assert!(offset_of!(SockOwner, born_ns) == 0);
    assert!(offset_of!(SockOwner, cgroup_id) == 8);
    assert!(offset_of!(SockOwner, tgid) == 16);
    assert!(offset_of!(SockOwner, pid) == 20);
    assert!(offset_of!(SockOwner, comm) == 24);

    assert!(size_of::<ConnectKey>() == 24);
    assert!(offset_of!(ConnectKey, addr) == 0);
    assert!(offset_of!(ConnectKey, tgid) == 16);
    assert!(offset_of!(ConnectKey, port) == 20);
    assert!(offset_of!(ConnectKey, inbound) == 22);
    assert!(offset_of!(ConnectKey, ipv6) == 23);

    assert!(size_of::<TpLayout>() == 32);
    assert!(offset_of!(TpLayout, record_size) == 0);
    assert!(offset_of!(TpLayout, skaddr) == 2);
    assert!(offset_of!(TpLayout, old_state) == 4);
    assert!(offset_of!(TpLayout, new_state) == 6);
    assert!(offset_of!(TpLayout, family) == 8);
    assert!(offset_of!(TpLayout, protocol) == 10);
    assert!(offset_of!(TpLayout, sport) == 12);
    assert!(offset_of!(TpLayout, dport) == 14);
    assert!(offset_of!(TpLayout, saddr_v6) == 16);
    assert!(offset_of!(TpLayout, daddr_v6) == 18);
    assert!(offset_of!(TpLayout, saddr_sockaddr) == 20);
    assert!(offset_of!(TpLayout, daddr_sockaddr) == 22);
    assert!(offset_of!(TpLayout, cookie) == 24);
    assert!(offset_of!(TpLayout, reason) == 26);
    assert!(offset_of!(TpLayout, ret) == 28);
    assert!(offset_of!(TpLayout, pad) == 30);

    assert!(size_of::<KernelLayout>() == 100);
    assert!(offset_of!(KernelLayout, hz) == 0);
    assert!(offset_of!(KernelLayout, sk_state) == 4);
    assert!(offset_of!(KernelLayout, sk_family) == 8);
    assert!(offset_of!(KernelLayout, sk_protocol) == 12);
    assert!(offset_of!(KernelLayout, sk_socket) == 16);
    assert!(offset_of!(KernelLayout, socket_ino) == 20);
    assert!(offset_of!(KernelLayout, tcp_lsndtime) == 24);
    assert!(offset_of!(KernelLayout, tcp_lrcvtime) == 28);
    assert!(offset_of!(KernelLayout, task_files) == 32);
    assert!(offset_of!(KernelLayout, files_fdt) == 36);
    assert!(offset_of!(KernelLayout, fdt_max_fds) == 40);
    assert!(offset_of!(KernelLayout, fdt_fd) == 44);
    assert!(offset_of!(KernelLayout, file_private_data) == 48);
    assert!(offset_of!(KernelLayout, socket_sk) == 52);
    assert!(offset_of!(KernelLayout, sk_err) == 56);
    assert!(offset_of!(KernelLayout, sk_flags) == 60);
    assert!(offset_of!(KernelLayout, sk_lingertime) == 64);
    assert!(offset_of!(KernelLayout, sk_daddr) == 68);
    assert!(offset_of!(KernelLayout, inet_saddr) == 72);
    assert!(offset_of!(KernelLayout, sk_dport) == 76);
    assert!(offset_of!(KernelLayout, inet_sport) == 80);
    assert!(offset_of!(KernelLayout, sk_v6_daddr) == 84);
    assert!(offset_of!(KernelLayout, sk_v6_rcv_saddr) == 88);
    assert!(offset_of!(KernelLayout, sk_net) == 92);
    assert!(offset_of!(KernelLayout, net_inum) == 96);

    assert!(size_of::<Settings>() == 40);
    assert!(offset_of!(Settings, eof_grace_ns) == 0);
    assert!(offset_of!(Settings, wakeup_bytes) == 8);
    assert!(offset_of!(Settings, all_state_changes) == 16);
    assert!(offset_of!(Settings, io_marks) == 24);
    assert!(offset_of!(Settings, filters) == 32);

    assert!(size_of::<IoMark>() == IoMark::SIZE);
    assert!(offset_of!(IoMark, at_ns) == 0);
    assert!(offset_of!(IoMark, io) == 8);
    assert!(offset_of!(IoMark, pad) == 9);
};

#[cfg(feature = "user")]
mod pod {
    // Each is #[repr(C)] and Copy, made only of integers and byte arrays (no bool, enum,
    // pointer or reference), and its padding is explicit fields (the layout asserts above
    // account for every byte): every bit pattern is a valid value, and no byte is
    // uninitialised.
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ConnEvent {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::SockOwner {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::PeerEnded {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ConnectKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::IoMark {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::TpLayout {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::KernelLayout {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn event_has_no_implicit_padding() {
        // Sum of field sizes == struct size means the kernel writes every byte we read.
        let tuple = 16 * 2 + 2 * 4;
        assert_eq!(size_of::<Tuple>(), tuple);
        let fields = 6 * 8 + 6 * 4 + 4 + 2 + 2 + 4 + 4 + 4 + 4 + tuple + 16 * 2 + 4 + 4;
        assert_eq!(size_of::<ConnEvent>(), fields);
        assert_eq!(
            align_of::<ConnEvent>(),
            8,
            "ring buffer records are 8-aligned"
        );
        assert_eq!(size_of::<SockOwner>(), 8 + 8 + 4 + 4 + 16);
        assert_eq!(size_of::<PeerEnded>(), 8 + 1 + 1 + 2 + 4 + 40);
    }

    #[test]
    fn the_unset_kernel_layout_reads_nothing() {
        let unset = KernelLayout::unset();
        // Every offset field but `socket_ino` is a u32 right after `hz`.
        let words: [u32; 25] = layout_words(&unset);
        assert_eq!(words[0], 0, "hz unknown");
        for (i, &word) in words.iter().enumerate().skip(1) {
            if i == 5 {
                assert_eq!(unset.socket_ino, UNSET_SIGNED_OFFSET);
            } else {
                assert_eq!(word, UNSET_OFFSET, "field {i}");
            }
        }
    }

    /// `KernelLayout`'s 25 four-byte fields, in order.
    fn layout_words(layout: &KernelLayout) -> [u32; 25] {
        let l = layout;
        [
            l.hz,
            l.sk_state,
            l.sk_family,
            l.sk_protocol,
            l.sk_socket,
            l.socket_ino.cast_unsigned(),
            l.tcp_lsndtime,
            l.tcp_lrcvtime,
            l.task_files,
            l.files_fdt,
            l.fdt_max_fds,
            l.fdt_fd,
            l.file_private_data,
            l.socket_sk,
            l.sk_err,
            l.sk_flags,
            l.sk_lingertime,
            l.sk_daddr,
            l.inet_saddr,
            l.sk_dport,
            l.inet_sport,
            l.sk_v6_daddr,
            l.sk_v6_rcv_saddr,
            l.sk_net,
            l.net_inum,
        ]
    }

    #[test]
    fn synchronized_states() {
        assert!(tcp_state::is_synchronized(tcp_state::ESTABLISHED));
        assert!(tcp_state::is_synchronized(tcp_state::CLOSE_WAIT));
        assert!(!tcp_state::is_synchronized(tcp_state::SYN_SENT));
        assert!(!tcp_state::is_synchronized(tcp_state::TIME_WAIT));
        assert!(!tcp_state::is_synchronized(tcp_state::NEW_SYN_RECV));
    }

    #[test]
    fn a_healthy_connection_streams_the_peers_fin_and_the_close_after_it_only() {
        use tcp_state::*;
        // Client side of a connection the client closes first: nothing crosses.
        let active = [
            (CLOSE, SYN_SENT),
            (SYN_SENT, ESTABLISHED),
            (ESTABLISHED, FIN_WAIT1),
            (FIN_WAIT1, FIN_WAIT2),
            (FIN_WAIT2, CLOSE),
        ];
        assert!(!active.iter().any(|(o, n)| streamed(*o, *n)));
        let connects: Vec<_> = active.iter().filter(|(o, n)| is_connect(*o, *n)).collect();
        assert_eq!(connects, [&(CLOSE, SYN_SENT)]);
        // Server side: the passive child, then the peer's FIN and the application's close.
        let passive = [
            (LISTEN, SYN_RECV),
            (SYN_RECV, ESTABLISHED),
            (ESTABLISHED, CLOSE_WAIT),
            (CLOSE_WAIT, LAST_ACK),
            (LAST_ACK, CLOSE),
        ];
        let crossing: Vec<_> = passive.iter().filter(|(o, n)| streamed(*o, *n)).collect();
        assert_eq!(
            crossing,
            [&(ESTABLISHED, CLOSE_WAIT), &(CLOSE_WAIT, LAST_ACK)]
        );
        let connects: Vec<_> = passive.iter().filter(|(o, n)| is_connect(*o, *n)).collect();
        assert_eq!(connects, [&(SYN_RECV, ESTABLISHED)]);
    }

    #[test]
    fn troubled_ends_stream() {
        use tcp_state::*;
        // A reset or a timeout in ESTABLISHED, a refused connect, an abort mid-close.
        for old in [ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, CLOSE_WAIT] {
            assert!(streamed(old, CLOSE), "{old} → CLOSE");
        }
        for old in [LAST_ACK, FIN_WAIT2, CLOSING] {
            assert!(!streamed(old, CLOSE), "orderly {old} → CLOSE");
        }
    }

    #[test]
    fn transition_slots_are_distinct_and_in_range() {
        let mut seen = std::collections::HashSet::new();
        for old in 1..=12u8 {
            for new in 1..=12u8 {
                let slot = tcp_state::index(old, new);
                assert!(slot < tcp_state::TRANSITIONS);
                assert!(seen.insert(slot));
            }
        }
    }
}
