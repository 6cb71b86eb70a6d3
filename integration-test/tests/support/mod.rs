//! Shared by the integration tests: run the real `connwatch` binary (real eBPF programs in
//! this kernel) and drive real sockets at it.
#![allow(dead_code)] // each test binary uses a different subset

pub mod netns;
pub mod postgres;
pub mod prometheus;

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The connwatch binary under test: `$CONNWATCH_BIN` (xtask sets it; in a guest of the
/// kernel matrix it is the static build), else this workspace's debug build.
pub static CONNWATCH: LazyLock<String> = LazyLock::new(|| {
    let path = std::env::var("CONNWATCH_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/connwatch").to_string()
    });
    assert!(
        std::path::Path::new(&path).is_file(),
        "no connwatch binary at {path}: run `cargo xtask test`, or `cargo build -p monitor` \
         first, or set CONNWATCH_BIN"
    );
    path
});

/// How long connwatch may take to load and attach (the verifier, BTF parsing): a hang's
/// bound, not a speed check. Loading with the kernel diagnostics on (aya-log: 120,000
/// verified instructions for the largest program) took over a minute in an arm64 guest
/// under TCG, beside another test loading.
const START_TIMEOUT: Duration = Duration::from_mins(3);
/// How long an expected event may take to show up: an upper bound for a loaded machine
/// (tests move on as soon as their events arrive).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `connwatch watch --json`.
pub struct Watch {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
    stdout: Option<thread::JoinHandle<()>>,
    /// Held open and never read ([`Watch::spawn_unread`]): the pipe fills and stays full.
    unread: Option<std::process::ChildStdout>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<thread::JoinHandle<()>>,
}

/// What a [`Watch`] does with connwatch's stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stdout {
    /// One JSON object a line.
    Json,
    /// Lines of text (the table), kept as JSON strings.
    Lines,
    /// Never read ([`Watch::spawn_unread`]).
    Unread,
}

pub struct Stopped {
    pub events: Vec<Value>,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Watch {
    /// Starts `connwatch watch --json <args>` and returns once it says it is watching.
    pub fn start(args: &[&str]) -> Watch {
        let mut full = vec!["watch", "--json"];
        full.extend_from_slice(args);
        Watch::spawn(&full)
    }

    /// Starts `connwatch <args>` (any command that prints JSON lines and says
    /// `connwatch: watching` once attached).
    pub fn spawn(args: &[&str]) -> Watch {
        let mut command = Command::new(&*CONNWATCH);
        command.args(args);
        Watch::spawn_command(command)
    }

    /// Starts `connwatch watch <args>`, the table: each line is kept as a JSON string.
    pub fn start_table(args: &[&str]) -> Watch {
        let mut command = Command::new(&*CONNWATCH);
        command.arg("watch").args(args);
        Watch::launch(command, Stdout::Lines)
    }

    /// Like [`spawn`](Self::spawn), for a prepared command (e.g. wrapped in setpriv).
    pub fn spawn_command(command: Command) -> Watch {
        Watch::launch(command, Stdout::Json)
    }

    /// Starts `connwatch <args>` with a stdout nobody reads, like a log collector that
    /// stopped: once the pipe is full, every write to it would block.
    pub fn spawn_unread(args: &[&str]) -> Watch {
        let mut command = Command::new(&*CONNWATCH);
        command.args(args);
        Watch::launch(command, Stdout::Unread)
    }

    fn launch(mut command: Command, stdout_is: Stdout) -> Watch {
        let read_stdout = stdout_is != Stdout::Unread;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn connwatch");
        let events = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = events.clone();
        let (stdout, unread) = if read_stdout {
            (Some(stdout), None)
        } else {
            (None, Some(stdout))
        };
        let stdout = stdout.map(|stdout| {
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let line = line.unwrap();
                    let value = if stdout_is == Stdout::Lines {
                        Value::String(line)
                    } else {
                        serde_json::from_str(&line)
                            .unwrap_or_else(|err| panic!("stdout line is not JSON ({err}): {line}"))
                    };
                    sink.lock().unwrap().push(value);
                }
            })
        });
        let stderr_text = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let text = stderr_text.clone();
        let stderr_thread = thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let line = line.unwrap();
                if line == "connwatch: watching" {
                    let _ = ready_tx.send(());
                }
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        let mut watch = Watch {
            child,
            events,
            stdout,
            unread,
            stderr: stderr_text,
            stderr_thread: Some(stderr_thread),
        };
        if ready_rx.recv_timeout(START_TIMEOUT).is_err() {
            let _ = watch.child.kill();
            let stopped = watch.finish();
            panic!(
                "connwatch did not start watching ({}): {}",
                stopped.status, stopped.stderr
            );
        }
        watch
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The events printed so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the events so far; panics with them on timeout.
    pub fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while Instant::now() < deadline {
            if done(&self.events.lock().unwrap()) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "timed out waiting for {what}; events: {:#?}\nstderr: {}",
            self.events.lock().unwrap(),
            self.stderr.lock().unwrap()
        );
    }

    /// SIGINT, then everything it printed. A clean stop exits 0.
    pub fn stop(self) -> Stopped {
        self.stop_with(nix::sys::signal::Signal::SIGINT)
    }

    pub fn stop_with(mut self, signal: nix::sys::signal::Signal) -> Stopped {
        nix::sys::signal::kill(pid(self.child.id()), signal).unwrap();
        let stopped = self.finish();
        assert!(
            stopped.status.success(),
            "connwatch exited {} on {signal}: {}",
            stopped.status,
            stopped.stderr
        );
        stopped
    }

    /// Waits for connwatch to exit by itself (`--count`, `--duration`).
    pub fn wait_exit(mut self) -> Stopped {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "connwatch did not exit by itself"
            );
            thread::sleep(Duration::from_millis(20));
        }
        self.finish()
    }

    fn finish(&mut self) -> Stopped {
        let status = self.child.wait().unwrap();
        if let Some(stdout) = self.stdout.take() {
            stdout.join().unwrap();
        }
        drop(self.unread.take());
        self.stderr_thread.take().unwrap().join().unwrap();
        Stopped {
            events: std::mem::take(&mut self.events.lock().unwrap()),
            stderr: self.stderr.lock().unwrap().clone(),
            status,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // A failing test must not leave connwatch (and its attached programs) behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn kind(event: &Value) -> &str {
    event["kind"].as_str().unwrap_or_default()
}

pub fn port(addr: &Value) -> u16 {
    let addr = addr.as_str().expect("address is a string");
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Events of `kind` whose local port is `local_port`.
pub fn of_kind<'a>(events: &'a [Value], kind_name: &str, local_port: u16) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| kind(e) == kind_name && port(&e["local"]) == local_port)
        .collect()
}

pub fn count(events: &[Value], kind_name: &str, local_port: u16) -> usize {
    of_kind(events, kind_name, local_port).len()
}

/// `watch` flags for stall tests: only stalls, a short threshold, frequent refreshes.
pub const STALL_WATCH: [&str; 6] = [
    "--kind",
    "request_stalled",
    "--stall-threshold",
    "2s",
    "--refresh",
    "1s",
];

pub const RESET_KINDS: [&str; 3] = ["peer_reset_idle", "peer_reset", "local_reset"];

/// An established client/server pair; the client side lives in its own named thread so
/// its comm is known.
pub struct Pair {
    pub client: TcpStream,
    pub server: TcpStream,
}

impl Pair {
    /// Connects from a thread named `thread_name` and exchanges one request/response.
    pub fn connect(listener: &TcpListener, thread_name: &str) -> Pair {
        let target = listener.local_addr().unwrap();
        let client = in_thread(thread_name, move || TcpStream::connect(target).unwrap());
        let (server, _) = listener.accept().unwrap();
        let mut pair = Pair { client, server };
        pair.round_trip();
        pair
    }

    pub fn round_trip(&mut self) {
        self.client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        self.server.read_exact(&mut buf).unwrap();
        self.server.write_all(b"pong").unwrap();
        self.client.read_exact(&mut buf).unwrap();
    }

    pub fn client_port(&self) -> u16 {
        self.client.local_addr().unwrap().port()
    }

    /// Closes the server side with SO_LINGER {1, 0}: an RST instead of a FIN.
    pub fn reset_from_server(self) -> TcpStream {
        abort(self.server);
        self.client
    }
}

/// Runs `body` on a thread named `name` (the comm connwatch reports) and returns its result.
pub fn in_thread<T: Send + 'static>(name: &str, body: impl FnOnce() -> T + Send + 'static) -> T {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .unwrap()
        .join()
        .unwrap()
}

/// Resets a fresh connection to `listener` and waits until `watch` reports it: connwatch
/// handles events in order, so everything before the sentinel has been seen too.
pub fn sync_with_sentinel(listener: &TcpListener, watch: &Watch) {
    let sentinel = Pair::connect(listener, "cw-sentinel");
    let sentinel_port = sentinel.client_port();
    let _client = sentinel.reset_from_server();
    watch.wait_for("the sentinel reset", |events| {
        count(events, "peer_reset", sentinel_port) >= 1
    });
}

/// close() with SO_LINGER {1, 0}, which makes the kernel send an RST.
pub fn abort(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

/// A listener on `bind` and a watch filtered to its port, with `extra` flags.
pub fn watched_listener(bind: &str, extra: &[&str]) -> (TcpListener, u16, Watch) {
    let (listener, port) = listen(bind);
    let port_text = port.to_string();
    let mut args = vec!["--port", port_text.as_str()];
    args.extend_from_slice(extra);
    (listener, port, Watch::start(&args))
}

/// A millisecond field that must be present.
pub fn ms(event: &Value, field: &str) -> u64 {
    event[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing: {event:?}"))
}

pub fn listen(addr: &str) -> (TcpListener, u16) {
    let listener = TcpListener::bind(addr).unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// A running `connwatch proxy` in front of `upstream`, with one fault flag.
pub struct Proxy {
    child: Child,
    pub port: u16,
}

impl Proxy {
    pub fn start(upstream: u16, fault: &str, after: &str) -> Proxy {
        let port = listen("127.0.0.1:0").1;
        let mut child = Command::new(&*CONNWATCH)
            .args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("127.0.0.1:{upstream}"), fault, after])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        stderr.read_line(&mut first).unwrap();
        assert!(first.starts_with("connwatch: proxying"), "{first}");
        // Keep draining so the proxy never blocks on a full pipe.
        thread::spawn(move || for _ in stderr.lines() {});
        Proxy { child, port }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of the real tracefs's socket tracepoint formats, without `missing`
/// (e.g. "tcp/tcp_receive_reset"): an old kernel, as connwatch sees it. Removed on drop.
pub struct FakeTracefs(pub TempDir);

impl FakeTracefs {
    pub fn without(missing: &str) -> FakeTracefs {
        let real = monitor::probes::tracefs::locate(None).unwrap();
        let fake = TempDir::new(&format!("tracefs-{}", missing.replace('/', "-")));
        for tracepoint in [
            "sock/inet_sock_set_state",
            "tcp/tcp_receive_reset",
            "tcp/tcp_send_reset",
            "tcp/tcp_destroy_sock",
        ] {
            if tracepoint == missing {
                continue;
            }
            let dir = fake.path().join("events").join(tracepoint);
            std::fs::create_dir_all(&dir).unwrap();
            let format = real.join("events").join(tracepoint).join("format");
            std::fs::write(dir.join("format"), std::fs::read(&format).unwrap()).unwrap();
        }
        FakeTracefs(fake)
    }

    pub fn path(&self) -> &str {
        self.0.to_str()
    }
}

/// A fresh directory `connwatch-<name>-<pid>-<n>` under the system's temp dir, removed on
/// drop: also when the test panics.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("connwatch-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|err| panic!("creating {}: {err}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, path: impl AsRef<Path>) -> PathBuf {
        self.0.join(path)
    }

    pub fn to_str(&self) -> &str {
        self.0.to_str().expect("temp dir paths are UTF-8")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An HTTP client that returns 4xx/5xx as responses, not errors.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
}

/// (status, body) of a GET.
pub fn get(url: &str) -> Option<(u16, String)> {
    let response = agent()
        .get(url)
        .call()
        .inspect_err(|err| eprintln!("GET {url}: {err}"))
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.into_body().read_to_string().ok()?))
}

/// A listener on a port below the ephemeral range, so its pool has a `remote_port` label
/// of its own (the daemon's port, and the flood's, are ephemeral).
pub fn listen_below_ephemeral() -> (TcpListener, u16) {
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    (low.saturating_sub(12_000).max(1024)..low)
        .find_map(|port| {
            let listener = TcpListener::bind(("127.0.0.1", port)).ok()?;
            Some((listener, port))
        })
        .expect("a free port below the ephemeral range")
}

/// This process's name (its main thread's comm): what metrics label its sockets by.
pub fn process_comm() -> String {
    fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim_end()
        .to_string()
}

/// The sum of `family`'s samples in `body` whose labels contain every one of `labels`.
pub fn metric_sum_where(body: &str, family: &str, labels: &[String]) -> f64 {
    let prefix = format!("{family}{{");
    body.lines()
        .filter(|line| line.starts_with(&prefix))
        .filter(|line| labels.iter().all(|label| line.contains(label.as_str())))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Polls `url` until a pool's `connwatch_pool_sockets` (the states of the series carrying
/// every one of `labels`) sum to `sockets`; returns that body.
pub fn wait_for_pool_sockets(url: &str, labels: &[String], sockets: f64) -> String {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let body = get(url).map(|(_, body)| body).unwrap_or_default();
        if (metric_sum_where(&body, "connwatch_pool_sockets", labels) - sockets).abs() < 0.5 {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "no pool {labels:?} with {sockets} sockets in:\n{body}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// A child's process id as nix takes it (`pid_max` is at most 2^22, so it always fits).
pub fn pid(id: u32) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(i32::try_from(id).expect("a process id fits in i32"))
}

/// A count as a Prometheus sample (which are floats), to compare with one.
#[expect(
    clippy::cast_precision_loss,
    reason = "the tests' counts stay far below 2^52, below which f64 holds integers exactly"
)]
pub fn sample(count: usize) -> f64 {
    count as f64
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of the first sample in an OpenMetrics `body` that starts with `series`.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|line| line.starts_with(series))?
        .rsplit_once(' ')?
        .1
        .parse()
        .ok()
}

/// The sum of every sample in `body` that starts with `series` (all of a family's labels).
pub fn metric_sum(body: &str, series: &str) -> f64 {
    body.lines()
        .filter(|line| line.starts_with(series))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Polls `url` until its body contains `needle`; panics with the last body.
pub fn wait_for_body(url: &str, needle: &str) -> String {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        if let Some((_, body)) = get(url)
            && body.contains(needle)
        {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never contained {needle}: {:?}",
            get(url)
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// `ss -K` on the established sockets with local port `port`, in `netns` if given.
pub fn kill_established(netns: Option<&str>, port: u16) {
    let filter = format!(":{port}");
    let ss = [
        "ss",
        "-K",
        "state",
        "established",
        "sport",
        "=",
        filter.as_str(),
    ];
    match netns {
        Some(ns) => run("ip", &[&["netns", "exec", ns][..], &ss].concat()),
        None => run(ss[0], &ss[1..]),
    };
}

/// Runs a command and panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("running {program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether the running kernel is at least `major.minor`: tests state what each kernel of
/// the matrix can and cannot see (README "Supported kernels").
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let uname = nix::sys::utsname::uname().expect("uname");
    let release = uname.release().to_string_lossy().into_owned();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// Whether the send/recv hooks run typed and can keep each socket's last call in socket
/// storage, ordering requests against answers: socket storage for tracing programs is
/// Linux 5.11+, and the hooks are typed where `sock_send_length` exists (6.3+) or BPF
/// trampolines attach to kernel functions (fexit): x86-64 always, arm64 only from 6.5
/// (ftrace direct calls), so arm64 6.1 uses kprobes, which cannot reach socket storage.
/// Elsewhere `tcp_info`'s ticks order them, as `doctor` says.
pub fn requests_ordered() -> bool {
    kernel_at_least(5, 11) && send_recv_typed()
}

/// Whether the send/recv hooks run typed (tp_btf or fexit), not as kprobes: see
/// [`requests_ordered`].
pub fn send_recv_typed() -> bool {
    cfg!(target_arch = "x86_64") || kernel_at_least(6, 3)
}

/// The network namespace of process `pid`, as connwatch reports it (`netns`: its inode).
pub fn netns_inode(pid: u32) -> u64 {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let link = link.to_str().unwrap();
    link["net:[".len()..link.len() - 1].parse().unwrap()
}

/// `<connwatch> top --once --json <extra>` (`command` runs connwatch, perhaps wrapped):
/// the snapshot it printed, and its stderr. It must succeed.
pub fn top_once(mut command: Command, extra: &[&str]) -> (Value, String) {
    let output = command
        .args(["top", "--once", "--json"])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    (serde_json::from_slice(&output.stdout).unwrap(), stderr)
}

/// connwatch as uid nobody with exactly `caps` (e.g. `+bpf,+perfmon`), inherited and
/// ambient: a least-privilege run.
pub fn as_nobody(caps: &str) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps=-all,{caps}"))
        .arg(format!("--ambient-caps=-all,{caps}"))
        .arg("--")
        .arg(&*CONNWATCH);
    command
}

/// Resets connections to `listener` in a loop until `stop`: each one a finding or two.
pub struct ResetFlood {
    stop: Arc<AtomicBool>,
    resets: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ResetFlood {
    pub fn start(listener: TcpListener) -> ResetFlood {
        let stop = Arc::new(AtomicBool::new(false));
        let resets = Arc::new(AtomicU64::new(0));
        let port = listener.local_addr().unwrap().port();
        let thread = {
            let (stop, resets) = (stop.clone(), resets.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
                    abort(listener.accept().unwrap().0);
                    drop(client);
                    resets.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        ResetFlood {
            stop,
            resets,
            thread: Some(thread),
        }
    }

    /// Resets made so far.
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.resets.load(Ordering::Relaxed)
    }
}

/// The `N <label>` figure of the stop summary in `text` (`stopped: 12 events read, 0 lost,
/// …`): `summary_count(stderr, "lost")`.
pub fn summary_count(text: &str, label: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split("stopped: ").nth(1))
        .next_back()
        .and_then(|summary| {
            summary
                .split(", ")
                .find_map(|part| part.strip_suffix(label)?.strip_suffix(' ')?.parse().ok())
        })
        .unwrap_or_else(|| panic!("no `N {label}` in a stop summary: {text}"))
}

/// The Python with the pinned client libraries (SQLAlchemy, psycopg2) xtask installs under
/// target/clients.
pub fn python_clients() -> std::path::PathBuf {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/clients/venv/bin/python");
    assert!(
        python.exists(),
        "SQLAlchemy missing: run `cargo xtask setup` (or `cargo xtask test`)"
    );
    python
}

/// `support/client.py <args>`: a client in another process (its comm is `python3`), with
/// stdin and stdout piped. Killed on drop.
pub struct PyClient {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl PyClient {
    pub fn start(args: &[&str]) -> PyClient {
        let mut child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/client.py"
            ))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        PyClient { child, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line it prints, trimmed; panics if it exits first.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "client.py exited without a line");
        line.trim().to_string()
    }

    /// A line to its stdin (`one PORT cued` connects on it).
    pub fn cue(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes its stdin (which ends every mode) and waits for a clean exit.
    pub fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "client.py exited {status}");
    }
}

impl Drop for PyClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
