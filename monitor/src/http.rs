//! The daemon's HTTP server: its axum [`Router`] on hyper's HTTP/1 connections, with the
//! limits `axum::serve` does not have (issue #17). Without them a client that connects and
//! sends nothing, or dribbles a header, holds a file descriptor forever; a few hundred
//! such connections used up the daemon's descriptors, so the kubelet's `/healthz` went
//! unanswered and the socket refresh (a sock_diag socket, the `/proc` walk) failed with
//! "Too many open files".
//!
//! - A connection has [`HEADER_READ_TIMEOUT`] to send a complete request head, counted from
//!   when the server starts waiting for one: right after accepting it, and after each
//!   response on a kept-alive connection (so the same bound closes idle keep-alives).
//! - Each connection lives at most [`MAX_CONNECTION_AGE`], then [`CLOSE_GRACE`] more to
//!   finish a response in flight.
//! - At most [`MAX_CONNECTIONS`] are open. A new one at the cap closes the connection idle
//!   longest (none of its requests inside a handler), so a probe is answered however many
//!   idle clients there are; when every one is inside a handler the new one is closed.
//! - An `accept()` error (EMFILE, ENFILE, ENOBUFS) waits [`ACCEPT_BACKOFF`] and retries,
//!   said once on stderr; out of descriptors, it first closes the connection idle longest.
//!
//! Every connection closed to stay within these limits is counted by reason
//! ([`HttpMetrics`]). Dropping (aborting) the server future closes every connection.
use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::Router;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    task::{AbortHandle, JoinSet},
};

/// The most a request may buffer (hyper's minimum is 8 KiB): a scrape's request is a few
/// hundred bytes; larger headers are answered 431.
const MAX_REQUEST_BYTES: usize = 16 << 10;

/// How long a client has to send a complete request head, from the moment the server waits
/// for one (after the accept, and after each response on a kept-alive connection). A probe
/// or a scraper sends its whole request at once, well within 5 s even from a loaded node;
/// a client that sends nothing, or dribbles a header, is closed after 5 s instead of never.
///
/// hyper runs the same timer while a kept-alive connection waits for its next request, so
/// this is also the keep-alive idle timeout. Prometheus scrapes every 15–60 s: between two
/// scrapes its connection is closed and the next scrape opens a new one (one TCP handshake
/// per scrape, nothing next to the scrape itself); scrape intervals under 5 s keep theirs.
/// Go's HTTP client (Prometheus) retries a request whose reused connection the server
/// closed before answering, so a scrape racing the close still succeeds.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long any connection may stay open, busy or not: a client that sends a request every
/// few seconds (a 1 s scrape interval) never meets the idle timeout, and without this bound
/// would keep its connection (and its slot under [`MAX_CONNECTIONS`]) forever. At this age
/// the response in flight is finished with `connection: close`, or an idle connection is
/// closed; the client reconnects for its next request. Five minutes: a reconnect every 300 s
/// costs nothing, and is far apart enough that no scrape interval notices it.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_mins(5);

/// After [`MAX_CONNECTION_AGE`], how long a response in flight may still take before the
/// connection is dropped anyway (a client that stopped reading its `/metrics` body). A
/// scrape of the largest `/metrics` on a loopback or node network takes milliseconds.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Open connections at most, so the daemon's file descriptors stay bounded: the kubelet's
/// probes (one connection each, no keep-alive), one or two Prometheus servers, and people
/// with curl need a handful at once; 64 leave room for bursts while the daemon's own
/// descriptors (programs, maps, perf buffers, the refresh's netlink sockets and `/proc`
/// walk) keep the rest of even a 256-descriptor limit.
pub const MAX_CONNECTIONS: usize = 64;

/// How long to wait after an `accept()` error before the next one. The usual errors (EMFILE,
/// ENFILE, ENOBUFS) persist until something closes; the connection stays in the kernel's
/// backlog and the listener stays readable, so retrying at once would spin a core. 100 ms
/// is short next to a probe's 1 s timeout.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections the kernel queues until the server accepts them. With a full queue the kernel
/// drops a SYN, and the client resends it a second later: the whole of a kubelet probe's
/// default timeout. The usual 128 overflowed when a few hundred clients connected at once,
/// although the server accepts (and sheds) them as fast as they come; 1024 absorbs such a
/// burst (the kernel caps it at `net.core.somaxconn`, 4096 since Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 1024;

/// A listener on `addr` with a queue of [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, like
/// `TcpListener::bind`, so a restart does not wait for the old connections' TIME_WAIT).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The server's limits; [`Default`] is the constants above (tests shorten them).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connection_age: Duration,
    pub close_grace: Duration,
    pub max_connections: usize,
    pub accept_backoff: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connection_age: MAX_CONNECTION_AGE,
            close_grace: CLOSE_GRACE,
            max_connections: MAX_CONNECTIONS,
            accept_backoff: ACCEPT_BACKOFF,
        }
    }
}

/// Why the server closed a connection.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reason {
    /// Idle longest when a new connection came at the cap.
    Shed,
    /// New at the cap while every open connection was inside a handler.
    Refused,
    /// No complete request head within the header read timeout, never having sent one.
    Timeout,
    /// Kept alive after a response, no next request within the header read timeout.
    Idle,
    /// Open for [`MAX_CONNECTION_AGE`].
    MaxAge,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::Shed,
        Reason::Refused,
        Reason::Timeout,
        Reason::Idle,
        Reason::MaxAge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Shed => "shed",
            Reason::Refused => "refused",
            Reason::Timeout => "timeout",
            Reason::Idle => "idle",
            Reason::MaxAge => "max_age",
        }
    }
}

impl EncodeLabelValue for Reason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    reason: Reason,
}

/// What the server counts; clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct HttpMetrics {
    open: Gauge,
    closed: Family<ClosedLabels, Counter>,
    accept_errors: Counter,
}

impl HttpMetrics {
    /// Adds the server's families to `registry` (the one `/metrics` encodes).
    pub fn register(&self, registry: &mut Registry) {
        // Every reason from the start: a rate over a series that appears late loses its first
        // increase.
        for reason in Reason::ALL {
            let _ = self.closed.get_or_create(&ClosedLabels { reason });
        }
        registry.register(
            "connwatch_http_connections",
            "HTTP connections open to /metrics, /healthz and /readyz",
            self.open.clone(),
        );
        registry.register(
            "connwatch_http_connections_closed",
            "HTTP connections the daemon closed to stay within its limits, by reason: shed \
             (idle longest when a new one came at the cap), refused (new at the cap, all busy), \
             timeout (no complete request head in time), idle (kept alive, no next request \
             in time), max_age",
            self.closed.clone(),
        );
        registry.register(
            "connwatch_http_accept_errors",
            "Failed accept() calls on the HTTP listener (e.g. EMFILE), each followed by a short wait",
            self.accept_errors.clone(),
        );
    }

    pub fn closed(&self, reason: Reason) -> u64 {
        self.closed.get_or_create(&ClosedLabels { reason }).get()
    }

    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.get()
    }

    fn close(&self, reason: Reason) {
        self.closed.get_or_create(&ClosedLabels { reason }).inc();
    }

    /// One line for the daemon's stop summary, when the limits closed anything.
    pub fn summary(&self) -> Option<String> {
        let counts: Vec<String> = Reason::ALL
            .into_iter()
            .map(|reason| format!("{} {}", self.closed(reason), reason.as_str()))
            .collect();
        let closed: u64 = Reason::ALL.into_iter().map(|r| self.closed(r)).sum();
        (closed + self.accept_errors() > 0).then(|| {
            format!(
                "HTTP connections closed at the limits: {}; {} accept errors",
                counts.join(", "),
                self.accept_errors()
            )
        })
    }
}

/// Where the server takes its connections from: a [`TcpListener`]; tests inject errors.
trait Accept {
    fn accept(&self) -> impl Future<Output = io::Result<TcpStream>> + Send;
}

impl Accept for TcpListener {
    async fn accept(&self) -> io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// Serves `router` on `listener` until dropped (the daemon aborts its task at exit).
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, metrics: HttpMetrics) {
    serve_from(listener, router, limits, metrics).await;
}

/// What the accept loop knows of an open connection.
struct Tracked {
    /// Accept order: of two connections idle since the same millisecond, the older goes.
    seq: u64,
    activity: Arc<Activity>,
    abort: AbortHandle,
}

async fn serve_from(listener: impl Accept, router: Router, limits: Limits, metrics: HttpMetrics) {
    let clock = Clock(Instant::now());
    let mut connections = JoinSet::new();
    let mut open: HashMap<tokio::task::Id, Tracked> = HashMap::new();
    let mut seq = 0;
    let mut warned = false;
    loop {
        let accepted = tokio::select! {
            Some(done) = connections.join_next_with_id() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(err) => err.id(),
                };
                open.remove(&id);
                metrics.open.set(i64::try_from(open.len()).unwrap_or(i64::MAX));
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            // The client gave up before we took it: nothing to wait for.
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                metrics.accept_errors.inc();
                let out_of_files = is_out_of_files(&err);
                if !warned {
                    warned = true;
                    log::warn!(
                        "cannot accept HTTP connections ({err}); {}retrying \
                         every {} (said once; connwatch_http_accept_errors_total counts them)",
                        if out_of_files {
                            "closing the HTTP connection idle longest and "
                        } else {
                            ""
                        },
                        humantime::format_duration(limits.accept_backoff)
                    );
                }
                // Out of descriptors below the cap (the rest of the daemon holds more than
                // usual): the connection idle longest gives its one to the next in the queue,
                // as at the cap, rather than the queue waiting for the header timeouts.
                if out_of_files {
                    shed(&mut open, &metrics);
                }
                tokio::time::sleep(limits.accept_backoff).await;
                continue;
            }
        };
        if open.len() >= limits.max_connections && !shed(&mut open, &metrics) {
            drop(stream);
            metrics.close(Reason::Refused);
            continue;
        }
        let activity = Arc::new(Activity::new(clock.now()));
        let abort = connections.spawn(serve_connection(
            stream,
            router.clone(),
            activity.clone(),
            clock,
            limits,
            metrics.clone(),
        ));
        open.insert(
            abort.id(),
            Tracked {
                seq,
                activity,
                abort,
            },
        );
        seq += 1;
        metrics
            .open
            .set(i64::try_from(open.len()).unwrap_or(i64::MAX));
    }
}

/// Closes the connection idle longest, if one is; false when every one is inside a handler.
fn shed(open: &mut HashMap<tokio::task::Id, Tracked>, metrics: &HttpMetrics) -> bool {
    let states = open.iter().map(|(id, tracked)| (*id, tracked.state()));
    let Some(victim) = longest_idle(states) else {
        return false;
    };
    if let Some(tracked) = open.remove(&victim) {
        // Dropping the connection's task closes its socket.
        tracked.abort.abort();
    }
    metrics
        .open
        .set(i64::try_from(open.len()).unwrap_or(i64::MAX));
    metrics.close(Reason::Shed);
    true
}

/// The process (EMFILE) or the system (ENFILE) has no file descriptor left.
fn is_out_of_files(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Errors of one connection (it was reset while queued), not of the listener.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// Milliseconds since the server started.
#[derive(Clone, Copy, Debug)]
struct Clock(Instant);

impl Clock {
    fn now(self) -> u64 {
        crate::bounds::millis(self.0.elapsed())
    }
}

/// A connection's requests, as its handlers see them.
#[derive(Debug)]
struct Activity {
    /// Requests inside the router now.
    handling: AtomicUsize,
    /// When (on the [`Clock`]) the last request left the router, or the accept.
    idle_since: AtomicU64,
    /// Requests that entered the router.
    requests: AtomicU64,
}

impl Activity {
    fn new(now: u64) -> Activity {
        Activity {
            handling: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now),
            requests: AtomicU64::new(0),
        }
    }
}

/// A request inside the router; dropped when its response is ready (or it is cancelled).
struct Handling {
    activity: Arc<Activity>,
    clock: Clock,
}

impl Handling {
    fn enter(activity: &Arc<Activity>, clock: Clock) -> Handling {
        activity.requests.fetch_add(1, Ordering::Relaxed);
        activity.handling.fetch_add(1, Ordering::SeqCst);
        Handling {
            activity: activity.clone(),
            clock,
        }
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.activity
            .idle_since
            .store(self.clock.now(), Ordering::SeqCst);
        self.activity.handling.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An open connection as the shedding sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    /// A request is inside a handler.
    busy: bool,
    /// Since when it has had no request inside a handler (milliseconds, server clock).
    idle_since: u64,
    /// Accept order.
    seq: u64,
}

impl Tracked {
    fn state(&self) -> State {
        State {
            busy: self.activity.handling.load(Ordering::SeqCst) > 0,
            idle_since: self.activity.idle_since.load(Ordering::SeqCst),
            seq: self.seq,
        }
    }
}

/// The connection to close for a new one at the cap: the one idle longest (the older of
/// equals); none when every connection is inside a handler.
fn longest_idle<K>(connections: impl IntoIterator<Item = (K, State)>) -> Option<K> {
    connections
        .into_iter()
        .filter(|(_, state)| !state.busy)
        .min_by_key(|(_, state)| (state.idle_since, state.seq))
        .map(|(key, _)| key)
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    activity: Arc<Activity>,
    clock: Clock,
    limits: Limits,
    metrics: HttpMetrics,
) {
    let router = TowerToHyperService::new(router);
    let handlers = activity.clone();
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let handling = Handling::enter(&handlers, clock);
        let response = hyper::service::Service::call(&router, request);
        async move {
            let response = response.await;
            drop(handling);
            response
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Requests here are a GET line and a few headers; hyper's default (~400 KB per
        // connection) would let 64 connections hold 26 MB.
        .max_buf_size(MAX_REQUEST_BYTES);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => Some(ended),
        () = tokio::time::sleep(limits.max_connection_age) => None,
    };
    match ended {
        Some(Err(err)) if err.is_timeout() => {
            metrics.close(if activity.requests.load(Ordering::Relaxed) == 0 {
                Reason::Timeout
            } else {
                Reason::Idle
            });
        }
        // Closed by the client, or a request hyper refused (it answered 4xx itself).
        Some(_) => {}
        None => {
            metrics.close(Reason::MaxAge);
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.close_grace, connection).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use std::sync::atomic::AtomicBool;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn state(busy: bool, idle_since: u64, seq: u64) -> State {
        State {
            busy,
            idle_since,
            seq,
        }
    }

    #[test]
    fn sheds_the_connection_idle_longest() {
        let open = [
            ("scrape", state(false, 900, 0)),
            ("silent", state(false, 100, 1)),
            ("probe", state(true, 50, 2)),
            ("dribbler", state(false, 400, 3)),
        ];
        // The busy one is older, but inside a handler.
        assert_eq!(longest_idle(open), Some("silent"));
        // Of two idle since the same moment, the one accepted first.
        let tied = [("b", state(false, 7, 5)), ("a", state(false, 7, 4))];
        assert_eq!(longest_idle(tied), Some("a"));
    }

    #[test]
    fn sheds_nothing_when_every_connection_is_busy() {
        let busy = [(1, state(true, 0, 0)), (2, state(true, 5, 1))];
        assert_eq!(longest_idle(busy), None);
        assert_eq!(longest_idle(Vec::<(u8, State)>::new()), None);
    }

    #[test]
    fn summary_only_when_something_was_closed() {
        let metrics = HttpMetrics::default();
        assert_eq!(metrics.summary(), None);
        metrics.close(Reason::Shed);
        metrics.close(Reason::Shed);
        metrics.close(Reason::Timeout);
        assert_eq!(
            metrics.summary().unwrap(),
            "HTTP connections closed at the limits: 2 shed, 0 refused, 1 timeout, \
             0 idle, 0 max_age; 0 accept errors"
        );
    }

    #[test]
    fn metrics_are_registered_with_every_reason() {
        let metrics = HttpMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.close(Reason::Idle);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for reason in Reason::ALL {
            let value = i32::from(reason == Reason::Idle);
            let sample = format!(
                "connwatch_http_connections_closed_total{{reason=\"{}\"}} {value}\n",
                reason.as_str()
            );
            assert!(text.contains(&sample), "{sample} not in {text}");
        }
        assert!(text.contains("connwatch_http_connections 0\n"), "{text}");
        assert!(
            text.contains("connwatch_http_accept_errors_total 0\n"),
            "{text}"
        );
    }

    /// Short limits, so each behaviour shows in a fraction of a second.
    fn quick() -> Limits {
        Limits {
            header_read_timeout: Duration::from_millis(300),
            max_connection_age: Duration::from_mins(1),
            close_grace: Duration::from_secs(1),
            max_connections: 2,
            accept_backoff: Duration::from_millis(100),
        }
    }

    fn router() -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    "slow\n"
                }),
            )
    }

    /// A server on a fresh loopback port, running until the test ends.
    async fn start(limits: Limits) -> (std::net::SocketAddr, HttpMetrics) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, spawn_server(listener, limits))
    }

    fn spawn_server(listener: impl Accept + Send + 'static, limits: Limits) -> HttpMetrics {
        let metrics = HttpMetrics::default();
        tokio::spawn(serve_from(listener, router(), limits, metrics.clone()));
        metrics
    }

    /// Sends `GET path` on `stream` and reads the answer (a small body with a length).
    async fn request(stream: &mut TcpStream, path: &str) -> String {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_response(stream).await
    }

    async fn read_response(stream: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if body.len() >= length {
                    return text;
                }
            }
        }
    }

    /// Whether the server closes `stream` within `within` (end of file or a reset).
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(n)) => panic!("unexpected {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(_) => false,
        }
    }

    /// Polls `value` until it equals `want` (the connection tasks count as they end).
    async fn eventually(want: u64, value: impl Fn() -> u64) {
        for _ in 0..100 {
            if value() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(value(), want);
    }

    #[tokio::test]
    async fn silent_and_idle_connections_are_closed_after_the_header_timeout() {
        let (addr, metrics) = start(quick()).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut dribbler = TcpStream::connect(addr).await.unwrap();
        dribbler
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            dribbler.write_all(b"X").await.unwrap();
        }
        assert!(closed_within(&mut silent, Duration::from_secs(2)).await);
        assert!(closed_within(&mut dribbler, Duration::from_secs(2)).await);
        assert!(started.elapsed() >= Duration::from_millis(250));
        eventually(2, || metrics.closed(Reason::Timeout)).await;

        // A kept-alive connection that goes quiet after a response.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        assert!(
            request(&mut kept, "/healthz")
                .await
                .ends_with("\r\n\r\nok\n")
        );
        assert!(!closed_within(&mut kept, Duration::from_millis(150)).await);
        assert!(closed_within(&mut kept, Duration::from_secs(2)).await);
        eventually(1, || metrics.closed(Reason::Idle)).await;
        assert_eq!(metrics.closed(Reason::Shed), 0);
    }

    #[tokio::test]
    async fn at_the_cap_the_connection_idle_longest_makes_room() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(30),
            ..quick()
        };
        let (addr, metrics) = start(limits).await;
        let mut oldest = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut newer = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Recently active: idle for less time than `newer`.
        assert!(request(&mut oldest, "/healthz").await.ends_with("ok\n"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut probe = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut probe, "/healthz").await.ends_with("ok\n"));
        assert!(closed_within(&mut newer, Duration::from_secs(1)).await);
        assert!(!closed_within(&mut oldest, Duration::from_millis(100)).await);
        assert_eq!(metrics.closed(Reason::Shed), 1);
        assert_eq!(metrics.closed(Reason::Refused), 0);
    }

    #[tokio::test]
    async fn at_the_cap_with_every_connection_busy_the_new_one_is_closed() {
        let (addr, metrics) = start(quick()).await;
        let mut busy = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
                .await
                .unwrap();
            busy.push(stream);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut late = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut late, Duration::from_millis(500)).await);
        assert_eq!(metrics.closed(Reason::Refused), 1);
        // The requests in the handlers are answered.
        for stream in &mut busy {
            assert!(read_response(stream).await.ends_with("slow\n"));
        }
        assert_eq!(metrics.closed(Reason::Shed), 0);
    }

    #[tokio::test]
    async fn a_connection_busy_past_its_age_is_closed_after_its_response() {
        let limits = Limits {
            max_connection_age: Duration::from_millis(400),
            ..quick()
        };
        let (addr, metrics) = start(limits).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // In the handler from 0 to 800 ms: the age (400 ms) passes meanwhile.
        let answer = request(&mut stream, "/slow").await;
        assert!(answer.ends_with("slow\n"), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(closed_within(&mut stream, Duration::from_millis(200)).await);
        eventually(1, || metrics.closed(Reason::MaxAge)).await;
    }

    /// A listener out of file descriptors while `out_of_fds`: accept fails with EMFILE, and a
    /// connection that arrives meanwhile stays queued, as in the kernel.
    struct Failing {
        listener: TcpListener,
        out_of_fds: Arc<AtomicBool>,
        queued: std::sync::Mutex<Option<TcpStream>>,
    }

    impl Accept for Failing {
        async fn accept(&self) -> io::Result<TcpStream> {
            let emfile = || io::Error::from_raw_os_error(libc::EMFILE);
            if self.out_of_fds.load(Ordering::SeqCst) {
                return Err(emfile());
            }
            if let Some(stream) = self.queued.lock().unwrap().take() {
                return Ok(stream);
            }
            let stream = Accept::accept(&self.listener).await?;
            if self.out_of_fds.load(Ordering::SeqCst) {
                *self.queued.lock().unwrap() = Some(stream);
                return Err(emfile());
            }
            Ok(stream)
        }
    }

    #[tokio::test]
    async fn out_of_files_the_server_backs_off_sheds_and_carries_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let out_of_fds = Arc::new(AtomicBool::new(false));
        let metrics = spawn_server(
            Failing {
                listener,
                out_of_fds: out_of_fds.clone(),
                queued: std::sync::Mutex::default(),
            },
            quick(),
        );
        let mut idle = TcpStream::connect(addr).await.unwrap();
        eventually(1, || u64::try_from(metrics.open.get()).unwrap_or(0)).await;
        // The server can take no more descriptors (its cap is 2): it sheds the idle one for
        // the connection that waits, and tries again after each back-off, not in a loop.
        out_of_fds.store(true, Ordering::SeqCst);
        let mut waiting = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut idle, Duration::from_millis(300)).await);
        assert_eq!(metrics.closed(Reason::Shed), 1);
        tokio::time::sleep(Duration::from_millis(350)).await;
        let errors = metrics.accept_errors();
        assert!((3..=8).contains(&errors), "{errors} accept errors");
        // Nothing else to shed.
        assert_eq!(metrics.closed(Reason::Shed), 1);
        out_of_fds.store(false, Ordering::SeqCst);
        assert!(request(&mut waiting, "/healthz").await.ends_with("ok\n"));
    }

    #[tokio::test]
    async fn bind_queues_a_burst_of_connections() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // More than the usual backlog of 128, none accepted yet: each connects at once (up
        // to the kernel's cap, 4096 unless lowered).
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(4096);
        let mut queued = Vec::new();
        for _ in 0..300.min(somaxconn) {
            let connect = TcpStream::connect(addr);
            let stream = tokio::time::timeout(Duration::from_millis(500), connect).await;
            queued.push(stream.expect("a SYN dropped: the backlog is full").unwrap());
        }
        // A taken address is refused as std's bind refuses it.
        let taken = bind(addr).unwrap_err();
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn dropping_the_server_closes_its_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, router(), quick(), HttpMetrics::default()));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut stream, "/healthz").await.ends_with("ok\n"));
        server.abort();
        assert!(closed_within(&mut stream, Duration::from_millis(200)).await);
    }
}
