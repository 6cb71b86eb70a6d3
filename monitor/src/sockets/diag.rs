//! The kernel's own list of TCP sockets (netlink sock_diag / inet_diag, as `ss` uses), with
//! `tcp_info`: sockets opened before connwatch started, and what events alone miss.
use std::{
    net::SocketAddr,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use anyhow::Context as _;
use netlink_packet_core::{
    DefaultNla, Emitable as _, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla as _, NlasIterator,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

use std::collections::HashMap;

use super::process::ProcIndex;
use crate::events::{IoOp, Task, TcpState};

/// `INET_DIAG_REQ_SK_BPF_STORAGES` (linux/inet_diag.h): the request attribute naming
/// socket-storage maps to dump with each socket.
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
/// `SK_DIAG_BPF_STORAGE_REQ_MAP_FD` (linux/sock_diag.h): one map, by descriptor.
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
/// `INET_DIAG_SK_BPF_STORAGES`: the reply's attribute holding them.
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
/// `SK_DIAG_BPF_STORAGE` (one map's entry) and, inside it, `SK_DIAG_BPF_STORAGE_MAP_VALUE`.
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;

/// Why the kernel's socket list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("reading /proc/thread-self/ns/net (is /proc mounted?)")]
    Namespace(#[source] std::io::Error),
    #[error("unexpected network namespace link {} in /proc/thread-self/ns/net", .0.display())]
    NamespaceLink(std::path::PathBuf),
    #[error(
        "{0} the sock_diag netlink socket (a kernel without CONFIG_INET_DIAG, or a seccomp \
         profile refusing netlink?)"
    )]
    Socket(&'static str, #[source] std::io::Error),
    #[error("sock_diag dump of family {family}")]
    Family {
        family: u8,
        #[source]
        source: Box<DiagError>,
    },
    #[error("{0} the sock_diag dump")]
    Io(&'static str, #[source] std::io::Error),
    #[error("decoding a sock_diag message")]
    Decode(#[source] netlink_packet_core::DecodeError),
    #[error("the kernel refused the sock_diag dump")]
    Refused(#[source] std::io::Error),
}

/// The application's last data call on a socket, as the kernel hooks recorded it in the
/// socket's storage: ordered to the nanosecond, unlike `tcp_info`'s jiffy stamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastIo {
    pub op: IoOp,
    /// CLOCK_MONOTONIC ns.
    pub at_ns: u64,
}

impl LastIo {
    /// Decodes a `monitor_common::IoMark`; `None` for anything else.
    fn decode(value: &[u8]) -> Option<LastIo> {
        if value.len() != monitor_common::IoMark::SIZE {
            return None;
        }
        let at_ns = u64::from_ne_bytes(value[..8].try_into().ok()?);
        let op = match value[8] {
            monitor_common::io::SEND => IoOp::Send,
            monitor_common::io::RECV => IoOp::Recv,
            _ => return None,
        };
        Some(LastIo { op, at_ns })
    }

    /// From a reply's `INET_DIAG_SK_BPF_STORAGES` payload: the one map it was asked for.
    fn from_storages(payload: &[u8]) -> Option<LastIo> {
        let storage = NlasIterator::new(payload)
            .flatten()
            .find(|nla| nla.kind() == SK_DIAG_BPF_STORAGE)?;
        let value = NlasIterator::new(storage.value())
            .flatten()
            .find(|nla| nla.kind() == SK_DIAG_BPF_STORAGE_MAP_VALUE)?;
        LastIo::decode(value.value())
    }
}

/// What `tcp_info` says about recent traffic, in milliseconds ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpActivity {
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub last_ack_recv_ms: u32,
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
    /// Retransmissions of the current unacknowledged segment.
    pub retransmits: u8,
    /// Payload bytes received, and sent bytes the peer acknowledged, over the connection's
    /// life: whether it ever carried data each way.
    pub bytes_received: u64,
    pub bytes_acked: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    pub inode: u64,
    pub cookie: u64,
    /// The network namespace the socket lives in (its inode).
    pub netns: u64,
    /// Bytes received and not yet read by the application.
    pub recv_queue: u32,
    pub activity: Option<TcpActivity>,
    /// The application's last send/recv, where the kernel hooks keep it.
    pub last_io: Option<LastIo>,
}

impl DiagSocket {
    /// Milliseconds since data last moved either way.
    pub fn idle_ms(&self) -> Option<u64> {
        let a = self.activity?;
        Some(u64::from(a.last_data_sent_ms.min(a.last_data_recv_ms)))
    }
}

/// A socket list with each socket's process, taken off the event loop.
pub struct Snapshot {
    pub sockets: Vec<DiagSocket>,
    /// Socket inode → the process holding it, from one /proc scan.
    pub owners: HashMap<u64, Task>,
    /// Each of those processes' container and pod.
    pub workloads: HashMap<u32, super::workload::Workload>,
    /// The kernel's connect counters at the time of the snapshot (all namespaces).
    pub connects: Vec<(monitor_common::ConnectKey, u64)>,
    /// Network namespaces listed, this process's included.
    pub namespaces: usize,
    /// How long listing the sockets and their processes took.
    pub took: std::time::Duration,
    /// Why other namespaces' sockets came without `tcp_info`, if they did.
    pub namespaces_degraded: Option<String>,
}

/// How another network namespace's sockets were read.
enum Reach {
    /// setns into it, then sock_diag as here: everything.
    Setns,
    /// setns refused (it takes CAP_SYS_ADMIN): `/proc/<pid>/net/tcp{,6}`, which any
    /// process that may read the pid's /proc has: addresses, state, queues, inode; no
    /// `tcp_info`, no socket storage.
    ProcNet(String),
}

/// Lists the sockets and resolves their owners: the slow part of a refresh (a netlink dump
/// and a walk of every process's fds), done on a thread of its own.
pub fn take_snapshot(
    processes: &std::sync::Mutex<ProcIndex>,
    io_marks: Option<BorrowedFd>,
    workloads: &mut super::workload::WorkloadResolver,
) -> anyhow::Result<Snapshot> {
    let start = std::time::Instant::now();
    // A poisoned lock only means another thread panicked mid-scan: the index is a cache.
    let lock = || {
        processes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let (namespaces, proc_root) = {
        let mut processes = lock();
        (
            processes.network_namespaces(),
            processes.proc_root().to_path_buf(),
        )
    };
    let own = own_namespace()?;
    let mut sockets = dump_tcp(io_marks)?;
    for socket in &mut sockets {
        socket.netns = own;
    }
    let others: Vec<(u64, u32)> = namespaces
        .into_iter()
        .filter(|&(netns, _)| netns != own)
        .collect();
    // On a thread of its own: setns moves the calling thread, which then just ends.
    let (reach, refused) = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("cw-netns".into())
            .spawn_scoped(scope, || {
                dump_namespaces(&proc_root, &others, io_marks, &mut sockets)
            })
            .map(std::thread::ScopedJoinHandle::join)
    })
    .context("starting the namespace reader")?
    .map_err(|_| anyhow::anyhow!("the namespace reader panicked"))?;
    let mut processes = lock();
    let owners: HashMap<u64, Task> = sockets
        .iter()
        .filter(|s| s.inode != 0)
        .filter_map(|s| Some((s.inode, processes.owner_of(s.inode)?)))
        .collect();
    drop(processes);
    // The pod of each process with a pool (cached and bounded by the resolver).
    let mut pids: Vec<u32> = owners.values().map(|task| task.pid).collect();
    pids.sort_unstable();
    pids.dedup();
    let workloads = pids
        .into_iter()
        .map(|pid| (pid, workloads.resolve(0, pid)))
        .collect();
    Ok(Snapshot {
        sockets,
        owners,
        workloads,
        connects: Vec::new(),
        namespaces: others.len() + 1,
        took: start.elapsed(),
        namespaces_degraded: match (reach, refused) {
            (Reach::Setns, 0) => None,
            (Reach::ProcNet(why), 0) => Some(why),
            (_, refused) => Some(format!(
                "{refused} network namespaces could not be read (their /proc/<pid>/ns/net \
                 refused): their sockets are not listed"
            )),
        },
    })
}

/// This process's network namespace.
/// The calling thread's network namespace (its inode).
pub fn own_namespace() -> Result<u64, DiagError> {
    let link = std::fs::read_link("/proc/thread-self/ns/net").map_err(DiagError::Namespace)?;
    link.to_str()
        .and_then(super::process::namespace_inode)
        .ok_or(DiagError::NamespaceLink(link))
}

/// Appends the sockets of each namespace in `others` (inode, a process in it), entering
/// each with setns, or from `/proc/<pid>/net` once setns is refused. A namespace whose
/// process is gone is skipped: the next refresh lists what exists then; one whose
/// `/proc/<pid>/ns/net` cannot be opened otherwise is counted (second value).
fn dump_namespaces(
    proc_root: &std::path::Path,
    others: &[(u64, u32)],
    io_marks: Option<BorrowedFd>,
    sockets: &mut Vec<DiagSocket>,
) -> (Reach, usize) {
    let mut reach = Reach::Setns;
    let mut refused = 0;
    for &(netns, pid) in others {
        let start = sockets.len();
        if let Reach::Setns = reach {
            let entered = std::fs::File::open(proc_root.join(format!("{pid}/ns/net")))
                .map_err(|err| nix::Error::from_raw(err.raw_os_error().unwrap_or(0)))
                .and_then(|file| nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET));
            match entered {
                Ok(()) => {
                    if let Ok(list) = dump_tcp(io_marks) {
                        sockets.extend(list);
                    }
                }
                Err(nix::Error::EPERM) => {
                    reach = Reach::ProcNet(
                        "entering another network namespace (setns) takes CAP_SYS_ADMIN; \
                         their sockets come from /proc/<pid>/net/tcp, without tcp_info: no \
                         stalls, zombies or idle times there"
                            .into(),
                    );
                }
                // The process exited meanwhile: the next refresh lists what exists then.
                Err(nix::Error::ENOENT | nix::Error::ESRCH) => continue,
                Err(_) => {
                    refused += 1;
                    continue;
                }
            }
        }
        if let Reach::ProcNet(_) = reach {
            for file in ["tcp", "tcp6"] {
                if let Ok(text) =
                    std::fs::read_to_string(proc_root.join(format!("{pid}/net/{file}")))
                {
                    sockets.extend(text.lines().skip(1).filter_map(parse_proc_net_line));
                }
            }
        }
        sockets[start..].iter_mut().for_each(|s| s.netns = netns);
    }
    (reach, refused)
}

/// One line of `/proc/net/tcp` or `tcp6`: `sl local rem st tx:rx tr:when retr uid timeout
/// inode …`, addresses as the kernel's words in hex.
fn parse_proc_net_line(line: &str) -> Option<DiagSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, remote) = (
        proc_net_addr(fields.get(1)?)?,
        proc_net_addr(fields.get(2)?)?,
    );
    let state = u8::from_str_radix(fields.get(3)?, 16).ok()?;
    let (_, rx) = fields.get(4)?.split_once(':')?;
    Some(DiagSocket {
        local,
        remote,
        state: TcpState(state),
        inode: fields.get(9)?.parse().ok()?,
        cookie: 0,
        netns: 0,
        recv_queue: u32::from_str_radix(rx, 16).ok()?,
        activity: None,
        last_io: None,
    })
}

/// `0100007F:1E61` (IPv4) or 32 hex digits `:port` (IPv6): each 32-bit word as the kernel
/// holds it (network order bytes read as a host-order integer), the port as a number.
fn proc_net_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in 0..addr.len() / 8 {
        let value = u32::from_str_radix(addr.get(word * 8..word * 8 + 8)?, 16).ok()?;
        bytes.extend(value.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => {
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            // As sock_diag lists them: an IPv4-mapped address is IPv4.
            v6.to_ipv4_mapped().map_or(v6.into(), Into::into)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Every TCP socket in the calling thread's network namespace, IPv4 and IPv6; with
/// `io_marks` (the hooks' socket-storage map), each socket's last send/recv too.
pub fn dump_tcp(io_marks: Option<BorrowedFd>) -> Result<Vec<DiagSocket>, DiagError> {
    let mut socket =
        Socket::new(NETLINK_SOCK_DIAG).map_err(|err| DiagError::Socket("opening", err))?;
    socket
        .bind_auto()
        .map_err(|err| DiagError::Socket("binding", err))?;
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .map_err(|err| DiagError::Socket("connecting", err))?;
    let mut sockets = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump_family(&mut socket, family, io_marks, &mut sockets).map_err(|source| {
            DiagError::Family {
                family,
                source: Box::new(source),
            }
        })?;
    }
    Ok(sockets)
}

fn dump_family(
    socket: &mut Socket,
    family: u8,
    io_marks: Option<BorrowedFd>,
    sockets: &mut Vec<DiagSocket>,
) -> Result<(), DiagError> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states: StateFlags::all(),
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    if let Some(map) = io_marks {
        append_storage_request(&mut buf, map);
    }
    socket
        .send(&buf, 0)
        .map_err(|err| DiagError::Io("sending the request for", err))?;

    let mut receive = vec![0u8; 1 << 16];
    loop {
        let size = socket
            .recv(&mut &mut receive[..], 0)
            .map_err(|err| DiagError::Io("reading", err))?;
        let mut offset = 0;
        while offset < size {
            let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&receive[offset..size])
                .map_err(DiagError::Decode)?;
            // A length beyond the address space would end the buffer just the same.
            let length = usize::try_from(message.header.length).unwrap_or(usize::MAX);
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(err) => return Err(DiagError::Refused(err.to_io())),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let h = &response.header;
                    let last_io = response.nlas.iter().find_map(|nla| match nla {
                        // The kernel nests it: the flag is part of the crate's kind.
                        Nla::Other(other)
                            if other.kind() & !NLA_F_NESTED == INET_DIAG_SK_BPF_STORAGES =>
                        {
                            LastIo::from_storages(&nla_value(other))
                        }
                        _ => None,
                    });
                    let activity = response.nlas.iter().find_map(|nla| match nla {
                        Nla::TcpInfo(info) => Some(TcpActivity {
                            last_data_sent_ms: info.last_data_sent,
                            last_data_recv_ms: info.last_data_recv,
                            last_ack_recv_ms: info.last_ack_recv,
                            unacked: info.unacked,
                            retransmits: info.retransmits,
                            bytes_received: info.bytes_received,
                            bytes_acked: info.bytes_acked,
                        }),
                        _ => None,
                    });
                    sockets.push(DiagSocket {
                        local: SocketAddr::new(h.socket_id.source_address, h.socket_id.source_port),
                        remote: SocketAddr::new(
                            h.socket_id.destination_address,
                            h.socket_id.destination_port,
                        ),
                        state: TcpState(h.state),
                        inode: u64::from(h.inode),
                        cookie: u64::from_ne_bytes(h.socket_id.cookie),
                        // Filled in by the caller, which knows where it dumped.
                        netns: 0,
                        recv_queue: h.recv_queue,
                        activity,
                        last_io,
                    });
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset = offset.saturating_add(length);
        }
    }
}

/// Appends `INET_DIAG_REQ_SK_BPF_STORAGES { SK_DIAG_BPF_STORAGE_REQ_MAP_FD: map }` to a
/// serialized dump request and fixes its length (the crate's request has no field for it).
fn append_storage_request(message: &mut Vec<u8>, map: BorrowedFd) {
    let fd = DefaultNla::new(
        SK_DIAG_BPF_STORAGE_REQ_MAP_FD,
        map.as_raw_fd().to_ne_bytes().to_vec(),
    );
    let mut inner = vec![0; fd.buffer_len()];
    fd.emit(&mut inner);
    let outer = DefaultNla::new(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED, inner);
    let start = message.len();
    message.resize(start + outer.buffer_len(), 0);
    outer.emit(&mut message[start..]);
    // The request is a few dozen bytes, far below a netlink message's u32 length.
    let length = u32::try_from(message.len()).unwrap_or(u32::MAX);
    message[..4].copy_from_slice(&length.to_ne_bytes());
}

/// An attribute's payload (the crate keeps unknown attributes' bytes private).
fn nla_value(nla: &DefaultNla) -> Vec<u8> {
    let mut value = vec![0; nla.value_len()];
    nla.emit_value(&mut value);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One attribute, header and payload, padded to 4 bytes.
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let nla = DefaultNla::new(kind, value.to_vec());
        let mut bytes = vec![0; nla.buffer_len()];
        nla.emit(&mut bytes);
        bytes
    }

    #[test]
    fn last_io_from_a_storage_reply() {
        let mut mark = 123_456_789u64.to_ne_bytes().to_vec();
        mark.extend([monitor_common::io::SEND, 0, 0, 0, 0, 0, 0, 0]);
        // The kernel's layout: map id, 64-bit alignment padding, then the value.
        let entry = [
            nla(2, &7u32.to_ne_bytes()),
            nla(1, &[]),
            nla(SK_DIAG_BPF_STORAGE_MAP_VALUE, &mark),
        ]
        .concat();
        let payload = nla(SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &entry);
        assert_eq!(
            LastIo::from_storages(&payload),
            Some(LastIo {
                op: IoOp::Send,
                at_ns: 123_456_789
            })
        );
        // A value of another size or direction, a truncated reply: nothing, no panic.
        assert_eq!(LastIo::decode(&mark[..12]), None);
        let mut unknown = mark.clone();
        unknown[8] = 9;
        assert_eq!(LastIo::decode(&unknown), None);
        for cut in 0..payload.len() {
            let _ = LastIo::from_storages(&payload[..cut]);
        }
    }

    #[test]
    fn storage_request_is_one_nested_attribute() {
        let mut message = vec![0u8; 16];
        let file = std::fs::File::open("/dev/null").unwrap();
        append_storage_request(&mut message, std::os::fd::AsFd::as_fd(&file));
        assert_eq!(message.len(), 16 + 12);
        assert_eq!(u32::from_ne_bytes(message[..4].try_into().unwrap()), 28);
        let outer = NlasIterator::new(&message[16..]).next().unwrap().unwrap();
        assert_eq!(outer.kind(), INET_DIAG_REQ_SK_BPF_STORAGES);
        let inner = NlasIterator::new(outer.value()).next().unwrap().unwrap();
        assert_eq!(inner.kind(), SK_DIAG_BPF_STORAGE_REQ_MAP_FD);
        assert_eq!(
            inner.value(),
            std::os::fd::AsRawFd::as_raw_fd(&file).to_ne_bytes()
        );
    }

    #[test]
    fn reads_proc_net_lines() {
        let v4 = parse_proc_net_line(
            "   1: 0100007F:1E61 0100007F:8064 01 00000000:0000002A 00:00000000 00000000     0        0 91978295 1 00000000edc2b245 20 0 0 10 -1",
        )
        .unwrap();
        assert_eq!(
            (v4.local.to_string(), v4.remote.to_string()),
            ("127.0.0.1:7777".into(), "127.0.0.1:32868".into())
        );
        assert_eq!(
            (v4.state, v4.inode, v4.recv_queue),
            (TcpState::ESTABLISHED, 91_978_295, 42)
        );
        let v6 = parse_proc_net_line(
            "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0",
        )
        .unwrap();
        assert_eq!(v6.local.to_string(), "[::1]:8080");
        assert_eq!(v6.state, TcpState::LISTEN);
        assert!(parse_proc_net_line("  sl  local_address rem_address   st").is_none());
        assert!(parse_proc_net_line("").is_none());
    }

    #[test]
    fn sees_own_connection_with_tcp_info() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _server = listener.accept().unwrap();
        let sockets = dump_tcp(None).unwrap();
        // The full 4-tuple: an older connection from the same port may linger in TIME_WAIT.
        let own = sockets
            .iter()
            .find(|s| {
                s.local == client.local_addr().unwrap()
                    && s.remote == listener.local_addr().unwrap()
                    && s.state == TcpState::ESTABLISHED
            })
            .expect("client socket listed");
        assert_ne!(own.inode, 0);
        assert!(own.activity.is_some());
        let listening = sockets
            .iter()
            .find(|s| s.local == listener.local_addr().unwrap() && s.state == TcpState::LISTEN);
        assert!(listening.is_some());
    }
}
