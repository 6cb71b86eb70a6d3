//! `connwatch selftest`: proves on this node, end to end, that an idle reset is caught and
//! attributed. A server, a resetting proxy and a client run on loopback inside this process;
//! it passes only if `peer_reset_idle` and `write_after_reset` name the client thread.
use std::{
    io::{Read, Write},
    net::TcpStream,
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
    wrong: Vec<String>,
}

impl Consumer for Expect {
    fn finding(&mut self, finding: &Finding) -> Result<Flow> {
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
        Ok(if self.idle_reset.is_some() && self.write_after.is_some() {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }

    fn lost(&mut self, _count: u64, _total: u64) -> Result<Flow> {
        Ok(Flow::Continue)
    }
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

    let pipeline = PipelineArgs {
        idle_threshold: RESET_AFTER / 2,
        close_wait_threshold: Duration::from_secs(30),
        stall_threshold: Duration::from_secs(10),
        zombie_threshold: Duration::from_secs(30),
        refresh: Duration::from_secs(60),
        host_proc: PathBuf::from("/proc"),
        host_root: PathBuf::from("/"),
        pod_logs: None,
        kubelet_url: None,
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
    let mut expect = Expect {
        client_port,
        pid: std::process::id(),
        idle_reset: None,
        write_after: None,
        wrong: Vec::new(),
    };
    engine
        .run(&mut expect, tokio::time::sleep(args.timeout))
        .await?;
    client
        .join()
        .map_err(|_| anyhow::anyhow!("the selftest client panicked"))??;
    for line in expect.idle_reset.iter().chain(&expect.write_after) {
        println!("connwatch selftest: ok: {line}");
    }
    for line in &expect.wrong {
        println!("connwatch selftest: wrong process: {line}");
    }
    let missing: Vec<&str> = [
        (expect.idle_reset.is_none(), "peer_reset_idle"),
        (expect.write_after.is_none(), "write_after_reset"),
    ]
    .into_iter()
    .filter_map(|(missing, kind)| missing.then_some(kind))
    .collect();
    if !missing.is_empty() {
        bail!(
            "selftest failed: no {} for the client (pid {}, {CLIENT_THREAD}) within {}; {}",
            missing.join(" or "),
            expect.pid,
            humantime::format_duration(args.timeout),
            engine.summary(0).trim_start_matches("connwatch: ")
        );
    }
    println!("connwatch selftest: passed");
    Ok(())
}
