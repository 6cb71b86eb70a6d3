//! Flags shared by every command that runs the pipeline.
use std::{path::PathBuf, time::Duration};

use crate::{detect::DetectConfig, pipeline::HostPaths};

#[derive(Debug, Clone, clap::Args)]
pub struct PipelineArgs {
    /// A peer reset or FIN after at least this long without data is `*_idle`.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_idle_threshold)]
    pub idle_threshold: Duration,
    /// A socket in CLOSE_WAIT longer than this is `close_wait_lingering`.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_close_wait_threshold)]
    pub close_wait_threshold: Duration,
    /// A request acknowledged by the peer and unanswered this long is `request_stalled`.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_stall_threshold)]
    pub stall_threshold: Duration,
    /// An accepted connection written to and acknowledged, with nothing received this
    /// long while a newer one from the same peer is active, is `zombie_connection`.
    #[arg(long, value_name = "DURATION", default_value = "30s", env = "CONNWATCH_ZOMBIE_THRESHOLD",
          value_parser = parse_zombie_threshold)]
    pub zombie_threshold: Duration,
    /// An outbound connection idle this long since shortly after it opened, while its
    /// process opened newer ones to the same endpoint, is stranded (`pool_leak`).
    #[arg(long, value_name = "DURATION", default_value = "30s", env = "CONNWATCH_LEAK_THRESHOLD",
          value_parser = parse_leak_threshold)]
    pub leak_threshold: Duration,
    /// Ports of long polls, streams and other connections that wait quietly by design: no
    /// `request_stalled`, `pool_exhausted` or `zombie_connection` on a socket with this
    /// local or remote port (repeatable or comma-separated; at most 64).
    #[arg(long, value_name = "PORT", value_delimiter = ',', env = "CONNWATCH_IGNORE_PORTS",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub ignore_port: Vec<u16>,
    /// How often to re-read the kernel's socket list (sock_diag): pools, stalls, and what
    /// events alone miss.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_refresh)]
    pub refresh: Duration,
    /// Where the host's filesystem is visible (in a container: its host mount), for
    /// cgroupfs and the kubelet's pod log directories.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/",
        env = "CONNWATCH_HOST_ROOT"
    )]
    pub host_root: PathBuf,
    /// The kubelet's pod log directory, `<namespace>_<pod>_<uid>` entries
    /// (default: <host-root>/var/log/pods).
    #[arg(long, value_name = "PATH", env = "CONNWATCH_POD_LOGS")]
    pub pod_logs: Option<PathBuf>,
    /// Sockets tracked at once, in the kernel's maps (LRU) and in connwatch's tables (oldest
    /// closed ones evicted first, counted). Each costs about 240 bytes of kernel memory,
    /// preallocated at start.
    #[arg(long, value_name = "N", default_value_t = 65536, env = "CONNWATCH_MAX_TRACKED_SOCKETS",
          value_parser = parse_max_tracked_sockets)]
    pub max_tracked_sockets: u32,
    /// Ask the kubelet for pod names when /var/log/pods does not tell (plain HTTP, e.g. the
    /// read-only port: http://127.0.0.1:10255).
    #[arg(long, value_name = "URL", env = "CONNWATCH_KUBELET_URL")]
    pub kubelet_url: Option<String>,
    /// The host's /proc: attribution of sockets opened before connwatch started, and the
    /// ephemeral port range.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/proc",
        env = "CONNWATCH_HOST_PROC"
    )]
    pub host_proc: PathBuf,
}

impl PipelineArgs {
    pub fn host_paths(&self) -> HostPaths {
        HostPaths {
            proc: self.host_proc.clone(),
            root: self.host_root.clone(),
            pod_logs: self.pod_logs.clone(),
            kubelet_url: self.kubelet_url.clone(),
        }
    }

    pub fn detect_config(&self, state_changes: bool) -> DetectConfig {
        DetectConfig {
            idle_threshold: self.idle_threshold,
            close_wait_threshold: self.close_wait_threshold,
            stall_threshold: self.stall_threshold,
            zombie_threshold: self.zombie_threshold,
            leak_threshold: self.leak_threshold,
            max_sockets: self.max_tracked_sockets as usize,
            rst_reasons: std::collections::HashMap::default(),
            state_changes,
            quiet_ports: self.ignore_port.clone(),
        }
    }
}

/// At most this many `--ignore-port`s: each socket of each refresh is checked against them.
pub const MAX_IGNORED_PORTS: usize = 64;

/// Bounds of `--max-tracked-sockets`, and the kernel memory each tracked socket costs (the
/// owner and peer-end maps' entries, measured with `bpftool map show`).
const TRACKED_SOCKETS: std::ops::RangeInclusive<u32> = 64..=1 << 20;
const KERNEL_BYTES_PER_TRACKED_SOCKET: u64 = 240;

fn parse_max_tracked_sockets(text: &str) -> Result<u32, String> {
    let n: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of sockets (e.g. 65536)"))?;
    if n < *TRACKED_SOCKETS.start() {
        return Err(format!(
            "{n} is below the minimum of {}",
            TRACKED_SOCKETS.start()
        ));
    }
    if n > *TRACKED_SOCKETS.end() {
        let mib = (u64::from(n) * KERNEL_BYTES_PER_TRACKED_SOCKET) >> 20;
        return Err(format!(
            "{n} is above the limit of {}: the kernel preallocates about \
             {KERNEL_BYTES_PER_TRACKED_SOCKET} bytes per tracked socket, so this would pin \
             {mib} MiB; with more live sockets than the limit, the oldest entries are evicted \
             and counted, and the rest keeps working",
            TRACKED_SOCKETS.end()
        ));
    }
    Ok(n)
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("{err}; expected a duration like 500ms, 1s or 2m"))
}

pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err("must be greater than zero".to_string()),
        duration => Ok(duration),
    }
}

/// The longest threshold of the detectors that wait: past a day, a wait is not told apart
/// from a deliberate long pause (a batch job's query, a client that left).
const MAX_THRESHOLD: Duration = Duration::from_hours(24);

/// A threshold between zero and a day; `advice` says what to set instead.
fn parse_threshold(text: &str, advice: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("must be greater than zero: {advice}")),
        threshold if threshold > MAX_THRESHOLD => {
            Err(format!("{text} is above the limit of 1 day: {advice}"))
        }
        threshold => Ok(threshold),
    }
}

/// Zero is allowed: every reset or FIN of a connection is then `*_idle`.
fn parse_idle_threshold(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        threshold if threshold > MAX_THRESHOLD => Err(format!(
            "{text} is above the limit of 1 day: use the idle time after which a peer's \
             reset means a pooled connection went stale, e.g. 1s or 30s"
        )),
        threshold => Ok(threshold),
    }
}

fn parse_close_wait_threshold(text: &str) -> Result<Duration, String> {
    parse_threshold(
        text,
        "use the time after which a socket still in CLOSE_WAIT is surely leaked, e.g. 30s",
    )
}

/// Faster would spend a core on sock_diag and /proc walks; slower leaves pools stale.
const REFRESH: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_hours(1);

fn parse_refresh(text: &str) -> Result<Duration, String> {
    let every = parse_duration(text)?;
    if REFRESH.contains(&every) {
        Ok(every)
    } else {
        Err(format!(
            "{text} is outside 100ms..1h: each refresh lists every socket and walks /proc, \
             so use seconds (the default is 5s)"
        ))
    }
}

fn parse_zombie_threshold(text: &str) -> Result<Duration, String> {
    parse_threshold(
        text,
        "use the time after which your clients have surely moved off an old connection, \
         e.g. 30s or 5m",
    )
}

fn parse_leak_threshold(text: &str) -> Result<Duration, String> {
    parse_threshold(
        text,
        "use more than your application holds a connection between two queries, e.g. 30s",
    )
}

fn parse_stall_threshold(text: &str) -> Result<Duration, String> {
    parse_threshold(
        text,
        "use a little more than your slowest legitimate query takes, e.g. 10s or 2m",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombie_threshold_bounds() {
        assert_eq!(parse_zombie_threshold("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_zombie_threshold("1day"), Ok(MAX_THRESHOLD));
        let zero = parse_zombie_threshold("0s").unwrap_err();
        assert!(zero.contains("must be greater than zero"), "{zero}");
        let long = parse_zombie_threshold("2days").unwrap_err();
        assert!(long.contains("above the limit of 1 day"), "{long}");
        assert!(parse_zombie_threshold("soon").is_err());
    }

    #[test]
    fn other_duration_bounds() {
        assert_eq!(parse_idle_threshold("0s"), Ok(Duration::ZERO));
        assert!(parse_idle_threshold("600000years").is_err());
        assert!(parse_close_wait_threshold("0s").is_err());
        assert!(parse_close_wait_threshold("2days").is_err());
        assert_eq!(parse_leak_threshold("3s"), Ok(Duration::from_secs(3)));
        assert!(parse_leak_threshold("0s").is_err());
        assert!(parse_leak_threshold("2days").is_err());
        assert_eq!(parse_refresh("1h"), Ok(Duration::from_hours(1)));
        assert!(parse_refresh("1ms").unwrap_err().contains("100ms..1h"));
        assert!(parse_refresh("2h").is_err());
    }
}
