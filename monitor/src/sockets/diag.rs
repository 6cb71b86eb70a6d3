//! The kernel's own list of TCP sockets (netlink sock_diag / inet_diag, as `ss` uses), with
//! `tcp_info`: sockets opened before connwatch started, and what events alone miss.
use std::net::SocketAddr;

use anyhow::{Context as _, Result, bail};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

use std::collections::HashMap;

use super::process::ProcIndex;
use crate::events::{Task, TcpState};

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
    /// Bytes received and not yet read by the application.
    pub recv_queue: u32,
    pub activity: Option<TcpActivity>,
}

impl DiagSocket {
    /// Milliseconds since data last moved either way.
    pub fn idle_ms(&self) -> Option<u64> {
        let a = self.activity?;
        Some(a.last_data_sent_ms.min(a.last_data_recv_ms) as u64)
    }
}

/// A socket list with each socket's process, taken off the event loop.
pub struct Snapshot {
    pub sockets: Vec<DiagSocket>,
    /// Socket inode → the process holding it, from one /proc scan.
    pub owners: HashMap<u64, Task>,
    /// The kernel's connect counters at the time of the snapshot (all namespaces).
    pub connects: Vec<(monitor_common::ConnectKey, u64)>,
}

/// Lists the sockets and resolves their owners: the slow part of a refresh (a netlink dump
/// and a walk of every process's fds), done on a thread of its own.
pub fn take_snapshot(processes: &std::sync::Mutex<ProcIndex>) -> Result<Snapshot> {
    let sockets = dump_tcp()?;
    // A poisoned lock only means another thread panicked mid-scan: the index is a cache.
    let mut processes = processes
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let owners = sockets
        .iter()
        .filter(|s| s.inode != 0)
        .filter_map(|s| Some((s.inode, processes.owner_of(s.inode)?)))
        .collect();
    Ok(Snapshot {
        sockets,
        owners,
        connects: Vec::new(),
    })
}

/// Every TCP socket in this network namespace, IPv4 and IPv6.
pub fn dump_tcp() -> Result<Vec<DiagSocket>> {
    let mut socket =
        Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag netlink socket")?;
    socket.bind_auto().context("binding the sock_diag socket")?;
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .context("connecting the sock_diag socket")?;
    let mut sockets = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump_family(&mut socket, family, &mut sockets)
            .with_context(|| format!("sock_diag dump of family {family}"))?;
    }
    Ok(sockets)
}

fn dump_family(socket: &mut Socket, family: u8, sockets: &mut Vec<DiagSocket>) -> Result<()> {
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
    socket.send(&buf, 0).context("sending the dump request")?;

    let mut receive = vec![0u8; 1 << 16];
    loop {
        let size = socket
            .recv(&mut &mut receive[..], 0)
            .context("reading the dump")?;
        let mut offset = 0;
        while offset < size {
            let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&receive[offset..size])
                .context("decoding a sock_diag message")?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(err) => bail!("the kernel refused the dump: {err:?}"),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let h = &response.header;
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
                        inode: h.inode as u64,
                        cookie: u64::from_ne_bytes(h.socket_id.cookie),
                        recv_queue: h.recv_queue,
                        activity,
                    });
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_own_connection_with_tcp_info() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _server = listener.accept().unwrap();
        let sockets = dump_tcp().unwrap();
        // The full 4-tuple: an older connection from the same port may linger in TIME_WAIT.
        let own = sockets
            .iter()
            .find(|s| {
                s.local == client.local_addr().unwrap()
                    && s.remote == listener.local_addr().unwrap()
                    && s.state.name() == "ESTABLISHED"
            })
            .expect("client socket listed");
        assert_ne!(own.inode, 0);
        assert!(own.activity.is_some());
        let listening = sockets
            .iter()
            .find(|s| s.local == listener.local_addr().unwrap() && s.state.name() == "LISTEN");
        assert!(listening.is_some());
    }
}
