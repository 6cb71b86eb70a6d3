//! Decoding ring-buffer records into [`Event`]s. Records come from the kernel, so every
//! field is checked: a record of the wrong length, an unknown hook or an impossible value
//! is an error to count, never a panic.
use std::{
    cell::RefCell,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use bytes::{Buf, TryGetError};
use monitor_common::{
    AF_INET, AF_INET6, ConnEvent, TASK_COMM_LEN, Tuple, UNKNOWN_MS, flags, hook, io, peer_end,
};

/// Which kernel hook saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    StateChange,
    ReceiveReset,
    SendReset,
    /// A send/recv on a socket the peer had reset or closed.
    UsedAfterPeerEnd,
    /// The kernel freed a socket its peer had reset: the application closed it.
    Destroy,
    /// Not a kernel event: a socket as a sock_diag snapshot listed it.
    Snapshot,
}

/// How the peer ended the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEnd {
    Reset,
    Fin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Send,
    Recv,
}

/// The application's first call into a connection its peer had ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedAfterPeerEnd {
    pub op: IoOp,
    /// What the call returned: bytes, or a negative errno.
    pub ret: i32,
    pub peer_end: PeerEnd,
    pub since_peer_end_ms: u32,
}

impl UsedAfterPeerEnd {
    /// The errno the call failed with, 0 when it did not fail (EOF, or a write accepted).
    pub fn errno(&self) -> i32 {
        self.ret.checked_neg().map_or(0, |errno| errno.max(0))
    }

    /// `ECONNRESET`, `EPIPE`, `EOF` (a read returning 0) or `none` (a write accepted).
    pub fn outcome(&self) -> &'static str {
        match (self.op, self.ret) {
            (IoOp::Recv, 0) => "EOF",
            (_, ret) if ret >= 0 => "none",
            _ => errno_name(self.errno()),
        }
    }
}

/// The largest errno a kernel call returns (`MAX_ERRNO`, include/linux/err.h): a negative
/// return below `-MAX_ERRNO` is no error code.
const MAX_ERRNO: i32 = 4095;

pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::ECONNRESET => "ECONNRESET",
        libc::EPIPE => "EPIPE",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENOTCONN => "ENOTCONN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNREFUSED => "ECONNREFUSED",
        _ => "other",
    }
}

/// TCP state, named as `ss` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpState(pub u8);

impl TcpState {
    pub const ESTABLISHED: TcpState = TcpState(monitor_common::tcp_state::ESTABLISHED);
    pub const SYN_SENT: TcpState = TcpState(monitor_common::tcp_state::SYN_SENT);
    pub const SYN_RECV: TcpState = TcpState(monitor_common::tcp_state::SYN_RECV);
    pub const CLOSE: TcpState = TcpState(monitor_common::tcp_state::CLOSE);
    pub const CLOSE_WAIT: TcpState = TcpState(monitor_common::tcp_state::CLOSE_WAIT);
    pub const LAST_ACK: TcpState = TcpState(monitor_common::tcp_state::LAST_ACK);
    pub const TIME_WAIT: TcpState = TcpState(monitor_common::tcp_state::TIME_WAIT);
    pub const LISTEN: TcpState = TcpState(monitor_common::tcp_state::LISTEN);

    /// Every state the kernel's TCP sockets can be in, ESTABLISHED to NEW_SYN_RECV.
    pub fn known() -> impl Iterator<Item = TcpState> {
        (monitor_common::tcp_state::ESTABLISHED..=monitor_common::tcp_state::NEW_SYN_RECV)
            .map(TcpState)
    }

    pub fn name(self) -> &'static str {
        use monitor_common::tcp_state::{
            CLOSE, CLOSE_WAIT, CLOSING, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, LAST_ACK, LISTEN,
            NEW_SYN_RECV, SYN_RECV, SYN_SENT, TIME_WAIT,
        };
        match self.0 {
            0 => "UNKNOWN",
            ESTABLISHED => "ESTABLISHED",
            SYN_SENT => "SYN_SENT",
            SYN_RECV => "SYN_RECV",
            FIN_WAIT1 => "FIN_WAIT1",
            FIN_WAIT2 => "FIN_WAIT2",
            TIME_WAIT => "TIME_WAIT",
            CLOSE => "CLOSE",
            CLOSE_WAIT => "CLOSE_WAIT",
            LAST_ACK => "LAST_ACK",
            LISTEN => "LISTEN",
            CLOSING => "CLOSING",
            NEW_SYN_RECV => "NEW_SYN_RECV",
            _ => "INVALID",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A process as the kernel saw it: tgid, thread id and the thread's comm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    /// Shared, not copied: one allocation per distinct name (see [`comm`]).
    pub comm: Arc<str>,
}

/// One socket's life: its kernel address plus the time the owner map first saw it, so a
/// reused `struct sock` address is a different socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketId {
    pub skaddr: u64,
    pub born_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub hook: Hook,
    /// CLOCK_MONOTONIC nanoseconds.
    pub mono_ns: u64,
    pub socket: SocketId,
    pub cookie: u64,
    pub inode: u64,
    pub cgroup_id: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub old_state: TcpState,
    pub new_state: TcpState,
    /// Captured in process context at connect/accept/listen.
    pub owner: Option<Task>,
    /// The task on CPU when the hook fired: meaningful only in process context.
    pub current: Task,
    pub since_send_ms: Option<u32>,
    pub since_recv_ms: Option<u32>,
    pub rst_reason: u16,
    pub full_socket: bool,
    /// An RST's socket had SO_LINGER on with a zero timeout.
    pub linger_zero: bool,
    /// Set for [`Hook::UsedAfterPeerEnd`].
    pub io: Option<UsedAfterPeerEnd>,
    /// `sk->sk_err` on a death (change to CLOSE) or a sent RST; 0 otherwise.
    pub sk_err: i32,
    /// A request was waiting for its answer (the application's last data call was a send,
    /// as the socket's storage tells it), for this long.
    pub waiting_ms: Option<u32>,
    /// The socket's network namespace (inode), where known: from the socket list.
    pub netns: Option<u64>,
}

impl Event {
    /// Time since data last moved either way, as the kernel's socket timestamps tell it;
    /// `None` when a request was waiting for its answer: busy, not idle.
    pub fn idle_ms(&self) -> Option<u64> {
        if self.waiting_ms.is_some() {
            return None;
        }
        Some(u64::from(self.since_send_ms?.min(self.since_recv_ms?)))
    }

    pub fn is_ipv6(&self) -> bool {
        self.local.is_ipv6()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Every record is one whole event: any other length means the two sides disagree
    /// on the layout (a userspace and a kernel object from different builds) or a
    /// corrupt ring.
    #[error("record of {got} bytes is not an event ({want} bytes)")]
    WrongLength { got: usize, want: usize },
    #[error("record has unknown hook {0}")]
    UnknownHook(u8),
    #[error("record has unknown address family {0}")]
    UnknownFamily(u16),
    #[error("send/recv record has unknown operation {0} or peer end {1}")]
    UnknownIo(u8, u8),
    #[error("send/recv record returned {0}: neither a byte count nor a negative errno")]
    ImpossibleReturn(i32),
}

/// Decodes one ring-buffer record, which must be exactly one [`ConnEvent`].
pub fn decode(record: &[u8]) -> Result<Event, DecodeError> {
    let wrong_length = || DecodeError::WrongLength {
        got: record.len(),
        want: size_of::<ConnEvent>(),
    };
    if record.len() != size_of::<ConnEvent>() {
        return Err(wrong_length());
    }
    let raw = read_event(&mut &record[..]).map_err(|_| wrong_length())?;
    from_raw(&raw)
}

/// Reads a [`ConnEvent`] field by field in its `repr(C)` order (it has no implicit
/// padding), in native byte order (the kernel wrote it on this machine). Every read is
/// bounds-checked: a short record is an error, never a panic or an out-of-bounds read
/// ([`decode`] also refuses a longer one).
/// The struct literal names every field, so a field added to `ConnEvent` fails to build
/// here; struct fields are evaluated in the order written.
fn read_event(buf: &mut impl Buf) -> Result<ConnEvent, TryGetError> {
    Ok(ConnEvent {
        ts_ns: buf.try_get_u64_ne()?,
        skaddr: buf.try_get_u64_ne()?,
        born_ns: buf.try_get_u64_ne()?,
        cookie: buf.try_get_u64_ne()?,
        inode: buf.try_get_u64_ne()?,
        cgroup_id: buf.try_get_u64_ne()?,
        since_send_ms: buf.try_get_u32_ne()?,
        since_recv_ms: buf.try_get_u32_ne()?,
        owner_tgid: buf.try_get_u32_ne()?,
        owner_pid: buf.try_get_u32_ne()?,
        ctx_tgid: buf.try_get_u32_ne()?,
        ctx_pid: buf.try_get_u32_ne()?,
        hook: buf.try_get_u8()?,
        flags: buf.try_get_u8()?,
        old_state: buf.try_get_u8()?,
        new_state: buf.try_get_u8()?,
        reason: buf.try_get_u16_ne()?,
        io: buf.try_get_u8()?,
        peer_end: buf.try_get_u8()?,
        ret: buf.try_get_i32_ne()?,
        since_peer_end_ms: buf.try_get_u32_ne()?,
        sk_err: buf.try_get_i32_ne()?,
        waited_ms: buf.try_get_u32_ne()?,
        tuple: Tuple {
            saddr: array(buf)?,
            daddr: array(buf)?,
            family: buf.try_get_u16_ne()?,
            sport: buf.try_get_u16_ne()?,
            dport: buf.try_get_u16_ne()?,
            pad: buf.try_get_u16_ne()?,
        },
        owner_comm: array(buf)?,
        ctx_comm: array(buf)?,
        netns: buf.try_get_u32_ne()?,
        pad: buf.try_get_u32_ne()?,
    })
}

fn array<const N: usize>(buf: &mut impl Buf) -> Result<[u8; N], TryGetError> {
    let mut out = [0u8; N];
    buf.try_copy_to_slice(&mut out)?;
    Ok(out)
}

pub fn from_raw(raw: &ConnEvent) -> Result<Event, DecodeError> {
    let hook = match raw.hook {
        hook::STATE_CHANGE => Hook::StateChange,
        hook::RECEIVE_RESET => Hook::ReceiveReset,
        hook::SEND_RESET => Hook::SendReset,
        hook::USED_AFTER_PEER_END => Hook::UsedAfterPeerEnd,
        hook::DESTROY => Hook::Destroy,
        other => return Err(DecodeError::UnknownHook(other)),
    };
    let io = match hook {
        Hook::UsedAfterPeerEnd => Some(decode_io(raw)?),
        _ => None,
    };
    let tuple = &raw.tuple;
    let (local, remote) = match tuple.family {
        AF_INET => (
            ipv4(&tuple.saddr, tuple.sport),
            ipv4(&tuple.daddr, tuple.dport),
        ),
        AF_INET6 => (
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(tuple.saddr)), tuple.sport),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(tuple.daddr)), tuple.dport),
        ),
        // An RST for a segment the kernel could not parse carries no family; keep it visible.
        0 if hook == Hook::SendReset => (unspecified(), unspecified()),
        other => return Err(DecodeError::UnknownFamily(other)),
    };
    let known = |ms: u32| (raw.flags & flags::IDLE_KNOWN != 0 && ms != UNKNOWN_MS).then_some(ms);
    let owner = (raw.flags & flags::OWNER_KNOWN != 0).then(|| Task {
        pid: raw.owner_tgid,
        tid: raw.owner_pid,
        comm: comm(&raw.owner_comm),
    });
    Ok(Event {
        hook,
        mono_ns: raw.ts_ns,
        socket: SocketId {
            skaddr: raw.skaddr,
            born_ns: raw.born_ns,
        },
        cookie: raw.cookie,
        inode: raw.inode,
        cgroup_id: raw.cgroup_id,
        local,
        remote,
        old_state: TcpState(raw.old_state),
        new_state: TcpState(raw.new_state),
        owner,
        current: Task {
            pid: raw.ctx_tgid,
            tid: raw.ctx_pid,
            comm: comm(&raw.ctx_comm),
        },
        since_send_ms: known(raw.since_send_ms),
        since_recv_ms: known(raw.since_recv_ms),
        rst_reason: raw.reason,
        full_socket: raw.flags & flags::FULL_SOCKET != 0,
        linger_zero: raw.flags & flags::LINGER_ZERO != 0,
        io,
        sk_err: raw.sk_err,
        waiting_ms: (raw.flags & flags::AWAITING_ANSWER != 0).then_some(raw.waited_ms),
        netns: (raw.netns != 0).then_some(u64::from(raw.netns)),
    })
}

fn decode_io(raw: &ConnEvent) -> Result<UsedAfterPeerEnd, DecodeError> {
    let op = match raw.io {
        io::SEND => IoOp::Send,
        io::RECV => IoOp::Recv,
        _ => return Err(DecodeError::UnknownIo(raw.io, raw.peer_end)),
    };
    let peer_end = match raw.peer_end {
        peer_end::RESET => PeerEnd::Reset,
        peer_end::FIN => PeerEnd::Fin,
        _ => return Err(DecodeError::UnknownIo(raw.io, raw.peer_end)),
    };
    // A byte count, or a negative errno whose negation exists (not i32::MIN) and is one.
    if raw.ret.checked_neg().is_none_or(|errno| errno > MAX_ERRNO) {
        return Err(DecodeError::ImpossibleReturn(raw.ret));
    }
    Ok(UsedAfterPeerEnd {
        op,
        ret: raw.ret,
        peer_end,
        since_peer_end_ms: raw.since_peer_end_ms,
    })
}

/// An IPv4 socket's address, which the kernel side hands over IPv4-mapped.
fn ipv4(addr: &[u8; 16], port: u16) -> SocketAddr {
    let octets = [addr[12], addr[13], addr[14], addr[15]];
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(octets)), port)
}

fn unspecified() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
}

/// Distinct names kept by [`comm`] before it starts afresh: a node runs a few hundred.
const INTERNED_COMMS: usize = 4096;

thread_local! {
    static COMMS: RefCell<crate::FastMap<[u8; TASK_COMM_LEN], Arc<str>>> =
        RefCell::new(crate::FastMap::default());
}

/// A NUL-padded comm, interned: every event names one or two tasks, and a node has few
/// distinct names, so decoding shares them instead of allocating one per event. Lossy
/// because comm is whatever bytes the process set.
fn comm(bytes: &[u8; TASK_COMM_LEN]) -> Arc<str> {
    COMMS.with_borrow_mut(|interned| {
        if let Some(name) = interned.get(bytes) {
            return name.clone();
        }
        if interned.len() >= INTERNED_COMMS {
            interned.clear();
        }
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let name: Arc<str> = String::from_utf8_lossy(&bytes[..len]).into();
        interned.insert(*bytes, name.clone());
        name
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A receive-reset for 127.0.0.1:40000 → 127.0.0.1:5432 owned by pid 42 "psql".
    pub(crate) fn raw_reset(idle_ms: u32) -> ConnEvent {
        let mut raw = ConnEvent::zeroed();
        raw.ts_ns = 1_000;
        raw.hook = hook::RECEIVE_RESET;
        raw.flags = flags::OWNER_KNOWN | flags::IDLE_KNOWN | flags::FULL_SOCKET;
        let loopback = Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets();
        raw.tuple.family = AF_INET;
        raw.tuple.saddr = loopback;
        raw.tuple.daddr = loopback;
        raw.tuple.sport = 40000;
        raw.tuple.dport = 5432;
        raw.skaddr = 0xffff_8880_0000_1000;
        raw.born_ns = 500;
        raw.old_state = monitor_common::tcp_state::ESTABLISHED;
        raw.new_state = monitor_common::tcp_state::CLOSE;
        raw.owner_tgid = 42;
        raw.owner_pid = 43;
        raw.owner_comm[..4].copy_from_slice(b"psql");
        raw.ctx_tgid = 7;
        raw.ctx_comm[..6].copy_from_slice(b"server");
        raw.since_send_ms = idle_ms + 5;
        raw.since_recv_ms = idle_ms;
        raw
    }

    fn bytes(raw: &ConnEvent) -> Vec<u8> {
        // SAFETY: ConnEvent is repr(C) plain data without implicit padding.
        unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref::<ConnEvent>(raw).cast::<u8>(),
                size_of::<ConnEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_ipv4_reset() {
        let event = decode(&bytes(&raw_reset(2000))).unwrap();
        assert_eq!(event.hook, Hook::ReceiveReset);
        assert_eq!(event.local.to_string(), "127.0.0.1:40000");
        assert_eq!(event.remote.to_string(), "127.0.0.1:5432");
        assert_eq!(event.idle_ms(), Some(2000));
        let owner = event.owner.unwrap();
        assert_eq!((owner.pid, owner.tid, &*owner.comm), (42, 43, "psql"));
        assert_eq!(&*event.current.comm, "server");
        assert_eq!(event.old_state.name(), "ESTABLISHED");
    }

    #[test]
    fn a_waiting_request_is_not_idleness() {
        // The stamps tie (a query sent in the tick its BEGIN was answered); the socket's
        // storage says the request was still waiting.
        let mut raw = raw_reset(95_000);
        raw.flags |= flags::AWAITING_ANSWER;
        raw.waited_ms = 95_000;
        let event = decode(&bytes(&raw)).unwrap();
        assert_eq!(event.waiting_ms, Some(95_000));
        assert_eq!(event.idle_ms(), None);
        raw.flags &= !flags::AWAITING_ANSWER;
        assert_eq!(decode(&bytes(&raw)).unwrap().waiting_ms, None);
    }

    #[test]
    fn decodes_ipv6_with_brackets() {
        let mut raw = raw_reset(10);
        raw.tuple.family = AF_INET6;
        raw.tuple.saddr = Ipv6Addr::LOCALHOST.octets();
        raw.tuple.daddr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        let event = decode(&bytes(&raw)).unwrap();
        assert_eq!(event.local.to_string(), "[::1]:40000");
        assert_eq!(event.remote.to_string(), "[2001:db8::1]:5432");
    }

    #[test]
    fn unknown_idle_and_owner_stay_unknown() {
        let mut raw = raw_reset(10);
        raw.flags = 0;
        let event = decode(&bytes(&raw)).unwrap();
        assert_eq!(event.owner, None);
        assert_eq!(event.idle_ms(), None);
    }

    #[test]
    fn rejects_bad_records() {
        let full = bytes(&raw_reset(1));
        assert_eq!(
            decode(&full[..10]),
            Err(DecodeError::WrongLength {
                got: 10,
                want: full.len()
            })
        );
        // Longer is as wrong as shorter: the two sides disagree on the layout.
        let longer = [full.as_slice(), &[0; 8]].concat();
        assert_eq!(
            decode(&longer),
            Err(DecodeError::WrongLength {
                got: full.len() + 8,
                want: full.len()
            })
        );
        assert!(decode(&full).is_ok());
        let mut raw = raw_reset(1);
        raw.hook = 99;
        assert_eq!(decode(&bytes(&raw)), Err(DecodeError::UnknownHook(99)));
        let mut raw = raw_reset(1);
        raw.tuple.family = 1;
        assert_eq!(decode(&bytes(&raw)), Err(DecodeError::UnknownFamily(1)));
    }

    #[test]
    fn reads_every_field_at_its_offset() {
        // Every byte distinct: a field read out of order or at the wrong offset changes
        // the bytes of the struct it builds.
        let record: Vec<u8> = (0..=u8::MAX).take(ConnEvent::SIZE).collect();
        assert_eq!(record.len(), ConnEvent::SIZE, "every byte distinct");
        let raw = read_event(&mut &record[..]).unwrap();
        assert_eq!(bytes(&raw), record);
        // Every shorter record is an error, never a panic; a longer one is read.
        for len in 0..ConnEvent::SIZE {
            assert!(read_event(&mut &record[..len]).is_err(), "{len} bytes");
        }
        let longer = [record.as_slice(), &[0xff; 8]].concat();
        assert_eq!(read_event(&mut &longer[..]).unwrap(), raw);
    }

    /// A send that got ECONNRESET 1.5 s after the peer's RST, by pid 42.
    pub(crate) fn raw_send_after_reset() -> ConnEvent {
        let mut raw = raw_reset(0);
        raw.hook = hook::USED_AFTER_PEER_END;
        raw.flags = flags::OWNER_KNOWN;
        raw.io = io::SEND;
        raw.ret = -libc::ECONNRESET;
        raw.peer_end = peer_end::RESET;
        raw.since_peer_end_ms = 1500;
        raw.ctx_tgid = 42;
        raw
    }

    #[test]
    fn decodes_io_after_peer_end() {
        let event = decode(&bytes(&raw_send_after_reset())).unwrap();
        let io = event.io.unwrap();
        assert_eq!(
            (io.op, io.peer_end, io.since_peer_end_ms),
            (IoOp::Send, PeerEnd::Reset, 1500)
        );
        assert_eq!((io.errno(), io.outcome()), (104, "ECONNRESET"));
        let mut raw = raw_send_after_reset();
        raw.io = 9;
        assert_eq!(decode(&bytes(&raw)), Err(DecodeError::UnknownIo(9, 1)));
    }

    #[test]
    fn a_return_that_is_no_errno_is_a_decode_error() {
        for ret in [i32::MIN, -4096, -1_000_000] {
            let mut raw = raw_send_after_reset();
            raw.ret = ret;
            assert_eq!(
                decode(&bytes(&raw)),
                Err(DecodeError::ImpossibleReturn(ret))
            );
        }
        for ret in [-4095, -1, 0, i32::MAX] {
            let mut raw = raw_send_after_reset();
            raw.ret = ret;
            assert_eq!(decode(&bytes(&raw)).unwrap().io.unwrap().ret, ret);
        }
    }

    #[test]
    fn io_outcomes() {
        let io = |op, ret| UsedAfterPeerEnd {
            op,
            ret,
            peer_end: PeerEnd::Fin,
            since_peer_end_ms: 0,
        };
        assert_eq!(io(IoOp::Recv, 0).outcome(), "EOF");
        assert_eq!(io(IoOp::Send, 4).outcome(), "none");
        assert_eq!(io(IoOp::Send, -libc::EPIPE).outcome(), "EPIPE");
        assert_eq!(io(IoOp::Send, -libc::EPIPE).errno(), 32);
        assert_eq!(io(IoOp::Recv, 0).errno(), 0);
        // Built by hand, not decoded: still no overflow.
        assert_eq!(io(IoOp::Send, i32::MIN).errno(), 0);
        assert_eq!(io(IoOp::Send, i32::MIN).outcome(), "other");
    }

    proptest::proptest! {
        /// Whatever the ring buffer holds, decoding returns; it never panics.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = decode(&bytes);
        }

        /// A record one byte or more off the event's size is refused, whatever it holds.
        #[test]
        fn a_record_of_another_length_is_refused(
            raw in valid_record(),
            len in proptest::strategy::Strategy::prop_filter(
                0..2 * ConnEvent::SIZE,
                "not the event's size",
                |len| *len != ConnEvent::SIZE,
            ),
            fill in proptest::prelude::any::<u8>(),
        ) {
            let mut record = bytes(&raw);
            record.resize(len, fill);
            proptest::prop_assert_eq!(
                decode(&record),
                Err(DecodeError::WrongLength { got: len, want: ConnEvent::SIZE })
            );
        }

        /// Any `ret` in a send/recv record decodes to itself or is refused as impossible,
        /// and the decoded call's errno and outcome never overflow.
        #[test]
        fn any_return_decodes_or_is_refused(raw in valid_record(), ret in proptest::prelude::any::<i32>()) {
            let mut raw = raw;
            raw.hook = hook::USED_AFTER_PEER_END;
            raw.ret = ret;
            match decode(&bytes(&raw)) {
                Ok(event) => {
                    let io = event.io.unwrap();
                    proptest::prop_assert_eq!(io.ret, ret);
                    proptest::prop_assert!((0..=MAX_ERRNO).contains(&io.errno()));
                    let _ = io.outcome();
                }
                Err(err) => {
                    proptest::prop_assert_eq!(err, DecodeError::ImpossibleReturn(ret));
                    proptest::prop_assert!(ret < -MAX_ERRNO);
                }
            }
        }

        /// A structurally valid record (a known hook, AF_INET or AF_INET6, a known send/recv
        /// and peer end, a byte count or errno, a NUL-terminated comm), every other byte
        /// random: it decodes, and every field comes out as written.
        #[test]
        fn valid_records_decode_to_what_was_written(raw in valid_record()) {
            use proptest::prop_assert_eq as eq;
            let record = bytes(&raw);
            let event = decode(&record).map_err(|err| {
                proptest::test_runner::TestCaseError::fail(format!("{err}: {raw:?}"))
            })?;
            let hook = [
                (hook::STATE_CHANGE, Hook::StateChange),
                (hook::RECEIVE_RESET, Hook::ReceiveReset),
                (hook::SEND_RESET, Hook::SendReset),
                (hook::USED_AFTER_PEER_END, Hook::UsedAfterPeerEnd),
                (hook::DESTROY, Hook::Destroy),
            ]
            .into_iter()
            .find_map(|(id, hook)| (id == raw.hook).then_some(hook));
            eq!(Some(event.hook), hook);
            eq!(event.mono_ns, raw.ts_ns);
            eq!(event.socket, SocketId { skaddr: raw.skaddr, born_ns: raw.born_ns });
            eq!((event.cookie, event.inode, event.cgroup_id), (raw.cookie, raw.inode, raw.cgroup_id));
            let t = &raw.tuple;
            let (local, remote): (IpAddr, IpAddr) = if t.family == AF_INET {
                // The last four bytes, where an IPv4-mapped IPv6 address has them.
                let v4 = |a: [u8; 16]| Ipv4Addr::new(a[12], a[13], a[14], a[15]).into();
                (v4(t.saddr), v4(t.daddr))
            } else {
                (Ipv6Addr::from(t.saddr).into(), Ipv6Addr::from(t.daddr).into())
            };
            eq!(event.local, SocketAddr::new(local, t.sport));
            eq!(event.remote, SocketAddr::new(remote, t.dport));
            eq!((event.old_state.0, event.new_state.0), (raw.old_state, raw.new_state));
            let owner = (raw.flags & flags::OWNER_KNOWN != 0).then(|| {
                (raw.owner_tgid, raw.owner_pid, comm_text(&raw.owner_comm))
            });
            eq!(event.owner.map(|o| (o.pid, o.tid, o.comm.to_string())), owner);
            eq!(
                (event.current.pid, event.current.tid, event.current.comm.to_string()),
                (raw.ctx_tgid, raw.ctx_pid, comm_text(&raw.ctx_comm))
            );
            let idle_known = raw.flags & flags::IDLE_KNOWN != 0;
            let known = |ms: u32| (idle_known && ms != UNKNOWN_MS).then_some(ms);
            eq!(event.since_send_ms, known(raw.since_send_ms));
            eq!(event.since_recv_ms, known(raw.since_recv_ms));
            eq!(event.rst_reason, raw.reason);
            eq!(event.full_socket, raw.flags & flags::FULL_SOCKET != 0);
            eq!(event.linger_zero, raw.flags & flags::LINGER_ZERO != 0);
            let io = (raw.hook == hook::USED_AFTER_PEER_END).then(|| {
                let op = if raw.io == io::SEND { IoOp::Send } else { IoOp::Recv };
                let end = if raw.peer_end == peer_end::RESET { PeerEnd::Reset } else { PeerEnd::Fin };
                (op, raw.ret, end, raw.since_peer_end_ms)
            });
            eq!(event.io.map(|io| (io.op, io.ret, io.peer_end, io.since_peer_end_ms)), io);
            eq!(event.sk_err, raw.sk_err);
            let waiting = (raw.flags & flags::AWAITING_ANSWER != 0).then_some(raw.waited_ms);
            eq!(event.waiting_ms, waiting);
            eq!(event.netns, (raw.netns != 0).then_some(u64::from(raw.netns)));
        }
    }

    /// The text a NUL-terminated comm of printable ASCII stands for.
    fn comm_text(bytes: &[u8; TASK_COMM_LEN]) -> String {
        bytes
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| b as char)
            .collect()
    }

    /// Records a kernel program could write: random bytes, with the fields the decoder
    /// checks (hook, family, send/recv, peer end, ret) set to values it knows, and comms of
    /// printable ASCII ending in NUL (random bytes would almost never pass the checks).
    fn valid_record() -> impl proptest::strategy::Strategy<Value = ConnEvent> {
        use proptest::{prelude::*, sample::select};
        let hooks = select(vec![
            hook::STATE_CHANGE,
            hook::RECEIVE_RESET,
            hook::SEND_RESET,
            hook::USED_AFTER_PEER_END,
            hook::DESTROY,
        ]);
        let comm = || "[ -~]{0,15}";
        (
            proptest::collection::vec(any::<u8>(), ConnEvent::SIZE),
            hooks,
            select(vec![AF_INET, AF_INET6]),
            select(vec![io::SEND, io::RECV]),
            select(vec![peer_end::RESET, peer_end::FIN]),
            -MAX_ERRNO..=i32::MAX,
            comm(),
            comm(),
        )
            .prop_map(|(random, hook, family, io, end, ret, owner, ctx)| {
                let mut raw = read_event(&mut &random[..]).unwrap();
                raw.hook = hook;
                raw.tuple.family = family;
                raw.io = io;
                raw.peer_end = end;
                raw.ret = ret;
                for (field, text) in [(&mut raw.owner_comm, owner), (&mut raw.ctx_comm, ctx)] {
                    *field = [0; TASK_COMM_LEN];
                    field[..text.len()].copy_from_slice(text.as_bytes());
                }
                raw
            })
    }

    #[test]
    fn pipeline_counts_and_skips_corrupt_records() {
        let mut pipeline = crate::pipeline::Pipeline::for_tests();
        assert!(pipeline.record(&[0u8; 7]).is_err());
        let mut bad_hook = raw_reset(5000);
        bad_hook.hook = 200;
        assert!(pipeline.record(&bytes(&bad_hook)).is_err());
        // A busy socket's reset: reported at once (an idle one waits out its grace).
        let good = pipeline.record(&bytes(&raw_reset(10))).unwrap();
        assert_eq!(good.findings.len(), 1, "decoding goes on after bad records");
        assert_eq!((pipeline.undecodable, pipeline.events), (2, 1));
    }

    /// Through the whole pipeline (table, pools, detectors): an idle reset whose socket is
    /// destroyed within the grace is counted, never a finding; one written into is reported
    /// at the write, ahead of the write's own finding.
    #[test]
    fn pipeline_holds_an_idle_reset_for_its_grace() {
        use crate::detect::Kind;

        let mut pipeline = crate::pipeline::Pipeline::for_tests();
        assert!(
            pipeline
                .record(&bytes(&raw_reset(5000)))
                .unwrap()
                .findings
                .is_empty()
        );
        let mut destroyed = raw_reset(0);
        destroyed.hook = hook::DESTROY;
        destroyed.peer_end = peer_end::RESET;
        destroyed.ts_ns = 2_000_000;
        let event = decode(&bytes(&destroyed)).unwrap();
        assert_eq!(event.hook, Hook::Destroy);
        assert!(
            pipeline
                .record(&bytes(&destroyed))
                .unwrap()
                .findings
                .is_empty()
        );
        assert!(pipeline.due(u64::MAX).is_empty());
        assert_eq!(pipeline.resets_handled(), 1);
        let mut again = raw_reset(5000);
        again.ts_ns = 10_000_000;
        assert!(pipeline.record(&bytes(&again)).unwrap().findings.is_empty());
        let mut write = raw_send_after_reset();
        write.ts_ns = 20_000_000;
        let kinds: Vec<_> = pipeline
            .record(&bytes(&write))
            .unwrap()
            .findings
            .iter()
            .map(|f| f.kind)
            .collect();
        assert_eq!(kinds, [Kind::PeerResetIdle, Kind::UsedAfterReset]);
        assert!(pipeline.due(u64::MAX).is_empty(), "once");
        assert_eq!(pipeline.resets_handled(), 1);
    }

    #[test]
    fn comm_stops_at_nul_and_survives_bad_utf8() {
        let mut bytes = [0u8; 16];
        bytes[..3].copy_from_slice(&[b'a', 0xff, b'b']);
        assert_eq!(&*comm(&bytes), "a\u{fffd}b");
        assert_eq!(*comm(&[b'x'; 16]), *"x".repeat(16));
    }

    #[test]
    fn comms_are_shared_and_the_interner_is_bounded() {
        let name = |n: usize| {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(format!("{n:08x}").as_bytes());
            bytes
        };
        assert!(Arc::ptr_eq(&comm(&name(1)), &comm(&name(1))));
        for n in 0..3 * INTERNED_COMMS {
            comm(&name(n));
        }
        let kept = COMMS.with_borrow(std::collections::HashMap::len);
        assert!(kept > 0 && kept <= INTERNED_COMMS, "{kept} names kept");
    }
}
