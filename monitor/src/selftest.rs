//! `connwatch selftest`: proves on this node, end to end, that an idle reset is caught and
//! attributed, and a pool stuck on unanswered requests is found exhausted. A server, a
//! resetting proxy and a client run on loopback inside this process, and a server that
//! never answers with a pool of two connections; it passes only if `peer_reset_idle` and
//! `used_after_reset` name the client thread and `pool_exhausted` names this process with
//! both connections, and none of its own sockets' findings names another process.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{Arc, OnceLock},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    args::PipelineArgs,
    detect::{Finding, Kind},
    engine::{Consumer, Engine, Flow, Streams},
    probes::ProbeOptions,
    relay::{self, Faults},
    sinks::Loss,
};

const CLIENT_THREAD: &str = "cw-selftest";
const RESET_AFTER: Duration = Duration::from_secs(1);
/// The stuck pool: its size, and how long a request waits before it counts as stalled.
const POOL_SIZE: u32 = 2;
const STALL_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, clap::Args)]
pub struct SelftestArgs {
    #[command(flatten)]
    pub probes: ProbeOptions,
    /// Give up after this long.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = crate::args::parse_positive_duration)]
    pub timeout: Duration,
}

/// What the selftest waits for, and what it found. Findings are matched to the selftest's
/// own sockets by both their addresses and their network namespace: on a busy node other
/// processes' sockets can have the same port numbers, and their findings are not the
/// selftest's. A finding on its own socket attributed to another process is a failure.
struct Expect {
    /// The client's connection to the proxy: its local address, once connected.
    client: Arc<OnceLock<SocketAddr>>,
    proxy: SocketAddr,
    /// This process's network namespace, where known.
    netns: Option<u64>,
    pid: u32,
    idle_reset: Option<String>,
    used_after: Option<String>,
    /// The stuck pool's endpoint, its connections' local addresses, and what was found.
    stuck_server: SocketAddr,
    pool: Vec<SocketAddr>,
    exhausted: Option<String>,
    wrong: Vec<String>,
}

impl Consumer for Expect {
    fn finding(&mut self, finding: &Finding) -> Result<Flow> {
        self.check(finding);
        Ok(self.flow())
    }

    fn lost(&mut self, _loss: &Loss) -> Result<Flow> {
        Ok(Flow::Continue)
    }
}

impl Expect {
    /// Whether the finding is about one of this process's sockets: one of `locals` →
    /// `remote`, in this network namespace.
    fn ours(&self, finding: &Finding, locals: &[SocketAddr], remote: SocketAddr) -> bool {
        let event = &finding.event;
        let same_netns = match (event.netns, self.netns) {
            (Some(theirs), Some(ours)) => theirs == ours,
            _ => true,
        };
        same_netns && event.remote == remote && locals.contains(&event.local)
    }

    fn check(&mut self, finding: &Finding) {
        let who = finding
            .owner
            .as_ref()
            .map(|o| (o.pid, o.comm.clone()))
            .unwrap_or_default();
        if finding.kind == Kind::PoolExhausted {
            if !self.ours(finding, &self.pool, self.stuck_server) {
                return;
            }
            let line = format!(
                "pool_exhausted attributed to pid {}: {} of {POOL_SIZE} connections stalled",
                who.0,
                finding.connections.unwrap_or(0)
            );
            if who.0 == self.pid && finding.connections == Some(POOL_SIZE) {
                self.exhausted = Some(line);
            } else {
                self.wrong.push(line);
            }
            return;
        }
        let Some(&client) = self.client.get() else {
            return;
        };
        if !self.ours(finding, &[client], self.proxy) {
            return;
        }
        let right_process = who.0 == self.pid && &*who.1 == CLIENT_THREAD;
        let line = format!(
            "{} attributed to pid {} ({})",
            finding.kind.as_str(),
            who.0,
            who.1
        );
        match (finding.kind, right_process) {
            (Kind::PeerResetIdle, true) => self.idle_reset = Some(line),
            (Kind::UsedAfterReset, true) => self.used_after = Some(line),
            (Kind::PeerResetIdle | Kind::UsedAfterReset, false) => self.wrong.push(line),
            _ => {}
        }
    }

    fn flow(&self) -> Flow {
        if self.idle_reset.is_some() && self.used_after.is_some() && self.exhausted.is_some() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    /// Why the selftest failed, if it did: a finding missing, or one of its own sockets'
    /// findings attributed to another process.
    fn failure(&self) -> Option<String> {
        let missing: Vec<&str> = [
            (self.idle_reset.is_none(), "peer_reset_idle"),
            (self.used_after.is_none(), "used_after_reset"),
            (self.exhausted.is_none(), "pool_exhausted"),
        ]
        .into_iter()
        .filter_map(|(missing, kind)| missing.then_some(kind))
        .collect();
        let mut why = Vec::new();
        if !missing.is_empty() {
            why.push(format!(
                "no {} for this process (pid {}, {CLIENT_THREAD})",
                missing.join(" or "),
                self.pid
            ));
        }
        if !self.wrong.is_empty() {
            why.push(format!(
                "its own sockets' findings attributed to another process ({})",
                self.wrong.join("; ")
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// Greets each connection, then reads its request and never answers: a query stuck on a
/// lock, as the client sees it.
fn stuck_server(listener: &TcpListener) {
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
fn client(proxy: SocketAddr, local: &OnceLock<SocketAddr>) -> Result<()> {
    let mut stream = TcpStream::connect(proxy).context("client connecting to the proxy")?;
    let _ = local.set(stream.local_addr()?);
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
    let proxy_listener = relay::bind("127.0.0.1:0".parse()?).await?;
    let proxy_addr = proxy_listener.local_addr()?;
    let faults = Faults {
        reset_idle_after: Some(RESET_AFTER),
        ..Faults::default()
    };
    tokio::spawn(relay::serve(proxy_listener, server_addr, faults));
    let stuck = TcpListener::bind("127.0.0.1:0").context("binding the stuck server")?;
    let stuck_addr = stuck.local_addr()?;
    thread::Builder::new()
        .name("cw-selftest-db".into())
        .spawn(move || stuck_server(&stuck))?;

    let pipeline = PipelineArgs {
        idle_threshold: RESET_AFTER / 2,
        close_wait_threshold: Duration::from_secs(30),
        stall_threshold: STALL_AFTER,
        zombie_threshold: Duration::from_secs(30),
        leak_threshold: Duration::from_secs(30),
        refresh: STALL_AFTER / 4,
        host_proc: PathBuf::from("/proc"),
        host_root: PathBuf::from("/"),
        pod_logs: None,
        kubelet_url: None,
        ignore_port: Vec::new(),
        max_tracked_sockets: 4096,
    };
    let mut engine = Engine::start(&args.probes, &pipeline, &Streams::default())?;
    println!("connwatch selftest: probes attached");
    println!(
        "connwatch selftest: client → proxy {proxy_addr} → server {server_addr}; the proxy resets after {} idle",
        humantime::format_duration(RESET_AFTER)
    );
    let client_local = Arc::new(OnceLock::new());
    let local = client_local.clone();
    let client = thread::Builder::new()
        .name(CLIENT_THREAD.into())
        .spawn(move || client(proxy_addr, &local))?;
    println!(
        "connwatch selftest: a pool of {POOL_SIZE} → server {stuck_addr}, which never answers; \
         stalled after {}",
        humantime::format_duration(STALL_AFTER)
    );
    let pool = stuck_pool(stuck_addr)?;
    let mut expect = Expect {
        client: client_local,
        proxy: proxy_addr,
        netns: crate::sockets::diag::own_namespace().ok(),
        pid: std::process::id(),
        idle_reset: None,
        used_after: None,
        stuck_server: stuck_addr,
        pool: pool
            .iter()
            .map(std::net::TcpStream::local_addr)
            .collect::<std::io::Result<_>>()?,
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
        .chain(&expect.used_after)
        .chain(&expect.exhausted)
    {
        println!("connwatch selftest: ok: {line}");
    }
    for line in &expect.wrong {
        println!("connwatch selftest: wrong process: {line}");
    }
    if let Some(why) = expect.failure() {
        bail!(
            "selftest failed: {why} within {}; {}",
            humantime::format_duration(args.timeout),
            engine.summary(0)
        );
    }
    println!("connwatch selftest: passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Task, from_raw, tests::raw_reset};

    const CLIENT: &str = "127.0.0.1:40000";
    const PROXY: &str = "127.0.0.1:5432";

    fn expect() -> Expect {
        Expect {
            client: Arc::new(OnceLock::from(CLIENT.parse::<SocketAddr>().unwrap())),
            proxy: PROXY.parse().unwrap(),
            netns: Some(4_026_531_840),
            pid: 42,
            idle_reset: None,
            used_after: None,
            stuck_server: "127.0.0.1:6000".parse().unwrap(),
            pool: vec!["127.0.0.1:50001".parse().unwrap()],
            exhausted: None,
            wrong: Vec::new(),
        }
    }

    fn finding(kind: Kind, local: &str, remote: &str, pid: u32, comm: &str) -> Finding {
        let mut event = from_raw(&raw_reset(2000)).unwrap();
        (event.local, event.remote) = (local.parse().unwrap(), remote.parse().unwrap());
        event.netns = Some(4_026_531_840);
        let owner = Task {
            pid,
            tid: pid,
            comm: comm.into(),
        };
        let mut finding = Finding::new(kind, &event, Some(&owner));
        finding.connections = Some(POOL_SIZE);
        finding
    }

    #[test]
    fn its_own_sockets_findings_pass() {
        let mut expect = expect();
        expect.check(&finding(
            Kind::PeerResetIdle,
            CLIENT,
            PROXY,
            42,
            CLIENT_THREAD,
        ));
        expect.check(&finding(
            Kind::UsedAfterReset,
            CLIENT,
            PROXY,
            42,
            CLIENT_THREAD,
        ));
        expect.check(&finding(
            Kind::PoolExhausted,
            "127.0.0.1:50001",
            "127.0.0.1:6000",
            42,
            "connwatch",
        ));
        assert!(matches!(expect.flow(), Flow::Stop));
        assert_eq!(expect.failure(), None);
    }

    #[test]
    fn other_processes_findings_are_not_the_selftests() {
        let mut expect = expect();
        // The client's port number, on another connection of another process ("churn"
        // connected from the same port to somewhere else), and in another namespace.
        expect.check(&finding(
            Kind::UsedAfterReset,
            CLIENT,
            "10.0.0.9:80",
            30257,
            "churn",
        ));
        let mut elsewhere = finding(Kind::PeerResetIdle, CLIENT, PROXY, 30257, "churn");
        elsewhere.event.netns = Some(4_026_532_177);
        expect.check(&elsewhere);
        expect.check(&finding(
            Kind::PoolExhausted,
            "127.0.0.1:50002",
            "127.0.0.1:6000",
            30257,
            "churn",
        ));
        assert!(expect.wrong.is_empty(), "{:?}", expect.wrong);
        assert!(expect.idle_reset.is_none() && expect.used_after.is_none());
    }

    #[test]
    fn its_own_socket_attributed_to_another_process_fails() {
        let mut expect = expect();
        expect.check(&finding(
            Kind::PeerResetIdle,
            CLIENT,
            PROXY,
            42,
            CLIENT_THREAD,
        ));
        expect.check(&finding(
            Kind::UsedAfterReset,
            CLIENT,
            PROXY,
            30257,
            "churn",
        ));
        expect.check(&finding(
            Kind::UsedAfterReset,
            CLIENT,
            PROXY,
            42,
            CLIENT_THREAD,
        ));
        expect.check(&finding(
            Kind::PoolExhausted,
            "127.0.0.1:50001",
            "127.0.0.1:6000",
            42,
            "connwatch",
        ));
        let failure = expect.failure().expect("a failure, not a pass");
        assert!(
            failure.contains("used_after_reset attributed to pid 30257 (churn)"),
            "{failure}"
        );
    }
}
