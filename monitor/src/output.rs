//! stdout and stderr, each written by a thread of its own. A reader that stalls (a full pipe,
//! a log collector that stopped reading, a terminal paused with ^S) then delays only that
//! thread: the event loop, its signals and its metrics go on. What does not fit a bounded
//! queue is dropped and counted; at exit, what is still queued gets [`finish`]'s deadline
//! and no more.
//!
//! Diagnostics reach stderr through the `log` macros ([`install_logger`]), one line each:
//! `connwatch: warning: …` for warnings, `connwatch: …` for information, `connwatch:
//! debug: …` at `--log-level debug` (which adds the kernel programs' own diagnostics).
use std::{
    fs::File,
    io::{self, Write},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

/// Bytes queued for stdout and not yet written: about 8,000 findings as JSON lines, several
/// seconds of a reset flood. A reader stalled for longer loses lines, never the agent.
const STDOUT_QUEUE_BYTES: usize = 4 << 20;
/// Diagnostics are few and short; a stalled stderr keeps the first ones.
const STDERR_QUEUE_BYTES: usize = 256 << 10;
/// The writer thread hands the kernel at most this much per write.
const BATCH_BYTES: usize = 64 << 10;

/// One output stream and the thread that writes it.
pub struct Stream {
    name: &'static str,
    limit: usize,
    /// Bytes accepted and not yet written (including those inside a blocked write).
    queued: AtomicUsize,
    /// Lines that found the queue full.
    dropped: AtomicU64,
    /// The reader went away (EPIPE) or the descriptor cannot be written.
    closed: AtomicBool,
    sender: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    /// Signalled by the writer thread once it has written everything it was given.
    done: Mutex<Option<mpsc::Receiver<()>>>,
}

static STDOUT: OnceLock<&'static Stream> = OnceLock::new();
static STDERR: OnceLock<&'static Stream> = OnceLock::new();

/// The process's stdout, through its writer thread (started on first use).
pub fn stdout() -> &'static Stream {
    STDOUT.get_or_init(|| Stream::spawn("stdout", io::stdout(), STDOUT_QUEUE_BYTES))
}

/// The process's stderr, through its writer thread (started on first use).
pub fn stderr() -> &'static Stream {
    STDERR.get_or_init(|| Stream::spawn("stderr", io::stderr(), STDERR_QUEUE_BYTES))
}

impl Stream {
    /// Starts the writer thread of a stream over a duplicate of `fd`. Leaked: a stream
    /// lives as long as the process (one per standard stream).
    fn spawn(name: &'static str, fd: impl std::os::fd::AsFd, limit: usize) -> &'static Stream {
        let (sender, receiver) = mpsc::channel::<Vec<u8>>();
        let (done_sender, done) = mpsc::channel();
        let stream: &'static Stream = Box::leak(Box::new(Stream {
            name,
            limit,
            queued: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            sender: Mutex::new(Some(sender)),
            done: Mutex::new(Some(done)),
        }));
        // A duplicate: the writer thread owns its descriptor, and std's own stdout lock
        // (which it would hold inside a blocked write) stays free for the exit-time flush.
        let file = fd.as_fd().try_clone_to_owned().map(File::from);
        let spawned = std::thread::Builder::new()
            .name(format!("cw-{name}"))
            .spawn(move || {
                match file {
                    Ok(file) => stream.write_all_from(file, &receiver),
                    Err(_) => stream.closed.store(true, Ordering::Relaxed),
                }
                let _ = done_sender.send(());
            });
        if spawned.is_err() {
            stream.closed.store(true, Ordering::Relaxed);
        }
        stream
    }

    /// The writer thread's loop: whatever is queued, in batches, until the queue closes
    /// or the reader goes away.
    fn write_all_from(&self, mut file: File, receiver: &mpsc::Receiver<Vec<u8>>) {
        while let Ok(mut batch) = receiver.recv() {
            while batch.len() < BATCH_BYTES {
                match receiver.try_recv() {
                    Ok(more) => batch.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            let written = file.write_all(&batch);
            self.queued.fetch_sub(batch.len(), Ordering::Relaxed);
            if written.is_err() {
                // EPIPE, EBADF, a full disk: nothing later can be written either.
                self.closed.store(true, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Queues `bytes` (whole lines) without waiting. A full queue drops them and counts
    /// one more dropped; an error only once the reader is gone (`BrokenPipe`), so that
    /// `watch | head` ends.
    pub fn push(&self, bytes: Vec<u8>) -> io::Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("{} is closed", self.name),
            ));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let len = bytes.len();
        if self.queued.fetch_add(len, Ordering::Relaxed) + len > self.limit {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let sent = match &*self
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some(sender) => sender.send(bytes).is_ok(),
            None => false,
        };
        if !sent {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes (lines) dropped because the reader did not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A writer for sinks: it collects what is written and queues it on `flush`.
    pub fn writer(&'static self) -> Queued {
        Queued {
            stream: self,
            buf: Vec::new(),
        }
    }

    /// Closes the queue and waits until `deadline` for the thread to write what is in it.
    fn close(&self, deadline: Instant) -> bool {
        drop(
            self.sender
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        let Some(done) = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            return true;
        };
        done.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

/// Gives stdout and stderr until `within` to write what is queued; a reader that is still
/// stalled then loses the rest, and the process exits anyway.
pub fn finish(within: Duration) {
    let deadline = Instant::now() + within;
    for stream in [STDOUT.get(), STDERR.get()].into_iter().flatten() {
        stream.close(deadline);
    }
}

/// An [`io::Write`] over a [`Stream`]: what one report writes is queued whole at `flush`,
/// so lines are never interleaved or cut.
pub struct Queued {
    stream: &'static Stream,
    buf: Vec<u8>,
}

impl Write for Queued {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.push(std::mem::take(&mut self.buf))
    }
}

/// Sends the `log` macros' records to stderr through its writer thread, up to its level.
struct StderrLog {
    level: log::Level,
}

impl StderrLog {
    /// Ours (connwatch's modules, the kernel programs') up to the level; libraries' (aya,
    /// hyper) only when they warn, or at trace.
    fn shows(&self, metadata: &log::Metadata) -> bool {
        let target = metadata.target();
        let ours = target.starts_with("monitor") || target.starts_with("connwatch");
        let limit = if ours || self.level == log::Level::Trace {
            self.level
        } else {
            self.level.min(log::Level::Warn)
        };
        metadata.level() <= limit
    }
}

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.shows(metadata)
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = match record.level() {
            log::Level::Error => format!("connwatch: error: {}\n", record.args()),
            log::Level::Warn => format!("connwatch: warning: {}\n", record.args()),
            log::Level::Info => format!("connwatch: {}\n", record.args()),
            log::Level::Debug => format!("connwatch: debug: {}\n", record.args()),
            log::Level::Trace => format!("connwatch: trace: {}\n", record.args()),
        };
        let _ = stderr().push(line.into_bytes());
    }

    fn flush(&self) {}
}

/// `--log-level` / `RUST_LOG`: one level for connwatch's own diagnostics. `RUST_LOG` is often
/// set for a whole pod in env_logger's syntax (`info,hyper=warn`): a bare level, or one for a
/// `connwatch`/`monitor` target, sets connwatch's; directives for other crates are ignored
/// (their messages show from warn up); a value that is not a level is an error either way.
pub fn parse_log_level(text: &str) -> Result<log::Level, String> {
    let mut level = log::Level::Info;
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, value) = match directive.split_once('=') {
            Some((target, value)) => (Some(target.trim()), value.trim()),
            None => (None, directive),
        };
        let parsed = value.parse().map_err(|_| {
            format!(
                "`{value}` is not a log level (from --log-level or RUST_LOG `{text}`): use \
                 error, warn, info, debug or trace"
            )
        })?;
        if target.is_none_or(|t| t.starts_with("connwatch") || t.starts_with("monitor")) {
            level = parsed;
        }
    }
    Ok(level)
}

/// Routes `log` records up to `level` to stderr (see the module's doc). Once per process; a
/// second call is a no-op.
pub fn install_logger(level: log::Level) {
    let logger: &'static StderrLog = Box::leak(Box::new(StderrLog { level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level.to_level_filter());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_read_env_logger_directives() {
        assert_eq!(parse_log_level("debug"), Ok(log::Level::Debug));
        assert_eq!(parse_log_level(" WARN "), Ok(log::Level::Warn));
        assert_eq!(parse_log_level("debug,hyper=warn"), Ok(log::Level::Debug));
        assert_eq!(parse_log_level("hyper=trace"), Ok(log::Level::Info));
        assert_eq!(parse_log_level("connwatch=trace"), Ok(log::Level::Trace));
        assert_eq!(
            parse_log_level("monitor::probes=debug"),
            Ok(log::Level::Debug)
        );
        for bad in ["bogus", "info,hyper=loud", "connwatch=verbose"] {
            let err = parse_log_level(bad).unwrap_err();
            assert!(
                err.contains("use error, warn, info, debug or trace"),
                "{err}"
            );
        }
    }

    /// A stream into a pipe nobody reads, already full: its writer thread blocks at once.
    fn stalled(limit: usize) -> (&'static Stream, std::os::fd::OwnedFd) {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        nix::fcntl::fcntl(
            &writer,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        let mut filler = File::from(writer.try_clone().unwrap());
        while filler.write(&[0; 4096]).is_ok() {}
        // Blocking again for the stream's own writes (the flag is on the shared file).
        nix::fcntl::fcntl(
            &writer,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .unwrap();
        (Stream::spawn("test", writer, limit), reader)
    }

    #[test]
    fn log_levels() {
        assert_eq!(parse_log_level("debug"), Ok(log::Level::Debug));
        assert_eq!(parse_log_level("WARN"), Ok(log::Level::Warn));
        let err = parse_log_level("verbose").unwrap_err();
        assert!(err.contains("`verbose` is not a log level"), "{err}");
        let at = |level, target: &str, of| {
            StderrLog { level }.shows(&log::Metadata::builder().level(of).target(target).build())
        };
        assert!(at(log::Level::Info, "monitor::engine", log::Level::Info));
        assert!(!at(log::Level::Info, "monitor::engine", log::Level::Debug));
        assert!(!at(
            log::Level::Info,
            "connwatch::kernel",
            log::Level::Debug
        ));
        assert!(at(
            log::Level::Debug,
            "connwatch::kernel",
            log::Level::Debug
        ));
        assert!(!at(log::Level::Debug, "aya::bpf", log::Level::Info));
        assert!(at(log::Level::Trace, "aya::bpf", log::Level::Debug));
        assert!(!at(log::Level::Error, "monitor::engine", log::Level::Warn));
    }

    #[test]
    fn a_stalled_reader_costs_dropped_lines_not_time() {
        let (stream, _reader) = stalled(1_000);
        let started = Instant::now();
        for _ in 0..10_000 {
            stream.push(vec![b'x'; 100]).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(stream.queued.load(Ordering::Relaxed) <= 1_000);
        assert!(stream.dropped() >= 9_000, "{}", stream.dropped());
        // And closing it gives up at the deadline.
        let started = Instant::now();
        assert!(!stream.close(Instant::now() + Duration::from_millis(200)));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn lines_are_written_whole_and_a_gone_reader_is_an_error() {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let stream = Stream::spawn("test", writer, 1 << 20);
        let mut out = stream.writer();
        write!(out, "one ").unwrap();
        writeln!(out, "line").unwrap();
        out.flush().unwrap();
        assert!(stream.close(Instant::now() + Duration::from_secs(5)));
        let mut text = String::new();
        io::Read::read_to_string(&mut File::from(reader), &mut text).unwrap();
        assert_eq!(text, "one line\n");

        let (reader, writer) = nix::unistd::pipe().unwrap();
        drop(reader);
        let stream = Stream::spawn("test", writer, 1 << 20);
        stream.push(b"first\n".to_vec()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while stream.push(b"more\n".to_vec()).is_ok() {
            assert!(Instant::now() < deadline, "EPIPE never reported");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
