//! The daemon's HTTP endpoints against clients that hold connections (issue #17): under a
//! 256 open-files limit, hundreds of connections that send nothing or dribble a header
//! must neither starve `/healthz` nor the socket refresh of file descriptors, and the
//! server must close them itself.
mod support;

use std::{
    collections::HashSet,
    fs,
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use monitor::http::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS};
use nix::sys::{resource::Resource, signal::Signal};
use support::*;

/// The open-files limit of the reported incident.
const NOFILE: u64 = 256;
/// Connections that connect and send nothing.
const SILENT: usize = 300;
/// Connections that send a partial request head, then one byte every `DRIBBLE_EVERY`.
const DRIBBLERS: usize = 20;
const DRIBBLE_EVERY: Duration = Duration::from_millis(250);
/// How long `/healthz` may take to answer during the flood (the kubelet's default probe
/// timeout is 1 s; this machine may be a loaded VM).
const HEALTHZ_WITHIN: Duration = Duration::from_secs(2);
/// Slack on top of the header read timeout for the server to close a connection.
const CLOSE_MARGIN: Duration = Duration::from_secs(5);

/// `connwatch daemon` on `addr` with the soft and hard open-files limit at [`NOFILE`].
fn daemon_with_few_files(addr: &str) -> Watch {
    let mut command = Command::new(&*CONNWATCH);
    command.args([
        "daemon",
        "--listen",
        addr,
        "--refresh",
        "1s",
        "--log-events",
        "false",
    ]);
    // SAFETY: the closure runs between fork and exec, where only async-signal-safe calls
    // are allowed: it makes one, setrlimit(2), and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            nix::sys::resource::setrlimit(Resource::RLIMIT_NOFILE, NOFILE, NOFILE)
                .map_err(std::io::Error::from)
        });
    }
    Watch::spawn_command(command)
}

/// `GET url`, which must answer 200 within [`HEALTHZ_WITHIN`]; returns the body. For the
/// requests whose latency is the point (under a flood).
fn answers_quickly(url: &str) -> String {
    let (body, took) = answers(url);
    assert!(took < HEALTHZ_WITHIN, "{url} took {took:?}");
    body
}

/// `GET url`, which must answer 200 (within the client's timeout); returns the body and how
/// long it took. For requests whose latency is not the point: a daemon starting beside
/// another test's under emulation (the kernel matrix) may take seconds to answer its first.
fn answers(url: &str) -> (String, Duration) {
    let started = Instant::now();
    let answer = get(url);
    let took = started.elapsed();
    let (status, body) = answer.unwrap_or_else(|| panic!("{url}: no answer in {took:?}"));
    assert_eq!(status, 200, "{url} after {took:?}: {body}");
    (body, took)
}

/// Whether the server has closed `stream`: a read returns end of file or a reset before
/// `deadline`. Data is not expected (none of these sent a complete request).
fn closed_by(stream: &mut TcpStream, deadline: Instant) -> Result<(), String> {
    let wait = deadline.saturating_duration_since(Instant::now());
    stream
        .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
        .unwrap();
    let mut buf = [0u8; 512];
    match stream.read(&mut buf) {
        Ok(0) => Ok(()),
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            ) =>
        {
            Ok(())
        }
        Ok(n) => Err(format!(
            "got {:?}",
            String::from_utf8_lossy(&buf[..n.min(100)])
        )),
        Err(err) => Err(format!("still open ({err})")),
    }
}

/// Writes one byte at a time to every stream until stopped: headers that never end.
struct Dribbler {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Dribbler {
    /// Sends each stream a request line and a first header, then dribbles.
    fn start(streams: &[TcpStream]) -> Dribbler {
        let mut writers: Vec<TcpStream> = streams
            .iter()
            .map(|stream| {
                let mut writer = stream.try_clone().unwrap();
                writer
                    .write_all(b"GET /metrics HTTP/1.1\r\nHost: connwatch\r\nX-Slow: ")
                    .unwrap();
                writer
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                // A closed one fails (EPIPE, ECONNRESET): that is for the reader to notice.
                for writer in &mut writers {
                    let _ = writer.write_all(b"a");
                }
                thread::sleep(DRIBBLE_EVERY);
            }
        });
        Dribbler {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Dribbler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn connect_all(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "the flood, then each kind of client's fate, in the order they happen"
)]
fn idle_and_slow_clients_do_not_exhaust_the_daemon() {
    let addr = format!("127.0.0.1:{}", free_port());
    let daemon = daemon_with_few_files(&addr);
    let target: SocketAddr = addr.parse().unwrap();
    let base = format!("http://{addr}");
    answers(&format!("{base}/healthz"));

    // The flood: more connections than the daemon has file descriptors.
    let opened = Instant::now();
    let mut silent = connect_all(target, SILENT);
    let mut slow = connect_all(target, DRIBBLERS);
    let dribbler = Dribbler::start(&slow);
    let flooded = Instant::now();
    eprintln!(
        "{} connections opened in {:?}",
        SILENT + DRIBBLERS,
        flooded - opened
    );

    // The kubelet's probes and a scrape are answered while they are open.
    for _ in 0..3 {
        answers_quickly(&format!("{base}/healthz"));
        answers_quickly(&format!("{base}/readyz"));
    }
    let body = answers_quickly(&format!("{base}/metrics"));
    assert!(body.contains("connwatch_build_info{"), "{body}");

    // The socket refresh (sock_diag, /proc) still has descriptors: a pool opened during the
    // flood shows up in the gauges.
    let (listener, pool_port) = listen_below_ephemeral();
    let pairs: Vec<Pair> = (0..3)
        .map(|_| Pair::connect(&listener, "cw-http-pool"))
        .collect();
    let pool = [
        r#"direction="outbound""#.to_string(),
        format!(r#"comm="{}""#, process_comm()),
        format!(r#"local_port="",remote_port="{pool_port}""#),
    ];
    wait_for_pool_sockets(&format!("{base}/metrics"), &pool, 3.0);
    eprintln!("pool gauge seen {:?} after the flood", flooded.elapsed());

    // The server closes every one of them: at once when shed at the cap, at the latest
    // when the header read timeout expires (dribbling does not extend it).
    let deadline = flooded + HEADER_READ_TIMEOUT + CLOSE_MARGIN;
    let still_open: Vec<String> = silent
        .iter_mut()
        .map(|stream| ("silent", stream))
        .chain(slow.iter_mut().map(|stream| ("dribbling", stream)))
        .enumerate()
        .filter_map(|(i, (what, stream))| {
            closed_by(stream, deadline)
                .err()
                .map(|why| format!("{what} #{i}: {why}"))
        })
        .collect();
    assert!(
        still_open.is_empty(),
        "{} of {} not closed by the server within {:?}: {still_open:?}",
        still_open.len(),
        SILENT + DRIBBLERS,
        HEADER_READ_TIMEOUT + CLOSE_MARGIN
    );
    eprintln!("all closed {:?} after the flood", flooded.elapsed());
    drop(dribbler);
    drop((silent, slow));

    // Below the cap nothing is shed: a dribbled header and a kept-alive connection that
    // goes quiet are closed by the timeout, no sooner.
    let mut slow = connect_all(target, 3);
    let dribbler = Dribbler::start(&slow);
    let mut kept = TcpStream::connect(target).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: connwatch\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while !answer.ends_with(b"\r\n\r\nok\n") {
        let n = kept.read(&mut buf).unwrap();
        assert!(n > 0, "{:?}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200 "));
    let started = Instant::now();
    let mut quiet: Vec<&mut TcpStream> = slow.iter_mut().chain([&mut kept]).collect();
    let early = (started + HEADER_READ_TIMEOUT)
        .checked_sub(Duration::from_secs(1))
        .unwrap();
    for (i, stream) in quiet.iter_mut().enumerate() {
        assert!(
            closed_by(stream, early).is_err(),
            "#{i} closed before the header timeout"
        );
    }
    for (i, stream) in quiet.iter_mut().enumerate() {
        let closed = closed_by(stream, started + HEADER_READ_TIMEOUT + CLOSE_MARGIN);
        assert_eq!(closed, Ok(()), "#{i} after {:?}", started.elapsed());
    }
    drop(dribbler);

    // What was closed is counted.
    let body = answers_quickly(&format!("{base}/metrics"));
    let closed = |reason: &str| {
        metric(
            &body,
            &format!(r#"connwatch_http_connections_closed_total{{reason="{reason}"}}"#),
        )
        .unwrap_or_else(|| panic!("no closed count for {reason}:\n{body}"))
    };
    let shed = closed("shed");
    assert!(
        shed >= sample(SILENT + DRIBBLERS - MAX_CONNECTIONS),
        "{shed} shed:\n{body}"
    );
    assert!(closed("timeout") >= 3.0, "{body}");
    assert!(closed("idle") >= 1.0, "{body}");
    drop(pairs);

    let stopped = daemon.stop_with(Signal::SIGTERM);
    // Out of descriptors, only the accept loop may say so (it backs off and sheds, said
    // once); the refresh, its /proc walk and sock_diag must never run out.
    let out_of_files = |line: &&str| {
        line.contains("Too many open files") || line.contains("No file descriptors available")
    };
    let elsewhere: Vec<&str> = stopped
        .stderr
        .lines()
        .filter(out_of_files)
        .filter(|line| !line.contains("cannot accept HTTP connections"))
        .collect();
    assert!(elsewhere.is_empty(), "{}", stopped.stderr);
    assert!(
        !stopped.stderr.contains("cannot list sockets"),
        "{}",
        stopped.stderr
    );
    eprintln!("{}", stopped.stderr);
}

/// Sets the open-files limit of process `pid`, if `limit`; returns the old one.
fn set_nofile(pid: u32, limit: Option<libc::rlimit>) -> libc::rlimit {
    let pid = support::pid(pid);
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new = limit.as_ref().map_or(std::ptr::null(), std::ptr::from_ref);
    // nix has no prlimit(2) (another process's limit), hence libc.
    // SAFETY: `new` is null or points to a live rlimit, `old` is a live rlimit.
    let rc = unsafe { libc::prlimit(pid.as_raw(), libc::RLIMIT_NOFILE, new, &raw mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

/// Out of descriptors below the cap (the rest of the daemon holds more than it should): the
/// server backs off instead of spinning or stopping, says so once, and gives the idle
/// connections' descriptors to the ones queued behind them.
#[test]
fn out_of_files_the_server_backs_off_and_sheds() {
    const QUEUED: usize = 10;
    let addr = format!("127.0.0.1:{}", free_port());
    // Refreshes would need descriptors too: one at start, none during the test.
    let daemon = Watch::spawn(&[
        "daemon",
        "--listen",
        &addr,
        "--log-events",
        "false",
        "--refresh",
        "1h",
    ]);
    let target: SocketAddr = addr.parse().unwrap();
    let base = format!("http://{addr}");
    answers(&format!("{base}/healthz"));
    // The start-up refresh (every namespace's sockets, /proc) holds descriptors while it
    // runs: let it finish, so the count below is the daemon's at rest.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(
        &answers(&format!("{base}/metrics")).0,
        "connwatch_network_namespaces",
    )
    .unwrap_or(0.0)
        < 1.0
    {
        assert!(Instant::now() < deadline, "no refresh in 30 s");
        thread::sleep(Duration::from_millis(50));
    }
    // The soft limit at which three descriptor numbers are free below it (the daemon may
    // have inherited a high one; those above the limit stay open). Lowering the soft limit
    // and raising it back up to the hard one needs no privilege.
    let used: HashSet<u64> = fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let tight = (0..)
        .filter(|fd| !used.contains(fd))
        .nth(2)
        .map(|third_free| third_free + 1)
        .unwrap();
    let original = set_nofile(daemon.pid(), None);
    set_nofile(
        daemon.pid(),
        Some(libc::rlimit {
            rlim_cur: tight,
            rlim_max: original.rlim_max,
        }),
    );
    let silent = connect_all(target, QUEUED);
    // Queued behind them, answered once the server has shed its way through the queue at
    // one connection per back-off (with the old server, never: nothing closed them).
    let started = Instant::now();
    let answer = get(&format!("{base}/healthz"));
    let took = started.elapsed();
    assert_eq!(
        answer.map(|(status, _)| status),
        Some(200),
        "after {took:?}"
    );
    eprintln!("/healthz answered in {took:?} out of descriptors");
    set_nofile(daemon.pid(), Some(original));

    let (body, _) = answers(&format!("{base}/metrics"));
    let errors = metric(&body, "connwatch_http_accept_errors_total").unwrap();
    let shed = metric(
        &body,
        r#"connwatch_http_connections_closed_total{reason="shed"}"#,
    )
    .unwrap();
    assert!(errors >= 1.0, "{body}");
    // One shed per failed accept at most, and no spinning: about one a back-off.
    assert!(
        shed >= 1.0 && shed <= errors,
        "{shed} shed, {errors} errors"
    );
    assert!(
        errors <= 2.0 * sample(QUEUED) + took.as_secs_f64() * 20.0,
        "{errors} accept errors in {took:?}"
    );
    drop(silent);
    let stopped = daemon.stop_with(Signal::SIGTERM);
    let warnings = stopped
        .stderr
        // "Too many open files" with glibc, "No file descriptors available" with musl.
        .matches("cannot accept HTTP connections (")
        .count();
    assert_eq!(warnings, 1, "{}", stopped.stderr);
}
