//! `connwatch selftest`: proves on this node, end to end, that an idle reset is caught and
//! attributed, and a pool stuck on unanswered requests is found exhausted. A server, a
//! resetting proxy and a client run on loopback inside this process, and a server that
//! never answers with a pool of two connections; it passes only if `peer_reset_idle` and
//! `write_after_reset` name the client thread and `pool_exhausted` names this process with
//! both connections.
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    args::PipelineArgs,
    detect::{Finding, Kind},
    engine::{Consumer, Engine, Flow},
    probes::ProbeOptions,
    proxy::{self, Faults},
};

const CLIENT_THREAD: &str = "cw-selftest";
const RESET_AFTER: Duration = Duration::from_millis(1000);
/// The stuck pool: its size, and how long a request waits before it counts as stalled.
const POOL_SIZE: u32 = 2;
const STALL_AFTER: Duration = Duration::from_millis(1000);

#[derive(Debug, clap::Args)]
pub struct SelftestArgs {
    #[command(flatten)]
    pub probes: ProbeOptions,
    /// Give up after this long.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = crate::args::parse_positive_duration)]
    pub timeout: Duration,
}

struct Expect {
    client_port: Arc<AtomicU16>,
    pid: u32,
    idle_reset: Option<String>,
    write_after: Option<String>,
    /// The stuck pool's endpoint, and what was found for it.
    stuck_server: std::net::SocketAddr,
    exhausted: Option<String>,
    wrong: Vec<String>,
}

impl Consumer for Expect {
    fn finding(&mut self, finding: &Finding) -> Result<Flow> {
        if finding.kind == Kind::PoolExhausted && finding.event.remote == self.stuck_server {
            let pid = finding.owner.as_ref().map_or(0, |o| o.pid);
            let line = format!(
                "pool_exhausted attributed to pid {pid}: {} of {POOL_SIZE} connections stalled",
                finding.connections.unwrap_or(0)
            );
            if pid == self.pid && finding.connections == Some(POOL_SIZE) {
                self.exhausted = Some(line);
            } else {
                self.wrong.push(line);
            }
            return Ok(self.flow());
        }
        let port = self.client_port.load(Ordering::SeqCst);
        if port == 0 || finding.event.local.port() != port {
            return Ok(Flow::Continue);
        }
        let who = finding
            .owner
            .as_ref()
            .map(|o| (o.pid, o.comm.clone()))
            .unwrap_or_default();
        let right_process = who.0 == self.pid && &*who.1 == CLIENT_THREAD;
        let line = format!(
            "{} attributed to pid {} ({})",
            finding.kind.as_str(),
            who.0,
            who.1
        );
        match (finding.kind, right_process) {
            (Kind::PeerResetIdle, true) => self.idle_reset = Some(line),
            (Kind::WriteAfterReset, true) => self.write_after = Some(line),
            (Kind::PeerResetIdle | Kind::WriteAfterReset, false) => self.wrong.push(line),
            _ => {}
        }
        Ok(self.flow())
    }

    fn lost(&mut self, _count: u64, _total: u64) -> Result<Flow> {
        Ok(Flow::Continue)
    }
}

impl Expect {
    fn flow(&self) -> Flow {
        if self.idle_reset.is_some() && self.write_after.is_some() && self.exhausted.is_some() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }
}

/// Greets each connection, then reads its request and never answers: a query stuck on a
/// lock, as the client sees it.
fn stuck_server(listener: TcpListener) {
    for mut stream in listener.incoming().flatten() {
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            // Until the client goes away.
            let _ = stream.write_all(b"ready");
            while stream.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
    }
}

/// A pool of [`POOL_SIZE`] connections to the stuck server, each with a request sent after
/// the greeting; returns the client sockets (shut down to end the pool).
fn stuck_pool(server: std::net::SocketAddr) -> Result<Vec<TcpStream>> {
    let mut pool = Vec::new();
    for _ in 0..POOL_SIZE {
        let mut stream = TcpStream::connect(server).context("connecting to the stuck server")?;
        let mut greeting = [0u8; 5];
        stream.read_exact(&mut greeting)?;
        pool.push(stream);
    }
    // Past a jiffy after the greetings, so that even tcp_info's stamps order the requests.
    thread::sleep(Duration::from_millis(20));
    for stream in &mut pool {
        stream.write_all(b"SELECT")?;
    }
    Ok(pool)
}

/// Echoes whatever it reads.
async fn echo_server(listener: tokio::net::TcpListener) {
    while let Ok((mut socket, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = socket.read(&mut buf).await {
                if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Connects through the proxy, idles past its reset, then writes like a pool reusing the
/// connection.
fn client(proxy: std::net::SocketAddr, port: Arc<AtomicU16>) -> Result<()> {
    let mut stream = TcpStream::connect(proxy).context("client connecting to the proxy")?;
    port.store(stream.local_addr()?.port(), Ordering::SeqCst);
    stream.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf)?;
    thread::sleep(RESET_AFTER + Duration::from_millis(500));
    // Expected to fail: the proxy has reset the connection.
    let _ = stream.write_all(b"query");
    let _ = stream.read(&mut buf);
    Ok(())
}

pub async fn run(args: SelftestArgs) -> Result<()> {
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = server.local_addr()?;
    tokio::spawn(echo_server(server));
    let proxy_listener = proxy::bind("127.0.0.1:0".parse()?).await?;
    let proxy_addr = proxy_listener.local_addr()?;
    let faults = Faults {
        reset_idle_after: Some(RESET_AFTER),
        ..Faults::default()
    };
    tokio::spawn(proxy::serve(proxy_listener, server_addr, faults));
    let stuck = TcpListener::bind("127.0.0.1:0").context("binding the stuck server")?;
    let stuck_addr = stuck.local_addr()?;
    thread::Builder::new()
        .name("cw-selftest-db".into())
        .spawn(move || stuck_server(stuck))?;

    let pipeline = PipelineArgs {
        idle_threshold: RESET_AFTER / 2,
        close_wait_threshold: Duration::from_secs(30),
        stall_threshold: STALL_AFTER,
        zombie_threshold: Duration::from_secs(30),
        refresh: STALL_AFTER / 4,
        host_proc: PathBuf::from("/proc"),
        host_root: PathBuf::from("/"),
        pod_logs: None,
        kubelet_url: None,
        ignore_port: Vec::new(),
        max_tracked_sockets: 4096,
    };
    let mut engine = Engine::start(&args.probes, &pipeline, false)?;
    println!("connwatch selftest: probes attached");
    println!(
        "connwatch selftest: client → proxy {proxy_addr} → server {server_addr}; the proxy resets after {} idle",
        humantime::format_duration(RESET_AFTER)
    );
    let client_port = Arc::new(AtomicU16::new(0));
    let port = client_port.clone();
    let client = thread::Builder::new()
        .name(CLIENT_THREAD.into())
        .spawn(move || client(proxy_addr, port))?;
    println!(
        "connwatch selftest: a pool of {POOL_SIZE} → server {stuck_addr}, which never answers; \
         stalled after {}",
        humantime::format_duration(STALL_AFTER)
    );
    let pool = stuck_pool(stuck_addr)?;
    let mut expect = Expect {
        client_port,
        pid: std::process::id(),
        idle_reset: None,
        write_after: None,
        stuck_server: stuck_addr,
        exhausted: None,
        wrong: Vec::new(),
    };
    engine
        .run(&mut expect, tokio::time::sleep(args.timeout))
        .await?;
    for stream in pool {
        let _ = stream.shutdown(Shutdown::Both);
    }
    client
        .join()
        .map_err(|_| anyhow::anyhow!("the selftest client panicked"))??;
    for line in expect
        .idle_reset
        .iter()
        .chain(&expect.write_after)
        .chain(&expect.exhausted)
    {
        println!("connwatch selftest: ok: {line}");
    }
    for line in &expect.wrong {
        println!("connwatch selftest: wrong process: {line}");
    }
    let missing: Vec<&str> = [
        (expect.idle_reset.is_none(), "peer_reset_idle"),
        (expect.write_after.is_none(), "write_after_reset"),
        (expect.exhausted.is_none(), "pool_exhausted"),
    ]
    .into_iter()
    .filter_map(|(missing, kind)| missing.then_some(kind))
    .collect();
    if !missing.is_empty() {
        bail!(
            "selftest failed: no {} for this process (pid {}, {CLIENT_THREAD}) within {}; {}",
            missing.join(" or "),
            expect.pid,
            humantime::format_duration(args.timeout),
            engine.summary(0)
        );
    }
    println!("connwatch selftest: passed");
    Ok(())
}
