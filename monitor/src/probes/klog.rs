//! The kernel programs' own diagnostics (aya-log): a failed read of a field the layout said
//! exists, an unexpected state, a record skipped because the ring buffer was full.
//!
//! Every program carries them, behind a test of the `AYA_LOG_LEVEL` global. The loader
//! writes that global and freezes it, so the verifier sees a constant: with diagnostics off
//! (the default) it removes them as dead code and they cost nothing per hit. They are on
//! only at `--log-level debug` (or trace), where a thread of their own forwards them to the
//! `log` crate as `kernel: …` lines of target [`TARGET`], at most
//! [`LINES_PER_SECOND`] a second.
use std::{
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;

/// The `log` target of the kernel's diagnostics.
pub const TARGET: &str = "connwatch::kernel";

/// Diagnostics shown per second at most; the rest are counted and the count shown. A flood
/// (a full ring buffer skips every record) must not bury connwatch's own warnings.
pub const LINES_PER_SECOND: u64 = 100;

/// The kernel's record ring (`aya_log_ebpf`'s map).
const MAP: &str = "AYA_LOGS";

/// How long the forwarding thread waits for records before it looks at its stop flag.
const POLL: Duration = Duration::from_millis(200);

/// The level the kernel programs should log at, from the process's log level: `None`
/// (off) below debug.
pub fn wanted() -> Option<log::Level> {
    log::max_level()
        .to_level()
        .filter(|level| *level >= log::Level::Debug)
}

/// Sets the kernel's level for the load. Off, the record ring shrinks to one page: it is
/// kernel memory, and nothing will be written to it.
pub fn configure(loader: &mut EbpfLoader<'_>, level: Option<log::Level>) {
    // aya-log's levels number like `log`'s: Error = 1 … Trace = 5; 0 enables none. The
    // loader borrows the value until it loads.
    static LEVELS: [u8; 6] = [0, 1, 2, 3, 4, 5];
    let value = &LEVELS[level.map_or(0, |level| level as usize)];
    loader.override_global(aya_log::LEVEL, value, true);
    if level.is_none() {
        loader.map_max_entries(MAP, page_size());
    }
}

fn page_size() -> u32 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| u32::try_from(size).ok())
        .unwrap_or(4096)
}

/// Why the kernel's diagnostics cannot be forwarded (connwatch runs without them).
#[derive(Debug, thiserror::Error)]
pub enum KernelLogError {
    #[error("opening the kernel diagnostics ring (AYA_LOGS)")]
    Ring(#[source] Box<aya_log::Error>),
    #[error("starting the kernel diagnostics thread")]
    Thread(#[source] std::io::Error),
}

/// The forwarding thread; dropping this stops it (within [`POLL`]).
pub struct KernelLog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for KernelLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelLog").finish_non_exhaustive()
    }
}

impl KernelLog {
    /// Takes the record ring from the loaded object and starts forwarding.
    pub fn start(ebpf: &mut Ebpf) -> Result<KernelLog, KernelLogError> {
        let forward = Arc::new(Forward::default());
        let mut logger = EbpfLogger::init_with_logger(ebpf, Shared(forward.clone()))
            .map_err(|err| KernelLogError::Ring(Box::new(err)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cw-klog".into())
            .spawn(move || {
                let mut window = Instant::now();
                while !stopping.load(Ordering::Relaxed) {
                    wait_readable(logger.as_fd(), POLL);
                    // aya-log unwraps its parse of each record; ours are well formed, and
                    // a bad one must end this thread only, said once.
                    let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        logger.flush();
                    }));
                    if flushed.is_err() {
                        log::warn!("kernel diagnostics stopped: a record could not be decoded");
                        return;
                    }
                    if window.elapsed() >= Duration::from_secs(1) {
                        window = Instant::now();
                        forward.new_window();
                    }
                }
            })
            .map_err(KernelLogError::Thread)?;
        Ok(KernelLog {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for KernelLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes (an interrupted or failed wait just
/// returns: the caller flushes and waits again).
fn wait_readable(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let _ = poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], timeout);
}

/// Hands aya-log's records to the process's logger under [`TARGET`], within the budget.
#[derive(Default)]
struct Forward {
    /// Lines forwarded in this second.
    shown: AtomicU64,
    /// Lines over the budget in this second.
    suppressed: AtomicU64,
}

impl Forward {
    /// A new second: says how many went unshown in the last one.
    fn new_window(&self) {
        self.shown.store(0, Ordering::Relaxed);
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        if suppressed > 0 {
            log::debug!(
                target: TARGET,
                "kernel: {suppressed} more diagnostics in the last second not shown (at most \
                 {LINES_PER_SECOND} a second)"
            );
        }
    }
}

/// The thread's handle on [`Forward`], which aya-log owns.
struct Shared(Arc<Forward>);

impl log::Log for Shared {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0.log(record);
    }

    fn flush(&self) {}
}

impl log::Log for Forward {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        let ours = log::Metadata::builder()
            .level(metadata.level())
            .target(TARGET)
            .build();
        log::logger().enabled(&ours)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if self.shown.fetch_add(1, Ordering::Relaxed) >= LINES_PER_SECOND {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        log::logger().log(
            &log::Record::builder()
                .level(record.level())
                .target(TARGET)
                .args(format_args!("kernel: {}", record.args()))
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {}
}
